"""The folder an ONNX export writes: the one sentence-transformers' ONNX backend reads.

``SentenceTransformer(OUT, backend="onnx")`` (through optimum's
``ORTModelForFeatureExtraction``) reads the model folder as usual
(modules.json, the pooling and normalisation modules, config.json, the
tokenizer) and the transformer's weights from ``onnx/model.onnx`` inside
the transformer's folder (the folder itself for the usual layout). So the
export copies the compressed folder's library files as they are, leaves out
what only kflats reads (kflats.json, the packed weights, the report of
``kflats compress``), and writes ``onnx/model.onnx`` and a record of the
export, ``kflats-export.json``.

sentence-transformers 6 names its modules in modules.json by their new
paths (``sentence_transformers.base.modules.transformer.Transformer``),
which version 5 cannot import, and optimum-onnx (what the ONNX backend
needs) pins transformers < 4.58, so sentence-transformers 5 today: the
export writes their former names (``sentence_transformers.models.Transformer``),
which version 6 maps back to the same classes (its own table of them).
"""

import json
import os
import shutil
from pathlib import Path

__all__ = [
    "EXPORT_MARKER",
    "ONNX_FILE",
    "copy_library_files",
    "former_module_names",
    "write_record",
]

#: The record of an export: what each quantized matrix became. A folder
#: holding it is one that kflats export wrote (``--overwrite`` replaces only
#: those).
EXPORT_MARKER = "kflats-export.json"
ONNX_FILE = Path("onnx") / "model.onnx"
# what kflats compress writes beside the model, for its reader only
_REPORT = {"kflats.json", "report.json", "report.md"}
_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")


def _skipped(relative, transformer):
    """Whether a file of the compressed folder stays out of the export."""
    if len(relative.parts) == 1 and (
        relative.name in _REPORT or relative.suffix == ".png"
    ):
        return True
    if relative.parent == transformer and (
        relative.name in _WEIGHTS
        or (relative.name.startswith("model-") and relative.suffix == ".safetensors")
    ):
        return True
    return False


def copy_library_files(source, target, transformer):
    """Copy the folder's library files (config, tokenizer, modules) to ``target``.

    Parameters
    ----------
    source : Path
        The compressed folder (already checked by ``load_compressed``).
    target : Path
        The export folder, existing.
    transformer : str
        The transformer's folder within ``source`` (``""``: the folder itself).

    Returns
    -------
    copied : list of str
        The files copied, relative to the folder.

    Raises
    ------
    ValueError
        If the folder holds a symbolic link (nothing from outside it is
        copied).
    """
    transformer = Path(transformer)
    copied = []
    for path in sorted(source.rglob("*")):
        relative = path.relative_to(source)
        if path.is_symlink():
            raise ValueError(
                f"{str(source)!r} holds a symbolic link, {str(relative)!r}; kflats "
                "export copies only the folder's own files"
            )
        if path.is_dir() or _skipped(relative, transformer):
            continue
        (target / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target / relative)
        copied.append(relative.as_posix())
    return copied


def former_module_names(target):
    """modules.json's module types in their sentence-transformers 5 names.

    Uses sentence-transformers' own table of former paths (version 6); with
    an older version installed, or no modules.json, nothing changes.

    Returns
    -------
    renamed : dict of str to str
        The types renamed, new name to former one.
    """
    try:
        from sentence_transformers.util.deprecated_import import (
            DEPRECATED_MODULE_PATHS,
        )
    except ImportError:
        return {}
    path = Path(os.fspath(target)) / "modules.json"
    if not path.is_file():
        return {}
    former = {
        f"{new}.{old.rpartition('.')[2]}": old
        for old, new in DEPRECATED_MODULE_PATHS.items()
    }
    entries = json.loads(path.read_text())
    renamed = {}
    for entry in entries if isinstance(entries, list) else ():
        name = entry.get("type") if isinstance(entry, dict) else None
        if name in former:
            renamed[name] = entry["type"] = former[name]
    if renamed:
        path.write_text(json.dumps(entries, indent=2) + "\n")
    return renamed


def write_record(target, record):
    """Write ``kflats-export.json`` (last: a folder holding it is complete)."""
    path = Path(os.fspath(target)) / EXPORT_MARKER
    path.write_text(json.dumps(record, indent=2) + "\n")
