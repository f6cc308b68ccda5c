"""Benchmarks of kflats.quantize: calibrated rounding along the rows and down
the columns, with float16 or compact scales.

Along the rows (``axis=1``) is a Linear weight's rounding (1536 x 384, the
input moment of correlated inputs); down the columns (``axis=0``) is how a
table's bases are rounded (a rank-192 basis of 384-wide rows, transposed).
``time_`` benchmarks time one call, the Numba kernels compiled in ``setup``;
``track_`` benchmarks report what compact scales trade: the calibrated
error and the bytes, each relative to float16 scales on the same matrix.
"""

from functools import cache

import numpy as np

from kflats.quantize import quantize_calibrated

from . import common

BITS, GROUP = 3, 32


@cache
def _problem(axis):
    """(W, moment): a Linear's weight and input moment, or a basis (transposed)
    and the moment of its coefficients."""
    rng = np.random.default_rng(0)
    n_in = 384 if axis == 1 else 192
    rows = 1536 if axis == 1 else 384
    W = rng.normal(size=(rows, n_in)) * rng.uniform(0.5, 2.0, size=(rows, 1))
    Q = np.linalg.qr(rng.normal(size=(n_in, n_in)))[0]
    C = (Q * np.logspace(0, -3, n_in)) @ Q.T
    return W, C


def _quantize(axis, scales):
    W, C = _problem(axis)
    compact = scales == "compact"
    return quantize_calibrated(W, C, BITS, GROUP, axis=axis, compact_scales=compact)


class CalibratedQuantize(common.Benchmark):
    """quantize_calibrated at 3 bits, groups of 32."""

    param_names = ["axis", "scales"]
    params = ([1, 0], ["float16", "compact"])

    def setup(self, axis, scales):
        _problem(axis)
        _quantize(axis, scales)  # the kernels compiled (or loaded) first

    def time_quantize_calibrated(self, axis, scales):
        _quantize(axis, scales)

    def track_error_against_float16_scales(self, axis, scales):
        """``||(W - W_hat) L|| / `` the same with float16 scales (1.0 for those)."""
        W, C = _problem(axis)
        L = np.linalg.cholesky(C)
        errors = [
            np.linalg.norm((W - _quantize(axis, s).dequantize()) @ L)
            for s in (scales, "float16")
        ]
        return float(errors[0] / errors[1])

    track_error_against_float16_scales.unit = "ratio"

    def track_bytes_against_float16_scales(self, axis, scales):
        return float(_quantize(axis, scales).nbytes / _quantize(axis, "float16").nbytes)

    track_bytes_against_float16_scales.unit = "ratio"
