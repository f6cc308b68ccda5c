"""Numba kernels of the k-subspaces fit.

The kernels work on blocks of rows whose projections ``P = X @ M.T`` onto the
stacked per-cluster matrices ``M`` were already computed by one BLAS GEMM (see
``kflats._lloyd``); they turn those projections into squared distances, labels
and minimum distances in one pass, without temporaries.

The first call of each kernel compiles it (a few seconds); compiled code is
cached on disk (``cache=True``) so later processes start fast.

The kernel is compiled serial on purpose: the GEMM before it already uses every
core through BLAS, and on the 2-core machines kflats is designed for, a
``parallel=True`` build measured no faster with Numba's workqueue layer and about
50% slower end to end with its OpenMP layer, whose threads keep spinning after
each call and steal the cores from the next BLAS call
(KSubspaces(k=5, j=216) on the 30522 x 384 MiniLM table: 2.0 s serial, 2.0 s
workqueue, 3.1 s OpenMP).

The sums of squares may be reassociated (``fastmath``'s ``reassoc`` and
``contract``, nothing else: no flush to zero, no assumption that values are
finite), so that they vectorize: a block of 2500 rows x 5 complements of 168
dimensions took 1.16 ms with sums in order and 0.30 ms reassociated, the
distances agreeing to 1.4e-15 relative.
"""

import numba
import numpy as np


@numba.njit(cache=True, nogil=True, fastmath={"reassoc", "contract"})
def _distances_labels(P, xsq, xmu, musq, offsets, complement, dist, labels, mind):
    """Squared distances of a block of rows to k subspaces; nearest of them.

    Parameters
    ----------
    P : ndarray of shape (n, k * g [+ k])
        ``X @ M.T`` where ``M`` stacks one (g, d) matrix per cluster: the basis
        ``B_c`` (g = j) or, when ``complement``, the orthonormal complement
        ``N_c`` (g = d - j). In the basis form with affine flats, ``P`` has k
        more columns holding ``X @ means.T``.
    xsq : ndarray of shape (n,)
        ``||x_i||^2`` (only read in the basis form).
    xmu : bool
        Whether ``P`` carries the ``X @ means.T`` columns (affine basis form).
    musq : ndarray of shape (k,)
        ``||mu_c||^2`` (only read in the basis form).
    offsets : ndarray of shape (k, g)
        ``M_c @ mu_c``: the projection of each flat's mean (zeros for linear
        subspaces).
    complement : bool
        Whether ``M`` holds complements: then ``dist^2 = ||N_c (x - mu_c)||^2``;
        otherwise ``dist^2 = ||x - mu_c||^2 - ||B_c (x - mu_c)||^2``, clamped at 0.
    dist : ndarray of shape (n, k)
        Output: squared distances.
    labels : ndarray of shape (n,), int32
        Output: index of the nearest subspace (the first one on ties).
    mind : ndarray of shape (n,)
        Output: squared distance to the nearest subspace.
    """
    n = P.shape[0]
    k, g = offsets.shape
    for i in range(n):
        best = np.inf
        best_c = 0
        for c in range(k):
            acc = 0.0
            base = c * g
            for t in range(g):
                diff = np.float64(P[i, base + t]) - offsets[c, t]
                acc += diff * diff
            if not complement:
                norm = np.float64(xsq[i]) + musq[c]
                if xmu:
                    norm -= 2.0 * P[i, k * g + c]
                acc = norm - acc
                if acc < 0.0:
                    acc = 0.0
            dist[i, c] = acc
            if acc < best:
                best = acc
                best_c = c
        labels[i] = best_c
        mind[i] = best
