"""kflats' quantized matrices as GGUF blocks: which type holds each, and the packing.

A GGUF block holds 32 consecutive entries of a row and one float16 scale
``d`` (and, for Q4_1 and Q5_1, one float16 minimum ``m``), in this order:

- ``Q8_0``: ``d``, 32 signed bytes ``x``; value ``d * x``;
- ``Q4_0``: ``d``, 16 bytes of two 4-bit codes ``q``; value ``d * (q - 8)``;
- ``Q4_1``: ``d``, ``m``, the same 16 bytes; value ``d * q + m``;
- ``Q5_0``: ``d``, 4 bytes of the codes' fifth bits, 16 bytes of their low
  4 bits; value ``d * (q - 16)``;
- ``Q5_1``: ``d``, ``m``, the same 4 + 16 bytes; value ``d * q + m``.

A :class:`~kflats.quantize.QuantizedTensor` grouped in 32s along its rows
(``axis=1``), with float16 scales, fills them with its own codes: 8-bit
symmetric codes ``c`` (value ``(c - 128) * s``) are Q8_0's ``x = c - 128``
and ``d = s``; 4- and 5-bit symmetric codes (``(c - 8) * s``, ``(c - 16)
* s``) are Q4_0's and Q5_0's, as they are; 4- and 5-bit codes with zero
points ``z`` (``(c - z) * s``, ``z`` an integer or a float16) are Q4_1's
and Q5_1's with ``d = s`` and ``m = -z * s``. The symmetric types hold the
very values kflats computes; a minimum ``m`` is ``-z * s`` rounded to
float16, which moves a group's entries by at most ``2**-11 * |z * s|``
(below 2 % of the group's step ``s`` for an integer zero point, ``z <=
31``), one offset for the whole group. The codes are never rounded again.

In a block the low 4 bits of entries ``j`` and ``j + 16`` share byte ``j``
(low and high half): the order llama.cpp's kernels read; the fifth bit of
entry ``j`` is bit ``j`` of the 4 bytes read as a little-endian uint32.
The gguf package dequantizes these blocks but has no packing of given
codes: it is written here.
"""

import numpy as np

__all__ = ["BLOCK", "block_type", "gguf_type", "minimum_offset_bound", "pack_blocks"]

BLOCK = 32  # entries per block of every type written here


def _types():
    import gguf

    q = gguf.GGMLQuantizationType
    # (bits, symmetric) -> the block type that holds kflats' codes as they are
    return {
        (8, True): q.Q8_0,
        (5, True): q.Q5_0,
        (5, False): q.Q5_1,
        (4, True): q.Q4_0,
        (4, False): q.Q4_1,
    }


def block_type(bits, symmetric):
    """The GGUF type whose blocks hold ``bits``-bit codes in groups of 32 along
    rows with float16 scales, symmetric or with zero points; None if none does."""
    return _types().get((int(bits), bool(symmetric)))


def gguf_type(qt):
    """The GGUF type that holds a QuantizedTensor's codes, or why none does.

    Parameters
    ----------
    qt : QuantizedTensor

    Returns
    -------
    qtype : gguf.GGMLQuantizationType or None
    reason : str or None
        Why no type holds it (``qtype`` is then None).
    """
    held = ", ".join(
        f"{b}-bit {'symmetric' if s else 'with zero points'}" for b, s in _types()
    )
    if qt.axis != 1:
        return None, "grouped along columns (GGUF blocks run along rows)"
    if qt.group_size != BLOCK:
        return None, f"groups of {qt.group_size} (GGUF blocks hold {BLOCK})"
    if qt.scales.dtype != np.float16:
        return None, f"{qt.scales.dtype} scales (GGUF blocks hold float16)"
    qtype = block_type(qt.bits, qt.symmetric)
    if qtype is None:
        kind = "symmetric" if qt.symmetric else "with zero points"
        return None, f"{qt.bits}-bit codes {kind} (GGUF holds {held}, in 32s)"
    return qtype, None


def _nibbles(codes):
    """The low 4 bits of blocks of 32 codes as 16 bytes: entry j low, entry
    j + 16 high."""
    low = codes & 15
    return (low[:, :16] | (low[:, 16:] << 4)).astype(np.uint8)


def _fifth_bits(codes):
    """Bit 4 of blocks of 32 codes as 4 bytes: entry j's is bit j of the
    little-endian uint32 they make."""
    return np.packbits((codes >> 4) & 1, axis=1, bitorder="little")


def _half_bytes(values):
    return np.ascontiguousarray(values.astype(np.float16)).view(np.uint8).reshape(-1, 2)


def pack_blocks(qt):
    """A QuantizedTensor's codes and scales as the blocks of its GGUF type.

    Parameters
    ----------
    qt : QuantizedTensor
        One that :func:`gguf_type` gives a type for.

    Returns
    -------
    blocks : ndarray of uint8, shape (rows, row_bytes)
        Row ``i`` holds the blocks of the matrix's row ``i``, in order; rows
        move whole (and exactly) with their blocks.
    qtype : gguf.GGMLQuantizationType

    Raises
    ------
    ValueError
        If no GGUF type holds ``qt`` (the message says why).
    """
    qtype, reason = gguf_type(qt)
    if qtype is None:
        raise ValueError(f"no GGUF block type holds this tensor: {reason}")
    rows, cols = qt.shape
    codes = qt.unpacked_codes().reshape(-1, BLOCK)
    scales = qt.scales.reshape(-1)
    d = _half_bytes(scales)
    if qt.bits == 8:  # Q8_0: the codes less their midpoint, as signed bytes
        x = (codes.astype(np.int16) - 128).astype(np.int8).view(np.uint8)
        parts = [d, x]
    else:  # Q4_0, Q5_0: the codes as they are (midpoint 8, 16)
        parts = [d]
        if not qt.symmetric:  # Q4_1, Q5_1: d * q + m with m = -z * s
            m = -qt.zeros.reshape(-1).astype(np.float64) * scales.astype(np.float64)
            parts.append(_half_bytes(m))
        if qt.bits == 5:
            parts.append(_fifth_bits(codes))
        parts.append(_nibbles(codes))
    blocks = np.concatenate(parts, axis=1)
    return blocks.reshape(rows, -1), qtype


def minimum_offset_bound(qt):
    """The largest move of an entry by a float16 minimum (Q4_1, Q5_1; 0 for
    the symmetric types).

    Parameters
    ----------
    qt : QuantizedTensor

    Returns
    -------
    bound : float
        ``max |fp16(-z * s) - (-z * s)|`` over the groups.
    """
    if qt.symmetric:
        return 0.0
    exact = -qt.zeros.astype(np.float64) * qt.scales.astype(np.float64)
    return float(np.abs(exact.astype(np.float16).astype(np.float64) - exact).max())
