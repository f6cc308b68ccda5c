"""Compact scales in the search in bytes: where they pay, priced exactly.

A folder in kflats' format stores a quantized matrix's scales as a byte
each under a power of two shared by 8 groups, where that makes the folder
smaller (its tensors less, a header entry more); other formats keep
float16 scales.
"""

import copy
import os
import tempfile

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch", reason="kflats.torch needs torch")
pytest.importorskip("safetensors")

from torch import nn  # noqa: E402

from kflats.torch import (  # noqa: E402
    CompressionConfig,
    compress,
    load_compressed,
    save_compressed,
)
from kflats.torch.compression import quantize_uniformly, saved_nbytes  # noqa: E402
from kflats.torch.compression._folder_bytes import FolderBudget  # noqa: E402
from kflats.torch.compression._forms import (  # noqa: E402
    _cheaper_scales,
    _check_bytes_feasible,
    _forms,
)
from kflats.torch.layers import quantized_tensors  # noqa: E402

from .._helpers import weight_files  # noqa: E402

TARGETS = [nn.Embedding, nn.Linear]
BITS = (8, 6, 4, 3, 2)


def model_of(seed=0):
    """A table and a Linear large enough for compact scales to pay, and a
    Linear too small (8 groups) for them to; low rank, so that factors pay
    too."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Embedding(1024, 64),
        nn.Linear(64, 256),
        nn.ReLU(),
        nn.Linear(256, 16),
        nn.ReLU(),
        nn.Linear(16, 8),
    )
    with torch.no_grad():
        for m in (model[0], model[1]):
            n, d = m.weight.shape
            m.weight.copy_(torch.randn(n, 8) @ torch.randn(8, d) / 8)
    return model.eval()


def file_keys(path):
    from safetensors import safe_open

    with safe_open(os.path.join(path, "model.safetensors"), framework="pt") as f:
        return set(f.keys())


def names_of(model):
    return [n for n, m in model.named_modules() if isinstance(m, tuple(TARGETS))]


def test_each_quantized_form_keeps_its_smaller_scales_in_the_folder():
    model = model_of()
    named = dict(model.named_modules())
    budget = FolderBudget(model, names_of(model), 0.2)
    for name in names_of(model):
        both = _forms(named[name], BITS, None, compact=True)
        kept = _cheaper_scales(name, both, budget)
        # every quantized form given both ways, one of each kept
        quantized = [f for f in both if f.bits is not None]
        assert sum(f.compact for f in quantized) == len(quantized) // 2
        key = lambda f: f._replace(nbytes=0, compact=False)  # noqa: E731
        assert len({key(f) for f in kept}) == len(kept)
        assert {key(f) for f in kept} == {key(f) for f in both}
        for f in kept:
            twins = [t for t in both if key(t) == key(f)]
            assert budget.priced(name, f).nbytes == min(
                budget.priced(name, t).nbytes for t in twins
            )
        # the large matrices' dense forms compact, the 8 x 16 Linear's (8
        # groups) float16
        if name == "5":
            assert not any(f.compact for f in kept)
        elif name in ("0", "1"):
            integer = [f for f in kept if f.kind == "dense" and f.zero_dtype == "uint8"]
            assert integer and all(f.compact for f in integer)
            # (float16 zero points, a GGUF layout, keep float16 scales)
            assert not any(f.compact for f in kept if f.zero_dtype == "float16")


def test_only_kflats_format_stores_compact_scales():
    from kflats.torch.compression._file_formats import FORMATS

    from .._helpers import tiny_bert

    transformers = pytest.importorskip("transformers")
    model = tiny_bert(transformers, hidden_size=64, intermediate_size=256)
    named = {"": model, **dict(model.named_modules())}
    names = [n for n, m in named.items() if isinstance(m, nn.Linear)]
    for fmt, stored in (("kflats", True), ("onnx", False)):
        config = CompressionConfig(0.3, unit="bytes", format=fmt)
        forms, _ = _check_bytes_feasible(config, names, named)
        assert any(f.compact for fs in forms.values() for f in fs) == stored
    # GGUF's blocks hold float16 scales (and its search float16 zero points)
    assert FORMATS["kflats"].compact_scales and not FORMATS["gguf"].compact_scales


@pytest.fixture(scope="module")
def sizes():
    model = model_of()
    return saved_nbytes(model)


@settings(max_examples=6, deadline=None)
@given(st.floats(0.08, 0.5))
def test_a_folder_with_compact_scales_is_what_the_plan_says(sizes, fraction):
    base = model_of()
    model = copy.deepcopy(base)
    size = round(fraction * sizes)
    report = compress(model, size, TARGETS, unit="bytes", random_state=0)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "m")
        save_compressed(model, path)
        on_disk, keys = weight_files(path), file_keys(path)
        loaded = load_compressed(path, model_of(seed=1))
    assert report.model_bytes <= on_disk <= report.folder_bytes <= size
    ids = torch.randint(0, 1024, (3, 7))
    assert torch.equal(loaded(ids), model(ids))
    for m in report:
        if m.bits is None:
            assert not m.compact_scales
            continue
        if m.name == "5":
            assert not m.compact_scales  # 8 groups: float16 is smaller
        elif m.form == "dense" and m.name in ("0", "1") and m.zero_dtype == "uint8":
            assert m.compact_scales
        stored = {k for k in quantized_tensors(model) if k.startswith(f"{m.name}.")}
        for k in stored:
            codes = f"{k}.scale_codes" in keys
            assert codes == (f"{k}.scale_exponents" in keys)
            assert codes != (f"{k}.scales" in keys)
        # the bases of a Linear's (output side) factors keep float16 scales
        # (scale_layouts); every other matrix follows the form
        compact = {k for k in stored if f"{k}.scale_codes" in keys}
        bases = {k for k in stored if k.endswith(".bases")}
        expected = stored - bases if m.kind == "Linear" else stored
        assert compact == (expected if m.compact_scales else set())


def test_uniform_quantization_with_compact_scales():
    model = model_of()
    names = names_of(model)
    plain = quantize_uniformly(copy.deepcopy(model), names, 0.2)
    compact_model = copy.deepcopy(model)
    compact = quantize_uniformly(compact_model, names, 0.2, compact_scales=True)
    assert compact.bits >= plain.bits
    if compact.bits == plain.bits:
        assert compact.bytes_after < plain.bytes_after
    with tempfile.TemporaryDirectory() as tmp:
        save_compressed(compact_model, os.path.join(tmp, "m"))
        on_disk = weight_files(tmp)
        keys = file_keys(os.path.join(tmp, "m"))
    assert on_disk <= compact.folder_bytes <= FolderBudget(model, names, 0.2).asked
    assert "1.weight.scale_codes" in keys and "5.weight.scales" in keys
