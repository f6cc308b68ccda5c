"""GPT-2's Conv1D quantized like a Linear, and float16 zero points held packed."""

import numpy as np
import pytest
import torch
from torch import nn

from kflats.quantize import (
    form_nbytes,
    quantize,
    quantize_module_,
    quantized_state,
    quantized_tensors,
    state_nbytes,
)
from kflats.torch.layers import pack_quantized_, unpack_quantized_
from kflats.torch.layers._dequantize import dequantize_matrix, dequantize_rows

transformers = pytest.importorskip("transformers")
Conv1D = transformers.pytorch_utils.Conv1D


def pair(seed=0, n_in=64, n_out=48):
    """A Conv1D (weight stored in x out) and the Linear that computes the same."""
    torch.manual_seed(seed)
    conv = Conv1D(n_out, n_in)
    with torch.no_grad():
        conv.weight.normal_()
        conv.bias.normal_()
    linear = nn.Linear(n_in, n_out)
    with torch.no_grad():
        linear.weight.copy_(conv.weight.T)
        linear.bias.copy_(conv.bias)
    return conv, linear


@pytest.mark.parametrize("zero_dtype", ["uint8", "float16"])
@pytest.mark.parametrize("bits, group", [(4, 32), (3, 16), (5, 32), (8, None)])
def test_a_conv1d_quantizes_as_its_linear(bits, group, zero_dtype):
    conv, linear = pair()
    rng = np.random.default_rng(0)
    X = rng.normal(size=(200, 64))
    moment = X.T @ X / 200
    for module in (conv, linear):
        quantize_module_(module, bits, group, moment=moment, zero_dtype=zero_dtype)
    qc, ql = quantized_tensors(conv)["weight"], quantized_tensors(linear)["weight"]
    # the same codes, the conv's read along the columns of its (in, out) weight
    assert qc.shape == tuple(conv.weight.shape) == (64, 48) and qc.axis == 0
    assert np.array_equal(qc.T.unpacked_codes(), ql.unpacked_codes())
    assert torch.equal(conv.weight.T, linear.weight)
    x = torch.randn(5, 64)
    torch.testing.assert_close(conv(x), linear(x))
    # its bytes, counted without quantizing, are those a save writes
    fresh, _ = pair()
    size = form_nbytes(fresh, bits, group, zero_dtype=zero_dtype)
    assert (
        size
        == state_nbytes(quantized_state(conv))
        == form_nbytes(linear, bits, group, zero_dtype=zero_dtype)
    )


@pytest.mark.parametrize("zero_dtype", ["uint8", "float16"])
def test_a_packed_conv1d_computes_the_same(zero_dtype):
    conv, _ = pair(1)
    quantize_module_(conv, 4, 32, method="rtn", zero_dtype=zero_dtype)
    x = torch.randn(3, 7, 64)
    before = conv(x)
    pack_quantized_(conv)
    assert "weight" not in conv._parameters
    assert torch.equal(conv(x), before)
    unpack_quantized_(conv)
    assert torch.equal(conv(x), before)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
def test_float16_zero_points_dequantize_alike_in_torch(bits):
    rng = np.random.default_rng(bits)
    W = rng.normal(size=(24, 64)) + 3.0
    qt = quantize(W, bits, 16, zero_dtype="float16")
    parts = [torch.from_numpy(np.ascontiguousarray(a)) for a in (qt.codes, qt.scales)]
    zeros = torch.from_numpy(qt.zeros)
    whole = dequantize_matrix(*parts, zeros, bits, 16, 1, qt.shape)
    assert np.array_equal(whole.numpy(), qt.dequantize())
    index = torch.tensor([3, 0, 23, 3])
    rows = dequantize_rows(*parts, zeros, bits, 16, 1, qt.shape, index)
    assert np.array_equal(rows.numpy(), qt.dequantize()[index.numpy()])
