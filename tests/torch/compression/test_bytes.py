"""Tests of compress with a budget in bytes: forms, the plan, the report."""

import copy
import os
import re

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch", reason="kflats.torch needs torch")

from torch import nn  # noqa: E402

from kflats.quantize import (  # noqa: E402
    factors_nbytes,
    form_nbytes,
    quantized_state,
    quantized_tensors,
    state_nbytes,
)
from kflats.torch import (  # noqa: E402
    CompressionConfig,
    ProjectiveLinear,
    calibrate,
    compress,
)
from kflats.torch.compression import saved_nbytes  # noqa: E402
from kflats.torch.compression._folder_bytes import FolderBudget  # noqa: E402
from kflats.torch.compression._form_errors import _ModuleForms  # noqa: E402
from kflats.torch.compression._forms import _Form, _forms  # noqa: E402
from kflats.torch.compression._objectives import module_objectives  # noqa: E402
from kflats.torch.compression._plan_bytes import _plan_bytes, _predicted  # noqa: E402
from kflats.torch.compression._sensitivity import _weight_spectrum  # noqa: E402

from .._helpers import (  # noqa: E402
    SENTENCES,
    TinyEncoder,
    assert_unchanged,
    snapshot,
    tiny_bert,
    tokenizer_for,
    weight_files,
)

# a tiny encoder with rows of 32, so that groups of 32 divide them
tokenizer = tokenizer_for(64)
TEXTS = SENTENCES[:6] * 3
TARGETS = [nn.Embedding, nn.Linear]
# every width a plan may hold (5 bits: GGUF's Q5_0 and Q5_1)
ALL_BITS = (8, 6, 5, 4, 3, 2)


def tiny(seed=0, low_rank=False):
    torch.manual_seed(seed)
    model = TinyEncoder(vocab=64, d=32).eval()
    if low_rank:  # weights of rank 4: factors pay
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, (nn.Linear, nn.Embedding)):
                    n, d = m.weight.shape
                    m.weight.copy_(torch.randn(n, 4) @ torch.randn(4, d) / 4)
    return model


@pytest.fixture(scope="module")
def cal_model():
    model = tiny(low_rank=True)
    return model, calibrate(model, TEXTS, tokenizer=tokenizer, targets=TARGETS)


# -- the plan, on synthetic forms -------------------------------------------


@st.composite
def module_forms(draw):
    """Forms of a few modules: float, dense at each bit width, factors (k >= 1)."""
    all_forms = []
    for _ in range(draw(st.integers(1, 4))):
        full = draw(st.integers(1000, 100_000))
        forms = [_Form("float", None, None, None, full, 0.0)]
        for b in ALL_BITS:
            err = draw(st.floats(0, 1, allow_nan=False))
            forms.append(_Form("dense", b, 32, None, full * b // 32 + 40, err))
            if draw(st.booleans()):  # the same bits with float16 zero points
                err = draw(st.floats(0, 1, allow_nan=False))
                size = full * b // 32 + 60
                forms.append(_Form("dense", b, 32, None, size, err, 1, "float16"))
        for r in range(draw(st.integers(0, 6))):
            size = draw(st.integers(10, full))
            err = draw(st.floats(0, 1, allow_nan=False))
            k = draw(st.sampled_from((1, 4, 16)))
            forms.append(_Form("projective", 4, 32, r + 1, size, err, k))
        all_forms.append(forms)
    scales = draw(
        st.lists(
            st.floats(0, 10, allow_nan=False),
            min_size=len(all_forms),
            max_size=len(all_forms),
        )
    )
    return all_forms, scales


@settings(max_examples=200, deadline=None)
@given(module_forms(), st.floats(0, 1.2))
def test_the_plan_never_exceeds_the_budget(case, fraction):
    all_forms, scales = case
    least = sum(min(f.nbytes for f in forms) for forms in all_forms)
    full = sum(forms[0].nbytes for forms in all_forms)
    allowed = int(least + fraction * (full - least))
    chosen = _plan_bytes(all_forms, scales, allowed, ALL_BITS)
    assert sum(f[i].nbytes for f, i in zip(all_forms, chosen, strict=True)) <= allowed


def _forms_of(kinds, sizes, errors, zeros=None):
    """A module's forms: kinds, bytes and errors side by side (bits from the
    kind "dense:b"), zero points uint8 unless ``zeros`` says."""
    zeros = zeros or ["uint8"] * len(kinds)
    out = []
    for kind, size, err, zero in zip(kinds, sizes, errors, zeros, strict=True):
        kind, _, bits = kind.partition(":")
        if kind == "float":
            out.append(_Form("float", None, None, None, size, err))
        elif kind == "dense":
            out.append(_Form("dense", int(bits), 32, None, size, err, 1, zero))
        else:
            out.append(_Form("projective", int(bits), 32, 1, size, err))
    return out


# a dense form off its module's convex hull (3 bits, float16 zero points) that
# only a greedy from a uniform start among the forms without factors reaches
_OFF_THE_HULL = (
    [
        _forms_of(
            ["float", *(f"dense:{b}" for b in (8, 6, 5, 4, 3, 3, 2)), "proj:4"],
            [1530, 422, 326, 279, 231, 183, 203, 135, 184],
            [0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.5, 0.75, 0.0],
            ["uint8"] * 6 + ["float16"] + ["uint8"] * 2,
        ),
        _forms_of(
            ["float", *(f"dense:{b}" for b in (8, 6, 5, 4, 3, 2))],
            [1000, 290, 227, 196, 165, 133, 102],
            [0.0] * 7,
        ),
    ],
    [1.0, 0.0],
)


@settings(max_examples=200, deadline=None)
@given(module_forms(), st.floats(0, 1.2))
@example(case=_OFF_THE_HULL, fraction=0.0625)
def test_the_probe_runs_a_plan_without_factors_whenever_one_fits(case, fraction):
    """Factor forms' errors are modelled: the plans the probe runs hold the best
    plan of dense forms alone (the greedy among them) whenever one fits."""
    from kflats.torch.compression._plan_bytes import _plan_candidates
    from kflats.torch.compression._probe_plans import checked_plans

    all_forms, scales = case
    dense = [[f for f in forms if f.kind != "projective"] for forms in all_forms]
    least = sum(min(f.nbytes for f in forms) for forms in dense)
    full = sum(forms[0].nbytes for forms in all_forms)
    allowed = int(least + fraction * (full - least))
    candidates = _plan_candidates(all_forms, scales, allowed, ALL_BITS)
    plans = checked_plans(
        [{i: all_forms[i][j] for i, j in enumerate(c)} for c in candidates]
    )
    free = [p for p in plans if all(f.kind != "projective" for f in p.values())]
    assert free
    best_dense = _plan_bytes(dense, scales, allowed, ALL_BITS)
    best = _predicted(dense, scales, best_dense)
    assert (
        min(
            _predicted(all_forms, scales, c)
            for c in candidates
            if all(all_forms[i][j].kind != "projective" for i, j in enumerate(c))
        )
        <= best + 1e-12
    )


def test_a_dense_form_that_factors_hide_is_kept_for_the_plan_without_factors():
    """A dense form off the module's hull (a factor form beats it) but on the
    hull of its dense forms: the plan without factors takes it, so it is kept."""
    from kflats.torch.compression._plan_bytes import _plan_candidates, _plannable

    forms = [
        _Form("float", None, None, None, 1000, 0.0),
        _Form("dense", 2, 32, None, 100, 0.9),
        _Form("dense", 4, 32, None, 160, 0.5),
        _Form("dense", 4, 32, None, 170, 0.1, 1, "float16"),
        _Form("projective", 4, 32, 8, 165, 0.05),
        _Form("dense", 8, 32, None, 290, 0.01),
    ]
    plans = _plan_candidates([forms], [1.0], 175, ALL_BITS)
    assert [3] in plans  # the plan without factors
    assert 3 in _plannable(forms, ALL_BITS)


@settings(max_examples=200, deadline=None)
@given(module_forms(), st.floats(0, 1.2))
def test_every_form_a_candidate_plan_takes_is_kept(case, fraction):
    """Once measured, a module keeps the quantized weights of the forms a plan
    can take (:func:`_plannable`): every candidate plan's forms are among them."""
    from kflats.torch.compression._plan_bytes import _plan_candidates, _plannable

    all_forms, scales = case
    least = sum(min(f.nbytes for f in forms) for forms in all_forms)
    full = sum(forms[0].nbytes for forms in all_forms)
    allowed = int(least + fraction * (full - least))
    kept = [set(_plannable(forms, ALL_BITS)) for forms in all_forms]
    for plan in _plan_candidates(all_forms, scales, allowed, ALL_BITS):
        assert all(i in k for i, k in zip(plan, kept, strict=True))


@settings(max_examples=200, deadline=None)
@given(module_forms(), st.sampled_from(ALL_BITS), st.integers(0, 500))
def test_uniform_quantization_is_a_point_of_the_search(case, bits, extra):
    all_forms, scales = case
    uniform = [
        next(i for i, f in enumerate(forms) if f.kind == "dense" and f.bits == bits)
        for forms in all_forms
    ]
    size = sum(f[i].nbytes for f, i in zip(all_forms, uniform, strict=True))
    chosen = _plan_bytes(all_forms, scales, size + extra, ALL_BITS)
    assert _predicted(all_forms, scales, chosen) <= _predicted(
        all_forms, scales, uniform
    )


def test_uniform_quantization_wins_where_the_greedy_from_the_smallest_loses():
    # hull (10, 1.0) -> (20, 0.6) -> (100, 0): at 100 bytes the greedy from
    # the smallest forms stops at 2 x 0.6, uniform int4 holds 2 x 0.5
    forms = [
        _Form("float", None, None, None, 100, 0.0),
        _Form("dense", 4, 32, None, 50, 0.5),
        _Form("dense", 2, 32, None, 10, 1.0),
        _Form("projective", 4, 32, 8, 20, 0.6),
    ]
    chosen = _plan_bytes([forms, forms], [1.0, 1.0], 100, (4, 2))
    assert chosen == [1, 1]


def test_uniform_inside_the_search_on_measured_forms(cal_model):
    model, cal = cal_model
    named = dict(model.named_modules())
    names = [n for n, m in named.items() if isinstance(m, (nn.Linear, nn.Embedding))]
    objectives = module_objectives(cal, names, named, 1.0, 1e-2)
    from kflats.torch.compression._config import _search_options_of

    config = CompressionConfig(1.0, unit="bytes", ranks="uniform", random_state=0)
    options = _search_options_of(config)
    all_forms = []
    for name in names:
        forms = _forms(named[name], (8, 6, 4, 3, 2), None)
        spectrum = _weight_spectrum(named[name], objectives[name])
        measured = _ModuleForms(
            named[name], name, objectives[name], spectrum, forms, (1,), config, options
        )
        all_forms.append(measured.forms)
    scales = [1.0] * len(names)
    for bits in (8, 4, 2):
        uniform = [
            next(i for i, f in enumerate(fs) if f.kind == "dense" and f.bits == bits)
            for fs in all_forms
        ]
        size = sum(f[i].nbytes for f, i in zip(all_forms, uniform, strict=True))
        chosen = _plan_bytes(all_forms, scales, size, (8, 6, 4, 3, 2))
        best = _predicted(all_forms, scales, chosen)
        assert best <= _predicted(all_forms, scales, uniform)
        # low-rank weights: factors beat uniform quantization outright
        assert best < 0.5 * _predicted(all_forms, scales, uniform)


def test_wide_dense_forms_are_modelled_from_four_bits_quantized_on_demand(cal_model):
    from kflats.torch.compression._config import _search_options_of
    from kflats.torch.compression._form_errors import _dense_key, _step_ratio

    model, cal = cal_model
    named = dict(model.named_modules())
    names = [n for n, m in named.items() if isinstance(m, nn.Linear)]
    objectives = module_objectives(cal, names, named, 1.0, 1e-2)
    config = CompressionConfig(1.0, unit="bytes", ranks="uniform", random_state=0)
    options = _search_options_of(config)
    for name in names:
        module = named[name]
        forms = _forms(module, (8, 6, 4, 3, 2), None)
        measured = _ModuleForms(
            module, name, objectives[name], None, forms, (), config, options
        )
        dense = {_dense_key(f): f for f in measured.forms if f.kind == "dense"}
        assert {b for b, *_ in dense} == {8, 6, 4, 3, 2}
        # the narrow forms quantized and measured; the wide ones modelled
        assert {b for b, *_ in measured.dense_q} == {4, 3, 2}
        for (bits, group, zero, _), form in dense.items():
            if bits <= 4:
                continue
            # (modelled from the 4-bit form of its groups, either scales)
            (four,) = [f for k, f in dense.items() if k[:3] == (4, group, zero)]
            assert form.error == four.error * _step_ratio(4, bits)
            # quantized when asked for: the model within a factor 2 of it
            assert _dense_key(form) not in measured.dense_q
            weight = measured.dense_weight(form)
            assert _dense_key(form) in measured.dense_q
            truth = measured.measure(weight.numpy())
            assert 0.5 * truth <= form.error <= 2 * truth


@settings(max_examples=200, deadline=None)
@given(
    st.sets(st.sampled_from((2, 3, 4, 5, 6, 8)), min_size=1),
    st.sets(st.sampled_from((2, 3, 4, 5, 6, 8))),
    st.sets(st.sampled_from((2, 3, 4, 5, 6, 8))),
)
def test_the_factor_noise_plan_never_measures_more_widths(asked, known, held):
    from kflats.torch.compression._form_errors import _noise_plan

    key = lambda b: (16, b, 32)  # noqa: E731
    available = {key(b) for b in held | asked | known}
    keys, known = {key(b) for b in asked - known}, {key(b) for b in known}
    measured, modelled = _noise_plan(keys, known, available)
    # each key asked measured or modelled from widths measured now or before
    assert keys <= measured | set(modelled)
    assert not measured & known and measured <= available
    for anchors in modelled.values():
        assert set(anchors) <= measured | known
    # never more widths quantized than measuring each key asked
    assert len(measured) <= len(keys)


def test_factor_noise_is_modelled_from_two_and_four_bits():
    from kflats.torch.compression._config import _search_options_of
    from kflats.torch.compression._form_errors import _noise_key, _step_ratio

    rng = np.random.default_rng(0)
    table = nn.Embedding(600, 64)
    with torch.no_grad():  # a decaying spectrum: rounding noise at every rank
        table.weight.copy_(
            torch.as_tensor(rng.normal(size=(600, 64)) / np.arange(1, 65) ** 0.5)
        )
    config = CompressionConfig(0.2, unit="bytes", bits=(5, 4, 3, 2), ranks="uniform")
    forms = _forms(table, config.bits, None)
    measured = _ModuleForms(
        table,
        "t",
        None,
        _weight_spectrum(table, None),
        forms,
        (1,),
        config,
        _search_options_of(config),
    )
    noise = measured.noise
    assert {b for _, b, _ in noise} == {5, 4, 3, 2}
    for k, b, g in noise:
        if b == 3:
            assert noise[k, 3, g] == pytest.approx(
                np.sqrt(noise[k, 2, g] * noise[k, 4, g])
            )
        if b == 5:
            assert noise[k, 5, g] == pytest.approx(noise[k, 4, g] * _step_ratio(4, 5))
    # the model within a factor 1.5 of the noise measured at 3 and 5 bits
    factors = [f for f in measured.forms if f.kind == "projective" and f.bits in (3, 5)]
    truth = measured._rounding_noise(factors, measured.tails)
    for key, rho in truth.items():
        assert rho > 0 and truth[key] / 1.5 <= noise[key] <= 1.5 * truth[key]
    assert {_noise_key(f) for f in factors} == set(truth)


def test_clustered_factors_take_the_noise_of_k1_measured_once(monkeypatch):
    """Factors with k > 1 clusters take k = 1's rounding noise at the same bits
    and groups, whichever a plan asks for first: it is measured once, on the
    k = 1 factors."""
    from kflats.torch.compression._config import _search_options_of
    from kflats.torch.compression._form_errors import _noise_key

    rng = np.random.default_rng(0)
    table = nn.Embedding(600, 64)
    with torch.no_grad():
        table.weight.copy_(
            torch.as_tensor(rng.normal(size=(600, 64)) / np.arange(1, 65) ** 0.5)
        )
    config = CompressionConfig(0.2, unit="bytes", bits=(4, 2), ranks="uniform")
    measured = _ModuleForms(
        table, "t", None, _weight_spectrum(table, None),
        _forms(table, config.bits, None), (1, 4), config,
        _search_options_of(config), lazy=True,
    )  # fmt: skip
    keys = {_noise_key(f) for f in measured.forms if f.kind == "projective"}
    clustered = sorted(k for k in keys if k[0] == 4 and k[1] is not None)
    assert clustered and all((1, b, g) in keys for _, b, g in clustered)
    calls = []
    original = _ModuleForms._rounding_noise

    def spy(self, forms, tails):
        calls.append({_noise_key(f) for f in forms})
        return original(self, forms, tails)

    monkeypatch.setattr(_ModuleForms, "_rounding_noise", spy)
    _, b, g = clustered[0]
    measured.measure_noise({(4, b, g)})  # k = 4 asked first
    assert calls == [{(1, b, g)}]
    assert measured.noise[4, b, g] == measured.noise[1, b, g] > 0
    measured.measure_noise({(1, b, g)})  # then k = 1: known already
    assert len(calls) == 1
    assert not any(measured.is_pending(f) for f in measured.forms if f.bits == b)


# -- compress in bytes -------------------------------------------------------


def test_factors_nbytes_counts_the_forms_of_the_plan():
    model = tiny()
    forms = _forms(model.layers[0].up, (8, 4), None)
    assert forms[0].nbytes == form_nbytes(model.layers[0].up)
    r = next(f for f in forms if f.kind == "projective" and f.bits == 4)
    assert r.group_size == 8 and r.rank == 8
    assert r.nbytes == factors_nbytes([64], [8], 32, 4, 8, bias=64)


def test_dense_forms_include_wider_groups():
    linear = nn.Linear(256, 16)
    # 5 bits (no uniform peer's) in the groups of 4 bits, priced exactly
    dense = {
        (f.bits, f.group_size, f.zero_dtype): f.nbytes
        for f in _forms(linear, (5,), None)
        if f.kind == "dense"
    }
    assert set(dense) == {(5, 32, "uint8"), (5, 128, "uint8")}
    assert all(n == form_nbytes(linear, b, g) for (b, g, _), n in dense.items())
    # codes; a float16 scale a group; the zero points at 5 bits; meta; the bias
    groups = 16 * 8
    assert dense[5, 32, "uint8"] == (
        16 * 256 * 5 // 8 + groups * 2 + groups * 5 // 8 + 8 * 5 + 16 * 4
    )
    forms = _forms(linear, (4, 3), None)
    dense = {
        (f.bits, f.group_size): f.nbytes
        for f in forms
        if f.kind == "dense" and f.zero_dtype == "uint8"
    }
    assert set(dense) == {(4, 32), (4, 128), (3, 32), (3, 128)}
    assert all(n == form_nbytes(linear, b, g) for (b, g), n in dense.items())
    assert dense[4, 128] < dense[4, 32] and dense[3, 128] < dense[3, 32]
    # and GGUF's Q4_1 layout: 4 bits in groups of 32, float16 zero points
    (q41,) = [f for f in forms if f.zero_dtype == "float16"]
    assert (q41.kind, q41.bits, q41.group_size) == ("dense", 4, 32)
    assert q41.nbytes == form_nbytes(linear, 4, 32, zero_dtype="float16")
    groups = 16 * 256 // 32  # two bytes a group, for 4 bits
    assert q41.nbytes == dense[4, 32] + 2 * groups - groups * 4 // 8
    # a given group size is the only one
    forms = _forms(linear, (4,), 64)
    assert [f.group_size for f in forms if f.kind == "dense"] == [64]


@pytest.mark.parametrize("bits", [4, 5])
def test_a_budget_below_the_peers_groups_takes_wider_groups(tmp_path, bits):
    from kflats.torch import load_compressed, save_compressed

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 64))  # full rank: factors do not pay
    # the tensors of groups of 128 (compact scales, as kflats' folder stores
    # them), and a header's 600 bytes at most
    compact = {"compact_scales": True}
    size = form_nbytes(model[0], bits, 128, **compact) + 600
    assert size < form_nbytes(model[0], bits, 32, **compact)
    report = compress(model, size, [nn.Linear], unit="bytes", bits=(bits,))
    (m,) = report
    assert (m.form, m.bits, m.group_size, m.compact_scales) == ("dense", bits, 128, 1)
    nbytes = form_nbytes(model[0], bits, 128, **compact)
    assert state_nbytes(quantized_state(model)) == m.bytes_after == nbytes
    assert report.folder_bytes <= size
    assert quantized_tensors(model[0])["weight"].group_size == 128
    # the folder: the plan's bytes, and the same model back
    save_compressed(model, tmp_path / "m")
    assert report.model_bytes <= weight_files(tmp_path / "m") <= report.folder_bytes
    back = load_compressed(tmp_path / "m", nn.Sequential(nn.Linear(256, 64)))
    x = torch.randn(3, 256)
    assert torch.equal(back(x), model(x))


@pytest.mark.parametrize("budget", [0.3, 0.2, 0.15])
def test_compress_in_bytes_keeps_to_the_budget(cal_model, budget):
    base, cal = cal_model
    model = copy.deepcopy(base)
    report = compress(
        model, budget, TARGETS, calibration=cal, unit="bytes", random_state=0
    )
    # a fraction of the whole model's bytes, the LayerNorms' included
    assert report.size_asked == int(budget * saved_nbytes(base))
    assert report.folder_bytes <= report.size_asked
    assert report.model_bytes == saved_nbytes(model)
    named = dict(model.named_modules())
    on_disk = 0
    for m in report:
        layer = named[m.name]
        # the report's bytes are those of the packed state a save writes
        assert m.bytes_after == state_nbytes(quantized_state(layer))
        on_disk += m.bytes_after
        if m.bits is not None:
            tensors = quantized_tensors(layer)
            assert tensors and all(qt.bits == m.bits for qt in tensors.values())
        assert m.form in ("dense", "projective")
        if m.form == "projective":
            # quantized layers equal their dense reconstruction
            dense = layer.to_dense()
            x = torch.randn(3, layer.in_features) if m.kind == "Linear" else None
            if x is not None:
                torch.testing.assert_close(layer(x), dense(x), rtol=1e-4, atol=1e-5)
    assert on_disk == report.bytes_after
    # low-rank weights: the plan takes factors
    assert any(m.form == "projective" for m in report)
    batch = tokenizer(TEXTS[:3])
    out = model(**batch)["last_hidden_state"]
    assert torch.isfinite(out).all()


def test_a_byte_count_and_the_report_config_round_trip(cal_model):
    base, cal = cal_model
    model = copy.deepcopy(base)
    size = 12_000
    report = compress(
        model, size, TARGETS, calibration=cal, unit="bytes", random_state=0
    )
    assert report.bytes_after <= size
    config = report.config
    assert config.unit == "bytes" and config.budget == size
    assert CompressionConfig.from_dict(config.to_dict()) == config
    entry = report.to_dict()["modules"][0]
    assert {"form", "bits", "group_size", "bytes_before", "bytes_after"} <= set(entry)
    again = copy.deepcopy(base)
    report2 = compress(again, config, calibration=cal)
    assert [m.bytes_after for m in report2] == [m.bytes_after for m in report]
    assert [(m.form, m.bits, m.ranks) for m in report2] == [
        (m.form, m.bits, m.ranks) for m in report
    ]


def test_without_calibration_and_a_projective_layer_is_quantized():
    model = tiny(low_rank=True)
    # the embedding and LayerNorms stay float32: 0.21 of the model's bytes
    total = saved_nbytes(model)
    report = compress(model, 0.4, nn.Linear, unit="bytes", bits=(4,))
    assert report.folder_bytes <= 0.4 * total
    named = dict(model.named_modules())
    assert any(m.bits == 4 for m in report)
    for m in report:
        layer = named[m.name]
        assert m.bits in (None, 4)
        assert bool(quantized_tensors(layer)) == (m.bits == 4)
        assert isinstance(layer, ProjectiveLinear) == (m.form == "projective")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"bits": (7,)}, r"'bits' parameter .* must be None or a non-empty sequence"),
        ({"bits": ()}, r"'bits' parameter .* must be"),
        ({"group_size": 24}, r"group_size=24 does not divide"),
        ({"group_size": 0}, r"'group_size' parameter .* must be"),
        ({"k": {"layers.0.up": 4}}, r"k=4 for 'layers.0.up': with unit='bytes'"),
        ({"k": 65}, r"k=65 for 'embed': at most its 64 rows"),
        ({"affine": True}, r"affine"),
    ],
)
def test_bad_input_names_the_parameter_and_leaves_the_model(kwargs, match):
    model = tiny()
    snap = snapshot(model)
    with pytest.raises(ValueError, match=match):
        compress(model, 0.2, TARGETS, unit="bytes", **kwargs)
    assert_unchanged(model, snap)


@pytest.mark.parametrize("allocation", ["global", "uniform"])
def test_a_budget_below_the_smallest_forms_says_the_minimum(allocation):
    model = tiny()
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"smallest size reachable is \d+ bytes") as e:
        compress(model, 0.001, TARGETS, unit="bytes", allocation=allocation)
    assert "\n" not in str(e.value)
    need = int(re.search(r"reachable is (\d+) bytes", str(e.value)).group(1))
    assert_unchanged(model, snap)
    # a byte less is refused, that minimum is met
    with pytest.raises(ValueError, match=f"reachable is {need} bytes"):
        compress(model, need - 1, TARGETS, unit="bytes", allocation=allocation)
    assert_unchanged(model, snap)
    report = compress(model, need, TARGETS, unit="bytes", allocation=allocation)
    assert report.folder_bytes <= need


@pytest.mark.parametrize("progress", [False, True])
def test_the_sensitivity_bar_follows_progress(cal_model, progress, capsys, monkeypatch):
    """progress=False (kflats compress --quiet) hides every bar of the search,
    the sensitivity probe's too, however large the model."""
    from kflats.torch.compression import _sensitivity

    monkeypatch.setattr(_sensitivity, "_PROGRESS_NUMBERS", 0)
    # measured anew, not taken from an earlier test's equal probe
    monkeypatch.setattr(_sensitivity, "_MEASURED", type(_sensitivity._MEASURED)())
    base, cal = cal_model
    model = copy.deepcopy(base)
    compress(model, 0.2, TARGETS, calibration=cal, unit="bytes", progress=progress)
    assert ("kflats sensitivity" in capsys.readouterr().err) == progress


def test_a_byte_count_needs_unit_bytes():
    with pytest.raises(ValueError, match=r"'budget' .* float in the range \(0\.0, 1"):
        CompressionConfig(5000)
    assert CompressionConfig(5000, unit="bytes").budget == 5000
    assert isinstance(CompressionConfig(1, unit="bytes").budget, float)


def test_numbers_reports_name_their_forms():
    model = tiny()
    report = compress(model, 0.5, nn.Linear, k=1, random_state=0)
    assert all(m.form in ("projective", "dense") and m.bits is None for m in report)
    assert np.isfinite([m.error for m in report]).all()


# -- save and load: packed codes on disk, the same outputs -------------------


def sequential(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Embedding(96, 32),
        nn.Linear(32, 64),
        nn.ReLU(),
        nn.Linear(64, 32),
    )
    with torch.no_grad():  # rank 4: some modules take factors
        model[1].weight.copy_(torch.randn(64, 4) @ torch.randn(4, 32) / 4)
    return model.eval()


def folder_bytes(path):
    return sum(p.stat().st_size for p in path.rglob("*.safetensors"))


@pytest.mark.parametrize("budget", [0.12, 0.3])
def test_save_load_is_bit_identical_and_stores_the_codes(tmp_path, budget):
    from safetensors import safe_open

    from kflats.torch import load_compressed, save_compressed

    model = sequential()
    report = compress(
        model, budget, [nn.Embedding, nn.Linear], unit="bytes", random_state=0
    )
    assert {m.form for m in report} == {"dense", "projective"} or budget == 0.3
    path = tmp_path / "m"
    save_compressed(model, path)
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
    for key in quantized_tensors(model):
        assert key not in keys and {f"{key}.codes", f"{key}.meta"} <= keys
    # bytes on disk: the report's tensors, and safetensors' header
    assert report.model_bytes <= folder_bytes(path) <= report.folder_bytes
    assert report.folder_bytes <= report.size_asked == int(budget * 29056)
    loaded = load_compressed(path, sequential(seed=1))
    ids = torch.randint(0, 96, (4, 9))
    assert torch.equal(loaded(ids), model(ids))
    # the loaded model knows its codes: a second save writes the same tensors
    again = tmp_path / "again"
    save_compressed(loaded, again)
    assert folder_bytes(again) == folder_bytes(path)


def test_load_rejects_a_packed_tensor_that_disagrees_with_kflats_json(tmp_path):
    import json

    from kflats.torch import load_compressed, save_compressed

    model = sequential()
    compress(model, 0.2, [nn.Embedding, nn.Linear], unit="bytes", bits=(4,))
    path = tmp_path / "m"
    save_compressed(model, path)
    manifest = json.loads((path / "kflats.json").read_text())
    key = next(iter(manifest["quantized"]))
    for field, value, match in [
        ("bits", 7, "bits must be one of"),
        ("bits", 8, "entry in kflats.json says"),
        ("group_size", 7, "group_size must be a divisor"),
        ("shape", [1], "shape must be a list of 2"),
    ]:
        bad = json.loads(json.dumps(manifest))
        bad["quantized"][key][field] = value
        (path / "kflats.json").write_text(json.dumps(bad))
        target = sequential(seed=1)
        snap = snapshot(target)
        with pytest.raises(ValueError, match=match):
            load_compressed(path, target)
        assert_unchanged(target, snap)


def _tiny_bert(transformers):
    """A tiny BertModel, seeded, in eval mode."""
    return tiny_bert(transformers)


def test_tiny_bert_round_trip_in_bytes(tmp_path):
    transformers = pytest.importorskip("transformers")
    from kflats.torch import load_compressed, save_compressed

    model = _tiny_bert(transformers)
    report = compress(
        model, 0.15, [nn.Embedding, nn.Linear], unit="bytes", random_state=0
    )
    path = tmp_path / "bert"
    save_compressed(model, path)
    ids = torch.randint(5, 300, (2, 11))
    loaded = load_compressed(path)
    assert torch.equal(
        loaded(input_ids=ids).last_hidden_state, model(input_ids=ids).last_hidden_state
    )
    # the folder's weights: the report's tensors, and headers within the bound
    assert report.model_bytes <= folder_bytes(path) <= report.folder_bytes
    assert report.folder_bytes <= report.size_asked


def test_uniform_allocation_keeps_each_module_to_its_share():
    model = tiny(low_rank=True)
    names = [n for n, m in model.named_modules() if isinstance(m, tuple(TARGETS))]
    budget = FolderBudget(model, names, 0.2)
    named = dict(model.named_modules())
    full = {n: budget.priced(n, _forms(named[n], (8,), None)[0]).nbytes for n in names}
    report = compress(model, 0.2, TARGETS, unit="bytes", allocation="uniform")
    assert report.folder_bytes <= report.size_asked == budget.asked
    # each module within its share of what the rest of the folder leaves
    for m in report:
        share = budget.room * full[m.name] / sum(full.values())
        assert m.bytes_after < share


def probe_distortion(model, base, cal):
    from kflats.torch.compression._sensitivity import _final_outputs, _output_distortion

    batches = [{k: torch.as_tensor(v) for k, v in b.items()} for b in cal.probe]
    return _output_distortion(
        _final_outputs(model, batches), _final_outputs(base, batches)
    )


@pytest.mark.parametrize("bits", [4, 3])
def test_never_worse_than_uniform_quantization_on_the_probe(cal_model, bits):
    from kflats.quantize import quantize_module_
    from kflats.torch.compression._measure import _quantize_kw

    base, cal = cal_model
    named = dict(base.named_modules())
    names = [n for n, m in named.items() if isinstance(m, (nn.Linear, nn.Embedding))]
    objectives = module_objectives(cal, names, named, 1.0, 1e-2)
    uniform = copy.deepcopy(base)
    for name, module in uniform.named_modules():
        if name in names:
            group = 32 if bits <= 4 else 64
            quantize_module_(
                module, bits, group, **_quantize_kw(module, objectives[name])
            )
    # the folder of uniform quantization, its offsets at more digits than
    # they need
    budget = FolderBudget(base, names, 10 * saved_nbytes(uniform))
    size = budget.rest + budget.frame
    for name in names:
        dense = [f for f in _forms(named[name], (bits,), 32) if f.kind == "dense"]
        size += budget.priced(name, dense[0]).nbytes
    assert saved_nbytes(uniform) < size
    model = copy.deepcopy(base)
    report = compress(
        model, size, TARGETS, calibration=cal, unit="bytes", random_state=0
    )
    assert report.folder_bytes <= size
    assert probe_distortion(model, base, cal) <= probe_distortion(uniform, base, cal)


# -- k > 1 clusters of an embedding's rows ------------------------------------


def clustered_table(seed=0, k=8, rank=3, rows=512, d=32):
    """An Embedding whose rows lie on k random rank-``rank`` subspaces."""
    rng = np.random.default_rng(seed)
    blocks = [
        rng.normal(size=(rows // k, rank)) @ rng.normal(size=(rank, d))
        for _ in range(k)
    ]
    table = nn.Embedding(rows, d)
    with torch.no_grad():
        table.weight.copy_(torch.as_tensor(np.vstack(blocks), dtype=torch.float32))
    return nn.Sequential(table).eval()


def test_clustered_forms_count_their_bytes_and_errors_exactly():
    from kflats.torch.compression._config import _search_options_of
    from kflats.torch.compression._partition import _Partition

    model = clustered_table()
    table = model[0]
    config = CompressionConfig(0.1, unit="bytes", k=8, ranks="uniform", random_state=0)
    part = _Partition(table, None, 8, _search_options_of(config))
    tail = part.tail()
    # rows on 8 subspaces of rank 3: exact at rank 3, not at rank 2
    assert tail[2] < 1e-10 < tail[1]
    layer = part.layer(2)
    assert layer.k == 8 and layer.factorization_error == pytest.approx(tail[1])
    W = table.weight.detach().double()
    err = ((layer.to_dense().weight.detach().double() - W) ** 2).sum() / (W**2).sum()
    assert float(err) == pytest.approx(tail[1], rel=1e-4)
    assert factors_nbytes(part.sizes, [2] * 8, 32, None) == form_nbytes(layer)


@pytest.mark.parametrize("bits", [(8,), (4, 3)])
def test_compress_in_bytes_takes_clusters_where_rows_cluster(bits):
    model = clustered_table()
    report = compress(model, 0.2, nn.Embedding, unit="bytes", k=(1, 8), bits=bits)
    (m,) = report
    assert m.form == "projective" and m.k == 8 and m.bits in (None, *bits)
    assert report.folder_bytes <= 0.2 * m.bytes_before  # the only tensors
    layer = model[0]
    assert m.bytes_after == state_nbytes(quantized_state(layer))
    assert m.error < 0.05
    ids = torch.arange(512).reshape(8, 64)
    torch.testing.assert_close(layer(ids), layer.to_dense()(ids))


def test_k_one_alone_cannot_take_clusters():
    model = clustered_table()
    report = compress(model, 0.2, nn.Embedding, unit="bytes", k=1, bits=(8,))
    assert report[0].k in (0, 1)
    assert report[0].error > 0.05


def test_clusters_alone_measure_their_own_rounding_noise():
    from kflats.torch.compression._config import _search_options_of
    from kflats.torch.compression._form_errors import _ModuleForms

    model = clustered_table()
    config = CompressionConfig(0.2, unit="bytes", k=8, ranks="uniform")
    options = _search_options_of(config)
    table = model[0]
    forms = _forms(table, config.bits, None)
    measured = _ModuleForms(
        table, "0", None, _weight_spectrum(table, None), forms, (8,), config, options
    )
    factors = [f for f in measured.forms if f.kind == "projective"]
    assert factors and {f.k for f in factors} == {8}
    assert {f.bits for f in factors} == {None, 4, 3, 2}
    # exact at rank >= 3 in float32, rounding noise only at b bits
    for f in factors:
        if f.rank >= 3:
            assert (f.error < 1e-9) == (f.bits is None)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.integers(1, 40), min_size=1, max_size=6),
    st.integers(2, 24),
    st.integers(0, 2**31 - 1),
)
def test_shared_ranks_keep_more_than_uniform_ranks_in_as_many_numbers(sizes, d, seed):
    from kflats.factorize._spectra import _Cluster, kept_numbers, residual_error
    from kflats.torch.compression._forms import _capped, _shared_ranks

    rng = np.random.default_rng(seed)
    clusters = []
    for s in sizes:
        m = min(s, d)
        evals = np.sort(rng.exponential(size=m) * rng.exponential())[::-1]
        clusters.append(_Cluster(np.arange(s), None, evals, np.eye(d)[:, :m]))
    levels = _shared_ranks(clusters, sizes, d)
    assert len(levels) == d
    for r, ranks in enumerate(levels, start=1):
        uniform = _capped(r, sizes)
        assert all(1 <= q <= min(s, d) for q, s in zip(ranks, sizes, strict=True))
        assert kept_numbers(sizes, ranks, d, False) <= kept_numbers(
            sizes, uniform, d, False
        )
        assert residual_error(clusters, ranks) <= residual_error(clusters, uniform) * (
            1 + 1e-12
        )
    # unequal spectra: the numbers go where the error is
    big = _Cluster(np.arange(10), None, np.full(8, 100.0), np.eye(8))
    small = _Cluster(np.arange(10), None, np.full(8, 1.0), np.eye(8))
    assert _shared_ranks([big, small], [10, 10], 8)[3] == [7, 1]


# -- a size is the folder's: every tensor, and the headers --------------------


def smallest_size(model, targets, **kwargs):
    """The smallest size reachable, as the error of a size of 2 bytes says it."""
    with pytest.raises(ValueError, match="smallest size reachable") as info:
        compress(copy.deepcopy(model), 2, targets, unit="bytes", **kwargs)
    return int(re.search(r"reachable is (\d+) bytes", str(info.value)).group(1))


@pytest.fixture(scope="module")
def leftovers():
    """A tiny encoder, and the smallest size of its Linear layers' compression
    (the embedding and LayerNorms stay float32) and of every module's (the
    LayerNorms stay)."""
    model = tiny(low_rank=True)
    return model, {
        "linear": smallest_size(model, nn.Linear),
        "all": smallest_size(model, TARGETS),
    }


@settings(max_examples=20, deadline=None)
@given(
    st.sampled_from(["linear", "all"]),
    st.floats(0, 1),
    st.sampled_from([None, (8, 6, 5, 4, 3, 2)]),
)
def test_the_folder_is_never_over_the_size_asked(leftovers, which, fraction, bits):
    import tempfile

    from kflats.torch import save_compressed

    base, need = leftovers
    targets = nn.Linear if which == "linear" else TARGETS
    # every size from the smallest reachable to the float32 model's
    size = need[which] + round(fraction * (saved_nbytes(base) - need[which]))
    model = copy.deepcopy(base)
    # (the smallest size reachable is the same with 5 bits: 2 bits are smaller)
    report = compress(model, size, targets, unit="bytes", bits=bits)
    with tempfile.TemporaryDirectory() as tmp:
        save_compressed(model, os.path.join(tmp, "m"))
        on_disk = weight_files(tmp)
    assert on_disk <= size
    assert report.size_asked == size
    assert report.model_bytes <= on_disk <= report.folder_bytes <= size


def test_a_size_below_the_smallest_stops_before_anything_is_fitted(monkeypatch):
    import kflats.torch.compression._compress as front
    import kflats.torch.compression._plan_bytes as planner

    def fitted(*args, **kwargs):  # pragma: no cover - the check stops first
        raise AssertionError("fitted")

    monkeypatch.setattr(front, "calibrate", fitted)
    monkeypatch.setattr(planner, "_ModuleForms", fitted)
    model = tiny()
    snap = snapshot(model)
    need = smallest_size(model, TARGETS)
    for size in (need - 1, 0.01):
        with pytest.raises(ValueError, match=f"reachable is {need} bytes"):
            compress(
                model, size, TARGETS, unit="bytes", calibration=TEXTS,
                tokenizer=tokenizer,
            )  # fmt: skip
        assert_unchanged(model, snap)


def test_the_tensors_outside_the_selection_are_paid_first():
    model = tiny()
    total = saved_nbytes(model)
    # the embedding and LayerNorms, float32, take 0.21 of the model: a
    # fifth of its bytes cannot hold them and the Linear layers
    assert 0.2 * total < 8192 + 512
    with pytest.raises(ValueError, match=r"the other 8704 bytes of tensors"):
        compress(model, 0.2, nn.Linear, unit="bytes")


def test_a_size_for_a_tiny_bert_folder(tmp_path):
    transformers = pytest.importorskip("transformers")
    from kflats.torch import save_compressed

    base = _tiny_bert(transformers)
    need = smallest_size(base, nn.Linear)
    float32 = saved_nbytes(base)
    for i, size in enumerate((need, (need + float32) // 2, float32)):
        model = copy.deepcopy(base)
        report = compress(model, size, nn.Linear, unit="bytes", random_state=0)
        save_compressed(model, tmp_path / str(i))
        on_disk = weight_files(tmp_path / str(i))
        assert report.model_bytes <= on_disk <= report.folder_bytes <= size


def test_a_size_for_a_sentence_transformers_folder(tmp_path):
    """A transformer's file and a Dense module's file of its own."""
    transformers = pytest.importorskip("transformers")
    st_lib = pytest.importorskip("sentence_transformers")
    try:  # sentence-transformers >= 6
        from sentence_transformers.sentence_transformer import modules as st_modules
    except ImportError:  # pragma: no cover - older
        from sentence_transformers import models as st_modules

    from kflats.torch import save_compressed

    words = sorted({w for t in SENTENCES for w in t.split()})
    (tmp_path / "bert").mkdir()
    vocab = tmp_path / "bert" / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", *words]) + "\n")
    model = tiny_bert(transformers, vocab_size=4 + len(words), num_hidden_layers=1)
    model.save_pretrained(tmp_path / "bert")
    transformers.BertTokenizerFast(str(vocab)).save_pretrained(tmp_path / "bert")
    modules = [
        st_modules.Transformer(str(tmp_path / "bert")),
        st_modules.Pooling(32),
        st_modules.Dense(32, 16),
    ]
    base = st_lib.SentenceTransformer(modules=modules, device="cpu").eval()
    targets = ["*.query", "*.key", "*.value", "*.dense"]  # the transformer's Linear
    need = smallest_size(base, targets)
    for i, size in enumerate((need, need + 2000)):
        model = copy.deepcopy(base)
        report = compress(model, size, targets, unit="bytes", random_state=0)
        save_compressed(model, tmp_path / str(i))
        assert len(list((tmp_path / str(i)).rglob("*.safetensors"))) == 2
        on_disk = weight_files(tmp_path / str(i))
        assert report.model_bytes <= on_disk <= report.folder_bytes <= size


def test_each_form_header_bounds_its_layer_header():
    """The header entries counted for a form hold those of the layer it builds."""
    from kflats.torch.compression._config import _search_options_of
    from kflats.torch.compression._folder_bytes import entry_nbytes

    model = clustered_table()
    model.append(nn.Linear(32, 48))
    with torch.no_grad():
        model[1].weight.copy_(torch.randn(48, 3) @ torch.randn(3, 32))
    config = CompressionConfig(0.2, unit="bytes", k=(1, 8), ranks="uniform")
    options = _search_options_of(config)
    budget = FolderBudget(model, ["0", "1"], 0.2)
    seen = set()
    for name, ks in (("0", (1, 8)), ("1", (1,))):
        module = model[int(name)]
        forms = _forms(module, config.bits, None)
        measured = _ModuleForms(
            module, name, None, _weight_spectrum(module, None), forms, ks, config,
            options,
        )  # fmt: skip
        for form in measured.forms:
            kind = (name, form.kind, form.bits, form.k, form.zero_dtype)
            if kind in seen:
                continue
            seen.add(kind)
            if form.kind == "projective":
                state = quantized_state(measured.layer(form))
            elif form.kind == "dense":
                state = dict(module.state_dict())
                del state["weight"]
                qt = measured.quantized(form)
                state.update(
                    {k: torch.from_numpy(v) for k, v in qt.to_state("weight.").items()}
                )
            else:
                state = module.state_dict()
            written = sum(
                entry_nbytes(f"{name}.{k}", t.dtype, t.shape, budget.digits)
                for k, t in state.items()
            )
            assert written <= budget.header(name, form), kind
    assert {k[1] for k in seen} == {"float", "dense", "projective"}
    assert {k[3] for k in seen} == {1, 8}
