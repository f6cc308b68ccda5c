"""Progress of ``kflats compress``: the seconds of each step, and its bars."""

import contextlib
import time


class Steps:
    """Times each step; shows a one-unit bar for a step that has none of its own.

    Parameters
    ----------
    show : bool
        Whether bars are shown (``--quiet`` turns them off).
    """

    def __init__(self, show):
        self.show = show
        self.seconds = {}
        self.start = time.perf_counter()

    def elapsed(self):
        """Seconds since the steps began."""
        return time.perf_counter() - self.start

    @contextlib.contextmanager
    def __call__(self, key, desc, bar=True):
        """Time the block as step ``key``; with ``bar``, show ``desc`` while it runs."""
        start = time.perf_counter()
        handle = None
        if self.show and bar:
            from tqdm.auto import tqdm

            handle = tqdm(total=1, desc=desc, bar_format="{desc}: {elapsed}")
        try:
            yield
        finally:
            self.seconds[key] = self.seconds.get(key, 0.0) + time.perf_counter() - start
            if handle is not None:
                handle.update(1)
                handle.close()
