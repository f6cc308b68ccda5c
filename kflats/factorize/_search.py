"""factorize and svd_factors: the partition, the search over k, the SVD baseline."""

import numbers
import warnings
from typing import NamedTuple

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils import check_random_state

from .._size import budget_numbers, factors_size, uniform_rank
from ._allocation import _allocate, refine_partition
from ._factors import Candidate
from ._spectra import (
    cluster_spectra,
    factors_from_spectra,
    kept_numbers,
    residual_error,
    total_energy,
)
from ._validation import (
    _check_budget_fraction,
    _check_int,
    _check_matrix,
    _check_ranks,
    check_sample_weight,
)

#: Numbers of clusters that a budget search tries when ``k`` is not given.
K_GRID = (1, 2, 4, 6, 8, 12, 16)


def partition_rows(A, k, j, affine, w, seed, fit_params, quiet):
    """Labels of a KSubspaces fit (all zeros for one cluster)."""
    if k == 1:
        return np.zeros(A.shape[0], dtype=np.int64)
    from kflats import KSubspaces

    # a flat of dimension d fits every row: any partition will do, so fit d - 1
    est = KSubspaces(
        k=k, j=min(j, A.shape[1] - 1), affine=affine, random_state=seed, **fit_params
    )
    with warnings.catch_warnings():
        if quiet:
            # a search tries k values that may exceed the clusters in the data
            warnings.simplefilter("ignore", ConvergenceWarning)
        est.fit(A, sample_weight=w)
    return np.asarray(est.labels_, dtype=np.int64)


def factorize(
    A,
    k=None,
    j=None,
    *,
    budget=None,
    ranks="uniform",
    affine=False,
    sample_weight=None,
    random_state=None,
    n_refine=10,
    **fit_params,
):
    """Factor pairs of a matrix, one per cluster of its rows.

    The rows of ``A`` are partitioned by a :class:`kflats.KSubspaces` fit, and
    the rows of each cluster are replaced by their truncated SVD ``U_c V_c``.

    Either give ``k`` and ``j``, or give ``budget``: then the number of
    clusters is searched over ``k`` (default :data:`K_GRID`, which includes
    k = 1, the truncated SVD) with, for each, the largest rank that the budget
    allows, and the factors with the lowest error are returned; the
    candidates tried are recorded in ``search``. The default grid is walked
    in increasing k and stops at the first k > 1 that does not lower the
    error (a matrix whose rows do not cluster, such as most Linear weights,
    then costs two fits instead of five); a ``k`` you give is searched
    whole.

    Parameters
    ----------
    A : ndarray of shape (n, d), float32 or float64
        The matrix; its rows are clustered. For a Linear weight use
        :func:`factorize_linear`.
    k : int or sequence of int, default=None
        Number of clusters, ``1 <= k <= n``. With ``budget``, a sequence of
        numbers to search (default :data:`K_GRID`); without, required.
    j : int, default=None
        Rank of every cluster, ``1 <= j <= d``. Required without ``budget``,
        and excluded with it.
    budget : float in (0, 1], default=None
        Fraction of the ``n * d`` numbers of ``A`` that the factors may store
        (see :attr:`ProjectiveFactors.n_params`); never exceeded.
    ranks : {"uniform", "adaptive"}, default="uniform"
        ``"uniform"``: every cluster gets rank ``j`` (capped at its number of
        rows). ``"adaptive"``: ranks differ per cluster; the parameters (the
        budget, or without one what uniform ranks ``j`` store before capping)
        go step by step to the cluster whose next squared singular value
        gains most per number stored (a step of cluster c costs ``n_c + d``).
        On the same partition this never gives a larger error than uniform
        ranks. Then, on the best partition of the search, rows are reassigned
        under these ranks and the ranks re-allocated (see ``n_refine``).
    affine : bool, default=False
        Fit affine flats: each cluster also stores its weighted mean (d
        numbers).
    sample_weight : array-like of shape (n,), default=None
        Non-negative weight per row (e.g. token frequencies), used by the fit,
        by the per-cluster SVDs and in :attr:`ProjectiveFactors.error`.
    random_state : int, RandomState instance or None, default=None
        Seeds the clustering; an int makes the result reproducible.
    n_refine : int, default=10
        With ``ranks="adaptive"``: at most this many rounds of moving each row
        to the flat that minimises its weighted squared distance plus the
        parameters its coefficients cost (priced at the marginal gain per
        parameter of the allocation), each followed by a new allocation. The
        best allocation seen is kept; rounds stop early once they gain less
        than 0.1% of the error. 0 disables it. Ignored for uniform ranks.
    **fit_params
        Further parameters of :class:`kflats.KSubspaces` (``init``,
        ``n_init``, ``max_iter``, ``tol``, ``verbose``).

    Returns
    -------
    factors : ProjectiveFactors
        In the dtype of ``A``. Clusters that end up empty are dropped, so
        ``factors.k`` may be smaller than the ``k`` fitted.

    Raises
    ------
    ValueError
        If ``A`` is not 2-D or holds NaN or inf, if ``k``, ``j`` or ``budget``
        are out of range or given in a wrong combination, or if ``budget`` is
        too small for even one cluster of rank 1.
    TypeError
        If ``A`` is not float32 or float64.

    See Also
    --------
    svd_factors : The truncated-SVD baseline.
    factorize_linear : Factorize a Linear layer's weight.
    kflats.KSubspaces : The clustering.

    Notes
    -----
    For a fixed partition, ``V_c`` holds the top right singular vectors of the
    cluster's (weighted, centred when affine) rows and ``U_c = (A[R_c] - mu_c)
    V_c^T``; this is the best rank-``j_c`` approximation of those rows
    (Eckart-Young). With ``k = 1`` the factors are the truncated SVD of ``A``.

    Examples
    --------
    >>> import numpy as np
    >>> from kflats.factorize import factorize, svd_factors
    >>> rng = np.random.default_rng(0)
    >>> A = np.vstack([rng.normal(size=(60, 2)) @ rng.normal(size=(2, 12))
    ...                for _ in range(3)])
    >>> f = factorize(A, k=3, j=2, random_state=0)
    >>> f.k, f.ranks, f.shape
    (3, (2, 2, 2), (180, 12))
    >>> bool(f.error < 1e-20)
    True
    >>> g = factorize(A, budget=0.5, random_state=0)
    >>> bool(g.n_params <= 0.5 * A.size)
    True
    >>> bool(g.error <= svd_factors(A, budget=0.5).error)
    True
    """
    A = _check_matrix(A, "A")
    n, d = A.shape
    w = check_sample_weight(sample_weight, n)
    options = search_options(ranks, affine, random_state, n_refine, fit_params)
    max_numbers = None
    if budget is not None:
        budget = _check_budget_fraction(budget)
        max_numbers = budget_numbers(budget, n, d)
    return search_factors(A, w, k, j, max_numbers, options, f"budget={budget}")


class _SearchOptions(NamedTuple):
    """How :func:`factorize` fits, checked once and passed down whole."""

    ranks: str = "uniform"
    affine: bool = False
    random_state: object = None
    n_refine: int = 10
    fit_params: dict | None = None  # parameters of KSubspaces


def search_options(ranks, affine, random_state, n_refine, fit_params):
    """The checked :class:`_SearchOptions` of :func:`factorize`'s parameters."""
    return _SearchOptions(
        ranks=_check_ranks(ranks),
        affine=bool(affine),
        random_state=random_state,
        n_refine=_check_int(n_refine, "n_refine", 0, np.iinfo(np.int32).max),
        fit_params=dict(fit_params or {}),
    )


def _fixed_candidates(n, d, k, j, affine):
    """The one (k, j) given without a budget, and the numbers it stores."""
    if k is None or j is None:
        raise ValueError("give k and j, or a budget (k then optional)")
    k = _check_int(k, "k", 1, n)
    j = _check_int(j, "j", 1, d)
    if k > 1 and d == 1:
        raise ValueError(
            f"k={k} needs A with at least 2 columns; a single column is "
            "fitted exactly by k=1, j=1"
        )
    # what uniform ranks j store: adaptive ranks redistribute as much
    return [(k, j)], factors_size([n] + [0] * (k - 1), [j] * k, d, affine).numbers


def _budget_candidates(n, d, k, j, w, max_numbers, affine, what):
    """Each k to search, with the largest uniform rank ``max_numbers`` allows."""
    if j is not None:
        raise ValueError(
            "j and budget exclude each other: with a budget, j is the "
            "largest rank the budget allows"
        )
    if k is None:
        ks = K_GRID
    elif isinstance(k, numbers.Integral) and not isinstance(k, bool):
        ks = (k,)
    else:
        ks = tuple(k)
        if not ks:
            raise ValueError("k must be an int or a non-empty sequence of int")
    if k is None:
        # clusters need rows of positive weight and a flat smaller than d
        n_pos = n if w is None else int(np.count_nonzero(w))
        ks = [kk for kk in ks if kk <= n_pos and (kk == 1 or d > 1)]
    ks = [_check_int(kk, "k", 1, n) for kk in ks]
    candidates = []
    for kk in dict.fromkeys(ks):
        jj = min(uniform_rank(n, d, kk, max_numbers, affine), d)
        if jj >= 1:
            candidates.append((kk, jj))
    if not candidates:
        need = min(
            factors_size([n] + [0] * (kk - 1), [1] * kk, d, affine).numbers for kk in ks
        )
        raise ValueError(
            f"{what} is too small: it allows {max_numbers} numbers, "
            f"and rank 1 needs at least {need} (budget >= {need / (n * d):.4g})"
        )
    return candidates


def search_factors(A, w, k, j, max_numbers, options, what):
    """The worker of :func:`factorize`: ``A`` and ``w`` checked, the budget in
    numbers (``None`` for a given k and j), ``what`` names it in errors."""
    n, d = A.shape
    affine, ranks = options.affine, options.ranks
    rng = check_random_state(options.random_state)
    searched = max_numbers is not None
    if searched:
        candidates = _budget_candidates(n, d, k, j, w, max_numbers, affine, what)
    else:
        candidates, max_numbers = _fixed_candidates(n, d, k, j, affine)
    denom = total_energy(A, w)
    seeds = rng.randint(np.iinfo(np.int32).max, size=len(candidates))
    records, best = [], None
    for (kk, jj), seed in zip(candidates, seeds, strict=True):
        labels = partition_rows(
            A, kk, jj, affine, w, seed, options.fit_params, k is None
        )
        clusters = cluster_spectra(A, labels, kk, w, affine)
        sizes = [cl.rows.size for cl in clusters]
        alloc = [min(jj, s) for s in sizes]
        if ranks == "adaptive":
            alloc = _allocate(clusters, n, d, max_numbers, affine, start=alloc)
        res = residual_error(clusters, alloc)
        err = res / denom if denom > 0 else 0.0
        kept_ranks = tuple(r for r, s in zip(alloc, sizes, strict=True) if s > 0)
        records.append(
            Candidate(kk, jj, kept_ranks, kept_numbers(sizes, alloc, d, affine), err)
        )
        if best is None or res < best[0]:
            best = (res, labels, clusters, alloc)
        elif k is None and kk > 1:
            # the default grid stops at the first k > 1 that does not improve:
            # more clusters pay more ids and bases for the same numbers
            break
    _, labels, clusters, alloc = best
    if ranks == "adaptive" and len(clusters) > 1:
        clusters, alloc = refine_partition(
            A, w, labels, clusters, alloc, max_numbers, affine, options.n_refine
        )
    search = tuple(records) if searched else ()
    return factors_from_spectra(A, w, clusters, alloc, affine, denom, search=search)


def svd_factors(A, rank=None, *, budget=None, sample_weight=None):
    """Truncated SVD of a matrix, as factors with a single cluster.

    The baseline that :func:`factorize` is compared with: ``factorize`` with
    ``k=1`` gives the same factors.

    Parameters
    ----------
    A : ndarray of shape (n, d), float32 or float64
        The matrix.
    rank : int, default=None
        Number of singular triplets kept, ``1 <= rank <= min(n, d)``. Give
        either ``rank`` or ``budget``.
    budget : float in (0, 1], default=None
        Fraction of the ``n * d`` numbers to keep: the largest rank with
        ``rank * (n + d) <= budget * n * d``.
    sample_weight : array-like of shape (n,), default=None
        Non-negative row weights: the SVD of ``diag(sqrt(w)) A``, and the
        weighted error.

    Returns
    -------
    factors : ProjectiveFactors
        One cluster: ``U[0]`` is (n, rank) (left singular vectors scaled by
        the singular values), ``V[0]`` is (rank, d).

    Examples
    --------
    >>> import numpy as np
    >>> from kflats.factorize import svd_factors
    >>> A = np.diag([3.0, 2.0, 1.0])
    >>> f = svd_factors(A, rank=2)
    >>> f.ranks, f.n_params, round(f.error, 6)
    ((2,), 12, 0.071429)
    >>> svd_factors(A, budget=0.7).ranks
    (1,)
    """
    A = _check_matrix(A, "A")
    n, d = A.shape
    w = check_sample_weight(sample_weight, n)
    if (rank is None) == (budget is None):
        raise ValueError("give exactly one of rank and budget")
    if budget is not None:
        budget = _check_budget_fraction(budget)
        max_params = budget_numbers(budget, n, d)
        rank = uniform_rank(n, d, 1, max_params, False)
        if rank < 1:
            raise ValueError(
                f"budget={budget} is too small: it allows {max_params} numbers "
                f"and rank 1 needs {n + d} (budget >= {(n + d) / (n * d):.4g})"
            )
    rank = _check_int(rank, "rank", 1, min(n, d))
    clusters = cluster_spectra(A, np.zeros(n, dtype=np.int64), 1, w, False)
    return factors_from_spectra(A, w, clusters, [rank], False, total_energy(A, w))
