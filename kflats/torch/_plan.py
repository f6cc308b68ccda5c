"""The budget turned into numbers per module: feasibility, and the global allocation.

With ``allocation="uniform"`` each module keeps ``budget`` of its own
numbers. With ``"global"``, the budget of all the selected modules together
is shared out by the allocator of :mod:`kflats.factorize._allocation` (the
one that shares a matrix's numbers among its clusters): every module starts
at rank 1, then rank steps go to the modules by error gained per number,
the errors by rank read off each module's k = 1 spectrum and weighted by its
sensitivity (:mod:`kflats.torch._sensitivity`). A module whose rank reaches
the point where factors stop saving numbers may stay dense instead.
"""

import numpy as np

from .._size import budget_numbers, dense_size, factors_size, saving_rank
from ..factorize._allocation import _greedy_fill
from ._sensitivity import _rows_cols, _sensitivities, _spectra


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
    ranks, _, room = _greedy_fill(
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
