"""The forms of one module under a budget in bytes, measured: errors and layers.

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

import numpy as np
import torch
from torch import nn

from kflats._threads import map_threads
from kflats.torch.compression._file_formats import _file_format
from kflats.torch.compression._fit import _fit_module
from kflats.torch.compression._folder_bytes import factor_side
from kflats.torch.compression._forms import (
    _CLUSTER_BITS,
    _bias_numel,
    _factor_forms,
    grid_options,
)
from kflats.torch.compression._measure import _Measure, _quantize_kw
from kflats.torch.compression._partition import _Partition
from kflats.torch.compression._sensitivity import PROBE_ERROR, _rows_cols
from kflats.torch.layers import (
    dense_weight,
    quantize_module_,
    quantized_tensors,
)


def _weight_of(layer):
    """The dense ``(out, in)`` weight a layer computes with (a projective
    layer's product)."""
    return (
        layer.to_dense().weight if hasattr(layer, "to_dense") else dense_weight(layer)
    )


def _fit_factors(module, name, objective, rank, options):
    """The k = 1 projective layer of a module at ``rank`` (output side)."""
    layer = _fit_module(module, name, None, objective, 1, "output", options, None, rank)
    return layer.train(module.training)


class _ModuleForms:
    """One module's forms with their errors, and the layer of each form.

    ``forms`` are the module's k = 1 forms (:func:`_forms`); ``ks`` its
    numbers of clusters (:func:`_cluster_counts`). Dense forms are
    quantized and measured; projective forms take their errors from the
    spectra and the rounding noise measured at one probe rank per k and bit
    width. Layers are built once and kept (:meth:`layer`).
    """

    def __init__(
        self, module, name, objective, spectrum, forms, ks, config, options, lazy=False
    ):

        self.module, self.name = module, name
        self.objective, self.options = objective, options
        self.spectrum = spectrum
        # factors with k > 1 clusters (a large table's, where they pay) take
        # compact scales wherever the file format stores them
        self.compact = _file_format(config).compact_scales
        self._measure = None
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
                part.sizes,
                d,
                bits,
                config.group_size,
                bias,
                k,
                part.ranks,
                (self.compact,),
                factor_side(module),
            )
        out = self._dense_forms(out, kw)
        tails = {}  # no spectrum: no factor form (a file format without them)
        if spectrum is not None:
            tails[1] = np.clip(1.0 - np.cumsum(spectrum.gains), 0.0, None)
        tails.update({k: p.tail() for k, p in self.partitions.items()})
        self.tails, self.noise = tails, {}
        self.forms = _undominated(out, tails)
        # the rounding noise of each (k, bits, group) of quantized factors
        self.pending = {
            _noise_key(f)
            for f in self.forms
            if f.kind == "projective" and f.bits is not None
        }
        large = module.weight.numel() > _MEASURED_NOISE
        if lazy and (large or not isinstance(module, nn.Embedding)):
            self.noise.update(self._dense_noise(any_k=large))
            self.pending -= set(self.noise)
        if not lazy:
            self.measure_noise(set(self.pending))
        else:  # their truncation error, a lower bound, until measured
            self._set_errors(self.noise)

    def _dense_noise(self, any_k=False):
        """A Linear's factors at ``b`` bits: the relative rounding noise of its
        own weight at ``b`` bits (its dense form of the nearest groups).

        Measuring each module's factors costs a fit and a quantization per
        bit width (about 5 s a module on SmolLM2's, against 2 s for all its
        dense forms), and a model's many Linear modules rarely keep factors
        under a budget in bytes; the noise of the same matrix rounded at the
        same width stands for it. Tables, whose clusters pay, are measured,
        but for those of more than :data:`_MEASURED_NOISE` entries
        (``any_k``: their factors with k clusters too), whose measure takes
        a gigabyte (SmolLM2's 49,152 x 576 table: its coefficients rounded
        in float64, refitted, rounded again).
        """
        out = {}
        dense = [f for f in self.forms if f.kind == "dense" and f.zero_dtype == "uint8"]
        for k, b, g in self.pending:
            same = [f for f in dense if f.bits == b]
            if (k == 1 or any_k) and same:
                near = min(same, key=lambda f: abs(np.log(f.group_size / (g or 1))))
                out[k, b, g] = near.error
        return out

    def measure_noise(self, keys):
        """Measure the rounding noise of the quantized factors of ``keys``
        (``(k, bits, group_size)``), and set their forms' errors."""
        keys = set(keys) & self.pending
        if keys:
            available = {_noise_key(f) for f in self.forms if f.kind == "projective"}
            # factors with k > 1 clusters take k = 1's noise wherever the
            # module has k = 1 forms at the same bits and groups: measured
            # once, whichever k a plan asks for first
            shared = {(k, b, g) for k, b, g in keys if k > 1 and (1, b, g) in available}
            asked = (keys - shared) | {(1, b, g) for _, b, g in shared}
            asked -= set(self.noise)
            measured, modelled = _noise_plan(asked, set(self.noise), available)
            forms = [f for f in self.forms if _noise_key(f) in measured]
            self.noise.update(self._rounding_noise(forms, self.tails))
            self.noise.update(_modelled_noise(modelled, self.noise))
            self.noise.update({(k, b, g): self.noise[1, b, g] for k, b, g in shared})
            self.pending -= keys | asked | measured
            self._layers, self._measure = {}, None  # made to measure it
        self._set_errors(self.noise)

    def _set_errors(self, noise):
        """Each factor form's error: truncation error and rounding noise
        (none until measured: the truncation error alone)."""
        out = []
        for f in self.forms:
            if f.kind == "projective":
                tail = self.tails[f.k]
                t = float(tail[f.rank - 1]) if f.rank <= tail.size else 0.0
                rho = 0.0 if f.bits is None else noise.get(_noise_key(f), 0.0)
                f = f._replace(error=t + rho * (1.0 - t))
            out.append(f)
        self.forms = out

    def is_pending(self, form):
        """Whether a form's error is still its lower bound (noise not measured)."""
        return form.kind == "projective" and _noise_key(form) in self.pending

    def _dense_forms(self, forms, kw):
        """The forms, the dense ones quantized and measured, side by side.

        By size: once a form's error is negligible (:data:`_NEGLIGIBLE`: a
        weight already on its grid, as a GGUF file's Q4_1 weights are on
        4 bits with float16 zero points), the larger dense forms, which can
        do no better, are dropped unmeasured.
        """
        measure = self.measure
        dense = sorted(
            (i for i, f in enumerate(forms) if f.kind == "dense"),
            key=lambda i: forms[i].nbytes,
        )
        out, exact, done = list(forms), None, 0
        while done < len(dense):
            # the first alone (it factors the moment the others reuse), then
            # the forms of at most 4 bits, then the wider
            if done == 0:
                wave = dense[:1]
            else:
                wave = [i for i in dense[done:] if forms[i].bits <= 4] or dense[done:]
            modelled = self._modelled(out, wave)
            wave = [i for i in wave if i not in modelled]
            results = map_threads(lambda i: self._dense(forms[i], kw, measure), wave)
            for i, f in [*zip(wave, results, strict=True), *modelled.items()]:
                out[i] = f
                if f.error <= _NEGLIGIBLE and exact is None:
                    exact = f.nbytes
            wave += list(modelled)
            dense = dense[:done] + wave + [i for i in dense[done:] if i not in wave]
            done += len(wave)
            if exact is not None:  # the rest, larger: dropped
                rest = [i for i in dense[done:] if forms[i].nbytes > exact]
                dense = [i for i in dense if i not in rest]
        measured = {i for i in dense}
        return [f for i, f in enumerate(out) if f.kind != "dense" or i in measured]

    def _modelled(self, forms, wave):
        """The forms of ``wave`` wider than 4 bits whose error follows from a
        measured 4-bit form of the same groups: modelled, not quantized."""
        four = {
            (f.group_size, f.zero_dtype): f.error
            for f in forms
            if f.kind == "dense" and f.bits == _MODEL_FROM and np.isfinite(f.error)
        }
        out = {}
        for i in wave:
            f = forms[i]
            e = four.get((f.group_size, f.zero_dtype))
            if f.bits > _MODEL_FROM and e is not None and e > _NEGLIGIBLE:
                out[i] = f._replace(error=e * _step_ratio(_MODEL_FROM, f.bits))
        return out

    def _dense(self, form, kw, measure):
        """A dense form quantized, kept, and its error measured."""
        q = copy.deepcopy(self.module)
        quantize_module_(q, form.bits, form.group_size, **grid_options(form), **kw)
        self.dense_q[_dense_key(form)] = quantized_tensors(q)["weight"]
        return form._replace(error=measure(dense_weight(q)))

    def quantized(self, form):
        """The packed weight of a dense form (quantized now if it was modelled)."""
        key = _dense_key(form)
        if key not in self.dense_q:
            self._dense(form, _quantize_kw(self.module, self.objective), self.measure)
        return self.dense_q[key]

    @property
    def measure(self):
        """The module's :class:`_Measure` (made again after :meth:`release`)."""
        if self._measure is None:
            self._measure = _Measure(self.module, self.objective)
        return self._measure

    def release(self, keep, spectrum=False):
        """Drop what the plan no longer needs: a module's weight in float64, its
        moment's factor, the layers fitted to measure noise, the spectrum's
        directions (unless ``spectrum``), and the quantized dense forms
        other than ``keep`` (forms)."""
        self._measure = None
        self._layers = {}
        if not spectrum and self.spectrum is not None:
            self.spectrum = self.spectrum._replace(V=None, L=None)
        wanted = {_dense_key(f) for f in keep if f.kind == "dense"}
        self.dense_q = {k: q for k, q in self.dense_q.items() if k in wanted}

    def _rounding_noise(self, forms, tails):
        """Relative noise of quantized factors per (k, bits, group), at a probe rank.

        Measured on the k = 1 factors; factors with k > 1 clusters take the
        noise of k = 1 at the same bits and group (:meth:`measure_noise`
        asks for k = 1's wherever the module has k = 1 forms there; measured
        on their own factors only where it has none).
        """

        by_bits, compact = {}, set()  # the ranks of each key; keys stored compact
        for f in forms:
            if f.kind == "projective" and f.bits is not None:
                by_bits.setdefault((f.k, f.bits, f.group_size), []).append(f.rank)
                if f.compact:
                    compact.add((f.k, f.bits, f.group_size))
        kw = _quantize_kw(self.module, self.objective)
        noise = {}
        for (k, b, g), ranks in sorted(by_bits.items(), key=lambda kv: kv[0][0]):
            if k > 1 and (1, b, g) in noise:  # rounding noise, as with k = 1
                noise[(k, b, g)] = noise[(1, b, g)]
                continue
            ranks = np.asarray(ranks)
            r0 = int(ranks[np.argmin(np.abs(tails[k][ranks - 1] - PROBE_ERROR))])
            layer = self._float_layer(k, r0)
            t0 = self.measure(_weight_of(layer))
            q = copy.deepcopy(layer)
            quantize_module_(q, b, g, compact_scales=(k, b, g) in compact, **kw)
            e = self.measure(_weight_of(q))
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

        key = (form.k, form.rank, form.bits, form.group_size)
        if key not in self._layers:
            layer = copy.deepcopy(self._float_layer(form.k, form.rank))
            if form.bits is not None:
                kw = _quantize_kw(self.module, self.objective)
                kw["compact_scales"] = form.compact
                quantize_module_(layer, form.bits, form.group_size, **kw)
            self._layers[key] = layer
        return self._layers[key]

    def dense_weight(self, form):
        """The dequantized weight of a dense form, as the module stores it."""
        qt = self.quantized(form)
        return torch.from_numpy(qt.dequantize()).to(self.module.weight.dtype)


# modules above this many entries take the rounding noise of their factors
# from their dense forms (see _ModuleForms._dense_noise)
_MEASURED_NOISE = 1 << 24
# a relative error this small is a weight kept as it is (a float16 offset of a
# GGUF Q4_1 block: about 3e-7 of SmolLM2's weights)
_NEGLIGIBLE = 1e-6
# the dense forms wider than this many bits take their error from the measured
# form of this many bits (same groups): a grid of b bits has 2**b - 1 steps, its
# rounding noise the square of a step (_step_ratio); on MiniLM's 36 Linears
# (calibrated, groups of 128) the model gives 0.74-0.98 of the measured error
# at 6 and 8 bits (median 0.94); the forms a plan takes are quantized then
_MODEL_FROM = 4


def _step_ratio(bits, wider):
    """The rounding noise at ``wider`` bits over the noise at ``bits``."""
    return ((2**bits - 1) / (2**wider - 1)) ** 2


def _noise_plan(keys, known, available):
    """The rounding noise of quantized factors to measure, and the rest modelled.

    ``keys``: the ``(k, bits, group_size)`` asked for; ``known``: those
    measured already; ``available``: those of the module's forms (a width
    is measured only where the module has forms at it). Returns
    ``(measured, modelled)``, ``modelled`` mapping a key to the measured
    keys its noise follows from (:func:`_modelled_noise`): a width wider
    than :data:`_MODEL_FROM` bits from that width (``rho_4`` times
    :func:`_step_ratio`), 3 bits from 2 and 4 (their geometric mean: the
    noise falls by about the same factor from each width to the next),
    where that measures no more widths than measuring each key would. On
    all-MiniLM-L6-v2's table (k = 16 clusters, calibrated, groups of 32,
    ranks 96 and 192) the mean gives 0.0474 and 0.0408 where 3 bits
    measure 0.0486 and 0.0413, and ``rho_4`` times the step ratio 0.0023
    where 5 bits measure 0.0025.
    """
    measured, modelled = set(), {}
    asked = set(known) | set(keys)
    for k, b, g in sorted(keys):
        two, four = (k, 2, g), (k, _MODEL_FROM, g)
        if b > _MODEL_FROM and four in available:
            modelled[k, b, g] = (four,)
        elif b == 3 and {two, four} <= available and asked & {two, four}:
            modelled[k, b, g] = (two, four)
        else:
            measured.add((k, b, g))
    for anchors in modelled.values():
        measured.update(a for a in anchors if a not in known)
    return measured, modelled


def _modelled_noise(modelled, noise):
    """The noise of each modelled key from its measured ones (:func:`_noise_plan`)."""
    out = {}
    for (k, b, g), anchors in modelled.items():
        if len(anchors) == 1:
            out[k, b, g] = noise[anchors[0]] * _step_ratio(_MODEL_FROM, b)
        else:
            out[k, b, g] = float(np.sqrt(noise[anchors[0]] * noise[anchors[1]]))
    return out


# bytes by which a form must be smaller than a factor form to rule it out: more
# than the difference of their header entries in the folder
_HEADER_SLACK = 1024


def _undominated(forms, tails):
    """The forms, less the factor forms that a measured form beats outright.

    A factor form's error is at least its truncation error (the tail of the
    spectrum at its rank): a float or dense form as small (by
    :data:`_HEADER_SLACK` bytes, its header entries included) and no worse
    than that is never worse than it, and no plan takes it. Their rounding
    noise is then not measured.
    """
    measured = [(f.nbytes, f.error) for f in forms if f.kind != "projective"]

    def beaten(f):
        tail = tails[f.k]
        least = float(tail[f.rank - 1]) if f.rank <= tail.size else 0.0
        return any(b + _HEADER_SLACK <= f.nbytes and e <= least for b, e in measured)

    return [f for f in forms if f.kind != "projective" or not beaten(f)]


def _noise_key(form):
    """What a factor form's rounding noise is measured for: k, bits, groups."""
    return form.k, form.bits, form.group_size


def _dense_key(form):
    """What tells a module's dense forms apart: bits, groups, zero points and
    scales."""
    return form.bits, form.group_size, form.zero_dtype, form.compact
