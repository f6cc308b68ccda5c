"""The budget turned into numbers per module: feasibility, and the global allocation.

With ``allocation="uniform"`` each module keeps ``budget`` of its own
numbers. With ``"global"``, the budget of all the selected modules together
is shared out by the allocator of :mod:`kflats.factorize._allocation` (the
one that shares a matrix's numbers among its clusters): every module starts
at rank 1, then rank steps go to the modules by error gained per number,
the errors by rank read off each module's k = 1 spectrum and weighted by its
sensitivity (:mod:`kflats.torch.compression._sensitivity`). A module whose rank reaches
the point where factors stop saving numbers may stay dense instead.
"""

import time

import numpy as np

from kflats._size import budget_numbers, dense_size, factors_size, saving_rank
from kflats.factorize._allocation import greedy_fill
from kflats.torch.compression._config import _search_options_of
from kflats.torch.compression._fit import _fit_module, _module_report
from kflats.torch.compression._report import CompressionReport
from kflats.torch.compression._sensitivity import (
    _bar,
    _rows_cols,
    _sensitivities,
    _spectra,
)
from kflats.torch.models import swap


class NumbersPlanner:
    """A budget in numbers: planned per module, each module fitted, swapped in.

    The planner of ``CompressionConfig(unit="numbers")``: :meth:`check`
    before anything is measured, :meth:`compress` for the rest.
    """

    unit = "numbers"

    @staticmethod
    def check(config, names, named, sample_weight):
        """Raise if rank 1 of every selected module does not fit the budget."""
        _check_feasible(config.budget, names, named, config.allocation)

    @staticmethod
    def compress(
        model, names, named, config, objectives, calibration, sample_weight, progress
    ):
        """Plan, fit and swap in; the :class:`CompressionReport`."""
        probe = calibration.probe if calibration is not None else None
        numbers_of = _plan_numbers(
            model,
            names,
            named,
            config.budget,
            config.allocation,
            objectives,
            probe,
            progress,
        )
        reports, layers = _fit_all(
            names, named, numbers_of, objectives, config, sample_weight, progress
        )
        # the modules that share a replaced table follow it
        swap(model, layers.items())
        return CompressionReport(reports, config=config)


def _check_feasible(budget, names, named, allocation):
    """Raise if rank 1 of every selected module does not fit in ``budget``."""
    shapes = [_rows_cols(named[name]) for name in names]
    rank_one = [factors_size([n], [1], d).numbers for n, d in shapes]
    if allocation == "global":
        total = sum(dense_size(n, d).numbers for n, d in shapes)
        allowed = budget_numbers(budget, 1, total)
        need = sum(rank_one)
        if need > allowed:
            raise ValueError(
                f"budget={budget} cannot be met for the {len(names)} selected "
                f"modules: rank 1 for each needs {need} numbers, the budget "
                f"allows {allowed} (budget >= {need / total:.4g})"
            )
        return
    for name, (n, d), need in zip(names, shapes, rank_one, strict=True):
        allowed = budget_numbers(budget, n, d)
        if need > allowed:
            raise ValueError(
                f"budget={budget} cannot be met for {name!r} ({n} x {d}): a "
                f"single factor pair of rank 1 needs {need} numbers, the "
                f"budget allows {allowed} (budget >= {need / (n * d):.4g})"
            )


def _plan_numbers(
    model, names, named, budget, allocation, objectives, probe, progress=None
):
    """Numbers each module may store: ``{name: numbers}``, ``None`` to stay dense.

    ``probe``: the calibration's probe batches, which measure the modules'
    sensitivities for the global allocation (none: plain errors count alike).
    ``progress``: bars over the spectra and the probes (None: on big models).
    """
    shapes = {name: _rows_cols(named[name]) for name in names}
    if allocation != "global" or len(names) == 1:
        return {name: budget_numbers(budget, *shapes[name]) for name in names}
    spectra = _spectra(names, named, objectives, progress)
    scale = {}
    if probe:
        scale = _sensitivities(model, names, named, spectra, probe, progress)
    gains = {name: spectra[name].gains * scale.get(name, 1.0) for name in names}
    total = budget_numbers(budget, 1, sum(n * d for n, d in shapes.values()))
    return _global_numbers(names, shapes, gains, total)


def _module_steps(gains, n, d):
    """A module's steps for the allocator: rank r to r + 1, then dense.

    Step r (from rank r) gains ``gains[r]`` for ``n + d`` numbers, up to the
    rank where factors stop saving numbers; the last step keeps the module
    dense, gaining all the error left for the numbers left.
    """
    top = max(min(saving_rank(n, d), gains.size), 1)
    step_gains = np.append(gains[:top], float(gains[top:].sum()))
    step_costs = np.append(np.full(top, n + d), n * d - top * (n + d))
    return step_gains, step_costs


def _global_numbers(names, shapes, gains, total):
    """Share ``total`` numbers among modules, greedy by gain per number.

    Returns ``{name: numbers}``, ``None`` for a module best kept dense.
    """
    # the allocator breaks ties by item order: names sorted, so that the
    # result does not depend on the order of the targets
    order = sorted(names)
    steps = [_module_steps(gains[name], *shapes[name]) for name in order]
    room = total - sum(n + d for n, d in shapes.values())
    ranks, _, room = greedy_fill(
        [g for g, _ in steps], [c for _, c in steps], [1] * len(order), room
    )
    out = {}
    for name, rank, (g, _) in zip(order, ranks, steps, strict=True):
        n, d = shapes[name]
        out[name] = None if rank == g.size else rank * (n + d)
    # numbers no step could use go to the modules in turn, less than one rank
    # step each, so that the clustered fits (ids, several bases) have room
    # to do better than k = 1
    for name in names:
        if out[name] is not None and room > 0:
            n, d = shapes[name]
            extra = min(room, n * d - out[name] - 1, (n + d) - 1)
            if extra > 0:
                out[name] += extra
                room -= extra
    return {name: out[name] for name in names}


def _fit_all(names, named, numbers_of, objectives, config, sample_weight, progress):
    """Fit every module: its report, and its new layer unless it stays dense."""
    options = _search_options_of(config)
    bar = _bar(names, named, progress, "kflats compress")
    reports, layers = [], {}
    try:
        for name in names:
            module = named[name]
            if bar is not None:
                bar.set_postfix_str(name)
            start = time.perf_counter()
            layer = None
            if numbers_of[name] is not None:  # else kept dense by the allocation
                k, side = config.module_settings(name)
                layer = _fit_module(
                    module,
                    name,
                    numbers_of[name],
                    objectives[name],
                    k,
                    side,
                    options,
                    sample_weight,
                )
                layers[name] = layer.train(module.training)
            reports.append(
                _module_report(name, module, layer, time.perf_counter() - start)
            )
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return reports, layers
