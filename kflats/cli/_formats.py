"""``kflats compress --format``: the file the compressed model is written as.

- ``kflats`` (default): the compressed folder (:func:`kflats.torch.save_compressed`).
- ``onnx``: the search keeps only the forms an ONNX file holds in its
  operators' own forms (``CompressionConfig(format="onnx")``), the size is
  that of ``onnx/model.onnx``, and ``--out`` is the folder
  :func:`kflats.torch.export.export_onnx` writes (the layout
  sentence-transformers' ONNX backend reads), with the report beside it.
  The compressed folder is saved, reloaded and checked in a hidden folder
  inside the one being written, exported from, then removed.
- ``gguf``: the search keeps only the forms a GGUF file holds
  (``CompressionConfig(format="gguf")``: float32, Q8_0, Q5_0, Q5_1, Q4_0,
  Q4_1), the size is that of ``model.gguf``, written in the compressed folder
  (:func:`kflats.torch.export.export_gguf`), its tokenizer and metadata
  from the GGUF file compressed: the input must be one, of a family the
  export writes (checked before the model is loaded).
"""

import os
import shutil

FORMATS = ("kflats", "onnx", "gguf")
_SAVED = ".kflats-compressed"  # the compressed folder, inside the one written
_EXPORTED = ".kflats-export"
GGUF_FILE = "model.gguf"


def check_format(args):
    """--format with the other options, before anything heavy; one line if wrong."""
    fmt = args.format
    if fmt == "kflats":
        return
    if args.unit == "numbers":
        raise ValueError(
            f"--format {fmt} chooses each module's form under a size in bytes of "
            f"the {fmt.upper()} file: it takes --unit bytes (the default) or --size, "
            "not --unit numbers (compress with --format kflats, then kflats export)"
        )
    if args.heal_steps:
        raise ValueError(
            f"--format {fmt} with --heal-steps: the heal trains the factors in "
            "float32; compress without it, or with --format kflats"
        )
    if fmt == "onnx":
        _onnx_installed()
    if fmt == "gguf":
        _export_gguf()


def check_input(fmt, source, skeleton):
    """The model to compress against --format, before it is loaded; one line if
    wrong.

    ``gguf`` writes the GGUF file anew from the one compressed (its tokenizer
    and metadata), for a family the GGUF export writes.
    """
    if fmt != "gguf":
        return
    if source.gguf_file is None:
        raise ValueError(
            f"--format gguf writes the GGUF file the model was read from again "
            f"(its tokenizer and metadata), and {source.what} is a model folder: "
            "give a .gguf file, or compress with --format kflats and write the file "
            "with kflats export FOLDER --gguf OUT --source MODEL.gguf"
        )
    from kflats.torch.export._gguf_tensors import ARCHITECTURES

    model_type = getattr(getattr(skeleton, "config", None), "model_type", None)
    if model_type not in ARCHITECTURES:
        raise ValueError(
            f"--format gguf: {source.what} is a {type(skeleton).__name__} "
            f"(model_type {model_type!r}), and kflats writes GGUF files of the "
            f"families {', '.join(ARCHITECTURES)}; use --format kflats"
        )


def check_budget_of(args, names, named):
    """The budget checked for the selected modules, as --format counts bytes;
    a format whose rule kflats does not know yet: one line."""
    from kflats.torch.compression import check_budget

    try:
        check_budget(
            args.budget, names, named, args.allocation, args.unit, args.k,
            format=args.format,
        )  # fmt: skip
    except NotImplementedError as exc:
        raise ValueError(f"--format {args.format}: {exc}") from None


def _onnx_installed():
    for name in ("onnx", "onnxruntime"):
        try:
            __import__(name)
        except ImportError as exc:
            raise ImportError(
                f"--format onnx needs {name}, which is not installed: pip install "
                "'kflats[onnx]'",
                name=name,
            ) from exc


def _export_gguf():
    """kflats' GGUF writer, or a clear error when this kflats has none."""
    import kflats.torch.export as export

    writer = getattr(export, "export_gguf", None)
    if writer is None:
        raise ValueError(
            "--format gguf: this kflats has no GGUF writer "
            "(kflats.torch.export.export_gguf); use --format kflats or onnx"
        )
    return writer


def marker(fmt):
    """The file every folder --out of this format holds (for --overwrite)."""
    if fmt == "onnx":
        from kflats.torch.export import EXPORT_MARKER

        return EXPORT_MARKER
    from ._common import MARKER

    return MARKER


def saved_folder(fmt, folder):
    """Where the compressed folder is saved within the folder being written."""
    return folder / _SAVED if fmt == "onnx" else folder


def weight_file_bytes(fmt, folder):
    """Bytes of the model file(s) of the folder written, as on disk."""
    if fmt == "onnx":
        return sum(p.stat().st_size for p in folder.rglob("*.onnx"))
    if fmt == "gguf":
        return (folder / GGUF_FILE).stat().st_size
    return sum(p.stat().st_size for p in folder.rglob("*.safetensors"))


def export(fmt, saved, folder, source=None):
    """Write the format's file(s) from the compressed folder ``saved``.

    ``onnx``: the export's files moved into ``folder``, ``saved`` removed.
    ``gguf``: ``model.gguf`` inside the folder. Returns a dict for the
    report (``None`` for ``kflats``).
    """
    if fmt == "kflats":
        return None
    if fmt == "gguf":
        writer = _export_gguf()
        options = {} if source is None else {"source": source}
        result = writer(saved, folder / GGUF_FILE, **options)
        return {"file": GGUF_FILE, "summary": result.summary()}
    from kflats.torch.export import export_onnx

    staged = folder / _EXPORTED
    result = export_onnx(saved, staged)
    for entry in os.listdir(staged):
        os.replace(staged / entry, folder / entry)
    staged.rmdir()
    shutil.rmtree(saved)
    ops = {}
    for form in result.forms:
        ops[form.op] = ops.get(form.op, 0) + 1
    return {
        "file": result.model_path.relative_to(staged).as_posix(),
        "file_bytes": result.onnx_bytes,
        "operators": ops,
        "fallbacks": [f.to_dict() for f in result.fallbacks],
        "max_difference": result.max_difference,
    }
