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
A Linear layer computes ``y = W x + b`` with ``W`` of shape (out, in).
:func:`factorize_linear` clusters its **input features** (the rows of
``W.T``; the result is marked ``transposed=True``) or its **output neurons**
(the rows of ``W``), and with a calibrated input moment minimises the
expected output error instead of the weight's (see :func:`damped_moment`).

The parts: ``_factors`` (the result and its file format), ``_search``
(partition, budget search over k, the SVD baseline), ``_allocation`` (ranks
per cluster under a budget), ``_spectra`` (per-cluster spectra and factors),
``_linear`` (the sides and the calibrated objective of a Linear weight).
"""

from ._factors import Candidate, ProjectiveFactors
from ._linear import damped_moment, factorize_linear
from ._search import K_GRID, factorize, svd_factors

__all__ = [
    "K_GRID",
    "Candidate",
    "ProjectiveFactors",
    "damped_moment",
    "factorize",
    "factorize_linear",
    "svd_factors",
]
