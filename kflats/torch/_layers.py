"""ProjectiveEmbedding and ProjectiveLinear: layers stored as per-cluster factors.

:class:`ProjectiveTiedHead` is the output head that shares a
:class:`ProjectiveEmbedding`'s factors (a language model whose head is tied to
its word embedding).
"""

import math
import sys

import numpy as np
import torch
from torch import nn

from .._size import factors_size
from ..factorize import ProjectiveFactors, factorize, factorize_linear
from . import functional as F
from ._packed import (
    PackedCache,
    cacheable,
    pack_embedding,
    pack_linear,
    packed_embedding,
    packed_embedding_fits,
    packed_linear,
)

__all__ = ["ProjectiveEmbedding", "ProjectiveLinear", "ProjectiveTiedHead"]


def _conv1d_type():
    """transformers' ``Conv1D`` (GPT-2), if transformers is imported, else None.

    Looked up, never imported: a model holding one has imported it.
    """
    utils = sys.modules.get("transformers.pytorch_utils")
    return getattr(utils, "Conv1D", None)


def _is_conv1d(module):
    conv1d = _conv1d_type()
    return conv1d is not None and isinstance(module, conv1d)


def _is_linear(module):
    """A dense layer computing ``x W^T + b``: a Linear, or a Conv1D (``x W + b``)."""
    return type(module) is nn.Linear or _is_conv1d(module)


def _dense_weight(module):
    """The (out_features, in_features) weight of a Linear or Conv1D, as a view.

    A Conv1D stores ``W^T``: its transposed view is returned, so that writing
    into the result writes into the module.
    """
    return module.weight.T if _is_conv1d(module) else module.weight


def _features(module):
    """``(in_features, out_features)`` of a Linear or Conv1D."""
    if _is_conv1d(module):
        return module.nx, module.nf
    return module.in_features, module.out_features


class WeightSpec:
    """What a projective layer's ``weight`` tells: shape, dtype and device.

    Code written for dense layers reads ``layer.weight.dtype`` or
    ``.device`` (T5's feed-forward casts its input to ``wo.weight.dtype``);
    a projective layer has no dense weight, and answers with this small
    read-only record instead of making the matrix. It is not a tensor.

    Attributes
    ----------
    shape : torch.Size
        The dense weight's shape.
    dtype : torch.dtype
    device : torch.device
    requires_grad : bool

    Examples
    --------
    >>> from kflats.torch import ProjectiveLinear
    >>> layer = ProjectiveLinear(8, 4, ranks=(2, 2))
    >>> layer.weight
    WeightSpec(shape=(4, 8), dtype=torch.float32, device=cpu)
    """

    __slots__ = ("_layer", "_shape")

    def __init__(self, layer, shape):
        self._layer = layer
        self._shape = torch.Size(shape)

    @property
    def shape(self):
        return self._shape

    @property
    def dtype(self):
        return self._layer.bases.dtype

    @property
    def device(self):
        return self._layer.bases.device

    @property
    def requires_grad(self):
        return self._layer.bases.requires_grad

    @property
    def ndim(self):
        return len(self._shape)

    def size(self, dim=None):
        return self._shape if dim is None else self._shape[dim]

    def dim(self):
        return len(self._shape)

    def __repr__(self):
        return (
            f"WeightSpec(shape={tuple(self._shape)}, dtype={self.dtype}, "
            f"device={self.device})"
        )


def _check_ranks_labels(n, d, ranks, labels, name_n):
    try:
        ranks = tuple(int(r) for r in ranks)
    except TypeError:
        raise TypeError(f"ranks must be a sequence of int, got {ranks!r}") from None
    if not ranks:
        raise ValueError("ranks must hold one rank per cluster, got an empty sequence")
    k = len(ranks)
    if any(r < 0 or r > d for r in ranks):
        raise ValueError(f"ranks must lie in 0..{d}, got {ranks}")
    if labels is None:
        labels = torch.div(torch.arange(n) * k, max(n, 1), rounding_mode="floor")
    else:
        if torch.is_tensor(labels):
            labels = labels.detach().cpu()
        else:
            labels = torch.as_tensor(np.asarray(labels))
        if labels.shape != (n,) or labels.dtype.is_floating_point:
            raise ValueError(
                f"labels must be an integer tensor of shape ({n},) (one cluster "
                f"id per {name_n}), got shape {tuple(labels.shape)}, "
                f"dtype {labels.dtype}"
            )
        labels = labels.to(torch.int64)
        if n and (int(labels.min()) < 0 or int(labels.max()) >= k):
            raise ValueError(
                f"labels must lie in 0..{k - 1} (k = len(ranks)), got values in "
                f"{int(labels.min())}..{int(labels.max())}"
            )
    sizes = tuple(torch.bincount(labels, minlength=k).tolist())
    return ranks, labels, sizes


def _order(labels):
    """Rows ordered by cluster (ascending within a cluster), and each row's place."""
    order = torch.argsort(labels.to(torch.int64), stable=True)
    place = torch.empty_like(order)
    place[order] = torch.arange(order.numel(), device=order.device)
    return order, place


def _label_dtype(k):
    """The smallest integer dtype that holds the cluster ids 0 .. k-1."""
    for dtype in (torch.uint8, torch.int16, torch.int32):
        if k - 1 <= torch.iinfo(dtype).max:
            return dtype
    return torch.int64  # pragma: no cover - more than 2**31 clusters


def _weight_as_numpy(weight):
    w = weight.detach().to("cpu")
    if w.dtype not in (torch.float32, torch.float64):
        w = w.to(torch.float32)
    return w.numpy()


def _as_tensor(a, device, dtype):
    return torch.as_tensor(np.ascontiguousarray(a)).to(device=device, dtype=dtype)


class _Projective(nn.Module):
    """Storage shared by the two layers: labels, coefficients, stacked bases."""

    # inference (no gradient for the factors) runs the packed form
    # (kflats.torch._packed), built once and kept until a factor changes
    _packed_inference = True

    def _init_factors(self, n, d, ranks, labels, affine, device, dtype, name_n):
        factory = {"device": device, "dtype": dtype}
        ranks, labels, sizes = _check_ranks_labels(n, d, ranks, labels, name_n)
        self.ranks = ranks
        self.sizes = sizes
        self.affine = bool(affine)
        self.factorization_error = None
        self.weight_error = None
        self.register_buffer("labels", labels.to(device, _label_dtype(len(ranks))))
        self.coefficients = nn.ParameterList(
            nn.Parameter(torch.empty(s, r, **factory))
            for s, r in zip(sizes, ranks, strict=True)
        )
        self.bases = nn.Parameter(torch.empty(sum(ranks), d, **factory))
        if self.affine:
            self.means = nn.Parameter(torch.empty(len(ranks), d, **factory))
        else:
            self.register_parameter("means", None)
        order, place = _order(self.labels)
        self.register_buffer("_order", order, persistent=False)
        self.register_buffer("_place", place, persistent=False)
        self._packed_cache = PackedCache()
        self.register_load_state_dict_post_hook(_refresh_after_load)

    def _packed(self, build):
        """The packed form (``build(coefficients, bases, means)``), or None.

        None when the forward must record gradients for the factors (it then
        runs the grouped form), or when a factor is recomputed at each
        access (a parametrization).
        """
        coefficients = list(self.coefficients)
        tensors = (self.bases, self.means, *coefficients)
        if not self._packed_inference or not cacheable(tensors):
            return None
        if torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in tensors
        ):
            return None
        return self._packed_cache.get(
            tensors, lambda: build(coefficients, self.bases, self.means)
        )

    def _apply(self, fn, *args, **kwargs):
        self._packed_cache.clear()
        return super()._apply(fn, *args, **kwargs)

    @property
    def k(self):
        """Number of clusters."""
        return len(self.ranks)

    @property
    def n_params(self):
        """Numbers the factors store: coefficients, bases, means, cluster ids.

        Counted like :attr:`kflats.factorize.ProjectiveFactors.n_params` (the
        cluster ids count when k > 1); a Linear layer's bias is not included.
        """
        d = self.bases.shape[1]
        return factors_size(self.sizes, self.ranks, d, self.affine).numbers

    def _bases_of(self, c):
        start = sum(self.ranks[:c])
        return self.bases[start : start + self.ranks[c]]

    def _reset_factors(self, n, d):
        with torch.no_grad():
            for c, U in enumerate(self.coefficients):
                if U.numel():
                    nn.init.normal_(U, std=math.sqrt(d / self.ranks[c]))
                if self.ranks[c]:
                    nn.init.orthogonal_(self._bases_of(c))
            if self.means is not None:
                self.means.zero_()

    def _copy_factors(self, factors):
        device, dtype = self.bases.device, self.bases.dtype
        with torch.no_grad():
            for c in range(factors.k):
                self.coefficients[c].copy_(_as_tensor(factors.U[c], device, dtype))
                self._bases_of(c).copy_(_as_tensor(factors.V[c], device, dtype))
            if self.means is not None:
                self.means.copy_(_as_tensor(factors.means, device, dtype))

    def _reconstruct(self):
        """Dense (n x d) matrix of the factors, rows in original order."""
        blocks = []
        for c, U in enumerate(self.coefficients):
            block = U @ self._bases_of(c)
            if self.means is not None:
                block = block + self.means[c]
            blocks.append(block)
        stacked = torch.cat(blocks)
        return stacked.index_select(0, self._place)

    def to_factors(self):
        """The layer's current factors, as numpy arrays.

        Returns
        -------
        factors : kflats.factorize.ProjectiveFactors
            For an input-side :class:`ProjectiveLinear`, the factors of
            ``weight.T`` (``transposed=True``); for an output-side one, those
            of ``weight``.

        Examples
        --------
        >>> import torch
        >>> from kflats.torch import ProjectiveEmbedding
        >>> layer = ProjectiveEmbedding(10, 4, ranks=(2, 1))
        >>> layer.to_factors().ranks
        (2, 1)
        """

        def to_np(t):
            t = t.detach().cpu()
            if t.dtype not in (torch.float32, torch.float64):
                t = t.to(torch.float32)
            return t.numpy()

        labels = self.labels.cpu().numpy()
        return ProjectiveFactors(
            labels,
            tuple(to_np(U) for U in self.coefficients),
            tuple(to_np(self._bases_of(c)) for c in range(self.k)),
            means=None if self.means is None else to_np(self.means),
            transposed=getattr(self, "side", None) == "input",
        )

    def __repr__(self):
        # the coefficient list is storage, not a sub-layer: keep the repr short
        return f"{self._get_name()}({self.extra_repr()})"

    def _factor_repr(self):
        n, d = len(self.labels), self.bases.shape[1]
        ranks = self.ranks
        shown = ranks if len(ranks) <= 8 else (*ranks[:8], "...")
        text = f"k={self.k}, ranks={tuple(shown)}".replace("'...'", "...")
        text += f", compression={self.n_params / max(n * d, 1):.3f}"
        if self.affine:
            text += ", affine=True"
        return text


def _refresh_after_load(module, incompatible_keys):
    """Recompute the derived index buffers after ``load_state_dict``."""
    labels = module.labels
    sizes = tuple(
        torch.bincount(labels.cpu().to(torch.int64), minlength=module.k).tolist()
    )
    if len(sizes) != module.k or sizes != module.sizes:
        raise RuntimeError(
            f"loaded labels give cluster sizes {sizes}, but the layer was built "
            f"for {module.sizes}; build the layer with the same labels"
        )
    order, place = _order(labels)
    module._order.copy_(order)
    module._place.copy_(place)
    module._packed_cache.clear()


class ProjectiveEmbedding(_Projective):
    """An embedding table stored as one low-rank factor pair per cluster of tokens.

    Token ``t`` of cluster ``c`` has the embedding ``U_c[p] @ V_c`` (plus
    ``mu_c`` for affine flats), where ``p`` is the place of ``t`` among the
    tokens of its cluster and ``V_c`` has ``ranks[c]`` rows. The factors are
    trainable parameters; the cluster ids are a buffer.

    Parameters
    ----------
    num_embeddings : int
        Size of the vocabulary.
    embedding_dim : int
        Size of each embedding vector.
    ranks : sequence of int
        Rank of each cluster (``0 <= ranks[c] <= embedding_dim``); its length
        is the number of clusters k.
    labels : array-like of shape (num_embeddings,), default=None
        Cluster id of each token. ``None`` splits the vocabulary into k
        contiguous blocks.
    affine : bool, default=False
        Whether each cluster also has a mean (affine flats).
    padding_idx : int, default=None
        As in :class:`torch.nn.Embedding`: outputs at this token pass no
        gradient back to the factors. Note that the padding row is stored in
        factored form like any other, so it changes if the bases of its
        cluster are trained.
    device, dtype : optional
        Where and in which floating dtype the parameters live.

    Attributes
    ----------
    coefficients : torch.nn.ParameterList
        ``coefficients[c]``, of shape (n_c, ranks[c]): one row per token of
        cluster c, tokens in ascending id order.
    bases : torch.nn.Parameter of shape (sum(ranks), embedding_dim)
        The bases of the clusters, stacked in cluster order.
    means : torch.nn.Parameter of shape (k, embedding_dim) or None
    labels : torch.Tensor of shape (num_embeddings,)
        Cluster id of each token: a buffer, part of the state dict, in the
        smallest integer dtype that holds k (uint8 up to 256 clusters).
    k, n_params : int
    compression : float
        ``n_params / (num_embeddings * embedding_dim)``.

    See Also
    --------
    ProjectiveLinear : The same for a Linear layer.
    kflats.torch.compress : Replace the layers of a model in place.
    kflats.factorize.factorize : How the factors are found.

    Notes
    -----
    The forward maps the ids to the cluster-ordered table, removes repeated
    ids with one sort, runs one GEMM per cluster on the distinct tokens and
    gathers the result back: no Python loop over tokens, and the flops of a
    single SVD factor pair of the same size.

    Examples
    --------
    >>> import torch
    >>> from kflats.torch import ProjectiveEmbedding
    >>> _ = torch.manual_seed(0)
    >>> emb = torch.nn.Embedding(100, 16, padding_idx=0)
    >>> layer = ProjectiveEmbedding.from_embedding(emb, k=2, j=8, random_state=0)
    >>> layer  # doctest: +NORMALIZE_WHITESPACE
    ProjectiveEmbedding(100, 16, k=2, ranks=(8, 8), compression=0.723,
                        padding_idx=0)
    >>> layer(torch.tensor([[1, 2, 3]])).shape
    torch.Size([1, 3, 16])
    >>> layer.to_dense()
    Embedding(100, 16, padding_idx=0)
    """

    def __init__(
        self,
        num_embeddings,
        embedding_dim,
        ranks,
        labels=None,
        *,
        affine=False,
        padding_idx=None,
        device=None,
        dtype=None,
    ):
        super().__init__()
        if num_embeddings < 1 or embedding_dim < 1:
            raise ValueError(
                "num_embeddings and embedding_dim must be positive, got "
                f"{num_embeddings} and {embedding_dim}"
            )
        if padding_idx is not None:
            if not -num_embeddings <= padding_idx < num_embeddings:
                raise ValueError(
                    f"padding_idx must be within [-{num_embeddings}, "
                    f"{num_embeddings}), got {padding_idx}"
                )
            padding_idx = padding_idx % num_embeddings
        self.num_embeddings = int(num_embeddings)
        self.embedding_dim = int(embedding_dim)
        self.padding_idx = padding_idx
        self._init_factors(
            self.num_embeddings,
            self.embedding_dim,
            ranks,
            labels,
            affine,
            device,
            dtype,
            "token",
        )
        self.reset_parameters()

    def reset_parameters(self):
        """Random factors: orthonormal bases, coefficients of unit-variance rows."""
        self._reset_factors(self.num_embeddings, self.embedding_dim)

    @property
    def compression(self):
        """``n_params / (num_embeddings * embedding_dim)``."""
        return self.n_params / (self.num_embeddings * self.embedding_dim)

    @property
    def weight(self):
        """Shape, dtype and device of the table, for code written for Embedding.

        A :class:`WeightSpec`, not a tensor: the dense table is never made.
        """
        return WeightSpec(self, (self.num_embeddings, self.embedding_dim))

    @classmethod
    def from_factors(cls, factors, *, padding_idx=None, device=None, dtype=None):
        """Build the layer from the factors of an embedding table.

        Parameters
        ----------
        factors : kflats.factorize.ProjectiveFactors
            Factors of a (num_embeddings x embedding_dim) table, not
            transposed.
        padding_idx : int, default=None
        device, dtype : optional
            Default: CPU, and the dtype of the factors.

        Returns
        -------
        layer : ProjectiveEmbedding
            Its forward reproduces ``factors.reconstruct()`` row for row.

        Examples
        --------
        >>> import numpy as np, torch
        >>> from kflats.factorize import svd_factors
        >>> from kflats.torch import ProjectiveEmbedding
        >>> A = np.random.default_rng(0).normal(size=(20, 6)).astype(np.float32)
        >>> f = svd_factors(A, rank=3)
        >>> layer = ProjectiveEmbedding.from_factors(f)
        >>> ids = torch.arange(20)
        >>> np.allclose(layer(ids).detach().numpy(), f.reconstruct(), atol=1e-5)
        True
        """
        if not isinstance(factors, ProjectiveFactors):
            raise TypeError(
                f"factors must be a ProjectiveFactors, got {type(factors).__name__}"
            )
        if factors.transposed:
            raise ValueError(
                "factors are transposed (the factors of a Linear weight); an "
                "embedding needs the factors of the table itself"
            )
        if dtype is None:
            dtype = torch.float64 if factors.dtype == np.float64 else torch.float32
        n, d = factors.shape
        layer = cls(
            n,
            d,
            factors.ranks,
            torch.from_numpy(factors.labels),
            affine=factors.means is not None,
            padding_idx=padding_idx,
            device=device,
            dtype=dtype,
        )
        layer._copy_factors(factors)
        return layer

    @classmethod
    def from_embedding(
        cls, embedding, k=None, j=None, *, budget=None, **factorize_params
    ):
        """Compress an :class:`torch.nn.Embedding` by projective clustering.

        Parameters
        ----------
        embedding : torch.nn.Embedding
            The table to compress. Its device, dtype and ``padding_idx`` are
            kept.
        k, j, budget :
            As in :func:`kflats.factorize.factorize`: give ``k`` and ``j``, or a
            ``budget`` (fraction of the table's numbers to keep).
        **factorize_params
            Further parameters of :func:`kflats.factorize.factorize`
            (``ranks``, ``affine``, ``sample_weight``, ``random_state``, ...).

        Returns
        -------
        layer : ProjectiveEmbedding
            The attribute ``factorization_error`` holds the relative squared
            Frobenius error of the fit.

        Examples
        --------
        >>> import torch
        >>> from kflats.torch import ProjectiveEmbedding
        >>> emb = torch.nn.Embedding(200, 32)
        >>> layer = ProjectiveEmbedding.from_embedding(emb, budget=0.5, k=2,
        ...                                            random_state=0)
        >>> layer.compression <= 0.5
        True
        """
        if not isinstance(embedding, nn.Embedding):
            raise TypeError(
                "embedding must be a torch.nn.Embedding, got "
                f"{type(embedding).__name__}"
            )
        if embedding.max_norm is not None:
            raise ValueError(
                "embedding.max_norm is set; ProjectiveEmbedding does not renormalise "
                "rows, so it cannot reproduce such a layer"
            )
        weight = embedding.weight
        factors = factorize(
            _weight_as_numpy(weight), k, j, budget=budget, **factorize_params
        )
        layer = cls.from_factors(
            factors,
            padding_idx=embedding.padding_idx,
            device=weight.device,
            dtype=weight.dtype,
        )
        layer.factorization_error = factors.error
        layer.weight_error = factors.weight_error
        return layer

    def forward(self, input):
        width = max(self.ranks) + self.affine
        if packed_embedding_fits(input.numel(), self.k, width):
            packed = self._packed(
                lambda U, V, mu: pack_embedding(
                    self.labels, self._place, self.sizes, U, V, mu
                )
            )
            if packed is not None:
                return packed_embedding(input, *packed)
        return F.projective_embedding(
            input,
            self._place,
            self.sizes,
            list(self.coefficients),
            self.bases,
            self.means,
            self.padding_idx if self.training else None,
        )

    def to_dense(self):
        """A plain :class:`torch.nn.Embedding` holding the reconstructed table.

        Returns
        -------
        embedding : torch.nn.Embedding
            Same device, dtype and ``padding_idx``.

        Examples
        --------
        >>> import torch
        >>> from kflats.torch import ProjectiveEmbedding
        >>> layer = ProjectiveEmbedding(10, 4, ranks=(2, 2))
        >>> dense = layer.to_dense()
        >>> ids = torch.tensor([3, 7])
        >>> torch.allclose(dense(ids), layer(ids), atol=1e-6)
        True
        """
        with torch.no_grad():
            weight = self._reconstruct()
        emb = nn.Embedding(
            self.num_embeddings,
            self.embedding_dim,
            padding_idx=self.padding_idx,
            device=weight.device,
            dtype=weight.dtype,
        )
        with torch.no_grad():
            emb.weight.copy_(weight)
        return emb

    def extra_repr(self):
        text = f"{self.num_embeddings}, {self.embedding_dim}, {self._factor_repr()}"
        if self.padding_idx is not None:
            text += f", padding_idx={self.padding_idx}"
        return text


class ProjectiveLinear(_Projective):
    """A Linear layer stored as factor pairs of clusters of its inputs or outputs.

    ``side="input"``: with the input features split into clusters ``R_c``,
    the layer computes ``y = sum_c (x[R_c] @ U_c) @ V_c + b``: k small layers
    in parallel on disjoint slices of the input, recombined by one
    fully-connected layer (``sum(ranks)`` to ``out_features``). FLOPs per row:
    ``sum_c n_c j_c + sum(ranks) * out_features`` instead of
    ``in_features * out_features``.

    ``side="output"``: with the output neurons split into clusters ``R_c``,
    ``y[R_c] = U_c (V_c x) + b[R_c]``: k two-layer products in parallel, each
    producing its own neurons. FLOPs per row: ``sum(ranks) * in_features +
    sum_c n_c j_c``.

    Parameters
    ----------
    in_features, out_features : int
    ranks : sequence of int
        Rank of each cluster (at most ``out_features`` on the input side,
        ``in_features`` on the output side).
    labels : array-like, default=None
        Cluster id of each input feature (shape (in_features,)) or output
        neuron (shape (out_features,)). ``None``: k contiguous blocks.
    side : {"input", "output"}, default="input"
        Which side of the weight is clustered.
    bias : bool, default=True
    affine : bool, default=False
        Whether each cluster also has a mean (affine flats).
    device, dtype : optional

    Attributes
    ----------
    coefficients : torch.nn.ParameterList
        ``coefficients[c]`` of shape (n_c, ranks[c]), the features (input
        side) or neurons (output side) of cluster c in ascending order.
    bases : torch.nn.Parameter of shape (sum(ranks), m)
        The stacked bases, m = out_features on the input side (bases over
        the outputs), m = in_features on the output side.
    means : torch.nn.Parameter of shape (k, bases.shape[1]) or None
    bias : torch.nn.Parameter of shape (out_features,) or None
    labels : torch.Tensor of shape (in_features,) or (out_features,)
    side : str
    k, n_params : int
    compression : float
        ``n_params / (in_features * out_features)`` (the bias not counted).

    See Also
    --------
    ProjectiveEmbedding
    kflats.factorize.factorize_linear : How the factors are found.

    Examples
    --------
    >>> import torch
    >>> from kflats.torch import ProjectiveLinear
    >>> _ = torch.manual_seed(0)
    >>> linear = torch.nn.Linear(64, 32)
    >>> layer = ProjectiveLinear.from_linear(linear, k=2, j=8, random_state=0)
    >>> layer  # doctest: +NORMALIZE_WHITESPACE
    ProjectiveLinear(in_features=64, out_features=32, k=2, ranks=(8, 8),
                     compression=0.531, bias=True)
    >>> layer(torch.randn(5, 64)).shape
    torch.Size([5, 32])
    >>> layer.to_dense()
    Linear(in_features=64, out_features=32, bias=True)
    """

    def __init__(
        self,
        in_features,
        out_features,
        ranks,
        labels=None,
        *,
        side="input",
        bias=True,
        affine=False,
        device=None,
        dtype=None,
    ):
        super().__init__()
        if in_features < 1 or out_features < 1:
            raise ValueError(
                "in_features and out_features must be positive, got "
                f"{in_features} and {out_features}"
            )
        if side not in ("input", "output"):
            raise ValueError(f"side must be 'input' or 'output', got {side!r}")
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.side = side
        rows, cols = (self.in_features, self.out_features)
        if side == "output":
            rows, cols = cols, rows
        self._init_factors(
            rows,
            cols,
            ranks,
            labels,
            affine,
            device,
            dtype,
            "input feature" if side == "input" else "output neuron",
        )
        if bias:
            self.bias = nn.Parameter(
                torch.empty(self.out_features, device=device, dtype=dtype)
            )
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self):
        """Random factors, and a bias drawn like :class:`torch.nn.Linear`'s."""
        self._reset_factors(self.in_features, self.out_features)
        with torch.no_grad():
            # entries of U V get nn.Linear's variance, 1 / (3 in_features)
            for U in self.coefficients:
                U.mul_(1.0 / math.sqrt(3 * self.in_features))
            if self.bias is not None:
                bound = 1.0 / math.sqrt(self.in_features)
                nn.init.uniform_(self.bias, -bound, bound)

    @property
    def compression(self):
        """``n_params / (in_features * out_features)``."""
        return self.n_params / (self.in_features * self.out_features)

    @property
    def weight(self):
        """Shape, dtype and device of the weight, for code written for Linear.

        A :class:`WeightSpec` of shape (out_features, in_features), not a
        tensor: the dense weight is never made.
        """
        return WeightSpec(self, (self.out_features, self.in_features))

    @classmethod
    def from_factors(cls, factors, bias=None, *, device=None, dtype=None):
        """Build the layer from the factors of a weight, of either side.

        Parameters
        ----------
        factors : kflats.factorize.ProjectiveFactors
            As :func:`kflats.factorize.factorize_linear` returns them: the
            factors of ``W.T`` (in_features x out_features, marked
            ``transposed=True``) give an input-side layer, those of ``W``
            (out_features x in_features) an output-side layer.
        bias : Tensor or array-like of shape (out_features,), default=None
            Copied into the layer; ``None`` builds a layer without bias.
        device, dtype : optional
            Default: the bias's device (else CPU) and the factors' dtype.

        Returns
        -------
        layer : ProjectiveLinear
            Computes ``x @ factors.reconstruct() + bias``.

        Examples
        --------
        >>> import numpy as np, torch
        >>> from kflats.factorize import factorize_linear
        >>> from kflats.torch import ProjectiveLinear
        >>> W = np.random.default_rng(0).normal(size=(6, 10)).astype(np.float32)
        >>> f = factorize_linear(W, k=2, j=3, side="input", random_state=0)
        >>> layer = ProjectiveLinear.from_factors(f)
        >>> x = torch.randn(4, 10)
        >>> expected = x.numpy() @ f.reconstruct()
        >>> np.allclose(layer(x).detach().numpy(), expected, atol=1e-5)
        True
        >>> g = factorize_linear(W, k=2, j=3, side="output", random_state=0)
        >>> layer = ProjectiveLinear.from_factors(g)
        >>> layer.side, np.allclose(layer(x).detach().numpy(),
        ...                         x.numpy() @ g.reconstruct().T, atol=1e-5)
        ('output', True)
        """
        if not isinstance(factors, ProjectiveFactors):
            raise TypeError(
                f"factors must be a ProjectiveFactors, got {type(factors).__name__}"
            )
        if factors.transposed:
            side, (in_features, out_features) = "input", factors.shape
        else:
            side, (out_features, in_features) = "output", factors.shape
        if bias is not None:
            bias = torch.as_tensor(bias)
            if bias.shape != (out_features,):
                raise ValueError(
                    f"bias must have shape ({out_features},), got {tuple(bias.shape)}"
                )
            if device is None:
                device = bias.device
        if dtype is None:
            dtype = torch.float64 if factors.dtype == np.float64 else torch.float32
        layer = cls(
            in_features,
            out_features,
            factors.ranks,
            torch.from_numpy(factors.labels),
            side=side,
            bias=bias is not None,
            affine=factors.means is not None,
            device=device,
            dtype=dtype,
        )
        layer._copy_factors(factors)
        if bias is not None:
            with torch.no_grad():
                layer.bias.copy_(bias)
        return layer

    @classmethod
    def from_linear(cls, linear, k=None, j=None, *, budget=None, **factorize_params):
        """Compress a :class:`torch.nn.Linear` by projective clustering of its weight.

        Parameters
        ----------
        linear : torch.nn.Linear or transformers Conv1D
            The layer to compress; its device, dtype and bias are kept. A
            GPT-2 ``Conv1D`` (weight stored in x out, ``y = x W + b``) is a
            Linear in all but name: its weight is read transposed.
        k, j, budget :
            As in :func:`kflats.factorize.factorize_linear`.
        **factorize_params
            Further parameters of :func:`kflats.factorize.factorize_linear`
            (``side``, ``input_moment`` for the calibrated objective,
            ``damping``) and :func:`kflats.factorize.factorize`.

        Returns
        -------
        layer : ProjectiveLinear
            The attribute ``factorization_error`` holds the relative error of
            the fit (calibrated when ``input_moment`` is given), and
            ``weight_error`` the plain relative squared Frobenius error of
            the weight.

        Examples
        --------
        >>> import torch
        >>> from kflats.torch import ProjectiveLinear
        >>> linear = torch.nn.Linear(48, 24)
        >>> layer = ProjectiveLinear.from_linear(linear, budget=0.5, k=2,
        ...                                      random_state=0)
        >>> layer.compression <= 0.5
        True
        """
        if not (isinstance(linear, nn.Linear) or _is_conv1d(linear)):
            raise TypeError(
                "linear must be a torch.nn.Linear (or a transformers Conv1D), got "
                f"{type(linear).__name__}"
            )
        weight = _dense_weight(linear)
        factors = factorize_linear(
            _weight_as_numpy(weight), k, j, budget=budget, **factorize_params
        )
        layer = cls.from_factors(
            factors,
            None if linear.bias is None else linear.bias.detach(),
            device=weight.device,
            dtype=weight.dtype,
        )
        layer.factorization_error = factors.error
        layer.weight_error = factors.weight_error
        return layer

    def forward(self, input):
        packed = self._packed(
            lambda U, V, mu: pack_linear(self.side, self._order, self.sizes, U, V, mu)
        )
        if packed is not None:
            return packed_linear(input, *packed, self.bias)
        if self.side == "output":
            return F.projective_linear_output(
                input,
                self._place,
                list(self.coefficients),
                self.bases,
                self.bias,
                self.means,
            )
        return F.projective_linear(
            input,
            self._order,
            self.sizes,
            list(self.coefficients),
            self.bases,
            self.bias,
            self.means,
        )

    def to_dense(self):
        """A plain :class:`torch.nn.Linear` holding the reconstructed weight.

        Returns
        -------
        linear : torch.nn.Linear
            Same device, dtype and bias.

        Examples
        --------
        >>> import torch
        >>> from kflats.torch import ProjectiveLinear
        >>> layer = ProjectiveLinear(8, 4, ranks=(2, 2))
        >>> x = torch.randn(3, 8)
        >>> torch.allclose(layer.to_dense()(x), layer(x), atol=1e-6)
        True
        """
        with torch.no_grad():
            weight = self._reconstruct()
            if self.side == "input":
                weight = weight.T
        linear = nn.Linear(
            self.in_features,
            self.out_features,
            bias=self.bias is not None,
            device=weight.device,
            dtype=weight.dtype,
        )
        with torch.no_grad():
            linear.weight.copy_(weight)
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    def extra_repr(self):
        side = ", side='output'" if self.side == "output" else ""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"{self._factor_repr()}{side}, bias={self.bias is not None}"
        )


class ProjectiveTiedHead(nn.Module):
    """An output head tied to a :class:`ProjectiveEmbedding`: its factors, shared.

    A language model whose output head reuses its word-embedding table
    (GPT-2, Llama with ``tie_word_embeddings``, BERT's masked-LM decoder)
    computes ``logits = h E^T + b``. Once the table is a
    :class:`ProjectiveEmbedding`, this head computes the same product through
    the embedding's own factors, cluster by cluster: for the tokens of
    cluster ``c``, ``(h V_c^T) U_c^T`` (plus ``h . mu_c`` for affine flats),
    never making the dense table. It holds a reference to the embedding, not
    a copy: training or loading the embedding changes the head, and the
    factors are stored and counted once.

    The embedding is not a submodule of the head (the model holds it where
    it was): the head's own parameters are its bias alone.

    Parameters
    ----------
    embedding : ProjectiveEmbedding
        The tied input embedding.
    bias : bool, default=False
        Whether the head adds a bias of shape (num_embeddings,).
    device, dtype : optional
        Of the bias; default: the embedding's.

    Attributes
    ----------
    embedding : ProjectiveEmbedding
    bias : torch.nn.Parameter of shape (num_embeddings,) or None
    in_features, out_features : int
        ``embedding_dim`` and ``num_embeddings``.
    n_params : int
        0 without bias, else ``num_embeddings``: the factors count with the
        embedding.

    See Also
    --------
    kflats.torch.functional.projective_tied_logits : The forward function.

    Examples
    --------
    >>> import torch
    >>> from kflats.torch import ProjectiveEmbedding, ProjectiveTiedHead
    >>> emb = ProjectiveEmbedding(50, 8, ranks=(3, 2))
    >>> head = ProjectiveTiedHead(emb)
    >>> h = torch.randn(2, 8)
    >>> dense = emb.to_dense().weight
    >>> torch.allclose(head(h), h @ dense.T, atol=1e-5)
    True
    >>> head.embedding is emb, sum(p.numel() for p in head.parameters())
    (True, 0)
    """

    def __init__(self, embedding, *, bias=False, device=None, dtype=None):
        super().__init__()
        if not isinstance(embedding, ProjectiveEmbedding):
            raise TypeError(
                "embedding must be a ProjectiveEmbedding, got "
                f"{type(embedding).__name__}"
            )
        # a plain attribute, not a submodule: the model holds the embedding
        # where it was, and its factors are stored and counted there once
        object.__setattr__(self, "_embedding", embedding)
        if bias:
            self.bias = nn.Parameter(
                torch.zeros(
                    embedding.num_embeddings,
                    device=device or embedding.bases.device,
                    dtype=dtype or embedding.bases.dtype,
                )
            )
        else:
            self.register_parameter("bias", None)

    @property
    def embedding(self):
        """The tied :class:`ProjectiveEmbedding`."""
        return self._embedding

    @property
    def in_features(self):
        return self._embedding.embedding_dim

    @property
    def out_features(self):
        return self._embedding.num_embeddings

    @property
    def n_params(self):
        """Numbers the head stores itself: its bias (the factors are shared)."""
        return 0 if self.bias is None else self.bias.numel()

    @property
    def weight(self):
        """Shape, dtype and device of the tied table (a :class:`WeightSpec`)."""
        return self._embedding.weight

    @classmethod
    def tie(cls, embedding, head):
        """The tied head that replaces ``head`` (a Linear sharing the table).

        Parameters
        ----------
        embedding : ProjectiveEmbedding
            The compressed table.
        head : torch.nn.Linear
            The dense head whose weight was the table; its bias parameter
            becomes the new head's (shared, not copied).

        Returns
        -------
        head : ProjectiveTiedHead
        """
        shape = (embedding.num_embeddings, embedding.embedding_dim)
        if not isinstance(head, nn.Linear) or tuple(head.weight.shape) != shape:
            raise ValueError(
                f"a tied head must be a torch.nn.Linear with a weight of shape "
                f"{shape}, got {head!r}"
            )
        layer = cls(embedding)
        if head.bias is not None:
            # the head's own bias parameter, not a copy: a bias tied elsewhere
            # (BERT's prediction head) stays tied
            layer.bias = head.bias
        return layer.train(head.training)

    def forward(self, input):
        emb = self._embedding
        return F.projective_tied_logits(
            input,
            emb._place,
            list(emb.coefficients),
            emb.bases,
            self.bias,
            emb.means,
        )

    def extra_repr(self):
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"tied to ProjectiveEmbedding(k={self._embedding.k}), "
            f"bias={self.bias is not None}"
        )


class SharedEmbedding(nn.Module):
    """Another place of a :class:`ProjectiveEmbedding` in the same model.

    A model may hold its word-embedding table in several modules that share
    one weight (T5: ``shared``, ``encoder.embed_tokens`` and
    ``decoder.embed_tokens``). Once the table is compressed, the other
    places become this module: it looks tokens up through the embedding it
    refers to (a reference, not a submodule, so the factors are stored and
    counted once).

    Parameters
    ----------
    embedding : ProjectiveEmbedding

    Examples
    --------
    >>> import torch
    >>> from kflats.torch import ProjectiveEmbedding
    >>> from kflats.torch._layers import SharedEmbedding
    >>> emb = ProjectiveEmbedding(20, 4, ranks=(2, 2))
    >>> alias = SharedEmbedding(emb)
    >>> ids = torch.tensor([1, 7])
    >>> torch.equal(alias(ids), emb(ids)), list(alias.parameters())
    (True, [])
    """

    def __init__(self, embedding):
        super().__init__()
        if not isinstance(embedding, ProjectiveEmbedding):
            raise TypeError(
                "embedding must be a ProjectiveEmbedding, got "
                f"{type(embedding).__name__}"
            )
        object.__setattr__(self, "_embedding", embedding)

    @property
    def embedding(self):
        """The :class:`ProjectiveEmbedding` this module looks tokens up in."""
        return self._embedding

    @property
    def num_embeddings(self):
        return self._embedding.num_embeddings

    @property
    def embedding_dim(self):
        return self._embedding.embedding_dim

    @property
    def padding_idx(self):
        return self._embedding.padding_idx

    @property
    def weight(self):
        """Shape, dtype and device of the shared table (a :class:`WeightSpec`)."""
        return self._embedding.weight

    def forward(self, input):
        return self._embedding(input)

    def extra_repr(self):
        return (
            f"{self.num_embeddings}, {self.embedding_dim}, shares "
            f"ProjectiveEmbedding(k={self._embedding.k})"
        )
