"""KSubspaces.partial_fit: one Lloyd step per batch on accumulated statistics."""

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from numpy.testing import assert_allclose, assert_array_equal
from sklearn.metrics import adjusted_rand_score

from kflats import KSubspaces, ksubspaces_plusplus
from kflats._lloyd import _Stats

SETTINGS = settings(max_examples=20, deadline=None)


def union_of_subspaces(rng, k, j, d, n_per):
    bases = [np.linalg.qr(rng.randn(d, j))[0].T for _ in range(k)]
    X = np.vstack([rng.randn(n_per, j) @ B for B in bases])
    y = np.repeat(np.arange(k), n_per)
    order = rng.permutation(X.shape[0])
    return X[order], y[order]


@SETTINGS
@given(
    seed=st.integers(0, 2**16),
    k=st.integers(2, 4),
    j=st.integers(1, 3),
    n_batches=st.integers(2, 5),
    dtype=st.sampled_from([np.float32, np.float64]),
)
def test_batches_of_a_noiseless_union_recover_it(seed, k, j, n_batches, dtype):
    rng = np.random.RandomState(seed)
    d = k * j + 2
    X, y = union_of_subspaces(rng, k, j, d, n_per=(4 * j + 8) * (n_batches + 1))
    X = X.astype(dtype)
    ks = KSubspaces(k=k, j=j, random_state=seed)
    # the first batch is large enough to seed from; the others are of any size
    later = np.arange(X.shape[0] // 2, X.shape[0])
    cuts = np.sort(rng.choice(later, n_batches - 1, replace=False))
    batches = np.split(X, cuts)
    # Statistics accumulate, so rows misassigned early stay: the property
    # holds when the seeding finds the union (k-subspaces++ may not).
    seeded, _, _ = ksubspaces_plusplus(batches[0], k, j, random_state=seed)
    B64 = seeded.astype(np.float64)
    first = batches[0].astype(np.float64)
    proj = np.einsum("nd,kjd->nkj", first, B64)
    residual = ((first**2).sum(1)[:, None] - (proj**2).sum(2)).min(1)
    assume(residual.max() <= 1e-3 * (first**2).sum(1).max())
    for batch in batches:
        ks.partial_fit(batch)
    assert ks.n_iter_ == n_batches
    assert ks.bases_.dtype == dtype
    tol = 1e-8 if dtype == np.float64 else 1e-4
    assert -ks.score(X) <= tol * (X.astype(np.float64) ** 2).sum()
    assert adjusted_rand_score(y, ks.predict(X)) == 1.0


@SETTINGS
@given(seed=st.integers(0, 2**16), affine=st.booleans())
def test_one_batch_is_one_lloyd_step_of_fit(seed, affine):
    """From the same start, partial_fit on X is fit(X, max_iter=1)."""
    rng = np.random.RandomState(seed)
    X, _ = union_of_subspaces(rng, k=3, j=2, d=6, n_per=30)
    X += 0.1 * rng.randn(*X.shape)
    sw = rng.uniform(0.5, 2.0, size=X.shape[0])
    init, _, _ = ksubspaces_plusplus(X, 3, 2, random_state=seed)
    kw = dict(k=3, j=2, affine=affine, init=init)
    fitted = KSubspaces(max_iter=1, **kw).fit(X, sample_weight=sw)
    partial = KSubspaces(**kw).partial_fit(X, sample_weight=sw)
    fitted_attrs = {a for a in vars(fitted) if a.endswith("_") and a[0] != "_"}
    partial_attrs = {a for a in vars(partial) if a.endswith("_") and a[0] != "_"}
    assert partial_attrs == fitted_attrs
    assert_allclose(partial.bases_, fitted.bases_, atol=1e-10)
    assert_allclose(partial.means_, fitted.means_, atol=1e-10)
    assert_array_equal(partial.labels_, fitted.labels_)
    assert partial.inertia_ == pytest.approx(fitted.inertia_, rel=1e-10)
    assert partial.n_iter_ == fitted.n_iter_ == 1


def test_statistics_accumulate_over_batches():
    """No decay: the statistics are those of every row under its batch's labels."""
    rng = np.random.RandomState(0)
    X, _ = union_of_subspaces(rng, k=3, j=2, d=7, n_per=40)
    sw = rng.uniform(0.5, 2.0, size=X.shape[0])
    ks = KSubspaces(k=3, j=2, random_state=0)
    labels, models = [], []
    for part in np.array_split(np.arange(X.shape[0]), 4):
        models.append(ks.bases_.copy() if hasattr(ks, "bases_") else None)
        ks.partial_fit(X[part], sample_weight=sw[part])
    # re-assign each batch as partial_fit did: to the subspaces before its step
    parts = np.array_split(np.arange(X.shape[0]), 4)
    for part, bases in zip(parts, models, strict=True):
        if bases is None:  # the first batch: to the seeded subspaces
            bases = ksubspaces_plusplus(
                X[part], 3, 2, sample_weight=sw[part], random_state=0
            )[0]
        proj = np.einsum("nd,kjd->nkj", X[part], bases)
        dist = (X[part] ** 2).sum(1)[:, None] - (proj**2).sum(2)
        labels.append(dist.argmin(1))
    expected = _Stats.of_rows(X, np.concatenate(labels), sw, 3)
    assert_allclose(ks._stats.W, expected.W)
    assert_allclose(ks._stats.S, expected.S, atol=1e-9)


def test_same_random_state_same_result():
    X = np.random.RandomState(0).randn(300, 6)
    fits = []
    for _ in range(2):
        ks = KSubspaces(k=3, j=2, random_state=7)
        for batch in np.array_split(X, 3):
            ks.partial_fit(batch)
        fits.append(ks)
    assert_array_equal(fits[0].bases_, fits[1].bases_)
    assert_array_equal(fits[0].labels_, fits[1].labels_)


def test_partial_fit_goes_on_after_fit():
    rng = np.random.RandomState(0)
    X, y = union_of_subspaces(rng, k=3, j=2, d=8, n_per=50)
    ks = KSubspaces(k=3, j=2, random_state=0).fit(X)
    before = ks.bases_.copy()
    ks.partial_fit(X[:40])
    assert ks.n_iter_ == 1
    proj = lambda B: np.einsum("kjd,kje->kde", B, B)  # noqa: E731
    assert_allclose(proj(ks.bases_), proj(before), atol=1e-8)
    assert adjusted_rand_score(y, ks.predict(X)) == 1.0


def test_batch_width_change_is_rejected_and_leaves_the_estimator():
    X = np.random.RandomState(0).randn(60, 5)
    ks = KSubspaces(k=2, j=2, random_state=0).partial_fit(X)
    state = {a: v.copy() for a, v in vars(ks).items() if isinstance(v, np.ndarray)}
    stats = ks._stats
    match = "X has 4 features, but KSubspaces is expecting 5"
    with pytest.raises(ValueError, match=match):
        ks.partial_fit(X[:, :4])
    for name, value in state.items():
        assert_array_equal(getattr(ks, name), value)
    assert ks._stats is stats and ks.n_iter_ == 1


def test_first_batch_needs_k_rows():
    ks = KSubspaces(k=5, j=1)
    with pytest.raises(ValueError, match="k=5 must be <= n_samples=3"):
        ks.partial_fit(np.ones((3, 4)))
    assert not hasattr(ks, "bases_")


def test_starved_cluster_is_reseeded_from_a_later_batch():
    """A subspace that won no row takes the batch's farthest row's neighbourhood."""
    rng = np.random.RandomState(0)
    X, y = union_of_subspaces(rng, k=2, j=1, d=4, n_per=60)
    on_first = X[y == 0]
    one = np.linalg.qr(rng.randn(4, 1))[0].T
    ks = KSubspaces(k=2, j=1, init=np.stack([one, one])).partial_fit(on_first)
    ks.partial_fit(X[y == 1])
    assert np.unique(ks.predict(X)).size == 2
    assert -ks.score(X) <= 1e-8 * (X**2).sum()
