"""The packed inference form of the projective layers equals the grouped form."""

import copy
import pickle

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.nn.utils import parametrize

from kflats.torch import ProjectiveEmbedding, ProjectiveLinear
from kflats.torch import functional as F
from kflats.torch.layers._packed import EMBEDDING_PACKED_TOKENS


def _grouped_linear(layer, x):
    if layer.side == "output":
        return F.projective_linear_output(
            x,
            layer._place,
            list(layer.coefficients),
            layer.bases,
            layer.bias,
            layer.means,
        )
    return F.projective_linear(
        x,
        layer._order,
        layer.sizes,
        list(layer.coefficients),
        layer.bases,
        layer.bias,
        layer.means,
    )


def _grouped_embedding(layer, ids):
    return F.projective_embedding(
        ids,
        layer._place,
        layer.sizes,
        list(layer.coefficients),
        layer.bases,
        layer.means,
    )


@st.composite
def linear_layers(draw):
    side = draw(st.sampled_from(["input", "output"]))
    in_features = draw(st.integers(1, 24))
    out_features = draw(st.integers(1, 24))
    n = in_features if side == "input" else out_features
    d = out_features if side == "input" else in_features
    k = draw(st.integers(1, 4))
    ranks = draw(st.lists(st.integers(0, d), min_size=k, max_size=k))
    labels = draw(st.lists(st.integers(0, k - 1), min_size=n, max_size=n))
    torch.manual_seed(draw(st.integers(0, 2**16)))
    layer = ProjectiveLinear(
        in_features,
        out_features,
        ranks,
        torch.tensor(labels),
        side=side,
        bias=draw(st.booleans()),
        affine=draw(st.booleans()),
        dtype=torch.float64,
    )
    if layer.means is not None:
        with torch.no_grad():
            layer.means.normal_()
    return layer


@settings(max_examples=60, deadline=None)
@given(layer=linear_layers(), rows=st.integers(0, 5), seed=st.integers(0, 99))
def test_packed_linear_equals_grouped(layer, rows, seed):
    x = torch.randn(
        rows,
        2,
        layer.in_features,
        dtype=torch.float64,
        generator=torch.Generator().manual_seed(seed),
    )
    with torch.no_grad():
        packed = layer(x)
        grouped = _grouped_linear(layer, x)
    assert layer._packed_cache.value is not None  # the packed form ran
    assert packed.shape == grouped.shape == (rows, 2, layer.out_features)
    torch.testing.assert_close(packed, grouped, rtol=1e-12, atol=1e-12)


@st.composite
def embeddings(draw):
    n = draw(st.integers(1, 40))
    d = draw(st.integers(1, 12))
    k = draw(st.integers(1, 4))
    ranks = draw(st.lists(st.integers(0, d), min_size=k, max_size=k))
    labels = draw(st.lists(st.integers(0, k - 1), min_size=n, max_size=n))
    torch.manual_seed(draw(st.integers(0, 2**16)))
    layer = ProjectiveEmbedding(
        n,
        d,
        ranks,
        torch.tensor(labels),
        affine=draw(st.booleans()),
        dtype=torch.float64,
    )
    if layer.means is not None:
        with torch.no_grad():
            layer.means.normal_()
    return layer


@settings(max_examples=60, deadline=None)
@given(layer=embeddings(), data=st.data())
def test_packed_embedding_equals_grouped(layer, data):
    shape = data.draw(st.lists(st.integers(0, 4), min_size=1, max_size=3))
    assert int(torch.tensor(shape).prod()) <= EMBEDDING_PACKED_TOKENS
    ids = torch.tensor(
        data.draw(
            st.lists(
                st.integers(0, layer.num_embeddings - 1),
                min_size=int(torch.tensor(shape).prod()),
                max_size=int(torch.tensor(shape).prod()),
            )
        ),
        dtype=torch.long,
    ).reshape(shape)
    with torch.no_grad():
        packed = layer(ids)
        grouped = _grouped_embedding(layer, ids)
    assert layer._packed_cache.value is not None
    assert packed.shape == grouped.shape == (*shape, layer.embedding_dim)
    torch.testing.assert_close(packed, grouped, rtol=1e-12, atol=1e-12)


def test_many_tokens_take_the_grouped_form():
    layer = ProjectiveEmbedding(300, 64, ranks=(8,) * 4)
    ids = torch.randint(0, 300, (2, EMBEDDING_PACKED_TOKENS))
    with torch.no_grad():
        out = layer(ids)
    assert layer._packed_cache.value is None
    torch.testing.assert_close(out, _grouped_embedding(layer, ids))


@pytest.mark.parametrize("side", ["input", "output"])
def test_packed_form_follows_the_factors(side):
    layer = ProjectiveLinear(12, 10, (3, 2), side=side, affine=True)
    x = torch.randn(4, 12)
    with torch.no_grad():
        layer(x)
        layer.coefficients[1].mul_(3.0)  # in place: same tensor, new version
        assert torch.allclose(layer(x), _grouped_linear(layer, x), atol=1e-6)
        layer.bases = torch.nn.Parameter(torch.randn_like(layer.bases))
        assert torch.allclose(layer(x), _grouped_linear(layer, x), atol=1e-6)
    layer.load_state_dict(
        {k: v * 2 for k, v in layer.state_dict().items() if k != "labels"}
        | {"labels": layer.labels}
    )
    with torch.no_grad():
        assert torch.allclose(layer(x), _grouped_linear(layer, x), atol=1e-5)
        double = layer.double()
        assert double(x.double()).dtype == torch.float64


def test_gradients_reach_the_factors():
    layer = ProjectiveLinear(12, 10, (3, 2), affine=True)
    emb = ProjectiveEmbedding(20, 12, (2, 3), affine=True)
    with torch.no_grad():  # a packed form built before training starts
        layer(emb(torch.tensor([1, 2])))
    layer(emb(torch.tensor([[1, 2, 15]]))).sum().backward()
    for module in (layer, emb):
        for p in (module.bases, module.means, *module.coefficients):
            assert p.grad is not None and p.grad.abs().sum() > 0


def test_a_parametrized_factor_is_read_at_each_call():
    class Double(torch.nn.Module):
        def forward(self, x):
            return 2 * x

    layer = ProjectiveLinear(8, 6, (2, 2))
    x = torch.randn(3, 8)
    with torch.no_grad():
        before = layer(x)
    parametrize.register_parametrization(layer, "bases", Double())
    with torch.no_grad():
        after = layer(x)
    torch.testing.assert_close(after, 2 * (before - layer.bias) + layer.bias)


def test_copies_and_pickles_start_without_the_packed_form():
    layer = ProjectiveLinear(8, 6, (2, 2))
    with torch.no_grad():
        layer(torch.randn(1, 8))
    assert layer._packed_cache.value is not None
    for other in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert other._packed_cache.value is None
        x = torch.randn(2, 8)
        with torch.no_grad():
            torch.testing.assert_close(other(x), layer(x))
