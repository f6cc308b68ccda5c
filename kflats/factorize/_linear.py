"""Linear layers: factor pairs of a weight, clustering its input or output side.

A Linear layer ``y = W x + b`` (W of shape out x in) can be clustered on
either side:

- **input side**: the rows of ``W.T`` (input features) are clustered; the
  layer becomes k small layers on disjoint slices of the input, recombined by
  one fully-connected layer (the form of *Deep Learning Meets Projective
  Clustering*). The factors are marked ``transposed=True``.
- **output side**: the rows of ``W`` (output neurons) are clustered; the
  layer becomes k small two-layer products, each producing the outputs of its
  own neurons.

Calibrated objective
--------------------
What a user feels is the output error on the inputs the layer sees,
``E||(W - W_hat) x||^2 = ||(W - W_hat) L||_F^2`` with ``C = E[x x^T] = L L^T``
(damped so that it is positive definite). On the output side this is exact:
the rows of ``W L`` are clustered and factored (a projective clustering in
whitened coordinates) and mapped back, ``W_hat_c = U_c (V_c L^-1)``. With
k = 1 this is the whitened truncated SVD. On the input side only the diagonal
of ``C`` keeps the clusters separable: it becomes the row weights, which is
exact only for a diagonal ``C``. Either way the reported ``error`` is the
exact calibrated error under the full (damped) ``C``.
"""

import collections
import hashlib
import numbers
import threading
from dataclasses import replace

import numpy as np
from scipy import linalg
from sklearn.utils import check_random_state

from .._size import budget_numbers
from ._search import search_factors, search_options
from ._spectra import _ratio
from ._validation import (
    _check_budget_fraction,
    _check_matrix,
    check_moment,
    check_sample_weight,
    is_symmetric,
)

SIDES = ("auto", "input", "output")


def _check_damping(damping):
    if isinstance(damping, bool) or not isinstance(damping, numbers.Real):
        raise TypeError(f"damping must be a float >= 0, got {damping!r}")
    if not 0 <= damping < np.inf:
        raise ValueError(f"damping must be a finite float >= 0, got {damping}")
    return float(damping)


def damped_moment(input_moment, n_features, damping=1e-2):
    """The damped second moment of a layer's inputs, and its Cholesky factor.

    Parameters
    ----------
    input_moment : array-like of shape (n_features, n_features)
        ``E[x x^T]`` of the layer's inputs: symmetric positive semi-definite.
    n_features : int
        The layer's ``in_features``.
    damping : float, default=1e-2
        Added to the diagonal, relative to its mean, so that directions the
        calibration never saw keep a small, non-zero weight.

    Returns
    -------
    C : ndarray of shape (n_features, n_features), float64
        The damped moment.
    L : ndarray of shape (n_features, n_features), float64
        Lower-triangular, ``C = L @ L.T``.

    Raises
    ------
    ValueError
        If the moment has the wrong shape, holds NaN or inf, is not
        symmetric, is zero, or is not positive semi-definite.

    Examples
    --------
    >>> import numpy as np
    >>> from kflats.factorize import damped_moment
    >>> C, L = damped_moment(np.diag([4.0, 0.0]), 2, damping=0.5)
    >>> np.diag(C).tolist(), bool(np.allclose(L @ L.T, C))
    ([5.0, 1.0], True)
    """
    damping = _check_damping(damping)
    C = check_moment(
        input_moment, n_features, "input_moment", "the layer's in_features"
    )
    scale = float(np.trace(C)) / n_features
    if not scale > 0:
        raise ValueError(
            "input_moment has a non-positive trace: it is not the second moment "
            "of any non-zero input (was the calibration empty?)"
        )
    if not is_symmetric(C, 1e-5, 1e-8 * scale):
        raise ValueError("input_moment must be symmetric (E[x x^T])")
    advice = "pass E[x x^T] of real inputs, or raise damping"
    return damped_cholesky(C, damping, scale, "input_moment", advice)


class Kept:
    """Results of a costly step, kept by the content of its inputs.

    A budget search factors the same moment many times (each bit width,
    group and rank of a module's forms): the results are kept, at most
    ``max_bytes`` of them, the least recently used dropped first. Kept
    arrays are read-only; :meth:`get` returns them as they are.
    """

    def __init__(self, max_bytes):
        self.max_bytes = max_bytes
        self._items = collections.OrderedDict()
        # modules' forms are measured in threads (kflats._threads.map_threads)
        self._lock = threading.Lock()

    @staticmethod
    def key(array, *params):
        array = np.ascontiguousarray(array)
        digest = hashlib.blake2b(array.view(np.uint8), digest_size=16).digest()
        return (digest, array.shape, array.dtype.str, *params)

    def get(self, key):
        with self._lock:
            hit = self._items.get(key)
            if hit is not None:
                self._items.move_to_end(key)
        return hit

    def put(self, key, arrays):
        for a in arrays:
            a.flags.writeable = False
        with self._lock:
            self._items[key] = arrays
            while len(self._items) > 1 and self._nbytes() > self.max_bytes:
                self._items.popitem(last=False)
        return arrays

    def _nbytes(self):
        return sum(a.nbytes for arrays in self._items.values() for a in arrays)


# the damped moments of the last modules factored: a module's forms, and the
# modules that read its input (queries, keys, values), factor the same one.
# 64 MB holds one of 1,536 x 1,536 with its factor and several of 576 x 576;
# 256 MB held 241 MB of SmolLM2's 211 modules' to no use (a module's moment
# is not factored again once its forms are measured)
_CHOLESKY = Kept(64 << 20)


def damped_cholesky(C, damping, scale, name, advice):
    """``C`` symmetrized plus ``damping * scale`` on its diagonal, and its factor.

    Returns the damped matrix and its lower Cholesky factor (fresh arrays);
    ``name`` and ``advice`` make the error raised when the damped form has
    none. The factors of the last moments are kept (:class:`Kept`).
    """
    key = Kept.key(C, float(damping * scale))
    hit = _CHOLESKY.get(key)
    if hit is not None:
        return hit[0].copy(), hit[1].copy()
    C = 0.5 * (C + C.T)
    C[np.diag_indices(C.shape[0])] += damping * scale
    try:
        L = linalg.cholesky(C, lower=True)
    except linalg.LinAlgError:
        raise ValueError(
            f"{name} is not positive semi-definite (its damped form has no "
            f"Cholesky factor); {advice}"
        ) from None
    _CHOLESKY.put(key, (C.copy(), L.copy()))
    return C, L


def _calibrated(W64, What64, L):
    """(calibrated, plain) relative errors of an approximation of W."""
    E = W64 - What64
    num = float(np.sum((E @ L) ** 2))
    den = float(np.sum((W64 @ L) ** 2))
    return _ratio(num, den), _ratio(float(np.sum(E**2)), float(np.sum(W64**2)))


def _weight_of(factors):
    """The approximation of W (out x in) that factors of either side describe."""
    A = factors.reconstruct().astype(np.float64)
    return A.T if factors.transposed else A


def whiten(W, L):
    """``W L`` in float64: the weight in the coordinates where C is the identity."""
    return np.asarray(W, dtype=np.float64) @ L


def unwhiten(M, L, dtype=np.float64):
    """``M L^-1``, by a triangular solve: back from whitened coordinates."""
    M = np.asarray(M, dtype=np.float64)
    out = linalg.solve_triangular(L, M.T, lower=True, trans="T").T
    return np.ascontiguousarray(out, dtype=dtype)


def _fit_side(W, k, j, max_numbers, side, moment, w, options, what):
    """Factors of one side of W; ``moment`` is the damped ``(C, L)`` or None."""
    dtype = W.dtype
    C, L = moment if moment is not None else (None, None)
    if side == "input":
        if C is not None:
            w = check_sample_weight(np.diag(C).copy(), W.shape[1])
        elif w is not None:
            w = check_sample_weight(w, W.shape[1])
        result = search_factors(W.T, w, k, j, max_numbers, options, what)
        result = replace(result, transposed=True)
    elif L is None:
        w = None if w is None else check_sample_weight(w, W.shape[0])
        result = search_factors(W, w, k, j, max_numbers, options, what)
    else:
        whitened = search_factors(
            whiten(W, L).astype(dtype), None, k, j, max_numbers, options, what
        )
        result = replace(
            whitened,
            V=tuple(unwhiten(v, L, dtype) for v in whitened.V),
            means=None
            if whitened.means is None
            else unwhiten(whitened.means, L, dtype),
        )
    if L is not None:
        error, weight_error = _calibrated(W.astype(np.float64), _weight_of(result), L)
        result = replace(
            result, error=error, weight_error=weight_error, objective="input_moment"
        )
    return result


def check_row_weights(sample_weight, moment, side):
    """sample_weight excludes an input moment, and needs one side."""
    if sample_weight is None:
        return
    if moment is not None:
        raise ValueError(
            "sample_weight and input_moment exclude each other: the input "
            "moment already weighs the error"
        )
    if side == "auto":
        raise ValueError(
            "sample_weight weighs the clustered rows, which differ between "
            "sides: choose side='input' or side='output'"
        )


def shared_seed(random_state):
    """An int seed for both sides of "auto": one draw from a RandomState."""
    if random_state is not None and not isinstance(random_state, numbers.Integral):
        return check_random_state(random_state).randint(np.iinfo(np.int32).max)
    return random_state


def linear_factors(W, k, j, max_numbers, side, moment, w, options, what):
    """The worker of :func:`factorize_linear`, its inputs checked; ``side``
    is ``"input"``, ``"output"`` or ``"auto"`` (both, the lower error kept)."""
    if side != "auto":
        return _fit_side(W, k, j, max_numbers, side, moment, w, options, what)
    fits = [
        _fit_side(W, k, j, max_numbers, s, moment, w, options, what)
        for s in ("input", "output")
    ]
    return min(fits, key=lambda f: f.error)


def factorize_linear(
    W,
    k=None,
    j=None,
    *,
    budget=None,
    side=None,
    input_moment=None,
    damping=1e-2,
    ranks="uniform",
    affine=False,
    sample_weight=None,
    random_state=None,
    n_refine=10,
    **fit_params,
):
    """Factor pairs of a Linear layer's weight, clustering one of its sides.

    Parameters
    ----------
    W : ndarray of shape (out_features, in_features), float32 or float64
        The weight of ``y = W x + b``.
    k, j : int, default=None
        As in :func:`factorize`.
    budget : float in (0, 1], default=None
        As in :func:`factorize`: the fraction of the weight's numbers kept.
    side : {"auto", "input", "output"} or None, default=None
        ``"input"``: cluster the input features, i.e. factorize ``W.T``
        (in x out); the result is marked ``transposed=True`` and
        ``reconstruct().T`` approximates ``W``. ``"output"``: cluster the
        output neurons, the rows of ``W`` itself. ``"auto"``: fit both under
        the ``budget`` and keep the one with the lower ``error`` (the
        calibrated error when ``input_moment`` is given). ``None``:
        ``"auto"`` with a budget, ``"input"`` with ``k`` and ``j`` (for the
        same k and j the two sides store different numbers, so their errors
        do not compare).
    input_moment : array-like of shape (in_features, in_features), default=None
        ``C = E[x x^T]`` of the layer's inputs on calibration data (see
        :func:`kflats.torch.calibrate`). The fit then minimises the expected
        output error ``E||(W - W_hat) x||^2 = ||(W - W_hat) L||^2`` with
        ``L L^T`` the damped ``C``: exactly on the output side (the rows of
        ``W L`` are clustered and factored, then mapped back by ``L^-1``; k = 1
        is the whitened truncated SVD), and through the row weights
        ``diag(C)`` on the input side (exact only for a diagonal ``C``).
    damping : float, default=1e-2
        With ``input_moment``: ``damping * mean(diag(C))`` is added to the
        diagonal of ``C`` (see :func:`damped_moment`).
    ranks, affine, n_refine :
        As in :func:`factorize`.
    sample_weight : array-like, default=None
        One weight per clustered row, as in :func:`factorize`; not with
        ``input_moment``, nor with ``side="auto"``.
    random_state : int, RandomState instance or None, default=None
        Seeds the clustering; with ``side="auto"`` both sides get the same
        seed.
    **fit_params
        Further parameters of :class:`kflats.KSubspaces` (``init``,
        ``n_init``, ``max_iter``, ``tol``, ``verbose``).

    Returns
    -------
    factors : ProjectiveFactors
        ``error`` is the relative calibrated error ``||(W - W_hat) L||^2 /
        ||W L||^2`` (objective ``"input_moment"``) when ``input_moment`` is
        given, else the relative (weighted) Frobenius error;
        ``weight_error`` is the plain ``||W - W_hat||^2 / ||W||^2``.

    Raises
    ------
    ValueError
        If ``side`` is unknown, ``W`` is not 2-D, ``input_moment`` is not a
        valid second moment of the layer's inputs, or ``sample_weight`` is
        combined with ``input_moment`` or ``side="auto"``.

    See Also
    --------
    factorize : The factorization of the rows of a matrix.
    kflats.torch.ProjectiveLinear.from_factors : The layer of either side.

    Examples
    --------
    >>> import numpy as np
    >>> from kflats.factorize import factorize_linear, svd_factors
    >>> rng = np.random.default_rng(0)
    >>> W = rng.normal(size=(8, 20))
    >>> f = factorize_linear(W, k=2, j=3, side="input", random_state=0)
    >>> f.shape, f.transposed
    ((20, 8), True)
    >>> f.reconstruct().T.shape
    (8, 20)

    With inputs of very unequal scales, the calibrated fit spends its rank
    where the inputs are large:

    >>> X = rng.normal(size=(500, 20)) * np.logspace(0, -2, 20)
    >>> C = X.T @ X / len(X)
    >>> g = factorize_linear(W, budget=0.5, input_moment=C, random_state=0)
    >>> g.objective
    'input_moment'
    >>> plain = svd_factors(W, budget=0.5).reconstruct()
    >>> calibrated = g.reconstruct().T if g.transposed else g.reconstruct()
    >>> err = lambda Wh: np.sum(((W - Wh) @ X.T) ** 2)
    >>> bool(err(calibrated) < err(plain))
    True
    """
    if side is None:
        side = "auto" if budget is not None else "input"
    if side not in SIDES:
        raise ValueError(f"side must be one of {SIDES} or None, got {side!r}")
    if side == "auto" and budget is None:
        raise ValueError(
            "side='auto' compares the two sides under one budget: give budget=, "
            "or choose side='input' or side='output' for a given k and j"
        )
    W = _check_matrix(W, "W")
    check_row_weights(sample_weight, input_moment, side)
    moment = None
    if input_moment is not None:
        moment = damped_moment(input_moment, W.shape[1], damping)
    random_state = shared_seed(random_state)
    options = search_options(ranks, affine, random_state, n_refine, fit_params)
    max_numbers = None
    if budget is not None:
        budget = _check_budget_fraction(budget)
        max_numbers = budget_numbers(budget, *W.shape)
    what = f"budget={budget}"
    return linear_factors(
        W, k, j, max_numbers, side, moment, sample_weight, options, what
    )
