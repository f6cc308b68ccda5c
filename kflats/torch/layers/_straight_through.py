"""Training through the rounding: straight-through parametrizations, requantizing.

The heal trains a quantized model's latent floats: each recorded parameter
is seen rounded to its grid on the forward, and the gradient passes through
the rounding as if it were the identity.
"""

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

from kflats.torch.layers._packed_layers import is_packed
from kflats.torch.layers._quantized_state import QUANTIZED_RECORD, _assign, _np

__all__ = [
    "register_straight_through_",
    "requantize_",
    "straight_through_parameters",
]


class _FakeQuantize(nn.Module):
    """Rounds to a fixed grid on the forward, passes the gradient straight through."""

    def __init__(self, qt):
        super().__init__()
        rows, cols = qt._lines
        g = qt.group_size
        scale = np.repeat(qt.scales.astype(np.float32), g, axis=1)
        zero = np.repeat(qt._zeros_or_mid().astype(np.float32), g, axis=1)
        if qt.axis == 0:
            scale, zero = scale.T, zero.T
        self.register_buffer(
            "scale", torch.from_numpy(np.ascontiguousarray(scale)), persistent=False
        )
        self.register_buffer(
            "zero", torch.from_numpy(np.ascontiguousarray(zero)), persistent=False
        )
        self.levels = float((1 << qt.bits) - 1)

    def forward(self, x):
        s = self.scale.to(x.device)
        z = self.zero.to(x.device)
        safe = torch.where(s > 0, s, torch.ones_like(s))
        q = torch.clamp(torch.round(x / safe) + z, 0.0, self.levels)
        deq = ((q - z) * s).to(x.dtype)
        return x + (deq - x).detach()


def register_straight_through_(module):
    """Train through the rounding: each quantized parameter becomes a latent float.

    Each recorded parameter is parametrized (:mod:`torch.nn.utils.parametrize`):
    the layer sees its latent value rounded to the recorded grid (scales and
    zero points fixed), and the gradient passes through the rounding as if
    it were the identity (straight-through estimator). The optimizer updates
    the latent floats; :func:`requantize_` ends the training.

    Parameters
    ----------
    module : torch.nn.Module

    Returns
    -------
    module

    Examples
    --------
    >>> import torch
    >>> from kflats.quantize import (quantize_module_, register_straight_through_,
    ...                              requantize_)
    >>> layer = quantize_module_(torch.nn.Linear(16, 4), bits=4, group_size=16)
    >>> _ = register_straight_through_(layer)
    >>> layer(torch.randn(2, 16)).sum().backward()
    >>> layer.parametrizations.weight.original.grad.shape
    torch.Size([4, 16])
    >>> _ = requantize_(layer)
    >>> hasattr(layer, "parametrizations")
    False
    """
    packed = [name for name, sub in module.named_modules() if is_packed(sub)]
    if packed:
        raise ValueError(
            f"{len(packed)} layer(s) hold their quantized weights packed (such "
            f"as {packed[0] or type(module).__name__!r}), which do not train: "
            "load the model with load_compressed(..., unpack=True), or call "
            "kflats.torch.layers.unpack_quantized_(model) first"
        )
    for _, sub in module.named_modules():
        for name, qt in getattr(sub, QUANTIZED_RECORD, {}).items():
            owner, attr = _split(sub, name)
            if parametrize.is_parametrized(owner, attr):
                continue
            parametrize.register_parametrization(
                owner, attr, _FakeQuantize(qt).to(sub.get_parameter(name).device)
            )
    return module


def straight_through_parameters(module):
    """The latent float parameters that :func:`register_straight_through_` made.

    Give these to the optimizer: iterating a parametrized layer's
    ``coefficients`` yields the rounded values, which are not leaves.

    Parameters
    ----------
    module : torch.nn.Module

    Returns
    -------
    params : list of torch.nn.Parameter
        In module order; empty when nothing is parametrized.
    """
    params = []
    for _, sub in module.named_modules():
        for name in getattr(sub, QUANTIZED_RECORD, {}):
            owner, attr = _split(sub, name)
            if parametrize.is_parametrized(owner, attr):
                params.append(owner.parametrizations[attr].original)
    return params


def _split(sub, name):
    """(the module owning ``name``, its last attribute name)."""
    parts = name.split(".")
    owner = sub.get_submodule(".".join(parts[:-1])) if len(parts) > 1 else sub
    return owner, parts[-1]


def requantize_(module):
    """Round each quantized parameter to its grid again (after training).

    Removes the straight-through parametrizations if any (keeping the
    latent floats), then rounds each recorded parameter to its recorded grid
    (scales and zero points unchanged), records the new codes and sets the
    parameter to their dequantized values.

    Parameters
    ----------
    module : torch.nn.Module

    Returns
    -------
    module
    """
    for _, sub in module.named_modules():
        record = getattr(sub, QUANTIZED_RECORD, None)
        if not record or is_packed(sub):  # packed: its codes are the grid's
            continue
        for name in record:
            owner, attr = _split(sub, name)
            if parametrize.is_parametrized(owner, attr):
                parametrize.remove_parametrizations(
                    owner, attr, leave_parametrized=False
                )
        _assign(
            sub,
            {
                name: qt.requantize(_np(sub.get_parameter(name)))
                for name, qt in record.items()
            },
        )
    return module
