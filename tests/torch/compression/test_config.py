"""Tests of CompressionConfig: its checks, its dict form, and compress under it."""

import copy
import json
import re
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.utils._param_validation import InvalidParameterError

torch = pytest.importorskip("torch", reason="kflats.torch needs torch")

from torch import nn  # noqa: E402

from kflats.torch import CompressionConfig, compress  # noqa: E402
from kflats.torch.compression._config import _CONSTRAINTS, _check  # noqa: E402


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(90, 12)
        self.blocks = nn.ModuleList(
            nn.ModuleDict({"up": nn.Linear(12, 20), "down": nn.Linear(20, 12)})
            for _ in range(2)
        )

    def forward(self, ids):
        h = self.embed(ids)
        for block in self.blocks:
            h = h + block["down"](torch.relu(block["up"](h)))
        return h


def net(seed=0):
    torch.manual_seed(seed)
    return Net()


def states_equal(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


TARGETS = ["embed", "blocks.*.up", "blocks.*.down"]


# -- the checks, in one place ------------------------------------------------


def says(name, expected="", where="CompressionConfig"):
    """scikit-learn's message: names the parameter, then what it accepts."""
    return rf"The '{name}' parameter of {re.escape(where)} must be {expected}"


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("budget", 0, says("budget", r"a float in the range \(0\.0, 1\.0\]\.")),
        ("budget", 1.5, says("budget", r"a float in the range \(0\.0, 1\.0\]\.")),
        ("budget", "0.5", says("budget", r"a float in the range \(0\.0, 1\.0\]")),
        ("budget", True, says("budget")),
        ("budget", float("nan"), says("budget")),
        ("unit", "bits", says("unit", "a str among")),
        ("allocation", "per-layer", says("allocation", "a str among")),
        ("k", 0, says("k", r"None, an int in the range \[1, inf\)")),
        ("k", True, says("k")),
        ("k", [], says("k")),
        ("k", [2, "x"], says("k")),
        ("k", [2, True], says("k")),
        ("ranks", "equal", says("ranks", "None or a str among")),
        ("side", "left", says("side", "a str among")),
        ("smoothing", -1.0, says("smoothing", r"a float in the range \[0\.0, inf\)")),
        ("damping", float("inf"), says("damping", r"a float in the range \[0\.0, inf")),
        ("affine", 1, says("affine", "an instance of 'bool'")),
        ("n_refine", -1, says("n_refine", r"an int in the range \[0, inf\)")),
        ("n_refine", True, says("n_refine")),
        ("random_state", -3, says("random_state")),
        ("random_state", True, says("random_state")),
        ("random_state", "seed", says("random_state")),
        ("targets", 3, says("targets")),
        ("bits", (4, 4), says("bits", "None or a non-empty sequence of distinct ints")),
        ("bits", (True,), says("bits")),
        ("group_size", True, says("group_size")),
        ("overrides", ["a"], says("overrides", "an instance of .*Mapping")),
        ("overrides", {"a": {"rank": 2}}, r"overrides\['a'\] sets \['rank'\]"),
        (
            "overrides",
            {"a": {"side": "left"}},
            says("side", "a str among", where="CompressionConfig.overrides['a']"),
        ),
        (
            "overrides",
            {"a": {"k": 0}},
            says("k", "None, an int", where="CompressionConfig.overrides['a']"),
        ),
        ("overrides", {"a": 3}, r"overrides\['a'\] must be a dict"),
        ("fit_params", {"k": 3}, r"fit_params sets \['k'\]"),
    ],
)
def test_each_field_is_checked(field, value, match):
    kwargs = {"budget": 0.5, field: value}
    with pytest.raises(InvalidParameterError, match=match) as info:
        CompressionConfig(**kwargs)
    # scikit-learn's parameter error: a ValueError and a TypeError
    assert isinstance(info.value, ValueError) and isinstance(info.value, TypeError)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"budget": Fraction(1, 2)},
        {"budget": np.float32(0.5), "smoothing": np.float64(0), "damping": 0},
        {"budget": 9_000, "unit": "bytes", "group_size": np.int64(32)},
        {"budget": 1, "unit": "bytes", "bits": [np.int64(4), 8]},
        {"budget": 0.5, "k": np.int64(3), "random_state": 2**32 - 1},
        {"budget": 0.5, "k": [np.int64(3), 1], "affine": np.True_},
        {"budget": 0.5, "random_state": np.random.RandomState(0)},
        {"budget": 0.5, "targets": (nn.Linear, "a.*"), "fit_params": {"tol": 0.1}},
    ],
)
def test_numpy_and_other_numbers_are_accepted(kwargs):
    CompressionConfig(**kwargs)


def test_check_is_the_config_check():
    # compress's command-line check of a budget goes through it
    _check("budget", 0.5, _CONSTRAINTS["budget"])
    with pytest.raises(InvalidParameterError, match=says("budget")):
        _check("budget", 0, _CONSTRAINTS["budget"])


def test_defaults_and_normalised_fields():
    config = CompressionConfig(1, targets=["a", nn.Linear], k=[2, 4])
    assert config.budget == 1.0 and isinstance(config.budget, float)
    assert config.targets == ("a", nn.Linear)
    assert config.k == (2, 4)
    assert (config.unit, config.allocation, config.side) == (
        "numbers",
        "global",
        "auto",
    )
    assert (config.smoothing, config.damping, config.n_refine) == (1.0, 1e-2, 10)


def test_overrides_apply_in_order_later_wins():
    config = CompressionConfig(
        0.5,
        k=4,
        overrides={"blocks.*": {"k": 2, "side": "input"}, "*.down": {"k": 1}},
    )
    assert config.module_settings("embed") == (4, "auto")
    assert config.module_settings("blocks.0.up") == (2, "input")
    assert config.module_settings("blocks.1.down") == (1, "input")


# -- the dict form ------------------------------------------------------------

configs = st.builds(
    CompressionConfig,
    budget=st.floats(0.01, 1.0),
    unit=st.sampled_from(["numbers", "bytes"]),
    targets=st.one_of(
        st.none(),
        st.text("ab*.", min_size=1, max_size=5),
        st.lists(
            st.one_of(
                st.text("ab*.", min_size=1, max_size=5),
                st.sampled_from([nn.Linear, nn.Embedding]),
            ),
            min_size=1,
            max_size=3,
        ),
    ),
    allocation=st.sampled_from(["global", "uniform"]),
    k=st.one_of(
        st.none(),
        st.integers(1, 16),
        st.lists(st.integers(1, 16), min_size=1, max_size=3),
    ),
    ranks=st.sampled_from([None, "adaptive", "uniform"]),
    side=st.sampled_from(["auto", "input", "output"]),
    overrides=st.dictionaries(
        st.text("ab*.0", min_size=1, max_size=4),
        st.fixed_dictionaries(
            {},
            optional={
                "k": st.one_of(
                    st.integers(1, 4), st.lists(st.integers(1, 4), min_size=1)
                ),
                "side": st.sampled_from(["auto", "input", "output"]),
            },
        ),
        max_size=3,
    ),
    smoothing=st.floats(0, 10),
    damping=st.floats(0, 1),
    affine=st.booleans(),
    n_refine=st.integers(0, 20),
    random_state=st.one_of(st.none(), st.integers(0, 2**32 - 1)),
    fit_params=st.fixed_dictionaries(
        {}, optional={"n_init": st.integers(1, 5), "tol": st.floats(0, 1)}
    ),
)


@settings(max_examples=60, deadline=None)
@given(config=configs)
def test_to_dict_from_dict_round_trip_through_json(config):
    data = json.loads(json.dumps(config.to_dict()))
    assert CompressionConfig.from_dict(data) == config


@pytest.mark.parametrize(
    "data, match",
    [
        ([("budget", 0.5)], "read from a dict"),
        ({"budget": 0.5, "rank": 2}, r"unknown CompressionConfig fields \['rank'\]"),
        ({"unit": "numbers"}, "needs a budget"),
        ({"budget": "0.5"}, says("budget")),
        ({"budget": 0.5, "k": "4"}, says("k")),
        ({"budget": 0.5, "targets": [{"type": "os.system"}]}, "not a module type"),
        ({"budget": 0.5, "targets": {"type": "torch.nn.functional"}}, "not a module"),
        ({"budget": 0.5, "overrides": {"a": {"bits": 4}}}, r"sets \['bits'\]"),
    ],
)
def test_from_dict_is_strict(data, match):
    with pytest.raises(ValueError, match=match):
        CompressionConfig.from_dict(data)


def test_to_dict_refuses_what_no_file_can_hold():
    with pytest.raises(ValueError, match="RandomState"):
        CompressionConfig(0.5, random_state=np.random.RandomState(0)).to_dict()

    class Mine(nn.Linear):
        pass

    with pytest.raises(ValueError, match="not a type of torch.nn"):
        CompressionConfig(0.5, targets=Mine).to_dict()


# -- compress under a config --------------------------------------------------


def test_config_and_keywords_give_the_same_model():
    a, b = net(), net()
    ra = compress(a, 0.5, TARGETS, k=[1, 2], side="output", random_state=0)
    config = CompressionConfig(0.5, TARGETS, k=[1, 2], side="output", random_state=0)
    rb = compress(b, config)
    assert states_equal(a, b)
    assert [m.error for m in ra] == [m.error for m in rb]
    assert ra.config == rb.config


def test_a_run_repeats_from_its_report():
    model = net()
    report = compress(
        model,
        0.4,
        TARGETS,
        k={"embed": 3},
        side={"blocks.0.up": "input"},
        allocation="uniform",
        random_state=0,
    )
    data = json.loads(json.dumps(report.to_dict()))
    config = CompressionConfig.from_dict(data["config"])
    assert config.targets == (
        "embed",
        "blocks.0.up",
        "blocks.1.up",
        "blocks.0.down",
        "blocks.1.down",
    )
    assert config.ranks == "uniform"  # resolved: no calibration
    assert config.overrides == {"embed": {"k": 3}, "blocks.0.up": {"side": "input"}}
    again = net()
    report_again = compress(again, config)
    assert states_equal(model, again)
    assert report_again.to_dict()["modules"][0]["k"] == 3
    ids = torch.arange(90).reshape(9, 10)
    torch.testing.assert_close(model(ids), again(ids), rtol=0, atol=0)


def test_overrides_by_pattern_set_k_and_side():
    model = net()
    config = CompressionConfig(
        0.5,
        TARGETS,
        k=2,
        allocation="uniform",
        overrides={"*.up": {"k": 1, "side": "output"}, "*.down": {"side": "input"}},
        random_state=0,
    )
    report = compress(model, config)
    by_name = {m.name: m for m in report}
    assert by_name["blocks.0.up"].k == 1 and by_name["blocks.1.up"].k == 1
    assert {by_name[f"blocks.{i}.up"].side for i in (0, 1)} == {"output"}
    assert {by_name[f"blocks.{i}.down"].side for i in (0, 1)} == {"input"}


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda m, c: compress(m, c, TARGETS), "not both"),
        (lambda m, c: compress(m, c, k=2), r"not both: got a config and \['k'\]"),
        (lambda m, c: compress(m, c, random_state=1), r"\['random_state'\]"),
        (
            lambda m, c: compress(m, CompressionConfig(1e-4, TARGETS, unit="bytes")),
            "cannot be met in bytes",
        ),
        (
            lambda m, c: compress(
                m, CompressionConfig(0.5, TARGETS, overrides={"nope.*": {"k": 1}})
            ),
            r"overrides\['nope.\*'\] matches none of the selected modules",
        ),
        (lambda m, c: compress(m, 0.5, TARGETS, n_inits=3), r"fit_params sets"),
    ],
)
def test_bad_config_use_leaves_the_model_unchanged(call, match):
    model = net()
    before = copy.deepcopy(model.state_dict())
    config = CompressionConfig(0.5, TARGETS)
    with pytest.raises(ValueError, match=match):
        call(model, config)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert type(model.embed) is nn.Embedding


def test_report_of_a_random_state_instance_writes_no_config():
    model = net()
    report = compress(model, 0.5, "embed", k=2, random_state=np.random.RandomState(0))
    assert isinstance(report.config.random_state, np.random.RandomState)
    assert report.to_dict()["config"] is None
