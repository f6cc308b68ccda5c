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
import os
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
_VERSION = 2
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


def _describe(layer):
    """The kflats.json entry of a layer: what its constructor needs but labels."""
    if isinstance(layer, ProjectiveEmbedding):
        shape = [layer.num_embeddings, layer.embedding_dim]
        extra = {"padding_idx": layer.padding_idx}
    else:
        shape = [layer.in_features, layer.out_features]
        extra = {"bias": layer.bias is not None, "side": layer.side}
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


# -- the tensors of a folder ---------------------------------------------------


def _weight_files(folder, where):
    """The safetensors files of a folder: one file, or the shards of an index."""
    index = folder / _INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            names = sorted(set(weight_map.values()))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"{where}: unreadable {_INDEX}: {exc}") from None
        files = [folder / name for name in names]
    else:
        files = [folder / _WEIGHTS]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise ValueError(f"{where}: weight file(s) missing from {folder}: {missing}")
    return files


def _stored_shapes(files, where):
    """Name -> shape of every stored tensor, read from the headers only."""
    from safetensors import SafetensorError, safe_open

    shapes = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt", device="cpu") as f:
                for key in f.keys():
                    shapes[key] = tuple(f.get_slice(key).get_shape())
        except (SafetensorError, OSError) as exc:
            raise ValueError(f"{where}: unreadable weight file {file}: {exc}") from None
    return shapes


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

    A key may be absent when it holds the same tensor as a stored key (tied
    weights, which safetensors stores once). Returns, for each such key, the
    stored key it is filled from.
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
        f"{key}: stored {list(stored[key])}, model {list(expected[key].shape)}"
        for key in stored
        if key in expected and tuple(expected[key].shape) != stored[key]
    ]
    problems = []
    for what, keys in (
        ("missing", missing),
        ("unexpected", unexpected),
        ("of another shape", wrong),
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
    projective layer, its type, shape and ranks.

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
        If the model holds no projective layer (or, in a sentence-transformers
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
                and _projective(child.auto_model)
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
    if not layers:
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
        _match(
            hf.state_dict(keep_vars=True),
            _stored_shapes(_weight_files(folder, str(directory)), str(directory)),
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
    where = repr(str(directory))
    if not directory.is_dir():
        raise ValueError(
            f"{where} is not a folder; load_compressed reads the folders that "
            "kflats.torch.save_compressed writes (the single-file format of older "
            "kflats versions is no longer read: compress the model again)"
        )
    path = directory / _MANIFEST
    if not path.is_file():
        raise ValueError(
            f"{where} has no {_MANIFEST}: it is not a compressed-model folder "
            "written by kflats.torch.save_compressed"
        )
    try:
        manifest = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"{where}: {_MANIFEST} is not valid JSON: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != _FORMAT:
        raise ValueError(
            f"{where}: {_MANIFEST} does not describe a kflats compressed model "
            f"(expected format {_FORMAT!r})"
        )
    if manifest.get("version") != _VERSION:
        raise ValueError(
            f"{where} has format version {manifest.get('version')!r}; this kflats "
            f"reads version {_VERSION}"
        )
    if (
        manifest.get("kind") not in _KINDS
        or not isinstance(manifest.get("architecture"), str)
        or not isinstance(manifest.get("root"), dict)
        or not isinstance(manifest.get("modules"), dict)
        or not manifest["modules"]
    ):
        raise ValueError(
            f"{where}: {_MANIFEST} is incomplete (it needs a kind among {_KINDS}, "
            "an architecture, a root and the modules)"
        )
    return manifest


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


def _build_transformers(directory, root, where):
    import transformers

    cls = _import_class(
        root.get("architecture", ""),
        "transformers",
        transformers.PreTrainedModel,
        where,
    )
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
    with _quiet():
        try:
            config = transformers.AutoConfig.from_pretrained(
                str(directory), local_files_only=True, trust_remote_code=False
            )
        except (ValueError, OSError, KeyError, TypeError) as exc:
            if "trust_remote_code" in str(exc):
                raise ValueError(
                    f"{where}: its config.json asks to run code from the folder "
                    "(auto_map); kflats never runs code from a compressed folder"
                ) from None
            raise ValueError(f"{where}: unreadable config.json: {exc}") from None
        # Every parameter and persistent buffer is overwritten by the strict
        # load that follows, so their random init is skipped (it took 0.4 s of
        # the 0.5 s that building all-MiniLM-L6-v2 takes); the other buffers
        # (position ids, rotary frequencies) are computed by the constructors.
        with no_init_weights():
            model = cls._from_config(config, **options)
        # no_init_weights also skips the tying of weights that post_init does
        model.tie_weights()
        if model.can_generate() and (directory / "generation_config.json").is_file():
            model.generation_config = transformers.GenerationConfig.from_pretrained(
                str(directory), local_files_only=True, trust_remote_code=False
            )
    return model


def _build_sentence_transformer(directory, manifest, device, where):
    import sentence_transformers

    cls = _import_class(
        manifest["architecture"],
        "sentence_transformers",
        sentence_transformers.SentenceTransformer,
        where,
    )
    model_kwargs = {"attn_implementation": _portable_attention(manifest["root"])}
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


def _plan(hf, modules, files, where):
    """Build the layers named in kflats.json, checking them against ``hf``."""
    named = dict(hf.named_modules())
    labels = _read_tensors(files, {f"{name}.labels" for name in modules}, where)
    plans = {}
    for name, entry in modules.items():
        cls = _LAYERS.get(entry.get("type")) if isinstance(entry, dict) else None
        if cls is None:
            raise ValueError(f"{where}: unknown layer entry for {name!r}: {entry!r}")
        old = named.get(name)
        if old is None or not name:
            raise ValueError(
                f"{where} was saved from another architecture: the model has no "
                f"module {name!r}"
            )
        try:
            shape = tuple(int(s) for s in entry["shape"])
            if cls is ProjectiveEmbedding:
                config = {"padding_idx": entry["padding_idx"]}
            else:
                config = {"bias": bool(entry["bias"]), "side": entry["side"]}
            ranks, affine = entry["ranks"], bool(entry["affine"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{where}: corrupt entry for {name!r}: {exc!r}") from None
        if cls is ProjectiveEmbedding:
            ok = isinstance(old, (nn.Embedding, ProjectiveEmbedding))
            found = (old.num_embeddings, old.embedding_dim) if ok else None
            weight = old.weight if isinstance(old, nn.Embedding) else None
        else:
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
        if f"{name}.labels" not in labels:
            raise ValueError(f"{where}: the cluster ids of {name!r} are not stored")
        weight = old.bases if weight is None else weight
        try:
            # Built on the meta device and then given memory, uninitialized:
            # the strict load fills every parameter and the cluster ids, and
            # the layer recomputes its index buffers from the loaded ids (the
            # random init, orthogonal bases by QR, took 0.6 s on MiniLM).
            layer = cls(
                *shape,
                ranks,
                labels[f"{name}.labels"],
                affine=affine,
                **config,
                device="meta",
                dtype=weight.dtype,
            ).to_empty(device=weight.device)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{where}: corrupt entry for {name!r}: {exc}") from None
        plans[name] = layer.train(old.training)
    return plans


def load_compressed(directory, model=None, *, device=None):
    """Load a model from a folder written by :func:`save_compressed`.

    Nothing is fitted and no original weights are needed: the projective
    layers are built from their stored shapes, ranks and cluster ids, and
    every tensor is then loaded strictly from the folder's safetensors
    file(s), so the model computes exactly what the saved one did. Nothing
    is downloaded.

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
        (or was written by another format version), if a plain module is
        loaded without ``model``, or if ``model`` differs from the saved
        architecture: another class, a module missing or of another type or
        shape, tensors that do not match.

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
    kind, root = manifest["kind"], manifest["root"]
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
    folder = (directory / str(root.get("path", ""))).resolve()
    if folder != directory.resolve() and directory.resolve() not in folder.parents:
        raise ValueError(f"{where}: {_MANIFEST} points outside the folder")
    files = _weight_files(folder, where)
    shapes = _stored_shapes(files, where)
    if model is None:
        if kind == "transformers":
            model = _build_transformers(directory, root, where)
        else:
            model = _build_sentence_transformer(directory, manifest, device, where)
    if kind == "sentence-transformers":
        holder = model._modules.get(str(root.get("module")))
        hf = getattr(holder, "auto_model", None)
    else:
        hf = model
    if kind != "module" and (
        not isinstance(hf, nn.Module) or _qualname(type(hf)) != root.get("architecture")
    ):
        raise ValueError(
            f"{where} was saved from another architecture: expected a "
            f"{root.get('architecture')} in module {root.get('module')!r}, found "
            f"{type(hf).__name__}"
        )
    plans = _plan(hf, manifest["modules"], files, where)
    plans.update(plan_ties(hf, plans, manifest.get("ties", {}), where))
    expected = {
        key: value
        for key, value in hf.state_dict(keep_vars=True).items()
        if not any(key.startswith(name + ".") for name in plans)
    }
    for name, layer in plans.items():
        for key, value in layer.state_dict(keep_vars=True).items():
            expected[f"{name}.{key}"] = value
    ties = _match(expected, shapes, f"{where}: the stored tensors do not fit the model")
    state = _read_tensors(files, set(shapes), where)
    state.update({key: state[source] for key, source in ties.items()})
    # checked: from here on nothing can fail on the user's input
    for name, layer in plans.items():
        parent, _, child = name.rpartition(".")
        setattr(hf.get_submodule(parent), child, layer)
    hf.load_state_dict(state, strict=True)
    model.eval()
    if device is not None:
        model.to(device)
    return model
