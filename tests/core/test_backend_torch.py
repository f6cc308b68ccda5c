"""KSubspaces(backend="torch"): on CPU, the numpy backend's fit up to rounding."""

import sys

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from numpy.testing import assert_allclose, assert_array_equal
from sklearn.utils.estimator_checks import parametrize_with_checks

from kflats import KSubspaces

from .test_common import _expected_failed_checks

torch = pytest.importorskip("torch")


def projectors(bases):
    return np.einsum("kjd,kje->kde", bases, bases)


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    n=st.integers(8, 400),
    d=st.integers(2, 9),
    k=st.integers(1, 4),
    j_frac=st.floats(0.0, 1.0),
    affine=st.booleans(),
    dtype=st.sampled_from([np.float32, np.float64]),
    init=st.sampled_from(["k-subspaces++", "random"]),
)
# The first assignment left an affine 2-flat with 2 rows, which do not fix its
# second direction: the two backends' LAPACKs picked different ones. (Such a
# cluster is now re-seeded: an affine j-flat needs j + 1 rows.)
@example(
    seed=4, n=8, d=4, k=4, j_frac=0.5, affine=True, dtype=np.float64, init="random"
)
@example(
    seed=58914, n=8, d=4, k=4, j_frac=0.5, affine=True, dtype=np.float32, init="random"
)
def test_cpu_fit_equals_the_numpy_backend(seed, n, d, k, j_frac, affine, dtype, init):
    """Basis and complement forms, linear and affine.

    Each cluster has room for more rows than its dimension, so that no row sits
    at distance zero from two subspaces (a tie that rounding would break). A
    cluster whose rows do not determine its subspace (fewer than j, or j + 1
    for an affine flat) is re-seeded by both backends alike, not fitted.
    """
    j = 1 + int(j_frac * (d - 2))
    n = max(n, 3 * k * (j + 1))
    X = np.random.RandomState(seed).randn(n, d).astype(dtype)
    # One run: with several, two runs that reach the same optimum (numbered
    # differently) are a tie that rounding breaks one way or the other.
    kw = dict(k=k, j=j, affine=affine, init=init, n_init=1, random_state=seed)
    ref = KSubspaces(**kw).fit(X)
    est = KSubspaces(backend="torch", device="cpu", **kw).fit(X)
    assert_array_equal(est.labels_, ref.labels_)
    assert est.n_iter_ == ref.n_iter_
    rtol = 1e-4 if dtype == np.float32 else 1e-9
    assert est.inertia_ == pytest.approx(ref.inertia_, rel=rtol, abs=1e-6)
    assert est.bases_.dtype == dtype
    atol = 1e-3 if dtype == np.float32 else 1e-7
    # the subspaces, not their bases (equal up to rotations within each)
    assert_allclose(projectors(est.bases_), projectors(ref.bases_), atol=atol)
    assert_allclose(est.means_, ref.means_, atol=atol)


def test_fewer_rows_than_features():
    X = np.random.RandomState(0).randn(12, 30)
    ref = KSubspaces(k=2, j=3, random_state=0).fit(X)
    est = KSubspaces(k=2, j=3, random_state=0, backend="torch").fit(X)
    assert_array_equal(est.labels_, ref.labels_)
    assert est.inertia_ == pytest.approx(ref.inertia_, rel=1e-10)


def test_weighted_fit_on_the_default_device():
    rng = np.random.RandomState(0)
    X = rng.randn(500, 10)
    w = rng.exponential(size=500)
    ref = KSubspaces(k=3, j=6, affine=True, random_state=0).fit(X, sample_weight=w)
    est = KSubspaces(k=3, j=6, affine=True, random_state=0, backend="torch")
    est.fit(X, sample_weight=w)
    assert_array_equal(est.labels_, ref.labels_)
    assert est.inertia_ == pytest.approx(ref.inertia_, rel=1e-10)
    assert_array_equal(est.predict(X), est.labels_)


@pytest.mark.parametrize(
    "device, match",
    [
        ("cuda:7", r"device='cuda:7' is not available to torch"),
        ("meta-gpu", r"device='meta-gpu' is not a torch device"),
        (3.5, r"device=3.5 is not a torch device"),
    ],
)
def test_device_torch_does_not_have_is_rejected(device, match):
    X = np.random.RandomState(0).randn(50, 4)
    est = KSubspaces(k=2, j=1, random_state=0).fit(X)
    before = est.bases_.copy()
    est.set_params(backend="torch", device=device)
    with pytest.raises(ValueError, match=match):
        est.fit(X)
    assert_array_equal(est.bases_, before)  # a failed fit changes nothing


def test_device_needs_the_torch_backend():
    with pytest.raises(ValueError, match="only used with backend='torch'"):
        KSubspaces(k=2, j=1, device="cpu").fit(np.eye(5))


def test_bad_backend_is_rejected():
    with pytest.raises(ValueError, match="'backend' parameter of KSubspaces"):
        KSubspaces(backend="jax").fit(np.eye(5))


def test_without_torch_the_error_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch fails
    with pytest.raises(ImportError, match=r"pip install 'kflats\[torch\]'"):
        KSubspaces(k=2, j=1, backend="torch").fit(np.eye(5))
    # the numpy backend does not import torch
    KSubspaces(k=2, j=1).fit(np.eye(5))


@parametrize_with_checks(
    [KSubspaces(k=3, j=1, backend="torch")],
    expected_failed_checks=_expected_failed_checks,
)
def test_sklearn_compatible_with_the_torch_backend(estimator, check):
    check(estimator)


def test_the_seeding_grows_its_subspaces_on_the_backend(monkeypatch):
    """backend='torch' grows the seeding's subspaces with torch, not numpy."""
    import kflats._backend
    import kflats._seeding

    def numpy_grow(*args, **kwargs):
        raise AssertionError("the numpy _grow ran under backend='torch'")

    for module in (kflats._seeding, kflats._backend):
        monkeypatch.setattr(module, "_grow", numpy_grow)
    X = np.random.RandomState(0).randn(300, 40)
    est = KSubspaces(k=3, j=5, random_state=0, backend="torch").fit(X)
    monkeypatch.undo()
    ref = KSubspaces(k=3, j=5, random_state=0).fit(X)
    assert_array_equal(est.labels_, ref.labels_)
    assert est.inertia_ == pytest.approx(ref.inertia_, rel=1e-10)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    m=st.integers(1, 30),
    extra=st.integers(1, 20),
    r_frac=st.floats(0.0, 1.0),
    rank_frac=st.floats(0.0, 1.0),
)
def test_top_right_vectors_span_the_svds(seed, m, extra, r_frac, rank_frac):
    """Gram route or SVD fallback: the top r right singular vectors.

    Rank-deficient rows force the fallback (a wanted singular value is zero);
    there the completion is arbitrary, so only orthonormality and the span of
    the nonzero part are compared.
    """
    from kflats._torch_backend import _top_right_vectors

    d = m + extra
    r = int(r_frac * m)
    rank = max(1, int(rank_frac * m))
    rng = np.random.RandomState(seed)
    # distinct singular values, so that the top r span is well defined
    s = np.geomspace(10.0, 1.0, rank)
    u = np.linalg.qr(rng.randn(m, rank))[0]
    v = np.linalg.qr(rng.randn(d, rank))[0]
    A = (u * s) @ v.T
    vt = _top_right_vectors(torch, torch.from_numpy(A), r).numpy()
    assert vt.shape == (r, d)
    assert_allclose(vt @ vt.T, np.eye(r), atol=1e-8)
    top = min(r, rank)
    ref = v[:, :top].T
    got = vt[:top]
    assert_allclose(got.T @ got, ref.T @ ref, atol=1e-8)
