"""``kflats compress`` with a budget in bytes: the curve against bytes, and heal."""

import json

import pytest

from .conftest import save_tiny_bert

pytest.importorskip("torch")
pytest.importorskip("transformers")

from kflats.__main__ import main  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n"


def _run(capsys, *argv):
    code = main(["compress", *map(str, argv)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    return save_tiny_bert(tmp_path_factory.mktemp("bert") / "m")


def test_curve_against_bytes_with_a_healed_model(bert_dir, tmp_path, capsys):
    import torch

    from kflats.quantize import form_nbytes, quantized_tensors
    from kflats.torch import load_compressed

    out = tmp_path / "out"
    # the word embedding, 30522 x 32 float32 (3.9 MB), to 0.4 MB; the curve at
    # a fraction of its float32 bytes and at a size
    code, _, stderr = _run(
        capsys, bert_dir, "--out", out, "--size", "0.4MB", "--targets", "embedding",
        "--curve", "0.05,0.25MB", "--heal-steps", "3", "--quiet",
    )  # fmt: skip
    assert code == 0, stderr
    report = json.loads((out / "report.json").read_text())
    total = report["compression"]["bytes_before"]
    assert [p["budget"] for p in report["curve"]] == [0.05, 250_000, 400_000]
    # the baseline, uniform quantization: the widest that fits, or the
    # smallest (2 bits) where none fits
    smallest = form_nbytes(torch.nn.Embedding(30522, 32), 2, 32)
    assert report["baseline"].startswith("uniform quantization")
    for p in report["curve"]:
        limit = p["budget"] if p["budget"] > 1 else p["budget"] * total
        assert set(p["bytes"]) == {"kflats", "svd"}
        assert 0 < p["bytes"]["kflats"] <= limit
        assert p["bytes"]["svd"] <= limit or p["bytes"]["svd"] == smallest
        assert {"kflats", "svd"} <= set(p) and 0 < p["kflats"]["mean_cosine"] <= 1
    sizes = [p["bytes"]["kflats"] for p in report["curve"]]
    assert sizes == sorted(sizes)
    # the point at the budget: the model as compressed (before its heal)
    main_point = report["curve"][-1]
    assert main_point["bytes"]["kflats"] == report["compression"]["bytes_after"]
    assert main_point["kflats"] == report["fidelity"]["kflats_before_heal"]
    md = (out / "report.md").read_text()
    assert "Fidelity against bytes" in md and "| 0.25 MB |" in md
    assert (out / "fidelity_vs_budget.png").read_bytes()[:8] == PNG
    # the healed model kept its packed form: the bytes the report counted
    loaded = load_compressed(out)
    (module,) = report["compression"]["modules"]
    tensors = quantized_tensors(loaded)
    assert tensors and all(qt.bits == module["bits"] for qt in tensors.values())
    assert report["evaluation"]["reloaded_outputs_identical"]
    # the whole model's bytes are those of the folder's weights file (its
    # JSON header aside), the packed codes counted, not their float values
    on_disk = (out / "model.safetensors").stat().st_size
    totals = report["totals"]
    assert totals["bytes_after"] <= on_disk < totals["bytes_after"] + 64_000
    assert totals["bytes_after"] < 0.25 * totals["bytes_before"]


def test_a_size_on_the_curve_needs_a_budget_in_bytes(bert_dir, tmp_path, capsys):
    code, stdout, stderr = _run(
        capsys, bert_dir, "--out", tmp_path / "o", "--budget", "0.5",
        "--curve", "0.4,6MB", "--quiet",
    )  # fmt: skip
    assert code == 2 and stdout == ""
    assert stderr.count("\n") == 1 and "--curve: 6000000 is a size in bytes" in stderr
    assert not (tmp_path / "o").exists()


def test_curve_that_is_neither_a_fraction_nor_a_size(tmp_path, capsys):
    code, _, stderr = _run(capsys, "--out", tmp_path / "o", "--curve", "0.3,big")
    assert code == 2
    assert "expected fractions in (0, 1) or sizes such as 6MB, got 'big'" in stderr


def test_tied_causal_lm_in_bytes_saves_its_table_once(tmp_path, capsys):
    from .conftest import save_tiny_causal_lm

    folder = save_tiny_causal_lm(tmp_path / "m", "llama")
    out = tmp_path / "out"
    # a budget that quantizes the tied table dense: saved packed, once, and
    # the head follows it on load
    code, _, stderr = _run(
        capsys, folder, "--out", out, "--budget", "0.3", "--unit", "bytes",
        "--targets", "all", "--curve", "none", "--quiet",
    )  # fmt: skip
    assert code == 0, stderr
    report = json.loads((out / "report.json").read_text())
    assert report["evaluation"]["reloaded_outputs_identical"]
    table = report["compression"]["modules"][0]
    assert table["name"] == "model.embed_tokens" and table["bits"] is not None
    totals = report["totals"]
    on_disk = (out / "model.safetensors").stat().st_size
    assert totals["bytes_after"] <= on_disk < totals["bytes_after"] + 64_000
    assert totals["bytes_after"] < totals["bytes_before"]
