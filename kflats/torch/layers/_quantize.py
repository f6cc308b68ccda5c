"""Storage quantization of torch layers: dense and projective factors.

A quantized layer keeps its float parameters, which hold exactly the
dequantized values: its forward is the float forward (no slower than the
original, and ``to_dense()`` still works), and what a save writes is the
packed codes and scales (:func:`quantized_state`). A load keeps them packed,
the layer dequantizing them on use (:func:`pack_quantized_`), or
dequantizes them to the same floats (``unpack=True``); either way outputs
are bit-identical after the round trip.

Factors of a projective layer (``W[R_c] = U_c V_c``)
----------------------------------------------------
The bases ``V_c`` are rounded first, with error feedback along the moment of
what multiplies them (``U_c^T D U_c`` with the token weights ``D`` for an
embedding, ``U_c^T C_cc U_c`` for an input-side Linear, ``C`` for an
output-side Linear); then the coefficients are refitted to the rounded
bases by least squares (so the float reconstruction is matched as closely as
``V_hat`` allows) and rounded with error feedback along the moment of their
own input (``V_hat V_hat^T``, ``V_hat C V_hat^T``, or ``C_cc``). Groups run
along the long dimension of a basis (``d``, which ``group_size`` must
divide) and along the rank of a coefficient row (each cluster's rank takes
its divisor nearest ``group_size``: :func:`rank_group_size`).

Measured on all-MiniLM-L6-v2 (factors with k=2, j=64 of three Linear
layers, both sides, calibrated on 512 sentences, the output error on the
held-out sentences' moment, relative to the weight's): quantizing the
factors at int4 g32 adds 0.0008-0.0123 calibrated against 0.0027-0.0141
round-to-nearest, at int3 0.0026-0.0466 against 0.0084-0.0574 (the input
side gains most, 3x); the word embedding's factors (k=4, j=64) 0.0098
against 0.0112 at int4. The least-squares refit of the coefficients alone
lowers the error by 2-10 % on random layers (a test keeps it).
"""

import numpy as np
import torch
from scipy import linalg
from torch import nn

from kflats._threads import map_threads
from kflats.quantize._gptq import quantize_calibrated
from kflats.quantize._grid import (
    check_bits,
    check_group_size,
    check_scale_dtype,
    check_zero_dtype,
)
from kflats.quantize._rtn import quantize
from kflats.quantize._scales import compact_layout
from kflats.quantize._tensor import QuantizedTensor
from kflats.torch.layers._dense import dense_weight, is_conv1d
from kflats.torch.layers._embedding import ProjectiveEmbedding
from kflats.torch.layers._linear import ProjectiveLinear
from kflats.torch.layers._quantized_bytes import (
    _check_projective_groups,
    rank_group_size,
    scale_layouts,
)
from kflats.torch.layers._quantized_state import _assign, _np

# the straight-through helpers are imported from here by the heal
from kflats.torch.layers._straight_through import (
    register_straight_through_ as register_straight_through_,
)
from kflats.torch.layers._straight_through import requantize_ as requantize_
from kflats.torch.layers._straight_through import (
    straight_through_parameters as straight_through_parameters,
)

__all__ = ["quantize_module_"]

_METHODS = ("calibrated", "rtn")


def _check_method(method):
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
    return method


def _check_weights(token_weights, n):
    if token_weights is None:
        return None
    if torch.is_tensor(token_weights):
        token_weights = token_weights.detach().cpu().numpy()
    w = np.asarray(token_weights, dtype=np.float64)
    if w.shape != (n,) or not np.all(np.isfinite(w)) or np.any(w < 0):
        raise ValueError(
            f"token_weights must be {n} finite non-negative numbers (one per "
            f"row of the table), got shape {w.shape}"
        )
    return w


def _check_moment_shape(moment, n):
    if moment is None:
        return None
    if torch.is_tensor(moment):
        moment = moment.detach().cpu().numpy()
    C = np.asarray(moment, dtype=np.float64)
    if C.shape != (n, n):
        raise ValueError(
            f"moment must have shape ({n}, {n}) (the layer's in_features), got "
            f"{C.shape}"
        )
    return C


def _projective_params(module):
    """(coefficient list, bases per cluster, rows of each cluster) as numpy."""
    labels = module.labels.detach().cpu().numpy().astype(np.int64)
    rows = [np.flatnonzero(labels == c) for c in range(module.k)]
    U = [_np(u) for u in module.coefficients]
    V = [_np(module._bases_of(c)) for c in range(module.k)]
    return U, V, rows


def _stack_rows(parts, bits, group_size, symmetric, shape):
    """One QuantizedTensor of the rows of ``parts`` (axis-1 tensors), in order.

    Compact scales that share exponents along each line (``scale_layout=1``)
    stay compact: the lines are stacked whole."""
    codes = np.concatenate([p.unpacked_codes() for p in parts])
    scales = np.concatenate([p.scales for p in parts])
    zeros = None if symmetric else np.concatenate([p.zeros for p in parts])
    layouts = {p.scale_layout for p in parts}
    layout = layouts.pop() if layouts in ({1}, {None}) else None
    return QuantizedTensor._from_codes(
        codes, scales, zeros, shape, bits, parts[0].group_size, 1, layout
    )


def _lstsq_refit(U, V, Vq, L=None):
    """``U'`` minimising ``||(U' Vq - U V) L||_F`` (``L = I`` when None).

    The least-norm solution ``U (V L)(Vq L)^T G^+`` with ``G = (Vq L)(Vq L)^T``:
    rank x rank products instead of the n x d matrix ``U V`` (an embedding's
    table), the same solution as :func:`numpy.linalg.lstsq`.
    """
    A, B = (Vq, V) if L is None else (Vq @ L, V @ L)
    G, rhs = A @ A.T, U @ (B @ A.T)
    # G is positive definite while the rounded bases keep their rank: solved
    # by its Cholesky factor (pinvh's eigendecomposition: 40x slower at rank
    # 192), and by pinvh where its factor says it is near singular
    try:
        factor = linalg.cho_factor(G, lower=True, check_finite=False)
    except linalg.LinAlgError:
        factor = None
    if factor is not None:
        diag = np.abs(np.diag(factor[0]))
        if diag.min() ** 2 > _WELL_POSED * diag.max() ** 2:
            return linalg.cho_solve(factor, rhs.T, check_finite=False).T
    return rhs @ linalg.pinvh(G)


# the smallest ratio of squared Cholesky diagonal entries of a well-posed refit
_WELL_POSED = 1e-10


def _quantize_projective(module, bits, g, method, moment, weights, kw):
    """QuantizedTensors of the bases (stacked) and each cluster's coefficients."""
    U, V, rows = _projective_params(module)
    side = getattr(module, "side", None)
    calibrated = method == "calibrated"
    cholesky = None
    if calibrated and side is not None and moment is not None:
        from kflats.factorize import damped_moment

        C, cholesky = damped_moment(moment, moment.shape[0], kw["damping"])

    compact = kw.pop("compact_scales")
    bases_layout, coef_layout = scale_layouts(side)
    rtn_v = {**_rtn_kw(kw), "compact_scales": compact and bases_layout is not None}
    rtn_u = {**_rtn_kw(kw), "compact_scales": compact}
    kv = {**kw, "compact_scales": compact and bases_layout is not None}
    kw = {**kw, "compact_scales": compact}

    def one(c):
        """Cluster c's quantized bases and coefficients (None where it has none)."""
        u, v, idx = U[c], V[c], rows[c]
        r = v.shape[0]
        gu = rank_group_size(r, g) if r else None
        if r == 0 or u.shape[0] == 0:
            # an empty cluster still stores its bases
            return (quantize(v, bits, g, **rtn_v) if r else None), None
        if not calibrated:
            vq = quantize(v, bits, g, **rtn_v)
            return vq, quantize(u, bits, gu, scale_layout=coef_layout, **rtn_u)
        if side == "output":
            Cm = np.eye(v.shape[1]) if moment is None else C
            Lm = None if moment is None else cholesky
            vq = quantize_calibrated(v, Cm, bits, g, axis=1, **kv)
            vh = vq.dequantize().astype(np.float64)
            u2 = _lstsq_refit(u, v, vh, Lm)
            return vq, quantize_calibrated(u2, vh @ Cm @ vh.T, bits, gu, axis=1, **kw)
        if side == "input":
            Ccc = np.eye(len(idx)) if moment is None else C[np.ix_(idx, idx)]
            Hv = u.T @ Ccc @ u
        else:  # embedding
            w = np.ones(len(idx)) if weights is None else weights[idx]
            Hv = (u * w[:, None]).T @ u
        vq = quantize_calibrated(v.T, Hv, bits, g, axis=0, **kv).T
        vh = vq.dequantize().astype(np.float64)
        u2 = _lstsq_refit(u, v, vh)
        if side == "input":
            return vq, quantize_calibrated(u2.T, Ccc, bits, gu, axis=0, **kw).T
        return vq, quantize_calibrated(u2, vh @ vh.T, bits, gu, axis=1, **kw)

    # the clusters side by side, their small LAPACK problems on one BLAS
    # thread each (kflats._threads; on two BLAS threads a table's 16
    # clusters took 1.5x as long), in cluster order
    done = map_threads(one, range(len(U)))
    out_v = [vq for vq, _ in done if vq is not None]
    out_u = {c: uq for c, (_, uq) in enumerate(done) if uq is not None}
    tensors = {}
    if out_v:
        tensors["bases"] = _stack_rows(
            out_v, bits, g, kw["symmetric"], tuple(module.bases.shape)
        )
    for c, uq in out_u.items():
        tensors[f"coefficients.{c}"] = uq
    return tensors


def _rtn_kw(kw):
    return {
        "symmetric": kw["symmetric"],
        "scale_dtype": kw["scale_dtype"],
        "zero_dtype": kw["zero_dtype"],
    }


def quantize_module_(
    module,
    bits,
    group_size=128,
    *,
    moment=None,
    token_weights=None,
    method="calibrated",
    symmetric=False,
    damping=0.01,
    act_order=True,
    scale_dtype="float16",
    zero_dtype="uint8",
    compact_scales=False,
):
    """Quantize a layer's weight matrices in place (storage quantization).

    The layer's float parameters are replaced by their dequantized values,
    and the :class:`~kflats.quantize.QuantizedTensor` of each is recorded on
    the layer (:func:`quantized_tensors`), for :func:`quantized_state` to
    write. Biases, means and cluster ids stay as they are.

    Parameters
    ----------
    module : nn.Linear, nn.Embedding, ProjectiveLinear or ProjectiveEmbedding
        Or transformers' ``Conv1D`` (GPT-2), a Linear whose weight is stored
        transposed: its codes are grouped along the input features too (the
        recorded tensor has the stored weight's shape, grouped along its
        columns: ``axis=0``).
    bits : {2, 3, 4, 5, 6, 8}
    group_size : int or None, default=128
        Entries per scale, along the input features of a Linear weight, a
        row of an embedding table, a row of the bases and a row of a
        cluster's coefficients (it must divide those lengths; ``None``: one
        group per row).
    moment : array-like of shape (in_features, in_features), default=None
        ``E[x x^T]`` of a Linear layer's input
        (:meth:`kflats.torch.Calibration.input_moment`): the rounding
        minimises the expected output error (GPTQ-style error feedback).
    token_weights : array-like of shape (num_embeddings,), default=None
        Weight of each row of an embedding
        (:meth:`kflats.torch.Calibration.token_weights`). It weighs the
        rounding of a projective embedding's bases; for a dense table each
        group lies within one row, so a row's weight does not change which
        grid is best for it.
    method : {"calibrated", "rtn"}, default="calibrated"
        ``"rtn"``: round-to-nearest over each group's full range, the floor.
        ``"calibrated"``: each group's clipping ratio searched, error fed
        forward along ``moment`` (and, for factors, coefficients refitted to
        the rounded bases).
    symmetric : bool, default=False
        Grids centred on zero, no zero points stored.
    damping : float, default=0.01
        Added to the diagonal of a moment, relative to its mean.
    act_order : bool, default=True
        Calibrated rounding takes the inputs in decreasing order of their
        energy (see :func:`~kflats.quantize.quantize_calibrated`; on the
        Linear layers of all-MiniLM-L6-v2 at 3 and 4 bits, g32, it lowers the
        held-out output error by 8-9 % over the natural order).
    scale_dtype : {"float16", "float32"}, default="float16"
    zero_dtype : {"uint8", "float16"}, default="uint8"
        Of the zero points: integers, the grid covering each group's range
        and zero; or float16, the grid spanning the group's own range (one
        byte more a group: the layout of a GGUF Q4_1 block, whose weights
        it keeps as they are). Not used when ``symmetric``.
    compact_scales : bool, default=False
        Store the scales compact (:class:`~kflats.quantize.QuantizedTensor`'s
        ``scale_layout``: a byte a scale instead of two). A dense weight's
        exponents are shared across 8 rows (layout 0); a projective layer's
        stacked bases share them along each row (1), but on the output side,
        where they keep float16 scales, and a cluster's coefficients across
        rows (0), or along each row on the input side (1). Needs float16
        scales and integer or symmetric zero points.

    Returns
    -------
    module
        The same layer.

    Raises
    ------
    TypeError
        For another kind of module.
    ValueError
        For unsupported ``bits``, a ``group_size`` that does not divide a
        length it must, or a moment or token weights of the wrong shape; the
        layer is then left unchanged.

    Examples
    --------
    >>> import torch
    >>> from kflats.quantize import quantize_module_, quantized_tensors
    >>> linear = torch.nn.Linear(64, 8)
    >>> _ = quantize_module_(linear, bits=4, group_size=32, method="rtn")
    >>> quantized_tensors(linear)["weight"]
    QuantizedTensor(shape=(8, 64), bits=4, group_size=32, axis=1, nbytes=296)
    >>> w = quantized_tensors(linear)["weight"].dequantize()
    >>> torch.equal(linear.weight, torch.from_numpy(w))
    True
    """
    bits = check_bits(bits)
    _check_method(method)
    dtype = check_scale_dtype(scale_dtype)
    zdtype = check_zero_dtype(zero_dtype)
    compact = compact_layout(compact_scales, dtype, zdtype, symmetric, 0) is not None
    kw = {
        "symmetric": bool(symmetric),
        "damping": damping,
        "act_order": bool(act_order),
        "scale_dtype": scale_dtype,
        "zero_dtype": zero_dtype,
    }
    calibrated = method == "calibrated"
    if isinstance(module, (ProjectiveEmbedding, ProjectiveLinear)):
        _check_projective_groups(module, group_size)
        if isinstance(module, ProjectiveLinear):
            moment = _check_moment_shape(moment, module.in_features)
            weights = None
            if token_weights is not None:
                raise ValueError("token_weights are for embeddings; got a Linear")
        else:
            if moment is not None:
                raise ValueError("moment is for Linear layers; got an embedding")
            weights = _check_weights(token_weights, module.num_embeddings)
        tensors = _quantize_projective(
            module, bits, group_size, method, moment, weights,
            {**kw, "compact_scales": compact},
        )  # fmt: skip
    elif isinstance(module, nn.Linear) or is_conv1d(module):
        W = _np(dense_weight(module))  # (out, in): a Conv1D's transposed
        moment = _check_moment_shape(moment, W.shape[1])
        if token_weights is not None:
            raise ValueError("token_weights are for embeddings; got a Linear")
        check_group_size(group_size, W.shape[1], "in_features={}")
        if calibrated and moment is not None:
            qt = quantize_calibrated(
                W, moment, bits, group_size, compact_scales=compact, **kw
            )
        else:
            qt = quantize(
                W, bits, group_size, clip=calibrated, compact_scales=compact,
                scale_layout=0, **_rtn_kw(kw),
            )  # fmt: skip
        # a Conv1D stores W^T: the same codes, read along the columns
        tensors = {"weight": qt.T if is_conv1d(module) else qt}
    elif isinstance(module, nn.Embedding):
        if moment is not None:
            raise ValueError("moment is for Linear layers; got an embedding")
        _check_weights(token_weights, module.num_embeddings)
        W = module.weight.detach().to("cpu", torch.float32).numpy()  # no copy
        check_group_size(group_size, W.shape[1], "embedding_dim={}")
        tensors = {
            "weight": quantize(
                W,
                bits,
                group_size,
                clip=calibrated,
                compact_scales=compact,
                scale_layout=0,
                **_rtn_kw(kw),
            )  # fmt: skip
        }
    else:
        raise TypeError(
            "module must be a torch.nn.Linear, torch.nn.Embedding, transformers "
            "Conv1D, ProjectiveLinear or ProjectiveEmbedding, got "
            f"{type(module).__name__}"
        )
    _assign(module, tensors)
    return module
