"""export_gguf: a compressed causal LM as one GGUF file that llama.cpp runs.

The steps: check ``out`` (a new file, or with ``overwrite`` one that kflats
wrote), load the folder (:func:`~kflats.torch.load_compressed`, its
quantized matrices held packed), refuse what a GGUF file cannot hold
(projective factors; codes of other widths or groups: one error naming
them all), turn every tensor into its GGUF form (:mod:`._gguf_tensors`,
:mod:`._gguf_blocks`), check each quantized one by dequantizing its blocks
as llama.cpp defines them against kflats' own values, find and check the
source GGUF file and copy its metadata (:mod:`._gguf_meta`), and write the
file under a hidden name beside ``out``, renamed to it once complete.
"""

import os
import stat
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kflats.torch.export._gguf_blocks import minimum_offset_bound
from kflats.torch.export._gguf_meta import (
    MARKER_KEY,
    check_source,
    file_entries,
    file_type,
    find_source,
)
from kflats.torch.export._gguf_tensors import gguf_tensors, permute_rows
from kflats.torch.io._gguf_check import read_gguf_header

__all__ = ["GgufExport", "export_gguf"]

# the check of the blocks against kflats' values: float32 rounding of
# ``d * q + m`` on top of a Q4_1 or Q5_1 block's float16 minimum
_CHECK_SLACK = 1e-6


@dataclass(frozen=True)
class GgufExport:
    """What :func:`export_gguf` wrote.

    Attributes
    ----------
    path : pathlib.Path
        The GGUF file.
    architecture : str
        llama.cpp's architecture (``"llama"``, ``"qwen2"``, ...).
    source : pathlib.Path
        The GGUF file whose tokenizer and metadata were carried over.
    tensors : tuple of (str, str, tuple, str)
        Each tensor written: its GGUF name, type, shape (rows first), and
        the model's parameter it holds.
    file_bytes : int
        The file's size.
    max_offset : float
        The largest move of a weight by a Q4_1 or Q5_1 block's float16
        minimum (0.0 when no matrix is either): every other value is
        kflats' own.
    """

    path: Path
    architecture: str
    source: Path
    tensors: tuple
    file_bytes: int
    max_offset: float

    @property
    def types(self):
        """How many tensors each GGUF type holds."""
        counts = {}
        for _, qtype, _, _ in self.tensors:
            counts[qtype] = counts.get(qtype, 0) + 1
        return dict(sorted(counts.items()))

    def summary(self):
        """A few lines for a person: the file, its types, the source."""
        types = ", ".join(f"{n} {t}" for t, n in self.types.items())
        return "\n".join(
            [
                f"gguf: {self.path} ({self.file_bytes / 1e6:.2f} MB), architecture "
                f"{self.architecture}; {len(self.tensors)} tensors: {types}",
                f"tokenizer and metadata from {self.source}",
                "codes and scales as kflats stored them"
                + (
                    f" (Q4_1/Q5_1 minimums in float16: weights moved by at most "
                    f"{self.max_offset:.1e})"
                    if self.max_offset
                    else ""
                ),
            ]
        )


def _needs_gguf():
    try:
        import gguf  # noqa: F401
    except ImportError as exc:
        raise ImportError(
            "GGUF export needs the gguf package, which is not installed: pip install "
            "gguf",
            name="gguf",
        ) from exc


def _claim(out, overwrite):
    """``out`` may be written: new, or (``overwrite``) a GGUF file kflats wrote."""
    if not os.path.lexists(out):
        if not out.parent.is_dir():
            raise FileNotFoundError(
                f"cannot write {str(out)!r}: no folder {str(out.parent)!r}"
            )
        return
    shown = repr(str(out))
    if not overwrite:
        raise FileExistsError(f"{shown} exists; pass overwrite=True to replace it")
    if not stat.S_ISREG(os.lstat(out).st_mode):
        raise ValueError(
            f"{shown} is not a regular file; kflats replaces only a GGUF file it wrote"
        )
    try:
        marked = MARKER_KEY in read_gguf_header(out).metadata
    except ValueError:
        marked = False
    if not marked:
        raise ValueError(
            f"{shown} is not a GGUF file kflats wrote (no {MARKER_KEY} entry); kflats "
            "replaces only its own files: choose another name"
        )


def _load(folder, where):
    """The folder's transformers model, its quantized matrices held packed."""
    import json

    from kflats.torch.io import load_compressed

    model = load_compressed(folder)
    manifest = json.loads((folder / "kflats.json").read_text())
    if manifest["kind"] != "transformers":
        raise ValueError(
            f"{where} holds a {manifest['kind']} model; GGUF export writes "
            "transformers causal LMs"
        )
    projective = sorted(manifest["modules"]) + sorted(manifest.get("ties", {}))
    if projective:
        shown = ", ".join(projective[:4]) + (", ..." if len(projective) > 4 else "")
        raise ValueError(
            f"{where}: {len(projective)} modules are projective factors ({shown}), "
            "which no GGUF type holds; compress with format='gguf' to keep to "
            "dense forms"
        )
    return model


def _check_blocks(tensors):
    """Each quantized tensor's blocks, dequantized as llama.cpp defines them,
    against kflats' own values; returns the largest Q4_1 or Q5_1 offset.

    Q4_0, Q5_0 and Q8_0 blocks give kflats' values exactly; Q4_1 and Q5_1
    blocks move a group by its float16 minimum's rounding, and round ``d *
    q + m`` to float32. More would be a bug of kflats, not of its input.
    """
    import gguf

    largest = 0.0
    for t in tensors:
        qt = t.quantized
        if qt is None:
            continue
        ours = qt.dequantize()
        if t.heads is not None:
            ours = permute_rows(ours, t.heads)
        theirs = gguf.quants.dequantize(t.data, t.type).reshape(ours.shape)
        bound = minimum_offset_bound(qt)
        allowed = bound + _CHECK_SLACK * float(np.abs(ours).max(initial=0.0))
        if float(np.abs(theirs - ours).max(initial=0.0)) > allowed:
            raise RuntimeError(  # pragma: no cover - a kflats bug
                f"the GGUF blocks of {t.name} do not hold the codes of {t.source}"
            )
        largest = max(largest, bound)
    return largest


def _write(path, arch, header, tensors, source):
    """The GGUF file: its entries (:func:`._gguf_meta.file_entries`), the tensors."""
    import gguf

    writer = gguf.GGUFWriter(str(path), arch)  # (it writes the architecture)
    if header.alignment != gguf.GGUF_DEFAULT_ALIGNMENT:
        writer.add_custom_alignment(header.alignment)
    set_by_writer = (gguf.Keys.General.ARCHITECTURE, gguf.Keys.General.ALIGNMENT)
    entries = file_entries(source, arch, header.alignment, file_type(tensors))
    for key, value, vtype, item in entries:
        if key not in set_by_writer:
            writer.add_key_value(key, value, vtype, sub_type=item)
    floats = (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16)
    for t in tensors:
        if t.type in floats:
            writer.add_tensor(t.name, t.data)
        else:
            writer.add_tensor(t.name, t.data, raw_dtype=t.type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def export_gguf(folder, out, *, source=None, overwrite=False):
    """Write a compressed causal LM as a GGUF file that llama.cpp runs.

    The folder :func:`~kflats.torch.save_compressed` (or ``kflats
    compress``) wrote of a causal LM of a family llama.cpp runs (Llama,
    SmolLM2, Mistral, Qwen2, Qwen3, GPT-2) becomes one GGUF file. Each
    quantized matrix keeps kflats' own codes and scales, never rounded
    again, in the block type that holds them: 4- and 5-bit codes with zero
    points as ``Q4_1`` and ``Q5_1`` (their float16 minimum ``-z * s``
    rounded: at most 2**-11 of it), 4- and 5-bit symmetric codes as
    ``Q4_0`` and ``Q5_0``, 8-bit symmetric codes as ``Q8_0``, all in groups
    of 32 along rows with float16 scales. Float
    tensors (norms, any matrix left in float) are written as they are
    (F32). A GPT-2 Conv1D weight is written as rows of outputs, its codes
    read transposed. A head tied to the word embedding is left to
    llama.cpp, which computes the logits with ``token_embd`` when no
    ``output.weight`` is written. ``compress(..., format="gguf")`` keeps
    to these forms, its budget the size of this file.

    The tokenizer and the other metadata come from the GGUF file the model
    was compressed from (``source``, or the one ``kflats compress`` recorded
    in the folder's report.json), copied entry by entry, the file type set
    anew and kflats' version added. That file is checked against the folder
    first: the same architecture, numbers of blocks and heads, and tensors.

    Parameters
    ----------
    folder : str or path-like
        A folder written by :func:`~kflats.torch.save_compressed` of a
        transformers causal LM, its matrices dense (float or quantized in a
        form above), no projective factors.
    out : str or path-like
        The GGUF file to write; its folder must exist.
    source : str or path-like, default=None
        The GGUF file the model was compressed from (for a model compressed
        from a Hugging Face folder, a GGUF file of that model, such as
        llama.cpp's ``convert_hf_to_gguf.py`` writes). ``None``: the one the
        folder's report.json records.
    overwrite : bool, default=False
        Replace ``out`` if it exists and kflats wrote it.

    Returns
    -------
    GgufExport

    Raises
    ------
    ValueError
        If ``folder`` is not a folder kflats wrote, holds another kind of
        model or family, projective factors or quantized matrices no GGUF
        type holds (all named), if no source is given or recorded, or the
        source is not the folder's model, or ``out`` exists and kflats did
        not write it. ``out`` is then unchanged.
    FileExistsError
        If ``out`` exists and ``overwrite`` is false.

    Examples
    --------
    >>> from kflats.torch.export import export_gguf
    >>> result = export_gguf("compressed", "model.gguf",
    ...                      source="SmolLM2-135M-Instruct.Q4_1.gguf")  # doctest: +SKIP
    >>> print(result.summary())  # doctest: +SKIP
    """
    _needs_gguf()
    folder, out = Path(os.fspath(folder)), Path(os.fspath(out))
    where = repr(str(folder))
    _claim(out, bool(overwrite))
    hf = _load(folder, where)
    tensors, arch = gguf_tensors(hf, where)
    path = find_source(folder, source, where)
    header = check_source(path, arch, hf.config, tensors, where)
    offset = _check_blocks(tensors)
    order = {t.name: i for i, t in enumerate(header.tensors)}
    tensors.sort(key=lambda t: order[t.name])
    tmp = out.parent / f".{out.name}.kflats-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        _write(tmp, arch, header, tensors, path)
        os.replace(tmp, out)
    except BaseException:
        if os.path.lexists(tmp):
            os.remove(tmp)
        raise
    return GgufExport(
        path=out,
        architecture=arch,
        source=path,
        tensors=tuple((t.name, t.type.name, tuple(t.shape), t.source) for t in tensors),
        file_bytes=out.stat().st_size,
        max_offset=offset,
    )
