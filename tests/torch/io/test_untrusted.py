"""A compressed folder, a factors file, a calibration file: untrusted input.

Crafted inputs, each made in ``tmp_path`` from a valid one, against
``load_compressed``, ``ProjectiveFactors.load`` and ``Calibration.load``.
Each must end in a clear exception (type and message, the file named) or,
where the change is harmless, load; nothing outside the loaded folder may
change, and no code from the folder may run (every crafted folder holds
Python files that would leave a marker file if imported). Hypothesis then
mutates a valid kflats.json and a valid .npz at random.

The models are tiny (a small torch module, a two-layer BERT built from a
config, a sentence-transformers model made of that BERT and a pooling), so
that the whole suite runs in well under a minute.
"""

import hashlib
import io
import json
import math
import os
import shutil
import sys
import time
import tracemalloc
import zipfile

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

torch = pytest.importorskip("torch", reason="kflats.torch needs torch")
safetensors_torch = pytest.importorskip(
    "safetensors.torch", reason="the folder format needs safetensors"
)
transformers = pytest.importorskip("transformers")
st = pytest.importorskip("sentence_transformers")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as hst  # noqa: E402
from torch import nn  # noqa: E402

from kflats.factorize import ProjectiveFactors, svd_factors  # noqa: E402
from kflats.torch import (  # noqa: E402
    Calibration,
    compress,
    load_compressed,
    save_compressed,
)

from .._helpers import tiny_bert  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:Duplicate name:UserWarning")

# -- the valid inputs --------------------------------------------------------------


def build(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Embedding(120, 16, padding_idx=3),
        nn.Linear(16, 24),
        nn.ReLU(),
        nn.Linear(24, 12, bias=False),
        nn.LayerNorm(12),
        nn.Linear(12, 12),
    ).eval()


def compressed_module(seed=0):
    model = build(seed)
    compress(
        model,
        0.5,
        targets=["0", "1", "3", "5"],
        k=2,
        side={"1": "input", "3": "output", "5": "output"},
        affine=True,
        allocation="uniform",
        random_state=0,
        progress=False,
    )
    return model.eval()


WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(295)]


def bert_and_tokenizer(tmp, seed=0):
    """A tiny BertModel (300 words) and its fast tokenizer."""
    model = tiny_bert(transformers, seed=seed)
    (tmp / "vocab.txt").write_text("\n".join(WORDS) + "\n")
    tokenizer = transformers.BertTokenizerFast(vocab_file=str(tmp / "vocab.txt"))
    return model, tokenizer


TARGETS = ["*word_embeddings", "*layer.0.intermediate.dense"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Valid folders of the three kinds, and the outputs they must give."""
    tmp = tmp_path_factory.mktemp("valid")
    out = {}
    model = compressed_module()
    save_compressed(model, tmp / "module")
    # under no_grad, as the loaded models are run: both take the packed form
    with torch.no_grad():
        out["module"] = model(IDS)
    save_compressed(compressed_module(seed=5), tmp / "module-other")

    bert, tokenizer = bert_and_tokenizer(tmp)
    compress(bert, 0.5, targets=TARGETS, k=2, random_state=0, progress=False)
    save_compressed(bert, tmp / "bert", tokenizer=tokenizer)
    with torch.no_grad():
        out["bert"] = bert(input_ids=IDS).last_hidden_state

    hf, tokenizer = bert_and_tokenizer(tmp, seed=1)
    hf.save_pretrained(tmp / "hf")
    tokenizer.save_pretrained(tmp / "hf")
    modules = st.sentence_transformer.modules
    model = st.SentenceTransformer(
        modules=[modules.Transformer(str(tmp / "hf")), modules.Pooling(32)],
        device="cpu",
    )
    compress(model, 0.5, targets=TARGETS, k=2, random_state=0, progress=False)
    save_compressed(model, tmp / "st")
    out["st"] = model.encode(SENTENCES, convert_to_tensor=True)
    return tmp, out


IDS = torch.randint(5, 120, (2, 9), generator=torch.Generator().manual_seed(0))
SENTENCES = ["w1 w2 w3", "w7 w9"]

EVIL = """
import pathlib
pathlib.Path({marker!r}).write_text("code from the folder ran")
"""


class World:
    """A copy of a valid folder in ``tmp_path``, and what lies beside it.

    ``outside`` holds what a crafted folder might point at: another model's
    folder, a pooling that changes the outputs, a plain file. The folder
    holds Python files that leave ``marker`` if anything imports them.
    """

    def __init__(self, tmp_path, folders, kind):
        source, self.expected = folders
        self.kind = kind
        self.folder = tmp_path / "folder"
        shutil.copytree(source / kind, self.folder)
        self.outside = tmp_path / "outside"
        shutil.copytree(source / "module-other", self.outside / "model")
        (self.outside / "1_Pooling").mkdir()
        (self.outside / "1_Pooling" / "config.json").write_text(
            json.dumps({"word_embedding_dimension": 32, "pooling_mode": "cls"})
        )
        (self.outside / "secret.txt").write_text("not for a model")
        self.marker = tmp_path / "marker"
        code = EVIL.format(marker=str(self.marker))
        for name in ("evil.py", "configuration_evil.py", "modeling_evil.py"):
            (self.folder / name).write_text(code)
        (self.folder / "evil_pkg").mkdir()
        (self.folder / "evil_pkg" / "__init__.py").write_text(code)

    # the folder's files
    def path(self, name=""):
        return self.folder / name

    def json(self, name):
        return json.loads(self.path(name).read_text())

    def write_json(self, name, value):
        self.path(name).write_text(json.dumps(value))

    def manifest(self, **changes):
        manifest = self.json("kflats.json")
        manifest.update(changes)
        self.write_json("kflats.json", manifest)
        return manifest

    def entry(self, name, **changes):
        manifest = self.json("kflats.json")
        manifest["modules"][name].update(changes)
        self.write_json("kflats.json", manifest)

    def tensors(self):
        return safetensors_torch.load_file(self.path("model.safetensors"))

    def write_tensors(self, state, name="model.safetensors"):
        safetensors_torch.save_file(state, self.path(name), metadata={"format": "pt"})

    def snapshot(self):
        found = {}
        for root in (self.outside, self.folder):
            for p in sorted(root.rglob("*")):
                if p.is_file() and not p.is_symlink():
                    found[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
        return found

    def load(self):
        if self.kind == "module":
            return load_compressed(self.folder, build(seed=9))
        return load_compressed(self.folder, device="cpu")

    def outputs(self, model):
        if self.kind == "module":
            return model(IDS)
        if self.kind == "bert":
            return model(input_ids=IDS).last_hidden_state
        return model.encode(SENTENCES, convert_to_tensor=True)


# -- crafted folders -----------------------------------------------------------------

FOLDER_CASES = []


def case(group, kind, match, exc=ValueError):
    """Register a crafted folder: ``kind`` is copied, the function spoils it."""

    def register(spoil):
        FOLDER_CASES.append(
            pytest.param(kind, spoil, exc, match, id=f"{group}-{spoil.__name__}")
        )
        return spoil

    return register


HARMLESS = []


def harmless(kind):
    def register(change):
        HARMLESS.append(pytest.param(kind, change, id=change.__name__))
        return change

    return register


# ---- kflats.json: syntax, format, version

BAD_JSON = [
    ("not_json", "{not json", "kflats.json is not valid JSON"),
    ("empty", "", "kflats.json is not valid JSON"),
    ("deep", "[" * 100_000 + "]" * 100_000, "kflats.json is not valid JSON"),
    ("a_list", '["a list"]', "expected format 'kflats.compressed'"),
    ("other_format", '{"format": "kflats.torch.compressed"}', "expected format"),
    ("not_utf8", b"\xff\xfe{", "kflats.json is not valid JSON"),
]
for _name, _text, _match in BAD_JSON:

    def _spoil(w, text=_text):
        p = w.path("kflats.json")
        p.write_bytes(text) if isinstance(text, bytes) else p.write_text(text)

    _spoil.__name__ = _name
    case("manifest", "module", _match)(_spoil)

VERSIONS = [
    (1, "format version 1; this kflats reads versions 2 and 3"),
    (4, "format version 4; this kflats reads versions 2 and 3"),
    (
        "abc",
        r"'version' must be an integer format version \(this kflats reads 2 "
        r"and 3\), got 'abc' \(str\)",
    ),
    (math.nan, r"must be an integer format version .*, got nan \(float\)"),
    ([2, 2], r"must be an integer format version .*, got \[2, 2\] \(list\)"),
    ("2", r"must be an integer format version .*, got '2' \(str\)"),
    (2.0, r"must be an integer format version .*, got 2.0 \(float\)"),
    (True, r"must be an integer format version .*, got True \(bool\)"),
    (None, r"must be an integer format version .*, got None \(NoneType\)"),
]
for _i, (_version, _match) in enumerate(VERSIONS):

    def _spoil(w, version=_version):
        w.manifest(version=version)

    _spoil.__name__ = f"version_{_i}"
    case("manifest", "module", _match)(_spoil)

# ---- kflats.json: fields

TOP = [
    ("kind_unknown", {"kind": "onnx"}, "is incomplete: kind must be one of"),
    ("kind_missing", {"kind": None}, "kind must be one of"),
    ("architecture_int", {"architecture": 5}, "architecture must be a dotted"),
    ("architecture_code", {"architecture": "os.system('x')"}, "architecture must"),
    ("root_list", {"root": []}, "root must be an object"),
    ("root_extra", {"root": {"module": "", "path": "", "x": 1}}, "root must be"),
    ("root_path_int", {"root": {"module": "", "path": 5}}, "root.path must be"),
    ("root_absolute", {"root": {"module": "", "path": "/etc"}}, "not a relative"),
    ("root_up", {"root": {"module": "", "path": "../outside"}}, "points outside"),
    ("modules_empty", {"modules": {}}, "modules must be an object of 1..65536"),
    ("modules_list", {"modules": [1]}, "modules must be an object"),
    ("modules_many", {"modules": dict.fromkeys(map(str, range(70_000)), 1)}, "1..65"),
    ("version_info", {"kflats_version": 5}, "kflats_version must be a string"),
]
for _name, _changes, _match in TOP:

    def _spoil(w, changes=_changes):
        w.manifest(**changes)

    _spoil.__name__ = _name
    case("manifest", "module", _match)(_spoil)

ENTRIES = [
    ("not_an_object", "1", [1, 2], "unknown layer entry for '1'"),
    ("type_unknown", "1", {"type": "ProjectiveConv"}, "unknown layer entry for '1'"),
    ("shape_short", "1", {"shape": [16]}, "'1': shape must be a list of 2"),
    ("shape_negative", "1", {"shape": [-16, 24]}, "shape must be an integer in 1"),
    ("shape_str", "1", {"shape": ["16", 24]}, "shape must be an integer"),
    ("shape_bool", "1", {"shape": [True, 24]}, "shape must be an integer"),
    ("shape_huge", "1", {"shape": [2**40, 24]}, "shape must be an integer"),
    ("ranks_million", "1", {"ranks": [1] * 10**6}, "holds more values than"),
    ("ranks_thousand", "1", {"ranks": [1] * 1000}, "a list of 1..16 ranks"),
    ("ranks_negative", "1", {"ranks": [-1, 2]}, "ranks must be integers in 0..24"),
    ("ranks_huge", "1", {"ranks": [2**40, 2]}, "ranks must be integers in 0..24"),
    ("ranks_str", "1", {"ranks": "22"}, "ranks must be a list"),
    ("ranks_empty", "1", {"ranks": []}, "ranks must be a list of 1..16"),
    ("ranks_float", "1", {"ranks": [2.0, 2]}, "ranks must be integers"),
    ("ranks_three", "1", {"ranks": [2, 2, 2]}, r"1.bases is stored with shape"),
    ("affine_str", "1", {"affine": "False"}, "affine must be true or false"),
    ("affine_flipped", "1", {"affine": False}, r"1 tensor\(s\) unexpected \(1.means"),
    ("bias_str", "1", {"bias": "True"}, "bias must be true or false"),
    ("bias_flipped", "1", {"bias": False}, r"1 tensor\(s\) unexpected \(1.bias"),
    ("side_unknown", "1", {"side": "sideways"}, "side must be 'input' or 'output'"),
    ("side_none", "1", {"side": None}, "side must be"),
    ("side_swapped", "1", {"side": "output"}, "1.labels is stored with shape"),
    ("padding_far", "0", {"padding_idx": 10**9}, "padding_idx must be an integer"),
    ("padding_str", "0", {"padding_idx": "3"}, "padding_idx must be an integer"),
    ("extra_key", "1", {"evil": 1}, "its entry must be an object of the keys"),
    ("shape_other", "1", {"shape": [16, 25]}, "'1' do not fit its entry"),
]
for _name, _layer, _changes, _match in ENTRIES:

    def _spoil(w, layer=_layer, changes=_changes):
        if isinstance(changes, dict):
            w.entry(layer, **changes)
        else:
            manifest = w.json("kflats.json")
            manifest["modules"][layer] = changes
            w.write_json("kflats.json", manifest)

    _spoil.__name__ = _name
    case("manifest", "module", _match)(_spoil)


@case("manifest", "module", "its entry must be an object of the keys")
def missing_key(w):
    manifest = w.json("kflats.json")
    del manifest["modules"]["1"]["ranks"]
    w.write_json("kflats.json", manifest)


@case("manifest", "module", "a layer name must be a dotted module name")
def layer_name_up(w):
    manifest = w.json("kflats.json")
    manifest["modules"]["../1"] = manifest["modules"].pop("1")
    w.write_json("kflats.json", manifest)


@case("manifest", "module", "the cluster ids of '9' are not stored")
def layer_not_in_model(w):
    manifest = w.json("kflats.json")
    manifest["modules"]["9"] = manifest["modules"].pop("1")
    w.write_json("kflats.json", manifest)


@case("manifest", "module", "kflats.json is not a file")
def manifest_a_folder(w):
    w.path("kflats.json").unlink()
    w.path("kflats.json").mkdir()


@case("manifest", "module", "has no kflats.json")
def manifest_missing(w):
    w.path("kflats.json").unlink()


@case("manifest", "module", "larger than any kflats writes")
def manifest_huge(w):
    w.path("kflats.json").write_bytes(b" " * (33 * 2**20))


# ---- paths: nothing outside the folder


@case("paths", "module", "kflats.json' points outside the folder")
def manifest_link_out(w):
    w.path("kflats.json").unlink()
    w.path("kflats.json").symlink_to(w.outside / "model" / "kflats.json")


@case("paths", "module", "'model.safetensors' is a symbolic link out of the folder")
def weights_link_out(w):
    w.path("model.safetensors").unlink()
    w.path("model.safetensors").symlink_to(w.outside / "model" / "model.safetensors")


@case("paths", "module", "'notes.txt' is a symbolic link out of the folder")
def any_link_out(w):
    w.path("notes.txt").symlink_to(w.outside / "secret.txt")


@case("paths", "module", "'sub' is a symbolic link out of the folder")
def folder_link_out(w):
    w.path("sub").symlink_to(w.outside / "model", target_is_directory=True)


@case("paths", "module", "'pipe' is neither a regular file nor a folder")
def a_pipe(w):
    os.mkfifo(w.path("pipe"))


def _index(w, weight_map=None, **spoil):
    """Split the weights into two shards and an index, then spoil the index."""
    if w.path("model.safetensors").exists():
        state = w.tensors()
        w.path("model.safetensors").unlink()
        keys = sorted(state)
        w.shards = {"a.safetensors": keys[::2], "b.safetensors": keys[1::2]}
        w.state = state
        for name, part in w.shards.items():
            w.write_tensors({k: state[k] for k in part}, name)
    index = {k: name for name, part in w.shards.items() for k in part}
    index.update(spoil)
    body = {"metadata": {}, "weight_map": index if weight_map is None else weight_map}
    w.write_json("model.safetensors.index.json", body)
    return w.state, w.shards


@harmless("module")
def sharded(w):
    _index(w)


@harmless("module")
def link_inside(w):
    w.path("model.safetensors").rename(w.path("real.safetensors"))
    w.path("model.safetensors").symlink_to("real.safetensors")


@case("paths", "module", "index.json entry '/.*' is not a relative path")
def shard_absolute(w):
    _, shards = _index(w)
    key = shards["b.safetensors"][0]
    _index(w, **{key: str(w.outside / "model" / "model.safetensors")})


@case("paths", "module", "index.json entry '/etc/passwd' is not a relative path")
def shard_etc_passwd(w):
    _, shards = _index(w)
    _index(w, **{shards["b.safetensors"][0]: "/etc/passwd"})


@case("paths", "module", "index.json entry '/no/such/file' is not a relative path")
def shard_absolute_missing(w):
    # answered like /etc/passwd: nothing tells whether an outside file exists
    _, shards = _index(w)
    _index(w, **{shards["b.safetensors"][0]: "/no/such/file"})


@case("paths", "module", "entry '../outside/model/model.safetensors' points outside")
def shard_up(w):
    _, shards = _index(w)
    _index(w, **{shards["b.safetensors"][0]: "../outside/model/model.safetensors"})


@case("paths", "module", "'b.safetensors' is a symbolic link out of the folder")
def shard_link_out(w):
    _index(w)
    w.path("b.safetensors").unlink()
    w.path("b.safetensors").symlink_to(w.outside / "model" / "model.safetensors")


for _name, _value in [("int", 5), ("null", None), ("list", ["a.safetensors"])]:

    def _spoil(w, value=_value):
        _, shards = _index(w)
        _index(w, **{shards["b.safetensors"][0]: value})

    _spoil.__name__ = f"weight_map_value_{_name}"
    case("paths", "module", "weight_map must map tensor names to file names")(_spoil)


@case("paths", "module", "weight_map must map tensor names to file names")
def weight_map_not_a_dict(w):
    _index(w, weight_map=["a.safetensors"])


@case("paths", "module", r"weight file\(s\) missing .*\['b.safetensors'\]")
def shard_missing(w):
    _index(w)
    w.path("b.safetensors").unlink()


@case("paths", "module", "tensor '.*' is stored twice, in a.safetensors and b")
def tensor_in_two_shards(w):
    state, shards = _index(w)
    key = shards["a.safetensors"][0]
    part = {k: state[k] for k in shards["b.safetensors"] + [key]}
    w.write_tensors(part, "b.safetensors")


@case("paths", "module", "lies in b.safetensors, which model.safetensors.index")
def tensor_not_where_the_index_says(w):
    state, shards = _index(w)
    key = shards["a.safetensors"][0]
    w.write_tensors({k: state[k] for k in shards["a.safetensors"][1:]}, "a.safetensors")
    w.write_tensors(
        {k: state[k] for k in shards["b.safetensors"] + [key]}, "b.safetensors"
    )


# ---- tensors: shapes and dtypes against the manifest and the model


def _tensors(w, **changes):
    state = w.tensors()
    for key, value in changes.items():
        key = key.replace("__", ".")
        if value is None:
            del state[key]
        else:
            state[key] = value(state[key]) if callable(value) else value
    w.write_tensors(state)


TENSORS = [
    ("labels_missing", {"1__labels": None}, "cluster ids of '1' are not stored"),
    ("labels_float", {"1__labels": lambda t: t.float()}, "stored as torch.float32"),
    ("labels_bool", {"1__labels": lambda t: t.bool()}, "stored as torch.bool"),
    ("labels_int32", {"1__labels": lambda t: t.int()}, "1.labels: stored int32"),
    ("labels_long", {"1__labels": torch.zeros(17, dtype=torch.uint8)}, "shape"),
    ("labels_range", {"1__labels": lambda t: t * 3}, "corrupt entry for '1'"),
    ("bias_float16", {"1__bias": lambda t: t.half()}, "1.bias: stored float16"),
    ("bases_float16", {"1__bases": lambda t: t.half()}, "dtypes"),
    ("bases_int32", {"1__bases": lambda t: t.int()}, "one floating dtype"),
    ("dense_missing", {"4__weight": None}, r"1 tensor\(s\) missing \(4.weight\)"),
    ("dense_shape", {"4__bias": torch.zeros(13)}, r"4.bias: stored \[13\]"),
    ("extra_tensor", {"evil": torch.zeros(1)}, r"unexpected \(evil\)"),
    ("coefficients_rank", {"1__coefficients__0": torch.zeros(8, 9)}, "stored with"),
    ("bases_shape", {"1__bases": torch.zeros(3, 24)}, "1.bases is stored with"),
    ("coefficients_0d", {"1__coefficients__0": torch.tensor(1.0)}, "stored with"),
    ("means_1d", {"1__means": torch.zeros(24)}, "1.means is stored with shape"),
]
for _name, _changes, _match in TENSORS:

    def _spoil(w, changes=_changes):
        _tensors(w, **changes)

    _spoil.__name__ = _name
    case("tensors", "module", _match)(_spoil)


@case("tensors", "module", r"weight file\(s\) missing")
def weights_missing(w):
    w.path("model.safetensors").unlink()


@case("tensors", "module", "unreadable weight file")
def weights_garbage(w):
    w.path("model.safetensors").write_bytes(b"garbage")


@case("tensors", "module", "unreadable weight file")
def weights_header_lies(w):
    data = w.path("model.safetensors").read_bytes()
    w.path("model.safetensors").write_bytes(data[: len(data) // 2])


@case("tensors", "module", "unreadable weight file")
def weights_empty(w):
    w.path("model.safetensors").write_bytes(b"")


@case("tensors", "module", "tensors of '5' do not compute what kflats.json records")
def square_side_swapped(w):
    # layer "5" is a square Linear(12, 12) of side "output"
    w.entry("5", side="input")


# ---- a transformers folder


def _config(w, folder="", **changes):
    config = w.json(os.path.join(folder, "config.json"))
    config.update(changes)
    w.write_json(os.path.join(folder, "config.json"), config)


CONFIGS = [
    ("auto_map", {"auto_map": {"AutoConfig": "configuration_evil.C"}}, "never runs"),
    ("vocab_huge", {"vocab_size": 2**40}, "vocab_size = 1099511627776; an integer"),
    ("vocab_negative", {"vocab_size": -5}, "vocab_size = -5; an integer"),
    ("vocab_str", {"vocab_size": "300"}, "vocab_size = '300'; an integer"),
    ("vocab_other", {"vocab_size": 301}, r"Embedding \(301, 32\).*\(300, 32\)"),
    ("hidden_huge", {"hidden_size": 2**20}, "another architecture|do not fit"),
    ("layers_million", {"num_hidden_layers": 10**6}, "num_hidden_layers = 1000000"),
    ("intermediate_float", {"intermediate_size": 64.5}, "intermediate_size = 64.5"),
    ("model_type_gpt2", {"model_type": "gpt2"}, "describes a 'gpt2' model"),
    ("model_type_none", {"model_type": None}, "describes a None model"),
    ("heads_zero", {"num_attention_heads": 0}, "does not build a BertModel"),
]
for _name, _changes, _match in CONFIGS:

    def _spoil(w, changes=_changes):
        _config(w, **changes)

    _spoil.__name__ = _name
    case("transformers", "bert", _match)(_spoil)


def _root(w, **changes):
    manifest = w.json("kflats.json")
    manifest["root"].update(changes)
    w.write_json("kflats.json", manifest)


ROOTS = [
    ("architecture_os", "os.system", "is not a class of transformers"),
    ("architecture_int", 5, "root.architecture must be a dotted Python name"),
    ("architecture_gpt2", "transformers.GPT2Model", "describes a 'bert' model"),
    ("architecture_config", "transformers.BertConfig", "not available"),
    ("architecture_missing", "transformers.NoSuchModel", "not available"),
    ("architecture_folder", "evil.Model", "is not a class of transformers"),
]
for _name, _arch, _match in ROOTS:

    def _spoil(w, arch=_arch):
        _root(w, architecture=arch)

    _spoil.__name__ = _name
    case("transformers", "bert", _match)(_spoil)


@case("transformers", "bert", "root.attn_implementation must be a string or null")
def attention_not_a_string(w):
    _root(w, attn_implementation=["kernels-community/evil"])


@case("transformers", "bert", "config.json cannot be read")
def config_missing(w):
    w.path("config.json").unlink()


@case("transformers", "bert", "config.json is not a JSON object")
def config_a_list(w):
    w.write_json("config.json", [1])


@case("transformers", "bert", "'config.json' is a symbolic link out of the folder")
def config_link_out(w):
    w.path("config.json").unlink()
    w.path("config.json").symlink_to(w.outside / "secret.txt")


@case("transformers", "bert", "the tokenizer's vocabulary is missing")
def tokenizer_without_vocabulary(w):
    for name in ("tokenizer.json", "vocab.txt"):
        w.path(name).unlink(missing_ok=True)


@case("transformers", "bert", r"\(12\).*of another dtype|dtype")
def weights_float16_config_float32(w):
    state = w.tensors()
    key = "embeddings.LayerNorm.weight"
    state[key] = state[key].half()
    w.write_tensors(state)


@harmless("bert")
def attention_kernel_in_config(w):
    _config(w, attn_implementation="kernels-community/evil")
    _root(w, attn_implementation=None)


@harmless("bert")
def no_tokenizer_at_all(w):
    for name in ("tokenizer.json", "vocab.txt", "tokenizer_config.json"):
        w.path(name).unlink(missing_ok=True)


# ---- a sentence-transformers folder


def _modules(w, change):
    entries = w.json("modules.json")
    w.write_json("modules.json", change(entries))


def _set(i, **changes):
    def change(entries):
        entries[i].update(changes)
        return entries

    return change


MODULES = [
    ("a_dict", lambda e: {"a": 1}, "modules.json must be a list of module entries"),
    ("empty", lambda e: [], "modules.json must be a list"),
    ("entry_int", lambda e: [1, 2], "modules.json entry 0 must be an object"),
    ("no_type", lambda e: [{k: v for k, v in e[0].items() if k != "type"}], "type"),
    ("idx_str", _set(0, idx="0"), "entry 0 must be an object with idx"),
    ("type_os", _set(1, type="os.system"), "sentence-transformers' own modules only"),
    ("type_folder", _set(1, type="evil.Pooling"), "own modules only"),
    ("type_pkg", _set(1, type="evil_pkg.Pooling"), "own modules only"),
    ("type_missing", _set(1, type="sentence_transformers.NoSuch"), "not available"),
    ("path_up", _set(1, path="../outside/1_Pooling"), "points outside the folder"),
    ("path_absolute", _set(1, path="/tmp"), "path '/tmp' is not a relative path"),
    ("path_missing", _set(1, path="2_Nothing"), "'2_Nothing', which is missing"),
    ("path_int", _set(1, path=1), "path must be a relative path"),
    ("name_twice", _set(1, name="0"), "modules.json names '0' twice"),
    ("root_elsewhere", _set(0, path="1_Pooling"), "modules.json in '1_Pooling'"),
    ("root_unlisted", _set(0, name="7"), "module '0', which modules.json does not"),
]
for _name, _change, _match in MODULES:

    def _spoil(w, change=_change):
        _modules(w, change)

    _spoil.__name__ = _name
    case("sentence-transformers", "st", _match)(_spoil)


def _dense(w, **config):
    dense = w.path("2_Dense")
    dense.mkdir()
    base = {"in_features": 32, "out_features": 8, "bias": True}
    (dense / "config.json").write_text(json.dumps({**base, **config}))
    kind = "sentence_transformers.base.modules.dense.Dense"
    entry = {"idx": 2, "name": "2", "path": "2_Dense", "type": kind}
    _modules(w, lambda e: e + [entry])


@case("sentence-transformers", "st", "2_Dense/config.json has out_features = 10995")
def dense_out_huge(w):
    _dense(w, out_features=2**40)


@case("sentence-transformers", "st", "2_Dense/config.json has in_features = '32'")
def dense_in_str(w):
    _dense(w, in_features="32")


@case("sentence-transformers", "st", r"announces a layer of 60000 x 60000")
def dense_too_big(w):
    _dense(w, in_features=60_000, out_features=60_000)


@case("sentence-transformers", "st", "modules.json cannot be read")
def modules_json_missing(w):
    w.path("modules.json").unlink()


@case("sentence-transformers", "st", "'1_Pooling' is a symbolic link out of the")
def pooling_link_out(w):
    shutil.rmtree(w.path("1_Pooling"))
    w.path("1_Pooling").symlink_to(w.outside / "1_Pooling", target_is_directory=True)


@case("sentence-transformers", "st", "the tokenizer's vocabulary is missing")
def st_without_tokenizer_json(w):
    w.path("tokenizer.json").unlink()


@case("sentence-transformers", "st", "is not a class of sentence_transformers")
def st_architecture_os(w):
    w.manifest(architecture="os.system")


@case("sentence-transformers", "st", "never runs code")
def st_auto_map(w):
    _config(w, auto_map={"AutoModel": "modeling_evil.M"})


@case("sentence-transformers", "st", "vocab_size = 1099511627776")
def st_vocab_huge(w):
    _config(w, vocab_size=2**40)


# ---- the tests


@pytest.fixture
def stdin_says_yes(monkeypatch):
    """A user who would answer "y" if asked whether to run the folder's code."""
    monkeypatch.setattr(sys, "stdin", io.StringIO("y\n" * 100))


@pytest.mark.parametrize("kind, spoil, exc, match", FOLDER_CASES)
def test_crafted_folder_is_refused(
    kind, spoil, exc, match, folders, tmp_path, stdin_says_yes
):
    world = World(tmp_path, folders, kind)
    spoil(world)
    before = world.snapshot()
    start = time.perf_counter()
    with pytest.raises(exc, match=match) as info:
        world.load()
    assert time.perf_counter() - start < 20
    assert str(world.folder) in str(info.value)
    assert "\n" not in str(info.value)
    assert world.snapshot() == before  # nothing changed, inside or outside
    assert not world.marker.exists()


@pytest.mark.parametrize("kind, change", HARMLESS)
def test_harmless_change_loads(kind, change, folders, tmp_path, stdin_says_yes):
    world = World(tmp_path, folders, kind)
    change(world)
    before = world.snapshot()
    model = world.load()
    with torch.no_grad():
        got = world.outputs(model)
    torch.testing.assert_close(got, world.expected[kind], rtol=1e-4, atol=1e-5)
    assert world.snapshot() == before
    assert not world.marker.exists()


def test_a_valid_folder_loads_exactly(folders, tmp_path, stdin_says_yes):
    for kind in ("module", "bert", "st"):
        world = World(tmp_path / kind, folders, kind)
        with torch.no_grad():
            assert torch.equal(world.outputs(world.load()), world.expected[kind])
    assert not any((tmp_path / k / "marker").exists() for k in ("module", "bert", "st"))


def test_a_half_precision_folder_loads_in_its_dtype(folders, tmp_path):
    # nothing is cast: the model is built in the dtype the tensors hold
    world = World(tmp_path, folders, "bert")
    state = world.tensors()
    world.write_tensors(
        {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    )
    model = world.load()
    assert {p.dtype for p in model.parameters()} == {torch.float16}
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key].half() if key in state else value)


def test_huge_manifest_fails_fast_and_small(folders, tmp_path):
    # 10**6 ranks (3 MB) and 10**6 layers: refused from the JSON alone
    world = World(tmp_path, folders, "module")
    text = world.path("kflats.json").read_text()
    manifest = json.loads(text)
    manifest["modules"]["1"]["ranks"] = [1] * 10**6
    million_ranks = json.dumps(manifest)
    assert len(million_ranks) > 3_000_000
    million_layers = text.replace(
        '"modules": {', '"modules": {' + '"x": {},' * 10**6, 1
    )
    for crafted in (million_ranks, million_layers):
        world.path("kflats.json").write_text(crafted)
        tracemalloc.start()
        start = time.perf_counter()
        with pytest.raises(ValueError, match="corrupt entry|more values than") as info:
            world.load()
        seconds = time.perf_counter() - start
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert str(world.folder) in str(info.value)
        assert peak < 50 * 2**20, peak
        assert seconds < 1, seconds  # 0.003 to 0.03 s measured


# -- crafted .npz files ------------------------------------------------------------


def npy_bytes(array=None, *, header=None, data=b""):
    """An .npy member: numpy's bytes, or a hand-written header and data."""
    buf = io.BytesIO()
    if header is None:
        np.lib.format.write_array(buf, array, allow_pickle=True)
    else:
        np.lib.format.write_array_header_1_0(buf, header)
        buf.write(data)
    return buf.getvalue()


def write_npz(path, members):
    """An .npz from (name, bytes or array) pairs, duplicates allowed."""
    with zipfile.ZipFile(path, "w") as zf:
        for name, value in members:
            raw = value if isinstance(value, bytes) else npy_bytes(np.asarray(value))
            zf.writestr(name + ".npy", raw)


def members_of(path):
    with zipfile.ZipFile(path) as zf:
        return [(i.filename[:-4], zf.read(i)) for i in zf.infolist()]


def factors():
    labels = np.array([0, 1, 0, 1, 1])
    f = svd_factors(np.arange(15.0).reshape(5, 3), rank=2)
    U = (f.U[0][:2], f.U[0][2:, :1])
    return ProjectiveFactors(labels, U, (f.V[0], f.V[0][:1]))


def calibration():
    return Calibration(
        {
            "embed": {"kind": "Embedding", "counts": np.array([3, 0, 1])},
            "fc": {"kind": "Linear", "moment_sum": np.eye(2), "n_rows": 4},
        },
        n_sequences=2,
        architecture="Tiny",
        probe=[{"input_ids": np.array([[1, 2]])}],
    )


def replace(name, value):
    def spoil(members):
        return [(n, value if n == name else v) for n, v in members]

    return spoil


def drop(name):
    return lambda members: [(n, v) for n, v in members if n != name]


def add(name, value):
    return lambda members: members + [(name, value)]


HUGE = npy_bytes(header={"descr": "<f8", "fortran_order": False, "shape": (2**40,)})
OBJECT = npy_bytes(np.array([1, None], dtype=object))
META_BAD_ROWS = json.dumps(
    {
        "n_sequences": 2,
        "architecture": "Tiny",
        "modules": [
            {"name": "embed", "kind": "Embedding", "n_rows": 0},
            {"name": "fc", "kind": "Linear", "n_rows": -4},
        ],
        "probe": [["input_ids"]],
    }
)


def meta(**changes):
    value = json.loads(calibration_meta())
    value.update(changes)
    return np.array(json.dumps(value))


def calibration_meta():
    buf = io.BytesIO()
    calibration().save(buf)
    buf.seek(0)
    with zipfile.ZipFile(buf) as zf:
        return str(np.lib.format.read_array(io.BytesIO(zf.read("meta.npy"))))


def meta_modules(change):
    value = json.loads(calibration_meta())
    change(value["modules"])
    return np.array(json.dumps(value))


NPZ_CASES = [
    # (group, id, loader, spoil of the members or of the bytes, match)
    ("factors", "object_member", replace("labels", OBJECT), "dtype object"),
    ("factors", "huge_member", replace("U_0", HUGE), r"\(1099511627776,\).*holds"),
    ("factors", "unknown_member", add("evil", np.zeros(1)), r"unknown member\(s\)"),
    ("factors", "duplicate_member", add("U_0", np.zeros(1)), "'U_0' appears twice"),
    ("factors", "missing_V", drop("V_1"), r"\['V_1'\] missing"),
    ("factors", "missing_k", drop("k"), r"\['k'\] missing"),
    ("factors", "format_other", replace("format", np.array("x")), "not a kflats"),
    ("factors", "format_int", replace("format", np.array(5)), "dtype int64"),
    ("factors", "version_99", replace("version", np.array(99)), "version 99"),
    ("factors", "version_str", replace("version", np.array("2")), "version '2'"),
    ("factors", "version_pair", replace("version", np.array([2, 2])), r"\[2, 2\]"),
    ("factors", "version_nan", replace("version", np.array(np.nan)), "nan"),
    ("factors", "transposed_str", replace("transposed", np.array("False")), "<U5"),
    ("factors", "has_error_str", replace("has_error", np.array("False")), "<U5"),
    ("factors", "has_error_int", replace("has_error", np.array(0)), "int64"),
    ("factors", "k_huge", replace("k", np.array(10**9)), "outside 1.."),
    ("factors", "k_zero", replace("k", np.array(0)), "0 lies outside 1.."),
    ("factors", "k_one", replace("k", np.array(1)), r"unknown member\(s\) 'U_1'"),
    ("factors", "labels_float", replace("labels", np.zeros(5)), "1-D integer"),
    ("factors", "labels_range", replace("labels", np.array([0, 1, 0, 1, 7])), "lie"),
    ("factors", "labels_short", replace("labels", np.array([0, 1])), "hold 5 rows"),
    ("factors", "U_float32", replace("U_0", np.zeros((2, 2), np.float32)), "float64"),
    ("factors", "U_rank", replace("U_0", np.zeros((2, 3))), "corrupt"),
    ("factors", "V_complex", replace("V_0", np.zeros((2, 3), complex)), "float32 or"),
    ("factors", "V_3d", replace("V_0", np.zeros((2, 3, 1))), "2-D float32 or"),
    ("factors", "search_text", replace("search", np.array("[{")), "'search'"),
    (
        "factors",
        "search_shape",
        replace("search", np.array('[[1,2,"x",4,5]]')),
        "ranks",
    ),
    ("factors", "means_shape", add("means", np.zeros((3, 3))), r"shape \(2, 3\)"),
    ("factors", "error_str", replace("error", np.array("0.1")), "<U3"),
    ("factors", "objective_bad", replace("objective", np.array("evil")), "objective"),
    ("calibration", "object_member", replace("counts_0", OBJECT), "dtype object"),
    ("calibration", "huge_member", replace("moment_sum_1", HUGE), "1099511627776"),
    ("calibration", "unknown_member", add("evil", np.zeros(1)), r"unknown member"),
    ("calibration", "duplicate_member", add("meta", np.array("{}")), "appears twice"),
    ("calibration", "missing_counts", drop("counts_0"), r"\['counts_0'\] missing"),
    ("calibration", "format_other", replace("format", np.array("x")), "not a kflats"),
    ("calibration", "version_str", replace("version", np.array("1")), "version '1'"),
    ("calibration", "version_pair", replace("version", np.array([1, 1])), r"\[1, 1"),
    (
        "calibration",
        "negative_counts",
        replace("counts_0", np.array([3, -1, 1])),
        "neg",
    ),
    ("calibration", "float_counts", replace("counts_0", np.zeros(3)), "float64 is not"),
    (
        "calibration",
        "complex_moment",
        replace("moment_sum_1", np.eye(2) + 1j),
        "complex",
    ),
    (
        "calibration",
        "nan_moment",
        replace("moment_sum_1", np.eye(2) * np.nan),
        "finite",
    ),
    ("calibration", "moment_shape", replace("moment_sum_1", np.ones((2, 3))), "square"),
    ("calibration", "meta_text", replace("meta", np.array("{")), "not valid JSON"),
    ("calibration", "meta_list", replace("meta", np.array("[]")), "not a JSON object"),
    ("calibration", "n_sequences", replace("meta", meta(n_sequences=-1)), ">= 0"),
    ("calibration", "architecture", replace("meta", meta(architecture=5)), "string"),
    (
        "calibration",
        "negative_rows",
        replace("meta", np.array(META_BAD_ROWS)),
        "row count of 'fc' must be an integer >= 0, got -4",
    ),
    (
        "calibration",
        "rows_str",
        replace("meta", meta_modules(lambda m: m[1].update(n_rows="4"))),
        "got '4'",
    ),
    (
        "calibration",
        "duplicate_names",
        replace("meta", meta_modules(lambda m: m[1].update(name="embed"))),
        "'embed' is recorded twice",
    ),
    (
        "calibration",
        "unknown_kind",
        replace("meta", meta_modules(lambda m: m[1].update(kind="Conv"))),
        "not an Embedding or Linear record",
    ),
    ("calibration", "probe_object", replace("probe_0_0", OBJECT), "dtype object"),
    ("calibration", "probe_float", replace("probe_0_0", np.zeros(2)), "float64"),
]


def saved(loader):
    buf = io.BytesIO()
    (factors() if loader == "factors" else calibration()).save(buf)
    return buf.getvalue()


def load(loader, path):
    return (ProjectiveFactors if loader == "factors" else Calibration).load(path)


@pytest.mark.parametrize(
    "loader, spoil, match",
    [pytest.param(g, s, m, id=f"{g}-{i}") for g, i, s, m in NPZ_CASES],
)
def test_crafted_npz_is_refused(loader, spoil, match, tmp_path):
    path = tmp_path / "file.npz"
    path.write_bytes(saved(loader))
    write_npz(path, spoil(members_of(path)))
    tracemalloc.start()
    with pytest.raises(ValueError, match=match) as info:
        load(loader, path)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert str(path) in str(info.value)
    assert peak < 50 * 2**20
    assert sorted(os.listdir(tmp_path)) == ["file.npz"]


NOT_NPZ = [
    ("text", b"a,b\n1,2\n", "not a zip archive"),
    ("empty", b"", "not a zip archive"),
    ("npy", npy_bytes(np.zeros(3)), "it is an .npy file"),
    ("truncated", None, "not a readable zip archive|truncated|unreadable"),
    ("pickle", b"\x80\x04\x95", "not a zip archive"),
]


@pytest.mark.parametrize("loader", ["factors", "calibration"])
@pytest.mark.parametrize("name, data, match", NOT_NPZ, ids=[c[0] for c in NOT_NPZ])
def test_what_is_not_an_npz_is_named(loader, name, data, match, tmp_path):
    path = tmp_path / "file.npz"
    path.write_bytes(saved(loader)[:300] if data is None else data)
    with pytest.raises(ValueError, match=match) as info:
        load(loader, path)
    assert str(path) in str(info.value)
    assert "pickled" not in str(info.value)


@pytest.mark.parametrize("loader", ["factors", "calibration"])
def test_harmless_npz_variants_load(loader, tmp_path):
    path = tmp_path / "file.npz"
    path.write_bytes(saved(loader))
    members = members_of(path)
    # compressed, and big-endian: other bytes, the same values
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, raw in members:
            array = np.lib.format.read_array(io.BytesIO(raw))
            if array.dtype.kind in "iuf" and array.dtype.itemsize > 1:
                array = array.astype(array.dtype.newbyteorder(">"))
            zf.writestr(name + ".npy", npy_bytes(array))
    again = load(loader, path)
    if loader == "factors":
        np.testing.assert_array_equal(again.reconstruct(), factors().reconstruct())
        assert again.labels.dtype == np.int64 and again.labels.dtype.isnative
    else:
        np.testing.assert_array_equal(again.input_moment("fc"), np.eye(2) / 4)
        assert again.token_counts("embed").tolist() == [3, 0, 1]


def test_factors_of_an_empty_matrix_say_so():
    f = ProjectiveFactors(
        np.zeros(0, np.int64), (np.zeros((0, 1)),), (np.ones((1, 3)),)
    )
    with pytest.raises(ValueError, match="compression of factors of an empty matrix"):
        f.compression  # noqa: B018 - the property raises
    buf = io.BytesIO()
    f.save(buf)
    buf.seek(0)
    assert ProjectiveFactors.load(buf).shape == (0, 3)


def test_npy_reader_refuses_a_huge_declared_shape(tmp_path):
    from kflats._npz import read_npy

    path = tmp_path / "matrix.npy"
    path.write_bytes(HUGE)
    start = time.perf_counter()
    with pytest.raises(ValueError, match=r"matrix.npy.*\(1099511627776,\).*holds 0"):
        read_npy(path)
    assert time.perf_counter() - start < 1
    path.write_bytes(OBJECT)
    with pytest.raises(ValueError, match="matrix.npy.*dtype object"):
        read_npy(path)
    np.save(path, np.arange(6.0).reshape(2, 3))
    assert read_npy(path, ndim=2).shape == (2, 3)
    with pytest.raises(ValueError, match="matrix.npy.*float64 is not accepted"):
        read_npy(path, kinds="i")


# -- hypothesis: random mutations of valid files ----------------------------------

EXAMPLES = int(os.environ.get("KFLATS_FUZZ_EXAMPLES", "60"))
JSON_VALUES = hst.recursive(
    hst.none()
    | hst.booleans()
    | hst.integers(-(2**40), 2**40)
    | hst.floats(allow_nan=True)
    | hst.text(max_size=8)
    | hst.sampled_from(["../outside", "/etc/passwd", "input", "output", "2"]),
    lambda inner: (
        hst.lists(inner, max_size=3)
        | hst.dictionaries(hst.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=6,
)


def _paths(value, prefix=()):
    yield prefix
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _paths(item, (*prefix, key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _paths(item, (*prefix, i))


def _mutate(value, path, how, new):
    if not path:
        return new if how == "retype" else value
    parent = value
    for key in path[:-1]:
        parent = parent[key]
    key = path[-1]
    if how == "drop":
        del parent[key]
    elif how == "retype":
        parent[key] = new
    elif how == "resize":
        item = parent[key]
        parent[key] = (item * 3)[:7] if isinstance(item, list) else [item, item]
    elif how == "duplicate":
        if isinstance(parent, dict):
            parent[f"{key}2" if isinstance(key, str) else key] = parent[key]
        else:
            parent.append(parent[key])
    elif how == "outside":
        parent[key] = "../outside/model"
    return value


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(data=hst.data())
def test_mutated_manifest_loads_or_is_refused(folders, tmp_path_factory, data):
    tmp = tmp_path_factory.mktemp("mutant")
    world = World(tmp, folders, "module")
    manifest = world.json("kflats.json")
    path = data.draw(hst.sampled_from(list(_paths(manifest))))
    how = data.draw(
        hst.sampled_from(["drop", "retype", "resize", "duplicate", "outside"])
    )
    new = data.draw(JSON_VALUES)
    world.write_json("kflats.json", _mutate(manifest, path, how, new))
    before = world.snapshot()
    try:
        model = world.load()
    except ValueError as exc:
        assert str(world.folder) in str(exc)
    else:  # a harmless mutation (a version string, padding in eval mode)
        torch.testing.assert_close(world.outputs(model), world.expected["module"])
    assert world.snapshot() == before
    assert not world.marker.exists()


NPZ_VALUES = hst.sampled_from(
    [
        np.array("False"),
        np.array(True),
        np.array(2),
        np.array(2**40),
        np.array(-1),
        np.array(np.nan),
        np.zeros(3),
        np.zeros((2, 2), np.float32),
        np.zeros((3, 3), complex),
        np.array([1, 2]),
        np.array("[]"),
        np.array("../outside"),
    ]
)


@settings(max_examples=EXAMPLES, deadline=None)
@given(
    loader=hst.sampled_from(["factors", "calibration"]),
    data=hst.data(),
)
def test_mutated_npz_loads_or_is_refused(loader, data):
    buf = io.BytesIO(saved(loader))
    members = members_of(buf)
    names = [n for n, _ in members]
    how = data.draw(hst.sampled_from(["drop", "retype", "resize", "duplicate", "add"]))
    name = data.draw(hst.sampled_from(names))
    new = data.draw(NPZ_VALUES)
    if how == "drop":
        members = drop(name)(members)
    elif how == "retype":
        members = replace(name, npy_bytes(new))(members)
    elif how == "resize":
        array = np.lib.format.read_array(io.BytesIO(dict(members)[name]))
        bigger = np.concatenate([array.reshape(-1)] * 2) if array.size else array
        members = replace(name, npy_bytes(bigger))(members)
    elif how == "duplicate":
        members = add(name, dict(members)[name])(members)
    else:
        members = add(data.draw(hst.sampled_from(["evil", "U_9", "counts_7"])), new)(
            members
        )
    out = io.BytesIO()
    write_npz(out, members)
    out.seek(0)
    out.name = "mutant.npz"
    try:
        load(loader, out)
    except ValueError as exc:
        assert "mutant.npz" in str(exc)


# -- crafted GGUF files: the header read as untrusted data ---------------------------
#
# Each file is a few hundred bytes whose header lies (a count, a length, a type,
# an offset). It must be refused with a message naming the file and the field,
# before transformers reads it and before memory is taken: the check walks the
# header through a memory map, every count bounded by the bytes left (measured:
# under 0.001 s for these, 0.1 s for SmolLM2's 98 MB file and its 49,152 tokens).


def _gguf_cases():
    import struct

    from .._gguf_models import gguf_bytes, gguf_kv, gguf_string, gguf_tensor_info

    def arch(name="llama"):
        return gguf_kv("general.architecture", 8, gguf_string(name))

    def u32(key, value):
        return gguf_kv(key, 4, struct.pack("<I", value))

    def array(key, item, count, payload=b""):
        return gguf_kv(key, 9, struct.pack("<IQ", item, count) + payload)

    f32 = 0  # the F32 tensor type
    one = [gguf_tensor_info("token_embd.weight", (64, 2), f32, 0)]
    data = b"\0" * 512
    return [
        ("array_1e8_uint32", gguf_bytes([arch(), array("tokenizer.ggml.tokens", 4,
         10**8)]), "declares 100000000 entries of UINT32"),
        ("array_1e8_strings", gguf_bytes([arch(), array("tokenizer.ggml.merges", 8,
         10**8)]), "declares 100000000 entries of STRING"),
        ("string_in_array_past_end", gguf_bytes([arch(), array("t", 8, 1,
         struct.pack("<Q", 2**62))]), "past the end of the file"),
        ("nested_arrays", gguf_bytes([arch(), gguf_kv("t", 9, struct.pack(
         "<IQ", 9, 1) + struct.pack("<IQ", 9, 1) * 12)]), "nests arrays more than"),
        ("tensor_beyond_end", gguf_bytes([arch()], [gguf_tensor_info(
         "token_embd.weight", (64, 10**6), f32, 0)], data),
         "lies beyond the end of the file"),
        ("tensor_of_2_64_entries", gguf_bytes([arch()], [gguf_tensor_info(
         "token_embd.weight", (2**32, 2**32), f32, 0)], data), "beyond the end"),
        ("tensor_offset_far", gguf_bytes([arch()], [gguf_tensor_info(
         "token_embd.weight", (64, 1), f32, 2**40)], data), "beyond the end"),
        ("tensor_type_unknown", gguf_bytes([arch()], [gguf_tensor_info(
         "token_embd.weight", (64, 1), 99, 0)], data), "has the unknown type 99"),
        ("tensor_dims_9", gguf_bytes([arch()], [gguf_tensor_info(
         "w", (1,) * 9, f32, 0)], data), "has 9 dimensions"),
        ("tensor_rows_not_blocks", gguf_bytes([arch()], [gguf_tensor_info(
         "w", (33, 1), 2, 0)], data), "not a multiple of its blocks of 32"),
        ("tensor_twice", gguf_bytes([arch()], one * 2, data), "appears twice"),
        ("tensors_overlap", gguf_bytes([arch()], [*one, gguf_tensor_info(
         "w", (64,), f32, 256)], data), "overlap"),
        ("tensor_misaligned", gguf_bytes([arch()], [gguf_tensor_info(
         "w", (8,), f32, 4)], data), "not a multiple of the alignment 32"),
        ("tensor_name_long", gguf_bytes([arch()], [gguf_tensor_info(
         "w" * 65, (8,), f32, 0)], data), "more than 64"),
        ("count_1e12_tensors", gguf_bytes([arch()], counts=(10**12, 1)),
         "declares 1000000000000 tensors"),
        ("count_1e12_entries", gguf_bytes([arch()], counts=(0, 10**12)),
         "more than its .* bytes can describe"),
        ("key_2_40_long", gguf_bytes([struct.pack("<Q", 2**40)], data=data),
         "is 1099511627776 bytes long, more than 65535"),
        ("key_twice", gguf_bytes([arch(), arch()]), "appears twice"),
        ("value_type_unknown", gguf_bytes([gguf_kv("x", 77, b"")]),
         "unknown value type 77"),
        ("string_2_62_long", gguf_bytes([gguf_kv("general.architecture", 8,
         struct.pack("<Q", 2**62))]), "past the end of the file"),
        ("string_not_utf8", gguf_bytes([gguf_kv("general.architecture", 8,
         gguf_string(b"\xff\xfe"))]), "is not UTF-8 text"),
        ("alignment_3", gguf_bytes([arch(), u32("general.alignment", 3)]),
         "general.alignment must be a power of 2"),
        ("magic_other", gguf_bytes([arch()], magic=b"GGML"), "not b'GGUF'"),
        ("version_1", gguf_bytes([arch()], version=1), "version 1;"),
        ("big_endian", gguf_bytes([arch()], version=3 << 24), "big-endian"),
        ("truncated", b"GGUF\3\0\0\0", "shorter than a GGUF header"),
        ("no_architecture", gguf_bytes([u32("llama.block_count", 2)]),
         "names no general.architecture"),
        ("architecture_mamba", gguf_bytes([arch("mamba")]),
         "architecture 'mamba', for which kflats has no adapter"),
        ("type_q8_k", gguf_bytes([arch()], [gguf_tensor_info(
         "token_embd.weight", (256, 1), 15, 0)], data),
         r"1 tensor\(s\) of the GGUF type Q8_K .* which kflats cannot dequantize"),
    ]  # fmt: skip


GGUF_CASES = [pytest.param(b, m, id=n) for n, b, m in _gguf_cases()]


@pytest.mark.parametrize("crafted, match", GGUF_CASES)
def test_crafted_gguf_is_refused_before_memory_is_taken(crafted, match, tmp_path):
    pytest.importorskip("gguf")
    from kflats.torch.io import load_pretrained

    path = tmp_path / "crafted.gguf"
    path.write_bytes(crafted)
    assert len(crafted) < 2000
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match=match) as info:
            load_pretrained(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert f"'{path}'" in str(info.value)
    assert peak < 5 * 2**20, peak  # nothing of what the header declares
    assert path.read_bytes() == crafted
    assert os.listdir(tmp_path) == ["crafted.gguf"]


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    pytest.importorskip("gguf")
    from .._gguf_models import write_tiny_gguf

    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    write_tiny_gguf(path)
    return path.read_bytes()


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(data=hst.data())
def test_mutated_gguf_header_reads_or_is_refused(tiny_gguf, data, tmp_path):
    # cut or overwrite bytes of a valid file's header: a clear ValueError or a
    # header whose every tensor lies inside the file, never another error
    from kflats.torch.io._gguf_check import read_gguf_header

    header_end = read_gguf_header_end(tiny_gguf)
    crafted = bytearray(tiny_gguf)
    if data.draw(hst.booleans()):
        crafted = crafted[: data.draw(hst.integers(0, header_end))]
    else:
        for _ in range(data.draw(hst.integers(1, 4))):
            at = data.draw(hst.integers(0, header_end - 1))
            crafted[at] = data.draw(hst.integers(0, 255))
    path = tmp_path / "mutant.gguf"
    path.write_bytes(bytes(crafted))
    try:
        header = read_gguf_header(path)
    except ValueError as exc:
        assert "mutant.gguf" in str(exc)
        return
    for t in header.tensors:
        assert header.data_offset + t.offset + t.nbytes <= len(crafted)


def read_gguf_header_end(data):
    import tempfile

    from kflats.torch.io._gguf_check import read_gguf_header

    with tempfile.NamedTemporaryFile(suffix=".gguf") as f:
        f.write(data)
        f.flush()
        return read_gguf_header(f.name).data_offset
