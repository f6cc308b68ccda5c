"""The Lloyd iteration for k subspaces: assignment, statistics, update.

Subspaces are held as ``bases`` (k, j, d) with orthonormal rows and ``means``
(k, d) (zeros for linear subspaces). Distances of a block of rows to all k
subspaces come from one GEMM against the stacked bases (or, when j > d / 2,
against the stacked orthogonal complements, which costs fewer flops and does not
cancel), followed by the fused Numba kernel in ``kflats._kernels``. Rows are
processed in blocks, so memory stays O(block * k * j) whatever the number of rows.

These functions assume validated input; ``KSubspaces`` validates.
"""

from dataclasses import dataclass

import numpy as np

from ._kernels import _distances_labels
from ._threads import map_threads

# Target number of elements of one block of projections (X_block @ M.T).
_BLOCK_ELEMENTS = 1 << 21


@dataclass(frozen=True)
class _Packed:
    """Subspaces laid out for the distance kernel (see ``_pack``)."""

    M: np.ndarray  # (k * g [+ k], d): stacked bases or complements [, means]
    offsets: np.ndarray  # (k, g) float64: M_c @ mu_c
    musq: np.ndarray  # (k,) float64: ||mu_c||^2
    complement: bool
    xmu: bool

    @property
    def k(self):
        return self.offsets.shape[0]


def _complements(bases):
    """Orthonormal complements (k, d - j, d) of the row spaces of ``bases``."""
    k, j, d = bases.shape
    out = np.empty((k, d - j, d), dtype=bases.dtype)
    for c in range(k):
        q, _ = np.linalg.qr(bases[c].T, mode="complete")
        out[c] = q[:, j:].T
    return out


def _rows_to_fit(j, affine):
    """Rows of positive weight that determine a j-dimensional subspace.

    j rows in general position span a linear subspace; an affine flat needs one
    more, its mean taking one degree of freedom (j rows leave a (j - 1)-flat).
    A cluster with fewer rows has arbitrary directions in its subspace, which
    each LAPACK breaks its own way.
    """
    return j + 1 if affine else j


def _use_complement(j, d):
    """Whether distances are cheaper (and exact) through the complement."""
    return 2 * j > d


def _pack(bases, means, affine, complements=None, dtype=None):
    """Lay out subspaces for ``_assign``.

    ``complements`` may be given when already known (the update computes them for
    free); otherwise they are computed when the complement form is cheaper.
    """
    k, j, d = bases.shape
    dtype = bases.dtype if dtype is None else dtype
    complement = _use_complement(j, d)
    if complement:
        groups = _complements(bases) if complements is None else complements
    else:
        groups = bases
    g = groups.shape[1]
    if np.any(means):
        means64 = means.astype(np.float64)
        offsets = np.einsum("kgd,kd->kg", groups.astype(np.float64), means64)
        musq = np.einsum("kd,kd->k", means64, means64)
    else:  # linear subspaces (zero means): no float64 copy of the groups
        offsets, musq = np.zeros((k, g)), np.zeros(k)
    xmu = bool(affine) and not complement
    M = groups.reshape(k * g, d)
    if xmu:
        M = np.vstack([M, means])
    M = np.ascontiguousarray(M, dtype=dtype)
    return _Packed(M=M, offsets=offsets, musq=musq, complement=complement, xmu=xmu)


def _row_norms_sq(X):
    """``||x_i||^2`` of every row, in X's dtype."""
    return np.einsum("ij,ij->i", X, X)


def _assign(X, xsq, packed, return_distances=False):
    """Nearest subspace of every row.

    Returns
    -------
    labels : ndarray of shape (n,), int32
    mind : ndarray of shape (n,), float64
        Squared distance of each row to its nearest subspace.
    dist : ndarray of shape (n, k), float64
        Only when ``return_distances``: squared distances to every subspace.
    """
    n = X.shape[0]
    k = packed.k
    labels = np.empty(n, dtype=np.int32)
    mind = np.empty(n, dtype=np.float64)
    step = max(64, _BLOCK_ELEMENTS // max(packed.M.shape[0], 1))
    if return_distances:
        dist = np.empty((n, k), dtype=np.float64)
    else:
        scratch = np.empty((min(step, n), k), dtype=np.float64)
    Mt = packed.M.T
    for start in range(0, n, step):
        stop = min(n, start + step)
        P = X[start:stop] @ Mt
        out = dist[start:stop] if return_distances else scratch[: stop - start]
        _distances_labels(
            P,
            xsq[start:stop],
            packed.xmu,
            packed.musq,
            packed.offsets,
            packed.complement,
            out,
            labels[start:stop],
            mind[start:stop],
        )
    if return_distances:
        return labels, mind, dist
    return labels, mind


def _row_step(d):
    """Rows per block when a block holds float64 copies of whole rows."""
    return max(1, _BLOCK_ELEMENTS // max(d, 1))


def _residual_sq(X, labels, bases, means):
    """Squared distance of each row to the subspace it is labelled with.

    Computed from the residual ``(x - mu) - B^T B (x - mu)`` itself, so it keeps
    its digits where ``||x||^2 - ||B x||^2`` would cancel. Works in blocks of
    rows, so it needs memory for one block, not for a copy of X.
    """
    n, d = X.shape
    out = np.empty(n, dtype=np.float64)
    step = _row_step(d)
    for start in range(0, n, step):
        stop = min(n, start + step)
        Xb, lb = X[start:stop], labels[start:stop]
        for c in np.unique(lb):
            idx = np.flatnonzero(lb == c)
            Xc = Xb[idx] - means[c]
            R = Xc - (Xc @ bases[c].T) @ bases[c]
            out[start + idx] = np.einsum("ij,ij->i", R, R, dtype=np.float64)
    return out


def _exact_mind(X, xsq, labels, mind, packed, bases, means):
    """Squared distances to the assigned subspaces, free of cancellation."""
    if packed.complement:
        return mind  # the complement form does not cancel
    return _residual_sq(X, labels, bases, means)


class _Stats:
    """Sufficient statistics of each cluster, in float64.

    ``W[c] = sum w_i``, ``s[c] = sum w_i x_i`` and ``S[c] = sum w_i x_i x_i^T``
    over the rows labelled c. They add over rows, so when labels change only
    the rows that moved are subtracted from one cluster and added to another:
    after the first iterations of Lloyd that is a small fraction of the rows.

    With fewer rows than features, an SVD of a cluster's rows is cheaper than
    the d x d scatter: then ``S`` is not kept and the subspaces come from the
    rows themselves.
    """

    def __init__(self, X, labels, sample_weight, k):
        n, d = X.shape
        self._zero(k, d, scatter=n >= d)
        self._X, self._w, self._labels = X, sample_weight, labels.copy()
        self._add(X, np.arange(n), labels, sample_weight, 1.0)

    def _zero(self, k, d, scatter):
        self.W = np.zeros(k)
        self.N = np.zeros(k, dtype=np.int64)  # rows of positive weight
        self.s = np.zeros((k, d))
        self.S = np.zeros((k, d, d)) if scatter else None

    @classmethod
    def empty(cls, k, d):
        """Statistics of no rows, that rows are added to (``of_rows``, ``+``).

        They always keep the scatter: rows added later are not kept.
        """
        self = cls.__new__(cls)
        self._zero(k, d, scatter=True)
        self._X = self._w = self._labels = None
        return self

    @classmethod
    def of_rows(cls, X, labels, sample_weight, k):
        """Statistics of a block of rows that are not kept (Dask, partial_fit)."""
        self = cls.empty(k, X.shape[1])
        self._add(X, np.arange(X.shape[0]), labels, sample_weight, 1.0)
        return self

    def __add__(self, other):
        out = type(self).empty(self.W.size, self.s.shape[1])
        for name in ("W", "N", "s", "S"):
            setattr(out, name, getattr(self, name) + getattr(other, name))
        return out

    def reset(self, clusters):
        """Forget the rows of ``clusters`` (re-seeded: a new subspace)."""
        for name in ("W", "N", "s", "S"):
            getattr(self, name)[clusters] = 0

    def _add(self, X, rows, labels, sample_weight, sign):
        if rows.size == 0:
            return
        order = np.argsort(labels, kind="stable")
        rows, labels = rows[order], labels[order]
        cuts = np.flatnonzero(np.diff(labels)) + 1
        step = _row_step(X.shape[1])
        for part in np.split(np.arange(rows.size), cuts):
            c = labels[part[0]]
            # Blocks of rows: float64 copies of one block at a time, never of
            # the whole cluster.
            for start in range(0, part.size, step):
                idx = rows[part[start : start + step]]
                w = sample_weight[idx].astype(np.float64)
                Xc = X[idx].astype(np.float64)
                self.W[c] += sign * w.sum()
                self.N[c] += int(sign) * np.count_nonzero(w > 0)
                self.s[c] += sign * (w @ Xc)
                if self.S is not None:
                    Xc *= np.sqrt(w)[:, None]
                    self.S[c] += sign * (Xc.T @ Xc)

    def move(self, X, old, new, sample_weight):
        """Follow a change of labels from ``old`` to ``new``; rows that moved."""
        moved = np.flatnonzero(old != new)
        self._add(X, moved, old[moved], sample_weight, -1.0)
        self._add(X, moved, new[moved], sample_weight, 1.0)
        self._labels = new.copy()
        return moved.size

    def subspace(self, c, j, affine, dtype, want_complement):
        """Best subspace of cluster c: its top-j principal directions."""
        d = self.s.shape[1]
        mean = np.zeros(d)
        if affine and self.W[c] > 0:
            mean = self.s[c] / self.W[c]
        if self.S is None:
            return self._subspace_from_rows(c, j, mean, dtype, want_complement)
        scatter = self.S[c]
        if affine and self.W[c] > 0:
            scatter = scatter - np.outer(self.s[c], mean)
        _, vecs = np.linalg.eigh(scatter)  # ascending eigenvalues
        basis = np.ascontiguousarray(vecs[:, : d - j - 1 : -1].T, dtype=dtype)
        comp = None
        if want_complement:
            comp = np.ascontiguousarray(vecs[:, : d - j].T, dtype=dtype)
        return basis, mean.astype(dtype), comp

    def _subspace_from_rows(self, c, j, mean, dtype, want_complement):
        idx = np.flatnonzero(self._labels == c)
        w = self._w[idx].astype(np.float64)
        Xc = (self._X[idx].astype(np.float64) - mean) * np.sqrt(w)[:, None]
        # Fewer rows than j: the full V completes the basis orthonormally.
        _, _, vt = np.linalg.svd(Xc, full_matrices=Xc.shape[0] < j)
        basis = np.ascontiguousarray(vt[:j], dtype=dtype)
        comp = _complements(basis[None])[0] if want_complement else None
        return basis, mean.astype(dtype), comp


def _update(
    X,
    labels,
    stats,
    mind,
    sample_weight,
    j,
    affine,
    grow,
    counts=None,
    assign=_assign,
):
    """Refit every subspace to its rows (the M-step of Lloyd).

    Clusters with fewer than ``j`` rows of positive weight (``j + 1`` for affine
    flats: see ``_rows_to_fit``), whose subspaces those rows do not determine, are
    re-seeded: the rows farthest from their subspaces (largest ``mind``) each grow a
    new subspace from their neighbourhood (``grow(i) -> (basis, mean,
    complement)``), as scikit-learn relocates empty k-means clusters. ``grow=None``
    turns re-seeding off. The other subspaces come from ``stats``, the clusters'
    statistics under ``labels``. ``counts`` (k,), when given, are the numbers of
    rows behind ``stats`` (more than X's when they accumulate, as in partial_fit).
    ``assign`` measures the rows' distances to a re-seeded subspace (``_assign``, or
    another backend's).

    Returns
    -------
    bases, means, complements, relocated
        ``relocated`` lists the re-seeded clusters.
    """
    n, d = X.shape
    k = stats.W.size
    dtype = X.dtype
    want_comp = _use_complement(j, d)
    bases = np.empty((k, j, d), dtype=dtype)
    means = np.zeros((k, d), dtype=dtype)
    comps = np.empty((k, d - j, d), dtype=dtype) if want_comp else None
    positive = sample_weight > 0
    if counts is None:
        counts = np.bincount(labels[positive], minlength=k)
    starved = np.flatnonzero(counts < _rows_to_fit(j, affine))
    relocated = {}
    if starved.size and grow is not None:
        # Farthest row first; each re-seeded subspace contains its seed, so the
        # next seed is the farthest row from every subspace chosen so far.
        far = np.where(positive, mind, -np.inf)
        xsq = _row_norms_sq(X)
        for c in starved:
            i = int(np.argmax(far))
            if not far[i] > 0:
                break
            relocated[c] = grow(i)
            basis, mean, comp = relocated[c]
            one = _pack(
                basis[None], mean[None], affine, None if comp is None else comp[None]
            )
            far = np.minimum(far, assign(X, xsq, one)[1])

    def fit(c):
        if c in relocated:
            return relocated[c]
        return stats.subspace(c, j, affine, dtype, want_comp)

    # The numpy statistics' k eigendecompositions run side by side; another
    # backend's (on a device) in sequence.
    fitted = map_threads(fit, range(k), parallel=isinstance(stats, _Stats))
    for c, (basis, mean, comp) in enumerate(fitted):
        bases[c], means[c] = basis, mean
        if want_comp:
            comps[c] = comp
    return bases, means, comps, sorted(relocated)


def _ksubspaces_single(
    X,
    xsq,
    sample_weight,
    bases,
    means,
    comps,
    affine,
    max_iter,
    tol,
    grow,
    verbose=0,
    init_dist=None,
    *,
    ops,
):
    """One run of Lloyd's algorithm for k subspaces from given initial subspaces.

    ``tol`` is absolute: the run stops when an iteration (without relocation)
    lowers the cost by at most ``tol``, or when the labels no longer change.

    Returns
    -------
    labels : ndarray of shape (n,), int32
    inertia : float
        Weighted cost, recomputed from the residuals.
    bases, means : ndarray
        The subspaces the labels were assigned to.
    comps : ndarray or None
        Their orthonormal complements, when distances use them.
    n_iter : int

    ``init_dist`` (n, k), when given, holds the rows' squared distances to the
    initial subspaces, which spares the first assignment. ``ops`` is the
    backend (``kflats._backend``): the assignment, the statistics, the update
    and the exact residuals.
    """
    k, j, _ = bases.shape
    packed = _pack(bases, means, affine, comps)
    if init_dist is None:
        labels, mind = ops.assign(X, xsq, packed)
    else:  # the seeding's distances to the subspaces it chose
        labels = np.argmin(init_dist, axis=1).astype(np.int32)
        mind = init_dist[np.arange(X.shape[0]), labels]
    inertia = ops.cost(sample_weight, mind)
    n_iter = 0
    # Re-seed starved clusters only where k clusters of rows enough to fit them
    # can exist, and only while it pays: once a re-seeding step does not lower
    # the cost, the run goes on as plain Lloyd (which then always terminates).
    relocate = ops.n_positive(sample_weight) >= k * _rows_to_fit(j, affine)
    stats = ops.stats(X, labels, sample_weight, k)
    for n_iter in range(1, max_iter + 1):
        bases, means, comps, n_relocated = ops.update(
            X, labels, stats, mind, sample_weight, j, affine, grow if relocate else None
        )
        packed = _pack(bases, means, affine, comps)
        new_labels, mind = ops.assign(X, xsq, packed)
        new_inertia = ops.cost(sample_weight, mind)
        if verbose:
            print(f"Iteration {n_iter}, inertia {new_inertia:.6g}.")
        converged = stats.move(X, labels, new_labels, sample_weight) == 0
        improvement = inertia - new_inertia
        labels, inertia = new_labels, new_inertia
        if n_relocated and improvement <= 0:
            relocate = False
        if converged and not n_relocated:
            if verbose:
                print(f"Converged at iteration {n_iter}: strict convergence.")
            break
        if not n_relocated and improvement <= tol:
            if verbose:
                print(f"Converged at iteration {n_iter}: cost change within tol.")
            break
    mind = ops.exact_mind(X, xsq, labels, mind, packed, bases, means)
    return labels, ops.cost(sample_weight, mind), bases, means, comps, n_iter
