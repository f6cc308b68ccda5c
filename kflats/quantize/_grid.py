"""The integer grids of group-wise quantization: checks, packed codes, fitting.

A group of entries is stored as integer codes on a grid (a scale and a zero
point); this module fits the grids (round-to-nearest, or searched over
clipping ratios), encodes and decodes the codes, and packs them tightly into
bytes. :class:`~kflats.quantize.QuantizedTensor` is built on it.
"""

import numbers

import numpy as np

SUPPORTED_BITS = (2, 3, 4, 6, 8)
_SCALE_DTYPES = {"float16": np.float16, "float32": np.float32}
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
    stream, so 3- and 6-bit codes run across byte boundaries and the stream
    holds no padding except in its last byte.
    """
    codes = np.ascontiguousarray(codes, dtype=np.uint8).reshape(-1)
    if bits == 8:
        return codes.copy()
    shifts = np.arange(bits, dtype=np.uint8)
    stream = ((codes[:, None] >> shifts) & 1).astype(np.uint8)
    return np.packbits(stream.reshape(-1), bitorder="little")


def unpack_codes(packed, bits, count):
    """The ``count`` codes that :func:`pack_codes` packed."""
    packed = np.ascontiguousarray(packed, dtype=np.uint8).reshape(-1)
    if bits == 8:
        return packed[:count].copy()
    stream = np.unpackbits(packed, count=count * bits, bitorder="little")
    weights = (1 << np.arange(bits, dtype=np.uint8)).astype(np.uint8)
    return (stream.reshape(count, bits) * weights).sum(axis=1, dtype=np.uint8)


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


def _fit_grid(groups, bits, symmetric, ratio, dtype):
    """Scales and zero points of groups (rows of ``groups``) shrunk by ``ratio``."""
    levels = (1 << bits) - 1
    if symmetric:
        amax = np.abs(groups).max(axis=1) * ratio
        scale = _round_up(amax / ((1 << (bits - 1)) - 0.5), dtype)
        zero = np.full(groups.shape[0], 1 << (bits - 1), dtype=np.uint8)
    else:
        lo = np.minimum(groups.min(axis=1), 0.0) * ratio
        hi = np.maximum(groups.max(axis=1), 0.0) * ratio
        scale = _round_up((hi - lo) / levels, dtype)
        s64 = scale.astype(np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            zero = np.where(s64 > 0, np.rint(-lo / s64), 0.0)
        zero = np.clip(zero, 0, levels).astype(np.uint8)
    return scale, zero


def _encode(groups, scale, zero, bits):
    """Round-to-nearest codes of ``groups`` (rows) on the grid ``(scale, zero)``."""
    levels = (1 << bits) - 1
    s64 = scale.astype(np.float64)[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(s64 > 0, np.rint(groups / s64), 0.0)
    q = q + zero.astype(np.float64)[:, None]
    return np.clip(q, 0, levels).astype(np.uint8)


def _decode(codes, scale, zero):
    """``(codes - zero) * scale`` in float32, one group per row."""
    return (codes.astype(np.float32) - zero.astype(np.float32)[:, None]) * scale.astype(
        np.float32
    )[:, None]


def _fit_and_encode(groups, bits, symmetric, dtype, clip_ratios, weights=None):
    """Grid of each group (row of ``groups``), searched over clipping ratios.

    The ratio with the lowest (weighted) squared error of each group wins;
    ``clip_ratios=(1.0,)`` is plain round-to-nearest over the full range.
    """
    best = None
    for ratio in clip_ratios:
        scale, zero = _fit_grid(groups, bits, symmetric, ratio, dtype)
        codes = _encode(groups, scale, zero, bits)
        diff = _decode(codes, scale, zero).astype(np.float64) - groups
        err = (diff * diff if weights is None else weights * diff * diff).sum(axis=1)
        if best is None:
            best = [err, scale, zero, codes]
            continue
        better = err < best[0]
        best[0] = np.where(better, err, best[0])
        best[1][better], best[2][better] = scale[better], zero[better]
        best[3][better] = codes[better]
    return best[1], best[2], best[3]


def _as_matrix(W, name="W"):
    if hasattr(W, "detach"):
        W = W.detach().cpu().numpy()
    W = np.asarray(W)
    if W.ndim != 2 or min(W.shape) < 1:
        raise ValueError(f"{name} must be a non-empty 2-D array, got shape {W.shape}")
    if W.dtype.kind not in "iuf":
        raise TypeError(f"{name} must hold real numbers, got dtype {W.dtype}")
    W = W.astype(np.float64)
    if not np.all(np.isfinite(W)):
        raise ValueError(f"{name} must be finite (no NaN or inf)")
    return W
