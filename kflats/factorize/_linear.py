"""Linear layers: factor pairs of a weight, clustering its input or output side."""

from dataclasses import replace

import numpy as np

from ._search import factorize


def factorize_linear(W, k=None, j=None, *, side="input", **kwargs):
    """Factor pairs of a Linear layer's weight, clustering one of its sides.

    Parameters
    ----------
    W : ndarray of shape (out_features, in_features), float32 or float64
        The weight of ``y = W x + b``.
    k, j : int, default=None
        As in :func:`factorize`.
    side : {"input", "output"}, default="input"
        ``"input"``: cluster the input features, i.e. factorize ``W.T``
        (in x out); the result is marked ``transposed=True`` and
        ``reconstruct().T`` approximates ``W``. This is the side that the
        layers of :mod:`kflats.torch` use. ``"output"``: cluster the output
        features, the rows of ``W`` itself.
    **kwargs
        Passed to :func:`factorize` (``budget``, ``ranks``, ``affine``,
        ``sample_weight`` (one weight per clustered feature),
        ``random_state``, and KSubspaces parameters).

    Returns
    -------
    factors : ProjectiveFactors

    Examples
    --------
    >>> import numpy as np
    >>> from kflats.factorize import factorize_linear
    >>> W = np.random.default_rng(0).normal(size=(8, 20))
    >>> f = factorize_linear(W, k=2, j=3, random_state=0)
    >>> f.shape, f.transposed
    ((20, 8), True)
    >>> f.reconstruct().T.shape
    (8, 20)
    """
    if side not in ("input", "output"):
        raise ValueError(f"side must be 'input' or 'output', got {side!r}")
    if getattr(W, "ndim", 2) != 2:
        raise ValueError(f"W must be a 2-D array, got ndim={W.ndim}")
    if side == "input":
        result = factorize(np.asarray(W).T, k, j, **kwargs)
        return replace(result, transposed=True)
    return factorize(W, k, j, **kwargs)
