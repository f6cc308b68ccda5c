"""Initial subspaces: k-subspaces++ seeding and the random-partition start."""

from numbers import Integral

import numpy as np
from sklearn.utils import check_random_state
from sklearn.utils._param_validation import Interval, validate_params
from sklearn.utils.validation import _check_sample_weight, check_array

from ._lloyd import (
    _assign,
    _complements,
    _pack,
    _row_norms_sq,
    _row_step,
    _update,
    _use_complement,
)
from ._threads import map_threads, one_blas_thread


def _n_neighbors(j):
    """Rows used to grow a j-dimensional subspace around a seed row."""
    return max(2 * j, j + 5)


def _nearest_by_weight(score, sample_weight, m):
    """Rows of lowest score, up to a total weight of ``m``.

    The last row taken counts with the weight that completes ``m``, so that an
    integer weight acts exactly as that many repeated rows.

    Returns
    -------
    rows : ndarray of int
    weights : ndarray of float64
    """
    finite = int(np.count_nonzero(np.isfinite(score)))
    if finite == 0:
        return np.empty(0, dtype=np.intp), np.empty(0)
    take = min(finite, m)
    while True:
        cand = np.argpartition(score, take - 1)[:take]
        cand = cand[np.argsort(score[cand], kind="stable")]
        cum = np.cumsum(sample_weight[cand], dtype=np.float64)
        if cum[-1] >= m or take == finite:
            break
        take = min(finite, 2 * take)
    stop = int(np.searchsorted(cum, m)) + 1
    rows = cand[:stop]
    weights = sample_weight[rows].astype(np.float64)
    excess = cum[min(stop, cum.size) - 1] - m
    if excess > 0:
        weights[-1] -= excess
    return rows, weights


def _grow(X, xsq, sample_weight, i, j, affine):
    """Grow a j-dimensional subspace (or flat) that contains row ``i``.

    The neighbourhood of the seed is made of the rows closest to it in angle
    (linear subspaces pass through the origin, so a row's direction is what
    matters) or in Euclidean distance (affine flats). The subspace contains the
    seed exactly: for linear subspaces its first direction is the seed's and the
    other j - 1 are the neighbourhood's main directions orthogonal to it; an
    affine flat passes through the seed, along the neighbourhood's main
    directions around it. Containing the seed is what lets a re-seeded cluster
    win at least the row it was grown from.

    Returns
    -------
    basis : ndarray of shape (j, d)
    mean : ndarray of shape (d,)
    complement : ndarray of shape (d - j, d) or None
        The basis' orthonormal complement when distances use it.
    """
    score = np.where(sample_weight > 0, _neighbour_score(X, xsq, X[i], affine), np.inf)
    nb, wn = _neighbourhood(score, sample_weight, i, j)
    return _grow_from(X[i], X[nb], wn, j, affine)


def _neighbourhood(score, sample_weight, i, j):
    """The rows ``_grow`` fits around row i, from their scores (lower is nearer).

    ``score`` is modified in place. Returns the rows and their weights, as
    ``_nearest_by_weight`` does.
    """
    # The seed enters through the constraint of _grow_from; its other copies (an
    # integer weight w stands for w rows) are its nearest neighbours.
    score[i] = -np.inf
    weights = sample_weight.copy()
    weights[i] = max(weights[i] - 1, 0)
    return _nearest_by_weight(score, weights, _n_neighbors(j))


def _neighbour_score(X, xsq, x, affine):
    """Score of every row as a neighbour of ``x``: lower is nearer."""
    dots = X @ x
    if affine:
        return xsq - 2 * dots  # ||x_r - x||^2 up to a constant
    with np.errstate(divide="ignore", invalid="ignore"):
        return -np.where(xsq > 0, dots * dots / xsq, 0.0)  # -cos^2 ||x||^2


def _grow_from(seed, neighbours, wn, j, affine):
    """The subspace (or flat) of ``_grow`` from its seed row and neighbourhood.

    ``neighbours`` are rows, ``wn`` their weights (see ``_nearest_by_weight``).
    """
    with one_blas_thread():  # small dense factorizations: see there
        return _grow_from_impl(seed, neighbours, wn, j, affine)


def _grow_from_impl(seed, neighbours, wn, j, affine):
    d = seed.shape[0]
    dtype = seed.dtype
    x = seed.astype(np.float64)
    Xn = neighbours.astype(np.float64) * np.sqrt(wn)[:, None]
    want_comp = _use_complement(j, d)
    if affine:
        mean = seed.copy()
        Xn = Xn - np.sqrt(wn)[:, None] * x
        u = np.empty((0, d))
    else:
        mean = np.zeros(d, dtype=dtype)
        norm = np.linalg.norm(x)
        u = (x / norm if norm > 0 else np.eye(d)[0])[None]
        Xn = Xn - np.outer(Xn @ u[0], u[0])  # the seed's direction is taken
    need = j - u.shape[0]
    if Xn.shape[0] < d:  # fewer neighbours than features: SVD of the rows
        _, _, vt = np.linalg.svd(Xn, full_matrices=Xn.shape[0] < need)
        q, _ = np.linalg.qr(np.vstack([u, vt[:need]]).T)  # orthonormal again
        basis = np.ascontiguousarray(q.T, dtype=dtype)
        comp = _complements(basis[None])[0] if want_comp else None
        return basis, mean, comp
    scatter = Xn.T @ Xn
    if u.shape[0]:
        # Put u on top of the spectrum: the eigenvectors of P S P with u's zero
        # eigenvalue lifted above all others.
        scatter += (np.trace(scatter) + 1.0) * np.outer(u[0], u[0])
    _, vecs = np.linalg.eigh(scatter)
    basis = np.ascontiguousarray(vecs[:, : d - j - 1 : -1].T, dtype=dtype)
    comp = None
    if want_comp:
        comp = np.ascontiguousarray(vecs[:, : d - j].T, dtype=dtype)
    return basis, mean, comp


def _initial_potential(X, xsq, sample_weight, affine):
    """Squared distance of each row to the empty model (origin, or the mean)."""
    if not affine:
        return xsq.astype(np.float64)
    mean = ((sample_weight @ X) / sample_weight.sum()).astype(X.dtype)
    n = X.shape[0]
    out = np.empty(n)
    step = _row_step(X.shape[1])
    for start in range(0, n, step):  # blocks: no centred copy of X
        R = X[start : start + step] - mean
        out[start : start + step] = np.einsum("ij,ij->i", R, R, dtype=np.float64)
    return out


def _ksubspaces_plusplus(
    X,
    xsq,
    sample_weight,
    k,
    j,
    affine,
    rng,
    n_local_trials,
    assign=_assign,
    grow=None,
    parallel=True,
):
    """Worker of ``ksubspaces_plusplus`` on validated input.

    ``assign`` computes the distances of the rows to the trial subspaces
    (``_assign``, or another backend's), and ``grow(i)`` the subspace grown
    around row i (``_grow`` by default, or another backend's). ``parallel``:
    grow a step's trials side by side, one thread per core (numpy's LAPACK
    releases the GIL); a device backend's grow runs in sequence.
    """
    if grow is None:

        def grow(i):
            return _grow(X, xsq, sample_weight, i, j, affine)

    n, d = X.shape
    bases = np.empty((k, j, d), dtype=X.dtype)
    means = np.zeros((k, d), dtype=X.dtype)
    indices = np.empty(k, dtype=np.intp)
    want_comp = _use_complement(j, d)
    comps = np.empty((k, d - j, d), dtype=X.dtype) if want_comp else None
    pot = _initial_potential(X, xsq, sample_weight, affine)
    positive = np.flatnonzero(sample_weight > 0)
    chosen_dist = np.empty((n, k))  # saves the fit its first assignment
    for c in range(k):
        weighted = sample_weight * pot
        cumulative = np.cumsum(weighted)
        total = cumulative[-1]
        if total > 0:
            draws = rng.uniform(size=n_local_trials) * total
            cand = np.minimum(np.searchsorted(cumulative, draws), n - 1)
        else:  # every row already lies on a chosen subspace
            cand = rng.choice(positive, size=n_local_trials)
        trial_bases = np.empty((n_local_trials, j, d), dtype=X.dtype)
        trial_means = np.zeros((n_local_trials, d), dtype=X.dtype)
        trial_comps = (
            np.empty((n_local_trials, d - j, d), dtype=X.dtype) if want_comp else None
        )
        grown = map_threads(grow, cand, parallel=parallel)
        for t, (basis, mean, comp) in enumerate(grown):
            trial_bases[t], trial_means[t] = basis, mean
            if want_comp:
                trial_comps[t] = comp
        packed = _pack(trial_bases, trial_means, affine, trial_comps)
        _, _, dist = assign(X, xsq, packed, return_distances=True)
        potentials = sample_weight @ np.minimum(pot[:, None], dist)
        best = int(np.argmin(potentials))
        bases[c], means[c] = trial_bases[best], trial_means[best]
        indices[c] = cand[best]
        if want_comp:
            comps[c] = trial_comps[best]
        pot = np.minimum(pot, dist[:, best])
        chosen_dist[:, c] = dist[:, best]
    return bases, means, comps, indices, chosen_dist


def _random_partition(X, xsq, sample_weight, k, j, affine, rng, grow, ops):
    """Subspaces fitted to a uniformly random partition of the rows.

    ``ops`` is the backend's statistics and assignment (``kflats._backend``).
    """
    labels = rng.randint(k, size=X.shape[0]).astype(np.int32)
    pot = _initial_potential(X, xsq, sample_weight, affine)
    stats = ops.stats(X, labels, sample_weight, k)
    bases, means, comps, _ = _update(
        X, labels, stats, pot, sample_weight, j, affine, grow, assign=ops.assign
    )
    return bases, means, comps


@validate_params(
    {
        "X": ["array-like"],
        "k": [Interval(Integral, 1, None, closed="left")],
        "j": [Interval(Integral, 1, None, closed="left")],
        "affine": ["boolean"],
        "sample_weight": ["array-like", None],
        "n_local_trials": [Interval(Integral, 1, None, closed="left"), None],
        "random_state": ["random_state"],
    },
    prefer_skip_nested_validation=True,
)
def ksubspaces_plusplus(
    X,
    k,
    j,
    *,
    affine=False,
    sample_weight=None,
    n_local_trials=None,
    random_state=None,
):
    """Initial subspaces for k-subspaces, chosen by k-subspaces++ seeding.

    Like k-means++, seed rows are drawn with probability proportional to
    ``sample_weight * D^2``, D being the distance of a row to the subspaces chosen
    so far (to the origin at first, or to the mean for affine flats). Each seed
    grows into a j-dimensional subspace fitted to its neighbourhood (the rows
    nearest to it in angle, or in distance for affine flats). At each step
    ``n_local_trials`` candidates are grown and the one that lowers the
    potential ``sum(sample_weight * D^2)`` most is kept (greedy local trials).

    Parameters
    ----------
    X : array-like of shape (n_samples, n_features)
        The rows to seed from; float32 stays float32.
    k : int
        Number of subspaces.
    j : int
        Dimension of each subspace; ``j < n_features``.
    affine : bool, default=False
        Seed affine flats (with means) instead of linear subspaces.
    sample_weight : array-like of shape (n_samples,), default=None
        Non-negative weight of each row; ``None`` weighs every row 1.
    n_local_trials : int, default=None
        Candidates per step; ``None`` takes ``2 + int(log(k))``.
    random_state : int, RandomState instance or None, default=None
        Seed of the draws.

    Returns
    -------
    bases : ndarray of shape (k, j, n_features)
        Orthonormal rows spanning each subspace.
    means : ndarray of shape (k, n_features)
        Zeros unless ``affine``.
    indices : ndarray of shape (k,)
        The seed row of each subspace.

    Examples
    --------
    >>> import numpy as np
    >>> from kflats import ksubspaces_plusplus
    >>> rng = np.random.RandomState(0)
    >>> X = np.vstack([np.outer(rng.randn(50), [1, 0, 0]),
    ...                np.outer(rng.randn(50), [0, 1, 1])])
    >>> bases, means, indices = ksubspaces_plusplus(X, k=2, j=1, random_state=0)
    >>> bases.shape, means.shape, indices.shape
    ((2, 1, 3), (2, 3), (2,))
    """
    X = check_array(X, dtype=[np.float64, np.float32])
    n, d = X.shape
    if k > n:
        raise ValueError(f"k={k} must be <= n_samples={n}.")
    if j >= d:
        raise ValueError(f"j={j} must be smaller than n_features={d}.")
    sample_weight = _check_sample_weight(
        sample_weight, X, dtype=X.dtype, ensure_non_negative=True
    )
    if not np.any(sample_weight > 0):
        raise ValueError("sample_weight must have at least one positive entry.")
    rng = check_random_state(random_state)
    if n_local_trials is None:
        n_local_trials = 2 + int(np.log(k))
    bases, means, _, indices, _ = _ksubspaces_plusplus(
        X, _row_norms_sq(X), sample_weight, k, j, affine, rng, n_local_trials
    )
    return bases, means, indices
