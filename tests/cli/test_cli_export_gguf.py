"""``kflats export FOLDER --gguf OUT``: one GGUF file written whole, and a user's
mistake as one line, exit status 2, nothing written."""

import json
import os
import re
import shutil

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

from kflats.__main__ import main  # noqa: E402

from ..torch._gguf_models import write_tiny_gguf  # noqa: E402
from .test_cli import one_line  # noqa: E402


def _run(capsys, *argv):
    code = main(["export", *map(str, argv)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _save(model, tokenizer, folder):
    from kflats.torch import save_compressed

    save_compressed(model, folder, tokenizer=tokenizer)
    return folder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny Llama GGUF file, and two folders compressed from it: one whose
    matrices are all 4-bit (Q4_1), one with 3-bit matrices (no GGUF type)."""
    import warnings

    from kflats.quantize import quantize_module_
    from kflats.torch.io import load_pretrained

    root = tmp_path_factory.mktemp("gguf-cli")
    source = root / "tiny.gguf"
    write_tiny_gguf(source)
    folders = {}
    for bits in (4, 3):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model, tokenizer = load_pretrained(source)
        for i in range(2):
            for name in ("self_attn.q_proj", "mlp.down_proj"):
                module = model.get_submodule(f"model.layers.{i}.{name}")
                quantize_module_(module, bits, 32, method="rtn")
        folders[bits] = _save(model, tokenizer, root / f"compressed-{bits}")
    return source, folders


def _listing(path):
    return sorted(p.name for p in path.iterdir())


def test_export_writes_the_gguf_file(tiny, tmp_path, capsys):
    source, folders = tiny
    out = tmp_path / "model.gguf"
    code, stdout, stderr = _run(capsys, folders[4], "--gguf", out, "--source", source)
    assert code == 0, stderr
    lines = stdout.splitlines()
    assert lines[0].startswith(f"gguf: {out} (") and "4 Q4_1" in lines[0]
    assert lines[1] == f"tokenizer and metadata from {source}"
    assert lines[-1].startswith("size: ") and "the folder's weight files" in lines[-1]
    assert _listing(tmp_path) == ["model.gguf"]  # nothing hidden left beside it
    reader = gguf.GGUFReader(out)
    assert sum(t.tensor_type.name == "Q4_1" for t in reader.tensors) == 4
    # --overwrite replaces a file kflats wrote
    code, _, stderr = _run(
        capsys, folders[4], "--gguf", out, "--source", source, "--overwrite"
    )
    assert code == 0, stderr
    assert _listing(tmp_path) == ["model.gguf"]


def test_the_source_recorded_in_the_report_is_taken(tiny, tmp_path, capsys):
    source, folders = tiny
    folder = tmp_path / "compressed"
    shutil.copytree(folders[4], folder)
    report = {"model": {"source": str(source.parent), "gguf_file": source.name}}
    (folder / "report.json").write_text(json.dumps(report))
    code, stdout, stderr = _run(capsys, folder, "--gguf", tmp_path / "m.gguf")
    assert code == 0, stderr
    assert f"tokenizer and metadata from {source}" in stdout


def _other_gguf(tmp_path):
    other = tmp_path / "other.gguf"
    write_tiny_gguf(other, tied=False)
    return other


@pytest.mark.parametrize(
    "case, match",
    [
        ("no_source", r"records no GGUF file it was compressed from: pass it as "
         r"source= \(kflats export --source\)"),
        ("source_missing", "--source '.*nothing.gguf' is not a file"),
        ("other_source", "is not the model of .*: it holds tensors the model "
         "lacks: output.weight"),
        ("three_bits", r"4 quantized matrices are in forms no GGUF type holds "
         r"exactly: model.layers.0.mlp.down_proj.weight \(3-bit codes"),
        ("source_with_onnx", "--source goes with --gguf"),
        ("exists", "--gguf '.*taken.gguf' exists; pass --overwrite"),
        ("not_ours", "is not a GGUF file kflats wrote"),
        ("a_folder", "--gguf '.*' is a folder"),
        ("no_parent", "--gguf '.*': no folder"),
        ("not_compressed", "holds no kflats.json"),
    ],
)  # fmt: skip
def test_mistakes_are_one_line_and_write_nothing(case, match, tiny, tmp_path, capsys):
    source, folders = tiny
    folder, out = folders[4], tmp_path / "out.gguf"
    extra = ["--source", source]
    if case == "no_source":
        extra = []
    elif case == "source_missing":
        extra = ["--source", tmp_path / "nothing.gguf"]
    elif case == "other_source":
        extra = ["--source", _other_gguf(tmp_path)]
    elif case == "three_bits":
        folder = folders[3]
    elif case == "source_with_onnx":
        extra += ["--onnx", tmp_path / "onnx"]
    elif case in ("exists", "not_ours"):
        out = tmp_path / "taken.gguf"
        out.write_bytes(b"not a model")
        if case == "not_ours":
            extra.append("--overwrite")
    elif case == "a_folder":
        out = tmp_path / "dir"
        out.mkdir()
    elif case == "no_parent":
        out = tmp_path / "missing" / "out.gguf"
    elif case == "not_compressed":
        folder = tmp_path / "empty"
        folder.mkdir()
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    if case == "source_with_onnx":
        code, _, stderr = _run(capsys, folder, *extra)
    else:
        code, _, stderr = _run(capsys, folder, "--gguf", out, *extra)
    assert code == 2
    err = one_line(stderr)
    assert err.startswith("kflats: ")
    assert re.search(match, err), err
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")} == before
    if out.exists() and out.is_file():
        assert out.read_bytes() == b"not a model"
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())
    assert os.listdir(folder) == os.listdir(folders[4]) or case in (
        "three_bits",
        "not_compressed",
    )


def test_compress_format_gguf_writes_model_gguf(tiny, tmp_path, capsys):
    # kflats compress MODEL.gguf --format gguf: the folder, and model.gguf in
    # it, its metadata from MODEL.gguf (the path kflats compress read)
    source, _ = tiny
    calibration = tmp_path / "calibration.txt"
    calibration.write_text("\n".join(["the cat sat on the mat"] * 8) + "\n")
    out = tmp_path / "out"
    code = main(
        ["compress", str(source), "--format", "gguf", "--size", "150kB",
         "--calibration", str(calibration), "--out", str(out), "--quiet"]
    )  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0, captured.err
    reader = gguf.GGUFReader(out / "model.gguf")
    assert reader.fields["kflats.source"].contents() == source.name
    types = {t.tensor_type.name for t in reader.tensors}
    assert types <= {"F32", "Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0"} and types - {"F32"}
    # the size asked is the GGUF file's, and the report counts that file
    size = (out / "model.gguf").stat().st_size
    assert size <= 150_000
    data = json.loads((out / "report.json").read_text())
    assert data["totals"]["folder_bytes"] == size
    assert data["totals"]["size_asked"] == 150_000
    assert data["gguf"]["folder_bytes"] > 0  # the folder's weight files
    lines = captured.out.splitlines()
    assert "(the GGUF file, model.gguf; size asked 150.0kB)" in captured.out
    written = [line for line in lines if line.startswith("written to ")]
    assert written == [
        f"written to {out}: the model, report.md, report.json"
        + "".join(f", {p}" for p in data["pictures"])
    ]


def test_compress_format_gguf_prices_an_untied_head(tmp_path, capsys):
    # --targets all in bytes takes an untied head too: written as output.weight
    # in a GGUF type, the file within the size
    source = tmp_path / "untied.gguf"
    write_tiny_gguf(source, tied=False)
    out = tmp_path / "out"
    code = main(
        ["compress", str(source), "--format", "gguf", "--budget", "0.3",
         "--curve", "none", "--out", str(out), "--quiet"]
    )  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0, captured.err
    data = json.loads((out / "report.json").read_text())
    head = [m for m in data["compression"]["modules"] if m["name"] == "lm_head"]
    assert head and head[0]["bits"] is not None
    reader = gguf.GGUFReader(out / "model.gguf")
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["output.weight"] in {"Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0"}
    size = (out / "model.gguf").stat().st_size
    assert size == data["totals"]["folder_bytes"] <= data["totals"]["size_asked"]


def _hf_folder(source, folder):
    """The model of a GGUF file as a Hugging Face folder, with its tokenizer."""
    import warnings

    from kflats.torch.io import load_pretrained

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, tokenizer = load_pretrained(source)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.parametrize(
    "case, match",
    [
        ("hf_folder", r"--format gguf writes the GGUF file the model was read from "
         r"again .*MODEL_DIR '.*hf' is a model folder: give a \.gguf file, or "
         r"compress with --format kflats and write the file with kflats export"),
        ("no_writer", r"--format gguf: MODEL_DIR '.*qwen2.gguf' is a "
         r"Qwen2ForCausalLM \(model_type 'qwen2'\), and kflats writes GGUF files "
         r"of the families llama, mistral, qwen3, gpt2; use --format kflats"),
        ("too_small", r"budget=1000 cannot be met in bytes: it allows 1000 bytes "
         r"for the GGUF file, and the smallest size reachable is \d+ bytes"),
    ],
)  # fmt: skip
def test_compress_format_gguf_refuses_before_loading(
    case, match, tiny, tmp_path, capsys, monkeypatch
):
    # one line, exit 2, before the model is loaded (so before calibration)
    import kflats.torch.io
    from kflats.torch.export._gguf_tensors import ARCHITECTURES

    source, _ = tiny
    size = "1000" if case == "too_small" else "150kB"
    if case == "hf_folder":
        source = _hf_folder(source, tmp_path / "hf")
    elif case == "no_writer":  # a family kflats reads and does not write
        source = tmp_path / "qwen2.gguf"
        write_tiny_gguf(source, "qwen2")
        monkeypatch.delitem(ARCHITECTURES, "qwen2")

    def loaded(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(kflats.torch.io, "load_model", loaded)
    capsys.readouterr()  # (what writing the input printed)
    out = tmp_path / "out"
    calibration = tmp_path / "calibration.txt"
    calibration.write_text("the cat sat on the mat\n")
    code = main(
        ["compress", str(source), "--format", "gguf", "--size", size,
         "--calibration", str(calibration), "--out", str(out), "--quiet"]
    )  # fmt: skip
    captured = capsys.readouterr()
    assert code == 2, captured.err
    err = one_line(captured.err)
    assert err.startswith("kflats: ")
    assert re.search(match, err), err
    assert not out.exists()
