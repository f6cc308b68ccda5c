"""A budget in bytes as a size of the ONNX model file that kflats export writes.

With ``CompressionConfig(format="onnx")`` the size asked bounds
``onnx/model.onnx`` (:func:`kflats.torch.export.export_onnx`), whose bytes
are a frame plus one graph per slotted module
(:mod:`kflats.torch.export._frame`). :class:`OnnxBudget` measures them
before anything is fitted:

- the frame, from a trace of the model as the export makes it (the
  attention, norms and other float tensors; the model is left as it was);
- every slotted module outside the selection, in its form as it is;
- each form of a selected module: the graph of a stand-in in that form
  (the module's own shapes, at the form's bits and groups and a small
  rank), built by the export's own code and measured, plus the data that
  grows with the rank, counted from the form (its codes, scales and zero
  points as the operators pack them: :func:`_rank_bytes`), plus what the
  longer name of its output costs the nodes that read it, plus a margin
  for the lengths of numbers and names that the stand-in may write
  shorter (:data:`_SLACK`).

So a form's price is at least its bytes in the file, and a plan within the
size asked writes a file within it (a test checks it over sizes and models).
Measured on all-MiniLM-L6-v2: the frame 1.2 MB (position and token-type
tables, norms, biases: 1.0 MB of data), a graph's nodes and names a few
hundred bytes to 2 KB per module.
"""

import math

import numpy as np
import torch
from torch import nn

from kflats.torch.compression._folder_bytes import saved_tensors, size_asked
from kflats.torch.export._frame import module_graph_nbytes, onnx_frame, transformer_of
from kflats.torch.layers import (
    ProjectiveEmbedding,
    ProjectiveLinear,
    label_dtype,
    quantize_module_,
    quantized_tensors,
    rank_group_size,
)

# bytes per node and initializer of a graph for what the stand-in may write
# shorter (a dimension or a length past 127 or 16383, a name's suffix), per
# node input renamed, and for the model's own length prefixes
_SLACK, _SLACK_READ, _SLACK_FILE = 8, 2, 16
_SCALE_BYTES = 2  # scales stored float16, as the forms quantize them


def _nbits(lines, length, group, bits):
    """Data bytes of a MatMulNBits or GatherBlockQuantized matrix (asymmetric).

    ``lines`` packed lines of ``length`` codes, one float16 scale and one
    zero point (packed at ``bits`` along the line) per group.
    """
    groups = length // group
    return lines * (
        math.ceil(length * bits / 8)
        + groups * _SCALE_BYTES
        + math.ceil(groups * bits / 8)
    )


def _rank_bytes(module, form, standin=None):
    """The data of a projective form that grows with its rank, in bytes at most;
    with ``standin``, that of the form's stand-in (:func:`_standin`) at that rank.

    k = 1 factors (a Linear's: output side; an Embedding's): the bases
    ``rank x d`` and the coefficients ``rows x rank``, float32 or packed at
    ``form.bits``. Factors with k > 1 clusters of an Embedding (float32):
    each cluster's coefficients and a row of zeros, and the bases: the
    form's bytes without its cluster ids, and ``4 R`` for the rows of zeros
    (``R`` the sum of the ranks, at most ``k d`` and ``form.nbytes / 4d``).
    """
    rows, d = (
        (module.out_features, module.in_features)
        if isinstance(module, nn.Linear)
        else (module.num_embeddings, module.embedding_dim)
    )
    rank = form.rank if standin is None else standin
    if form.k > 1:
        if standin is not None:  # rank ``standin`` in each cluster
            return 4 * standin * (rows + form.k) + 4 * standin * form.k * d
        ids = rows * torch.empty((), dtype=label_dtype(form.k)).element_size()
        total = min(form.k * d, form.nbytes // (4 * d))
        return form.nbytes - ids + 4 * total
    if form.bits is None:
        return 4 * rank * (rows + d)
    g = form.group_size
    coefficients = _nbits(rows, rank, rank_group_size(rank, g), form.bits)
    if isinstance(module, nn.Embedding):  # bases dequantized when the session
        # starts: packed codes, a float16 scale and a uint8 zero point a group
        groups = rank * (d // g)
        return coefficients + math.ceil(rank * d * form.bits / 8) + 3 * groups
    return _nbits(rank, d, g, form.bits) + coefficients


def _standin(module, form):
    """A module of the same shapes in ``form`` (at a small rank), its quantized
    tensors, and the rank it takes (``None``: the form itself)."""
    from kflats.quantize import quantize

    if form.kind == "float":
        return module, {}, None
    if form.kind == "dense":
        zeros = np.zeros(tuple(module.weight.shape), np.float32)
        return module, {"weight": quantize(zeros, form.bits, form.group_size)}, None
    linear = isinstance(module, nn.Linear)
    rank = 1 if form.bits is None else form.group_size
    if linear:
        if form.k != 1:
            raise ValueError("format='onnx' counts the k = 1 factors of a Linear")
        layer = ProjectiveLinear(
            module.in_features,
            module.out_features,
            (rank,),
            side="output",
            bias=module.bias is not None,
        )
    else:
        n, k = module.num_embeddings, form.k
        labels = None if k == 1 else np.arange(n) % k
        layer = ProjectiveEmbedding(n, module.embedding_dim, (rank,) * k, labels)
    if form.bits is not None:
        quantize_module_(layer, form.bits, form.group_size, method="rtn")
    return layer, quantized_tensors(layer), rank


class OnnxBudget:
    """A budget in bytes as a size of the ONNX model file, with the prices of forms.

    The same interface as :class:`~._folder_bytes.FolderBudget`.

    Parameters
    ----------
    model : torch.nn.Module
        The model as it is before compression: a transformers or
        sentence-transformers text encoder.
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
        Data of the frame and of the slotted modules outside the selection.
    frame : int
        Their nodes, names and the file's own bytes, at most.
    room : int
        What the selected modules' graphs may take.
    """

    describes = "the ONNX model file"

    def __init__(self, model, names, budget):
        self.total, self.asked = size_asked(saved_tensors(model), budget)
        self.digits = len(str(max(self.asked, 1)))
        hf, self._frame = transformer_of(model)[0], onnx_frame(model)
        prefix = self._frame.prefix
        self._named = dict(model.named_modules())
        self._keys = {}
        for name in names:
            key = name.removeprefix(prefix) if name.startswith(prefix) else None
            if key in self._frame.unused:
                self._keys[name] = None  # not in the file, in any form
                continue
            if key not in self._frame.slots:
                raise ValueError(
                    f"format='onnx': {name!r} is not a module the ONNX export "
                    "writes on its own (outside the transformer, or sharing its "
                    "weight with another module, a tied head); select the "
                    "transformer's untied Linear and Embedding modules"
                )
            self._keys[name] = key
        selected = set(self._keys.values())
        frame = self._frame
        self.rest, self.frame = frame.data, frame.nbytes - frame.data + _SLACK_FILE
        for key, use in self._frame.slots.items():
            if key in selected:
                continue
            module = hf.get_submodule(key)
            graph = module_graph_nbytes(
                key, module, quantized_tensors(module), use.input
            )
            self.rest += graph.data
            self.frame += graph.nbytes - graph.data + self._around(use, graph)
        self.room = self.asked - self.rest - self.frame
        self._fixed, self._folder = {}, {}

    def with_digits(self, digits):
        """The same budget (an ONNX file has no offsets to count)."""
        return self

    @staticmethod
    def _around(use, graph):
        """Bytes a module's graph costs beyond its own: longer names read by
        the next nodes, the Identity giving the model's output, the margin."""
        longer = max(0, len(graph.output) - len(use.output)) + _SLACK_READ
        extra = use.reads * longer + _SLACK * graph.parts
        if use.graph_output:
            extra += len(graph.output) + len(use.output) + 3 * _SLACK
        return extra

    def nbytes(self, name, form):
        """Bytes of module ``name``'s graph in ``form`` in the model file, at most."""
        if self._keys[name] is None:
            return 0
        key = (name, form.kind, form.bits, form.group_size, form.k)
        if key not in self._fixed:
            slot = self._keys[name]
            module = self._named[name]
            standin, tensors, rank = _standin(module, form)
            use = self._frame.slots[slot]
            graph = module_graph_nbytes(slot, standin, tensors, use.input)
            grown = 0 if rank is None else _rank_bytes(module, form, rank)
            self._fixed[key] = graph.nbytes - grown + self._around(use, graph)
        if form.kind != "projective":
            return self._fixed[key]
        return self._fixed[key] + _rank_bytes(self._named[name], form)

    def header(self, name, form):
        """What ``form`` costs in the file beyond its tensors in the folder
        (its ``nbytes`` before :meth:`priced`): it may be negative."""
        folder = self._folder.get((name, form), form.nbytes)
        return self.nbytes(name, form) - folder

    def priced(self, name, form):
        """``form`` with its bytes in the ONNX model file."""
        out = form._replace(nbytes=self.nbytes(name, form))
        self._folder[name, out] = form.nbytes
        return out
