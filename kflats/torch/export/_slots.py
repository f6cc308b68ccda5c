"""Slots: the modules whose ONNX form kflats writes itself, marked in the trace.

torch's exporter turns a model into ONNX operators, but it knows nothing of
a quantized weight's codes (it would write the dequantized floats) nor of a
projective layer's factors (it would write the packed products). Before the
trace, each such module is swapped for a :class:`Slot`: in the traced graph
it is one node ``kflats.export::Slot`` (its ``key`` attribute names the
module), which the export then replaces by the operators it builds from the
module's own tensors (:mod:`kflats.torch.export._layers`). Its forward runs
the module it stands for, outside the trace, so that the rest of the model
is traced on the values it computes.
"""

import contextlib

import torch
from torch import nn

from kflats.torch.layers import (
    ProjectiveEmbedding,
    ProjectiveLinear,
    ProjectiveTiedHead,
    SharedEmbedding,
    quantized_tensors,
)

__all__ = ["DOMAIN", "SLOT", "Slot", "slot_modules_", "unslot_"]

DOMAIN = "kflats.export"
SLOT = "Slot"
_SLOTTED = (ProjectiveEmbedding, ProjectiveLinear, ProjectiveTiedHead)


@contextlib.contextmanager
def _untraced():
    """The tracer paused: what runs here is not recorded in the graph."""
    state = torch._C._get_tracing_state()
    torch._C._set_tracing_state(None)
    try:
        yield
    finally:
        torch._C._set_tracing_state(state)


class _SlotFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, key, slot):
        with _untraced(), torch.no_grad():
            output = slot.module(input)
        slot.width = int(output.shape[-1])
        return output

    @staticmethod
    def symbolic(g, input, key, slot):
        output = g.op(f"{DOMAIN}::{SLOT}", input, key_s=key)
        # the output's shape as the trace reads it: the input's (ids), or its
        # own last dimension in place of the input's (features), so that
        # what the exporter folds from it is right
        sizes = list(input.type().varyingSizes() or [])
        if input.type().scalarType() not in ("Long", "Int"):
            sizes = sizes[:-1]
        output.setType(
            input.type().with_dtype(torch.float32).with_sizes([*sizes, slot.width])
        )
        return output


class Slot(nn.Module):
    """A module's place in the traced graph: one node that names the module.

    Parameters
    ----------
    key : str
        The module's qualified name in the model.
    module : torch.nn.Module
        The module it stands for (held as a plain attribute, so that its
        tensors are not traced as the model's parameters).
    """

    def __init__(self, key, module):
        super().__init__()
        self.key = key
        self.width = None
        object.__setattr__(self, "module", module)

    @property
    def weight(self):
        """The module's weight (code that reads ``.weight.dtype`` still works)."""
        return self.module.weight

    def forward(self, input):
        return _SlotFunction.apply(input, self.key, self)


def _plain(module):
    """A float Linear or Embedding that kflats writes as torch's exporter would."""
    if type(module) is nn.Linear:
        return True
    return type(module) is nn.Embedding and module.max_norm is None


def unslot_(model, slots):
    """Put back the modules :func:`slot_modules_` swapped out."""
    for name, (module, _) in slots.items():
        parent, child = _parent(model, name)
        setattr(parent, child, module)


def _parent(model, name):
    parent, _, child = name.rpartition(".")
    return model.get_submodule(parent), child


def _shared_weights(model):
    """The ids of the weights that several modules of the model hold (ties)."""
    seen, shared = set(), set()
    for module in model.modules():
        weight = getattr(module, "_parameters", {}).get("weight")
        if weight is None:
            continue
        if id(weight) in seen:
            shared.add(id(weight))
        seen.add(id(weight))
    return shared


def slot_modules_(model):
    """Swap every module whose ONNX form kflats writes for a :class:`Slot`.

    Those are the projective layers (embeddings, linears, tied heads), an
    embedding shared with one of them (T5's), the Linear and Embedding
    layers holding a quantized weight, and every other
    :class:`torch.nn.Linear` and :class:`torch.nn.Embedding` (of those
    exact types) whose weight no other module holds: so that the ONNX
    model's bytes are a frame (what the exporter traces) and one graph per
    such module, each known from the module's form alone (what
    ``CompressionConfig(format="onnx")`` counts before fitting).

    Parameters
    ----------
    model : torch.nn.Module
        Modified in place.

    Returns
    -------
    modules : dict of str to torch.nn.Module
        The swapped-out modules by qualified name, each with its quantized
        tensors (:func:`~kflats.torch.layers.quantized_tensors`) as
        ``(module, tensors)``.
    """
    quantized = quantized_tensors(model)
    shared = _shared_weights(model)
    chosen = {}
    for name, module in model.named_modules():
        if not name:
            continue
        if isinstance(module, (*_SLOTTED, SharedEmbedding)):
            chosen[name] = module
        elif isinstance(module, (nn.Linear, nn.Embedding)) and (
            f"{name}.weight" in quantized
        ):
            chosen[name] = module
        elif _plain(module) and id(module.weight) not in shared:
            chosen[name] = module
    # a slot's own submodules (a projective layer holds none that matter)
    # are left inside it
    top = {
        n: m
        for n, m in chosen.items()
        if not any(n.startswith(f"{o}.") for o in chosen if o != n)
    }
    out = {}
    for name, module in top.items():
        tensors = {
            key[len(name) + 1 :]: qt
            for key, qt in quantized.items()
            if key.startswith(f"{name}.")
        }
        out[name] = (module, tensors)
        parent, child = _parent(model, name)
        setattr(parent, child, Slot(name, module))
    return out
