"""Input checks shared by the public functions of kflats.factorize."""

import numbers

import numba
import numpy as np
from sklearn.utils import check_array


def _check_matrix(A, name):
    A_arr = np.asarray(A) if not hasattr(A, "dtype") else A
    if getattr(A_arr, "ndim", None) != 2:
        raise ValueError(
            f"{name} must be a 2-D array, got ndim={getattr(A_arr, 'ndim', None)}"
        )
    if A_arr.dtype not in (np.float32, np.float64):
        raise TypeError(
            f"{name} must have dtype float32 or float64, got {A_arr.dtype}; "
            f"convert it explicitly, e.g. {name}.astype(np.float64)"
        )
    return check_array(
        A_arr,
        dtype=None,
        copy=False,
        ensure_all_finite=True,
        ensure_min_samples=1,
        ensure_min_features=1,
        input_name=name,
    )


def _check_int(value, name, low, high):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if not low <= value <= high:
        raise ValueError(f"{name} must be in [{low}, {high}], got {value}")
    return int(value)


def _check_budget_fraction(budget):
    if isinstance(budget, bool) or not isinstance(budget, numbers.Real):
        raise TypeError(f"budget must be a float in (0, 1], got {budget!r}")
    budget = float(budget)
    if not 0.0 < budget <= 1.0:
        raise ValueError(f"budget must be in (0, 1], got {budget}")
    return budget


def check_sample_weight(sample_weight, n):
    if sample_weight is None:
        return None
    w = np.asarray(sample_weight)
    if w.shape != (n,):
        raise ValueError(f"sample_weight must have shape ({n},), got {w.shape}")
    if w.dtype.kind not in "iuf":
        raise TypeError(f"sample_weight must be real numbers, got dtype {w.dtype}")
    w = w.astype(np.float64)
    if not np.all(np.isfinite(w)):
        raise ValueError("sample_weight must be finite (no NaN or inf)")
    if np.any(w < 0):
        raise ValueError("sample_weight must be non-negative")
    if not w.sum() > 0:
        raise ValueError("sample_weight must have a positive sum")
    return w


def _check_ranks(ranks):
    if ranks not in ("uniform", "adaptive"):
        raise ValueError(f"ranks must be 'uniform' or 'adaptive', got {ranks!r}")
    return ranks


def check_moment(M, n, name, meaning):
    """A real, finite n x n second moment as float64; ``meaning`` says what n is."""
    M = np.asarray(M)
    if M.shape != (n, n):
        raise ValueError(
            f"{name} must have shape ({n}, {n}) ({meaning}), got {M.shape}"
        )
    if M.dtype.kind not in "iuf":
        raise TypeError(f"{name} must hold real numbers, got dtype {M.dtype}")
    M = M.astype(np.float64)
    if not np.all(np.isfinite(M)):
        raise ValueError(f"{name} must be finite (no NaN or inf)")
    return M


@numba.njit(cache=True, nogil=True)
def is_symmetric(M, rtol, atol):
    """``np.allclose(M, M.T, rtol, atol)`` of a finite square matrix, in one
    pass over its upper triangle (each pair checked both ways, as
    ``allclose`` reads both triangles), without its temporaries: a budget
    search checks its moments a few hundred times (1.3 s in ``allclose``)."""
    n = M.shape[0]
    for i in range(n):
        for j in range(i + 1, n):
            a, b = M[i, j], M[j, i]
            if abs(a - b) > atol + rtol * abs(b) or abs(b - a) > atol + rtol * abs(a):
                return False
    return True
