"""Backends: where the assignment, the statistics and the seeding's grow run.

Every in-memory fit talks to its backend through one small protocol, the
operations of Lloyd's algorithm and of the seeding on one matrix ``X`` (with
``xsq``, its rows' squared norms):

``assign(X, xsq, packed, return_distances=False)``
    ``(labels, mind[, dist])``: each row's nearest subspace and squared
    distance (``kflats._lloyd._assign``).
``stats(X, labels, sample_weight, k)``
    The clusters' additive statistics (``kflats._lloyd._Stats``, or an object
    with its ``move`` and ``subspace`` methods).
``grow(X, xsq, sample_weight, i, j, affine)``
    A j-dimensional subspace grown around row ``i`` (``kflats._seeding._grow``).
``exact_mind(X, xsq, labels, mind, packed, bases, means)``
    The squared distances recomputed from the residuals, for the reported cost.
``parallel``
    Whether independent factorizations (the update's k, the seeding's trials)
    run side by side on the cores (``kflats._threads.map_threads``): numpy's
    LAPACK releases the GIL; a device's work is queued in sequence.

:class:`NumpyOps` is the host's, ``kflats._torch_backend.TorchOps`` a torch
device's. A dask array is fitted by ``kflats._dask`` with the same statistics
and packing, each operation one map-reduce pass over its chunks.
"""

from ._lloyd import _assign, _exact_mind, _Stats
from ._seeding import _grow

__all__ = ["NumpyOps", "backend_ops"]


class NumpyOps:
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


def backend_ops(backend, X, xsq, device):
    """The operations of ``backend`` (validated: "numpy" or "torch") on ``X``."""
    if backend == "numpy":
        if device is not None:
            raise ValueError(f"device={device!r} is only used with backend='torch'.")
        return NumpyOps()
    from ._torch_backend import TorchOps  # imports torch

    return TorchOps(X, xsq, device)
