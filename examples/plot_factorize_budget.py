"""
==========================================================
Compressing a matrix: per-cluster factors vs truncated SVD
==========================================================

:func:`kflats.factorize.factorize` replaces the rows of each cluster of a
matrix by their own low-rank pair ``U_c V_c``; truncated SVD
(:func:`kflats.factorize.svd_factors`) keeps one pair for all rows. At the
same number of stored parameters, which approximates the matrix better?

The matrix here has 1,200 rows in 64-D that lie near 6 different
4-dimensional subspaces — a caricature of a word-embedding table, where groups
of tokens use different directions. We sweep the budget (the fraction of the
matrix's numbers that the factors may store) and plot the relative squared
Frobenius error of both.
"""

# %%
# The matrix
# ----------
import time

import matplotlib.pyplot as plt
import numpy as np

from kflats.factorize import factorize, svd_factors

rng = np.random.default_rng(0)
n_clusters, dim, d, n_per = 6, 4, 64, 200
A = np.vstack(
    [
        rng.normal(size=(n_per, dim)) @ np.linalg.qr(rng.normal(size=(d, dim)))[0].T
        for _ in range(n_clusters)
    ]
)
A += 0.05 * rng.normal(size=A.shape)
print(A.shape)

# %%
# Error against budget
# --------------------
# With a ``budget`` and no ``k``, :func:`~kflats.factorize.factorize` tries
# several numbers of clusters (k = 1, the SVD itself, included) with the
# largest rank each allows, and keeps the best. ``ranks="adaptive"`` also lets
# the ranks differ between clusters.

budgets = [0.08, 0.12, 0.2, 0.3]
fitted = {}
errors = {"truncated SVD": [], "kflats, uniform ranks": [],
          "kflats, adaptive ranks": []}
t0 = time.perf_counter()
for budget in budgets:
    s = svd_factors(A, budget=budget)
    errors["truncated SVD"].append(s.error)
    f = fitted[budget] = factorize(A, budget=budget, random_state=0)
    errors["kflats, uniform ranks"].append(f.error)
    g = factorize(A, budget=budget, ranks="adaptive", random_state=0)
    errors["kflats, adaptive ranks"].append(g.error)
    print(f"budget {budget:.2f}: SVD rank {s.ranks[0]:2d} -> error {s.error:.3f};"
          f"  kflats k={f.k}, ranks {f.ranks} -> error {f.error:.3f}")
print(f"sweep: {time.perf_counter() - t0:.1f} s")

fig, ax = plt.subplots(figsize=(7, 4.5))
for (label, errs), marker in zip(errors.items(), "osD", strict=True):
    ax.plot(budgets, errs, marker=marker, label=label)
ax.set_yscale("log")
ax.set_xlabel("budget (fraction of the matrix's numbers stored)")
ax.set_ylabel("relative squared Frobenius error")
ax.set_title(f"{A.shape[0]} x {A.shape[1]} matrix, rows near "
             f"{n_clusters} subspaces of dimension {dim}")
ax.legend()
fig.tight_layout()
plt.show()

# %%
# What a search tried
# -------------------
# ``search`` records every candidate (k, j) with its size and error; k = 1 is
# the truncated SVD, so the search can never do worse than it.

f = fitted[0.2]
for cand in f.search:
    print(f"k={cand.k}  j={cand.j:2d}  params={cand.n_params:6d}  "
          f"error={cand.error:.4f}")
print(f"kept: k={f.k}, ranks={f.ranks}, {f.n_params} numbers "
      f"({f.compression:.1%} of the matrix)")

# %%
# The factors rebuild the matrix with
# :meth:`~kflats.factorize.ProjectiveFactors.reconstruct`:

A_hat = f.reconstruct()
print(np.linalg.norm(A - A_hat) ** 2 / np.linalg.norm(A) ** 2, f.error)
