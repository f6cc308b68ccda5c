"""Calibration: what the calibrated objectives need, recorded on real inputs.

- ``_calibrate.py``: :func:`calibrate`, one pass over calibration text with
  observers hooked on the target modules; :func:`token_frequencies`.
- ``_result.py``: :class:`Calibration`, what a calibration recorded (token
  counts, input second moments, probe batches), by module name, and its
  file.
"""

from kflats.torch.calibration._calibrate import (
    calibrate,
    check_count,
    token_frequencies,
)
from kflats.torch.calibration._result import Calibration

__all__ = ["Calibration", "calibrate", "check_count", "token_frequencies"]
