"""The libraries' own files in a compressed folder, checked before a model is built.

config.json (no code to run, sizes bounded by the stored tensors, the saved
class), a sentence-transformers folder's modules.json and its modules'
configs, and the tokenizer's vocabulary; the classes these files name are
imported from transformers and sentence-transformers only.

Two rules here hold for an original model folder too (``_original.py``):
the files a tokenizer is built from (:data:`_TOKENIZER_FILES`), and the
attention implementation a model is built with, named by kflats rather than
read from config.json (:func:`_portable_attention`,
:func:`_with_portable_attention`).
"""

import importlib
import math
import warnings
from pathlib import Path

from torch import nn

from kflats.torch.io._files import (
    _MANIFEST,
    _MAX_DIM,
    _NAME,
    _WEIGHTS,
    _inside,
    _read_json,
    _stored,
)

# Files from which transformers builds a real tokenizer, in groups that make
# one (the first of each holds the vocabulary); without any of them it builds
# one that knows only its special tokens.
_TOKENIZER_FILES = (
    ("tokenizer.json",),
    ("vocab.txt",),
    ("tokenizer.model",),
    ("spiece.model",),
    ("sentencepiece.bpe.model",),
    ("vocab.json", "merges.txt"),
)
# the vocabulary file of each group
_VOCABULARY_FILES = tuple(group[0] for group in _TOKENIZER_FILES)

# Attention implementations that every torch build has, the preferred first.
# The implementation is always named by kflats, never read from a folder's
# config.json (which could name a kernel to fetch and run); any other one
# (flash attention, a hub kernel) is never chosen.
_PORTABLE_ATTENTION = ("sdpa", "eager")


def _portable_attention(saved):
    """The attention implementation to build with: ``saved`` if portable, else eager."""
    return saved if saved in _PORTABLE_ATTENTION else "eager"


def _with_portable_attention(build):
    """``build(attn_implementation)`` with sdpa, or eager where it has no sdpa."""
    try:
        return build("sdpa")
    except ValueError as exc:
        message = str(exc).lower()
        if "sdpa" not in message and "scaled_dot_product_attention" not in message:
            raise
        return build("eager")


def _check_modules_json(directory, root, where):
    """modules.json of a sentence-transformers folder: its own classes, inside."""
    entries = _read_json(
        _inside(directory, "modules.json", where, "modules.json"), where
    )
    if not isinstance(entries, list) or not entries or len(entries) > 1000:
        raise ValueError(
            f"{where}: modules.json must be a list of module entries, got "
            f"{type(entries).__name__}"
        )
    names = set()
    for i, entry in enumerate(entries):
        if (
            not isinstance(entry, dict)
            or not {"idx", "name", "path", "type"} <= set(entry)
            or type(entry["idx"]) is not int
            or not isinstance(entry["name"], str)
            or not isinstance(entry["type"], str)
        ):
            raise ValueError(
                f"{where}: modules.json entry {i} must be an object with idx (an "
                "integer), name, path and type (strings)"
            )
        if entry["name"] in names:
            raise ValueError(f"{where}: modules.json names {entry['name']!r} twice")
        names.add(entry["name"])
        folder = _inside(
            directory, entry["path"], where, f"modules.json entry {i} path"
        )
        if not folder.is_dir():
            raise ValueError(
                f"{where}: modules.json entry {i} names the folder "
                f"{entry['path']!r}, which is missing"
            )
        kind = entry["type"]
        if not kind.startswith("sentence_transformers.") or not _NAME.fullmatch(kind):
            raise ValueError(
                f"{where}: modules.json entry {i} has type {kind[:100]!r}: kflats "
                "loads sentence-transformers' own modules only"
            )
        with warnings.catch_warnings():  # deprecated aliases are still accepted
            warnings.simplefilter("ignore")
            _import_class(kind, "sentence_transformers", nn.Module, where)
        if entry["name"] != root["module"]:
            _check_module_config(folder, entry["path"], where)
    module = root["module"]
    if module not in names:
        raise ValueError(
            f"{where}: {_MANIFEST} names the transformer module {module!r}, which "
            "modules.json does not list"
        )
    path = next(e["path"] for e in entries if e["name"] == module)
    if Path(path) != Path(root["path"]):
        raise ValueError(
            f"{where}: {_MANIFEST} places module {module!r} in {root['path']!r}, "
            f"modules.json in {path!r}"
        )


# the sizes in the config.json of a sentence-transformers module (Dense, ...)
_MODULE_SIZES = ("in_features", "out_features", "word_embedding_dimension")


def _check_module_config(folder, path, where):
    """A module's sizes, bounded by its stored tensors, before it is built."""
    config_path = folder / "config.json"
    if not config_path.exists():
        return
    config = _read_json(config_path, where, f"{path}/config.json".lstrip("/"))
    if not isinstance(config, dict):
        raise ValueError(f"{where}: {path}/config.json is not a JSON object")
    weights = folder / _WEIGHTS
    stored = _stored([weights], where) if weights.is_file() else {}
    high = max([2**16] + [math.prod(shape) for shape, _ in stored.values()])
    sizes = {key: config[key] for key in _MODULE_SIZES if key in config}
    for key, value in sizes.items():
        if type(value) is not int or not 0 <= value <= high:
            raise ValueError(
                f"{where}: {path}/config.json has {key} = {value!r}; an integer in "
                f"0..{high} expected (the module's tensors bound it)"
            )
    if math.prod(sizes.get(k, 1) for k in ("in_features", "out_features")) > high:
        raise ValueError(
            f"{where}: {path}/config.json announces a layer of "
            f"{sizes['in_features']} x {sizes['out_features']}, more numbers than "
            "the module stores"
        )


# config.json fields that size the model: integers, checked before it is built
_CONFIG_SIZES = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "max_position_embeddings",
    "type_vocab_size",
    "head_dim",
    "n_embd",
    "n_positions",
    "n_layer",
    "n_head",
    "n_inner",
    "d_model",
    "d_ff",
    "num_layers",
    "num_heads",
)


# counts of layers among them
_CONFIG_COUNTS = ("num_hidden_layers", "n_layer", "num_layers")


def _check_config(folder, cls, stored, where):
    """config.json: no code to run, sizes that are integers, the saved class.

    Sizes are bounded by the stored tensors, which the model must match
    anyway: a count of layers by the number of tensors (each layer holds
    one at least), any other size by the largest tensor (or 2**20), so that
    even the meta-device build that checks the shapes stays quick.
    """
    config = _read_json(_inside(folder, "config.json", where, "config.json"), where)
    if not isinstance(config, dict):
        raise ValueError(f"{where}: config.json is not a JSON object")
    if "auto_map" in config:
        raise ValueError(
            f"{where}: its config.json asks to run code from the folder (auto_map); "
            "kflats never runs code from a compressed folder"
        )
    largest = max((math.prod(shape) for shape, _ in stored.values()), default=0)
    for key in _CONFIG_SIZES:
        value = config.get(key)
        if key not in config or value is None:
            continue
        if key in _CONFIG_COUNTS:
            high = len(stored)
        else:
            high = min(max(largest, 2**20), _MAX_DIM)
        if type(value) is not int or not 0 <= value <= high:
            raise ValueError(
                f"{where}: config.json has {key} = {value!r}; an integer in "
                f"0..{high} expected (the folder's tensors bound it)"
            )
    expected = getattr(cls.config_class, "model_type", None)
    if expected and config.get("model_type") != expected:
        raise ValueError(
            f"{where}: config.json describes a {config.get('model_type')!r} model, "
            f"{_MANIFEST} a {cls.__name__} (model_type {expected!r})"
        )


def _check_tokenizer(folder, kind, where):
    """A tokenizer saved without its vocabulary would load, and map all to UNK."""
    has_vocab = any((folder / name).is_file() for name in _VOCABULARY_FILES)
    if has_vocab:
        return
    if kind == "sentence-transformers" or (folder / "tokenizer_config.json").exists():
        raise ValueError(
            f"{where}: the tokenizer's vocabulary is missing (none of "
            f"{', '.join(_VOCABULARY_FILES)}); a tokenizer without it maps every "
            "word to the unknown token"
        )


def _import_class(path, package, base, where):
    """The class named ``module.QualName``, from ``package`` only."""
    parts = path.split(".")
    if parts[0] != package:
        raise ValueError(f"{where}: {path!r} is not a class of {package}")
    for cut in range(len(parts) - 1, 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        try:
            for name in parts[cut:]:
                obj = getattr(obj, name)
        except AttributeError:
            break
        if isinstance(obj, type) and issubclass(obj, base):
            return obj
        break
    raise ValueError(
        f"{where}: the model class {path!r} is not available in the installed "
        f"{package}; pass a model built as the saved one"
    )
