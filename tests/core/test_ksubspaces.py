"""Behaviour of KSubspaces: exact references, properties, bad input."""

import pickle
import warnings

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from numpy.testing import assert_allclose, assert_array_equal
from scipy.stats import ortho_group
from sklearn.base import clone
from sklearn.exceptions import ConvergenceWarning
from sklearn.metrics import adjusted_rand_score
from sklearn.model_selection import GridSearchCV
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from kflats import KSubspaces, _backend, _threads, ksubspaces_plusplus
from kflats._lloyd import _assign, _pack, _row_norms_sq, _Stats, _update
from kflats._seeding import _grow

SETTINGS = settings(max_examples=25, deadline=None)


def projectors(bases):
    """Orthogonal projectors B^T B of each subspace: basis-independent."""
    return np.einsum("kjd,kje->kde", bases, bases)


def union_of_subspaces(rng, k, j, d, n_per, noise=0.0, affine=False):
    """Rows drawn from k random j-dimensional subspaces of R^d."""
    bases = [np.linalg.qr(rng.randn(d, j))[0].T for _ in range(k)]
    X, y = [], []
    for c, B in enumerate(bases):
        rows = rng.randn(n_per, j) @ B
        if affine:
            rows += 3 * rng.randn(d)
        X.append(rows)
        y += [c] * n_per
    X = np.vstack(X) + noise * rng.randn(k * n_per, d)
    return X, np.array(y)


def random_data(seed, n, d, dtype=np.float64):
    return np.random.RandomState(seed).randn(n, d).astype(dtype)


problem = st.fixed_dictionaries(
    {
        "seed": st.integers(0, 2**16),
        "n": st.integers(12, 60),
        "d": st.integers(2, 7),
        "k": st.integers(1, 4),
        "j_frac": st.floats(0.0, 1.0),
        "affine": st.booleans(),
        "dtype": st.sampled_from([np.float32, np.float64]),
    }
)


def draw(p, well_posed=False):
    """Data, k and j for a drawn problem.

    ``well_posed`` gives every cluster room for more rows than its dimension,
    so that no row sits at distance zero from two subspaces (an exact tie that
    rounding alone would break one way or the other).
    """
    j = 1 + int(p["j_frac"] * (p["d"] - 2))  # 1 <= j <= d - 1
    n = max(p["n"], 3 * p["k"] * (j + 1)) if well_posed else p["n"]
    X = random_data(p["seed"], n, p["d"], p["dtype"])
    return X, p["k"], j


# -- invariants of every fit ---------------------------------------------------


@SETTINGS
@given(problem)
def test_fit_invariants(p):
    X, k, j = draw(p)
    ks = KSubspaces(k=k, j=j, affine=p["affine"], random_state=p["seed"]).fit(X)
    d = X.shape[1]
    assert ks.bases_.shape == (k, j, d) and ks.means_.shape == (k, d)
    assert ks.bases_.dtype == X.dtype and ks.means_.dtype == X.dtype
    assert ks.labels_.min() >= 0 and ks.labels_.max() < k
    tol = 1e-4 if X.dtype == np.float32 else 1e-10
    gram = np.einsum("kid,kjd->kij", ks.bases_, ks.bases_)
    assert_allclose(gram, np.broadcast_to(np.eye(j), gram.shape), atol=tol)
    if not p["affine"]:
        assert not ks.means_.any()
    assert_array_equal(ks.predict(X), ks.labels_)
    # inertia_ is the cost of labels_ and the best assignment's cost
    dist = ks.transform(X).astype(np.float64) ** 2
    assert_array_equal(dist.argmin(axis=1), ks.labels_)
    assert ks.inertia_ == pytest.approx(dist.min(axis=1).sum(), rel=1e-3, abs=1e-6)
    # score sums residuals computed in X's dtype; in float32 a residual of norm
    # r next to rows of norm |x| keeps about eps |x| / r of its digits.
    rel = 1e-4 if X.dtype == np.float32 else 1e-9
    assert ks.score(X) == pytest.approx(-ks.inertia_, rel=rel, abs=1e-9)


@SETTINGS
@given(problem)
def test_projection_and_coordinates(p):
    X, k, j = draw(p)
    ks = KSubspaces(k=k, j=j, affine=p["affine"], random_state=0).fit(X)
    labels, coords = ks.coordinates(X)
    X_proj = ks.project(X)
    assert coords.shape == (X.shape[0], j) and X_proj.dtype == X.dtype
    assert_array_equal(labels, ks.labels_)
    B, mu = ks.bases_[labels], ks.means_[labels]
    assert_allclose(X_proj, mu + np.einsum("nj,njd->nd", coords, B), atol=1e-4)
    # the residual is orthogonal to the subspace and its norm is the distance
    R = (X - X_proj).astype(np.float64)
    atol = 1e-3 if X.dtype == np.float32 else 1e-9
    assert_allclose(np.einsum("nd,njd->nj", R, B), 0, atol=atol)
    assert_allclose((R**2).sum(), ks.inertia_, rtol=1e-3, atol=atol)


@SETTINGS
@given(problem)
def test_same_random_state_same_fit(p):
    X, k, j = draw(p)
    for init in ["k-subspaces++", "random"]:
        a = KSubspaces(k=k, j=j, init=init, random_state=p["seed"]).fit(X)
        b = KSubspaces(k=k, j=j, init=init, random_state=p["seed"]).fit(X)
        assert_array_equal(a.labels_, b.labels_)
        assert_array_equal(a.bases_, b.bases_)
        assert a.inertia_ == b.inertia_


@SETTINGS
@given(problem)
def test_threads_do_not_change_the_fit(p):
    """The update's and the seeding's factorizations on 1 or 4 threads."""
    X, k, j = draw(p)
    fits = []
    blas_threads = _threads.blas_threads
    try:
        for n_cores in (1, 4):
            _threads.blas_threads = lambda n=n_cores: n
            fits.append(KSubspaces(k=k, j=j, random_state=p["seed"]).fit(X))
    finally:
        _threads.blas_threads = blas_threads
    assert_array_equal(fits[0].labels_, fits[1].labels_)
    assert_array_equal(fits[0].bases_, fits[1].bases_)
    assert fits[0].inertia_ == fits[1].inertia_


def test_map_threads_keeps_order_and_raises(monkeypatch):
    monkeypatch.setattr(_threads, "blas_threads", lambda: 3)
    assert _threads.map_threads(lambda x: x * x, range(7)) == [x * x for x in range(7)]

    def fail(x):
        if x == 4:
            raise ValueError("row 4")
        return x

    with pytest.raises(ValueError, match="row 4"):
        _threads.map_threads(fail, range(7))


def test_threads_follow_the_blas_limit(monkeypatch):
    """Under a BLAS limit of one thread (as in joblib's workers), no pool."""
    from threadpoolctl import threadpool_limits

    def no_pool(*args, **kwargs):
        raise AssertionError("a thread pool under a one-thread BLAS limit")

    X = random_data(0, 300, 12, np.float64)
    ref = KSubspaces(k=4, j=3, random_state=0).fit(X)
    monkeypatch.setattr(_threads, "ThreadPoolExecutor", no_pool)
    with threadpool_limits(limits=1, user_api="blas"):
        est = KSubspaces(k=4, j=3, random_state=0).fit(X)
    assert_array_equal(est.labels_, ref.labels_)
    assert_array_equal(est.bases_, ref.bases_)


# -- Lloyd's algorithm ---------------------------------------------------------


@SETTINGS
@given(problem)
def test_cost_never_increases(p):
    """From one full Lloyd step (refit, then reassign) to the next."""
    X, k, j = draw(p)
    X = X.astype(np.float64)
    sw = np.ones(X.shape[0])
    xsq = _row_norms_sq(X)
    affine = p["affine"]
    rng = np.random.RandomState(p["seed"])
    labels = rng.randint(k, size=X.shape[0]).astype(np.int32)
    mind = xsq.astype(np.float64)

    def grow(i):
        return _grow(X, xsq, sw, i, j, affine)

    previous = np.inf
    stats = _Stats(X, labels, sw, k)
    for _ in range(8):
        bases, means, comps, n_relocated = _update(
            X, labels, stats, mind, sw, j, affine, grow
        )
        new_labels, mind = _assign(X, xsq, _pack(bases, means, affine, comps))
        stats.move(X, labels, new_labels, sw)
        labels = new_labels
        cost = mind.sum()
        if not n_relocated:  # re-seeding a starved cluster may cost
            assert cost <= previous * (1 + 1e-9) + 1e-9
        previous = cost


@SETTINGS
@given(problem)
def test_statistics_follow_moved_rows(p):
    """Moving rows between clusters gives the statistics computed afresh."""
    X, k, _ = draw(p)
    rng = np.random.RandomState(p["seed"])
    sw = rng.rand(X.shape[0])
    old = rng.randint(k, size=X.shape[0])
    new = np.where(rng.rand(X.shape[0]) < 0.3, rng.randint(k, size=X.shape[0]), old)
    moved = _Stats(X, old, sw, k)
    moved.move(X, old, new, sw)
    fresh = _Stats(X, new, sw, k)
    for name in ("W", "s", "S"):
        assert_allclose(getattr(moved, name), getattr(fresh, name), atol=1e-9)
    X64 = X.astype(np.float64)
    for c in range(k):
        rows = new == c
        assert fresh.W[c] == pytest.approx(sw[rows].sum())
        assert_allclose(fresh.S[c], (X64[rows] * sw[rows, None]).T @ X64[rows])


def test_starved_clusters_are_reseeded():
    """All k start on one subspace: the others must be re-seeded and used."""
    rng = np.random.RandomState(0)
    X, y = union_of_subspaces(rng, k=3, j=2, d=6, n_per=30)
    one = np.linalg.qr(rng.randn(6, 2))[0].T
    init = np.stack([one, one, one])
    ks = KSubspaces(k=3, j=2, init=init).fit(X)
    assert np.unique(ks.labels_).size == 3
    assert ks.inertia_ < 1e-8 * (X**2).sum()
    assert adjusted_rand_score(y, ks.labels_) == 1.0


@pytest.mark.parametrize("affine", [False, True])
@pytest.mark.parametrize("extra", [-1, 0, 1])
def test_a_cluster_of_too_few_rows_to_fit_its_subspace_is_reseeded(affine, extra):
    """j rows fit a linear j-subspace; an affine j-flat needs j + 1.

    Fitted to j rows, a flat has one direction that nothing determines (each
    LAPACK picks its own), so that cluster is re-seeded; with enough rows its
    own subspace is fitted (with exactly enough, it passes through them all).
    """
    j, k = 2, 2
    X = np.random.RandomState(0).randn(40, 5)
    sw, xsq = np.ones(40), _row_norms_sq(X)
    size = j + int(affine) + extra  # rows of cluster 1
    labels = (np.arange(40) < size).astype(np.int32)

    def grow(i):
        return _grow(X, xsq, sw, i, j, affine)

    stats = _Stats(X, labels, sw, k)
    bases, means, _, relocated = _update(X, labels, stats, xsq, sw, j, affine, grow)
    assert relocated == ([1] if extra < 0 else [])
    if extra == 0:
        R = X[:size] - means[1]
        R -= R @ bases[1].T @ bases[1]
        assert_allclose(R, 0.0, atol=1e-12)


def test_fewer_distinct_clusters_warns():
    X = np.repeat([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], 5, axis=0)
    with pytest.warns(ConvergenceWarning, match=r"distinct clusters \(2\)"):
        KSubspaces(k=3, j=1, random_state=0).fit(X)


# -- exact references ----------------------------------------------------------


@SETTINGS
@given(problem)
def test_one_subspace_is_truncated_svd(p):
    """k=1: the top-j principal subspace (uncentred unless affine)."""
    X, _, j = draw(p)
    X = X.astype(np.float64)
    ks = KSubspaces(k=1, j=j, affine=p["affine"], random_state=0).fit(X)
    Xc = X - X.mean(axis=0) if p["affine"] else X
    _, s, vt = np.linalg.svd(Xc, full_matrices=False)
    assert ks.inertia_ == pytest.approx((s[j:] ** 2).sum(), rel=1e-8, abs=1e-9)
    if s[j - 1] - (s[j] if j < s.size else 0) > 1e-6 * s[0]:  # well defined
        assert_allclose(projectors(ks.bases_)[0], vt[:j].T @ vt[:j], atol=1e-7)
    if p["affine"]:
        assert_allclose(ks.means_[0], X.mean(axis=0), atol=1e-12)


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    k=st.integers(2, 4),
    j=st.integers(1, 3),
    extra=st.integers(1, 4),
    affine=st.booleans(),
)
def test_exact_recovery_of_noiseless_union(seed, k, j, extra, affine):
    """Rows on k subspaces in general position: zero cost, right partition."""
    rng = np.random.RandomState(seed)
    d = k * j + extra
    X, y = union_of_subspaces(rng, k, j, d, n_per=4 * j + 8, affine=affine)
    ks = KSubspaces(k=k, j=j, affine=affine, random_state=seed).fit(X)
    assert ks.inertia_ <= 1e-12 * (X**2).sum()
    assert adjusted_rand_score(y, ks.labels_) == 1.0


@pytest.mark.parametrize("affine", [False, True])
def test_fewer_rows_than_features(affine):
    """n < d (a Linear weight's input features): subspaces from the rows' SVD."""
    rng = np.random.RandomState(0)
    X, y = union_of_subspaces(rng, k=2, j=3, d=40, n_per=9, affine=affine)
    ks = KSubspaces(k=2, j=3, affine=affine, random_state=0).fit(X)
    assert ks.inertia_ <= 1e-12 * (X**2).sum()
    assert adjusted_rand_score(y, ks.labels_) == 1.0
    one = KSubspaces(k=1, j=5, affine=affine).fit(X)
    Xc = X - X.mean(axis=0) if affine else X
    s = np.linalg.svd(Xc, compute_uv=False)
    assert one.inertia_ == pytest.approx((s[5:] ** 2).sum(), rel=1e-8)
    gram = np.einsum("kid,kjd->kij", one.bases_, one.bases_)
    assert_allclose(gram[0], np.eye(5), atol=1e-10)


# -- invariances and equivariances (from a common start: Lloyd is deterministic)


@SETTINGS
@given(problem)
def test_row_permutation_invariance(p):
    X, k, j = draw(p, well_posed=True)
    X = X.astype(np.float64)
    init, _, _ = ksubspaces_plusplus(X, k, j, random_state=p["seed"])
    perm = np.random.RandomState(p["seed"]).permutation(X.shape[0])
    a = KSubspaces(k=k, j=j, init=init).fit(X)
    b = KSubspaces(k=k, j=j, init=init).fit(X[perm])
    assert_array_equal(a.labels_[perm], b.labels_)
    # Projectors agree to rounding over the eigengap, which random data can
    # make small: the loose tolerance is for those, the labels are exact.
    assert_allclose(projectors(a.bases_), projectors(b.bases_), atol=1e-4)
    assert b.inertia_ == pytest.approx(a.inertia_, rel=1e-9, abs=1e-12)


@SETTINGS
@given(problem, st.integers(-4, 4))
def test_rotation_and_scaling_equivariance(p, log2_scale):
    X, k, j = draw(p, well_posed=True)
    X = X.astype(np.float64)
    d = X.shape[1]
    Q = ortho_group.rvs(d, random_state=p["seed"]) if d > 1 else np.eye(1)
    s = 2.0**log2_scale
    init, _, _ = ksubspaces_plusplus(X, k, j, random_state=p["seed"])
    a = KSubspaces(k=k, j=j, init=init).fit(X)
    b = KSubspaces(k=k, j=j, init=init @ Q).fit(s * X @ Q)
    assert_array_equal(a.labels_, b.labels_)
    assert b.inertia_ == pytest.approx(s**2 * a.inertia_, rel=1e-8, abs=1e-10)
    rotated = np.einsum("ad,kde,eb->kab", Q.T, projectors(a.bases_), Q)
    assert_allclose(projectors(b.bases_), rotated, atol=1e-4)


@pytest.mark.parametrize("affine", [False, True])
def test_seeding_keeps_the_best_local_trial(affine):
    """Of the candidates drawn (w * D^2), the one lowering the potential most."""
    rng = np.random.RandomState(4)
    X, _ = union_of_subspaces(rng, k=3, j=2, d=7, n_per=30, noise=0.1)
    trials = 8
    _, _, idx = ksubspaces_plusplus(
        X, 1, 2, affine=affine, n_local_trials=trials, random_state=0
    )
    sw, xsq = np.ones(len(X)), (X**2).sum(axis=1)
    pot = ((X - X.mean(axis=0)) ** 2).sum(axis=1) if affine else xsq
    cumulative = np.cumsum(pot)
    draws = np.random.RandomState(0).uniform(size=trials) * cumulative[-1]
    cand = np.minimum(np.searchsorted(cumulative, draws), len(X) - 1)
    potentials = []
    for i in cand:
        B, mu, _ = _grow(X, xsq, sw, i, 2, affine)
        R = (X - mu) - ((X - mu) @ B.T) @ B
        potentials.append(np.minimum(pot, (R**2).sum(axis=1)).sum())
    assert len(set(np.round(potentials, 6))) > 1  # the choice matters here
    assert idx[0] == cand[int(np.argmin(potentials))]


def test_seeding_is_rotation_and_scale_invariant():
    """The ++ draws depend only on distances: same seeds after s * X @ Q."""
    rng = np.random.RandomState(3)
    X, _ = union_of_subspaces(rng, k=3, j=2, d=7, n_per=20, noise=0.05)
    Q = ortho_group.rvs(7, random_state=1)
    _, _, idx = ksubspaces_plusplus(X, 3, 2, random_state=0)
    _, _, idx_rot = ksubspaces_plusplus(4.0 * X @ Q, 3, 2, random_state=0)
    assert_array_equal(idx, idx_rot)


# -- sample weights ------------------------------------------------------------


@SETTINGS
@given(problem)
def test_integer_weights_equal_repeated_rows(p):
    X, k, j = draw(p, well_posed=True)
    X = X.astype(np.float64)
    rng = np.random.RandomState(p["seed"])
    sw = rng.randint(0, 4, size=X.shape[0])
    sw[: k + 1] = np.maximum(sw[: k + 1], 1)
    init, _, _ = ksubspaces_plusplus(X, k, j, random_state=p["seed"])
    kw = dict(k=k, j=j, affine=p["affine"], init=init)
    # A cluster with too few distinct rows has no unique best subspace, and the
    # two fits may pick different ones: a tie, not a weighting error. Such a
    # cluster may appear at any iteration, so every update is watched.
    fewest = []
    update = _backend._update

    def watched(X, labels, stats, mind, sample_weight, *args, **kwargs):
        fewest.append(np.bincount(labels[sample_weight > 0], minlength=k).min())
        return update(X, labels, stats, mind, sample_weight, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_backend, "_update", watched)
        weighted = KSubspaces(**kw).fit(X, sample_weight=sw)
    assert fewest  # every update was watched
    distinct = np.bincount(weighted.labels_[sw > 0], minlength=k)
    assume(min(fewest + [distinct.min()]) >= j + p["affine"] + 1)
    repeated = KSubspaces(**kw).fit(np.repeat(X, sw, axis=0))
    assert weighted.inertia_ == pytest.approx(repeated.inertia_, rel=1e-7, abs=1e-9)
    assert_allclose(projectors(weighted.bases_), projectors(repeated.bases_), atol=1e-6)
    assert_allclose(weighted.means_, repeated.means_, atol=1e-8)
    keep = sw > 0
    assert_array_equal(np.repeat(weighted.labels_[keep], sw[keep]), repeated.labels_)


def test_weights_move_the_subspace():
    """A heavy row pulls a single line onto itself."""
    X = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    ks = KSubspaces(k=1, j=1).fit(X, sample_weight=[1.0, 1000.0, 1.0])
    assert abs(ks.bases_[0, 0, 1]) > 0.99


# -- dtypes ----------------------------------------------------------------------


def test_float32_fit_matches_float64():
    rng = np.random.RandomState(0)
    X, y = union_of_subspaces(rng, k=3, j=3, d=10, n_per=40, noise=0.01)
    a = KSubspaces(k=3, j=3, random_state=0).fit(X)
    b = KSubspaces(k=3, j=3, random_state=0).fit(X.astype(np.float32))
    assert b.bases_.dtype == np.float32 and b.transform(X[:2]).dtype == np.float64
    assert b.transform(X[:2].astype(np.float32)).dtype == np.float32
    assert adjusted_rand_score(a.labels_, b.labels_) == 1.0
    assert b.inertia_ == pytest.approx(a.inertia_, rel=1e-3)


@pytest.mark.parametrize("j", [3, 10])
def test_float32_distances_do_not_cancel(j):
    """Small residuals beside large norms: reported distances keep their digits.

    ``||x||^2 - ||B x||^2`` loses its digits here in float32 (checked below);
    the fit uses the complement form (j > d/2) or recomputes the residuals.
    """
    rng = np.random.RandomState(0)
    d = 12
    B = np.linalg.qr(rng.randn(d, j))[0].T
    X = (1e2 * rng.randn(200, j) @ B + 1e-2 * rng.randn(200, d)).astype(np.float32)
    ks = KSubspaces(k=1, j=j).fit(X)
    X64, B64 = X.astype(np.float64), ks.bases_[0].astype(np.float64)
    residual = X64 - (X64 @ B64.T) @ B64
    exact = (residual**2).sum(axis=1)
    Bf = ks.bases_[0]
    naive = np.maximum((X * X).sum(axis=1) - ((X @ Bf.T) ** 2).sum(axis=1), 0)
    assert abs(naive.sum() - exact.sum()) > 0.2 * exact.sum()  # it would cancel
    assert ks.inertia_ == pytest.approx(exact.sum(), rel=1e-3)
    dist = ks.transform(X).astype(np.float64) ** 2
    assert_allclose(dist[:, 0], exact, rtol=0.1, atol=1e-2 * exact.mean())
    assert -ks.score(X) == pytest.approx(exact.sum(), rel=1e-3)


# -- scikit-learn integration ----------------------------------------------------


def test_pipeline_grid_search_clone_pickle():
    rng = np.random.RandomState(0)
    X, _ = union_of_subspaces(rng, k=2, j=2, d=5, n_per=40, noise=0.01)
    pipe = make_pipeline(StandardScaler(), KSubspaces(random_state=0))
    grid = GridSearchCV(pipe, {"ksubspaces__k": [1, 2], "ksubspaces__j": [1, 2]})
    grid.fit(X)
    assert grid.best_params_ == {"ksubspaces__k": 2, "ksubspaces__j": 2}
    ks = grid.best_estimator_[-1]
    twin = clone(ks)
    assert twin.get_params() == ks.get_params() and not hasattr(twin, "bases_")
    loaded = pickle.loads(pickle.dumps(ks))
    Xs = grid.best_estimator_[0].transform(X)
    assert_array_equal(loaded.predict(Xs), ks.predict(Xs))
    assert_array_equal(loaded.transform(Xs), ks.transform(Xs))


def test_fit_does_not_modify_input():
    X = random_data(0, 30, 4)
    X_copy, sw = X.copy(), np.ones(30)
    KSubspaces(k=2, j=2, affine=True, random_state=0).fit(X, sample_weight=sw)
    assert_array_equal(X, X_copy) and (sw == 1).all()


def test_n_init_keeps_the_best_run():
    """n_init runs from one random state: the kept run is the cheapest."""
    X = random_data(1, 80, 5)
    runs = []
    rng = np.random.RandomState(0)
    for _ in range(4):
        runs.append(
            KSubspaces(k=3, j=2, init="random", n_init=1, random_state=rng).fit(X)
        )
    best4 = KSubspaces(k=3, j=2, init="random", n_init=4, random_state=0).fit(X)
    assert best4.inertia_ == pytest.approx(min(r.inertia_ for r in runs))


# -- bad input -------------------------------------------------------------------


@pytest.mark.parametrize(
    "X, params, match",
    [
        ([[0.0, np.nan], [1.0, 2.0]], {"k": 1}, "NaN"),
        ([[0.0, np.inf], [1.0, 2.0]], {"k": 1}, "infinity"),
        ([1.0, 2.0, 3.0], {"k": 1}, "Expected 2D array"),
        (np.empty((0, 3)), {"k": 1}, "0 sample"),
        (np.ones((3, 4)), {"k": 4}, r"k=4 must be <= n_samples=3"),
        (np.ones((5, 3)), {"k": 1, "j": 3}, r"j=3 must be smaller than n_features=3"),
        (
            np.ones((5, 3)),
            {"k": 1, "j": 3, "affine": True},
            r"j=3 must be smaller than n_features=3",
        ),
        (np.ones((5, 3)), {"k": 0}, "'k' parameter"),
        (np.ones((5, 3)), {"j": 0, "k": 1}, "'j' parameter"),
        (np.ones((5, 3)), {"k": 1, "tol": -1.0}, "'tol' parameter"),
        (np.ones((5, 3)), {"k": 1, "init": "kmeans"}, "'init' parameter"),
        (np.ones((5, 3)), {"k": 1, "n_init": 0}, "'n_init' parameter"),
        (np.ones((5, 3)), {"k": 2, "j": 1, "init": np.ones((2, 1, 3))}, "orthonormal"),
        (
            np.ones((5, 3)),
            {"k": 2, "j": 1, "init": np.ones((1, 1, 3))},
            "init has shape",
        ),
    ],
)
def test_bad_input_is_rejected(X, params, match):
    with pytest.raises(ValueError, match=match):
        KSubspaces(**params).fit(X)


@pytest.mark.parametrize(
    "sample_weight, match",
    [
        ([1.0, -1.0, 1.0, 1.0], "Negative values in data passed to `sample_weight`"),
        ([1.0, 1.0], r"sample_weight.shape == \(2,\), expected \(4,\)"),
        ([0.0, 0.0, 0.0, 0.0], "Sample weights must contain at least one non-zero"),
        ([0.0, 0.0, 0.0, 1.0], r"k=2 must be <= the number of rows with positive"),
    ],
)
def test_bad_sample_weight_is_rejected(sample_weight, match):
    X = random_data(0, 4, 3)
    with pytest.raises(ValueError, match=match):
        KSubspaces(k=2, j=1).fit(X, sample_weight=sample_weight)


def test_sparse_input_is_rejected():
    sparse = pytest.importorskip("scipy.sparse")
    with pytest.raises(TypeError, match="Sparse data was passed"):
        KSubspaces(k=1, j=1).fit(sparse.random(10, 3, density=0.5, format="csr"))


def test_wrong_number_of_features_at_predict():
    ks = KSubspaces(k=2, j=1, random_state=0).fit(random_data(0, 20, 3))
    for method in (ks.predict, ks.transform, ks.project, ks.coordinates, ks.score):
        with pytest.raises(ValueError, match="X has 4 features, but KSubspaces"):
            method(random_data(0, 5, 4))


def test_failed_fit_leaves_estimator_unchanged():
    ks = KSubspaces(k=2, j=1, random_state=0).fit(random_data(0, 20, 3))
    before = {key: np.copy(v) for key, v in vars(ks).items()}
    with pytest.raises(ValueError, match="j=1 must be smaller"):
        ks.fit(random_data(0, 20, 1))
    assert vars(ks).keys() == before.keys()
    for key, value in before.items():
        assert_array_equal(getattr(ks, key), value)
    assert ks.n_features_in_ == 3


def test_explicit_init_with_n_init_warns():
    X = random_data(0, 20, 3)
    init = np.eye(3)[None, :1]
    with pytest.warns(RuntimeWarning, match="performing only one init"):
        KSubspaces(k=1, j=1, init=init, n_init=3).fit(X)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        KSubspaces(k=1, j=1, init=init).fit(X)
