"""The file formats a folder may be exported to: what each holds, and how
a budget in bytes counts it.

``CompressionConfig.format`` names the file the folder will be exported
to. Each format has one rule, a :class:`FileFormat`: which forms it holds in
its operator's own form (``holds(module, form)``, applied wherever forms
are enumerated: dense, k = 1 factors, factors with k clusters), a check of
the settings it cannot take, and how the budget counts bytes (the folder's
weight files, or the exported model file). To add a format: one entry.
"""

from collections.abc import Callable
from typing import NamedTuple

from torch import nn

from kflats.torch.compression._folder_bytes import FolderBudget
from kflats.torch.compression._gguf_bytes import (
    GgufBudget,
    gguf_check,
    gguf_grids,
    gguf_holds,
)


class FileFormat(NamedTuple):
    """What one file format holds, and how a budget counts its bytes.

    Attributes
    ----------
    holds : callable
        ``holds(module, form) -> bool``: whether the format writes ``form``
        of ``module`` (a ``_Form``) in its operator's own form; the search
        keeps only those.
    check : callable
        ``check(config)``: raises ValueError for settings the format cannot
        take (before anything is measured).
    budget : callable
        ``budget(model, names, budget) -> FolderBudget``-like: the size
        asked and what each form costs in that file (:meth:`priced`).
    grids : callable
        ``grids(bits) -> tuple of (bits, group_size, zero_dtype)``: dense
        grids the search tries besides its own (a symmetric grid: zero
        points ``None``); none by default.
    compact_scales : bool
        Whether quantized forms store compact scales (a byte each, under a
        power of two shared by 8 groups: :func:`kflats.quantize.quantize`),
        where their zero points allow it; other formats write their own
        scales (float16 in ONNX's operators and GGUF's blocks).
    """

    holds: Callable
    check: Callable
    budget: Callable
    grids: Callable = lambda bits: ()  # noqa: E731
    compact_scales: bool = False


def _holds_all(module, form):
    return True


def _no_check(config):
    return None


# ONNX (onnxruntime's CPU operators, float32 activations, what kflats export
# writes by default): MatMulNBits takes 4-bit codes (2 and 3 bits are widened
# to 4 in the file, 5, 6 and 8 dequantized when the session starts);
# GatherBlockQuantized, a table's rows, 2, 4 and 8 bits; both in blocks of a
# power of two from 16 along the product's inner side (K) or the table's
# rows. Groups wider than a block would repeat their scales: only groups
# that are a block themselves are kept.
_ONNX_MATMUL_BITS = (4,)
_ONNX_GATHER_BITS = (2, 4, 8)
_ONNX_MIN_BLOCK = 16


def _onnx_block(group_size):
    g = group_size
    return g is not None and g >= _ONNX_MIN_BLOCK and g & (g - 1) == 0


def _onnx_holds(module, form):
    """Whether :func:`kflats.torch.export.export_onnx` writes ``form`` packed in
    the ONNX file, each matrix in its operator's own form but one.

    Float forms always (float32 MatMul and Gather). A dense Linear weight
    at 4 bits (``MatMulNBits``), a dense table at 2, 4 or 8 bits
    (``GatherBlockQuantized``), in groups of a power of two from 16. The
    k = 1 factors of a module at 4 bits: a Linear's (output side: the
    bases' groups run along the input features, the coefficients' along
    the rank, both the product's K) as two ``MatMulNBits``; an Embedding's
    coefficients as ``GatherBlockQuantized``, and its bases, whose groups
    run along the product's output side, packed in the file and
    dequantized when the session starts: the one matrix not in its
    operator's own form (``rank x d`` float32 in memory, at most 0.6 MB on
    all-MiniLM-L6-v2). Without those, the table has only its dense forms
    and float factors, and at 0.10 and 0.07 of MiniLM's float32 bytes the
    search kept it as float factors of rank 8: mean cosine 0.165 and 0.172
    on held-out text (measured once, ``benchmarks/data/sentences.txt``),
    against those of ``benchmarks/deploy_report.py`` with them. Not
    factors with k > 1 clusters quantized: each cluster's rank takes a
    group no block may divide.
    """
    if form.bits is None:
        return True
    if not _onnx_block(form.group_size) or form.zero_dtype != "uint8":
        return False  # (the operators pack integer zero points only)
    embedding = isinstance(module, nn.Embedding)
    if form.kind == "dense":
        return form.bits in (_ONNX_GATHER_BITS if embedding else _ONNX_MATMUL_BITS)
    return form.k == 1 and form.bits in _ONNX_MATMUL_BITS


def _onnx_check(config):
    g = config.group_size
    if g is not None and not _onnx_block(g):
        raise ValueError(
            f"group_size={g}: format='onnx' holds quantized matrices in blocks "
            f"of a power of two from {_ONNX_MIN_BLOCK} (MatMulNBits, "
            "GatherBlockQuantized); give 16, 32, 64, 128 ..., or group_size=None"
        )


def _onnx_budget(model, names, budget):
    from kflats.torch.compression._onnx_bytes import OnnxBudget

    return OnnxBudget(model, names, budget)


#: Each file format a folder may be exported to, by ``CompressionConfig.format``.
FORMATS = {
    "kflats": FileFormat(_holds_all, _no_check, FolderBudget, compact_scales=True),
    "onnx": FileFormat(_onnx_holds, _onnx_check, _onnx_budget),
    # GGUF (llama.cpp): its rule and its bytes in ._gguf_bytes
    "gguf": FileFormat(gguf_holds, gguf_check, GgufBudget, gguf_grids),
}


def _file_format(config):
    """The :class:`FileFormat` of a config (``"kflats"`` when it names none)."""
    return FORMATS[getattr(config, "format", "kflats")]
