"""Tests of kflats.factorize: per-cluster factor pairs under a size budget."""

import io
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kflats.factorize import (
    K_GRID,
    Candidate,
    ProjectiveFactors,
    damped_moment,
    factorize,
    factorize_linear,
    svd_factors,
)

DTYPES = [np.float32, np.float64]
# relative error tolerance of a result computed in a dtype
RTOL = {np.float32: 1e-4, np.float64: 1e-10}


def union_of_subspaces(rng, k=3, r=2, n_per=40, d=10, dtype=np.float64):
    """Rows on k random r-dimensional linear subspaces of R^d, shuffled."""
    blocks = [rng.normal(size=(n_per, r)) @ rng.normal(size=(r, d)) for _ in range(k)]
    A = np.vstack(blocks)
    return A[rng.permutation(len(A))].astype(dtype)


def weighted_error(A, A_hat, w=None):
    A = A.astype(np.float64)
    R = A - A_hat.astype(np.float64)
    r2 = (R**2).sum(axis=1)
    a2 = (A**2).sum(axis=1)
    if w is None:
        return r2.sum() / a2.sum()
    return (w @ r2) / (w @ a2)


def stored_size(f):
    total = sum(u.size for u in f.U) + sum(v.size for v in f.V)
    if f.means is not None:
        total += f.means.size
    return total + (f.labels.size if f.k > 1 else 0)


def check_consistent(f, A, w=None):
    """Invariants every factorization of A must satisfy."""
    n, d = A.shape
    assert f.shape == (n, d)
    assert f.dtype == A.dtype
    assert f.labels.dtype == np.int64
    assert f.n_params == stored_size(f)
    assert f.compression == pytest.approx(f.n_params / (n * d))
    for c in range(f.k):
        np.testing.assert_array_equal(f.rows(c), np.flatnonzero(f.labels == c))
        assert f.U[c].shape == (f.rows(c).size, f.ranks[c])
        assert f.V[c].shape == (f.ranks[c], d)
        assert f.U[c].dtype == f.V[c].dtype == A.dtype
        # orthonormal rows
        gram = f.V[c].astype(np.float64) @ f.V[c].T.astype(np.float64)
        np.testing.assert_allclose(gram, np.eye(f.ranks[c]), atol=1e-5)
    A_hat = f.reconstruct()
    assert A_hat.shape == (n, d) and A_hat.dtype == A.dtype
    expected = weighted_error(A, A_hat, w)
    # float32 rounding of the reconstruction shifts a tiny error by ~1e-10
    abs_tol = 1e-12 if A.dtype == np.float64 else 1e-9
    assert f.error == pytest.approx(expected, rel=1e-6, abs=abs_tol)
    assert 0.0 <= f.error <= 1.0 + 1e-6


# --------------------------------------------------------------------------
# svd_factors and Eckart-Young


@pytest.mark.parametrize("dtype", DTYPES)
def test_svd_factors_is_truncated_svd(dtype):
    rng = np.random.default_rng(0)
    A = rng.normal(size=(50, 12)).astype(dtype)
    s = np.linalg.svd(A.astype(np.float64), compute_uv=False)
    for rank in (1, 5, 12):
        f = svd_factors(A, rank=rank)
        assert f.k == 1 and f.ranks == (rank,)
        assert f.n_params == rank * (50 + 12)
        expected = (s[rank:] ** 2).sum() / (s**2).sum()
        assert f.error == pytest.approx(expected, rel=RTOL[dtype], abs=1e-6)
        check_consistent(f, A)
    np.testing.assert_allclose(svd_factors(A, rank=12).reconstruct(), A, atol=1e-4)


@pytest.mark.parametrize("dtype", DTYPES)
def test_k1_equals_svd(dtype):
    rng = np.random.default_rng(1)
    A = rng.normal(size=(60, 9)).astype(dtype)
    for j in (1, 4, 8):
        f = factorize(A, k=1, j=j)
        g = svd_factors(A, rank=j)
        assert f.k == 1 and f.ranks == (j,)
        assert f.error == pytest.approx(g.error, rel=RTOL[dtype])
        np.testing.assert_allclose(
            f.reconstruct(), g.reconstruct(), atol=10 * RTOL[dtype]
        )


def test_svd_budget_picks_largest_rank():
    A = np.random.default_rng(2).normal(size=(30, 20))
    for budget in (0.1, 0.35, 0.6, 1.0):
        f = svd_factors(A, budget=budget)
        r = f.ranks[0]
        assert r * 50 <= budget * 600 < (r + 1) * 50 or r == 20


@pytest.mark.parametrize("affine", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_exact_when_j_covers_every_cluster(dtype, affine):
    rng = np.random.default_rng(3)
    A = union_of_subspaces(rng, k=3, r=2, dtype=dtype)
    f = factorize(A, k=3, j=2, affine=affine, random_state=0)
    for c in range(f.k):
        assert np.linalg.matrix_rank(A[f.rows(c)].astype(np.float64), tol=1e-3) <= 2
    assert f.error < 10 * RTOL[dtype] ** 2
    np.testing.assert_allclose(f.reconstruct(), A, atol=1e-3)


def test_j_equal_d_is_exact():
    A = np.random.default_rng(4).normal(size=(40, 6))
    f = factorize(A, k=3, j=6, random_state=0)
    np.testing.assert_allclose(f.reconstruct(), A, atol=1e-10)


def test_small_clusters_reconstructed_exactly():
    # a cluster with no more rows than its rank is stored exactly
    A = np.random.default_rng(5).normal(size=(30, 8))
    f = factorize(A, k=6, j=5, random_state=0, max_iter=30)
    A_hat = f.reconstruct()
    for c in range(f.k):
        rows = f.rows(c)
        if rows.size <= 5:
            np.testing.assert_allclose(A_hat[rows], A[rows], atol=1e-10)
            assert f.ranks[c] == rows.size


# --------------------------------------------------------------------------
# budgets and adaptive ranks


@pytest.mark.parametrize("ranks", ["uniform", "adaptive"])
def test_budget_search_records_candidates(ranks):
    rng = np.random.default_rng(6)
    A = union_of_subspaces(rng, k=3, r=3, n_per=60, d=16)
    f = factorize(A, budget=0.4, ranks=ranks, random_state=0)
    assert f.n_params <= 0.4 * A.size
    # the grid, walked in order up to the first k > 1 that does not improve
    ks = [c.k for c in f.search]
    assert ks == list(K_GRID[: len(ks)])
    errors = [c.error for c in f.search]
    for i in range(1, len(errors) - 1):
        assert errors[i] < min(errors[:i])
    if len(ks) < len(K_GRID):
        assert errors[-1] >= min(errors[:-1])
    assert all(isinstance(c, Candidate) for c in f.search)
    for c in f.search:
        assert c.n_params <= 0.4 * A.size
        assert c.j == (math.floor(0.4 * A.size) - (A.shape[0] if c.k > 1 else 0)) // (
            A.shape[0] + c.k * 16
        )
    assert f.error <= min(c.error for c in f.search) + 1e-12
    # never worse than the SVD of the same size
    assert f.error <= svd_factors(A, budget=0.4).error + 1e-12
    # the data lie on 3 subspaces of dimension 3: the budget fits them exactly
    assert f.error < 1e-12
    check_consistent(f, A)


def test_budget_single_k():
    A = np.random.default_rng(7).normal(size=(80, 10))
    f = factorize(A, k=2, budget=0.5, random_state=0)
    assert [c.k for c in f.search] == [2]
    assert f.n_params <= 0.5 * A.size


def test_adaptive_not_worse_than_uniform_on_same_partition():
    rng = np.random.default_rng(8)
    # clusters of different intrinsic rank and scale: ranks should differ
    A = np.vstack(
        [
            rng.normal(size=(120, 20)) * np.linspace(3, 0.1, 20),
            rng.normal(size=(80, 20)) * np.linspace(1, 0.5, 20) ** 4,
            0.05 * rng.normal(size=(60, 20)),
        ]
    )
    for budget in (0.3, 0.5, 0.7):
        uni = factorize(A, budget=budget, random_state=1)
        ada = factorize(A, budget=budget, ranks="adaptive", random_state=1, n_refine=0)
        # same seeds -> same partition per candidate
        # same walk of the grid up to where either stopped
        for cu, ca in zip(uni.search, ada.search, strict=False):
            assert (cu.k, cu.j) == (ca.k, ca.j)
            assert ca.error <= cu.error + 1e-12
            assert ca.n_params <= budget * A.size
        assert ada.error <= uni.error + 1e-12
        refined = factorize(A, budget=budget, ranks="adaptive", random_state=1)
        assert refined.error <= ada.error + 1e-12
        assert refined.n_params <= budget * A.size
        check_consistent(refined, A)


def test_adaptive_spends_where_singular_values_are_large():
    rng = np.random.default_rng(9)
    # two clusters on disjoint coordinates: a loud one, a quiet one; the
    # initial flats make that partition a fixed point of the fit
    A = np.zeros((200, 12))
    A[:100, :6] = rng.normal(size=(100, 6)) * np.geomspace(10, 1, 6)
    A[100:, 6:] = 1e-3 * rng.normal(size=(100, 6))
    init = np.stack([np.eye(12)[:3], np.eye(12)[6:9]])
    f = factorize(A, k=2, j=3, ranks="adaptive", init=init, n_refine=0)
    uni = factorize(A, k=2, j=3, init=init)
    np.testing.assert_array_equal(f.labels, np.repeat([0, 1], 100))
    np.testing.assert_array_equal(uni.labels, f.labels)
    # the parameters of uniform ranks 3 + 3 go to the loud cluster
    assert uni.ranks == (3, 3)
    assert f.ranks[0] > 3 and f.ranks[1] < 3
    assert f.n_params <= 200 + 3 * (200 + 2 * 12)
    assert f.error < 0.5 * uni.error
    check_consistent(f, A)


def test_adaptive_rank_zero_cluster():
    rng = np.random.default_rng(10)
    A = np.zeros((360, 12))
    A[:60, :8] = 10 * rng.normal(size=(60, 8))
    A[60:, 8:] = 1e-8 * rng.normal(size=(300, 4))
    init = np.stack([np.eye(12)[:2], np.eye(12)[8:10]])
    f = factorize(A, k=2, j=2, ranks="adaptive", init=init, n_refine=0)
    assert f.ranks == (8, 0)
    np.testing.assert_array_equal(f.rows(1), np.arange(60, 360))
    assert f.U[1].shape == (300, 0) and f.V[1].shape == (0, 12)
    np.testing.assert_array_equal(f.reconstruct()[60:], 0.0)
    np.testing.assert_allclose(f.reconstruct()[:60], A[:60], atol=1e-8)
    check_consistent(f, A)


def test_affine_counts_means():
    rng = np.random.default_rng(11)
    A = rng.normal(size=(90, 7)) + 5.0
    f = factorize(A, k=3, j=2, affine=True, random_state=0)
    assert f.means.shape == (f.k, 7)
    assert f.n_params == stored_size(f)
    check_consistent(f, A)
    # the means carry the offset: much better than linear subspaces
    g = factorize(A, k=3, j=2, random_state=0)
    assert f.error < g.error
    h = factorize(A, budget=0.5, affine=True, ranks="adaptive", random_state=0)
    assert h.n_params <= 0.5 * A.size
    check_consistent(h, A)


# --------------------------------------------------------------------------
# sample weights


def test_sample_weight_enters_error_and_fit():
    rng = np.random.default_rng(12)
    A = rng.normal(size=(40, 6))
    w = np.ones(40)
    w[:2] = 1000.0
    f = svd_factors(A, rank=2, sample_weight=w)
    g = svd_factors(A, rank=2)
    check_consistent(f, A, w)
    # the heavy rows are reconstructed better than by the unweighted SVD
    err_f = ((A - f.reconstruct())[:2] ** 2).sum()
    err_g = ((A - g.reconstruct())[:2] ** 2).sum()
    assert err_f < 0.01 * err_g
    h = factorize(A, k=2, j=2, sample_weight=w, random_state=0)
    check_consistent(h, A, w)
    # integer weights behave like repeated rows
    wi = rng.integers(1, 4, size=40)
    fw = svd_factors(A, rank=3, sample_weight=wi)
    fr = svd_factors(np.repeat(A, wi, axis=0), rank=3)
    assert fw.error == pytest.approx(fr.error, rel=1e-10)
    np.testing.assert_allclose(np.abs(fw.V[0]), np.abs(fr.V[0]), atol=1e-8)


# --------------------------------------------------------------------------
# Linear weights


def test_factorize_linear_sides():
    W = np.random.default_rng(13).normal(size=(12, 30)).astype(np.float32)
    f = factorize_linear(W, k=3, j=4, side="input", random_state=0)
    assert f.transposed and f.shape == (30, 12)
    np.testing.assert_array_equal(f.labels.shape, (30,))
    g = factorize(W.T, k=3, j=4, random_state=0)
    np.testing.assert_array_equal(f.reconstruct(), g.reconstruct())
    assert f.error == g.error
    o = factorize_linear(W, k=3, j=4, side="output", random_state=0)
    assert not o.transposed and o.shape == (12, 30)
    b = factorize_linear(W, budget=0.5, side="input", random_state=0)
    assert b.transposed and b.n_params <= 0.5 * W.size
    # "auto" keeps the side with the lower error under one budget
    bo = factorize_linear(W, budget=0.5, side="output", random_state=0)
    a = factorize_linear(W, budget=0.5, random_state=0)
    assert a.error == min(b.error, bo.error)
    assert a.transposed == (b.error <= bo.error)
    with pytest.raises(ValueError, match="give budget"):
        factorize_linear(W, k=3, j=4, side="auto")
    # without a budget, None is the input side
    assert factorize_linear(W, k=3, j=4, random_state=0).transposed
    with pytest.raises(ValueError, match="side"):
        factorize_linear(W, k=2, j=2, side="rows")


# --------------------------------------------------------------------------
# save / load


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("affine", [False, True])
def test_save_load_round_trip(tmp_path, dtype, affine):
    rng = np.random.default_rng(14)
    A = rng.normal(size=(70, 9)).astype(dtype)
    f = factorize(A, budget=0.5, ranks="adaptive", affine=affine, random_state=0)
    path = tmp_path / "f.npz"
    f.save(path)
    g = ProjectiveFactors.load(path)
    assert g.labels.dtype == np.int64
    np.testing.assert_array_equal(g.labels, f.labels)
    assert g.k == f.k and g.ranks == f.ranks and g.dtype == f.dtype
    for a, b in zip(f.U + f.V, g.U + g.V, strict=True):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)
    if affine:
        np.testing.assert_array_equal(g.means, f.means)
    else:
        assert g.means is None
    assert g.error == f.error
    assert g.search == f.search
    assert g.transposed == f.transposed
    np.testing.assert_array_equal(g.reconstruct(), f.reconstruct())


def test_save_load_file_object_and_flags():
    W = np.random.default_rng(15).normal(size=(5, 12))
    f = factorize_linear(W, k=2, j=2, side="input", random_state=0)
    buf = io.BytesIO()
    f.save(buf)
    buf.seek(0)
    g = ProjectiveFactors.load(buf)
    assert g.transposed and g.search == ()
    # unknown error survives too
    h = ProjectiveFactors(f.labels, f.U, f.V)
    buf = io.BytesIO()
    h.save(buf)
    buf.seek(0)
    assert ProjectiveFactors.load(buf).error is None


def test_load_rejects_foreign_and_corrupt_files(tmp_path):
    foreign = tmp_path / "foreign.npz"
    np.savez(foreign, x=np.zeros(3))
    with pytest.raises(ValueError, match="not a kflats ProjectiveFactors file"):
        ProjectiveFactors.load(foreign)
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"this is no zip archive")
    with pytest.raises(ValueError, match="garbage.npz.*not a zip archive"):
        ProjectiveFactors.load(garbage)
    f = svd_factors(np.eye(4), rank=2)
    good = tmp_path / "good.npz"
    f.save(good)
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(good.read_bytes()[:200])
    with pytest.raises(ValueError):
        ProjectiveFactors.load(truncated)
    with np.load(good) as data:
        arrays = dict(data)
    newer = tmp_path / "newer.npz"
    np.savez(newer, **{**arrays, "version": np.array(99)})
    with pytest.raises(ValueError, match="version"):
        ProjectiveFactors.load(newer)
    missing = tmp_path / "missing.npz"
    np.savez(missing, **{k: v for k, v in arrays.items() if k != "V_0"})
    with pytest.raises(ValueError, match="corrupt"):
        ProjectiveFactors.load(missing)
    bad = tmp_path / "bad.npz"
    np.savez(bad, **{**arrays, "U_0": np.zeros((3, 2))})
    with pytest.raises(ValueError, match="corrupt"):
        ProjectiveFactors.load(bad)


# --------------------------------------------------------------------------
# the data type


def test_projective_factors_validates_its_arrays():
    labels = np.array([0, 1, 0])
    U = (np.ones((2, 1)), np.ones((1, 1)))
    V = (np.ones((1, 4)), np.ones((1, 4)))
    ProjectiveFactors(labels, U, V)
    with pytest.raises(ValueError, match="U\\[0\\] must have shape"):
        ProjectiveFactors(labels, (np.ones((1, 1)), np.ones((1, 1))), V)
    with pytest.raises(ValueError, match="labels must lie"):
        ProjectiveFactors(np.array([0, 2, 0]), U, V)
    with pytest.raises(ValueError, match="labels must be a 1-D integer"):
        ProjectiveFactors(labels.astype(float), U, V)
    with pytest.raises(ValueError, match="V\\[1\\] must have shape"):
        ProjectiveFactors(labels, U, (np.ones((1, 4)), np.ones((1, 3))))
    with pytest.raises(ValueError, match="one dtype"):
        ProjectiveFactors(labels, (U[0].astype(np.float32), U[1]), V)
    with pytest.raises(ValueError, match="means"):
        ProjectiveFactors(labels, U, V, means=np.zeros((3, 4)))
    with pytest.raises(ValueError, match="one array per cluster"):
        ProjectiveFactors(labels, U[:1], V)
    f = ProjectiveFactors(labels, U, V)
    with pytest.raises(ValueError, match="c must be"):
        f.rows(2)


def test_rank_zero_and_reconstruct_order():
    labels = np.array([1, 0, 1, 1])
    U = (np.zeros((1, 0)), np.array([[1.0], [2.0], [3.0]]))
    V = (np.zeros((0, 2)), np.array([[0.6, 0.8]]))
    f = ProjectiveFactors(labels, U, V)
    assert f.ranks == (0, 1) and f.n_params == 0 + 3 + 2 + 4
    np.testing.assert_allclose(
        f.reconstruct(), [[0.6, 0.8], [0, 0], [1.2, 1.6], [1.8, 2.4]]
    )
    m = ProjectiveFactors(labels, U, V, means=np.array([[1.0, 1.0], [0.0, 0.0]]))
    np.testing.assert_allclose(m.reconstruct()[1], [1.0, 1.0])
    assert m.n_params == f.n_params + 4


# --------------------------------------------------------------------------
# reproducibility and input checks


def test_reproducible():
    A = np.random.default_rng(16).normal(size=(100, 10))
    f = factorize(A, budget=0.5, ranks="adaptive", random_state=3)
    g = factorize(A, budget=0.5, ranks="adaptive", random_state=3)
    np.testing.assert_array_equal(f.labels, g.labels)
    for a, b in zip(f.U + f.V, g.U + g.V, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"budget": 0.0}, ValueError, "budget"),
        ({"budget": 1.5}, ValueError, "budget"),
        ({"budget": float("nan")}, ValueError, "budget"),
        ({"budget": "half"}, TypeError, "budget"),
        ({"budget": 0.01}, ValueError, "budget=0.01 is too small"),
        ({"budget": 0.5, "j": 2}, ValueError, "j and budget"),
        ({"k": 2}, ValueError, "give k and j"),
        ({"k": 0, "j": 1}, ValueError, "k must be in"),
        ({"k": 31, "j": 1}, ValueError, "k must be in"),
        ({"k": 2.0, "j": 1}, TypeError, "k must be an int"),
        ({"k": 2, "j": 0}, ValueError, "j must be in"),
        ({"k": 2, "j": 9}, ValueError, "j must be in"),
        ({"k": [], "budget": 0.5}, ValueError, "k must be"),
        ({"k": [1, 0], "budget": 0.5}, ValueError, "k must be in"),
        ({"k": 2, "j": 2, "ranks": "best"}, ValueError, "ranks"),
        ({"k": 2, "j": 2, "n_refine": -1}, ValueError, "n_refine"),
        ({"k": 2, "j": 2, "sample_weight": np.ones(3)}, ValueError, "sample_weight"),
        ({"k": 2, "j": 2, "sample_weight": -np.ones(30)}, ValueError, "sample_weight"),
        ({"k": 2, "j": 2, "sample_weight": np.zeros(30)}, ValueError, "sample_weight"),
    ],
)
def test_bad_parameters(kwargs, exc, match):
    A = np.random.default_rng(17).normal(size=(30, 8))
    with pytest.raises(exc, match=match):
        factorize(A, **kwargs)


def test_bad_matrices():
    with pytest.raises(ValueError, match="A must be a 2-D array"):
        factorize(np.ones(5), k=1, j=1)
    with pytest.raises(ValueError, match="A must be a 2-D array"):
        svd_factors(np.ones((2, 3, 4)), rank=1)
    A = np.random.default_rng(18).normal(size=(10, 4))
    for bad in (np.nan, np.inf):
        B = A.copy()
        B[3, 1] = bad
        with pytest.raises(ValueError, match="A"):
            factorize(B, k=2, j=1)
        with pytest.raises(ValueError, match="A"):
            svd_factors(B, rank=1)
    with pytest.raises(TypeError, match="float32 or float64"):
        factorize(np.ones((5, 3), dtype=np.int64), k=1, j=1)
    with pytest.raises(TypeError, match="float32 or float64"):
        svd_factors(A.astype(np.float16), rank=1)
    with pytest.raises(ValueError, match="exactly one of rank and budget"):
        svd_factors(A)
    with pytest.raises(ValueError, match="exactly one of rank and budget"):
        svd_factors(A, rank=1, budget=0.5)
    with pytest.raises(ValueError, match="rank must be in"):
        svd_factors(A, rank=5)
    with pytest.raises(ValueError, match="too small"):
        svd_factors(A, budget=0.1)
    with pytest.raises(TypeError):
        factorize(A, k=2, j=1, no_such_parameter=3)


# --------------------------------------------------------------------------
# properties over shapes, dtypes, k, j and budgets


@st.composite
def matrices(draw):
    n = draw(st.integers(2, 40))
    d = draw(st.integers(2, 10))
    dtype = draw(st.sampled_from(DTYPES))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    rank = draw(st.integers(1, d))
    A = rng.normal(size=(n, rank)) @ rng.normal(size=(rank, d))
    A *= rng.lognormal(size=(n, 1))  # rows of different scales
    return A.astype(dtype)


# degenerate draws (fewer distinct flats than k) are expected here
pytestmark_quiet = pytest.mark.filterwarnings(
    "ignore::sklearn.exceptions.ConvergenceWarning"
)
FAST = settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


@pytestmark_quiet
@FAST
@given(A=matrices(), data=st.data())
def test_property_k_j(A, data):
    n, d = A.shape
    k = data.draw(st.integers(1, min(n, 4)))
    j = data.draw(st.integers(1, d))
    ranks = data.draw(st.sampled_from(["uniform", "adaptive"]))
    affine = data.draw(st.booleans())
    f = factorize(A, k=k, j=j, ranks=ranks, affine=affine, random_state=0, max_iter=30)
    check_consistent(f, A)
    assert f.k <= k
    # never more than uniform ranks j would store
    bound = (n if k > 1 else 0) + (k * d if affine else 0) + j * (n + k * d)
    assert f.n_params <= bound
    if ranks == "uniform":
        assert all(r == min(j, f.rows(c).size) for c, r in enumerate(f.ranks))
    if k == 1 and not affine:
        g = svd_factors(A, rank=min(j, n))
        assert f.error == pytest.approx(g.error, rel=RTOL[A.dtype.type], abs=1e-6)


@pytestmark_quiet
@FAST
@given(A=matrices(), data=st.data())
def test_property_budget(A, data):
    n, d = A.shape
    budget = data.draw(st.floats(0.05, 1.0))
    ranks = data.draw(st.sampled_from(["uniform", "adaptive"]))
    affine = data.draw(st.booleans())
    if (n + d + (d if affine else 0)) > math.floor(budget * n * d):
        with pytest.raises(ValueError, match="too small"):
            factorize(A, budget=budget, ranks=ranks, affine=affine)
        return
    f = factorize(
        A, budget=budget, ranks=ranks, affine=affine, random_state=0, max_iter=30
    )
    check_consistent(f, A)
    assert f.n_params <= budget * n * d
    assert all(c.n_params <= budget * n * d for c in f.search)
    assert f.search[0].k == 1
    if not affine:
        assert f.error <= svd_factors(A, budget=budget).error * (1 + 1e-6) + 1e-6


@pytestmark_quiet
@FAST
@given(A=matrices(), data=st.data())
def test_property_save_load(A, data):
    n, d = A.shape
    k = data.draw(st.integers(1, min(n, 3)))
    j = data.draw(st.integers(1, d))
    f = factorize(A, k=k, j=j, ranks="adaptive", random_state=1, max_iter=30)
    buf = io.BytesIO()
    f.save(buf)
    buf.seek(0)
    g = ProjectiveFactors.load(buf)
    np.testing.assert_array_equal(g.labels, f.labels)
    for a, b in zip(f.U + f.V, g.U + g.V, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(a, b)
    assert g.error == f.error and g.n_params == f.n_params


# --------------------------------------------------------------------------
# one size formula


@settings(max_examples=50, deadline=None)
@given(
    n=st.integers(2, 40),
    d=st.integers(2, 12),
    k=st.integers(1, 5),
    affine=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_size_formula_counts_what_factors_store(n, d, k, affine, seed):
    from kflats._size import factors_size

    rng = np.random.default_rng(seed)
    k = min(k, n)
    labels = rng.permutation(np.arange(n) % k)
    ranks = [int(r) for r in rng.integers(0, d + 1, size=k)]
    U = tuple(np.zeros((int(np.sum(labels == c)), r)) for c, r in enumerate(ranks))
    V = tuple(np.zeros((r, d)) for r in ranks)
    means = np.zeros((k, d)) if affine else None
    f = ProjectiveFactors(labels, U, V, means)
    stored = sum(a.size for a in U + V) + (k * d if affine else 0)
    stored += n if k > 1 else 0
    sizes = [u.shape[0] for u in U]
    assert factors_size(sizes, ranks, d, affine).numbers == f.n_params == stored


@given(
    n=st.integers(1, 60),
    d=st.integers(1, 20),
    k=st.integers(1, 6),
    budget=st.integers(0, 2000),
    affine=st.booleans(),
)
def test_uniform_rank_is_the_largest_that_fits(n, d, k, budget, affine):
    from kflats._size import factors_size, uniform_rank

    def size(j):  # k clusters of equal rank j, n rows in all
        return factors_size([n] + [0] * (k - 1), [j] * k, d, affine).numbers

    j = uniform_rank(n, d, k, budget, affine)
    assert j < 1 or size(j) <= budget
    assert size(max(j, 0) + 1) > budget


def test_bytes_count_values_at_their_width_and_the_smallest_id_type():
    from kflats._size import factors_size, id_bits

    assert [id_bits(k) for k in (1, 256, 257, 2**15, 2**15 + 1)] == [8, 8, 16, 16, 32]
    size = factors_size([3, 5], [2, 1], 4)
    assert size.numbers == 2 * 7 + 1 * 9 + 8
    assert size.bytes(32) == 4 * 23 + 8
    assert size.bytes(4) == math.ceil(23 * 4 / 8) + 8


@settings(max_examples=150, deadline=None)
@given(
    st.integers(1, 9),
    st.sampled_from((0.0, 1e-9, 1e-6, 1e-5, 2e-5, 1e-3)),
    st.floats(1e-6, 1e6),
    st.integers(0, 2**31 - 1),
)
def test_the_moment_symmetry_check_is_allclose(n, noise, scale, seed):
    """The compiled check says what ``np.allclose(M, M.T)`` says, at and
    around its tolerance, relative and absolute."""
    from kflats.factorize._validation import is_symmetric

    rng = np.random.default_rng(seed)
    A = rng.normal(size=(n, n)) * scale
    M = A + A.T
    M[rng.integers(n), rng.integers(n)] *= 1 + noise * rng.choice((-1, 1))
    M[rng.integers(n), rng.integers(n)] += noise * scale * rng.normal()
    atol = 1e-8 * max(np.abs(M).max(), 1e-300)
    expected = np.allclose(M, M.T, rtol=1e-5, atol=atol)
    assert is_symmetric(M, 1e-5, atol) == expected


@pytest.mark.parametrize("upper", [1.0, 1.0 + 1e-5 + 1e-8 + 5e-11])
def test_the_moment_symmetry_check_reads_both_triangles(upper):
    """A pair within the tolerance relative to one of its entries but not the
    other: ``allclose`` checks both, so must the compiled check."""
    from kflats.factorize._validation import is_symmetric

    lower = 2.0 + 1e-5 + 1e-8 + 5e-11 - upper
    M = np.array([[1.0, upper], [lower, 1.0]])
    atol = 1e-8 * np.abs(M).max()
    assert np.allclose(M, M.T, 1e-5, atol) is False
    assert not is_symmetric(M, 1e-5, atol)
    assert not is_symmetric(M.T.copy(), 1e-5, atol)


def test_damped_moment_refuses_an_asymmetric_moment():
    C = np.eye(4)
    C[0, 1] = 0.5
    with pytest.raises(ValueError, match="input_moment must be symmetric"):
        damped_moment(C, 4, 0.01)
