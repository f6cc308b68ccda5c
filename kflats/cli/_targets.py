"""``kflats compress --targets``: the modules compressed, checked before loading.

``embedding`` is the model's word embedding; ``all`` adds every Linear (or
GPT-2 Conv1D) of its block stacks, and under a size in bytes every other
matrix the folder holds (:func:`kflats.torch.models.all_matrices`: position
tables, a pooler): a size counts every tensor, so the search may spend
those bytes as well. Any other spec is a module-name pattern.
"""

from ._formats import check_budget_of

EMBEDDING, ALL = "embedding", "all"


def target_names(model, specs, unit="numbers"):
    """Module names (or patterns, checked by compress) for --targets."""
    from kflats.torch.models import all_matrices, all_targets, default_target

    names = []
    for spec in specs:
        if spec == EMBEDDING:
            names += default_target(model)
        elif spec == ALL:
            names += (all_matrices if unit == "bytes" else all_targets)(model)
        else:
            names.append(spec)
    return list(dict.fromkeys(names))


def checked_targets(model, args, budget=True):
    """Selected module names, checked with the budget before any heavy work.

    A size in bytes below the smallest the folder (or the ``--format``
    file) reaches stops here, before the calibration, in one line naming
    that size.
    """
    from kflats.torch.models import select_modules

    specs = target_names(model, args.targets, args.unit)
    try:
        names, named = select_modules(model, specs)
    except (TypeError, ValueError) as exc:  # a pattern that selects a LayerNorm
        raise ValueError(f"--targets: {exc}") from None
    if budget:
        check_budget_of(args, names, named)
    return names
