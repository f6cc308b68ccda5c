"""Causal LMs under a budget in bytes: Llama, Qwen2 and GPT-2, their heads tied.

The folder holds what the size asks, the tied table once; it loads back
tied and computes the same logits. The probe of a plan reports the KL
divergence of the next-token distributions, as computed by hand; the
sensitivities come from the Fisher information of those distributions.
"""

import copy
import re
import tempfile

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch", reason="kflats.torch needs torch")
transformers = pytest.importorskip("transformers")

from torch import nn  # noqa: E402

from kflats.torch import (  # noqa: E402
    ProjectiveTiedHead,
    calibrate,
    compress,
    load_compressed,
    save_compressed,
)
from kflats.torch.compression import saved_nbytes  # noqa: E402
from kflats.torch.models import adapter_for, all_targets  # noqa: E402

from .._helpers import SENTENCES, tokenizer_for  # noqa: E402
from .test_bytes import weight_files  # noqa: E402

transformers.logging.set_verbosity_error()
SMALL, LARGE = 300, 4096  # a table of 4096 rows is also searched in clusters


def tiny(family, vocab=SMALL, tie=True, seed=0):
    """A tiny causal LM of ``family`` (hidden 32, 2 layers), seeded, in eval mode."""
    if family == "gpt2":
        config = transformers.GPT2Config(
            vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_positions=64,
            bos_token_id=0, eos_token_id=0,
        )  # fmt: skip
        cls = transformers.GPT2LMHeadModel
    else:
        config_cls = {
            "llama": transformers.LlamaConfig,
            "qwen2": transformers.Qwen2Config,
        }
        config = config_cls[family](
            vocab_size=vocab, hidden_size=32, intermediate_size=64,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=64, tie_word_embeddings=tie,
        )  # fmt: skip
        cls = transformers.AutoModelForCausalLM
    torch.manual_seed(seed)
    if cls is transformers.AutoModelForCausalLM:
        return cls.from_config(config).eval()
    return cls(config).eval()


def smallest_size(model, targets):
    with pytest.raises(ValueError, match="smallest size reachable") as info:
        compress(copy.deepcopy(model), 2, targets, unit="bytes")
    return int(re.search(r"reachable is (\d+) bytes", str(info.value)).group(1))


def is_tied(model):
    """Whether the head reads the input table: one parameter, one packed tensor,
    or the table's own factors."""
    head, table = model.lm_head, model.get_input_embeddings()
    if isinstance(head, ProjectiveTiedHead):
        return head.embedding is table
    one = head._modules.get("weight")
    if one is not None:
        return one is table._modules.get("weight")
    return head.weight is table.weight


FAMILIES = [("llama", True), ("qwen2", True), ("qwen2", False), ("gpt2", True)]


@pytest.fixture(scope="module")
def bases():
    out = {}
    for family, tie in FAMILIES:
        model = tiny(family, tie=tie)
        targets = all_targets(model)
        out[family, tie] = (model, targets, smallest_size(model, targets))
    return out


@settings(max_examples=12, deadline=None)
@given(st.sampled_from(FAMILIES), st.floats(0, 1), st.booleans())
def test_the_folder_holds_the_size_and_loads_back_tied(bases, which, fraction, unpack):
    base, targets, need = bases[which]
    size = need + round(fraction * (saved_nbytes(base) - need))
    model = copy.deepcopy(base)
    report = compress(model, size, targets, unit="bytes", random_state=0)
    assert report.folder_bytes <= size
    # the tied table is counted once: the head is not a module of its own
    assert "lm_head" not in [m.name for m in report]
    assert is_tied(model) == which[1]
    ids = torch.randint(0, SMALL, (2, 9))
    with tempfile.TemporaryDirectory() as tmp:
        save_compressed(model, tmp + "/m")
        assert report.model_bytes <= weight_files(tmp) <= report.folder_bytes
        loaded = load_compressed(tmp + "/m", unpack=unpack)
    assert is_tied(loaded) == which[1]
    assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_a_large_tied_table_in_clusters_stays_tied(family):
    model = tiny(family, vocab=LARGE)
    targets = all_targets(model)
    # little room: the table must be stored as factors
    size = smallest_size(model, targets) + 4000
    report = compress(model, size, targets, unit="bytes", k=(1, 4), random_state=0)
    (table,) = [m for m in report if m.kind == "Embedding"]
    assert table.form == "projective"
    assert isinstance(model.lm_head, ProjectiveTiedHead)
    with tempfile.TemporaryDirectory() as tmp:
        save_compressed(model, tmp + "/m")
        assert weight_files(tmp) <= size
        loaded = load_compressed(tmp + "/m")
    assert isinstance(loaded.lm_head, ProjectiveTiedHead)
    assert loaded.lm_head.embedding is loaded.get_input_embeddings()
    ids = torch.randint(0, LARGE, (2, 5))
    assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)


def test_gpt2_conv1d_layers_are_quantized_in_place():
    from transformers.pytorch_utils import Conv1D

    from kflats.quantize import quantized_tensors

    model = tiny("gpt2")
    targets = all_targets(model)
    report = compress(model, 0.2, targets, unit="bytes", random_state=0)
    convs = {n for n, m in model.named_modules() if isinstance(m, Conv1D)}
    assert convs and convs <= set(targets)
    named = dict(model.named_modules())
    for m in report:
        if m.name in convs and m.bits is not None:
            qt = quantized_tensors(named[m.name])["weight"]
            assert qt.shape == tuple(named[m.name].weight.shape) and qt.axis == 0
            assert m.bytes_after < m.bytes_before


# -- the probe: KL of the next-token distributions --------------------------


@pytest.fixture(scope="module")
def calibrated():
    tokenizer = tokenizer_for(SMALL)
    model = tiny("llama")
    targets = all_targets(model)
    cal = calibrate(model, SENTENCES * 3, tokenizer=tokenizer, targets=targets)
    return model, targets, cal


def by_hand(model, plan_model, batches):
    """The mean KL(original || plan) of next-token distributions over the real
    positions of each batch, averaged over the batches, with kl_div."""
    total = 0.0
    for b in batches:
        with torch.no_grad():
            t = torch.log_softmax(model(**b).logits, -1)
            s = torch.log_softmax(plan_model(**b).logits, -1)
        kl = nn.functional.kl_div(s, t, log_target=True, reduction="none").sum(-1)
        mask = b["attention_mask"].bool()
        total += float(kl[mask].mean())
    return total / len(batches)


def test_the_probe_reports_the_kl_divergence(calibrated):
    from kflats.torch.compression._fisher import micro_batches
    from kflats.torch.compression._form_errors import _ModuleForms
    from kflats.torch.compression._forms import _Form
    from kflats.torch.compression._probe_plans import best_on_probe
    from kflats.torch.compression._sensitivity import _probe_batches

    model, targets, cal = calibrated
    named = dict(model.named_modules())
    batches = _probe_batches(model, cal.probe)
    # one plan keeps every module float: KL 0; the other rounds each to 3 bits
    keep = {n: _Form("float", None, None, None, 0, 0.0) for n in targets}
    rounded = {n: _Form("dense", 3, 32, None, 0) for n in targets}

    class Measured:  # the quantized weights of a plan's dense forms
        def __init__(self, module):
            self.q = copy.deepcopy(module)
            from kflats.quantize import quantize_module_

            quantize_module_(self.q, 3, 32, method="rtn")

        def dense_weight(self, form):
            return self.q.weight.detach()

    measured = {n: Measured(named[n]) for n in targets}
    best, scores = best_on_probe(model, named, [rounded, keep], measured, batches)
    assert best == 1 and scores[1] == 0.0
    # the model is as it was
    plan_model = copy.deepcopy(model)
    plan_named = dict(plan_model.named_modules())
    with torch.no_grad():
        for n in targets:
            plan_named[n].weight.copy_(measured[n].dense_weight(rounded[n]))
    micro = list(micro_batches(batches))
    assert scores[0] == pytest.approx(by_hand(model, plan_model, micro), rel=1e-5)
    assert scores[0] > 0
    assert _ModuleForms  # the measured forms have the same interface


def test_the_probe_dequantizes_each_dense_form_once(calibrated, monkeypatch):
    """Weights kept across plans and batches: the same scores as dequantized
    at every run, each (module, form) dequantized once; with nothing kept
    (a model too large), at every run, as before."""
    from kflats.torch.compression import _probe_plans
    from kflats.torch.compression._fisher import micro_batches
    from kflats.torch.compression._forms import _Form
    from kflats.torch.compression._sensitivity import _probe_batches

    model, targets, cal = calibrated
    named = dict(model.named_modules())
    batches = _probe_batches(model, cal.probe)
    n_batches = len(list(micro_batches(batches)))
    three = {n: _Form("dense", 3, 32, None, 0) for n in targets}
    mixed = {**three, targets[0]: _Form("dense", 4, 32, None, 0)}

    class Measured:
        def __init__(self, module):
            from kflats.quantize import quantize_module_

            self.q = {}
            for bits in (3, 4):
                self.q[bits] = copy.deepcopy(module)
                quantize_module_(self.q[bits], bits, 32, method="rtn")
            self.calls = 0

        def dense_weight(self, form):
            self.calls += 1
            return self.q[form.bits].weight.detach().clone()

    measured = {n: Measured(named[n]) for n in targets}
    best, scores = _probe_plans.best_on_probe(
        model, named, [three, mixed], measured, batches
    )
    # every module's 3-bit form, and the first's 4-bit form: once each
    assert [measured[n].calls for n in targets] == [2] + [1] * (len(targets) - 1)
    monkeypatch.setattr(_probe_plans, "_KEPT_BYTES", 0)
    for m in measured.values():
        m.calls = 0
    again = _probe_plans.best_on_probe(model, named, [three, mixed], measured, batches)
    assert again == (best, scores)
    assert measured[targets[1]].calls == 2 * n_batches > 2


def test_fisher_sensitivities_follow_the_measured_kl(calibrated):
    """Each module alone rounded to 3 bits: the KL it causes, per unit of its
    calibrated error, and the Fisher estimate agree within a factor 3 for
    most modules (on this tiny random model, not for the queries and keys,
    whose errors move every position's attention alike)."""
    from kflats.quantize import quantize_module_
    from kflats.torch.compression._fisher import fisher_sensitivities
    from kflats.torch.compression._measure import _Measure, _quantize_kw
    from kflats.torch.compression._objectives import module_objectives
    from kflats.torch.compression._sensitivity import _probe_batches
    from kflats.torch.layers import dense_weight

    model, targets, cal = calibrated
    named = dict(model.named_modules())
    named[""] = model
    batches = _probe_batches(model, cal.probe)
    objectives = module_objectives(cal, targets, named, 1.0, 1e-2)
    weights = {n: o.row_weights for n, o in objectives.items()}
    estimated = fisher_sensitivities(
        model, targets, named, batches, row_weights=weights
    )
    assert all(s > 0 for s in estimated.values())
    ratios = []
    for name in targets:
        module = named[name]
        q = copy.deepcopy(module)
        quantize_module_(q, 3, 32, **_quantize_kw(q, objectives[name]))
        error = _Measure(module, objectives[name])(dense_weight(q))
        plan_model = copy.deepcopy(model)
        with torch.no_grad():
            plan_model.get_submodule(name).weight.copy_(q.weight)
        measured = by_hand(model, plan_model, batches) / error
        ratios.append(estimated[name] / measured)
    ratios = np.array(ratios)
    assert 0.5 < np.median(ratios) < 2
    assert np.mean((ratios > 1 / 3) & (ratios < 3)) >= 2 / 3, ratios


def test_a_plan_is_chosen_on_the_kl_and_the_phases_are_timed(calibrated, capsys):
    model, targets, cal = calibrated
    model = copy.deepcopy(model)
    report = compress(
        model, 0.2, targets, calibration=cal, unit="bytes", random_state=0,
        progress=True,
    )  # fmt: skip
    assert {"form errors", "sensitivity", "allocation", "fit"} <= set(report.seconds)
    printed = capsys.readouterr().err
    assert re.search(r"kflats compress: sensitivity \d+\.\d s", printed)
    assert report.to_dict()["seconds"].keys() == report.seconds.keys()
    assert adapter_for(model).output_kind == "causal_lm"


def test_a_q4_1_weight_keeps_its_grid_and_skips_the_wider_forms():
    """A Linear read from a GGUF Q4_1 file: 4 bits with float16 zero points
    holds it as it is, and the wider dense forms are not measured."""
    from kflats.torch import CompressionConfig
    from kflats.torch.compression._config import _search_options_of
    from kflats.torch.compression._form_errors import _ModuleForms
    from kflats.torch.compression._forms import _forms
    from kflats.torch.compression._sensitivity import _weight_spectrum

    rng = np.random.default_rng(0)
    d = rng.uniform(0.001, 0.05, size=(64 * 128 // 32, 1)).astype(np.float16)
    m = (-rng.uniform(0, 16, size=d.shape) * d).astype(np.float16)
    q = rng.integers(0, 16, size=(d.size, 32))
    q[:, :2] = 0, 15  # llama.cpp's blocks span their codes
    W = (q * d.astype(np.float32) + m.astype(np.float32)).reshape(64, 128)
    linear = nn.Linear(128, 64)
    with torch.no_grad():
        linear.weight.copy_(torch.from_numpy(W))
    config = CompressionConfig(0.5, unit="bytes", ranks="adaptive")
    measured = _ModuleForms(
        linear, "q", None, _weight_spectrum(linear, None),
        _forms(linear, config.bits, None), (1,), config,
        _search_options_of(config), lazy=True,
    )  # fmt: skip
    dense = {
        (f.bits, f.zero_dtype): f.error for f in measured.forms if f.kind == "dense"
    }
    assert dense[4, "float16"] < 1e-6 < dense[4, "uint8"]
    assert not any(bits > 4 for bits, _ in dense)


@settings(max_examples=8, deadline=None)
@given(rank=st.integers(1, 15), seed=st.integers(0, 2**16))
def test_a_tied_tables_forms_are_measured_in_one_metric(rank, seed):
    """A tied table's dense and factor forms are compared in one metric: the
    measured error of its rank-r factors is the tail of the spectrum the
    search reads their truncation error from (rows weighted by token counts,
    columns whitened by the head's input moment)."""
    from kflats.torch.compression._measure import _Measure
    from kflats.torch.compression._objectives import _Objective
    from kflats.torch.compression._sensitivity import _truncated, _weight_spectrum

    rng = np.random.default_rng(seed)
    table = nn.Embedding(40, 16)
    with torch.no_grad():
        table.weight.copy_(torch.from_numpy(rng.normal(size=(40, 16))))
    X = rng.normal(size=(200, 16)) * rng.uniform(0.1, 10, size=16)
    objective = _Objective(
        row_weights=rng.uniform(0.1, 5, size=40), input_moment=X.T @ X, damping=0.01
    )
    spectrum = _weight_spectrum(table, objective)
    tail = float(spectrum.gains[rank:].sum())
    measured = _Measure(table, objective)(
        torch.from_numpy(_truncated(table, spectrum, rank))
    )
    np.testing.assert_allclose(measured, tail, rtol=1e-6, atol=1e-9)
