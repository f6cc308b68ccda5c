"""KSubspaces on dask arrays, on a local cluster of two worker processes.

Marked ``dask``: deselect with ``-m "not dask"``.
"""

import os

import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal

da = pytest.importorskip("dask.array")
distributed = pytest.importorskip("distributed")

from kflats import KSubspaces  # noqa: E402

pytestmark = pytest.mark.dask

K, J, D = 4, 3, 16


@pytest.fixture(scope="module")
def client():
    # distributed's nanny sets OMP_NUM_THREADS and friends to 1 in this
    # process's environment and leaves them; later subprocesses of the suite
    # would run torch on one thread. Restore the environment afterwards.
    environ = dict(os.environ)
    try:
        yield from _cluster_client()
    finally:
        os.environ.clear()
        os.environ.update(environ)


def _cluster_client():
    with (
        distributed.LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            processes=True,
            dashboard_address=":0",  # any free port: no clash with another cluster
        ) as cluster,
        distributed.Client(cluster) as client,
    ):
        yield client


def _block(block_info=None, marker=None):
    """One chunk of rows near K subspaces, generated from its chunk index."""
    b = block_info[None]["chunk-location"][0]
    (start, stop), _ = block_info[None]["array-location"]
    if marker is not None and b == 2 and not os.path.exists(marker):
        open(marker, "w").close()
        os._exit(1)  # the worker dies while computing this chunk
    bases = np.stack(
        [np.linalg.qr(np.random.RandomState(c).randn(D, J))[0].T for c in range(K)]
    )
    rng = np.random.RandomState(1000 + b)
    n = stop - start
    labels = rng.randint(K, size=n)
    X = np.einsum("nj,njd->nd", rng.randn(n, J), bases[labels])
    return (X + 0.05 * rng.randn(n, D)).astype(np.float32)


def generated(n=6000, chunk=1000, marker=None):
    """Rows generated chunk by chunk on the workers, never whole."""
    return da.map_blocks(
        _block, marker=marker, chunks=((chunk,) * (n // chunk), (D,)), dtype=np.float32
    )


@pytest.mark.parametrize("affine", [False, True])
def test_inertia_within_one_percent_of_the_in_memory_fit(client, affine):
    X = generated()
    if affine:
        X = X + np.float32(2.0)
    Xm = X.compute()
    mem = KSubspaces(k=K, j=J, affine=affine, random_state=0).fit(Xm)
    dist = KSubspaces(k=K, j=J, affine=affine, random_state=0).fit(X)
    assert dist.inertia_ == pytest.approx(mem.inertia_, rel=0.01)
    assert dist.bases_.dtype == np.float32 and dist.n_features_in_ == D
    assert isinstance(dist.labels_, da.Array)
    assert_array_equal(dist.labels_.compute(), dist.predict(Xm))
    # the reported inertia is the cost of the returned subspaces
    assert -dist.score(Xm) == pytest.approx(dist.inertia_, rel=1e-5)


@pytest.mark.parametrize("affine", [False, True])
def test_same_lloyd_iterations_as_in_memory_from_the_same_start(client, affine):
    """From given bases both fits run the one Lloyd loop: same steps, same stop."""
    X = generated()
    if affine:
        X = X + np.float32(1.0)
    Xm = X.compute()
    rng = np.random.RandomState(7)  # not the generating subspaces
    init = np.stack([np.linalg.qr(rng.randn(D, J))[0].T for c in range(K)])
    kw = dict(k=K, j=J, affine=affine, init=init, tol=0.0)
    mem = KSubspaces(**kw).fit(Xm)
    dist = KSubspaces(**kw).fit(X)
    assert dist.n_iter_ == mem.n_iter_ > 1
    assert_array_equal(dist.labels_.compute(), mem.labels_)
    assert_allclose(dist.bases_, mem.bases_, atol=1e-5)
    assert_allclose(dist.means_, mem.means_, atol=1e-5)
    assert dist.inertia_ == pytest.approx(mem.inertia_, rel=1e-6)


def test_one_pass_over_the_rows_per_lloyd_iteration():
    """Each Lloyd iteration reads every chunk once: assignment and statistics."""
    import dask

    reads = []

    def counted(block_info=None):
        reads.append(block_info[None]["chunk-location"][0])
        return _block(block_info)

    n_chunks = 4
    X = da.map_blocks(counted, chunks=((500,) * n_chunks, (D,)), dtype=np.float32)
    rng = np.random.RandomState(7)
    init = np.stack([np.linalg.qr(rng.randn(D, J))[0].T for c in range(K)])
    with dask.config.set(scheduler="synchronous"):
        est = KSubspaces(k=K, j=J, init=init, tol=0.0).fit(X)
    assert est.n_iter_ > 1 and len(reads) % n_chunks == 0
    # the data's sizes, the first assignment, one per iteration, the exact cost
    assert len(reads) // n_chunks == 1 + 1 + est.n_iter_ + 1


def test_predict_and_transform_are_lazy(client):
    X = generated()
    est = KSubspaces(k=K, j=J, random_state=0).fit(X)
    labels, dist = est.predict(X), est.transform(X)
    assert isinstance(labels, da.Array) and isinstance(dist, da.Array)
    assert dist.chunks == (X.chunks[0], (K,))
    Xm = X.compute()
    assert_array_equal(labels.compute(), est.predict(Xm))
    assert_allclose(dist.compute(), est.transform(Xm), rtol=1e-6)


def test_worker_killed_mid_fit_does_not_change_the_result(client, tmp_path):
    marker = str(tmp_path / "killed")
    calm = KSubspaces(k=K, j=J, random_state=0).fit(generated())
    hit = KSubspaces(k=K, j=J, random_state=0).fit(generated(marker=marker))
    assert os.path.exists(marker)  # a worker did die during the fit
    assert hit.inertia_ == calm.inertia_
    assert_array_equal(hit.bases_, calm.bases_)


def test_sample_weight_as_numpy_or_dask(client):
    X = generated(n=4000)
    w = np.random.RandomState(0).randint(0, 3, size=X.shape[0]).astype(np.float32)
    a = KSubspaces(k=K, j=J, random_state=0).fit(X, sample_weight=w)
    b = KSubspaces(k=K, j=J, random_state=0).fit(
        X, sample_weight=da.from_array(w, chunks=500)
    )
    assert a.inertia_ == pytest.approx(b.inertia_, rel=1e-6)
    mem = KSubspaces(k=K, j=J, random_state=0).fit(X.compute(), sample_weight=w)
    assert a.inertia_ == pytest.approx(mem.inertia_, rel=0.01)


@pytest.mark.parametrize("affine", [False, True])
def test_one_weighted_subspace_is_the_weighted_svd(client, affine):
    """k=1 has one optimum: the weighted (centred when affine) top-j subspace."""
    rng = np.random.RandomState(0)
    Xm = rng.randn(3000, 8) * np.linspace(1, 2, 8)
    w = rng.exponential(size=3000)
    X = da.from_array(Xm, chunks=(700, 8))
    est = KSubspaces(k=1, j=3, affine=affine, random_state=0)
    est.fit(X, sample_weight=da.from_array(w, chunks=700))
    mean = (w @ Xm) / w.sum() if affine else np.zeros(8)
    _, s, vt = np.linalg.svd((Xm - mean) * np.sqrt(w)[:, None], full_matrices=False)
    assert est.inertia_ == pytest.approx((s[3:] ** 2).sum(), rel=1e-9)
    assert_allclose(est.bases_[0].T @ est.bases_[0], vt[:3].T @ vt[:3], atol=1e-9)
    assert_allclose(est.means_[0], mean, atol=1e-12)


def test_bad_chunks_are_rejected():
    X = da.random.RandomState(0).random_sample((200, 8), chunks=(50, 4))
    est = KSubspaces(k=2, j=2, random_state=0)
    with pytest.raises(ValueError, match="chunked along the feature axis"):
        est.fit(X)
    assert not hasattr(est, "bases_")
    X = X.rechunk({1: -1})
    with pytest.raises(ValueError, match="unknown chunk sizes"):
        est.fit(X[X[:, 0] > 0.5])
    est.fit(X, sample_weight=np.ones(200))
    before = est.bases_.copy()
    with pytest.raises(ValueError, match="chunked along the feature axis"):
        est.predict(X.rechunk((50, 4)))
    with pytest.raises(ValueError, match="X has 7 features, but KSubspaces is"):
        est.transform(X[:, :7])
    with pytest.raises(ValueError, match="sample_weight has shape"):
        est.fit(X, sample_weight=np.ones(199))
    with pytest.raises(ValueError, match=r"contains NaN or infinity \(1 rows\)"):
        est.fit(da.where(da.arange(200)[:, None] == 7, np.nan, X))
    assert_array_equal(est.bases_, before)


@pytest.mark.parametrize("affine", [False, True])
def test_score_coordinates_and_project_match_in_memory(client, affine):
    X = generated()
    if affine:
        X = X + np.float32(1.0)
    Xm = X.compute()
    est = KSubspaces(k=K, j=J, affine=affine, random_state=0).fit(Xm)
    w = np.random.RandomState(0).exponential(size=Xm.shape[0])
    assert est.score(X) == pytest.approx(est.score(Xm), rel=1e-6)
    assert est.score(X, sample_weight=w) == pytest.approx(
        est.score(Xm, sample_weight=w), rel=1e-6
    )
    labels, coords = est.coordinates(X)
    proj = est.project(X)
    assert all(isinstance(a, da.Array) for a in (labels, coords, proj))
    assert coords.chunks == (X.chunks[0], (J,)) and proj.chunks == X.chunks
    ref_labels, ref_coords = est.coordinates(Xm)
    assert_array_equal(labels.compute(), ref_labels)
    assert_allclose(coords.compute(), ref_coords, rtol=1e-5, atol=1e-6)
    assert_allclose(proj.compute(), est.project(Xm), rtol=1e-5, atol=1e-6)


def test_partial_fit_streams_the_chunks(client):
    X = generated(n=4000, chunk=1000)
    w = da.from_array(
        np.random.RandomState(1).exponential(size=4000), chunks=X.chunks[0]
    )
    streamed = KSubspaces(k=K, j=J, random_state=0).partial_fit(X, sample_weight=w)
    one_by_one = KSubspaces(k=K, j=J, random_state=0)
    for b in range(X.numblocks[0]):
        one_by_one.partial_fit(X.blocks[b].compute(), sample_weight=w.blocks[b])
    assert streamed.n_iter_ == one_by_one.n_iter_ == 4
    assert_array_equal(streamed.bases_, one_by_one.bases_)
    assert streamed.inertia_ == one_by_one.inertia_
    assert_array_equal(streamed.labels_, one_by_one.labels_)


def test_partial_fit_on_a_dask_array_of_another_width_changes_nothing(client):
    est = KSubspaces(k=K, j=J, random_state=0).partial_fit(generated(n=2000).compute())
    before = (est.bases_.copy(), est.n_iter_)
    with pytest.raises(ValueError, match=f"expecting {D} features"):
        est.partial_fit(da.zeros((100, D + 1), chunks=(50, D + 1)))
    assert_array_equal(est.bases_, before[0])
    assert est.n_iter_ == before[1]


def test_non_finite_rows_are_reported_when_computed(client):
    X = generated()
    est = KSubspaces(k=K, j=J, random_state=0).fit(X.compute())
    bad = da.where(da.arange(X.shape[0])[:, None] == 1500, np.nan, X)
    match = r"contains NaN or infinity \(1 rows in a chunk\)"
    with pytest.raises(ValueError, match=match):
        est.score(bad)
    lazy = [est.predict(bad), est.transform(bad), est.project(bad)]
    lazy += list(est.coordinates(bad))
    for out in lazy:  # building the graph is fine; computing it is not
        with pytest.raises(ValueError, match=match):
            out.compute()
