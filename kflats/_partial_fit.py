"""``KSubspaces.partial_fit``: one Lloyd step per batch, statistics accumulated."""

from functools import partial

import numpy as np
from sklearn.utils import check_random_state
from sklearn.utils.validation import _check_sample_weight, validate_data

from . import _dask
from ._backend import NumpyOps
from ._fit import check_params_vs_input
from ._lloyd import (
    _assign,
    _exact_mind,
    _pack,
    _row_norms_sq,
    _rows_to_fit,
    _Stats,
    _update,
)


def partial_fit(est, X, sample_weight):
    """Fit ``est`` one batch, or every chunk of a dask array in order."""
    if not _dask.is_dask_array(X):
        partial_fit_batch(est, X, sample_weight)
        return
    if sample_weight is not None and not _dask.is_dask_array(sample_weight):
        sample_weight = np.asarray(sample_weight)
    X = _dask.check_array(X, getattr(est, "n_features_in_", None))
    for batch, weight in _dask.batches(X, sample_weight):  # a stream of chunks
        partial_fit_batch(est, batch, weight)


def partial_fit_batch(est, X, sample_weight):
    """Fit ``est`` one more batch of rows (in memory); sets its attributes."""
    first = not hasattr(est, "bases_")
    X = validate_data(est, X, dtype=[np.float64, np.float32], order="C", reset=first)
    if not first:
        X = X.astype(est.bases_.dtype, copy=False)
    sample_weight = _check_sample_weight(
        sample_weight, X, dtype=X.dtype, ensure_non_negative=True
    )
    k, j, affine = est.k, est.j, est.affine
    xsq = _row_norms_sq(X)
    ops = NumpyOps()
    grow = partial(ops.grow, X, xsq, sample_weight, j=j, affine=affine)
    if first:
        est._n_init = check_params_vs_input(est, X, sample_weight, ops)
        bases, means, comps, _ = est._init_subspaces(
            X, xsq, sample_weight, check_random_state(est.random_state), grow, ops
        )
        stats, n_batches = _Stats.empty(k, X.shape[1]), 0
    else:
        bases, means, comps = est.bases_, est.means_, est._complements
        stats = getattr(est, "_stats", None)
        n_batches = getattr(est, "_n_batches", 0)
        if stats is None:  # after fit: go on from its subspaces
            stats, n_batches = _Stats.empty(k, X.shape[1]), 0
    if np.any(sample_weight > 0):
        bases, means, comps, stats = _step(
            X, xsq, sample_weight, (bases, means, comps), stats, j, affine, grow
        )
    packed = _pack(bases, means, affine, comps)
    labels, mind = _assign(X, xsq, packed)
    mind = _exact_mind(X, xsq, labels, mind, packed, bases, means)
    est.bases_, est.means_, est._complements = bases, means, comps
    est.labels_ = labels
    est.inertia_ = float(sample_weight @ mind)
    est._stats = stats
    est._n_batches = est.n_iter_ = n_batches + 1
    est._n_features_out = k


def _step(X, xsq, sample_weight, subspaces, stats, j, affine, grow):
    """Assign the batch, add it to ``stats``, refit: the new subspaces and stats.

    A cluster with fewer than j rows so far (j + 1 for affine flats) is
    re-seeded around the batch's farthest row; its old statistics are forgotten.
    """
    bases, means, comps = subspaces
    k = stats.W.size
    labels, mind = _assign(X, xsq, _pack(bases, means, affine, comps))
    total = stats + _Stats.of_rows(X, labels, sample_weight, k)
    bases, means, comps, relocated = _update(
        X, labels, total, mind, sample_weight, j, affine, grow, total.N
    )
    if relocated:
        # The batch's rows follow the re-seeded subspaces, whose old rows are
        # forgotten; the others are refitted without them.
        stats = stats + _Stats.empty(k, X.shape[1])
        stats.reset(relocated)
        labels, mind = _assign(X, xsq, _pack(bases, means, affine, comps))
        total = stats + _Stats.of_rows(X, labels, sample_weight, k)
        refit = _update(X, labels, total, mind, sample_weight, j, affine, None, total.N)
        few = _rows_to_fit(j, affine)
        keep = [c for c in range(k) if c in relocated and total.N[c] < few]
        for new, old in zip(refit[:3], (bases, means, comps), strict=True):
            if new is not None:
                new[keep] = old[keep]
        bases, means, comps = refit[:3]
    return bases, means, comps, total
