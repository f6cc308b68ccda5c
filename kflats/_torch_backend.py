"""The torch backend of KSubspaces.fit: assignment and update on torch tensors.

``TorchOps`` holds X (and its squared row norms) on a torch device and gives
the Lloyd driver of ``kflats._lloyd`` the three things that cost: the
assignment (one GEMM per block of rows against the stacked bases or
complements, then the grouped sums of squares, in float64 as the Numba kernel
does), the clusters' statistics (float64 GEMMs of the rows that moved) with
their eigendecompositions, and the exact residuals of the final cost. The driver
itself, the seeding's neighbourhoods and the re-seeding stay in numpy; what
crosses between host and device per iteration is O(n) (labels and distances)
and O(k d^2) (the subspaces), never the rows.

On CPU the results equal the numpy backend's up to rounding. torch is imported
only here, and this module only when ``backend="torch"``.
"""

import numpy as np

from ._backend import HostOps
from ._lloyd import _BLOCK_ELEMENTS, _Stats, _use_complement
from ._seeding import _neighbourhood


def _torch():
    try:
        import torch
    except ImportError as exc:  # pragma: no cover - exercised with torch absent
        raise ImportError(
            "backend='torch' needs PyTorch: pip install 'kflats[torch]'."
        ) from exc
    return torch


def check_device(device):
    """``torch.device`` of ``device``, or a ValueError naming it."""
    torch = _torch()
    try:
        dev = torch.device("cpu" if device is None else device)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise ValueError(f"device={device!r} is not a torch device: {exc}") from exc
    available = True
    if dev.type == "cuda":
        index = 0 if dev.index is None else dev.index
        available = torch.cuda.is_available() and index < torch.cuda.device_count()
    elif dev.type == "mps":
        available = torch.backends.mps.is_available()
    if available:
        try:
            torch.empty(1, device=dev)
        except (RuntimeError, AssertionError) as exc:
            available = False
            reason = str(exc)
    if not available:
        have = ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
        raise ValueError(
            f"device={device!r} is not available to torch (torch "
            f"{torch.__version__} has: {', '.join(have)})"
            + (f": {reason}" if "reason" in locals() else ".")
        )
    return dev


class TorchOps(HostOps):
    """Assignment, statistics and residuals of one X on a torch device.

    The torch backend of the protocol in ``kflats._backend``.
    """

    parallel = False  # a device's work is queued in sequence

    def __init__(self, X, xsq, device):
        torch = self.torch = _torch()
        self.device = check_device(device)
        self._X_np, self._xsq_np = X, xsq
        # On CPU from_numpy shares X's memory: no copy.
        self.X = torch.from_numpy(X).to(self.device)
        self.xsq = torch.from_numpy(xsq).to(self.device, torch.float64)
        # Blocks of rows: larger on a GPU, where a block's GEMM must fill the
        # device (and its memory is not the host's cache).
        self._block = _BLOCK_ELEMENTS * (16 if self.device.type == "cuda" else 1)

    def _row_step(self, d):
        """Rows per block of float64 copies of whole rows."""
        return max(1, self._block // max(d, 1))

    def _tensor(self, a, dtype=None):
        return self.torch.as_tensor(np.ascontiguousarray(a), device=self.device).to(
            dtype if dtype is not None else self.torch.float64
        )

    def _rows(self, X, xsq):
        if X is self._X_np:
            return self.X, self.xsq
        return (
            self.torch.from_numpy(np.ascontiguousarray(X)).to(self.device),
            self._tensor(xsq),
        )

    def assign(self, X, xsq, packed, return_distances=False):
        """``kflats._lloyd._assign`` on the device; returns numpy arrays."""
        torch = self.torch
        Xt, xsqt = self._rows(X, xsq)
        n = Xt.shape[0]
        k, g = packed.offsets.shape
        Mt = torch.from_numpy(packed.M).to(self.device).T
        offsets, musq = self._tensor(packed.offsets), self._tensor(packed.musq)
        step = max(64, self._block // max(packed.M.shape[0], 1))
        labels = torch.empty(n, dtype=torch.int64, device=self.device)
        mind = torch.empty(n, dtype=torch.float64, device=self.device)
        dist = (
            torch.empty((n, k), dtype=torch.float64, device=self.device)
            if return_distances
            else None
        )
        for start in range(0, n, step):
            stop = min(n, start + step)
            P = Xt[start:stop] @ Mt
            acc = P[:, : k * g].reshape(-1, k, g).double() - offsets
            acc = (acc * acc).sum(-1)
            if not packed.complement:
                norm = xsqt[start:stop, None] + musq
                if packed.xmu:
                    norm = norm - 2.0 * P[:, k * g :].double()
                acc = (norm - acc).clamp_min_(0.0)
            best, lab = acc.min(dim=1)  # the first minimum on ties
            labels[start:stop], mind[start:stop] = lab, best
            if return_distances:
                dist[start:stop] = acc
        out = (labels.cpu().numpy().astype(np.int32), mind.cpu().numpy())
        if return_distances:
            return out + (dist.cpu().numpy(),)
        return out

    def grow(self, X, xsq, sample_weight, i, j, affine):
        """``kflats._seeding._grow`` with its linear algebra on the device.

        The neighbours' scores are computed on the device and ranked on the
        host (n numbers); the neighbourhood's factorization runs on the device
        in float64: the eigendecomposition of its scatter (d x d) when it has
        at least d rows, else that of its Gram matrix (rows x rows), which gives
        the same top right singular vectors as numpy's SVD of the rows and, on
        a GPU, costs a small fraction of it.
        """
        torch = self.torch
        Xt, xsqt = self._rows(X, xsq)
        x = Xt[i]
        dots = (Xt @ x).double()
        if affine:
            score = xsqt - 2.0 * dots
        else:
            score = torch.where(xsqt > 0, -(dots * dots) / xsqt, 0.0)
        score = torch.where(self._tensor(sample_weight) > 0, score, torch.inf)
        nb, wn = _neighbourhood(score.cpu().numpy(), sample_weight, i, j)
        rows = Xt[torch.from_numpy(nb).to(self.device)]
        return self._grow_from(x, rows, self._tensor(wn), j, affine, X.dtype)

    def _grow_from(self, seed, neighbours, wn, j, affine, dtype):
        """``kflats._seeding._grow_from`` on torch tensors."""
        torch = self.torch
        d = seed.shape[0]
        x = seed.double()
        root = torch.sqrt(wn)[:, None]
        Xn = neighbours.double() * root
        if affine:
            mean = seed.cpu().numpy().astype(dtype)
            Xn = Xn - root * x
            u = x.new_zeros((0, d))
        else:
            mean = np.zeros(d, dtype=dtype)
            norm = torch.linalg.vector_norm(x)
            u = (x / norm if norm > 0 else torch.eye(d, dtype=x.dtype)[0])[None]
            u = u.to(self.device)
            Xn = Xn - torch.outer(Xn @ u[0], u[0])  # the seed's direction is taken
        need = j - u.shape[0]
        m = Xn.shape[0]
        if m < d:  # fewer neighbours than features: the rows' right vectors
            vt = _top_right_vectors(torch, Xn, need)
            q, _ = torch.linalg.qr(torch.cat([u, vt]).T)  # orthonormal again
            basis = q.T
            comp = None
            if _use_complement(j, d):
                full, _ = torch.linalg.qr(basis.T, mode="complete")
                comp = full[:, j:].T
        else:
            scatter = Xn.T @ Xn
            if u.shape[0]:
                # u on top of the spectrum, as in kflats._seeding._grow_from
                scatter += (torch.trace(scatter) + 1.0) * torch.outer(u[0], u[0])
            _, vecs = torch.linalg.eigh(scatter)
            basis = vecs[:, d - j :].flip(1).T
            comp = vecs[:, : d - j].T if _use_complement(j, d) else None

        def out(t):
            return np.ascontiguousarray(t.cpu().numpy(), dtype=dtype)

        return out(basis), mean, None if comp is None else out(comp)

    def stats(self, X, labels, sample_weight, k):
        """Statistics of the clusters on the device (``_Stats`` when n < d)."""
        if X.shape[0] < X.shape[1]:  # the rows' SVD path: small, stays numpy
            return _Stats(X, labels, sample_weight, k)
        return _TorchStats(self, X, labels, sample_weight, k)

    def exact_mind(self, X, xsq, labels, mind, packed, bases, means):
        """``kflats._lloyd._exact_mind`` on the device."""
        if packed.complement:
            return mind
        torch = self.torch
        Xt, _ = self._rows(X, xsq)
        B = torch.from_numpy(np.ascontiguousarray(bases, dtype=X.dtype)).to(self.device)
        mu = torch.from_numpy(np.ascontiguousarray(means, dtype=X.dtype)).to(
            self.device
        )
        lab = torch.from_numpy(labels.astype(np.int64)).to(self.device)
        out = torch.empty(Xt.shape[0], dtype=torch.float64, device=self.device)
        step = self._row_step(X.shape[1])
        for start in range(0, Xt.shape[0], step):
            Xb, lb = Xt[start : start + step], lab[start : start + step]
            for c in torch.unique(lb).tolist():
                idx = torch.nonzero(lb == c).flatten()
                Xc = Xb[idx] - mu[c]
                R = (Xc - (Xc @ B[c].T) @ B[c]).double()
                out[start + idx] = (R * R).sum(1)
        return out.cpu().numpy()


class _TorchStats:
    """``kflats._lloyd._Stats`` (scatter form) with its sums on the device."""

    def __init__(self, ops, X, labels, sample_weight, k):
        torch = ops.torch
        self._ops = ops
        d = X.shape[1]
        if X is ops._X_np:
            self._Xt = ops.X
        else:
            self._Xt = torch.from_numpy(np.ascontiguousarray(X)).to(ops.device)
        self._w = ops._tensor(sample_weight)
        self._W = torch.zeros(k, dtype=torch.float64, device=ops.device)
        self._s = torch.zeros((k, d), dtype=torch.float64, device=ops.device)
        self._S = torch.zeros((k, d, d), dtype=torch.float64, device=ops.device)
        self._add(np.arange(X.shape[0]), labels, 1.0)

    @property
    def W(self):
        return self._W.cpu().numpy()

    @property
    def s(self):
        return self._s.cpu().numpy()

    @property
    def S(self):
        return self._S.cpu().numpy()

    def _add(self, rows, labels, sign):
        if rows.size == 0:
            return
        torch = self._ops.torch
        order = np.argsort(labels, kind="stable")
        rows, labels = rows[order], labels[order]
        cuts = np.flatnonzero(np.diff(labels)) + 1
        step = self._ops._row_step(self._Xt.shape[1])
        dev = self._ops.device
        for part in np.split(np.arange(rows.size), cuts):
            c = int(labels[part[0]])
            for start in range(0, part.size, step):
                idx = torch.from_numpy(rows[part[start : start + step]]).to(dev)
                w = self._w[idx]
                Xc = self._Xt[idx].double()
                self._W[c] += sign * w.sum()
                self._s[c] += sign * (w @ Xc)
                Xc *= torch.sqrt(w)[:, None]
                self._S[c] += sign * (Xc.T @ Xc)

    def move(self, X, old, new, sample_weight):
        moved = np.flatnonzero(old != new)
        self._add(moved, old[moved], -1.0)
        self._add(moved, new[moved], 1.0)
        return moved.size

    def subspace(self, c, j, affine, dtype, want_complement):
        torch = self._ops.torch
        d = self._s.shape[1]
        W = float(self._W[c])
        mean = torch.zeros(d, dtype=torch.float64, device=self._ops.device)
        scatter = self._S[c]
        if affine and W > 0:
            mean = self._s[c] / W
            scatter = scatter - torch.outer(self._s[c], mean)
        _, vecs = torch.linalg.eigh(scatter)  # ascending eigenvalues
        basis = vecs[:, d - j :].flip(1).T.cpu().numpy()
        comp = None
        if want_complement:
            comp = np.ascontiguousarray(vecs[:, : d - j].T.cpu().numpy(), dtype=dtype)
        mean = mean.cpu().numpy()
        return np.ascontiguousarray(basis, dtype=dtype), mean.astype(dtype), comp


def _top_right_vectors(torch, A, r):
    """The top r right singular vectors of A (m x d, m < d), as rows (r x d).

    From the eigendecomposition of the Gram matrix A A^T (m x m): v = A^T u / s.
    Where a wanted singular value is too small for that division to keep its
    digits (or r exceeds the rank), the SVD of A itself, completed to r
    orthonormal rows as numpy's ``full_matrices`` does.
    """
    m, d = A.shape
    if r == 0:
        return A.new_zeros((0, d))
    if r <= m:
        evals, U = torch.linalg.eigh(A @ A.T)  # ascending
        top = evals[m - r :].flip(0)
        scale = float(evals[-1]) if m else 0.0
        if scale > 0 and float(top[-1]) > 1e3 * m * np.finfo(np.float64).eps * scale:
            V = (A.T @ U[:, m - r :].flip(1)) / torch.sqrt(top)
            return V.T
    _, _, vt = torch.linalg.svd(A, full_matrices=m < r)
    return vt[:r]
