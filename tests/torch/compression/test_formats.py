"""CompressionConfig.format: the forms a file format holds, and its bytes.

With ``format="onnx"`` the search keeps the forms that kflats' ONNX export
writes in its operators' own forms, each priced at (at least) its bytes in
the ONNX file, and the size asked bounds that file.
"""

import copy

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch", reason="kflats.torch needs torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from sklearn.utils._param_validation import InvalidParameterError  # noqa: E402
from torch import nn  # noqa: E402

from kflats.quantize import factors_nbytes, quantize_module_  # noqa: E402
from kflats.torch import (  # noqa: E402
    CompressionConfig,
    ProjectiveEmbedding,
    ProjectiveLinear,
    compress,
)
from kflats.torch.compression._file_formats import (  # noqa: E402
    FORMATS,
    _onnx_holds,
)
from kflats.torch.compression._forms import _Form, _forms  # noqa: E402
from kflats.torch.compression._onnx_bytes import OnnxBudget  # noqa: E402
from kflats.torch.export._frame import module_graph_nbytes  # noqa: E402
from kflats.torch.export._graph import Pieces  # noqa: E402
from kflats.torch.export._layers import build_module  # noqa: E402
from kflats.torch.layers import quantized_tensors  # noqa: E402
from kflats.torch.models import select_modules  # noqa: E402

BITS = (8, 6, 4, 3, 2)


def tiny_bert(vocab=512, hidden=32):
    """A 1-layer random BERT (transformers), eval mode."""
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=vocab, hidden_size=hidden, num_hidden_layers=1,
        num_attention_heads=2, intermediate_size=2 * hidden,
        max_position_embeddings=64,
    )  # fmt: skip
    return transformers.BertModel(config).eval()


@pytest.fixture(scope="module")
def bert_budget():
    model = tiny_bert()
    names, named = select_modules(model, [nn.Embedding, nn.Linear])
    names = [n for n in names if "pooler" not in n]
    return model, names, named, OnnxBudget(model, names, 0.5)


# -- the config ----------------------------------------------------------------


def test_format_is_a_field_checked_and_written():
    config = CompressionConfig(0.3, unit="bytes", format="onnx")
    assert config.format == "onnx"
    assert CompressionConfig(0.3).format == "kflats"
    assert CompressionConfig.from_dict(config.to_dict()) == config
    data = config.to_dict()
    del data["format"]  # a config written before the field: kflats' own folder
    assert CompressionConfig.from_dict(data).format == "kflats"
    with pytest.raises(InvalidParameterError, match="'format' parameter"):
        CompressionConfig(0.3, unit="bytes", format="tflite")


@pytest.mark.parametrize("fmt", ["onnx", "gguf"])
def test_a_file_format_takes_a_budget_in_bytes(fmt):
    with pytest.raises(InvalidParameterError, match=f"format='{fmt}' takes unit"):
        CompressionConfig(0.3, format=fmt)
    with pytest.raises(InvalidParameterError, match="unit='bytes'"):
        compress(nn.Linear(8, 8), 0.5, nn.Linear, format=fmt)


def test_onnx_refuses_groups_no_block_holds(bert_budget):
    model, names, *_ = bert_budget
    for group in (8, 24):  # 8 divides every row, but no block is 8
        with pytest.raises(ValueError, match=f"group_size={group}: format='onnx'"):
            compress(copy.deepcopy(model), 0.5, names, unit="bytes",
                     group_size=group, format="onnx")  # fmt: skip


def test_onnx_needs_a_text_encoder():
    model = nn.Sequential(nn.Embedding(64, 32), nn.Linear(32, 32))
    with pytest.raises(ValueError, match="neither a transformers nor a sentence"):
        compress(model, 0.5, nn.Linear, unit="bytes", format="onnx")


def test_every_format_has_one_rule():
    assert set(FORMATS) == {"kflats", "onnx", "gguf"}
    linear = nn.Linear(64, 32)
    assert _forms(linear, BITS, None) == _forms(linear, BITS, None,
                                               FORMATS["kflats"].holds)  # fmt: skip


# -- the forms ONNX holds ------------------------------------------------------


def _layer(module, form):
    """``module`` in ``form`` (a real layer, random factors), and its tensors."""
    if form.kind == "float":
        return module, {}
    if form.kind == "dense":
        layer = copy.deepcopy(module)
        quantize_module_(layer, form.bits, form.group_size, method="rtn",
                         zero_dtype=form.zero_dtype)  # fmt: skip
        return layer, quantized_tensors(layer)
    if isinstance(module, nn.Linear):
        layer = ProjectiveLinear(
            module.in_features, module.out_features, (form.rank,), side="output",
            bias=module.bias is not None,
        )  # fmt: skip
    else:
        layer = ProjectiveEmbedding(*module.weight.shape, (form.rank,))
    if form.bits is not None:
        quantize_module_(layer, form.bits, form.group_size, method="rtn")
    return layer, quantized_tensors(layer)


def _onnx_forms(module, form, name="m"):
    """The TensorForms the export gives ``module`` in ``form``."""
    layer, tensors = _layer(module, form)
    pieces = Pieces()
    build_module(pieces, "x", name, layer, tensors, {name: (layer, tensors)})
    return pieces.forms


@settings(max_examples=40, deadline=None)
@given(
    st.sampled_from(["linear", "embedding"]),
    st.sampled_from([32, 48, 64, 96]),
    st.sampled_from([16, 48, 64, 200]),
    st.data(),
)
def test_each_form_onnx_keeps_is_in_its_operators_own_form(kind, d, n, data):
    torch.manual_seed(0)
    module = nn.Linear(d, n) if kind == "linear" else nn.Embedding(n, d)
    kept = _forms(module, BITS, None, _onnx_holds)
    everything = _forms(module, BITS, None)
    assert set(kept) <= set(everything) and kept[0].kind == "float"
    dropped = [f for f in everything if f not in kept]
    assert all(f.bits != 4 or f.zero_dtype != "uint8" or f.kind == "projective"
               for f in dropped)  # fmt: skip
    form = data.draw(st.sampled_from(kept))
    tensor_forms = _onnx_forms(module, form)
    assert [f for f in tensor_forms if not _own_or_session_bases(f)] == []
    assert {f.op for f in tensor_forms} <= {"MatMulNBits", "GatherBlockQuantized",
                                            "MatMul"}  # fmt: skip
    # what it drops: a quantized form that would fall back
    for f in dropped:
        assert [t for t in _onnx_forms(module, f) if not _own_or_session_bases(t)]


def _own_or_session_bases(tensor_form):
    """In its operator's own form, or an embedding factors' bases, packed in the
    file and dequantized when the session starts."""
    if tensor_form.fallback is None:
        return True
    return (
        tensor_form.name.endswith(".bases")
        and tensor_form.op == "MatMul"
        and tensor_form.onnx_bits == tensor_form.bits == 4
        and tensor_form.fallback.startswith("groups along the product's output")
    )


# -- the bytes ------------------------------------------------------------------


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_a_forms_price_is_at_least_its_graphs_bytes(bert_budget, data):
    model, names, named, budget = bert_budget
    name = data.draw(st.sampled_from(names))
    form = data.draw(st.sampled_from(_forms(named[name], BITS, None, _onnx_holds)))
    layer, tensors = _layer(named[name], form)
    key = name
    use = budget._frame.slots[key]
    graph = module_graph_nbytes(key, layer, tensors, use.input)
    assert graph.nbytes <= budget.nbytes(name, form)
    # within a few hundred bytes (names, the rank's digits), not a guess
    assert budget.nbytes(name, form) - graph.nbytes <= 64 + 16 * graph.parts


@pytest.fixture(scope="module")
def wide_budget():
    model = tiny_bert(vocab=256, hidden=128)
    names, named = select_modules(model, nn.Embedding)
    return named, OnnxBudget(model, names, 0.5)


@settings(max_examples=15, deadline=None)
@given(st.integers(2, 8), st.data())
def test_clustered_factors_are_priced_above_their_graph(wide_budget, k, data):
    named, budget = wide_budget
    name = "embeddings.word_embeddings"
    n, d = named[name].weight.shape
    labels = np.arange(n) % k
    ranks = data.draw(st.lists(st.integers(d // 2, d), min_size=k, max_size=k))
    sizes = np.bincount(labels, minlength=k).tolist()
    level = data.draw(st.integers(1, d))  # a level's ranks need not be below it
    form = _Form("projective", None, None, level,
                 factors_nbytes(sizes, ranks, d), k=k)  # fmt: skip
    layer = ProjectiveEmbedding(n, d, tuple(ranks), torch.from_numpy(labels))
    graph = module_graph_nbytes(name, layer, {}, budget._frame.slots[name].input)
    assert graph.nbytes <= budget.nbytes(name, form)


def test_the_frame_leaves_the_model_as_it_was():
    model = tiny_bert()
    before = dict(model.named_modules())
    attention = model.config._attn_implementation
    ids = torch.randint(0, 512, (2, 7))
    with torch.no_grad():
        expected = model(input_ids=ids).last_hidden_state
    names, _ = select_modules(model, nn.Linear)
    OnnxBudget(model, names, 0.5)
    assert dict(model.named_modules()) == before
    assert model.config._attn_implementation == attention
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).last_hidden_state, expected)


# -- compress, saved, exported: the file within the size -------------------------


@pytest.fixture(scope="module")
def encoder_folder(tmp_path_factory):
    from ..export._folders import tiny_sentence_transformer

    root = tmp_path_factory.mktemp("st")
    tiny_sentence_transformer("bert", root / "original")
    return root


@pytest.mark.parametrize("fraction", [0.08, 0.15, 0.3])
def test_the_onnx_file_is_within_the_size_and_every_matrix_in_its_own_form(
    encoder_folder, fraction, tmp_path
):
    from kflats.datasets import load_sentences
    from kflats.torch import save_compressed
    from kflats.torch.export import export_onnx

    from ..export._folders import tiny_sentence_transformer

    model = tiny_sentence_transformer("bert", encoder_folder / "original")
    report = compress(
        model, fraction, ["*word_embeddings", nn.Linear], unit="bytes",
        format="onnx", calibration=load_sentences("calibration")[:16],
        random_state=0,
    )  # fmt: skip
    assert report.config.format == "onnx"
    save_compressed(model, tmp_path / "folder")
    result = export_onnx(tmp_path / "folder", tmp_path / "onnx")
    assert result.onnx_bytes <= report.size_asked
    assert result.onnx_bytes <= report.folder_bytes  # the planned bound
    # every matrix in its operator's own form, but an embedding factors' bases
    assert all(
        f.name == "embeddings.word_embeddings.bases" and _own_or_session_bases(f)
        for f in result.fallbacks
    )
    if fraction >= 0.3:  # room for the 4-bit table: codes the file holds
        assert [m for m in report if m.bits is not None]


def test_a_size_below_the_smallest_onnx_file_names_it(encoder_folder):
    from ..export._folders import tiny_sentence_transformer

    model = tiny_sentence_transformer("bert", encoder_folder / "original")
    with pytest.raises(ValueError, match="for the ONNX model file, and the smallest"):
        compress(model, 0.01, nn.Linear, unit="bytes", format="onnx")


@pytest.mark.parametrize("kind", ["linear", "embedding"])
def test_float_zero_points_are_not_held_and_export_their_values(kind):
    import onnxruntime as ort
    from onnx import TensorProto, helper

    torch.manual_seed(0)
    module = nn.Linear(64, 16) if kind == "linear" else nn.Embedding(16, 64)
    float_zeros = [f for f in _forms(module, BITS, None) if f.zero_dtype == "float16"]
    assert float_zeros  # the forms exist (GGUF's Q4_1 grid) ...
    held = _forms(module, BITS, None, _onnx_holds)
    assert not [f for f in held if f.zero_dtype != "uint8"]  # ... ONNX holds none
    quantize_module_(module, 4, 32, method="rtn", zero_dtype="float16")
    tensors = quantized_tensors(module)
    pieces = Pieces()
    out = build_module(pieces, "x", "m", module, tensors, {"m": (module, tensors)})
    assert "float16 zero points" in pieces.forms[0].fallback
    x_type = (TensorProto.FLOAT, [None, 64]) if kind == "linear" else (
        TensorProto.INT64, [None])  # fmt: skip
    graph = helper.make_graph(
        pieces.nodes, "g", [helper.make_tensor_value_info("x", *x_type)],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)],
        initializer=pieces.initializers,
    )  # fmt: skip
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    session = ort.InferenceSession(model.SerializeToString(),
                                   providers=["CPUExecutionProvider"])  # fmt: skip
    x = torch.randn(5, 64) if kind == "linear" else torch.arange(16)
    (got,) = session.run(None, {"x": x.numpy()})
    with torch.no_grad():
        expected = module(x).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
