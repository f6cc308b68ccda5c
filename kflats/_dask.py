"""KSubspaces on Dask arrays: each pass is one map over row chunks, one reduction.

Every pass over the rows (a Lloyd step, a round of the seeding) runs one task
per chunk of rows, which returns something small (the per-cluster statistics of
``kflats._lloyd._Stats``, a weighted sample, a cost), and one tree of
reductions that adds them up; only these small results travel, and the rows
are never gathered. A task depends only on its chunk and on the subspaces
it is given, and random draws come from generators seeded by (seed, pass,
chunk), so a task that dask runs again (a worker lost mid-fit) gives the same
result and the fit is unchanged.

Seeding (k-means||-style, Bahmani et al. 2012, for subspaces): the first
candidate rows are drawn with probability proportional to ``w * D^2``, D
the distance to the empty model (the origin, or the weighted mean when
affine); then, for a few rounds, ``ell = 2 k (j + 1)`` more rows are drawn with
probability proportional to ``w * D^2``, D now the distance to the nearest
candidate (to the line through it for linear subspaces, to the point for affine
flats), by weighted sampling without replacement (each chunk keeps its rows of
largest ``u ** (1 / (w D^2))``, the reduction keeps the largest overall). Every
row then gives its weight to its nearest candidate, and k-subspaces++ with a
few local Lloyd steps runs on the weighted candidates in memory.

This module imports dask only when a dask array is passed.
"""

import math
import sys
from functools import reduce

import numpy as np

from ._lloyd import (
    _BLOCK_ELEMENTS,
    _assign,
    _exact_mind,
    _pack,
    _row_norms_sq,
    _row_step,
    _Stats,
    _use_complement,
)
from ._seeding import (
    _grow_from,
    _ksubspaces_plusplus,
    _n_neighbors,
    _nearest_by_weight,
    _neighbour_score,
)

_ROUNDS = 5  # oversampling rounds of the seeding
_FAN_IN = 8  # partial results added per reduction task
_LOCAL_STARTS = 3  # k-subspaces++ runs on the candidates; the best is kept


def is_dask_array(X):
    """Whether X is a dask array (without importing dask)."""
    if "dask.array" not in sys.modules:
        return False
    import dask.array as da

    return isinstance(X, da.Array)


def check_array(X, n_features=None, name="X"):
    """Validate a dask array of rows: 2-D, chunked along rows only, float."""
    if X.ndim != 2:
        raise ValueError(f"Expected a 2-D dask array for {name}, got {X.ndim}-D.")
    if any(math.isnan(c) for c in X.chunks[0]):
        raise ValueError(
            f"{name} has unknown chunk sizes along the rows (as after boolean "
            "indexing); call X.compute_chunk_sizes() first."
        )
    if len(X.chunks[1]) != 1:
        raise ValueError(
            f"{name} is chunked along the feature axis (chunks {X.chunks[1]}); "
            "KSubspaces needs whole rows in every chunk: chunk it along the rows "
            "only, e.g. X.rechunk({1: -1})."
        )
    if X.shape[0] == 0:
        raise ValueError(f"{name} has 0 rows; at least 1 is required.")
    if n_features is not None and X.shape[1] != n_features:
        raise ValueError(
            f"X has {X.shape[1]} features, but KSubspaces is expecting "
            f"{n_features} features as input."
        )
    if X.dtype not in (np.float32, np.float64):
        X = X.astype(np.float64)
    return X


def _check_weight(sample_weight, X):
    import dask.array as da

    if sample_weight is None:
        return da.ones(X.shape[0], dtype=X.dtype, chunks=(X.chunks[0],))
    if not is_dask_array(sample_weight):
        sample_weight = np.asarray(sample_weight, dtype=X.dtype)
        if sample_weight.ndim == 0:
            sample_weight = np.full(X.shape[0], sample_weight, dtype=X.dtype)
        if sample_weight.shape != (X.shape[0],):
            raise ValueError(
                f"sample_weight has shape {sample_weight.shape}; expected "
                f"({X.shape[0]},)."
            )
        if np.any(sample_weight < 0):
            raise ValueError("Negative values in data passed to sample_weight")
        return da.from_array(sample_weight, chunks=(X.chunks[0],))
    if sample_weight.shape != (X.shape[0],):
        raise ValueError(
            f"sample_weight has shape {sample_weight.shape}; expected ({X.shape[0]},)."
        )
    return sample_weight.astype(X.dtype).rechunk((X.chunks[0],))


def _blocks(X, sample_weight):
    xb = X.to_delayed().ravel().tolist()
    wb = sample_weight.to_delayed().ravel().tolist()
    return list(zip(xb, wb, strict=True))


def _map_reduce(blocks, task, combine, *args):
    """``combine`` over ``task(x, w, b, *args)`` of every chunk: one compute."""
    import dask

    parts = [
        dask.delayed(task, pure=True)(x, w, b, *args) for b, (x, w) in enumerate(blocks)
    ]
    return dask.compute(_tree(parts, combine))[0]


def _tree(parts, combine):
    """A tree of ``combine`` over delayed ``parts``, ``_FAN_IN`` at a time."""
    import dask

    while len(parts) > 1:
        parts = [
            dask.delayed(_combine_all, pure=True)(combine, *parts[i : i + _FAN_IN])
            for i in range(0, len(parts), _FAN_IN)
        ]
    return parts[0]


def _combine_all(combine, *parts):
    return reduce(combine, parts)


def _add(a, b):
    return tuple(x + y for x, y in zip(a, b, strict=True))


# -- chunk tasks -----------------------------------------------------------------


def _lloyd_task(X, w, b, packed, k, exact=None):
    """Assign a chunk to its nearest subspaces; their statistics and the cost.

    Returns (stats, cost, far_value, far_row, count_positive): ``far_*`` is the
    chunk's positive-weight row farthest from its subspace (for re-seeding).
    """
    xsq = _row_norms_sq(X)
    labels, mind = _assign(X, xsq, packed)
    if exact is not None:
        mind = _exact_mind(X, xsq, labels, mind, packed, *exact)
    stats = _Stats.of_rows(X, labels, w, k)
    if X.shape[0] == 0:
        return stats, 0.0, -np.inf, np.zeros(X.shape[1], dtype=X.dtype)
    far = np.where(w > 0, mind, -np.inf)
    i = int(np.argmax(far))
    return stats, float(w @ mind), far[i], X[i].copy()


def _combine_lloyd(a, b):
    stats = a[0] + b[0]
    far = a if a[2] >= b[2] else b
    return stats, a[1] + b[1], far[2], far[3]


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


# -- the fit ---------------------------------------------------------------------


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
    from ._backend import NumpyOps
    from ._lloyd import _ksubspaces_single

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


def fit(est, X, sample_weight, rng):
    """Fit ``est`` (validated parameters) to a dask array; returns the results.

    Returns
    -------
    bases, means, comps, inertia, n_iter
    """
    X = check_array(X)
    n, d = X.shape
    k, j, affine = est.k, est.j, est.affine
    est._check_sizes(n, d, None)  # what the shape alone tells, before a pass
    sample_weight = _check_weight(sample_weight, X)
    blocks = _blocks(X, sample_weight)
    W, s, empty_cost, n_pos, bad = _map_reduce(blocks, _potential_task, _add, None)
    if bad:
        raise ValueError(f"Input X contains NaN or infinity ({bad} rows).")
    est._check_sizes(n, d, n_pos)
    mean = s / W if affine else None
    if affine:  # the potential to the mean needs the mean: one more pass
        empty_cost = _map_reduce(blocks, _potential_task, _add, mean)[2]
    tol = est.tol * empty_cost
    is_array = not isinstance(est.init, str)
    best = None
    for _ in range(est._n_init):
        if is_array:
            bases = np.array(est.init, dtype=X.dtype, copy=True)
            means = np.zeros((k, d), dtype=X.dtype)
            if affine:
                means[:] = mean
            comps = None
        elif est.init == "random":
            stats = _map_reduce(
                blocks, _random_task, _add_stats, k, int(rng.randint(2**31))
            )
            bases, means, comps = _from_stats(stats, k, j, affine, X.dtype)
        else:
            bases, means, comps = _seed(blocks, k, j, affine, mean, rng, X.dtype)
        result = _lloyd(blocks, bases, means, comps, k, j, affine, est, tol, n_pos)
        if best is None or result[3] < best[3]:
            best = result
    return best


def _random_task(X, w, b, k, seed):
    labels = np.random.default_rng([seed, b]).integers(k, size=X.shape[0])
    return _Stats.of_rows(X, labels.astype(np.int32), w, k)


def _add_stats(a, b):
    return a + b


def _from_stats(stats, k, j, affine, dtype):
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


def _lloyd(blocks, bases, means, comps, k, j, affine, est, tol, n_pos):
    """Lloyd's iterations, each one map-reduce pass; the final cost is exact.

    As in memory: stop once an iteration gains at most ``tol``; re-seed a
    starved cluster (fewer than j rows) around the farthest row while it pays.
    """
    previous, n_iter = np.inf, 0
    relocate, relocated = n_pos >= k * j, False
    for n_iter in range(est.max_iter + 1):
        packed = _pack(bases, means, affine, comps)
        stats, cost, far, far_row = _map_reduce(
            blocks, _lloyd_task, _combine_lloyd, packed, k
        )
        if est.verbose:
            print(f"Iteration {n_iter}, inertia {cost:.6g}.")
        if n_iter:
            if relocated and previous - cost <= 0:
                relocate = False
            if not relocated and previous - cost <= tol:
                break
        if n_iter == est.max_iter:
            break
        previous = cost
        new = _from_stats(stats, k, j, affine, bases.dtype)
        starved = np.flatnonzero(stats.N < j)
        relocated = bool(relocate and starved.size and far > 0)
        if relocated:  # one starved cluster per pass, around the farthest row
            grown = _grow_distributed(blocks, far_row, j, affine)
            for arr, g in zip(new, grown, strict=True):
                if arr is not None:
                    arr[starved[0]] = g
        bases, means, comps = new
    packed = _pack(bases, means, affine, comps)
    _, inertia, _, _ = _map_reduce(
        blocks, _lloyd_task, _combine_lloyd, packed, k, (bases, means)
    )
    return bases, means, comps, inertia, n_iter


# -- score: one pass; predict, transform, coordinates, project: lazy -------------


def _check_finite(X):
    """A chunk's rows are finite, or a ValueError (raised when it is computed)."""
    bad = np.count_nonzero(~np.isfinite(X).all(axis=1))
    if bad:
        raise ValueError(f"Input X contains NaN or infinity ({bad} rows in a chunk).")
    return X


def _checked(fn):
    """``fn`` of a chunk, after checking that its rows are finite."""

    def block(X, *args):
        return fn(_check_finite(X), *args)

    return block


def _score_task(X, w, b, packed, bases, means):
    _check_finite(X)
    xsq = _row_norms_sq(X)
    labels, mind = _assign(X, xsq, packed)
    return (float(w @ _exact_mind(X, xsq, labels, mind, packed, bases, means)),)


def cost(X, sample_weight, packed, bases, means):
    """Weighted cost of a dask array's rows: one map over the chunks, one sum."""
    blocks = _blocks(X, _check_weight(sample_weight, X))
    (total,) = _map_reduce(blocks, _score_task, _add, packed, bases, means)
    return total


def map_rows(X, fn, width, dtype):
    """``fn`` over the row chunks of X, each giving (rows, width), lazily."""
    return X.map_blocks(_checked(fn), chunks=(X.chunks[0], (width,)), dtype=dtype)


def batches(X, sample_weight):
    """The chunks of X (and of the weights) one at a time, as numpy arrays."""
    import dask

    weights = _check_weight(sample_weight, X) if sample_weight is not None else None
    for b, x in enumerate(X.to_delayed().ravel()):
        if weights is None:
            yield dask.compute(x)[0], None
        else:
            yield dask.compute(x, weights.blocks[b])


def _predict_block(X, packed):
    return _assign(X, _row_norms_sq(X), packed)[0]


def predict(X, packed):
    """Labels of a dask array's rows, lazily."""
    return X.map_blocks(_checked(_predict_block), packed, drop_axis=1, dtype=np.int32)


def transform(X, transform_block, k):
    """Distances of a dask array's rows to every subspace, lazily."""
    return X.map_blocks(
        _checked(transform_block), chunks=(X.chunks[0], (k,)), dtype=X.dtype
    )
