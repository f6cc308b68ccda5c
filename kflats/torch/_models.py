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

:func:`adapter_for` picks the first registered adapter that matches a model
(most specific first); :func:`register_adapter` adds a family.
"""

import contextlib
import math
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ._layers import (
    ProjectiveEmbedding,
    ProjectiveTiedHead,
    SharedEmbedding,
    _is_linear,
)

__all__ = [
    "OUTPUT_KINDS",
    "ModelAdapter",
    "adapter_for",
    "load_pretrained",
    "register_adapter",
]

#: What a model's final output is, as adapters name it.
OUTPUT_KINDS = (
    "sentence_embedding",
    "hidden",
    "causal_lm",
    "classifier",
    "masked_lm",
    "seq2seq",
)
# neighbours compared by the encoder evaluation
_N_NEIGHBOURS = 5


def _module_name(model, target):
    """Qualified name of ``target`` inside ``model`` (``""`` for the model)."""
    for name, module in model.named_modules():
        if module is target:
            return name
    return None


def _join(prefix, name):
    return f"{prefix}.{name}" if prefix and name else prefix or name


def _masked_mean(values, mask):
    """Mean of ``values`` (batch, positions) over the real positions."""
    if mask is None or mask.shape != values.shape:
        return values.mean()
    m = mask.to(values.dtype)
    return (values * m).sum() / m.sum().clamp_min(1)


def _kl(student_logits, teacher_logits):
    """KL(teacher || student) of the distributions on the last axis."""
    s = torch.log_softmax(student_logits.float(), dim=-1)
    t = torch.log_softmax(teacher_logits.float(), dim=-1)
    return (t.exp() * (t - s)).sum(-1)


def relative_mse(student, teacher, mask=None):
    """``||s - t||^2 / ||t||^2`` over the real (not padding) positions."""
    diff = (student - teacher) ** 2
    ref = teacher**2
    if mask is not None and diff.dim() >= 3 and diff.shape[:2] == mask.shape:
        m = mask.unsqueeze(-1).to(diff.dtype)
        diff, ref = diff * m, ref * m
    return diff.sum() / ref.sum().clamp_min(1e-12)


def _tensor_output(out):
    """The tensor of a plain module's output: sentence embedding or last state."""
    if isinstance(out, dict) and "sentence_embedding" in out:
        return out["sentence_embedding"], "sentence_embedding"
    hidden = getattr(out, "last_hidden_state", None)
    if hidden is None and isinstance(out, dict):
        hidden = out.get("last_hidden_state")
    if hidden is None:
        hidden = getattr(out, "logits", None)
    if hidden is None and isinstance(out, (tuple, list)) and out:
        hidden = out[0]
    if hidden is None and torch.is_tensor(out):
        hidden = out
    if not torch.is_tensor(hidden):
        raise TypeError(
            "the model returned a "
            f"{type(out).__name__}, which holds no sentence_embedding, "
            "last_hidden_state, logits or tensor"
        )
    return hidden, "hidden"


@contextlib.contextmanager
def _right_padding(tokenizer):
    """Pad on the right while tokenizing (position ids count from the start)."""
    side = getattr(tokenizer, "padding_side", None)
    if side is None or side == "right":
        yield
        return
    tokenizer.padding_side = "right"
    try:
        yield
    finally:
        tokenizer.padding_side = side


class ModelAdapter:
    """What kflats needs to know about a model: the adapter of plain modules.

    The base adapter serves any :class:`torch.nn.Module` that takes
    model-input dicts as keyword arguments (``model(**batch)``) and returns
    a tensor, a tuple whose first item is one, or a mapping with a
    ``last_hidden_state``. Subclasses describe a family (transformers
    encoders, GPT-2, Llama, T5, sentence-transformers) and are registered
    with :func:`register_adapter`; :func:`adapter_for` picks one.

    Parameters
    ----------
    model : torch.nn.Module

    Attributes
    ----------
    model : torch.nn.Module
    family : str
        Name of the family.
    output_kind : str
        One of :data:`OUTPUT_KINDS`.

    Examples
    --------
    >>> import torch
    >>> from kflats.torch._models import adapter_for
    >>> model = torch.nn.Sequential(torch.nn.Embedding(10, 4))
    >>> adapter = adapter_for(model)
    >>> adapter.family, adapter.output_kind
    ('module', 'hidden')
    """

    family = "module"

    def __init__(self, model):
        self.model = model

    @classmethod
    def matches(cls, model):
        """Whether this adapter describes ``model``."""
        return isinstance(model, nn.Module)

    def __repr__(self):
        return f"{type(self).__name__}({type(self.model).__name__})"

    # -- structure --------------------------------------------------------

    @property
    def output_kind(self):
        return "hidden"

    def embedding(self):
        """Qualified name of the word-embedding table.

        Raises
        ------
        ValueError
            If the model has no word embedding that kflats can find.
        """
        for name, module in self.model.named_modules():
            getter = getattr(module, "get_input_embeddings", None)
            if callable(getter):
                emb = getter()
                inner = _module_name(module, emb)
                if inner is not None:
                    return _join(name, inner)
        raise ValueError(
            "targets=None selects the word-embedding table of a Hugging Face "
            "transformers model (get_input_embeddings()), and no submodule of "
            f"{type(self.model).__name__} has one; pass targets= (names, patterns "
            "or module types)"
        )

    def ties(self):
        """Modules that share another module's weight: ``{follower: source}``.

        The source is the first :class:`torch.nn.Embedding` (in model order)
        holding the weight; followers are the other modules holding the same
        weight: Embeddings (T5's ``encoder.embed_tokens`` follows
        ``shared``) or output heads (GPT-2's ``lm_head`` follows
        ``transformer.wte``). Compressing a source compresses its followers
        with it, through the same factors.
        """
        holders = {}
        for name, module in self.model.named_modules(remove_duplicate=False):
            weight = module._parameters.get("weight") if name else None
            if isinstance(weight, nn.Parameter):
                holders.setdefault(id(weight), []).append((name, module))
        out = {}
        for group in holders.values():
            source = next(
                (n for n, m in group if type(m) is nn.Embedding),
                None,
            )
            if source is None or len(group) < 2:
                continue
            for name, _ in group:
                if name != source:
                    out[name] = source
        return out

    def tied_heads(self):
        """Names of the output heads tied to the word embedding."""
        named = dict(self.model.named_modules())
        try:
            source = self.embedding()
        except ValueError:
            return []
        return [
            name
            for name, src in self.ties().items()
            if src == source and isinstance(named.get(name), nn.Linear)
        ]

    def block_stacks(self):
        """Names of the model's stacks of blocks (its layers), in model order.

        The base adapter takes the longest :class:`torch.nn.ModuleList` of
        blocks of one type.
        """
        best, size = None, 1
        for name, module in self.model.named_modules():
            if isinstance(module, nn.ModuleList) and len(module) > size:
                if len({type(child) for child in module}) == 1:
                    best, size = name, len(module)
        return [] if best is None else [best]

    def block_layers(self):
        """Every Linear (or Conv1D) module inside the block stacks, in order."""
        stacks = self.block_stacks()
        return [
            name
            for name, module in self.model.named_modules()
            if _is_linear(module)
            and any(name.startswith(stack + ".") for stack in stacks)
        ]

    def all_targets(self):
        """The word embedding and every Linear of the block stacks."""
        return list(dict.fromkeys([self.embedding(), *self.block_layers()]))

    # -- running ----------------------------------------------------------

    def prepare(self, batch):
        """The model-input dict a forward pass takes (decoder inputs added)."""
        return batch

    def run(self, batch):
        """One forward pass on a model-input dict; returns the model's output."""
        return self.model(**self.prepare(batch))

    def final(self, output):
        """The tensor the output kind compares: embedding, last state or logits."""
        if torch.is_tensor(output):
            return output
        return _tensor_output(output)[0]

    def mask(self, batch):
        """Which positions of a batch are real tokens (None: all)."""
        mask = batch.get("attention_mask") if hasattr(batch, "get") else None
        return None if mask is None else mask.bool()

    def distortion(self, student, teacher, batch):
        """How far the student's output is from the teacher's, on one batch.

        By output kind: ``1 - cosine`` of sentence embeddings; the relative
        squared error of hidden states (padding left out); the KL divergence
        of the teacher's distribution from the student's for logits (next
        tokens of a causal LM and tokens of a masked LM or a decoder, over
        real positions; classes of a classifier, per text).

        Parameters
        ----------
        student, teacher : model outputs or tensors
            As :meth:`run` returns them (or :meth:`final` of them).
        batch : dict
            The model inputs (for the attention mask).

        Returns
        -------
        distortion : Tensor
            A scalar, differentiable through ``student``.
        """
        s, t = self.final(student), self.final(teacher)
        if s.shape != t.shape:
            raise ValueError(
                f"the outputs have shapes {tuple(s.shape)} and {tuple(t.shape)}: "
                "a distortion compares a compressed model with its own original"
            )
        kind = self.output_kind
        if kind == "hidden" and not torch.is_tensor(student):
            kind = _tensor_output(student)[1]
        if kind == "sentence_embedding":
            return (1 - nn.functional.cosine_similarity(s, t, dim=-1)).mean()
        if kind in ("causal_lm", "masked_lm", "seq2seq"):
            return _masked_mean(_kl(s, t), self.mask(batch))
        if kind == "classifier":
            if s.shape[-1] == 1:  # a regression head
                return relative_mse(s, t)
            return _kl(s, t).mean()
        return relative_mse(s, t, self.mask(batch))

    # -- text -------------------------------------------------------------

    def has_tokenizer(self):
        """Whether the model tokenizes text itself (sentence-transformers)."""
        return False

    def check_tokenizer(self, tokenizer):
        """Make ``tokenizer`` pad: its pad token is set from eos when missing.

        Raises
        ------
        ValueError
            If the tokenizer has neither a pad nor an eos token.
        """
        if getattr(tokenizer, "pad_token", "") is not None:
            return tokenizer
        eos = getattr(tokenizer, "eos_token", None)
        if eos is None:
            raise ValueError(
                "the tokenizer has no pad token and no eos token to pad with; "
                "set tokenizer.pad_token"
            )
        tokenizer.pad_token = eos
        warnings.warn(
            f"the tokenizer has no pad token: padding with its eos token {eos!r} "
            "(padding positions are left out of every statistic)",
            UserWarning,
            stacklevel=3,
        )
        return tokenizer

    def tokenize(self, texts, tokenizer=None, max_length=None):
        """Model inputs for a list of texts.

        Parameters
        ----------
        texts : list of str
        tokenizer : callable, default=None
            A Hugging Face tokenizer; required unless the model has its own.
        max_length : int, default=None
            Truncate to this many tokens.

        Returns
        -------
        batch : dict of tensors
        """
        if tokenizer is None:
            raise ValueError(
                "data holds texts, and the model has no tokenizer of its own (it "
                "is not a sentence-transformers model): pass tokenizer="
            )
        self.check_tokenizer(tokenizer)
        with _right_padding(tokenizer):
            return dict(
                tokenizer(
                    texts,
                    padding=True,
                    truncation=True,
                    max_length=max_length,
                    return_tensors="pt",
                )
            )

    def _device(self, model=None):
        try:
            return next((model or self.model).parameters()).device
        except StopIteration:
            return torch.device("cpu")

    def _outputs(self, model, texts, tokenizer, batch_size, max_length):
        """(final output, mask) of ``model`` on ``texts``, batch by batch."""
        device = self._device(model)
        adapter = type(self)(model)
        for start in range(0, len(texts), batch_size):
            batch = self.tokenize(
                texts[start : start + batch_size], tokenizer, max_length
            )
            batch = {
                k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()
            }
            # never yield inside no_grad: a suspended generator would leave
            # gradients off for its caller
            with torch.no_grad():
                out = adapter.final(adapter.run(batch))
            yield out, self.mask(batch), batch

    # -- evaluation -------------------------------------------------------

    def evaluate(
        self,
        original,
        compressed,
        texts,
        tokenizer=None,
        *,
        batch_size=16,
        max_length=None,
    ):
        """How the compressed model answers on ``texts``, against the original.

        By output kind:

        - sentence embedding, hidden states: ``mean_cosine`` and
          ``worst_cosine`` of the sentence embeddings (the mean of the last
          hidden states over real tokens when the model gives no sentence
          embedding), and ``top5_overlap``, the mean share of each text's 5
          nearest neighbours (among ``texts``) that both models agree on;
        - causal LM: ``perplexity`` of each model on the texts
          (``perplexity_original``), their ratio, the mean ``kl`` of the
          next-token distributions and ``top1_agreement`` of the next-token
          predictions, over every real position;
        - classifier: ``label_agreement`` and the mean ``kl`` of the class
          distributions;
        - masked LM, encoder-decoder: the mean ``kl`` and ``top1_agreement``
          of the token distributions over real positions.

        Parameters
        ----------
        original, compressed : torch.nn.Module
            The original model and its compressed copy (of this family).
        texts : list of str
            Held-out text, never used for calibration or heal.
        tokenizer : callable, default=None
            Required unless the model has its own.
        batch_size : int, default=16
        max_length : int, default=None

        Returns
        -------
        metrics : dict of float
            Also ``n_texts``.
        """
        if isinstance(texts, str) or not texts:
            raise ValueError("evaluate: texts must be a non-empty list of strings")
        texts = list(texts)
        args = (tokenizer, batch_size, max_length)
        pairs = zip(
            self._outputs(original, texts, *args),
            self._outputs(compressed, texts, *args),
            strict=True,
        )
        kind = self.output_kind
        if kind in ("causal_lm", "masked_lm", "seq2seq", "classifier"):
            return self._evaluate_logits(pairs, kind, len(texts))
        return self._evaluate_embeddings(pairs, len(texts))

    def _evaluate_logits(self, pairs, kind, n_texts):
        kl = agree = nll_t = nll_s = 0.0
        count = 0
        for (t, mask, batch), (s, _, _) in pairs:
            if kind == "classifier":
                kl += float(_kl(s, t).sum())
                agree += float((s.argmax(-1) == t.argmax(-1)).sum())
                count += t.shape[0]
                continue
            if mask is None:
                mask = torch.ones(t.shape[:-1], dtype=torch.bool, device=t.device)
            if kind == "causal_lm":
                # the prediction at position i is scored on token i + 1
                ids = batch["input_ids"][:, 1:]
                real = mask[:, 1:] & mask[:, :-1]
                t, s = t[:, :-1], s[:, :-1]
                for logits, which in ((t, "t"), (s, "s")):
                    logp = torch.log_softmax(logits.float(), dim=-1)
                    nll = -logp.gather(-1, ids.unsqueeze(-1)).squeeze(-1)
                    value = float(nll[real].sum())
                    if which == "t":
                        nll_t += value
                    else:
                        nll_s += value
            else:
                real = mask
            kl += float(_kl(s, t)[real].sum())
            agree += float((s.argmax(-1) == t.argmax(-1))[real].sum())
            count += int(real.sum())
        if count == 0:
            raise ValueError("evaluate: the texts hold no position to score")
        if kind == "classifier":
            return {
                "label_agreement": agree / count,
                "kl": kl / count,
                "n_texts": n_texts,
            }
        out = {"kl": kl / count, "top1_agreement": agree / count}
        if kind == "causal_lm":
            ppl_t, ppl_s = math.exp(nll_t / count), math.exp(nll_s / count)
            out = {
                "perplexity_original": ppl_t,
                "perplexity": ppl_s,
                "perplexity_ratio": ppl_s / ppl_t,
                **out,
            }
        out["n_tokens"] = count
        out["n_texts"] = n_texts
        return out

    def _evaluate_embeddings(self, pairs, n_texts):
        ref, com = [], []
        for (t, mask, _), (s, _, _) in pairs:
            if t.dim() == 3:  # hidden states: their mean over real tokens
                m = (
                    torch.ones(t.shape[:2], device=t.device)
                    if mask is None
                    else mask.to(t.dtype)
                ).unsqueeze(-1)
                t = (t * m).sum(1) / m.sum(1).clamp_min(1)
                s = (s * m).sum(1) / m.sum(1).clamp_min(1)
            ref.append(nn.functional.normalize(t.float(), dim=-1).cpu().numpy())
            com.append(nn.functional.normalize(s.float(), dim=-1).cpu().numpy())
        metrics = _fidelity(np.concatenate(ref), np.concatenate(com))
        return {**metrics, "n_texts": n_texts}


def _fidelity(reference, compressed):
    """Mean and worst cosine, and the mean overlap of the nearest neighbours."""
    cos = np.sum(reference * compressed, axis=1)
    k = min(_N_NEIGHBOURS, len(reference) - 1)
    if k < 1:
        overlap = 1.0
    else:

        def neighbours(E):
            sim = E @ E.T
            np.fill_diagonal(sim, -np.inf)
            return np.argsort(-sim, axis=1, kind="stable")[:, :k]

        a, b = neighbours(reference), neighbours(compressed)
        overlap = float(
            np.mean([len(set(x) & set(y)) / k for x, y in zip(a, b, strict=True)])
        )
    return {
        "mean_cosine": float(cos.mean()),
        "worst_cosine": float(cos.min()),
        "top5_overlap": overlap,
    }


# -- Hugging Face transformers --------------------------------------------------

# the head a transformers class carries, from its name
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


class GPT2Adapter(TransformersAdapter):
    """GPT-2: Conv1D layers (Linear in all but name), head tied to ``wte``."""

    family = "gpt2"
    model_types = ("gpt2",)
    stacks = ("h",)


class LlamaAdapter(TransformersAdapter):
    """Llama-architecture decoders (Llama, Qwen2, Mistral, SmolLM2), tied or not."""

    family = "llama"
    model_types = ("llama", "qwen2", "qwen3", "mistral")
    stacks = ("layers",)


class T5Adapter(TransformersAdapter):
    """T5: the encoder alone, or the encoder-decoder.

    The word embedding is ``shared``, which the encoder's and decoder's
    ``embed_tokens`` (and a tied ``lm_head``) hold too: compressing it
    compresses them all, through the same factors.
    """

    family = "t5"
    model_types = ("t5", "mt5", "umt5")
    stacks = ("encoder.block", "decoder.block")


# -- sentence-transformers -------------------------------------------------------


def _is_sentence_transformer(model):
    """A sentence-transformers model (duck-typed: it tokenizes and encodes)."""
    return callable(getattr(model, "tokenize", None)) and callable(
        getattr(model, "encode", None)
    )


class SentenceTransformerAdapter(ModelAdapter):
    """A sentence-transformers model: the sentence embedding is its output.

    Its structure is that of the transformers model inside it (its
    ``auto_model``), whose adapter answers, with names prefixed.
    """

    family = "sentence-transformers"

    @classmethod
    def matches(cls, model):
        return _is_sentence_transformer(model)

    def _inner(self):
        """(prefix, adapter) of the transformer inside, or (None, None)."""
        for child in self.model.children():
            auto = getattr(child, "auto_model", None)
            if isinstance(auto, nn.Module):
                name = _module_name(self.model, auto)
                if name is not None:
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


# -- the registry ----------------------------------------------------------------

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
        :class:`~kflats.torch._layers.SharedEmbedding` of the new
        :class:`ProjectiveEmbedding` for another Embedding holding the table,
        a :class:`ProjectiveTiedHead` for a Linear head.
    """
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


def quiet():
    """A context that silences transformers and sentence-transformers' logs."""
    from ._io import _quiet

    return _quiet()


def load_pretrained(path, *, gguf_file=None):
    """A transformers model of the class its config names, and its tokenizer.

    The model comes back as what it is (``LlamaForCausalLM`` with its LM
    head, ``BertForSequenceClassification`` with its classifier; the first
    class of ``config.architectures``), from local files only, running no
    code from the folder. A folder the model cannot be read from faithfully
    is refused instead of papered over.

    Parameters
    ----------
    path : str or path-like
        A model folder, a ``.gguf`` file, or a folder holding one (and no
        ``config.json``).
    gguf_file : str, default=None
        The GGUF file's name inside the folder (dequantized to float32).

    Returns
    -------
    model : transformers.PreTrainedModel
        In eval mode.
    tokenizer : transformers tokenizer

    Raises
    ------
    ValueError
        If the folder holds no tokenizer files, if its weights do not match
        its config (missing, unexpected or mismatched tensors, which
        transformers would fill at random), or if it cannot be read.

    Examples
    --------
    >>> from kflats.datasets import minilm_model_dir
    >>> from kflats.torch._models import load_pretrained
    >>> model, tokenizer = load_pretrained(minilm_model_dir())
    >>> type(model).__name__, tokenizer("a cat")["input_ids"]
    ('BertModel', [101, 1037, 4937, 102])
    """
    import warnings

    from ._pretrained import load_model, model_source

    source = model_source(
        path if gguf_file is None else Path(path) / gguf_file,
        label="model folder",
        sentence_transformers=False,
    )
    loaded = load_model(source)
    if loaded.note:
        warnings.warn(loaded.note, UserWarning, stacklevel=2)
    return loaded.model, loaded.tokenizer
