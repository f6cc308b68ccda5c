"""A compressed folder out to the engines users deploy on: ONNX for onnxruntime.

- :func:`export_onnx` writes a folder that sentence-transformers' ONNX
  backend reads and a plain onnxruntime session runs, each quantized
  matrix as kflats' own codes in ``MatMulNBits`` or
  ``GatherBlockQuantized``, projective layers as their factor products;
  :class:`OnnxExport` is what it wrote, a :class:`TensorForm` per
  quantized matrix (and what fell back, and why).

Needs onnx and onnxruntime (``pip install kflats[onnx]``).

The files of this package:

- ``_onnx.py``: export_onnx, its steps and its checks.
- ``_slots.py``: the modules kflats writes itself, marked in the trace.
- ``_layers.py``: each of those modules as ONNX operators.
- ``_graph.py``: the node builder, and a matrix in its operator's form.
- ``_layout.py``: the export folder's files.
"""

from kflats.torch.export._graph import TensorForm
from kflats.torch.export._layout import EXPORT_MARKER
from kflats.torch.export._onnx import OnnxExport, export_onnx

__all__ = ["EXPORT_MARKER", "OnnxExport", "TensorForm", "export_onnx"]
