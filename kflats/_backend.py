"""Backends: where the assignment, the statistics, the update and the seeding run.

Every fit talks to its backend through one small protocol, the operations of
Lloyd's algorithm and of the seeding on one matrix ``X`` (with ``xsq``, its
rows' squared norms, None for a dask array):

``assign(X, xsq, packed, return_distances=False)``
    ``(labels, mind[, dist])``: each row's nearest subspace and squared
    distance (``kflats._lloyd._assign``).
``stats(X, labels, sample_weight, k)``
    The clusters' additive statistics (``kflats._lloyd._Stats``, or an object
    with its ``W``, ``N``, ``subspace`` and ``move``, which returns the number
    of rows that changed cluster).
``update(X, labels, stats, mind, sample_weight, j, affine, grow)``
    The subspaces fitted to ``stats``, starved clusters re-seeded with
    ``grow(i)`` unless it is None (``kflats._lloyd._update``).
``grow(X, xsq, sample_weight, i, j, affine)``
    A j-dimensional subspace grown around row ``i`` (``kflats._seeding._grow``).
``exact_mind(X, xsq, labels, mind, packed, bases, means)``
    The squared distances recomputed from the residuals, for the reported cost.
``cost(sample_weight, mind)``
    The weighted sum of the distances, a float.
``n_positive(sample_weight)``, ``empty_cost(X, xsq, sample_weight, affine)``
    The rows of positive weight, and the cost of the empty model (the origin,
    or the weighted mean when affine) that ``tol`` is relative to.
``initial(init, X, xsq, sample_weight, k, j, affine, rng, grow)``
    The initial subspaces of one run, ``(bases, means, comps, dist)``; ``dist``
    (n, k), or None, spares the first assignment.
``parallel``
    Whether independent factorizations (the update's k, the seeding's trials)
    run side by side on the cores (``kflats._threads.map_threads``): numpy's
    LAPACK releases the GIL; a device's work is queued in sequence.

The Lloyd loop (``kflats._lloyd._ksubspaces_single``) uses nothing else.
:class:`NumpyOps` is the host's and ``kflats._torch_backend.TorchOps`` a torch
device's, both :class:`HostOps`: X in memory, the seeding k-subspaces++.
``kflats._dask_fit.DaskOps`` is a dask array's: every operation that reads the
rows is one map over the chunks and one reduction of the statistics, and the
seeding oversamples in the manner of k-means||.
"""

import numpy as np

from ._lloyd import _assign, _exact_mind, _Stats, _update
from ._seeding import (
    _grow,
    _initial_potential,
    _ksubspaces_plusplus,
    _random_partition,
)

__all__ = ["HostOps", "NumpyOps"]


class HostOps:
    """What every backend of an X in host memory shares: update, seeding, sizes.

    A subclass gives ``assign``, ``stats``, ``grow``, ``exact_mind`` and
    ``parallel``.
    """

    def update(self, X, labels, stats, mind, sample_weight, j, affine, grow):
        return _update(
            X, labels, stats, mind, sample_weight, j, affine, grow, assign=self.assign
        )

    def cost(self, sample_weight, mind):
        return float(sample_weight @ mind)

    def n_positive(self, sample_weight):
        return int(np.count_nonzero(sample_weight > 0))

    def empty_cost(self, X, xsq, sample_weight, affine):
        return float(sample_weight @ _initial_potential(X, xsq, sample_weight, affine))

    def initial(self, init, X, xsq, sample_weight, k, j, affine, rng, grow):
        if isinstance(init, str) and init == "k-subspaces++":
            bases, means, comps, _, dist = _ksubspaces_plusplus(
                X,
                xsq,
                sample_weight,
                k,
                j,
                affine,
                rng,
                2 + int(np.log(k)),
                self.assign,
                grow,
                parallel=self.parallel,
            )
            return bases, means, comps, dist
        if isinstance(init, str):  # "random"
            bases, means, comps = _random_partition(
                X, xsq, sample_weight, k, j, affine, rng, grow, self
            )
            return bases, means, comps, None
        bases = np.array(init, dtype=X.dtype, copy=True)
        means = np.zeros((k, X.shape[1]), dtype=X.dtype)
        if affine:
            means[:] = (sample_weight @ X) / sample_weight.sum()
        return bases, means, None, None


class NumpyOps(HostOps):
    """The numpy backend: Numba kernels and numpy/scipy's LAPACK on the host."""

    parallel = True

    def assign(self, X, xsq, packed, return_distances=False):
        return _assign(X, xsq, packed, return_distances)

    def stats(self, X, labels, sample_weight, k):
        return _Stats(X, labels, sample_weight, k)

    def grow(self, X, xsq, sample_weight, i, j, affine):
        return _grow(X, xsq, sample_weight, i, j, affine)

    def exact_mind(self, X, xsq, labels, mind, packed, bases, means):
        return _exact_mind(X, xsq, labels, mind, packed, bases, means)
