"""kflats.quantize: packing, round-to-nearest, calibrated rounding, layers."""

import copy

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kflats.quantize import (
    SUPPORTED_BITS,
    QuantizedTensor,
    quantize,
    quantize_calibrated,
    quantized_nbytes,
)
from kflats.quantize._grid import pack_codes, unpack_codes

torch = pytest.importorskip("torch")
safetensors_numpy = pytest.importorskip("safetensors.numpy")

from kflats.quantize import (  # noqa: E402
    dequantized_state,
    form_nbytes,
    quantize_module_,
    quantized_state,
    quantized_tensors,
    record_quantized_,
    register_straight_through_,
    requantize_,
    split_quantized_state,
    state_nbytes,
    straight_through_parameters,
)
from kflats.torch import ProjectiveEmbedding, ProjectiveLinear  # noqa: E402

bits_st = st.sampled_from(SUPPORTED_BITS)


def _anisotropic_moment(rng, n):
    A = rng.normal(size=(n, n)) * np.exp(1.5 * rng.normal(size=n))
    return A @ A.T / n


# ---------------------------------------------------------------- packing


@settings(max_examples=60, deadline=None)
@given(bits=bits_st, n=st.integers(1, 300), seed=st.integers(0, 2**32 - 1))
def test_pack_round_trip_and_length(bits, n, seed):
    codes = np.random.default_rng(seed).integers(0, 1 << bits, n).astype(np.uint8)
    packed = pack_codes(codes, bits)
    assert packed.dtype == np.uint8
    assert packed.shape == (-(-n * bits // 8),)  # tight: no byte per code
    np.testing.assert_array_equal(unpack_codes(packed, bits, n), codes)


def test_three_bit_codes_cross_byte_boundaries():
    # codes 1..8 (mod 8) in 3 bits: 24 bits, little-endian stream
    codes = np.array([1, 2, 3, 4, 5, 6, 7, 0], dtype=np.uint8)
    stream = sum(int(c) << (3 * i) for i, c in enumerate(codes))
    expected = np.array([(stream >> (8 * b)) & 0xFF for b in range(3)], np.uint8)
    np.testing.assert_array_equal(pack_codes(codes, 3), expected)


def test_five_bit_codes_cross_byte_boundaries():
    # eight 5-bit codes fill five bytes: a 40-bit little-endian stream, each
    # code starting at another offset of its byte (0, 5, 2, 7, 4, 1, 6, 3)
    codes = np.array([31, 1, 17, 8, 30, 3, 16, 5, 22], dtype=np.uint8)
    stream = sum(int(c) << (5 * i) for i, c in enumerate(codes))
    expected = np.array([(stream >> (8 * b)) & 0xFF for b in range(6)], np.uint8)
    np.testing.assert_array_equal(pack_codes(codes, 5), expected)
    np.testing.assert_array_equal(unpack_codes(expected, 5, 9), codes)


def test_a_symmetric_five_bit_grid_has_its_midpoint_at_16():
    # codes 0 .. 31 stand for -16 .. 15 steps: zero is code 16, the largest
    # magnitude of each group at most 15.5 steps
    W = np.random.default_rng(9).normal(size=(4, 64))
    W[:, ::8] = 0.0
    qt = quantize(W, 5, 32, symmetric=True, scale_dtype="float32")
    codes = qt.unpacked_codes()
    assert qt.zeros is None and np.all(codes[:, ::8] == 16)
    steps = np.repeat(qt.scales.astype(np.float64), 32, axis=1)
    np.testing.assert_array_equal(
        qt.dequantize(), ((codes.astype(np.float32) - 16) * steps).astype(np.float32)
    )
    assert np.allclose(np.abs(W).reshape(-1, 32).max(1) / qt.scales.reshape(-1), 15.5)


# ---------------------------------------------------------------- round-to-nearest

matrix_st = st.tuples(
    st.integers(1, 6), st.sampled_from([8, 16, 24]), st.integers(0, 2**32 - 1)
)


@settings(max_examples=80, deadline=None)
@given(
    bits=bits_st,
    dims=matrix_st,
    symmetric=st.booleans(),
    axis=st.sampled_from([0, 1]),
    scale=st.floats(1e-3, 1e3),
)
def test_rtn_error_at_most_half_a_step(bits, dims, symmetric, axis, scale):
    rows, cols, seed = dims
    rng = np.random.default_rng(seed)
    W = rng.normal(size=(rows, cols)) * scale + rng.normal() * scale
    if axis == 0:
        W = W.T
    qt = quantize(W, bits, 8, axis=axis, symmetric=symmetric)
    steps = np.repeat(qt.scales.astype(np.float64), 8, axis=1)
    if axis == 0:
        steps = steps.T
    err = np.abs(W - qt.dequantize().astype(np.float64))
    # half a step, plus the float32 rounding of the dequantized value
    assert np.all(err <= steps / 2 * (1 + 1e-6) + 1e-6 * np.abs(W))
    assert qt.nbytes == quantized_nbytes(
        W.shape, bits, 8, axis=axis, symmetric=symmetric
    )
    assert qt.codes.nbytes == -(-W.size * bits // 8)


def test_rtn_exact_on_grid_values_and_zero():
    W = np.array([[0.0, 0.5, 1.0, 1.5, -0.5, 0.0, 1.0, 0.25]])
    qt = quantize(W, 3, 8, scale_dtype="float32")
    np.testing.assert_array_equal(qt.dequantize()[0, [0, 5]], [0.0, 0.0])
    assert quantize(np.zeros((2, 4)), 2, 4).dequantize().tolist() == [[0.0] * 4] * 2


def test_error_decreases_with_bits():
    W = np.random.default_rng(0).normal(size=(16, 64))
    errors = [
        np.linalg.norm(W - quantize(W, b, 32).dequantize()) for b in SUPPORTED_BITS
    ]
    assert all(a > b for a, b in zip(errors, errors[1:], strict=False))


def test_clip_search_never_worse_than_full_range():
    W = np.random.default_rng(1).standard_t(2, size=(32, 64))
    for bits in (2, 3, 4):
        plain = np.linalg.norm(W - quantize(W, bits, 32).dequantize())
        clipped = np.linalg.norm(W - quantize(W, bits, 32, clip=True).dequantize())
        assert clipped <= plain


def test_transpose_and_requantize():
    W = np.random.default_rng(2).normal(size=(8, 32))
    qt = quantize(W, 4, 16)
    np.testing.assert_array_equal(qt.T.dequantize(), qt.dequantize().T)
    again = qt.requantize(qt.dequantize())
    np.testing.assert_array_equal(again.codes, qt.codes)
    np.testing.assert_array_equal(again.scales, qt.scales)


def test_dequantize_is_float32_multiply():
    W = np.random.default_rng(3).normal(size=(4, 16))
    qt = quantize(W, 6, 8)
    codes = qt.unpacked_codes().reshape(-1, 8).astype(np.float32)
    z = qt.zeros.reshape(-1, 1).astype(np.float32)
    s = qt.scales.reshape(-1, 1).astype(np.float32)
    np.testing.assert_array_equal(qt.dequantize(), ((codes - z) * s).reshape(4, 16))


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("bits", [1, 7, 9, 16, 0])
def test_unsupported_bits(bits):
    with pytest.raises(ValueError, match="bits must be one of"):
        quantize(np.ones((2, 8)), bits, 8)


def test_group_size_must_divide():
    with pytest.raises(
        ValueError, match=r"group_size=5 does not divide the row length \(8\)"
    ):
        quantize(np.ones((2, 8)), 4, 5)
    with pytest.raises(ValueError, match="group_size=3 does not divide the column"):
        quantize(np.ones((2, 8)), 4, 3, axis=0)
    assert quantize(np.ones((2, 8)), 4, None).group_size == 8


@pytest.mark.parametrize(
    "W", [np.ones(4), np.ones((0, 3)), np.array([[np.nan, 1.0]]), np.array([["a"]])]
)
def test_bad_matrix(W):
    with pytest.raises((ValueError, TypeError), match="W must"):
        quantize(W, 4, None)


def test_float16_scale_overflow_is_an_error():
    with pytest.raises(ValueError, match="scale_dtype='float32'"):
        quantize(np.array([[1e9, -1e9]]), 2, 2)
    assert quantize(np.array([[1e9, -1e9]]), 2, 2, scale_dtype="float32").nbytes


# ---------------------------------------------------------------- state


def _state(bits=3, symmetric=False):
    W = np.random.default_rng(4).normal(size=(6, 32))
    return quantize(W, bits, 16, symmetric=symmetric).to_state("w.")


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
@pytest.mark.parametrize("symmetric", [False, True])
def test_state_round_trip_through_safetensors(tmp_path, bits, symmetric):
    W = np.random.default_rng(bits).normal(size=(6, 32))
    qt = quantize(W, bits, 16, symmetric=symmetric)
    path = str(tmp_path / "q.safetensors")
    safetensors_numpy.save_file(qt.to_state("layer."), path)
    back = QuantizedTensor.from_state(safetensors_numpy.load_file(path), "layer.")
    assert back.bits == bits and back.shape == (6, 32) and back.symmetric == symmetric
    assert back.dequantize().tobytes() == qt.dequantize().tobytes()
    assert back.nbytes == qt.nbytes


def _corrupt(key, value):
    state = _state()
    state["w." + key] = value
    return state


@pytest.mark.parametrize(
    ("state", "match"),
    [
        (_corrupt("meta", np.array([7, 16, 1, 6, 32])), "bits must be one of"),
        (_corrupt("meta", np.array([3, 16, 2, 6, 32])), "axis must be 0 or 1"),
        (_corrupt("meta", np.array([3, 7, 1, 6, 32])), "group_size=7"),
        (_corrupt("meta", np.array([3.0, 16, 1, 6, 32])), "meta must be 5 integers"),
        (_corrupt("meta", np.array([3, 16, 1, 0, 32])), "shape must be two positive"),
        (_corrupt("codes", np.zeros(72, np.int8)), "codes must be a 1-D uint8"),
        (_corrupt("codes", np.zeros(71, np.uint8)), "codes must hold 72 bytes"),
        (_corrupt("scales", np.ones((6, 3), np.float16)), "scales must be"),
        (_corrupt("scales", np.ones((6, 2), np.float64)), "scales must be"),
        (_corrupt("scales", np.full((6, 2), np.nan, np.float16)), "finite"),
        (_corrupt("scales", -np.ones((6, 2), np.float16)), "non-negative"),
        (_corrupt("zeros", np.full((6, 2), 8, np.uint8)), r"zeros must lie in 0\.\.7"),
        (_corrupt("zeros", np.zeros((6, 2), np.int64)), "zeros must be None or uint8"),
        (_corrupt("extra", np.zeros(1)), "unexpected entries"),
        ({k: v for k, v in _state().items() if k != "w.scales"}, "lacks"),
    ],
)
def test_from_state_rejects_bad_entries(state, match):
    with pytest.raises(ValueError, match=match):
        QuantizedTensor.from_state(state, "w.")


# ---------------------------------------------------------------- calibrated


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    bits=st.sampled_from([2, 3, 4, 8]),
    axis=st.sampled_from([0, 1]),
    act_order=st.booleans(),
)
def test_calibrated_beats_round_to_nearest(seed, bits, axis, act_order):
    rng = np.random.default_rng(seed)
    W = rng.normal(size=(24, 48))
    C = _anisotropic_moment(rng, 48)
    L = np.linalg.cholesky(C)
    rtn = quantize(W, bits, 8, axis=axis)
    cal = quantize_calibrated(
        W, C, bits, 8, axis=axis, clip=False, damping=1e-3, act_order=act_order
    )
    assert np.linalg.norm((W - cal.dequantize()) @ L) < np.linalg.norm(
        (W - rtn.dequantize()) @ L
    )


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_calibrated_with_diagonal_moment_is_round_to_nearest(axis, bits, act_order):
    # no correlation to feed errors along: GPTQ reduces to round-to-nearest
    W = np.random.default_rng(5).normal(size=(16, 32))
    C = np.diag(np.random.default_rng(6).uniform(0.5, 2.0, 32))
    cal = quantize_calibrated(W, C, bits, 8, axis=axis, clip=False, act_order=act_order)
    rtn = quantize(W, bits, 8, axis=axis)
    np.testing.assert_array_equal(cal.codes, rtn.codes)
    np.testing.assert_array_equal(cal.scales, rtn.scales)


def test_calibrated_handles_dead_inputs_and_checks_moment():
    rng = np.random.default_rng(6)
    W = rng.normal(size=(4, 16))
    C = _anisotropic_moment(rng, 16)
    C[3, :] = C[:, 3] = 0.0
    qt = quantize_calibrated(W, C, 4, 8)
    assert np.all(np.isfinite(qt.dequantize()))
    with pytest.raises(ValueError, match=r"moment must have shape \(16, 16\)"):
        quantize_calibrated(W, np.eye(4), 4, 8)
    with pytest.raises(ValueError, match="symmetric"):
        quantize_calibrated(W, np.triu(np.ones((16, 16))), 4, 8)


# ---------------------------------------------------------------- layers


def _layers(rng):
    torch.manual_seed(0)
    lin = torch.nn.Linear(32, 24)
    emb = torch.nn.Embedding(60, 16)
    yield "linear", lin, {"moment": _anisotropic_moment(rng, 32)}
    yield "embedding", emb, {"token_weights": rng.integers(0, 9, 60) + 1.0}
    for side in ("input", "output"):
        layer = ProjectiveLinear.from_linear(lin, k=2, j=8, side=side, random_state=0)
        yield f"projective-{side}", layer, {"moment": _anisotropic_moment(rng, 32)}
    layer = ProjectiveEmbedding.from_embedding(
        emb, k=3, j=8, random_state=0, affine=True
    )
    yield "projective-embedding", layer, {"token_weights": rng.integers(0, 9, 60) + 1.0}


def _inputs(layer):
    if isinstance(layer, (torch.nn.Embedding, ProjectiveEmbedding)):
        return torch.arange(layer.num_embeddings).reshape(3, -1)
    return torch.randn(5, layer.in_features, generator=torch.Generator().manual_seed(1))


def _dense_weight(layer):
    if hasattr(layer, "to_dense"):
        layer = layer.to_dense()
    return layer.weight.detach().double().numpy()


LAYER_IDS = [name for name, *_ in _layers(np.random.default_rng(0))]


@pytest.mark.parametrize("index", range(len(LAYER_IDS)), ids=LAYER_IDS)
@pytest.mark.parametrize("method", ["rtn", "calibrated"])
@pytest.mark.parametrize("bits", [3, 5, 8])
@pytest.mark.parametrize("compact", [False, True])
def test_layer_round_trip_is_bit_identical(tmp_path, index, method, bits, compact):
    from safetensors.torch import load_file, save_file

    _, layer, extra = list(_layers(np.random.default_rng(index)))[index]
    original = copy.deepcopy(layer)
    quantize_module_(
        layer,
        bits,
        8,
        method=method,
        compact_scales=compact,
        **(extra if method == "calibrated" else {}),
    )
    tensors = quantized_tensors(layer)
    assert tensors
    for name, qt in tensors.items():
        param = layer.get_parameter(name)
        assert torch.equal(param, torch.from_numpy(qt.dequantize()))
    assert not torch.equal(_dense_t(layer), _dense_t(original))

    state = quantized_state(layer)
    assert state_nbytes(state) == form_nbytes(original, bits, 8, compact_scales=compact)
    assert state_nbytes(state) < form_nbytes(original)
    side = getattr(original, "side", None)
    for name, qt in tensors.items():  # where compact scales share exponents
        bases, coefficients = (None if side == "output" else 1), int(side == "input")
        want = coefficients if ".coefficients." in f".{name}" else bases
        want = 0 if name == "weight" else want
        assert qt.scale_layout == (want if compact else None), name
    path = str(tmp_path / "m.safetensors")
    save_file(state, path)
    fresh = copy.deepcopy(original)
    fresh.load_state_dict(dequantized_state(load_file(path)))
    for name, p in layer.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], p), name
    x = _inputs(layer)
    layer.eval(), fresh.eval()
    assert torch.equal(fresh(x), layer(x))
    # the dense form computes the same outputs
    torch.testing.assert_close(
        layer.to_dense()(x) if hasattr(layer, "to_dense") else layer(x), layer(x)
    )

    _, restored = split_quantized_state(load_file(path))
    record_quantized_(fresh, restored)
    assert quantized_state(fresh).keys() == state.keys()


def _dense_t(layer):
    return torch.from_numpy(_dense_weight(layer))


@pytest.mark.parametrize("index", range(len(LAYER_IDS)), ids=LAYER_IDS)
def test_layer_error_decreases_with_bits(index):
    _, layer, extra = list(_layers(np.random.default_rng(index)))[index]
    target = _dense_weight(layer)
    errors = []
    for bits in SUPPORTED_BITS:
        q = quantize_module_(copy.deepcopy(layer), bits, 8, **extra)
        errors.append(np.linalg.norm(_dense_weight(q) - target))
    assert all(a > b for a, b in zip(errors, errors[1:], strict=False)), errors


@pytest.mark.parametrize("side", ["input", "output"])
def test_calibrated_factors_beat_round_to_nearest(side):
    rng = np.random.default_rng(7)
    lin = torch.nn.Linear(64, 48)
    with torch.no_grad():
        lin.weight.copy_(torch.from_numpy(rng.normal(size=(48, 64))).float())
    C = _anisotropic_moment(rng, 64)
    L = np.linalg.cholesky(C)
    ref = ProjectiveLinear.from_linear(lin, k=2, j=16, side=side, random_state=0)
    target = _dense_weight(ref)
    for bits in (2, 3, 4):
        errs = {}
        for method in ("rtn", "calibrated"):
            q = quantize_module_(copy.deepcopy(ref), bits, 8, method=method, moment=C)
            errs[method] = np.linalg.norm((_dense_weight(q) - target) @ L)
        assert errs["calibrated"] < errs["rtn"], (bits, errs)


def test_layer_bad_input_leaves_it_unchanged():
    layer = ProjectiveEmbedding(30, 16, ranks=(6, 4))
    before = copy.deepcopy(layer.state_dict())
    with pytest.raises(
        ValueError, match="group_size=3 does not divide the bases' row length d=16"
    ):
        quantize_module_(layer, 4, 3)
    with pytest.raises(ValueError, match="group_size must be a positive int"):
        quantize_module_(layer, 4, 0)
    with pytest.raises(ValueError, match="bits must be one of"):
        quantize_module_(layer, 7, 2)
    with pytest.raises(ValueError, match="token_weights must be 30"):
        quantize_module_(layer, 4, 2, token_weights=np.ones(3))
    with pytest.raises(ValueError, match=r"moment must have shape \(16, 16\)"):
        quantize_module_(torch.nn.Linear(16, 4), 4, 8, moment=np.eye(3))
    with pytest.raises(ValueError, match="group_size=5 does not divide in_features=16"):
        quantize_module_(torch.nn.Linear(16, 4), 4, 5)
    with pytest.raises(TypeError, match="module must be"):
        quantize_module_(torch.nn.Conv1d(2, 2, 1), 4, 2)
    for name, value in layer.state_dict().items():
        assert torch.equal(value, before[name])
    assert not quantized_tensors(layer)
    quantize_module_(layer, 4, 2)
    assert set(quantized_tensors(layer)) == {
        "bases",
        "coefficients.0",
        "coefficients.1",
    }


def test_record_quantized_checks_values():
    lin = quantize_module_(torch.nn.Linear(16, 4), 4, 8)
    _, tensors = split_quantized_state(quantized_state(lin))
    other = torch.nn.Linear(16, 4)
    with pytest.raises(ValueError, match="does not hold its dequantized values"):
        record_quantized_(other, tensors)


# ---------------------------------------------------------------- straight-through


@pytest.mark.parametrize("zero_dtype", ["uint8", "float16"])
@pytest.mark.parametrize("kind", ["linear", "projective-embedding"])
def test_straight_through_trains_latent_floats_then_requantizes(kind, zero_dtype):
    torch.manual_seed(0)
    if kind == "linear":
        layer = torch.nn.Linear(16, 8)
        x = torch.randn(32, 16)
    else:
        layer = ProjectiveEmbedding.from_embedding(
            torch.nn.Embedding(40, 16), k=2, j=4, random_state=0
        )
        x = torch.arange(40)
    quantize_module_(layer, 3, 4, zero_dtype=zero_dtype)
    grids = {n: qt.scales.copy() for n, qt in quantized_tensors(layer).items()}
    y0 = layer(x).detach()
    register_straight_through_(layer)
    latent = straight_through_parameters(layer)
    assert len(latent) == len(grids) and all(p.is_leaf for p in latent)
    # at the start, the latent floats lie on the grid: the same forward
    assert torch.equal(layer(x), y0)
    target = torch.randn_like(y0)
    opt = torch.optim.Adam(latent, lr=0.05)
    for _ in range(20):
        opt.zero_grad()
        loss = ((layer(x) - target) ** 2).mean()
        loss.backward()
        opt.step()
    trained = layer(x).detach()
    requantize_(layer)
    assert not straight_through_parameters(layer)
    assert not any("parametrizations" in n for n, _ in layer.named_parameters())
    # the rounded forward during training is the final layer's forward (with
    # float zero points too: the grid adds them before the rounding)
    torch.testing.assert_close(layer(x), trained, rtol=0, atol=1e-6)
    assert ((layer(x) - target) ** 2).mean() < ((y0 - target) ** 2).mean()
    for name, qt in quantized_tensors(layer).items():
        np.testing.assert_array_equal(qt.scales, grids[name])
        assert torch.equal(layer.get_parameter(name), torch.from_numpy(qt.dequantize()))


@pytest.mark.parametrize("zero_dtype", ["uint8", "float16", None])
def test_straight_through_trains_the_scales_and_writes_them_packed(zero_dtype):
    torch.manual_seed(0)
    layer = torch.nn.Linear(32, 8, bias=False)
    grid = {"symmetric": True} if zero_dtype is None else {"zero_dtype": zero_dtype}
    quantize_module_(layer, 2, 8, **grid)
    before = quantized_tensors(layer)["weight"]
    with pytest.raises(ValueError, match="scales must be True or False"):
        register_straight_through_(layer, scales="yes")
    assert not straight_through_parameters(layer)  # nothing registered
    register_straight_through_(layer, scales=True)
    latent, gain = straight_through_parameters(layer)
    assert gain.shape == before.scales.shape
    assert torch.equal(layer.weight, torch.from_numpy(before.dequantize()))
    # the latent floats move off the grid: the gradient of each group's log
    # gain is its scale times the sum of (code - latent / scale - zero) over
    # its entries, of (code - zero) where the code is clipped
    with torch.no_grad():
        latent.add_(0.3 * before.scales.astype(np.float32).mean() * torch.randn(8, 32))
    layer.weight.sum().backward()
    w = latent.detach().double().numpy().reshape(-1, 8)
    scale = before.scales.astype(np.float64).reshape(-1, 1)
    zero = before._zeros_or_mid().astype(np.float64).reshape(-1, 1)
    v = w / scale + zero
    q = np.clip(np.round(v), 0, 3)
    per_entry = np.where((np.round(v) < 0) | (np.round(v) > 3), q - zero, q - v)
    expected = (scale[:, 0] * per_entry.sum(1)).reshape(before.scales.shape)
    np.testing.assert_allclose(gain.grad.numpy(), expected, rtol=1e-4, atol=1e-6)
    # trained gains are written packed: scales in their dtype, same bytes
    with torch.no_grad():
        gain.copy_(torch.linspace(-0.2, 0.2, gain.numel()).reshape(gain.shape))
    latent_now = latent.detach().numpy().copy()
    wanted = before.scales.astype(np.float32) * np.exp(gain.detach().numpy())
    requantize_(layer)
    after = quantized_tensors(layer)["weight"]
    assert after.scales.dtype == before.scales.dtype
    np.testing.assert_array_equal(after.scales, wanted.astype(before.scales.dtype))
    assert (after.bits, after.group_size, after.nbytes) == (2, 8, before.nbytes)
    reference = before.requantize(latent_now, wanted)
    np.testing.assert_array_equal(after.unpacked_codes(), reference.unpacked_codes())
    assert torch.equal(layer.weight, torch.from_numpy(after.dequantize()))


def test_requantize_checks_new_scales():
    qt = quantize(np.ones((2, 8), dtype=np.float32), 4, 8)
    for bad in (np.ones((3, 1)), -qt.scales, np.full(qt.scales.shape, np.inf)):
        with pytest.raises(ValueError, match="scales must be finite, >= 0"):
            qt.requantize(np.ones((2, 8)), bad)
    with pytest.raises(ValueError, match="finite in float16"):
        qt.requantize(np.ones((2, 8)), np.full(qt.scales.shape, 1e6))
    twice = qt.requantize(np.ones((2, 8)), 2 * qt.scales.astype(np.float64))
    np.testing.assert_array_equal(twice.scales, 2 * qt.scales)


def test_straight_through_gradient_is_identity():
    layer = quantize_module_(torch.nn.Linear(8, 2, bias=False), 2, 8)
    register_straight_through_(layer)
    x = torch.randn(3, 8)
    layer(x).sum().backward()
    latent = layer.parametrizations.weight.original
    torch.testing.assert_close(latent.grad, x.sum(0).expand(2, 8))


@pytest.mark.parametrize("side", ["input", "output", "embedding"])
def test_refitting_coefficients_to_rounded_bases_lowers_the_error(side, monkeypatch):
    import kflats.torch.layers._quantize as modules

    rng = np.random.default_rng(8)
    if side == "embedding":
        emb = torch.nn.Embedding(200, 32)
        ref = ProjectiveEmbedding.from_embedding(emb, k=2, j=16, random_state=0)
        extra, L = {"token_weights": np.ones(200)}, np.eye(32)
    else:
        lin = torch.nn.Linear(64, 48)
        ref = ProjectiveLinear.from_linear(lin, k=2, j=16, side=side, random_state=0)
        C = _anisotropic_moment(rng, 64)
        extra, L = {"moment": C}, np.linalg.cholesky(C)
    target = _dense_weight(ref)

    def error():
        total = 0.0
        for bits in (2, 3):
            q = quantize_module_(copy.deepcopy(ref), bits, 8, **extra)
            total += np.linalg.norm((_dense_weight(q) - target) @ L)
        return total

    with_refit = error()
    monkeypatch.setattr(modules, "_lstsq_refit", lambda u, v, vh, L=None: u)
    assert with_refit < error()


@pytest.mark.parametrize("index", range(len(LAYER_IDS)), ids=LAYER_IDS)
@pytest.mark.parametrize("bits", [None, 2, 5, 6])
@pytest.mark.parametrize("compact", [False, True])
def test_factors_nbytes_counts_like_the_built_layer(index, bits, compact):
    _, layer, _ = list(_layers(np.random.default_rng(index)))[index]
    if not isinstance(layer, (ProjectiveEmbedding, ProjectiveLinear)):
        return
    from kflats.quantize import factors_nbytes

    bias = getattr(layer, "bias", None)
    predicted = factors_nbytes(
        layer.sizes,
        layer.ranks,
        layer.bases.shape[1],
        bits,
        8,
        affine=layer.affine,
        bias=0 if bias is None else bias.numel(),
        compact_scales=compact,
        side=getattr(layer, "side", None),
    )
    assert predicted == form_nbytes(layer, bits, 8, compact_scales=compact)
    if bits is not None:
        quantize_module_(layer, bits, 8, compact_scales=compact)
        assert predicted == state_nbytes(quantized_state(layer))


def test_quantized_state_asks_to_requantize_after_training():
    layer = quantize_module_(torch.nn.Linear(8, 2), 4, 8)
    register_straight_through_(layer)
    with pytest.raises(ValueError, match="call requantize_ first"):
        quantized_state(layer)
    requantize_(layer)
    assert "weight.codes" in quantized_state(layer)


def test_numpy_core_does_not_import_torch():
    import subprocess
    import sys

    code = (
        "import sys, kflats.quantize as q; q.quantize([[1.0, 2.0]], 4, None); "
        "print('torch' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "False"


@settings(max_examples=40, deadline=None)
@given(
    st.integers(1, 6),
    st.integers(6, 12),
    st.integers(1, 20),
    st.booleans(),
    st.integers(0, 2**31 - 1),
    st.booleans(),
)
def test_refit_is_the_least_squares_solution(r, d, n, whiten, seed, deficient):
    """The least-norm solution, also where two rounded bases coincide (the
    normal equations singular: the Cholesky solve gives way to pinvh)."""
    from kflats.torch.layers._quantize import _lstsq_refit

    rng = np.random.default_rng(seed)
    U, V = rng.normal(size=(n, r)), rng.normal(size=(r, d))
    Vq = V + 0.1 * rng.normal(size=(r, d))
    if deficient and r > 1:
        Vq[-1] = Vq[0]
    L = np.linalg.cholesky(np.cov(rng.normal(size=(d, 4 * d))) + np.eye(d))
    L = L if whiten else None
    A, B = (Vq, U @ V) if L is None else (Vq @ L, U @ V @ L)
    expected = np.linalg.lstsq(A.T, B.T, rcond=None)[0].T
    np.testing.assert_allclose(_lstsq_refit(U, V, Vq, L), expected, atol=1e-8)


def test_moments_factored_once_and_kept_read_only():
    from kflats.factorize import _linear
    from kflats.quantize import _gptq

    rng = np.random.default_rng(0)
    X = rng.normal(size=(200, 48))
    H = X.T @ X
    first = _gptq._inverse_factor(H, 0.01)
    again = _gptq._inverse_factor(H.copy(), 0.01)
    assert again is first and not first.flags.writeable
    assert _gptq._inverse_factor(H, 0.02) is not first  # damping is in the key
    C, L = _linear.damped_cholesky(H, 0.01, 1.0, "m", "")
    C2, L2 = _linear.damped_cholesky(H, 0.01, 1.0, "m", "")
    assert C2 is not C and C2.flags.writeable  # fresh arrays for the caller
    np.testing.assert_array_equal(L2, L)
    np.testing.assert_allclose(L @ L.T, C)
    W = rng.normal(size=(8, 48))
    a = quantize_calibrated(W, H, 4, 16)
    b = quantize_calibrated(W, H, 4, 16)  # the kept factor: the same codes
    np.testing.assert_array_equal(a.dequantize(), b.dequantize())


def _round_columns_reference(W, U, perm, g, axis, act_order, grid, scales, zeros):
    """The NumPy loop that kflats' compiled rounding must match code for code."""
    from kflats.quantize._grid import _decode, _encode

    rows, cols = W.shape
    codes = np.empty((rows, cols), dtype=np.uint8)
    block = 128 if axis == 0 or act_order else g * max(1, 128 // g)
    for b0 in range(0, cols, block):
        b1 = min(cols, b0 + block)
        err_block = np.empty((rows, b1 - b0))
        for j in range(b0, b1):
            orig = perm[j]
            if axis == 1:
                if not act_order and (j - b0) % g == 0:
                    scales[:, j // g], zeros[:, j // g] = grid.fit(W[:, j : j + g])
                s, z = scales[:, orig // g], zeros[:, orig // g]
                col = W[:, j : j + 1]
            else:
                col = W[:, j].reshape(-1, g)
                s, z = scales[orig], zeros[orig] = grid.fit(col)
            q = _encode(col, s, z, grid.bits)
            deq = _decode(q, s, z).astype(np.float64).reshape(-1)
            codes[:, orig] = q.reshape(-1)
            e = (W[:, j] - deq) / U[j, j]
            W[:, j + 1 : b1] -= np.outer(e, U[j, j + 1 : b1])
            err_block[:, j - b0] = e
        W[:, b1:] -= err_block @ U[b0:b1, b1:]
    return codes


@settings(max_examples=40, deadline=None)
@given(
    st.sampled_from((2, 3, 4, 8)),
    st.sampled_from((8, 16)),
    st.integers(1, 4),
    st.integers(2, 140),
    st.sampled_from(("uint8", "symmetric", "float16")),
    st.sampled_from((np.float16, np.float32)),
    st.booleans(),
    st.booleans(),
    st.booleans(),
    st.integers(0, 2**31 - 1),
)
def test_rounding_down_the_columns_matches_the_numpy_loop(
    bits, g, groups, cols, zero, dtype, clip, act_order, compact, seed
):
    """Groups down each column (axis 0, a table's bases), rounded in one
    compiled loop (float zero points: in NumPy): the codes, grids and
    updated weights of the NumPy loop, in every grid, scale dtype, clipping
    and column order, with compact scales or not, over more than one block of
    columns."""
    from kflats.quantize import _gptq
    from kflats.quantize._grid import _CLIP_RATIOS

    rng = np.random.default_rng(seed)
    rows = g * groups
    W = rng.normal(size=(rows, cols)) * rng.exponential(size=(rows, 1))
    W[:, 0] = 0.0  # a column of zeros: scales and zero points 0
    X = rng.normal(size=(3 * cols, cols)) @ rng.normal(size=(cols, cols))
    perm = rng.permutation(cols) if act_order else np.arange(cols)
    U = _gptq._inverse_factor(X.T @ X, 0.01)
    sym = zero == "symmetric"
    zdtype = np.float16 if zero == "float16" else np.uint8
    layout = 1 if compact and dtype is np.float16 and zero != "float16" else None
    ratios = _CLIP_RATIOS if clip else (1.0,)
    grid = _gptq._Grid(bits, sym, dtype, ratios, zdtype, layout)
    out = []
    for fn in (_gptq._round_columns, _round_columns_reference):
        scales = np.empty((cols, groups), dtype=dtype)
        zeros = np.empty((cols, groups), dtype=zdtype)
        Wp = W.copy()
        codes = fn(Wp, U, perm, g, 0, False, grid, scales, zeros)
        out.append((codes, scales, zeros, Wp))
    for a, b in zip(*out, strict=True):
        np.testing.assert_array_equal(a, b)


def test_rounding_down_refuses_weights_beyond_float16_scales():
    W = np.full((16, 3), 1e9)
    with pytest.raises(ValueError, match="too large for float16 scales"):
        quantize_calibrated(W, np.eye(3), 4, 8, axis=0)
    qt = quantize_calibrated(W, np.eye(3), 4, 8, axis=0, scale_dtype="float32")
    np.testing.assert_allclose(qt.dequantize(), W, rtol=1e-6)


@settings(max_examples=25, deadline=None)
@given(
    st.sampled_from((2, 3, 4, 5, 8)),
    st.sampled_from((8, 16, 32)),
    st.integers(1, 6),
    st.booleans(),
    st.booleans(),
    st.integers(0, 2**31 - 1),
)
def test_compiled_rounding_matches_the_numpy_loop(
    bits, g, groups, act_order, sym, seed
):
    from kflats.quantize import _gptq
    from kflats.quantize._grid import _CLIP_RATIOS

    rng = np.random.default_rng(seed)
    cols = g * groups
    W = rng.normal(size=(7, cols)) * rng.exponential(size=(1, cols))
    X = rng.normal(size=(3 * cols, cols)) @ rng.normal(size=(cols, cols))
    H = X.T @ X
    grid = _gptq._Grid(bits, sym, np.float16, _CLIP_RATIOS)
    perm = np.argsort(-np.diag(H), kind="stable") if act_order else np.arange(cols)
    U = _gptq._inverse_factor(H[np.ix_(perm, perm)], 0.01)
    out = []
    for fn in (_gptq._round_columns, _round_columns_reference):
        scales = np.empty((7, groups), dtype=np.float16)
        zeros = np.empty((7, groups), dtype=np.uint8)
        if act_order:
            for k in range(groups):
                scales[:, k], zeros[:, k] = grid.fit(W[:, k * g : (k + 1) * g])
        Wp = W[:, perm].copy()
        codes = fn(Wp, U, perm, g, 1, act_order, grid, scales, zeros)
        out.append((codes, scales, zeros, Wp))
    for a, b in zip(*out, strict=True):
        np.testing.assert_array_equal(a, b)


@settings(max_examples=80, deadline=None)
@given(
    st.integers(1, 30),
    st.sampled_from([8, 16, 32]),
    st.sampled_from([2, 3, 4, 8]),
    st.sampled_from(["uint8", "float16", "symmetric"]),
    st.integers(0, 2**31 - 1),
)
def test_each_group_takes_the_clipping_ratio_of_least_error(rows, g, bits, grid, seed):
    from kflats.quantize._grid import (
        _CLIP_RATIOS,
        _decode,
        _encode,
        _fit_and_encode,
        _fit_grid,
    )

    rng = np.random.default_rng(seed)
    groups = rng.standard_t(3, size=(rows, g)) * rng.exponential(size=(rows, 1))
    symmetric = grid == "symmetric"
    zeros = np.float16 if grid == "float16" else np.uint8
    scale, zero, codes = _fit_and_encode(
        groups, bits, symmetric, np.float16, _CLIP_RATIOS, zero_dtype=zeros
    )
    # the reference: every ratio's grid on its own, the first least error kept
    fits = [
        _fit_grid(groups, bits, symmetric, r, np.float16, zeros) for r in _CLIP_RATIOS
    ]
    errors = []
    for s, z in fits:
        z = np.broadcast_to(z, s.shape)
        deq = _decode(_encode(groups, s, z, bits), s, z).astype(np.float64)
        errors.append(((deq - groups) ** 2).sum(axis=1))
    best = np.argmin(np.stack(errors), axis=0)
    rows_ = np.arange(rows)
    want_s = np.stack([s for s, _ in fits])[best, rows_]
    want_z = np.stack([np.broadcast_to(z, s.shape) for s, z in fits])[best, rows_]
    np.testing.assert_array_equal(scale, want_s)
    np.testing.assert_array_equal(zero, want_z)
    np.testing.assert_array_equal(codes, _encode(groups, want_s, want_z, bits))


@settings(max_examples=60, deadline=None)
@given(
    st.sampled_from(SUPPORTED_BITS),
    st.integers(1, 9),
    st.sampled_from([8, 16, 32]),
    st.integers(0, 1),
    st.integers(0, 2**31 - 1),
)
def test_integer_zero_points_are_stored_at_the_tensors_bits(bits, rows, g, axis, seed):
    W = np.random.default_rng(seed).normal(size=(rows * 8, 2 * g)) + 3.0
    qt = quantize(W, bits, g)
    qt = qt if axis == 1 else qt.T  # the same codes read down the columns
    state = qt.to_state()
    groups = qt.scales.size
    packed = bits < 8
    assert state["zeros"].shape == (
        (-(-groups * bits // 8),) if packed else qt.scales.shape
    )
    total = sum(v.nbytes for k, v in state.items() if k != "meta")
    assert total == qt.nbytes == quantized_nbytes(qt.shape, bits, g, axis=qt.axis)
    back = QuantizedTensor.from_state(state)
    assert np.array_equal(back.zeros, qt.zeros) and back.zeros.shape == qt.scales.shape
    assert np.array_equal(back.dequantize(), qt.dequantize())
    # a file of an earlier kflats, the zero points a byte each: read as well
    old = {**state, "zeros": qt.zeros}
    assert np.array_equal(QuantizedTensor.from_state(old).dequantize(), qt.dequantize())


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 9),
    st.integers(1, 40),
    st.sampled_from((np.float16, np.float32)),
    st.sampled_from((np.uint8, np.float16)),
    st.integers(0, 2**31 - 1),
)
def test_compiled_decode_has_numpys_float32_bits(
    groups, g, scale_dtype, zero_dtype, seed
):
    """The compiled decode: ``(codes - zero) * scale`` rounded as NumPy rounds
    it in float32, bit for bit (scales spanning many exponents)."""
    from kflats.quantize._grid import _decode

    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 256, size=(groups, g), dtype=np.uint8)
    scales = (rng.random(groups) * 10.0 ** rng.integers(-6, 4, groups)).astype(
        scale_dtype
    )
    zeros = (rng.random(groups) * 255).astype(zero_dtype)
    want = (
        codes.astype(np.float32) - zeros.astype(np.float32)[:, None]
    ) * scales.astype(np.float32)[:, None]
    got = _decode(codes, scales, zeros)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))
    # a view with strides (a tensor's codes reshaped) decodes alike
    wide = np.repeat(codes, 2, axis=1)[:, ::2]
    np.testing.assert_array_equal(_decode(wide, scales, zeros), got)


@settings(max_examples=25, deadline=None)
@given(
    st.sampled_from((2, 3, 4, 8)),
    st.sampled_from((8, 16)),
    st.booleans(),
    st.booleans(),
    st.integers(0, 2**31 - 1),
)
def test_a_shared_scope_rounds_the_same_inputs_once_to_the_same_codes(
    bits, g, act_order, symmetric, seed
):
    from kflats.quantize import shared_quantizations

    rng = np.random.default_rng(seed)
    W = rng.normal(size=(6, 4 * g))
    X = rng.normal(size=(8 * g, 4 * g))
    C = X.T @ X / len(X)
    kw = dict(bits=bits, group_size=g, act_order=act_order, symmetric=symmetric)
    alone = quantize_calibrated(W, C, **kw)
    with shared_quantizations() as shared:
        first = quantize_calibrated(W, C, **kw)
        again = quantize_calibrated(W.copy(), C.copy(), **kw)
        # another option, another moment, another weight: rounded anew
        quantize_calibrated(W, C, **{**kw, "damping": 0.1})
        quantize_calibrated(W, C + np.eye(len(C)), **kw)
        quantize_calibrated(W + 1e-3, C, **kw)
    assert shared.hits == 1
    for qt in (first, again):
        np.testing.assert_array_equal(qt.unpacked_codes(), alone.unpacked_codes())
        np.testing.assert_array_equal(qt.scales, alone.scales)
        if not symmetric:
            np.testing.assert_array_equal(qt.zeros, alone.zeros)
    # each caller its copy: what one changes, the next does not see
    with shared_quantizations() as shared:
        quantize_calibrated(W, C, **kw).scales[...] = 0
        quantize_calibrated(W, C, **kw).scales[...] = 0
        assert np.array_equal(quantize_calibrated(W, C, **kw).scales, alone.scales)
    assert shared.hits == 2
    # no room: nothing kept
    with shared_quantizations(max_bytes=0) as none_kept:
        quantize_calibrated(W, C, **kw)
        quantize_calibrated(W, C, **kw)
    assert none_kept.hits == 0


@pytest.mark.parametrize("max_bytes", [-1, 1.5, "1", True])
def test_a_shared_scope_checks_its_size(max_bytes):
    from kflats.quantize import shared_quantizations

    with pytest.raises(ValueError, match="max_bytes"):
        with shared_quantizations(max_bytes):
            pass


def test_an_asymmetric_moment_is_refused():
    C = np.eye(4)
    C[0, 1] = 0.5
    with pytest.raises(ValueError, match="moment must be symmetric"):
        quantize_calibrated(np.ones((2, 4)), C, 4, 4)


def test_a_failed_requantize_leaves_the_model_as_it_was():
    """A trained scale beyond float16 in the second layer: nothing is
    requantized, the first layer included, and the training can go on."""
    from torch.nn.utils import parametrize

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.Linear(8, 4))
    for layer in model:
        quantize_module_(layer, 3, 8)
    before = quantized_tensors(model)
    register_straight_through_(model, scales=True)
    gain = model[1].parametrizations["weight"][0].log_gain
    with torch.no_grad():
        gain.fill_(30.0)  # exp(30) times a scale: beyond 65504
    with pytest.raises(ValueError, match="finite in float16"):
        requantize_(model)
    assert all(parametrize.is_parametrized(layer, "weight") for layer in model)
    assert quantized_tensors(model) == before
    with torch.no_grad():
        gain.zero_()
    requantize_(model)
    assert not any(parametrize.is_parametrized(layer, "weight") for layer in model)
    for key, qt in quantized_tensors(model).items():
        np.testing.assert_array_equal(qt.dequantize(), before[key].dequantize())


def test_trained_scales_go_back_onto_compact_scales():
    """A heal through the rounding with compact scales: the trained scales
    are rounded up onto the compact grid again, the bytes unchanged."""
    from kflats.quantize._scales import split_scales

    torch.manual_seed(0)
    layer = torch.nn.Linear(32, 16)
    quantize_module_(layer, 3, 8, compact_scales=True)
    before = quantized_tensors(layer)["weight"]
    nbytes = state_nbytes(quantized_state(layer))
    register_straight_through_(layer, scales=True)
    gain = layer.parametrizations["weight"][0].log_gain
    with torch.no_grad():
        gain.copy_(torch.linspace(-0.3, 0.3, gain.numel()).reshape(gain.shape))
    requantize_(layer)
    after = quantized_tensors(layer)["weight"]
    assert after.scale_layout == before.scale_layout == 0
    assert split_scales(after.scales, 0) is not None
    assert not np.array_equal(after.scales, before.scales)
    assert state_nbytes(quantized_state(layer)) == nbytes
