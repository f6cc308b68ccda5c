"""Benchmarks of KSubspaces at scale: memory, partial_fit, Dask, torch, compile.

Memory: ``peakmem_`` benchmarks are the peak RSS of the whole benchmark process
(data included); ``track_fit_extra_memory_ratio`` is the fit's own extra peak as
a ratio to the input's size, measured in a fresh process (Linux).
"""

import json
import os
import subprocess
import sys
import tempfile

import numpy as np

from kflats import KSubspaces

from . import common
from .common import union_of_subspaces, warm_up

_MEMORY_CHILD = """
import json, time
import numpy as np
from kflats import KSubspaces

def status(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024

n, d = {n}, {d}
rng = np.random.default_rng(0)
X = np.empty((n, d), dtype=np.float32)
for start in range(0, n, 50_000):
    X[start:start + 50_000] = rng.standard_normal(
        (min(50_000, n - start), d), dtype=np.float32)
KSubspaces(k=2, j=2, random_state=0).fit(X[:2000])
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
before = status("VmRSS")
KSubspaces(k=5, j=64, max_iter=3, random_state=0).fit(X)
print(json.dumps((status("VmHWM") - before) / X.nbytes))
"""

_COMPILE_CHILD = """
import time
import numpy as np
start = time.perf_counter()
from kflats import KSubspaces
X = np.random.default_rng(0).standard_normal((200, 6))
t0 = time.perf_counter()
KSubspaces(k=2, j=2, random_state=0).fit(X)
t1 = time.perf_counter()
KSubspaces(k=2, j=2, random_state=0).fit(X)
t2 = time.perf_counter()
print((t1 - t0) - (t2 - t1))
"""


class MemoryBenchmark(common.Benchmark):
    """The fit's extra peak memory over the input (goal: at most 0.25)."""

    param_names = ["n_samples"]
    params = ([200_000],)
    timeout = 900

    def track_fit_extra_memory_ratio(self, n_samples):
        if not os.path.exists("/proc/self/clear_refs"):
            raise NotImplementedError("needs Linux /proc")
        out = subprocess.run(
            [sys.executable, "-c", _MEMORY_CHILD.format(n=n_samples, d=384)],
            check=True,
            capture_output=True,
            text=True,
        )
        return json.loads(out.stdout.strip().splitlines()[-1])

    track_fit_extra_memory_ratio.unit = "x input"


class CompileBenchmark(common.Benchmark):
    """First-call compile time of the Numba kernels, from an empty cache."""

    params = ([None],)
    param_names = ["cache"]
    repeat = (1, 3, 60.0)

    def track_numba_compile_cold(self, _):
        with tempfile.TemporaryDirectory() as cache:
            env = dict(os.environ, NUMBA_CACHE_DIR=cache)
            out = subprocess.run(
                [sys.executable, "-c", _COMPILE_CHILD],
                check=True,
                capture_output=True,
                text=True,
                env=env,
            )
        return float(out.stdout.strip().splitlines()[-1])

    track_numba_compile_cold.unit = "seconds"


class PartialFitBenchmark(common.Benchmark):
    """partial_fit over 10 batches of 5,000 rows near 8 subspaces of dim 4."""

    param_names = ["dtype"]
    params = (["float32", "float64"],)

    def setup(self, dtype):
        warm_up()
        X, _ = union_of_subspaces(50_000, 64, k=8, j=4, dtype=dtype)
        self.batches = np.array_split(X, 10)
        self.X = X

    def _run(self):
        est = KSubspaces(k=8, j=4, random_state=0)
        for batch in self.batches:
            est.partial_fit(batch)
        return est

    def time_partial_fit(self, dtype):
        self._run()

    def peakmem_partial_fit(self, dtype):
        self._run()

    def track_cost_ratio_to_fit(self, dtype):
        """partial_fit's cost on all rows over fit's (1 is as good)."""
        fitted = KSubspaces(k=8, j=4, random_state=0).fit(self.X)
        return -self._run().score(self.X) / fitted.inertia_


class DaskBenchmark(common.Benchmark):
    """fit on a dask array of 100,000 x 64 rows in 10 chunks, threaded scheduler."""

    params = ([10],)
    param_names = ["n_chunks"]
    repeat = (1, 3, 60.0)

    def setup(self, n_chunks):
        try:
            import dask
            import dask.array as da
        except ImportError as exc:
            raise NotImplementedError(f"dask unavailable: {exc}") from exc
        warm_up()
        dask.config.set(scheduler="threads")
        X, _ = union_of_subspaces(100_000, 64, k=8, j=4, dtype="float32")
        self.X = X
        self.Xd = da.from_array(X, chunks=(X.shape[0] // n_chunks, 64))

    def time_fit(self, n_chunks):
        KSubspaces(k=8, j=4, random_state=0).fit(self.Xd)

    def peakmem_fit(self, n_chunks):
        KSubspaces(k=8, j=4, random_state=0).fit(self.Xd)

    def track_inertia_ratio_to_in_memory(self, n_chunks):
        dist = KSubspaces(k=8, j=4, random_state=0).fit(self.Xd)
        mem = KSubspaces(k=8, j=4, random_state=0).fit(self.X)
        return dist.inertia_ / mem.inertia_


class TorchBackendBenchmark(common.Benchmark):
    """fit with backend="torch" on CPU against the numpy backend."""

    param_names = ["backend"]
    params = (["numpy", "torch"],)

    def setup(self, backend):
        if backend == "torch":
            try:
                import torch  # noqa: F401
            except ImportError as exc:
                raise NotImplementedError(f"torch unavailable: {exc}") from exc
        warm_up()
        self.X, _ = union_of_subspaces(20_000, 64, k=8, j=4, dtype="float32")

    def time_fit(self, backend):
        KSubspaces(k=8, j=4, random_state=0, backend=backend).fit(self.X)

    def track_inertia(self, backend):
        return (
            KSubspaces(k=8, j=4, random_state=0, backend=backend).fit(self.X).inertia_
        )
