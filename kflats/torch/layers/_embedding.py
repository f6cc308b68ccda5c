"""ProjectiveEmbedding: an embedding table stored as per-cluster factors."""

import numpy as np
import torch
from torch import nn

from kflats.factorize import ProjectiveFactors, factorize
from kflats.torch import functional as F
from kflats.torch.layers._base import WeightSpec, _Projective
from kflats.torch.layers._dense import weight_as_numpy
from kflats.torch.layers._packed import (
    EMBEDDING_PACKED_TOKENS,
    lookup_by_cluster,
    pack_embedding,
    packed_embedding,
)

__all__ = ["ProjectiveEmbedding"]


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
    single SVD factor pair of the same size. For inference (no gradient to
    record), a lookup of at most 64 tokens skips the deduplication and reads
    each token's cluster and row from tables kept until a factor changes
    (fewer operator calls; equal up to floating-point rounding).

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

    # a lookup reads each token's place in the cluster-ordered table only
    _reads_order = False

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
            weight_as_numpy(weight), k, j, budget=budget, **factorize_params
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
        if self._holds_codes():
            return self._lookup_codes(input)
        coefficients = list(self.coefficients)
        bases, means = self.bases, self.means
        if input.numel() <= EMBEDDING_PACKED_TOKENS:
            packed = self._packed(
                lambda U, V, mu: pack_embedding(
                    self.labels, self._place, self.sizes, U, V, mu
                ),
                coefficients,
                bases,
                means,
            )
            if packed is not None:
                return packed_embedding(input, *packed)
        return F.projective_embedding(
            input,
            self._place,
            self.sizes,
            coefficients,
            bases,
            means,
            self.padding_idx if self.training else None,
        )

    def _lookup_codes(self, input):
        """A lookup with factors held as codes: of each table, the tokens' rows.

        The operations of the float layer's forward on the same values (so
        the same floats), but of each quantized coefficient table only the
        rows looked up are dequantized, and no table is kept. In the short
        form, each token's cluster and row are computed for the tokens
        looked up, and of the bases only the rows of their clusters are
        dequantized; the grouped form dequantizes the bases whole.
        """
        tables = [
            self.coefficients._modules.get(str(c)) or self.coefficients[c]
            for c in range(self.k)
        ]
        means = self.means
        bases_packed = self._modules.get("bases")
        # the form the float layer takes: grouped while gradients are
        # recorded (its factors train) or for many tokens
        short = 0 < input.numel() <= EMBEDDING_PACKED_TOKENS and self._packed_inference
        if not short or torch.is_grad_enabled():
            return F.projective_embedding(
                input,
                self._place,
                self.sizes,
                tables,
                self.bases,
                means,
                self.padding_idx if self.training else None,
            )
        flat = input.reshape(-1)
        ids = self.labels.index_select(0, flat).to(torch.int64)
        order = torch.argsort(ids)
        tokens = flat.index_select(0, order)
        starts = torch.tensor([0, *self.sizes[:-1]], device=flat.device).cumsum(0)
        rows = self._place.index_select(0, tokens) - starts.index_select(
            0, ids.index_select(0, order)
        )
        blocks = self._present_bases(ids, bases_packed, means)
        out = lookup_by_cluster(ids, order, rows, tables, blocks)
        return out.reshape(*input.shape, out.shape[1])

    def _present_bases(self, ids, bases_packed, means):
        """Each cluster's bases (and mean), dequantized for the clusters in ``ids``.

        ``(None, None)`` for a cluster no token of ``ids`` belongs to.
        """
        counts = torch.bincount(ids, minlength=self.k).tolist()
        offsets = [sum(self.ranks[:c]) for c in range(self.k)]
        present = [c for c in range(self.k) if counts[c]]
        spans = [(offsets[c], self.ranks[c]) for c in present]
        if bases_packed is None:
            bases = self.bases
            parts = [bases[o : o + r] for o, r in spans]
        else:  # the rows of the clusters present, no others
            index = torch.cat(
                [torch.arange(o, o + r, device=ids.device) for o, r in spans]
            )
            parts = bases_packed.rows(index).split([r for _, r in spans])
        blocks = [(None, None)] * self.k
        for c, V in zip(present, parts, strict=True):
            blocks[c] = (V, None if means is None else means[c])
        return blocks

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
