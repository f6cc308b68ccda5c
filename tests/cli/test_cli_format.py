"""``kflats compress --format onnx``: the ONNX folder, within the size asked."""

import json

import pytest

from .conftest import run_compress

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


def test_format_onnx_writes_the_onnx_folder_within_the_size(bert_dir, tmp_path, capsys):
    import numpy as np

    out = tmp_path / "o"
    code, stdout, stderr = run_compress(
        capsys, bert_dir, "--out", out, "--format", "onnx", "--size", "1.2MB",
        "--quiet",
    )  # fmt: skip
    assert code == 0, stderr
    model_file = out / "onnx" / "model.onnx"
    size = model_file.stat().st_size
    assert size <= 1_200_000
    for name in ("kflats-export.json", "report.json", "report.md", "config.json"):
        assert (out / name).is_file(), name
    assert not (out / "kflats.json").exists()  # the compressed folder: not kept
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
    assert not list(out.rglob("*.safetensors"))
    data = json.loads((out / "report.json").read_text())
    totals = data["totals"]
    assert totals["format"] == "onnx" and data["settings"]["format"] == "onnx"
    assert totals["folder_bytes"] == size and totals["size_asked"] == 1_200_000
    assert data["onnx"]["file"] == "onnx/model.onnx"
    # every matrix in its operator's own form, but an embedding factors' bases
    for form in data["onnx"]["fallbacks"]:
        assert form["name"] == "embeddings.word_embeddings.bases"
        assert "dequantized when the session starts" in form["fallback"]
    assert data["onnx"]["folder_bytes"] > 0  # the compressed folder it came from
    assert data["compression"]["config"]["format"] == "onnx"
    assert "the ONNX model file; size asked 1.2MB" in stdout
    assert "the ONNX model file" in (out / "report.md").read_text()
    session = ort.InferenceSession(str(model_file), providers=["CPUExecutionProvider"])
    feeds = {i.name: np.ones((1, 5), np.int64) for i in session.get_inputs()}
    (hidden,) = session.run(None, feeds)
    assert hidden.shape == (1, 5, 32) and np.isfinite(hidden).all()


@pytest.mark.parametrize(
    "extra, message",
    [
        (
            ("--unit", "numbers"),
            "--format onnx chooses each module's form under a size",
        ),
        (("--heal-steps", "5"), "--format onnx with --heal-steps"),
    ],
)
def test_format_onnx_takes_a_size_in_bytes(bert_dir, tmp_path, capsys, extra, message):
    code, stdout, stderr = run_compress(
        capsys, bert_dir, "--out", tmp_path / "o", "--format", "onnx", *extra,
        "--quiet",
    )  # fmt: skip
    assert code == 2 and stdout == ""
    assert stderr.count("\n") == 1 and message in stderr
    assert not (tmp_path / "o").exists()


def test_format_onnx_replaces_only_an_onnx_folder(bert_dir, tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "kflats.json").write_text("{}")  # a folder of --format kflats
    code, stdout, stderr = run_compress(
        capsys, bert_dir, "--out", out, "--format", "onnx", "--overwrite", "--quiet"
    )
    assert code == 2 and stdout == ""
    assert stderr.count("\n") == 1 and "holds no kflats-export.json" in stderr
    assert sorted(p.name for p in out.iterdir()) == ["kflats.json"]


def test_a_format_is_a_choice(bert_dir, tmp_path, capsys):
    code, stdout, stderr = run_compress(
        capsys, bert_dir, "--out", tmp_path / "o", "--format", "tflite"
    )
    assert code == 2 and "invalid choice: 'tflite'" in stderr
    assert not (tmp_path / "o").exists()
