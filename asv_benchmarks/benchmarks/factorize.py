"""Benchmarks of kflats.factorize against the truncated SVD, at one budget.

Every method compresses to the same budget (``BUDGET``, a fraction of the
matrix's numbers). ``time_`` benchmarks time one call; ``track_`` benchmarks
report the quality of the factors, fitted once per run in ``setup_cache``:
the relative error (lower is better) and the compression reached (at most the
budget).
"""

import numpy as np

from kflats.factorize import factorize, factorize_linear, svd_factors

from . import common
from .common import union_of_flats, warm_up, zipf_weights

BUDGET = 0.15

# 8 subspaces of unequal dimensions: adaptive ranks have something to gain
DIMS = (2, 4, 4, 8, 8, 12, 16, 24)


def _table():
    """A 20,000 x 128 table (float32) near 8 subspaces of dimensions 2 to 24."""
    return union_of_flats(20_000, 128, DIMS)


def _fit_table(method, weights):
    # k = 8 rather than the default grid of k: one KSubspaces fit per call
    # (the grid takes 5 to 10 fits, 10 s and more on 2 shared cores)
    A = _table()
    w = zipf_weights(A.shape[0]) if weights == "zipf" else None
    if method == "svd":
        return svd_factors(A, budget=BUDGET, sample_weight=w)
    return factorize(A, 8, budget=BUDGET, ranks=method, sample_weight=w, random_state=0)


def _linear_problem():
    """A 1536 x 384 weight (out x in) and a correlated input moment ``C``.

    The output neurons lie near 8 subspaces; the inputs have variances
    spread over three decades along random (non-axis) directions.
    """
    W = union_of_flats(1536, 384, (4, 8, 8, 16, 16, 24, 32, 48))
    rng = np.random.default_rng(1)
    Q = np.linalg.qr(rng.normal(size=(384, 384)))[0]
    C = (Q * np.logspace(0, -3, 384)) @ Q.T
    return W, C


def _fit_linear(W, C, method, objective):
    C = C if objective == "calibrated" else None
    if method == "svd" and C is None:
        return svd_factors(W, budget=BUDGET)
    k, ranks = (1, "uniform") if method == "svd" else (8, method)
    return factorize_linear(
        W,
        k,
        budget=BUDGET,
        side="output",
        ranks=ranks,
        input_moment=C,
        random_state=0,
    )


class FactorizeBenchmark(common.Benchmark):
    """Time of factorizing the 20,000 x 128 table, k = 8.

    ``method``: :func:`factorize` with uniform or adaptive ranks, or the
    truncated SVD (:func:`svd_factors`). ``weights``: none (Frobenius error),
    or Zipf token frequencies as ``sample_weight`` (the weighted error of an
    embedding table).
    """

    param_names = ["method", "weights"]
    params = (["uniform", "adaptive", "svd"], ["none", "zipf"])
    repeat = (1, 5, 20.0)

    def setup(self, method, weights):
        warm_up()
        _table()

    def time_factorize(self, method, weights):
        _fit_table(method, weights)


class FactorizeQualityBenchmark(common.Benchmark):
    """Quality of the factors that ``FactorizeBenchmark`` times."""

    param_names = FactorizeBenchmark.param_names
    params = FactorizeBenchmark.params

    def setup_cache(self):
        quality = {}
        for method in self.params[0]:
            for weights in self.params[1]:
                f = _fit_table(method, weights)
                quality[method, weights] = (f.error, f.compression)
        return quality

    def track_error(self, quality, method, weights):
        """Relative squared error, row-weighted under ``weights="zipf"``."""
        return quality[method, weights][0]

    def track_compression(self, quality, method, weights):
        """Stored numbers over the table's (at most ``BUDGET``)."""
        return quality[method, weights][1]

    track_error.unit = "relative error"
    track_compression.unit = "fraction"


class FactorizeLinearBenchmark(common.Benchmark):
    """Time of factorizing the output side of a 1536 x 384 Linear weight, k = 8.

    ``method``: :func:`factorize_linear` with uniform or adaptive ranks, or
    the SVD (``svd_factors``, or with ``objective="calibrated"`` the whitened
    SVD, ``factorize_linear`` with k = 1). ``objective``: the weight's
    Frobenius error, or the expected output error under the input moment
    ``C`` (``input_moment=C``).
    """

    param_names = ["method", "objective"]
    params = (["uniform", "adaptive", "svd"], ["plain", "calibrated"])
    repeat = (1, 5, 20.0)

    def setup(self, method, objective):
        warm_up()
        self.W, self.C = _linear_problem()

    def time_factorize_linear(self, method, objective):
        _fit_linear(self.W, self.C, method, objective)


class FactorizeLinearQualityBenchmark(common.Benchmark):
    """Quality of the factors that ``FactorizeLinearBenchmark`` times."""

    param_names = FactorizeLinearBenchmark.param_names
    params = FactorizeLinearBenchmark.params

    def setup_cache(self):
        W, C = _linear_problem()
        trace = np.einsum("ij,jk,ik->", W, C, W)
        quality = {}
        for method in self.params[0]:
            for objective in self.params[1]:
                f = _fit_linear(W, C, method, objective)
                E = W - f.reconstruct()
                quality[method, objective] = (
                    float(np.einsum("ij,jk,ik->", E, C, E) / trace),
                    float(np.sum(E**2) / np.sum(W**2)),
                    f.compression,
                )
        return quality

    def track_output_error(self, quality, method, objective):
        """``E||(W - W_hat) x||^2 / E||W x||^2`` under the undamped ``C``."""
        return quality[method, objective][0]

    def track_weight_error(self, quality, method, objective):
        """``||W - W_hat||^2 / ||W||^2``."""
        return quality[method, objective][1]

    def track_compression(self, quality, method, objective):
        """Stored numbers over the weight's (at most ``BUDGET``)."""
        return quality[method, objective][2]

    track_output_error.unit = "relative error"
    track_weight_error.unit = "relative error"
    track_compression.unit = "fraction"
