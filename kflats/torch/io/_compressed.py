"""Save a compressed model as a self-contained folder, and load it back.

The folder holds no pickle: tensors are in safetensors files, the rest in
JSON. A model of Hugging Face transformers or sentence-transformers is saved
the way those libraries save it (``save_pretrained`` / ``save``), so config,
tokenizer and the other modules of a sentence-transformers model travel
with it; ``kflats.json`` says which modules are projective layers and how to
build them before the tensors are loaded.

The parts: ``_folder`` (paths, JSON and tensor headers read as data),
``_manifest`` (kflats.json and its schema), ``_saved_quantized`` (quantized
parameters), ``_library_files`` (config.json, modules.json, the tokenizer)
and ``_rebuild`` (the model rebuilt and checked before anything is placed).
"""

import inspect
import json
import os
import shutil
import sys
from pathlib import Path

from torch import nn

from kflats.torch.io._build import (
    _build,
    _fit,
    _open_folder,
    _read_headers,
    _read_state,
    _swap_in,
    _transformer_of,
    _verify,
)
from kflats.torch.io._files import _MANIFEST, _WEIGHTS, _match, _stored, _weight_files
from kflats.torch.io._manifest import _manifest_of
from kflats.torch.io._quantized_files import (
    _PARTS,
    _pack_files,
    _pack_plans,
    _packed,
    _quantized,
)
from kflats.torch.io._quiet import _quiet
from kflats.torch.layers import ProjectiveEmbedding, ProjectiveLinear

__all__ = ["load_compressed", "save_compressed"]


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
    keeps them so (or, with ``unpack=True``, dequantizes them to the very
    floats the saved layer held). A model loaded packed saves the same
    folder again.

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
    root, hf = _transformer(model, kind)
    layers, quantized = _compressed_parts(model, kind, hf)
    created = _claim(directory)
    try:
        root["path"] = _library_save(model, kind, directory, root, tokenizer)
        _check_saved(directory, directory / root["path"], hf, quantized)
        manifest = _manifest_of(model, kind, root, hf, layers, quantized)
        # written last: a folder with a kflats.json is complete
        (directory / _MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    except BaseException:
        _undo(directory, created)
        raise


def _transformer(model, kind):
    """Where the projective layers are saved from: the model, or its transformer.

    Returns the root of kflats.json (the module name of a
    sentence-transformers model's transformer; its path is known once the
    model is saved) and the module that holds the layers (None for a
    sentence-transformers model whose transformer holds none).
    """
    root = {"module": "", "path": ""}
    if kind != "sentence-transformers":
        return root, model
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
    return root, hf


def _compressed_parts(model, kind, hf):
    """The projective layers and quantized parameters to save; one at least."""
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
    return layers, quantized


def _claim(directory):
    """Create the folder to write, or take an empty one; True if created."""
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise FileExistsError(
            f"{str(directory)!r} exists and is not an empty folder; save_compressed "
            "writes a new folder"
        )
    created = not directory.exists()
    directory.mkdir(parents=True, exist_ok=True)
    return created


def _library_save(model, kind, directory, root, tokenizer):
    """Save the model as its library does; the path of its transformer's folder.

    The folder itself but in a sentence-transformers model, whose
    transformer has a folder of its own (``root["module"]`` names it).
    """
    with _quiet():
        if kind == "sentence-transformers":
            model.save(str(directory))
            entries = json.loads((directory / "modules.json").read_text())
            return next(e["path"] for e in entries if e["name"] == root["module"])
        if kind == "transformers":
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
    return ""


def _check_saved(directory, folder, hf, quantized):
    """No pickle written, and every tensor stored under its state-dict name.

    Quantized parameters are packed first (their files rewritten), and
    checked in their packed form.
    """
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
            packed = _packed(key, qt)
            # its float tensor, or the buffers of a model loaded packed; a
            # tied head's weight is the same tensor: stored once, packed
            # (held packed: its buffers, whatever entries the file stores)
            held_keys = (key, *packed, *(f"{key}.{p}" for p in _PARTS))
            held = {id(expected[k]) for k in held_keys if k in expected}
            for alias in [k for k, t in expected.items() if id(t) in held]:
                del expected[alias]
            expected.update(packed)
    _match(
        expected,
        _stored(_weight_files(folder, str(directory))[0], str(directory)),
        f"the save of this {type(hf).__name__} does not store its tensors under "
        "their state-dict names, which load_compressed needs",
    )


def _undo(directory, created):
    """Leave nothing of a failed save: the folder removed, or emptied again."""
    if created:
        shutil.rmtree(directory, ignore_errors=True)
    else:
        for child in directory.iterdir():
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child, ignore_errors=True)
            else:
                child.unlink(missing_ok=True)


# -- load ----------------------------------------------------------------------


def load_compressed(directory, model=None, *, device=None, unpack=False):
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

    A quantized weight or factor stays in memory as it is stored: its codes,
    scales and zero points, in a :class:`~kflats.torch.layers.PackedTensor`
    that takes the parameter's place. The layer dequantizes it at each use,
    into floats it drops after the call (a dense embedding table, the rows
    it looks up only), and computes the same outputs, bit for bit, as the
    layer holding the floats: the memory a model takes is that of its
    folder. Such a layer does not train: ``unpack=True`` loads the floats
    instead, as :func:`~kflats.torch.compress` leaves them, for training or
    :func:`~kflats.torch.heal`
    (:func:`~kflats.torch.layers.unpack_quantized_` converts a loaded model).

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
    unpack : bool, default=False
        Hold quantized parameters as float parameters (their dequantized
        values) rather than packed.

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
            "load_compressed(directory, model=None, *, device=None, unpack=False) "
            "takes the folder first: call load_compressed(folder, model) (the order "
            "changed when compressed models became self-contained folders)"
        )
    if model is not None and not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    directory = Path(os.fspath(directory))
    where = repr(str(directory))
    manifest, folder, cls = _open_folder(directory, model, where)
    modules, ties = manifest["modules"], manifest.get("ties", {})
    headers = _read_headers(folder, manifest, cls, where)
    if model is None:
        model = _build(cls, directory, folder, manifest, headers, device, where)
    hf = _transformer_of(model, manifest, where)
    plans, tied = _fit(hf, modules, headers.files, headers.stored, where, ties)
    state, tensors = _read_state(headers, manifest, tied, where, unpack)
    if not unpack:
        _pack_plans(plans, tensors, state)  # the new layers, still apart
    _verify(plans, modules, state, where)
    # checked: from here on nothing can fail on the user's input
    _swap_in(hf, plans, state, tensors, unpack)
    model.eval()
    if device is not None:
        model.to(device)
    return model
