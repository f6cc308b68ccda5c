"""Pure forward functions of the projective layers.

The layers of :mod:`kflats.torch` are thin modules over these two functions,
which take every tensor they need as an argument.

Layout shared by both: the clusters are stored one after another. Cluster c
owns ``sizes[c]`` rows and rank ``ranks[c]``; its coefficients are
``coefficients[c]`` (sizes[c] x ranks[c]) and its basis is the slice
``bases[o_c : o_c + ranks[c]]`` of the stacked bases (sum(ranks) x d), where
``o_c = sum(ranks[:c])``.

Embedding forward: the token ids are mapped to their position in the
cluster-ordered table and deduplicated with one sort (:func:`torch.sort`);
each cluster then runs one GEMM on its distinct tokens, and the result is
gathered back to the batch. Measured against one dense GEMM with every
coefficient row placed in its cluster's block of the stacked bases (the
paper's "single fully-connected layer"), the grouped form does k times fewer
flops and was 3.5x (k=4) to 20x (k=16) faster on a 32 x 128 batch from a
30522 x 384 table; see ``benchmarks/torch_report.py``.

Linear forward, input features clustered: the input features are permuted
so that clusters are contiguous, each cluster's slice goes through its own
small GEMM, and the concatenated coefficients go through one GEMM with the
stacked bases.

Linear forward, output neurons clustered: one GEMM with the stacked bases
gives every cluster's coefficients, each cluster's coefficients go through
its own small GEMM to its own neurons, and the outputs are put back in
neuron order: k two-layer products in parallel.

Tied output head (logits through a compressed word embedding): the table's
rows are the head's output neurons, so the logits of cluster c are
``(h V_c^T) U_c^T``, the output-clustered Linear form with the embedding's
own factors, and the dense table is never made.
"""

import torch

__all__ = [
    "projective_embedding",
    "projective_linear",
    "projective_linear_output",
    "projective_tied_logits",
]


def _needs_grad(tensors):
    return torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in tensors
    )


def projective_embedding(
    input,
    positions,
    sizes,
    coefficients,
    bases,
    means=None,
    padding_idx=None,
):
    """Look up token embeddings stored as one factor pair per cluster.

    Token ``t`` in cluster ``c`` at row ``p`` of that cluster gets
    ``coefficients[c][p] @ V_c`` (plus ``means[c]``), with ``V_c`` the
    cluster's rows of ``bases``.

    Parameters
    ----------
    input : LongTensor of any shape
        Token ids, in ``0 .. n-1``.
    positions : LongTensor of shape (n,)
        Row of each token in the cluster-ordered table: tokens of cluster 0
        first, then cluster 1, ... (``sum(sizes[:c]) + p`` for row ``p`` of
        cluster ``c``).
    sizes : sequence of int
        Number of tokens of each cluster.
    coefficients : sequence of Tensor
        ``coefficients[c]`` has shape (sizes[c], ranks[c]); a table held
        packed (:class:`~kflats.torch.layers.PackedTensor`) gives the rows
        looked up, dequantized.
    bases : Tensor of shape (sum(ranks), d)
        The clusters' bases, stacked.
    means : Tensor of shape (k, d), default=None
        Offsets of affine flats.
    padding_idx : int, default=None
        A token whose outputs pass no gradient back, as in
        :class:`torch.nn.Embedding`.

    Returns
    -------
    output : Tensor of shape ``(*input.shape, d)``

    Examples
    --------
    >>> import torch
    >>> from kflats.torch.functional import projective_embedding
    >>> positions = torch.tensor([0, 2, 1])  # tokens 0 and 2 in cluster 0
    >>> coefficients = [torch.tensor([[1.0], [2.0]]), torch.tensor([[3.0]])]
    >>> bases = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    >>> projective_embedding(torch.tensor([[2, 1]]), positions, (2, 1),
    ...                      coefficients, bases)
    tensor([[[2., 0.],
             [0., 3.]]])
    """
    flat = input.reshape(-1)
    rows = positions.index_select(0, flat)
    # one sort groups the batch by cluster and removes repeated tokens (a
    # plain sort: torch.unique's CPU kernel took 0.6 ms for 16 tokens)
    ordered, order = torch.sort(rows)
    first = torch.ones_like(ordered, dtype=torch.bool)
    first[1:] = ordered[1:] != ordered[:-1]
    unique = ordered[first]
    inverse = torch.empty_like(rows)
    inverse[order] = torch.cumsum(first, 0) - 1
    starts = [0]
    for size in sizes:
        starts.append(starts[-1] + size)
    bounds = torch.tensor(starts, device=unique.device)
    cuts = torch.searchsorted(unique, bounds).tolist()
    d = bases.shape[1]
    rank_start = 0
    grad = _needs_grad([bases, means, *coefficients])
    parts = []
    table = None if grad else bases.new_empty((unique.numel(), d))
    for c, U in enumerate(coefficients):
        V = bases[rank_start : rank_start + U.shape[1]]
        rank_start += U.shape[1]
        lo, hi = cuts[c], cuts[c + 1]
        if hi == lo:
            continue
        index = unique[lo:hi] - starts[c]
        # a table held packed dequantizes the rows it gives, no others
        coeff = U.index_select(0, index) if torch.is_tensor(U) else U.rows(index)
        if grad:
            part = coeff @ V if means is None else torch.addmm(means[c], coeff, V)
            parts.append(part)
        elif means is None:
            torch.mm(coeff, V, out=table[lo:hi])
        else:
            torch.addmm(means[c], coeff, V, out=table[lo:hi])
    if grad:
        table = torch.cat(parts) if parts else bases.new_empty((0, d))
    out = table.index_select(0, inverse)
    if grad and padding_idx is not None:
        pad = (flat == padding_idx).unsqueeze(-1)
        out = torch.where(pad, out.detach(), out)
    return out.reshape(*input.shape, d)


def projective_linear(
    input,
    permutation,
    sizes,
    coefficients,
    bases,
    bias=None,
    means=None,
):
    """Linear map whose input features are clustered: k small layers in parallel.

    Computes ``y = sum_c x[R_c] @ (U_c V_c + 1 mu_c) + b``: the input features
    of cluster c (``R_c``) go through ``coefficients[c]`` (n_c x j_c), the
    results are concatenated and recombined by one GEMM with the stacked
    bases (sum(ranks) x out).

    Parameters
    ----------
    input : Tensor of shape (..., in_features)
    permutation : LongTensor of shape (in_features,)
        Input features ordered by cluster: the first ``sizes[0]`` are cluster
        0, in ascending order, and so on.
    sizes : sequence of int
        Number of input features of each cluster.
    coefficients : sequence of Tensor
        ``coefficients[c]`` has shape (sizes[c], ranks[c]).
    bases : Tensor of shape (sum(ranks), out_features)
    bias : Tensor of shape (out_features,), default=None
    means : Tensor of shape (k, out_features), default=None
        Offsets of affine flats: every input feature of cluster c adds
        ``x_i * means[c]``.

    Returns
    -------
    output : Tensor of shape (..., out_features)

    Examples
    --------
    >>> import torch
    >>> from kflats.torch.functional import projective_linear
    >>> permutation = torch.tensor([0, 2, 1])  # features 0, 2 in cluster 0
    >>> coefficients = [torch.tensor([[1.0], [1.0]]), torch.tensor([[2.0]])]
    >>> bases = torch.tensor([[1.0], [1.0]])  # out_features = 1
    >>> projective_linear(torch.tensor([[1.0, 10.0, 100.0]]), permutation,
    ...                   (2, 1), coefficients, bases)
    tensor([[121.]])
    """
    shape = input.shape
    x = input.reshape(-1, shape[-1]).index_select(1, permutation)
    pieces = x.split(list(sizes), dim=1)
    z = torch.cat([xc @ U for xc, U in zip(pieces, coefficients, strict=True)], dim=1)
    if bias is None:
        out = z @ bases
    else:
        out = torch.addmm(bias, z, bases)
    if means is not None:
        sums = torch.stack([xc.sum(dim=1) for xc in pieces], dim=1)
        out = out + sums @ means
    return out.reshape(*shape[:-1], bases.shape[1])


def projective_linear_output(
    input,
    positions,
    coefficients,
    bases,
    bias=None,
    means=None,
):
    """Linear map whose output neurons are clustered: k two-layer products.

    Output neuron ``i`` of cluster ``c``, at row ``p`` of that cluster, is
    ``coefficients[c][p] @ (V_c @ x) (+ means[c] @ x) + bias[i]``, with
    ``V_c`` the cluster's rows of ``bases``.

    Parameters
    ----------
    input : Tensor of shape (..., in_features)
    positions : LongTensor of shape (out_features,)
        Column of each output neuron in the cluster-ordered output: neurons
        of cluster 0 first, then cluster 1, ...
    coefficients : sequence of Tensor
        ``coefficients[c]`` has shape (n_c, ranks[c]), the neurons of cluster
        c in ascending order.
    bases : Tensor of shape (sum(ranks), in_features)
        The clusters' bases, stacked.
    bias : Tensor of shape (out_features,), default=None
    means : Tensor of shape (k, in_features), default=None
        Offsets of affine flats.

    Returns
    -------
    output : Tensor of shape (..., out_features)

    Examples
    --------
    >>> import torch
    >>> from kflats.torch.functional import projective_linear_output
    >>> positions = torch.tensor([0, 2, 1])  # neurons 0 and 2 in cluster 0
    >>> coefficients = [torch.tensor([[1.0], [2.0]]), torch.tensor([[3.0]])]
    >>> bases = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    >>> projective_linear_output(torch.tensor([[10.0, 100.0]]), positions,
    ...                          coefficients, bases)
    tensor([[ 10., 300.,  20.]])
    """
    shape = input.shape
    x = input.reshape(-1, shape[-1])
    z = x @ bases.T
    if len(coefficients) == 1:
        # one cluster holds every neuron in order: positions is the identity,
        # so skip the concatenation and the column gather (two copies)
        out = z @ coefficients[0].T
        if means is not None:
            out = out + x @ means.T
        if bias is not None:
            out = out + bias
        return out.reshape(*shape[:-1], out.shape[1])
    ranks = [U.shape[1] for U in coefficients]
    pieces = z.split(ranks, dim=1)
    outs = [zc @ U.T for zc, U in zip(pieces, coefficients, strict=True)]
    if means is not None:
        offsets = x @ means.T
        outs = [o + offsets[:, c : c + 1] for c, o in enumerate(outs)]
    out = torch.cat(outs, dim=1).index_select(1, positions)
    if bias is not None:
        out = out + bias
    return out.reshape(*shape[:-1], out.shape[1])


def projective_tied_logits(
    input,
    positions,
    coefficients,
    bases,
    bias=None,
    means=None,
):
    """Logits through a word-embedding table stored as per-cluster factors.

    The output head of a language model tied to its input embedding computes
    ``h E^T``; with ``E`` stored as one factor pair per cluster of tokens,
    the logits of the tokens of cluster ``c`` are ``(h V_c^T) U_c^T`` (plus
    ``h . mu_c`` for affine flats), put back in token order. The embedding's
    factors serve as they are: ``positions``, ``coefficients``, ``bases``
    and ``means`` are those of :func:`projective_embedding`.

    Parameters
    ----------
    input : Tensor of shape (..., embedding_dim)
        Hidden states.
    positions : LongTensor of shape (num_embeddings,)
        Row of each token in the cluster-ordered table.
    coefficients : sequence of Tensor
        ``coefficients[c]`` has shape (sizes[c], ranks[c]).
    bases : Tensor of shape (sum(ranks), embedding_dim)
    bias : Tensor of shape (num_embeddings,), default=None
    means : Tensor of shape (k, embedding_dim), default=None

    Returns
    -------
    logits : Tensor of shape (..., num_embeddings)

    Examples
    --------
    >>> import torch
    >>> from kflats.torch.functional import projective_tied_logits
    >>> positions = torch.tensor([0, 2, 1])  # tokens 0 and 2 in cluster 0
    >>> coefficients = [torch.tensor([[1.0], [2.0]]), torch.tensor([[3.0]])]
    >>> bases = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # table rows e0, 3 e1, 2 e0
    >>> projective_tied_logits(torch.tensor([[10.0, 100.0]]), positions,
    ...                        coefficients, bases)
    tensor([[ 10., 300.,  20.]])
    """
    return projective_linear_output(input, positions, coefficients, bases, bias, means)
