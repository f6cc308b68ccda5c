"""Storage quantization of torch layers: dense and projective factors.

A quantized layer keeps its float parameters, which hold exactly the
dequantized values: its forward is the float forward (no slower than the
original, and ``to_dense()`` still works), and what a save writes is the
packed codes and scales (:func:`quantized_state`). A load dequantizes them to
the same floats (:func:`dequantized_state`), so outputs are bit-identical
after the round trip.

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
from torch import nn
from torch.nn.utils import parametrize

from ..torch._layers import ProjectiveEmbedding, ProjectiveLinear
from ._gptq import quantize_calibrated
from ._tensor import (
    QuantizedTensor,
    _check_bits,
    _check_group_size,
    _check_scale_dtype,
    quantize,
    quantized_nbytes,
)

__all__ = [
    "dequantized_state",
    "factors_nbytes",
    "form_nbytes",
    "quantize_module_",
    "quantized_state",
    "quantized_tensors",
    "record_quantized_",
    "register_straight_through_",
    "rank_group_size",
    "requantize_",
    "split_quantized_state",
    "state_nbytes",
    "straight_through_parameters",
]

_RECORD = "_kflats_quantized"
_KEYS = ("codes", "scales", "zeros", "meta")
_METHODS = ("calibrated", "rtn")


def _np(t):
    return t.detach().cpu().to(torch.float64).numpy()


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


def _check_projective_groups(module, group_size):
    d = module.bases.shape[1]
    _check_group_size(group_size, d, "the bases' row length d={}")


def rank_group_size(rank, group_size):
    """Group size of a coefficient row of length ``rank``: its divisor nearest.

    Ranks follow the clusters (a cluster of 45 features has rank at most
    45), so ``group_size`` need not divide them: a cluster's coefficients
    take the divisor of its rank closest to ``group_size`` on a log scale
    (the larger one on a tie; ``rank`` itself when ``group_size`` is None).

    Parameters
    ----------
    rank : int
        Positive.
    group_size : int or None

    Returns
    -------
    int

    Examples
    --------
    >>> from kflats.quantize import rank_group_size
    >>> [rank_group_size(r, 32) for r in (64, 96, 45, 50, 173, 8)]
    [32, 32, 45, 25, 173, 8]
    """
    rank = int(rank)
    if group_size is None or rank % group_size == 0:
        return rank if group_size is None else int(group_size)
    divisors = [q for q in range(1, rank + 1) if rank % q == 0]
    return min(divisors, key=lambda q: (abs(np.log(q / group_size)), -q))


def _stack_rows(parts, bits, group_size, symmetric, shape):
    """One QuantizedTensor of the rows of ``parts`` (axis-1 tensors), in order."""
    codes = np.concatenate([p.unpacked_codes() for p in parts])
    scales = np.concatenate([p.scales for p in parts])
    zeros = None if symmetric else np.concatenate([p.zeros for p in parts])
    return QuantizedTensor._from_codes(
        codes, scales, zeros, shape, bits, parts[0].group_size, 1
    )


def _lstsq_refit(U, V, Vq, L=None):
    """``U'`` minimising ``||(U' Vq - U V) L||_F`` (``L = I`` when None)."""
    A, B = Vq, U @ V
    if L is not None:
        A, B = A @ L, B @ L
    X, *_ = np.linalg.lstsq(A.T, B.T, rcond=None)
    return X.T


def _quantize_projective(module, bits, g, method, moment, weights, kw):
    """QuantizedTensors of the bases (stacked) and each cluster's coefficients."""
    U, V, rows = _projective_params(module)
    side = getattr(module, "side", None)
    calibrated = method == "calibrated"
    cholesky = None
    if calibrated and side is not None and moment is not None:
        from ..factorize import damped_moment

        C, cholesky = damped_moment(moment, moment.shape[0], kw["damping"])
    out_v, out_u = [], {}
    for c, (u, v, idx) in enumerate(zip(U, V, rows, strict=True)):
        r = v.shape[0]
        gu = rank_group_size(r, g) if r else None
        if r == 0 or u.shape[0] == 0:
            if r:  # an empty cluster still stores its bases
                out_v.append(quantize(v, bits, g, **_rtn_kw(kw)))
            continue
        if not calibrated:
            vq = quantize(v, bits, g, **_rtn_kw(kw))
            out_v.append(vq)
            out_u[c] = quantize(u, bits, rank_group_size(r, g), **_rtn_kw(kw))
            continue
        if side == "output":
            Cm = np.eye(v.shape[1]) if moment is None else C
            Lm = None if moment is None else cholesky
            vq = quantize_calibrated(v, Cm, bits, g, axis=1, **kw)
            vh = vq.dequantize().astype(np.float64)
            u2 = _lstsq_refit(u, v, vh, Lm)
            uq = quantize_calibrated(u2, vh @ Cm @ vh.T, bits, gu, axis=1, **kw)
        else:
            if side == "input":
                Ccc = np.eye(len(idx)) if moment is None else C[np.ix_(idx, idx)]
                Hv = u.T @ Ccc @ u
            else:  # embedding
                w = np.ones(len(idx)) if weights is None else weights[idx]
                Hv = (u * w[:, None]).T @ u
            vq = quantize_calibrated(v.T, Hv, bits, g, axis=0, **kw).T
            vh = vq.dequantize().astype(np.float64)
            u2 = _lstsq_refit(u, v, vh)
            if side == "input":
                uq = quantize_calibrated(u2.T, Ccc, bits, gu, axis=0, **kw).T
            else:
                uq = quantize_calibrated(u2, vh @ vh.T, bits, gu, axis=1, **kw)
        out_v.append(vq)
        out_u[c] = uq
    tensors = {}
    if out_v:
        tensors["bases"] = _stack_rows(
            out_v, bits, g, kw["symmetric"], tuple(module.bases.shape)
        )
    for c, uq in out_u.items():
        tensors[f"coefficients.{c}"] = uq
    return tensors


def _rtn_kw(kw):
    return {"symmetric": kw["symmetric"], "scale_dtype": kw["scale_dtype"]}


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
):
    """Quantize a layer's weight matrices in place (storage quantization).

    The layer's float parameters are replaced by their dequantized values,
    and the :class:`~kflats.quantize.QuantizedTensor` of each is recorded on
    the layer (:func:`quantized_tensors`), for :func:`quantized_state` to
    write. Biases, means and cluster ids stay as they are.

    Parameters
    ----------
    module : nn.Linear, nn.Embedding, ProjectiveLinear or ProjectiveEmbedding
    bits : {2, 3, 4, 6, 8}
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
    QuantizedTensor(shape=(8, 64), bits=4, group_size=32, axis=1, nbytes=304)
    >>> w = quantized_tensors(linear)["weight"].dequantize()
    >>> torch.equal(linear.weight, torch.from_numpy(w))
    True
    """
    bits = _check_bits(bits)
    _check_method(method)
    _check_scale_dtype(scale_dtype)
    kw = {
        "symmetric": bool(symmetric),
        "damping": damping,
        "act_order": bool(act_order),
        "scale_dtype": scale_dtype,
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
            module, bits, group_size, method, moment, weights, kw
        )
    elif isinstance(module, nn.Linear):
        moment = _check_moment_shape(moment, module.in_features)
        if token_weights is not None:
            raise ValueError("token_weights are for embeddings; got a Linear")
        W = _np(module.weight)
        _check_group_size(group_size, W.shape[1], "in_features={}")
        if calibrated and moment is not None:
            qt = quantize_calibrated(W, moment, bits, group_size, **kw)
        else:
            qt = quantize(W, bits, group_size, clip=calibrated, **_rtn_kw(kw))
        tensors = {"weight": qt}
    elif isinstance(module, nn.Embedding):
        if moment is not None:
            raise ValueError("moment is for Linear layers; got an embedding")
        _check_weights(token_weights, module.num_embeddings)
        W = _np(module.weight)
        _check_group_size(group_size, W.shape[1], "embedding_dim={}")
        tensors = {
            "weight": quantize(W, bits, group_size, clip=calibrated, **_rtn_kw(kw))
        }
    else:
        raise TypeError(
            "module must be a torch.nn.Linear, torch.nn.Embedding, "
            f"ProjectiveLinear or ProjectiveEmbedding, got {type(module).__name__}"
        )
    _assign(module, tensors)
    return module


def _param(module, name):
    return module.get_parameter(name)


def _assign(module, tensors):
    """Set the parameters to the dequantized values and record the tensors."""
    with torch.no_grad():
        for name, qt in tensors.items():
            p = _param(module, name)
            p.copy_(torch.from_numpy(qt.dequantize()).to(p.dtype))
    setattr(module, _RECORD, dict(tensors))


def quantized_tensors(module):
    """The :class:`~kflats.quantize.QuantizedTensor` of each quantized parameter.

    Parameters
    ----------
    module : torch.nn.Module

    Returns
    -------
    tensors : dict of str to QuantizedTensor
        Keyed by qualified parameter name (``"0.weight"`` in a Sequential,
        ``"bases"``, ``"coefficients.2"``); empty when nothing is quantized.
    """
    out = {}
    for prefix, sub in module.named_modules():
        for name, qt in getattr(sub, _RECORD, {}).items():
            out[f"{prefix}.{name}" if prefix else name] = qt
    return out


def record_quantized_(module, tensors):
    """Record quantized tensors on a module's layers, e.g. after a load.

    Parameters
    ----------
    module : torch.nn.Module
    tensors : dict of str to QuantizedTensor
        Keyed by qualified parameter name, as :func:`split_quantized_state`
        returns them. Each parameter must already hold the dequantized
        values (checked, bit for bit).

    Returns
    -------
    module
    """
    by_module = {}
    for full, qt in tensors.items():
        p = module.get_parameter(full)
        if tuple(p.shape) != qt.shape or not torch.equal(
            p.detach().cpu(), torch.from_numpy(qt.dequantize()).to(p.dtype)
        ):
            raise ValueError(f"parameter {full!r} does not hold its dequantized values")
        owner, _, name = _owner(module, full)
        by_module.setdefault(owner, {})[name] = qt
    for owner, found in by_module.items():
        sub = module.get_submodule(owner)
        setattr(sub, _RECORD, {**getattr(sub, _RECORD, {}), **found})
    return module


def _owner(module, full):
    """(qualified module name, '', parameter name within it) of a parameter."""
    parts = full.split(".")
    for cut in range(len(parts) - 1, -1, -1):
        owner = ".".join(parts[:cut])
        try:
            sub = module.get_submodule(owner)
        except AttributeError:
            continue
        if isinstance(
            sub, (ProjectiveEmbedding, ProjectiveLinear, nn.Linear, nn.Embedding)
        ):
            return owner, "", ".".join(parts[cut:])
    raise ValueError(f"{full!r} is not a parameter of a quantizable layer")


def quantized_state(module):
    """The module's state dict with quantized parameters as packed tensors.

    Each quantized parameter ``name`` is replaced by ``name.codes`` (uint8),
    ``name.scales``, ``name.zeros`` (absent for a symmetric grid) and
    ``name.meta`` (int64); every other entry is the state dict's own.

    Parameters
    ----------
    module : torch.nn.Module

    Returns
    -------
    state : dict of str to torch.Tensor
        Ready for :func:`safetensors.torch.save_file`.

    Examples
    --------
    >>> import torch
    >>> from kflats.quantize import quantize_module_, quantized_state, dequantized_state
    >>> model = torch.nn.Sequential(torch.nn.Linear(32, 4))
    >>> _ = quantize_module_(model[0], bits=3, group_size=16)
    >>> sorted(quantized_state(model))
    ['0.bias', '0.weight.codes', '0.weight.meta', '0.weight.scales', '0.weight.zeros']
    >>> restored = dequantized_state(quantized_state(model))
    >>> torch.equal(restored["0.weight"], model[0].weight)
    True
    """
    state = dict(module.state_dict())
    for full, qt in quantized_tensors(module).items():
        if full not in state:
            raise ValueError(
                f"{full!r} is recorded as quantized but is not in the state "
                "dict (still parametrized for training? call requantize_ first)"
            )
        del state[full]
        for key, value in qt.to_state(full + ".").items():
            state[key] = torch.from_numpy(np.ascontiguousarray(value))
    return state


def split_quantized_state(state):
    """Separate packed entries from the others, validating them.

    Parameters
    ----------
    state : mapping of str to tensor
        As :func:`quantized_state` wrote it (e.g. read from a safetensors
        file: untrusted input, each entry checked).

    Returns
    -------
    rest : dict of str to tensor
        The entries that are not packed.
    tensors : dict of str to QuantizedTensor
        Keyed by parameter name.
    """
    bases = sorted(
        k[: -len(".meta")]
        for k in state
        if k.endswith(".meta") and k[: -len(".meta")] + ".codes" in state
    )
    tensors, used = {}, set()
    for base in bases:
        sub = {k: state[f"{base}.{k}"] for k in _KEYS if f"{base}.{k}" in state}
        tensors[base] = QuantizedTensor.from_state(sub, "")
        used.update(f"{base}.{k}" for k in sub)
    rest = {k: v for k, v in state.items() if k not in used}
    return rest, tensors


def dequantized_state(state):
    """The plain state dict of a :func:`quantized_state`: packed entries dequantized.

    Parameters
    ----------
    state : mapping of str to tensor

    Returns
    -------
    state : dict of str to torch.Tensor
        Each packed parameter as a float32 tensor, bit-identical to the
        values the quantized module held.
    """
    rest, tensors = split_quantized_state(state)
    for name, qt in tensors.items():
        rest[name] = torch.from_numpy(qt.dequantize())
    return rest


def state_nbytes(state):
    """Bytes of the tensors of a state dict (what a safetensors file holds).

    Parameters
    ----------
    state : mapping of str to torch.Tensor

    Returns
    -------
    nbytes : int
    """
    return int(sum(t.numel() * t.element_size() for t in state.values()))


def form_nbytes(
    module, bits=None, group_size=128, *, symmetric=False, scale_dtype="float16"
):
    """Bytes a layer's state takes once quantized, without quantizing it.

    Equal to ``state_nbytes(quantized_state(module))`` after
    ``quantize_module_(module, bits, group_size, ...)``; ``bits=None`` counts
    the float state as it is. Non-quantized entries (bias, means, cluster
    ids) count at their own size.

    Parameters
    ----------
    module : nn.Linear, nn.Embedding, ProjectiveLinear or ProjectiveEmbedding
    bits : {2, 3, 4, 6, 8} or None, default=None
    group_size : int or None, default=128
    symmetric : bool, default=False
    scale_dtype : {"float16", "float32"}, default="float16"

    Returns
    -------
    nbytes : int

    Examples
    --------
    >>> import torch
    >>> from kflats.quantize import form_nbytes
    >>> linear = torch.nn.Linear(384, 1536)
    >>> form_nbytes(linear), form_nbytes(linear, bits=4, group_size=32)
    (2365440, 356392)
    """
    state = module.state_dict()
    total = state_nbytes(state)
    if bits is None:
        return total
    meta = 8 * 5  # the int64 meta entry of each packed tensor

    def packed(shape, g=group_size):
        return meta + quantized_nbytes(
            shape,
            bits,
            g,
            symmetric=symmetric,
            scale_dtype=scale_dtype,
        )

    def plain(t):
        return t.numel() * t.element_size()

    if isinstance(module, (ProjectiveEmbedding, ProjectiveLinear)):
        _check_projective_groups(module, group_size)
        if module.bases.shape[0]:
            total += packed(tuple(module.bases.shape)) - plain(module.bases)
        for u in module.coefficients:
            if u.numel():
                gu = rank_group_size(u.shape[1], group_size)
                total += packed(tuple(u.shape), gu) - plain(u)
        return total
    if isinstance(module, (nn.Linear, nn.Embedding)):
        return total + packed(tuple(module.weight.shape)) - plain(module.weight)
    raise TypeError(
        "module must be a torch.nn.Linear, torch.nn.Embedding, ProjectiveLinear "
        f"or ProjectiveEmbedding, got {type(module).__name__}"
    )


def factors_nbytes(
    sizes,
    ranks,
    d,
    bits=None,
    group_size=128,
    *,
    affine=False,
    bias=0,
    symmetric=False,
    scale_dtype="float16",
    float_bytes=4,
):
    """Bytes of a projective layer's state before it is built, for an allocator.

    Equal to :func:`form_nbytes` of the :class:`~kflats.torch.ProjectiveEmbedding`
    or :class:`~kflats.torch.ProjectiveLinear` with these cluster sizes and
    ranks (float32 parameters by default), so a search over ranks and bit
    widths can count bytes without building a layer per candidate.

    Parameters
    ----------
    sizes : sequence of int
        Rows (tokens, features or neurons) of each cluster.
    ranks : sequence of int
        Rank of each cluster, same length.
    d : int
        Length of a basis row (embedding_dim, or the other side of a Linear).
    bits : {2, 3, 4, 6, 8} or None, default=None
        ``None``: the float factors.
    group_size : int or None, default=128
        Must divide ``d`` and every non-zero rank.
    affine : bool, default=False
        Whether the layer stores means (k x d, kept as floats).
    bias : int, default=0
        Length of a Linear layer's bias (kept as floats).
    symmetric : bool, default=False
    scale_dtype : {"float16", "float32"}, default="float16"
    float_bytes : int, default=4
        Bytes of a float parameter.

    Returns
    -------
    nbytes : int

    Examples
    --------
    >>> from kflats.quantize import factors_nbytes
    >>> factors_nbytes([100, 28], [32, 32], 64, bits=4, group_size=32)
    5112
    """
    from ..torch._layers import _label_dtype

    sizes, ranks = [int(s) for s in sizes], [int(r) for r in ranks]
    if len(sizes) != len(ranks) or not ranks:
        raise ValueError("sizes and ranks must have one entry per cluster")
    k, n = len(ranks), sum(sizes)
    labels = n * torch.empty((), dtype=_label_dtype(k)).element_size()
    total = labels + (k * d if affine else 0) * float_bytes + int(bias) * float_bytes
    meta = 8 * 5
    if bits is not None:
        _check_group_size(group_size, d, "the bases' row length d={}")

    def matrix(rows, cols, g=group_size):
        if bits is None or rows * cols == 0:
            return rows * cols * float_bytes
        return meta + quantized_nbytes(
            (rows, cols),
            bits,
            g,
            symmetric=symmetric,
            scale_dtype=scale_dtype,
        )

    total += matrix(sum(ranks), d)
    for s, r in zip(sizes, ranks, strict=True):
        total += matrix(s, r, rank_group_size(r, group_size) if r else None)
    return int(total)


class _FakeQuantize(nn.Module):
    """Rounds to a fixed grid on the forward, passes the gradient straight through."""

    def __init__(self, qt):
        super().__init__()
        rows, cols = qt._lines
        g = qt.group_size
        scale = np.repeat(qt.scales.astype(np.float32), g, axis=1)
        zero = np.repeat(qt._zeros_or_mid().astype(np.float32), g, axis=1)
        if qt.axis == 0:
            scale, zero = scale.T, zero.T
        self.register_buffer(
            "scale", torch.from_numpy(np.ascontiguousarray(scale)), persistent=False
        )
        self.register_buffer(
            "zero", torch.from_numpy(np.ascontiguousarray(zero)), persistent=False
        )
        self.levels = float((1 << qt.bits) - 1)

    def forward(self, x):
        s = self.scale.to(x.device)
        z = self.zero.to(x.device)
        safe = torch.where(s > 0, s, torch.ones_like(s))
        q = torch.clamp(torch.round(x / safe) + z, 0.0, self.levels)
        deq = ((q - z) * s).to(x.dtype)
        return x + (deq - x).detach()


def register_straight_through_(module):
    """Train through the rounding: each quantized parameter becomes a latent float.

    Each recorded parameter is parametrized (:mod:`torch.nn.utils.parametrize`):
    the layer sees its latent value rounded to the recorded grid (scales and
    zero points fixed), and the gradient passes through the rounding as if
    it were the identity (straight-through estimator). The optimizer updates
    the latent floats; :func:`requantize_` ends the training.

    Parameters
    ----------
    module : torch.nn.Module

    Returns
    -------
    module

    Examples
    --------
    >>> import torch
    >>> from kflats.quantize import (quantize_module_, register_straight_through_,
    ...                              requantize_)
    >>> layer = quantize_module_(torch.nn.Linear(16, 4), bits=4, group_size=16)
    >>> _ = register_straight_through_(layer)
    >>> layer(torch.randn(2, 16)).sum().backward()
    >>> layer.parametrizations.weight.original.grad.shape
    torch.Size([4, 16])
    >>> _ = requantize_(layer)
    >>> hasattr(layer, "parametrizations")
    False
    """
    for _, sub in module.named_modules():
        for name, qt in getattr(sub, _RECORD, {}).items():
            owner, attr = _split(sub, name)
            if parametrize.is_parametrized(owner, attr):
                continue
            parametrize.register_parametrization(
                owner, attr, _FakeQuantize(qt).to(sub.get_parameter(name).device)
            )
    return module


def straight_through_parameters(module):
    """The latent float parameters that :func:`register_straight_through_` made.

    Give these to the optimizer: iterating a parametrized layer's
    ``coefficients`` yields the rounded values, which are not leaves.

    Parameters
    ----------
    module : torch.nn.Module

    Returns
    -------
    params : list of torch.nn.Parameter
        In module order; empty when nothing is parametrized.
    """
    params = []
    for _, sub in module.named_modules():
        for name in getattr(sub, _RECORD, {}):
            owner, attr = _split(sub, name)
            if parametrize.is_parametrized(owner, attr):
                params.append(owner.parametrizations[attr].original)
    return params


def _split(sub, name):
    """(the module owning ``name``, its last attribute name)."""
    parts = name.split(".")
    owner = sub.get_submodule(".".join(parts[:-1])) if len(parts) > 1 else sub
    return owner, parts[-1]


def requantize_(module):
    """Round each quantized parameter to its grid again (after training).

    Removes the straight-through parametrizations if any (keeping the
    latent floats), then rounds each recorded parameter to its recorded grid
    (scales and zero points unchanged), records the new codes and sets the
    parameter to their dequantized values.

    Parameters
    ----------
    module : torch.nn.Module

    Returns
    -------
    module
    """
    for _, sub in module.named_modules():
        record = getattr(sub, _RECORD, None)
        if not record:
            continue
        for name in record:
            owner, attr = _split(sub, name)
            if parametrize.is_parametrized(owner, attr):
                parametrize.remove_parametrizations(
                    owner, attr, leave_parametrized=False
                )
        _assign(
            sub,
            {
                name: qt.requantize(_np(sub.get_parameter(name)))
                for name, qt in record.items()
            },
        )
    return module
