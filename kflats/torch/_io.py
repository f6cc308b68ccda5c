"""Save the projective layers of a compressed model, and put them back."""

import pickle
import zipfile

import torch
from torch import nn

from ._layers import ProjectiveEmbedding, ProjectiveLinear

__all__ = ["load_compressed", "save_compressed"]

_FORMAT = "kflats.torch.compressed"
_VERSION = 1
_LAYERS = {
    "ProjectiveEmbedding": ProjectiveEmbedding,
    "ProjectiveLinear": ProjectiveLinear,
}


def _architecture(model):
    cls = type(model)
    return f"{cls.__module__}.{cls.__qualname__}"


def _compact_labels(labels, k):
    """Cluster ids in the smallest integer dtype that holds them."""
    tops = ((torch.uint8, 255), (torch.int16, 32767), (torch.int32, 2**31 - 1))
    for dtype, top in tops:
        if k - 1 <= top:
            return labels.to(dtype)
    return labels  # pragma: no cover


def save_compressed(model, path):
    """Write the projective layers of a compressed model to a file.

    Only the :class:`ProjectiveEmbedding` and :class:`ProjectiveLinear`
    modules are stored (their factors, cluster ids, biases and shapes), so the
    file is about as large as the compressed parameters; the rest of the model
    comes from its original weights when :func:`load_compressed` puts the
    layers back.

    Parameters
    ----------
    model : torch.nn.Module
        A model in which :func:`compress` (or the user) placed projective
        layers.
    path : str or path-like or file-like
        Destination, written with :func:`torch.save`.

    Raises
    ------
    ValueError
        If the model holds no projective layer.

    See Also
    --------
    load_compressed

    Examples
    --------
    >>> import os, tempfile, torch
    >>> from kflats.torch import compress, save_compressed, load_compressed
    >>> def build():
    ...     torch.manual_seed(0)
    ...     return torch.nn.Sequential(torch.nn.Embedding(200, 16))
    >>> model = build()
    >>> _ = compress(model, budget=0.5, targets="0", k=2, random_state=0)
    >>> path = os.path.join(tempfile.mkdtemp(), "model.kflats")
    >>> save_compressed(model, path)
    >>> fresh = load_compressed(build(), path)
    >>> ids = torch.arange(200)
    >>> torch.equal(fresh(ids), model(ids))
    True
    """
    modules = {}
    for name, module in model.named_modules():
        if not isinstance(module, (ProjectiveEmbedding, ProjectiveLinear)):
            continue
        if isinstance(module, ProjectiveEmbedding):
            shape = (module.num_embeddings, module.embedding_dim)
            config = {"padding_idx": module.padding_idx}
        else:
            shape = (module.in_features, module.out_features)
            config = {"bias": module.bias is not None, "side": module.side}
        config.update(ranks=module.ranks, affine=module.affine)
        state = {
            key: value.detach().cpu()
            for key, value in module.state_dict().items()
            if key != "labels"
        }
        modules[name] = {
            "type": type(module).__name__,
            "shape": shape,
            "dtype": str(module.bases.dtype).removeprefix("torch."),
            "config": config,
            "labels": _compact_labels(module.labels.cpu(), module.k),
            "state": state,
        }
    if not modules:
        raise ValueError(
            f"model ({type(model).__name__}) holds no ProjectiveEmbedding or "
            "ProjectiveLinear module; compress it first"
        )
    torch.save(
        {
            "format": _FORMAT,
            "version": _VERSION,
            "architecture": _architecture(model),
            "modules": modules,
        },
        path,
    )


def _read(path):
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except (
        pickle.UnpicklingError,
        zipfile.BadZipFile,
        RuntimeError,
        EOFError,
        ValueError,
        AttributeError,
        TypeError,
    ) as exc:
        raise ValueError(
            f"{path!r} is not a kflats compressed-model file: {exc}"
        ) from exc
    if not isinstance(data, dict) or data.get("format") != _FORMAT:
        raise ValueError(
            f"{path!r} is not a kflats compressed-model file (written by "
            "kflats.torch.save_compressed)"
        )
    if data.get("version") != _VERSION:
        raise ValueError(
            f"{path!r} has format version {data.get('version')!r}; this kflats "
            f"reads version {_VERSION}"
        )
    return data


def load_compressed(model, path, *, strict_architecture=True):
    """Put the projective layers saved by :func:`save_compressed` into a model.

    The model must be built as the one that was compressed, with its original
    weights (for a Hugging Face or sentence-transformers model: loaded from
    the same checkpoint); the saved layers replace its modules in place,
    without fitting anything. Every module is checked before any is replaced:
    on error the model is left unchanged.

    Parameters
    ----------
    model : torch.nn.Module
        Modified in place, and returned.
    path : str or path-like or file-like
        A file written by :func:`save_compressed`.
    strict_architecture : bool, default=True
        Require ``model`` to be of the same class as the model that was saved.
        The names and shapes of the replaced modules are checked either way.

    Returns
    -------
    model : torch.nn.Module
        The same object. The new layers take the device and dtype of the
        modules they replace.

    Raises
    ------
    ValueError
        If the file is not a kflats compressed-model file, or was made for
        another architecture: another model class, a module name the model
        lacks, or a module of another type or shape.

    See Also
    --------
    save_compressed : Examples are there.
    """
    data = _read(path)
    arch = _architecture(model)
    if strict_architecture and data["architecture"] != arch:
        raise ValueError(
            f"{path!r} was saved from a {data['architecture']} model, not a "
            f"{arch}; load it into the architecture it was made for "
            "(or pass strict_architecture=False)"
        )
    named = dict(model.named_modules())
    plans = []
    for name, entry in data["modules"].items():
        cls = _LAYERS.get(entry.get("type"))
        if cls is None:
            raise ValueError(f"{path!r}: unknown layer type {entry.get('type')!r}")
        old = named.get(name)
        if old is None:
            raise ValueError(
                f"{path!r} was made for another architecture: the model has no "
                f"module {name!r}"
            )
        shape = tuple(entry["shape"])
        if cls is ProjectiveEmbedding:
            ok = isinstance(old, (nn.Embedding, ProjectiveEmbedding))
            found = (
                (old.num_embeddings, old.embedding_dim) if ok else type(old).__name__
            )
            weight = old.weight if isinstance(old, nn.Embedding) else old.bases
        else:
            ok = isinstance(old, (nn.Linear, ProjectiveLinear))
            found = (old.in_features, old.out_features) if ok else type(old).__name__
            weight = old.weight if isinstance(old, nn.Linear) else old.bases
        if not ok or found != shape:
            raise ValueError(
                f"{path!r} was made for another architecture: module {name!r} is "
                f"{type(old).__name__} {found}, the file holds a {cls.__name__} of "
                f"shape {shape}"
            )
        config = dict(entry["config"])
        layer = cls(
            *shape,
            config.pop("ranks"),
            entry["labels"].to(torch.int64),
            **config,
            device=weight.device,
            dtype=weight.dtype,
        )
        try:
            layer.load_state_dict(
                {**entry["state"], "labels": entry["labels"].to(torch.int64)}
            )
        except RuntimeError as exc:
            raise ValueError(f"{path!r}: corrupt entry for {name!r}: {exc}") from exc
        plans.append((name, layer.train(old.training)))
    for name, layer in plans:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, layer)
    return model
