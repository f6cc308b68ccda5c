"""Tests of kflats.torch: the projective layers and compress (persistence: test_io)."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="kflats.torch needs torch")

from torch import nn  # noqa: E402

from kflats.factorize import (  # noqa: E402
    ProjectiveFactors,
    factorize,
    factorize_linear,
)
from kflats.torch import (  # noqa: E402
    CompressionReport,
    ProjectiveEmbedding,
    ProjectiveLinear,
    compress,
)


def random_factors(
    n, d, ranks, *, affine=False, dtype=np.float32, seed=0, transposed=False
):
    """Factors of an (n x d) matrix with the given ranks and a random partition."""
    rng = np.random.default_rng(seed)
    k = len(ranks)
    labels = rng.permutation(np.arange(n) % k)
    U, V = [], []
    for c, r in enumerate(ranks):
        n_c = int(np.sum(labels == c))
        q, _ = np.linalg.qr(rng.normal(size=(d, max(r, 1))))
        V.append(q[:, :r].T.astype(dtype))
        U.append(rng.normal(size=(n_c, r)).astype(dtype))
    means = rng.normal(size=(k, d)).astype(dtype) if affine else None
    return ProjectiveFactors(labels, tuple(U), tuple(V), means, transposed=transposed)


def run_python(code):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


# --------------------------------------------------------------------------
# optional dependency


def test_import_kflats_never_imports_torch():
    result = run_python(
        """
        import sys
        import kflats, kflats.factorize
        assert "torch" not in sys.modules, "import kflats imported torch"
        """
    )
    assert result.returncode == 0, result.stderr


def test_import_kflats_torch_without_torch_says_what_to_install():
    result = run_python(
        """
        import sys

        class NoTorch:  # as if torch were not installed
            def find_spec(self, name, path=None, target=None):
                if name == "torch" or name.startswith("torch."):
                    raise ImportError(f"No module named {name!r}")

        sys.meta_path.insert(0, NoTorch())
        try:
            import kflats.torch
        except ImportError as exc:
            print("MESSAGE:", exc)
        else:
            raise SystemExit("kflats.torch imported without torch")
        """
    )
    assert result.returncode == 0, result.stderr
    assert "pip install kflats[torch]" in result.stdout


# --------------------------------------------------------------------------
# ProjectiveEmbedding


@pytest.mark.parametrize("affine", [False, True])
def test_embedding_forward_equals_reconstruct(affine):
    f = random_factors(50, 12, (5, 0, 3, 12), affine=affine)
    layer = ProjectiveEmbedding.from_factors(f)
    expected = f.reconstruct()
    with torch.no_grad():
        got = layer(torch.arange(50)).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    # any shape of ids, with repeats; the grad path gives the same result
    ids = torch.tensor([[3, 3, 49, 0], [7, 3, 0, 21]])
    out = layer(ids)
    assert out.requires_grad and out.shape == (2, 4, 12)
    np.testing.assert_allclose(
        out.detach().numpy(), expected[ids.numpy()], rtol=1e-5, atol=1e-5
    )


def test_embedding_rejects_out_of_range_ids():
    layer = ProjectiveEmbedding(10, 4, ranks=(2, 2))
    with pytest.raises(IndexError):
        layer(torch.tensor([10]))
    with pytest.raises(IndexError):
        layer(torch.tensor([-1]))


def test_from_embedding_keeps_dtype_padding_and_fits():
    torch.manual_seed(0)
    emb = nn.Embedding(120, 10, padding_idx=3, dtype=torch.float64)
    layer = ProjectiveEmbedding.from_embedding(emb, k=3, j=4, random_state=0)
    assert layer.padding_idx == 3
    assert layer.bases.dtype == torch.float64
    assert all(U.dtype == torch.float64 for U in layer.coefficients)
    assert layer.bases.device == emb.weight.device
    assert layer.k == 3 and layer.ranks == (4, 4, 4)
    # the same fit through factorize gives the same table
    f = factorize(emb.weight.detach().numpy(), 3, 4, random_state=0)
    with torch.no_grad():
        np.testing.assert_allclose(
            layer(torch.arange(120)).numpy(), f.reconstruct(), atol=1e-10
        )
    assert layer.factorization_error == pytest.approx(f.error)


def test_from_embedding_bad_input():
    with pytest.raises(TypeError, match="embedding must be a torch.nn.Embedding"):
        ProjectiveEmbedding.from_embedding(nn.Linear(3, 3), k=1, j=1)
    with pytest.raises(ValueError, match="max_norm"):
        ProjectiveEmbedding.from_embedding(nn.Embedding(10, 4, max_norm=1.0), k=1, j=1)
    with pytest.raises(ValueError, match="budget"):
        ProjectiveEmbedding.from_embedding(nn.Embedding(10, 4), budget=0.01)
    with pytest.raises(ValueError, match="transposed"):
        ProjectiveEmbedding.from_factors(random_factors(10, 4, (2,), transposed=True))


def test_embedding_to_dense_and_repr():
    f = random_factors(30, 6, (2, 3), affine=True)
    layer = ProjectiveEmbedding.from_factors(f, padding_idx=0)
    dense = layer.to_dense()
    assert type(dense) is nn.Embedding and dense.padding_idx == 0
    np.testing.assert_allclose(
        dense.weight.detach().numpy(), f.reconstruct(), atol=1e-5
    )
    text = repr(layer)
    assert "k=2" in text and "ranks=(2, 3)" in text and "padding_idx=0" in text
    assert f"compression={f.compression:.3f}" in text
    assert layer.n_params == f.n_params


def test_embedding_padding_row_gets_no_gradient():
    f = random_factors(20, 5, (2, 2))
    layer = ProjectiveEmbedding.from_factors(f, padding_idx=4)
    layer(torch.tensor([4, 4])).sum().backward()
    assert all(U.grad is None or not U.grad.any() for U in layer.coefficients)
    assert layer.bases.grad is None or not layer.bases.grad.any()
    layer.zero_grad()
    layer(torch.tensor([4, 5])).sum().backward()
    assert layer.bases.grad.abs().sum() > 0


# --------------------------------------------------------------------------
# ProjectiveLinear


@pytest.mark.parametrize("affine", [False, True])
def test_linear_forward_equals_reconstruct(affine):
    f = random_factors(40, 9, (3, 0, 9), affine=affine, transposed=True)
    bias = torch.randn(9)
    layer = ProjectiveLinear.from_factors(f, bias)
    x = torch.randn(2, 3, 40)
    expected = x.numpy() @ f.reconstruct() + bias.numpy()
    np.testing.assert_allclose(
        layer(x).detach().numpy(), expected, rtol=1e-4, atol=1e-4
    )
    nobias = ProjectiveLinear.from_factors(f)
    assert nobias.bias is None
    np.testing.assert_allclose(
        nobias(x).detach().numpy(), x.numpy() @ f.reconstruct(), rtol=1e-4, atol=1e-4
    )


def test_from_linear_matches_factorize_linear_and_keeps_bias():
    torch.manual_seed(0)
    linear = nn.Linear(30, 8)
    layer = ProjectiveLinear.from_linear(linear, k=2, j=3, side="input", random_state=0)
    f = factorize_linear(
        linear.weight.detach().numpy(), 2, 3, side="input", random_state=0
    )
    assert torch.equal(layer.bias, linear.bias)
    assert layer.bias is not linear.bias
    x = torch.randn(5, 30)
    expected = x.numpy() @ f.reconstruct() + linear.bias.detach().numpy()
    np.testing.assert_allclose(
        layer(x).detach().numpy(), expected, rtol=1e-4, atol=1e-5
    )
    np.testing.assert_allclose(
        layer.to_dense().weight.detach().numpy(),
        f.reconstruct().T,
        rtol=1e-4,
        atol=1e-6,
    )
    assert "in_features=30, out_features=8, k=2, ranks=(3, 3)" in repr(layer)
    assert layer.factorization_error == pytest.approx(f.error)


def test_from_linear_clusters_input_features():
    # input features come from 3 groups, each spanning a 2-dim subspace of R^12
    rng = np.random.default_rng(0)
    WT = np.vstack(
        [rng.normal(size=(20, 2)) @ rng.normal(size=(2, 12)) for _ in range(3)]
    ).astype(np.float32)
    linear = nn.Linear(60, 12, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.from_numpy(WT.T))
    layer = ProjectiveLinear.from_linear(linear, k=3, j=2, side="input", random_state=0)
    assert layer.factorization_error < 1e-8
    assert sorted(layer.sizes) == [20, 20, 20]
    x = torch.randn(4, 60)
    torch.testing.assert_close(layer(x), linear(x), rtol=1e-4, atol=1e-4)


def test_from_linear_bad_input():
    with pytest.raises(TypeError, match="linear must be a torch.nn.Linear"):
        ProjectiveLinear.from_linear(nn.Embedding(4, 4), k=1, j=1)
    with pytest.raises(ValueError, match="side must be"):
        ProjectiveLinear(10, 4, ranks=(2,), side="rows")
    with pytest.raises(ValueError, match="bias must have shape"):
        ProjectiveLinear.from_factors(
            random_factors(10, 4, (2,), transposed=True), torch.zeros(5)
        )
    with pytest.raises(ValueError, match="ranks must lie"):
        ProjectiveLinear(10, 4, ranks=(5,))
    with pytest.raises(ValueError, match="labels must lie"):
        ProjectiveLinear(4, 4, ranks=(1, 1), labels=[0, 1, 2, 0])


def test_from_linear_follows_dtype():
    linear = nn.Linear(16, 6, dtype=torch.float64)
    layer = ProjectiveLinear.from_linear(linear, k=2, j=3, random_state=0)
    assert layer.bases.dtype == torch.float64 and layer.bias.dtype == torch.float64
    assert layer(torch.randn(2, 16, dtype=torch.float64)).dtype == torch.float64


# --------------------------------------------------------------------------
# both layers: training, state dict, torch.compile


def _layers():
    emb = ProjectiveEmbedding.from_factors(random_factors(40, 8, (3, 2)))
    lin = ProjectiveLinear.from_factors(
        random_factors(24, 8, (3, 2), transposed=True), torch.zeros(8)
    )
    return [(emb, torch.randint(0, 40, (6, 5))), (lin, torch.randn(6, 24))]


@pytest.mark.parametrize("which", [0, 1])
def test_training_changes_factors_and_lowers_loss(which):
    torch.manual_seed(0)
    layer, x = _layers()[which]
    target = torch.randn(*x.shape[: x.ndim - (which == 1)], 8)
    before = [p.detach().clone() for p in layer.parameters()]
    opt = torch.optim.Adam(layer.parameters(), lr=0.05)
    losses = []
    for _ in range(20):
        opt.zero_grad()
        loss = ((layer(x) - target) ** 2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]
    assert all(
        not torch.equal(a, b)
        for a, b in zip(before, layer.parameters(), strict=True)
        if a.numel()
    )
    assert not torch.equal(before[-1 if which == 0 else -2], layer.bases)


@pytest.mark.parametrize("which", [0, 1])
def test_state_dict_round_trip(which):
    layer, x = _layers()[which]
    state = layer.state_dict()
    assert "labels" in state and "bases" in state and "coefficients.0" in state
    cls = type(layer)
    shape = (
        (layer.num_embeddings, layer.embedding_dim)
        if which == 0
        else (layer.in_features, layer.out_features)
    )
    fresh = cls(*shape, layer.ranks, layer.labels.clone())
    assert not torch.equal(fresh(x), layer(x))
    fresh.load_state_dict(state)
    assert torch.equal(fresh(x), layer(x))
    # another partition with the same sizes: the index buffers follow the labels
    other = cls(*shape, layer.ranks, layer.labels.flip(0))
    if tuple(other.sizes) == tuple(layer.sizes):
        other.load_state_dict(state)
        assert torch.equal(other(x), layer(x))
    # a partition of other sizes cannot hold these factors
    wrong = cls(*shape, (*layer.ranks, 1))
    with pytest.raises(RuntimeError):
        wrong.load_state_dict(state)


def test_layers_move_with_to():
    layer, x = _layers()[0]
    layer = layer.to(torch.float64)
    assert layer.bases.dtype == torch.float64
    assert layer.labels.dtype == torch.uint8  # the smallest that holds k
    assert layer(x).dtype == torch.float64


@pytest.mark.parametrize("which", [0, 1])
def test_torch_compile(which):
    torch._dynamo.reset()
    layer, x = _layers()[which]
    compiled = torch.compile(layer, backend="aot_eager")
    expected = layer(x)
    torch.testing.assert_close(compiled(x), expected)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), expected)
    compiled(x).sum().backward()
    assert layer.bases.grad is not None


# --------------------------------------------------------------------------
# compress


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(150, 16, padding_idx=0)
        self.block = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16))
        self.norm = nn.LayerNorm(16)

    def forward(self, ids):
        return self.norm(self.block(self.embed(ids))).mean(1)


def _snapshot(model):
    return (
        [(n, type(m)) for n, m in model.named_modules()],
        {k: v.clone() for k, v in model.state_dict().items()},
    )


def _assert_unchanged(model, snapshot):
    modules, state = _snapshot(model)
    assert modules == snapshot[0]
    assert state.keys() == snapshot[1].keys()
    assert all(torch.equal(state[k], snapshot[1][k]) for k in state)


def test_compress_by_type_and_pattern():
    model = Tiny()
    ids = torch.randint(0, 150, (4, 7))
    reference = model(ids)
    report = compress(
        model,
        budget=0.7,
        targets=[nn.Embedding, "block.2"],
        k=2,
        allocation="uniform",
        side="input",
        random_state=0,
    )
    assert isinstance(report, CompressionReport)
    assert [m.name for m in report] == ["embed", "block.2"]
    assert isinstance(model.embed, ProjectiveEmbedding)
    assert isinstance(model.block[2], ProjectiveLinear)
    assert type(model.block[0]) is nn.Linear
    assert model.embed.padding_idx == 0
    emb_report = report[0]
    assert emb_report.kind == "Embedding" and emb_report.shape == (150, 16)
    assert emb_report.params_before == 150 * 16
    assert emb_report.params_after == model.embed.n_params <= 0.7 * 150 * 16
    assert emb_report.k == model.embed.k and emb_report.ranks == model.embed.ranks
    assert 0 <= emb_report.error < 1 and emb_report.seconds >= 0
    assert report[1].shape == (16, 32)
    assert report[1].params_before == 32 * 16 + 16
    assert report[1].params_after == model.block[2].n_params + 16
    assert report.params_after < report.params_before
    assert "embed" in str(report) and "block.2" in str(report)
    out = model(ids)
    assert out.shape == reference.shape
    assert not torch.equal(out, reference)


def test_compress_hf_default_target():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=300,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
    )
    torch.manual_seed(0)
    model = transformers.BertModel(config).eval()
    ids = torch.randint(1, 300, (2, 9))
    reference = model(input_ids=ids).last_hidden_state
    wrapper = nn.Sequential(model)  # found inside a wrapper too
    report = compress(wrapper, budget=0.6, k=2, random_state=0)
    assert [m.name for m in report] == ["0.embeddings.word_embeddings"]
    assert isinstance(model.get_input_embeddings(), ProjectiveEmbedding)
    out = model(input_ids=ids).last_hidden_state
    cos = torch.nn.functional.cosine_similarity(out, reference, dim=-1)
    assert cos.mean() > 0.5


def test_compress_progress_bar(capsys):
    compress(
        Tiny(),
        budget=0.5,
        targets=["block.0", "block.2"],
        k=1,
        allocation="uniform",
        progress=True,
    )
    assert "kflats compress" in capsys.readouterr().err
    compress(Tiny(), budget=0.5, targets="block.0", k=1)
    assert "kflats compress" not in capsys.readouterr().err


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"targets": "nothing.*"}, ValueError, "matches no module"),
        ({"targets": ["embed", nn.Conv1d]}, ValueError, "matches no module"),
        ({"targets": ["embed", "norm"]}, TypeError, r"norm \(LayerNorm\)"),
        ({"targets": "block"}, TypeError, r"block \(Sequential\)"),
        ({"targets": [nn.Linear], "budget": 0.05}, ValueError, "cannot be met"),
        ({"allocation": "per-layer"}, ValueError, "'allocation' parameter .* must be"),
        ({"ranks": "equal"}, ValueError, "'ranks' parameter .* must be"),
        ({"targets": "embed", "budget": 1.5}, ValueError, "'budget' .* must be"),
        ({"targets": 3}, TypeError, "'targets' parameter .* must be"),
        ({"targets": None}, ValueError, "get_input_embeddings"),
    ],
)
def test_compress_bad_input_leaves_model_unchanged(kwargs, error, match):
    model = Tiny()
    snapshot = _snapshot(model)
    kwargs = {"budget": 0.5, **kwargs}
    with pytest.raises(error, match=match):
        compress(model, k=1, **kwargs)
    _assert_unchanged(model, snapshot)


def test_compress_failing_fit_leaves_model_unchanged(monkeypatch):
    model = Tiny()
    snapshot = _snapshot(model)

    def broken(*args, **kwargs):
        raise RuntimeError("fit failed")

    monkeypatch.setattr(ProjectiveLinear, "from_factors", broken)
    with pytest.raises(RuntimeError, match="fit failed"):
        compress(
            model,
            budget=0.5,
            targets=[nn.Embedding, nn.Linear],
            k=1,
            allocation="uniform",
        )
    _assert_unchanged(model, snapshot)


# -- token_frequencies -----------------------------------------------------------


def _word_length_tokenizer(texts):
    return {"input_ids": [[len(word) for word in t.split()] for t in texts]}


def test_token_frequencies_counts_ids():
    from kflats.torch import token_frequencies

    w = token_frequencies(
        _word_length_tokenizer, ["a bb a", "ccc dd"], vocab_size=4, smoothing=0.5
    )
    np.testing.assert_array_equal(w, [0.5, 2.5, 2.5, 1.5])


@pytest.mark.parametrize(
    "texts, kwargs, error, match",
    [
        ("one string", {}, TypeError, "iterable of strings"),
        ([], {}, ValueError, "non-empty"),
        (["ok", 3], {}, ValueError, "non-empty iterable of strings"),
        (["a"], {"smoothing": -1.0}, ValueError, "smoothing must be >= 0"),
        (["a"], {"vocab_size": 0}, ValueError, "vocab_size must be a positive"),
        (["aaaa"], {"vocab_size": 3}, ValueError, r"outside \[0, vocab_size=3\)"),
    ],
)
def test_token_frequencies_rejects_bad_input(texts, kwargs, error, match):
    from kflats.torch import token_frequencies

    kwargs.setdefault("vocab_size", 10)
    with pytest.raises(error, match=match):
        token_frequencies(_word_length_tokenizer, texts, **kwargs)


# --------------------------------------------------------------------------
# the tied head, the shared embedding, Conv1D, the weight spec


def test_tied_head_computes_the_dense_logits_through_the_shared_factors():
    from kflats.torch import ProjectiveTiedHead
    from kflats.torch.functional import projective_tied_logits

    torch.manual_seed(0)
    for affine in (False, True):
        emb = ProjectiveEmbedding(60, 8, ranks=(3, 1, 2), affine=affine)
        with torch.no_grad():
            if affine:
                emb.means.normal_()
        dense = nn.Linear(8, 60)
        head = ProjectiveTiedHead.tie(emb, dense)
        assert head.bias is dense.bias  # the same parameter, not a copy
        h = torch.randn(2, 5, 8)
        table = emb.to_dense().weight
        expected = h @ table.T + dense.bias
        assert torch.allclose(head(h), expected, atol=1e-5)
        args = (emb._place, list(emb.coefficients), emb.bases, dense.bias)
        assert torch.equal(projective_tied_logits(h, *args, emb.means), head(h))
    # the head owns no factor: they are the embedding's, trained through both
    assert [n for n, _ in head.named_parameters()] == ["bias"]
    assert head.n_params == 60 and head.embedding is emb
    head(torch.randn(3, 8)).sum().backward()
    assert emb.bases.grad is not None and emb.bases.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="tied head must be"):
        ProjectiveTiedHead.tie(emb, nn.Linear(8, 59))
    with pytest.raises(TypeError, match="ProjectiveEmbedding"):
        ProjectiveTiedHead(nn.Embedding(60, 8))


def test_tied_head_follows_the_embedding_through_copies_and_moves():
    import copy

    from kflats.torch import ProjectiveTiedHead

    model = nn.Module()
    model.emb = ProjectiveEmbedding(30, 4, ranks=(2, 2))
    model.head = ProjectiveTiedHead(model.emb)
    twin = copy.deepcopy(model)
    assert twin.head.embedding is twin.emb and twin.emb is not model.emb
    twin.double()
    assert twin.head(torch.randn(1, 4, dtype=torch.float64)).dtype == torch.float64


def test_shared_embedding_looks_up_through_its_source():
    from kflats.torch.layers import SharedEmbedding

    emb = ProjectiveEmbedding(30, 4, ranks=(2, 2), padding_idx=0)
    alias = SharedEmbedding(emb)
    ids = torch.tensor([[0, 5, 29]])
    assert torch.equal(alias(ids), emb(ids))
    assert (alias.num_embeddings, alias.embedding_dim, alias.padding_idx) == (30, 4, 0)
    assert not list(alias.parameters()) and not alias.state_dict()


def test_projective_layers_expose_the_weight_dtype_and_device():
    from kflats.torch import WeightSpec

    linear = ProjectiveLinear(8, 4, ranks=(2, 2), dtype=torch.float64)
    emb = ProjectiveEmbedding(10, 3, ranks=(1,))
    assert isinstance(linear.weight, WeightSpec)
    assert not torch.is_tensor(linear.weight)
    assert linear.weight.shape == (4, 8) and linear.weight.dtype == torch.float64
    assert linear.weight.device == torch.device("cpu")
    assert emb.weight.shape == (10, 3) and emb.weight.size(1) == 3
    linear.float()
    assert linear.weight.dtype == torch.float32  # read live, never stored


def test_from_linear_takes_a_gpt2_conv1d():
    pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    conv = Conv1D(12, 20)  # 20 inputs, 12 outputs, weight stored 20 x 12
    with torch.no_grad():
        conv.bias.normal_()
    layer = ProjectiveLinear.from_linear(conv, k=1, j=12, random_state=0)
    x = torch.randn(3, 20)
    assert (layer.in_features, layer.out_features) == (20, 12)
    assert torch.allclose(layer(x), conv(x), atol=1e-5)  # full rank: exact
    small = ProjectiveLinear.from_linear(conv, budget=0.5, k=2, random_state=0)
    linear = nn.Linear(20, 12)
    with torch.no_grad():
        linear.weight.copy_(conv.weight.T)
        linear.bias.copy_(conv.bias)
    same = ProjectiveLinear.from_linear(linear, budget=0.5, k=2, random_state=0)
    assert torch.allclose(small(x), same(x), atol=1e-5)
    with pytest.raises(TypeError, match="Conv1D"):
        ProjectiveLinear.from_linear(nn.Conv1d(2, 2, 1))


@pytest.mark.parametrize("ranks", [(3,), (2, 0, 4), tuple(range(1, 6)) * 60])
@pytest.mark.parametrize("affine", [False, True])
def test_size_formula_counts_what_a_layer_stores(ranks, affine):
    from kflats._size import factors_size

    n, d = 600, 8
    ranks = tuple(min(r, d) for r in ranks)
    layer = ProjectiveEmbedding(n, d, ranks, affine=affine)
    size = factors_size(layer.sizes, layer.ranks, d, affine)
    assert size.numbers == layer.n_params
    # a checkpoint keeps one cluster id per row even for one cluster
    state = sum(t.numel() * t.element_size() for t in layer.state_dict().values())
    assert size.bytes(32, rows=n) == state
