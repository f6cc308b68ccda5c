"""Ties kept through compression: the modules that share a compressed embedding.

An Embedding compressed to a :class:`~kflats.torch.layers.ProjectiveEmbedding`
takes its followers (:meth:`ModelAdapter.ties
<kflats.torch.models.ModelAdapter.ties>`) with it: another Embedding holding
the table becomes a :class:`~kflats.torch.layers.SharedEmbedding`, an output
head a :class:`~kflats.torch.layers.ProjectiveTiedHead`, both reading the
same factors. A saved folder records the ties and rebuilds them on loading.
"""

from torch import nn

from kflats.torch.layers import ProjectiveEmbedding, ProjectiveTiedHead, SharedEmbedding
from kflats.torch.models._base import _module_name


def tie_replacements(model, replacements):
    """The modules that follow each replaced source, built from its replacement.

    Parameters
    ----------
    model : torch.nn.Module
        The model before the replacement.
    replacements : dict
        ``name -> new module`` of the modules about to be replaced.

    Returns
    -------
    extra : dict
        ``name -> module`` for every follower (:meth:`ModelAdapter.ties`) of
        a replaced :class:`torch.nn.Embedding`: a
        :class:`~kflats.torch.layers.SharedEmbedding` of the new
        :class:`ProjectiveEmbedding` for another Embedding holding the table,
        a :class:`ProjectiveTiedHead` for a Linear head.
    """
    from kflats.torch.models._registry import adapter_for

    named = dict(model.named_modules(remove_duplicate=False))
    extra = {}
    for follower, source in adapter_for(model).ties().items():
        layer = replacements.get(source)
        if not isinstance(layer, ProjectiveEmbedding) or follower in replacements:
            continue
        old = named[follower]
        if type(old) is nn.Embedding:
            extra[follower] = SharedEmbedding(layer)
        elif isinstance(old, nn.Linear):
            extra[follower] = ProjectiveTiedHead.tie(layer, old)
    return extra


def swap(model, replacements):
    """Put the replacements in the model, and keep every tie they break tied.

    Parameters
    ----------
    model : torch.nn.Module
    replacements : iterable of (name, module)
        The new modules, by qualified name.
    """
    replacements = dict(replacements)
    extra = tie_replacements(model, replacements)
    for name, layer in [*replacements.items(), *extra.items()]:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer)


def describe_ties(model):
    """What a saved folder records of the ties of a compressed model.

    Returns
    -------
    ties : dict
        ``name -> {"type": "alias", "of": source}`` for another place of a
        :class:`ProjectiveEmbedding` (T5's ``encoder.embed_tokens``), ``name
        -> {"type": "ProjectiveTiedHead", "embedding": source, "bias": bool}``
        for a tied head.
    """
    ties = {}
    for name, module in model.named_modules():
        if isinstance(module, SharedEmbedding):
            source = _module_name(model, module.embedding)
            if source is None:
                raise ValueError(
                    f"{name!r} shares an embedding that is not part of the model"
                )
            ties[name] = {"type": "alias", "of": source}
        elif isinstance(module, ProjectiveTiedHead):
            source = _module_name(model, module.embedding)
            if source is None:
                raise ValueError(
                    f"the tied head {name!r} shares the factors of an embedding "
                    "that is not part of the model"
                )
            ties[name] = {
                "type": "ProjectiveTiedHead",
                "embedding": source,
                "bias": module.bias is not None,
            }
    return ties


def plan_ties(model, plans, ties, where):
    """The followers a loaded folder rebuilds from its planned embeddings.

    Parameters
    ----------
    model : torch.nn.Module
        The freshly built model (dense modules where the folder holds
        projective ones).
    plans : dict
        ``name -> layer`` of the projective layers about to be put in.
    ties : dict
        As :func:`describe_ties` wrote it.
    where : str
        The folder, for error messages.

    Returns
    -------
    followers : dict
        ``name -> module`` to put in beside ``plans``.
    """
    if not isinstance(ties, dict):
        raise ValueError(f"{where}: corrupt ties entry: {ties!r}")
    named = dict(model.named_modules(remove_duplicate=False))
    out = {}
    for name, entry in ties.items():
        kind = entry.get("type") if isinstance(entry, dict) else None
        source = entry.get("of" if kind == "alias" else "embedding") if kind else None
        layer = plans.get(source) if isinstance(source, str) else None
        old = named.get(name)
        if kind not in ("alias", "ProjectiveTiedHead") or not isinstance(
            layer, ProjectiveEmbedding
        ):
            raise ValueError(f"{where}: corrupt tie entry for {name!r}: {entry!r}")
        shape = (layer.num_embeddings, layer.embedding_dim)
        dense = getattr(old, "weight", None)
        if kind == "alias":
            ok = type(old) is nn.Embedding and tuple(dense.shape) == shape
            new = SharedEmbedding(layer).train(old.training) if ok else None
        else:
            ok = (
                isinstance(old, nn.Linear)
                and tuple(dense.shape) == shape
                and (old.bias is not None) == bool(entry.get("bias"))
            )
            new = ProjectiveTiedHead.tie(layer, old) if ok else None
        if not ok:
            raise ValueError(
                f"{where} was saved from another architecture: module {name!r} "
                f"({type(old).__name__}) cannot share the factors of {source!r}"
            )
        out[name] = new
    return out


# -- loading --------------------------------------------------------------------
