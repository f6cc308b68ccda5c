"""Layers holding their quantized parameters packed compute what the float ones do.

:func:`pack_quantized_` puts a :class:`PackedTensor` (codes, scales, zero
points) in the place of each quantized parameter; the layer's outputs must
equal those of the same layer holding the floats, bit for bit, with and
without gradients recorded, for dense Linear and Embedding layers and for
projective layers whose factors are quantized; no float copy may stay
between calls, and :func:`unpack_quantized_` must give the float layer back.
"""

import copy
import pickle

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402

from kflats.quantize import (  # noqa: E402
    quantize_module_,
    quantized_state,
    quantized_tensors,
    register_straight_through_,
    requantize_,
)
from kflats.torch import ProjectiveEmbedding, ProjectiveLinear  # noqa: E402
from kflats.torch.layers import (  # noqa: E402
    PackedTensor,
    ProjectiveTiedHead,
    _packed_tensor,  # noqa: E402
    is_linear,
    is_packed,
    pack_quantized_,
    unpack_quantized_,
)
from kflats.torch.layers._packed import EMBEDDING_PACKED_TOKENS  # noqa: E402


def dense_model(seed=0, bits=(3, 4, 6)):
    """An embedding, two Linear layers: each quantized dense."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Embedding(96, 32, padding_idx=0),
        nn.Linear(32, 64),
        nn.ReLU(),
        nn.Linear(64, 24, bias=False),
    )
    for i, b in zip((0, 1, 3), bits, strict=True):
        quantize_module_(model[i], bits=b, group_size=16, method="rtn")
    return model.eval()


def projective_model(seed=0):
    """A projective embedding (an empty cluster) and Linear layers of both sides."""
    labels = torch.randint(0, 3, (96,), generator=torch.Generator().manual_seed(0))
    labels[labels == 2] = 3  # cluster 2 holds no token
    torch.manual_seed(seed)
    embedding = ProjectiveEmbedding(96, 32, ranks=(8, 16, 4, 5), labels=labels)
    output = ProjectiveLinear(32, 48, ranks=(16, 8), side="output")
    inputs = ProjectiveLinear(48, 32, ranks=(7, 9, 3), side="input", affine=True)
    model = nn.Sequential(embedding, output, nn.ReLU(), inputs)
    quantize_module_(embedding, bits=3, group_size=16, method="rtn")
    quantize_module_(output, bits=4, group_size=16, method="rtn")
    quantize_module_(inputs, bits=6, group_size=16, method="rtn")
    return model.eval()


BUILDERS = [dense_model, projective_model]
SHORT = torch.randint(0, 96, (3, 7))  # the packed inference form of an embedding
LONG = torch.randint(0, 96, (8, 2 * EMBEDDING_PACKED_TOKENS // 8))  # grouped


def held_bytes(model):
    """Bytes of the tensors a model holds, each storage once."""
    storages = {}
    for t in [*model.parameters(), *model.buffers()]:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(storages.values())


@pytest.mark.parametrize("build", BUILDERS)
@pytest.mark.parametrize("grad", ["no_grad", "enable_grad", "inference_mode"])
def test_packed_layers_compute_the_float_layers_outputs(build, grad):
    floats, packed = build(), pack_quantized_(build())
    context = getattr(torch, grad)
    for ids in (SHORT, LONG):
        with context():
            expected, got = floats(ids), packed(ids)
        assert got.dtype == expected.dtype and torch.equal(got, expected)
    with context():  # no token at all
        empty = torch.zeros(2, 0, dtype=torch.int64)
        assert torch.equal(packed(empty), floats(empty))
    packed.train()  # a training-mode forward reads the same values
    with context():
        assert torch.equal(packed(SHORT), floats.train()(SHORT))


@pytest.mark.parametrize("build", BUILDERS)
def test_the_state_is_the_folder_s_and_the_record_is_read_from_it(build):
    floats = build()
    state, tensors = quantized_state(floats), quantized_tensors(floats)
    packed = pack_quantized_(build())
    assert packed.state_dict().keys() == state.keys()
    for key, value in quantized_state(packed).items():
        assert value.dtype == state[key].dtype and torch.equal(value, state[key])
    again = quantized_tensors(packed)
    assert again.keys() == tensors.keys()
    for name, qt in tensors.items():
        np.testing.assert_array_equal(again[name].codes, qt.codes)
        np.testing.assert_array_equal(again[name].dequantize(), qt.dequantize())
    assert all(is_packed(packed.get_submodule(name.split(".")[0])) for name in again)
    # a fresh packed model of the same form loads that state strictly
    fresh = pack_quantized_(build(seed=1))
    fresh.load_state_dict(packed.state_dict(), strict=True)
    assert torch.equal(fresh(SHORT), packed(SHORT))


@pytest.mark.parametrize("build", BUILDERS)
def test_packed_layers_hold_their_codes_and_no_float_copy(build):
    floats = build()
    state_bytes = sum(
        t.numel() * t.element_size() for t in quantized_state(floats).values()
    )
    packed = pack_quantized_(build())
    with torch.no_grad():
        floats(SHORT), floats(LONG), packed(SHORT), packed(LONG)
    # what a projective layer keeps between calls: nothing of a quantized factor
    for module in packed.modules():
        if isinstance(module, (ProjectiveEmbedding, ProjectiveLinear)):
            assert module._packed_cache.value is None
            # (an empty cluster's coefficients, 0 x rank, are not quantized)
            floats_left = [p for p in module.parameters() if p.numel()]
            assert all(p is module.bias or p is module.means for p in floats_left)
    # the tensors held: the packed state, its integer zero points a byte each
    # (the file packs them at the tensor's bits), a projective layer's index
    # tables
    index = sum(
        b.numel() * b.element_size()
        for name, b in packed.named_buffers()
        if name.endswith(("_order", "_place"))
    )
    zeros = sum(
        qt.zeros.size - -(-qt.zeros.size * qt.bits // 8)
        for qt in quantized_tensors(floats).values()
        if qt.zeros is not None and qt.zeros.dtype == np.uint8 and qt.bits < 8
    )
    assert zeros > 0
    assert held_bytes(packed) == state_bytes + zeros + index
    assert held_bytes(packed) < 0.5 * held_bytes(floats)


def test_an_embedding_lookup_dequantizes_the_rows_it_reads(monkeypatch):
    packed = pack_quantized_(dense_model())

    def whole_table(*args):
        raise AssertionError("the whole table was dequantized")

    monkeypatch.setattr(_packed_tensor, "dequantize_matrix", whole_table)
    with torch.no_grad():
        out = packed[0](SHORT)
    assert torch.equal(out, dense_model()[0](SHORT))
    with pytest.raises(IndexError, match="out of range"):
        packed[0](torch.tensor([96]))


def test_a_projective_lookup_dequantizes_the_coefficient_rows_it_reads(monkeypatch):
    packed = pack_quantized_(projective_model())
    layer, floats = packed[0], projective_model()[0]
    bases = layer._modules["bases"]
    read, whole = [], []
    rows, forward = PackedTensor.rows, PackedTensor.forward

    def counted_rows(self, index):
        if self is not bases:
            read.append(index.numel())
        return rows(self, index)

    def counted_forward(self):
        whole.append(self)
        return forward(self)

    monkeypatch.setattr(PackedTensor, "rows", counted_rows)
    monkeypatch.setattr(PackedTensor, "forward", counted_forward)
    for ids, dequantized in ((SHORT, []), (LONG, [bases])):
        with torch.no_grad():
            assert torch.equal(layer(ids), floats(ids))
        # at most a row per token, of the tables; the bases whole in the
        # grouped form only (the short one reads its clusters' rows)
        assert sum(read) <= ids.numel() and whole == dequantized
        read.clear()
        whole.clear()


def test_unpack_gives_the_float_layers_back():
    floats = projective_model()
    model = unpack_quantized_(pack_quantized_(projective_model()))
    assert not any(isinstance(m, PackedTensor) for m in model.modules())
    assert not any(is_packed(m) for m in model.modules())
    assert [type(m) for m in model.modules()] == [type(m) for m in floats.modules()]
    for (name, p), (_, q) in zip(
        floats.named_parameters(), model.named_parameters(), strict=True
    ):
        assert torch.equal(p, q) and isinstance(q, nn.Parameter), name
    with torch.no_grad():
        assert torch.equal(model(LONG), floats(LONG))
    assert quantized_tensors(model).keys() == quantized_tensors(floats).keys()
    # trains through the rounding again
    register_straight_through_(model)
    model(SHORT).sum().backward()
    requantize_(model)


def test_a_packed_model_does_not_train_and_says_how_to():
    model = pack_quantized_(dense_model())
    with pytest.raises(ValueError, match=r"unpack=True.*unpack_quantized_"):
        register_straight_through_(model)
    requantize_(model)  # nothing to round: the codes are the grid's
    assert is_packed(model[1])
    assert not list(model[1].parameters())[1:]  # the bias alone


def test_a_tied_table_stays_tied_and_is_held_once():
    torch.manual_seed(0)
    embedding, head = nn.Embedding(64, 32), nn.Linear(32, 64, bias=False)
    head.weight = embedding.weight
    model = nn.ModuleDict({"embedding": embedding, "head": head})
    quantize_module_(embedding, bits=4, group_size=16, method="rtn")
    ids = torch.randint(0, 64, (2, 5))
    with torch.no_grad():
        expected = head(embedding(ids))
    pack_quantized_(model)
    assert model["head"]._modules["weight"] is model["embedding"]._modules["weight"]
    with torch.no_grad():
        assert torch.equal(model["head"](model["embedding"](ids)), expected)
    assert list(quantized_tensors(model)) == ["embedding.weight"]
    unpack_quantized_(model)
    assert model["head"].weight is model["embedding"].weight


def test_a_tied_projective_head_reads_the_packed_factors():
    model = projective_model()
    head = ProjectiveTiedHead(model[0])
    h = torch.randn(3, 32)
    with torch.no_grad():
        expected = head(h)
    pack_quantized_(model)
    with torch.no_grad():
        assert torch.equal(head(h), expected)


def test_packed_layers_keep_their_class_copies_and_device_moves():
    model = pack_quantized_(projective_model())
    dense = pack_quantized_(dense_model())
    assert isinstance(dense[1], nn.Linear) and is_linear(dense[1])
    assert type(dense[1]).__name__ == "Linear" and type(model[1]).__name__ == (
        "ProjectiveLinear"
    )
    # the weight's description costs no dequantization
    assert model[1].weight.dtype == torch.float32 and model[1].weight.shape == (48, 32)
    copied = copy.deepcopy(model)
    pickled = pickle.loads(pickle.dumps(model))
    for other in (copied, pickled):
        assert [type(m) for m in other.modules()] == [type(m) for m in model.modules()]
        with torch.no_grad():
            assert torch.equal(other(SHORT), model(SHORT))
        assert quantized_tensors(other).keys() == quantized_tensors(model).keys()
        assert other[0]._modules["bases"] is not model[0]._modules["bases"]
    # moved, never cast: float16 outputs from the same stored scales
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.half()
    for key, value in model.state_dict().items():
        if key.endswith((".codes", ".scales", ".zeros", ".meta")):
            assert value.dtype == before[key].dtype and torch.equal(value, before[key])
    assert model[0]._modules["bases"]().dtype == torch.float16
    floats = projective_model().half()
    with torch.no_grad():
        assert torch.equal(model[0](SHORT), floats[0](SHORT))


def test_a_packed_tensor_keeps_its_form():
    model = pack_quantized_(dense_model())
    state = model.state_dict()
    state["1.weight.meta"] = state["1.weight.meta"].clone()
    state["1.weight.meta"][1] = 8  # another group size
    with pytest.raises(RuntimeError, match="keeps its form"):
        model.load_state_dict(state)
    assert model[1]._modules["weight"].meta.tolist() == [4, 16, 1, 64, 32]
