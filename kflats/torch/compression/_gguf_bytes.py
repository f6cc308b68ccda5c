"""A budget in bytes as the size of the GGUF file that kflats export writes.

With ``CompressionConfig(format="gguf")`` the size asked bounds the GGUF
file :func:`kflats.torch.export.export_gguf` writes of the compressed
model. Its bytes are known exactly before anything is fitted:

- the header: GGUF's magic, version and counts; the metadata, the source
  GGUF file's entries as the export copies them (its tokenizer, its
  hyperparameters: 1.8 MB on SmolLM2-135M) with the file type, the
  quantization version and kflats' entries; and a description of each
  tensor (name, dimensions, type, offset: the same whatever the type),
  padded to the file's alignment. The source is the GGUF file the model
  was read from (:func:`kflats.torch.io.gguf_source`);
- each tensor's data padded to the alignment: a float tensor 4 bytes a
  number (F32; 2 for float16 weights, F16), a quantized matrix its blocks
  of 32 numbers (Q8_0: 34 bytes, Q5_1: 24, Q5_0: 22, Q4_1: 20, Q4_0: 18);
- a head tied to the word embedding is not written (llama.cpp computes
  the logits with ``token_embd``).

So a form's price (:meth:`GgufBudget.priced`) is its tensors' padded
bytes in the file, the header is :attr:`GgufBudget.frame`, the tensors
outside the selection :attr:`GgufBudget.rest`, and a plan's bytes are the
file's bytes, to the byte (a test checks it over sizes).

This module also holds the rule of the format (:func:`gguf_holds`,
:func:`gguf_check`, :data:`GGUF_GRIDS`): which forms the search keeps.
"""

import functools
import os
from typing import NamedTuple

import torch

from kflats.torch.compression._folder_bytes import saved_tensors, size_asked

_BLOCK = 32  # numbers per block of every GGUF type kflats writes
_WHERE = "format='gguf': the model"
# the dense forms a GGUF file holds, (bits, zero points) -> the block type:
# symmetric grids (zero points None) are Q8_0's, Q5_0's and Q4_0's; 5- and
# 4-bit codes with float16 zero points are Q5_1's and Q4_1's layout (their
# float16 scale and minimum): the grid a Q4_1 file's weights already lie on
GGUF_GRIDS = {
    (8, None): "Q8_0",
    (5, None): "Q5_0",
    (5, "float16"): "Q5_1",
    (4, None): "Q4_0",
    (4, "float16"): "Q4_1",
}


def gguf_holds(module, form):
    """Whether :func:`kflats.torch.export.export_gguf` writes ``form`` exactly.

    Float forms (F32), and a dense weight in groups of 32 on a grid of
    :data:`GGUF_GRIDS`: 8-bit symmetric codes (Q8_0), 5- and 4-bit
    symmetric codes (Q5_0, Q4_0), 5- and 4-bit codes with float16 zero
    points (Q5_1, Q4_1). Codes and scales go into the blocks as they are.
    Projective factors have no GGUF form.
    """
    if form.bits is None:
        return form.kind == "float"
    return (
        form.kind == "dense"
        and form.group_size == _BLOCK
        and (form.bits, form.zero_dtype) in GGUF_GRIDS
    )


def gguf_check(config):
    """Settings ``format="gguf"`` cannot take, as a ValueError."""
    if config.group_size is not None and config.group_size != _BLOCK:
        raise ValueError(
            f"group_size={config.group_size}: format='gguf' holds quantized "
            f"matrices in blocks of {_BLOCK} (Q8_0, Q5_0, Q5_1, Q4_0, Q4_1); give "
            f"{_BLOCK} or None"
        )
    held = sorted({b for b, _ in GGUF_GRIDS})
    if not set(config.bits) & set(held):
        raise ValueError(
            f"bits={config.bits}: format='gguf' holds 8-bit codes (Q8_0), 5-bit "
            "codes (Q5_0, Q5_1), 4-bit codes (Q4_0, Q4_1), in groups of 32, and "
            "float tensors; include 8, 5 or 4 in bits"
        )


def gguf_grids(bits):
    """The dense grids ``(bits, group_size, zero_dtype)`` the search tries for
    GGUF, of those ``bits`` allows."""
    return tuple((b, _BLOCK, z) for b, z in GGUF_GRIDS if b in bits)


@functools.lru_cache(maxsize=4)
def _source_layout(path, arch, stamp):
    """The source's checked header and the entries the export writes from it
    (read once per file and version of it: ``stamp``)."""
    from kflats.torch.export._gguf_meta import file_entries
    from kflats.torch.io._gguf_check import read_gguf_header

    header = read_gguf_header(path, f"{_WHERE} was read from {str(path)!r}, which")
    # the file type is a number of fixed size: any value counts the same
    return header, tuple(file_entries(path, arch, header.alignment, 0))


class GgufBudget:
    """A budget in bytes as the size of the GGUF file, with the prices of forms.

    The same interface as :class:`~._folder_bytes.FolderBudget`.

    Parameters
    ----------
    model : transformers.PreTrainedModel
        The model as it is before compression: a causal LM of a family the
        GGUF export writes, read from a GGUF file (its weights may be on
        the meta device).
    names : list of str
        The selected modules (qualified names in ``model``).
    budget : float in (0, 1] or int
        A fraction of the bytes of every tensor of the model as it is (its
        float32 bytes: the same reference as the folder's), or a size in
        bytes.

    Attributes
    ----------
    total, asked : int
    rest : int
        Data of the tensors outside the selection, padded, as they are.
    frame : int
        The file's header: its metadata and tensor descriptions, padded.
    room : int
        What the selected modules' tensors may take.
    source : pathlib.Path
        The GGUF file whose metadata the export carries over.

    Raises
    ------
    ValueError
        If the model was not read from a GGUF file, is of a family the
        export does not write, or its GGUF file does not hold its tensors;
        if a selected module is not written in the file, or a tensor
        outside the selection is quantized in a form no GGUF type holds.
    """

    describes = "the GGUF file"
    frame_describes = "the GGUF header (the source's metadata and tokenizer)"

    def __init__(self, model, names, budget):
        from kflats.torch.export._gguf_meta import check_source, header_nbytes
        from kflats.torch.export._gguf_tensors import written_tensors
        from kflats.torch.io import gguf_source

        source = gguf_source(model)
        if source is None:
            raise ValueError(
                f"{_WHERE} was not read from a GGUF file: format='gguf' writes the "
                "GGUF file's tokenizer and metadata again, and counts them in the "
                "size asked. Read the model with kflats.torch.io.load_pretrained "
                "from a .gguf file, or compress with format='kflats' and export "
                "the folder with a source GGUF file (export_gguf(..., source=))"
            )
        self.total, self.asked = size_asked(saved_tensors(model), budget)
        self.digits = len(str(max(self.asked, 1)))
        self.source = source
        written, arch = written_tensors(model, _WHERE)
        if not source.is_file():
            raise ValueError(
                f"{_WHERE} was read from {str(source)!r}, which is not a file any "
                "more: format='gguf' copies its tokenizer and metadata"
            )
        stat = os.stat(source)
        header, entries = _source_layout(source, arch, (stat.st_mtime_ns, stat.st_size))
        shapes = [_Described(t.name, _shape(t.value)) for t in written]
        check_source(source, arch, model.config, shapes, "the model read from it")
        self._align = header.alignment
        self.frame = header_nbytes(
            entries, [(t.name, len(t.shape)) for t in shapes], self._align
        )
        by_key = {t.key: t for t in written}
        self._named = dict(model.named_modules())
        self._own = {}  # a selected module's tensors in the file: weight, others
        for name in names:
            keys = [f"{name}.{k}" for k in self._named[name].state_dict()]
            if f"{name}.weight" not in by_key:
                raise ValueError(
                    f"{_WHERE}: {name!r} is not written in the GGUF file (its "
                    "weight has no GGUF tensor); select the modules of the "
                    "transformer's blocks and its word embedding"
                )
            self._own[name] = [k for k in keys if k in by_key and k != f"{name}.weight"]
        owned = {f"{n}.weight" for n in names}.union(*self._own.values())
        self.rest = sum(
            self._tensor_nbytes(t.key, t.value) for t in written if t.key not in owned
        )
        self._by_key = by_key
        self.room = self.asked - self.rest - self.frame
        self._folder = {}

    def _tensor_nbytes(self, key, value):
        """Padded bytes of a tensor as it is (float, or quantized)."""
        from kflats.torch.export._gguf_blocks import gguf_type
        from kflats.torch.export._gguf_meta import padded

        if isinstance(value, torch.Tensor):
            return padded(value.numel() * _float_size(value.dtype), self._align)
        qtype, reason = gguf_type(value)
        if qtype is None:
            raise ValueError(
                f"{_WHERE}: {key!r} is quantized in a form no GGUF type holds "
                f"({reason}); select its module, or leave it float"
            )
        return self._blocks_nbytes(value.shape, qtype.name)

    def _blocks_nbytes(self, shape, qtype):
        import gguf

        from kflats.torch.export._gguf_meta import padded

        numbers = shape[0] * shape[1]
        block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]]
        return padded(numbers // block * size, self._align)

    def with_digits(self, digits):
        """The same budget (a GGUF file has no offsets written in digits)."""
        return self

    def nbytes(self, name, form):
        """Bytes of module ``name``'s tensors in ``form`` in the GGUF file."""
        weight = self._by_key[f"{name}.weight"].value
        if form.kind == "float":
            own = self._tensor_nbytes(f"{name}.weight", weight)
        elif gguf_holds(self._named[name], form):
            shape = tuple(self._named[name].weight.shape)
            own = self._blocks_nbytes(shape, GGUF_GRIDS[form.bits, form.zero_dtype])
        else:
            raise ValueError(  # pragma: no cover - the search keeps held forms
                f"format='gguf' holds no {form.kind} form at bits={form.bits}"
            )
        others = (self._by_key[k] for k in self._own[name])
        return own + sum(self._tensor_nbytes(t.key, t.value) for t in others)

    def header(self, name, form):
        """What ``form`` costs in the file beyond its tensors in the folder
        (its ``nbytes`` before :meth:`priced`): it may be negative."""
        folder = self._folder.get((name, form), form.nbytes)
        return self.nbytes(name, form) - folder

    def priced(self, name, form):
        """``form`` with its bytes in the GGUF file."""
        out = form._replace(nbytes=self.nbytes(name, form))
        self._folder[name, out] = form.nbytes
        return out


class _Described(NamedTuple):
    """A tensor as the source's check reads it: its name and its shape."""

    name: str
    shape: tuple


def _shape(value):
    return tuple(int(s) for s in value.shape)


def _float_size(dtype):
    """Bytes a number of a float tensor of ``dtype`` takes in the file."""
    return 2 if dtype == torch.float16 else 4  # F16, else F32 (bfloat16 widened)
