"""Quantized parameters in a folder: packed on save, checked and placed on load.

A parameter quantized by :func:`kflats.quantize.quantize_module_` is stored
as its codes, scales, zero points and meta (``<key>.codes``, ...), and
kflats.json records its bits, group size, axis and shape; the load checks
the packed tensors against that entry, then either dequantizes them
(``unpack=True``) or places them, as they are, in the layers that read them
(:func:`kflats.torch.layers.pack_quantized_`).
"""

import json

import torch

from kflats.torch.io._files import _INDEX, _MANIFEST, _read_tensors, _weight_files
from kflats.torch.layers import PackedTensor, pack_quantized_, quantized_tensors


def _quantized(module):
    """The QuantizedTensor of each quantized parameter, by state-dict key."""
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


# the entries of a packed tensor, any of them (to_state writes a subset)
_PARTS = ("codes", "scales", "scale_codes", "scale_exponents", "zeros", "meta")


def _packed(key, qt):
    """The safetensors entries of a quantized tensor: codes, scales, zeros, meta."""
    return {
        name: torch.from_numpy(value.copy())
        for name, value in qt.to_state(key + ".").items()
    }


def _pack_files(folder, quantized, where):
    """Store each quantized parameter of the folder's weights as its packed form.

    Rewrites the safetensors file(s) that hold those parameters (and the
    index of a sharded save). A model loaded packed was saved packed: a file
    is rewritten only to drop the names of a tied tensor's aliases that
    safetensors records in its metadata, as the rewrite of a float save does.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    files, weight_map = _weight_files(folder, where)
    for file in files:
        state = load_file(str(file))
        keys = [k for k in state if k in quantized]
        if not keys:
            with safe_open(str(file), framework="pt") as f:
                metadata = f.metadata()
            held = [k for k in quantized if f"{k}.codes" in state]
            # a model held packed saves its buffers: its integer zero points a
            # byte each and its compact scales as float16, which the file
            # stores packed at the tensor's bits, and as codes and exponents
            # (the other entries are written as they are held)
            rewritten = False
            for k in held:
                packed = _packed(k, quantized[k])
                old = {f"{k}.{p}" for p in _PARTS if f"{k}.{p}" in state}
                if old != set(packed) or any(
                    tuple(state[name].shape) != tuple(value.shape)
                    for name, value in packed.items()
                ):
                    for name in old:
                        del state[name]
                    state.update(packed)
                    rewritten = True
                    if weight_map is not None:
                        for name in old:
                            del weight_map[name]
                        weight_map.update(dict.fromkeys(packed, file.name))
            if held and (rewritten or metadata != {"format": "pt"}):
                save_file(state, str(file), metadata={"format": "pt"})
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
        compact = f"{key}.scale_codes" in stored
        scales = ("scale_codes", "scale_exponents") if compact else ("scales",)
        parts = {p: f"{key}.{p}" for p in ("codes", *scales, "meta")}
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


def _read_quantized(files, quantized, packed, where):
    """Each quantized parameter as a QuantizedTensor, checked against its entry."""
    from kflats.quantize import QuantizedTensor

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


def _under(name, tensors):
    """The tensors of the module ``name``, by their names within it."""
    prefix = name + "."
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


def _packed_entries(module, prefix=""):
    """The state entries of the packed tensors of ``module``, under every name."""
    return {
        f"{prefix}{name}.{key}": value
        for name, sub in module.named_modules(remove_duplicate=False)
        if isinstance(sub, PackedTensor)
        for key, value in sub._buffers.items()
        if value is not None
    }


def _pack_plans(plans, tensors, state):
    """The new layers' quantized factors held as codes, their entries in ``state``.

    The layers are still apart from the model; the packed tensors share the
    arrays read from the folder.
    """
    for name, layer in plans.items():
        own = _under(name, tensors)
        if own:
            pack_quantized_(layer, own)
            state.update(_packed_entries(layer, name + "."))


def _pack_model(hf, plans, tensors, state):
    """The model's other quantized parameters held as codes, their entries in ``state``.

    ``plans`` (the new layers, already packed by :func:`_pack_plans`) are
    in ``hf`` by now; everything has been checked.
    """
    rest = {
        key: qt
        for key, qt in tensors.items()
        if not any(key.startswith(name + ".") for name in plans)
    }
    pack_quantized_(hf, rest)  # a tied head shares its table's codes
    state.update(_packed_entries(hf))
