"""Group-wise quantization of matrices, plain and calibrated.

A matrix is stored as integer codes of 2, 3, 4, 5, 6 or 8 bits, packed tightly,
with one scale (float16) and one zero point (uint8) per group of
``group_size`` consecutive entries (:class:`QuantizedTensor`). Dequantizing is
one float32 multiply per entry, the same bits on every machine, so a layer
whose float parameters hold the dequantized values gives bit-identical
outputs after a save and load that store only the codes.

- :func:`quantize`: round-to-nearest (the floor), optionally with a search of
  each group's clipping ratio.
- ``compact_scales=True`` (both quantizers): scales stored as 8-bit multiples
  of a power of two shared by 8 groups, a byte a group instead of two
  (:class:`QuantizedTensor`'s ``scale_layout``); float16 in memory as any.
- :func:`quantize_calibrated`: GPTQ-style rounding with error feedback along a
  Linear layer's input moment ``E[x x^T]``; :func:`shared_quantizations`: a
  scope in which the same inputs are rounded once (a search and its
  baseline).
- Layers (needs PyTorch; defined in :mod:`kflats.torch.layers` beside the
  layers they quantize, and imported from there on first use):
  :func:`quantize_module_`
  quantizes an ``nn.Linear``, ``nn.Embedding``, ``ProjectiveLinear`` or
  ``ProjectiveEmbedding`` in place (its float parameters hold the dequantized
  values); :func:`quantized_state` / :func:`dequantized_state` give the packed
  state for a save and back; :func:`form_nbytes` counts a form's bytes without
  quantizing (:func:`factors_nbytes`: before a layer is built);
  :func:`register_straight_through_` and :func:`requantize_` train
  through the rounding.

Why written here, not taken from a library
------------------------------------------
Measured with torch 2.13 (CPU): torchao 0.18.0, optimum-quanto 0.2.7, hqq
0.2.8.post1 (``pip install torchao optimum-quanto hqq``).

- torchao: ``choose_qparams_affine`` / ``quantize_affine`` /
  ``dequantize_affine`` quantize any 2-D tensor group-wise at any bit width on
  CPU, but keep one code per uint8 byte (``IntxWeightOnlyConfig`` stores
  ``IntxUnpackedToInt8Tensor``); the packed int4 layout
  (``Int4WeightOnlyConfig``) needs the ``mslk`` kernels, absent on CPU; no 3- or
  6-bit packing. Its GPTQ (``torchao.prototype.gptq``) asserts a CUDA device
  and covers int4/nvfp4 only.
- optimum-quanto: ``quantize`` + ``freeze`` of an ``nn.Linear`` fails at the
  forward on CPU ("linear(): argument 'weight' must be Tensor, not
  NoneType"), at 8, 4 and 2 bits.
- HQQ: ``Quantizer.quantize`` works on CPU at 8, 4, 3, 2 bits (no 6) with
  float zero points optimised without data (half-quadratic); 3-bit codes go
  ten to an int32 (3.2 bits each). No calibrated rounding.

None packs 3- and 6-bit codes tightly into plain tensors, and none offers
calibrated (GPTQ) rounding on CPU, so both are written here in numpy (the
core stays numpy/scipy); torchao and HQQ serve as the peers of
``benchmarks/bytes_report.py``. There, on all-MiniLM-L6-v2 (every weight
matrix, embeddings included; mean cosine of held-out sentence embeddings,
bytes on disk over float32 bytes): int4 g32 at 0.150x gives 0.9747
round-to-nearest, 0.9918 calibrated, 0.9749 HQQ (0.157x), 0.9593 torchao
(0.290x, one code per byte); int3 g32 at 0.118x gives 0.8964, 0.9641, and
0.8927 HQQ (0.132x).
"""

import importlib

from ._gptq import quantize_calibrated, shared_quantizations
from ._grid import SUPPORTED_BITS
from ._nbytes import quantized_nbytes
from ._rtn import quantize
from ._tensor import QuantizedTensor

# the layer functions, which live with the layers in kflats.torch.layers
_TORCH_NAMES = (
    "dequantized_state",
    "factors_nbytes",
    "form_nbytes",
    "quantize_module_",
    "quantized_state",
    "quantized_tensors",
    "rank_group_size",
    "record_quantized_",
    "register_straight_through_",
    "requantize_",
    "split_quantized_state",
    "state_nbytes",
    "straight_through_parameters",
)

__all__ = [
    "SUPPORTED_BITS",
    "QuantizedTensor",
    "quantize",
    "quantize_calibrated",
    "quantized_nbytes",
    "shared_quantizations",
    *_TORCH_NAMES,
]


def __getattr__(name):
    # the layer functions need torch: import them on first use only
    if name in _TORCH_NAMES:
        return getattr(importlib.import_module("kflats.torch.layers"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
