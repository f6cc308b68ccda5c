"""``kflats export``: a compressed folder out to an engine users deploy on.

``kflats export FOLDER --onnx OUT`` writes the folder that ``kflats
compress`` wrote as an ONNX model folder (:func:`kflats.torch.export.export_onnx`):
checked first (the folder is one kflats wrote, ``--onnx`` may be written),
then exported to a hidden folder beside ``OUT``, renamed to it once
complete. It prints what each quantized matrix became and what fell back.

``kflats export FOLDER --gguf OUT`` writes a causal LM's folder as one GGUF
file that llama.cpp runs (:func:`kflats.torch.export.export_gguf`), its
tokenizer and metadata from ``--source`` (or the GGUF file the folder's
report names), written under a hidden name beside ``OUT`` and renamed to it
once complete; ``--overwrite`` replaces only a GGUF file kflats wrote.
"""

import os
from dataclasses import replace
from pathlib import Path

from ._common import output_folder, write_folder_atomically

_MANIFEST = "kflats.json"


def add_parser(subparsers, common=None):
    """Register ``kflats export`` on the ``kflats`` command's subparsers."""
    parser = subparsers.add_parser(
        "export",
        help="write a compressed folder as an ONNX model (onnxruntime, "
        "sentence-transformers' ONNX backend) or a GGUF file (llama.cpp)",
        description=(
            "Write a folder that kflats compress wrote as an ONNX model that "
            "onnxruntime runs, in the layout sentence-transformers' ONNX backend "
            "reads (onnx/model.onnx beside the tokenizer, config and pooling "
            "files), or, for a causal LM, as a GGUF file that llama.cpp runs. "
            "Quantized matrices keep kflats' own codes and scales (MatMulNBits, "
            "GatherBlockQuantized; GGUF's Q4_1, Q4_0, Q5_1, Q5_0, Q8_0 blocks); "
            "nothing is rounded again."
        ),
    )
    parser.add_argument(
        "folder", metavar="FOLDER", help="a folder written by kflats compress"
    )
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument(
        "--onnx",
        metavar="OUT",
        help="the folder to write; an existing one is replaced (with --overwrite) "
        "only if kflats export wrote it",
    )
    target.add_argument(
        "--gguf",
        metavar="OUT",
        help="the GGUF file to write (a causal LM of the Llama or Qwen2 family); "
        "an existing one is replaced (with --overwrite) only if kflats wrote it",
    )
    parser.add_argument(
        "--source",
        metavar="GGUF",
        help="with --gguf: the GGUF file the model was compressed from, whose "
        "tokenizer and metadata the file carries (default: the one the folder's "
        "report.json names)",
    )
    parser.add_argument(
        "--accuracy-level",
        type=int,
        choices=range(5),
        default=0,
        help="with --onnx: MatMulNBits' accuracy_level: 0 (default) computes in "
        "float32, as kflats' torch model does; 4 lets onnxruntime quantize the "
        "activations to int8 (faster on some CPUs, no longer exact)",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace --onnx or --gguf if it exists and kflats export wrote it",
    )
    parser.set_defaults(func=run)
    return parser


def _check_folder(text):
    """The folder to export: a folder holding kflats.json (the rest is checked
    when it is read)."""
    folder = Path(text)
    if not folder.is_dir():
        raise ValueError(f"{text!r} is not a folder; kflats export reads a folder "
                         "that kflats compress wrote")  # fmt: skip
    if not (folder / _MANIFEST).is_file():
        raise ValueError(
            f"{text!r} holds no {_MANIFEST}: it is not a folder that kflats compress "
            "wrote (compress the model first)"
        )
    return folder


def _weight_bytes(folder):
    return sum(p.stat().st_size for p in folder.rglob("*.safetensors"))


def run(args):
    """Run ``kflats export`` with parsed arguments; returns the exit status."""
    for name, value in (("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1")):
        os.environ.setdefault(name, value)
    if args.gguf is None and args.source is not None:
        raise ValueError("--source goes with --gguf (an ONNX export needs none)")
    if args.gguf is not None and args.accuracy_level:
        raise ValueError("--accuracy-level goes with --onnx (MatMulNBits' setting)")
    folder = _check_folder(args.folder)
    if args.gguf is not None:
        return _run_gguf(args, folder)
    from kflats.torch.export import EXPORT_MARKER, export_onnx

    out = output_folder(
        args.onnx, args.overwrite, marker=EXPORT_MARKER, option="--onnx"
    )

    def fill(tmp):
        return export_onnx(folder, tmp, accuracy_level=args.accuracy_level)

    result = write_folder_atomically(
        out,
        fill,
        overwrite=args.overwrite,
        shown=str(args.onnx),
        marker=EXPORT_MARKER,
        option="--onnx",
    )
    shown = Path(args.onnx)
    result = replace(
        result,
        folder=shown,
        model_path=shown / result.model_path.relative_to(result.folder),
    )
    print(result.summary())
    _print_size(folder, result.onnx_bytes)
    return 0


def _print_size(folder, size):
    weights = _weight_bytes(folder)
    if weights:
        print(
            f"size: {size / 1e6:.2f} MB, {size / weights:.2f}x the folder's weight "
            f"files ({weights / 1e6:.2f} MB)"
        )


def _run_gguf(args, folder):
    """``--gguf OUT``: the GGUF file, written whole (export_gguf's own rename)."""
    out = Path(args.gguf)
    if out.is_dir():
        raise ValueError(f"--gguf {args.gguf!r} is a folder; name the file to write")
    if os.path.lexists(out) and not args.overwrite:
        raise ValueError(f"--gguf {args.gguf!r} exists; pass --overwrite to replace it")
    if not out.parent.is_dir():
        raise ValueError(f"--gguf {args.gguf!r}: no folder {str(out.parent)!r}")
    if args.source is not None and not Path(args.source).is_file():
        raise ValueError(f"--source {args.source!r} is not a file")
    from kflats.torch.export import export_gguf
    from kflats.torch.io import hushed

    with hushed():
        result = export_gguf(folder, out, source=args.source, overwrite=args.overwrite)
    print(result.summary())
    _print_size(folder, result.file_bytes)
    return 0
