"""Model adapters: what kflats needs to know about a model, one object per family.

Calibration, the sensitivity probe, heal, target selection and the
evaluation ask a model's adapter, never the model's type:

- where the word embedding is, and which modules share its table (an output
  head tied to it, another Embedding holding the same weight, as T5's
  encoder and decoder do);
- the stack(s) of blocks, and which of their layers are Linear in all but
  name (GPT-2's ``Conv1D``);
- what the model outputs (a sentence embedding, the last hidden state, the
  logits of a causal LM, a classifier or a masked LM, or those of an
  encoder-decoder), how to run a batch and take that output, and how far a
  compressed model's output is from the original's;
- how to tokenize text for it, and how to evaluate a compressed model the
  way the model's users use it.

Where each is described:

- ``_base``: :class:`ModelAdapter`, the adapter of plain modules, which
  every family refines;
- ``_outputs``: output kinds, divergences, evaluation scores;
- ``_transformers``: any Hugging Face model (:class:`TransformersAdapter`);
- ``_encoders``: BERT-like encoders and sentence-transformers models;
- ``_decoders``: causal LMs (GPT-2, Llama-architecture);
- ``_t5``: T5 encoder-decoders;
- ``_ties``: ties kept through compression, saving and loading;
- this module: the registry. :func:`adapter_for` picks the first registered
  adapter that matches a model (most specific first);
  :func:`register_adapter` adds a family.
"""

from torch import nn

from .._pretrained import load_pretrained
from ._base import ModelAdapter
from ._decoders import GPT2Adapter, LlamaAdapter
from ._encoders import (
    EncoderAdapter,
    SentenceTransformerAdapter,
    _is_sentence_transformer,
)
from ._outputs import OUTPUT_KINDS, _tensor_output, relative_mse
from ._t5 import T5Adapter
from ._ties import describe_ties, plan_ties, swap, tie_replacements
from ._transformers import TransformersAdapter

__all__ = [
    "OUTPUT_KINDS",
    "EncoderAdapter",
    "GPT2Adapter",
    "LlamaAdapter",
    "ModelAdapter",
    "SentenceTransformerAdapter",
    "T5Adapter",
    "TransformersAdapter",
    "_is_sentence_transformer",
    "_tensor_output",
    "adapter_for",
    "describe_ties",
    "load_pretrained",
    "plan_ties",
    "register_adapter",
    "relative_mse",
    "swap",
    "tie_replacements",
]

_REGISTRY = [
    SentenceTransformerAdapter,
    EncoderAdapter,
    GPT2Adapter,
    LlamaAdapter,
    T5Adapter,
    TransformersAdapter,
    ModelAdapter,
]


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
    >>> from kflats.torch._models import adapter_for
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


# -- ties -------------------------------------------------------------------------
