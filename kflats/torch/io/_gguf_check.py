"""A GGUF file's header read as untrusted data, every count and size bounded.

:func:`read_gguf_header` walks the header (magic, version, counts, metadata
entries, tensor descriptions) through a read-only memory map, checking each
count and length against the bytes left in the file before it is used: a
file that declares a metadata array of 10**8 entries, a string longer than
itself, a tensor of an unknown type or one lying beyond its end fails in
milliseconds, with a message naming the field, before any library reads it
and before any memory is taken. Only the values of scalar entries and of
strings up to :data:`_KEPT_STRING` bytes are kept; arrays are walked, not
built.
"""

import mmap
import struct
from pathlib import Path
from typing import NamedTuple

__all__ = [
    "GgufHeader",
    "GgufTensorInfo",
    "check_gguf_model",
    "gguf_architectures",
    "read_gguf_header",
]

_MAGIC = b"GGUF"
_VERSIONS = (2, 3)
_DEFAULT_ALIGNMENT = 32
_MAX_KEY = 65_535  # bytes of a metadata key
_MAX_NAME = 64  # bytes of a tensor name
_MAX_DIMS = 4
_MAX_DEPTH = 8  # arrays of arrays
_KEPT_STRING = 1 << 20  # string values kept, in bytes (a chat template fits)
# value types: name, struct format of a scalar (None: string or array)
_VALUE_TYPES = {
    0: ("UINT8", "<B"), 1: ("INT8", "<b"), 2: ("UINT16", "<H"), 3: ("INT16", "<h"),
    4: ("UINT32", "<I"), 5: ("INT32", "<i"), 6: ("FLOAT32", "<f"), 7: ("BOOL", "<?"),
    8: ("STRING", None), 9: ("ARRAY", None), 10: ("UINT64", "<Q"),
    11: ("INT64", "<q"), 12: ("FLOAT64", "<d"),
}  # fmt: skip
_STRING, _ARRAY = 8, 9


class GgufTensorInfo(NamedTuple):
    """A tensor as the header describes it.

    ``dims`` in GGUF's order (the row length first); ``type`` the
    ``gguf.GGMLQuantizationType``; ``offset`` and ``nbytes`` in the file.
    """

    name: str
    dims: tuple
    type: object
    offset: int
    nbytes: int


class GgufHeader(NamedTuple):
    """What :func:`read_gguf_header` read.

    ``metadata`` maps each key to its value (a scalar, a string, or for an
    array the tuple ``("ARRAY", item type name, count)``; a string over
    :data:`_KEPT_STRING` bytes is ``("STRING", length)``).
    """

    version: int
    metadata: dict
    tensors: tuple
    alignment: int
    data_offset: int
    file_size: int

    @property
    def architecture(self):
        """``general.architecture``, or None when absent or not a string."""
        value = self.metadata.get("general.architecture")
        return value if isinstance(value, str) else None


class _Cursor:
    """Reads of a memory map, each checked against the bytes left."""

    def __init__(self, data, what):
        self.data, self.pos, self.what = data, 0, what
        self.size = len(data)

    def fail(self, message):
        return ValueError(f"{self.what} is not a valid GGUF file: {message}")

    def left(self):
        return self.size - self.pos

    def take(self, n, field):
        if n > self.left():
            raise self.fail(
                f"{field} needs {n} bytes at offset {self.pos}, past the end of the "
                f"file ({self.size} bytes)"
            )
        start = self.pos
        self.pos += n
        return start

    def scalar(self, fmt, field):
        start = self.take(struct.calcsize(fmt), field)
        return struct.unpack_from(fmt, self.data, start)[0]

    def string(self, field, limit=None, keep_up_to=None):
        """A string; past ``keep_up_to`` bytes, ``("STRING", length)`` instead."""
        length = self.scalar("<Q", f"the length of {field}")
        if limit is not None and length > limit:
            raise self.fail(f"{field} is {length} bytes long, more than {limit}")
        start = self.take(length, field)
        if keep_up_to is not None and length > keep_up_to:
            return ("STRING", length)
        raw = bytes(self.data[start : start + length])
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{field} is not UTF-8 text") from None


def _value(cur, vtype, field):
    """One metadata value: kept if small, walked over if an array."""
    if vtype not in _VALUE_TYPES:
        raise cur.fail(f"{field} has the unknown value type {vtype}")
    fmt = _VALUE_TYPES[vtype][1]
    if fmt is not None:
        return cur.scalar(fmt, field)
    if vtype == _STRING:
        return cur.string(field, keep_up_to=_KEPT_STRING)
    return _array(cur, field, 0)


def _array(cur, field, depth):
    """An array walked over, its count checked first: ``("ARRAY", type, count)``."""
    if depth >= _MAX_DEPTH:
        raise cur.fail(f"{field} nests arrays more than {_MAX_DEPTH} deep")
    item = cur.scalar("<I", f"the item type of {field}")
    count = cur.scalar("<Q", f"the length of {field}")
    if item not in _VALUE_TYPES:
        raise cur.fail(f"{field} is an array of the unknown value type {item}")
    item_name, item_fmt = _VALUE_TYPES[item]
    # the least bytes an item takes: a string its length, an array its header
    least = struct.calcsize(item_fmt) if item_fmt else (8 if item == _STRING else 12)
    if count * least > cur.left():
        raise cur.fail(
            f"{field} declares {count} entries of {item_name}, at least "
            f"{count * least} bytes, but {cur.left()} bytes of the file are left"
        )
    if item_fmt is not None:
        cur.take(count * least, field)
    elif item == _STRING:
        for i in range(count):
            length = cur.scalar("<Q", f"the length of {field}[{i}]")
            cur.take(length, f"{field}[{i}]")
    else:
        for i in range(count):
            _array(cur, f"{field}[{i}]", depth + 1)
    return ("ARRAY", item_name, count)


def _metadata(cur, count):
    found = {}
    for i in range(count):
        key = cur.string(f"the key of metadata entry {i}", limit=_MAX_KEY)
        if key in found:
            raise cur.fail(f"metadata key {key!r} appears twice")
        vtype = cur.scalar("<I", f"the value type of {key!r}")
        found[key] = _value(cur, vtype, f"metadata entry {key!r}")
    return found


def _alignment(metadata, cur):
    value = metadata.get("general.alignment", _DEFAULT_ALIGNMENT)
    if type(value) is not int or value < 1 or value & (value - 1) or value > 1 << 20:
        raise cur.fail(f"general.alignment must be a power of 2, got {value!r}")
    return value


def _type_sizes():
    import gguf

    return {
        int(t): (t, *gguf.GGML_QUANT_SIZES[t])
        for t in gguf.GGMLQuantizationType
        if t in gguf.GGML_QUANT_SIZES
    }


def _tensor_infos(cur, count):
    sizes, found, infos = _type_sizes(), set(), []
    for i in range(count):
        name = cur.string(f"the name of tensor {i}", limit=_MAX_NAME)
        if name in found:
            raise cur.fail(f"tensor {name!r} appears twice")
        found.add(name)
        n_dims = cur.scalar("<I", f"the dimensions of tensor {name!r}")
        if not 1 <= n_dims <= _MAX_DIMS:
            raise cur.fail(f"tensor {name!r} has {n_dims} dimensions (1 to 4)")
        dims = tuple(
            cur.scalar("<Q", f"the shape of tensor {name!r}") for _ in range(n_dims)
        )
        code = cur.scalar("<I", f"the type of tensor {name!r}")
        if code not in sizes:
            raise cur.fail(f"tensor {name!r} has the unknown type {code}")
        qtype, block, type_size = sizes[code]
        if dims[0] % block:
            raise cur.fail(
                f"tensor {name!r} of type {qtype.name} has rows of {dims[0]} "
                f"entries, not a multiple of its blocks of {block}"
            )
        numel = 1
        for d in dims:
            numel *= d
        offset = cur.scalar("<Q", f"the offset of tensor {name!r}")
        infos.append(
            GgufTensorInfo(name, dims, qtype, offset, numel // block * type_size)
        )
    return infos


def _check_data(infos, data_offset, alignment, cur):
    """Each tensor's bytes inside the file, aligned, none overlapping another."""
    end_of_data = cur.size - data_offset
    for t in infos:
        if t.offset % alignment:
            raise cur.fail(
                f"tensor {t.name!r} starts at offset {t.offset}, not a multiple of "
                f"the alignment {alignment}"
            )
        if t.offset + t.nbytes > end_of_data:
            raise cur.fail(
                f"tensor {t.name!r} ({t.type.name}, shape {list(t.dims)}) needs bytes "
                f"{t.offset} to {t.offset + t.nbytes} of the data, which holds "
                f"{max(end_of_data, 0)} bytes: it lies beyond the end of the file"
            )
    ordered = sorted(infos, key=lambda t: t.offset)
    for a, b in zip(ordered, ordered[1:], strict=False):
        if a.offset + a.nbytes > b.offset:
            raise cur.fail(f"tensors {a.name!r} and {b.name!r} overlap")


def read_gguf_header(path, what=None):
    """Read and check a GGUF file's header, reading no tensor data.

    Parameters
    ----------
    path : str or path-like
    what : str, default=None
        How messages name the file (default: its path, quoted).

    Returns
    -------
    GgufHeader

    Raises
    ------
    ValueError
        If the file is not a GGUF file of version 2 or 3, or a count, a
        length, a type or an offset of its header does not fit the file:
        the message names the field.
    """
    path = Path(path)
    what = what if what is not None else repr(str(path))
    with open(path, "rb") as f:
        size = path.stat().st_size
        if size < 24:
            raise ValueError(
                f"{what} is not a valid GGUF file: {size} bytes, shorter than a "
                "GGUF header"
            )
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            return _read(_Cursor(data, what), size)


def _read(cur, size):
    magic = bytes(cur.data[:4])
    cur.take(4, "the magic")
    if magic != _MAGIC:
        raise cur.fail(f"it starts with {magic!r}, not {_MAGIC!r}")
    version = cur.scalar("<I", "the version")
    if version not in _VERSIONS:
        swapped = struct.unpack("<I", struct.pack(">I", version))[0]
        detail = " (a big-endian file)" if swapped in _VERSIONS else ""
        raise cur.fail(
            f"version {version}{detail}; kflats reads little-endian versions 2 and 3"
        )
    n_tensors = cur.scalar("<Q", "the tensor count")
    n_kv = cur.scalar("<Q", "the metadata count")
    # each entry takes bytes of the file: a count beyond them is a lie
    if n_kv * 12 > cur.left() or n_tensors * 24 > cur.left():
        raise cur.fail(
            f"the header declares {n_tensors} tensors and {n_kv} metadata entries, "
            f"more than its {size} bytes can describe"
        )
    metadata = _metadata(cur, n_kv)
    alignment = _alignment(metadata, cur)
    infos = _tensor_infos(cur, n_tensors)
    data_offset = -(-cur.pos // alignment) * alignment
    _check_data(infos, data_offset, alignment, cur)
    return GgufHeader(version, metadata, tuple(infos), alignment, data_offset, size)


# --- what kflats reads of a GGUF model -------------------------------------------


def gguf_architectures():
    """The GGUF architectures kflats reads: its causal-LM families' that
    transformers' GGUF reader knows."""
    from kflats.torch.models import GPT2Adapter, LlamaAdapter

    ours = (*LlamaAdapter.model_types, *GPT2Adapter.model_types)
    try:
        from transformers.modeling_gguf_pytorch_utils import (
            GGUF_SUPPORTED_ARCHITECTURES as theirs,
        )
    except ImportError:  # pragma: no cover - a transformers without GGUF
        return ()
    return tuple(a for a in ours if a in theirs)


def _readable(qtype):
    """Whether the GGUF reader transformers uses dequantizes this type."""
    import gguf
    import numpy as np

    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    try:
        gguf.quants.dequantize(np.zeros((1, type_size), dtype=np.uint8), qtype)
    except (NotImplementedError, ValueError, TypeError):
        return False
    return True


def check_gguf_model(path, what):
    """A GGUF file's header checked, then what kflats needs of it.

    The architecture must be one of :func:`gguf_architectures`, and every
    tensor of a type that transformers' reader dequantizes. Returns the
    :class:`GgufHeader`.
    """
    header = read_gguf_header(path, what)
    arch = header.architecture
    if arch is None:
        raise ValueError(f"{what}: its metadata names no general.architecture")
    known = gguf_architectures()
    if arch not in known:
        raise ValueError(
            f"{what} is a GGUF model of architecture {arch!r}, for which kflats has "
            f"no adapter (it reads GGUF causal LMs of the architectures "
            f"{', '.join(known)})"
        )
    unreadable, verdicts = {}, {}
    for t in header.tensors:
        if t.type not in verdicts:
            verdicts[t.type] = _readable(t.type)
        if not verdicts[t.type]:
            unreadable.setdefault(t.type.name, []).append(t.name)
    if unreadable:
        name, names = next(iter(unreadable.items()))
        raise ValueError(
            f"{what} holds {len(names)} tensor(s) of the GGUF type {name} ({names[0]}"
            f"{', ...' if len(names) > 1 else ''}), which kflats cannot dequantize "
            f"(its GGUF reader does not read {', '.join(unreadable)})"
        )
    return header
