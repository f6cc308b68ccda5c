"""``kflats compress`` with a budget in bytes: the curve against bytes, and heal."""

import json
import os
import re

import pytest

from .conftest import run_compress

pytest.importorskip("torch")
pytest.importorskip("transformers")


PNG = b"\x89PNG\r\n\x1a\n"


def test_curve_against_bytes_with_a_healed_model(bert_dir, tmp_path, capsys):
    from kflats.quantize import quantized_tensors
    from kflats.torch import load_compressed

    out = tmp_path / "out"
    # the folder to 0.4 MB: the word embedding, 30522 x 32 float32 (3.9 MB),
    # in what the rest (0.09 MB, float32) and the headers leave; the curve
    # at a fraction of the whole model's float32 bytes and at a size
    code, stdout, stderr = run_compress(
        capsys, bert_dir, "--out", out, "--size", "0.4MB", "--targets", "embedding",
        "--curve", "0.07,0.25MB", "--heal-steps", "3", "--quiet",
    )  # fmt: skip
    assert code == 0, stderr
    report = json.loads((out / "report.json").read_text())
    totals = report["totals"]
    assert {p["budget"] for p in report["curve"]} == {0.07, 250_000, 400_000}
    # the baseline, uniform quantization: the widest that fits, or the
    # smallest (2 bits) where none fits
    smallest = min(p["bytes"]["svd"] for p in report["curve"])
    assert report["baseline"].startswith("uniform quantization")
    for p in report["curve"]:
        limit = p["budget"] if p["budget"] > 1 else p["budget"] * totals["bytes_before"]
        assert set(p["bytes"]) == {"kflats", "svd"}
        assert 0 < p["bytes"]["kflats"] <= limit
        assert p["bytes"]["svd"] <= limit or p["bytes"]["svd"] == smallest
        assert {"kflats", "svd"} <= set(p) and 0 < p["kflats"]["mean_cosine"] <= 1
    sizes = [p["bytes"]["kflats"] for p in report["curve"]]
    assert sizes == sorted(sizes)
    # the point at the budget: the model as compressed (before its heal)
    (main_point,) = [p for p in report["curve"] if p["budget"] == 400_000]
    assert main_point["bytes"]["kflats"] == report["compression"]["folder_bytes"]
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
    # the size asked, and the folder's weight files as written: the packed
    # codes counted, not their float values, and the header
    on_disk = os.path.getsize(out / "model.safetensors")
    assert totals["size_asked"] == 400_000 and totals["folder_bytes"] == on_disk
    assert totals["bytes_after"] < on_disk <= report["compression"]["folder_bytes"]
    assert report["compression"]["folder_bytes"] <= 400_000
    assert "| size asked | | 400,000 bytes |" in md
    assert f"| the folder's weight files | | {on_disk:,} bytes |" in md
    assert "(the folder's weight files; size asked 400.0kB)" in stdout


def test_a_size_below_the_smallest_stops_before_the_calibration(
    bert_dir, tmp_path, capsys, monkeypatch
):
    import kflats.torch

    def calibrate(*args, **kwargs):  # pragma: no cover - the check stops first
        raise AssertionError("calibrated")

    monkeypatch.setattr(kflats.torch, "calibrate", calibrate)
    # the rest of the model alone is 0.09 MB
    code, stdout, stderr = run_compress(
        capsys, bert_dir, "--out", tmp_path / "o", "--size", "100kB",
        "--targets", "embedding", "--quiet",
    )  # fmt: skip
    assert code == 2 and stdout == ""
    assert stderr.count("\n") == 1 and "allows 100000 bytes" in stderr
    need = int(re.search(r"smallest size reachable is (\d+) bytes", stderr).group(1))
    assert 100_000 < need < 400_000
    assert not (tmp_path / "o").exists()


def test_a_size_on_the_curve_needs_a_budget_in_bytes(bert_dir, tmp_path, capsys):
    code, stdout, stderr = run_compress(
        capsys, bert_dir, "--out", tmp_path / "o", "--budget", "0.5",
        "--unit", "numbers", "--curve", "0.4,6MB", "--quiet",
    )  # fmt: skip
    assert code == 2 and stdout == ""
    assert stderr.count("\n") == 1 and "--curve: 6000000 is a size in bytes" in stderr
    assert not (tmp_path / "o").exists()


def test_curve_that_is_neither_a_fraction_nor_a_size(tmp_path, capsys):
    out = tmp_path / "o"
    code, _, stderr = run_compress(capsys, "--out", out, "--curve", "0.3,big")
    assert code == 2
    assert "expected fractions in (0, 1) or sizes such as 6MB, got 'big'" in stderr


def test_tied_causal_lm_in_bytes_saves_its_table_once(tmp_path, capsys):
    from .conftest import save_tiny_causal_lm

    folder = save_tiny_causal_lm(tmp_path / "m", "llama")
    out = tmp_path / "out"
    # a budget that quantizes the tied table dense: saved packed, once, and
    # the head follows it on load
    code, _, stderr = run_compress(
        capsys, folder, "--out", out, "--budget", "0.3", "--unit", "bytes",
        "--targets", "all", "--curve", "none", "--quiet",
    )  # fmt: skip
    assert code == 0, stderr
    report = json.loads((out / "report.json").read_text())
    assert report["evaluation"]["reloaded_outputs_identical"]
    table = report["compression"]["modules"][0]
    assert table["name"] == "model.embed_tokens" and table["bits"] is not None
    totals = report["totals"]
    on_disk = os.path.getsize(out / "model.safetensors")
    assert totals["bytes_after"] <= on_disk == totals["folder_bytes"]
    # 0.3 of the whole model, its table counted once
    assert on_disk <= totals["size_asked"] == int(0.3 * totals["bytes_before"])


@pytest.mark.parametrize(
    ("family", "others"),
    [
        (
            "bert",
            {"embeddings.position_embeddings", "pooler.dense"},
        ),
        ("gpt2", {"transformer.wpe"}),
    ],
)
def test_all_in_bytes_takes_every_matrix_the_folder_holds(
    family, others, bert_dir, tmp_path, capsys
):
    from .conftest import save_tiny_causal_lm

    folder = (
        bert_dir if family == "bert" else save_tiny_causal_lm(tmp_path / "m", family)
    )
    out = tmp_path / "out"
    code, _, stderr = run_compress(
        capsys, folder, "--out", out, "--budget", "0.2", "--curve", "none", "--quiet",
    )  # fmt: skip
    assert code == 0, stderr
    report = json.loads((out / "report.json").read_text())
    names = {m["name"] for m in report["compression"]["modules"]}
    # the tables and the pooler outside the blocks are priced by the search
    assert others <= names
    assert report["evaluation"]["reloaded_outputs_identical"]
    on_disk = os.path.getsize(out / "model.safetensors")
    assert on_disk == report["totals"]["folder_bytes"] <= report["totals"]["size_asked"]
    # under a budget of numbers, 'all' is the word embedding and the blocks
    import transformers

    from kflats.cli._targets import target_names
    from kflats.torch.models import all_targets

    auto = (
        transformers.AutoModel
        if family == "bert"
        else transformers.AutoModelForCausalLM
    )
    model = auto.from_pretrained(folder)
    assert target_names(model, ["all"], "numbers") == all_targets(model)
    assert set(target_names(model, ["all"], "bytes")) == {*all_targets(model), *others}
