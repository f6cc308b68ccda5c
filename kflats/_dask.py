"""KSubspaces on dask arrays: checks, the map-reduce pass, lazy row functions.

A pass over the rows runs one task per chunk of rows, which returns something
small (the per-cluster statistics of ``kflats._lloyd._Stats``, a weighted
sample, a cost), and one tree of reductions that adds them up; only these
small results travel, and the rows are never gathered. The fit is
``kflats._dask_fit.DaskOps`` (its seeding ``kflats._dask_seeding``); here are
the checks of the input, the pass itself, ``score`` (one pass) and the lazy
``predict``, ``transform``, ``coordinates`` and ``project``.

This module imports dask only when a dask array is passed.
"""

import math
import sys
from functools import reduce

import numpy as np

_FAN_IN = 8  # partial results added per reduction task


def is_dask_array(X):
    """Whether X is a dask array (without importing dask)."""
    if "dask.array" not in sys.modules:
        return False
    import dask.array as da

    return isinstance(X, da.Array)


def check_array(X, n_features=None, name="X"):
    """Validate a dask array of rows: 2-D, chunked along rows only, float."""
    if X.ndim != 2:
        raise ValueError(f"Expected a 2-D dask array for {name}, got {X.ndim}-D.")
    if any(math.isnan(c) for c in X.chunks[0]):
        raise ValueError(
            f"{name} has unknown chunk sizes along the rows (as after boolean "
            "indexing); call X.compute_chunk_sizes() first."
        )
    if len(X.chunks[1]) != 1:
        raise ValueError(
            f"{name} is chunked along the feature axis (chunks {X.chunks[1]}); "
            "KSubspaces needs whole rows in every chunk: chunk it along the rows "
            "only, e.g. X.rechunk({1: -1})."
        )
    if X.shape[0] == 0:
        raise ValueError(f"{name} has 0 rows; at least 1 is required.")
    if n_features is not None and X.shape[1] != n_features:
        raise ValueError(
            f"X has {X.shape[1]} features, but KSubspaces is expecting "
            f"{n_features} features as input."
        )
    if X.dtype not in (np.float32, np.float64):
        X = X.astype(np.float64)
    return X


def _check_weight(sample_weight, X):
    import dask.array as da

    if sample_weight is None:
        return da.ones(X.shape[0], dtype=X.dtype, chunks=(X.chunks[0],))
    if not is_dask_array(sample_weight):
        sample_weight = np.asarray(sample_weight, dtype=X.dtype)
        if sample_weight.ndim == 0:
            sample_weight = np.full(X.shape[0], sample_weight, dtype=X.dtype)
        if sample_weight.shape != (X.shape[0],):
            raise ValueError(
                f"sample_weight has shape {sample_weight.shape}; expected "
                f"({X.shape[0]},)."
            )
        if np.any(sample_weight < 0):
            raise ValueError("Negative values in data passed to sample_weight")
        return da.from_array(sample_weight, chunks=(X.chunks[0],))
    if sample_weight.shape != (X.shape[0],):
        raise ValueError(
            f"sample_weight has shape {sample_weight.shape}; expected ({X.shape[0]},)."
        )
    return sample_weight.astype(X.dtype).rechunk((X.chunks[0],))


def _blocks(X, sample_weight):
    xb = X.to_delayed().ravel().tolist()
    wb = sample_weight.to_delayed().ravel().tolist()
    return list(zip(xb, wb, strict=True))


def _map_reduce(blocks, task, combine, *args):
    """``combine`` over ``task(x, w, b, *args)`` of every chunk: one compute."""
    import dask

    parts = [
        dask.delayed(task, pure=True)(x, w, b, *args) for b, (x, w) in enumerate(blocks)
    ]
    return dask.compute(_tree(parts, combine))[0]


def _tree(parts, combine):
    """A tree of ``combine`` over delayed ``parts``, ``_FAN_IN`` at a time."""
    import dask

    while len(parts) > 1:
        parts = [
            dask.delayed(_combine_all, pure=True)(combine, *parts[i : i + _FAN_IN])
            for i in range(0, len(parts), _FAN_IN)
        ]
    return parts[0]


def _combine_all(combine, *parts):
    return reduce(combine, parts)


def _add(a, b):
    return tuple(x + y for x, y in zip(a, b, strict=True))


# -- score: one pass; predict, transform, coordinates, project: lazy -------------


def _check_finite(X):
    """A chunk's rows are finite, or a ValueError (raised when it is computed)."""
    bad = np.count_nonzero(~np.isfinite(X).all(axis=1))
    if bad:
        raise ValueError(f"Input X contains NaN or infinity ({bad} rows in a chunk).")
    return X


def _checked(fn):
    """``fn`` of a chunk, after checking that its rows are finite."""

    def block(X, *args):
        return fn(_check_finite(X), *args)

    return block


class Lazy:
    """Row functions of a dask array: one task per chunk of rows, lazily.

    The counterpart of ``kflats._rows.InMemory``; each chunk's rows are checked
    finite when it is computed.
    """

    def map(self, fn, X, width, dtype, labels=None):
        """``fn`` of every chunk (and of its ``labels``): (rows,) or (rows, width)."""
        shape = (
            {"drop_axis": 1} if width is None else {"chunks": (X.chunks[0], (width,))}
        )
        if labels is None:
            return X.map_blocks(_checked(fn), dtype=dtype, **shape)
        return X.map_blocks(
            _checked(_with_labels(fn)), labels[:, None], dtype=dtype, **shape
        )

    def weights(self, sample_weight, X):
        return _check_weight(sample_weight, X)


def _with_labels(fn):
    def block(X, labels):
        return fn(X, labels[:, 0])

    return block


def batches(X, sample_weight):
    """The chunks of X (and of the weights) one at a time, as numpy arrays."""
    import dask

    weights = _check_weight(sample_weight, X) if sample_weight is not None else None
    for b, x in enumerate(X.to_delayed().ravel()):
        if weights is None:
            yield dask.compute(x)[0], None
        else:
            yield dask.compute(x, weights.blocks[b])
