"""Input moments shared by the modules that read the same input, float32."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from kflats.torch import calibrate

from .._helpers import SENTENCES, tokenizer_for

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()


def reference_moments(model, batches, names):
    """sum x x^T of each module's input over real positions, float64, by hand."""
    named = dict(model.named_modules())
    sums = {n: 0.0 for n in names}
    mask = {}

    def hook(name):
        def record(module, args):
            x = args[0].detach().double()
            rows = x[mask["m"]] if x.dim() == 3 else x
            sums[name] = sums[name] + rows.T @ rows

        return record

    handles = [named[n].register_forward_pre_hook(hook(n)) for n in names]
    try:
        with torch.no_grad():
            for batch in batches:
                mask["m"] = batch["attention_mask"].bool()
                model(**batch)
    finally:
        for h in handles:
            h.remove()
    return {n: s.numpy() for n, s in sums.items()}


def tiny_llama():
    config = transformers.LlamaConfig(
        vocab_size=60, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def test_queries_keys_and_values_share_one_float32_sum():
    model = tiny_llama()
    tokenizer = tokenizer_for(60)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    cal = calibrate(model, SENTENCES * 2, tokenizer=tokenizer, batch_size=5)
    records = cal._records
    layer = "model.layers.0."
    sums = [records[layer + f"self_attn.{p}_proj"]["moment_sum"] for p in "qkv"]
    assert sums[0].dtype == np.float32 and sums[0] is sums[1] is sums[2]
    gate, up = (records[layer + f"mlp.{p}_proj"]["moment_sum"] for p in ("gate", "up"))
    assert gate is up and gate is not sums[0]
    texts = SENTENCES * 2
    batches = [tokenizer(texts[i : i + 5]) for i in range(0, len(texts), 5)]
    expected = reference_moments(model, batches, names)
    for name in names:  # the tied head's input moment too
        np.testing.assert_allclose(
            records[name]["moment_sum"], expected[name], rtol=2e-5, atol=1e-4
        )
        assert records[name]["n_rows"] == int(
            sum(b["attention_mask"].sum() for b in batches)
        )


def test_the_calibration_stops_at_the_head():
    model = tiny_llama()
    calls = []
    model.lm_head.register_forward_hook(lambda *a: calls.append(1))
    cal = calibrate(model, SENTENCES, tokenizer=tokenizer_for(60))
    assert not calls  # the logits were never computed
    assert cal.input_moment("lm_head").shape == (32, 32)
    model(**tokenizer_for(60)(SENTENCES[:2]))  # the model still runs whole
    assert calls


class Fork(nn.Module):
    """Two Linear layers that read one tensor in the first batch only."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 3), nn.Linear(4, 3)
        self.calls = 0

    def forward(self, input_ids):
        x = input_ids.float()
        self.calls += 1
        self.a(x)
        self.b(x if self.calls == 1 else 2 * x)
        return x


def test_modules_that_part_ways_keep_their_own_sums():
    model = Fork()
    batches = [{"input_ids": torch.arange(8.0).reshape(2, 4) + i} for i in range(3)]
    cal = calibrate(model, batches)
    x = [b["input_ids"].double() for b in batches]
    a = sum(t.T @ t for t in x)
    b = x[0].T @ x[0] + sum((2 * t).T @ (2 * t) for t in x[1:])
    np.testing.assert_allclose(cal._records["a"]["moment_sum"], a.numpy(), rtol=1e-6)
    np.testing.assert_allclose(cal._records["b"]["moment_sum"], b.numpy(), rtol=1e-6)
    assert cal._records["a"]["moment_sum"] is not cal._records["b"]["moment_sum"]


def test_a_pooler_as_wide_as_the_padded_batch_takes_one_row_a_sequence():
    # a pooler reads the first token of each sequence, (batch, hidden); when
    # a batch is padded to exactly `hidden` positions its input has the
    # attention mask's shape, and must not be read through that mask
    config = transformers.BertConfig(
        vocab_size=60, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=64,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.BertModel(config).eval()
    ids = torch.randint(1, 60, (3, 32))
    mask = torch.ones(3, 32, dtype=torch.int64)
    mask[1, 20:] = mask[2, 9:] = 0  # padding: 32 + 20 + 9 real positions
    batch = {"input_ids": ids, "attention_mask": mask}
    cal = calibrate(model, [batch])
    pooler = cal._records["pooler.dense"]
    assert pooler["n_rows"] == 3
    with torch.no_grad():
        first = model(**batch).last_hidden_state[:, 0].double()
    np.testing.assert_allclose(
        pooler["moment_sum"], (first.T @ first).numpy(), rtol=2e-5, atol=1e-4
    )
    query = cal._records["encoder.layer.0.attention.self.query"]
    assert query["n_rows"] == 32 + 20 + 9


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 30), min_size=1, max_size=5), st.integers(1, 40))
def test_a_moment_sum_adds_every_batch_once(batch_rows, d):
    from kflats.torch.calibration._moments import _MomentSum

    rng = np.random.default_rng(d)
    sums, expected = _MomentSum(d), np.zeros((d, d))
    for batch, n in enumerate(batch_rows):
        rows = torch.as_tensor(rng.normal(size=(n, d)), dtype=torch.float32)
        tensor = torch.empty(0)
        sums = sums.add(rows, batch, (tensor, None))
        expected += (rows.double().T @ rows.double()).numpy()
    array = sums.array()
    assert array.dtype == np.float32 and array.shape == (d, d)
    np.testing.assert_allclose(array, expected, rtol=1e-4, atol=1e-4)
    assert sums.n_rows == sum(batch_rows) and sums.array() is array
