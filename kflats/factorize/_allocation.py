"""Numbers shared out by gain per number: ranks of clusters, numbers of modules."""

import numpy as np

from ._spectra import cluster_spectra, kept_numbers, residual_error

# ranks="adaptive" stops refining when a round gains less than this fraction
# of the error.
_REFINE_TOL = 1e-3


def greedy_fill(gains, costs, ranks, room, skip=None):
    """Add steps by decreasing gain per number while they fit: the one allocator.

    Item c (a cluster of a matrix, or a module of a model) is at step
    ``ranks[c]``; its next steps gain ``gains[c][ranks[c]:]`` and cost
    ``costs[c]`` numbers each (one cost for every step, or an array of one
    per step; a cost below 1 is ranked as 1). An item's steps are taken in
    order, so a step is ranked by the smallest gain per number of the steps
    up to it; when a step does not fit the item takes no more. Steps with no
    gain are never taken; ties go to the item listed first. Returns the new
    ranks, the gain they add and the room left.
    """
    ranks = list(ranks)
    items_c, items_r, ratios, step_costs = [], [], [], []
    for c, g in enumerate(gains):
        cost = np.broadcast_to(costs[c], g.shape)
        if c == skip:
            continue
        r = np.arange(ranks[c], g.size)
        r = r[g[r] > 0]
        items_c.append(np.full(r.size, c))
        items_r.append(r)
        # running minimum: an item's steps come in order (for spectra with
        # one cost, the ratios already do not increase)
        # (a step that costs nothing, or gives numbers back, counts as one)
        ratios.append(np.minimum.accumulate(g[r] / np.maximum(cost[r], 1)))
        step_costs.append(cost[r])
    if not items_c:
        return ranks, 0.0, room
    items_c = np.concatenate(items_c)
    items_r = np.concatenate(items_r)
    ratios = np.concatenate(ratios)
    step_costs = np.concatenate(step_costs)
    # by ratio, descending; ties keep the item order, then the step order
    order = np.lexsort((items_r, items_c, -ratios))
    closed = np.zeros(len(gains), dtype=bool)
    added = 0.0
    for idx in order:
        c = items_c[idx]
        if closed[c]:
            continue
        cost = int(step_costs[idx])
        if cost <= room:
            room -= cost
            added += gains[c][items_r[idx]]
            ranks[c] += 1
        else:
            closed[c] = True  # its steps come in order: none fits after this
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
            new, added, left = greedy_fill(gains, costs, trial, room + costs[a], skip=a)
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
    fixed = kept_numbers(sizes, [0] * len(sizes), d, affine)
    best_ranks, best_kept = None, -1.0
    starts = [[0] * len(clusters)]
    if start is not None:
        starts.append(list(start))
    for s in starts:
        room = max_params - fixed - sum(r * c for r, c in zip(s, costs, strict=True))
        if room < 0:
            continue
        ranks, _, room = greedy_fill(gains, costs, s, room)
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


def refine_partition(A, w, labels, clusters, ranks, max_params, affine, n_rounds):
    """Alternate row reassignment and rank allocation; keep the best feasible.

    Rows go to the flat that minimises ``w_i dist^2 + lam * j_c`` (a row of
    cluster c stores ``j_c`` coefficients; ``lam`` is the gain per parameter
    at the margin of the allocation), then the ranks are re-allocated for the
    new clusters. Stops after ``n_rounds``, when the labels no longer change,
    or when a round gains less than ``_REFINE_TOL`` of the error.
    """
    n, d = A.shape
    k = len(clusters)
    best = (residual_error(clusters, ranks), clusters, ranks)
    for _ in range(n_rounds):
        previous = best[0]
        lam = _threshold(clusters, ranks, d)
        new_labels = _reassign(A, w, clusters, ranks, lam, affine)
        if np.array_equal(new_labels, labels):
            break
        labels = new_labels
        clusters = cluster_spectra(A, labels, k, w, affine)
        ranks = _allocate(clusters, n, d, max_params, affine)
        if ranks is None:
            break
        res = residual_error(clusters, ranks)
        if res < best[0]:
            best = (res, clusters, ranks)
        if previous - best[0] <= _REFINE_TOL * previous:
            break
    return best[1], best[2]
