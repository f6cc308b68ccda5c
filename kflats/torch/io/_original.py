"""A model folder checked, then loaded as what it is (``kflats compress``'s input).

- :func:`model_source` checks a folder without loading anything: a
  sentence-transformers folder (``modules.json``), a Hugging Face folder
  (``config.json`` and weights), or a GGUF file (or a folder holding one);
  the tokenizer files must be there.
- A GGUF file's header is read first, as untrusted data
  (:mod:`._gguf_check`): counts, lengths, types and offsets bounded by the
  file, the architecture one kflats has an adapter for, every tensor of a
  type it dequantizes.
- :func:`load_model` loads it: a sentence-transformers model as a
  ``SentenceTransformer``; a Hugging Face model as the class its config names
  in ``architectures`` (looked up in the ``transformers`` package only, never
  in the folder; ``AutoModel`` when it names none), so that its heads come
  out with it. Nothing from the folder runs: ``trust_remote_code=False`` and
  an attention implementation kflats names. Weights that do not match the
  config (missing or unexpected keys) are refused; a tokenizer without a pad
  token pads with its end-of-sequence token, and :class:`Loaded` says so.

Errors name the folder as ``label`` does (``kflats compress`` calls it
``MODEL_DIR``).
"""

import contextlib
import copy
import functools
import importlib.util
import json
import re
from pathlib import Path
from typing import NamedTuple

from kflats.torch.io._config_files import _TOKENIZER_FILES, _with_portable_attention

SENTENCE_TRANSFORMERS, TRANSFORMERS = "sentence-transformers", "transformers"

_WEIGHTS = ("*.safetensors", "*.bin", "*/*.safetensors", "*/*.bin")
# the attribute of a model read from a GGUF file that holds the file's path
_GGUF_SOURCE = "kflats_gguf_source"


class Source(NamedTuple):
    """A checked model folder: the folder, its kind, and the GGUF file's name.

    ``what`` names it in messages (``MODEL_DIR '...'``).
    """

    folder: Path
    kind: str
    gguf_file: str | None = None
    shown: str = ""
    what: str = ""


def model_source(model_dir, *, label="MODEL_DIR", sentence_transformers=True):
    """A model folder checked, before anything is loaded: a :class:`Source`.

    ``model_dir=None`` is the bundled all-MiniLM-L6-v2. With
    ``sentence_transformers=False`` a folder that is both a
    sentence-transformers and a Hugging Face folder is read as the latter.
    """
    if model_dir is None:
        from kflats.datasets import minilm_model_dir

        model_dir = minilm_model_dir()
    shown, path = str(model_dir), Path(model_dir)
    what = f"{label} {shown!r}"
    if not path.exists():
        raise ValueError(f"{what} does not exist")
    if path.is_file() and path.suffix.lower() == ".gguf":
        return _gguf(path.parent, path.name, shown, what)
    if not path.is_dir():
        raise ValueError(f"{what} is neither a folder nor a .gguf file")
    has_weights = any(next(path.glob(p), None) for p in _WEIGHTS)
    ggufs = sorted(p.name for p in path.glob("*.gguf"))
    if not has_weights and ggufs:
        if len(ggufs) > 1:
            raise ValueError(
                f"{what} holds {len(ggufs)} GGUF files ({', '.join(ggufs)}): pass "
                "the one to compress as MODEL_DIR"
            )
        return _gguf(path, ggufs[0], shown, what)
    if not has_weights:
        raise ValueError(
            f"{what} holds no model weights (*.safetensors or *.bin, at its top "
            "or one folder down, or a .gguf file)"
        )
    if sentence_transformers and (path / "modules.json").is_file():
        kind = SENTENCE_TRANSFORMERS
    elif (path / "config.json").is_file():
        kind = TRANSFORMERS
    else:
        raise ValueError(
            f"{what} is neither a sentence-transformers folder (modules.json) nor "
            "a Hugging Face one (config.json)"
        )
    _check_tokenizer_files(_tokenizer_folder(path, kind), what)
    return Source(path, kind, None, shown, what)


def _gguf(folder, name, shown, what):
    for package in ("gguf", "accelerate"):
        if importlib.util.find_spec(package) is None:
            raise ModuleNotFoundError(
                f"reading the GGUF file {name!r} needs the {package} package",
                name=package,
            )
    return Source(folder, TRANSFORMERS, name, shown, what)


def _tokenizer_folder(path, kind):
    """Where the tokenizer files are: a sentence-transformers model's Transformer."""
    if kind != SENTENCE_TRANSFORMERS:
        return path
    try:
        modules = json.loads((path / "modules.json").read_text(encoding="utf-8"))
        entry = next(
            m
            for m in modules
            if isinstance(m, dict) and str(m.get("type", "")).endswith("Transformer")
        )
        inner = (path / str(entry.get("path", ""))).resolve()
    except (OSError, ValueError, TypeError, StopIteration):
        return path  # sentence-transformers says what is wrong when it loads
    root = path.resolve()
    return inner if inner == root or root in inner.parents else path


def _check_tokenizer_files(folder, what):
    names = {p.name for p in folder.iterdir()} if folder.is_dir() else set()
    if any(set(group) <= names for group in _TOKENIZER_FILES):
        return
    listed = ", ".join(" with ".join(group) for group in _TOKENIZER_FILES)
    raise ValueError(
        f"{what} holds no tokenizer files ({listed}): the tokenizer transformers "
        "would build from it knows no words"
    )


# --- loading -------------------------------------------------------------------


@contextlib.contextmanager
def hushed():
    """Silence transformers' and sentence-transformers' logging, warnings and bars.

    transformers' switch reaches the bars it draws through its logging; the
    conversion of a GGUF file's tensors draws its own ``tqdm`` bar, which is
    made silent here too. Everything is restored on exit.
    """
    import transformers  # noqa: F401 - imported first, so that its bars go quiet

    from kflats.torch.io._quiet import _quiet

    with _quiet(), _silent_gguf_conversion():
        yield


@contextlib.contextmanager
def _silent_gguf_conversion():
    """transformers' GGUF reader with a progress bar that draws nothing."""
    try:
        from transformers import modeling_gguf_pytorch_utils as reader
    except ImportError:  # a transformers without GGUF support draws no bar
        yield
        return
    bar = getattr(reader, "tqdm", None)
    if bar is None:
        yield
        return
    reader.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        reader.tqdm = bar


class Loaded(NamedTuple):
    """A loaded model: the tokenizer it runs with and the one to save.

    ``note`` says what a user should know (a pad token taken from eos).
    """

    model: object
    tokenizer: object
    kind: str
    saved_tokenizer: object
    note: str | None = None


@contextlib.contextmanager
def _named_errors(what):
    """The libraries' errors on a bad folder, as a ValueError naming MODEL_DIR."""
    try:
        with hushed():
            yield
    except (ImportError, ValueError) as exc:
        if isinstance(exc, ImportError) or str(exc).startswith(what):
            raise
        raise ValueError(f"cannot load {what}: {exc}") from None
    except Exception as exc:  # the libraries raise many kinds on a bad folder
        raise ValueError(f"cannot load {what}: {exc}") from None


def skeleton(source):
    """A Hugging Face model's modules without its weights, or None.

    Built on the meta device from the config alone (nothing allocated, no
    weight read), so that ``--targets`` and ``--budget`` are checked before
    the model is loaded. None for a sentence-transformers model, which is
    checked once loaded (its loading is quick).
    """
    if source.kind == SENTENCE_TRANSFORMERS:
        return None
    import torch
    import transformers

    what = source.what
    with _named_errors(what):
        config = copy.deepcopy(_config(source))
        cls = model_class(config, gguf=source.gguf_file is not None, what=what)
        concrete = issubclass(cls, transformers.PreTrainedModel)
        build = cls._from_config if concrete else cls.from_config
        with torch.device("meta"):
            model = build(config, attn_implementation="eager")
    return _remember_gguf(model, source)


def load_model(source):
    """Load a :class:`Source`; a bad folder is a ValueError naming it."""
    what = source.what
    with _named_errors(what):
        if source.kind == SENTENCE_TRANSFORMERS:
            return _load_sentence_transformer(source.folder)
        return _load_transformers(source, what)


def _load_sentence_transformer(folder):
    from sentence_transformers import SentenceTransformer

    model = _with_portable_attention(
        lambda impl: SentenceTransformer(
            str(folder),
            device="cpu",
            local_files_only=True,
            trust_remote_code=False,
            model_kwargs={"attn_implementation": impl},
        )
    )
    return Loaded(model.eval(), None, SENTENCE_TRANSFORMERS, None)


def _options(source):
    options = {"local_files_only": True, "trust_remote_code": False}
    if source.gguf_file:
        options["gguf_file"] = source.gguf_file
    return options


@functools.lru_cache(maxsize=4)
def _config(source):
    """The source's config, read once (a GGUF file's takes seconds).

    A GGUF file is untrusted: its header is checked, bounded by the file's
    size, and its architecture and tensor types against what kflats reads,
    before transformers reads anything of it.
    """
    import transformers

    if source.gguf_file:
        from kflats.torch.io._gguf_check import check_gguf_model

        check_gguf_model(source.folder / source.gguf_file, source.what)
    return transformers.AutoConfig.from_pretrained(
        str(source.folder), **_options(source)
    )


def _load_transformers(source, what):
    import transformers

    options = _options(source)
    gguf_config = getattr(transformers, "GgufConfig", None)
    if source.gguf_file and gguf_config is not None:
        # dense float weights, never packed GGUF blocks: kflats fits them
        options["quantization_config"] = gguf_config(dequantize=True)
    folder = str(source.folder)
    config = copy.deepcopy(_config(source))
    cls = model_class(config, gguf=source.gguf_file is not None, what=what)
    model, info = _with_portable_attention(
        lambda impl: cls.from_pretrained(
            folder,
            config=config,
            attn_implementation=impl,
            output_loading_info=True,
            **options,
        )
    )
    _check_loading_info(info, what, cls)
    if source.gguf_file:
        _forget_gguf(model, what)
    options.pop("quantization_config", None)
    saved = transformers.AutoTokenizer.from_pretrained(folder, **options)
    tokenizer, note = _with_pad_token(saved)
    model = _remember_gguf(model.eval(), source)
    return Loaded(model, tokenizer, TRANSFORMERS, saved, note)


def _remember_gguf(model, source):
    """``model`` marked with the GGUF file it was read from (none: unmarked)."""
    if source.gguf_file:
        setattr(model, _GGUF_SOURCE, str(source.folder / source.gguf_file))
    return model


def gguf_source(model):
    """The GGUF file a model was read from, or None.

    :func:`load_pretrained`, :func:`load_model` and :func:`skeleton` mark a
    model read from a GGUF file with that file's path (a copy of the model
    keeps it). Its tokenizer and metadata are what a GGUF export carries
    over, and what ``CompressionConfig(format="gguf")`` counts in the size
    asked.

    Parameters
    ----------
    model : torch.nn.Module

    Returns
    -------
    path : pathlib.Path or None
        None for a model read from anything else, or built in memory.

    Examples
    --------
    >>> import torch
    >>> from kflats.torch.io import gguf_source
    >>> gguf_source(torch.nn.Linear(4, 2)) is None
    True
    """
    path = getattr(model, _GGUF_SOURCE, None)
    return None if path is None else Path(path)


def _forget_gguf(model, what):
    """A GGUF model loaded dequantized is a plain float model: say so, so it saves.

    transformers keeps the GGUF quantizer on the model, and refuses to save a
    model that has one.
    """
    packed = [
        n for n, m in model.named_modules() if type(m).__name__.startswith("Gguf")
    ]
    if packed:
        raise ValueError(
            f"{what}: transformers kept {len(packed)} layers in packed GGUF blocks "
            f"({packed[0]}, ...); kflats compresses dequantized weights"
        )
    model.hf_quantizer = None
    for holder in (model.config, model):
        if "quantization_config" in vars(holder):
            delattr(holder, "quantization_config")


def model_class(config, *, gguf=False, what="MODEL_DIR"):
    """The transformers class the config names in ``architectures``.

    Looked up by name in the ``transformers`` package only. Without one,
    ``AutoModelForCausalLM`` for a GGUF file (a language model), else
    ``AutoModel``.
    """
    import transformers

    for name in getattr(config, "architectures", None) or ():
        if not (isinstance(name, str) and name.isidentifier()) or name[0] == "_":
            continue
        try:
            cls = getattr(transformers, name, None)
        except Exception:  # a lazy import that fails: not a usable class
            cls = None
        if not (
            isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)
        ):
            continue
        wanted = getattr(cls, "config_class", None)
        if wanted is not None and not isinstance(config, wanted):
            raise ValueError(
                f"{what}: config.json names the architecture {name!r}, a model "
                f"of {wanted.__name__}, but holds a {type(config).__name__}"
            )
        return cls
    return transformers.AutoModelForCausalLM if gguf else transformers.AutoModel


def _ignorable(patterns, keys):
    patterns = [re.compile(p) for p in patterns or ()]
    return [k for k in keys if not any(p.search(k) for p in patterns)]


def _check_loading_info(info, what, cls=None):
    """Refuse weights that do not match the model: missing or unexpected keys.

    Keys the model class declares as ignorable
    (``_keys_to_ignore_on_load_missing`` / ``_unexpected``) are left out.
    """
    missing = _ignorable(
        getattr(cls, "_keys_to_ignore_on_load_missing", None),
        sorted(info.get("missing_keys") or ()),
    )
    unexpected = _ignorable(
        getattr(cls, "_keys_to_ignore_on_load_unexpected", None),
        sorted(info.get("unexpected_keys") or ()),
    )
    mismatched = [str(m[0]) for m in info.get("mismatched_keys") or ()]
    problems = []
    for label, keys in (
        ("missing", missing),
        ("unexpected", unexpected),
        ("of another shape", mismatched),
    ):
        if keys:
            shown = ", ".join(keys[:3]) + (", ..." if len(keys) > 3 else "")
            problems.append(f"{len(keys)} {label} ({shown})")
    if problems:
        raise ValueError(
            f"{what}: its weights do not match its config.json: "
            f"{'; '.join(problems)} weights"
        )


def _with_pad_token(tokenizer):
    """The tokenizer to run with: one that pads (with eos when it had no pad token).

    Returns the tokenizer and a note when the pad token was taken from eos.
    """
    if getattr(tokenizer, "pad_token", None) is not None:
        return tokenizer, None
    eos = getattr(tokenizer, "eos_token", None)
    if eos is None:
        raise ValueError(
            "its tokenizer has no pad token and no end-of-sequence token to pad "
            "texts with"
        )
    padded = copy.deepcopy(tokenizer)
    padded.pad_token = eos
    return padded, (
        f"the tokenizer has no pad token; calibration and evaluation pad with its "
        f"end-of-sequence token {eos!r} (the saved tokenizer is unchanged)"
    )


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
    >>> from kflats.torch.io import load_pretrained
    >>> model, tokenizer = load_pretrained(minilm_model_dir())
    >>> type(model).__name__, tokenizer("a cat")["input_ids"]
    ('BertModel', [101, 1037, 4937, 102])
    """
    import warnings

    source = model_source(
        path if gguf_file is None else Path(path) / gguf_file,
        label="model folder",
        sentence_transformers=False,
    )
    loaded = load_model(source)
    if loaded.note:
        warnings.warn(loaded.note, UserWarning, stacklevel=2)
    return loaded.model, loaded.tokenizer
