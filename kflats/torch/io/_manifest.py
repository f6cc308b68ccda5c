"""kflats.json: what it records of a compressed model, and its schema.

Written last by :func:`save_compressed` (a folder with a kflats.json is
complete), read first by :func:`load_compressed`, which checks the type,
range and allowed values of every field before anything else is read.
"""

import math

import torch

from kflats import __version__
from kflats.torch.io._files import _MANIFEST, _MAX_DIM, _NAME, _inside, _read_json
from kflats.torch.io._quantized_files import _quantized_entry
from kflats.torch.layers import ProjectiveEmbedding, ProjectiveLinear

_FORMAT = "kflats.compressed"
_VERSION = 3
# version 2 lacks the "check" of each ProjectiveLinear entry; it reads as well
_READABLE_VERSIONS = (2, 3)
_KINDS = ("sentence-transformers", "transformers", "module")
_LAYERS = {
    "ProjectiveEmbedding": ProjectiveEmbedding,
    "ProjectiveLinear": ProjectiveLinear,
}
# the fields of a layer's entry in kflats.json
_ENTRY_KEYS = {
    "ProjectiveEmbedding": {"type", "shape", "ranks", "affine", "padding_idx"},
    "ProjectiveLinear": {"type", "shape", "ranks", "affine", "bias", "side"},
}
_MAX_MODULES = 65_536  # projective layers one kflats.json may list


def _probe(layer):
    """Three numbers that a ProjectiveLinear computes: a check of its tensors.

    The layer's output ``y`` on a fixed input: its sum, its sum with fixed
    weights, its norm (the scale of the other two). Read back with the wrong
    side (the tensors of a square layer have the same shapes on both sides),
    the layer computes with the transpose and the sums move by about the
    norm; rounding moves them by far less.
    """
    weight = layer.weight  # dtype and device, whether the factors are packed or not
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


class _Fields:
    """The checks of kflats.json's fields, each raising an error that names it.

    A field written ``"name|field"`` belongs to the entry of a layer or a
    quantized tensor, which the message names.
    """

    def __init__(self, where):
        self.where = where

    def bad(self, field, expected, value):
        shown = repr(value)
        shown = shown if len(shown) < 80 else shown[:77] + "..."
        layer, _, field = field.rpartition("|")
        what = f"has a corrupt entry for {layer!r}" if layer else "is incomplete"
        return ValueError(
            f"{self.where}: {_MANIFEST} {what}: {field} must be {expected}, got {shown}"
        )

    def integer(self, field, value, low, high=_MAX_DIM):
        if type(value) is not int or not low <= value <= high:
            raise self.bad(field, f"an integer in {low}..{high}", value)
        return value

    def boolean(self, field, value):
        if type(value) is not bool:
            raise self.bad(field, "true or false", value)

    def dotted(self, field, value):
        if not isinstance(value, str) or len(value) > 500 or not _NAME.fullmatch(value):
            raise self.bad(field, "a dotted Python name", value)


def _check_schema(manifest, where):
    """Types, ranges and allowed values of every field kflats.json holds."""
    fields = _Fields(where)
    _check_root(manifest, fields)
    for key in ("kflats_version", "torch_version"):
        if key in manifest and not isinstance(manifest[key], str):
            raise fields.bad(key, "a string", manifest[key])
    quantized = manifest.get("quantized", {})
    if not isinstance(quantized, dict) or len(quantized) > _MAX_MODULES:
        raise fields.bad(
            "quantized", f"an object of 0..{_MAX_MODULES} tensors", quantized
        )
    for key, entry in quantized.items():
        _check_quantized_entry(key, entry, fields)
    modules = manifest.get("modules")
    least = 0 if quantized else 1
    if not isinstance(modules, dict) or not least <= len(modules) <= _MAX_MODULES:
        raise fields.bad(
            "modules", f"an object of {least}..{_MAX_MODULES} layers", type(modules)
        )
    for name, entry in modules.items():
        _check_layer_entry(name, entry, manifest["version"], fields)


def _check_root(manifest, fields):
    """The kind of model, its class, and where its transformer lies."""
    kind = manifest.get("kind")
    if kind not in _KINDS:
        raise fields.bad("kind", f"one of {_KINDS}", kind)
    fields.dotted("architecture", manifest.get("architecture"))
    root = manifest.get("root")
    if not isinstance(root, dict):
        raise fields.bad("root", "an object", root)
    allowed = {"module", "path"}
    if kind != "module":
        allowed |= {"architecture", "attn_implementation"}
        fields.dotted("root.architecture", root.get("architecture"))
        impl = root.get("attn_implementation")
        if impl is not None and (not isinstance(impl, str) or len(impl) > 200):
            raise fields.bad("root.attn_implementation", "a string or null", impl)
    for key in ("module", "path"):
        if not isinstance(root.get(key), str):
            raise fields.bad(f"root.{key}", "a string", root.get(key))
    if set(root) - allowed:
        raise fields.bad(
            "root", f"an object of the keys {sorted(allowed)}", sorted(root)
        )


def _check_quantized_entry(key, entry, fields):
    """One entry of kflats.json's "quantized": a parameter stored packed."""
    from kflats.quantize import SUPPORTED_BITS

    if not isinstance(key, str) or len(key) > 1000 or not _NAME.fullmatch(key):
        raise fields.bad("a quantized tensor's name", "a dotted parameter name", key)
    field = f"{key}|"
    keys = {"bits", "group_size", "axis", "shape", "symmetric"}
    if not isinstance(entry, dict) or set(entry) != keys:
        raise fields.bad(
            f"{field}its entry",
            f"an object of the keys {sorted(keys)}",
            sorted(entry) if isinstance(entry, dict) else entry,
        )
    if type(entry["bits"]) is not int or entry["bits"] not in SUPPORTED_BITS:
        raise fields.bad(f"{field}bits", f"one of {SUPPORTED_BITS}", entry["bits"])
    shape = entry["shape"]
    if not isinstance(shape, list) or len(shape) != 2:
        raise fields.bad(f"{field}shape", "a list of 2 integers", shape)
    for s in shape:
        fields.integer(f"{field}shape", s, 1)
    axis = fields.integer(f"{field}axis", entry["axis"], 0, 1)
    length = shape[1] if axis == 1 else shape[0]
    group = fields.integer(f"{field}group_size", entry["group_size"], 1, length)
    if length % group:
        raise fields.bad(f"{field}group_size", f"a divisor of {length}", group)
    fields.boolean(f"{field}symmetric", entry["symmetric"])


def _check_layer_entry(name, entry, version, fields):
    """One entry of kflats.json's "modules": a projective layer."""
    if not _NAME.fullmatch(name) or len(name) > 1000:
        raise fields.bad("a layer name", "a dotted module name", name)
    field = f"{name}|"
    layer = entry.get("type") if isinstance(entry, dict) else None
    if not isinstance(layer, str) or layer not in _LAYERS:
        raise ValueError(
            f"{fields.where}: unknown layer entry for {name!r}: {entry!r}"[:300]
        )
    keys = _ENTRY_KEYS[layer]
    if layer == "ProjectiveLinear" and version >= 3:
        keys = keys | {"check"}
    if set(entry) != keys:
        raise fields.bad(
            f"{field}its entry", f"an object of the keys {sorted(keys)}", sorted(entry)
        )
    n, d = _check_layer_shape(field, layer, entry, fields)
    fields.boolean(f"{field}affine", entry["affine"])
    check = entry.get("check", [0.0] * 3)
    if (
        not isinstance(check, list)
        or len(check) != 3
        or not all(type(v) in (int, float) and math.isfinite(v) for v in check)
    ):
        raise fields.bad(f"{field}check", "a list of 3 finite numbers", check)
    ranks = entry["ranks"]
    # one cluster holds at least one of the n rows: at most n ranks
    if not isinstance(ranks, list) or not 1 <= len(ranks) <= n:
        raise fields.bad(
            f"{field}ranks",
            f"a list of 1..{n} ranks (one per cluster)",
            f"{type(ranks).__name__} of {len(ranks)}"
            if isinstance(ranks, list)
            else ranks,
        )
    if not all(type(r) is int and 0 <= r <= d for r in ranks):
        raise fields.bad(
            f"{field}ranks",
            f"integers in 0..{d}",
            next(r for r in ranks if type(r) is not int or not 0 <= r <= d),
        )


def _check_layer_shape(field, layer, entry, fields):
    """A layer's shape and the fields that go with its type.

    Returns (rows, columns) of its factors: the rows of a Linear of side
    "output" are its output neurons.
    """
    shape = entry["shape"]
    if not isinstance(shape, list) or len(shape) != 2:
        raise fields.bad(f"{field}shape", "a list of 2 integers", shape)
    n, d = (fields.integer(f"{field}shape", s, 1) for s in shape)
    if layer == "ProjectiveLinear":
        fields.boolean(f"{field}bias", entry["bias"])
        if entry["side"] not in ("input", "output"):
            raise fields.bad(f"{field}side", "'input' or 'output'", entry["side"])
        if entry["side"] == "output":
            n, d = d, n
    else:
        padding = entry["padding_idx"]
        if padding is not None:
            fields.integer(f"{field}padding_idx", padding, -n, n - 1)
    return n, d


def _qualname(cls):
    return f"{cls.__module__}.{cls.__qualname__}"


def _attention(hf):
    impl = getattr(getattr(hf, "config", None), "_attn_implementation", None)
    return impl if isinstance(impl, str) else None


def _manifest_of(model, kind, root, hf, layers, quantized):
    """The kflats.json of a saved model: its kind and class, each layer's entry.

    ``root`` says where the transformer lies (its module and folder); ``hf``
    is the module that holds the layers, whose class and attention
    implementation the root records for a model of transformers or
    sentence-transformers.
    """
    # imported when called: kflats.torch.models may import from this package
    from kflats.torch.models import describe_ties

    if kind != "module":
        root = {
            **root,
            "architecture": _qualname(type(hf)),
            "attn_implementation": _attention(hf),
        }
    return {
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
