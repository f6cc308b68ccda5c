"""What a matrix costs to store, dense or as projective factors: numbers and bytes.

One formula serves every count in kflats (the factors of
:mod:`kflats.factorize`, the layers of :mod:`kflats.torch`, the budget search
and the allocation of a budget across modules). Factors of a matrix with
clusters of ``sizes[c]`` rows and ranks ``ranks[c]`` store

- ``ranks[c] * (sizes[c] + d)`` values per cluster (coefficients and basis),
- ``d`` values per cluster for the means of affine flats,
- one cluster id per row when there is more than one cluster.

A matrix kept dense stores its ``n * d`` values. Bytes follow from the same
count: values at ``bits`` each, and cluster ids in the smallest integer type
that holds ``k`` (unsigned 8, then 16, 32 or 64 bits).
"""

import math
from typing import NamedTuple

#: Bits per cluster id, by the most clusters each integer type holds.
_ID_TYPES = ((2**8, 8), (2**15, 16), (2**31, 32))


def id_bits(k):
    """Bits of one cluster id for ``k`` clusters (uint8, int16, int32, int64)."""
    for limit, bits in _ID_TYPES:
        if k <= limit:
            return bits
    return 64  # pragma: no cover - more than 2**31 clusters


class Size(NamedTuple):
    """What factors (or a dense matrix) store.

    Attributes
    ----------
    values : int
        Floating-point values: coefficients, bases, means (or the dense
        matrix).
    ids : int
        Cluster ids counted in the size: one per row when k > 1, else 0.
    k : int
        Number of clusters (0 for a dense matrix).
    """

    values: int
    ids: int
    k: int

    @property
    def numbers(self):
        """Every stored number: values and cluster ids."""
        return self.values + self.ids

    def bytes(self, bits=32, *, rows=None):
        """Bytes of the values at ``bits`` each, and of the ids.

        ``rows``: the number of cluster ids stored in all cases (a layer
        keeps its ids even for one cluster); ``None`` counts ``ids``.
        """
        ids = self.ids if rows is None else rows
        id_size = id_bits(max(self.k, 1)) * ids
        return math.ceil(self.values * bits / 8) + math.ceil(id_size / 8)


def factors_size(sizes, ranks, d, affine=False):
    """The :class:`Size` of factors with these clusters (every cluster counted)."""
    k = len(ranks)
    values = sum(int(r) * (int(s) + d) for s, r in zip(sizes, ranks, strict=True))
    if affine:
        values += k * d
    ids = int(sum(sizes)) if k > 1 else 0
    return Size(int(values), ids, k)


def dense_size(n, d):
    """The :class:`Size` of an ``n x d`` matrix kept dense."""
    return Size(n * d, 0, 0)


def uniform_rank(n, d, k, max_numbers, affine=False):
    """Largest rank that k clusters of n rows in all share within ``max_numbers``.

    May be below 1 when even rank 1 does not fit; the inverse of
    :func:`factors_size` for equal ranks.
    """
    fixed = factors_size([n] + [0] * (k - 1), [0] * k, d, affine).numbers
    return (max_numbers - fixed) // (n + k * d)


def saving_rank(n, d):
    """Largest rank whose k = 1 factors of an ``n x d`` matrix store fewer numbers."""
    return (n * d - 1) // (n + d)


def budget_numbers(budget, n, d):
    """The numbers a fraction ``budget`` of an ``n x d`` matrix allows."""
    return math.floor(budget * (n * d))
