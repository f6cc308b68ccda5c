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
    """Rounds to a grid on the forward, passes the gradient straight through.

    The grid's zero points are fixed; its scales too, unless ``scales``: then
    each group's scale trains as its recorded value times ``exp(log_gain)``
    (positive, equal to the recorded one at the start, an optimizer's step a
    relative change), the gradient of the rounding taken as the identity's
    (learned step size); a group of scale 0 (all zero) stays so.
    """

    def __init__(self, qt, scales=False):
        super().__init__()
        self.group_size, self.axis = qt.group_size, qt.axis
        scale = torch.from_numpy(qt.scales.astype(np.float32))
        zero = torch.from_numpy(qt._zeros_or_mid().astype(np.float32))
        self.register_buffer("zero", zero, persistent=False)
        self.register_buffer("alive", scale > 0, persistent=False)
        self.register_buffer("scale", scale, persistent=False)
        if scales:  # each scale times exp(log_gain): exact at 0, steps relative
            self.log_gain = nn.Parameter(torch.zeros_like(scale))
        self.levels = float((1 << qt.bits) - 1)

    def scales(self):
        """The grid's scales, (lines, groups): as recorded, or as trained."""
        if hasattr(self, "log_gain"):
            return self.scale * torch.exp(self.log_gain)
        return self.scale

    def _spread(self, t, x):
        """A (lines, groups) tensor spread over the weight's entries."""
        t = t.to(x.device).repeat_interleave(self.group_size, dim=1)
        return t if self.axis == 1 else t.T

    def forward(self, x):
        s = self._spread(self.scales(), x)
        z = self._spread(self.zero, x)
        alive = self._spread(self.alive, x)
        v = x / torch.where(alive, s, torch.ones_like(s)) + z
        if not hasattr(self, "log_gain"):
            q = torch.clamp(torch.round(v), 0.0, self.levels)
            return x + (((q - z) * s).to(x.dtype) - x).detach()
        q = torch.clamp(v + (torch.round(v) - v).detach(), 0.0, self.levels)
        return ((q - z) * s).to(x.dtype)


def register_straight_through_(module, scales=False):
    """Train through the rounding: each quantized parameter becomes a latent float.

    Each recorded parameter is parametrized (:mod:`torch.nn.utils.parametrize`):
    the layer sees its latent value rounded to the recorded grid (zero
    points fixed; scales fixed unless ``scales``), and the gradient passes
    through the rounding as if it were the identity (straight-through
    estimator). The optimizer updates the latent floats (and the scales);
    :func:`requantize_` ends the training.

    Parameters
    ----------
    module : torch.nn.Module
    scales : bool, default=False
        Train each group's scale too, in log space (learned step size); a
        group of scale 0 keeps it. :func:`straight_through_parameters` lists
        them; :func:`requantize_` writes them into the packed form, in the
        dtype its scales are stored in.

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
    if not isinstance(scales, bool):
        raise ValueError(f"scales must be True or False, got {scales!r}")
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
            fake = _FakeQuantize(qt, scales).to(sub.get_parameter(name).device)
            parametrize.register_parametrization(owner, attr, fake)
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
        In module order, each latent float followed by its log scales when
        they train; empty when nothing is parametrized.
    """
    params = []
    for _, sub in module.named_modules():
        for name in getattr(sub, QUANTIZED_RECORD, {}):
            owner, attr = _split(sub, name)
            if parametrize.is_parametrized(owner, attr):
                parametrization = owner.parametrizations[attr]
                params.append(parametrization.original)
                params += [p for p in parametrization[0].parameters()]
    return params


def _split(sub, name):
    """(the module owning ``name``, its last attribute name)."""
    parts = name.split(".")
    owner = sub.get_submodule(".".join(parts[:-1])) if len(parts) > 1 else sub
    return owner, parts[-1]


def requantize_(module):
    """Round each quantized parameter to its grid again (after training).

    Removes the straight-through parametrizations if any (keeping the
    latent floats and trained scales), then rounds each recorded parameter
    to its grid (zero points unchanged; scales as trained, in the dtype they
    are stored in, else unchanged), records the new codes and sets the
    parameter to their dequantized values. Every grid is made before any
    layer changes: a trained scale that its dtype cannot hold raises and
    leaves the module as it was.

    Parameters
    ----------
    module : torch.nn.Module

    Returns
    -------
    module
    """
    # every new grid first, from the latent floats and trained scales: a
    # scale that float16 cannot hold raises before any layer is changed
    done = []
    for _, sub in module.named_modules():
        record = getattr(sub, QUANTIZED_RECORD, None)
        if not record or is_packed(sub):  # packed: its codes are the grid's
            continue
        tensors, parametrized = {}, []
        for name, qt in record.items():
            owner, attr = _split(sub, name)
            trained = None
            if parametrize.is_parametrized(owner, attr):
                fake = owner.parametrizations[attr][0]
                if hasattr(fake, "log_gain"):
                    trained = _np(fake.scales().detach())
                latent = owner.parametrizations[attr].original
                parametrized.append((owner, attr))
            else:
                latent = sub.get_parameter(name)
            tensors[name] = qt.requantize(_np(latent), trained)
        done.append((sub, tensors, parametrized))
    for sub, tensors, parametrized in done:
        for owner, attr in parametrized:
            parametrize.remove_parametrizations(owner, attr, leave_parametrized=False)
        _assign(sub, tensors)
    return module
