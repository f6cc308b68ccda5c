"""The packed form of a projective layer: its clusters as one or two GEMMs.

The grouped forward of :mod:`kflats.torch.functional` runs one small GEMM per
cluster, plus the gathers and concatenations that route each cluster's rows:
the fewest flops, but 3 + k operator calls per Linear and about 14 + 4k per
embedding lookup, and at batch 1 each call costs more than its flops. For
inference (no gradient to record) a layer packs its factors once:

- a Linear, input features clustered: ``y = (x B) V + b``, where ``B`` (in
  x sum(ranks)) holds ``U_c`` at the rows of cluster c's features and the
  columns of its ranks (zero elsewhere), and ``V`` is the stacked bases;
- a Linear, output neurons clustered: ``y = (x V^T) B + b``, ``B`` (sum(ranks)
  x out) holding ``U_c^T`` at the rows of cluster c's ranks and the columns
  of its neurons;
- affine flats add one column of ones per cluster to ``B`` (its features, or
  its neurons) and the means as rows of ``V``;
- when ``in * out`` is no more than the two products' ``(in + out) *
  sum(ranks)``, the product ``B V`` itself, one GEMM as in the dense layer;
- an embedding keeps one GEMM per cluster (any fused form does k times the
  flops, and lost on a sentence of MiniLM's vocabulary: 238 us against
  139 us grouped), but reads each token's cluster and row from two tables
  kept with the packed form, and skips the deduplication: 8 operator calls
  plus 3 per cluster present instead of about 14 plus 4 per cluster (68 us
  for that sentence). A lookup of many tokens keeps the grouped form, which
  removes repeated ids.

A Linear's packed matrices are stored contiguous in the order the GEMM reads
them: on this machine's CPU torch, a product with a transposed view (what
the grouped form and ``nn.Linear`` do) took 44-62 us against 27-40 us for
the same 20-row product with contiguous operands (ranks 128-192 of a 384 x
384 weight, 1 thread). On all-MiniLM-L6-v2 compressed at 0.6 (20 Linear
layers as k = 1 factors, ranks 114-190), each packed layer took 43-57 us
per 20-token sentence against 60 us for its dense original and 61-82 us
grouped. Outputs equal the grouped form's up to floating-point rounding.

The packed tensors are derived data, never saved: a layer builds them on
first use and rebuilds them when a factor changes (another tensor, or the
same one written in place: its version counter moves).
"""

import torch

# a lookup of more tokens than this runs the grouped form, whose one sort
# also removes repeated ids (padding, frequent words: most of a batch of 32
# sentences), which saves more flops than its extra calls cost
EMBEDDING_PACKED_TOKENS = 64


def _key(tensors):
    """What identifies the factors' current values: object, version, storage."""
    return tuple(
        None if t is None else (t, t._version, t.data_ptr(), t.dtype, t.device)
        for t in tensors
    )


def _same(key, other):
    if len(key) != len(other):
        return False
    for a, b in zip(key, other, strict=True):
        if a is None or b is None:
            if a is not b:
                return False
        elif a[0] is not b[0] or a[1:] != b[1:]:
            return False
    return True


class PackedCache:
    """The packed tensors of one layer and the factors they were built from.

    One ``(key, value)`` entry, read and replaced whole, so that threads
    running the same layer see a complete entry (at worst, two build it).
    """

    __slots__ = ("_entry",)

    def __init__(self):
        self._entry = None

    def __reduce__(self):
        # derived data: a copy or a pickle of the layer starts empty
        return (PackedCache, ())

    @property
    def value(self):
        """The packed tensors last built, or None."""
        entry = self._entry
        return None if entry is None else entry[1]

    def get(self, tensors, build):
        """The packed tensors for ``tensors``, built by ``build()`` if stale."""
        key = _key(tensors)
        entry = self._entry
        if entry is not None and _same(key, entry[0]):
            return entry[1]
        self._entry = None  # free the stale form before building the new one
        # plain tensors even under inference_mode, so that a later
        # forward recording gradients for its input may save them
        with torch.inference_mode(False), torch.no_grad():
            value = build()
        self._entry = (key, value)
        return value

    def clear(self):
        self._entry = None


def cacheable(tensors):
    """Whether the factors are plain parameters (not recomputed per access).

    A parametrized factor (straight-through training) is a new tensor at
    each access: the packed form is then not kept.
    """
    return all(t is None or isinstance(t, torch.nn.Parameter) for t in tensors)


def pack_linear(side, order, sizes, coefficients, bases, means):
    """``(B, V)`` of the two-GEMM form, or ``(W, None)`` of the dense one."""
    ranks = [U.shape[1] for U in coefficients]
    k, total = len(ranks), sum(ranks)
    width = total + (k if means is not None else 0)
    n, m = order.numel(), bases.shape[1]
    blocks = bases.new_zeros((n, width))
    row = col = 0
    for c, U in enumerate(coefficients):
        rows = order[row : row + sizes[c]]
        blocks[rows, col : col + ranks[c]] = U
        if means is not None:
            blocks[rows, total + c] = 1
        row += sizes[c]
        col += ranks[c]
    stacked = bases if means is None else torch.cat([bases, means])
    if side == "input":
        first, second = blocks, stacked  # (in x width), (width x out)
    else:
        first, second = stacked.T, blocks.T  # (in x width), (width x out)
    if n * m <= (n + m) * width:
        return torch.mm(first, second), None
    return first.contiguous(), second.contiguous()


def packed_linear(input, first, second, bias):
    """``(x first) second + bias``, or ``x first + bias`` when ``second`` is None."""
    shape = input.shape
    x = input.reshape(-1, shape[-1])
    if second is not None:
        x = torch.mm(x, first)
        first = second
    out = torch.mm(x, first) if bias is None else torch.addmm(bias, x, first)
    return out.reshape(*shape[:-1], out.shape[1])


def pack_embedding(labels, place, sizes, coefficients, bases, means):
    """What a lookup needs besides the factors: int64 cluster ids, rows within.

    ``within[t]`` is the row of token ``t`` in its cluster's coefficients;
    ``blocks[c]`` the cluster's bases (and ``means[c]``, or None).
    """
    starts = torch.tensor([0, *sizes[:-1]], device=place.device).cumsum(0)
    labels = labels.to(torch.int64)
    within = place - starts.index_select(0, labels)
    ranks = [U.shape[1] for U in coefficients]
    offsets = [sum(ranks[:c]) for c in range(len(ranks))]
    blocks = tuple(
        (bases[o : o + r], None if means is None else means[c])
        for c, (o, r) in enumerate(zip(offsets, ranks, strict=True))
    )
    return labels, within, tuple(coefficients), blocks


def packed_embedding(input, labels, within, coefficients, blocks):
    """One GEMM per cluster present, on its tokens in the order a sort gives.

    The grouped form of :func:`kflats.torch.functional.projective_embedding`
    without its deduplication (repeated ids in a short batch are few) and
    with each token's cluster and row read from two tables: 8 operator
    calls plus 3 per cluster present.
    """
    flat = input.reshape(-1)
    ids = labels.index_select(0, flat)
    order = torch.argsort(ids)
    rows = within.index_select(0, flat.index_select(0, order))
    out = lookup_by_cluster(ids, order, rows, coefficients, blocks)
    return out.reshape(*input.shape, out.shape[1])


def lookup_by_cluster(ids, order, rows, coefficients, blocks):
    """The embeddings of tokens of clusters ``ids``, rows ``rows`` in ``order``.

    ``rows`` are the tokens' rows within their clusters' coefficients, taken
    in ``order`` (which sorts ``ids``); a coefficient table may be a tensor
    or a packed one (anything with ``rows(index)``: only those rows are
    dequantized), and the blocks of clusters no token belongs to None.
    """
    counts = torch.bincount(ids, minlength=len(blocks)).tolist()
    like = next(V for V, _ in blocks if V is not None)
    ordered = like.new_empty((ids.numel(), like.shape[1]))
    lo = 0
    for c, count in enumerate(counts):
        if not count:
            continue
        hi = lo + count
        table = coefficients[c]
        if isinstance(table, torch.Tensor):
            coeff = table.index_select(0, rows[lo:hi])
        else:
            coeff = table.rows(rows[lo:hi])
        V, mean = blocks[c]
        if mean is None:
            torch.mm(coeff, V, out=ordered[lo:hi])
        else:
            torch.addmm(mean, coeff, V, out=ordered[lo:hi])
        lo = hi
    return torch.empty_like(ordered).index_copy_(0, order, ordered)
