"""The dask backend of the fit: ``DaskOps``, the protocol of ``kflats._backend``.

X is a dask array of rows, chunked along the rows only. Every operation that
reads the rows is one task per chunk and a tree of reductions that adds up
what the tasks return, which is small: the clusters' statistics (as
``kflats._lloyd._Stats`` are added, the way dask k-means reduces its sums),
a cost, a row. The rows are never gathered. An assignment persists its
labels on the workers (an int32 per row) and, in the same pass, reduces the
statistics of the new labels, their cost, the farthest row and the number of
rows whose label changed, which the update, its re-seeding and the loop's
stopping rule then use: one pass per Lloyd iteration, and one for the final
cost from the residuals.
A task depends only on its chunk and on the subspaces it is given, so a task
that dask runs again (a worker lost mid-fit) gives the same result and the
fit is unchanged.
"""

from dataclasses import dataclass

import numpy as np

from ._dask import _add, _blocks, _check_weight, _map_reduce, _tree, check_array
from ._dask_seeding import _centred_sq, _grow_distributed, _seed, random_start
from ._lloyd import (
    _assign,
    _exact_mind,
    _row_norms_sq,
    _rows_to_fit,
    _Stats,
    _use_complement,
)


def fit_input(X, sample_weight):
    """X and its weights as a fit on dask takes them, both dask arrays."""
    X = check_array(X)
    return X, _check_weight(sample_weight, X)


class DaskOps:
    """Assignment, statistics, update and re-seeding of a dask array of rows."""

    parallel = False  # the update's k eigendecompositions run in sequence

    def __init__(self, X, sample_weight):
        self._blocks = _blocks(X, sample_weight)
        self._sizes = X.chunks[0]
        self._starts = np.concatenate([[0], np.cumsum(self._sizes)[:-1]]).astype(int)
        self._data = None  # W, sum w x, cost of the origin, positive weights
        self._pass = None  # the last assignment and what its pass reduced

    # -- the data: one pass ------------------------------------------------------

    def _summary(self):
        if self._data is None:
            W, s, cost, n_pos, bad = _map_reduce(
                self._blocks, _potential_task, _add, None
            )
            if bad:
                raise ValueError(f"Input X contains NaN or infinity ({bad} rows).")
            self._data = W, s, cost, int(n_pos)
        return self._data

    def n_positive(self, sample_weight):
        return self._summary()[3]

    def _mean(self):
        W, s, _, _ = self._summary()
        return s / W

    def empty_cost(self, X, xsq, sample_weight, affine):
        if not affine:
            return self._summary()[2]
        return _map_reduce(self._blocks, _potential_task, _add, self._mean())[2]

    def initial(self, init, X, xsq, sample_weight, k, j, affine, rng, grow):
        """Given bases, a random partition, or k-means|| then k-subspaces++."""
        mean = self._mean() if affine else None
        if not isinstance(init, str):
            bases = np.array(init, dtype=X.dtype, copy=True)
            means = np.zeros((k, X.shape[1]), dtype=X.dtype)
            if affine:
                means[:] = mean
            return bases, means, None, None
        if init == "random":
            stats = random_start(self._blocks, k, int(rng.randint(2**31)))
            return *_from_stats(stats, k, j, affine, X.dtype), None
        return *_seed(self._blocks, k, j, affine, mean, rng, X.dtype), None

    # -- Lloyd: one pass per assignment ----------------------------------------

    def assign(self, X, xsq, packed, return_distances=False):
        """Labels, persisted on the workers, and the pass in place of distances.

        The distances are not kept: the same pass reduces what the rest of the
        iteration needs of them and of the labels (a ``_Pass``: the statistics
        of the labels, the weighted cost, the farthest row of positive weight
        and the number of rows whose label changed since the last assignment),
        and that stands for ``mind`` in ``cost``, ``update`` and ``exact_mind``.
        """
        import dask

        if return_distances:
            raise NotImplementedError("a dask fit seeds on its candidates")
        last = self._pass
        before = [None] * len(self._blocks) if last is None else last.parts
        parts = dask.persist(
            *[
                dask.delayed(_assign_task, nout=2, pure=True)(x, w, start, packed, old)
                for (x, w), start, old in zip(
                    self._blocks, self._starts, before, strict=True
                )
            ]
        )
        reduced = dask.compute(_tree([p[1] for p in parts], _combine_assigned))[0]
        labels = [p[0] for p in parts]
        self._pass = _Pass(
            self._array(labels, np.int32),
            labels,
            None if last is None else last.labels,
            *reduced,
        )
        return self._pass.labels, self._pass

    def _array(self, parts, dtype):
        import dask.array as da

        return da.concatenate(
            [
                da.from_delayed(p, shape=(n,), dtype=dtype)
                for p, n in zip(parts, self._sizes, strict=True)
            ]
        )

    def _of(self, labels):
        """The last pass, which must have given ``labels``."""
        if self._pass is None or labels is not self._pass.labels:
            raise RuntimeError("the labels are not those of the last assignment")
        return self._pass

    def cost(self, sample_weight, mind):
        if isinstance(mind, _Pass):
            return mind.cost  # reduced by the pass
        return float((sample_weight @ mind).compute())  # one pass

    def stats(self, X, labels, sample_weight, k):
        return _DaskStats(self, self._of(labels).stats)

    def update(self, X, labels, stats, mind, sample_weight, j, affine, grow):
        """Refit every subspace to its statistics; re-seed one starved cluster.

        A starved cluster (fewer than j rows of positive weight, j + 1 for an
        affine flat) grows a new subspace around the farthest row, one per
        pass: the next pass measures the rows again.
        """
        k = stats.W.size
        bases, means, comps = _from_stats(stats, k, j, affine, X.dtype)
        starved = np.flatnonzero(stats.N < _rows_to_fit(j, affine))
        if grow is None or not starved.size or not mind.far > 0:
            return bases, means, comps, []
        c = int(starved[0])
        for out, grown in zip((bases, means, comps), grow(mind.index), strict=True):
            if out is not None:
                out[c] = grown
        return bases, means, comps, [c]

    def grow(self, X, xsq, sample_weight, i, j, affine):
        """The subspace grown around row i, its neighbours gathered in one pass."""
        if self._pass is not None and self._pass.index == i:
            row = self._pass.row  # the farthest row came with the last pass
        else:
            row = np.asarray(X[i].compute())
        return _grow_distributed(self._blocks, row, j, affine)

    def exact_mind(self, X, xsq, labels, mind, packed, bases, means):
        """The distances from the residuals, lazily: one more pass when summed."""
        import dask

        if packed.complement:
            return mind
        parts = [
            dask.delayed(_exact_task, pure=True)(x, lab, packed, bases, means)
            for (x, _), lab in zip(self._blocks, self._of(labels).parts, strict=True)
        ]
        return self._array(parts, np.float64)


@dataclass
class _Pass:
    """An assignment of the rows of a dask array, and what its pass reduced."""

    labels: object  # a dask array, persisted
    parts: list  # the persisted labels of every chunk
    previous: object  # the labels of the assignment before, or None
    stats: _Stats
    cost: float
    far: float  # the farthest row of positive weight: its distance,
    index: int  # its index in X
    row: np.ndarray  # and the row
    moved: int  # rows whose label is not the one before


class _DaskStats:
    """The clusters' statistics of a dask fit: those of its last assignment."""

    def __init__(self, ops, stats):
        self._ops, self._stats = ops, stats

    @property
    def W(self):
        return self._stats.W

    @property
    def N(self):
        return self._stats.N

    @property
    def s(self):
        return self._stats.s

    def subspace(self, c, j, affine, dtype, want_complement):
        return self._stats.subspace(c, j, affine, dtype, want_complement)

    def move(self, X, old, new, sample_weight):
        """The statistics of ``new`` (reduced by its pass); rows that moved."""
        last = self._ops._of(new)
        self._stats = last.stats
        if old is last.previous:
            return last.moved  # counted by the pass
        return int((old != new).sum().compute())


def _from_stats(stats, k, j, affine, dtype):
    """Every cluster's subspace fitted to its statistics."""
    d = stats.s.shape[1]
    want = _use_complement(j, d)
    bases = np.empty((k, j, d), dtype=dtype)
    means = np.zeros((k, d), dtype=dtype)
    comps = np.empty((k, d - j, d), dtype=dtype) if want else None
    for c in range(k):
        bases[c], means[c], comp = stats.subspace(c, j, affine, dtype, want)
        if want:
            comps[c] = comp
    return bases, means, comps


# -- chunk tasks -----------------------------------------------------------------


def _potential_task(X, w, b, mean):
    """Weight, weighted sum of rows and potential to the empty model."""
    if mean is None:
        pot = _row_norms_sq(X).astype(np.float64)
    else:
        pot = _centred_sq(X, mean)
    w64 = w.astype(np.float64)
    bad = int(np.count_nonzero(~np.isfinite(pot)))
    pot[~np.isfinite(pot)] = 0.0
    return (
        w64.sum(),
        w64 @ X.astype(np.float64),
        float(w64 @ pot),
        np.count_nonzero(w),
        bad,
    )


def _assign_task(X, w, start, packed, before):
    """A chunk's labels and distances, and its part of the reduction.

    The part is (stats, cost, far, index, row, moved): the statistics of the
    chunk's clusters, its weighted cost, its positive-weight row farthest from
    its subspace (for re-seeding) with its index in X, and the number of its
    rows whose label differs from ``before`` (None: all of them).
    """
    xsq = _row_norms_sq(X)
    labels, mind = _assign(X, xsq, packed)
    stats = _Stats.of_rows(X, labels, w, packed.k)
    moved = X.shape[0] if before is None else int(np.count_nonzero(labels != before))
    cost = float(w @ mind)
    if X.shape[0] == 0:
        row = np.zeros(X.shape[1], X.dtype)
        return labels, (stats, cost, -np.inf, -1, row, moved)
    far = np.where(w > 0, mind, -np.inf)
    i = int(np.argmax(far))
    return labels, (stats, cost, far[i], int(start) + i, X[i].copy(), moved)


def _combine_assigned(a, b):
    far = a if a[2] >= b[2] else b
    return (a[0] + b[0], a[1] + b[1]) + far[2:5] + (a[5] + b[5],)


def _exact_task(X, labels, packed, bases, means):
    """The residuals of a chunk's rows (``packed`` not in the complement form)."""
    return _exact_mind(X, _row_norms_sq(X), labels, None, packed, bases, means)
