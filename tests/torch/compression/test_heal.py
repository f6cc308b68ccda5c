"""heal on quantized layers: training through the rounding, packed forms kept."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch", reason="kflats.torch needs torch")

from torch import nn  # noqa: E402

from kflats.quantize import (  # noqa: E402
    quantize_module_,
    quantized_state,
    quantized_tensors,
    state_nbytes,
)
from kflats.torch import (  # noqa: E402
    ProjectiveEmbedding,
    ProjectiveLinear,
    compress,
    heal,
    load_compressed,
    save_compressed,
)
from kflats.torch.compression._heal import _through_the_rounding  # noqa: E402

from .test_calibrated import (  # noqa: E402
    TEXTS,
    Wider,
    assert_unchanged,
    clone,
    distance,
    snapshot,
    tiny,
    word_tokenizer,
)

PROJECTIVE = ["embed", "layers.*.up"]
DENSE = ["layers.0.down", "layers.1.down"]


def quantized_pair(bits=3, group_size=4):
    """A teacher, and its copy with projective factors and dense weights quantized."""
    teacher = tiny()
    model = clone(teacher)
    compress(
        model,
        0.5,
        PROJECTIVE,
        calibration=TEXTS,
        tokenizer=word_tokenizer,
        random_state=0,
        progress=False,
    )
    for name, module in model.named_modules():
        if isinstance(module, (ProjectiveEmbedding, ProjectiveLinear)) or name in DENSE:
            quantize_module_(module, bits, group_size, method="rtn")
    return teacher, model


def forms(model):
    """Everything of each packed matrix but its codes."""
    return {
        name: (qt.shape, qt.bits, qt.group_size, qt.axis, qt.nbytes, qt.scales.copy())
        for name, qt in quantized_tensors(model).items()
    }


def assert_same_forms(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert a[name][:5] == b[name][:5], name
        np.testing.assert_array_equal(a[name][5], b[name][5])


def codes(model):
    return {n: qt.codes.copy() for n, qt in quantized_tensors(model).items()}


def assert_on_the_grid(model):
    """Each quantized parameter holds exactly its packed tensor's values."""
    for name, qt in quantized_tensors(model).items():
        assert torch.equal(model.get_parameter(name), torch.from_numpy(qt.dequantize()))


def run_heal(model, teacher, steps=60, **kwargs):
    torch.manual_seed(0)
    options = {"batch_size": 4, "lr": 1e-2, "tokenizer": word_tokenizer, **kwargs}
    return heal(model, teacher, TEXTS, steps=steps, progress=False, **options)


def test_heal_through_the_rounding_keeps_bits_groups_and_bytes():
    teacher, model = quantized_pair()
    before, before_codes = forms(model), codes(model)
    nbytes = state_nbytes(quantized_state(model))
    names = {n for n, _ in model.named_parameters()}
    start = distance(model, teacher)
    losses = run_heal(model, teacher)
    assert len(losses) == 60
    # the loss goes down on the calibration text
    assert distance(model, teacher) < 0.8 * start
    assert np.mean(losses[-10:]) < np.mean(losses[:10])
    # the same packed forms, the same bytes; new codes, on their grid
    assert_same_forms(forms(model), before)
    assert state_nbytes(quantized_state(model)) == nbytes
    after_codes = codes(model)
    moved = [
        n for n in before_codes if not np.array_equal(after_codes[n], before_codes[n])
    ]
    assert moved and any(n.endswith(".weight") for n in moved)  # dense ones too
    assert_on_the_grid(model)
    # no parametrization left behind, every parameter where it was
    assert {n for n, _ in model.named_parameters()} == names
    assert all(p.requires_grad for p in model.parameters())
    assert not model.training


def reloaded(model, folder):
    """The model saved and loaded back, after checking it computes the same."""
    save_compressed(model, folder)
    fresh = load_compressed(folder, tiny(seed=1))
    ids = word_tokenizer(TEXTS[:5])
    with torch.no_grad():
        a, b = fresh(**ids)["last_hidden_state"], model(**ids)["last_hidden_state"]
    assert torch.equal(a, b)
    return fresh


def test_healed_quantized_model_round_trips_bit_for_bit(tmp_path):
    teacher, model = quantized_pair(bits=4)
    run_heal(model, teacher, steps=20)
    fresh = reloaded(model, tmp_path / "healed")
    assert_same_forms(forms(fresh), forms(model))


@pytest.mark.parametrize("trainable", ["compressed", "all"])
def test_heal_trains_the_scales_and_keeps_the_bytes(trainable, tmp_path):
    teacher, model = quantized_pair(bits=2)
    before = forms(model)
    nbytes = state_nbytes(quantized_state(model))
    start = distance(model, teacher)
    run_heal(model, teacher, steps=30, trainable=trainable, scales=True)
    after = forms(model)
    assert distance(model, teacher) < start
    assert state_nbytes(quantized_state(model)) == nbytes
    assert_on_the_grid(model)
    changed = 0
    for name in before:
        assert before[name][:5] == after[name][:5], name  # bits, groups, bytes
        assert after[name][5].dtype == before[name][5].dtype
        changed += not np.array_equal(after[name][5], before[name][5])
    assert changed == len(before)  # every matrix's scales trained
    # and the folder holds them: the same outputs after loading
    assert_same_forms(forms(reloaded(model, tmp_path / "healed")), after)
    with pytest.raises(ValueError, match="scales must be True or False"):
        run_heal(model, teacher, steps=2, scales=1)


def test_heal_projective_leaves_quantized_dense_layers():
    teacher, model = quantized_pair()
    before = codes(model)
    run_heal(model, teacher, steps=10, trainable="projective")
    after = codes(model)
    for name in before:
        same = np.array_equal(after[name], before[name])
        assert same == name.startswith(tuple(DENSE)), name
    assert_on_the_grid(model)


def test_heal_trains_a_model_quantized_without_factors():
    teacher = tiny()
    model = clone(teacher)
    for name in ["layers.0.up", *DENSE]:
        quantize_module_(model.get_submodule(name), 2, 4, method="rtn")
    with pytest.raises(ValueError, match="no ProjectiveEmbedding"):
        run_heal(model, teacher, steps=2, trainable="projective")
    bias = model.layers[0].up.bias.clone()
    before = forms(model)
    start = distance(model, teacher)
    run_heal(model, teacher, steps=40)
    assert distance(model, teacher) < start
    assert_same_forms(forms(model), before)
    assert_on_the_grid(model)
    assert torch.equal(model.layers[0].up.bias, bias)  # only the weights train


def test_heal_all_trains_quantized_weights_through_the_rounding():
    teacher, model = quantized_pair()
    norm = model.layers[0].norm.weight.clone()
    before = forms(model)
    run_heal(model, teacher, steps=5, trainable="all")
    assert not torch.equal(norm, model.layers[0].norm.weight)
    assert_same_forms(forms(model), before)
    assert_on_the_grid(model)


def test_heal_bad_teacher_leaves_a_quantized_model_untouched():
    teacher, model = quantized_pair()
    snap, before, before_codes = snapshot(model), forms(model), codes(model)
    with pytest.raises(ValueError, match="shape"):
        run_heal(model, Wider(), steps=2)
    assert_unchanged(model, snap)
    assert_same_forms(forms(model), before)
    assert all(np.array_equal(c, before_codes[n]) for n, c in codes(model).items())


def test_an_error_while_training_still_writes_back_the_packed_form():
    teacher, model = quantized_pair()
    before = forms(model)
    calls = []

    def failing(texts, **kwargs):
        calls.append(1)
        if len(calls) > 3:  # the shape check and two steps went through
            raise RuntimeError("tokenizer down")
        return word_tokenizer(texts, **kwargs)

    with pytest.raises(RuntimeError, match="tokenizer down"):
        heal(model, teacher, TEXTS, steps=9, lr=1e-2, tokenizer=failing)
    assert_same_forms(forms(model), before)
    assert_on_the_grid(model)
    assert not any("parametrizations" in n for n, _ in model.named_parameters())


@settings(max_examples=25, deadline=None)
@given(
    bits=st.sampled_from([2, 3, 4, 8]),
    seed=st.integers(0, 2**16),
    inside=st.floats(0.05, 0.95),
)
def test_straight_through_gradient_is_the_identity_within_the_grid(bits, seed, inside):
    """Inside the grid's range, d(loss)/d(latent) = d(loss)/d(rounded weight)."""
    gen = torch.Generator().manual_seed(seed)
    layer = nn.Linear(8, 3, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(3, 8, generator=gen))
    quantize_module_(layer, bits, 4, method="rtn")
    qt = quantized_tensors(layer)["weight"]
    scale = torch.from_numpy(np.repeat(qt.scales.astype(np.float32), 4, axis=1))
    zero = torch.from_numpy(np.repeat(qt.zeros.astype(np.float32), 4, axis=1))
    lo, hi = -zero * scale, ((1 << bits) - 1 - zero) * scale
    x = torch.randn(5, 8, generator=gen)
    upstream = torch.randn(5, 3, generator=gen)
    with _through_the_rounding(layer, [layer]) as params:
        (latent,) = params
        with torch.no_grad():  # a point strictly inside each group's range
            latent.copy_(lo + inside * (hi - lo))
        out = layer(x)
        out.backward(upstream)
        rounded = layer.weight.detach()
        # the forward sees the rounded weight, the latent gets its gradient
        torch.testing.assert_close(out, x @ rounded.T)
        torch.testing.assert_close(latent.grad, upstream.T @ x)
        step = (rounded - latent.detach()).abs()
        assert torch.all(step <= scale / 2 + 1e-6)
    assert_on_the_grid(layer)


HELD_OUT = [
    "seven green boxes wait by the river",
    "a tall clock rings twice at noon",
    "old maps fold into small squares",
    "the farmer counts his sheep at dusk",
]


def held_out_loss(model, teacher):
    """The heal's held-out measure, as heal computes it: the output's distortion."""
    from kflats.torch.models import adapter_for

    adapter = adapter_for(model)
    batch = adapter.tokenize(HELD_OUT, word_tokenizer, None)
    with torch.no_grad():
        out = adapter.final(adapter.run(dict(batch)))
        ref = adapter_for(teacher).final(adapter_for(teacher).run(dict(batch)))
        return float(adapter.distortion(out, ref, batch))


@pytest.mark.parametrize("lr", [1e-2, 3.0])
def test_heal_keeps_the_step_best_on_held_out_text(lr):
    """The model ends at the held-out measure's best step: never worse on the
    held-out texts than before the heal (a learning rate of 3 ruins it: the
    model is then left as it was, and the heal stops early)."""
    teacher, model = quantized_pair()
    snap, start = snapshot(model), held_out_loss(model, teacher)
    losses = run_heal(
        model, teacher, steps=40, lr=lr, validation=HELD_OUT, eval_every=5,
        patience=2,
    )  # fmt: skip
    steps, measures = zip(*losses.validation, strict=True)
    assert steps[0] == 0 and measures[0] == pytest.approx(start, rel=1e-5)
    best = int(np.argmin(measures))
    assert losses.best_step == steps[best]
    assert held_out_loss(model, teacher) == pytest.approx(measures[best], rel=1e-4)
    assert held_out_loss(model, teacher) <= start * (1 + 1e-5)
    assert_on_the_grid(model)
    if lr > 1:
        assert losses.best_step == 0 and losses.stopped_early
        assert len(losses) < 40
        assert_unchanged(model, snap)
    else:
        assert losses.best_step > 0 and measures[best] < start


def test_heal_without_held_out_text_keeps_its_last_step():
    teacher, model = quantized_pair()
    losses = run_heal(model, teacher, steps=6)
    assert losses.validation == [] and losses.best_step == 6
    assert not losses.stopped_early


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"validation": TEXTS[:2]}, ValueError, "apart from data; 2 are in both"),
        ({"validation": []}, ValueError, "validation must be a non-empty"),
        ({"validation": "a text"}, TypeError, "validation must be a list"),
        ({"validation": HELD_OUT, "eval_every": 0}, ValueError, "eval_every"),
        ({"validation": HELD_OUT, "patience": 0}, ValueError, "patience"),
    ],
)
def test_heal_bad_held_out_options_leave_the_model_untouched(kwargs, error, match):
    teacher, model = quantized_pair()
    snap, before = snapshot(model), codes(model)
    with pytest.raises(error, match=match):
        run_heal(model, teacher, steps=4, **kwargs)
    assert_unchanged(model, snap)
    assert all(np.array_equal(c, before[n]) for n, c in codes(model).items())
