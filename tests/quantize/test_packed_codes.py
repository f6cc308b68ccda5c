"""Codes read in torch: the same codes as numpy, the same floats as dequantize().

The torch unpacking (shifts and masks, 3- and 6-bit codes through three-byte
words) and the Numba kernels that a CPU tensor goes through must give
:func:`unpack_codes`'s codes and :meth:`QuantizedTensor.dequantize`'s
float32 values bit for bit, for every bit width, both axes, symmetric or
not, float16 or float32 scales, group sizes that are multiples of a word
or not; so must the rows of a table looked up alone.
"""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kflats.quantize import SUPPORTED_BITS, quantize
from kflats.quantize._grid import pack_codes, unpack_codes

torch = pytest.importorskip("torch")

from kflats.torch.layers import _dequantize  # noqa: E402
from kflats.torch.layers._dequantize import (  # noqa: E402
    dequantize_matrix,
    dequantize_rows,
    gather_codes,
)
from kflats.torch.layers._dequantize import (  # noqa: E402
    unpack_codes as torch_unpack_codes,
)

bits_st = st.sampled_from(SUPPORTED_BITS)


@settings(max_examples=150, deadline=None)
@given(bits_st, st.integers(1, 300), st.integers(0, 2**32 - 1))
def test_torch_unpacking_gives_numpys_codes(bits, count, seed):
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 1 << bits, count).astype(np.uint8)
    packed = pack_codes(codes, bits)
    expected = unpack_codes(packed, bits, count)
    got = torch_unpack_codes(torch.from_numpy(packed), bits, count)
    assert got.dtype == torch.uint8
    np.testing.assert_array_equal(got.numpy(), expected)
    # any positions of the stream, each read alone
    index = torch.from_numpy(rng.integers(0, count, (3, 7)))
    np.testing.assert_array_equal(
        gather_codes(torch.from_numpy(packed), bits, index).numpy(),
        expected[index.numpy()],
    )


@st.composite
def quantized(draw):
    """A quantized matrix: any bits, axis, grid, scale dtype and group size."""
    bits = draw(bits_st)
    axis = draw(st.sampled_from((0, 1)))
    g = draw(st.sampled_from((1, 2, 3, 4, 5, 8, 13, 16, 32)))
    lines = draw(st.integers(1, 9))
    length = g * draw(st.integers(1, 6))
    shape = (lines, length) if axis == 1 else (length, lines)
    seed = draw(st.integers(0, 2**32 - 1))
    W = np.random.default_rng(seed).normal(size=shape) * draw(
        st.sampled_from((1e-3, 1.0, 50.0))
    )
    qt = quantize(
        W,
        bits,
        g,
        axis=axis,
        symmetric=draw(st.booleans()),
        clip=draw(st.booleans()),
        scale_dtype=draw(st.sampled_from(("float16", "float32"))),
    )
    return qt, draw(st.lists(st.integers(0, shape[0] - 1), min_size=0, max_size=12))


def _operands(qt):
    zeros = None if qt.zeros is None else torch.from_numpy(qt.zeros)
    return (
        torch.from_numpy(qt.codes),
        torch.from_numpy(qt.scales),
        zeros,
        qt.bits,
        qt.group_size,
        qt.axis,
        qt.shape,
    )


# the Numba kernels (a CPU tensor's path), or the torch operations (others')
@pytest.mark.parametrize("path", ["kernels", "torch"])
@settings(max_examples=150, deadline=None)
@given(case=quantized())
def test_dequantized_floats_are_dequantize_s_bit_for_bit(path, case):
    qt, rows = case
    expected = qt.dequantize()
    with pytest.MonkeyPatch.context() as patch:
        if path == "torch":
            patch.setattr(_dequantize, "_on_cpu", lambda *tensors: False)
        matrix = dequantize_matrix(*_operands(qt))
        looked_up = dequantize_rows(
            *_operands(qt), torch.tensor(rows, dtype=torch.int64)
        )
    assert matrix.dtype == torch.float32 and matrix.is_contiguous()
    np.testing.assert_array_equal(matrix.numpy(), expected)
    assert looked_up.shape == (len(rows), qt.shape[1])
    np.testing.assert_array_equal(looked_up.numpy(), expected[rows])


def test_both_paths_are_exercised_by_the_strategies():
    # group sizes of whole words (the unrolled kernel) and others (code by code)
    from kflats.torch.layers._dequantize_kernels import WORDS

    assert {8 % WORDS[b][1] for b in SUPPORTED_BITS} == {0}
    assert any(5 % WORDS[b][1] for b in SUPPORTED_BITS)


def test_a_float16_scale_is_read_exactly_in_the_kernels():
    from kflats.torch.layers._dequantize_kernels import half_to_float

    bits = np.arange(1 << 16, dtype=np.uint16)
    expected = bits.view(np.float16).astype(np.float32)
    got = np.array([half_to_float(b) for b in bits], dtype=np.float32)
    finite = np.isfinite(expected)
    np.testing.assert_array_equal(got[finite], expected[finite])
    assert np.array_equal(np.signbit(got[finite]), np.signbit(expected[finite]))
    assert np.array_equal(np.isinf(got), np.isinf(expected))
    assert np.array_equal(np.isnan(got), np.isnan(expected))
