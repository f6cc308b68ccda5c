"""``kflats export``: a compressed folder out to an engine users deploy on.

``kflats export FOLDER --onnx OUT`` writes the folder that ``kflats
compress`` wrote as an ONNX model folder (:func:`kflats.torch.export.export_onnx`):
checked first (the folder is one kflats wrote, ``--onnx`` may be written),
then exported to a hidden folder beside ``OUT``, renamed to it once
complete. It prints what each quantized matrix became and what fell back.
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
        "sentence-transformers' ONNX backend)",
        description=(
            "Write a folder that kflats compress wrote as an ONNX model that "
            "onnxruntime runs, in the layout sentence-transformers' ONNX backend "
            "reads (onnx/model.onnx beside the tokenizer, config and pooling "
            "files). Quantized matrices keep kflats' own codes and scales "
            "(MatMulNBits, GatherBlockQuantized); nothing is rounded again."
        ),
    )
    parser.add_argument(
        "folder", metavar="FOLDER", help="a folder written by kflats compress"
    )
    parser.add_argument(
        "--onnx",
        required=True,
        metavar="OUT",
        help="the folder to write; an existing one is replaced (with --overwrite) "
        "only if kflats export wrote it",
    )
    parser.add_argument(
        "--accuracy-level",
        type=int,
        choices=range(5),
        default=0,
        help="MatMulNBits' accuracy_level: 0 (default) computes in float32, as "
        "kflats' torch model does; 4 lets onnxruntime quantize the activations "
        "to int8 (faster on some CPUs, no longer exact)",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace --onnx if it exists and kflats export wrote it",
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
    folder = _check_folder(args.folder)
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
    weights = _weight_bytes(folder)
    if weights:
        size = result.onnx_bytes
        print(
            f"size: {size / 1e6:.2f} MB, {size / weights:.2f}x the folder's weight "
            f"files ({weights / 1e6:.2f} MB)"
        )
    return 0
