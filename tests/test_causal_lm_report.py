"""benchmarks/causal_lm_report.py on a tiny random Llama (SmolLM2's architecture)."""

import importlib.util
import math
from pathlib import Path

import pytest

pytest.importorskip("transformers")

from tests.cli.conftest import save_tiny_llama  # noqa: E402

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "causal_lm_report.py"


@pytest.fixture(scope="module")
def report():
    spec = importlib.util.spec_from_file_location("causal_lm_report", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    import transformers

    folder = save_tiny_llama(tmp_path_factory.mktemp("llama"))
    return folder, transformers.AutoTokenizer.from_pretrained(folder)


def _model(folder):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(folder).eval()


def _run(report, tiny, *argv):
    folder, tokenizer = tiny
    args = report._parser().parse_args(
        ["--calibration-texts", "24", "--heldout-texts", "8", *argv]
    )
    return report.run(_model(folder), tokenizer, args)


def test_all_targets_healed_svd_anchor(report, tiny):
    result = _run(
        report, tiny, "--targets", "all", "--budget", "0.6", "--k", "1",
        "--heal-steps", "2", "--heal-batch", "4", "--probe-sequences", "8",
    )  # fmt: skip
    # the embedding/head table and the 7 Linear modules of each of 2 blocks
    assert result["n_targets"] == 1 + 2 * 7
    assert set(result["k_chosen"]) <= {0, 1}
    before, after = result["target_numbers"]
    assert after <= 0.6 * before
    numbers = result["model_numbers"]
    assert numbers["compressed"] < numbers["original"]
    assert result["heal"]["steps"] == 2 and math.isfinite(result["heal"]["last_loss"])
    assert result["calibration_texts"] == 24 and result["heldout_texts"] == 8
    assert result["probe_sequences"] == 8
    for key in ("perplexity", "perplexity_ratio", "kl", "top1_agreement"):
        assert math.isfinite(result[key])
    assert 0 <= result["top1_agreement"] <= 1
    assert set(result["seconds_cpu"]) == {
        "calibrate",
        "compress",
        "reload",
        "heal",
        "evaluate",
    }


def test_table_alone_without_heal(report, tiny):
    result = _run(report, tiny, "--budget", "0.5", "--k", "1", "2")
    assert result["n_targets"] == 1 and result["heal"]["first_loss"] is None
    assert "heal" not in result["seconds_wall"]
    assert result["probe_sequences"] == 24  # the calibration's own
    assert result["target_numbers"][1] <= 0.5 * result["target_numbers"][0]
    assert result["k_chosen"][0] in (1, 2)


def test_first_sequences(report):
    import numpy as np

    batches = [{"input_ids": np.arange(8 * 3).reshape(8, 3)} for _ in range(3)]
    out = report._first_sequences(batches, 12)
    assert [len(b["input_ids"]) for b in out] == [8, 4]
    assert (out[1]["input_ids"] == batches[1]["input_ids"][:4]).all()
    assert [len(b["input_ids"]) for b in report._first_sequences(batches, 5)] == [5]
    assert sum(len(b["input_ids"]) for b in report._first_sequences(batches, 99)) == 24
