"""The adapter of plain modules, which every model family refines.

:class:`ModelAdapter` answers every question kflats asks a model: where its
word embedding is and which modules share its table, its block stacks and
their Linear layers, what it outputs and how to run it, how far a compressed
model's output is from the original's, how to tokenize text for it and how
to evaluate it. The families (:mod:`kflats.torch.models`) override what
differs.
"""

import contextlib
import warnings

import torch
from torch import nn

from kflats.torch.layers import is_linear
from kflats.torch.models._outputs import (
    _kl,
    _masked_mean,
    _tensor_output,
    evaluate_embeddings,
    evaluate_logits,
    relative_mse,
)


def _module_name(model, target):
    """Qualified name of ``target`` inside ``model`` (``""`` for the model)."""
    for name, module in model.named_modules():
        if module is target:
            return name
    return None


def _join(prefix, name):
    return f"{prefix}.{name}" if prefix and name else prefix or name


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
    >>> from kflats.torch.models import adapter_for
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

    def output_head(self):
        """Name of the module whose output is the model's final output, or None.

        Nothing after it matters to the calibration, which reads module
        inputs only: it stops the forward pass there (a causal LM's head
        computes logits over the whole vocabulary, a fifth of SmolLM2's
        forward pass and its largest tensor). The base adapter knows none.
        """
        return None

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
            if is_linear(module)
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
            return evaluate_logits(pairs, kind, len(texts))
        return evaluate_embeddings(pairs, len(texts))
