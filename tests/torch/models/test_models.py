"""Every transformers family: compressed with all targets, it keeps its class,
its heads and its ties, stays finite and no larger, saves and loads back, and
heals. One parametrised suite over tiny random-weight configs."""

import warnings

import numpy as np
import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from kflats.torch import (  # noqa: E402
    ProjectiveEmbedding,
    ProjectiveLinear,
    ProjectiveTiedHead,
    calibrate,
    compress,
    heal,
    load_compressed,
    save_compressed,
)
from kflats.torch.models import adapter_for  # noqa: E402

VOCAB, HIDDEN, LAYERS = 300, 32, 2
BERT = dict(
    vocab_size=VOCAB,
    hidden_size=HIDDEN,
    num_hidden_layers=LAYERS,
    num_attention_heads=2,
    intermediate_size=64,
    max_position_embeddings=64,
)
DECODER = dict(
    vocab_size=VOCAB,
    hidden_size=HIDDEN,
    num_hidden_layers=LAYERS,
    num_attention_heads=2,
    num_key_value_heads=1,
    intermediate_size=64,
    max_position_embeddings=64,
    bos_token_id=1,
    eos_token_id=2,
)
T5 = dict(
    vocab_size=VOCAB, d_model=HIDDEN, d_kv=16, d_ff=64, num_layers=LAYERS, num_heads=2
)


def _families():
    t = transformers
    return {
        # name: (class, config, output kind, tied)
        "bert": (t.BertModel, t.BertConfig(**BERT), "hidden", False),
        "bert-classifier": (
            t.BertForSequenceClassification,
            t.BertConfig(**BERT, num_labels=3),
            "classifier",
            False,
        ),
        "bert-mlm": (t.BertForMaskedLM, t.BertConfig(**BERT), "masked_lm", True),
        "distilbert": (
            t.DistilBertModel,
            t.DistilBertConfig(
                vocab_size=VOCAB,
                dim=HIDDEN,
                n_layers=LAYERS,
                n_heads=2,
                hidden_dim=64,
                max_position_embeddings=64,
            ),
            "hidden",
            False,
        ),
        "roberta": (t.RobertaModel, t.RobertaConfig(**BERT), "hidden", False),
        "mpnet": (t.MPNetModel, t.MPNetConfig(**BERT), "hidden", False),
        "xlm-roberta": (
            t.XLMRobertaModel,
            t.XLMRobertaConfig(**BERT),
            "hidden",
            False,
        ),
        "gpt2": (
            t.GPT2LMHeadModel,
            t.GPT2Config(
                vocab_size=VOCAB,
                n_embd=HIDDEN,
                n_layer=LAYERS,
                n_head=2,
                n_positions=64,
                bos_token_id=1,
                eos_token_id=2,
            ),
            "causal_lm",
            True,
        ),
        "llama-tied": (
            t.LlamaForCausalLM,
            t.LlamaConfig(**DECODER, tie_word_embeddings=True),
            "causal_lm",
            True,
        ),
        "llama-untied": (
            t.LlamaForCausalLM,
            t.LlamaConfig(**DECODER, tie_word_embeddings=False),
            "causal_lm",
            False,
        ),
        "qwen2": (
            t.Qwen2ForCausalLM,
            t.Qwen2Config(**DECODER, tie_word_embeddings=True),
            "causal_lm",
            True,
        ),
        "t5-encoder": (t.T5EncoderModel, t.T5Config(**T5), "hidden", False),
        "t5": (t.T5ForConditionalGeneration, t.T5Config(**T5), "seq2seq", True),
    }


FAMILIES = list(_families())


def build(name, seed=0):
    cls, config, _, _ = _families()[name]
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cls(config).eval()


def batches(n=3, size=4, length=12, seed=0):
    """Random token batches, the last sequence of each padded at its end."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(3, VOCAB, (size, length), generator=g)
        mask = torch.ones_like(ids)
        mask[-1, length // 2 :] = 0
        ids[-1, length // 2 :] = 0
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def word_tokenizer(texts, padding=True, truncation=True, max_length=None, **kwargs):
    """One id per word (a hash into 3..VOCAB-1), padded with 0."""
    ids = [[3 + sum(map(ord, w)) % (VOCAB - 3) for w in t.split()] for t in texts]
    if max_length is not None:
        ids = [seq[:max_length] for seq in ids]
    width = max(len(seq) for seq in ids)
    input_ids = torch.tensor([seq + [0] * (width - len(seq)) for seq in ids])
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in ids])
    return {"input_ids": input_ids, "attention_mask": mask}


word_tokenizer.pad_token = "<pad>"

TEXTS = [
    "the cat sat on the mat",
    "a dog ran in the park today",
    "rain is expected over the hills tonight",
    "she paid the bill with a card",
]


def size(model):
    """(numbers, bytes) a model stores, each shared tensor counted once."""
    seen, numbers, nbytes = set(), 0, 0
    for t in model.state_dict(keep_vars=True).values():
        key = (t.data_ptr(), t.numel(), t.dtype)
        if key in seen:
            continue
        seen.add(key)
        numbers += t.numel() if t.is_floating_point() else 0
        nbytes += t.numel() * t.element_size()
    return numbers, nbytes


def outputs(model, batch):
    with torch.no_grad():
        return adapter_for(model).final(adapter_for(model).run(batch))


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_compresses_with_all_targets(family, tmp_path):
    cls, _, kind, tied = _families()[family]
    original = build(family)
    model = build(family)
    adapter = adapter_for(model)
    assert adapter.output_kind == kind
    targets = adapter.all_targets()
    n_layers = sum(
        type(m) is nn.Linear or type(m).__name__ == "Conv1D"
        for s in adapter.block_stacks()
        for m in model.get_submodule(s).modules()
    )
    assert len(targets) == 1 + n_layers > 1
    data = batches()
    cal = calibrate(model, data)
    before = size(model)
    report = compress(model, 0.3, targets, calibration=cal, k=(1, 2), random_state=0)

    # the class, its head and its ties are kept
    assert type(model) is cls
    emb = model.get_input_embeddings()
    assert isinstance(emb, ProjectiveEmbedding)
    head = model.get_output_embeddings() if hasattr(model, "lm_head") or tied else None
    if tied:
        head = model.get_output_embeddings()
        assert isinstance(head, ProjectiveTiedHead) and head.embedding is emb
    elif kind == "causal_lm":  # an untied head stays as it was
        assert type(model.get_output_embeddings()) is nn.Linear
    if family.startswith("t5"):
        assert model.encoder.embed_tokens.embedding is model.shared is emb
    replaced = [n for n, m in model.named_modules() if isinstance(m, ProjectiveLinear)]
    kept = [m for m in report if m.k == 0]
    assert len(replaced) + len(kept) == n_layers

    # numbers and bytes not above the original
    after = size(model)
    assert after[0] <= before[0] and after[1] <= before[1]
    assert report.params_after <= report.params_before
    assert sum(p.numel() for p in model.parameters()) <= sum(
        p.numel() for p in original.parameters()
    )

    # finite outputs, near the original's
    for batch in data[:1]:
        out = outputs(model, batch)
        assert torch.isfinite(out).all()
        assert out.shape == outputs(original, batch).shape

    # save and load give the same outputs, ties and all
    save_compressed(model, tmp_path / "m")
    loaded = load_compressed(tmp_path / "m")
    assert type(loaded) is cls
    if tied:
        assert loaded.get_output_embeddings().embedding is loaded.get_input_embeddings()
    for batch in data:
        assert torch.equal(outputs(loaded, batch), outputs(model, batch))

    # heal runs with the family's objective, and trains the shared factors
    losses = heal(
        model,
        original,
        TEXTS,
        steps=2,
        batch_size=2,
        lr=1e-3,
        tokenizer=word_tokenizer,
        progress=False,
    )
    assert len(losses) == 2 and all(map(torch.isfinite, torch.tensor(losses)))
    if tied:
        assert model.get_output_embeddings().embedding is model.get_input_embeddings()


# --------------------------------------------------------------------------
# the adapters' answers


@pytest.mark.parametrize(
    "family, keys",
    [
        ("gpt2", {"perplexity", "perplexity_original", "kl", "top1_agreement"}),
        ("llama-tied", {"perplexity", "perplexity_ratio", "kl", "top1_agreement"}),
        ("bert-classifier", {"label_agreement", "kl"}),
        ("bert-mlm", {"kl", "top1_agreement"}),
        ("t5", {"kl", "top1_agreement"}),
        ("bert", {"mean_cosine", "worst_cosine", "top5_overlap"}),
    ],
)
def test_evaluate_reports_what_the_output_kind_means(family, keys):
    original = build(family)
    adapter = adapter_for(original)
    texts = TEXTS * 2
    same = adapter.evaluate(original, build(family), texts, word_tokenizer)
    assert keys <= set(same) and same["n_texts"] == len(texts)
    for key, value in same.items():
        if "agreement" in key or "cosine" in key or "overlap" in key:
            assert value == pytest.approx(1.0, abs=1e-5), key
        elif key == "kl":
            assert value == pytest.approx(0.0, abs=1e-6)
        elif key == "perplexity_ratio":
            assert value == pytest.approx(1.0)
    model = build(family)
    compress(model, 0.3, adapter.embedding(), k=1, random_state=0)
    moved = adapter.evaluate(original, model, texts, word_tokenizer)
    assert all(np.isfinite(v) for v in moved.values())
    if "kl" in moved:
        assert moved["kl"] > 1e-6
    else:
        assert moved["mean_cosine"] < 1 - 1e-6
    if "perplexity" in moved:
        # the perplexity of the original, recomputed by hand
        batch = word_tokenizer(texts)
        with torch.no_grad():
            logits = original(**batch).logits[:, :-1]
        ids, real = batch["input_ids"][:, 1:], batch["attention_mask"][:, 1:].bool()
        nll = nn.functional.cross_entropy(logits[real], ids[real])
        assert moved["perplexity_original"] == pytest.approx(float(nll.exp()), rel=1e-5)


def test_causal_lm_distortion_is_the_kl_of_next_tokens_over_real_positions():
    model = build("gpt2")
    adapter = adapter_for(model)
    batch = batches(n=1)[0]
    teacher = adapter.final(adapter.run(batch))
    student = teacher + 0.1 * torch.randn_like(teacher)
    value = adapter.distortion(student, teacher, batch)
    # logits at padding positions do not count
    padded = student.clone()
    padded[~batch["attention_mask"].bool()] = 1e3
    assert torch.allclose(adapter.distortion(padded, teacher, batch), value)
    mask = batch["attention_mask"].bool()
    t = torch.log_softmax(teacher, -1)[mask]
    s = torch.log_softmax(student, -1)[mask]
    expected = nn.functional.kl_div(s, t, log_target=True, reduction="batchmean")
    assert torch.allclose(value, expected, atol=1e-6)
    assert float(adapter.distortion(teacher, teacher, batch).detach()) == 0


def test_classifier_and_sentence_distortions():
    model = build("bert-classifier")
    adapter = adapter_for(model)
    batch = batches(n=1)[0]
    t = torch.randn(4, 3)
    s = torch.randn(4, 3)
    expected = nn.functional.kl_div(
        torch.log_softmax(s, -1),
        torch.log_softmax(t, -1),
        log_target=True,
        reduction="batchmean",
    )
    assert torch.allclose(adapter.distortion(s, t, batch), expected, atol=1e-6)
    hidden = adapter_for(build("bert"))
    t = torch.randn(4, 12, HIDDEN)
    assert float(hidden.distortion(2 * t, t, batch)) == pytest.approx(1.0)


def test_compress_selects_the_embedding_for_a_tied_head():
    model = build("gpt2")
    report = compress(model, 0.5, "lm_head", k=1, random_state=0)
    assert [m.name for m in report] == ["transformer.wte"]
    assert isinstance(model.lm_head, ProjectiveTiedHead)
    # by type too: the tied head stands for its table
    model = build("gpt2")
    report = compress(model, 0.5, nn.Linear, k=1, random_state=0)
    assert [m.name for m in report] == ["transformer.wte"]


def test_t5_default_target_is_the_table_its_encoder_reads():
    original = build("t5-encoder")
    model = build("t5-encoder")
    report = compress(model, 0.3, k=1, random_state=0)
    assert [m.name for m in report] == ["shared"]
    assert model.encoder.embed_tokens.embedding is model.shared
    batch = batches(n=1)[0]
    ids = batch["input_ids"]
    assert torch.equal(model.encoder.embed_tokens(ids), model.shared(ids))
    assert not torch.equal(outputs(model, batch), outputs(original, batch))


def test_calibrate_counts_lookups_of_every_place_of_a_shared_table():
    model = build("t5")
    data = batches()
    cal = calibrate(model, data, targets="shared")
    counts = cal.token_counts("shared")
    # the encoder reads every real token, the decoder the same shifted right
    real = sum(int(b["attention_mask"].sum()) for b in data)
    assert counts.sum() == 2 * real


def test_a_tokenizer_without_pad_token_pads_with_eos_and_says_so():
    class Tokenizer:
        pad_token = None
        eos_token = "</s>"

        def __call__(self, texts, **kwargs):
            assert self.pad_token == "</s>"
            return word_tokenizer(texts, **kwargs)

    tokenizer = Tokenizer()
    model = build("llama-tied")
    with pytest.warns(UserWarning, match="no pad token.*eos"):
        cal = calibrate(model, TEXTS, tokenizer=tokenizer)
    assert tokenizer.pad_token == "</s>" and cal.n_sequences == len(TEXTS)
    tokenizer.eos_token = tokenizer.pad_token = None
    with pytest.raises(ValueError, match="no pad token and no eos"):
        adapter_for(model).check_tokenizer(tokenizer)


def test_heal_errors_name_heal():
    model = build("gpt2")
    with pytest.raises(ValueError, match="^heal: .*tokenizer="):
        heal(model, build("gpt2"), TEXTS, steps=1)
    with pytest.raises(ValueError, match="^heal: .*compress it first"):
        heal(model, build("gpt2"), TEXTS, steps=1, tokenizer=word_tokenizer)
    with pytest.raises(ValueError, match="^heal: steps"):
        heal(model, build("gpt2"), TEXTS, steps=0, tokenizer=word_tokenizer)


def test_a_registered_family_is_asked_first():
    from kflats.torch import models
    from kflats.torch.models import _registry

    class Custom(models.TransformersAdapter):
        family = "custom"
        model_types = ("gpt2",)
        stacks = ()

    try:
        models.register_adapter(Custom)
        assert adapter_for(build("gpt2")).family == "custom"
        assert adapter_for(build("bert")).family == "bert-like"
    finally:
        _registry._REGISTRY.remove(Custom)
    assert adapter_for(build("gpt2")).family == "gpt2"


# --------------------------------------------------------------------------
# loading a folder as what it is, or refusing it


def _folder_with_tokenizer(model, path):
    import shutil

    from kflats.datasets import minilm_model_dir

    model.save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt"):
        shutil.copy(minilm_model_dir() / name, path / name)
    return path


def test_load_pretrained_keeps_the_class_and_its_tied_head(tmp_path):
    from kflats.torch.io import load_pretrained

    folder = _folder_with_tokenizer(build("gpt2"), tmp_path / "gpt2")
    model, tokenizer = load_pretrained(folder)
    assert type(model) is transformers.GPT2LMHeadModel and not model.training
    assert model.lm_head.weight is model.transformer.wte.weight
    assert tokenizer(["a cat"])["input_ids"][0][1:-1] == [1037, 4937]
    folder = _folder_with_tokenizer(build("bert-classifier"), tmp_path / "cls")
    assert (
        type(load_pretrained(folder)[0]) is transformers.BertForSequenceClassification
    )


def test_load_pretrained_refuses_a_folder_it_cannot_read_faithfully(tmp_path):
    import json

    from kflats.torch.io import load_pretrained

    build("bert").save_pretrained(tmp_path / "bare")
    with pytest.raises(ValueError, match="no tokenizer files"):
        load_pretrained(tmp_path / "bare")
    folder = _folder_with_tokenizer(build("bert"), tmp_path / "grown")
    config = json.loads((folder / "config.json").read_text())
    config["num_hidden_layers"] = 3  # a layer the weights do not hold
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="do not match its config.json: 16 missing"):
        load_pretrained(folder)
    with pytest.raises(ValueError, match="model folder '.*nowhere' does not exist"):
        load_pretrained(tmp_path / "nowhere")


def test_evaluate_leaves_gradients_on():
    model = build("gpt2")
    adapter_for(model).evaluate(model, build("gpt2"), TEXTS, word_tokenizer)
    assert torch.is_grad_enabled()


def test_a_tied_table_is_fitted_for_the_logits_it_computes():
    from kflats.factorize import damped_moment

    model = build("gpt2")
    cal = calibrate(model, batches(), targets="transformer.wte")
    assert set(cal.names) == {"transformer.wte", "lm_head"}
    C, _ = damped_moment(cal.input_moment("lm_head"), HIDDEN, 1e-2)
    w = cal.token_weights("transformer.wte")
    E = model.transformer.wte.weight.detach().double().numpy()

    def logit_error(compressed):
        D = E - compressed.transformer.wte.to_dense().weight.detach().double().numpy()
        return float(np.einsum("t,ti,ij,tj->", w, D, C, D))

    tied = build("gpt2")
    compress(tied, 0.3, "transformer.wte", calibration=cal, k=1)
    rows_only = build("gpt2")
    compress(rows_only, 0.3, "transformer.wte", sample_weight=w, k=1)
    # the truncated SVD of the whitened table is optimal for this error
    assert logit_error(tied) < 0.99 * logit_error(rows_only)


def test_a_family_without_sdpa_attention_loads_with_eager(tmp_path):
    # MPNet has no scaled_dot_product_attention: transformers refuses "sdpa"
    # for it, and the folder loads with eager attention instead, as a
    # transformers folder and as a sentence-transformers one
    import sentence_transformers as st

    from kflats.torch.io import load_model, load_pretrained, model_source

    folder = _folder_with_tokenizer(build("mpnet"), tmp_path / "mpnet")
    model, _ = load_pretrained(folder)
    assert type(model) is transformers.MPNetModel
    assert model.config._attn_implementation == "eager"
    modules = st.sentence_transformer.modules
    inner, pooling = (
        modules.Transformer(str(folder)),
        modules.Pooling(BERT["hidden_size"]),
    )
    st.SentenceTransformer(modules=[inner, pooling]).save(str(tmp_path / "st"))
    loaded = load_model(model_source(tmp_path / "st"))
    assert loaded.kind == "sentence-transformers"
    assert loaded.model[0].auto_model.config._attn_implementation == "eager"


def test_hushed_silences_the_gguf_conversion_bar(capfd):
    # transformers draws the bar of a GGUF file's conversion with tqdm
    # itself, out of reach of its own switch: under hushed it draws nothing
    from transformers import modeling_gguf_pytorch_utils as reader

    from kflats.torch.io._original import hushed

    title = "Converting and de-quantizing GGUF tensors..."
    with hushed():
        assert list(reader.tqdm(range(3), desc=title)) == [0, 1, 2]
    assert title not in capfd.readouterr().err
    list(reader.tqdm(range(3), desc=title))  # restored on exit
    assert title in capfd.readouterr().err


@pytest.mark.parametrize("family", FAMILIES)
def test_the_sensitivity_probe_replays_the_blocks_before_a_module(family):
    # the probe runs the model once per module; the blocks that finish before
    # the module's own block are replayed from the unchanged model's run, and
    # every sensitivity equals that of a whole forward pass per module
    from kflats.torch.compression._objectives import module_objectives
    from kflats.torch.compression._sensitivity import (
        _final_outputs,
        _output_distortion,
        _probe_batches,
        _probe_rank,
        _Replay,
        _rows_cols,
        _sensitivities,
        _truncated,
        _weight_spectrum,
    )
    from kflats.torch.layers import dense_weight

    model = build(family)
    names = adapter_for(model).all_targets()
    named = dict(model.named_modules())
    cal = calibrate(model, batches())
    objectives = module_objectives(cal, names, named, 1.0, 0.01)
    spectra = {n: _weight_spectrum(named[n], objectives[n]) for n in names}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    probe = _probe_batches(model, cal.probe)

    replay = _Replay(model)
    with replay.recording():
        reference = _final_outputs(model, probe)
    n_blocks = len(replay.blocks)
    assert n_blocks == LAYERS * (2 if family == "t5" else 1)
    assert len(replay.logs) == len(probe) and all(
        sorted(i for i, _ in log) == list(range(n_blocks)) for log in replay.logs
    )
    last = next(n for n in reversed(names) if n.startswith(replay.blocks[-1][0]))
    assert len(replay._skipped(0, last)) == n_blocks - 1
    assert replay._skipped(0, names[0]) == {}  # the embedding runs everything

    expected = {}
    for name in names:
        module = named[name]
        rank, rel = _probe_rank(spectra[name], *_rows_cols(module))
        weight = dense_weight(module)
        saved = weight.detach().clone()
        with torch.no_grad():
            weight.copy_(torch.as_tensor(_truncated(module, spectra[name], rank)))
        outputs = _final_outputs(model, probe)
        expected[name] = _output_distortion(outputs, reference) / rel
        with torch.no_grad():
            weight.copy_(saved)
    got = _sensitivities(model, names, named, spectra, cal.probe)
    assert got.keys() == expected.keys()
    np.testing.assert_allclose(
        [got[n] for n in names], [expected[n] for n in names], rtol=1e-5, atol=1e-12
    )
    assert any(v > 0 for v in got.values())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    # the blocks are themselves again
    assert not any("forward" in vars(block) for _, block in replay.blocks)


def test_the_plan_shows_its_progress(capfd):
    # the spectra and the sensitivity probes of the global allocation take
    # minutes on a real model: they show bars, as the fits do
    model = build("bert")
    cal = calibrate(model, batches())
    targets = adapter_for(model).all_targets()
    compress(model, 0.5, targets, calibration=cal, k=1, progress=True)
    err = capfd.readouterr().err
    for bar in ("kflats spectra", "kflats sensitivity", "kflats compress"):
        assert f"{bar}: 100%" in err, bar
    compress(build("bert"), 0.5, targets, calibration=cal, k=1, progress=False)
    assert "kflats" not in capfd.readouterr().err


@pytest.mark.parametrize("shape", [(6, 20), (20, 6), (12, 12), (3, 40)])
def test_a_weight_spectrum_is_its_truncated_svd_wide_or_tall(shape):
    # a Linear with more inputs than outputs takes the small Gram matrix's
    # eigenproblem: the same gains, and the same truncation, as an SVD
    from kflats.torch.compression._objectives import _Objective
    from kflats.torch.compression._sensitivity import _truncated, _weight_spectrum

    n, d = shape
    g = torch.Generator().manual_seed(n * d)
    layer = nn.Linear(d, n, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(n, d, generator=g) * torch.linspace(3, 0.1, d))
    X = torch.randn(4 * d, d, generator=g, dtype=torch.float64)
    moment = (X.T @ X).numpy()
    for objective in (None, _Objective(input_moment=moment, damping=0.01)):
        spectrum = _weight_spectrum(layer, objective)
        W = layer.weight.detach().double().numpy()
        if objective is None:
            A, back = W, np.eye(d)
        else:
            from kflats.factorize import damped_moment

            _, L = damped_moment(moment, d, 0.01)
            A, back = W @ L, np.linalg.inv(L)
        s = np.linalg.svd(A, compute_uv=False)
        assert spectrum.gains.shape == (d,)
        np.testing.assert_allclose(
            spectrum.gains[: s.size], s**2 / (s**2).sum(), atol=1e-12
        )
        assert np.all(spectrum.gains[s.size :] == 0)
        for rank in (1, min(n, d) // 2):
            U, s, Vt = np.linalg.svd(A, full_matrices=False)
            best = (U[:, :rank] * s[:rank]) @ Vt[:rank] @ back
            np.testing.assert_allclose(
                _truncated(layer, spectrum, rank), best, atol=1e-9
            )


def test_an_equal_model_on_equal_batches_is_probed_once():
    # kflats compress compresses copies of one model at several budgets: the
    # sensitivity probe runs once, and again for a model that differs
    import copy

    from kflats.torch.compression import _sensitivity
    from kflats.torch.compression._objectives import module_objectives

    model = build("bert")
    cal = calibrate(model, batches())
    names = adapter_for(model).all_targets()
    calls = []
    model.register_forward_pre_hook(lambda *a: calls.append(1))

    def measure(m):
        named = dict(m.named_modules())
        objectives = module_objectives(cal, names, named, 1.0, 0.01)
        spectra = _sensitivity._spectra(names, named, objectives)
        return _sensitivity._sensitivities(m, names, named, spectra, cal.probe)

    _sensitivity._MEASURED.clear()
    first = measure(model)
    assert len(calls) == len(cal.probe) * (1 + len(names))
    again = measure(copy.deepcopy(model))
    assert again == first and len(calls) == len(cal.probe) * (1 + len(names))
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.encoder.layer[1].output.dense.weight[0, 0] += 1e-3
    changed = measure(other)
    assert len(calls) == 2 * len(cal.probe) * (1 + len(names))
    assert changed != first
