"""The record of a layer's quantized tensors, and state dicts holding them packed.

:func:`~kflats.quantize.quantize_module_` sets each quantized parameter to
its dequantized values and records its
:class:`~kflats.quantize.QuantizedTensor` on the layer; a save writes the
records as packed codes and scales (:func:`quantized_state`), a load reads
them back (:func:`split_quantized_state`, :func:`dequantized_state`) and
records them again (:func:`record_quantized_`). A layer holding its
quantized parameters packed (:func:`~kflats.torch.layers.pack_quantized_`)
records them as a view of its codes, and its state dict is already packed.
"""

import numpy as np
import torch
from torch import nn

from kflats.quantize._tensor import QuantizedTensor
from kflats.torch.layers._dense import is_conv1d
from kflats.torch.layers._embedding import ProjectiveEmbedding
from kflats.torch.layers._linear import ProjectiveLinear

__all__ = [
    "dequantized_state",
    "quantized_state",
    "quantized_tensors",
    "record_quantized_",
    "split_quantized_state",
    "state_nbytes",
]

QUANTIZED_RECORD = "_kflats_quantized"
_KEYS = ("codes", "scales", "scale_codes", "scale_exponents", "zeros", "meta")


def _np(t):
    return t.detach().cpu().to(torch.float64).numpy()


def _param(module, name):
    return module.get_parameter(name)


def _assign(module, tensors):
    """Set the parameters to the dequantized values and record the tensors."""
    with torch.no_grad():
        for name, qt in tensors.items():
            p = _param(module, name)
            p.copy_(torch.from_numpy(qt.dequantize()).to(p.dtype))
    setattr(module, QUANTIZED_RECORD, dict(tensors))


def quantized_tensors(module):
    """The :class:`~kflats.quantize.QuantizedTensor` of each quantized parameter.

    Parameters
    ----------
    module : torch.nn.Module

    Returns
    -------
    tensors : dict of str to QuantizedTensor
        Keyed by qualified parameter name (``"0.weight"`` in a Sequential,
        ``"bases"``, ``"coefficients.2"``); empty when nothing is quantized.
    """
    out = {}
    for prefix, sub in module.named_modules():
        for name, qt in getattr(sub, QUANTIZED_RECORD, {}).items():
            out[f"{prefix}.{name}" if prefix else name] = qt
    return out


def record_quantized_(module, tensors):
    """Record quantized tensors on a module's layers, e.g. after a load.

    Parameters
    ----------
    module : torch.nn.Module
    tensors : dict of str to QuantizedTensor
        Keyed by qualified parameter name, as :func:`split_quantized_state`
        returns them. Each parameter must already hold the dequantized
        values (checked, bit for bit).

    Returns
    -------
    module
    """
    by_module = {}
    for full, qt in tensors.items():
        p = module.get_parameter(full)
        if tuple(p.shape) != qt.shape or not torch.equal(
            p.detach().cpu(), torch.from_numpy(qt.dequantize()).to(p.dtype)
        ):
            raise ValueError(f"parameter {full!r} does not hold its dequantized values")
        owner, _, name = _owner(module, full)
        by_module.setdefault(owner, {})[name] = qt
    for owner, found in by_module.items():
        sub = module.get_submodule(owner)
        setattr(sub, QUANTIZED_RECORD, {**getattr(sub, QUANTIZED_RECORD, {}), **found})
    return module


def _owner(module, full):
    """(qualified module name, '', parameter name within it) of a parameter."""
    parts = full.split(".")
    for cut in range(len(parts) - 1, -1, -1):
        owner = ".".join(parts[:cut])
        try:
            sub = module.get_submodule(owner)
        except AttributeError:
            continue
        if isinstance(
            sub, (ProjectiveEmbedding, ProjectiveLinear, nn.Linear, nn.Embedding)
        ) or is_conv1d(sub):
            return owner, "", ".".join(parts[cut:])
    raise ValueError(f"{full!r} is not a parameter of a quantizable layer")


def quantized_state(module):
    """The module's state dict with quantized parameters as packed tensors.

    Each quantized parameter ``name`` is replaced by ``name.codes`` (uint8),
    ``name.scales``, ``name.zeros`` (absent for a symmetric grid) and
    ``name.meta`` (int64); every other entry is the state dict's own.

    Parameters
    ----------
    module : torch.nn.Module

    Returns
    -------
    state : dict of str to torch.Tensor
        Ready for :func:`safetensors.torch.save_file`.

    Examples
    --------
    >>> import torch
    >>> from kflats.quantize import quantize_module_, quantized_state, dequantized_state
    >>> model = torch.nn.Sequential(torch.nn.Linear(32, 4))
    >>> _ = quantize_module_(model[0], bits=3, group_size=16)
    >>> sorted(quantized_state(model))
    ['0.bias', '0.weight.codes', '0.weight.meta', '0.weight.scales', '0.weight.zeros']
    >>> restored = dequantized_state(quantized_state(model))
    >>> torch.equal(restored["0.weight"], model[0].weight)
    True
    """
    state = dict(module.state_dict())
    for full, qt in quantized_tensors(module).items():
        packed = qt.to_state(full + ".")
        if full in state:
            del state[full]
        elif f"{full}.codes" in state:  # held packed: its entries as stored
            for key in _KEYS:  # (compact scales held as float16 scales)
                state.pop(f"{full}.{key}", None)
        else:
            raise ValueError(
                f"{full!r} is recorded as quantized but is not in the state "
                "dict (still parametrized for training? call requantize_ first)"
            )
        for key, value in packed.items():
            state[key] = torch.from_numpy(np.ascontiguousarray(value))
    return state


def split_quantized_state(state):
    """Separate packed entries from the others, validating them.

    Parameters
    ----------
    state : mapping of str to tensor
        As :func:`quantized_state` wrote it (e.g. read from a safetensors
        file: untrusted input, each entry checked).

    Returns
    -------
    rest : dict of str to tensor
        The entries that are not packed.
    tensors : dict of str to QuantizedTensor
        Keyed by parameter name.
    """
    bases = sorted(
        k[: -len(".meta")]
        for k in state
        if k.endswith(".meta") and k[: -len(".meta")] + ".codes" in state
    )
    tensors, used = {}, set()
    for base in bases:
        sub = {k: state[f"{base}.{k}"] for k in _KEYS if f"{base}.{k}" in state}
        tensors[base] = QuantizedTensor.from_state(sub, "")
        used.update(f"{base}.{k}" for k in sub)
    rest = {k: v for k, v in state.items() if k not in used}
    return rest, tensors


def dequantized_state(state):
    """The plain state dict of a :func:`quantized_state`: packed entries dequantized.

    Parameters
    ----------
    state : mapping of str to tensor

    Returns
    -------
    state : dict of str to torch.Tensor
        Each packed parameter as a float32 tensor, bit-identical to the
        values the quantized module held.
    """
    rest, tensors = split_quantized_state(state)
    for name, qt in tensors.items():
        rest[name] = torch.from_numpy(qt.dequantize())
    return rest


def state_nbytes(state):
    """Bytes of the tensors of a state dict (what a safetensors file holds).

    Parameters
    ----------
    state : mapping of str to torch.Tensor

    Returns
    -------
    nbytes : int
    """
    return int(sum(t.numel() * t.element_size() for t in state.values()))
