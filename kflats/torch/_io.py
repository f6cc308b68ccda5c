"""Save a compressed model as a self-contained folder, and load it back.

The folder holds no pickle: tensors are in safetensors files, the rest in
JSON. A model of Hugging Face transformers or sentence-transformers is saved
the way those libraries save it (``save_pretrained`` / ``save``), so config,
tokenizer and the other modules of a sentence-transformers model travel
with it; ``kflats.json`` says which modules are projective layers and how to
build them before the tensors are loaded.
"""

import contextlib
import importlib
import inspect
import json
import logging
import math
import os
import re
import shutil
import sys
import warnings
from pathlib import Path

import torch
from torch import nn

from .. import __version__
from ._layers import ProjectiveEmbedding, ProjectiveLinear, _features, _is_conv1d
from ._models import describe_ties, plan_ties

__all__ = ["load_compressed", "save_compressed"]

_FORMAT = "kflats.compressed"
_VERSION = 3
# version 2 lacks the "check" of each ProjectiveLinear entry; it reads as well
_READABLE_VERSIONS = (2, 3)
_MANIFEST = "kflats.json"
_WEIGHTS = "model.safetensors"
_INDEX = "model.safetensors.index.json"
_KINDS = ("sentence-transformers", "transformers", "module")
_LAYERS = {
    "ProjectiveEmbedding": ProjectiveEmbedding,
    "ProjectiveLinear": ProjectiveLinear,
}
# attention implementations that every torch build has; any other one (flash
# attention, a hub kernel) is left for transformers to choose on the machine
# that loads the folder
_PORTABLE_ATTENTION = ("eager", "sdpa")


def _portable_attention(root):
    """The attention implementation to build with: the saved one if portable."""
    impl = root.get("attn_implementation")
    return impl if impl in _PORTABLE_ATTENTION else "eager"


def _qualname(cls):
    return f"{cls.__module__}.{cls.__qualname__}"


def _kind(model):
    """How the model is saved; the libraries are looked up, never imported."""
    st = sys.modules.get("sentence_transformers")
    if st is not None and isinstance(model, st.SentenceTransformer):
        return "sentence-transformers"
    transformers = sys.modules.get("transformers")
    if transformers is not None and isinstance(model, transformers.PreTrainedModel):
        return "transformers"
    return "module"


def _projective(module):
    return {
        name: m
        for name, m in module.named_modules()
        if isinstance(m, (ProjectiveEmbedding, ProjectiveLinear))
    }


def _quantized(module):
    """The QuantizedTensor of each quantized parameter, by state-dict key."""
    if not any(hasattr(m, "_kflats_quantized") for m in module.modules()):
        return {}  # kflats.quantize (and numpy's core of it) not needed
    from ..quantize import quantized_tensors

    return quantized_tensors(module)


def _quantized_entry(qt):
    """The kflats.json entry of a quantized tensor."""
    return {
        "bits": qt.bits,
        "group_size": qt.group_size,
        "axis": qt.axis,
        "shape": list(qt.shape),
        "symmetric": qt.symmetric,
    }


def _packed(key, qt):
    """The safetensors entries of a quantized tensor: codes, scales, zeros, meta."""
    return {
        name: torch.from_numpy(value.copy())
        for name, value in qt.to_state(key + ".").items()
    }


def _pack_files(folder, quantized, where):
    """Store each quantized parameter of the folder's weights as its packed form.

    Rewrites the safetensors file(s) that hold those parameters (and the
    index of a sharded save).
    """
    from safetensors.torch import load_file, save_file

    files, weight_map = _weight_files(folder, where)
    for file in files:
        state = load_file(str(file))
        keys = [k for k in state if k in quantized]
        if not keys:
            continue
        for key in keys:
            del state[key]
            packed = _packed(key, quantized[key])
            state.update(packed)
            if weight_map is not None:
                del weight_map[key]
                weight_map.update(dict.fromkeys(packed, file.name))
        save_file(state, str(file), metadata={"format": "pt"})
    if weight_map is not None:
        index = folder / _INDEX
        data = json.loads(index.read_text())
        data["weight_map"] = dict(sorted(weight_map.items()))
        index.write_text(json.dumps(data, indent=2) + "\n")


def _check_quantized(quantized, stored, where):
    """Packed tensors against their kflats.json entries, and ``stored`` unpacked.

    Returns the packed keys of each quantized parameter, and ``stored`` with
    those keys replaced by the parameter's (shape, float32).
    """
    stored = dict(stored)
    packed = {}
    for key, entry in quantized.items():
        parts = {p: f"{key}.{p}" for p in ("codes", "scales", "meta")}
        if not entry["symmetric"]:
            parts["zeros"] = f"{key}.zeros"
        missing = [k for k in parts.values() if k not in stored]
        if missing or key in stored or f"{key}.zeros" in stored and entry["symmetric"]:
            raise ValueError(
                f"{where}: the packed tensors of {key!r} do not match its entry in "
                f"{_MANIFEST} (missing {missing}, or stored both packed and as floats)"
            )
        for name in parts.values():
            del stored[name]
        stored[key] = (tuple(entry["shape"]), torch.float32)
        packed[key] = parts
    return packed, stored


def _unpack(files, quantized, packed, where):
    """Each quantized parameter as a QuantizedTensor, checked against its entry."""
    from ..quantize import QuantizedTensor

    raw = _read_tensors(
        files, {name for parts in packed.values() for name in parts.values()}, where
    )
    out = {}
    for key, parts in packed.items():
        entry = quantized[key]
        try:
            qt = QuantizedTensor.from_state(
                {p: raw[name] for p, name in parts.items()}, ""
            )
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{where}: corrupt packed tensor {key!r}: {exc}") from None
        if _quantized_entry(qt) != entry:
            raise ValueError(
                f"{where}: the packed tensor {key!r} is {_quantized_entry(qt)}; its "
                f"entry in {_MANIFEST} says {entry}"
            )
        out[key] = qt
    return out


def _probe(layer):
    """Three numbers that a ProjectiveLinear computes: a check of its tensors.

    The layer's output ``y`` on a fixed input: its sum, its sum with fixed
    weights, its norm (the scale of the other two). Read back with the wrong
    side (the tensors of a square layer have the same shapes on both sides),
    the layer computes with the transpose and the sums move by about the
    norm; rounding moves them by far less.
    """
    weight = layer.bases
    with torch.no_grad():
        n = torch.arange(1, layer.in_features + 1, dtype=torch.float64)
        x = torch.sin(n).to(weight.device, weight.dtype)
        y = layer(x[None])[0].to(torch.float64).cpu()
        w = torch.cos(torch.arange(1, layer.out_features + 1, dtype=torch.float64))
        return [float(y.sum()), float((y * w).sum()), float(y.norm())]


def _describe(layer):
    """The kflats.json entry of a layer: what its constructor needs but labels."""
    if isinstance(layer, ProjectiveEmbedding):
        shape = [layer.num_embeddings, layer.embedding_dim]
        extra = {"padding_idx": layer.padding_idx}
    else:
        shape = [layer.in_features, layer.out_features]
        extra = {"bias": layer.bias is not None, "side": layer.side}
        extra["check"] = _probe(layer)
    return {
        "type": type(layer).__name__,
        "shape": shape,
        "ranks": list(layer.ranks),
        "affine": layer.affine,
        **extra,
    }


def _attention(hf):
    impl = getattr(getattr(hf, "config", None), "_attn_implementation", None)
    return impl if isinstance(impl, str) else None


@contextlib.contextmanager
def _quiet():
    """Silence transformers and sentence-transformers while they save or build.

    A compressed model is not what these libraries expect to find in the
    folder: loading it they report unexpected and missing keys, which
    :func:`load_compressed` then loads itself, strictly. Their loggers,
    progress bars and Python warnings are restored on exit (process-wide
    settings: not thread-safe, like the libraries' own switches).
    """
    loggers = [logging.getLogger("sentence_transformers")]
    levels = [lg.level for lg in loggers]
    tf_logging = hub_utils = None
    if "transformers" in sys.modules:
        from transformers.utils import logging as tf_logging
    if "huggingface_hub" in sys.modules:
        from huggingface_hub import utils as hub_utils
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        verbosity = bars = hub_bars_off = None
        if hub_utils is not None:  # before transformers' switch, which sets it too
            hub_bars_off = hub_utils.are_progress_bars_disabled()
            hub_utils.disable_progress_bars()
        if tf_logging is not None:
            verbosity = tf_logging.get_verbosity()
            bars = tf_logging.is_progress_bar_enabled()
            tf_logging.set_verbosity_error()
            tf_logging.disable_progress_bar()
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels, strict=True):
                lg.setLevel(level)
            if tf_logging is not None:
                tf_logging.set_verbosity(verbosity)
                if bars:
                    tf_logging.enable_progress_bar()
            if hub_utils is not None:
                if hub_bars_off:
                    hub_utils.disable_progress_bars()
                else:
                    hub_utils.enable_progress_bars()


# -- the files of a folder ------------------------------------------------------

# Everything is read from the folder as data, checked before it is used: the
# JSON files against a schema, every path against the folder (resolved, so
# that no symbolic link leads out of it), tensor headers against the
# manifest and the model before any tensor is read.
_MAX_JSON = 32 * 2**20  # bytes of one JSON file
_MAX_JSON_VALUES = 2**19  # values in one JSON file
_MAX_JSON_CONTAINERS = 2**18  # lists and objects in one JSON file
_MAX_ENTRIES = 100_000  # files and folders inside a compressed folder
_MAX_MODULES = 65_536  # projective layers one kflats.json may list
_MAX_DIM = 2**31 - 1
_NAME = re.compile(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*")
_TOKENIZER_FILES = (
    "tokenizer.json",
    "vocab.txt",
    "vocab.json",
    "spiece.model",
    "sentencepiece.bpe.model",
    "tokenizer.model",
)
# safetensors' names of the dtypes
_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def _inside(base, relative, where, what):
    """``base / relative``, refused unless it stays inside ``base``."""
    if not isinstance(relative, str):
        raise ValueError(
            f"{where}: {what} must be a relative path (a string), got {relative!r}"
        )
    if "\0" in relative or "\\" in relative or Path(relative).is_absolute():
        raise ValueError(f"{where}: {what} {relative!r} is not a relative path")
    path = base / relative
    resolved, top = path.resolve(), base.resolve()
    if resolved != top and top not in resolved.parents:
        raise ValueError(f"{where}: {what} {relative!r} points outside the folder")
    return path


def _check_tree(directory, where):
    """Refuse a folder holding links out of it or files that are not files.

    A symbolic link may point inside the folder only; a pipe, socket or
    device is refused (a reader would block on it or read a device).
    """
    top = directory.resolve()
    seen = 0
    for parent, dirs, files in os.walk(directory):
        for name in dirs + files:
            seen += 1
            if seen > _MAX_ENTRIES:
                raise ValueError(
                    f"{where} holds more than {_MAX_ENTRIES} files and folders"
                )
            path = Path(parent) / name
            shown = str(path.relative_to(directory))
            if path.is_symlink():
                target = path.resolve()
                if target != top and top not in target.parents:
                    raise ValueError(
                        f"{where}: {shown!r} is a symbolic link out of the folder; "
                        "a compressed folder must hold its files"
                    )
            if not (path.is_file() or path.is_dir()):
                raise ValueError(
                    f"{where}: {shown!r} is neither a regular file nor a folder"
                )


def _read_json(path, where, what=None):
    """The JSON value of a file inside the folder (bounded, strictly parsed)."""
    what = what or path.name
    try:
        size = path.stat().st_size
        if not path.is_file():
            raise ValueError(f"{where}: {what} is not a file")
        if size > _MAX_JSON:
            raise ValueError(
                f"{where}: {what} is {size} bytes, larger than any kflats writes "
                f"({_MAX_JSON} at most)"
            )
        text = path.read_bytes()
        # a bound on the values before they are parsed: commas separate them,
        # brackets open the containers (each costs tens of bytes once parsed)
        if text.count(b",") > _MAX_JSON_VALUES or (
            text.count(b"[") + text.count(b"{") > _MAX_JSON_CONTAINERS
        ):
            raise ValueError(
                f"{where}: {what} holds more values than any kflats writes "
                f"({_MAX_JSON_VALUES} at most, {_MAX_JSON_CONTAINERS} lists "
                "and objects)"
            )
        return json.loads(text)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        if str(exc).startswith(where):
            raise
        raise ValueError(f"{where}: {what} is not valid JSON: {exc}") from None
    except OSError as exc:
        raise ValueError(f"{where}: {what} cannot be read: {exc}") from None


def _weight_files(folder, where):
    """The safetensors files of a folder: one file, or the shards of an index."""
    index = folder / _INDEX
    if index.exists():
        data = _read_json(index, where)
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not all(
            isinstance(v, str) for v in weight_map.values()
        ):
            raise ValueError(
                f"{where}: unreadable {_INDEX}: its weight_map must map tensor "
                "names to file names (strings)"
            )
        files = {
            name: _inside(folder, name, where, f"{_INDEX} entry")
            for name in sorted(set(weight_map.values()))
        }
    else:
        files, weight_map = {_WEIGHTS: folder / _WEIGHTS}, None
    missing = [name for name, f in files.items() if not f.is_file()]
    if missing:
        raise ValueError(f"{where}: weight file(s) missing from {folder}: {missing}")
    return list(files.values()), weight_map


def _stored(files, where, weight_map=None):
    """Name -> (shape, dtype) of every stored tensor, read from the headers only.

    A tensor stored twice (in two shards) is refused, and so is one that the
    index places in another shard.
    """
    from safetensors import SafetensorError, safe_open

    headers, homes = {}, {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt", device="cpu") as f:
                for key in f.keys():
                    tensor = f.get_slice(key)
                    dtype = _DTYPES.get(tensor.get_dtype())
                    if key in headers:
                        raise ValueError(
                            f"{where}: tensor {key!r} is stored twice, in "
                            f"{homes[key].name} and {file.name}"
                        )
                    if weight_map is not None and weight_map.get(key) != file.name:
                        raise ValueError(
                            f"{where}: tensor {key!r} lies in {file.name}, which "
                            f"{_INDEX} does not say"
                        )
                    if dtype is None:
                        raise ValueError(
                            f"{where}: tensor {key!r} has dtype "
                            f"{tensor.get_dtype()}, which kflats does not read"
                        )
                    headers[key] = (tuple(tensor.get_shape()), dtype)
                    homes[key] = file
        except (SafetensorError, OSError) as exc:
            raise ValueError(f"{where}: unreadable weight file {file}: {exc}") from None
    return headers


def _read_tensors(files, keys, where):
    from safetensors import SafetensorError, safe_open

    tensors = {}
    try:
        for file in files:
            with safe_open(str(file), framework="pt", device="cpu") as f:
                for key in f.keys():
                    if key in keys:
                        tensors[key] = f.get_tensor(key)
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"{where}: unreadable weight file: {exc}") from None
    return tensors


def _match(expected, stored, where):
    """Check that the stored tensors fill ``expected`` (a keep_vars state dict).

    ``stored`` maps names to (shape, dtype). A key may be absent when it
    holds the same tensor as a stored key (tied weights, which safetensors
    stores once). Shapes and dtypes must be those of the model: nothing is
    cast. Returns, for each absent tied key, the stored key it is filled from.
    """
    by_tensor = {}
    for key, value in expected.items():
        by_tensor.setdefault(id(value), []).append(key)
    ties, missing = {}, []
    for key, value in expected.items():
        if key in stored:
            continue
        source = next((k for k in by_tensor[id(value)] if k in stored), None)
        if source is None:
            missing.append(key)
        else:
            ties[key] = source
    unexpected = [key for key in stored if key not in expected]
    wrong = [
        f"{key}: stored {list(stored[key][0])}, model {list(expected[key].shape)}"
        for key in stored
        if key in expected and tuple(expected[key].shape) != stored[key][0]
    ]
    cast = [
        f"{key}: stored {str(stored[key][1])[6:]}, model {str(expected[key].dtype)[6:]}"
        for key in stored
        if key in expected and expected[key].dtype != stored[key][1]
    ]
    problems = []
    for what, keys in (
        ("missing", missing),
        ("unexpected", unexpected),
        ("of another shape", wrong),
        ("of another dtype", cast),
    ):
        if keys:
            shown = ", ".join(keys[:5]) + (", ..." if len(keys) > 5 else "")
            problems.append(f"{len(keys)} tensor(s) {what} ({shown})")
    if problems:
        raise ValueError(f"{where}: {'; '.join(problems)}")
    return ties


# -- save ----------------------------------------------------------------------


def save_compressed(model, directory, *, tokenizer=None):
    """Write a compressed model to a self-contained folder, without pickle.

    The folder holds everything :func:`load_compressed` needs to rebuild the
    model: no original weights, no fitting. Tensors are stored with
    safetensors (cluster ids in the smallest integer dtype that holds them,
    one byte each up to 256 clusters), the rest as JSON. What goes in
    depends on the model:

    - a :class:`sentence_transformers.SentenceTransformer`: what its
      ``save`` writes (modules, config, tokenizer, pooling, ...), the
      projective layers' tensors inside the transformer's
      ``model.safetensors``;
    - a Hugging Face :class:`transformers.PreTrainedModel`: what its
      ``save_pretrained`` writes, and the ``tokenizer`` if one is given;
    - any other :class:`torch.nn.Module`: its state dict in
      ``model.safetensors`` (loading it needs a freshly built model of the
      same class).

    A ``kflats.json`` records the kind of model, its class and, for each
    projective layer, its type, shape and ranks. A parameter quantized by
    :func:`kflats.quantize.quantize_module_` (as ``compress(...,
    unit="bytes")`` leaves them) is stored packed, its codes, scales and zero
    points (:func:`kflats.quantize.quantized_state`), and ``kflats.json``
    records its bits, group size, axis and shape; :func:`load_compressed`
    dequantizes them to the very floats the saved layer held.

    Parameters
    ----------
    model : torch.nn.Module
        A model in which :func:`compress` (or the user) placed
        :class:`ProjectiveEmbedding` or :class:`ProjectiveLinear` layers. For a
        sentence-transformers model they must lie inside its transformer.
    directory : str or path-like
        The folder to write; created (with its parents) if needed. It must
        not hold anything yet.
    tokenizer : transformers tokenizer, default=None
        Saved alongside a transformers model (``tokenizer.save_pretrained``).
        A sentence-transformers model saves its own.

    Raises
    ------
    TypeError
        If ``model`` is not a :class:`torch.nn.Module`.
    FileExistsError
        If ``directory`` exists and is not an empty folder.
    ValueError
        If the model holds no projective layer and no quantized parameter
        (or, in a sentence-transformers
        model, one outside its transformer), if a ``tokenizer`` comes with
        another kind of model, or if the library's own save renamed or
        dropped tensors that the folder must hold. Nothing is left behind
        when the save fails.

    See Also
    --------
    load_compressed

    Notes
    -----
    The folder of a transformers or sentence-transformers model is laid out
    like those libraries' own, but they cannot load it by themselves: their
    layers have no place for the factors. Use :func:`load_compressed`.

    Examples
    --------
    >>> import os, tempfile, torch
    >>> from kflats.torch import compress, save_compressed, load_compressed
    >>> def build():
    ...     return torch.nn.Sequential(torch.nn.Embedding(200, 16))
    >>> _ = torch.manual_seed(0)
    >>> model = build()
    >>> _ = compress(model, budget=0.5, targets="0", k=2, random_state=0)
    >>> tmp = tempfile.TemporaryDirectory()
    >>> folder = os.path.join(tmp.name, "tiny")
    >>> save_compressed(model, folder)
    >>> sorted(os.listdir(folder))
    ['kflats.json', 'model.safetensors']
    >>> fresh = load_compressed(folder, build())
    >>> ids = torch.arange(200)
    >>> torch.equal(fresh(ids), model(ids))
    True
    >>> tmp.cleanup()
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    directory = Path(os.fspath(directory))
    kind = _kind(model)
    if tokenizer is not None and kind != "transformers":
        raise ValueError(
            "tokenizer= is saved with a transformers model only"
            + (
                "; a sentence-transformers model saves its own"
                if kind == "sentence-transformers"
                else ""
            )
        )
    root = {"module": "", "path": ""}
    hf = model
    if kind == "sentence-transformers":
        root["module"] = next(
            (
                name
                for name, child in model.named_children()
                if isinstance(getattr(child, "auto_model", None), nn.Module)
                and (_projective(child.auto_model) or _quantized(child.auto_model))
            ),
            "",
        )
        hf = model._modules[root["module"]].auto_model if root["module"] else None
        outside = len(_projective(model)) - (len(_projective(hf)) if hf else 0)
        if hf is not None and outside:
            raise ValueError(
                f"{outside} projective layer(s) of the sentence-transformers model "
                f"lie outside its transformer ({root['module']!r}); save_compressed "
                "stores those of the transformer only"
            )
    layers = _projective(hf) if hf is not None else {}
    quantized = _quantized(hf) if hf is not None else {}
    if not layers and not quantized:
        raise ValueError(
            f"model ({type(model).__name__}) holds no ProjectiveEmbedding or "
            "ProjectiveLinear module"
            + (" inside a transformer" if kind == "sentence-transformers" else "")
            + "; compress it first"
        )
    if "" in layers:
        raise ValueError(
            "the model is itself a projective layer; save a model that holds it "
            "(torch.nn.Sequential(layer), for example)"
        )
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise FileExistsError(
            f"{str(directory)!r} exists and is not an empty folder; save_compressed "
            "writes a new folder"
        )
    created = not directory.exists()
    directory.mkdir(parents=True, exist_ok=True)
    try:
        with _quiet():
            if kind == "sentence-transformers":
                model.save(str(directory))
                entries = json.loads((directory / "modules.json").read_text())
                root["path"] = next(
                    e["path"] for e in entries if e["name"] == root["module"]
                )
            elif kind == "transformers":
                options = {}
                parameters = inspect.signature(model.save_pretrained).parameters
                if "save_original_format" in parameters:
                    # the names of the state dict, which load_compressed loads
                    options["save_original_format"] = False
                if "safe_serialization" in parameters:
                    options["safe_serialization"] = True
                model.save_pretrained(str(directory), **options)
                if tokenizer is not None:
                    tokenizer.save_pretrained(str(directory))
            else:
                from safetensors.torch import save_model

                save_model(
                    model,
                    str(directory / _WEIGHTS),
                    metadata={"format": "pt"},
                    force_contiguous=True,
                )
        folder = directory / root["path"]
        pickled = sorted(
            str(p.relative_to(directory))
            for p in directory.rglob("*")
            if p.suffix in (".bin", ".pt", ".pth", ".pkl", ".pickle")
        )
        if pickled:
            raise ValueError(f"the model's save wrote pickle files: {pickled}")
        expected = hf.state_dict(keep_vars=True)
        if quantized:
            _pack_files(folder, quantized, str(directory))
            for key, qt in quantized.items():
                expected.pop(key, None)
                expected.update(_packed(key, qt))
        _match(
            expected,
            _stored(_weight_files(folder, str(directory))[0], str(directory)),
            f"the save of this {type(hf).__name__} does not store its tensors under "
            "their state-dict names, which load_compressed needs",
        )
        if kind != "module":
            root["architecture"] = _qualname(type(hf))
            root["attn_implementation"] = _attention(hf)
        manifest = {
            "format": _FORMAT,
            "version": _VERSION,
            "kind": kind,
            "architecture": _qualname(type(model)),
            "root": root,
            "modules": {name: _describe(layer) for name, layer in layers.items()},
            "quantized": {
                key: _quantized_entry(qt) for key, qt in sorted(quantized.items())
            },
            "ties": describe_ties(hf),
            "kflats_version": __version__,
            "torch_version": torch.__version__,
        }
        # written last: a folder with a kflats.json is complete
        (directory / _MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    except BaseException:
        if created:
            shutil.rmtree(directory, ignore_errors=True)
        else:
            for child in directory.iterdir():
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child, ignore_errors=True)
                else:
                    child.unlink(missing_ok=True)
        raise


# -- load ----------------------------------------------------------------------


def _read_manifest(directory):
    """kflats.json, checked against its schema before anything else is read."""
    where = repr(str(directory))
    if not directory.is_dir():
        raise ValueError(
            f"{where} is not a folder; load_compressed reads the folders that "
            "kflats.torch.save_compressed writes (the single-file format of older "
            "kflats versions is no longer read: compress the model again)"
        )
    path = directory / _MANIFEST
    if not path.exists() and not path.is_symlink():
        raise ValueError(
            f"{where} has no {_MANIFEST}: it is not a compressed-model folder "
            "written by kflats.torch.save_compressed"
        )
    _inside(directory, _MANIFEST, where, "the manifest")
    manifest = _read_json(path, where)
    if not isinstance(manifest, dict) or manifest.get("format") != _FORMAT:
        raise ValueError(
            f"{where}: {_MANIFEST} does not describe a kflats compressed model "
            f"(expected format {_FORMAT!r})"
        )
    version = manifest.get("version")
    if type(version) is not int:
        raise ValueError(
            f"{str(path)!r}: 'version' must be an integer format version (this "
            f"kflats reads {' and '.join(map(str, _READABLE_VERSIONS))}), got "
            f"{version!r} ({type(version).__name__})"
        )
    if version not in _READABLE_VERSIONS:
        raise ValueError(
            f"{where} has format version {version}; this kflats reads versions "
            f"{' and '.join(map(str, _READABLE_VERSIONS))}"
        )
    _check_schema(manifest, where)
    return manifest


def _check_schema(manifest, where):
    """Types, ranges and allowed values of every field kflats.json holds."""

    def bad(field, expected, value):
        shown = repr(value)
        shown = shown if len(shown) < 80 else shown[:77] + "..."
        layer, _, field = field.rpartition("|")
        what = f"has a corrupt entry for {layer!r}" if layer else "is incomplete"
        return ValueError(
            f"{where}: {_MANIFEST} {what}: {field} must be {expected}, got {shown}"
        )

    def integer(field, value, low, high=_MAX_DIM):
        if type(value) is not int or not low <= value <= high:
            raise bad(field, f"an integer in {low}..{high}", value)
        return value

    def boolean(field, value):
        if type(value) is not bool:
            raise bad(field, "true or false", value)

    def dotted(field, value):
        if not isinstance(value, str) or len(value) > 500 or not _NAME.fullmatch(value):
            raise bad(field, "a dotted Python name", value)

    kind = manifest.get("kind")
    if kind not in _KINDS:
        raise bad("kind", f"one of {_KINDS}", kind)
    dotted("architecture", manifest.get("architecture"))
    root = manifest.get("root")
    if not isinstance(root, dict):
        raise bad("root", "an object", root)
    allowed = {"module", "path"}
    if kind != "module":
        allowed |= {"architecture", "attn_implementation"}
        dotted("root.architecture", root.get("architecture"))
        impl = root.get("attn_implementation")
        if impl is not None and (not isinstance(impl, str) or len(impl) > 200):
            raise bad("root.attn_implementation", "a string or null", impl)
    for key in ("module", "path"):
        if not isinstance(root.get(key), str):
            raise bad(f"root.{key}", "a string", root.get(key))
    if set(root) - allowed:
        raise bad("root", f"an object of the keys {sorted(allowed)}", sorted(root))
    for key in ("kflats_version", "torch_version"):
        if key in manifest and not isinstance(manifest[key], str):
            raise bad(key, "a string", manifest[key])
    quantized = manifest.get("quantized", {})
    if not isinstance(quantized, dict) or len(quantized) > _MAX_MODULES:
        raise bad("quantized", f"an object of 0..{_MAX_MODULES} tensors", quantized)
    for key, entry in quantized.items():
        _check_quantized_entry(key, entry, bad, integer, boolean)
    modules = manifest.get("modules")
    least = 0 if quantized else 1
    if not isinstance(modules, dict) or not least <= len(modules) <= _MAX_MODULES:
        raise bad(
            "modules", f"an object of {least}..{_MAX_MODULES} layers", type(modules)
        )
    for name, entry in modules.items():
        if not _NAME.fullmatch(name) or len(name) > 1000:
            raise bad("a layer name", "a dotted module name", name)
        field = f"{name}|"
        layer = entry.get("type") if isinstance(entry, dict) else None
        if not isinstance(layer, str) or layer not in _LAYERS:
            raise ValueError(
                f"{where}: unknown layer entry for {name!r}: {entry!r}"[:300]
            )
        keys = _ENTRY_KEYS[layer]
        if layer == "ProjectiveLinear" and manifest["version"] >= 3:
            keys = keys | {"check"}
        if set(entry) != keys:
            raise bad(
                f"{field}its entry",
                f"an object of the keys {sorted(keys)}",
                sorted(entry),
            )
        shape = entry["shape"]
        if not isinstance(shape, list) or len(shape) != 2:
            raise bad(f"{field}shape", "a list of 2 integers", shape)
        n, d = (integer(f"{field}shape", s, 1) for s in shape)
        if layer == "ProjectiveLinear":
            boolean(f"{field}bias", entry["bias"])
            if entry["side"] not in ("input", "output"):
                raise bad(f"{field}side", "'input' or 'output'", entry["side"])
            if entry["side"] == "output":
                n, d = d, n
        else:
            padding = entry["padding_idx"]
            if padding is not None:
                integer(f"{field}padding_idx", padding, -n, n - 1)
        boolean(f"{field}affine", entry["affine"])
        check = entry.get("check", [0.0] * 3)
        if (
            not isinstance(check, list)
            or len(check) != 3
            or not all(type(v) in (int, float) and math.isfinite(v) for v in check)
        ):
            raise bad(f"{field}check", "a list of 3 finite numbers", check)
        ranks = entry["ranks"]
        # one cluster holds at least one of the n rows: at most n ranks
        if not isinstance(ranks, list) or not 1 <= len(ranks) <= n:
            raise bad(
                f"{field}ranks",
                f"a list of 1..{n} ranks (one per cluster)",
                f"{type(ranks).__name__} of {len(ranks)}"
                if isinstance(ranks, list)
                else ranks,
            )
        if not all(type(r) is int and 0 <= r <= d for r in ranks):
            raise bad(
                f"{field}ranks",
                f"integers in 0..{d}",
                next(r for r in ranks if type(r) is not int or not 0 <= r <= d),
            )


def _check_quantized_entry(key, entry, bad, integer, boolean):
    """One entry of kflats.json's "quantized": a parameter stored packed."""
    from ..quantize import SUPPORTED_BITS

    if not isinstance(key, str) or len(key) > 1000 or not _NAME.fullmatch(key):
        raise bad("a quantized tensor's name", "a dotted parameter name", key)
    field = f"{key}|"
    keys = {"bits", "group_size", "axis", "shape", "symmetric"}
    if not isinstance(entry, dict) or set(entry) != keys:
        raise bad(
            f"{field}its entry",
            f"an object of the keys {sorted(keys)}",
            sorted(entry) if isinstance(entry, dict) else entry,
        )
    if type(entry["bits"]) is not int or entry["bits"] not in SUPPORTED_BITS:
        raise bad(f"{field}bits", f"one of {SUPPORTED_BITS}", entry["bits"])
    shape = entry["shape"]
    if not isinstance(shape, list) or len(shape) != 2:
        raise bad(f"{field}shape", "a list of 2 integers", shape)
    for s in shape:
        integer(f"{field}shape", s, 1)
    axis = integer(f"{field}axis", entry["axis"], 0, 1)
    length = shape[1] if axis == 1 else shape[0]
    group = integer(f"{field}group_size", entry["group_size"], 1, length)
    if length % group:
        raise bad(f"{field}group_size", f"a divisor of {length}", group)
    boolean(f"{field}symmetric", entry["symmetric"])


# the fields of a layer's entry in kflats.json
_ENTRY_KEYS = {
    "ProjectiveEmbedding": {"type", "shape", "ranks", "affine", "padding_idx"},
    "ProjectiveLinear": {"type", "shape", "ranks", "affine", "bias", "side"},
}


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
    has_vocab = any((folder / name).is_file() for name in _TOKENIZER_FILES)
    if has_vocab:
        return
    if kind == "sentence-transformers" or (folder / "tokenizer_config.json").exists():
        raise ValueError(
            f"{where}: the tokenizer's vocabulary is missing (none of "
            f"{', '.join(_TOKENIZER_FILES)}); a tokenizer without it maps every "
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


def _dtype_keyword():
    """How transformers names the dtype to build in (``torch_dtype`` before 5)."""
    import transformers

    major = int(transformers.__version__.split(".")[0])
    return "dtype" if major >= 5 else "torch_dtype"


def _build_transformers(cls, directory, root, where, dtype, meta=False):
    """The transformers model of the folder, built from its config.json.

    ``meta=True`` builds it on the meta device, which takes no memory: its
    shapes are checked against the stored tensors before the real build, so
    that a config announcing absurd sizes fails before anything is allocated.
    """
    import transformers

    try:
        from transformers.initialization import no_init_weights  # transformers >= 5
    except ImportError:  # pragma: no cover - transformers 4
        try:
            from transformers.modeling_utils import no_init_weights
        except ImportError:
            no_init_weights = contextlib.nullcontext
    # Nothing from the folder runs: no remote code (an ``auto_map`` in its
    # config.json is refused), and an attention implementation chosen here
    # rather than read from the folder (which could name a hub kernel).
    options = {"attn_implementation": _portable_attention(root)}
    if dtype != torch.float32:
        options[_dtype_keyword()] = dtype
    with _quiet():
        try:
            config = transformers.AutoConfig.from_pretrained(
                str(directory), local_files_only=True, trust_remote_code=False
            )
        except (ValueError, OSError, KeyError, TypeError, AttributeError) as exc:
            if "trust_remote_code" in str(exc):
                raise ValueError(
                    f"{where}: its config.json asks to run code from the folder "
                    "(auto_map); kflats never runs code from a compressed folder"
                ) from None
            raise ValueError(f"{where}: unreadable config.json: {exc}") from None
        if not isinstance(config, cls.config_class):
            raise ValueError(
                f"{where}: config.json describes a {type(config).__name__}, "
                f"{_MANIFEST} a {cls.__name__}, which takes a "
                f"{cls.config_class.__name__}"
            )
        # Every parameter and persistent buffer is overwritten by the strict
        # load that follows, so their random init is skipped (it took 0.4 s of
        # the 0.5 s that building all-MiniLM-L6-v2 takes); the other buffers
        # (position ids, rotary frequencies) are computed by the constructors.
        try:
            with no_init_weights(), torch.device("meta" if meta else "cpu"):
                model = cls._from_config(config, **options)
        except Exception as exc:  # whatever the class's constructor raises
            raise ValueError(
                f"{where}: config.json does not build a {cls.__name__}: "
                f"{type(exc).__name__}: {exc}"
            ) from None
        # no_init_weights also skips the tying of weights that post_init does
        model.tie_weights()
        if (
            not meta
            and model.can_generate()
            and (directory / "generation_config.json").is_file()
        ):
            model.generation_config = transformers.GenerationConfig.from_pretrained(
                str(directory), local_files_only=True, trust_remote_code=False
            )
    return model


def _build_sentence_transformer(directory, manifest, device, where, dtype):
    import sentence_transformers

    cls = _import_class(
        manifest["architecture"],
        "sentence_transformers",
        sentence_transformers.SentenceTransformer,
        where,
    )
    model_kwargs = {"attn_implementation": _portable_attention(manifest["root"])}
    if dtype != torch.float32:
        model_kwargs[_dtype_keyword()] = dtype
    # The transformer's weights file holds the factors where the library
    # expects dense weights: it reports them as unexpected, and initializes
    # the dense weights it does not find; both are replaced next.
    with _quiet():
        return cls(
            str(directory),
            device=device,
            local_files_only=True,
            trust_remote_code=False,
            model_kwargs=model_kwargs,
        )


def _check_layers(modules, stored, where):
    """The stored tensors of each layer against its entry, from the headers.

    Shapes must follow from the entry: one cluster id per row (the rows are
    the input features of a Linear of side "input", its output neurons for
    "output"), the coefficients of each cluster (rows, rank), the stacked
    bases (sum of ranks, the other dimension).
    """
    for name, entry in modules.items():
        n, d = entry["shape"]
        if entry.get("side") == "output":
            n, d = d, n
        ranks = entry["ranks"]
        labels = stored.get(f"{name}.labels")
        if labels is None:
            raise ValueError(f"{where}: the cluster ids of {name!r} are not stored")
        expected = {f"{name}.labels": (n,), f"{name}.bases": (sum(ranks), d)}
        if entry["affine"]:
            expected[f"{name}.means"] = (len(ranks), d)
        rows = 0
        for c, r in enumerate(ranks):
            key = f"{name}.coefficients.{c}"
            shape = stored[key][0] if key in stored else None
            if shape is not None:
                rows += shape[0] if len(shape) == 2 else 0
                expected[key] = (shape[0] if len(shape) == 2 else "n_c", r)
        for key, shape in expected.items():
            if key in stored and stored[key][0] != shape:
                side = f", side {entry['side']!r}" if "side" in entry else ""
                raise ValueError(
                    f"{where}: the tensors of {name!r} do not fit its entry in "
                    f"{_MANIFEST} ({entry['type']} of shape {entry['shape']}{side}, "
                    f"{len(ranks)} ranks): {key} is stored with shape "
                    f"{list(stored[key][0])}, expected {list(shape)}"
                )
        if rows not in (0, n):
            raise ValueError(
                f"{where}: the coefficients of {name!r} hold {rows} rows; its "
                f"entry in {_MANIFEST} announces {n}"
            )
        if labels[1].is_floating_point or labels[1] == torch.bool:
            raise ValueError(
                f"{where}: the cluster ids of {name!r} are stored as {labels[1]}, "
                "not integers"
            )


def _stored_dtype(modules, stored, where):
    """The floating dtype the projective layers were saved in (one for all)."""
    dtypes = {
        stored[f"{name}.bases"][1] for name in modules if f"{name}.bases" in stored
    }
    if len(dtypes) > 1 or not all(d.is_floating_point for d in dtypes):
        raise ValueError(
            f"{where}: the projective layers are stored in the dtypes "
            f"{sorted(map(str, dtypes))}; a saved model holds one floating dtype"
        )
    return dtypes.pop() if dtypes else torch.float32


def _plan(hf, modules, files, where):
    """Build the layers named in kflats.json, checking them against ``hf``."""
    named = dict(hf.named_modules())
    plans = {}
    for name, entry in modules.items():
        cls = _LAYERS[entry["type"]]
        old = named.get(name)
        if old is None or not name:
            raise ValueError(
                f"{where} was saved from another architecture: the model has no "
                f"module {name!r}"
            )
        shape = tuple(entry["shape"])
        if cls is ProjectiveEmbedding:
            config = {"padding_idx": entry["padding_idx"]}
            ok = isinstance(old, (nn.Embedding, ProjectiveEmbedding))
            found = (old.num_embeddings, old.embedding_dim) if ok else None
            weight = old.weight if isinstance(old, nn.Embedding) else None
        else:
            config = {"bias": entry["bias"], "side": entry["side"]}
            dense = isinstance(old, nn.Linear) or _is_conv1d(old)
            ok = dense or isinstance(old, ProjectiveLinear)
            found = _features(old) if ok else None
            weight = old.weight if dense else None
        if found != shape:
            raise ValueError(
                f"{where} was saved from another architecture: module {name!r} is "
                f"{type(old).__name__}{'' if found is None else f' {found}'}, "
                f"the folder holds a {cls.__name__} of shape {shape}"
            )
        plans[name] = (cls, old, shape, config, weight)
    # the cluster ids, whose headers were checked, are the only tensors read
    # before every shape and dtype is known to fit
    labels = _read_tensors(files, {f"{name}.labels" for name in modules}, where)
    layers = {}
    for name, (cls, old, shape, config, weight) in plans.items():
        entry = modules[name]
        weight = old.bases if weight is None else weight
        try:
            # Built on the meta device and then given memory, uninitialized:
            # the strict load fills every parameter and the cluster ids, and
            # the layer recomputes its index buffers from the loaded ids (the
            # random init, orthogonal bases by QR, took 0.6 s on MiniLM).
            layer = cls(
                *shape,
                entry["ranks"],
                labels[f"{name}.labels"],
                affine=entry["affine"],
                **config,
                device="meta",
                dtype=weight.dtype,
            ).to_empty(device=weight.device)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{where}: corrupt entry for {name!r}: {exc}") from None
        layers[name] = layer.train(old.training)
    return layers


def _fit(hf, modules, files, stored, where, tied=None):
    """The layers to place in ``hf`` and the tensors they and ``hf`` take.

    Everything the folder holds is checked against the model here: module
    types and shapes, and every stored tensor's shape and dtype. Returns the
    layers by name (with the modules that share a layer's factors, ``tied``
    as kflats.json records them) and the tied keys (see :func:`_match`).
    """
    plans = _plan(hf, modules, files, where)
    plans.update(plan_ties(hf, plans, tied or {}, where))
    expected = {
        key: value
        for key, value in hf.state_dict(keep_vars=True).items()
        if not any(key.startswith(name + ".") for name in plans)
    }
    for name, layer in plans.items():
        for key, value in layer.state_dict(keep_vars=True).items():
            expected[f"{name}.{key}"] = value
    ties = _match(expected, stored, f"{where}: the stored tensors do not fit the model")
    return plans, ties


def _verify(plans, modules, state, where):
    """Each ProjectiveLinear, given its tensors, computes what kflats.json says.

    The layers are still apart from the model: a mismatch leaves it as it
    was. Folders of format version 2 carry no check.
    """
    for name, layer in plans.items():
        check = modules.get(name, {}).get("check")  # a tied module has none
        if check is None:
            continue
        prefix = name + "."
        own = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        if layer.bases.device.type == "meta":
            continue
        layer.load_state_dict(own, strict=True)
        got = _probe(layer)
        # float32 rounds at 1e-7, float16 at 1e-3 (relative to each output)
        tol = (1e-2 if layer.bases.dtype.itemsize <= 2 else 1e-4) * check[2] + 1e-6
        if any(abs(a - b) > tol for a, b in zip(got, check, strict=True)):
            side = modules[name]["side"]
            raise ValueError(
                f"{where}: the tensors of {name!r} do not compute what {_MANIFEST} "
                f"records for it (a ProjectiveLinear of side {side!r}: was the "
                "side or a tensor changed?)"
            )


def load_compressed(directory, model=None, *, device=None):
    """Load a model from a folder written by :func:`save_compressed`.

    Nothing is fitted and no original weights are needed: the projective
    layers are built from their stored shapes, ranks and cluster ids, and
    every tensor is then loaded strictly from the folder's safetensors
    file(s), in the dtype it was saved in. The model computes bit for bit
    what the saved one did given the same attention implementation (the
    folder records it) and the same number of torch threads; with another
    thread count or on another machine, equal up to floating-point rounding
    (a reduction split over other threads adds in another order). Nothing
    is downloaded.

    The folder is read as untrusted data: nothing from it is imported or
    run (no remote code, no pickle), no path leads out of it (symbolic
    links included), kflats.json, config.json, modules.json and the
    safetensors index are checked against what kflats writes before any
    tensor is read, the stored tensors' shapes and dtypes against the
    manifest and the model (nothing is cast), and sizes against a model
    built on the meta device before any memory is taken.

    Parameters
    ----------
    directory : str or path-like
        A folder written by :func:`save_compressed`.
    model : torch.nn.Module, default=None
        A model of the saved class to load into, in place, instead of
        building one; its weights are replaced (they may be random). Required
        for a folder saved from a plain :class:`torch.nn.Module`, which
        cannot be rebuilt from the folder. Everything is checked before
        anything is replaced: on error the model is left unchanged.
    device : str or torch.device, default=None
        Where the model goes. ``None``: where it is built (the CPU for a
        transformers model, the device sentence-transformers picks for
        one of its models) or where the given ``model`` already is.

    Returns
    -------
    model : torch.nn.Module
        In eval mode: a model of the saved class (a
        :class:`sentence_transformers.SentenceTransformer` with its modules
        and tokenizer, or a transformers model; its tokenizer, if one was
        saved, loads with ``AutoTokenizer.from_pretrained(directory)``), or
        the given ``model``.

    Raises
    ------
    TypeError
        If a model is passed first (the order of versions before the folder
        format): the folder comes first now.
    ValueError
        If ``directory`` is not a folder written by :func:`save_compressed`
        (or was written by another format version), if one of its files
        breaks the checks above (the message names the folder, the file and
        the field), if a plain module is loaded without ``model``, or if
        ``model`` differs from the saved architecture: another class, a
        module missing or of another type or shape, tensors that do not
        match in shape or dtype.

    See Also
    --------
    save_compressed

    Examples
    --------
    >>> import os, tempfile, torch
    >>> from kflats.torch import compress, save_compressed, load_compressed
    >>> def build():
    ...     return torch.nn.Sequential(torch.nn.Linear(24, 8), torch.nn.ReLU())
    >>> _ = torch.manual_seed(0)
    >>> model = build()
    >>> _ = compress(model, budget=0.5, targets="0", k=2, random_state=0)
    >>> tmp = tempfile.TemporaryDirectory()
    >>> folder = os.path.join(tmp.name, "tiny")
    >>> save_compressed(model, folder)
    >>> fresh = load_compressed(folder, build())  # random weights, replaced
    >>> fresh[0]  # doctest: +ELLIPSIS
    ProjectiveLinear(in_features=24, out_features=8, k=2, ...)
    >>> x = torch.randn(5, 24)
    >>> torch.equal(fresh(x), model(x))
    True
    >>> tmp.cleanup()
    """
    if isinstance(directory, nn.Module):
        raise TypeError(
            "load_compressed(directory, model=None, *, device=None) takes the folder "
            "first: call load_compressed(folder, model) (the order changed when "
            "compressed models became self-contained folders)"
        )
    if model is not None and not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    directory = Path(os.fspath(directory))
    where = repr(str(directory))
    manifest = _read_manifest(directory)
    _check_tree(directory, where)
    kind, root, modules = manifest["kind"], manifest["root"], manifest["modules"]
    if model is not None and _qualname(type(model)) != manifest["architecture"]:
        raise ValueError(
            f"{where} was saved from a {manifest['architecture']} model, not a "
            f"{_qualname(type(model))}; load it into the class it was saved from"
        )
    if model is None and kind == "module":
        raise ValueError(
            f"{where} was saved from a plain torch module "
            f"({manifest['architecture']}), which cannot be rebuilt from the "
            "folder: pass model=, a freshly built instance of that class"
        )
    folder = _inside(directory, root["path"], where, "root.path")
    if not folder.is_dir():
        raise ValueError(f"{where}: root.path {root['path']!r} is not a folder")
    cls = None
    if kind != "module":
        if kind == "sentence-transformers":
            _check_modules_json(directory, root, where)
        import transformers

        cls = _import_class(
            root["architecture"], "transformers", transformers.PreTrainedModel, where
        )
    files, weight_map = _weight_files(folder, where)
    stored = _stored(files, where, weight_map)
    quantized = manifest.get("quantized", {})
    packed, stored = _check_quantized(quantized, stored, where)
    if cls is not None:
        _check_config(folder, cls, stored, where)
        _check_tokenizer(folder, kind, where)
    _check_layers(modules, stored, where)
    dtype = _stored_dtype(modules, stored, where)
    if model is None:
        # every size, shape and dtype is checked on a model that takes no
        # memory before the real one is built
        _fit(
            _build_transformers(cls, folder, root, where, dtype, meta=True),
            modules,
            files,
            stored,
            where,
            manifest.get("ties", {}),
        )
        if kind == "transformers":
            model = _build_transformers(cls, directory, root, where, dtype)
        else:
            model = _build_sentence_transformer(
                directory, manifest, device, where, dtype
            )
    if kind == "sentence-transformers":
        holder = model._modules.get(root["module"])
        hf = getattr(holder, "auto_model", None)
    else:
        hf = model
    if kind != "module" and (
        not isinstance(hf, nn.Module) or _qualname(type(hf)) != root["architecture"]
    ):
        raise ValueError(
            f"{where} was saved from another architecture: expected a "
            f"{root['architecture']} in module {root['module']!r}, found "
            f"{type(hf).__name__}"
        )
    plans, ties = _fit(hf, modules, files, stored, where, manifest.get("ties", {}))
    state = _read_tensors(files, set(stored) - set(packed), where)
    tensors = _unpack(files, quantized, packed, where)
    # the floats a quantized layer held: one multiply per entry, bit-identical
    state.update(
        {key: torch.from_numpy(qt.dequantize()) for key, qt in tensors.items()}
    )
    state.update({key: state[source] for key, source in ties.items()})
    _verify(plans, modules, state, where)
    # checked: from here on nothing can fail on the user's input
    for name, layer in plans.items():
        parent, _, child = name.rpartition(".")
        setattr(hf.get_submodule(parent), child, layer)
    hf.load_state_dict(state, strict=True)
    if tensors:
        from ..quantize import record_quantized_

        record_quantized_(hf, tensors)  # a save writes the same codes again
    model.eval()
    if device is not None:
        model.to(device)
    return model
