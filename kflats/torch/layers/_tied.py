"""Other places of a ProjectiveEmbedding's factors: a tied output head, an alias.

A language model may read its word-embedding table in several places: its
output head (tied weights) and other embedding modules sharing one weight
(T5). Once the table is a :class:`ProjectiveEmbedding`, these modules refer to
it (a reference, not a submodule), so its factors are stored and counted
once.
"""

import torch
from torch import nn

from kflats.torch import functional as F
from kflats.torch.layers._embedding import ProjectiveEmbedding

__all__ = ["ProjectiveTiedHead", "SharedEmbedding"]


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
    >>> from kflats.torch.layers import SharedEmbedding
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
