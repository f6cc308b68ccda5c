"""The integer grids of group-wise quantization: checks, packed codes, fitting.

A group of entries is stored as integer codes on a grid (a scale and a zero
point); this module fits the grids (round-to-nearest, or searched over
clipping ratios), encodes and decodes the codes, and packs them tightly into
bytes. :class:`~kflats.quantize.QuantizedTensor` is built on it.
"""

import math
import numbers

import numba
import numpy as np

from ._scales import _F16_MAX, SUPER, _exponent, snap_scales

SUPPORTED_BITS = (2, 3, 4, 5, 6, 8)
_SCALE_DTYPES = {"float16": np.float16, "float32": np.float32}
# zero points: integers (uint8, the grid covers zero) or float16 (the grid
# spans the group's own range, the layout of a GGUF Q4_1 or Q5_1 block)
_ZERO_DTYPES = {"uint8": np.uint8, "float16": np.float16}
# a float16 zero point is kept within this many steps of the grid (beyond,
# its rounding would move the group by more than 1/64 of a step)
_FAR_ZERO = 64
# the clipping ratios a calibrated grid search tries, of each group's range
_CLIP_RATIOS = tuple(np.round(np.linspace(1.0, 0.6, 9), 3))


def check_bits(bits):
    if isinstance(bits, bool) or not isinstance(bits, numbers.Integral):
        raise TypeError(f"bits must be an int in {SUPPORTED_BITS}, got {bits!r}")
    if int(bits) not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
    return int(bits)


def _check_axis(axis):
    if axis not in (0, 1) or isinstance(axis, bool):
        raise ValueError(f"axis must be 0 or 1, got {axis!r}")
    return int(axis)


def check_group_size(group_size, length, what):
    """The group size along a dimension of ``length``; ``None`` is the whole row.

    ``length=None`` checks only that ``group_size`` is a positive int or None.
    """
    if group_size is None:
        return None if length is None else max(int(length), 1)
    if isinstance(group_size, bool) or not isinstance(group_size, numbers.Integral):
        raise TypeError(
            f"group_size must be a positive int or None, got {group_size!r}"
        )
    group_size = int(group_size)
    if group_size < 1:
        raise ValueError(f"group_size must be a positive int or None, got {group_size}")
    if length is not None and length % group_size:
        raise ValueError(
            f"group_size={group_size} does not divide {what.format(length)}; choose a "
            "divisor of it, or group_size=None for one group per row"
        )
    return group_size


def check_zero_dtype(zero_dtype):
    """The numpy dtype of zero points named ``zero_dtype`` ("uint8" or "float16")."""
    key = zero_dtype if isinstance(zero_dtype, str) else None
    if key is None:
        try:
            key = np.dtype(zero_dtype).name
        except TypeError:
            key = None
    if key not in _ZERO_DTYPES:
        raise ValueError(f"zero_dtype must be 'uint8' or 'float16', got {zero_dtype!r}")
    return _ZERO_DTYPES[key]


def check_scale_dtype(scale_dtype):
    key = (
        np.dtype(scale_dtype).name if not isinstance(scale_dtype, str) else scale_dtype
    )
    if key not in _SCALE_DTYPES:
        raise ValueError(
            f"scale_dtype must be 'float16' or 'float32', got {scale_dtype!r}"
        )
    return _SCALE_DTYPES[key]


# ---------------------------------------------------------------------- packing


def pack_codes(codes, bits):
    """Pack integer codes ``< 2**bits`` into ``ceil(n * bits / 8)`` bytes.

    Bit ``i`` of code ``t`` is bit ``t * bits + i`` of the little-endian bit
    stream, so 3-, 5- and 6-bit codes run across byte boundaries (a code
    spans two bytes at most: its first bit at offset 0-7 of a byte, 8 bits
    at most) and the stream holds no padding except in its last byte.
    """
    codes = np.ascontiguousarray(codes, dtype=np.uint8).reshape(-1)
    if bits == 8:
        return codes.copy()
    out = np.zeros(_packed_len(codes.size, bits), dtype=np.uint8)
    _pack(codes, bits, out)
    return out


def unpack_codes(packed, bits, count):
    """The ``count`` codes that :func:`pack_codes` packed."""
    packed = np.ascontiguousarray(packed, dtype=np.uint8).reshape(-1)
    if bits == 8:
        return packed[:count].copy()
    out = np.empty(count, dtype=np.uint8)
    _unpack(packed, bits, out)
    return out


# the bit stream written and read a code at a time (one pass; numpy's
# packbits of a bit per byte took 8 passes): the same bytes and codes
@numba.njit(cache=True, nogil=True)
def _pack(codes, bits, out):
    mask = (1 << bits) - 1
    for t in range(codes.size):
        bit = t * bits
        value = (np.int32(codes[t]) & mask) << (bit & 7)
        out[bit >> 3] |= np.uint8(value & 255)
        if (bit & 7) + bits > 8:
            out[(bit >> 3) + 1] |= np.uint8(value >> 8)


@numba.njit(cache=True, nogil=True)
def _unpack(packed, bits, out):
    mask = (1 << bits) - 1
    last = packed.size - 1
    for t in range(out.size):
        bit = t * bits
        byte = bit >> 3
        pair = np.int32(packed[byte]) | (np.int32(packed[min(byte + 1, last)]) << 8)
        out[t] = np.uint8((pair >> (bit & 7)) & mask)


def _packed_len(count, bits):
    return -(-count * bits // 8)


# ---------------------------------------------------------------------- grids


def _round_up(scale, dtype):
    """``scale`` in ``dtype``, rounded up so that the grid still covers the range."""
    with np.errstate(over="ignore"):
        stored = scale.astype(dtype)
    if dtype is np.float16:
        if np.any(~np.isfinite(stored)):
            raise ValueError(
                "the weights are too large for float16 scales (a scale above "
                "65504); use scale_dtype='float32'"
            )
    low = stored.astype(np.float64) < scale
    stored[low] = np.nextafter(stored[low], dtype(np.inf))
    return stored


def _fit_grid(groups, bits, symmetric, ratio, dtype, zero_dtype=np.uint8, bounds=None):
    """Scales and zero points of groups (rows of ``groups``) shrunk by ``ratio``.

    Integer zero points (``zero_dtype`` uint8): the grid covers the group's
    range and zero, its scale rounded up to ``dtype`` so that it still does.
    Float16 zero points: the grid spans the group's own range (shrunk about
    its middle), its scale and zero point rounded to the nearest ``dtype``
    and float16 values, so that a group already on such a grid (a GGUF
    Q4_1 block: scale and minimum in float16) keeps its codes.
    """
    levels = (1 << bits) - 1
    low, high = bounds if bounds is not None else (groups.min(1), groups.max(1))
    if symmetric:
        amax = np.maximum(-low, high) * ratio
        scale = _round_up(amax / ((1 << (bits - 1)) - 0.5), dtype)
        zero = np.full(groups.shape[0], 1 << (bits - 1), dtype=np.uint8)
    elif zero_dtype is np.float16:
        lo, hi = low, high
        mid, half = (hi + lo) / 2, (hi - lo) / 2 * ratio
        lo, hi = mid - half, mid + half
        # a group far from zero against its spread (a constant one too) would
        # need a zero point beyond float16's digits: its grid covers zero
        far = np.abs(lo) > _FAR_ZERO * np.maximum(hi - lo, 0.0) / levels
        lo[far] = np.minimum(lo[far], 0.0)
        hi[far] = np.maximum(hi[far], 0.0)
        scale = _nearest((hi - lo) / levels, dtype)
        s64 = scale.astype(np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            zero = np.where(s64 > 0, -lo / s64, 0.0)
        # (a group of zeros: scale and zero point 0)
        zero = _nearest(zero, np.float16)
    else:
        lo = np.minimum(low, 0.0) * ratio
        hi = np.maximum(high, 0.0) * ratio
        scale = _round_up((hi - lo) / levels, dtype)
        s64 = scale.astype(np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            zero = np.where(s64 > 0, np.rint(-lo / s64), 0.0)
        zero = np.clip(zero, 0, levels).astype(np.uint8)
    return scale, zero


# every finite float16 value >= 0, increasing (the bit patterns 0 .. 0x7BFF):
# the compiled grid fit rounds a scale up to float16 by a search in it
_HALVES = np.arange(0x7C00, dtype=np.uint16).view(np.float16).astype(np.float64)
_NO_HALVES = np.empty(0)  # float32 scales


@numba.njit(cache=True, nogil=True, inline="always")
def _ceil_scale(x, halves):
    """:func:`_round_up` of one scale: the least float16 (``halves``, see
    :data:`_HALVES`) or, ``halves`` empty, float32 value ``>= x``."""
    if halves.size == 0:
        y = np.float32(x)
        if np.float64(y) < x:
            y = np.nextafter(y, np.float32(np.inf))
        return np.float64(y)
    i = np.searchsorted(halves, x)
    if i == halves.size:
        raise ValueError(
            "the weights are too large for float16 scales (a scale above "
            "65504); use scale_dtype='float32'"
        )
    return halves[i]


@numba.njit(cache=True, nogil=True)
def _fit_groups_into(
    x, g, bits, symmetric, ratios, halves, scale, zero, codes, compact=False
):
    """:func:`_fit_and_encode` of the groups of ``g`` consecutive entries of
    ``x`` (integer zero points, or symmetric; no weights), compiled.

    Each group's grid over each of ``ratios`` is :func:`_fit_grid`'s, in the
    same float64 operations, the scale rounded up as :func:`_round_up` does
    (``halves``); its error and the choice are :func:`_best_grids`'. The
    stored scales and zero points go to ``scale`` and ``zero`` (float64), the
    codes to ``codes``. ``compact``: the scales then snapped onto compact
    scales along ``x``'s groups, zero points and codes fitted again, as
    :func:`_snapped` does.
    """
    levels = (1 << bits) - 1
    mid = 1 << (bits - 1)
    n = x.size // g
    lows = np.empty(n)
    chosen = np.empty(n)
    for k in range(n):
        a = k * g
        low, high = x[a], x[a]
        for c in range(a + 1, a + g):
            low, high = min(low, x[c]), max(high, x[c])
        least, best_s, best_z, best_t = np.inf, 0.0, 0.0, 0
        for t in range(ratios.size):
            if symmetric:
                amax = max(-low, high) * ratios[t]
                s = _ceil_scale(amax / (mid - 0.5), halves)
                z = float(mid)
            else:
                lo, hi = min(low, 0.0) * ratios[t], max(high, 0.0) * ratios[t]
                s = _ceil_scale((hi - lo) / levels, halves)
                z = min(max(np.rint(-lo / s) if s > 0 else 0.0, 0.0), float(levels))
            s32, z32 = np.float32(s), np.float32(z)
            total = 0.0
            for c in range(a, a + g):
                q = _code(x[c], s, z, levels, False)
                diff = np.float64((np.float32(q) - z32) * s32) - x[c]
                total += diff * diff
            if total < least:
                least, best_s, best_z, best_t = total, s, z, t
        scale[k], zero[k] = best_s, best_z
        lows[k], chosen[k] = low, ratios[best_t]
        for c in range(a, a + g):
            codes[c] = np.uint8(_code(x[c], best_s, best_z, levels, False))
    if not compact:
        return
    for a in range(0, n, SUPER):
        b = min(n, a + SUPER)
        largest = 0.0
        for k in range(a, b):
            largest = max(largest, scale[k])
        step = math.ldexp(1.0, _exponent(largest))
        for k in range(a, b):
            s = np.ceil(scale[k] / step) * step
            if s > _F16_MAX:
                raise ValueError(
                    "the weights are too large for float16 scales (a scale "
                    "above 65504); use scale_dtype='float32'"
                )
            z = float(mid)
            if not symmetric:
                lo = min(lows[k], 0.0) * chosen[k]
                z = min(max(np.rint(-lo / s) if s > 0 else 0.0, 0.0), float(levels))
            scale[k], zero[k] = s, z
            for c in range(k * g, k * g + g):
                codes[c] = np.uint8(_code(x[c], s, z, levels, False))


def _nearest(values, dtype):
    """``values`` in ``dtype``, to the nearest; raise when float16 overflows."""
    with np.errstate(over="ignore"):
        stored = np.asarray(values).astype(dtype)
    if dtype is np.float16 and np.any(~np.isfinite(stored)):
        raise ValueError(
            "the weights are too large for float16 scales (a scale above "
            "65504); use scale_dtype='float32'"
        )
    return stored


def _encode(groups, scale, zero, bits):
    """Round-to-nearest codes of ``groups`` (rows) on the grid ``(scale, zero)``.

    An integer zero point is added after the rounding, a float one before.
    """
    levels = (1 << bits) - 1
    s64 = scale.astype(np.float64)[:, None]
    z64 = zero.astype(np.float64)[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        if zero.dtype.kind == "f":
            q = np.where(s64 > 0, np.rint(groups / s64 + z64), np.rint(z64))
        else:
            q = np.where(s64 > 0, np.rint(groups / s64), 0.0) + z64
    return np.clip(q, 0, levels).astype(np.uint8)


def _decode(codes, scale, zero):
    """``(codes - zero) * scale`` in float32, one group per row.

    One compiled pass (:func:`_decode_into`), no temporaries: 4-15x faster
    than the same float32 arithmetic in NumPy, with the same bits.
    """
    out = np.empty(codes.shape, dtype=np.float32)
    _decode_into(codes, scale.astype(np.float32), zero.astype(np.float32), out)
    return out


@numba.njit(cache=True, nogil=True)
def _decode_into(codes, scale, zero, out):
    """``out[i, j] = (codes[i, j] - zero[i]) * scale[i]``, each step in float32
    (the subtraction rounded before the product, as NumPy does)."""
    for i in range(codes.shape[0]):
        s, z = scale[i], zero[i]
        for j in range(codes.shape[1]):
            out[i, j] = (np.float32(codes[i, j]) - z) * s


@numba.njit(cache=True, nogil=True, inline="always")
def _code(x, s, z, levels, float_zeros):
    """The code of ``x`` on the grid ``(s, z)``, as :func:`_encode` rounds it:
    a float zero point added before the rounding, an integer one after."""
    if float_zeros:
        q = np.rint(x / s + z) if s > 0 else np.rint(z)
    else:
        q = (np.rint(x / s) if s > 0 else 0.0) + z
    return min(max(q, 0.0), float(levels))


@numba.njit(cache=True, nogil=True)
def _best_grids(groups, scales, zeros, bits, float_zeros, codes):
    """Index of each group's best grid among ``scales[t]``/``zeros[t]``, and its codes.

    ``groups`` one a row; ``scales``, ``zeros`` of shape (grids, groups), in
    float64 holding their stored values. A group's squared error on each
    grid is the arithmetic of :func:`_encode` and :func:`_decode`, entry by
    entry (the decoded value in float32), without the matrices they
    allocate; the first grid of the least error wins. One call for all the
    clipping ratios: on a projective table's bases, rounded a column of 12
    groups at a time, the per-ratio calls were most of the cost.
    """
    levels = (1 << bits) - 1
    n_grids = scales.shape[0]
    best = np.zeros(groups.shape[0], dtype=np.int64)
    for r in range(groups.shape[0]):
        least = np.inf
        for t in range(n_grids):
            s, z = scales[t, r], zeros[t, r]
            s32, z32 = np.float32(s), np.float32(z)
            total = 0.0
            for c in range(groups.shape[1]):
                q = _code(groups[r, c], s, z, levels, float_zeros)
                diff = np.float64((np.float32(q) - z32) * s32) - groups[r, c]
                total += diff * diff
            if total < least:
                least, best[r] = total, t
        s, z = scales[best[r], r], zeros[best[r], r]
        for c in range(groups.shape[1]):
            codes[r, c] = np.uint8(_code(groups[r, c], s, z, levels, float_zeros))
    return best


def _fit_and_encode(
    groups,
    bits,
    symmetric,
    dtype,
    clip_ratios,
    weights=None,
    zero_dtype=np.uint8,
    compact=None,
    with_ratio=False,
):
    """Grid of each group (row of ``groups``), searched over clipping ratios.

    The ratio with the lowest (weighted) squared error of each group wins
    (the first of equal errors); ``clip_ratios=(1.0,)`` is plain
    round-to-nearest over the full range. ``compact=(shape, layout)``: the
    groups' scales, arranged as ``shape`` (lines, groups: C order), are
    then rounded up onto the compact grid of ``layout``
    (:mod:`._scales`), and their zero points and codes fitted again.
    ``with_ratio``: each group's clipping ratio is returned too, last.
    """
    groups = np.ascontiguousarray(groups, dtype=np.float64)
    if compact is not None:
        scale, _, _, ratio = _fit_and_encode(
            groups, bits, symmetric, dtype, clip_ratios, weights, zero_dtype,
            with_ratio=True,
        )  # fmt: skip
        return _snapped(groups, bits, symmetric, scale, ratio, *compact)
    float_zeros = not symmetric and zero_dtype is np.float16
    codes = np.empty(groups.shape, dtype=np.uint8)
    bounds = groups.min(axis=1), groups.max(axis=1)
    if weights is None:  # every ratio's grid at once, then one compiled pass
        ratios = np.asarray(clip_ratios, dtype=np.float64)[:, None]
        scale, zero = _fit_grid(
            groups, bits, symmetric, ratios, dtype, zero_dtype, bounds
        )
        scale, zero = (
            np.broadcast_to(scale, (len(ratios), len(groups))),
            (np.broadcast_to(zero, (len(ratios), len(groups)))),
        )
        s64 = np.ascontiguousarray(scale, dtype=np.float64)
        z64 = np.ascontiguousarray(zero, dtype=np.float64)
        best = _best_grids(groups, s64, z64, bits, float_zeros, codes)
        rows = np.arange(len(groups))
        out = scale[best, rows], zero[best, rows], codes
        return (*out, ratios[best, 0]) if with_ratio else out
    best = None
    err = np.empty(groups.shape[0])
    chosen = np.full(groups.shape[0], float(clip_ratios[0]))
    for ratio in clip_ratios:
        scale, zero = _fit_grid(
            groups, bits, symmetric, ratio, dtype, zero_dtype, bounds
        )
        codes[:] = _encode(groups, scale, zero, bits)
        diff = _decode(codes, scale, zero).astype(np.float64) - groups
        err[:] = (weights * diff * diff).sum(axis=1)
        if best is None:
            best = [err.copy(), scale, zero, codes.copy()]
            continue
        better = err < best[0]
        best[0] = np.where(better, err, best[0])
        best[1][better], best[2][better] = scale[better], zero[better]
        best[3][better] = codes[better]
        chosen[better] = ratio
    out = best[1], best[2], best[3]
    return (*out, chosen) if with_ratio else out


def _snapped(groups, bits, symmetric, scale, ratio, shape, layout):
    """Each group's chosen grid with its scale rounded up onto the compact
    grid (:func:`._scales.snap_scales`): the zero point that covers the
    group's range and zero as clipped by its ``ratio``, and the codes."""
    scale = snap_scales(np.asarray(scale).reshape(shape), layout).reshape(-1)
    if symmetric:
        zero = np.full(len(groups), 1 << (bits - 1), dtype=np.uint8)
    else:
        lo = np.minimum(groups.min(axis=1), 0.0) * ratio
        s64 = scale.astype(np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            zero = np.where(s64 > 0, np.rint(-lo / s64), 0.0)
        zero = np.clip(zero, 0, (1 << bits) - 1).astype(np.uint8)
    return scale, zero, _encode(groups, scale, zero, bits)


def _as_matrix(W, name="W", copy=True):
    """``W`` checked: a finite real 2-D array, in float64 (``copy=False``: a
    float array as it is, others in float64)."""
    if hasattr(W, "detach"):
        W = W.detach().cpu().numpy()
    W = np.asarray(W)
    if W.ndim != 2 or min(W.shape) < 1:
        raise ValueError(f"{name} must be a non-empty 2-D array, got shape {W.shape}")
    if W.dtype.kind not in "iuf":
        raise TypeError(f"{name} must hold real numbers, got dtype {W.dtype}")
    if copy or W.dtype.kind != "f":
        W = W.astype(np.float64)
    if not np.all(np.isfinite(W)):
        raise ValueError(f"{name} must be finite (no NaN or inf)")
    return W
