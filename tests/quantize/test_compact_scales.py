"""Compact scales: 8-bit multiples of a power of two shared by 8 groups."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kflats.quantize import (
    QuantizedTensor,
    quantize,
    quantize_calibrated,
    quantized_nbytes,
    shared_quantizations,
)
from kflats.quantize._scales import SUPER, join_scales, snap_scales, split_scales


def _stored_bytes(state):
    return sum(v.nbytes for k, v in state.items() if not k.endswith("meta"))


def _scale_arrays(draw_seed, lines, groups, spread):
    rng = np.random.default_rng(draw_seed)
    S = rng.exponential(size=(lines, groups)) * 10.0 ** rng.uniform(-spread, 0)
    S[rng.random(S.shape) < 0.1] = 0.0  # groups of zeros
    return S.astype(np.float16).astype(np.float64)


@settings(max_examples=150, deadline=None)
@given(
    st.integers(1, 20),
    st.integers(1, 20),
    st.sampled_from((0, 1)),
    st.sampled_from((0.0, 3.0, 9.0)),
    st.integers(0, 2**31 - 1),
)
def test_snapped_scales_split_and_join_back(lines, groups, layout, spread, seed):
    """Snapped scales lie on the grid (a byte a group, an int8 exponent per
    super group), no lower than asked and less than 1/128 of their super
    group's largest above it; the split joins back to the same float16
    values, and snapping again changes nothing."""
    S = _scale_arrays(seed, lines, groups, spread)
    snapped = snap_scales(S, layout)
    assert snapped.dtype == np.float16 and snapped.shape == S.shape
    wide = snapped.astype(np.float64)
    assert np.all(wide >= S)
    M = wide if layout == 1 else wide.T
    for line, asked in zip(M, (S if layout == 1 else S.T), strict=True):
        for a in range(0, len(line), SUPER):
            block, want = line[a : a + SUPER], asked[a : a + SUPER]
            assert np.all(block - want <= block.max() / 128)
    codes, exps = split_scales(snapped, layout)
    assert codes.dtype == np.uint8 and exps.dtype == np.int8
    assert codes.shape == S.shape
    assert exps.size == (
        lines * -(-groups // SUPER) if layout == 1 else -(-lines // SUPER) * groups
    )
    np.testing.assert_array_equal(join_scales(codes, exps, layout), snapped)
    np.testing.assert_array_equal(snap_scales(wide, layout), snapped)


def test_scales_off_the_grid_do_not_split():
    assert split_scales(np.array([[1.0, 1.0 + 2**-10]], np.float16), 1) is None
    with pytest.raises(ValueError, match="compact grid"):
        QuantizedTensor(
            np.zeros(8, np.uint8),
            np.array([[1.0, 1.0 + 2**-10]], np.float16),
            None,
            (1, 16),
            4,
            8,
            scale_layout=1,
        )


def test_join_refuses_what_kflats_does_not_write():
    codes, exps = split_scales(snap_scales(np.array([[3.0, 0.5]]), 1), 1)
    with pytest.raises(ValueError, match="least"):  # 2x the exponent, half codes
        join_scales(codes // 2, exps + 1, 1)
    with pytest.raises(ValueError, match="int8 of shape"):
        join_scales(codes, exps.astype(np.int16), 1)
    with pytest.raises(ValueError, match="int8 of shape"):
        join_scales(codes, exps, 0)
    with pytest.raises(ValueError, match="2-D uint8"):
        join_scales(codes.astype(np.int16), exps, 1)
    with pytest.raises(ValueError, match="-24..8"):
        join_scales(codes, np.full_like(exps, 40), 1)


def test_a_scale_beyond_float16_is_refused():
    with pytest.raises(ValueError, match="too large for float16 scales"):
        snap_scales(np.array([[65504.0]]), 1)
    with pytest.raises(ValueError, match="too large for float16 scales"):
        quantize(np.full((1, 8), 1e6), 2, 8, compact_scales=True)


@settings(max_examples=60, deadline=None)
@given(
    st.sampled_from((2, 3, 4, 8)),
    st.sampled_from((4, 8)),
    st.integers(1, 20),
    st.integers(1, 4),
    st.sampled_from((0, 1)),
    st.booleans(),
    st.booleans(),
    st.sampled_from((0, 1)),
    st.integers(0, 2**31 - 1),
)
def test_compact_round_to_nearest(
    bits, g, lines, groups, axis, sym, clip, layout, seed
):
    """Along each line (layout 1) or across lines (0); the state holds codes
    and exponents, their bytes are ``nbytes`` and ``quantized_nbytes``'s,
    the reload is the same matrix; without clipping each entry is within
    half its step."""
    rng = np.random.default_rng(seed)
    shape = (lines, g * groups) if axis == 1 else (g * groups, lines)
    W = rng.normal(size=shape) * rng.exponential(size=(shape[0], 1))
    kw = dict(axis=axis, symmetric=sym, clip=clip, compact_scales=True)
    qt = quantize(W, bits, g, scale_layout=layout, **kw)
    assert qt.scale_layout == layout
    plain = quantize(W, bits, g, axis=axis, symmetric=sym, clip=clip)
    state = qt.to_state("w.")
    assert "w.scales" not in state and state["w.meta"].shape == (6,)
    assert _stored_bytes(state) == qt.nbytes < plain.nbytes + 1
    assert qt.nbytes == quantized_nbytes(
        shape, bits, g, axis=axis, symmetric=sym, scale_layout=layout
    )
    again = QuantizedTensor.from_state(state, "w.")
    assert again.scale_layout == layout
    np.testing.assert_array_equal(again.dequantize(), qt.dequantize())
    if not clip:
        steps = qt.scales.astype(np.float64).repeat(g, axis=1)
        steps = steps if axis == 1 else steps.T
        assert np.all(np.abs(W - qt.dequantize()) <= steps / 2 + 1e-6 * steps + 1e-12)
        assert np.all(qt.scales >= plain.scales)


@settings(max_examples=40, deadline=None)
@given(
    st.sampled_from((2, 3, 4)),
    st.sampled_from((4, 8)),
    st.integers(1, 20),
    st.integers(1, 4),
    st.sampled_from((0, 1)),
    st.booleans(),
    st.booleans(),
    st.integers(0, 2**31 - 1),
)
def test_compact_calibrated(bits, g, lines, groups, axis, act_order, sym, seed):
    """Along the rows the groups of one index share exponents across lines
    (layout 0), down the columns along each column (layout 1); stored,
    priced and reloaded exactly."""
    rng = np.random.default_rng(seed)
    cols = g * groups if axis == 1 else lines
    rows = lines if axis == 1 else g * groups
    W = rng.normal(size=(rows, cols)) * rng.exponential(size=(rows, 1))
    X = rng.normal(size=(4 * cols, cols)) @ rng.normal(size=(cols, cols))
    C = X.T @ X / len(X)
    kw = dict(axis=axis, act_order=act_order, symmetric=sym)
    qt = quantize_calibrated(W, C, bits, g, compact_scales=True, **kw)
    assert qt.scale_layout == 1 - axis
    assert split_scales(qt.scales, qt.scale_layout) is not None
    state = qt.to_state()
    assert (
        _stored_bytes(state)
        == qt.nbytes
        == quantized_nbytes(
            W.shape, bits, g, axis=axis, symmetric=sym, scale_layout=1 - axis
        )
    )
    again = QuantizedTensor.from_state(state)
    np.testing.assert_array_equal(again.dequantize(), qt.dequantize())


def test_the_transpose_and_a_requantize_keep_compact_scales():
    rng = np.random.default_rng(0)
    W = rng.normal(size=(16, 64))
    qt = quantize(W, 3, 8, compact_scales=True)
    assert qt.T.scale_layout == 1 and qt.T.nbytes == qt.nbytes
    asked = qt.scales.astype(np.float64) * rng.uniform(0.9, 1.3, qt.scales.shape)
    again = qt.requantize(W, asked)
    assert again.scale_layout == 1
    assert split_scales(again.scales, 1) is not None
    assert np.all(again.scales.astype(np.float64) >= asked.astype(np.float16))
    np.testing.assert_array_equal(again.zeros, qt.zeros)


def test_compact_scales_take_float16_scales_and_integer_zero_points():
    W = np.ones((2, 16))
    with pytest.raises(ValueError, match="scale_dtype='float16'"):
        quantize(W, 4, 8, compact_scales=True, scale_dtype="float32")
    with pytest.raises(ValueError, match="integer zero points"):
        quantize(W, 4, 8, compact_scales=True, zero_dtype="float16")
    with pytest.raises(ValueError, match="integer zero points"):
        quantize_calibrated(
            W, np.eye(16), 4, 8, compact_scales=True, zero_dtype="float16"
        )
    with pytest.raises(TypeError, match="compact_scales must be a bool"):
        quantize(W, 4, 8, compact_scales=1)
    with pytest.raises(ValueError, match="scale_layout must be None, 0 or 1"):
        quantized_nbytes((2, 16), 4, 8, scale_layout=2)
    with pytest.raises(ValueError, match="scale_dtype='float16'"):
        quantized_nbytes((2, 16), 4, 8, scale_layout=1, scale_dtype="float32")


def test_a_shared_scope_tells_compact_scales_apart():
    rng = np.random.default_rng(0)
    W, C = rng.normal(size=(16, 32)), np.eye(32)
    with shared_quantizations() as shared:
        a = quantize_calibrated(W, C, 3, 8)
        b = quantize_calibrated(W, C, 3, 8, compact_scales=True)
    assert shared.hits == 0
    assert a.scale_layout is None and b.scale_layout == 0


@pytest.mark.parametrize("axis", [0, 1])
def test_compact_scales_cost_little_error_on_a_weight_like_matrix(axis):
    """On a matrix whose rows have like magnitudes (as a layer's weight),
    the calibrated error with compact scales is within 3% of float16
    scales', at 5-6% fewer bytes (3 bits, groups of 32)."""
    rng = np.random.default_rng(0)
    W = rng.normal(size=(128, 256))
    X = rng.normal(size=(2000, 256)) @ rng.normal(size=(256, 256))
    C = X.T @ X / len(X)
    L = np.linalg.cholesky(C)
    plain = quantize_calibrated(W, C, 3, 32, axis=axis)
    qt = quantize_calibrated(W, C, 3, 32, axis=axis, compact_scales=True)

    def err(q):
        return np.linalg.norm((W - q.dequantize()) @ L)

    assert err(qt) <= 1.03 * err(plain)
    assert qt.nbytes <= 0.95 * plain.nbytes


def test_round_to_nearest_across_lines_keeps_super_groups_whole(monkeypatch):
    """Rounded a few lines at a time, the exponents shared across lines are
    those of the whole matrix at once: the blocks hold whole super groups."""
    from kflats.quantize import _rtn

    W = np.random.default_rng(0).normal(size=(37, 96)) * np.arange(1, 38)[:, None]
    whole = quantize(W, 3, 32, compact_scales=True, scale_layout=0)
    monkeypatch.setattr(_rtn, "_CHUNK", 96 * 5)  # 5 lines a block: 8 taken
    blocks = quantize(W, 3, 32, compact_scales=True, scale_layout=0)
    np.testing.assert_array_equal(blocks.scales, whole.scales)
    np.testing.assert_array_equal(blocks.unpacked_codes(), whole.unpacked_codes())
    with pytest.raises(ValueError, match="scale_layout must be 0 or 1"):
        quantize(W, 3, 32, compact_scales=True, scale_layout=None)
