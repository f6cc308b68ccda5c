"""KSubspaces' torch backend and the projective layers on a GPU.

Sections (every ratio is measured in the same run, on the same device):

- ``ceilings``: what the device does at best, for scale: a large float32 and
  float64 matrix product, and a device-to-device copy.
- ``fit``: ``KSubspaces(k, j, backend="torch", device=...)`` on a union of k
  subspaces of dimension j in R^d plus noise (default 128,000 x 4,096 float32,
  k = 8, j = 1,024). The fit's time split into its phases (seeding, assignment,
  statistics, eigendecompositions, exact residuals); then one Lloyd iteration
  (update, assignment, statistics of the rows that moved) against the float32
  GEMM that bounds it, ``X @ M^T`` with M the k * j stacked bases.
- ``check``: fits on the device against the numpy backend's on the host
  (labels, costs, subspaces), linear and affine, basis and complement forms.
- ``eigh``: one d x d float64 eigendecomposition of the update, in float32,
  batched, through MAGMA where torch has it, and the Rayleigh-Ritz step that
  could replace it.
- ``layers``: forward (no autograd) and forward + backward of
  ``ProjectiveEmbedding`` against ``nn.Embedding`` and the SVD form
  (``nn.Embedding(n, r)`` then ``nn.Linear(r, d)``) at the same size, for the
  fit's table shape and for MiniLM's (30,522 x 384), token ids drawn with Zipf
  frequencies.

Nothing in CI runs this: it needs a GPU (``--device cpu`` runs it small, to
check the script). Run:

    python benchmarks/gpu_report.py ceilings fit layers --json out.json
"""

import argparse
import json
import statistics
import time

import numpy as np

RESULTS = {}


def _sync(torch, device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(torch, device, fn, repeat=5, warmup=1):
    """Median wall time of ``fn()`` in seconds, the device synchronized."""
    for _ in range(warmup):
        fn()
    _sync(torch, device)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        _sync(torch, device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def ceilings(args, torch, device):
    m = 8192 if device.type == "cuda" else 1024
    out = {}
    for name, dtype in (("float32", torch.float32), ("float64", torch.float64)):
        a = torch.randn(m, m, device=device, dtype=dtype)
        b = torch.randn(m, m, device=device, dtype=dtype)
        t = _time(torch, device, lambda a=a, b=b: a @ b, repeat=5)
        out[f"gemm_{name}_tflops"] = 2 * m**3 / t / 1e12
    x = torch.randn(1 << 28 if device.type == "cuda" else 1 << 22, device=device)
    t = _time(torch, device, lambda: x.clone(), repeat=5)
    out["copy_tb_per_s"] = 2 * x.numel() * 4 / t / 1e12
    out["tf32_matmul"] = bool(torch.backends.cuda.matmul.allow_tf32)
    RESULTS["ceilings"] = out
    print(
        f"ceilings: {m}^3 GEMM float32 {out['gemm_float32_tflops']:.1f} TFLOP/s "
        f"(TF32 {'on' if out['tf32_matmul'] else 'off'}), float64 "
        f"{out['gemm_float64_tflops']:.1f} TFLOP/s; copy "
        f"{out['copy_tb_per_s']:.2f} TB/s (read + write)"
    )


def _union(torch, device, n, d, k, j, noise=0.05, seed=0):
    """Rows near k random j-dimensional subspaces, built on the device."""
    g = torch.Generator(device=device).manual_seed(seed)
    X = torch.empty(n, d, device=device)
    labels = torch.randint(k, (n,), device=device, generator=g)
    for c in range(k):
        basis = torch.linalg.qr(torch.randn(d, j, device=device, generator=g))[0].T
        rows = torch.nonzero(labels == c).flatten()
        X[rows] = torch.randn(rows.numel(), j, device=device, generator=g) @ basis
    X += noise * torch.randn(n, d, device=device, generator=g)
    return X.cpu().numpy()


class _Timers:
    """Wall time spent in chosen functions, summed per name."""

    def __init__(self):
        self.total, self.calls, self._undo = {}, {}, []

    def wrap(self, owner, attr, name):
        original = getattr(owner, attr)

        def timed(*a, **kw):
            start = time.perf_counter()
            try:
                return original(*a, **kw)
            finally:
                self.total[name] = self.total.get(name, 0.0) + (
                    time.perf_counter() - start
                )
                self.calls[name] = self.calls.get(name, 0) + 1

        setattr(owner, attr, timed)
        self._undo.append((owner, attr, original))

    def undo(self):
        for owner, attr, original in reversed(self._undo):
            setattr(owner, attr, original)
        self._undo.clear()


def fit(args, torch, device):
    from kflats import KSubspaces, _torch_backend
    from kflats._ksubspaces import KSubspaces as _K
    from kflats._lloyd import _pack, _row_norms_sq, _update

    n, d, k, j = args.n, args.d, args.k, args.j
    start = time.perf_counter()
    X = _union(torch, device, n, d, k, j)
    print(
        f"fit: {n:,} x {d:,} float32 ({X.nbytes / 2**30:.2f} GiB), a union of "
        f"{k} subspaces of dimension {j} plus noise (built in "
        f"{time.perf_counter() - start:.1f} s)"
    )
    # Compile the Numba kernels and warm torch's device libraries up.
    KSubspaces(k=2, j=2, random_state=0, backend="torch", device=device).fit(
        X[:2000, :64]
    )
    timers = _Timers()
    timers.wrap(_K, "_init_subspaces", "seeding")
    timers.wrap(_torch_backend.TorchOps, "grow", "grow (seeding, re-seeding)")
    timers.wrap(_torch_backend.TorchOps, "assign", "assign")
    timers.wrap(_torch_backend._TorchStats, "__init__", "statistics (all rows)")
    timers.wrap(_torch_backend._TorchStats, "move", "statistics (moved rows)")
    timers.wrap(_torch_backend._TorchStats, "subspace", "eigh (update)")
    timers.wrap(_torch_backend.TorchOps, "exact_mind", "exact residuals")
    est = KSubspaces(
        k=k,
        j=j,
        random_state=0,
        backend="torch",
        device=device,
        max_iter=args.max_iter,
        verbose=1,
    )
    start = time.perf_counter()
    try:
        est.fit(X)
    finally:
        timers.undo()
    total = time.perf_counter() - start
    xsq = _row_norms_sq(X)
    rel = est.inertia_ / float(xsq.sum())
    print(
        f"  fit {total:.1f} s, {est.n_iter_} Lloyd iterations, relative cost "
        f"{rel:.4f} (noise alone: about {0.05**2 * (d - j) / (j + 0.05**2 * d):.4f})"
    )
    phases = {}
    for name, t in timers.total.items():
        phases[name] = {"seconds": t, "calls": timers.calls[name]}
        print(f"    {name:<26} {t:8.2f} s in {timers.calls[name]} calls")
    # One Lloyd iteration from the fitted labels, against the GEMM X @ M^T.
    ops = _torch_backend.TorchOps(X, xsq, device)
    sw = np.ones(n, dtype=X.dtype)
    packed = _pack(est.bases_, est.means_, False, est._complements)
    _, mind = ops.assign(X, xsq, packed)
    labels = est.labels_
    iter_t, parts = [], []
    for _ in range(args.repeat):
        stats = ops.stats(X, labels, sw, k)
        t0 = time.perf_counter()
        bases, means, comps, _ = _update(X, labels, stats, mind, sw, j, False, None)
        t1 = time.perf_counter()
        p = _pack(bases, means, False, comps)
        t2 = time.perf_counter()
        new_labels, _ = ops.assign(X, xsq, p)
        t3 = time.perf_counter()
        stats.move(X, labels, new_labels, sw)
        _sync(torch, device)
        t4 = time.perf_counter()
        iter_t.append(t4 - t0)
        parts.append((t1 - t0, t2 - t1, t3 - t2, t4 - t3))
    best = int(np.argmin(iter_t))
    Xt = ops.X
    M = torch.from_numpy(np.ascontiguousarray(packed.M)).to(device)
    gemm = _time(torch, device, lambda: Xt @ M.T, repeat=args.repeat)
    flops = 2 * n * d * M.shape[0]
    it = iter_t[best]
    names = ("update (k eigh)", "pack", "assign", "statistics of moved rows")
    RESULTS["fit"] = {
        "n": n,
        "d": d,
        "k": k,
        "j": j,
        "device": str(device),
        "fit_seconds": total,
        "n_iter": int(est.n_iter_),
        "relative_cost": rel,
        "phases": phases,
        "iteration_seconds": it,
        "iteration_parts": dict(zip(names, parts[best], strict=True)),
        "gemm_seconds": gemm,
        "gemm_tflops": flops / gemm / 1e12,
        "iteration_over_gemm": it / gemm,
    }
    print(
        f"  one Lloyd iteration: {it * 1e3:.0f} ms (best of {args.repeat}: "
        + ", ".join(
            f"{nm} {t * 1e3:.0f} ms" for nm, t in zip(names, parts[best], strict=True)
        )
        + f"); GEMM X @ M^T ({n} x {d} @ {d} x {M.shape[0]}, float32): "
        f"{gemm * 1e3:.0f} ms ({flops / gemm / 1e12:.1f} TFLOP/s); "
        f"ratio {it / gemm:.2f}"
    )


def check(args, torch, device):
    """The device's fits against the numpy backend's, on the host."""
    from kflats import KSubspaces

    out = []
    rng = np.random.default_rng(0)
    for n, d, k, j, affine in [
        (20_000, 256, 4, 32, False),
        (20_000, 256, 4, 32, True),
        (20_000, 256, 4, 200, False),  # complements
        (20_000, 256, 4, 200, True),
        (3_000, 512, 3, 40, False),  # neighbourhoods with fewer rows than d
    ]:
        X = _union(torch, device, n, d, k, j, seed=int(rng.integers(1000)))
        X += np.float32(3.0) if affine else np.float32(0.0)
        kw = dict(k=k, j=j, affine=affine, random_state=0)
        ref = KSubspaces(**kw).fit(X)
        est = KSubspaces(backend="torch", device=device, **kw).fit(X)
        P = np.einsum("kjd,kje->kde", ref.bases_, ref.bases_)
        Q = np.einsum("kjd,kje->kde", est.bases_, est.bases_)
        row = {
            "shape": [n, d, k, j, affine],
            "labels_equal": bool(np.array_equal(est.labels_, ref.labels_)),
            "cost_rel_diff": abs(est.inertia_ / ref.inertia_ - 1),
            "projector_max_diff": float(np.abs(P - Q).max()),
            "n_iter": [int(ref.n_iter_), int(est.n_iter_)],
        }
        out.append(row)
        print(f"  check {row}")
    RESULTS["check"] = out


def eigh(args, torch, device):
    """The update's k eigendecompositions, and what could replace them."""
    d, k, j = args.d, args.k, args.j
    g = torch.Generator(device=device).manual_seed(0)
    A = torch.randn(2 * d, d, device=device, dtype=torch.float64, generator=g)
    S = A.T @ A
    out = {}
    out["eigh_float64_ms"] = _time(torch, device, lambda: torch.linalg.eigh(S)) * 1e3
    S32 = S.float()
    out["eigh_float32_ms"] = _time(torch, device, lambda: torch.linalg.eigh(S32)) * 1e3
    Sk = S.expand(k, d, d).contiguous()
    out[f"eigh_float64_batch_of_{k}_ms"] = (
        _time(torch, device, lambda: torch.linalg.eigh(Sk), repeat=3) * 1e3
    )
    if device.type == "cuda":
        from concurrent.futures import ThreadPoolExecutor

        streams = [torch.cuda.Stream(device) for _ in range(k)]

        def on_stream(c):
            with torch.cuda.stream(streams[c]):
                torch.linalg.eigh(Sk[c])

        def side_by_side():
            with ThreadPoolExecutor(k) as pool:
                list(pool.map(on_stream, range(k)))
            torch.cuda.synchronize(device)

        out[f"eigh_float64_{k}_on_{k}_streams_ms"] = (
            _time(torch, device, side_by_side, repeat=3) * 1e3
        )
        before = torch.backends.cuda.preferred_linalg_library()
        try:
            torch.backends.cuda.preferred_linalg_library("magma")
            out["eigh_float64_magma_ms"] = (
                _time(torch, device, lambda: torch.linalg.eigh(S)) * 1e3
            )
        except RuntimeError as exc:
            out["eigh_float64_magma_ms"] = f"unavailable: {exc}"
        finally:
            torch.backends.cuda.preferred_linalg_library(before)
    # Rayleigh-Ritz on [B, S B] from the previous basis B (j x d): the top j of
    # a 2j-dimensional search space; it never loses energy against B.
    B = torch.linalg.eigh(S)[1][:, d - j :].T.contiguous()

    def ritz():
        Q, _ = torch.linalg.qr(torch.cat([B, B @ S]).T)
        _, W = torch.linalg.eigh(Q.T @ S @ Q)
        return (Q @ W[:, -j:]).T

    out["rayleigh_ritz_2j_ms"] = _time(torch, device, ritz) * 1e3
    RESULTS["eigh"] = out
    print(f"eigh: one {d} x {d} scatter (float64 unless said), j = {j}")
    for name, v in out.items():
        print(f"  {name:<28} {v if isinstance(v, str) else f'{v:9.1f} ms'}")


def _zipf_ids(n, shape, seed=0):
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, n + 1)
    return rng.permutation(n)[rng.choice(n, size=shape, p=p / p.sum())]


def layers(args, torch, device):
    from torch import nn

    from kflats.torch import ProjectiveEmbedding

    out = {}
    shapes = [(30_522, 384, 8), (args.n, args.d, args.k)]
    batch = (64, 512) if device.type == "cuda" else (8, 128)
    for n, d, k in shapes:
        budget = 0.25
        r_svd = int(budget * n * d // (n + d))
        r_k = int((budget * n * d - n) // (n + k * d))
        ids = torch.from_numpy(_zipf_ids(n, batch)).to(device)
        forms = {
            "nn.Embedding": nn.Embedding(n, d),
            f"SVD form (r={r_svd})": nn.Sequential(
                nn.Embedding(n, r_svd), nn.Linear(r_svd, d, bias=False)
            ),
            f"ProjectiveEmbedding k=1 (r={r_svd})": ProjectiveEmbedding(n, d, [r_svd]),
            f"ProjectiveEmbedding k={k} (r={r_k})": ProjectiveEmbedding(
                n, d, [r_k] * k, np.random.default_rng(0).integers(k, size=n)
            ),
        }
        rows = {}
        for name, layer in forms.items():
            layer = layer.to(device)

            def forward(layer=layer, ids=ids):
                with torch.no_grad():
                    layer.eval()(ids)

            def train_step(layer=layer, ids=ids):
                layer.train()
                layer.zero_grad(set_to_none=True)
                layer(ids).square().mean().backward()

            rows[name] = {
                "forward_ms": _time(torch, device, forward, repeat=20, warmup=3) * 1e3,
                "forward_backward_ms": _time(
                    torch, device, train_step, repeat=20, warmup=3
                )
                * 1e3,
            }
            del layer
        dense = rows["nn.Embedding"]
        print(f"layers: {n:,} x {d} table, ids {batch[0]} x {batch[1]} (Zipf)")
        for name, r in rows.items():
            print(
                f"  {name:<36} forward {r['forward_ms']:8.3f} ms "
                f"({r['forward_ms'] / dense['forward_ms']:5.2f} x dense)   "
                f"forward+backward {r['forward_backward_ms']:8.3f} ms "
                f"({r['forward_backward_ms'] / dense['forward_backward_ms']:5.2f} x)"
            )
        out[f"{n}x{d}"] = rows
    RESULTS["layers"] = out


SECTIONS = {
    "ceilings": ceilings,
    "check": check,
    "eigh": eigh,
    "fit": fit,
    "layers": layers,
}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sections", nargs="*", default=list(SECTIONS))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--n", type=int, default=128_000)
    parser.add_argument("--d", type=int, default=4096)
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--j", type=int, default=1024)
    parser.add_argument("--max-iter", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", default=None, help="also write the figures here")
    args = parser.parse_args()

    import torch

    from kflats._torch_backend import check_device

    device = check_device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    RESULTS["device"] = name
    RESULTS["torch"] = torch.__version__
    print(f"device: {name}, torch {torch.__version__}")
    for section in args.sections:
        SECTIONS[section](args, torch, device)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(RESULTS, f, indent=1)


if __name__ == "__main__":
    main()
