"""format="gguf": the size asked is the GGUF file's, to the byte, and the search
keeps to the forms a GGUF file holds (Q8_0, Q5_0, Q5_1, Q4_0, Q4_1 and float).

The input is a tiny random causal LM written as a GGUF file (tied Llama,
untied Qwen2 with biases), read as users' GGUF files are. A plan's bytes
are checked against the file :func:`kflats.torch.export.export_gguf`
writes of it: the same number, whatever the forms and the selection.
"""

import copy
import warnings

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

from kflats.quantize import quantize_module_, quantized_tensors  # noqa: E402
from kflats.torch import CompressionConfig, compress, save_compressed  # noqa: E402
from kflats.torch.compression._file_formats import FORMATS  # noqa: E402
from kflats.torch.compression._forms import _forms, grid_options  # noqa: E402
from kflats.torch.compression._gguf_bytes import GGUF_GRIDS, GgufBudget  # noqa: E402
from kflats.torch.export import export_gguf  # noqa: E402
from kflats.torch.export._gguf_blocks import gguf_type  # noqa: E402
from kflats.torch.io import (  # noqa: E402
    gguf_source,
    load_pretrained,
    model_source,
    skeleton,
)
from kflats.torch.layers import is_conv1d  # noqa: E402
from kflats.torch.models import select_modules  # noqa: E402

from .._gguf_models import (  # noqa: E402
    tiny_causal_lm,
    write_tiny_gguf,
    write_tiny_gpt2_gguf,
)

TARGETS = ["*proj", "model.embed_tokens", "lm_head"]
# GPT-2: Conv1D layers (weights stored in x out), its head tied
GPT2_TARGETS = ["*.c_attn", "*.c_proj", "*.c_fc", "transformer.wte"]
FAMILIES = ["llama", "qwen2", "gpt2"]
# the bits the search tries by default for GGUF: 5 too (Q5_0, Q5_1)
BITS = CompressionConfig(0.5, unit="bytes", format="gguf").bits
SENTENCES = [
    "the cat sat on the mat and looked at the door",
    "a river runs through the old town in the spring",
    "she reads a book every night before she sleeps",
    "the market opens early and closes before the rain",
]


def _load(path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tokenizer pads with eos
        return load_pretrained(path)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(source, model, tokenizer) of a tied Llama, an untied Qwen2, a GPT-2."""
    root = tmp_path_factory.mktemp("gguf-bytes")
    out = {}
    for family, tied in (("llama", True), ("qwen2", False)):
        source = root / f"{family}.gguf"
        write_tiny_gguf(source, family, tied=tied)
        out[family] = (source, *_load(source))
    source = root / "gpt2.gguf"
    write_tiny_gpt2_gguf(source)
    out["gpt2"] = (source, *_load(source))
    return out


def _selected(model):
    gpt2 = model.config.model_type == "gpt2"
    return select_modules(model, GPT2_TARGETS if gpt2 else TARGETS)


def _held_forms(module):
    rule = FORMATS["gguf"]
    return _forms(module, BITS, None, rule.holds, rule.grids(BITS))


def _key(form):
    return form.kind, form.bits, form.group_size, form.zero_dtype


def test_the_model_read_from_a_gguf_file_records_it(tiny, tmp_path):
    source, model, _ = tiny["llama"]
    assert gguf_source(model) == source
    assert gguf_source(copy.deepcopy(model)) == source
    assert gguf_source(skeleton(model_source(source))) == source
    assert gguf_source(tiny_causal_lm()) is None


def test_the_default_bits_are_gguf_s_with_5_bits_for_gguf_only():
    assert BITS == (8, 6, 5, 4, 3, 2)
    for fmt in ("kflats", "onnx"):
        assert CompressionConfig(0.5, unit="bytes", format=fmt).bits == (8, 6, 4, 3, 2)
    config = CompressionConfig(0.5, unit="bytes", format="gguf", bits=(8, 4))
    assert config.bits == (8, 4)  # bits given: as given
    assert CompressionConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize("family", FAMILIES)
def test_the_forms_searched_are_those_gguf_holds(tiny, family):
    # float, and 8-bit symmetric (Q8_0), 5- and 4-bit symmetric (Q5_0, Q4_0),
    # 5- and 4-bit with float16 zero points (Q5_1, Q4_1) in groups of 32:
    # never uint8 zero points, other widths or groups, or factors
    _, model, _ = tiny[family]
    names, named = _selected(model)
    for name in names:
        forms = _held_forms(named[name])
        assert {_key(f) for f in forms} == {
            ("float", None, None, "uint8"),
            ("dense", 8, 32, None),
            ("dense", 5, 32, None),
            ("dense", 5, 32, "float16"),
            ("dense", 4, 32, None),
            ("dense", 4, 32, "float16"),
        }
        for form in forms[1:]:  # each quantizes to the grid of its block type
            q = copy.deepcopy(named[name])
            quantize_module_(q, form.bits, 32, method="rtn", **grid_options(form))
            qt = quantized_tensors(q)["weight"]
            rows = qt.T if is_conv1d(q) else qt  # as the GGUF file holds it
            assert qt.zero_dtype == form.zero_dtype
            assert gguf_type(rows)[0].name == GGUF_GRIDS[form.bits, form.zero_dtype]


def test_settings_gguf_cannot_take_are_refused(tiny):
    from kflats.torch import CompressionConfig

    check = FORMATS["gguf"].check
    with pytest.raises(ValueError, match="blocks of 32 .*give 32 or None"):
        check(CompressionConfig(0.5, unit="bytes", format="gguf", group_size=64))
    with pytest.raises(ValueError, match="include 8, 5 or 4 in bits"):
        check(CompressionConfig(0.5, unit="bytes", format="gguf", bits=(6, 3, 2)))
    check(CompressionConfig(0.5, unit="bytes", format="gguf", bits=(8,)))
    check(CompressionConfig(0.5, unit="bytes", format="gguf", bits=(5,)))


def _prepared(tiny, family, data):
    """A copy of the model, its selection, a form drawn for each selected
    module, and maybe an unselected matrix quantized before the budget."""
    source, model, tokenizer = tiny[family]
    model = copy.deepcopy(model)
    names, named = _selected(model)
    keep = data.draw(st.lists(st.booleans(), min_size=len(names), max_size=len(names)))
    chosen = [n for n, k in zip(names, keep, strict=True) if k] or names[:1]
    tables = (torch.nn.Embedding,)
    left = [n for n in names if n not in chosen and not isinstance(named[n], tables)]
    outside = bool(left) and data.draw(st.booleans())
    if outside:  # a tensor outside the selection, quantized already
        quantize_module_(named[left[0]], 8, 32, symmetric=True, method="rtn")
    forms = {n: data.draw(st.sampled_from(_held_forms(named[n]))) for n in chosen}
    # (a folder holds one quantized matrix at least)
    assume(outside or any(f.kind == "dense" for f in forms.values()))
    return source, model, tokenizer, chosen, named, forms


@settings(max_examples=10, deadline=None)
@given(family=st.sampled_from(FAMILIES), data=st.data())
def test_a_plans_bytes_are_the_files_bytes(tiny, tmp_path_factory, family, data):
    source, model, tokenizer, names, named, forms = _prepared(tiny, family, data)
    budget = GgufBudget(model, names, 10**9)
    predicted = budget.frame + budget.rest
    predicted += sum(budget.priced(n, f).nbytes for n, f in forms.items())
    for name, form in forms.items():
        if form.kind == "dense":
            quantize_module_(
                named[name], form.bits, 32, method="rtn", **grid_options(form)
            )
    root = tmp_path_factory.mktemp("plan")
    save_compressed(model, root / "folder", tokenizer=tokenizer)
    result = export_gguf(root / "folder", root / "out.gguf", source=source)
    assert result.file_bytes == predicted


@pytest.mark.parametrize("grid", list(GGUF_GRIDS), ids=list(GGUF_GRIDS.values()))
def test_each_block_type_is_priced_at_its_files_bytes(tiny, tmp_path, grid):
    # every selected module of a tied Llama and a GPT-2 (Conv1D) in one type
    bits, zeros = grid
    for family in ("llama", "gpt2"):
        source, model, tokenizer = tiny[family]
        model = copy.deepcopy(model)
        names, named = _selected(model)
        budget = GgufBudget(model, names, 10**9)
        predicted = budget.frame + budget.rest
        for name in names:
            held = _held_forms(named[name])
            (form,) = [f for f in held if _key(f) == ("dense", bits, 32, zeros)]
            predicted += budget.priced(name, form).nbytes
            quantize_module_(named[name], bits, 32, method="rtn", **grid_options(form))
        save_compressed(model, tmp_path / family, tokenizer=tokenizer)
        out = tmp_path / f"{family}.gguf"
        result = export_gguf(tmp_path / family, out, source=source)
        assert result.file_bytes == predicted
        assert set(result.types) == {"F32", GGUF_GRIDS[grid]}


@pytest.mark.parametrize("family", FAMILIES)
def test_the_skeleton_is_priced_as_the_loaded_model(tiny, family):
    # kflats compress checks the size on the model without its weights
    # (before loading it): the same numbers as once loaded
    source, model, _ = tiny[family]
    names, named = _selected(model)
    bare = skeleton(model_source(source))
    ours, theirs = GgufBudget(model, names, 0.3), GgufBudget(bare, names, 0.3)
    assert (ours.total, ours.asked, ours.rest, ours.frame) == (
        theirs.total,
        theirs.asked,
        theirs.rest,
        theirs.frame,
    )
    for name in names:
        for form in _held_forms(named[name]):
            assert ours.nbytes(name, form) == theirs.nbytes(name, form)


@pytest.mark.parametrize(
    "family, size",
    [("llama", 70_000), ("llama", 110_000), ("llama", 200_000), ("gpt2", 360_000)],
)
def test_the_gguf_file_is_within_the_size_asked(tiny, tmp_path, family, size):
    # the plan's bytes are the file's, and at most the size asked
    source, model, tokenizer = tiny[family]
    model = copy.deepcopy(model)
    names, _ = _selected(model)
    report = compress(
        model,
        size,
        names,
        calibration=SENTENCES,
        tokenizer=tokenizer,
        unit="bytes",
        format="gguf",
        random_state=0,
        progress=False,
    )
    save_compressed(model, tmp_path / "folder", tokenizer=tokenizer)
    result = export_gguf(tmp_path / "folder", tmp_path / "out.gguf", source=source)
    assert result.file_bytes == report.model_bytes + report.header_bytes
    assert result.file_bytes <= size
    assert set(result.types) <= {"F32", *GGUF_GRIDS.values()}
    if size in (70_000, 360_000):  # below Q8_0 everywhere: 4- or 5-bit codes
        assert {"Q4_0", "Q4_1", "Q5_0", "Q5_1"} & set(result.types)


def test_a_size_below_the_smallest_file_names_it(tiny):
    _, model, _ = tiny["llama"]
    from kflats.torch.compression import check_budget

    names, named = select_modules(model, TARGETS)
    budget = GgufBudget(model, names, 10**9)
    least = [min(budget.nbytes(n, f) for f in _held_forms(named[n])) for n in names]
    smallest = budget.frame + budget.rest + sum(least)
    match = f"smallest size reachable is {smallest} bytes"
    with pytest.raises(ValueError, match=match):
        check_budget(smallest - 1, names, named, "global", "bytes", format="gguf")
    assert check_budget(smallest, names, named, "global", "bytes", format="gguf")


def test_a_model_not_read_from_a_gguf_file_is_refused(tiny):
    model = tiny_causal_lm()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="was not read from a GGUF file"):
        compress(
            model,
            100_000,
            TARGETS,
            unit="bytes",
            format="gguf",
            progress=False,
        )
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_prices_grow_with_the_bits(tiny):
    # per 32 numbers: Q4_0 18 bytes < Q4_1 20 < Q5_0 22 < Q5_1 24 < Q8_0 34
    # < F32 128, padded
    _, model, _ = tiny["qwen2"]
    names, named = select_modules(model, TARGETS)
    budget = GgufBudget(model, names, 10**9)
    for name in names:
        prices = {_key(f): budget.nbytes(name, f) for f in _held_forms(named[name])}
        order = [
            ("dense", 4, 32, None),
            ("dense", 4, 32, "float16"),
            ("dense", 5, 32, None),
            ("dense", 5, 32, "float16"),
            ("dense", 8, 32, None),
            ("float", None, None, "uint8"),
        ]
        assert np.all(np.diff([prices[k] for k in order]) > 0), name


def test_what_no_gguf_file_can_be_made_of_is_named(tiny, tmp_path):
    import shutil

    # a tensor outside the selection quantized in a form no GGUF type holds
    source, model, _ = tiny["llama"]
    model = copy.deepcopy(model)
    names, named = _selected(model)
    quantize_module_(named[names[-1]], 3, 32, method="rtn")
    with pytest.raises(ValueError, match=rf"'{names[-1]}.weight' is quantized in a "
                       r"form no GGUF type holds \(3-bit codes"):  # fmt: skip
        GgufBudget(model, names[:-1], 10**6)
    # the GGUF file the model was read from, gone since
    moved = tmp_path / "moved.gguf"
    shutil.copy(source, moved)
    model, _ = _load(moved)
    moved.unlink()
    with pytest.raises(ValueError, match="moved.gguf', which is not a file any more"):
        GgufBudget(model, names, 10**6)


def test_no_spectrum_nor_clusters_are_computed_for_a_format_without_factors(
    tiny, monkeypatch
):
    # GGUF holds no factor form: the search takes no spectrum of any module
    # and partitions no table into clusters (SmolLM2: its 49,152-row table)
    from kflats.torch.compression import _form_errors, _plan_bytes

    def refused(*args, **kwargs):
        raise AssertionError("a spectrum or a partition for format='gguf'")

    monkeypatch.setattr(_plan_bytes, "_weight_spectrum", refused)
    monkeypatch.setattr(_form_errors, "_Partition", refused)
    _, model, tokenizer = tiny["llama"]
    model = copy.deepcopy(model)
    names, _ = _selected(model)
    report = compress(
        model, 110_000, names, calibration=SENTENCES, tokenizer=tokenizer,
        unit="bytes", format="gguf", random_state=0, progress=False,
    )  # fmt: skip
    assert all(m.form != "projective" for m in report)
