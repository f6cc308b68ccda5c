"""Numba kernels that dequantize packed codes in one pass, on the CPU.

Each reads a tightly packed little-endian code stream and writes
``(q - z) * s`` in float32, with one rounding: the values of
:meth:`kflats.quantize.QuantizedTensor.dequantize`, bit for bit (no
``fastmath``: the subtraction and the product stay apart). Where a group
(and, for a lookup of lines, a line) starts on a word (one to three bytes
holding whole codes, five for 5-bit codes, :data:`WORDS`: group size and
line length multiples of 2 to 8, as the group sizes kflats chooses for
weight matrices are), a word is read once and its codes taken by constant
shifts, which the compiler unrolls; other lines (the coefficients of a
cluster whose rank is odd) are read code by code from the bit stream.

One kernel per bit width, made by :func:`_word_kernel` at import, so that
the width and the shifts are compile-time constants; each is compiled on
first use (about a second) and cached on disk. They run on one thread:
the GEMM that follows uses the cores.
"""

import math

import numba
import numpy as np
from numba import types
from numba.extending import overload

# bytes of a word read as one integer, and the codes it holds: the fastest of
# 1, 2 or 4 bytes for 2, 4 and 8 bits on a 1536 x 384 matrix (g128, one
# thread): 2 bits 166 / 349 / 343 us, 4 bits 148 / 269 / 342 us, 8 bits
# 350 / 218 / 339 us; 3 and 6 bits read three bytes (219 and 247 us); 5
# bits the five bytes of eight codes, a 40-bit word read as one int64
WORDS = {2: (1, 4), 3: (3, 8), 4: (1, 2), 5: (5, 8), 6: (3, 4), 8: (2, 2)}


@numba.njit(cache=True, nogil=True)
def half_to_float(h):
    """The float32 value of float16 bits ``h`` (exact: every float16 is a float32)."""
    h = np.int32(h)
    exponent = (h >> 10) & 31
    mantissa = h & 1023
    if exponent == 0:  # zero and subnormals
        value = np.float32(math.ldexp(float(mantissa), -24))
    elif exponent == 31:
        value = np.float32(np.inf) if mantissa == 0 else np.float32(np.nan)
    else:
        value = np.float32(math.ldexp(float(1024 + mantissa), int(exponent) - 25))
    return -value if h >> 15 else value


def _scale(scales, j):
    """Scale (or zero point) ``j``: float32, or float16 held as its uint16 bits.

    Integer zero points (uint8) are read as float32, exactly.
    """
    # what runs with NUMBA_DISABLE_JIT=1; compiled, the overload below
    if scales.dtype == np.uint16:
        return half_to_float(scales[j])
    return np.float32(scales[j])


@overload(_scale, jit_options={"cache": True})
def _scale_of(scales, j):
    if scales.dtype == types.uint16:
        return lambda scales, j: half_to_float(scales[j])
    return lambda scales, j: np.float32(scales[j])


def _word_kernel(bits):
    mask = (1 << bits) - 1
    width, per_word = WORDS[bits]
    # the integer a word is read into: int64 where it holds more than 31 bits
    # (compiled, Numba widens an int32 shifted by 32 itself; run as Python,
    # with NUMBA_DISABLE_JIT=1, numpy would drop the fifth byte)
    word_int = np.int64 if 8 * width > 31 else np.int32

    @numba.njit(cache=True, nogil=True)
    def dequantize_lines(codes, scales, zeros, zstep, group_size, length, index, out):
        """Lines ``index`` of the matrix into ``out`` (flat, len(index) * length).

        One scale and zero point per group, groups line after line; the
        zero point of group ``j`` is ``zeros[j * zstep]`` (``zstep=0``: one
        for all, a symmetric grid's midpoint), uint8 or float16 bits. ``length`` and
        ``group_size`` are multiples of the codes a word holds
        (:data:`WORDS`).
        """
        groups = length // group_size
        words = group_size // per_word
        for r in range(index.shape[0]):
            line = index[r]
            for j in range(groups):
                g = line * groups + j
                s = _scale(scales, g)
                z = _scale(zeros, g * zstep)
                first = (line * length + j * group_size) // per_word
                o = r * length + j * group_size
                for w in range(words):
                    p = (first + w) * width
                    word = word_int(codes[p])
                    for b in range(1, width):
                        word |= word_int(codes[p + b]) << (8 * b)
                    for k in range(per_word):
                        q = (word >> (bits * k)) & mask
                        out[o + w * per_word + k] = (np.float32(q) - z) * s

    @numba.njit(cache=True, nogil=True)
    def dequantize_all(codes, scales, zeros, zstep, group_size, out):
        """The whole stream into ``out``: group after group, one per scale.

        The lines of :func:`dequantize_lines` without the index: each group
        starts where the last ended (2x faster on a 1536 x 384 matrix).
        """
        words = group_size // per_word
        for j in range(scales.shape[0]):
            s = _scale(scales, j)
            z = _scale(zeros, j * zstep)
            for w in range(words):
                p = (j * words + w) * width
                word = word_int(codes[p])
                for b in range(1, width):
                    word |= word_int(codes[p + b]) << (8 * b)
                o = (j * words + w) * per_word
                for k in range(per_word):
                    q = (word >> (bits * k)) & mask
                    out[o + k] = (np.float32(q) - z) * s

    return dequantize_lines, dequantize_all


@numba.njit(cache=True, nogil=True)
def dequantize_lines_any(
    codes, bits, scales, zeros, zstep, group_size, length, index, out
):
    """``dequantize_lines`` for any line length and group size, code by code."""
    mask = (1 << bits) - 1
    last = codes.shape[0] - 1
    groups = length // group_size
    for r in range(index.shape[0]):
        line = index[r]
        for j in range(groups):
            g = line * groups + j
            s = _scale(scales, g)
            z = _scale(zeros, g * zstep)
            start = line * length + j * group_size
            o = r * length + j * group_size
            for t in range(group_size):
                bit = (start + t) * bits
                byte = bit >> 3
                pair = np.int32(codes[byte]) | (
                    np.int32(codes[min(byte + 1, last)]) << 8
                )
                q = (pair >> (bit & 7)) & mask
                out[o + t] = (np.float32(q) - z) * s


WORD_KERNELS = {bits: _word_kernel(bits) for bits in WORDS}
