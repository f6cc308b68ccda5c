"""Any Hugging Face transformers model: the adapter the families refine.

The output kind comes from the class name (its head), the block stacks from
the family's ``stacks`` under the base model, and an encoder-decoder is run
with teacher forcing.
"""

import sys

import torch

from kflats.torch.models._base import ModelAdapter, _join, _module_name
from kflats.torch.models._outputs import _tensor_output

_HEADS = (
    ("ForCausalLM", "causal_lm"),
    ("LMHeadModel", "causal_lm"),
    ("ForSequenceClassification", "classifier"),
    ("ForMaskedLM", "masked_lm"),
    ("ForConditionalGeneration", "seq2seq"),
)


def _is_transformers_model(model):
    transformers = sys.modules.get("transformers")
    return transformers is not None and isinstance(model, transformers.PreTrainedModel)


class TransformersAdapter(ModelAdapter):
    """Any Hugging Face transformers model (families refine it).

    The output kind comes from the class (``*ForCausalLM`` and
    ``*LMHeadModel``: causal LM; ``*ForSequenceClassification``;
    ``*ForMaskedLM``; ``*ForConditionalGeneration`` of an encoder-decoder:
    seq2seq; the bare model: hidden states). A family names its block stacks
    relative to the base model (``stacks``); this generic adapter finds the
    longest list of blocks.
    """

    family = "transformers"
    #: config.model_type values of the family
    model_types = ()
    #: block stacks, relative to the base model
    stacks = ()

    @classmethod
    def matches(cls, model):
        if not _is_transformers_model(model):
            return False
        if not cls.model_types:
            return True
        return getattr(model.config, "model_type", None) in cls.model_types

    @property
    def output_kind(self):
        name = type(self.model).__name__
        for suffix, kind in _HEADS:
            if name.endswith(suffix):
                if kind == "seq2seq" and not getattr(
                    self.model.config, "is_encoder_decoder", False
                ):
                    continue
                return kind
        return "hidden"

    def output_head(self):
        """The head of a causal LM (``get_output_embeddings()``), else None."""
        if self.output_kind != "causal_lm":
            return None
        getter = getattr(self.model, "get_output_embeddings", None)
        head = getter() if callable(getter) else None
        return None if head is None else _module_name(self.model, head)

    def _base(self):
        """Name of the base model inside the model (``""``: the model itself)."""
        base = getattr(self.model, "base_model", self.model)
        name = _module_name(self.model, base)
        return "" if name is None else name

    def block_stacks(self):
        if not self.stacks:
            return super().block_stacks()
        named = dict(self.model.named_modules())
        base = self._base()
        found = [_join(base, s) for s in self.stacks if _join(base, s) in named]
        return found or super().block_stacks()

    def prepare(self, batch):
        if self.output_kind != "seq2seq" or "decoder_input_ids" in batch:
            return batch
        # teacher forcing on the input itself: the decoder reads the input
        # shifted right and predicts it, token by token
        ids = batch["input_ids"]
        config = self.model.config
        start = getattr(config, "decoder_start_token_id", None)
        if start is None:
            start = getattr(config, "pad_token_id", None) or 0
        decoder = torch.cat([torch.full_like(ids[:, :1], start), ids[:, :-1]], dim=1)
        return {**batch, "decoder_input_ids": decoder}

    def run(self, batch):
        return self.model(**self.prepare(batch), return_dict=True)

    def final(self, output):
        if torch.is_tensor(output):
            return output
        if self.output_kind != "hidden":
            logits = getattr(output, "logits", None)
            if logits is None and isinstance(output, dict):
                logits = output.get("logits")
            if logits is None:
                raise TypeError(
                    f"a {type(self.model).__name__} should return logits; it "
                    f"returned a {type(output).__name__}"
                )
            return logits
        return _tensor_output(output)[0]
