"""How KSubspaces scales: memory, time against SVD and GEMM, growth, Dask.

Sections (run one or several; every ratio is measured in the same run):

- ``memory``: extra peak memory of a fit as a ratio to the input's size, for
  ``KSubspaces(k=5, j=64, max_iter=3)`` on 600,000 x 384 float32 rows. Each
  measurement runs in a fresh process that builds X chunk by chunk, compiles
  the kernels on a small fit, resets the kernel's peak-RSS counter
  (``/proc/self/clear_refs``), fits, and reads ``VmHWM`` from
  ``/proc/self/status``: extra = VmHWM - RSS before the fit. Linux only.
- ``minilm``: on the MiniLM table (30522 x 384), the default fit's time
  (k=5, j=216) against numpy's float64 SVD of the table, and one Lloyd
  iteration against the GEMM that bounds it.
- ``growth``: fit time against n (d = 128) and against k * j, with a plot
  (``--plot docs/_static/scale_growth.png``).
- ``dask``: a union of subspaces generated chunk by chunk on a local cluster.

Run: python benchmarks/scale_report.py memory minilm growth dask
"""

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np


def _status(field):
    """A field of /proc/self/status, in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS


def _chunked_normal(n, d, seed=0, chunk=50_000, dtype=np.float32):
    """Gaussian rows built chunk by chunk (no float64 copy of the whole)."""
    rng = np.random.default_rng(seed)
    X = np.empty((n, d), dtype=dtype)
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        X[start:stop] = rng.standard_normal((stop - start, d), dtype=dtype)
    return X


def _memory_child(n, d, k, j, max_iter):
    """Runs in a fresh process: extra peak memory of one fit."""
    from kflats import KSubspaces

    X = _chunked_normal(n, d)
    KSubspaces(k=2, j=2, random_state=0).fit(X[:2000])  # compile first
    _reset_peak()
    before = _status("VmRSS")
    start = time.perf_counter()
    KSubspaces(k=k, j=j, max_iter=max_iter, random_state=0).fit(X)
    elapsed = time.perf_counter() - start
    extra = _status("VmHWM") - before
    print(json.dumps({"extra": extra, "input": X.nbytes, "time": elapsed}))


def _in_child(function, *args):
    here = os.path.dirname(os.path.abspath(__file__))
    code = (
        f"import sys; sys.path.insert(0, {here!r}); import scale_report as s; "
        f"s.{function}(*{args!r})"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def memory(args):
    n, d, k, j = args.n, args.d, 5, 64
    r = _in_child("_memory_child", n, d, k, j, 3)
    print(
        f"memory: KSubspaces(k={k}, j={j}, max_iter=3) on {n} x {d} float32 "
        f"({r['input'] / 2**20:.0f} MiB): extra peak {r['extra'] / 2**20:.0f} MiB "
        f"= {r['extra'] / r['input']:.3f} x the input (fit {r['time']:.1f} s)"
    )


def _best(fn, repeat):
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def minilm(args):
    """Fit time against numpy's float64 SVD; one Lloyd iteration against GEMM."""
    import contextlib

    from kflats import KSubspaces, _threads
    from kflats._lloyd import _assign, _pack, _row_norms_sq, _Stats, _update
    from kflats._seeding import _grow
    from kflats.datasets import load_minilm_embeddings

    A = load_minilm_embeddings()
    n, d = A.shape
    k, j = 5, 216
    total = float(np.einsum("ij,ij->", A, A, dtype=np.float64))
    KSubspaces(k=2, j=2, random_state=0).fit(A[:500])  # compile
    KSubspaces(k=2, j=200, random_state=0).fit(A[:500])

    def svd():
        np.linalg.svd(A.astype(np.float64), full_matrices=False)

    fits = {}

    def fit(seed):
        fits[seed] = KSubspaces(k=k, j=j, random_state=seed).fit(A)

    # Interleaved, so that both see the same load on a shared machine.
    svd_t, fit_t, nothread_t = [], [], []
    one_thread = _threads.one_blas_thread
    for seed in range(args.repeat):
        svd_t.append(_best(svd, 1))
        fit_t.append(_best(lambda seed=seed: fit(seed), 1))
        if args.compare_threads:  # the same fit with LAPACK on every thread
            _threads.one_blas_thread = contextlib.nullcontext
            try:
                nothread_t.append(_best(lambda seed=seed: fit(seed), 1))
            finally:
                _threads.one_blas_thread = one_thread
    cost = np.median([f.inertia_ / total for f in fits.values()])
    fit_m, svd_m = np.median(fit_t), np.median(svd_t)
    print(
        f"minilm: {n} x {d} float32, KSubspaces(k={k}, j={j}), {args.repeat} seeds, "
        f"interleaved: fit median {fit_m:.2f} s, numpy float64 SVD median "
        f"{svd_m:.2f} s, ratio {fit_m / svd_m:.2f} (best {min(fit_t):.2f} / "
        f"{min(svd_t):.2f} s = {min(fit_t) / min(svd_t):.2f}); "
        f"relative cost median {cost:.4f}"
    )
    if nothread_t:
        threads_m = np.median(nothread_t)
        print(
            f"  same fits with multi-threaded LAPACK for the eigh: median "
            f"{threads_m:.2f} s = {threads_m / svd_m:.2f} x SVD"
        )
    # The same on one thread, in CPU time: what the work costs, whatever the
    # neighbours on a shared machine do.
    svd_cpu = _best_cpu(svd, 2)
    fit_cpu = _best_cpu(lambda: fit(0), 2)
    print(
        f"  one thread, CPU time (best of 2): fit {fit_cpu:.2f} s, SVD "
        f"{svd_cpu:.2f} s, ratio {fit_cpu / svd_cpu:.2f}"
    )
    ks = fits[0]
    sw = np.ones(n, dtype=A.dtype)
    xsq = _row_norms_sq(A)
    _, mind = _assign(A, xsq, _pack(ks.bases_, ks.means_, False, ks._complements))

    def grow(i):
        return _grow(A, xsq, sw, i, j, False)

    def iteration():
        bases, means, comps, _ = _update(A, ks.labels_, stats, mind, sw, j, False, grow)
        new_labels, _ = _assign(A, xsq, _pack(bases, means, False, comps))
        stats.move(A, ks.labels_, new_labels, sw)

    iter_t = []
    for _ in range(7):
        stats = _Stats(A, ks.labels_, sw, k)
        iter_t.append(_best(iteration, 1))
    B_all = np.ascontiguousarray(ks.bases_.reshape(k * j, d))
    gemm_t = _best(lambda: A @ B_all.T, 7)
    print(
        f"  one Lloyd iteration (update, assignment, statistics of moved rows): "
        f"{min(iter_t) * 1e3:.0f} ms; GEMM A @ B_all^T ({n} x {d} @ {d} x {k * j}): "
        f"{gemm_t * 1e3:.0f} ms; ratio {min(iter_t) / gemm_t:.2f} (best of 7 each)"
    )


def _union_block(n, d, k, j, seed, noise=0.05, dtype=np.float32):
    """Rows near k fixed j-dimensional subspaces of R^d (subspaces from seed 0)."""
    bases = np.stack(
        [
            np.linalg.qr(np.random.default_rng(c).normal(size=(d, j)))[0].T
            for c in range(k)
        ]
    ).astype(dtype)
    rng = np.random.default_rng(seed)
    labels = rng.integers(k, size=n)
    X = noise * rng.standard_normal((n, d), dtype=dtype)
    for c in range(k):
        rows = np.flatnonzero(labels == c)
        X[rows] += rng.standard_normal((rows.size, j), dtype=dtype) @ bases[c]
    return X


def _union(n, d, k, j, chunk=100_000):
    X = np.empty((n, d), dtype=np.float32)
    for b, start in enumerate(range(0, n, chunk)):
        stop = min(n, start + chunk)
        X[start:stop] = _union_block(stop - start, d, k, j, seed=1000 + b)
    return X


def _best_cpu(fn, repeat):
    """Least CPU time of the process over ``repeat`` calls, on one thread.

    On a machine shared with other work, wall time measures the neighbours;
    the CPU time of a one-thread run measures the work, which is what a growth
    curve is about.
    """
    from threadpoolctl import threadpool_limits

    times = []
    with threadpool_limits(1):
        for _ in range(repeat):
            start = time.process_time()
            fn()
            times.append(time.process_time() - start)
    return min(times)


def growth(args):
    """Fit time against n (d = 128) and against k * j; a plot for the docs."""
    from kflats import KSubspaces

    d = 128
    KSubspaces(k=2, j=2, random_state=0).fit(
        np.random.default_rng(0).random((500, d))
    )  # compile
    rows = []
    # Gaussian rows: no structure to find, so every fit runs its 10 iterations
    # (a union of subspaces is often found in one, which hides the growth).
    print(
        f"growth: CPU time per fit on one thread, Gaussian rows, d = {d}, "
        "float32, best of 2"
    )
    for n in args.sizes:
        X = _chunked_normal(n, d)
        est = KSubspaces(k=8, j=16, max_iter=10, tol=0.0, random_state=0)
        t = _best_cpu(lambda X=X, est=est: est.fit(X), 2)
        rows.append(("n", n, 8 * 16, t, est.n_iter_))
        print(
            f"  n={n:>9,} k=8 j=16: {t:7.2f} s, {est.n_iter_} iterations, "
            f"{t / n * 1e6:.2f} us per row"
        )
    n = args.sizes[min(2, len(args.sizes) - 1)]
    X = _chunked_normal(n, d)
    for k, j in [(2, 8), (4, 8), (4, 16), (8, 16), (8, 32), (16, 32)]:
        est = KSubspaces(k=k, j=j, max_iter=10, tol=0.0, random_state=0)
        t = _best_cpu(lambda est=est: est.fit(X), 2)
        rows.append(("kj", n, k * j, t, est.n_iter_))
        print(
            f"  n={n:,} k={k:>2} j={j:>2} (k*j={k * j:>3}): {t:7.2f} s, "
            f"{est.n_iter_} iterations"
        )
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.6))
        ns = [(r[1], r[3]) for r in rows if r[0] == "n"]
        a.loglog(*zip(*ns, strict=True), "o-", label="KSubspaces(k=8, j=16)")
        x1, t1 = ns[-1]  # the largest fit, where fixed costs weigh least
        a.loglog([x for x, _ in ns], [t1 * x / x1 for x, _ in ns], "k:", label="linear")
        a.set_xlabel("rows n (d = 128)")
        a.set_ylabel("CPU time of the fit (s)")
        a.legend()
        kjs = [(r[2], r[3]) for r in rows if r[0] == "kj"]
        b.plot(*zip(*kjs, strict=True), "o-")
        b.set_xlabel(f"k * j (n = {n:,}, d = 128)")
        b.set_ylabel("CPU time of the fit (s)")
        fig.suptitle("KSubspaces.fit, 10 Lloyd iterations, one thread (CPU time)")
        fig.tight_layout()
        fig.savefig(args.plot, dpi=110)
        print(f"  plot saved to {args.plot}")


def _vm(field):
    return _status(field)


def dask_section(args):
    """A union of subspaces generated chunk by chunk, fitted on a LocalCluster."""
    import dask.array as da
    from distributed import Client, LocalCluster

    from kflats import KSubspaces

    n, d, k, j = args.dask_n, args.dask_d, args.dask_k, args.dask_j
    chunk = args.dask_chunk
    sizes = [chunk] * (n // chunk) + ([n % chunk] if n % chunk else [])

    def block(block_info=None):
        b = block_info[None]["chunk-location"][0]
        return _union_block(sizes[b], d, k, j, seed=1000 + b)

    X = da.map_blocks(block, chunks=(tuple(sizes), (d,)), dtype=np.float32)
    nbytes = n * d * 4
    with (
        LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0"
        ) as cluster,
        Client(cluster) as client,
    ):
        client.run(
            lambda: (
                __import__("kflats")
                .KSubspaces(k=2, j=2)
                .fit(np.random.default_rng(0).random((100, 4)))
            )
        )  # compile on the workers
        client.run(_reset_peak)
        before = client.run(_vm, "VmRSS")
        start = time.perf_counter()
        est = KSubspaces(k=k, j=j, max_iter=args.dask_max_iter, random_state=0)
        est.fit(X)
        t_dask = time.perf_counter() - start
        peak = client.run(_vm, "VmHWM")
    extra = {w: peak[w] - before[w] for w in peak}
    print(
        f"dask: {n:,} x {d} float32 ({nbytes / 2**30:.2f} GiB, never whole; chunks "
        f"of {chunk:,} rows = {chunk * d * 4 / 2**20:.0f} MiB) on a LocalCluster of "
        f"2 worker processes x 1 thread, KSubspaces(k={k}, j={j}, "
        f"max_iter={args.dask_max_iter}): fit {t_dask:.1f} s, {est.n_iter_} "
        f"iterations, inertia {est.inertia_:.6g}"
    )
    for w, e in extra.items():
        print(
            f"  worker {w}: peak RSS {peak[w] / 2**20:.0f} MiB, extra {e / 2**20:.0f}"
            f" MiB = {e / (nbytes / 2):.3f} x its half of the input"
        )
    if args.dask_in_memory:
        Xm = X.compute(scheduler="threads")
        start = time.perf_counter()
        mem = KSubspaces(k=k, j=j, max_iter=args.dask_max_iter, random_state=0)
        mem.fit(Xm)
        t_mem = time.perf_counter() - start
        print(
            f"  in memory, same rows: fit {t_mem:.1f} s, {mem.n_iter_} iterations, "
            f"inertia {mem.inertia_:.6g}; dask / in-memory: time "
            f"{t_dask / t_mem:.2f}, inertia {est.inertia_ / mem.inertia_:.4f}"
        )


SECTIONS = {"memory": memory, "minilm": minilm, "growth": growth, "dask": dask_section}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sections", nargs="*", default=list(SECTIONS))
    parser.add_argument("--n", type=int, default=600_000)
    parser.add_argument("--d", type=int, default=384)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument(
        "--sizes",
        type=int,
        nargs="+",
        default=[10_000, 30_000, 100_000, 300_000, 1_000_000],
    )
    parser.add_argument("--plot", default=None, help="growth: save the plot here")
    parser.add_argument("--dask-n", type=int, default=10_000_000)
    parser.add_argument("--dask-d", type=int, default=64)
    parser.add_argument("--dask-chunk", type=int, default=250_000)
    parser.add_argument("--dask-k", type=int, default=8)
    parser.add_argument("--dask-j", type=int, default=8)
    parser.add_argument("--dask-max-iter", type=int, default=300)
    parser.add_argument(
        "--dask-in-memory",
        action="store_true",
        help="dask: also fit the same rows in memory (needs n x d x 4 bytes)",
    )
    parser.add_argument(
        "--compare-threads",
        action="store_true",
        help="minilm: also time the fit with multi-threaded LAPACK",
    )
    args = parser.parse_args()
    for name in args.sections:
        SECTIONS[name](args)


if __name__ == "__main__":
    main()
