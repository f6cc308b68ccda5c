"""Functions of the rows of a fitted KSubspaces, and where they run.

``labels``, ``distances``, ``residuals``, ``coordinates`` and ``projection``
take a fitted estimator and a numpy block of rows. :class:`InMemory` runs
them on a whole numpy array at once; ``kflats._dask.Lazy`` runs them on a dask
array chunk by chunk, lazily. Every block is handled in blocks of rows, so
memory stays a fraction of X's.
"""

import numpy as np
from sklearn.utils.validation import _check_sample_weight

from ._lloyd import _assign, _pack, _residual_sq, _row_norms_sq, _row_step


class InMemory:
    """Row functions of a numpy array: run at once."""

    def map(self, fn, X, width, dtype, labels=None):
        """``fn(X)``, or ``fn(X, labels)`` with labels given."""
        return fn(X) if labels is None else fn(X, labels)

    def weights(self, sample_weight, X):
        return _check_sample_weight(
            sample_weight, X, dtype=X.dtype, ensure_non_negative=True
        )

    def total(self, value):
        return float(value)


def packed(est, dtype):
    """The fitted subspaces laid out for ``kflats._lloyd._assign``."""
    return _pack(est.bases_, est.means_, est.affine, est._complements, dtype)


def labels(est, X):
    """Index of the nearest subspace of every row."""
    return _assign(X, _row_norms_sq(X), packed(est, X.dtype))[0]


def residuals(est, X):
    """Squared distance of every row to its nearest subspace, from residuals."""
    return _residual_sq(X, labels(est, X), est.bases_, est.means_)


def distances(est, X):
    """Euclidean distances of the rows of X to every subspace, in X's dtype."""
    if est._complements is not None:  # ||N (x - mu)||^2 does not cancel
        _, _, dist = _assign(
            X, _row_norms_sq(X), packed(est, X.dtype), return_distances=True
        )
    else:  # ||x - mu||^2 - ||B (x - mu)||^2 would: use the residuals
        bases = est.bases_.astype(X.dtype, copy=False)
        means = est.means_.astype(X.dtype, copy=False)
        zeros = np.zeros(X.shape[0], np.int32)
        dist = np.column_stack(
            [
                _residual_sq(X, zeros, B[None], mu[None])
                for B, mu in zip(bases, means, strict=True)
            ]
        )
    return np.sqrt(dist).astype(X.dtype, copy=False)


def coordinates(est, X, labels):
    """``B_c (x - mu_c)`` of every row in its subspace c = ``labels``."""
    coords = np.empty((X.shape[0], est.j), dtype=X.dtype)
    bases = est.bases_.astype(X.dtype, copy=False)
    means = est.means_.astype(X.dtype, copy=False)
    step = _row_step(X.shape[1])
    for start in range(0, X.shape[0], step):  # blocks: no copy of X
        Xb, lb = X[start : start + step], labels[start : start + step]
        for c in np.unique(lb):
            idx = np.flatnonzero(lb == c)
            coords[start + idx] = (Xb[idx] - means[c]) @ bases[c].T
    return coords


def projection(est, X, labels):
    """``mu_c + B_c^T B_c (x - mu_c)`` of every row, c = ``labels``."""
    coords = coordinates(est, X, labels)
    bases = est.bases_.astype(X.dtype, copy=False)
    means = est.means_.astype(X.dtype, copy=False)
    X_proj = np.empty(X.shape, dtype=X.dtype)
    for c in range(est.k):
        idx = np.flatnonzero(labels == c)
        X_proj[idx] = means[c] + coords[idx] @ bases[c]
    return X_proj
