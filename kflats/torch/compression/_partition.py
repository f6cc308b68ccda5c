"""An Embedding's rows clustered into k subspaces: its factors at every rank.

The projective forms with k > 1 clusters of a table under a budget in bytes
(:mod:`._form_errors`) read their truncation errors and factors off one
partition: one :class:`kflats.KSubspaces` fit, two rounds of refinement,
then each cluster's weighted spectrum.
"""

from dataclasses import replace

import numpy as np

from kflats.factorize import damped_moment
from kflats.factorize._allocation import refine_partition
from kflats.factorize._linear import shared_seed, unwhiten, whiten
from kflats.factorize._search import partition_rows
from kflats.factorize._spectra import (
    cluster_spectra,
    factors_from_spectra,
    kept_numbers,
    residual_error,
    total_energy,
)
from kflats.torch.compression._forms import _capped, _shared_ranks
from kflats.torch.layers import ProjectiveEmbedding, weight_as_numpy

# the refinement of a partition: at this fraction of the row length, rounds
_REFINE_LEVEL, _REFINE_ROUNDS = 0.25, 2


class _Partition:
    """An Embedding's rows clustered into k subspaces, its factors at any rank.

    One :class:`kflats.KSubspaces` fit of the rows (weighted by the
    objective's token weights; columns whitened by a tied head's input
    moment), then each cluster's spectrum: the truncation error at a rank is
    exact, and the factors at a rank are built without another fit.
    """

    def __init__(self, module, objective, k, options):
        self.module = module
        self.w = None if objective is None else objective.row_weights
        self.L = None
        if objective is not None and objective.input_moment is not None:
            moment, damping = objective.input_moment, objective.damping
            self.L = damped_moment(moment, module.weight.shape[1], damping)[1]
        A = self._matrix()  # not kept: a table's whitened copy (113 MB)
        n, d = self.shape = A.shape
        seed = shared_seed(options.random_state)
        j = min(d - 1, max(1, d // 6))  # the flats' rank of the clustering
        labels = partition_rows(A, k, j, False, self.w, seed, options.fit_params, True)
        clusters = [
            c for c in cluster_spectra(A, labels, k, self.w, False) if c.rows.size
        ]
        clusters = self._refined(A, labels, clusters)
        self.clusters = [c for c in clusters if c.rows.size]
        self.sizes = [c.rows.size for c in self.clusters]
        self.k = len(self.clusters)
        self.denom = total_energy(A, self.w)
        self.levels = _shared_ranks(self.clusters, self.sizes, d)

    def _matrix(self):
        """The rows clustered: the table, whitened by a tied head's moment."""
        A = weight_as_numpy(self.module.weight)
        return A if self.L is None else whiten(A, self.L).astype(A.dtype)

    def _refined(self, A, labels, clusters):
        """The clusters after rows move to the flat that stores them best.

        :func:`kflats.factorize`'s refinement (rows reassigned by weighted
        distance plus the numbers their coefficients cost, ranks shared out
        again), at the level :data:`_REFINE_LEVEL` of the row length, for
        :data:`_REFINE_ROUNDS` rounds. On all-MiniLM-L6-v2's table (k = 16)
        it lowers the truncation error by 5-15 % at levels 32-192 beyond the
        shared ranks (12-21 % below equal ranks, both together).
        """
        d = A.shape[1]
        sizes = [c.rows.size for c in clusters]
        level = max(1, int(d * _REFINE_LEVEL))
        ranks = _shared_ranks(clusters, sizes, d)[level - 1]
        budget = kept_numbers(sizes, _capped(level, sizes), d, False)
        refined, _ = refine_partition(
            A, self.w, labels, clusters, ranks, budget, False, _REFINE_ROUNDS
        )
        return refined

    def ranks(self, rank):
        """Each cluster's rank at level ``rank`` (:func:`_shared_ranks`)."""
        return self.levels[rank - 1]

    def tail(self):
        """Relative truncation error at ranks 1 ... d (index r - 1)."""
        d = self.shape[1]
        return np.array(
            [
                residual_error(self.clusters, self.ranks(r)) / self.denom
                if self.denom > 0
                else 0.0
                for r in range(1, d + 1)
            ]
        )

    def layer(self, rank):
        """The ProjectiveEmbedding of the clusters' factors at ``rank``."""
        ranks = self.ranks(rank)
        A = self._matrix()
        factors = factors_from_spectra(
            A, self.w, self.clusters, ranks, False, self.denom
        )
        if self.L is not None:
            V = tuple(unwhiten(v, self.L, A.dtype) for v in factors.V)
            factors = replace(factors, V=V)
        weight = self.module.weight
        layer = ProjectiveEmbedding.from_factors(
            factors,
            padding_idx=self.module.padding_idx,
            device=weight.device,
            dtype=weight.dtype,
        )
        layer.factorization_error = factors.error
        layer.weight_error = factors.weight_error
        return layer.train(self.module.training)
