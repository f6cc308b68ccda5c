"""A folder whose scales are compact: stored as codes and exponents, loaded
packed or as floats to the same outputs, saved again byte for byte, exported.

A tiny BERT whose word embedding and two Linears (both sides) are
projective and whose every matrix is quantized with ``compact_scales=True``
(no search: the layers are built and quantized here).
"""

import os

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

torch = pytest.importorskip("torch", reason="kflats.torch needs torch")
pytest.importorskip("safetensors")
transformers = pytest.importorskip("transformers")

from torch import nn  # noqa: E402

from kflats.quantize import quantize_module_  # noqa: E402
from kflats.torch import load_compressed, save_compressed  # noqa: E402
from kflats.torch.layers import (  # noqa: E402
    PackedTensor,
    ProjectiveEmbedding,
    ProjectiveLinear,
    quantized_state,
    quantized_tensors,
    state_nbytes,
)

from .._helpers import tiny_bert  # noqa: E402

VOCAB = 512
IDS = torch.randint(5, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    model = tiny_bert(
        transformers,
        vocab_size=VOCAB,
        hidden_size=64,
        num_hidden_layers=1,
        intermediate_size=128,
        max_position_embeddings=32,
    )
    emb = model.embeddings
    emb.word_embeddings = ProjectiveEmbedding.from_embedding(
        emb.word_embeddings, k=2, j=16, random_state=0
    )
    layer = model.encoder.layer[0]
    for owner, side in ((layer.intermediate, "output"), (layer.output, "input")):
        owner.dense = ProjectiveLinear.from_linear(
            owner.dense, k=2, j=16, side=side, random_state=0
        )
    for name, m in model.named_modules():
        kinds = (nn.Linear, nn.Embedding, ProjectiveEmbedding, ProjectiveLinear)
        if isinstance(m, kinds) and "position" not in name and "token_type" not in name:
            quantize_module_(m, 3, 16, method="rtn", compact_scales=True)
    path = tmp_path_factory.mktemp("compact") / "bert"
    save_compressed(model, path)
    return path, model


def _stored(path):
    from safetensors import safe_open

    keys = {}
    for file in path.glob("*.safetensors"):
        with safe_open(str(file), "np") as f:
            keys.update({k: f.get_slice(k).get_dtype() for k in f.keys()})
    return keys


def hidden(model):
    with torch.no_grad():
        return model(input_ids=IDS).last_hidden_state


def test_the_folder_stores_codes_and_exponents(folder):
    path, model = folder
    stored = _stored(path)
    for key, qt in quantized_tensors(model).items():
        compact = qt.scale_layout is not None
        assert (f"{key}.scale_codes" in stored) == compact, key
        assert (f"{key}.scales" in stored) != compact, key
        if compact:
            assert stored[f"{key}.scale_exponents"] == "I8"
    # the output side's stacked bases keep float16 scales, the rest is compact
    layouts = {k: qt.scale_layout for k, qt in quantized_tensors(model).items()}
    assert layouts["encoder.layer.0.intermediate.dense.bases"] is None
    assert sum(v is not None for v in layouts.values()) == len(layouts) - 1


def test_a_compact_folder_loads_to_the_same_outputs(folder):
    path, model = folder
    packed, floats = load_compressed(path), load_compressed(path, unpack=True)
    assert any(isinstance(m, PackedTensor) for m in packed.modules())
    expected = hidden(model)
    assert torch.equal(hidden(packed), expected)
    assert torch.equal(hidden(floats), expected)
    layouts = {k: qt.scale_layout for k, qt in quantized_tensors(model).items()}
    for loaded in (packed, floats):
        got = {k: qt.scale_layout for k, qt in quantized_tensors(loaded).items()}
        assert got == layouts


def test_a_model_held_packed_has_the_quantized_state_of_its_folder(folder):
    """``quantized_state`` of a model held packed (compact scales held as
    float16 buffers) gives the entries the folder stores, as the model it
    came from does: what ``kflats compress`` counts the baseline's bytes by."""
    from safetensors.torch import load_file

    path, model = folder
    stored = {}
    for file in path.glob("*.safetensors"):
        stored.update(load_file(str(file)))
    for source in (model, load_compressed(path)):
        state = quantized_state(source)
        packed = {k for k in state if k.rsplit(".", 1)[0] in quantized_tensors(model)}
        assert packed <= set(stored)
        for key in packed:
            assert torch.equal(state[key], stored[key]), key
    assert state_nbytes(quantized_state(load_compressed(path))) == state_nbytes(
        quantized_state(model)
    )


@pytest.mark.parametrize("unpack", [False, True])
def test_a_loaded_compact_folder_saves_the_same_folder(folder, tmp_path, unpack):
    """Held packed, the scales are float16 buffers: the save writes them as
    codes and exponents again, the same bytes."""
    path, _ = folder
    again = tmp_path / "again"
    save_compressed(load_compressed(path, unpack=unpack), again)
    assert sorted(p.name for p in again.iterdir()) == sorted(
        p.name for p in path.iterdir()
    )
    for file in path.iterdir():
        assert (again / file.name).read_bytes() == file.read_bytes(), file.name


@pytest.mark.parametrize(
    "change, message",
    [
        ({"scale_exponents": lambda e, c: np.full_like(e, 40)}, "-24..8"),
        (  # half the codes under twice the step: the same scales, written
            # with an exponent that is not the least
            {
                "scale_codes": lambda e, c: c // 2,
                "scale_exponents": lambda e, c: e + np.int8(1),
            },
            "least",
        ),
    ],
)
def test_a_corrupt_compact_scale_is_refused(folder, tmp_path, change, message):
    import shutil

    from safetensors.numpy import load_file, save_file

    path, _ = folder
    broken = tmp_path / "broken"
    shutil.copytree(path, broken)
    file = next(broken.glob("*.safetensors"))
    state = load_file(str(file))
    key = "encoder.layer.0.attention.self.query.weight."
    e, c = state[key + "scale_exponents"], state[key + "scale_codes"]
    for part, new in change.items():
        state[key + part] = new(e, c)
    save_file(state, str(file), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=f"corrupt packed tensor.*{message}"):
        load_compressed(broken)


def test_a_compact_folder_exports_to_onnx(folder, tmp_path):
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from kflats.torch.export import export_onnx

    path, model = folder
    out = export_onnx(path, tmp_path / "onnx")
    session = ort.InferenceSession(str(out.model_path))
    feed = {"input_ids": IDS.numpy().astype(np.int64)}
    feed["attention_mask"] = np.ones_like(feed["input_ids"])
    feed["token_type_ids"] = np.zeros_like(feed["input_ids"])
    got = session.run(None, {k: v for k, v in feed.items() if k in out.inputs})[0]
    np.testing.assert_allclose(got, hidden(model).numpy(), atol=1e-5)
