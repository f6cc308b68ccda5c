"""Encoders: BERT-like transformers models, and sentence-transformers models.

A sentence-transformers model's output is its sentence embedding; its
structure is that of the transformers model inside it.
"""

import torch
from torch import nn

from kflats.torch.evaluation import is_sentence_transformer
from kflats.torch.models._base import ModelAdapter, _join, _module_name
from kflats.torch.models._transformers import TransformersAdapter


class EncoderAdapter(TransformersAdapter):
    """BERT-like encoders: BERT, DistilBERT, RoBERTa, MPNet, XLM-R, and their heads."""

    family = "bert-like"
    model_types = (
        "bert",
        "distilbert",
        "roberta",
        "xlm-roberta",
        "mpnet",
        "camembert",
        "electra",
    )
    stacks = ("encoder.layer", "transformer.layer")


class SentenceTransformerAdapter(ModelAdapter):
    """A sentence-transformers model: the sentence embedding is its output.

    Its structure is that of the transformers model inside it (its
    ``auto_model``), whose adapter answers, with names prefixed.
    """

    family = "sentence-transformers"

    @classmethod
    def matches(cls, model):
        return is_sentence_transformer(model)

    def _inner(self):
        """(prefix, adapter) of the transformer inside, or (None, None)."""
        for child in self.model.children():
            auto = getattr(child, "auto_model", None)
            if isinstance(auto, nn.Module):
                name = _module_name(self.model, auto)
                if name is not None:
                    from kflats.torch.models._registry import adapter_for

                    return name, adapter_for(auto)
        return None, None

    @property
    def output_kind(self):
        return "sentence_embedding"

    def embedding(self):
        prefix, inner = self._inner()
        if inner is None:
            return super().embedding()
        return _join(prefix, inner.embedding())

    def block_stacks(self):
        prefix, inner = self._inner()
        if inner is None:
            return super().block_stacks()
        return [_join(prefix, s) for s in inner.block_stacks()]

    def run(self, batch):
        return self.model(batch)

    def final(self, output):
        if torch.is_tensor(output):
            return output
        return output["sentence_embedding"]

    def has_tokenizer(self):
        return True

    def tokenize(self, texts, tokenizer=None, max_length=None):
        if tokenizer is None and max_length is None:
            # sentence-transformers >= 5.2 names it preprocess
            prepare = getattr(self.model, "preprocess", None) or self.model.tokenize
            return dict(prepare(texts))
        return super().tokenize(texts, tokenizer or self.model.tokenizer, max_length)
