"""The metadata of an exported GGUF file: the source GGUF's, carried over and checked.

A compressed folder keeps transformers' config and tokenizer, not
llama.cpp's metadata (its tokenizer's pre-tokenizer type, token types,
chat template as llama.cpp reads them). The GGUF file the model was
compressed from holds all of it: its entries are copied as they are (their
value types kept), but for the file type, which is set from the tensors
written, and kflats' own entries. The source is the ``source`` given, or
else the GGUF file that ``kflats compress`` recorded in the folder's
report.json. Before anything is copied the source's header is checked as
untrusted data, and the source against the folder: the same architecture,
the same numbers of blocks and heads, the same tensors with the same shapes.
"""

import json
import os
from pathlib import Path

from kflats import __version__
from kflats.torch.io._gguf_check import read_gguf_header

__all__ = [
    "MARKER_KEY",
    "check_source",
    "file_entries",
    "file_type",
    "find_source",
    "header_nbytes",
    "kflats_entries",
    "padded",
    "source_entries",
]

MARKER_KEY = "kflats.version"  # an entry of every file kflats writes
_REPORT = "report.json"
# entries the writer sets itself, or that this file sets anew
_SET_HERE = ("general.architecture", "general.alignment", "general.file_type",
             "general.quantization_version", MARKER_KEY, "kflats.source")  # fmt: skip
# a GGUF file's header before its entries: magic, version, the two counts
_HEAD = 4 + 4 + 8 + 8
# bytes of a scalar value, by GGUFValueType (strings and arrays: counted)
_SCALAR_BYTES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY = 8, 9


def find_source(folder, source, where):
    """The GGUF file to take the metadata from: ``source``, or the report's.

    Raises a ValueError saying what to pass when there is none.
    """
    if source is not None:
        path = Path(os.fspath(source))
        if path.is_dir():
            found = sorted(path.glob("*.gguf"))
            if len(found) != 1:
                raise ValueError(
                    f"source {str(path)!r} is a folder holding {len(found)} GGUF "
                    "files; pass the GGUF file itself"
                )
            path = found[0]
        if not path.is_file():
            raise ValueError(f"source {str(path)!r} is not a file")
        return path
    recorded = _recorded(folder)
    if recorded is not None and recorded.is_file():
        return recorded
    told = (
        f"its report.json names {str(recorded)!r}, which is not a file here"
        if recorded is not None
        else "it records no GGUF file it was compressed from"
    )
    raise ValueError(
        f"{where}: a GGUF file takes its tokenizer and metadata from the GGUF file "
        f"the model was compressed from, and {told}: pass it as source= (kflats "
        "export --source). A model compressed from a Hugging Face folder needs a "
        "GGUF file of that model (llama.cpp's convert_hf_to_gguf.py writes one)"
    )


def _recorded(folder):
    """The GGUF file ``kflats compress`` read, as its report.json names it."""
    try:
        report = json.loads((folder / _REPORT).read_text(encoding="utf-8"))
        model = report["model"]
        shown, name = model["source"], model.get("gguf_file")
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not isinstance(shown, str) or not (name is None or isinstance(name, str)):
        return None
    path = Path(shown)
    if name is not None and path.name != name:
        path = path / name
    return path if path.suffix.lower() == ".gguf" else None


def _value(field):
    """A reader field as the writer takes it: value, type, item type."""
    import gguf

    vt = gguf.GGUFValueType
    vtype = vt(field.types[0])
    if vtype == vt.ARRAY:
        item = vt(field.types[1]) if len(field.types) > 1 else None
        if item is None or item == vt.ARRAY or not field.data:
            return None  # nested or empty arrays: llama.cpp reads none of ours
        if item == vt.STRING:
            return [bytes(field.parts[i]) for i in field.data], vtype, item
        return [field.parts[i][0].item() for i in field.data], vtype, item
    if vtype == vt.STRING:
        return bytes(field.parts[field.data[0]]), vtype, None
    return field.parts[field.data[0]][0].item(), vtype, None


def source_entries(path):
    """The source's metadata to copy: ``(key, value, type, item type)`` each.

    Also returns its alignment (the writer's own setting).
    """
    import gguf

    reader = gguf.GGUFReader(str(path))
    entries = []
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key in _SET_HERE:
            continue
        if key.startswith("split."):
            raise ValueError(
                f"source {str(path)!r} is one part of a split GGUF file; merge it "
                "first (llama.cpp's gguf-split --merge)"
            )
        value = _value(field)
        if value is not None:
            entries.append((key, *value))
    return entries


def check_source(path, arch, config, tensors, where):
    """The source against the folder's model; returns the source's header.

    The architecture, the numbers of blocks and of heads (which lay out the
    query and key rows), and every tensor's name and shape must agree.
    """
    shown = f"source {str(path)!r}"
    header = read_gguf_header(path, shown)
    theirs = header.architecture
    if theirs != arch:
        raise ValueError(
            f"{shown} is a GGUF model of architecture {theirs!r}; {where} holds a "
            f"model of llama.cpp's architecture {arch!r}"
        )
    meta = header.metadata
    heads = config.num_attention_heads
    numbers = {
        "block_count": config.num_hidden_layers,
        "embedding_length": config.hidden_size,
        "attention.head_count": heads,
        "attention.head_count_kv": getattr(config, "num_key_value_heads", None)
        or heads,
    }
    for key, ours in numbers.items():
        value = meta.get(f"{arch}.{key}")
        if key == "attention.head_count_kv" and value is None:
            value = meta.get(f"{arch}.attention.head_count")
        if value != ours:
            raise ValueError(
                f"{shown} is not the model of {where}: its {arch}.{key} is {value!r}, "
                f"the folder's model has {ours}"
            )
    mine = {t.name: tuple(reversed(t.shape)) for t in tensors}
    held = {t.name: tuple(t.dims) for t in header.tensors}
    missing = sorted(set(held) - set(mine))
    extra = sorted(set(mine) - set(held))
    other = sorted(n for n in set(mine) & set(held) if mine[n] != held[n])
    if missing or extra or other:
        parts = [
            f"{label} {', '.join(names[:3])}{', ...' if len(names) > 3 else ''}"
            for label, names in (
                ("it holds tensors the model lacks:", missing),
                ("it lacks", extra),
                ("of other shapes:", other),
            )
            if names
        ]
        raise ValueError(f"{shown} is not the model of {where}: {'; '.join(parts)}")
    return header


def file_type(tensors):
    """The file's type: its most common matrix type (llama.cpp shows it)."""
    import gguf

    q, f = gguf.GGMLQuantizationType, gguf.LlamaFileType
    by_type = {
        q.F32: f.ALL_F32, q.F16: f.MOSTLY_F16, q.Q4_0: f.MOSTLY_Q4_0,
        q.Q4_1: f.MOSTLY_Q4_1, q.Q5_0: f.MOSTLY_Q5_0, q.Q5_1: f.MOSTLY_Q5_1,
        q.Q8_0: f.MOSTLY_Q8_0,
    }  # fmt: skip
    counts = {}
    for t in tensors:
        if len(t.shape) == 2:
            counts[t.type] = counts.get(t.type, 0) + t.data.size
    quantized = {k: v for k, v in counts.items() if k not in (q.F32, q.F16)}
    chosen = max(quantized or counts, key=(quantized or counts).get, default=q.F32)
    return by_type[chosen]


def kflats_entries(source):
    """kflats' own entries: its version (the mark of a file it wrote), the source."""
    return [(MARKER_KEY, __version__), ("kflats.source", Path(source).name)]


def file_entries(source, arch, alignment, ftype):
    """Every metadata entry of the file written, in order: ``(key, value, type,
    item type)``.

    The architecture, the alignment (when not GGUF's default), the source's
    entries (:func:`source_entries`), the file type ``ftype``, the
    quantization version (written whatever the tensors' types: the file's
    size does not depend on them), kflats' entries.
    """
    import gguf

    vt, keys = gguf.GGUFValueType, gguf.Keys.General
    entries = [(keys.ARCHITECTURE, arch, vt.STRING, None)]
    if alignment != gguf.GGUF_DEFAULT_ALIGNMENT:
        entries.append((keys.ALIGNMENT, int(alignment), vt.UINT32, None))
    entries += source_entries(source)
    entries.append((keys.FILE_TYPE, int(ftype), vt.UINT32, None))
    entries.append(
        (keys.QUANTIZATION_VERSION, gguf.GGML_QUANT_VERSION, vt.UINT32, None)
    )
    entries += [(k, v, vt.STRING, None) for k, v in kflats_entries(source)]
    return entries


def _value_nbytes(value, vtype, item):
    vtype = int(vtype)
    if vtype == _STRING:
        return 8 + len(value.encode() if isinstance(value, str) else value)
    if vtype == _ARRAY:
        if int(item) in _SCALAR_BYTES:
            return 4 + 8 + len(value) * _SCALAR_BYTES[int(item)]
        return 4 + 8 + sum(_value_nbytes(v, item, None) for v in value)
    return _SCALAR_BYTES[vtype]


def padded(nbytes, alignment):
    """``nbytes`` rounded up to a multiple of ``alignment``."""
    return -(-nbytes // alignment) * alignment


def header_nbytes(entries, tensors, alignment):
    """Bytes of a GGUF file before its tensors' data, its padding included.

    ``entries`` as :func:`file_entries` gives them, ``tensors`` the
    ``(name, number of dimensions)`` of each tensor: a tensor's description
    is its name, its dimensions, its type and its offset, whatever its type.
    """
    kv = sum(
        _value_nbytes(key, _STRING, None) + 4 + _value_nbytes(value, vtype, item)
        for key, value, vtype, item in entries
    )
    infos = sum(8 + len(name.encode()) + 4 + 8 * ndim + 4 + 8 for name, ndim in tensors)
    return padded(_HEAD + kv + infos, alignment)
