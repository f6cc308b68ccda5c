"""``kflats compress`` keeps the model's class and refuses a bad folder."""

import json
import os

import numpy as np
import pytest

from kflats.__main__ import main

from .conftest import save_tiny_bert, save_tiny_causal_lm, save_tiny_llama

pytestmark = pytest.mark.usefixtures("nlp")
QUICK = ("--targets", "embedding", "--k", "1", "--curve", "none", "--quiet")
QUICK += ("--unit", "numbers")


def _run(capsys, *argv):
    capsys.readouterr()  # what building the folders printed
    code = main(["compress", *map(str, argv)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _one_line(code, stderr, match):
    assert code == 2, stderr
    assert stderr.count("\n") == 1 and "Traceback" not in stderr, stderr
    assert match in stderr, stderr


@pytest.fixture
def no_model_load(monkeypatch):
    import kflats.torch.io
    import kflats.torch.io._original

    def load_model(source):
        raise AssertionError("the model was loaded before the mistake was found")

    # kflats compress reads it from the io package; load_pretrained from its
    # home module
    for module in (kflats.torch.io, kflats.torch.io._original):
        monkeypatch.setattr(module, "load_model", load_model)


# --- the model that goes in comes out -----------------------------------------------


def test_a_classifier_keeps_its_class_and_head(tmp_path, capsys):
    import transformers

    from kflats.torch import load_compressed

    folder = save_tiny_bert(tmp_path / "clf", "BertForSequenceClassification")
    out = tmp_path / "out"
    code, _, stderr = _run(capsys, folder, "--out", out, "--budget", "0.5", *QUICK)
    assert code == 0, stderr
    report = json.loads((out / "report.json").read_text())
    assert report["model"]["class"].endswith(".BertForSequenceClassification")
    loaded = load_compressed(out)
    assert type(loaded) is transformers.BertForSequenceClassification
    original = transformers.BertForSequenceClassification.from_pretrained(folder)
    np.testing.assert_array_equal(
        loaded.classifier.weight.detach().numpy(),
        original.classifier.weight.detach().numpy(),
    )


def test_a_causal_lm_keeps_its_head_and_pads_with_eos(tmp_path, capsys):
    import transformers

    from kflats.torch import load_compressed

    folder = save_tiny_llama(tmp_path / "llama")
    capsys.readouterr()  # what saving the folder printed
    out = tmp_path / "out"
    code, stdout, stderr = _run(
        capsys, folder, "--out", out, "--allocation", "uniform", *QUICK
    )
    assert code == 0, stderr
    # said once, on stderr: padding with the end-of-sequence token
    assert stderr == (
        "kflats: the tokenizer has no pad token; calibration and evaluation pad "
        "with its end-of-sequence token '</s>' (the saved tokenizer is unchanged)\n"
    )
    assert type(load_compressed(out)) is transformers.LlamaForCausalLM
    totals = json.loads((out / "report.json").read_text())["totals"]
    # the tied embedding and head counted once, in numbers and in bytes
    original = transformers.LlamaForCausalLM.from_pretrained(str(folder))
    n = sum(p.numel() for p in original.parameters())
    assert (totals["params_before"], totals["bytes_before"]) == (n, 4 * n)
    saved = transformers.AutoTokenizer.from_pretrained(str(out))
    assert saved.pad_token is None and saved.eos_token == "</s>"


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_a_causal_lm_all_targets_keeps_its_tie_and_reports_perplexity(
    family, tmp_path, capsys
):
    import torch
    import transformers

    from kflats.torch import load_compressed

    folder = save_tiny_causal_lm(tmp_path / family, family)
    out = tmp_path / "out"
    code, stdout, stderr = _run(
        capsys, folder, "--out", out, "--targets", "all", "--budget", "0.6",
        "--unit", "numbers", "--curve", "none", "--quiet",
    )  # fmt: skip
    assert code == 0, stderr
    report = json.loads((out / "report.json").read_text())
    names = [m["name"] for m in report["compression"]["modules"]]
    linear = "mlp.c_fc" if family == "gpt2" else "mlp.up_proj"  # Conv1D in GPT-2
    assert any(name.endswith(linear) for name in names), names
    # the tied embedding and head share one set of factors: the model shrinks
    totals = report["totals"]
    assert totals["params_after"] < totals["params_before"]
    metrics = report["model_metrics"]
    assert metrics["kind"] == "causal_lm"
    for key in ("kflats", "svd"):
        assert metrics[key]["perplexity_ratio"] > 0
        assert 0 <= metrics[key]["top1_agreement"] <= 1
    assert "perplexity ratio" in (out / "report.md").read_text()
    assert "causal lm outputs: " in stdout
    loaded = load_compressed(out)
    head, table = loaded.get_output_embeddings(), loaded.get_input_embeddings()
    assert getattr(head, "embedding", None) is table  # still tied after loading
    ids = torch.tensor([[2, 3, 4, 5]])
    original = transformers.AutoModelForCausalLM.from_pretrained(str(folder))
    assert loaded(input_ids=ids).logits.shape == original(input_ids=ids).logits.shape


def test_a_model_class_is_taken_from_transformers_only(tmp_path):
    import transformers

    from kflats.torch.io._original import model_class

    config = transformers.BertConfig()
    for names, expected in [
        (["BertForMaskedLM"], transformers.BertForMaskedLM),
        (["EvilModel", "BertForMaskedLM"], transformers.BertForMaskedLM),
        (["__class__", "os", 5, None, "AutoModel"], transformers.AutoModel),
        (None, transformers.AutoModel),
    ]:
        config.architectures = names
        assert model_class(config) is expected
    config.architectures = None
    assert model_class(config, gguf=True) is transformers.AutoModelForCausalLM
    config.architectures = ["GPT2Model"]
    with pytest.raises(ValueError, match="names the architecture 'GPT2Model', a "
                       "model of GPT2Config, but holds a BertConfig"):  # fmt: skip
        model_class(config)


# --- a bad folder is refused -------------------------------------------------------


@pytest.mark.parametrize("kind", ["hf", "st"])
def test_no_tokenizer_files_is_refused(kind, tmp_path, capsys, no_model_load):
    folder = save_tiny_bert(tmp_path / "m")
    if kind == "st":
        (folder / "modules.json").write_text(
            json.dumps([{"idx": 0, "name": "0", "path": "", "type":
                         "sentence_transformers.models.Transformer"}])
        )  # fmt: skip
    for name in ("tokenizer.json", "vocab.txt"):
        (folder / name).unlink()
    code, _, stderr = _run(capsys, folder, "--out", tmp_path / "out", *QUICK)
    _one_line(code, stderr, f"MODEL_DIR '{folder}' holds no tokenizer files")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("change", ["more layers", "renamed weight"])
def test_weights_that_do_not_match_the_config_are_refused(change, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    folder = save_tiny_bert(tmp_path / "m")
    if change == "more layers":
        config = json.loads((folder / "config.json").read_text())
        config["num_hidden_layers"] = 3
        (folder / "config.json").write_text(json.dumps(config))
        match = "missing (encoder.layer.2."
    else:
        state = load_file(folder / "model.safetensors")
        key = "encoder.layer.1.output.dense.weight"
        state["encoder.layer.1.output.dense.wieght"] = state.pop(key)
        save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
        match = "1 missing (encoder.layer.1.output.dense.weight); 1 unexpected"
    code, _, stderr = _run(capsys, folder, "--out", tmp_path / "out", *QUICK)
    _one_line(code, stderr, f"MODEL_DIR '{folder}': its weights do not match")
    assert match in stderr
    assert not (tmp_path / "out").exists()


# --- GGUF: found in a file or a folder ------------------------------------------------


def test_a_gguf_file_or_a_folder_holding_one(tmp_path, monkeypatch):
    from kflats.torch.io import _original as _model

    monkeypatch.setattr(_model.importlib.util, "find_spec", lambda name: object())
    (tmp_path / "m.Q4.gguf").write_bytes(b"GGUF")
    by_file = _model.model_source(tmp_path / "m.Q4.gguf")
    by_folder = _model.model_source(tmp_path)
    for source in (by_file, by_folder):
        assert (source.folder, source.kind, source.gguf_file) == (
            tmp_path,
            "transformers",
            "m.Q4.gguf",
        )
    (tmp_path / "other.gguf").write_bytes(b"GGUF")
    with pytest.raises(ValueError, match=r"holds 2 GGUF files \(m.Q4.gguf, other"):
        _model.model_source(tmp_path)


def test_a_gguf_file_without_the_gguf_package(tmp_path, capsys, monkeypatch):
    from kflats.torch.io import _original as _model

    monkeypatch.setattr(_model.importlib.util, "find_spec", lambda name: None)
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    code, _, stderr = _run(capsys, tmp_path / "m.gguf", "--out", tmp_path / "o")
    _one_line(
        code,
        stderr,
        "kflats: reading the GGUF file 'm.gguf' needs the gguf package (pip "
        "install 'kflats[nlp]')",
    )


# --- the report: a loud warning, a probe on the user's labels -----------------


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    return save_tiny_bert(tmp_path_factory.mktemp("bert"))


def test_a_result_that_lost_the_model_ends_with_a_warning(
    bert, tmp_path, capsys, monkeypatch
):
    import kflats.torch.evaluation

    monkeypatch.setattr(kflats.torch.evaluation, "LOST_COSINE", 1.5)
    out = tmp_path / "out"
    code, stdout, stderr = _run(capsys, bert, "--out", out, *QUICK)
    assert code == 0, stderr
    last = stdout.splitlines()[-1]
    assert last.startswith("WARNING: The compressed model lost most of the original")
    report = json.loads((out / "report.json").read_text())
    assert len(report["warnings"]) == 1
    assert "> **WARNING: the compressed model lost" in (out / "report.md").read_text()


def test_warning_threshold():
    from kflats.torch.evaluation import SentenceEmbeddingEvaluator

    ev = SentenceEmbeddingEvaluator([])
    assert ev.warning({"mean_cosine": 0.5}) is None
    assert "mean cosine 0.499" in ev.warning({"mean_cosine": 0.499})


def _labelled(n=30):
    """Held-out texts labelled long or short (beside their median length)."""
    from kflats.datasets import load_sentences

    texts = load_sentences("heldout")[:n]
    median = np.median([len(t) for t in texts])
    return texts, ["long" if len(t) > median else "short" for t in texts]


def _labels_csv(path):
    texts, labels = _labelled()
    with open(path, "w", encoding="utf-8") as f:
        f.write("text,label\n")
        for text, label in zip(texts, labels, strict=True):
            quoted = '"' + text.replace('"', '""') + '"'
            f.write(f"{quoted},{label}\n")
    return texts, labels


def test_eval_labels_probe(bert, tmp_path, capsys):
    import transformers

    from kflats.torch.evaluation import probe_accuracy, sentence_embeddings

    labels_file = tmp_path / "labels.csv"
    texts, labels = _labels_csv(labels_file)
    out = tmp_path / "out"
    argv = (bert, "--out", out, "--eval-labels", labels_file, *QUICK)
    code, stdout, stderr = _run(capsys, *argv)
    assert code == 0, stderr
    probe = json.loads((out / "report.json").read_text())["probe"]
    model = transformers.AutoModel.from_pretrained(str(bert)).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(bert))
    X = sentence_embeddings(model, texts, tokenizer=tokenizer)
    assert probe["original"] == probe_accuracy(X, labels)
    assert 0 <= probe["kflats"] <= 1 and probe["texts"] == 30
    assert probe["labels"] == 2 and probe["folds"] == 5
    assert "probe accuracy on 30 labelled texts" in stdout
    assert "| original | " in (out / "report.md").read_text()


@pytest.mark.parametrize(
    "content, match",
    [
        ("text,label\n" + "a,x\n" * 6, "needs at least two labels"),
        ("a,x\nb,y\n" * 4, "at least 5 texts each, got {'x': 4, 'y': 4}"),
        ("a,x\nb,y,z\n", "row 2: expected two fields, text,label, got 3"),
        ("a,\n", "row 1: expected two fields, text,label, got 2 (one empty)"),
    ],
)
def test_bad_eval_labels_are_refused_first(
    content, match, tmp_path, capsys, no_model_load
):
    labels = tmp_path / "labels.csv"
    labels.write_text(content)
    code, _, stderr = _run(capsys, "--out", tmp_path / "o", "--eval-labels", labels)
    _one_line(code, stderr, f"--eval-labels '{labels}'")
    assert match in stderr
    assert os.listdir(tmp_path) == ["labels.csv"]


@pytest.mark.parametrize(
    "extra, match",
    [
        (("--targets", "*.nothing"), "--targets: target '*.nothing' matches no module"),
        (("--targets", "*.LayerNorm"), "torch.nn.Embedding and torch.nn.Linear"),
        (("--budget", "0.0001"), "cannot be met"),
    ],
)
def test_targets_and_budget_are_checked_before_loading(
    bert, extra, match, tmp_path, capsys, no_model_load
):
    code, _, stderr = _run(capsys, bert, "--out", tmp_path / "o", "--quiet", *extra)
    _one_line(code, stderr, match)
    assert os.listdir(tmp_path) == []


def test_a_dequantized_gguf_model_forgets_its_quantizer(tmp_path):
    import torch
    import transformers

    from kflats.torch.io._original import _forget_gguf

    config = transformers.LlamaConfig(
        vocab_size=50, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(config)
    model.hf_quantizer = object()  # what transformers leaves after a GGUF load
    model.config.quantization_config = {"quant_method": "gguf"}
    _forget_gguf(model, "MODEL_DIR 'm.gguf'")
    assert model.hf_quantizer is None
    assert "quantization_config" not in model.config.to_dict()
    model.save_pretrained(tmp_path / "saved")

    class GgufLinear(torch.nn.Linear):
        pass

    model.model.layers[0].mlp.up_proj = GgufLinear(8, 16)
    with pytest.raises(ValueError, match="kept 1 layers in packed GGUF blocks "):
        _forget_gguf(model, "MODEL_DIR 'm.gguf'")


# --- a budget in bytes ----------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [("9MB", 9_000_000), ("9.5 MiB", int(9.5 * 2**20)), ("500kB", 500_000),
     ("123456", 123456), ("1e6", 1_000_000), ("2GiB", 2 * 2**30)],
)  # fmt: skip
def test_size_type_reads_decimal_and_binary_units(text, expected):
    from kflats.cli._common import size_type

    assert size_type(text) == expected


@pytest.mark.parametrize("text", ["9XB", "MB", "-3MB", "0.1B", "9 M B", ""])
def test_size_type_refuses_what_is_not_a_size(text):
    import argparse

    from kflats.cli._common import size_type

    with pytest.raises(argparse.ArgumentTypeError, match="expected a size"):
        size_type(text)


def test_size_with_an_unknown_unit_is_a_usage_error(tmp_path, capsys):
    code, _, stderr = _run(capsys, "--size", "9XB", "--out", tmp_path / "o")
    assert code == 2
    assert "argument --size: expected a size" in stderr and "'XB'" in stderr


@pytest.mark.parametrize(
    "argv, match",
    [(("--size", "1MB", "--budget", "0.5"), "--size and --budget: give one"),
     (("--size", "1MB", "--unit", "numbers"), "--size is a number of bytes")],
)  # fmt: skip
def test_size_conflicts_are_one_line(argv, match, tmp_path, capsys, no_model_load):
    code, _, stderr = _run(capsys, *argv, "--out", tmp_path / "o")
    _one_line(code, stderr, match)
    assert not (tmp_path / "o").exists()


def test_compress_to_a_size_in_bytes(tmp_path, capsys):
    import torch

    from kflats.torch import load_compressed

    folder = save_tiny_bert(tmp_path / "m")
    out = tmp_path / "out"
    # the folder to 0.4 MB: the word embedding, 30522 x 32 float32 (3.9 MB),
    # in what the rest (0.09 MB) and the headers leave
    code, stdout, stderr = _run(
        capsys, folder, "--out", out, "--size", "0.4MB", "--targets", "embedding",
        "--curve", "none", "--quiet",
    )  # fmt: skip
    assert code == 0, stderr
    report = json.loads((out / "report.json").read_text())
    assert report["settings"]["unit"] == "bytes"
    assert report["settings"]["budget"] == 400_000
    (module,) = report["compression"]["modules"]
    assert module["bits"] in (2, 3, 4, 6, 8)
    assert report["totals"]["folder_bytes"] <= 400_000
    # the baseline: uniform quantization at the widest bits that fit, or the
    # smallest (rows of 32, so groups of 32: the folder at 2 bits, 0.43 MB)
    assert report["baseline"] == (
        "uniform quantization (calibrated), the widest bits that fit: 2 bits, "
        "groups of 32"
    )
    md = (out / "report.md").read_text()
    assert "0.40 MB (a size in bytes: the folder's weight files)" in md
    assert "| form | bits |" in md
    latency = report["latency"]
    assert latency["threads"] == 2
    for batch in ("batch_32", "batch_1"):
        times = latency[batch]
        assert times["ratio"] == pytest.approx(times["kflats"] / times["original"])
    assert "Latency on CPU, 2 torch threads" in md
    assert "latency, compressed / original: batch 32" in stdout
    loaded = load_compressed(out)
    ids = torch.tensor([[101, 1037, 4937, 102]])
    assert torch.isfinite(loaded(input_ids=ids).last_hidden_state).all()
