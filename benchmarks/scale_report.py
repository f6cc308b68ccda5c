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
    code = (
        "import sys; sys.path.insert(0, %r); import scale_report as s; s.%s(*%r)"
        % (os.path.dirname(os.path.abspath(__file__)), function, args)
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


SECTIONS = {"memory": memory}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sections", nargs="*", default=list(SECTIONS))
    parser.add_argument("--n", type=int, default=600_000)
    parser.add_argument("--d", type=int, default=384)
    args = parser.parse_args()
    for name in args.sections:
        SECTIONS[name](args)


if __name__ == "__main__":
    main()
