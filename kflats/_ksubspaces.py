"""The KSubspaces estimator: k subspaces (or affine flats) of dimension j."""

import warnings
from functools import partial
from numbers import Integral, Real

import numpy as np
from sklearn.base import (
    BaseEstimator,
    ClassNamePrefixFeaturesOutMixin,
    ClusterMixin,
    TransformerMixin,
    _fit_context,
)
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import (
    check_is_fitted,
    validate_data,
)

from . import _dask, _rows
from ._fit import best_run, check_params_vs_input, fit_input
from ._partial_fit import partial_fit


class KSubspaces(
    ClassNamePrefixFeaturesOutMixin, ClusterMixin, TransformerMixin, BaseEstimator
):
    """Projective clustering: k subspaces of dimension j fitted to the rows of X.

    Each row is assigned to its nearest subspace and each subspace is the best
    j-dimensional fit (top-j principal directions) of its rows; Lloyd's algorithm
    alternates the two steps from a k-subspaces++ seeding, which lowers the cost
    ``sum_i w_i min_c dist(x_i, S_c)^2`` at every step. With ``k=1`` the subspace
    is the top-j (uncentred) PCA subspace, i.e. truncated SVD.

    The first fit in a process compiles kflats' Numba kernels (a few seconds;
    compiled code is cached on disk for later processes).

    Parameters
    ----------
    k : int, default=8
        Number of subspaces (clusters).
    j : int, default=1
        Dimension of every subspace; must be smaller than n_features.
    affine : bool, default=False
        Fit affine flats ``mu_c + span(B_c)`` instead of linear subspaces through
        the origin. Factorizing a matrix needs linear subspaces (the default).
    init : {"k-subspaces++", "random"} or array-like of shape (k, j, n_features), \
            default="k-subspaces++"
        How to start.

        - "k-subspaces++": D^2 seeding with greedy local trials, each seed grown
          into a subspace fitted to its neighbourhood (see
          :func:`ksubspaces_plusplus`).
        - "random": subspaces fitted to a uniformly random partition of the rows.
        - an array of initial bases with orthonormal rows. With ``affine=True``
          the flats then start through the weighted mean of X.
    n_init : "auto" or int, default="auto"
        Number of runs from different starts; the run with the lowest cost is
        kept. "auto" is 1 for "k-subspaces++" and an explicit array, 10 for
        "random".
    max_iter : int, default=300
        Maximum number of Lloyd iterations of one run.
    tol : float, default=1e-4
        Relative tolerance: a run stops once an iteration lowers the cost by at
        most ``tol`` times the cost of the empty model (the weighted sum of the
        squared norms of the rows, centred when ``affine``), or once the labels
        stop changing.
    random_state : int, RandomState instance or None, default=None
        Seed of the starts; an int makes fits reproducible.
    verbose : int, default=0
        Print the cost of every iteration when positive.
    backend : {"numpy", "torch"}, default="numpy"
        Where ``fit`` runs the assignment and the update. "torch" runs them on
        torch tensors on ``device`` (a GPU where there is one; needs
        ``pip install kflats[torch]``); the seeding's neighbourhoods and the
        driver stay in numpy. On CPU both backends give the same fit up to
        rounding. ``predict``, ``transform``, ``partial_fit`` and dask input
        use numpy.
    device : str or torch.device, default=None
        The torch device of ``backend="torch"``, e.g. "cuda" or "cuda:1";
        None is "cpu". Must be None with ``backend="numpy"``.

    Attributes
    ----------
    bases_ : ndarray of shape (k, j, n_features)
        Orthonormal rows spanning each subspace, in the dtype of X.
    means_ : ndarray of shape (k, n_features)
        Offset of each flat; zeros when ``affine=False``.
    labels_ : ndarray of shape (n_samples,)
        Index of the subspace each training row is assigned to.
    inertia_ : float
        Weighted sum of squared distances of the rows to their subspaces.
    n_iter_ : int
        Lloyd iterations of the kept run.
    n_features_in_ : int
        Number of features seen during fit.
    feature_names_in_ : ndarray of shape (`n_features_in_`,)
        Names of features seen during fit, when X has string column names.

    See Also
    --------
    ksubspaces_plusplus : The seeding, as a function.
    sklearn.cluster.KMeans : The j = 0 affine case (one point per cluster).
    sklearn.decomposition.TruncatedSVD : The k = 1 linear case.

    Notes
    -----
    When ``j > n_features / 2``, distances are computed through the orthogonal
    complement of each subspace: fewer flops, and no cancellation in float32.
    float32 input is fitted in float32, float64 in float64.

    Every step works in blocks of rows, so a fit needs little memory beyond X
    itself. Rows that arrive in batches are fitted with :meth:`partial_fit`.
    ``fit``, ``predict`` and ``transform`` also take a :class:`dask.array.Array`
    chunked along the rows (``pip install kflats[dask]``): each Lloyd step is
    then one map over the chunks and one reduction of the clusters' statistics
    (the same Lloyd loop as in memory), the seeding oversamples rows in the
    manner of k-means||, ``labels_`` is a dask array whose chunks stay on the
    workers, and ``predict``, ``transform``, ``coordinates`` and ``project``
    are lazy dask arrays; ``score`` is one pass over the chunks, and
    ``partial_fit`` takes the chunks as a stream of batches (see :doc:`/scale`).

    Examples
    --------
    >>> import numpy as np
    >>> from kflats import KSubspaces
    >>> rng = np.random.RandomState(0)
    >>> lines = np.array([[1.0, 0.0, 0.0], [0.0, 0.6, 0.8]])
    >>> X = np.vstack([np.outer(rng.randn(20), lines[0]),
    ...                np.outer(rng.randn(20), lines[1])])
    >>> ks = KSubspaces(k=2, j=1, random_state=0).fit(X)
    >>> ks.bases_.shape
    (2, 1, 3)
    >>> round(ks.inertia_, 10)
    0.0
    >>> ks.predict([[2.0, 0.0, 0.0], [0.0, 3.0, 4.0]]).tolist() == [
    ...     ks.labels_[0], ks.labels_[-1]]
    True
    """

    _parameter_constraints: dict = {
        "k": [Interval(Integral, 1, None, closed="left")],
        "j": [Interval(Integral, 1, None, closed="left")],
        "affine": ["boolean"],
        "init": [StrOptions({"k-subspaces++", "random"}), "array-like"],
        "n_init": [StrOptions({"auto"}), Interval(Integral, 1, None, closed="left")],
        "max_iter": [Interval(Integral, 1, None, closed="left")],
        "tol": [Interval(Real, 0, None, closed="left")],
        "random_state": ["random_state"],
        "verbose": ["verbose"],
        "backend": [StrOptions({"numpy", "torch"})],
        "device": "no_validation",  # checked by torch when backend="torch"
    }

    def __init__(
        self,
        k=8,
        j=1,
        *,
        affine=False,
        init="k-subspaces++",
        n_init="auto",
        max_iter=300,
        tol=1e-4,
        random_state=None,
        verbose=0,
        backend="numpy",
        device=None,
    ):
        self.k = k
        self.j = j
        self.affine = affine
        self.init = init
        self.n_init = n_init
        self.max_iter = max_iter
        self.tol = tol
        self.random_state = random_state
        self.verbose = verbose
        self.backend = backend
        self.device = device

    def _init_subspaces(self, X, xsq, sample_weight, rng, grow, ops):
        return ops.initial(
            self.init, X, xsq, sample_weight, self.k, self.j, self.affine, rng, grow
        )

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y=None, sample_weight=None):
        """Fit k subspaces to the rows of X.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Training rows. float32 is fitted in float32, anything else in
            float64.
        y : Ignored
            Not used, present for API consistency.
        sample_weight : array-like of shape (n_samples,), default=None
            Non-negative weight of each row, in both the assignment cost and the
            subspace update. ``None`` weighs every row 1.

        Returns
        -------
        self : object
            Fitted estimator.
        """
        # A failed fit leaves the estimator as it was (validate_data would
        # already have reset n_features_in_ when a later check fails).
        state = dict(self.__dict__)
        try:
            return self._fit(X, sample_weight)
        except BaseException:
            self.__dict__.clear()
            self.__dict__.update(state)
            raise

    def _fit(self, X, sample_weight):
        X, xsq, sample_weight, ops = fit_input(self, X, sample_weight)
        self._n_init = check_params_vs_input(self, X, sample_weight, ops)
        labels, inertia, bases, means, comps, n_iter = best_run(
            self, X, xsq, sample_weight, ops, self._n_init
        )
        # np.bincount: numpy's, or dask's (one pass over the persisted labels)
        distinct = int(np.count_nonzero(np.bincount(labels, minlength=self.k)))
        if distinct < self.k:
            warnings.warn(
                f"Number of distinct clusters ({distinct}) found smaller than "
                f"k ({self.k}). Possibly the rows lie on fewer subspaces.",
                ConvergenceWarning,
                stacklevel=2,
            )
        self.bases_ = bases
        self.means_ = means
        self._complements = comps
        self.labels_ = labels
        self.inertia_ = inertia
        self.n_iter_ = n_iter
        self._n_features_out = self.k
        self._stats = None  # a later partial_fit starts from these subspaces
        return self

    @_fit_context(prefer_skip_nested_validation=True)
    def partial_fit(self, X, y=None, sample_weight=None):
        """Update the subspaces with one batch of rows.

        The first call seeds the subspaces from its batch (with ``init``, as
        ``fit`` does; it needs at least ``k`` rows of positive weight). Every
        call then assigns the batch's rows to their nearest subspaces, adds them
        to the clusters' statistics (``sum w``, ``sum w x``, ``sum w x x^T``)
        and refits every subspace to its statistics: one Lloyd step whose
        statistics **accumulate** over all batches, without decay, so that
        after one pass over the data each subspace fits all the rows it was
        given. A cluster with fewer than ``j`` rows so far (``j + 1`` for affine
        flats) is re-seeded from the
        batch's row farthest from the subspaces (its statistics start afresh).
        After ``fit``, ``partial_fit`` goes on from the fitted subspaces with
        fresh statistics.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            One batch of rows; every batch has the first batch's width. It is
            fitted in the dtype of the first batch. A :class:`dask.array.Array`
            chunked along the rows is a stream of batches: its chunks are
            computed and fitted one at a time, in order, as if each were passed
            to ``partial_fit`` (``labels_`` and ``inertia_`` then describe the
            last chunk).
        y : Ignored
            Not used, present for API consistency.
        sample_weight : array-like of shape (n_samples,), default=None
            Non-negative weight of each row of the batch.

        Returns
        -------
        self : object
            The estimator, with the attributes of ``fit``: ``labels_`` and
            ``inertia_`` are those of this batch under the updated subspaces,
            and ``n_iter_`` counts the batches since seeding (or since ``fit``).

        Examples
        --------
        >>> import numpy as np
        >>> from kflats import KSubspaces
        >>> rng = np.random.RandomState(0)
        >>> lines = np.array([[1.0, 0.0, 0.0], [0.0, 0.6, 0.8]])
        >>> ks = KSubspaces(k=2, j=1, random_state=0)
        >>> for _ in range(3):
        ...     t = rng.randn(40, 1)
        ...     ks = ks.partial_fit(np.vstack([t[:20] * lines[0], t[20:] * lines[1]]))
        >>> ks.n_iter_, round(ks.inertia_, 10)
        (3, 0.0)
        """
        state = dict(self.__dict__)
        try:
            partial_fit(self, X, sample_weight)
            return self
        except BaseException:
            self.__dict__.clear()
            self.__dict__.update(state)
            raise

    def _check_test_data(self, X):
        """X checked against the fit, and where functions of its rows run.

        A dask array stays lazy: its row functions run chunk by chunk (and its
        chunks are checked finite) when computed.
        """
        check_is_fitted(self)
        if _dask.is_dask_array(X):
            return _dask.check_array(X, self.n_features_in_), _dask.Lazy()
        X = validate_data(
            self, X, dtype=[np.float64, np.float32], order="C", reset=False
        )
        return X, _rows.InMemory()

    def predict(self, X):
        """Index of the nearest subspace of each row.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Rows to assign.

        Returns
        -------
        labels : ndarray of shape (n_samples,)
            Index of the nearest subspace (the lowest index on ties).
        """
        X, rows = self._check_test_data(X)
        return rows.map(partial(_rows.labels, self), X, None, np.int32)

    def fit_predict(self, X, y=None, sample_weight=None):
        """Fit, then return the index of the nearest subspace of each row.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Training rows.
        y : Ignored
            Not used, present for API consistency.
        sample_weight : array-like of shape (n_samples,), default=None
            Non-negative weight of each row.

        Returns
        -------
        labels : ndarray of shape (n_samples,)
            Equal to ``labels_``.
        """
        return self.fit(X, sample_weight=sample_weight).labels_

    def transform(self, X):
        """Distances of every row to every subspace (cluster-distance space).

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Rows to transform.

        Returns
        -------
        distances : ndarray of shape (n_samples, k)
            Euclidean (not squared) distance of each row to each subspace, in
            the dtype of X.
        """
        X, rows = self._check_test_data(X)
        return rows.map(partial(_rows.distances, self), X, self.k, X.dtype)

    def fit_transform(self, X, y=None, sample_weight=None):
        """Fit, then return the distances of every row to every subspace.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Training rows.
        y : Ignored
            Not used, present for API consistency.
        sample_weight : array-like of shape (n_samples,), default=None
            Non-negative weight of each row.

        Returns
        -------
        distances : ndarray of shape (n_samples, k)
            As :meth:`transform`.
        """
        return self.fit(X, sample_weight=sample_weight).transform(X)

    def score(self, X, y=None, sample_weight=None):
        """Opposite of the weighted cost of X under the fitted subspaces.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Rows to score. A :class:`dask.array.Array` chunked along the rows
            is scored in one pass over its chunks (one task each, then a sum).
        y : Ignored
            Not used, present for API consistency.
        sample_weight : array-like of shape (n_samples,), default=None
            Non-negative weight of each row (numpy, or dask with dask X).

        Returns
        -------
        score : float
            ``-sum_i w_i min_c dist(x_i, S_c)^2``; higher is better.
        """
        X, rows = self._check_test_data(X)
        sample_weight = rows.weights(sample_weight, X)
        residuals = rows.map(partial(_rows.residuals, self), X, None, np.float64)
        return -float(sample_weight @ residuals)

    def coordinates(self, X):
        """Nearest subspace of each row and the row's j coordinates in it.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Rows to decompose. For a :class:`dask.array.Array` chunked along the
            rows, both outputs are lazy dask arrays with X's row chunks.

        Returns
        -------
        labels : ndarray of shape (n_samples,)
            Index of the nearest subspace.
        coords : ndarray of shape (n_samples, j)
            ``B_c (x - mu_c)`` for the nearest subspace c, so that the
            projection of x is ``mu_c + coords @ B_c``.
        """
        X, rows = self._check_test_data(X)
        labels = rows.map(partial(_rows.labels, self), X, None, np.int32)
        coords = rows.map(partial(_rows.coordinates, self), X, self.j, X.dtype, labels)
        return labels, coords

    def project(self, X):
        """Orthogonal projection of each row onto its nearest subspace.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Rows to project. For a :class:`dask.array.Array` chunked along the
            rows, the projection is a lazy dask array with X's chunks.

        Returns
        -------
        X_proj : ndarray of shape (n_samples, n_features)
            ``mu_c + B_c^T B_c (x - mu_c)`` for the nearest subspace c of each
            row, in the dtype of X.
        """
        X, rows = self._check_test_data(X)
        labels = rows.map(partial(_rows.labels, self), X, None, np.int32)
        width = X.shape[1]
        return rows.map(partial(_rows.projection, self), X, width, X.dtype, labels)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.transformer_tags.preserves_dtype = ["float64", "float32"]
        return tags
