"""The seeding of a fit on a dask array: k-means||-style oversampling.

The first candidate rows are drawn with probability proportional to
``w * D^2``, D the distance to the empty model (the origin, or the weighted
mean when affine); then, for a few rounds, ``ell = 2 k (j + 1)`` more rows are
drawn with probability proportional to ``w * D^2``, D now the distance to the
nearest candidate (to the line through it for linear subspaces, to the point
for affine flats), by weighted sampling without replacement (each chunk keeps
its rows of largest ``u ** (1 / (w D^2))``, the reduction keeps the largest
overall). Every row then gives its weight to its nearest candidate, and
k-subspaces++ with a few local Lloyd steps runs on the weighted candidates in
memory (Bahmani et al. 2012, for subspaces).

Random draws come from generators seeded by (seed, pass, chunk), so a task
that dask runs again gives the same rows. Also here: the random-partition
start and the re-seeding's neighbourhood, gathered from every chunk.
"""

import numpy as np

from ._backend import NumpyOps
from ._dask import _add, _map_reduce, _tree
from ._lloyd import (
    _BLOCK_ELEMENTS,
    _ksubspaces_single,
    _row_norms_sq,
    _row_step,
    _Stats,
)
from ._seeding import (
    _grow_from,
    _ksubspaces_plusplus,
    _n_neighbors,
    _nearest_by_weight,
    _neighbour_score,
)

_ROUNDS = 5  # oversampling rounds of the seeding
_LOCAL_STARTS = 3  # k-subspaces++ runs on the candidates; the best is kept


def _nearest_candidate(X, xsq, C, affine):
    """Squared distance of each row to its nearest candidate (line or point).

    Returns (distance, index of the candidate); rows are taken in blocks so
    that memory stays O(block * len(C)).
    """
    n = X.shape[0]
    dist, nearest = np.empty(n), np.empty(n, dtype=np.intp)
    csq = np.einsum("ij,ij->i", C, C, dtype=np.float64)
    step = max(1, _BLOCK_ELEMENTS // max(len(C), 1))
    for start in range(0, n, step):
        stop = min(n, start + step)
        dots = (X[start:stop] @ C.T).astype(np.float64)
        if affine:
            dots *= -2.0
            dots += csq
        else:
            with np.errstate(divide="ignore", invalid="ignore"):
                dots = -np.where(csq > 0, dots * dots / csq, 0.0)
        nearest[start:stop] = np.argmin(dots, axis=1)
        best = dots[np.arange(stop - start), nearest[start:stop]]
        dist[start:stop] = np.maximum(xsq[start:stop] + best, 0.0)
    return dist, nearest


def _candidate_dist(X, xsq, C, affine, mean):
    """Squared distance of each row to the nearest candidate, or empty model."""
    if C is None:  # the empty model
        if mean is None:
            return xsq.astype(np.float64)
        return _centred_sq(X, mean)
    return _nearest_candidate(X, xsq, C, affine)[0]


def _centred_sq(X, mean):
    out = np.empty(X.shape[0])
    step = _row_step(X.shape[1])
    mean = mean.astype(X.dtype)
    for start in range(0, X.shape[0], step):
        R = X[start : start + step] - mean
        out[start : start + step] = np.einsum("ij,ij->i", R, R, dtype=np.float64)
    return out


def _sample_task(X, w, b, d2, C_new, affine, mean, m, seed):
    """Weighted sample without replacement of m rows of a chunk, prob. ~ w D^2.

    ``d2`` holds the rows' squared distances to the candidates of the earlier
    rounds (None in the first): only the new candidates ``C_new`` are measured.
    Keys ``log(u) / (w D^2)`` (Efraimidis-Spirakis): the m largest over all
    chunks are a weighted sample of the union.

    Returns (d2, (keys, rows)).
    """
    xsq = _row_norms_sq(X).astype(np.float64)
    new = _candidate_dist(X, xsq, C_new, affine, mean)
    d2 = new if d2 is None else np.minimum(d2, new)
    weight = w.astype(np.float64) * d2
    u = np.random.default_rng([seed, b]).random(X.shape[0])
    with np.errstate(divide="ignore"):
        keys = np.where(weight > 0, np.log(u) / weight, -np.inf)
    top = np.argsort(-keys, kind="stable")[:m]
    top = top[np.isfinite(keys[top])]
    return d2, (keys[top], X[top].copy())


def _combine_sample(m):
    def combine(a, b):
        keys = np.concatenate([a[0], b[0]])
        rows = np.concatenate([a[1], b[1]])
        top = np.argsort(-keys, kind="stable")[:m]
        return keys[top], rows[top]

    return combine


def _weigh_task(X, w, b, C, affine):
    """Weight of the rows nearest to each candidate."""
    xsq = _row_norms_sq(X).astype(np.float64)
    _, nearest = _nearest_candidate(X, xsq, C, affine)
    return (np.bincount(nearest, weights=w.astype(np.float64), minlength=len(C)),)


def _neighbours_task(X, w, b, seed_row, affine, m):
    """A chunk's rows nearest to ``seed_row``, up to a weight of m."""
    xsq = _row_norms_sq(X)
    score = np.where(w > 0, _neighbour_score(X, xsq, seed_row, affine), np.inf)
    rows, wn = _nearest_by_weight(score.astype(np.float64), w, m)
    return score[rows].astype(np.float64), X[rows].copy(), wn


def _combine_neighbours(m):
    def combine(a, b):
        score = np.concatenate([a[0], b[0]])
        rows = np.concatenate([a[1], b[1]])
        wn = np.concatenate([a[2], b[2]])
        keep, kw = _nearest_by_weight(score, wn, m)
        return score[keep], rows[keep], kw

    return combine


def _grow_distributed(blocks, seed_row, j, affine):
    """``_grow`` around a row, its neighbourhood gathered from every chunk."""
    m = _n_neighbors(j) + 1  # the seed itself is among the nearest
    _, rows, wn = _map_reduce(
        blocks, _neighbours_task, _combine_neighbours(m), seed_row, affine, m
    )
    same = np.all(rows == seed_row, axis=1)
    if same.any():  # the seed enters as the constraint; one copy of it less
        first = int(np.flatnonzero(same)[0])
        wn = wn.copy()
        wn[first] = max(wn[first] - 1, 0)
    return _grow_from(seed_row, rows, wn, j, affine)


def _seed(blocks, k, j, affine, mean, rng, dtype):
    """k-means||-style oversampling, then k-subspaces++ on weighted candidates."""
    import dask

    ell = 2 * k * (j + 1)
    C = rows = None
    d2 = [None] * len(blocks)
    for _ in range(_ROUNDS + 1):
        seed = int(rng.randint(2**31))
        # One pass: each chunk measures the new candidates only, keeps its
        # distances (persisted, small: one number per row) and samples.
        outs = dask.persist(
            *[
                dask.delayed(_sample_task, nout=2, pure=True)(
                    x, w, b, d2[b], rows, affine, mean, ell, seed
                )
                for b, (x, w) in enumerate(blocks)
            ]
        )
        d2 = [out[0] for out in outs]
        _, rows = dask.compute(_tree([out[1] for out in outs], _combine_sample(ell)))[0]
        if rows.shape[0] == 0:
            break  # every row lies on a candidate
        C = rows if C is None else np.vstack([C, rows])
    del d2, outs
    if C is None:
        raise ValueError(
            "Every row lies on the empty model (the origin, or the mean when "
            "affine): there is nothing to seed from."
        )
    (weights,) = _map_reduce(blocks, _weigh_task, _add, C, affine)
    keep = weights > 0
    C, weights = np.ascontiguousarray(C[keep], dtype=dtype), weights[keep]
    if C.shape[0] < k:
        raise ValueError(
            f"The rows have fewer than k={k} distinct directions to seed from."
        )
    xsq = _row_norms_sq(C)
    wc = weights.astype(dtype)
    ops = NumpyOps()

    def grow(i):
        return ops.grow(C, xsq, wc, i, j, affine)

    best = None
    for _ in range(_LOCAL_STARTS):  # cheap: a few thousand candidates at most
        bases, means, comps, _, dist = _ksubspaces_plusplus(
            C, xsq, wc, k, j, affine, rng, 2 + int(np.log(k))
        )
        run = _ksubspaces_single(
            C,
            xsq,
            wc,
            bases,
            means,
            comps,
            affine,
            30,
            0.0,
            grow,
            init_dist=dist,
            ops=ops,
        )
        if best is None or run[1] < best[1]:
            best = run
    return best[2], best[3], best[4]


def _random_task(X, w, b, k, seed):
    labels = np.random.default_rng([seed, b]).integers(k, size=X.shape[0])
    return _Stats.of_rows(X, labels.astype(np.int32), w, k)


def _add_stats(a, b):
    return a + b


def random_start(blocks, k, seed):
    """The statistics of a uniformly random partition of the rows."""
    return _map_reduce(blocks, _random_task, _add_stats, k, seed)
