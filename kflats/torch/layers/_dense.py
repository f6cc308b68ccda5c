"""Dense layers as kflats reads them: a Linear, or transformers' Conv1D.

GPT-2's ``Conv1D`` is a Linear in all but name (``y = x W + b``, its weight
stored in x out); these helpers answer for both, without importing
transformers.
"""

import sys

import torch
from torch import nn


def conv1d_type():
    """transformers' ``Conv1D`` (GPT-2), if transformers is imported, else None.

    Looked up, never imported: a model holding one has imported it.
    """
    utils = sys.modules.get("transformers.pytorch_utils")
    return getattr(utils, "Conv1D", None)


def is_conv1d(module):
    conv1d = conv1d_type()
    return conv1d is not None and isinstance(module, conv1d)


def is_linear(module):
    """A dense layer computing ``x W^T + b``: a Linear, or a Conv1D (``x W + b``)."""
    cls = type(module)
    # a Linear holding its weight packed is a subclass made for it
    cls = getattr(cls, "_kflats_unpacked_class", cls)
    return cls is nn.Linear or is_conv1d(module)


def dense_weight(module):
    """The (out_features, in_features) weight of a Linear or Conv1D, as a view.

    A Conv1D stores ``W^T``: its transposed view is returned, so that writing
    into the result writes into the module.
    """
    return module.weight.T if is_conv1d(module) else module.weight


def dense_features(module):
    """``(in_features, out_features)`` of a Linear or Conv1D."""
    if is_conv1d(module):
        return module.nx, module.nf
    return module.in_features, module.out_features


def weight_as_numpy(weight):
    w = weight.detach().to("cpu")
    if w.dtype not in (torch.float32, torch.float64):
        w = w.to(torch.float32)
    return w.numpy()
