"""Which modules of a model a kflats.torch function works on."""

import fnmatch

from torch import nn


def _default_target(model):
    for name, module in model.named_modules():
        getter = getattr(module, "get_input_embeddings", None)
        if callable(getter):
            emb = getter()
            for inner, sub in module.named_modules():
                if sub is emb:
                    return [name + "." + inner if name and inner else name or inner]
    raise ValueError(
        "targets=None selects the word-embedding table of a Hugging Face "
        "transformers model (get_input_embeddings()), and no submodule of "
        f"{type(model).__name__} has one; pass targets= (names, patterns or "
        "module types)"
    )


def _select(model, targets, default=_default_target):
    """Names of the selected modules; checks that every target matches.

    ``targets=None`` selects ``default(model)``.
    """
    named = dict(model.named_modules())
    if targets is None:
        names = default(model)
    else:
        if isinstance(targets, (str, type)):
            targets = [targets]
        try:
            targets = list(targets)
        except TypeError:
            raise TypeError(
                "targets must be a name pattern (str), a module type, or a list "
                f"of them, got {type(targets).__name__}"
            ) from None
        if not targets:
            raise ValueError("targets is empty: it selects no module")
        names = []
        for target in targets:
            if isinstance(target, str):
                hits = [n for n in named if n and fnmatch.fnmatchcase(n, target)]
            elif isinstance(target, type) and issubclass(target, nn.Module):
                hits = [n for n, m in named.items() if n and isinstance(m, target)]
            else:
                raise TypeError(
                    "each target must be a name pattern (str) or a subclass of "
                    f"torch.nn.Module, got {target!r}"
                )
            if not hits:
                raise ValueError(
                    f"target {target!r} matches no module of {type(model).__name__}"
                )
            names.extend(hits)
        names = list(dict.fromkeys(names))
    wrong = [
        f"{n} ({type(named[n]).__name__})"
        for n in names
        if type(named[n]) not in (nn.Embedding, nn.Linear)
    ]
    if wrong:
        raise TypeError(
            "compress replaces torch.nn.Embedding and torch.nn.Linear modules "
            f"only; targets select {', '.join(wrong)}"
        )
    return names, named


def _every_layer(model):
    """Every Embedding and Linear module of a model, in model order."""
    return [
        name
        for name, module in model.named_modules()
        if name and type(module) in (nn.Embedding, nn.Linear)
    ]
