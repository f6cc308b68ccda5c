"""Round-to-nearest group-wise quantization of a matrix."""

import numpy as np

from ._grid import (
    _CLIP_RATIOS,
    _as_matrix,
    _check_axis,
    _fit_and_encode,
    check_bits,
    check_group_size,
    check_scale_dtype,
    check_zero_dtype,
)
from ._scales import SUPER, compact_layout
from ._tensor import QuantizedTensor

__all__ = ["quantize"]

_CHUNK = 1 << 20  # entries quantized at once


def quantize(
    W,
    bits,
    group_size=128,
    *,
    axis=1,
    symmetric=False,
    clip=False,
    scale_dtype="float16",
    zero_dtype="uint8",
    compact_scales=False,
    scale_layout=1,
):
    """Round-to-nearest group-wise quantization of a matrix.

    Each group of ``group_size`` entries along ``axis`` gets the grid that
    covers its range and zero (``symmetric=False``: ``2**bits`` levels from
    ``min(w, 0)`` to ``max(w, 0)``; ``symmetric=True``: levels centred on
    zero), and each entry the nearest level: ``|w - w_hat| <= scale / 2``.
    With ``clip=True`` each group instead takes, among a few clipping ratios
    of its range (1.0 down to 0.6), the one with the lowest squared error.

    Parameters
    ----------
    W : array-like of shape (rows, cols)
        Real, finite.
    bits : {2, 3, 4, 5, 6, 8}
    group_size : int or None, default=128
        Must divide the line length (cols for ``axis=1``); ``None``: one
        group per line.
    axis : {0, 1}, default=1
        Groups along each row (1) or each column (0).
    symmetric : bool, default=False
        A symmetric grid stores no zero points.
    clip : bool, default=False
        Search the clipping ratio per group (lower error, no longer the
        ``scale / 2`` bound for the clipped entries).
    scale_dtype : {"float16", "float32"}, default="float16"
    zero_dtype : {"uint8", "float16"}, default="uint8"
        Integer zero points, the grid covering the group's range and zero;
        or float16 zero points, the grid spanning the group's own range
        (one more byte a group; a matrix already on such a grid, as the
        Q4_1 blocks of a GGUF file hold it, keeps its codes). Not used
        when ``symmetric``.
    compact_scales : bool, default=False
        Store the scales compact (:class:`QuantizedTensor`'s
        ``scale_layout=1``: 8-bit multiples of a power of two shared by 8
        consecutive groups of a line): each scale rounded up onto that grid
        (by at most 1/128 of its super group's largest), so the grid still
        covers the group. Needs float16 scales and integer (or symmetric)
        zero points.
    scale_layout : {0, 1}, default=1
        Which groups share an exponent when ``compact_scales``: 8
        consecutive groups of a line (1), or the groups of one index in 8
        consecutive lines (0, as :func:`quantize_calibrated` along the rows
        shares them). Every group is fitted at once here, so either works.

    Returns
    -------
    QuantizedTensor

    Raises
    ------
    ValueError
        If ``bits`` is not supported, ``group_size`` does not divide the line
        length, or ``W`` is not a finite 2-D array.

    Examples
    --------
    >>> import numpy as np
    >>> from kflats.quantize import quantize
    >>> W = np.random.default_rng(0).normal(size=(8, 64))
    >>> qt = quantize(W, bits=4, group_size=32)
    >>> err = np.abs(W - qt.dequantize())
    >>> bool(np.all(err <= qt.scales.repeat(32, axis=1) / 2 + 1e-6))
    True
    >>> small = quantize(W, bits=4, group_size=32, compact_scales=True)
    >>> small.scale_layout, small.nbytes, qt.nbytes  # a byte a scale, not two
    (1, 288, 296)
    >>> quantize(W, bits=7)
    Traceback (most recent call last):
    ...
    ValueError: bits must be one of (2, 3, 4, 5, 6, 8), got 7
    """
    bits = check_bits(bits)
    axis = _check_axis(axis)
    dtype = check_scale_dtype(scale_dtype)
    zdtype = check_zero_dtype(zero_dtype)
    W = _as_matrix(W, copy=False)
    M = W if axis == 1 else W.T
    lines, length = M.shape
    what = "the row length ({})" if axis == 1 else "the column length ({})"
    g = check_group_size(group_size, length, what)
    if isinstance(scale_layout, bool) or scale_layout not in (0, 1):
        raise ValueError(f"scale_layout must be 0 or 1, got {scale_layout!r}")
    layout = compact_layout(compact_scales, dtype, zdtype, symmetric, scale_layout)
    ratios = _CLIP_RATIOS if clip else (1.0,)
    # lines by chunks of about _CHUNK entries, each in float64: a 49,152 x 576
    # table takes a few MB beside its codes, not a float64 copy of itself;
    # with exponents shared across lines, whole super groups of lines
    step = max(1, _CHUNK // length)
    if layout == 0:
        step = max(SUPER, step - step % SUPER)
    codes = np.empty((lines, length), dtype=np.uint8)
    scale = np.empty((lines, length // g), dtype=dtype)
    zero = np.empty((lines, length // g), dtype=np.uint8 if symmetric else zdtype)
    for a in range(0, lines, step):
        groups = np.asarray(M[a : a + step], dtype=np.float64).reshape(-1, g)
        n = min(step, lines - a)
        compact = None if layout is None else ((n, length // g), layout)
        s, z, c = _fit_and_encode(
            groups, bits, symmetric, dtype, ratios, zero_dtype=zdtype, compact=compact
        )
        codes[a : a + n], scale[a : a + n], zero[a : a + n] = (
            c.reshape(n, length),
            s.reshape(n, -1),
            z.reshape(n, -1),
        )
    return QuantizedTensor._from_codes(
        codes, scale, None if symmetric else zero, W.shape, bits, g, axis, layout
    )
