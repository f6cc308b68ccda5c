"""Calibration: what the calibrated objectives need, recorded on real inputs.

:func:`calibrate` runs a model over calibration data with forward hooks that
only accumulate (token counts for Embeddings, input second moments for
Linears), in the spirit of PyTorch's post-training-quantization observers;
:class:`Calibration` (``_calibration_data``) holds the result by module
name and saves it.
:func:`token_frequencies` is the stand-alone count for one embedding table.
"""

import numbers
import weakref
from collections.abc import Iterable, Mapping

import numpy as np
import torch
from torch import nn

from kflats.torch._progress import progress_bar
from kflats.torch.calibration._moments import _MomentSum
from kflats.torch.calibration._result import Calibration
from kflats.torch.layers import dense_features
from kflats.torch.models import adapter_for


def token_frequencies(tokenizer, texts, *, vocab_size=None, smoothing=1.0):
    """How often each token id occurs in ``texts``, to weigh embedding rows.

    Rows of an embedding table are not equally important: a token that never
    occurs costs nothing when it is approximated badly. Passing these
    frequencies as ``sample_weight`` (to :func:`kflats.factorize.factorize`,
    :meth:`ProjectiveEmbedding.from_embedding` or :func:`compress` with one
    target) spends the factorization's accuracy on the tokens a model actually
    sees. Use a calibration text that resembles the model's inputs and is
    disjoint from any text you evaluate on.

    Parameters
    ----------
    tokenizer : callable
        A Hugging Face tokenizer, or any callable that maps a list of strings to
        a mapping with an ``"input_ids"`` entry: one sequence of token ids per
        string (special tokens included, as the model sees them).
    texts : iterable of str
        The calibration text, one string per line or document.
    vocab_size : int, default=None
        Length of the result; ``None`` uses ``len(tokenizer)``.
    smoothing : float, default=1.0
        Added to every count, so that no token gets weight 0 (a zero weight
        lets the factorization ignore a row entirely).

    Returns
    -------
    weights : ndarray of shape (vocab_size,), float64
        ``count + smoothing`` for every token id.

    Examples
    --------
    >>> from kflats.torch import token_frequencies
    >>> def tokenizer(texts):  # a toy tokenizer: one id per word
    ...     return {"input_ids": [[len(word) for word in t.split()] for t in texts]}
    >>> token_frequencies(tokenizer, ["a bb a", "ccc"], vocab_size=5).tolist()
    [1.0, 3.0, 2.0, 2.0, 1.0]
    """
    if isinstance(texts, str) or not isinstance(texts, Iterable):
        raise TypeError(
            "texts must be an iterable of strings (e.g. a list of lines), got "
            f"{type(texts).__name__}."
        )
    texts = list(texts)
    if not texts or not all(isinstance(t, str) for t in texts):
        raise ValueError("texts must be a non-empty iterable of strings.")
    if not smoothing >= 0:
        raise ValueError(f"smoothing must be >= 0, got {smoothing!r}.")
    if vocab_size is None:
        vocab_size = len(tokenizer)
    if int(vocab_size) != vocab_size or vocab_size < 1:
        raise ValueError(f"vocab_size must be a positive integer, got {vocab_size!r}.")
    ids = tokenizer(texts)["input_ids"]
    flat = np.concatenate([np.asarray(seq, dtype=np.int64).ravel() for seq in ids])
    if flat.size and (flat.min() < 0 or flat.max() >= vocab_size):
        raise ValueError(
            f"the tokenizer produced ids in [{flat.min()}, {flat.max()}], outside "
            f"[0, vocab_size={vocab_size})."
        )
    counts = np.bincount(flat, minlength=int(vocab_size)).astype(np.float64)
    return counts + smoothing


# --------------------------------------------------------------------------
# calibrate: one pass over calibration data, statistics kept by module name

# batches above which progress=None shows a progress bar
_PROGRESS_BATCHES = 8
# input batches a Calibration keeps (token ids, not activations) for compress
# to measure how much each module's error moves the model's output
_PROBE_SEQUENCES = 64


class _Observer:
    """Accumulates one module's statistics from its forward inputs."""

    def __init__(self, module, state):
        self.kind = "Embedding" if isinstance(module, nn.Embedding) else "Linear"
        self.state = state
        if self.kind == "Embedding":
            self.counts = torch.zeros(module.num_embeddings, dtype=torch.int64)
        else:
            self.n_in = dense_features(module)[0]
            self.moments = None  # a _MomentSum, shared with the same input's

    def _rows(self, x, features=False):
        """The rows of x at real (not padding) positions.

        ``features``: x has a last dimension of features (a Linear's input),
        beyond the mask's: an input of one row per sequence (a pooler's, the
        first token's) is not masked, though its features may number as
        many as a batch's positions.
        """
        mask = self.state.get("mask")
        if (
            mask is not None
            and x.dim() >= mask.dim() + features
            and x.shape[: mask.dim()] == mask.shape
        ):
            return x[mask.to(x.device)]
        return x

    def __call__(self, module, args):
        x = args[0].detach()
        if self.kind == "Embedding":
            ids = self._rows(x).reshape(-1).to("cpu", torch.int64)
            self.counts += torch.bincount(ids, minlength=self.counts.numel())
            return
        # several layers often read the same input tensor (queries, keys and
        # values): one product and one sum serve them. The weak reference
        # tells a live tensor from a new one that reuses a freed tensor's id.
        cache = self.state["moments"]
        hit = cache.get(id(args[0]))
        if hit is None or hit[0]() is not args[0]:
            hit = (weakref.ref(args[0]), set())
            cache[id(args[0])] = hit
        added = hit[1]
        batch = self.state["batch"]
        if self.moments is None:  # its first batch: share a reader's that
            # began with this batch too
            first = next((m for m in added if m.since == batch), None)
            self.moments = first if first is not None else _MomentSum(self.n_in)
        if self.moments not in added:
            self.moments = self.moments.add(self.rows(x), batch, (args[0], self))
            added.add(self.moments)

    def rows(self, x):
        """The real rows of an input, 2-D, in float32 (or float64)."""
        rows = self._rows(x.detach(), features=True).reshape(-1, x.shape[-1])
        if not rows.dtype.is_floating_point or rows.dtype in (
            torch.float16,
            torch.bfloat16,
        ):
            rows = rows.float()
        return rows

    def record(self):
        if self.kind == "Embedding":
            return {"kind": self.kind, "counts": self.counts.numpy()}
        sums = self.moments
        if sums is None:  # never called
            sums = _MomentSum(self.n_in)
        sums.last = None
        return {"kind": self.kind, "moment_sum": sums.array(), "n_rows": sums.n_rows}


def check_count(value, name):
    """Raise unless ``value`` is an int >= 1 (bools excluded)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")


def _batches(adapter, data, tokenizer, batch_size, max_length):
    """Model-input dicts, and how many there will be (None when unknown)."""
    if isinstance(data, str):
        raise TypeError(
            "data must be a list of strings or an iterable of model-input dicts, "
            "not one string"
        )
    if (
        isinstance(data, (list, tuple))
        and data
        and all(isinstance(t, str) for t in data)
    ):
        texts = list(data)
        if tokenizer is None and not adapter.has_tokenizer():
            raise ValueError(
                "data holds texts, and the model has no tokenizer of its own (it "
                "is not a sentence-transformers model): pass tokenizer="
            )
        if tokenizer is not None:
            adapter.check_tokenizer(tokenizer)

        n = -(-len(texts) // batch_size)
        # the probe's batches first, as given; the rest by length, so that a
        # batch pads its texts to a length near theirs (moments and counts
        # are sums: the order does not change them)
        first = -(-_PROBE_SEQUENCES // batch_size) * batch_size
        texts = texts[:first] + sorted(texts[first:], key=len)
        chunks = (texts[i : i + batch_size] for i in range(0, len(texts), batch_size))
        return (adapter.tokenize(c, tokenizer, max_length) for c in chunks), n
    if isinstance(data, (list, tuple)) and not data:
        raise ValueError("data is empty: calibration needs at least one sentence")
    if not isinstance(data, Iterable):
        raise TypeError(
            "data must be a list of strings or an iterable of model-input dicts, "
            f"got {type(data).__name__}"
        )
    n = len(data) if hasattr(data, "__len__") else None
    return iter(data), n


def calibrate(
    model,
    data,
    *,
    tokenizer=None,
    targets=None,
    batch_size=32,
    max_length=None,
    progress=None,
):
    """Record what the calibrated objectives need, in one pass over data.

    Forward hooks, attached for the pass and always removed, record for each
    target :class:`torch.nn.Embedding` how often each token id is looked up
    (in any module that shares its table: T5's encoder and decoder read
    ``shared`` through their own ``embed_tokens``; an output head tied to
    the table has its input moment recorded under its own name, for the
    table's fit), and for each target
    :class:`torch.nn.Linear` (or transformers ``Conv1D``) the second moment
    of its input, ``sum x x^T`` (float32, d_in x d_in; one array for the
    modules that read the same input, such as a block's queries, keys and
    values) and the number of rows. No
    activation is kept, padding positions are left out, and no gradient is
    computed. Records are keyed by qualified module name, so a calibration
    of one copy of a model serves any copy of the same architecture, and
    :meth:`Calibration.save` keeps it for later compressions.

    Parameters
    ----------
    model : torch.nn.Module
        A sentence-transformers model, a Hugging Face model, or any module
        that takes the input dicts in ``data``. Left in the mode (train or
        eval) it was in.
    data : list of str, or iterable of dict
        Calibration text (one sentence or document per string; it needs a
        tokenizer: the model's own for a sentence-transformers model, else
        ``tokenizer=``), or model-input dicts (``input_ids``,
        ``attention_mask``, ...), passed to the model as its adapter runs
        it (``model(batch)`` for a sentence-transformers model,
        ``model(**batch)`` otherwise, with decoder inputs added for an
        encoder-decoder). A tokenizer without a pad token pads with its eos
        token, with a warning. Keep it disjoint from any text you evaluate
        on.
    tokenizer : callable, default=None
        A Hugging Face tokenizer for texts.
    targets : str, type, or list of them, default=None
        Modules to record (patterns, types, names, as in :func:`compress`);
        ``None``: every Embedding, Linear and Conv1D module (a module that
        shares another's weight, such as a tied output head, stands for its
        source).
    batch_size : int, default=32
        Texts per forward pass.
    max_length : int, default=None
        Truncate texts to this many tokens; ``None``: the model's own limit.
    progress : bool, default=None
        Show a tqdm progress bar; ``None``: when there are more than 8
        batches.

    Returns
    -------
    calibration : Calibration

    Raises
    ------
    ValueError
        If ``data`` is empty, holds texts and no tokenizer is known, or a
        target matches no module.
    TypeError
        If ``data`` is neither texts nor dicts.

    See Also
    --------
    compress : ``calibration=`` takes the result (or texts).

    Examples
    --------
    >>> import torch
    >>> from kflats.torch import calibrate
    >>> model = torch.nn.Sequential(torch.nn.Embedding(10, 4),
    ...                             torch.nn.Linear(4, 2))
    >>> class Wrapper(torch.nn.Module):  # takes input dicts, like HF models
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.net = model
    ...     def forward(self, input_ids):
    ...         return self.net(input_ids)
    >>> cal = calibrate(Wrapper(), [{"input_ids": torch.tensor([[1, 2, 2]])}])
    >>> cal.names
    ('net.0', 'net.1')
    >>> cal.token_counts("net.0")[:4].tolist()
    [0, 1, 2, 0]
    >>> cal.input_moment("net.1").shape
    (4, 4)
    """
    from kflats.torch.models._targets import every_layer, select_modules

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    check_count(batch_size, "batch_size")
    if max_length is not None:
        check_count(max_length, "max_length")
    adapter = adapter_for(model)
    names, named = select_modules(model, targets, default=every_layer)
    if not names:
        raise ValueError(f"{type(model).__name__} has no Embedding or Linear module")
    batches, n_batches = _batches(adapter, data, tokenizer, int(batch_size), max_length)
    try:
        device = next(model.parameters()).device
    except StopIteration:
        device = torch.device("cpu")
    state = {"mask": None, "moments": {}, "batch": -1}
    ties = adapter.ties()
    observers = _observers(names, named, ties, state)
    bar = _progress_bar(progress, n_batches)
    handles = []
    was_training = model.training
    try:
        _attach(handles, observers, named, ties)
        head = adapter.output_head()
        if head is not None:  # its input is the last one read: stop there
            handles.append(named[head].register_forward_pre_hook(_stop))
        model.eval()
        n_sequences, probe = _record(adapter, batches, device, state, bar)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
        if bar is not None:
            bar.close()
    if n_sequences == 0:
        raise ValueError("data is empty: calibration needs at least one batch")
    cls = type(model)
    return Calibration(
        {name: obs.record() for name, obs in observers.items()},
        n_sequences=n_sequences,
        architecture=f"{cls.__module__}.{cls.__qualname__}",
        probe=probe,
    )


def _observers(names, named, ties, state):
    """One observer per target module, and one per output head tied to a target.

    A tied head's input moment is recorded too (under the head's name), for
    the table's fit to weigh the logits.
    """
    observers = {name: _Observer(named[name], state) for name in names}
    for follower, source in ties.items():
        head = named.get(follower)
        if source in observers and isinstance(head, nn.Linear):
            observers[follower] = _Observer(head, state)
    return observers


def _progress_bar(progress, n_batches):
    """A progress bar over the batches, or None (``progress=None``: when many)."""
    long = n_batches is None or n_batches > _PROGRESS_BATCHES
    return progress_bar(
        progress, long, total=n_batches, desc="kflats calibrate", unit="batch"
    )


def _attach(handles, observers, named, ties):
    """Hook each observer on its module, appending the handles to ``handles``."""
    for name, obs in observers.items():
        handles.append(named[name].register_forward_pre_hook(obs))
    # an Embedding holding the same table (T5's encoder and decoder
    # embed_tokens, for shared) counts its lookups for its source
    for follower, source in ties.items():
        if source in observers and type(named.get(follower)) is nn.Embedding:
            hook = observers[source]
            handles.append(named[follower].register_forward_pre_hook(hook))


class _Stopped(Exception):
    """Raised at the output head: the rest of the forward pass is not needed."""


def _stop(module, args):
    raise _Stopped


def _record(adapter, batches, device, state, bar):
    """Run the model over every batch, the observers hooked.

    Returns the number of sequences read and the probe batches kept (the
    first ones, about :data:`_PROBE_SEQUENCES` sequences, as numpy arrays).
    """
    n_sequences = 0
    probe, probe_rows = [], 0
    with torch.no_grad():
        for batch in batches:
            if not isinstance(batch, Mapping):
                raise TypeError(
                    "data must be a list of strings or an iterable of "
                    f"model-input dicts; got an item of type {type(batch).__name__}"
                )
            batch = {
                k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()
            }
            mask = batch.get("attention_mask")
            state["mask"] = None if mask is None else mask.bool()
            state["moments"] = {}
            state["batch"] += 1
            # a copy: sentence-transformers writes its outputs into the dict
            try:
                adapter.run(dict(batch))
            except _Stopped:
                pass
            if probe_rows < _PROBE_SEQUENCES and all(
                torch.is_tensor(v) or isinstance(v, str) for v in batch.values()
            ):
                probe.append(
                    {
                        k: v.cpu().numpy() if torch.is_tensor(v) else np.asarray(v)
                        for k, v in batch.items()
                    }
                )
                first = next(iter(batch.values()))
                probe_rows += int(first.shape[0]) if first.dim() > 1 else 1
            ids = batch.get("input_ids")
            n_sequences += (
                int(ids.shape[0]) if torch.is_tensor(ids) and ids.dim() > 1 else 1
            )
            if bar is not None:
                bar.update(1)
    return n_sequences, probe
