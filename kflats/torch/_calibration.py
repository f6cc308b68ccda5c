"""Calibration: what the calibrated objectives need, recorded on real inputs.

:func:`calibrate` runs a model over calibration data with forward hooks that
only accumulate (token counts for Embeddings, input second moments for
Linears), in the spirit of PyTorch's post-training-quantization observers;
:class:`Calibration` holds the result by module name and saves it.
:func:`token_frequencies` is the stand-alone count for one embedding table.
"""

import json
import numbers
import weakref
from collections.abc import Iterable, Mapping

import numpy as np
import torch
from torch import nn

from ._layers import _features
from ._models import adapter_for


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

_FORMAT = "kflats.torch.Calibration"
_VERSION = 1
# batches above which progress=None shows a progress bar
_PROGRESS_BATCHES = 8
# input batches a Calibration keeps (token ids, not activations) for compress
# to measure how much each module's error moves the model's output
_PROBE_SEQUENCES = 64


class Calibration:
    """What :func:`calibrate` recorded, by qualified module name.

    For each :class:`torch.nn.Embedding`, how often each row (token id) was
    looked up; for each :class:`torch.nn.Linear`, the sum of ``x x^T`` over
    its input rows ``x`` (float64) and their number. Padding positions are
    left out. No activation is kept.

    Parameters
    ----------
    records : dict
        ``name -> {"kind": "Embedding", "counts": ndarray (num_embeddings,)}``
        or ``name -> {"kind": "Linear", "moment_sum": ndarray (in, in),
        "n_rows": int}``.
    n_sequences : int, default=0
        Number of sequences (sentences) the pass read.
    architecture : str, default=""
        Class of the model the pass ran on (informative).
    probe : list of dict, default=()
        The first model-input batches of the pass (about 64 sequences of
        token ids and masks; no activations), as dicts of integer arrays.
        :func:`compress` runs them to weigh each module's error by how much
        it moves the model's output.

    Attributes
    ----------
    names : tuple of str
        The recorded modules, in model order.

    See Also
    --------
    calibrate : Build one.
    kflats.torch.compress : Its ``calibration=`` takes one.

    Examples
    --------
    >>> import numpy as np
    >>> from kflats.torch import Calibration
    >>> cal = Calibration({"emb": {"kind": "Embedding",
    ...                            "counts": np.array([3, 0, 1])}})
    >>> cal.token_weights("emb", smoothing=0.5).tolist()
    [3.5, 0.5, 1.5]
    """

    def __init__(self, records, *, n_sequences=0, architecture="", probe=()):
        self.probe = [{k: np.asarray(v) for k, v in batch.items()} for batch in probe]
        checked = {}
        for name, rec in records.items():
            kind = rec.get("kind")
            if kind == "Embedding":
                counts = np.asarray(rec["counts"])
                if counts.ndim != 1 or counts.dtype.kind not in "iu":
                    raise ValueError(
                        f"counts of {name!r} must be a 1-D integer array, got "
                        f"shape {counts.shape}, dtype {counts.dtype}"
                    )
                checked[name] = {"kind": kind, "counts": counts.astype(np.int64)}
            elif kind == "Linear":
                S = np.asarray(rec["moment_sum"], dtype=np.float64)
                if S.ndim != 2 or S.shape[0] != S.shape[1]:
                    raise ValueError(
                        f"moment_sum of {name!r} must be square, got {S.shape}"
                    )
                checked[name] = {
                    "kind": kind,
                    "moment_sum": S,
                    "n_rows": int(rec["n_rows"]),
                }
            else:
                raise ValueError(
                    f"record {name!r} has kind {kind!r}; expected 'Embedding' "
                    "or 'Linear'"
                )
        self._records = checked
        self.n_sequences = int(n_sequences)
        self.architecture = str(architecture)

    @property
    def names(self):
        """The recorded module names, in model order."""
        return tuple(self._records)

    def __contains__(self, name):
        return name in self._records

    def __repr__(self):
        kinds = [r["kind"] for r in self._records.values()]
        return (
            f"Calibration({kinds.count('Embedding')} Embedding, "
            f"{kinds.count('Linear')} Linear, n_sequences={self.n_sequences})"
        )

    def _get(self, name, kind):
        rec = self._records.get(name)
        if rec is None:
            raise KeyError(
                f"the calibration has no record of module {name!r}; it holds "
                f"{list(self._records)[:8]}{' ...' if len(self._records) > 8 else ''}"
            )
        if rec["kind"] != kind:
            raise ValueError(f"{name!r} was recorded as a {rec['kind']}, not a {kind}")
        return rec

    def token_counts(self, name):
        """How often each row of Embedding ``name`` was looked up.

        Parameters
        ----------
        name : str

        Returns
        -------
        counts : ndarray of shape (num_embeddings,), int64
        """
        return self._get(name, "Embedding")["counts"].copy()

    def token_weights(self, name, smoothing=1.0):
        """Row weights for Embedding ``name``: ``count + smoothing``.

        The weight of a token is how often the calibration text used it,
        plus ``smoothing``: a token the calibration never saw keeps the
        weight ``smoothing`` (default 1, as if seen once), so text that
        uses it later still finds it approximated, only with less care than
        a frequent one.

        Parameters
        ----------
        name : str
        smoothing : float, default=1.0
            Must be > 0: a zero weight would let the fit ignore a row.

        Returns
        -------
        weights : ndarray of shape (num_embeddings,), float64
        """
        if isinstance(smoothing, bool) or not (
            isinstance(smoothing, numbers.Real) and 0 < smoothing < np.inf
        ):
            raise ValueError(f"smoothing must be a finite float > 0, got {smoothing!r}")
        return self._get(name, "Embedding")["counts"] + float(smoothing)

    def input_moment(self, name):
        """``E[x x^T]`` of the inputs of Linear ``name`` (undamped).

        Parameters
        ----------
        name : str

        Returns
        -------
        moment : ndarray of shape (in_features, in_features), float64
        """
        rec = self._get(name, "Linear")
        if rec["n_rows"] == 0:
            raise ValueError(f"the calibration saw no input of {name!r}")
        return rec["moment_sum"] / rec["n_rows"]

    def _check_covers(self, model, names):
        """Raise unless every module in ``names`` was recorded with its shape."""
        named = dict(model.named_modules())
        for name in names:
            module = named[name]
            rec = self._records.get(name)
            kind = "Embedding" if isinstance(module, nn.Embedding) else "Linear"
            if rec is None or rec["kind"] != kind:
                raise ValueError(
                    f"the calibration has no {kind} record of {name!r}: it was "
                    "recorded on another model or for other targets (run "
                    "calibrate with these targets on this model)"
                )
            if kind == "Embedding":
                found, want = rec["counts"].shape[0], module.num_embeddings
            else:
                found, want = rec["moment_sum"].shape[0], _features(module)[0]
            if found != want:
                raise ValueError(
                    f"the calibration of {name!r} has size {found}, the module "
                    f"{want}: it was recorded on another model"
                )
            if kind == "Embedding" and not rec["counts"].any():
                raise ValueError(f"the calibration never looked up {name!r}")
            if kind == "Linear" and rec["n_rows"] == 0:
                raise ValueError(f"the calibration saw no input of {name!r}")

    def save(self, path):
        """Write the calibration to an ``.npz`` file (no pickle).

        Parameters
        ----------
        path : str or path-like or file-like

        Examples
        --------
        >>> import numpy as np, os, tempfile
        >>> from kflats.torch import Calibration
        >>> cal = Calibration({"fc": {"kind": "Linear",
        ...                           "moment_sum": np.eye(2), "n_rows": 4}})
        >>> path = os.path.join(tempfile.mkdtemp(), "cal.npz")
        >>> cal.save(path)
        >>> Calibration.load(path).input_moment("fc").tolist()
        [[0.25, 0.0], [0.0, 0.25]]
        """
        meta = {
            "n_sequences": self.n_sequences,
            "architecture": self.architecture,
            "modules": [
                {"name": n, "kind": r["kind"], "n_rows": r.get("n_rows", 0)}
                for n, r in self._records.items()
            ],
        }
        arrays = {
            "format": np.array(_FORMAT),
            "version": np.array(_VERSION),
            "meta": np.array(json.dumps(meta)),
        }
        for i, rec in enumerate(self._records.values()):
            key = "counts" if rec["kind"] == "Embedding" else "moment_sum"
            arrays[f"{key}_{i}"] = rec[key]
        meta["probe"] = [list(batch) for batch in self.probe]
        arrays["meta"] = np.array(json.dumps(meta))
        for b, batch in enumerate(self.probe):
            for i, value in enumerate(batch.values()):
                arrays[f"probe_{b}_{i}"] = value
        np.savez(path, **arrays)

    @classmethod
    def load(cls, path):
        """Read a calibration written by :meth:`save`.

        Parameters
        ----------
        path : str or path-like or file-like

        Returns
        -------
        calibration : Calibration

        Raises
        ------
        ValueError
            If the file is not a kflats calibration, or is corrupt.
        """
        from .._npz import NpzArchive

        with NpzArchive(path, what="a kflats calibration file") as npz:
            return cls(**_read_calibration(npz))


def _read_calibration(npz):
    """The arguments of :class:`Calibration` held in an open archive, checked."""
    where = npz.where
    if "format" not in npz or npz.string("format") != _FORMAT:
        raise ValueError(
            f"{where} is not a kflats calibration file (written by Calibration.save)"
        )
    version = npz.read("version", kinds="biufcU") if "version" in npz else None
    if (
        version is None
        or version.shape != ()
        or version.dtype.kind not in "iu"
        or int(version) != _VERSION
    ):
        shown = None if version is None else version.tolist()
        if version is not None and version.size > 4:
            shown = f"an array of shape {version.shape}"
        raise ValueError(
            f"{where} has format version {shown!r}; this kflats reads the integer "
            f"version {_VERSION}"
        )
    try:
        meta = json.loads(npz.string("meta"))
    except ValueError as exc:
        raise ValueError(f"{where}, member 'meta': not valid JSON: {exc}") from None

    def corrupt(problem):
        return ValueError(f"{where} is a corrupt kflats calibration file: {problem}")

    def count(value, what):
        if type(value) is not int or value < 0:
            raise corrupt(f"{what} must be an integer >= 0, got {value!r}")
        return value

    if not isinstance(meta, dict):
        raise corrupt("its 'meta' is not a JSON object")
    modules, probe_keys = meta.get("modules"), meta.get("probe", [])
    if not isinstance(modules, list) or not isinstance(probe_keys, list):
        raise corrupt("'meta' needs a list of modules (and of probe keys)")
    if not isinstance(meta.get("architecture"), str):
        raise corrupt(f"architecture {meta.get('architecture')!r} is not a string")
    expected, records = {"format", "version", "meta"}, {}
    for i, m in enumerate(modules):
        if not isinstance(m, dict) or m.get("kind") not in ("Embedding", "Linear"):
            raise corrupt(f"module entry {i} is not an Embedding or Linear record")
        name = m.get("name")
        if not isinstance(name, str):
            raise corrupt(f"module entry {i} has name {name!r}, not a string")
        if name in records:
            raise corrupt(f"module {name!r} is recorded twice")
        records[name] = m
        expected.add(f"{'counts' if m['kind'] == 'Embedding' else 'moment_sum'}_{i}")
    for b, keys in enumerate(probe_keys):
        if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
            raise corrupt(f"probe batch {b} is not a list of input names")
        if len(set(keys)) != len(keys):
            raise corrupt(f"probe batch {b} names an input twice")
        expected.update(f"probe_{b}_{i}" for i in range(len(keys)))
    npz.only(expected)
    missing = sorted(expected.difference(npz.names))
    if missing:
        raise corrupt(f"member(s) {missing[:4]} missing")
    checked = {}
    for i, (name, m) in enumerate(records.items()):
        if m["kind"] == "Embedding":
            counts = npz.read(f"counts_{i}", kinds="iu", ndim=1)
            if counts.size and counts.min() < 0:
                raise corrupt(f"the token counts of {name!r} hold negative values")
            checked[name] = {"kind": "Embedding", "counts": counts}
            continue
        n_rows = count(m.get("n_rows"), f"the row count of {name!r}")
        header = npz.header(f"moment_sum_{i}")
        if len(header.shape) != 2 or header.shape[0] != header.shape[1]:
            raise corrupt(f"the moment of {name!r} is not square: {header.shape}")
        if header.dtype.kind == "c":
            raise corrupt(f"the moment of {name!r} is complex ({header.dtype})")
        S = npz.read(f"moment_sum_{i}", kinds="f", ndim=2)
        if not np.isfinite(S).all():
            raise corrupt(f"the moment of {name!r} holds non-finite values")
        checked[name] = {"kind": "Linear", "moment_sum": S, "n_rows": n_rows}
    probe = [
        {key: npz.read(f"probe_{b}_{i}", kinds="biu") for i, key in enumerate(keys)}
        for b, keys in enumerate(probe_keys)
    ]
    return {
        "records": checked,
        "n_sequences": count(meta.get("n_sequences"), "n_sequences"),
        "architecture": meta["architecture"],
        "probe": probe,
    }


class _Observer:
    """Accumulates one module's statistics from its forward inputs."""

    def __init__(self, module, state):
        self.kind = "Embedding" if isinstance(module, nn.Embedding) else "Linear"
        self.state = state
        if self.kind == "Embedding":
            self.counts = torch.zeros(module.num_embeddings, dtype=torch.int64)
        else:
            n_in = _features(module)[0]
            self.moment_sum = torch.zeros(n_in, n_in, dtype=torch.float64)
            self.n_rows = 0

    def _rows(self, x):
        """The rows of x at real (not padding) positions."""
        mask = self.state.get("mask")
        if (
            mask is not None
            and x.dim() >= mask.dim()
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
        # values): one product serves them. The weak reference tells a live
        # tensor from a new one that reuses a freed tensor's id.
        cache = self.state["moments"]
        hit = cache.get(id(args[0]))
        if hit is None or hit[0]() is not args[0]:
            rows = self._rows(x).reshape(-1, x.shape[-1])
            if not rows.dtype.is_floating_point or rows.dtype in (
                torch.float16,
                torch.bfloat16,
            ):
                rows = rows.float()
            # float32 products per batch, summed in float64 across batches
            moment = (rows.T @ rows).to("cpu", torch.float64)
            hit = (weakref.ref(args[0]), moment, rows.shape[0])
            cache[id(args[0])] = hit
        _, moment, n = hit
        self.moment_sum += moment
        self.n_rows += n

    def record(self):
        if self.kind == "Embedding":
            return {"kind": self.kind, "counts": self.counts.numpy()}
        return {
            "kind": self.kind,
            "moment_sum": self.moment_sum.numpy(),
            "n_rows": self.n_rows,
        }


def _check_count(value, name):
    """Raise unless ``value`` is an int >= 1 (bools excluded)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")


def _is_sentence_transformer(model):
    """Whether the model is a sentence-transformers model (its adapter says)."""
    from ._models import SentenceTransformerAdapter

    return isinstance(adapter_for(model), SentenceTransformerAdapter)


def _tokenize(model, tokenizer, texts, max_length):
    """Model inputs for a list of texts, by ``tokenizer`` or the model's own."""
    return adapter_for(model).tokenize(texts, tokenizer, max_length)


def _run(model, batch):
    """One forward pass on an input dict, as the model takes it."""
    return adapter_for(model).run(batch)


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
    of its input, ``sum x x^T`` (float64, d_in x d_in) and the number of rows. No
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
    from ._targets import _every_layer, _select

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    _check_count(batch_size, "batch_size")
    if max_length is not None:
        _check_count(max_length, "max_length")
    adapter = adapter_for(model)
    names, named = _select(model, targets, default=_every_layer)
    if not names:
        raise ValueError(f"{type(model).__name__} has no Embedding or Linear module")
    batches, n_batches = _batches(adapter, data, tokenizer, int(batch_size), max_length)
    try:
        device = next(model.parameters()).device
    except StopIteration:
        device = torch.device("cpu")

    state = {"mask": None, "moments": {}}
    observers = {name: _Observer(named[name], state) for name in names}
    ties = adapter.ties()
    # an output head tied to a recorded table: its input moment is recorded
    # too (under the head's name), for the table's fit to weigh the logits
    for follower, source in ties.items():
        head = named.get(follower)
        if source in observers and isinstance(head, nn.Linear):
            observers[follower] = _Observer(head, state)
    show = (
        (n_batches is None or n_batches > _PROGRESS_BATCHES)
        if progress is None
        else bool(progress)
    )
    bar = None
    if show:
        try:
            from tqdm.auto import tqdm

            bar = tqdm(total=n_batches, desc="kflats calibrate", unit="batch")
        except ImportError:  # pragma: no cover - tqdm is in the torch extra
            bar = None
    handles = []
    was_training = model.training
    n_sequences = 0
    probe, probe_rows = [], 0
    try:
        for name, obs in observers.items():
            handles.append(named[name].register_forward_pre_hook(obs))
        # an Embedding holding the same table (T5's encoder and decoder
        # embed_tokens, for shared) counts its lookups for its source
        for follower, source in ties.items():
            if source in observers and type(named.get(follower)) is nn.Embedding:
                hook = observers[source]
                handles.append(named[follower].register_forward_pre_hook(hook))
        model.eval()
        with torch.no_grad():
            for batch in batches:
                if not isinstance(batch, Mapping):
                    raise TypeError(
                        "data must be a list of strings or an iterable of "
                        f"model-input dicts; got an item of type {type(batch).__name__}"
                    )
                batch = {
                    k: v.to(device) if torch.is_tensor(v) else v
                    for k, v in batch.items()
                }
                mask = batch.get("attention_mask")
                state["mask"] = None if mask is None else mask.bool()
                state["moments"] = {}
                adapter.run(batch)
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
