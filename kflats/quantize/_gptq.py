"""Calibrated quantization: rounding with error feedback along an input moment."""

import contextlib
import copy
import threading

import numba
import numpy as np
from scipy.linalg import lapack

from ..factorize._linear import Kept, damped_cholesky
from ..factorize._validation import check_moment, is_symmetric
from ._grid import (
    _CLIP_RATIOS,
    _HALVES,
    _NO_HALVES,
    _as_matrix,
    _check_axis,
    _decode,
    _fit_and_encode,
    _fit_groups_into,
    check_bits,
    check_group_size,
    check_scale_dtype,
    check_zero_dtype,
)
from ._scales import compact_layout
from ._tensor import QuantizedTensor

__all__ = ["quantize_calibrated", "shared_quantizations"]

_BLOCK = 128


# the inverse factors of the last moments (see kflats.factorize._linear.Kept)
_INVERSE = Kept(32 << 20)  # one of 1,536 x 1,536 and several smaller


def _inverse_factor(H, damping):
    """Upper Cholesky factor of the inverse of the damped moment ``H``.

    Directions the moment never saw (a zero diagonal entry) get a unit
    diagonal: their columns are rounded without feeding error forward. The
    factors of the last moments are kept, read-only (:class:`Kept`).
    """
    H = np.array(H, dtype=np.float64)
    key = Kept.key(H, float(damping))
    hit = _INVERSE.get(key)
    if hit is not None:
        return hit[0]
    diag = np.diag(H).copy()
    scale = float(diag[diag > 0].mean()) if np.any(diag > 0) else 1.0
    dead = diag <= 0
    H[dead, :] = 0.0
    H[:, dead] = 0.0
    H[dead, dead] += scale
    # With J the reversal of the order, J H J = R R^T (R lower) gives
    # H^-1 = U^T U for U = J R^-1 J, upper: one Cholesky factor and one
    # triangular inverse, instead of H^-1 formed and factored again (3x faster
    # at 1,536 x 1,536; the same factor up to rounding)
    _, R = damped_cholesky(H[::-1, ::-1], damping, scale, "moment", "raise damping")
    inverse, info = lapack.dtrtri(R, lower=1)
    if info != 0:  # pragma: no cover - a Cholesky factor has a positive diagonal
        raise np.linalg.LinAlgError(f"moment: the triangular inverse failed ({info})")
    return _INVERSE.put(key, (np.ascontiguousarray(inverse[::-1, ::-1]),))[0]


# the scopes of shared_quantizations, innermost last: a list, not a context
# variable, so that the threads a search measures its forms in see them
_SCOPES = []


class _Shared:
    """Results of :func:`quantize_calibrated` by the content of its inputs, up
    to ``max_bytes`` of packed tensors, kept in the order made (a search's
    baseline asks last for what the search made first)."""

    def __init__(self, max_bytes):
        self.max_bytes, self.nbytes = int(max_bytes), 0
        self.hits, self._kept = 0, {}
        self._lock = threading.Lock()  # calls come from a search's threads

    def get(self, key):
        with self._lock:
            hit = self._kept.get(key)
            if hit is None:
                return None
            self.hits += 1
        return copy.deepcopy(hit)

    def put(self, key, qt):
        with self._lock:
            if key in self._kept or self.nbytes + qt.nbytes > self.max_bytes:
                return
            self._kept[key] = copy.deepcopy(qt)
            self.nbytes += qt.nbytes


@contextlib.contextmanager
def shared_quantizations(max_bytes=256 << 20):
    """A scope in which :func:`quantize_calibrated` rounds the same inputs once.

    A compression in bytes measures each module's dense forms, and its
    baseline, uniform quantization at the same size, rounds the same
    weights with the same moments on the same grids again. Within the
    scope, each call's result is kept (up to ``max_bytes`` of packed
    tensors, in the order made) by the content of its inputs (the weight,
    the moment and every option), and a call on the same inputs gets a copy
    of it: the same codes, scales and zero points it would compute. Nothing
    is kept after the scope.

    Parameters
    ----------
    max_bytes : int, default=256 MiB
        The packed bytes kept at most; results beyond are not kept.

    Yields
    ------
    shared : object
        Its ``hits`` counts the calls answered from the kept results.

    Examples
    --------
    >>> import numpy as np
    >>> from kflats.quantize import quantize_calibrated, shared_quantizations
    >>> rng = np.random.default_rng(0)
    >>> W = rng.normal(size=(8, 64))
    >>> C = np.cov(rng.normal(size=(64, 200)))
    >>> with shared_quantizations() as shared:
    ...     a = quantize_calibrated(W, C, bits=3, group_size=32)
    ...     b = quantize_calibrated(W, C, bits=3, group_size=32)
    >>> shared.hits, np.array_equal(a.dequantize(), b.dequantize())
    (1, True)
    """
    whole = isinstance(max_bytes, (int, np.integer)) and not isinstance(max_bytes, bool)
    if not whole or max_bytes < 0:
        raise ValueError(f"max_bytes must be an int >= 0, got {max_bytes!r}")
    shared = _Shared(max_bytes)
    _SCOPES.append(shared)
    try:
        yield shared
    finally:
        _SCOPES.remove(shared)


def _check_moment(moment, n):
    M = check_moment(moment, n, "moment", "one row and column per column of W")
    if not is_symmetric(M, 1e-5, 1e-8 * max(np.abs(M).max(), 1e-300)):
        raise ValueError("moment must be symmetric")
    return M


class _Grid:
    """How a group's grid is fitted: bits, symmetry, scale dtype, clip ratios,
    the dtype of its zero points, and the layout of compact scales (None:
    not compact)."""

    def __init__(
        self, bits, symmetric, dtype, ratios, zero_dtype=np.uint8, layout=None
    ):
        self.bits, self.symmetric = bits, symmetric
        self.dtype, self.ratios = dtype, ratios
        self.zero_dtype, self.layout = zero_dtype, layout

    @property
    def float_zeros(self):
        return not self.symmetric and self.zero_dtype is np.float16

    def fit(self, groups, shape=None):
        """(scales, zero points) of the groups, one a row of ``groups``."""
        return self.fit_codes(groups, shape)[:2]

    def fit_codes(self, groups, shape=None):
        """(scales, zero points, codes) of the groups, one a row of ``groups``:
        the codes are :func:`_encode`'s on the grids fitted. Compact scales
        share exponents as the groups lie in ``shape`` (lines, groups);
        by default the groups are one group index of as many lines (layout
        0) or the groups of one line (layout 1)."""
        compact = None
        if self.layout is not None:
            n = len(groups)
            shape = shape or ((n, 1) if self.layout == 0 else (1, n))
            compact = (shape, self.layout)
        return _fit_and_encode(
            groups,
            self.bits,
            self.symmetric,
            self.dtype,
            self.ratios,
            zero_dtype=self.zero_dtype,
            compact=compact,
        )


@numba.njit(cache=True, nogil=True)
def _round_span(
    W, U, perm, j0, j1, b0, b1, g, s64, z64, bits, codes, err_block, float_zeros
):
    """Columns ``j0 ... j1 - 1`` of ``W`` rounded on grids already fitted.

    Each column's codes go to ``codes[:, perm[j]]``; its error, scaled by
    ``U``'s diagonal, to ``err_block`` and off the columns up to ``b1``. The
    arithmetic is :func:`_encode` / :func:`_decode`'s, in the same order (the
    decoded value in float32), so the codes are those of the NumPy loop.
    """
    levels = (1 << bits) - 1
    rows = W.shape[0]
    # rows are independent: one row at a time keeps its block of columns and
    # the block of U in cache (4-5x faster than a column at a time over the
    # rows, 1536 x 576 at 4 bits; the same operations in the same order)
    for i in range(rows):
        for j in range(j0, j1):
            orig = perm[j]
            k = orig // g
            s, z, x = s64[i, k], z64[i, k], W[i, j]
            if float_zeros:  # a float zero point: added before the rounding
                q = np.rint(x / s + z) if s > 0 else np.rint(z)
            else:
                q = (np.rint(x / s) if s > 0 else 0.0) + z
            q = min(max(q, 0.0), float(levels))
            deq = np.float64((np.float32(q) - np.float32(z)) * np.float32(s))
            codes[i, orig] = np.uint8(q)
            e = (x - deq) / U[j, j]
            err_block[i, j - b0] = e
            for jj in range(j + 1, b1):
                W[i, jj] -= e * U[j, jj]


@numba.njit(cache=True, nogil=True)
def _round_down(
    W, U, perm, b0, b1, g, bits, symmetric, ratios, halves, s, z, codes, err, compact
):
    """Columns ``b0 ... b1 - 1`` of ``W`` rounded in groups down each column
    (``axis=0``), each column's grids fitted on it as updated so far.

    Column ``j``'s grids go to ``s[perm[j]]``, ``z[perm[j]]`` (float64), its
    codes to ``codes[:, perm[j]]``; its error, scaled by ``U``'s diagonal,
    to ``err`` and off the columns up to ``b1``. The arithmetic is that of
    the NumPy loop (:func:`_fit_groups_into`, then :func:`_decode`'s float32
    values), so the codes are its codes: a table's bases took 6,000 calls
    of it a quantization, most of the time in Python.
    """
    rows = W.shape[0]
    x = np.empty(rows)
    q = np.empty(rows, dtype=np.uint8)
    for j in range(b0, b1):
        orig = perm[j]
        for i in range(rows):
            x[i] = W[i, j]
        _fit_groups_into(
            x, g, bits, symmetric, ratios, halves, s[orig], z[orig], q, compact
        )
        for i in range(rows):
            k = i // g
            deq = np.float64(
                (np.float32(q[i]) - np.float32(z[orig, k])) * np.float32(s[orig, k])
            )
            codes[i, orig] = q[i]
            e = (x[i] - deq) / U[j, j]
            err[i, j - b0] = e
            for jj in range(j + 1, b1):
                W[i, jj] -= e * U[j, jj]


def _round_columns(W, U, perm, g, axis, act_order, grid, scales, zeros):
    """Codes of ``W`` (columns in rounding order), errors fed forward along ``U``.

    Each column is rounded on its group's grid (fitted here when its first
    column comes up, unless fitted up front into ``scales``/``zeros``), and
    its error, scaled by ``U``'s diagonal, is taken off the columns not yet
    rounded: at once within a block of columns, by one product beyond it.
    Groups along the rows (``axis=1``) round a group's columns in one
    compiled loop (:func:`_round_span`), groups down the columns (``axis=0``)
    a block of columns (:func:`_round_down`), but for float zero points.
    """
    rows, cols = W.shape
    codes = np.empty((rows, cols), dtype=np.uint8)
    block = _BLOCK if axis == 0 or act_order else g * max(1, _BLOCK // g)
    if axis == 1:
        s64, z64 = scales.astype(np.float64), zeros.astype(np.float64)
    compiled = axis == 0 and not grid.float_zeros
    if compiled:
        s64, z64 = np.empty(scales.shape), np.empty(zeros.shape)
        ratios = np.asarray(grid.ratios, dtype=np.float64)
        halves = _HALVES if grid.dtype is np.float16 else _NO_HALVES
    for b0 in range(0, cols, block):
        b1 = min(cols, b0 + block)
        err_block = np.empty((rows, b1 - b0))
        if axis == 1:
            for j in range(b0, b1, b1 - b0 if act_order else g):
                end = b1 if act_order else j + g
                if not act_order:
                    k = j // g
                    scales[:, k], zeros[:, k] = grid.fit(W[:, j:end])
                    s64[:, k], z64[:, k] = scales[:, k], zeros[:, k]
                _round_span(
                    W, U, perm, j, end, b0, b1, g, s64, z64, grid.bits, codes,
                    err_block, grid.float_zeros,
                )  # fmt: skip
        elif compiled:
            _round_down(
                W, U, perm, b0, b1, g, grid.bits, grid.symmetric, ratios, halves,
                s64, z64, codes, err_block, grid.layout is not None,
            )  # fmt: skip
        else:  # float zero points (a GGUF Q4_1 block's grid)
            for j in range(b0, b1):
                orig = perm[j]
                col = W[:, j].reshape(-1, g)
                s, z, q = grid.fit_codes(col)
                scales[orig], zeros[orig] = s, z
                deq = _decode(q, s, z).astype(np.float64).reshape(-1)
                codes[:, orig] = q.reshape(-1)
                e = (W[:, j] - deq) / U[j, j]
                W[:, j + 1 : b1] -= np.outer(e, U[j, j + 1 : b1])
                err_block[:, j - b0] = e
        W[:, b1:] -= err_block @ U[b0:b1, b1:]
    if compiled:  # the values stored, exactly
        scales[:], zeros[:] = s64, z64
    return codes


def quantize_calibrated(
    W,
    moment,
    bits,
    group_size=128,
    *,
    axis=1,
    symmetric=False,
    clip=True,
    damping=0.01,
    act_order=False,
    scale_dtype="float16",
    zero_dtype="uint8",
    compact_scales=False,
):
    """GPTQ-style quantization: columns rounded in order, errors fed forward.

    Minimises ``||(W - W_hat) L||_F`` for ``moment = L L^T`` (for a Linear
    layer's weight, ``W`` of shape (out, in) and ``moment`` its input's
    ``E[x x^T]``, the expected squared output error) greedily, as GPTQ does:
    the columns of ``W`` are rounded one after the other, and each column's
    rounding error is compensated on the columns not yet rounded, along the
    Cholesky factor of the inverse of the damped moment. A group's grid
    (scale, zero point) is fitted when its first column comes up, on the
    weights as updated so far (``axis=1``), or column by column (``axis=0``:
    groups run down each column).

    Parameters
    ----------
    W : array-like of shape (rows, cols)
    moment : array-like of shape (cols, cols)
        Symmetric positive semi-definite.
    bits : {2, 3, 4, 5, 6, 8}
    group_size : int or None, default=128
        Must divide ``cols`` (``axis=1``) or ``rows`` (``axis=0``).
    axis : {0, 1}, default=1
    symmetric : bool, default=False
    clip : bool, default=True
        Search each group's clipping ratio for the lowest squared error.
    damping : float, default=0.01
        Added to the moment's diagonal, relative to its mean.
    act_order : bool, default=False
        Round the columns in decreasing order of their input energy (the
        moment's diagonal) instead of their natural order, as GPTQ's
        ``act_order``; with groups along the rows, each group's grid is then
        fitted up front on ``W`` itself ("static groups").
    scale_dtype : {"float16", "float32"}, default="float16"
    zero_dtype : {"uint8", "float16"}, default="uint8"
        Integer zero points, or float16 ones (see
        :func:`~kflats.quantize.quantize`).
    compact_scales : bool, default=False
        Compact scales (see :class:`QuantizedTensor`): each group's scale
        rounded up onto 8-bit multiples of a power of two shared with the
        groups fitted beside it: the groups of one index in 8 consecutive
        rows (``axis=1``, ``scale_layout=0``), or 8 consecutive groups of a
        column (``axis=0``, ``scale_layout=1``).

    Returns
    -------
    QuantizedTensor

    See Also
    --------
    quantize : Round-to-nearest, the floor.

    Examples
    --------
    >>> import numpy as np
    >>> from kflats.quantize import quantize, quantize_calibrated
    >>> rng = np.random.default_rng(0)
    >>> W = rng.normal(size=(32, 64))
    >>> X = rng.normal(size=(500, 64)) @ rng.normal(size=(64, 64))
    >>> C = X.T @ X / len(X)
    >>> L = np.linalg.cholesky(C)
    >>> def err(qt):
    ...     return np.linalg.norm((W - qt.dequantize()) @ L)
    >>> bool(err(quantize_calibrated(W, C, bits=3, group_size=32))
    ...      < err(quantize(W, bits=3, group_size=32)))
    True
    """
    bits = check_bits(bits)
    axis = _check_axis(axis)
    dtype = check_scale_dtype(scale_dtype)
    W = _as_matrix(W)
    rows, cols = W.shape
    if axis == 1:
        g = check_group_size(group_size, cols, "the row length ({})")
    else:
        g = check_group_size(group_size, rows, "the column length ({})")
    damping = float(damping)
    if not damping >= 0 or not np.isfinite(damping):
        raise ValueError(f"damping must be a finite float >= 0, got {damping!r}")
    H = _check_moment(moment, cols)
    zdtype = check_zero_dtype(zero_dtype)
    layout = compact_layout(compact_scales, dtype, zdtype, symmetric, 1 - axis)
    shared = _SCOPES[-1] if _SCOPES else None
    if shared is not None:
        options = (bits, g, axis, bool(symmetric), bool(clip), damping)
        options += (bool(act_order), np.dtype(dtype).str, np.dtype(zdtype).str)
        options += (layout,)
        key = (Kept.key(W, *options), Kept.key(H)[0])
        hit = shared.get(key)
        if hit is not None:
            return hit
    ratios = _CLIP_RATIOS if clip else (1.0,)
    grid = _Grid(bits, bool(symmetric), dtype, ratios, zdtype, layout)
    n_scales = (rows, cols // g) if axis == 1 else (cols, rows // g)
    scales = np.empty(n_scales, dtype=dtype)
    zeros = np.empty(n_scales, dtype=np.uint8 if symmetric else zdtype)
    if act_order:
        # the columns with the most input energy first; the grids of groups
        # along a row are then fitted up front, on the weights as given
        perm = np.argsort(-np.diag(H), kind="stable")
        H = H[np.ix_(perm, perm)]
        if axis == 1:  # every group of every row in one call
            s, z = grid.fit(W.reshape(rows * (cols // g), g), (rows, cols // g))
            scales[:], zeros[:] = s.reshape(scales.shape), z.reshape(zeros.shape)
    else:
        perm = np.arange(cols)
    # row-major: each row's columns (and U's) are read in order, in cache
    # (column-major, as the column selection returns them: 8x slower)
    U = np.ascontiguousarray(_inverse_factor(H, damping))
    W = np.ascontiguousarray(W[:, perm])
    codes = _round_columns(W, U, perm, g, axis, act_order, grid, scales, zeros)
    if axis == 0:
        codes = codes.T
    qt = QuantizedTensor._from_codes(
        codes,
        scales,
        None if symmetric else zeros,
        (rows, cols),
        bits,
        g,
        axis,
        layout,
    )
    if shared is not None:
        shared.put(key, qt)
    return qt
