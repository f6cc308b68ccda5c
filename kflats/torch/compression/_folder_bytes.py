"""A size in bytes is the folder's: the weight files, every tensor and header.

:func:`kflats.torch.save_compressed` writes every tensor of the model's
state dict (a tensor shared by several names once; a quantized parameter as
its packed codes, scales, zero points and meta) into safetensors files. A
safetensors file is 8 bytes (the header's length), a JSON header giving
each tensor's name, dtype, shape and offsets (padded with spaces to a
multiple of 8), then the tensors' bytes.

So a budget in bytes pays for three things: the selected modules in their
forms, every other tensor as it is (position embeddings, norms, the biases
of the modules left out), and the headers. :class:`FolderBudget` counts the
second exactly and the third by an upper bound, before anything is fitted:

- each tensor's header entry from its name (as the model passed to
  ``compress`` names it: never shorter than in the file, where a
  sentence-transformers model's transformer drops its prefix), its dtype
  and shape, the two offsets counted at the digits of the size asked (no
  offset of a folder within it is larger), and its separator;
- a packed matrix's entries those of
  :meth:`kflats.quantize.QuantizedTensor.to_state`, the numbers of their
  shapes bounded by the matrix's (a 1-D entry by its numbers, a 2-D entry's
  sides by the matrix's longer side);
- a projective form's entries its cluster ids, its bases and each of its
  ``k`` clusters' coefficients, as the layers of :mod:`kflats.torch.layers`
  name them;
- each file's frame: the length, the braces, ``{"format":"pt"}`` metadata
  and 7 bytes of padding; one file, or one per module of a
  sentence-transformers model that holds tensors.

The bound is above the folder's headers by the digits an offset does not
use, the padding, and the prefixes the file drops: on all-MiniLM-L6-v2 a
few kilobytes, of a folder of megabytes.
"""

import functools
import json
import math
import sys

import numpy as np
import torch
from torch import nn

from kflats.quantize._rtn import quantize
from kflats.torch.compression._sensitivity import _rows_cols
from kflats.torch.layers import label_dtype, quantized_state, scale_layouts

# a safetensors file's frame: its header's length (8 bytes), the braces of
# the header, the metadata the saves write, and the padding to 8 bytes
_METADATA = '"__metadata__":{"format":"pt"},'
_FRAME = 8 + 2 + len(_METADATA) + 7
# transformers shards a save above this many bytes (5 GB before version 5,
# 50 GB since); a shard is a file of its own
_SHARD = 5 * 10**9
# safetensors' names of the dtypes; others are counted at the longest name
_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
_LONGEST_DTYPE = "F8_E4M3"


def entry_nbytes(key, dtype, shape, digits):
    """Bytes of a tensor's entry in a safetensors header, at most.

    The entry as safetensors writes it, its comma included, the two
    offsets counted at ``digits`` digits each.

    Examples
    --------
    >>> import torch
    >>> entry = '"0.bias":{"dtype":"F32","shape":[64],"data_offsets":[0,256]},'
    >>> entry_nbytes("0.bias", torch.float32, (64,), 3) - len(entry)  # 0 as 999
    2
    """
    dims = ",".join(str(int(s)) for s in shape)
    offset = "9" * digits
    text = (
        f'{json.dumps(key)}:{{"dtype":"{_DTYPES.get(dtype, _LONGEST_DTYPE)}",'
        f'"shape":[{dims}],"data_offsets":[{offset},{offset}]}},'
    )
    return len(text)


def factor_side(module):
    """The side of a module's projective forms in a search in bytes: ``None``
    for an Embedding, ``"output"`` (k = 1 factors) for a Linear."""
    return None if isinstance(module, nn.Embedding) else "output"


@functools.cache
def _packed_parts(bits, zero_dtype="uint8", compact=False):
    """(suffix, dtype, ndim) of each entry of a matrix packed at ``bits``, its
    zero points of ``zero_dtype`` (None: a symmetric grid, no zero points),
    its scales compact or not."""
    grid = {"symmetric": True} if zero_dtype is None else {"zero_dtype": zero_dtype}
    if compact:
        grid["compact_scales"] = True
    probe = quantize(np.zeros((1, 8), dtype=np.float32), bits, 8, **grid)
    return tuple(
        (key, torch.from_numpy(np.ascontiguousarray(value)).dtype, value.ndim)
        for key, value in probe.to_state().items()
    )


def _matrix(key, rows, cols, bits, dtype, zero_dtype="uint8", compact=False):
    """Header entries (key, dtype, shape bound) of a matrix, float or packed."""
    if bits is None:
        return [(key, dtype, (rows, cols))]
    side = max(rows, cols)
    return [
        (f"{key}.{suffix}", part, (rows * cols,) if ndim == 1 else (side,) * ndim)
        for suffix, part, ndim in _packed_parts(bits, zero_dtype, compact)
    ]


def _form_entries(name, module, form):
    """Header entries of a module stored in ``form`` (a ``_Form``), shapes bounded."""
    state = module.state_dict()
    weight = state.pop("weight")
    others = [(f"{name}.{key}", t.dtype, tuple(t.shape)) for key, t in state.items()]
    compact = getattr(form, "compact", False)
    if form.kind == "float":
        return [(f"{name}.weight", weight.dtype, tuple(weight.shape)), *others]
    if form.kind == "dense":
        zeros = getattr(form, "zero_dtype", "uint8")
        entries = _matrix(
            f"{name}.weight", *weight.shape, form.bits, weight.dtype, zeros, compact
        )
        return entries + others
    n, d = _rows_cols(module)
    side = max(n, d)
    bases, coefficients = (
        compact and layout is not None for layout in scale_layouts(factor_side(module))
    )
    entries = [(f"{name}.labels", label_dtype(form.k), (side,))]
    entries += _matrix(
        f"{name}.bases", side, side, form.bits, weight.dtype, compact=bases
    )
    for c in range(form.k):
        key = f"{name}.coefficients.{c}"
        entries += _matrix(
            key, side, side, form.bits, weight.dtype, compact=coefficients
        )
    return entries + others


def _identity(key, t):
    """What makes two state-dict entries one tensor in the file."""
    if t.numel() == 0:
        return key
    if t.is_meta:  # a model built without weights: tied tensors are one object
        return id(t)
    return (t.data_ptr(), t.dtype, tuple(t.shape))


def saved_tensors(model):
    """The tensors a save of ``model`` writes, each once, with all their names.

    The state dict, quantized parameters packed
    (:func:`kflats.torch.layers.quantized_state`); a tensor that several
    names share (a tied head's weight, an alias of a quantized table) once.

    Parameters
    ----------
    model : torch.nn.Module

    Returns
    -------
    tensors : list of (tuple of str, torch.Tensor)
        Each tensor's names, and the tensor.
    """
    state = model.state_dict(keep_vars=True)
    packed = quantized_state(model)
    # the names of a quantized tensor, a tied head's among them, are saved
    # as its packed entries, once
    replaced = {_identity(k, state[k]) for k in state if k not in packed}
    groups = {}
    for key, t in packed.items():
        # one tensor by what the model holds (a tied alias is the same
        # buffer), its bytes as written (integer zero points held a byte
        # each are written at their tensor's bits)
        held = state.get(key, t)
        if key in state and _identity(key, held) in replaced:
            continue
        groups.setdefault(_identity(key, held), ([], t))[0].append(key)
    return [(tuple(keys), t) for keys, t in groups.values()]


def saved_nbytes(model):
    """Bytes of every tensor a save of ``model`` writes, headers aside.

    Parameters
    ----------
    model : torch.nn.Module

    Returns
    -------
    nbytes : int

    Examples
    --------
    >>> import torch
    >>> from kflats.torch.compression import saved_nbytes
    >>> saved_nbytes(torch.nn.Linear(8, 4))  # (8 x 4 + 4) float32
    144
    """
    return sum(t.numel() * t.element_size() for _, t in saved_tensors(model))


def _files(model, total):
    """How many weight files a save of ``model`` writes, at most."""
    st = sys.modules.get("sentence_transformers")
    if st is not None and isinstance(model, st.SentenceTransformer):
        files = sum(1 for child in model.children() if child.state_dict())
    else:
        files = 1
    if total > _SHARD:  # shards: each at most full, never under half on average
        files += 2 * math.ceil(total / _SHARD)
    return max(files, 1)


def size_asked(tensors, budget):
    """``(total, asked)``: the bytes of a model's tensors as they are
    (:func:`saved_tensors`; float32 for most), and the size a budget allows:
    a fraction of that total (a float), or a size in bytes (an int)."""
    total = sum(t.numel() * t.element_size() for _, t in tensors)
    asked = math.floor(budget * total) if isinstance(budget, float) else int(budget)
    return total, asked


class FolderBudget:
    """A budget in bytes as a size of the folder's weight files.

    Parameters
    ----------
    model : torch.nn.Module
        The model as it is before compression.
    names : list of str
        The selected modules.
    budget : float in (0, 1] or int
        A fraction of the bytes of every tensor the model's folder would
        hold uncompressed (:attr:`total`), or a size in bytes.
    digits : int, default=None
        Digits at which offsets are counted; ``None``: those of the size.

    Attributes
    ----------
    total : int
        Bytes of every tensor of the model as it is (float32 for most).
    asked : int
        The size the budget allows, in bytes, headers included.
    rest : int
        Bytes of the tensors outside the selected modules, kept as they are.
    frame : int
        Header bytes of those tensors and of every file's frame, at most.
    room : int
        What the selected modules' forms may take: tensors and their header
        entries (:meth:`priced`).
    """

    def __init__(self, model, names, budget, digits=None):
        tensors = saved_tensors(model)
        self.total, self.asked = size_asked(tensors, budget)
        self.digits = len(str(max(self.asked, 1))) if digits is None else digits
        self._model, self._names = model, list(names)
        self._named = dict(model.named_modules())
        selected = tuple(f"{n}." for n in names)
        rest = [
            (k, t) for k, t in tensors if not any(x.startswith(selected) for x in k)
        ]
        self.rest = sum(t.numel() * t.element_size() for _, t in rest)
        self.frame = _files(model, self.total) * _FRAME + sum(
            entry_nbytes(max(keys, key=len), t.dtype, t.shape, self.digits)
            for keys, t in rest
        )
        self.room = self.asked - self.rest - self.frame
        self._headers = {}

    def with_digits(self, digits):
        """The same budget, its offsets counted at ``digits`` digits."""
        return FolderBudget(self._model, self._names, self.asked, digits)

    def header(self, name, form):
        """Header bytes of module ``name`` stored in ``form``, at most."""
        key = (
            name,
            form.kind,
            form.bits,
            form.k,
            getattr(form, "zero_dtype", None),
            getattr(form, "compact", False),
        )
        if key not in self._headers:
            entries = _form_entries(name, self._named[name], form)
            self._headers[key] = sum(
                entry_nbytes(k, dtype, shape, self.digits)
                for k, dtype, shape in entries
            )
        return self._headers[key]

    def priced(self, name, form):
        """``form`` with its bytes in the folder: its tensors and header entries."""
        return form._replace(nbytes=form.nbytes + self.header(name, form))
