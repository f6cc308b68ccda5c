"""A compressed causal LM's tensors under llama.cpp's names, in llama.cpp's layout.

Each tensor of the model (a loaded compressed folder, its quantized
matrices held packed) becomes one GGUF tensor: a quantized matrix as the
blocks of its type (:mod:`._gguf_blocks`), a float tensor as it is (F32 or
F16; bfloat16 widened to F32, exactly). Names come from the gguf package's
map of each architecture (``model.layers.0.self_attn.q_proj.weight`` is
``blk.0.attn_q.weight``). A Llama's query and key rows are reordered to
llama.cpp's rotary layout, a whole row (with its blocks) at a time, so the
move is exact. A GPT-2 Conv1D weight, stored ``in x out``, is written as
llama.cpp holds it, ``out x in``: its codes, grouped along the inputs,
read transposed (exact); the fused query-key-value ``c_attn`` is one
tensor there too. A head tied to the word embedding is not written: llama.cpp
computes the logits with ``token_embd`` when ``output.weight`` is absent.
"""

from typing import NamedTuple

import numpy as np
import torch

from kflats.torch.export._gguf_blocks import gguf_type, pack_blocks
from kflats.torch.layers import is_conv1d

__all__ = [
    "ARCHITECTURES",
    "GgufTensor",
    "WrittenTensor",
    "check_family",
    "float_array",
    "float_type",
    "gguf_tensors",
    "permute_rows",
    "written_tensors",
]

_PACKED_PARTS = ("codes", "scales", "zeros", "meta")


class _Arch(NamedTuple):
    name: str  # llama.cpp's architecture
    permute: bool  # query and key rows in llama.cpp's rotary order


# transformers' model_type -> how llama.cpp holds the family
ARCHITECTURES = {
    "llama": _Arch("llama", True),
    "mistral": _Arch("llama", True),
    "qwen2": _Arch("qwen2", False),
    "qwen3": _Arch("qwen3", False),
    "gpt2": _Arch("gpt2", False),
}


class GgufTensor(NamedTuple):
    """One tensor of the GGUF file: its name, data and type, and where from.

    ``data`` is what the gguf writer takes: the blocks (uint8, one row of
    blocks per matrix row) of a quantized matrix, the values of a float
    tensor. ``source`` is the model's state-dict name; ``heads`` the heads
    whose rows were put in llama.cpp's rotary order (None: rows as they are);
    ``quantized`` the QuantizedTensor the blocks hold, rows first (None for
    a float tensor).
    """

    name: str
    data: np.ndarray
    type: object
    shape: tuple
    source: str
    heads: int | None = None
    quantized: object = None


def permute_rows(a, heads):
    """Rows of a query or key projection in llama.cpp's rotary order.

    transformers rotates the two halves of each head's rows as pairs
    (row ``i`` with ``i + head_dim / 2``); llama.cpp rotates neighbours
    (``2 i`` with ``2 i + 1``): row ``i`` of the first half goes to ``2 i``,
    of the second half to ``2 i + 1``.
    """
    rows = a.shape[0]
    if rows % (2 * heads):
        raise ValueError(f"{rows} rows do not split into {heads} heads of pairs")
    half = rows // heads // 2
    out = a.reshape(heads, 2, half, *a.shape[1:]).swapaxes(1, 2)
    return np.ascontiguousarray(out.reshape(a.shape))


def _split_state(hf):
    """The model's tensors: float ones and quantized ones, by state-dict name.

    A quantized matrix held packed appears in the state dict as its codes,
    scales, zero points and meta; the packed entries of a tied head, which
    shares its table's codes, come back as ``aliases``.
    """
    from kflats.quantize import quantized_tensors

    quantized = quantized_tensors(hf)
    state = hf.state_dict()
    floats, aliases = {}, set()
    for key, value in state.items():
        base, _, part = key.rpartition(".")
        if part in _PACKED_PARTS and f"{base}.codes" in state:
            if base not in quantized:
                aliases.add(base)
            continue
        floats[key] = value
    return floats, quantized, aliases


def float_array(value, key):
    """A float tensor as the numpy array written (bfloat16 widened, exactly)."""
    value = value.detach().cpu()
    if value.dtype == torch.bfloat16:  # no numpy type: widened, exactly
        value = value.to(torch.float32)
    if value.dtype not in (torch.float32, torch.float16):
        raise ValueError(
            f"{key!r} is a {value.dtype} tensor; GGUF export writes floats"
        )
    return np.ascontiguousarray(value.numpy())


def _names(arch, n_blocks):
    import gguf

    by_name = {name: key for key, name in gguf.MODEL_ARCH_NAMES.items()}
    return gguf.get_tensor_name_map(by_name[arch], n_blocks)


def _heads(name, config):
    """The heads whose rows a tensor's rows hold: query, key, or None."""
    if ".attn_q." in name:
        return config.num_attention_heads
    if ".attn_k." in name:
        return (
            getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        )
    return None


def check_family(hf, where):
    """llama.cpp's architecture of a model (:data:`ARCHITECTURES`), or a ValueError."""
    model_type = getattr(hf.config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise ValueError(
            f"{where} holds a {type(hf).__name__} (model_type {model_type!r}); kflats "
            f"writes GGUF files of the families {', '.join(ARCHITECTURES)}"
        )
    return ARCHITECTURES[model_type]


class WrittenTensor(NamedTuple):
    """A tensor of the model that the GGUF file holds, before it is converted.

    ``value`` is the float tensor, or the QuantizedTensor of a quantized
    matrix, rows first: a GPT-2 Conv1D's weight (stored ``in x out``)
    transposed, exactly, to ``out x in`` as llama.cpp holds it; ``heads``
    as in :class:`GgufTensor`.
    """

    key: str
    name: str
    value: object
    heads: int | None


def written_tensors(hf, where):
    """The model's tensors that its GGUF file holds, under their GGUF names.

    Every tensor of the state dict (a quantized matrix once, as its
    QuantizedTensor) but a head tied to the word embedding. Works on a
    model without weights (the meta device) too: nothing is converted.

    Parameters
    ----------
    hf : transformers.PreTrainedModel
        A causal LM of a family in :data:`ARCHITECTURES`.
    where : str
        How messages name the model.

    Returns
    -------
    tensors : list of WrittenTensor
        In the order of their state-dict names.
    arch : str
        llama.cpp's name of the architecture.
    """
    config = hf.config
    arch = check_family(hf, where)
    names = _names(arch.name, config.num_hidden_layers)
    floats, quantized, aliases = _split_state(hf)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    out = []
    for key in sorted({*floats, *quantized, *aliases}):
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ValueError(f"{where}: the tensor {key!r} has no name in GGUF's map")
        if name == "output.weight" and tied:
            continue  # llama.cpp takes token_embd.weight
        if key in aliases:
            raise ValueError(
                f"{where}: {key!r} shares another tensor's codes, but the model is "
                "not tied (tie_word_embeddings is false)"
            )
        heads = _heads(name, config) if arch.permute else None
        value = quantized[key] if key in quantized else floats[key]
        if key.endswith(".weight") and is_conv1d(hf.get_submodule(key[:-7])):
            value = value.T  # (the same codes, or a view: exact)
        out.append(WrittenTensor(key, name, value, heads))
    return out, arch.name


def gguf_tensors(hf, where):
    """The model's tensors as GGUF tensors; refused forms listed in one error.

    Parameters
    ----------
    hf : transformers.PreTrainedModel
        A causal LM of a family in :data:`ARCHITECTURES`, its quantized
        matrices recorded (held packed or not).
    where : str
        How messages name the folder.

    Returns
    -------
    tensors : list of GgufTensor
    arch : str
        llama.cpp's name of the architecture.
    """
    written, arch = written_tensors(hf, where)
    refused, out = [], []
    for key, name, value, heads in written:
        if not isinstance(value, torch.Tensor):  # a QuantizedTensor
            qtype, reason = gguf_type(value)
            if qtype is None:
                refused.append((key, reason))
                continue
            data, _ = pack_blocks(value)
            shape = value.shape
        else:
            data = float_array(value, key)
            qtype, shape = float_type(data.dtype), data.shape
        if heads is not None:
            data = permute_rows(data, heads)
        held = None if isinstance(value, torch.Tensor) else value
        out.append(GgufTensor(name, data, qtype, tuple(shape), key, heads, held))
    if refused:
        shown = "; ".join(f"{k} ({why})" for k, why in refused[:4])
        more = f"; and {len(refused) - 4} more" if len(refused) > 4 else ""
        raise ValueError(
            f"{where}: {len(refused)} quantized matrices are in forms no GGUF type "
            f"holds exactly: {shown}{more}. GGUF export writes 4-bit codes (with or "
            "without zero points) and 8-bit symmetric codes in groups of 32 along "
            "rows, float16 scales; compress with format='gguf' to keep to them"
        )
    return out, arch


def float_type(dtype):
    """The GGUF type of a float tensor of ``dtype`` (numpy or torch) as written:
    F16 for float16, F32 for the others (bfloat16 widened)."""
    import gguf

    q = gguf.GGMLQuantizationType
    half = dtype in (np.float16, torch.float16)
    return q.F16 if half else q.F32
