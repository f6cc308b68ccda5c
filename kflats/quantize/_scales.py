"""Compact scales: 8-bit multiples of a power of two shared by a few groups.

A float16 scale costs 16 bits a group: half a bit a number at groups of 32.
Stored compact, the scales of :data:`SUPER` neighbouring groups (a *super
group*) are integer multiples ``c * 2**e`` of one power of two, ``c`` in
``0 .. 255`` (a byte a group) and ``e`` an int8 shared by the super group:
a little over a quarter of a bit a number at groups of 32. A scale is
rounded up onto that grid (by less than 1/128 of the largest scale of its
super group), so the grid still covers its group's range; the exponent is
the least that holds the super group's largest scale, so it follows from
the scales themselves, and ``c * 2**e`` is a float16 value exactly: in
memory the scales stay float16, unchanged for every kernel, and the file
stores ``c`` and ``e``.

Which neighbours share an exponent is the tensor's ``scale_layout``: along
the lines (``0``: the groups of one index in :data:`SUPER` consecutive
lines, which a calibrated rounding along the rows fits together) or along
each line (``1``: :data:`SUPER` consecutive groups of a line); the last
super group of a line or a column may be shorter.
"""

import math

import numba
import numpy as np

SUPER = 8  # groups that share an exponent
_CODES = 255  # largest code of a compact scale
_LOWEST = -24  # float16's smallest subnormal: 2**-24
_F16_MAX = 65504.0
LAYOUTS = (0, 1)


def check_scale_layout(scale_layout):
    """``None``, 0 or 1 (see the module's docstring)."""
    if scale_layout is None:
        return None
    if isinstance(scale_layout, bool) or scale_layout not in LAYOUTS:
        raise ValueError(f"scale_layout must be None, 0 or 1, got {scale_layout!r}")
    return int(scale_layout)


def _blocks(scales, layout):
    """``scales`` (2-D) as (super groups, SUPER), zero-padded, layout 1's way."""
    M = np.asarray(scales, dtype=np.float64)
    M = M if layout == 1 else M.T
    lines, n = M.shape
    pad = (-n) % SUPER
    P = np.pad(M, ((0, 0), (0, pad)))
    return P.reshape(lines, -1, SUPER), n


def _power(e):
    """``2.0 ** e`` of integer-valued ``e``, exactly (``ldexp``)."""
    return np.ldexp(1.0, np.asarray(e).astype(np.int64))


def _exponents(largest):
    """The least exponent ``e >= -24`` with ``ceil(largest / 2**e) <= 255``.

    ``floor(log2(x))`` from the binary exponent (``frexp``), exact on every
    machine: a file written on one reads back on another.
    """
    _, p = np.frexp(np.where(largest > 0, largest, 1.0))
    e = np.where(largest > 0, p - 8.0, _LOWEST)  # floor(log2(x)) - 7
    e = np.maximum(e, _LOWEST)
    e += np.ceil(largest / _power(e)) > _CODES
    return e


@numba.njit(cache=True, nogil=True)
def _exponent(largest):
    """:func:`_exponents` of one scale, compiled (the same arithmetic)."""
    if largest <= 0:
        return _LOWEST
    e = max(math.frexp(largest)[1] - 8, _LOWEST)
    if np.ceil(largest / math.ldexp(1.0, e)) > _CODES:
        e += 1
    return e


def exponent_shape(shape, layout):
    """The shape of the exponents of scales of ``shape`` (lines, groups)."""
    lines, groups = shape
    if layout == 1:
        return (lines, -(-groups // SUPER))
    return (-(-lines // SUPER), groups)


def snap_scales(scales, layout):
    """``scales`` (2-D, >= 0) rounded up onto the compact grid, in float16.

    Raises
    ------
    ValueError
        If a scale rounds above float16's largest value.
    """
    B, n = _blocks(scales, layout)
    e = _exponents(B.max(axis=2, keepdims=True))
    step = _power(e)
    snapped = np.ceil(B / step) * step
    if snapped.max(initial=0.0) > _F16_MAX:
        raise ValueError(
            "the weights are too large for float16 scales (a scale above "
            "65504); use scale_dtype='float32'"
        )
    out = snapped.reshape(B.shape[0], -1)[:, :n].astype(np.float16)
    return out if layout == 1 else np.ascontiguousarray(out.T)


def split_scales(scales, layout):
    """``(codes, exponents)`` of float16 scales on the compact grid, or None.

    ``codes`` (uint8) has the shape of ``scales``, ``exponents`` (int8)
    :func:`exponent_shape`; None when a scale is off the grid.
    """
    B, n = _blocks(scales, layout)
    e = _exponents(B.max(axis=2, keepdims=True))
    codes = B / _power(e)
    if not (np.all(codes == np.rint(codes)) and np.all(codes <= _CODES)):
        return None
    codes = codes.reshape(B.shape[0], -1)[:, :n].astype(np.uint8)
    exps = e.reshape(B.shape[0], -1).astype(np.int8)
    if layout == 0:
        codes, exps = codes.T, exps.T
    return np.ascontiguousarray(codes), np.ascontiguousarray(exps)


def join_scales(codes, exponents, layout):
    """The float16 scales that :func:`split_scales` split (validated).

    Raises
    ------
    ValueError
        If the codes and exponents do not fit together, or do not give the
        exponents back (a file not written by kflats).
    """
    codes, exps = np.asarray(codes), np.asarray(exponents)
    if codes.dtype != np.uint8 or codes.ndim != 2:
        raise ValueError(
            f"scale_codes must be 2-D uint8, got {codes.dtype} {codes.shape}"
        )
    want = exponent_shape(codes.shape, layout)
    if exps.dtype != np.int8 or exps.shape != want:
        raise ValueError(
            f"scale_exponents must be int8 of shape {want}, got {exps.dtype} "
            f"{exps.shape}"
        )
    if exps.size and (exps.min() < _LOWEST or exps.max() > 8):
        raise ValueError("scale_exponents must lie in -24..8")
    step = _power(exps)
    spread = np.repeat(step, SUPER, axis=1 if layout == 1 else 0)
    spread = spread[: codes.shape[0], : codes.shape[1]]
    values = codes * spread
    if values.max(initial=0.0) > _F16_MAX:
        raise ValueError("scale_codes and scale_exponents exceed float16's range")
    scales = values.astype(np.float16)
    again = split_scales(scales, layout)
    if again is None or not np.array_equal(again[1], exps):
        raise ValueError(
            "scale_exponents must be the least that hold each super group's "
            "largest scale"
        )
    return scales


def compact_nbytes(shape, layout):
    """Bytes of compact scales of ``shape`` (lines, groups): codes and exponents."""
    lines, groups = exponent_shape(shape, layout)
    return int(shape[0] * shape[1] + lines * groups)


def compact_layout(compact_scales, scale_dtype, zero_dtype, symmetric, layout):
    """``layout`` if ``compact_scales``, else None; checked against the grid."""
    if not isinstance(compact_scales, (bool, np.bool_)):
        raise TypeError(f"compact_scales must be a bool, got {compact_scales!r}")
    if not compact_scales:
        return None
    if scale_dtype is not np.float16:
        raise ValueError("compact_scales=True needs scale_dtype='float16'")
    if not symmetric and zero_dtype is not np.uint8:
        raise ValueError(
            "compact_scales=True needs integer zero points (zero_dtype='uint8') "
            "or symmetric=True"
        )
    return layout
