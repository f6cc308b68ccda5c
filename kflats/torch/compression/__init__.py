"""Compression of a model's modules under one budget, and the heal after it.

Where each step lives:

- ``_config.py``: :class:`CompressionConfig`, what :func:`compress` does, as
  data checked in one place;
- ``_compress.py``: :func:`compress`, the entry point: the config (or the
  keywords that build it), the modules selected, the planner of the
  config's unit picked once (:data:`PLANNERS`);
- ``_objectives.py``: what each module's fit minimises under a calibration;
- ``_sensitivity.py``: each module's k = 1 spectrum, and how far the model's
  output moves when it is truncated (the probe);
- ``_plan_numbers.py``: the planner of a budget in numbers (feasibility,
  the global allocation, every module fitted);
- ``_plan_bytes.py``: the planner of a budget in bytes (every module's form
  chosen among ``_forms.py``'s, measured by ``_form_errors.py``; what each
  file format holds: ``_file_formats.py``);
- ``_folder_bytes.py``: a budget in bytes as the size of the folder's weight
  files: the tensors outside the selected modules, and the headers' bound;
- ``_uniform.py``: every module quantized alike, the byte road's baseline;
- ``_fit.py``: one module fitted as a projective layer, and its report;
- ``_report.py``: :class:`CompressionReport` and :class:`ModuleReport`;
- ``_heal.py``: :func:`heal`, a short distillation towards the original;
  ``_heal_loop.py``: its training loop and held-out stop (:class:`HealLosses`).
"""

from kflats.torch.compression._compress import PLANNERS, check_budget, compress
from kflats.torch.compression._config import CompressionConfig
from kflats.torch.compression._folder_bytes import saved_nbytes
from kflats.torch.compression._heal import heal
from kflats.torch.compression._objectives import module_objectives
from kflats.torch.compression._report import CompressionReport, ModuleReport
from kflats.torch.compression._uniform import quantize_uniformly

__all__ = [
    "PLANNERS",
    "CompressionConfig",
    "CompressionReport",
    "ModuleReport",
    "check_budget",
    "compress",
    "heal",
    "module_objectives",
    "quantize_uniformly",
    "saved_nbytes",
]
