"""Tiny GGUF files for the tests, written with the gguf package (nothing downloaded).

:func:`write_tiny_gguf` writes a random 2-layer Llama (or Qwen2) causal LM
as llama.cpp's converter lays it out: tensors under llama.cpp's names, the
query and key rows of a Llama in llama.cpp's order, the hyperparameters and a
small byte-level BPE tokenizer (the 256 bytes, a few merges, one special
token) in the metadata; :func:`write_tiny_gpt2_gguf` a GPT-2 likewise.
transformers reads them (kflats' GGUF input) and llama.cpp runs them.
:func:`gguf_bytes` builds a header by hand, for the crafted-input tests.
"""

import struct

import numpy as np

HIDDEN, INTERMEDIATE, HEADS, KV_HEADS, LAYERS = 64, 128, 4, 2, 2
GPT2_CONTEXT = 1024
SPECIAL = "<|endoftext|>"
MERGES = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a", "e r", "o n", "Ġ s", "r e",
          "a n", "Ġ c", "e n", "Ġ w", "a t", "o r", "Ġ o", "Ġ b", "i s", "Ġ m",
          "Ġ p"]  # fmt: skip


def byte_symbols():
    """The printable stand-in of each byte in a byte-level BPE vocabulary.

    Bytes that print as themselves keep their character; the others take
    the characters from U+0100 on, in byte order.
    """
    kept = [*range(33, 127), *range(161, 173), *range(174, 256)]
    symbols, extra = {}, 0
    for b in range(256):
        if b in kept:
            symbols[b] = chr(b)
        else:
            symbols[b] = chr(256 + extra)
            extra += 1
    return [symbols[b] for b in range(256)]


def vocabulary():
    """The tokens (special first, the bytes, the merges' results) and merges."""
    tokens = [SPECIAL, *byte_symbols()]
    for merge in MERGES:
        tokens.append(merge.replace(" ", ""))
    return tokens, list(MERGES)


def permute_rows(w, heads):
    """Rows of a Llama query or key projection in llama.cpp's order.

    Within each head, the two halves of the rotary pairs are interleaved:
    row ``i`` of the first half goes to ``2 i``, of the second to ``2 i + 1``.
    """
    rows = w.shape[0]
    half = rows // heads // 2
    return w.reshape(heads, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def tiny_causal_lm(family="llama", seed=0, tied=True):
    """A random transformers model of the tiny shape, in eval mode."""
    import torch
    import transformers

    tokens, _ = vocabulary()
    options = dict(
        vocab_size=len(tokens), hidden_size=HIDDEN, intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS, max_position_embeddings=256,
        rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=tied,
        bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    torch.manual_seed(seed)
    if family == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**options))
    else:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**options))
    with torch.no_grad():  # norms away from 1, sharp attention: mistakes show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif p.ndim == 1:
                p.normal_(0.0, 0.1)
            elif "q_proj" in name or "k_proj" in name:
                p.normal_(0.0, 0.3)
    return model.eval()


def write_tiny_gguf(path, family="llama", seed=0, tied=True, types=None):
    """Write a tiny random causal LM as a GGUF file; returns the torch model.

    ``types`` maps a tensor's GGUF name (or ``"*"``, every matrix) to a
    ``gguf.GGMLQuantizationType``; matrices default to F32, vectors are F32.
    """
    model = tiny_causal_lm(family, seed, tied)
    write_gguf(path, model, types)
    return model


def write_gguf(path, model, types=None):
    """Write a transformers model of the tiny shape as a GGUF file (see above)."""
    import gguf

    family = model.config.model_type
    tied = bool(model.config.tie_word_embeddings)
    arch = {"llama": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2}[family]
    name = gguf.MODEL_ARCH_NAMES[arch]
    names = gguf.get_tensor_name_map(arch, LAYERS)
    writer = gguf.GGUFWriter(str(path), name)
    writer.add_name(f"tiny-{family}")
    writer.add_block_count(LAYERS)
    writer.add_context_length(256)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(INTERMEDIATE)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(HIDDEN // HEADS)
    writer.add_vocab_size(len(vocabulary()[0]))
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    _add_tokenizer(writer)
    for key, tensor in model.state_dict().items():
        if tied and key == "lm_head.weight":
            continue
        gguf_name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        w = tensor.detach().float().numpy()
        if family == "llama" and ".attn_q." in gguf_name:
            w = permute_rows(w, HEADS)
        elif family == "llama" and ".attn_k." in gguf_name:
            w = permute_rows(w, KV_HEADS)
        _add(writer, gguf_name, w, types)
    _finish(writer)
    return model


def tiny_gpt2(seed=0):
    """A random GPT-2 (Conv1D layers, a fused query-key-value) of the tiny
    shape, its head tied, in eval mode."""
    import torch
    import transformers

    tokens, _ = vocabulary()
    # (transformers reads a GGUF GPT-2 with GPT-2's own context and MLP width)
    config = transformers.GPT2Config(
        vocab_size=len(tokens), n_positions=GPT2_CONTEXT, n_embd=HIDDEN,
        n_layer=LAYERS, n_head=HEADS, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = transformers.GPT2LMHeadModel(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
                p.uniform_(0.5, 1.5)
            elif p.ndim == 1:
                p.normal_(0.0, 0.1)
    return model.eval()


def write_tiny_gpt2_gguf(path, seed=0, types=None):
    """Write a tiny random GPT-2 as llama.cpp's converter lays it out (its
    Conv1D weights transposed to rows of outputs, no output.weight: tied);
    returns the torch model. ``types`` as in :func:`write_tiny_gguf`."""
    import gguf

    model = tiny_gpt2(seed)
    arch = gguf.MODEL_ARCH.GPT2
    names = gguf.get_tensor_name_map(arch, LAYERS)
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[arch])
    writer.add_name("tiny-gpt2")
    writer.add_block_count(LAYERS)
    writer.add_context_length(GPT2_CONTEXT)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(4 * HIDDEN)
    writer.add_head_count(HEADS)
    writer.add_layer_norm_eps(1e-5)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    _add_tokenizer(writer)
    conv1d = (".c_attn.weight", ".c_proj.weight", ".c_fc.weight")
    for key, tensor in model.state_dict().items():
        if key == "lm_head.weight" or key.endswith((".attn.bias", ".masked_bias")):
            continue
        gguf_name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        w = tensor.detach().float().numpy()
        if key.endswith(conv1d):
            w = w.T
        _add(writer, gguf_name, w, types)
    _finish(writer)
    return model


def _add_tokenizer(writer):
    import gguf

    tokens, merges = vocabulary()
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(
        [gguf.TokenType.CONTROL] + [gguf.TokenType.NORMAL] * (len(tokens) - 1)
    )
    writer.add_token_merges(merges)
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(0)
    writer.add_add_bos_token(False)


def _add(writer, name, w, types):
    """One tensor: F32, or a matrix in the type ``types`` gives it."""
    import gguf

    types = types or {}
    qtype = types.get(name, types.get("*")) if w.ndim == 2 else None
    if qtype is None or qtype == gguf.GGMLQuantizationType.F32:
        writer.add_tensor(name, np.ascontiguousarray(w, dtype=np.float32))
    else:
        blocks = gguf.quants.quantize(np.ascontiguousarray(w, np.float32), qtype)
        writer.add_tensor(name, blocks, raw_dtype=qtype)


def _finish(writer):
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


# -- headers written by hand, for the crafted-input tests ------------------------


def gguf_string(text):
    data = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(data)) + data


def gguf_kv(key, vtype, payload):
    """One metadata entry: its key, its type (an int), its encoded value."""
    return gguf_string(key) + struct.pack("<I", vtype) + payload


def gguf_tensor_info(name, dims, ttype, offset):
    return (
        gguf_string(name)
        + struct.pack("<I", len(dims))
        + b"".join(struct.pack("<Q", d) for d in dims)
        + struct.pack("<I", ttype)
        + struct.pack("<Q", offset)
    )


def gguf_bytes(kvs=(), tensors=(), data=b"", *, version=3, counts=None, magic=b"GGUF"):
    """A GGUF file's bytes: header, entries, tensor infos, padding, data.

    ``counts`` overrides the (tensors, entries) counts the header declares.
    """
    kvs, tensors = list(kvs), list(tensors)
    n_tensors, n_kv = counts if counts is not None else (len(tensors), len(kvs))
    head = magic + struct.pack("<I", version) + struct.pack("<QQ", n_tensors, n_kv)
    body = head + b"".join(kvs) + b"".join(tensors)
    body += b"\0" * (-len(body) % 32)
    return body + data
