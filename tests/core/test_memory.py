"""Memory of a fit: extra peak stays a fraction of the input, whatever n."""

import tracemalloc

import numpy as np
import pytest

from kflats import KSubspaces, _lloyd


@pytest.mark.parametrize("affine", [False, True])
def test_fit_extra_memory_is_a_fraction_of_the_input(affine, monkeypatch):
    """Every step works in blocks of rows: no copy or cast of X, no n x d temp.

    numpy reports its allocations to tracemalloc, so the traced peak is the
    fit's own extra memory (the input is allocated before tracing starts).
    Blocks are shrunk so that a small X stands for a large one: what remains
    is what grows with n.
    """
    monkeypatch.setattr(_lloyd, "_BLOCK_ELEMENTS", 1 << 15)
    X = np.random.default_rng(0).standard_normal((60_000, 256), dtype=np.float32)
    est = KSubspaces(k=3, j=8, affine=affine, max_iter=2, random_state=0)
    KSubspaces(k=2, j=2, random_state=0).fit(X[:500])  # compile outside
    tracemalloc.start()
    try:
        est.fit(X)
        est.transform(X[:20_000])
        est.coordinates(X)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak <= 0.25 * X.nbytes, peak / X.nbytes
