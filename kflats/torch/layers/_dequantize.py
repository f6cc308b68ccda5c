"""Quantized codes read in torch: unpacked, and dequantized whole or by rows.

The torch twin of :func:`kflats.quantize._grid.unpack_codes` and
:meth:`kflats.quantize.QuantizedTensor.dequantize`: the same codes, and the
same float32 values, ``(q - z) * s`` with one rounding (the subtraction of
a small integer and an integer or float16 zero point is exact), so that a
layer that dequantizes on the fly computes what the same layer holding the
float parameters computes.

Two paths give those values. On the CPU, the Numba kernels of
``_dequantize_kernels.py`` read the packed stream once and write the
floats (whole matrices of 2, 3, 4, 5 and 6 bits whose group size is a
multiple of a word, and every lookup of rows); elsewhere (another device,
8-bit codes, odd group sizes) torch operations do: each byte, or each
three-byte word of 3- or 6-bit codes (five-byte word of 5-bit codes),
shifted and masked once per code it holds, the codes interleaved by one
stack, then converted, less the zero point, times the scale. A row of a
table is unpacked alone (its bytes gathered, or its codes read from the bit
stream two bytes at a time).

Why these paths (measured on a shared 2-core development machine, AMD EPYC,
AVX2, torch 2.13, one thread, process time, best of 40; a 1536 x 384
weight, all-MiniLM-L6-v2's largest):

=============  =========  ==========  ===================================
codes          kernel     torch ops   (float32 GEMM of 20 rows: 344 us)
=============  =========  ==========  ===================================
3 bits, g128   256 us     1229 us
4 bits, g128   155 us     492 us
4 bits, g32    426 us     508 us
6 bits, g64    310 us     1294 us
8 bits, g128   269 us     189 us      (8 bits: torch's conversion wins)
=============  =========  ==========  ===================================

torch's integer kernels lose by far on such a CPU: ``_weight_int8pack_mm``
took 11.4 ms for those 20 rows (385 ms for 640) and
``_weight_int4pack_mm_for_cpu`` 23.3 ms (742 ms), against 0.65-0.79 ms
(9.4 ms) for dequantizing then the float32 GEMM, and neither holds kflats'
group-wise zero points exactly. A kernel runs on one thread (the GEMM
after it takes the cores; see ``kflats/_kernels.py`` on Numba's threading
layers beside torch's).

End to end, the 10.5 MB folder of ``kflats compress --size 9.1MB`` on
all-MiniLM-L6-v2 (26 of its 36 Linear weights at 3 bits g128, its word
embedding as 16 clusters' factors at 4 bits), ``model.encode`` of 64
held-out sentences, measured by ``python benchmarks/packed_report.py
/tmp/m9 --threads 1 --clock cpu --repeats 7`` (best of 7, against the
float32 original in the same run): tensors held 10.8 MB (1.02x the folder;
unpacked 72.4 MB, the original 90.9 MB); batch 32 1.03-1.11x the
original's time, batch 1 1.27-1.37x (unpacked: 0.98-1.01x and
1.02-1.16x); runs on the shared machine moved by about 10 %. On two
threads (``--threads 2``, wall-clock, the machine loaded by other jobs:
best of 7), batch 32 1.19x and batch 1 1.57x (unpacked 0.98x and 1.15x):
the kernels keep one thread while the GEMMs take two, so their share grows.
A kernel split over two threads (Numba's OpenMP layer) measured no faster
next to torch's threads (196-4052 us against 240 us serial).
"""

import numpy as np
import torch

from kflats.torch.layers._dequantize_kernels import (
    WORD_KERNELS,
    WORDS,
    dequantize_lines_any,
)

# bytes of a word, codes of a word: a byte holds whole 2-, 4- and 8-bit codes,
# three bytes whole 3- and 6-bit codes, five bytes eight 5-bit codes
_TORCH_WORDS = {2: (1, 4), 3: (3, 8), 4: (1, 2), 5: (5, 8), 6: (3, 4), 8: (1, 1)}


def unpack_codes(packed, bits, count):
    """The first ``count`` codes of a packed stream, as uint8.

    Parameters
    ----------
    packed : uint8 Tensor of shape (n_bytes,)
        As :func:`kflats.quantize._grid.pack_codes` wrote it.
    bits : {2, 3, 4, 5, 6, 8}
    count : int

    Returns
    -------
    codes : uint8 Tensor of shape (count,)
    """
    return _unpack(packed, bits, count).to(torch.uint8)


def _unpack(packed, bits, count):
    """The codes as integers: uint8 for 2, 4 and 8 bits, int32 for 3 and 6,
    int64 for 5 (a 40-bit word)."""
    if bits == 8:
        return packed[:count]
    width, per_word = _TORCH_WORDS[bits]
    words = -(-count // per_word)
    data = packed[: words * width]
    if data.numel() < words * width:  # the stream's last word, cut short
        data = torch.cat([data, data.new_zeros(words * width - data.numel())])
    if width == 1:
        word = data
    else:
        b = data.view(words, width).to(torch.int64 if width > 3 else torch.int32)
        word = b[:, 0]
        for i in range(1, width):
            word = word | (b[:, i] << (8 * i))
    mask = (1 << bits) - 1
    # one operator call per code of a word, then one copy that interleaves
    # them (a shift by a broadcast tensor of shifts took 3x longer)
    codes = [word & mask]
    codes += [(word >> shift) & mask for shift in range(bits, 8 * width, bits)]
    return torch.stack(codes, dim=1).view(-1)[:count]


def gather_codes(packed, bits, index):
    """The codes at positions ``index`` of a packed stream (any shape), as uint8."""
    if bits == 8:
        return packed[index]
    bit = index * bits
    byte = bit >> 3
    low = packed[byte].to(torch.int32)
    # a 3-, 5- or 6-bit code may end in the next byte (its first bit at
    # offset 0-7, its last before 16); the last byte has none
    high = packed[(byte + 1).clamp_(max=packed.numel() - 1)].to(torch.int32)
    codes = ((low | (high << 8)) >> (bit & 7)) & ((1 << bits) - 1)
    return codes.to(torch.uint8)


def dequantize_groups(codes, scales, zeros, bits):
    """``(codes - zeros) * scales`` in float32, one group per row.

    ``codes`` has shape (groups, group_size) (or any shape whose rows match
    ``scales``' entries); ``zeros`` None is the symmetric grid's midpoint.
    Values are those of :meth:`QuantizedTensor.dequantize`, bit for bit.
    """
    out = codes.to(torch.float32)
    if zeros is None:
        out.sub_(float(1 << (bits - 1)))
    else:
        out.sub_(zeros.to(torch.float32))
    return out.mul_(scales.to(torch.float32))


def _on_cpu(*tensors):
    return all(t is None or t.device.type == "cpu" for t in tensors)


def kernel_operands(codes, scales, zeros, bits):
    """What a CPU kernel reads: views of the tensors, or None off the CPU.

    The codes, the scales (float16 as their uint16 bits), the zero points
    (uint8, or float16 as their uint16 bits) and their step (a symmetric
    grid: one midpoint for every group, step 0). A caller that dequantizes
    the same tensors again may keep them.
    """
    if not _on_cpu(codes, scales, zeros):
        return None
    s = scales.reshape(-1).numpy()
    if s.dtype == np.float16:
        s = s.view(np.uint16)
    if zeros is None:
        return codes.numpy(), s, np.full(1, 1 << (bits - 1), dtype=np.uint8), 0
    z = zeros.reshape(-1).numpy()
    if z.dtype == np.float16:
        z = z.view(np.uint16)
    return codes.numpy(), s, z, 1


def dequantize_matrix(
    codes, scales, zeros, bits, group_size, axis, shape, operands=None
):
    """The float32 matrix of shape ``shape``, as ``QuantizedTensor.dequantize``.

    ``operands``: :func:`kernel_operands` of the tensors, if kept.
    """
    lines, length = shape if axis == 1 else shape[::-1]
    # 8-bit codes are bytes: torch's conversion and two broadcast operations
    # beat the kernel (181-189 us against 269-275 us, 1536 x 384, g128)
    kernel = bits != 8 and group_size % WORDS[bits][1] == 0
    if operands is None and kernel:
        operands = kernel_operands(codes, scales, zeros, bits)
    if operands is not None and kernel:
        w = torch.empty(lines * length, dtype=torch.float32)
        WORD_KERNELS[bits][1](*operands, group_size, w.numpy())
        w = w.view(lines, length)
    else:
        q = _unpack(codes, bits, lines * length).view(-1, group_size)
        w = dequantize_groups(
            q,
            scales.reshape(-1, 1),
            None if zeros is None else zeros.reshape(-1, 1),
            bits,
        ).view(lines, length)
    return w if axis == 1 else w.T.contiguous()


def dequantize_rows(
    codes, scales, zeros, bits, group_size, axis, shape, index, operands=None
):
    """Rows ``index`` (1-D int64, in range) of the matrix in float32, alone."""
    rows, cols = shape
    n = index.numel()
    if operands is None and axis == 1:
        operands = kernel_operands(codes, scales, zeros, bits)
    if operands is not None and axis == 1 and index.device.type == "cpu":
        codes_np, *grid = operands
        out = torch.empty(n * cols, dtype=torch.float32)
        rest = (*grid, group_size, cols, index.numpy(), out.numpy())
        per_word = WORDS[bits][1]
        if cols % per_word == 0 and group_size % per_word == 0:
            WORD_KERNELS[bits][0](codes_np, *rest)
        else:
            dequantize_lines_any(codes_np, bits, *rest)
        return out.view(n, cols)
    if axis == 1:
        g = group_size
        s = scales.index_select(0, index)
        z = None if zeros is None else zeros.index_select(0, index)
        if cols * bits % (8 * _TORCH_WORDS[bits][0]) == 0:
            # each row is whole words: gather its bytes, unpack them together
            row_bytes = cols * bits // 8
            data = codes.view(rows, row_bytes).index_select(0, index).reshape(-1)
            q = _unpack(data, bits, n * cols)
        else:
            step = torch.arange(cols, device=index.device)
            q = gather_codes(codes, bits, index.unsqueeze(1) * cols + step)
        q = q.view(n, cols // g, g)
        out = dequantize_groups(
            q, s.unsqueeze(2), None if z is None else z.unsqueeze(2), bits
        )
        return out.view(n, cols)
    # groups run down the columns: entry (t, j) is code j * rows + t, in the
    # group (j, t // group_size)
    step = torch.arange(cols, device=index.device)
    q = gather_codes(codes, bits, step.unsqueeze(0) * rows + index.unsqueeze(1))
    group = torch.div(index, group_size, rounding_mode="floor")
    s = scales.index_select(1, group).T
    z = None if zeros is None else zeros.index_select(1, group).T
    return dequantize_groups(q, s, z, bits)
