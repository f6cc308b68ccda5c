"""The projective layers, and the dense-layer helpers, in one place to import from.

Each lives in its own module: :mod:`._layer_base` (what the projective
layers share, :class:`WeightSpec`), :mod:`._layer_embedding`
(:class:`ProjectiveEmbedding`), :mod:`._layer_linear`
(:class:`ProjectiveLinear`), :mod:`._layer_tied` (:class:`ProjectiveTiedHead`,
:class:`SharedEmbedding`), :mod:`._dense` (a Linear or a transformers
Conv1D); the rest of kflats.torch imports them from here.
"""

# the private helpers are imported from here by other modules of kflats.torch
from ._dense import _conv1d_type as _conv1d_type
from ._dense import _dense_weight as _dense_weight
from ._dense import _features as _features
from ._dense import _is_conv1d as _is_conv1d
from ._dense import _is_linear as _is_linear
from ._dense import _weight_as_numpy as _weight_as_numpy
from ._layer_base import WeightSpec
from ._layer_base import _label_dtype as _label_dtype
from ._layer_embedding import ProjectiveEmbedding
from ._layer_linear import ProjectiveLinear
from ._layer_tied import ProjectiveTiedHead, SharedEmbedding

__all__ = [
    "ProjectiveEmbedding",
    "ProjectiveLinear",
    "ProjectiveTiedHead",
    "SharedEmbedding",
    "WeightSpec",
]
