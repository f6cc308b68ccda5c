"""The files of a compressed folder, read as data.

Everything is read from the folder as data, checked before it is used: every
path against the folder (resolved, so that no symbolic link leads out of
it), every JSON file against bounds on its size and values, the
safetensors headers before any tensor is read, and the stored tensors'
shapes and dtypes against the model that takes them.
"""

import json
import os
import re
from pathlib import Path

import torch

_MANIFEST = "kflats.json"
_WEIGHTS = "model.safetensors"
_INDEX = "model.safetensors.index.json"

_MAX_JSON = 32 * 2**20  # bytes of one JSON file
_MAX_JSON_VALUES = 2**19  # values in one JSON file
_MAX_JSON_CONTAINERS = 2**18  # lists and objects in one JSON file
_MAX_ENTRIES = 100_000  # files and folders inside a compressed folder
_MAX_DIM = 2**31 - 1  # one size (the largest a tensor dimension takes)
# a dotted Python name: a module's, a parameter's, a class's
_NAME = re.compile(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*")
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
