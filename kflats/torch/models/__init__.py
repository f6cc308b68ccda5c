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
- ``_registry``: :func:`adapter_for` picks the first registered adapter
  that matches a model (most specific first); :func:`register_adapter` adds
  a family;
- ``_targets``: which modules of a model a kflats.torch function works on;
- this module: the public names, and the built-in families registered.
"""

from kflats.torch.models._base import ModelAdapter
from kflats.torch.models._decoders import GPT2Adapter, LlamaAdapter
from kflats.torch.models._encoders import EncoderAdapter, SentenceTransformerAdapter
from kflats.torch.models._outputs import OUTPUT_KINDS, relative_mse
from kflats.torch.models._registry import adapter_for, register_adapter
from kflats.torch.models._t5 import T5Adapter
from kflats.torch.models._targets import (
    all_matrices,
    all_targets,
    default_target,
    every_layer,
    select_modules,
)
from kflats.torch.models._ties import describe_ties, plan_ties, swap, tie_replacements
from kflats.torch.models._transformers import TransformersAdapter

__all__ = [
    "OUTPUT_KINDS",
    "EncoderAdapter",
    "GPT2Adapter",
    "LlamaAdapter",
    "ModelAdapter",
    "SentenceTransformerAdapter",
    "T5Adapter",
    "TransformersAdapter",
    "adapter_for",
    "all_matrices",
    "all_targets",
    "default_target",
    "every_layer",
    "select_modules",
    "describe_ties",
    "plan_ties",
    "register_adapter",
    "relative_mse",
    "swap",
    "tie_replacements",
]

# the built-in families, registered from the most general up: each registration
# is asked before the earlier ones
for _adapter in (
    ModelAdapter,
    TransformersAdapter,
    T5Adapter,
    LlamaAdapter,
    GPT2Adapter,
    EncoderAdapter,
    SentenceTransformerAdapter,
):
    register_adapter(_adapter)
del _adapter
