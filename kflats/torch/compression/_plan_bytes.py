"""Budgets in bytes: one plan of every module's form, fitted and swapped in.

The budget is a size of the folder's weight files
(:mod:`kflats.torch.compression._folder_bytes`): the tensors outside the
selected modules and the headers are paid first, and the modules share what
is left. Each selected module's forms (:mod:`kflats.torch.compression._forms`:
float32, dense at ``b`` bits, projective factors with k clusters at rank
``r`` and ``b`` bits) come with their bytes in the folder (tensors and header
entries) and calibrated errors, weighed by the module's sensitivity as in the
allocation of numbers.

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

import time

import numpy as np
import torch
from torch import nn

from kflats.factorize._allocation import greedy_fill
from kflats.torch.compression._config import _search_options_of
from kflats.torch.compression._file_formats import FORMATS
from kflats.torch.compression._fisher import fisher_sensitivities, has_logits
from kflats.torch.compression._form_errors import (
    _ModuleForms,
    _noise_key,
)
from kflats.torch.compression._forms import (
    _bias_numel,
    _check_bytes_feasible,
    _cluster_counts,
    _held,
    grid_options,
)
from kflats.torch.compression._probe_plans import best_on_probe, checked_plans
from kflats.torch.compression._report import (
    CompressionReport,
    ModuleReport,
    Phases,
    _trim,
)
from kflats.torch.compression._sensitivity import (
    _PROGRESS_NUMBERS,
    _bar,
    _probe_batches,
    _rows_cols,
    _sensitivities,
    _weight_spectrum,
)
from kflats.torch.layers import form_nbytes, is_conv1d, record_quantized_
from kflats.torch.models import swap


class BytesPlanner:
    """A budget in bytes: every module's form planned, fitted and swapped in.

    The planner of ``CompressionConfig(unit="bytes")``: :meth:`check`
    before anything is measured, :meth:`compress` for the rest.
    """

    unit = "bytes"

    @staticmethod
    def check(config, names, named, sample_weight):
        """Raise on settings the forms do not take, or a budget below the
        smallest forms."""
        _check_bytes_config(config, sample_weight)
        _check_bytes_feasible(config, names, named)

    @staticmethod
    def compress(
        model, names, named, config, objectives, calibration, sample_weight, progress
    ):
        """Measure the forms, plan, fit, swap in; the :class:`CompressionReport`."""
        return _compress_bytes(
            model, names, named, config, objectives, calibration, progress
        )


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
    steps, _, _ = greedy_fill(gains, costs, [0] * len(hulls), room)
    return [h[r] for h, r in zip(hulls, steps, strict=True)]


def _predicted(all_forms, scales, chosen):
    return float(
        sum(s * f[i].error for f, s, i in zip(all_forms, scales, chosen, strict=True))
    )


def _uniform(all_forms, bits, smallest=False):
    """Each module's form at ``bits``, dense: in the uniform peers' groups (its
    first dense form at ``bits``), or, ``smallest``, in its widest groups."""

    def pick(forms):
        dense = [i for i, f in enumerate(forms) if f.kind == "dense" and f.bits == bits]
        return min(dense, key=lambda i: forms[i].nbytes) if smallest else dense[0]

    return [pick(forms) for forms in all_forms]


def _plan_candidates(all_forms, scales, allowed, bits):
    """Plans under ``allowed`` bytes, the lowest predicted error first.

    The greedy from the smallest forms; from uniform quantization at each bit
    width that fits (in the peers' groups, and in the widest groups), the
    greedy filling the bytes left; each of these among all forms and among
    the forms without factors; and uniform quantization itself at the
    widest bits that fit.
    """
    # among dense forms alone too: a factor form's error is modelled (its
    # truncation, exact in its module's metric, plus rounding noise), and the
    # metric can misjudge it (SmolLM2's tied table at rank 448 of 576: 0.004
    # of its whitened energy, KL 0.31 on its own); the probe weighs the plans
    candidates, fitting = [], set()
    for hull in (_hull, _dense_hull):
        chosen = _fill(all_forms, scales, [hull(f) for f in all_forms], allowed)
        if chosen is not None:
            candidates.append(chosen)
        for b in bits:
            if not all(
                any(f.kind == "dense" and f.bits == b for f in fs) for fs in all_forms
            ):
                continue  # a width the file format does not hold for every module
            for smallest in (False, True):
                starts = _uniform(all_forms, b, smallest)
                hulls = [hull(f, s) for f, s in zip(all_forms, starts, strict=True)]
                chosen = _fill(all_forms, scales, hulls, allowed)
                if chosen is not None:
                    candidates.append(chosen)
                    if not smallest:
                        fitting.add(b)
    if fitting:
        candidates.append(_uniform(all_forms, max(fitting)))
    unique = []
    for c in candidates:
        if c not in unique:
            unique.append(c)
    return sorted(unique, key=lambda c: _predicted(all_forms, scales, c))


def _dense_hull(forms, start=None):
    """:func:`_hull` of the forms without factors (indices into ``forms``)."""
    keep = [i for i, f in enumerate(forms) if f.kind != "projective"]
    start = None if start is None else keep.index(start)
    return [keep[j] for j in _hull([forms[i] for i in keep], start)]


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


def _check_bytes_config(config, sample_weight):
    """Settings that the forms of a budget in bytes do not take."""
    if config.affine:
        raise ValueError("affine=True: the forms of unit='bytes' are linear flats")
    if sample_weight is not None:
        raise ValueError(
            "sample_weight is not used with unit='bytes'; give a calibration"
        )


def _compress_bytes(model, names, named, config, objectives, calibration, progress):
    """compress with a budget in bytes: measure the forms, plan, fit, swap in."""
    phases = Phases(_shown(names, named, progress))
    forms, budget = _check_bytes_feasible(config, names, named)
    probe = calibration.probe if calibration is not None else None
    # the spectra's directions serve the probe of sensitivities only
    spectra = bool(probe) and not has_logits(model)
    with phases("form errors"):
        measured = _measure_all(
            names, named, forms, objectives, config, progress, budget, spectra
        )
    choice = _choose(model, names, named, measured, config, probe, budget, phases)
    # every chosen form built and reported; the model changes only after
    reports, layers, records = [], {}, {}
    with phases("fit"):
        for name in names:
            start = time.perf_counter()
            report, layer = _chosen(name, named[name], choice[name], measured[name])
            if report.form == "projective":
                layers[name] = layer
            elif report.bits is not None:
                records[name] = measured[name].quantized(choice[name])
            reports.append(report._replace(seconds=time.perf_counter() - start))
            measured[name].release(())
    tensors = budget.rest + sum(r.bytes_after for r in reports)
    headers = budget.frame + sum(budget.header(n, choice[n]) for n in names)
    if tensors + headers > budget.asked:  # pragma: no cover - a kflats bug
        raise RuntimeError(
            f"the plan's folder ({tensors} bytes of tensors, {headers} of headers) "
            f"is over the {budget.asked} bytes asked; the model is unchanged"
        )
    _swap_in(model, named, records, layers)
    return CompressionReport(
        reports,
        config=config,
        size_asked=budget.asked,
        model_bytes=tensors,
        header_bytes=headers,
        seconds=phases.seconds,
    )


def _shown(names, named, progress):
    """Whether the phases are printed: as the progress bars are shown."""
    if progress is not None:
        return bool(progress)
    return sum(named[n].weight.numel() for n in names) > _PROGRESS_NUMBERS


def _measure_all(
    names, named, forms, objectives, config, progress, budget, spectra=True
):
    """Each module's :class:`_ModuleForms`, behind a progress bar.

    Once a module is measured, it keeps what a plan may take of it: its
    forms, the quantized dense forms that a plan can choose (those on its
    hulls, :func:`_plannable`), and its spectrum's directions when
    ``spectra`` (for the probe of sensitivities); the rest is freed, so
    that memory does not grow with the modules measured.
    """
    options = _search_options_of(config)
    measured = {}
    bar = _bar(names, named, progress, "kflats compress")
    try:
        for name in names:
            if bar is not None:
                bar.set_postfix_str(name)
            module, objective = named[name], objectives[name]
            # a file format that holds no factor form (GGUF): no spectrum, no
            # partition of a table into clusters, dense forms alone
            factors = any(
                f.kind == "projective" and FORMATS[config.format].holds(module, f)
                for f in forms[name]
            )
            measured[name] = _ModuleForms(
                module,
                name,
                objective,
                _weight_spectrum(module, objective) if factors or spectra else None,
                forms[name] if factors else _no_factors(forms[name]),
                _cluster_counts(name, module, config) if factors else (),
                config,
                options,
                lazy=True,
            )
            # the k > 1 forms too: only those the file format holds
            held = measured[name].forms = _held(module, measured[name].forms, config)
            # a plan takes a dense form on the hulls of the measured forms (the
            # factor forms whose noise is pending can only lose ground)
            known = [f for f in held if not measured[name].is_pending(f)]
            priced = [budget.priced(name, f) for f in known]
            keep = [known[i] for i in _plannable(priced, config.bits)]
            measured[name].release(keep, spectrum=spectra)
            if module.weight.numel() > 1 << 22:  # a table's temporaries: back
                _trim()
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return measured


def _no_factors(forms):
    return [f for f in forms if f.kind != "projective"]


def _plannable(forms, bits):
    """Indices of the forms a plan can take: on the module's lower hull, or
    on its hull from a uniform start (:func:`_plan_candidates`), those starts
    included; each among all its forms and among those without factors."""
    keep = set(_hull(forms)) | set(_dense_hull(forms))
    for b in bits:
        if any(f.kind == "dense" and f.bits == b for f in forms):
            for smallest in (False, True):
                start = _uniform([forms], b, smallest)[0]
                keep.update(_hull(forms, start))
                keep.update(_dense_hull(forms, start))
    return sorted(keep)


def _choose(model, names, named, measured, config, probe, budget, phases):
    """The chosen form of each module: the plan, checked on the probe.

    Each form is priced at its bytes in the folder, its tensors and header
    entries (:meth:`~._folder_bytes.FolderBudget.priced`); the modules share
    the budget's room, what the rest of the folder leaves. A module's
    errors are weighed by its sensitivity: from the Fisher information of
    the output distribution (:func:`~._fisher.fisher_sensitivities`, one
    backward pass per probe batch) for a model whose output is one (a
    causal LM's logits), else measured module by module on the probe.

    The rounding noise of quantized factors is measured only for the forms
    a candidate plan takes (:func:`_measured_plans`).
    """
    scale = {}
    batches = _probe_batches(model, probe) if probe else None
    if probe and len(names) > 1 and config.allocation == "global":
        with phases("sensitivity"):
            scale = _scales(model, named, measured, config, probe, batches, phases)
    with phases("allocation"):
        plans = _measured_plans(names, measured, config, budget, scale)
    if probe and len(plans) > 1:
        with phases("probe"):
            best, _ = best_on_probe(model, named, plans, measured, batches)
        return plans[best]
    return plans[0]


def _scales(model, named, measured, config, probe, batches, phases):
    """Sensitivities: Fisher for a distribution, else the probe (bar as phases)."""
    names = list(measured)
    if has_logits(model):
        weights = {
            n: measured[n].objective.row_weights
            for n in names
            if measured[n].objective is not None
        }
        return fisher_sensitivities(
            model, names, named, batches, row_weights=weights, seed=_seed(config)
        )
    spectra = {n: measured[n].spectrum for n in names}
    return _sensitivities(model, names, named, spectra, probe, phases.show)


def _measured_plans(names, measured, config, budget, scale):
    """The candidate plans, each form in them with its error measured.

    A quantized factor form holds its truncation error, a lower bound, until
    its rounding noise is measured: the plans are made, the noise of the
    factor forms they take measured, and the plans made again, until they
    take only measured forms. A form left unmeasured was not taken even at
    its lower bound.
    """
    order = sorted(names)  # ties do not depend on the order of the targets
    while True:
        all_forms = [[budget.priced(n, f) for f in measured[n].forms] for n in order]
        if config.allocation != "global":
            total = sum(f[0].nbytes for f in all_forms)
            share = [budget.room * f[0].nbytes / total for f in all_forms]
            candidates = [
                [_plan_uniform(f, s) for f, s in zip(all_forms, share, strict=True)]
            ]
        else:
            scales = [scale.get(n, 1.0) for n in order]
            candidates = _plan_candidates(all_forms, scales, budget.room, config.bits)
        plans = checked_plans(
            [
                {n: f[i] for n, f, i in zip(order, all_forms, c, strict=True)}
                for c in candidates
            ]
        )
        pending = {}
        for plan in plans:
            for n, form in plan.items():
                if measured[n].is_pending(form):
                    pending.setdefault(n, set()).add(_noise_key(form))
        if not pending:
            return plans
        for n, keys in sorted(pending.items()):
            measured[n].measure_noise(keys)


def _seed(config):
    """An int seed of the run's random_state (0 when it is not an int)."""
    state = config.random_state
    return state if isinstance(state, int) and not isinstance(state, bool) else 0


def _chosen(name, module, form, measured):
    """The report of a module's chosen form, and its layer (projective forms)."""
    n, d = _rows_cols(module)
    numbers = n * d + _bias_numel(module)
    before = form_nbytes(module)
    entry = {"k": 0, "ranks": (), "side": None, "form": "dense"}
    entry["compact_scales"] = form.compact
    grid = grid_options(form) if form.bits is not None else {}
    entry.update(params_after=numbers, bits=form.bits, group_size=form.group_size)
    layer = None
    if form.kind == "float":
        entry.update(error=0.0, weight_error=0.0, bytes_after=before)
    elif form.kind == "dense":
        w = measured.dense_weight(form)
        if is_conv1d(module):  # stored (in, out): measured as (out, in)
            w = w.T
        error = measured.measure(w)  # measured (a wide form's was modelled)
        entry.update(error=error, weight_error=measured.measure.plain(w))
        entry["bytes_after"] = form_nbytes(module, form.bits, form.group_size, **grid)
        entry["zero_dtype"] = form.zero_dtype
    else:
        layer = measured.layer(form)
        w = layer.to_dense().weight
        entry.update(k=layer.k, ranks=tuple(layer.ranks), form="projective")
        entry.update(side=getattr(layer, "side", None))
        entry.update(error=measured.measure(w), weight_error=measured.measure.plain(w))
        entry["params_after"] = layer.n_params + _bias_numel(module)
        entry["bytes_after"] = form_nbytes(layer, form.bits, form.group_size, **grid)
    kind = "Embedding" if isinstance(module, nn.Embedding) else "Linear"
    report = ModuleReport(
        name=name,
        kind=kind,
        shape=(n, d),
        params_before=numbers,
        seconds=0.0,
        bytes_before=before,
        **entry,
    )
    return report, layer


def _swap_in(model, named, records, layers):
    """Dense forms written into their modules, projective layers swapped in."""
    for name, qt in records.items():
        module = named[name]
        with torch.no_grad():
            module.weight.copy_(torch.from_numpy(qt.dequantize()))
        record_quantized_(module, {"weight": qt})
    swap(model, layers.items())  # ties the new layers break stay tied
