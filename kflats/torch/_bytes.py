"""Budgets in bytes: the forms of each module, their sizes and errors, one plan.

With ``unit="bytes"`` every selected module takes one of these forms:

- ``"float"``: kept as it is (float32), error 0;
- ``"dense"`` at ``b`` bits: its weight quantized group-wise
  (:func:`kflats.quantize.quantize_module_`, calibrated rounding: error fed
  forward along a Linear's input moment, token weights for an embedding);
- ``"projective"`` at rank ``r``: its k = 1 factors (the truncated SVD of the
  calibrated weight, output side for a Linear), stored in float32 or at
  ``b`` bits.

Sizes in bytes come from the one formula (:func:`kflats.quantize.form_nbytes`,
:func:`kflats.quantize.factors_nbytes`): what :func:`quantized_state` writes.
Errors are relative calibrated errors (token-weighted for an embedding,
``||(W - W_hat) L||^2 / ||W L||^2`` for a Linear), weighed by the module's
sensitivity as in the allocation of numbers:

- dense at ``b`` bits: measured, the weight quantized;
- float factors of rank ``r``: the tail of the module's spectrum (exact);
- factors of rank ``r`` at ``b`` bits: modelled as the truncation error plus
  relative noise on what the factors keep, ``t(r) + rho_b (1 - t(r))``, with
  ``rho_b`` measured once per module and bit width on its factors at one
  probe rank (the rank whose truncation error is about 5 %). The error of
  the form the plan chooses is measured after the fit (the report's
  ``error``).

The plan is the greedy "error gained per byte" of the allocation of numbers
(one allocator), over each module's lower convex hull of (bytes, error)
points: from the smallest form of every module, and from uniform quantization
of every module at each bit width that fits (the greedy then fills the bytes
left); uniform quantization at the widest bits that fit is a candidate too.
The lowest predicted error is never above uniform quantization's. The
predicted error adds the modules' errors linearly, which misjudges plans
that push a few modules far (measured on all-MiniLM-L6-v2 at 0.15 of the
float32 bytes: the lowest predicted plan held 0.9893 mean cosine on
held-out text, uniform int4 0.992). So with a calibration every candidate is
put in place and run on its probe batches, and the one whose output moves
least is kept: measured there, never worse than uniform quantization that
fits.
"""

import copy
import functools
import math
import time
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from ..factorize import damped_moment
from ..factorize._allocation import _greedy_fill
from ..factorize._linear import _whiten
from ..factorize._search import _search_options
from ._report import CompressionReport, ModuleReport
from ._sensitivity import _rows_cols, _sensitivities, _weight_spectrum

# group sizes of dense matrices by bit width (those of the uniform peers);
# factors use at most _FACTOR_GROUP, their ranks being its multiples
_DENSE_GROUPS = {8: 128, 6: 64, 4: 32, 3: 32, 2: 32}
_FACTOR_GROUP = 32
_MIN_GROUP = 8
# the probe rank of the factors' rounding noise: truncation error about this
_PROBE_ERROR = 0.05
# float factors: ranks on a grid of about this many steps
_FLOAT_STEPS = 48


class _Form(NamedTuple):
    """One way to store a module: its size in bytes and its relative error."""

    kind: str  # "float", "dense" or "projective"
    bits: int | None
    group_size: int | None
    rank: int | None
    nbytes: int
    error: float = math.nan


def _bias_numel(module):
    bias = getattr(module, "bias", None)
    return 0 if bias is None else bias.numel()


def _group(bits, length, group_size, cap):
    """The group size of a matrix with rows of ``length`` (``None``: one per row)."""
    if group_size is not None:
        return group_size
    g = min(_DENSE_GROUPS[bits], cap)
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


def _forms(module, bits, group_size):
    """Every form of a module, with its bytes (errors not yet known)."""
    from ..quantize import factors_nbytes, form_nbytes

    n, d = _rows_cols(module)
    bias = _bias_numel(module)
    forms = [_Form("float", None, None, None, form_nbytes(module), 0.0)]
    for b in bits:
        g = _group(b, d, group_size, _DENSE_GROUPS[b])
        forms.append(_Form("dense", b, g, None, form_nbytes(module, b, g)))
    top = min(n, d)
    step = max(1, top // _FLOAT_STEPS)
    for r in range(step, top + 1, step):
        size = factors_nbytes([n], [r], d, None, bias=bias)
        forms.append(_Form("projective", None, None, r, size))
    # groups of factors: at most a quarter of the largest rank, so that small
    # modules have several ranks to choose from
    cap = min(_FACTOR_GROUP, max(_MIN_GROUP, 1 << max(top // 4, 1).bit_length() - 1))
    for b in bits:
        g = _group(b, d, group_size, cap)
        step = g if g is not None else max(1, top // _FLOAT_STEPS)
        for r in range(step, top + 1, step):
            size = factors_nbytes([n], [r], d, b, g if g else None, bias=bias)
            forms.append(_Form("projective", b, g, r, size))
    return forms


def _budget_bytes(budget, total):
    """Bytes a budget allows: a fraction of ``total``, or a byte count."""
    return math.floor(budget * total) if isinstance(budget, float) else int(budget)


def _check_bytes_feasible(config, names, named):
    """Each module's forms (bytes only), checked against the budget."""
    _check_group_size(config.group_size, names, named)
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


def _measured_forms(module, name, forms, objective, spectrum, options):
    """The forms with their errors: measured, read off the spectrum, or modelled.

    Also returns the quantized weight of each dense form (to reuse if chosen).
    """
    from ..quantize import quantize_module_, quantized_tensors

    measure = _Measure(module, objective)
    tail = np.clip(1.0 - np.cumsum(spectrum.gains), 0.0, None)
    dense_q = {}
    out = []
    for f in forms:
        if f.kind == "dense":
            q = copy.deepcopy(module)
            quantize_module_(q, f.bits, f.group_size, **_quantize_kw(module, objective))
            dense_q[f.bits] = quantized_tensors(q)["weight"]
            out.append(f._replace(error=measure(q.weight)))
        else:
            out.append(f)
    # the factors' rounding noise, measured at one probe rank per bit width
    noise = {}
    by_bits = {}
    for f in out:
        if f.kind == "projective" and f.bits is not None:
            by_bits.setdefault((f.bits, f.group_size), []).append(f.rank)
    probes = {}
    for (b, g), ranks in by_bits.items():
        ranks = np.asarray(ranks)
        r0 = int(ranks[np.argmin(np.abs(tail[ranks - 1] - _PROBE_ERROR))])
        if r0 not in probes:
            probes[r0] = _fit_factors(module, name, objective, r0, options)
        layer = probes[r0]
        t0 = measure(_dense_weight(layer))
        q = copy.deepcopy(layer)
        quantize_module_(q, b, g, **_quantize_kw(module, objective))
        e = measure(_dense_weight(q))
        noise[(b, g)] = max(e - t0, 0.0) / max(1.0 - t0, 1e-12)
    final = []
    for f in out:
        if f.kind == "projective":
            t = float(tail[f.rank - 1]) if f.rank <= tail.size else 0.0
            rho = 0.0 if f.bits is None else noise[(f.bits, f.group_size)]
            f = f._replace(error=t + rho * (1.0 - t))
        final.append(f)
    return final, dense_q, measure


# ---------------------------------------------------------------- the plan


def _hull(forms, start=None):
    """Indices of the lower convex hull of (bytes, error), bytes increasing.

    With ``start``: the hull begins at that form, and holds only the forms
    larger and better than it.
    """
    idx = range(len(forms))
    if start is not None:
        s = forms[start]
        idx = [
            i for i in idx if forms[i].nbytes > s.nbytes and forms[i].error < s.error
        ]
        idx = [start, *idx]
    order = sorted(idx, key=lambda i: (forms[i].nbytes, forms[i].error))
    pareto = []
    for i in order:
        if not pareto:
            pareto.append(i)
        elif forms[i].error < forms[pareto[-1]].error:
            if forms[i].nbytes == forms[pareto[-1]].nbytes:
                continue  # pragma: no cover - sorted by error at equal bytes
            pareto.append(i)
    hull = []
    for i in pareto:
        while len(hull) >= 2:
            a, b = forms[hull[-2]], forms[hull[-1]]
            c = forms[i]
            # b on or above the segment a-c: not on the lower hull
            lhs = (b.error - a.error) * (c.nbytes - a.nbytes)
            rhs = (c.error - a.error) * (b.nbytes - a.nbytes)
            if lhs >= rhs:
                hull.pop()
            else:
                break
        hull.append(i)
    return hull


def _fill(all_forms, scales, hulls, allowed):
    """Greedy by error gained per byte along each hull: chosen form indices."""
    gains, costs = [], []
    for forms, s, hull in zip(all_forms, scales, hulls, strict=True):
        e = np.array([forms[i].error for i in hull])
        b = np.array([forms[i].nbytes for i in hull], dtype=np.int64)
        gains.append(s * (e[:-1] - e[1:]))
        costs.append(np.diff(b))
    room = allowed - sum(
        forms[h[0]].nbytes for forms, h in zip(all_forms, hulls, strict=True)
    )
    if room < 0:
        return None
    steps, _, _ = _greedy_fill(gains, costs, [0] * len(hulls), room)
    return [h[r] for h, r in zip(hulls, steps, strict=True)]


def _predicted(all_forms, scales, chosen):
    return float(
        sum(s * f[i].error for f, s, i in zip(all_forms, scales, chosen, strict=True))
    )


def _uniform(all_forms, bits):
    """Each module's form at ``bits``, dense."""
    return [
        next(i for i, f in enumerate(forms) if f.kind == "dense" and f.bits == bits)
        for forms in all_forms
    ]


def _plan_candidates(all_forms, scales, allowed, bits):
    """Plans under ``allowed`` bytes, the lowest predicted error first.

    The greedy from the smallest forms; from uniform quantization at each bit
    width that fits, the greedy filling the bytes left; and uniform
    quantization itself at the widest bits that fit.
    """
    candidates = []
    chosen = _fill(all_forms, scales, [_hull(f) for f in all_forms], allowed)
    if chosen is not None:
        candidates.append(chosen)
    fitting = []
    for b in bits:
        starts = _uniform(all_forms, b)
        hulls = [_hull(f, s) for f, s in zip(all_forms, starts, strict=True)]
        chosen = _fill(all_forms, scales, hulls, allowed)
        if chosen is not None:
            candidates.append(chosen)
            fitting.append(b)
    if fitting:
        candidates.append(_uniform(all_forms, max(fitting)))
    unique = []
    for c in candidates:
        if c not in unique:
            unique.append(c)
    return sorted(unique, key=lambda c: _predicted(all_forms, scales, c))


def _plan_bytes(all_forms, scales, allowed, bits):
    """The chosen form index of each module, under ``allowed`` bytes.

    Greedy from the smallest forms, and from uniform quantization at each bit
    width that fits; the lowest predicted error wins.
    """
    return _plan_candidates(all_forms, scales, allowed, bits)[0]


def _plan_uniform(forms, allowed_share):
    """The best form of one module within its own share of bytes."""
    fits = [i for i, f in enumerate(forms) if f.nbytes <= allowed_share]
    return min(fits, key=lambda i: (forms[i].error, forms[i].nbytes))


# ---------------------------------------------------------------- compress


def _fitted_form(name, form, named, objectives, options, cache=None):
    """The projective layer of a module's form: fitted, then quantized."""
    from ..quantize import quantize_module_

    key = (name, form.rank, form.bits, form.group_size)
    if cache is not None and key in cache:
        return cache[key]
    module = named[name]
    layer = _fit_factors(module, name, objectives[name], form.rank, options)
    if form.bits is not None:
        quantize_module_(
            layer, form.bits, form.group_size, **_quantize_kw(module, objectives[name])
        )
    if cache is not None:
        cache[key] = layer
    return layer


def _best_on_probe(model, named, plans, dense_q, fit, fitted, probe):
    """Index of the plan whose model moves least from the original on the probe.

    Each plan is put in place in turn (dense forms as their dequantized
    weights, projective forms as their layers), the calibration's probe
    batches run, and the model is always restored.
    """
    from ._sensitivity import _final_outputs, _output_distortion, _probe_batches

    batches = _probe_batches(model, probe)
    was_training = model.training
    model.eval()
    saved = {n: named[n].weight.detach().clone() for n in plans[0]}
    scores = []
    try:
        reference = _final_outputs(model, batches)
        for plan in plans:
            swapped = {}
            try:
                with torch.no_grad():
                    for name, form in plan.items():
                        if form.kind == "dense":
                            qt = dense_q[name][form.bits]
                            w = torch.from_numpy(qt.dequantize())
                            named[name].weight.copy_(w.to(saved[name].dtype))
                        elif form.kind == "projective":
                            layer = fit(name, form, cache=fitted)
                            parent, _, child = name.rpartition(".")
                            owner = model.get_submodule(parent)
                            swapped[name] = (owner, child, getattr(owner, child))
                            setattr(owner, child, layer)
                outputs = _final_outputs(model, batches)
                scores.append(_output_distortion(outputs, reference))
            finally:
                for owner, child, original in swapped.values():
                    setattr(owner, child, original)
                with torch.no_grad():
                    for name, weight in saved.items():
                        named[name].weight.copy_(weight)
    finally:
        model.train(was_training)
    return int(np.argmin(scores))


def _check_bytes_config(config, sample_weight):
    """Settings that the forms of a budget in bytes do not take."""
    if config.k not in (None, 1) or any("k" in o for o in config.overrides.values()):
        raise ValueError(
            f"k={config.k!r}: with unit='bytes' the projective forms are k = 1 "
            "factors; leave k unset (or 1)"
        )
    if config.affine:
        raise ValueError("affine=True: the forms of unit='bytes' are linear flats")
    if sample_weight is not None:
        raise ValueError(
            "sample_weight is not used with unit='bytes'; give a calibration"
        )


def _compress_bytes(model, names, named, config, objectives, calibration, progress):
    """compress with a budget in bytes: plan the forms, fit them, swap them in."""
    from ..quantize import form_nbytes

    forms, allowed, total = _check_bytes_feasible(config, names, named)
    options = _search_options(
        config.ranks,
        config.affine,
        config.random_state,
        config.n_refine,
        config.fit_params,
    )
    spectra = {n: _weight_spectrum(named[n], objectives[n]) for n in names}
    measured, dense_q, measures = {}, {}, {}
    from ._compress import _progress_bar

    bar = _progress_bar(names, named, progress)
    try:
        for name in names:
            if bar is not None:
                bar.set_postfix_str(name)
            measured[name], dense_q[name], measures[name] = _measured_forms(
                named[name], name, forms[name], objectives[name], spectra[name], options
            )
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    probe = calibration.probe if calibration is not None else None
    scale = {}
    if probe and len(names) > 1 and config.allocation == "global":
        scale = _sensitivities(model, names, named, spectra, probe)
    order = sorted(names)  # ties do not depend on the order of the targets
    all_forms = [measured[n] for n in order]
    scales = [scale.get(n, 1.0) for n in order]
    fitted = {}  # projective forms fitted: (name, rank, bits) -> layer
    if config.allocation == "global":
        candidates = _plan_candidates(all_forms, scales, allowed, config.bits)
        picks = candidates[0]
        if probe and len(candidates) > 1:
            plans = [
                {n: measured[n][i] for n, i in zip(order, c, strict=True)}
                for c in candidates
            ]
            fit = functools.partial(
                _fitted_form, named=named, objectives=objectives, options=options
            )
            best = _best_on_probe(model, named, plans, dense_q, fit, fitted, probe)
            picks = candidates[best]
    else:
        picks = [_plan_uniform(f, allowed * f[0].nbytes / total) for f in all_forms]
    choice = {n: measured[n][i] for n, i in zip(order, picks, strict=True)}
    # fit every chosen form; the model is changed only when all succeeded
    reports, layers, records = [], {}, {}
    for name in names:
        module, form = named[name], choice[name]
        start = time.perf_counter()
        measure = measures[name]
        before = form_nbytes(module)
        entry = {"k": 0, "ranks": (), "side": None, "form": "dense"}
        n, d = _rows_cols(module)
        numbers = n * d + _bias_numel(module)
        entry.update(params_after=numbers, bits=form.bits, group_size=form.group_size)
        if form.kind == "float":
            entry.update(error=0.0, weight_error=0.0, bytes_after=before)
        elif form.kind == "dense":
            qt = dense_q[name][form.bits]
            w = torch.from_numpy(qt.dequantize()).to(module.weight.dtype)
            records[name] = qt
            entry.update(error=form.error, weight_error=measure.plain(w))
            entry["bytes_after"] = form_nbytes(module, form.bits, form.group_size)
        else:
            layer = _fitted_form(name, form, named, objectives, options, fitted)
            layers[name] = layer
            w = _dense_weight(layer)
            entry.update(
                k=1,
                ranks=tuple(layer.ranks),
                side=layer.side if hasattr(layer, "side") else None,
            )
            entry.update(form="projective", error=measure(w))
            entry.update(weight_error=measure.plain(w))
            entry["params_after"] = layer.n_params + _bias_numel(module)
            entry["bytes_after"] = form_nbytes(layer, form.bits, form.group_size)
        reports.append(
            ModuleReport(
                name=name,
                kind="Embedding" if isinstance(module, nn.Embedding) else "Linear",
                shape=(n, d),
                params_before=numbers,
                seconds=time.perf_counter() - start,
                bytes_before=before,
                **entry,
            )
        )
    # swap
    from ..quantize import record_quantized_

    for name, qt in records.items():
        module = named[name]
        with torch.no_grad():
            module.weight.copy_(torch.from_numpy(qt.dequantize()))
        record_quantized_(module, {"weight": qt})
    from ._models import swap

    swap(model, layers.items())  # ties the new layers break stay tied
    return CompressionReport(reports, config=config)
