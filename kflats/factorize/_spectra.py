"""Per-cluster weighted spectra, and factors built from them."""

import math
from typing import NamedTuple

import numpy as np
from scipy import linalg

from .._size import factors_size
from .._threads import one_blas_thread
from ._factors import ProjectiveFactors


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
        # small LAPACK problems: see kflats._threads
        with one_blas_thread():
            evals, evecs = linalg.eigh(G)
        evals, evecs = evals[::-1], evecs[:, ::-1]
    else:
        Xw = X * np.sqrt(wc)[:, None] if wc is not None else X
        with one_blas_thread():
            _, s, Vt = linalg.svd(Xw, full_matrices=False, lapack_driver="gesdd")
        evals, evecs = s**2, Vt.T
    return _Cluster(rows, mean, np.maximum(evals, 0.0), evecs)


def cluster_spectra(A, labels, k, w, affine):
    order = np.argsort(labels, kind="stable")
    bounds = np.searchsorted(labels[order], np.arange(k + 1))
    return [_spectrum(A, order[bounds[c] : bounds[c + 1]], w, affine) for c in range(k)]


def residual_error(clusters, ranks):
    """Weighted squared error left by keeping ``ranks`` components per cluster."""
    return float(sum(cl.evals[r:].sum() for cl, r in zip(clusters, ranks, strict=True)))


def kept_numbers(sizes, ranks, d, affine):
    """Numbers of factors with these clusters, the empty ones dropped."""
    kept = [c for c, size in enumerate(sizes) if size > 0]
    return factors_size(
        [sizes[c] for c in kept], [ranks[c] for c in kept], d, affine
    ).numbers


def factors_from_spectra(A, w, clusters, ranks, affine, denom, **meta):
    """ProjectiveFactors from per-cluster spectra; empty clusters are dropped."""
    n, d = A.shape
    dtype = A.dtype
    keep = [c for c, cl in enumerate(clusters) if cl.rows.size > 0]
    labels = np.empty(n, dtype=np.int64)
    U, V, means = [], [], []
    numer = plain = 0.0
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
        r2_sum = float(r2.sum())
        plain += r2_sum
        numer += r2_sum if w is None else float(w[cl.rows] @ r2)
        U.append(Uc)
        V.append(Vc)
    error = _ratio(numer, denom)
    if w is None:
        meta.setdefault("weight_error", error)
    else:
        meta.setdefault("weight_error", _ratio(plain, total_energy(A, None)))
    meta.setdefault("objective", "frobenius" if w is None else "weighted")
    return ProjectiveFactors(
        labels=labels,
        U=tuple(U),
        V=tuple(V),
        means=np.stack(means) if affine else None,
        error=error,
        **meta,
    )


def _ratio(numer, denom):
    """A relative error; 0 / 0 is 0."""
    return numer / denom if denom > 0 else (0.0 if numer == 0 else math.inf)


def total_energy(A, w):
    sq = np.einsum("ij,ij->i", A, A, dtype=np.float64)
    return float(sq.sum() if w is None else w @ sq)
