"""Bytes of a layer's quantized state, counted without quantizing it."""

import numpy as np
import torch
from torch import nn

from kflats.quantize._grid import (
    check_group_size,
    check_scale_dtype,
    check_zero_dtype,
)
from kflats.quantize._nbytes import quantized_nbytes
from kflats.quantize._scales import compact_layout
from kflats.torch.layers._base import label_dtype
from kflats.torch.layers._dense import dense_weight, is_conv1d
from kflats.torch.layers._embedding import ProjectiveEmbedding
from kflats.torch.layers._linear import ProjectiveLinear
from kflats.torch.layers._quantized_state import state_nbytes

__all__ = ["factors_nbytes", "form_nbytes", "rank_group_size"]


def _check_projective_groups(module, group_size):
    d = module.bases.shape[1]
    check_group_size(group_size, d, "the bases' row length d={}")


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


def scale_layouts(side):
    """The compact scales' layouts of a projective layer's (bases,
    coefficients), by its side (None: an embedding): None where they are
    not compact.

    The bases of every cluster are stacked, so their exponents run along
    each row (1), as GPTQ down their columns fits them; the output side's
    bases, rounded along their rows, share them across rows (0), which
    stacking would mix: kept float16. A cluster's coefficients are a
    tensor of their own: across rows (0) where GPTQ runs along their rows,
    along each row (1) on the input side, where it runs down their columns.
    """
    return (None if side == "output" else 1), (1 if side == "input" else 0)


def form_nbytes(
    module,
    bits=None,
    group_size=128,
    *,
    symmetric=False,
    scale_dtype="float16",
    zero_dtype="uint8",
    compact_scales=False,
):
    """Bytes a layer's state takes once quantized, without quantizing it.

    Equal to ``state_nbytes(quantized_state(module))`` after
    ``quantize_module_(module, bits, group_size, ...)``; ``bits=None`` counts
    the float state as it is. Non-quantized entries (bias, means, cluster
    ids) count at their own size.

    Parameters
    ----------
    module : nn.Linear, nn.Embedding, ProjectiveLinear or ProjectiveEmbedding
        Or transformers' ``Conv1D``.
    bits : {2, 3, 4, 5, 6, 8} or None, default=None
    group_size : int or None, default=128
    symmetric : bool, default=False
    scale_dtype : {"float16", "float32"}, default="float16"
    zero_dtype : {"uint8", "float16"}, default="uint8"
    compact_scales : bool, default=False
        As :func:`~kflats.quantize.quantize_module_` stores them.

    Returns
    -------
    nbytes : int

    Examples
    --------
    >>> import torch
    >>> from kflats.quantize import form_nbytes
    >>> linear = torch.nn.Linear(384, 1536)
    >>> form_nbytes(linear), form_nbytes(linear, bits=4, group_size=32)
    (2365440, 347176)
    >>> form_nbytes(linear, bits=4, group_size=32, zero_dtype="float16")
    374824
    >>> form_nbytes(linear, bits=4, group_size=32, compact_scales=True)
    331056
    """
    state = module.state_dict()
    total = state_nbytes(state)
    if bits is None:
        return total
    compact = _compact(compact_scales, scale_dtype, zero_dtype, symmetric)
    side = getattr(module, "side", None)

    def packed(shape, g=group_size, layout=0):
        layout = layout if compact else None
        return _packed_nbytes(
            shape, bits, g, symmetric, scale_dtype, zero_dtype, layout
        )

    def plain(t):
        return t.numel() * t.element_size()

    if isinstance(module, (ProjectiveEmbedding, ProjectiveLinear)):
        _check_projective_groups(module, group_size)
        bases_layout, coef_layout = scale_layouts(side)
        if module.bases.shape[0]:
            shape = tuple(module.bases.shape)
            total += packed(shape, layout=bases_layout) - plain(module.bases)
        for u in module.coefficients:
            if u.numel():
                gu = rank_group_size(u.shape[1], group_size)
                total += packed(tuple(u.shape), gu, coef_layout) - plain(u)
        return total
    if isinstance(module, (nn.Linear, nn.Embedding)) or is_conv1d(module):
        shape = tuple(dense_weight(module).shape)  # grouped along in_features
        return total + packed(shape) - plain(module.weight)
    raise TypeError(
        "module must be a torch.nn.Linear, torch.nn.Embedding, transformers "
        f"Conv1D, ProjectiveLinear or ProjectiveEmbedding, got {type(module).__name__}"
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
    compact_scales=False,
    side=None,
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
    bits : {2, 3, 4, 5, 6, 8} or None, default=None
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
    compact_scales : bool, default=False
        As :func:`~kflats.quantize.quantize_module_` stores them.
    side : {None, "input", "output"}, default=None
        The layer's side (None: an embedding); it decides where compact
        scales share their exponents.

    Returns
    -------
    nbytes : int

    Examples
    --------
    >>> from kflats.quantize import factors_nbytes
    >>> factors_nbytes([100, 28], [32, 32], 64, bits=4, group_size=32)
    4984
    """

    sizes, ranks = [int(s) for s in sizes], [int(r) for r in ranks]
    if len(sizes) != len(ranks) or not ranks:
        raise ValueError("sizes and ranks must have one entry per cluster")
    k, n = len(ranks), sum(sizes)
    labels = n * torch.empty((), dtype=label_dtype(k)).element_size()
    total = labels + (k * d if affine else 0) * float_bytes + int(bias) * float_bytes
    if bits is not None:
        check_group_size(group_size, d, "the bases' row length d={}")
    if side not in (None, "input", "output"):
        raise ValueError(f"side must be None, 'input' or 'output', got {side!r}")
    compact = _compact(compact_scales, scale_dtype, "uint8", symmetric)
    bases_layout, coef_layout = scale_layouts(side)

    def matrix(rows, cols, g=group_size, layout=None):
        if bits is None or rows * cols == 0:
            return rows * cols * float_bytes
        layout = layout if compact else None
        return _packed_nbytes(
            (rows, cols), bits, g, symmetric, scale_dtype, "uint8", layout
        )

    total += matrix(sum(ranks), d, layout=bases_layout)
    for s, r in zip(sizes, ranks, strict=True):
        g = rank_group_size(r, group_size) if r else None
        total += matrix(s, r, g, coef_layout)
    return int(total)


def _compact(compact_scales, scale_dtype, zero_dtype, symmetric):
    """Whether scales are compact, checked as the quantizers check it."""
    return (
        compact_layout(
            compact_scales,
            check_scale_dtype(scale_dtype),
            check_zero_dtype(zero_dtype),
            symmetric,
            0,
        )
        is not None
    )


def _packed_nbytes(shape, bits, g, symmetric, scale_dtype, zero_dtype, layout):
    """A packed tensor's entries: its meta (int64: 5, 6 with compact scales),
    codes, scales and zero points."""
    meta = 8 * (5 if layout is None else 6)
    return meta + quantized_nbytes(
        shape,
        bits,
        g,
        symmetric=symmetric,
        scale_dtype=scale_dtype,
        zero_dtype=zero_dtype,
        scale_layout=layout,
    )
