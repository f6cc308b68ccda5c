"""Which modules of a model a kflats.torch function works on."""

import fnmatch

from torch import nn

from kflats.torch.layers import is_linear
from kflats.torch.models._registry import adapter_for


def default_target(model):
    """The word-embedding table, as the model's adapter names it."""
    return [adapter_for(model).embedding()]


def all_targets(model):
    """The word embedding and every Linear (or Conv1D) of the block stacks."""
    return adapter_for(model).all_targets()


def all_matrices(model):
    """:func:`all_targets`, then every other matrix outside the block stacks.

    The other matrices are the Embedding, Linear and Conv1D modules that
    neither the block stacks nor the word embedding hold, that share no
    table, and that have at least :data:`MIN_SIDE` rows and columns:
    position tables, a pooler, an untied head. A size in bytes counts them
    all (the folder's weight files hold them), so a search in bytes may as
    well spend those bytes where they do most. A narrower one (a token-type
    table of two rows, a classifier's head over a few classes) stays as it
    is: its bytes are a rounding error of the folder's, while rounding it
    moves every output (a token-type row is added to every token), more
    than the search's probe of a truncation sees.

    Examples
    --------
    >>> from transformers import BertConfig, BertModel
    >>> config = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1,
    ...                     num_attention_heads=2, intermediate_size=64)
    >>> [name.split(".", 1)[1] for name in all_matrices(BertModel(config))[-2:]]
    ['position_embeddings', 'dense']
    """
    adapter = adapter_for(model)
    targets = adapter.all_targets()
    stacks = tuple(f"{stack}." for stack in adapter.block_stacks())
    named = dict(model.named_modules())
    others = [
        name
        for name in every_layer(model)
        if name not in targets
        and not name.startswith(stacks)
        and min(_sides(named[name])) >= MIN_SIDE
    ]
    return targets + others


# the rows and columns a matrix outside the blocks needs to enter a search in
# bytes (all_matrices): a group of the finest grid the factors take
MIN_SIDE = 32


def _sides(module):
    weight = next(p for p in module.parameters(recurse=False) if p.ndim == 2)
    return tuple(weight.shape)


def _compressible(module):
    return type(module) is nn.Embedding or is_linear(module)


def select_modules(model, targets, default=default_target):
    """Names of the selected modules; checks that every target matches.

    ``targets=None`` selects ``default(model)``. A module that shares the
    word embedding's table (a tied output head, T5's ``embed_tokens``)
    stands for the embedding: selecting it selects the embedding, and
    compressing the embedding compresses it too.
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
    ties = adapter_for(model).ties() if names else {}
    names = list(dict.fromkeys(ties.get(n, n) for n in names))
    wrong = [
        f"{n} ({type(named[n]).__name__})" for n in names if not _compressible(named[n])
    ]
    if wrong:
        raise TypeError(
            "compress replaces torch.nn.Embedding and torch.nn.Linear modules "
            f"(and transformers' Conv1D) only; targets select {', '.join(wrong)}"
        )
    return names, named


def every_layer(model):
    """Every Embedding, Linear and Conv1D module of a model, in model order.

    A module that shares another's weight (a tied head, an alias of the
    word embedding) is left out: it stands for its source.
    """
    ties = adapter_for(model).ties()
    return [
        name
        for name, module in model.named_modules()
        if name and _compressible(module) and name not in ties
    ]
