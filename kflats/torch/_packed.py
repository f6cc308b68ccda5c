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
- an embedding: each cluster's coefficients padded to the largest rank, one
  row per token in id order, and the bases padded alike: a lookup gathers
  the tokens' rows, places each in its cluster's block and runs one GEMM
  with the padded bases (no sort, no host sync), while a batch of many
  tokens keeps the grouped form, which does k times fewer flops.

The packed tensors are derived data, never saved: a layer builds them on
first use and rebuilds them when a factor changes (another tensor, or the
same one written in place: its version counter moves).
"""

import torch

# an embedding lookup packs the tokens when their count times the padded
# width (k * max rank) is at most this: beyond it the grouped form's k times
# fewer flops win over its extra calls
_EMBEDDING_PACKED_WORK = 1 << 16


def _key(tensors):
    """What identifies the factors' current values: object, version, storage."""
    return tuple(
        None if t is None else (t, t._version, t.data_ptr(), t.dtype, t.device)
        for t in tensors
    )


def _same(key, other):
    if other is None or len(key) != len(other):
        return False
    for a, b in zip(key, other, strict=True):
        if a is None or b is None:
            if a is not b:
                return False
        elif a[0] is not b[0] or a[1:] != b[1:]:
            return False
    return True


class PackedCache:
    """The packed tensors of one layer and the factors they were built from."""

    __slots__ = ("_key", "value")

    def __init__(self):
        self._key = None
        self.value = None

    def __reduce__(self):
        # derived data: a copy or a pickle of the layer starts empty
        return (PackedCache, ())

    def get(self, tensors, build):
        """The packed tensors for ``tensors``, built by ``build()`` if stale."""
        key = _key(tensors)
        if not _same(key, self._key):
            self.value = None  # free the stale form before building the new one
            # plain tensors even under inference_mode, so that a later
            # forward recording gradients for its input may save them
            with torch.inference_mode(False), torch.no_grad():
                self.value = build()
            self._key = key
        return self.value

    def clear(self):
        self._key = None
        self.value = None


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
    """Coefficients padded to (n, width) in id order, bases to (k, width, d).

    With affine flats the last column of each coefficient row is 1 and the
    last row of each cluster's padded bases its mean.
    """
    ranks = [U.shape[1] for U in coefficients]
    k, d = len(ranks), bases.shape[1]
    width = max(ranks) + (1 if means is not None else 0)
    table = bases.new_zeros((sum(sizes), width))
    padded = bases.new_zeros((k, width, d))
    row = col = 0
    for c, U in enumerate(coefficients):
        table[row : row + sizes[c], : ranks[c]] = U
        padded[c, : ranks[c]] = bases[col : col + ranks[c]]
        if means is not None:
            table[row : row + sizes[c], -1] = 1
            padded[c, -1] = means[c]
        row += sizes[c]
        col += ranks[c]
    # rows in token-id order, so that a lookup is one gather
    table = table.index_select(0, place)
    return table, padded, labels.to(torch.int64)


def packed_embedding_fits(n_tokens, k, width):
    """Whether a lookup of ``n_tokens`` takes the packed form."""
    return n_tokens * k * width <= _EMBEDDING_PACKED_WORK


def packed_embedding(input, table, padded, labels):
    """Rows ``table[t]`` placed in block ``labels[t]``, times the padded bases."""
    flat = input.reshape(-1)
    rows = table.index_select(0, flat)
    k, width, d = padded.shape
    t = rows.shape[0]
    spread = rows.new_zeros((t, k, width))
    spread[torch.arange(t, device=flat.device), labels.index_select(0, flat)] = rows
    out = torch.mm(spread.view(t, k * width), padded.view(k * width, d))
    return out.reshape(*input.shape, d)
