"""Per-cluster factor pairs of a matrix: projective clustering as compression.

A matrix ``A`` (n x d) is split into k clusters of rows, and the rows ``A[R_c]``
of cluster c are replaced by a factor pair ``U_c V_c`` of rank ``j_c`` (plus a
mean ``mu_c`` for affine flats). For every partition the best pair is the
truncated SVD of the cluster's rows (Eckart-Young), so a factorization is a
partition (from :class:`kflats.KSubspaces`) followed by one SVD per cluster.

With k = 1 this is the truncated SVD of ``A``; :func:`svd_factors` builds that
baseline, and :func:`factorize` includes k = 1 in every budget search, so its
result is never worse than the SVD with the same number of parameters.

Counting parameters
-------------------
A :class:`ProjectiveFactors` stores ``U_c`` (n_c x j_c) and ``V_c`` (j_c x d) per
cluster, the means (k x d) when affine, and, when k > 1, one cluster id per row:
``n_params = sum_c j_c (n_c + d) [+ k d] [+ n]``. A single cluster needs no ids.
A ``budget`` is the fraction of the n * d numbers of ``A`` that may be kept:
``n_params <= floor(budget * n * d)``.

Linear layers
-------------
A Linear layer computes ``y = W x + b`` with ``W`` of shape (out, in). The
compressed layers of :mod:`kflats.torch` cluster the **input features**, the
rows of ``W.T``: :func:`factorize_linear` with ``side="input"`` (the default)
factorizes ``W.T`` and marks the result ``transposed=True``.
"""

import json
import math
import numbers
import warnings
import zipfile
from dataclasses import dataclass, replace
from typing import NamedTuple

import numpy as np
from scipy import linalg
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils import check_array, check_random_state
from threadpoolctl import threadpool_limits

__all__ = [
    "K_GRID",
    "Candidate",
    "ProjectiveFactors",
    "factorize",
    "factorize_linear",
    "svd_factors",
]

#: Numbers of clusters that a budget search tries when ``k`` is not given.
K_GRID = (1, 2, 4, 6, 8)

_FORMAT = "kflats.ProjectiveFactors"
_FORMAT_VERSION = 1
# ranks="adaptive" stops refining when a round gains less than this fraction
# of the error.
_REFINE_TOL = 1e-3


class Candidate(NamedTuple):
    """One (k, j) tried by :func:`factorize`, as recorded in ``search``.

    Attributes
    ----------
    k : int
        Number of clusters fitted.
    j : int
        Uniform rank the partition was fitted with.
    ranks : tuple of int
        Ranks of the clusters after allocation (equal to ``j``, capped at the
        cluster size, for uniform ranks).
    n_params : int
        Numbers that the factors of this candidate store.
    error : float
        Relative (weighted) squared Frobenius error of this candidate.
    """

    k: int
    j: int
    ranks: tuple
    n_params: int
    error: float


@dataclass(frozen=True, eq=False)
class ProjectiveFactors:
    """A matrix stored as one factor pair per cluster of its rows.

    Row ``i`` of the matrix, in cluster ``c = labels[i]``, is approximated by
    ``U[c][p] @ V[c]`` (plus ``means[c]`` when affine), where ``p`` is the
    position of ``i`` in ``rows(c)``.

    Parameters
    ----------
    labels : ndarray of shape (n,), integer dtype
        Cluster id of each row, in ``0 .. k-1``. Stored as int64.
    U : sequence of k ndarrays
        ``U[c]`` has shape (n_c, j_c): the coefficients of the rows of cluster
        c, in ascending original row order (``np.flatnonzero(labels == c)``).
    V : sequence of k ndarrays
        ``V[c]`` has shape (j_c, d). Orthonormal rows when built by
        :func:`factorize` or :func:`svd_factors`. A rank ``j_c`` may be 0.
    means : ndarray of shape (k, d) or None, default=None
        Offsets of affine flats; ``None`` for linear subspaces.
    error : float or None, default=None
        Relative (weighted) squared Frobenius error against the matrix the
        factors were fitted on, ``None`` when unknown.
    transposed : bool, default=False
        Whether the factors describe the transpose of the matrix the user
        passed (a Linear weight factorized on its input features).
    search : tuple of Candidate, default=()
        The candidates a budget search evaluated; empty when none ran.

    Attributes
    ----------
    k : int
        Number of clusters.
    ranks : tuple of int
        ``j_c`` of each cluster.
    shape : tuple of int
        ``(n, d)``, the shape of the factorized matrix.
    dtype : numpy.dtype
        Dtype of the factors (float32 or float64).
    n_params : int
        Every stored number: ``sum_c (U[c].size + V[c].size)``, plus
        ``means.size`` when affine, plus ``n`` cluster ids when ``k > 1``.
    compression : float
        ``n_params / (n * d)``.

    See Also
    --------
    factorize : Build the factors of a matrix.
    svd_factors : The truncated-SVD baseline, as one cluster.

    Examples
    --------
    >>> import numpy as np
    >>> from kflats.factorize import ProjectiveFactors
    >>> labels = np.array([0, 1, 0])
    >>> U = (np.array([[1.0], [2.0]]), np.array([[3.0]]))
    >>> V = (np.array([[1.0, 0.0]]), np.array([[0.0, 1.0]]))
    >>> f = ProjectiveFactors(labels, U, V)
    >>> f.reconstruct()
    array([[1., 0.],
           [0., 3.],
           [2., 0.]])
    >>> f.ranks, f.n_params
    ((1, 1), 10)
    """

    labels: np.ndarray
    U: tuple
    V: tuple
    means: np.ndarray | None = None
    error: float | None = None
    transposed: bool = False
    search: tuple = ()

    def __post_init__(self):
        labels = np.asarray(self.labels)
        if labels.ndim != 1 or labels.dtype.kind not in "iu":
            raise ValueError(
                "labels must be a 1-D integer array, got "
                f"ndim={labels.ndim}, dtype={labels.dtype}"
            )
        U = tuple(np.asarray(u) for u in self.U)
        V = tuple(np.asarray(v) for v in self.V)
        k = len(V)
        if k == 0 or len(U) != k:
            raise ValueError(
                f"U and V must hold one array per cluster (k >= 1), got "
                f"len(U)={len(U)}, len(V)={k}"
            )
        dtype = V[0].dtype
        if dtype not in (np.float32, np.float64):
            raise ValueError(f"V must be float32 or float64, got {dtype}")
        if V[0].ndim != 2:
            raise ValueError(f"V[0] must be 2-D, got shape {V[0].shape}")
        d = V[0].shape[1]
        if labels.size and (labels.min() < 0 or labels.max() >= k):
            raise ValueError(
                f"labels must lie in 0..{k - 1} (k = len(V)), got values in "
                f"{labels.min()}..{labels.max()}"
            )
        labels = labels.astype(np.int64, copy=False)
        counts = np.bincount(labels, minlength=k)
        for c in range(k):
            if V[c].ndim != 2 or V[c].shape[1] != d:
                raise ValueError(f"V[{c}] must have shape (j_c, {d}), got {V[c].shape}")
            expected = (int(counts[c]), V[c].shape[0])
            if U[c].shape != expected:
                raise ValueError(
                    f"U[{c}] must have shape {expected} (rows of cluster {c}, "
                    f"rank of V[{c}]), got {U[c].shape}"
                )
            if U[c].dtype != dtype or V[c].dtype != dtype:
                raise ValueError(
                    f"U and V must share one dtype, got U[{c}].dtype={U[c].dtype}, "
                    f"V[{c}].dtype={V[c].dtype}, V[0].dtype={dtype}"
                )
        means = self.means
        if means is not None:
            means = np.asarray(means)
            if means.shape != (k, d) or means.dtype != dtype:
                raise ValueError(
                    f"means must be None or an array of shape {(k, d)} and dtype "
                    f"{dtype}, got shape {means.shape} and dtype {means.dtype}"
                )
        order = np.argsort(labels, kind="stable")
        offsets = np.concatenate(([0], np.cumsum(counts)))
        object.__setattr__(self, "labels", labels)
        object.__setattr__(self, "U", U)
        object.__setattr__(self, "V", V)
        object.__setattr__(self, "means", means)
        object.__setattr__(self, "transposed", bool(self.transposed))
        object.__setattr__(self, "search", tuple(Candidate(*c) for c in self.search))
        if self.error is not None:
            object.__setattr__(self, "error", float(self.error))
        object.__setattr__(self, "_order", order)
        object.__setattr__(self, "_offsets", offsets)

    @property
    def k(self):
        """Number of clusters."""
        return len(self.V)

    @property
    def ranks(self):
        """Rank ``j_c`` of each cluster, as a tuple of int."""
        return tuple(int(v.shape[0]) for v in self.V)

    @property
    def shape(self):
        """``(n, d)``: shape of the factorized matrix."""
        return (self.labels.shape[0], self.V[0].shape[1])

    @property
    def dtype(self):
        """Dtype of the factors."""
        return self.V[0].dtype

    @property
    def n_params(self):
        """Every stored number, cluster ids included when ``k > 1``."""
        total = sum(u.size + v.size for u, v in zip(self.U, self.V, strict=True))
        if self.means is not None:
            total += self.means.size
        if self.k > 1:
            total += self.labels.size
        return int(total)

    @property
    def compression(self):
        """``n_params / (n * d)``: the fraction of the matrix's numbers kept."""
        n, d = self.shape
        return self.n_params / (n * d)

    def rows(self, c):
        """Original row indices of cluster ``c``, ascending.

        Parameters
        ----------
        c : int
            Cluster index, ``0 <= c < k``.

        Returns
        -------
        rows : ndarray of shape (n_c,), int64
            Equal to ``np.flatnonzero(labels == c)``; row ``p`` of ``U[c]``
            belongs to row ``rows[p]`` of the matrix.

        Examples
        --------
        >>> import numpy as np
        >>> from kflats.factorize import svd_factors
        >>> svd_factors(np.eye(3), rank=1).rows(0)
        array([0, 1, 2])
        """
        if not isinstance(c, numbers.Integral) or not 0 <= c < self.k:
            raise ValueError(f"c must be an integer in 0..{self.k - 1}, got {c!r}")
        return self._order[self._offsets[c] : self._offsets[c + 1]]

    def reconstruct(self):
        """The approximation of the factorized matrix.

        Returns
        -------
        A_hat : ndarray of shape (n, d)
            Rows in the original order, in the dtype of the factors. For
            ``transposed`` factors of a Linear weight ``W`` this is
            ``W.T`` approximated; ``reconstruct().T`` approximates ``W``.

        Examples
        --------
        >>> import numpy as np
        >>> from kflats.factorize import svd_factors
        >>> A = np.arange(6.0).reshape(3, 2)
        >>> np.allclose(svd_factors(A, rank=2).reconstruct(), A)
        True
        """
        out = np.empty(self.shape, dtype=self.dtype)
        for c in range(self.k):
            rows = self.rows(c)
            block = self.U[c] @ self.V[c]
            if self.means is not None:
                block += self.means[c]
            out[rows] = block
        return out

    def save(self, path):
        """Write the factors to an ``.npz`` file, losslessly.

        Parameters
        ----------
        path : str or path-like or file-like
            Destination. As with :func:`numpy.savez`, ``".npz"`` is appended to
            a file name that lacks it.

        See Also
        --------
        load : Read the file back.

        Examples
        --------
        >>> import numpy as np, tempfile, os
        >>> from kflats.factorize import ProjectiveFactors, svd_factors
        >>> f = svd_factors(np.arange(12.0).reshape(4, 3), rank=1)
        >>> path = os.path.join(tempfile.mkdtemp(), "factors.npz")
        >>> f.save(path)
        >>> g = ProjectiveFactors.load(path)
        >>> np.array_equal(g.reconstruct(), f.reconstruct())
        True
        """
        arrays = {
            "format": np.array(_FORMAT),
            "version": np.array(_FORMAT_VERSION, dtype=np.int64),
            "labels": self.labels,
            "k": np.array(self.k, dtype=np.int64),
            "error": np.array(np.nan if self.error is None else self.error),
            "has_error": np.array(self.error is not None),
            "transposed": np.array(self.transposed),
            "search": np.array(json.dumps([list(c) for c in self.search])),
        }
        for c in range(self.k):
            arrays[f"U_{c}"] = self.U[c]
            arrays[f"V_{c}"] = self.V[c]
        if self.means is not None:
            arrays["means"] = self.means
        np.savez(path, **arrays)

    @classmethod
    def load(cls, path):
        """Read factors written by :meth:`save`.

        Parameters
        ----------
        path : str or path-like or file-like
            The ``.npz`` file.

        Returns
        -------
        factors : ProjectiveFactors

        Raises
        ------
        ValueError
            If the file is not a readable ``.npz`` archive, was not written by
            :meth:`save`, has an unknown format version, or holds inconsistent
            arrays.

        Examples
        --------
        >>> import numpy as np, tempfile, os
        >>> from kflats.factorize import ProjectiveFactors
        >>> path = os.path.join(tempfile.mkdtemp(), "other.npz")
        >>> np.savez(path, x=np.zeros(3))
        >>> ProjectiveFactors.load(path)
        Traceback (most recent call last):
        ...
        ValueError: ... is not a kflats ProjectiveFactors file ...
        """
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = {name: data[name] for name in data.files}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
            raise ValueError(
                f"{path!r} is not a readable kflats ProjectiveFactors file "
                f"(.npz archive): {exc}"
            ) from exc
        if not isinstance(arrays, dict) or arrays.get("format") != np.array(_FORMAT):
            raise ValueError(
                f"{path!r} is not a kflats ProjectiveFactors file (no "
                f"'format' entry equal to {_FORMAT!r})"
            )
        version = arrays.get("version")
        if version is None or version.shape != () or int(version) != _FORMAT_VERSION:
            raise ValueError(
                f"{path!r} has format version {version!r}; this kflats reads "
                f"version {_FORMAT_VERSION}"
            )
        try:
            k = int(arrays["k"])
            U = tuple(arrays[f"U_{c}"] for c in range(k))
            V = tuple(arrays[f"V_{c}"] for c in range(k))
            search = tuple(
                Candidate(
                    int(a), int(b), tuple(int(r) for r in ranks), int(p), float(e)
                )
                for a, b, ranks, p, e in json.loads(str(arrays["search"]))
            )
            return cls(
                labels=arrays["labels"],
                U=U,
                V=V,
                means=arrays.get("means"),
                error=float(arrays["error"]) if bool(arrays["has_error"]) else None,
                transposed=bool(arrays["transposed"]),
                search=search,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(
                f"{path!r} is a corrupt kflats ProjectiveFactors file: {exc}"
            ) from exc


# --------------------------------------------------------------------------
# input checks


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


def _check_budget(budget):
    if isinstance(budget, bool) or not isinstance(budget, numbers.Real):
        raise TypeError(f"budget must be a float in (0, 1], got {budget!r}")
    budget = float(budget)
    if not 0.0 < budget <= 1.0:
        raise ValueError(f"budget must be in (0, 1], got {budget}")
    return budget


def _check_sample_weight(sample_weight, n):
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


# --------------------------------------------------------------------------
# per-cluster spectra and factors


class _Cluster(NamedTuple):
    rows: np.ndarray  # (n_c,) original row indices, ascending
    mean: np.ndarray | None  # (d,) float64 weighted mean (affine) or None
    evals: np.ndarray  # (m,) weighted squared singular values, descending
    evecs: np.ndarray  # (d, m) right singular vectors, float64


def _spectrum(A, rows, w, affine):
    """Weighted SVD of the rows ``A[rows]`` (centred when affine), in float64."""
    d = A.shape[1]
    X = A[rows].astype(np.float64)
    wc = None if w is None else w[rows]
    mean = None
    if affine:
        if rows.size == 0:
            mean = np.zeros(d)
        elif wc is None or not wc.sum() > 0:
            mean = X.mean(axis=0)
        else:
            mean = wc @ X / wc.sum()
        X -= mean
    n_c = rows.size
    if n_c == 0:
        return _Cluster(rows, mean, np.zeros(0), np.zeros((d, 0)))
    if n_c >= d:
        # d x d scatter: cheaper than an SVD of the n_c x d block.
        G = (X.T * wc) @ X if wc is not None else X.T @ X
        # small LAPACK problems: one thread is faster, and immune to threads
        # left spinning by the parallel kernels of the fit
        with threadpool_limits(1, user_api="blas"):
            evals, evecs = linalg.eigh(G)
        evals, evecs = evals[::-1], evecs[:, ::-1]
    else:
        Xw = X * np.sqrt(wc)[:, None] if wc is not None else X
        with threadpool_limits(1, user_api="blas"):
            _, s, Vt = linalg.svd(Xw, full_matrices=False, lapack_driver="gesdd")
        evals, evecs = s**2, Vt.T
    return _Cluster(rows, mean, np.maximum(evals, 0.0), evecs)


def _spectra(A, labels, k, w, affine):
    order = np.argsort(labels, kind="stable")
    bounds = np.searchsorted(labels[order], np.arange(k + 1))
    return [_spectrum(A, order[bounds[c] : bounds[c + 1]], w, affine) for c in range(k)]


def _residual(clusters, ranks):
    """Weighted squared error left by keeping ``ranks`` components per cluster."""
    return float(sum(cl.evals[r:].sum() for cl, r in zip(clusters, ranks, strict=True)))


def _count(n, d, sizes, ranks, affine):
    """n_params of factors with these cluster sizes and ranks (empty ones dropped)."""
    kept = [c for c, size in enumerate(sizes) if size > 0]
    total = sum(ranks[c] * (sizes[c] + d) for c in kept)
    if affine:
        total += len(kept) * d
    if len(kept) > 1:
        total += n
    return int(total)


def _build(A, w, clusters, ranks, affine, denom, **meta):
    """ProjectiveFactors from per-cluster spectra; empty clusters are dropped."""
    n, d = A.shape
    dtype = A.dtype
    keep = [c for c, cl in enumerate(clusters) if cl.rows.size > 0]
    labels = np.empty(n, dtype=np.int64)
    U, V, means = [], [], []
    numer = 0.0
    for new, c in enumerate(keep):
        cl = clusters[c]
        labels[cl.rows] = new
        Vc = np.ascontiguousarray(cl.evecs[:, : ranks[c]].T, dtype=dtype)
        X = A[cl.rows].astype(np.float64)
        if affine:
            mc = cl.mean.astype(dtype)
            means.append(mc)
            X -= mc
        Uc = (X @ Vc.T.astype(np.float64)).astype(dtype)
        # error from the stored (rounded) factors, computed in float64
        R = X - Uc.astype(np.float64) @ Vc.astype(np.float64)
        r2 = np.einsum("ij,ij->i", R, R)
        numer += float(r2.sum() if w is None else w[cl.rows] @ r2)
        U.append(Uc)
        V.append(Vc)
    error = numer / denom if denom > 0 else (0.0 if numer == 0 else math.inf)
    return ProjectiveFactors(
        labels=labels,
        U=tuple(U),
        V=tuple(V),
        means=np.stack(means) if affine else None,
        error=error,
        **meta,
    )


def _total_energy(A, w):
    sq = np.einsum("ij,ij->i", A, A, dtype=np.float64)
    return float(sq.sum() if w is None else w @ sq)


# --------------------------------------------------------------------------
# rank allocation


def _greedy_fill(gains, costs, ranks, room, skip=None):
    """Add rank steps by decreasing gain per parameter while they fit.

    ``gains[c]`` are cluster c's weighted squared singular values (descending),
    each step of cluster c costs ``costs[c]`` numbers. Steps with no gain are
    never taken. Returns the new ranks, the energy they add and the room left.
    """
    ranks = list(ranks)
    items_c, items_r, ratios = [], [], []
    for c, g in enumerate(gains):
        if c == skip or costs[c] <= 0:
            continue
        r = np.arange(ranks[c], g.size)
        r = r[g[r] > 0]
        items_c.append(np.full(r.size, c))
        items_r.append(r)
        ratios.append(g[r] / costs[c])
    if not items_c:
        return ranks, 0.0, room
    items_c = np.concatenate(items_c)
    items_r = np.concatenate(items_r)
    ratios = np.concatenate(ratios)
    # by ratio, descending; within a cluster the ratios do not increase, and
    # ties keep the rank order, so each cluster's steps come in order.
    order = np.lexsort((items_r, items_c, -ratios))
    closed = np.zeros(len(gains), dtype=bool)
    added = 0.0
    for idx in order:
        c = items_c[idx]
        if closed[c]:
            continue
        if costs[c] <= room:
            room -= costs[c]
            added += gains[c][items_r[idx]]
            ranks[c] += 1
        else:
            closed[c] = True  # later steps of c cost as much: none fits
            if closed.all():
                break
    return ranks, added, room


def _improve(gains, costs, ranks, room, max_rounds=50):
    """Exchange steps: drop a cluster's last step if refilling gains more."""
    ranks = list(ranks)
    for _ in range(max_rounds):
        best = None
        for a, r in enumerate(ranks):
            if r == 0:
                continue
            loss = gains[a][r - 1]
            trial = ranks.copy()
            trial[a] -= 1
            new, added, left = _greedy_fill(
                gains, costs, trial, room + costs[a], skip=a
            )
            if added - loss > 1e-12 * max(loss, 1e-300) and (
                best is None or added - loss > best[0]
            ):
                best = (added - loss, new, left)
        if best is None:
            break
        _, ranks, room = best
    return ranks


def _allocate(clusters, n, d, max_params, affine, start=None):
    """Per-cluster ranks under ``max_params``, spending on the largest spectra.

    Greedy by gain per parameter over the clusters' spectra, from nothing and
    from ``start`` (a feasible allocation, e.g. uniform ranks), each followed by
    exchanges; the allocation that keeps more energy wins, so the result never
    keeps less than ``start``.
    """
    sizes = [cl.rows.size for cl in clusters]
    costs = [s + d if s > 0 else 0 for s in sizes]
    gains = [cl.evals for cl in clusters]
    fixed = _count(n, d, sizes, [0] * len(sizes), affine)
    best_ranks, best_kept = None, -1.0
    starts = [[0] * len(clusters)]
    if start is not None:
        starts.append(list(start))
    for s in starts:
        room = max_params - fixed - sum(r * c for r, c in zip(s, costs, strict=True))
        if room < 0:
            continue
        ranks, _, room = _greedy_fill(gains, costs, s, room)
        ranks = _improve(gains, costs, ranks, room)
        kept = sum(g[:r].sum() for g, r in zip(gains, ranks, strict=True))
        if kept > best_kept:
            best_ranks, best_kept = ranks, kept
    return best_ranks


def _threshold(clusters, ranks, d):
    """Gain per parameter at the margin of an allocation (a Lagrange multiplier)."""
    last, nxt = [], []
    for cl, r in zip(clusters, ranks, strict=True):
        cost = cl.rows.size + d
        if cl.rows.size == 0:
            continue
        if r > 0:
            last.append(cl.evals[r - 1] / cost)
        if r < cl.evals.size:
            nxt.append(cl.evals[r] / cost)
    lo = max(nxt, default=0.0)
    hi = min(last, default=lo)
    return 0.5 * (lo + hi) if last else lo


def _reassign(A, w, clusters, ranks, lam, affine):
    """Each row to the flat minimising its weighted distance + lam * rank."""
    n, d = A.shape
    k = len(clusters)
    cost = np.empty((n, k))
    sq = np.einsum("ij,ij->i", A, A, dtype=np.float64)
    for c, (cl, r) in enumerate(zip(clusters, ranks, strict=True)):
        B = cl.evecs[:, :r].astype(A.dtype)
        P = A @ B  # one GEMM per cluster, in the input dtype
        proj = np.einsum("ij,ij->i", P, P, dtype=np.float64)
        if affine:
            # ||x - mu||^2 - ||B^T (x - mu)||^2, expanded
            mu = cl.mean
            Bmu = mu @ cl.evecs[:, :r]
            dist = sq - 2.0 * (A @ mu.astype(A.dtype)) + mu @ mu
            dist -= proj - 2.0 * (P @ Bmu.astype(A.dtype)) + Bmu @ Bmu
        else:
            dist = sq - proj
        np.maximum(dist, 0.0, out=dist)
        if cl.rows.size == 0:
            dist[:] = np.inf  # an empty cluster has no flat to offer
        cost[:, c] = dist if w is None else w * dist
        cost[:, c] += lam * r
    return np.argmin(cost, axis=1)


def _refine(A, w, labels, clusters, ranks, max_params, affine, n_rounds):
    """Alternate row reassignment and rank allocation; keep the best feasible.

    Rows go to the flat that minimises ``w_i dist^2 + lam * j_c`` (a row of
    cluster c stores ``j_c`` coefficients; ``lam`` is the gain per parameter
    at the margin of the allocation), then the ranks are re-allocated for the
    new clusters. Stops after ``n_rounds``, when the labels no longer change,
    or when a round gains less than ``_REFINE_TOL`` of the error.
    """
    n, d = A.shape
    k = len(clusters)
    best = (_residual(clusters, ranks), clusters, ranks)
    for _ in range(n_rounds):
        previous = best[0]
        lam = _threshold(clusters, ranks, d)
        new_labels = _reassign(A, w, clusters, ranks, lam, affine)
        if np.array_equal(new_labels, labels):
            break
        labels = new_labels
        clusters = _spectra(A, labels, k, w, affine)
        ranks = _allocate(clusters, n, d, max_params, affine)
        if ranks is None:
            break
        res = _residual(clusters, ranks)
        if res < best[0]:
            best = (res, clusters, ranks)
        if previous - best[0] <= _REFINE_TOL * previous:
            break
    return best[1], best[2]


# --------------------------------------------------------------------------
# public functions


def _uniform_rank(n, d, k, max_params, affine):
    """Largest uniform rank of k clusters within ``max_params`` (may be < 1)."""
    fixed = (n if k > 1 else 0) + (k * d if affine else 0)
    return (max_params - fixed) // (n + k * d)


def _partition(A, k, j, affine, w, seed, fit_params, quiet):
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
    candidates tried are recorded in ``search``.

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
    w = _check_sample_weight(sample_weight, n)
    ranks = _check_ranks(ranks)
    affine = bool(affine)
    n_refine = _check_int(n_refine, "n_refine", 0, np.iinfo(np.int32).max)
    rng = check_random_state(random_state)

    if budget is None:
        if k is None or j is None:
            raise ValueError("give k and j, or a budget (k then optional)")
        k = _check_int(k, "k", 1, n)
        j = _check_int(j, "j", 1, d)
        if k > 1 and d == 1:
            raise ValueError(
                f"k={k} needs A with at least 2 columns; a single column is "
                "fitted exactly by k=1, j=1"
            )
        candidates = [(k, j)]
        # what uniform ranks j store: adaptive ranks redistribute as much
        max_params = (n if k > 1 else 0) + (k * d if affine else 0) + j * (n + k * d)
    else:
        budget = _check_budget(budget)
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
        max_params = math.floor(budget * (n * d))
        candidates = []
        for kk in dict.fromkeys(ks):
            jj = min(_uniform_rank(n, d, kk, max_params, affine), d)
            if jj >= 1:
                candidates.append((kk, jj))
        if not candidates:
            need = min(
                (n if kk > 1 else 0) + kk * (d if affine else 0) + n + kk * d
                for kk in ks
            )
            raise ValueError(
                f"budget={budget} is too small: it allows {max_params} numbers, "
                f"and rank 1 needs at least {need} (budget >= {need / (n * d):.4g})"
            )

    denom = _total_energy(A, w)
    seeds = rng.randint(np.iinfo(np.int32).max, size=len(candidates))
    records, best = [], None
    for (kk, jj), seed in zip(candidates, seeds, strict=True):
        labels = _partition(A, kk, jj, affine, w, seed, fit_params, k is None)
        clusters = _spectra(A, labels, kk, w, affine)
        sizes = [cl.rows.size for cl in clusters]
        alloc = [min(jj, s) for s in sizes]
        if ranks == "adaptive":
            alloc = _allocate(clusters, n, d, max_params, affine, start=alloc)
        res = _residual(clusters, alloc)
        err = res / denom if denom > 0 else 0.0
        kept_ranks = tuple(r for r, s in zip(alloc, sizes, strict=True) if s > 0)
        records.append(
            Candidate(kk, jj, kept_ranks, _count(n, d, sizes, alloc, affine), err)
        )
        if best is None or res < best[0]:
            best = (res, labels, clusters, alloc)
    _, labels, clusters, alloc = best
    if ranks == "adaptive" and len(clusters) > 1:
        clusters, alloc = _refine(
            A, w, labels, clusters, alloc, max_params, affine, n_refine
        )
    return _build(
        A,
        w,
        clusters,
        alloc,
        affine,
        denom,
        search=tuple(records) if budget is not None else (),
    )


def factorize_linear(W, k=None, j=None, *, side="input", **kwargs):
    """Factor pairs of a Linear layer's weight, clustering one of its sides.

    Parameters
    ----------
    W : ndarray of shape (out_features, in_features), float32 or float64
        The weight of ``y = W x + b``.
    k, j : int, default=None
        As in :func:`factorize`.
    side : {"input", "output"}, default="input"
        ``"input"``: cluster the input features, i.e. factorize ``W.T``
        (in x out); the result is marked ``transposed=True`` and
        ``reconstruct().T`` approximates ``W``. This is the side that the
        layers of :mod:`kflats.torch` use. ``"output"``: cluster the output
        features, the rows of ``W`` itself.
    **kwargs
        Passed to :func:`factorize` (``budget``, ``ranks``, ``affine``,
        ``sample_weight`` (one weight per clustered feature),
        ``random_state``, and KSubspaces parameters).

    Returns
    -------
    factors : ProjectiveFactors

    Examples
    --------
    >>> import numpy as np
    >>> from kflats.factorize import factorize_linear
    >>> W = np.random.default_rng(0).normal(size=(8, 20))
    >>> f = factorize_linear(W, k=2, j=3, random_state=0)
    >>> f.shape, f.transposed
    ((20, 8), True)
    >>> f.reconstruct().T.shape
    (8, 20)
    """
    if side not in ("input", "output"):
        raise ValueError(f"side must be 'input' or 'output', got {side!r}")
    if getattr(W, "ndim", 2) != 2:
        raise ValueError(f"W must be a 2-D array, got ndim={W.ndim}")
    if side == "input":
        result = factorize(np.asarray(W).T, k, j, **kwargs)
        return replace(result, transposed=True)
    return factorize(W, k, j, **kwargs)


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
    w = _check_sample_weight(sample_weight, n)
    if (rank is None) == (budget is None):
        raise ValueError("give exactly one of rank and budget")
    if budget is not None:
        budget = _check_budget(budget)
        max_params = math.floor(budget * (n * d))
        rank = _uniform_rank(n, d, 1, max_params, False)
        if rank < 1:
            raise ValueError(
                f"budget={budget} is too small: it allows {max_params} numbers "
                f"and rank 1 needs {n + d} (budget >= {(n + d) / (n * d):.4g})"
            )
    rank = _check_int(rank, "rank", 1, min(n, d))
    clusters = _spectra(A, np.zeros(n, dtype=np.int64), 1, w, False)
    return _build(A, w, clusters, [rank], False, _total_energy(A, w))
