"""The layers kflats builds, and how they are quantized and stored.

- :class:`ProjectiveEmbedding` (``_embedding.py``), :class:`ProjectiveLinear`
  (``_linear.py``), :class:`ProjectiveTiedHead` and :class:`SharedEmbedding`
  (``_tied.py``), and what they share (``_base.py``: :class:`WeightSpec`,
  cluster ids, stacked bases); their packed inference form (``_packed.py``).
- Dense layers as kflats reads them, a Linear or transformers' Conv1D
  (``_dense.py``: :func:`is_linear`, :func:`dense_weight`, ...).
- Quantization of these layers' storage: :func:`quantize_module_`
  (``_quantize.py``), the record of a layer's quantized tensors and state
  dicts holding them packed (``_quantized_state.py``), their bytes counted
  without quantizing (``_quantized_bytes.py``), and training through the
  rounding (``_straight_through.py``).
- Quantized parameters held packed in memory: :class:`PackedTensor`
  (``_packed_tensor.py``) over torch unpacking and dequantization
  (``_dequantize.py``), placed in layers by :func:`pack_quantized_` and
  taken out by :func:`unpack_quantized_` (``_packed_layers.py``).

:mod:`kflats.quantize` holds the matrix-level quantization these build on,
and re-exports the quantization functions.

The rest of kflats imports them from here.
"""

from kflats.torch.layers._base import WeightSpec, label_dtype
from kflats.torch.layers._dense import (
    conv1d_type,
    dense_features,
    dense_weight,
    is_conv1d,
    is_linear,
    weight_as_numpy,
)
from kflats.torch.layers._embedding import ProjectiveEmbedding
from kflats.torch.layers._linear import ProjectiveLinear
from kflats.torch.layers._packed_layers import (
    is_packed,
    pack_quantized_,
    unpack_quantized_,
)
from kflats.torch.layers._packed_tensor import PackedTensor
from kflats.torch.layers._quantize import quantize_module_
from kflats.torch.layers._quantized_bytes import (
    factors_nbytes,
    form_nbytes,
    rank_group_size,
    scale_layouts,
)
from kflats.torch.layers._quantized_state import (
    QUANTIZED_RECORD,
    dequantized_state,
    quantized_state,
    quantized_tensors,
    record_quantized_,
    split_quantized_state,
    state_nbytes,
)
from kflats.torch.layers._straight_through import (
    register_straight_through_,
    requantize_,
    straight_through_parameters,
)
from kflats.torch.layers._tied import ProjectiveTiedHead, SharedEmbedding

__all__ = [
    "QUANTIZED_RECORD",
    "PackedTensor",
    "ProjectiveEmbedding",
    "ProjectiveLinear",
    "ProjectiveTiedHead",
    "SharedEmbedding",
    "WeightSpec",
    "conv1d_type",
    "dense_features",
    "dense_weight",
    "dequantized_state",
    "factors_nbytes",
    "form_nbytes",
    "is_conv1d",
    "is_linear",
    "is_packed",
    "label_dtype",
    "pack_quantized_",
    "quantize_module_",
    "quantized_state",
    "quantized_tensors",
    "rank_group_size",
    "record_quantized_",
    "register_straight_through_",
    "requantize_",
    "scale_layouts",
    "split_quantized_state",
    "state_nbytes",
    "straight_through_parameters",
    "unpack_quantized_",
    "weight_as_numpy",
]
