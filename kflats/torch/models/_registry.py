"""The registry of model adapters: which adapter answers for a model.

The built-in families are registered by :mod:`kflats.torch.models`, most
specific first; :func:`register_adapter` adds a user's family before them.
"""

from torch import nn

from kflats.torch.models._base import ModelAdapter

_REGISTRY = []


def register_adapter(adapter, *, before=None):
    """Add a model family: its adapter is asked before those registered earlier.

    Parameters
    ----------
    adapter : type
        A subclass of :class:`ModelAdapter` with a ``matches`` classmethod.
    before : type, default=None
        Ask it just before this registered adapter; ``None``: before every
        other (the newest registration is the most specific).

    Returns
    -------
    adapter : type
        Unchanged, so that this works as a class decorator.

    Examples
    --------
    >>> import transformers
    >>> from kflats.torch.models import (TransformersAdapter, adapter_for,
    ...                                  register_adapter)
    >>> @register_adapter
    ... class TinyGPT2(TransformersAdapter):
    ...     family = "tiny-gpt2"
    ...     model_types = ("gpt2",)
    ...     stacks = ("transformer.h",)
    >>> config = transformers.GPT2Config(vocab_size=64, n_embd=16, n_layer=1,
    ...                                  n_head=2, n_positions=32)
    >>> adapter_for(transformers.GPT2LMHeadModel(config)).family
    'tiny-gpt2'
    >>> from kflats.torch.models import _registry
    >>> _registry._REGISTRY.remove(TinyGPT2)  # back to the built-in families
    """
    if not (isinstance(adapter, type) and issubclass(adapter, ModelAdapter)):
        raise TypeError(f"adapter must be a ModelAdapter subclass, got {adapter!r}")
    if before is not None and (before not in _REGISTRY or before is adapter):
        raise ValueError(f"before must be another registered adapter, got {before!r}")
    if adapter in _REGISTRY:
        _REGISTRY.remove(adapter)
    _REGISTRY.insert(0 if before is None else _REGISTRY.index(before), adapter)
    return adapter


def adapter_for(model):
    """The adapter of a model: the first registered one that matches.

    Parameters
    ----------
    model : torch.nn.Module

    Returns
    -------
    adapter : ModelAdapter

    Examples
    --------
    >>> import transformers
    >>> from kflats.torch.models import adapter_for
    >>> config = transformers.GPT2Config(vocab_size=64, n_embd=16, n_layer=1,
    ...                                  n_head=2, n_positions=32)
    >>> adapter = adapter_for(transformers.GPT2LMHeadModel(config))
    >>> adapter.family, adapter.output_kind, adapter.tied_heads()
    ('gpt2', 'causal_lm', ['lm_head'])
    >>> adapter.all_targets()[:3]
    ['transformer.wte', 'transformer.h.0.attn.c_attn', 'transformer.h.0.attn.c_proj']
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    for adapter in _REGISTRY:
        if adapter.matches(model):
            return adapter(model)
    raise TypeError(f"no adapter for {type(model).__name__}")  # pragma: no cover
