"""Layers that hold their quantized parameters packed, and the way between forms.

A quantized parameter has two forms in memory:

- float: the layer's parameter holds the dequantized values and the layer
  records the :class:`~kflats.quantize.QuantizedTensor` beside it
  (:func:`~kflats.quantize.quantize_module_`); what training and the heal
  need;
- packed: a :class:`PackedTensor` takes the parameter's place and the float
  copy is gone; reading the attribute dequantizes it (the layer's own
  forward runs unchanged), and a dense :class:`torch.nn.Embedding` reads
  only the rows it looks up. What :func:`~kflats.torch.load_compressed`
  gives by default.

Reading a packed attribute makes a new float tensor, the whole matrix (a
1536 x 384 weight at 3 bits: about 0.25 ms on one core, the time of a
float32 GEMM of 20 rows by it); the layers read each once per forward.

:func:`pack_quantized_` goes from the first to the second,
:func:`unpack_quantized_` back. Reading the attribute is a property of a
subclass made for the layer's class (its name, module and behaviour kept,
like :mod:`torch.nn.utils.parametrize` does; copies and pickles name the
base class), so ``isinstance`` checks and code written for the layer still
hold. A layer's record of a packed parameter is read from the buffers,
never copied.
"""

from collections.abc import Mapping

import torch
from torch import nn
from torch.nn.utils import parametrize

from kflats.torch.layers._packed_tensor import PackedTensor
from kflats.torch.layers._quantized_state import QUANTIZED_RECORD, _owner

__all__ = ["is_packed", "pack_quantized_", "unpack_quantized_"]

_CLASSES = {}


def _reader(name):
    def read(self):
        packed = self._modules.get(name)
        if not isinstance(packed, PackedTensor):
            # not packed (any more): nn.Module.__getattr__ answers
            raise AttributeError(name)
        return packed.forward()

    return property(read, doc=f"``{name}``, dequantized from its packed codes.")


def _embedding_forward(self, input):
    """A lookup that dequantizes the rows it reads, not the table."""
    packed = self._modules.get("weight")
    if not isinstance(packed, PackedTensor) or self.max_norm is not None:
        return nn.Embedding.forward(self, input)
    return packed.rows(input.reshape(-1)).reshape(*input.shape, packed.shape[1])


def _new(base, names):
    """An empty instance of the packed subclass (what a copy or a pickle fills)."""
    cls = _packed_class(base, names)
    return cls.__new__(cls)


def _reduce_ex(self, protocol):
    # the subclass is made at run time: a copy or a pickle names its base
    cls = type(self)
    state = self.__getstate__()
    return _new, (cls._kflats_unpacked_class, cls._kflats_packed_names), state


def _packed_class(base, names):
    """The subclass of ``base`` whose attributes ``names`` read packed tensors."""
    key = (base, names)
    cls = _CLASSES.get(key)
    if cls is None:
        attrs = {name: _reader(name) for name in names}
        attrs.update(
            __module__=base.__module__,
            __qualname__=base.__qualname__,
            __reduce_ex__=_reduce_ex,
            _kflats_unpacked_class=base,
            _kflats_packed_names=names,
        )
        if (
            names == {"weight"}
            and getattr(base, "forward", None) is nn.Embedding.forward
        ):
            attrs["forward"] = _embedding_forward
        cls = _CLASSES[key] = type(base.__name__, (base,), attrs)
    return cls


def _put(owner, attr, value):
    """``value`` (a PackedTensor or a Parameter) in ``owner.attr``, its class set.

    A parameter given back takes its first place among the owner's
    parameters again (their order is the state dict's and an optimizer's).
    """
    cls = type(owner)
    base = getattr(cls, "_kflats_unpacked_class", cls)
    names = set(getattr(cls, "_kflats_packed_names", ()))
    order = owner.__dict__.setdefault(
        "_kflats_parameter_order", list(owner._parameters)
    )
    owner._parameters.pop(attr, None)
    owner._modules.pop(attr, None)
    if isinstance(value, PackedTensor):
        owner._modules[attr] = value
        names.add(attr)
    else:
        owner._parameters[attr] = value
        names.discard(attr)
        place = {name: i for i, name in enumerate(order)}
        entries = sorted(
            owner._parameters.items(), key=lambda item: place.get(item[0], len(place))
        )
        owner._parameters.clear()
        owner._parameters.update(entries)
    if isinstance(owner, nn.ParameterList):  # its packed entries in index order
        entries = sorted(owner._modules.items(), key=lambda item: int(item[0]))
        owner._modules.clear()
        owner._modules.update(entries)
    owner.__class__ = _packed_class(base, frozenset(names)) if names else base


def _split(sub, name):
    """(the module owning ``name`` in ``sub``, its last attribute name)."""
    parts = name.split(".")
    owner = sub.get_submodule(".".join(parts[:-1])) if len(parts) > 1 else sub
    return owner, parts[-1]


def _holders(root, value):
    """Every (module, attribute) of ``root`` that holds ``value`` (tied weights)."""
    return [
        (module, attr)
        for module in root.modules()
        for store in (module._parameters, module._modules)
        for attr, held in list(store.items())
        if held is value
    ]


class _PackedRecord(Mapping):
    """The record of a packed layer: its QuantizedTensors, read from the buffers."""

    def __init__(self, layer, names):
        self._layer = layer
        self._names = tuple(names)

    def __getitem__(self, name):
        if name not in self._names:
            raise KeyError(name)
        owner, attr = _split(self._layer, name)
        return owner._modules[attr].quantized_tensor()

    def __iter__(self):
        return iter(self._names)

    def __len__(self):
        return len(self._names)

    def __repr__(self):
        return f"<packed record of {', '.join(self._names)}>"


def is_packed(module):
    """Whether a layer holds quantized parameters packed (by :func:`pack_quantized_`).

    Parameters
    ----------
    module : torch.nn.Module

    Returns
    -------
    bool
        True when a parameter the layer records as quantized is held as
        its codes (its record is then read from them).
    """
    return isinstance(getattr(module, QUANTIZED_RECORD, None), _PackedRecord)


def pack_quantized_(module, tensors=None):
    """Hold quantized parameters as their codes, scales and zero points.

    Each parameter is replaced, in every module of ``module`` that holds it
    (a tied head and its table), by a :class:`PackedTensor`: the layer's
    float copy is dropped, reading the attribute dequantizes it, and the
    state dict holds the packed tensors under the names a saved folder
    uses (``weight.codes``, ``weight.scales``, ...). Outputs are unchanged,
    bit for bit; the layer no longer trains (:func:`unpack_quantized_`).

    Parameters
    ----------
    module : torch.nn.Module
    tensors : dict of str to QuantizedTensor, default=None
        By qualified parameter name; their arrays are shared, not copied.
        ``None``: the tensors the module's layers record
        (:func:`~kflats.quantize.quantize_module_`). Given, the parameters'
        values are not read (a model being loaded).

    Returns
    -------
    module

    Examples
    --------
    >>> import torch
    >>> from kflats.quantize import quantize_module_
    >>> from kflats.torch.layers import pack_quantized_, unpack_quantized_
    >>> model = torch.nn.Sequential(torch.nn.Linear(64, 8))
    >>> _ = quantize_module_(model[0], bits=4, group_size=32, method="rtn")
    >>> x = torch.randn(3, 64)
    >>> before = model(x)
    >>> _ = pack_quantized_(model)
    >>> sorted(model.state_dict())
    ['0.bias', '0.weight.codes', '0.weight.meta', '0.weight.scales', '0.weight.zeros']
    >>> torch.equal(model(x), before), isinstance(model[0], torch.nn.Linear)
    (True, True)
    >>> torch.equal(unpack_quantized_(model)(x), before)
    True
    """
    if tensors is None:
        tensors = {}
        for prefix, sub in module.named_modules():
            record = getattr(sub, QUANTIZED_RECORD, None)
            if record and not isinstance(record, _PackedRecord):
                for name, qt in record.items():
                    tensors[f"{prefix}.{name}" if prefix else name] = qt
    by_layer = {}
    for full, qt in tensors.items():
        owner, _, name = _owner(module, full)
        by_layer.setdefault(owner, {})[name] = qt
    for owner, found in by_layer.items():
        layer = module.get_submodule(owner)
        for name, qt in found.items():
            holder, attr = _split(layer, name)
            if parametrize.is_parametrized(holder, attr):
                raise ValueError(
                    f"{owner + '.' if owner else ''}{name} trains through the "
                    "rounding (straight-through); call requantize_ first"
                )
            value = holder._parameters.get(attr)
            if value is None:
                raise ValueError(f"{owner}.{name} is not a float parameter")
            packed = PackedTensor.from_quantized(
                qt, dtype=value.dtype, device=value.device
            )
            for tied, tied_attr in _holders(module, value):
                _put(tied, tied_attr, packed)
        record = getattr(layer, QUANTIZED_RECORD, None)
        held = list(record) if isinstance(record, _PackedRecord) else []
        names = dict.fromkeys([*held, *found])
        layer.__dict__[QUANTIZED_RECORD] = _PackedRecord(layer, names)
        if hasattr(layer, "_packed_cache"):
            layer._packed_cache.clear()  # its float copies of the factors
    return module


def unpack_quantized_(module):
    """Hold packed quantized parameters as floats again, for training.

    The inverse of :func:`pack_quantized_`: each :class:`PackedTensor` gives
    way to a float parameter holding its dequantized values (in every module
    that shares it), and the layer records the
    :class:`~kflats.quantize.QuantizedTensor` beside it, as
    :func:`~kflats.quantize.quantize_module_` leaves a layer.

    Parameters
    ----------
    module : torch.nn.Module

    Returns
    -------
    module
    """
    for _, layer in list(module.named_modules()):
        record = getattr(layer, QUANTIZED_RECORD, None)
        if not isinstance(record, _PackedRecord):
            continue
        tensors = dict(record.items())
        for name in tensors:
            holder, attr = _split(layer, name)
            packed = holder._modules[attr]
            with torch.no_grad():
                value = nn.Parameter(packed())
            for tied, tied_attr in _holders(module, packed):
                _put(tied, tied_attr, value)
        layer.__dict__[QUANTIZED_RECORD] = tensors
    return module
