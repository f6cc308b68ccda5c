"""The one thread policy of kflats: small LAPACK problems on one BLAS thread.

The d x d eigendecompositions of the update and of the seeding, and the
per-cluster spectra of ``kflats.factorize`` (d in the hundreds), are faster on
one thread than on several: tridiagonalization is bound by memory traffic, and
the threads only add synchronization, which costs dearly when other processes
share the cores (``np.linalg.eigh`` of a 384 x 384 scatter on a 2-core machine:
22 ms on one thread, 35 ms on two, and 300 ms on two while other processes use
the cores; the MiniLM fit in benchmarks/scale_report.py spends most of its time
there otherwise). Independent problems then run side by side, one per thread
BLAS may use (``map_threads``).
"""

from concurrent.futures import ThreadPoolExecutor

from joblib import cpu_count

__all__ = ["blas_threads", "map_threads", "one_blas_thread"]

_controller = None


def _blas_controller():
    global _controller
    if _controller is None:  # inspecting the loaded libraries takes a while
        from threadpoolctl import ThreadpoolController

        _controller = ThreadpoolController()
    return _controller


def one_blas_thread():
    """Context in which BLAS/LAPACK run on one thread (see the module's notes)."""
    return _blas_controller().limit(limits=1, user_api="blas")


def blas_threads():
    """Threads BLAS may use here: the cores, or the limit a caller has set.

    A limit set with threadpoolctl, or by joblib in its worker processes (so
    that n_jobs fits share the cores), bounds the threads of ``map_threads``
    as it bounds BLAS.
    """
    counts = [
        lib.num_threads
        for lib in _blas_controller().lib_controllers
        if lib.user_api == "blas"
    ]
    return max(counts) if counts else cpu_count()


def map_threads(fn, items, parallel=True):
    """``[fn(x) for x in items]`` with LAPACK on one thread, side by side.

    Each call runs LAPACK on one thread (``one_blas_thread``), which releases
    the GIL, so with ``parallel`` as many of them run at once as BLAS may use
    threads (``blas_threads``). The results are the same as in sequence, in
    the same order; the first exception is raised.
    """
    items = list(items)
    n_threads = min(len(items), blas_threads()) if parallel else 1
    with one_blas_thread():
        if n_threads < 2:
            return [fn(x) for x in items]
        with ThreadPoolExecutor(max_workers=n_threads) as pool:
            return list(pool.map(fn, items))
