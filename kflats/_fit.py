"""What ``KSubspaces.fit`` does with its data, on every backend.

The input checked and the backend chosen (numpy or torch for an array in
memory, ``kflats._dask_fit.DaskOps`` for a dask array), the parameters checked
against the data once for all of them (scikit-learn's
``_check_params_vs_input``), then the best of ``n_init`` runs of the Lloyd
loop of ``kflats._lloyd``.
"""

import warnings
from functools import partial

import numpy as np
from sklearn.utils import check_random_state
from sklearn.utils.validation import _check_sample_weight, validate_data

from . import _dask, _dask_fit
from ._backend import NumpyOps
from ._lloyd import _ksubspaces_single, _row_norms_sq


def fit_input(est, X, sample_weight):
    """X and sample_weight checked, X's squared row norms, and the backend.

    The one choice of backend: a dask array is fitted by ``DaskOps`` (its rows
    never gathered, ``xsq`` None), anything else by ``est.backend``.
    """
    if _dask.is_dask_array(X):
        if est.backend != "numpy":
            raise ValueError(
                "backend='torch' does not take dask arrays: their chunks are "
                "fitted with numpy (use backend='numpy')."
            )
        X, sample_weight = _dask_fit.fit_input(X, sample_weight)
        est.__dict__.pop("feature_names_in_", None)
        est.n_features_in_ = X.shape[1]
        return X, None, sample_weight, _dask_fit.DaskOps(X, sample_weight)
    X = validate_data(est, X, dtype=[np.float64, np.float32], order="C", copy=False)
    sample_weight = _check_sample_weight(
        sample_weight, X, dtype=X.dtype, ensure_non_negative=True
    )
    xsq = _row_norms_sq(X)
    return X, xsq, sample_weight, backend_ops(est.backend, X, xsq, est.device)


def check_params_vs_input(est, X, sample_weight, ops):
    """k, j, init and n_init against the data; returns the number of runs.

    The sizes the shape tells come first; the rows of positive weight need a
    pass over a dask array (which also finds its non-finite rows).
    """
    _check_sizes(est.k, est.j, *X.shape, None)
    _check_sizes(est.k, est.j, *X.shape, ops.n_positive(sample_weight))
    if not isinstance(est.init, str):
        _check_init(est.init, est.k, est.j, X.shape[1])
    return _n_init(est)


def _check_sizes(k, j, n, d, n_pos):
    if k > n:
        raise ValueError(f"k={k} must be <= n_samples={n}.")
    if j >= d:
        raise ValueError(
            f"j={j} must be smaller than n_features={d}: a subspace of "
            "dimension n_features fits every row exactly."
        )
    if n_pos is None:
        return
    if n_pos == 0:
        raise ValueError("sample_weight must have at least one positive entry.")
    if k > n_pos:
        raise ValueError(
            f"k={k} must be <= the number of rows with positive "
            f"sample_weight ({n_pos})."
        )


def _n_init(est):
    """The restarts that n_init and init ask for (one for given bases)."""
    is_array = not isinstance(est.init, str)
    if est.n_init == "auto":
        return 10 if (not is_array and est.init == "random") else 1
    if is_array and est.n_init != 1:
        warnings.warn(
            f"Explicit initial bases passed: performing only one init in "
            f"{type(est).__name__} instead of n_init={est.n_init}.",
            RuntimeWarning,
            stacklevel=6,  # the caller of fit or partial_fit
        )
        return 1
    return est.n_init


def _check_init(init, k, j, d):
    init = np.asarray(init)
    expected = (k, j, d)
    if init.shape != expected:
        raise ValueError(
            f"init has shape {init.shape}; expected (k, j, n_features) = {expected}."
        )
    if not np.all(np.isfinite(init)):
        raise ValueError("init must contain only finite values.")
    gram = np.einsum("kid,kjd->kij", init, init)
    if not np.allclose(gram, np.eye(j), atol=1e-5):
        raise ValueError(
            "init must have orthonormal rows in each of its k bases "
            "(orthonormalize them, e.g. with numpy.linalg.qr)."
        )


def best_run(est, X, xsq, sample_weight, ops, n_init):
    """The cheapest of ``n_init`` Lloyd runs, each from its own start.

    Returns ``(labels, inertia, bases, means, comps, n_iter)`` as
    ``kflats._lloyd._ksubspaces_single``.
    """
    rng = check_random_state(est.random_state)
    grow = partial(ops.grow, X, xsq, sample_weight, j=est.j, affine=est.affine)
    # Stop once an iteration gains less than tol times the empty model's cost.
    tol = est.tol * ops.empty_cost(X, xsq, sample_weight, est.affine)
    best = None
    for run in range(n_init):
        bases, means, comps, dist = est._init_subspaces(
            X, xsq, sample_weight, rng, grow, ops
        )
        if est.verbose:
            print(f"Initialization {run} complete.")
        result = _ksubspaces_single(
            X,
            xsq,
            sample_weight,
            bases,
            means,
            comps,
            est.affine,
            est.max_iter,
            tol,
            grow,
            est.verbose,
            init_dist=dist,
            ops=ops,
        )
        if best is None or result[1] < best[1]:
            best = result
    return best


def backend_ops(backend, X, xsq, device):
    """The operations of ``backend`` (validated: "numpy" or "torch") on ``X``."""
    if backend == "numpy":
        if device is not None:
            raise ValueError(f"device={device!r} is only used with backend='torch'.")
        return NumpyOps()
    from ._torch_backend import TorchOps  # imports torch

    return TorchOps(X, xsq, device)
