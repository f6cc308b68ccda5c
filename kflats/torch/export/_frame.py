"""The bytes of an ONNX export known before fitting: the frame, each module's graph.

:func:`~kflats.torch.export.export_onnx` slots every module whose ONNX form
kflats writes itself (:func:`~._slots.slot_modules_`: every untied Linear
and Embedding, float, quantized or projective), and builds each one's
graph from the module's form alone (:mod:`._layers`), inside a frame that
torch's exporter traces (attention, norms, the other float tensors). So
the model file's bytes are the frame's, plus each module's graph (its
nodes and initializers), plus what the longer names of its output cost the
nodes that read it:

- :func:`onnx_frame` traces a model as the export does, the slots taken
  out, and measures what is left;
- :func:`module_graph_nbytes` measures one module's graph in a form.

``CompressionConfig(format="onnx")`` prices each form of a module with
them, before anything is fitted (:mod:`kflats.torch.compression._onnx_bytes`).
"""

from dataclasses import dataclass

import torch
from torch import nn

from kflats.torch.export._graph import MS_DOMAIN, Pieces
from kflats.torch.export._layers import build_module
from kflats.torch.export._onnx import (
    _OUTPUTS,
    OPSET,
    _eager,
    _example,
    _input_names,
    _needs_onnx,
    _trace,
    _Traced,
)
from kflats.torch.export._slots import DOMAIN, slot_modules_, unslot_

__all__ = ["ModuleGraph", "OnnxFrame", "SlotUse", "module_graph_nbytes", "onnx_frame"]


@dataclass(frozen=True)
class SlotUse:
    """Where a slotted module sits in the traced graph.

    Attributes
    ----------
    input, output : str
        The names of its input and of the slot's output in the graph.
    reads : int
        How many node inputs read the slot's output.
    graph_output : bool
        Whether the slot's output is the model's output.
    """

    input: str
    output: str
    reads: int
    graph_output: bool


@dataclass(frozen=True)
class OnnxFrame:
    """An ONNX export's model file, its slotted modules taken out.

    Attributes
    ----------
    nbytes : int
        Bytes of the model file without the slotted modules' graphs.
    data : int
        Of which the initializers' data.
    prefix : str
        The transformer's qualified name in the model, with a trailing dot
        (``"0.model."`` for a sentence-transformers model; ``""``).
    slots : dict of str to SlotUse
        Each slotted module, by its qualified name in the transformer.
    unused : frozenset of str
        The slotted modules the output does not read (a pooler under the
        hidden states): the file holds nothing of them.
    """

    nbytes: int
    data: int
    prefix: str
    slots: dict
    unused: frozenset = frozenset()


@dataclass(frozen=True)
class ModuleGraph:
    """One module's graph in an ONNX export.

    Attributes
    ----------
    nbytes : int
        Its nodes and initializers in the model file.
    data : int
        Of which the initializers' data.
    output : str
        The name of its output.
    parts : int
        Its nodes and initializers.
    """

    nbytes: int
    data: int
    output: str
    parts: int


def transformer_of(model):
    """The transformers model an export traces, and its qualified name's prefix.

    The model itself (a transformers model), or the first transformer of a
    sentence-transformers model (``"0.model."``, its ``auto_model``).
    """
    from transformers import PreTrainedModel

    if isinstance(model, PreTrainedModel):
        return model, ""
    for child in model.children():
        auto = getattr(child, "auto_model", None)
        if isinstance(auto, PreTrainedModel):
            path = next(n for n, m in model.named_modules() if m is auto)
            return auto, f"{path}."
    raise ValueError(
        f"{type(model).__name__} is neither a transformers nor a "
        "sentence-transformers model; kflats export writes those text encoders"
    )


def _restore_attention(hf, attention):
    """Put back the attention implementation :func:`._onnx._eager` changed."""
    if attention is None or hf.config._attn_implementation == attention:
        return
    setter = getattr(hf, "set_attn_implementation", None)
    try:
        setter(attention)
    except (TypeError, ValueError, AttributeError):  # pragma: no cover - older ones
        hf.config._attn_implementation = attention


def _data_nbytes(tensor):
    from onnx import numpy_helper

    if tensor.HasField("raw_data"):
        return len(tensor.raw_data)
    return numpy_helper.to_array(tensor).nbytes


def onnx_frame(model):
    """Trace ``model`` as :func:`export_onnx` does and measure the frame.

    The model is left as it was (its modules put back, its attention
    implementation restored, its training mode kept).

    Parameters
    ----------
    model : torch.nn.Module
        A transformers or sentence-transformers text encoder.

    Returns
    -------
    OnnxFrame
    """
    from onnx import helper, version_converter

    from kflats import __version__
    from kflats.torch.io import hushed

    _needs_onnx()
    hf, prefix = transformer_of(model)
    names = _input_names(hf)
    inputs = _example(hf, names)
    training = hf.training
    attention = getattr(hf.config, "_attn_implementation", None)
    hf.eval()
    with torch.no_grad():
        outputs = hf(**dict(zip(names, inputs, strict=True)), return_dict=True)
    output = next((name for name in _OUTPUTS if name in outputs), None)
    if output is None:
        raise ValueError(
            f"{type(hf).__name__} gives neither of {_OUTPUTS}; kflats export writes "
            "text encoders and their heads"
        )
    slots = slot_modules_(hf)
    try:
        with hushed():
            _eager(hf)
            traced = _Traced(hf, names, output).eval()
            proto = _trace(traced, names, inputs, outputs[output].ndim)
    finally:
        unslot_(hf, slots)
        _restore_attention(hf, attention)
        hf.train(training)
    proto = version_converter.convert_version(proto, OPSET)
    graph = proto.graph
    kept, found = [], {}
    for node in graph.node:
        if node.domain == DOMAIN:
            (key,) = [a.s.decode() for a in node.attribute if a.name == "key"]
            found[key] = (node.input[0], node.output[0])
        else:
            kept.append(node)
    read = [name for node in kept for name in node.input]
    outputs = {o.name for o in graph.output}
    uses = {
        key: SlotUse(x, y, read.count(y), y in outputs) for key, (x, y) in found.items()
    }
    del graph.node[:]
    graph.node.extend(kept)
    del graph.value_info[:]
    imports = [o for o in proto.opset_import if o.domain not in (DOMAIN, MS_DOMAIN)]
    del proto.opset_import[:]
    proto.opset_import.extend(imports)
    proto.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    proto.producer_name, proto.producer_version = "kflats", __version__
    data = sum(_data_nbytes(t) for t in graph.initializer)
    unused = frozenset(slots) - set(uses)
    return OnnxFrame(proto.ByteSize(), data, prefix, uses, unused)


def module_graph_nbytes(name, module, tensors, x, accuracy_level=0):
    """The bytes of one slotted module's graph, as the export builds it.

    Parameters
    ----------
    name : str
        The module's qualified name in the transformer (the slot's key).
    module : torch.nn.Module
    tensors : dict of str to QuantizedTensor
        Its quantized tensors, by name within it.
    x : str
        The name of its input in the graph (:attr:`SlotUse.input`).
    accuracy_level : int, default=0

    Returns
    -------
    ModuleGraph
    """
    from onnx import helper

    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module)}")
    pieces = Pieces(accuracy_level)
    pieces.reserve([x])
    output = build_module(pieces, x, name, module, tensors, {name: (module, tensors)})
    graph = helper.make_graph(pieces.nodes, "", [], [], initializer=pieces.initializers)
    empty = helper.make_graph([], "", [], [])
    return ModuleGraph(
        graph.ByteSize() - empty.ByteSize(),
        sum(_data_nbytes(t) for t in pieces.initializers),
        output,
        len(pieces.nodes) + len(pieces.initializers),
    )
