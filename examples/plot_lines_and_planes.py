"""
===================================================
Recovering lines and planes: k-subspaces vs k-means
===================================================

Rows drawn from a union of subspaces through the origin are grouped by the
*direction* they lie along, not by where they are: two rows at opposite ends of
one line belong together. :class:`kflats.KSubspaces` fits k subspaces of
dimension j and recovers the groups; :class:`sklearn.cluster.KMeans`, which
groups rows around k points, cuts every line through the origin into pieces.

We fit three lines (j = 1) and then two planes (j = 2) in 3-D, and compare the
labels with the true groups by the adjusted Rand index (1 is a perfect
recovery, 0 is chance).
"""

# %%
# Three noisy lines through the origin
# ------------------------------------
import time

import matplotlib.pyplot as plt
import numpy as np
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score

from kflats import KSubspaces

rng = np.random.default_rng(0)


def union_of_subspaces(n_per, j, d, k, noise, rng):
    """Rows of k random j-dimensional subspaces of R^d, with Gaussian noise."""
    bases = [np.linalg.qr(rng.normal(size=(d, j)))[0].T for _ in range(k)]
    X = np.vstack([rng.normal(size=(n_per, j)) @ B for B in bases])
    X += noise * rng.normal(size=X.shape)
    return X, np.repeat(np.arange(k), n_per)


X_lines, y_lines = union_of_subspaces(200, j=1, d=3, k=3, noise=0.05, rng=rng)

t0 = time.perf_counter()
ks = KSubspaces(k=3, j=1, random_state=0).fit(X_lines)
print(f"first KSubspaces fit (includes Numba compilation): "
      f"{time.perf_counter() - t0:.2f} s")
km = KMeans(n_clusters=3, n_init=10, random_state=0).fit(X_lines)

print(f"lines, ARI k-subspaces: {adjusted_rand_score(y_lines, ks.labels_):.3f}")
print(f"lines, ARI k-means:     {adjusted_rand_score(y_lines, km.labels_):.3f}")

# %%
# k-subspaces misses only rows close to the origin, which are close to every
# line (with noise, their nearest line is a coin toss). The fitted directions
# are the rows of ``bases_`` (shape ``(k, j, 3)``); we draw each as a segment
# through the origin.

fig = plt.figure(figsize=(10, 4.5))
for pos, (labels, title) in enumerate(
    [(ks.labels_, "KSubspaces(k=3, j=1)"), (km.labels_, "KMeans(n_clusters=3)")]
):
    ax = fig.add_subplot(1, 2, pos + 1, projection="3d")
    ax.scatter(*X_lines.T, c=labels, cmap="tab10", s=6, vmin=0, vmax=9)
    if pos == 0:
        for c, B in enumerate(ks.bases_):
            seg = np.outer([-3, 3], B[0])
            ax.plot(*seg.T, color=plt.cm.tab10(c), lw=2)
    else:
        ax.scatter(*km.cluster_centers_.T, c="k", marker="x", s=60)
    ari = adjusted_rand_score(y_lines, labels)
    ax.set_title(f"{title}\nARI = {ari:.2f}")
    ax.set_xticks([]), ax.set_yticks([]), ax.set_zticks([])
fig.tight_layout()

# %%
# Two planes
# ----------
# Two planes through the origin meet along a line, so rows near that line are
# ambiguous whatever the method; the rest are recovered.

X_planes, y_planes = union_of_subspaces(300, j=2, d=3, k=2, noise=0.02, rng=rng)
ks2 = KSubspaces(k=2, j=2, random_state=0).fit(X_planes)
km2 = KMeans(n_clusters=2, n_init=10, random_state=0).fit(X_planes)
print(f"planes, ARI k-subspaces: {adjusted_rand_score(y_planes, ks2.labels_):.3f}")
print(f"planes, ARI k-means:     {adjusted_rand_score(y_planes, km2.labels_):.3f}")

fig = plt.figure(figsize=(10, 4.5))
for pos, (labels, title) in enumerate(
    [(ks2.labels_, "KSubspaces(k=2, j=2)"), (km2.labels_, "KMeans(n_clusters=2)")]
):
    ax = fig.add_subplot(1, 2, pos + 1, projection="3d")
    ax.scatter(*X_planes.T, c=labels, cmap="coolwarm", s=6)
    ari = adjusted_rand_score(y_planes, labels)
    ax.set_title(f"{title}\nARI = {ari:.2f}")
    ax.set_xticks([]), ax.set_yticks([]), ax.set_zticks([])
fig.tight_layout()

# %%
# With j = 2 in 3-D (j > d / 2), distances go through each plane's normal
# vector, the orthogonal complement, which is exact even for rows lying on the
# plane. The distance of every row to every plane is given by
# :meth:`~kflats.KSubspaces.transform`:

D = ks2.transform(X_planes[:3])
print(np.round(D, 3))

plt.show()
