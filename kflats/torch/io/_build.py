"""The model of a compressed folder rebuilt, checked before anything is placed.

Its skeleton is built from config.json (on the meta device first, so that a
config announcing absurd sizes fails before anything is allocated), each
projective layer from its kflats.json entry, checked against the stored
tensors' headers and the module it replaces; a ProjectiveLinear given its
tensors must compute what kflats.json records for it. The steps of
:func:`load_compressed` (open the folder, read the headers, build, read the
state, swap the layers in) are the last functions here.
"""

import contextlib
from typing import NamedTuple

import torch
from torch import nn

from kflats.torch.io._config_files import (
    _check_config,
    _check_modules_json,
    _check_tokenizer,
    _import_class,
    _portable_attention,
)
from kflats.torch.io._files import (
    _MANIFEST,
    _check_tree,
    _inside,
    _match,
    _read_tensors,
    _stored,
    _weight_files,
)
from kflats.torch.io._manifest import _LAYERS, _probe, _qualname, _read_manifest
from kflats.torch.io._quantized_files import (
    _check_quantized,
    _pack_model,
    _read_quantized,
)
from kflats.torch.io._quiet import _quiet
from kflats.torch.layers import (
    ProjectiveEmbedding,
    ProjectiveLinear,
    dense_features,
    is_conv1d,
    record_quantized_,
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
    # config.json is refused), and a portable attention implementation (the
    # one kflats.json records if portable, else eager), never config.json's
    # (which could name a hub kernel).
    saved = root.get("attn_implementation")
    options = {"attn_implementation": _portable_attention(saved)}
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
    saved = manifest["root"].get("attn_implementation")
    model_kwargs = {"attn_implementation": _portable_attention(saved)}
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
            dense = isinstance(old, nn.Linear) or is_conv1d(old)
            ok = dense or isinstance(old, ProjectiveLinear)
            found = dense_features(old) if ok else None
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
    # imported when called: kflats.torch.models may import from this package
    from kflats.torch.models import plan_ties

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
        if layer.weight.device.type == "meta":
            continue
        layer.load_state_dict(own, strict=True)
        got = _probe(layer)
        # float32 rounds at 1e-7, float16 at 1e-3 (relative to each output)
        tol = (1e-2 if layer.weight.dtype.itemsize <= 2 else 1e-4) * check[2] + 1e-6
        if any(abs(a - b) > tol for a, b in zip(got, check, strict=True)):
            side = modules[name]["side"]
            raise ValueError(
                f"{where}: the tensors of {name!r} do not compute what {_MANIFEST} "
                f"records for it (a ProjectiveLinear of side {side!r}: was the "
                "side or a tensor changed?)"
            )


# -- the steps of load_compressed -----------------------------------------------


class _Headers(NamedTuple):
    """What the weight files of a folder hold, read from their headers."""

    files: list  # the safetensors files
    stored: dict  # name -> (shape, dtype); a quantized parameter as its floats
    packed: dict  # the packed keys of each quantized parameter
    dtype: torch.dtype  # the floating dtype of the projective layers


def _open_folder(directory, model, where):
    """kflats.json read, and the folder checked against it and the given model.

    Returns the manifest, the folder of the transformer (the folder itself
    but in a sentence-transformers model) and the transformers class to
    build (None for a plain torch module).
    """
    manifest = _read_manifest(directory)
    _check_tree(directory, where)
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
    return manifest, folder, cls


def _read_headers(folder, manifest, cls, where):
    """The stored tensors' headers, checked against kflats.json and config.json."""
    files, weight_map = _weight_files(folder, where)
    stored = _stored(files, where, weight_map)
    packed, stored = _check_quantized(manifest.get("quantized", {}), stored, where)
    if cls is not None:
        _check_config(folder, cls, stored, where)
        _check_tokenizer(folder, manifest["kind"], where)
    _check_layers(manifest["modules"], stored, where)
    dtype = _stored_dtype(manifest["modules"], stored, where)
    return _Headers(files, stored, packed, dtype)


def _build(cls, directory, folder, manifest, headers, device, where):
    """The model of the folder, built once its skeleton has fit the tensors.

    Every size, shape and dtype is checked on a model that takes no memory
    (on the meta device) before the real one is built.
    """
    root, dtype = manifest["root"], headers.dtype
    _fit(
        _build_transformers(cls, folder, root, where, dtype, meta=True),
        manifest["modules"],
        headers.files,
        headers.stored,
        where,
        manifest.get("ties", {}),
    )
    if manifest["kind"] == "transformers":
        return _build_transformers(cls, directory, root, where, dtype)
    return _build_sentence_transformer(directory, manifest, device, where, dtype)


def _transformer_of(model, manifest, where):
    """The module of ``model`` that holds the layers: itself, or its transformer."""
    kind, root = manifest["kind"], manifest["root"]
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
    return hf


def _read_state(headers, manifest, tied, where, unpack):
    """The state dict to load, and each quantized parameter as a QuantizedTensor.

    ``tied`` maps each key that safetensors stored once to the key it is
    stored under (see :func:`_match`). With ``unpack``, a quantized
    parameter's entry holds its dequantized floats; without, the state holds
    no entry for it: its packed tensors (which the QuantizedTensor's arrays
    share) go in with the layers that hold them (:func:`_pack_plans`,
    :func:`_pack_model`), and so do the aliases of a tied one.
    """
    state = _read_tensors(
        headers.files, set(headers.stored) - set(headers.packed), where
    )
    quantized = manifest.get("quantized", {})
    tensors = _read_quantized(headers.files, quantized, headers.packed, where)
    if unpack:
        # the floats a quantized layer held: one multiply per entry, bit-identical
        state.update(
            {key: torch.from_numpy(qt.dequantize()) for key, qt in tensors.items()}
        )
    state.update(
        {key: state[source] for key, source in tied.items() if source in state}
    )
    return state, tensors


def _swap_in(hf, plans, state, tensors, unpack):
    """Place the checked layers in ``hf`` and load every tensor, strictly."""
    for name, layer in plans.items():
        parent, _, child = name.rpartition(".")
        setattr(hf.get_submodule(parent), child, layer)
    if not unpack:
        _pack_model(hf, plans, tensors, state)
    hf.load_state_dict(state, strict=True)
    if tensors and unpack:
        record_quantized_(hf, tensors)  # a save writes the same codes again
