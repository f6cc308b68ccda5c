"""A compressed folder out to the engines users deploy on: ONNX, GGUF.

- :func:`export_onnx` writes a folder that sentence-transformers' ONNX
  backend reads and a plain onnxruntime session runs, each quantized
  matrix as kflats' own codes in ``MatMulNBits`` or
  ``GatherBlockQuantized``, projective layers as their factor products;
  :class:`OnnxExport` is what it wrote, a :class:`TensorForm` per
  quantized matrix (and what fell back, and why).
- :func:`export_gguf` writes a causal LM as one GGUF file that llama.cpp
  runs, each quantized matrix as kflats' own codes in Q4_1, Q4_0, Q5_1,
  Q5_0 or Q8_0 blocks, the tokenizer and metadata carried over from the source GGUF
  file; :class:`GgufExport` is what it wrote.

Needs onnx and onnxruntime (``pip install kflats[onnx]``) for ONNX, the
gguf package for GGUF.

The files of this package:

- ``_onnx.py``: export_onnx, its steps and its checks.
- ``_slots.py``: the modules kflats writes itself, marked in the trace.
- ``_layers.py``: each of those modules as ONNX operators.
- ``_graph.py``: the node builder, and a matrix in its operator's form.
- ``_layout.py``: the export folder's files.
- ``_frame.py``: the bytes of an export known before fitting (what
  ``CompressionConfig(format="onnx")`` counts).
- ``_gguf.py``: export_gguf, its steps and its checks.
- ``_gguf_tensors.py``: the model's tensors under llama.cpp's names and layout.
- ``_gguf_blocks.py``: kflats' codes packed as GGUF blocks.
- ``_gguf_meta.py``: the source GGUF file found, checked, its metadata copied.
"""

from kflats.torch.export._gguf import GgufExport, export_gguf
from kflats.torch.export._graph import TensorForm
from kflats.torch.export._layout import EXPORT_MARKER
from kflats.torch.export._onnx import OnnxExport, export_onnx

__all__ = [
    "EXPORT_MARKER",
    "GgufExport",
    "OnnxExport",
    "TensorForm",
    "export_gguf",
    "export_onnx",
]
