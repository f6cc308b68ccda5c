"""Float16 zero points: the grid of a GGUF Q4_1 block, kept as it is."""

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


def q4_1_matrix(rng, rows, cols, bits=4):
    """A matrix on a Q4_1-like grid: each group of 32 ``q * d + m``, with a
    float16 scale ``d`` and minimum ``m``, its codes spanning 0 .. 2**bits - 1."""
    groups = rows * cols // 32
    d = rng.uniform(0.001, 0.05, size=groups).astype(np.float16)
    m = (-rng.uniform(0, 16, size=groups) * d.astype(np.float64)).astype(np.float16)
    q = rng.integers(0, 1 << bits, size=(groups, 32))
    q[:, 0], q[:, 1] = 0, (1 << bits) - 1  # the group's range is its grid's
    W = q * d.astype(np.float32)[:, None] + m.astype(np.float32)[:, None]
    return W.astype(np.float32).reshape(rows, cols), q.reshape(rows, cols)


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**31 - 1), st.sampled_from([(4, 64), (8, 96), (3, 32)]))
def test_a_q4_1_matrix_keeps_its_codes(seed, shape):
    rng = np.random.default_rng(seed)
    W, q = q4_1_matrix(rng, *shape)
    qt = quantize(W, 4, 32, zero_dtype="float16")
    assert qt.zeros.dtype == np.float16 and qt.zero_dtype == "float16"
    assert np.array_equal(qt.unpacked_codes(), q)
    # the zero point rounded to float16 moves a group by far less than a step
    step = np.repeat(qt.scales.astype(np.float64), 32, axis=1)
    assert np.all(np.abs(qt.dequantize() - W) <= step / 64)
    # integer zero points cannot hold such a grid: they round again
    assert (
        np.abs(quantize(W, 4, 32).dequantize() - W).max()
        > np.abs(qt.dequantize() - W).max()
    )


def test_calibrated_rounding_keeps_a_q4_1_matrix():
    rng = np.random.default_rng(0)
    W, q = q4_1_matrix(rng, 16, 128)
    X = rng.normal(size=(400, 128))
    qt = quantize_calibrated(W, X.T @ X / 400, 4, 32, zero_dtype="float16")
    assert np.array_equal(qt.unpacked_codes(), q)
    ordered = quantize_calibrated(
        W, X.T @ X / 400, 4, 32, zero_dtype="float16", act_order=True
    )
    assert np.array_equal(ordered.unpacked_codes(), q)


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_float_zeros_fit_any_matrix_at_least_as_well(bits):
    rng = np.random.default_rng(bits)
    W = rng.normal(size=(32, 128)) + rng.normal(size=(32, 1))  # offset groups
    ints = quantize(W, bits, 32)
    floats = quantize(W, bits, 32, zero_dtype="float16")
    err = lambda qt: float(((qt.dequantize() - W) ** 2).sum())  # noqa: E731
    assert err(floats) <= err(ints)
    # float16 zero points: two bytes a group; integer ones, `bits` bits a group
    groups = floats.scales.size
    assert floats.nbytes - ints.nbytes == 2 * groups - -(-groups * bits // 8)
    assert floats.nbytes == quantized_nbytes(W.shape, bits, 32, zero_dtype="float16")


def test_a_group_far_from_zero_and_a_group_of_zeros():
    W = np.zeros((2, 32))
    W[0] = 1000.0 + np.linspace(0, 1e-3, 32)  # far from zero against its spread
    qt = quantize(W, 4, 32, zero_dtype="float16")
    assert np.all(np.isfinite(qt.dequantize()))
    assert np.abs(qt.dequantize()[0] - W[0]).max() <= 1000.0 / 15 / 2 + 1e-3
    assert np.array_equal(qt.dequantize()[1], W[1])


def test_state_round_trip_and_validation():
    rng = np.random.default_rng(1)
    W, _ = q4_1_matrix(rng, 4, 64)
    qt = quantize(W, 4, 32, zero_dtype="float16")
    back = QuantizedTensor.from_state(qt.to_state("w."), "w.")
    assert back.zeros.dtype == np.float16
    assert np.array_equal(back.dequantize(), qt.dequantize())
    assert np.array_equal(qt.T.dequantize(), qt.dequantize().T)
    state = qt.to_state()
    state["zeros"] = np.full(state["zeros"].shape, np.inf, np.float16)
    with pytest.raises(ValueError, match="zeros must be finite"):
        QuantizedTensor.from_state(state)
    with pytest.raises(ValueError, match="zero_dtype must be 'uint8' or 'float16'"):
        quantize(W, 4, 32, zero_dtype="int8")
