"""load_compressed keeps quantized matrices packed: the folder's bytes, same outputs.

A folder of a tiny BERT compressed in bytes (a projective word embedding
whose factors are quantized, every Linear quantized dense, the position
embeddings and norms left in float32) loads packed by default: the model
must hold about the folder's bytes, compute what the folder loaded with
``unpack=True`` computes, bit for bit, and save the same folder again. A
corrupt packed tensor fails as before, and a packed model refuses to train.
"""

import os

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

torch = pytest.importorskip("torch", reason="kflats.torch needs torch")
pytest.importorskip("safetensors")
transformers = pytest.importorskip("transformers")

from torch import nn  # noqa: E402

from kflats.torch import (  # noqa: E402
    compress,
    heal,
    load_compressed,
    save_compressed,
)
from kflats.torch.layers import (  # noqa: E402
    PackedTensor,
    ProjectiveEmbedding,
    ProjectiveLinear,
    quantized_state,
    quantized_tensors,
    register_straight_through_,
    unpack_quantized_,
)

from .._helpers import (  # noqa: E402
    SENTENCES,
    TinyEncoder,
    assert_unchanged,
    snapshot,
    word_tokenizer,
)

VOCAB = 4096
SHORT = torch.randint(5, VOCAB, (1, 9))  # a lookup in the packed inference form
LONG = torch.randint(5, VOCAB, (4, 30))  # the grouped form


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    """A tiny BERT compressed in bytes, saved; the model compress left."""
    config = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=256,
        max_position_embeddings=32,
    )
    torch.manual_seed(0)
    model = transformers.BertModel(config).eval()
    with torch.no_grad():  # a table of low rank: the plan takes factors for it
        table = model.embeddings.word_embeddings.weight
        noise = 0.01 * torch.randn(VOCAB, 64)
        table.copy_(torch.randn(VOCAB, 8) @ torch.randn(8, 64) / 3 + noise)
    compress(
        model,
        0.15,
        [nn.Embedding, nn.Linear],
        unit="bytes",
        random_state=0,
        progress=False,
    )
    path = tmp_path_factory.mktemp("packed") / "bert"
    save_compressed(model, path)
    return path, model


def hidden(model, ids):
    return model(input_ids=ids).last_hidden_state


def held_bytes(model):
    """Bytes of the tensors a model holds: parameters and buffers, storages once."""
    storages = {}
    for t in [*model.parameters(), *model.buffers()]:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(storages.values())


def folder_bytes(path):
    return sum(p.stat().st_size for p in path.rglob("*.safetensors"))


def test_the_folder_is_what_the_test_needs(bert):
    path, model = bert
    assert isinstance(model.embeddings.word_embeddings, ProjectiveEmbedding)
    tensors = quantized_tensors(model)
    assert any(name.endswith("coefficients.0") for name in tensors)
    assert sum(name.endswith(".dense.weight") for name in tensors) >= 4


@pytest.mark.parametrize("grad", ["no_grad", "enable_grad", "inference_mode"])
def test_packed_outputs_are_the_unpacked_outputs(bert, grad):
    path, model = bert
    packed, floats = load_compressed(path), load_compressed(path, unpack=True)
    assert any(isinstance(m, PackedTensor) for m in packed.modules())
    assert not any(isinstance(m, PackedTensor) for m in floats.modules())
    for ids in (SHORT, LONG):
        with getattr(torch, grad)():
            expected = hidden(floats, ids)
            assert torch.equal(hidden(packed, ids), expected)
            assert torch.equal(hidden(model, ids), expected)


def test_a_packed_model_holds_the_folder_s_bytes(bert):
    path, _ = bert
    packed, floats = load_compressed(path), load_compressed(path, unpack=True)
    with torch.no_grad():
        hidden(packed, SHORT), hidden(packed, LONG)
    on_disk = folder_bytes(path)
    held = held_bytes(packed)
    assert held <= 1.25 * on_disk
    assert held_bytes(floats) > 2.5 * held
    # exactly the folder's tensors, and the buffers no folder stores (the
    # table's row places, the position ids)
    stored = packed.state_dict()
    unsaved = sum(
        b.numel() * b.element_size()
        for name, b in packed.named_buffers()
        if name not in stored
    )
    assert held == sum(t.numel() * t.element_size() for t in stored.values()) + unsaved
    assert held - unsaved <= on_disk
    for module in packed.modules():
        if isinstance(module, (ProjectiveEmbedding, ProjectiveLinear)):
            assert module._packed_cache.value is None  # no float copy kept


def test_a_model_loaded_packed_saves_the_same_folder(bert, tmp_path):
    path, model = bert
    packed = load_compressed(path)
    again = tmp_path / "again"
    save_compressed(packed, again)
    assert sorted(p.name for p in again.iterdir()) == sorted(
        p.name for p in path.iterdir()
    )
    for file in path.iterdir():
        assert (again / file.name).read_bytes() == file.read_bytes(), file.name
    # its state, packed, is the in-process model's
    expected, got = quantized_state(model), quantized_state(packed)
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    with torch.no_grad():
        assert torch.equal(hidden(load_compressed(again), LONG), hidden(model, LONG))


def test_unpack_loads_the_float_layers_of_today(bert):
    path, model = bert
    floats = load_compressed(path, unpack=True)
    tensors = quantized_tensors(floats)
    assert tensors.keys() == quantized_tensors(model).keys()
    for name, qt in tensors.items():
        parameter = floats.get_parameter(name)
        assert isinstance(parameter, nn.Parameter)
        assert torch.equal(parameter.detach(), torch.from_numpy(qt.dequantize()))
    register_straight_through_(floats)  # trains through the rounding


def test_a_corrupt_packed_tensor_fails_as_before(bert, tmp_path):
    from safetensors.torch import load_file, save_file

    path, _ = bert
    key = next(
        k for k in quantized_tensors(load_compressed(path, unpack=True)) if "dense" in k
    )
    for entry, change, match in [
        ("zeros", lambda t: t[:-1].clone(), "zeros must be None or uint8"),
        ("codes", lambda t: t[:-1].clone(), "codes must hold"),
        ("scales", lambda t: t.fill_(float("nan")), "scales must be finite"),
    ]:
        broken = tmp_path / entry
        os.makedirs(broken)
        for file in path.iterdir():
            (broken / file.name).write_bytes(file.read_bytes())
        state = load_file(str(broken / "model.safetensors"))
        state[f"{key}.{entry}"] = change(state[f"{key}.{entry}"])
        save_file(state, str(broken / "model.safetensors"), metadata={"format": "pt"})
        with pytest.raises(ValueError, match=f"corrupt packed tensor {key!r}.*{match}"):
            load_compressed(broken)


def test_heal_asks_for_a_model_loaded_unpacked(tmp_path):
    torch.manual_seed(0)
    teacher = TinyEncoder(vocab=64, d=32).eval()
    model = TinyEncoder(vocab=64, d=32).eval()
    model.load_state_dict(teacher.state_dict())
    compress(model, 0.2, [nn.Embedding, nn.Linear], unit="bytes", progress=False)
    save_compressed(model, tmp_path / "m")
    packed = load_compressed(tmp_path / "m", TinyEncoder(vocab=64, d=32))
    snap = snapshot(packed)
    options = {"tokenizer": lambda t, **kw: word_tokenizer(t, vocab=64, **kw)}
    with pytest.raises(ValueError, match=r"unpack=True"):
        heal(
            packed, teacher, SENTENCES, steps=1, batch_size=4, progress=False, **options
        )
    assert_unchanged(packed, snap)
    # unpacked, it heals; saved, it loads packed again
    unpack_quantized_(packed)
    heal(packed, teacher, SENTENCES, steps=2, batch_size=4, progress=False, **options)
    save_compressed(packed, tmp_path / "healed")
    again = load_compressed(tmp_path / "healed", TinyEncoder(vocab=64, d=32))
    ids = word_tokenizer(SENTENCES[:3], vocab=64)
    with torch.no_grad():
        np.testing.assert_array_equal(
            again(**ids)["last_hidden_state"].numpy(),
            packed(**ids)["last_hidden_state"].numpy(),
        )


class Tied(nn.Module):
    """A table read again by the output head (tied weights), quantized dense."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(64, 32)
        self.mid = nn.Linear(32, 32)
        self.head = nn.Linear(32, 64, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids):
        return self.head(torch.relu(self.mid(self.embed(ids))))


def test_a_tied_table_loads_packed_once_and_saves_the_same_folder(tmp_path):
    from kflats.quantize import quantize_module_

    torch.manual_seed(0)
    model = Tied().eval()
    quantize_module_(model.embed, bits=3, group_size=16, method="rtn")
    quantize_module_(model.mid, bits=4, group_size=16, method="rtn")
    save_compressed(model, tmp_path / "a")
    packed = load_compressed(tmp_path / "a", Tied())
    assert packed.head._modules["weight"] is packed.embed._modules["weight"]
    ids = torch.randint(0, 64, (2, 5))
    with torch.no_grad():
        assert torch.equal(packed(ids), model(ids))
    save_compressed(packed, tmp_path / "b")
    for file in (tmp_path / "a").iterdir():
        assert (tmp_path / "b" / file.name).read_bytes() == file.read_bytes()
    floats = load_compressed(tmp_path / "b", Tied(), unpack=True)
    assert floats.head.weight is floats.embed.weight
    with torch.no_grad():
        assert torch.equal(floats(ids), model(ids))
