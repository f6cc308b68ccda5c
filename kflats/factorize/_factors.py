"""ProjectiveFactors and Candidate: the result of a factorization and its search.

Its .npz file format (save and load) is in ``_factors_file``.
"""

import numbers
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from .._size import factors_size

#: What a factorization minimised; recorded in ProjectiveFactors.objective.
OBJECTIVES = ("frobenius", "weighted", "input_moment")


class Candidate(NamedTuple):
    """One (k, j) tried by :func:`factorize`, as recorded in ``search``.

    Attributes
    ----------
    k : int
        Number of clusters fitted.
    j : int
        Uniform rank the partition was fitted with.
    ranks : tuple of int
        Ranks of the clusters after allocation (equal to ``j``, capped at the
        cluster size, for uniform ranks).
    n_params : int
        Numbers that the factors of this candidate store.
    error : float
        Relative (weighted) squared Frobenius error of this candidate.
    """

    k: int
    j: int
    ranks: tuple
    n_params: int
    error: float


@dataclass(frozen=True, eq=False)
class ProjectiveFactors:
    """A matrix stored as one factor pair per cluster of its rows.

    Row ``i`` of the matrix, in cluster ``c = labels[i]``, is approximated by
    ``U[c][p] @ V[c]`` (plus ``means[c]`` when affine), where ``p`` is the
    position of ``i`` in ``rows(c)``.

    Parameters
    ----------
    labels : ndarray of shape (n,), integer dtype
        Cluster id of each row, in ``0 .. k-1``. Stored as int64.
    U : sequence of k ndarrays
        ``U[c]`` has shape (n_c, j_c): the coefficients of the rows of cluster
        c, in ascending original row order (``np.flatnonzero(labels == c)``).
    V : sequence of k ndarrays
        ``V[c]`` has shape (j_c, d). Orthonormal rows when built by
        :func:`factorize` or :func:`svd_factors`. A rank ``j_c`` may be 0.
    means : ndarray of shape (k, d) or None, default=None
        Offsets of affine flats; ``None`` for linear subspaces.
    error : float or None, default=None
        Relative error under the factorization's ``objective`` (the
        calibrated error when the fit was calibrated), ``None`` when unknown.
    transposed : bool, default=False
        Whether the factors describe the transpose of the matrix the user
        passed (a Linear weight factorized on its input features).
    search : tuple of Candidate, default=()
        The candidates a budget search evaluated; empty when none ran.
    objective : {"frobenius", "weighted", "input_moment"}, default="frobenius"
        What the fit minimised: the plain squared Frobenius error; the
        row-weighted one (``sample_weight``, e.g. token frequencies); or, for
        a Linear weight ``W``, the expected output error
        ``E||(W - W_hat) x||^2`` under a calibrated input moment.
    weight_error : float or None, default=None
        The plain relative squared Frobenius error of the weight,
        ``||A - A_hat||^2 / ||A||^2``, reported beside ``error``; equal to it
        for the ``"frobenius"`` objective. ``None`` when unknown.

    Attributes
    ----------
    k : int
        Number of clusters.
    ranks : tuple of int
        ``j_c`` of each cluster.
    shape : tuple of int
        ``(n, d)``, the shape of the factorized matrix.
    dtype : numpy.dtype
        Dtype of the factors (float32 or float64).
    n_params : int
        Every stored number: ``sum_c (U[c].size + V[c].size)``, plus
        ``means.size`` when affine, plus ``n`` cluster ids when ``k > 1``.
    compression : float
        ``n_params / (n * d)``.

    See Also
    --------
    factorize : Build the factors of a matrix.
    svd_factors : The truncated-SVD baseline, as one cluster.

    Examples
    --------
    >>> import numpy as np
    >>> from kflats.factorize import ProjectiveFactors
    >>> labels = np.array([0, 1, 0])
    >>> U = (np.array([[1.0], [2.0]]), np.array([[3.0]]))
    >>> V = (np.array([[1.0, 0.0]]), np.array([[0.0, 1.0]]))
    >>> f = ProjectiveFactors(labels, U, V)
    >>> f.reconstruct()
    array([[1., 0.],
           [0., 3.],
           [2., 0.]])
    >>> f.ranks, f.n_params
    ((1, 1), 10)
    """

    labels: np.ndarray
    U: tuple
    V: tuple
    means: np.ndarray | None = None
    error: float | None = None
    transposed: bool = False
    search: tuple = ()
    objective: str = "frobenius"
    weight_error: float | None = None

    def __post_init__(self):
        labels = np.asarray(self.labels)
        if labels.ndim != 1 or labels.dtype.kind not in "iu":
            raise ValueError(
                "labels must be a 1-D integer array, got "
                f"ndim={labels.ndim}, dtype={labels.dtype}"
            )
        U = tuple(np.asarray(u) for u in self.U)
        V = tuple(np.asarray(v) for v in self.V)
        k = len(V)
        if k == 0 or len(U) != k:
            raise ValueError(
                f"U and V must hold one array per cluster (k >= 1), got "
                f"len(U)={len(U)}, len(V)={k}"
            )
        dtype = V[0].dtype
        if dtype not in (np.float32, np.float64):
            raise ValueError(f"V must be float32 or float64, got {dtype}")
        if V[0].ndim != 2:
            raise ValueError(f"V[0] must be 2-D, got shape {V[0].shape}")
        d = V[0].shape[1]
        if labels.size and (labels.min() < 0 or labels.max() >= k):
            raise ValueError(
                f"labels must lie in 0..{k - 1} (k = len(V)), got values in "
                f"{labels.min()}..{labels.max()}"
            )
        labels = labels.astype(np.int64, copy=False)
        counts = np.bincount(labels, minlength=k)
        for c in range(k):
            if V[c].ndim != 2 or V[c].shape[1] != d:
                raise ValueError(f"V[{c}] must have shape (j_c, {d}), got {V[c].shape}")
            expected = (int(counts[c]), V[c].shape[0])
            if U[c].shape != expected:
                raise ValueError(
                    f"U[{c}] must have shape {expected} (rows of cluster {c}, "
                    f"rank of V[{c}]), got {U[c].shape}"
                )
            if U[c].dtype != dtype or V[c].dtype != dtype:
                raise ValueError(
                    f"U and V must share one dtype, got U[{c}].dtype={U[c].dtype}, "
                    f"V[{c}].dtype={V[c].dtype}, V[0].dtype={dtype}"
                )
        means = self.means
        if means is not None:
            means = np.asarray(means)
            if means.shape != (k, d) or means.dtype != dtype:
                raise ValueError(
                    f"means must be None or an array of shape {(k, d)} and dtype "
                    f"{dtype}, got shape {means.shape} and dtype {means.dtype}"
                )
        order = np.argsort(labels, kind="stable")
        offsets = np.concatenate(([0], np.cumsum(counts)))
        object.__setattr__(self, "labels", labels)
        object.__setattr__(self, "U", U)
        object.__setattr__(self, "V", V)
        object.__setattr__(self, "means", means)
        object.__setattr__(self, "transposed", bool(self.transposed))
        object.__setattr__(self, "search", tuple(Candidate(*c) for c in self.search))
        if self.objective not in OBJECTIVES:
            raise ValueError(
                f"objective must be one of {OBJECTIVES}, got {self.objective!r}"
            )
        for name in ("error", "weight_error"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, float(getattr(self, name)))
        object.__setattr__(self, "_order", order)
        object.__setattr__(self, "_offsets", offsets)

    @property
    def k(self):
        """Number of clusters."""
        return len(self.V)

    @property
    def ranks(self):
        """Rank ``j_c`` of each cluster, as a tuple of int."""
        return tuple(int(v.shape[0]) for v in self.V)

    @property
    def shape(self):
        """``(n, d)``: shape of the factorized matrix."""
        return (self.labels.shape[0], self.V[0].shape[1])

    @property
    def dtype(self):
        """Dtype of the factors."""
        return self.V[0].dtype

    @property
    def n_params(self):
        """Every stored number, cluster ids included when ``k > 1``."""
        sizes = [u.shape[0] for u in self.U]
        d = self.shape[1]
        return factors_size(sizes, self.ranks, d, self.means is not None).numbers

    @property
    def compression(self):
        """``n_params / (n * d)``: the fraction of the matrix's numbers kept."""
        n, d = self.shape
        if n * d == 0:
            raise ValueError(
                f"the compression of factors of an empty matrix (shape {(n, d)}) "
                "is undefined"
            )
        return self.n_params / (n * d)

    def rows(self, c):
        """Original row indices of cluster ``c``, ascending.

        Parameters
        ----------
        c : int
            Cluster index, ``0 <= c < k``.

        Returns
        -------
        rows : ndarray of shape (n_c,), int64
            Equal to ``np.flatnonzero(labels == c)``; row ``p`` of ``U[c]``
            belongs to row ``rows[p]`` of the matrix.

        Examples
        --------
        >>> import numpy as np
        >>> from kflats.factorize import svd_factors
        >>> svd_factors(np.eye(3), rank=1).rows(0)
        array([0, 1, 2])
        """
        if not isinstance(c, numbers.Integral) or not 0 <= c < self.k:
            raise ValueError(f"c must be an integer in 0..{self.k - 1}, got {c!r}")
        return self._order[self._offsets[c] : self._offsets[c + 1]]

    def reconstruct(self):
        """The approximation of the factorized matrix.

        Returns
        -------
        A_hat : ndarray of shape (n, d)
            Rows in the original order, in the dtype of the factors. For
            ``transposed`` factors of a Linear weight ``W`` this is
            ``W.T`` approximated; ``reconstruct().T`` approximates ``W``.

        Examples
        --------
        >>> import numpy as np
        >>> from kflats.factorize import svd_factors
        >>> A = np.arange(6.0).reshape(3, 2)
        >>> np.allclose(svd_factors(A, rank=2).reconstruct(), A)
        True
        """
        out = np.empty(self.shape, dtype=self.dtype)
        for c in range(self.k):
            rows = self.rows(c)
            block = self.U[c] @ self.V[c]
            if self.means is not None:
                block += self.means[c]
            out[rows] = block
        return out

    def save(self, path):
        """Write the factors to an ``.npz`` file, losslessly.

        Parameters
        ----------
        path : str or path-like or file-like
            Destination. As with :func:`numpy.savez`, ``".npz"`` is appended to
            a file name that lacks it.

        See Also
        --------
        load : Read the file back.

        Examples
        --------
        >>> import numpy as np, tempfile, os
        >>> from kflats.factorize import ProjectiveFactors, svd_factors
        >>> f = svd_factors(np.arange(12.0).reshape(4, 3), rank=1)
        >>> path = os.path.join(tempfile.mkdtemp(), "factors.npz")
        >>> f.save(path)
        >>> g = ProjectiveFactors.load(path)
        >>> np.array_equal(g.reconstruct(), f.reconstruct())
        True
        """
        from ._factors_file import _write

        _write(self, path)

    @classmethod
    def load(cls, path):
        """Read factors written by :meth:`save`.

        Parameters
        ----------
        path : str or path-like or file-like
            The ``.npz`` file.

        Returns
        -------
        factors : ProjectiveFactors

        Raises
        ------
        ValueError
            If the file is not a readable ``.npz`` archive, was not written by
            :meth:`save`, has an unknown format version, or holds inconsistent
            arrays.

        Examples
        --------
        >>> import numpy as np, tempfile, os
        >>> from kflats.factorize import ProjectiveFactors
        >>> path = os.path.join(tempfile.mkdtemp(), "other.npz")
        >>> np.savez(path, x=np.zeros(3))
        >>> ProjectiveFactors.load(path)
        Traceback (most recent call last):
        ...
        ValueError: ... is not a kflats ProjectiveFactors file ...
        """
        from .._npz import NpzArchive
        from ._factors_file import _read

        with NpzArchive(path, what="a kflats ProjectiveFactors file") as npz:
            return _read(cls, npz)
