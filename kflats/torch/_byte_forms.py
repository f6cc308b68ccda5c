"""The forms of one module under a budget in bytes: sizes, errors, layers.

A selected module may be stored as:

- ``"float"``: kept as it is (float32), error 0;
- ``"dense"`` at ``b`` bits: its weight quantized group-wise
  (:func:`kflats.quantize.quantize_module_`, calibrated rounding: error fed
  forward along a Linear's input moment, token weights for an embedding), in
  the uniform peers' groups and in wider ones (:data:`_DENSE_GROUPS`);
- ``"projective"`` with ``k`` clusters at rank ``r``: k = 1 factors (the
  truncated SVD of the calibrated weight, output side for a Linear), or,
  for a large Embedding, the factors of its rows clustered into ``k``
  subspaces (projective clustering, :func:`kflats.factorize.factorize`'s
  partition), stored in float32 or at ``b`` bits.

Sizes in bytes come from the one formula (:func:`kflats.quantize.form_nbytes`,
:func:`kflats.quantize.factors_nbytes`): what
:func:`kflats.quantize.quantized_state` writes. Errors are relative
calibrated errors (token-weighted for an embedding,
``||(W - W_hat) L||^2 / ||W L||^2`` for a Linear):

- dense at ``b`` bits: measured, the weight quantized;
- float factors of rank ``r``: the tail of the spectrum (of the module for
  k = 1, of each cluster for k > 1: exact);
- factors of rank ``r`` at ``b`` bits: the truncation error plus relative
  noise on what the factors keep, ``t(r) + rho_b (1 - t(r))``, with
  ``rho_b`` measured once per module and bit width on its k = 1 factors at
  one probe rank (the rank whose truncation error is about 5 %), and taken
  as well for its factors with k > 1 clusters.

A partition into k > 1 clusters is fitted once per module and k (one
:class:`kflats.KSubspaces` fit, then two rounds of refinement); the factors
at every rank are read off its clusters' spectra, so no form is fitted
twice. A form's rank is then a level: the numbers that rank ``r`` in every
cluster would keep, shared out among the clusters by error removed per
number (:func:`_shared_ranks`).
"""

import copy
import fnmatch
import math
from dataclasses import replace
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from ..factorize import damped_moment
from ..factorize._allocation import _refine
from ..factorize._linear import _shared_seed, _unwhiten, _whiten
from ..factorize._search import _partition
from ..factorize._spectra import (
    _build,
    _kept_numbers,
    _residual,
    _spectra,
    _total_energy,
)
from ._layers import ProjectiveEmbedding, _weight_as_numpy
from ._sensitivity import _rows_cols

# group sizes of dense matrices by bit width: first those of the uniform
# peers, then wider groups (fewer scales: 4.25 bits a number at 4 bits g128
# against 5 at g32); factors use at most _FACTOR_GROUP, their ranks being
# its multiples
_DENSE_GROUPS = {8: (128,), 6: (64, 128), 4: (32, 128), 3: (32, 128), 2: (32,)}
_FACTOR_GROUP = 32
_MIN_GROUP = 8
# the probe rank of the factors' rounding noise: truncation error about this
_PROBE_ERROR = 0.05
# float factors: ranks on a grid of about this many steps
_FLOAT_STEPS = 48
# clusters tried by default for an Embedding of at least _CLUSTER_ROWS rows
# (a vocabulary: its rows cluster); other modules take k = 1 factors
_CLUSTERS = 16
_CLUSTER_ROWS = 4096
# factors with k > 1 clusters are stored in float32 or at most this many bits
# (of those searched; all of them when none is as low)
_CLUSTER_BITS = 4
# the refinement of a partition: at this fraction of the row length, rounds
_REFINE_LEVEL, _REFINE_ROUNDS = 0.25, 2


class _Form(NamedTuple):
    """One way to store a module: its size in bytes and its relative error."""

    kind: str  # "float", "dense" or "projective"
    bits: int | None
    group_size: int | None
    rank: int | None
    nbytes: int
    error: float = math.nan
    k: int = 1  # clusters of a projective form


def _bias_numel(module):
    bias = getattr(module, "bias", None)
    return 0 if bias is None else bias.numel()


def _group(length, group_size, preferred):
    """The group size of a matrix with rows of ``length`` (``None``: one per row).

    ``group_size`` when given, else ``preferred`` halved until it divides
    ``length`` (at least :data:`_MIN_GROUP`).
    """
    if group_size is not None:
        return group_size
    g = preferred
    while g >= _MIN_GROUP and length % g:
        g //= 2
    return g if g >= _MIN_GROUP else None


def _check_group_size(group_size, names, named):
    """A given group size divides the row length of every selected module."""
    if group_size is None:
        return
    for name in names:
        n, d = _rows_cols(named[name])
        if d % group_size:
            raise ValueError(
                f"group_size={group_size} does not divide the row length of "
                f"{name!r} ({n} x {d}: {d}); give a divisor of every selected "
                "module's in_features / embedding_dim, or group_size=None"
            )


def _factor_forms(sizes, d, bits, group_size, bias, k=1, ranks_at=None):
    """Projective forms of clusters of ``sizes`` rows: float, then at each bits.

    A form's rank ``r`` is a level: each cluster's rank at it is
    ``ranks_at(r)`` (default: ``r``, at most the cluster's rows).
    """
    from ..quantize import factors_nbytes

    if ranks_at is None:
        ranks_at = lambda r: _capped(r, sizes)  # noqa: E731
    top = min(sum(sizes), d) if k == 1 else d
    forms = []
    step = max(1, top // _FLOAT_STEPS)
    for r in range(step, top + 1, step):
        size = factors_nbytes(sizes, ranks_at(r), d, None, bias=bias)
        forms.append(_Form("projective", None, None, r, size, k=k))
    # groups of factors: at most a quarter of the largest rank, so that small
    # modules have several ranks to choose from
    cap = min(_FACTOR_GROUP, max(_MIN_GROUP, 1 << max(top // 4, 1).bit_length() - 1))
    for b in bits:
        g = _group(d, group_size, min(_DENSE_GROUPS[b][0], cap))
        step = g if g is not None else max(1, top // _FLOAT_STEPS)
        for r in range(step, top + 1, step):
            ranks = ranks_at(r)
            size = factors_nbytes(sizes, ranks, d, b, g if g else None, bias=bias)
            forms.append(_Form("projective", b, g, r, size, k=k))
    return forms


def _capped(rank, sizes):
    """Each cluster's rank: ``rank``, at most its rows."""
    return [min(rank, s) for s in sizes]


def _shared_ranks(clusters, sizes, d):
    """Each cluster's ranks at every level ``r = 1 ... d`` (index ``r - 1``).

    At level ``r``, the numbers that ranks ``r`` would keep (each cluster at
    most its rows) are shared out among the clusters by truncation error
    removed per number: every step (cluster ``c`` from rank ``q`` to
    ``q + 1``, gaining its ``q``-th eigenvalue for ``n_c + d`` numbers) in one
    order by gain per number, each level a prefix of it. Every cluster keeps
    rank 1 at least; a level keeps the uniform ranks where those remove
    more.
    """
    k = len(clusters)
    cost = np.array([s + d for s in sizes], dtype=np.float64)
    tails = [np.append(np.cumsum(cl.evals[::-1])[::-1], 0.0) for cl in clusters]
    tops = [min(s, d, cl.evals.size) for s, cl in zip(sizes, clusters, strict=True)]
    owner = np.concatenate([np.full(max(t - 1, 0), c) for c, t in enumerate(tops)])
    ratio = np.concatenate(
        [
            cl.evals[1:t] / cost[c]
            for c, (cl, t) in enumerate(zip(clusters, tops, strict=True))
        ]
    )
    order = np.argsort(-ratio, kind="stable")  # ties: cluster, then rank order
    spent = np.cumsum(cost[owner[order]])

    def residual(ranks):
        return sum(
            tail[min(r, tail.size - 1)] for tail, r in zip(tails, ranks, strict=True)
        )

    levels = []
    for r in range(1, d + 1):
        uniform = [max(1, q) for q in _capped(r, sizes)]
        room = sum((q - 1) * cost[c] for c, q in enumerate(uniform))
        taken = int(np.searchsorted(spent, room, side="right"))
        shared = 1 + np.bincount(owner[order[:taken]], minlength=k)
        ranks = [int(q) for q in shared]
        levels.append(uniform if residual(ranks) > residual(uniform) else ranks)
    return levels


def _forms(module, bits, group_size):
    """Every form of a module with k = 1 factors, with its bytes (no errors)."""
    from ..quantize import form_nbytes

    n, d = _rows_cols(module)
    forms = [_Form("float", None, None, None, form_nbytes(module), 0.0)]
    for b in bits:
        groups = dict.fromkeys(_group(d, group_size, g) for g in _DENSE_GROUPS[b])
        for g in groups:
            forms.append(_Form("dense", b, g, None, form_nbytes(module, b, g)))
    return forms + _factor_forms([n], d, bits, group_size, _bias_numel(module))


def _cluster_counts(name, module, config):
    """The numbers of clusters of a module's projective forms.

    ``k`` unset: k = 1 and :data:`_CLUSTERS` for an Embedding of at least
    :data:`_CLUSTER_ROWS` rows under the global allocation, k = 1 for the
    others. A ``k`` given for the
    whole config applies to the Embedding modules (a Linear keeps k = 1);
    an override may give k > 1 to an Embedding only.
    """
    k, _ = config.module_settings(name)
    embedding = isinstance(module, nn.Embedding)
    overridden = any(
        "k" in o and fnmatch.fnmatchcase(name, p) for p, o in config.overrides.items()
    )
    if not embedding and not overridden:
        return (1,)
    if k is None:
        rows = module.num_embeddings if embedding else 0
        large = rows >= _CLUSTER_ROWS and config.allocation == "global"
        return (1, _CLUSTERS) if large else (1,)
    ks = (k,) if isinstance(k, int) else tuple(k)
    n, _ = _rows_cols(module)
    if not embedding and ks != (1,):
        raise ValueError(
            f"k={k!r} for {name!r}: with unit='bytes' the projective forms of "
            "a Linear are k = 1 factors; give k > 1 to Embedding modules only"
        )
    if max(ks) > n:
        raise ValueError(f"k={k!r} for {name!r}: at most its {n} rows (num_embeddings)")
    return tuple(dict.fromkeys(ks))


def _budget_bytes(budget, total):
    """Bytes a budget allows: a fraction of ``total``, or a byte count."""
    return math.floor(budget * total) if isinstance(budget, float) else int(budget)


def _check_bytes_feasible(config, names, named):
    """Each module's k = 1 forms (bytes only), checked against the budget.

    Also checks each module's numbers of clusters (:func:`_cluster_counts`).
    Forms with k > 1 clusters store more than k = 1 at the same rank, so
    the smallest form of a module is among these.
    """
    _check_group_size(config.group_size, names, named)
    for name in names:
        _cluster_counts(name, named[name], config)
    forms = {
        name: _forms(named[name], config.bits, config.group_size) for name in names
    }
    total = sum(f[0].nbytes for f in forms.values())
    least = {name: min(f.nbytes for f in forms[name]) for name in names}
    allowed = _budget_bytes(config.budget, total)
    if config.allocation == "global":
        need = sum(least.values())
        if need > allowed:
            raise ValueError(
                f"budget={config.budget} cannot be met in bytes for the "
                f"{len(names)} selected modules: their smallest forms need "
                f"{need} bytes, the budget allows {allowed} (budget >= "
                f"{need / total:.4g} of their {total} float32 bytes, or >= "
                f"{need} bytes)"
            )
    else:
        for name in names:
            own = forms[name][0].nbytes
            share = _budget_bytes(config.budget, total) * own / total
            if least[name] > share:
                raise ValueError(
                    f"budget={config.budget} cannot be met in bytes for "
                    f"{name!r}: its smallest form needs {least[name]} bytes, "
                    f"its share is {math.floor(share)} (budget >= "
                    f"{least[name] / own:.4g})"
                )
    return forms, allowed, total


# ---------------------------------------------------------------- errors


class _Measure:
    """The relative calibrated error of a module's weight replaced by another."""

    def __init__(self, module, objective):
        self.W = module.weight.detach().to("cpu", torch.float64).numpy()
        self.rows = None
        self.L = None
        if objective is not None and objective.row_weights is not None:
            self.rows = np.sqrt(np.asarray(objective.row_weights, dtype=np.float64))
        elif objective is not None:
            _, self.L = damped_moment(
                objective.input_moment, self.W.shape[1], objective.damping
            )
        self.total = self._energy(self.W)

    def _energy(self, A):
        if self.rows is not None:
            A = A * self.rows[:, None]
        elif self.L is not None:
            A = _whiten(A, self.L)
        return float(np.einsum("ij,ij->", A, A))

    def __call__(self, W_hat):
        W_hat = W_hat.detach().to("cpu", torch.float64).numpy()
        err = self._energy(self.W - W_hat)
        return err / self.total if self.total > 0 else 0.0

    def plain(self, W_hat):
        W_hat = W_hat.detach().to("cpu", torch.float64).numpy()
        total = float(np.einsum("ij,ij->", self.W, self.W))
        diff = self.W - W_hat
        return float(np.einsum("ij,ij->", diff, diff)) / total if total > 0 else 0.0


def _quantize_kw(module, objective, method="calibrated"):
    """Keywords of quantize_module_ for a module's objective."""
    kw = {"method": method}
    if objective is None:
        return kw
    if isinstance(module, (nn.Embedding,)) or objective.row_weights is not None:
        kw["token_weights"] = objective.row_weights
    else:
        kw["moment"] = objective.input_moment
        kw["damping"] = objective.damping
    return kw


def _dense_weight(layer):
    return layer.to_dense().weight if hasattr(layer, "to_dense") else layer.weight


def _fit_factors(module, name, objective, rank, options):
    """The k = 1 projective layer of a module at ``rank`` (output side)."""
    from ._compress import _fit_module

    layer = _fit_module(module, name, None, objective, 1, "output", options, None, rank)
    return layer.train(module.training)


class _Partition:
    """An Embedding's rows clustered into k subspaces, its factors at any rank.

    One :class:`kflats.KSubspaces` fit of the rows (weighted by the
    objective's token weights; columns whitened by a tied head's input
    moment), then each cluster's spectrum: the truncation error at a rank is
    exact, and the factors at a rank are built without another fit.
    """

    def __init__(self, module, objective, k, options):
        A = _weight_as_numpy(module.weight)
        self.w = None if objective is None else objective.row_weights
        self.L = None
        if objective is not None and objective.input_moment is not None:
            moment, damping = objective.input_moment, objective.damping
            self.L = damped_moment(moment, A.shape[1], damping)[1]
            A = _whiten(A, self.L).astype(A.dtype)
        self.A, self.module = A, module
        n, d = A.shape
        seed = _shared_seed(options.random_state)
        j = min(d - 1, max(1, d // 6))  # the flats' rank of the clustering
        labels = _partition(A, k, j, False, self.w, seed, options.fit_params, True)
        clusters = [c for c in _spectra(A, labels, k, self.w, False) if c.rows.size]
        clusters = self._refined(A, labels, clusters)
        self.clusters = [c for c in clusters if c.rows.size]
        self.sizes = [c.rows.size for c in self.clusters]
        self.k = len(self.clusters)
        self.denom = _total_energy(A, self.w)
        self.levels = _shared_ranks(self.clusters, self.sizes, d)

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
        budget = _kept_numbers(sizes, _capped(level, sizes), d, False)
        refined, _ = _refine(
            A, self.w, labels, clusters, ranks, budget, False, _REFINE_ROUNDS
        )
        return refined

    def ranks(self, rank):
        """Each cluster's rank at level ``rank`` (:func:`_shared_ranks`)."""
        return self.levels[rank - 1]

    def tail(self):
        """Relative truncation error at ranks 1 ... d (index r - 1)."""
        d = self.A.shape[1]
        return np.array(
            [
                _residual(self.clusters, self.ranks(r)) / self.denom
                if self.denom > 0
                else 0.0
                for r in range(1, d + 1)
            ]
        )

    def layer(self, rank):
        """The ProjectiveEmbedding of the clusters' factors at ``rank``."""
        ranks = self.ranks(rank)
        factors = _build(self.A, self.w, self.clusters, ranks, False, self.denom)
        if self.L is not None:
            V = tuple(_unwhiten(v, self.L, self.A.dtype) for v in factors.V)
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


class _ModuleForms:
    """One module's forms with their errors, and the layer of each form.

    ``forms`` are the module's k = 1 forms (:func:`_forms`); ``ks`` its
    numbers of clusters (:func:`_cluster_counts`). Dense forms are
    quantized and measured; projective forms take their errors from the
    spectra and the rounding noise measured at one probe rank per k and bit
    width. Layers are built once and kept (:meth:`layer`).
    """

    def __init__(self, module, name, objective, spectrum, forms, ks, config, options):
        from ..quantize import quantize_module_, quantized_tensors

        self.module, self.name = module, name
        self.objective, self.options = objective, options
        self.spectrum = spectrum
        self.measure = _Measure(module, objective)
        self.dense_q, self._layers = {}, {}
        self.partitions = {
            k: _Partition(module, objective, k, options) for k in ks if k > 1
        }
        kw = _quantize_kw(module, objective)
        out = [f for f in forms if f.kind != "projective" or 1 in ks]
        d = _rows_cols(module)[1]
        # clusters pay at low bits: wider codes go to dense forms first
        bits = [b for b in config.bits if b <= _CLUSTER_BITS] or config.bits
        for k, part in self.partitions.items():
            bias = _bias_numel(module)
            out += _factor_forms(
                part.sizes, d, bits, config.group_size, bias, k, part.ranks
            )
        for i, f in enumerate(out):
            if f.kind == "dense":
                q = copy.deepcopy(module)
                quantize_module_(q, f.bits, f.group_size, **kw)
                self.dense_q[f.bits, f.group_size] = quantized_tensors(q)["weight"]
                out[i] = f._replace(error=self.measure(q.weight))
        tails = {1: np.clip(1.0 - np.cumsum(spectrum.gains), 0.0, None)}
        tails.update({k: p.tail() for k, p in self.partitions.items()})
        noise = self._rounding_noise(out, tails)
        for i, f in enumerate(out):
            if f.kind == "projective":
                tail = tails[f.k]
                t = float(tail[f.rank - 1]) if f.rank <= tail.size else 0.0
                rho = 0.0 if f.bits is None else noise[(f.k, f.bits, f.group_size)]
                out[i] = f._replace(error=t + rho * (1.0 - t))
        self.forms = out

    def _rounding_noise(self, forms, tails):
        """Relative noise of quantized factors per (k, bits, group), at a probe rank.

        Measured on the k = 1 factors; factors with k > 1 clusters take the
        noise of k = 1 at the same bits and group (measured on their own
        factors only when k = 1 is not among the forms).
        """
        from ..quantize import quantize_module_

        by_bits = {}
        for f in forms:
            if f.kind == "projective" and f.bits is not None:
                by_bits.setdefault((f.k, f.bits, f.group_size), []).append(f.rank)
        kw = _quantize_kw(self.module, self.objective)
        noise = {}
        for (k, b, g), ranks in sorted(by_bits.items(), key=lambda kv: kv[0][0]):
            if k > 1 and (1, b, g) in noise:  # rounding noise, as with k = 1
                noise[(k, b, g)] = noise[(1, b, g)]
                continue
            ranks = np.asarray(ranks)
            r0 = int(ranks[np.argmin(np.abs(tails[k][ranks - 1] - _PROBE_ERROR))])
            layer = self._float_layer(k, r0)
            t0 = self.measure(_dense_weight(layer))
            q = copy.deepcopy(layer)
            quantize_module_(q, b, g, **kw)
            e = self.measure(_dense_weight(q))
            noise[(k, b, g)] = max(e - t0, 0.0) / max(1.0 - t0, 1e-12)
        return noise

    def _float_layer(self, k, rank):
        key = (k, rank)
        if key not in self._layers:
            if k == 1:
                self._layers[key] = _fit_factors(
                    self.module, self.name, self.objective, rank, self.options
                )
            else:
                self._layers[key] = self.partitions[k].layer(rank)
        return self._layers[key]

    def layer(self, form):
        """The projective layer of a form: its factors, quantized at its bits."""
        from ..quantize import quantize_module_

        key = (form.k, form.rank, form.bits, form.group_size)
        if key not in self._layers:
            layer = copy.deepcopy(self._float_layer(form.k, form.rank))
            if form.bits is not None:
                kw = _quantize_kw(self.module, self.objective)
                quantize_module_(layer, form.bits, form.group_size, **kw)
            self._layers[key] = layer
        return self._layers[key]

    def dense_weight(self, form):
        """The dequantized weight of a dense form."""
        qt = self.dense_q[form.bits, form.group_size]
        return torch.from_numpy(qt.dequantize()).to(self.module.weight.dtype)
