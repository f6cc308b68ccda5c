"""Reading ``--matrix``: a 2-D array of real numbers from .npy, .npz or .csv.

- ``FILE.npy``, a NumPy array (read without pickle);
- ``FILE.npz`` holding one array, or ``FILE.npz:KEY`` to pick one of several;
- ``FILE.csv``, numbers separated by commas, one row a line; a first line with
  no number in it is taken as a header of column names and skipped.

A NumPy file's header (shape and dtype) is read and checked before its data:
a file that declares more data than it holds, or Python objects, is refused
before anything is allocated. Every mistake is a ValueError or OSError whose
message names the file.
"""

import os
import warnings
import zipfile
import zlib

import numpy as np

MATRIX_HELP = (
    "'minilm' (the bundled all-MiniLM-L6-v2 embedding table, default), or a 2-D "
    "array of real numbers in FILE.npy, FILE.npz (one array, or FILE.npz:KEY to "
    "pick one) or FILE.csv (comma-separated numbers, one row a line; a first "
    "line with no number in it is a header and is skipped)"
)

# What numpy raises for a file it cannot read as an array.
_DAMAGED = (ValueError, EOFError, zipfile.BadZipFile, zlib.error)


def load_matrix(source):
    """The matrix that ``--matrix`` names, checked, and a name to print."""
    if source == "minilm":
        from kflats.datasets import load_minilm_embeddings

        return load_minilm_embeddings(), "all-MiniLM-L6-v2 word embeddings"
    path, key = source, None
    head, colon, tail = source.rpartition(":")
    if colon and head.lower().endswith(".npz"):
        path, key = head, tail
    ext = os.path.splitext(path)[1].lower()
    if colon and os.path.splitext(head)[1].lower() in (".npy", ".csv"):
        raise ValueError(f"--matrix {source!r}: only a .npz file has arrays by name")
    if ext not in (".npy", ".npz", ".csv"):
        raise ValueError(
            f"--matrix must be 'minilm' or a .npy, .npz or .csv file, got {source!r}"
        )
    try:
        A = _read_csv(path) if ext == ".csv" else _read_numpy(path, key)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise OSError(f"cannot read --matrix {path!r}: {reason}") from exc
    return check_matrix(A, source), source


# --- .npy and .npz -------------------------------------------------------------


def _read_numpy(path, key):
    with open(path, "rb") as f:
        magic = f.read(6)
    if magic != b"\x93NUMPY" and magic[:4] != b"PK\x03\x04":
        raise ValueError(f"--matrix {path!r} is not a NumPy .npy or .npz file")
    if magic == b"\x93NUMPY":
        if key is not None:
            raise ValueError(
                f"--matrix {path!r} holds a single array, not arrays by name: "
                f"drop ':{key}'"
            )
        with open(path, "rb") as f:
            _check_header(f, os.fstat(f.fileno()).st_size, path)
        try:
            return np.load(path, allow_pickle=False)
        except _DAMAGED as exc:
            raise _unreadable(path, exc) from exc
    try:
        archive = zipfile.ZipFile(path)
    except _DAMAGED as exc:
        raise _unreadable(path, exc) from exc
    with archive:
        members = {
            info.filename[:-4]: info
            for info in archive.infolist()
            if info.filename.endswith(".npy")
        }
        key = _pick_key(list(members), key, path)
        label, info = f"{path}:{key}", members[key]
        try:
            member = archive.open(info)
        except _DAMAGED as exc:
            raise _unreadable(label, exc) from exc
        with member:
            _check_header(member, info.file_size, label)
    try:
        with np.load(path, allow_pickle=False) as data:
            return data[key]
    except _DAMAGED as exc:
        raise _unreadable(label, exc) from exc


def _check_header(f, size, label):
    """Read a .npy header from ``f`` (``size`` bytes in all) and check it.

    The data must be numbers (no Python objects) and fit in what the file
    holds after the header; checked before any data is read.
    """
    try:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, _, dtype = np.lib.format.read_array_header_2_0(f)
        else:
            raise ValueError(f"format version {version[0]}.{version[1]} is not read")
    except _DAMAGED as exc:
        raise ValueError(f"cannot read --matrix {label!r}: {exc}") from None
    if dtype.hasobject:
        raise ValueError(f"--matrix {label!r} holds Python objects, not numbers")
    declared = int(np.prod(shape, dtype=object)) * dtype.itemsize
    held = size - f.tell()
    if declared > held:
        raise ValueError(
            f"cannot read --matrix {label!r}: Failed to read all data: its header "
            f"declares shape {shape} of {dtype} ({declared:,} bytes) and it holds "
            f"{max(held, 0):,}"
        )


def _unreadable(label, exc):
    if "allow_pickle" in str(exc):  # numpy's words for an object array
        return ValueError(f"--matrix {label!r} holds Python objects, not numbers")
    return ValueError(f"cannot read --matrix {label!r}: {exc}")


def _pick_key(names, key, path):
    listed = ", ".join(names[:20]) + (", ..." if len(names) > 20 else "")
    if key is None:
        if len(names) == 1:
            return names[0]
        if not names:
            raise ValueError(f"--matrix {path!r} holds no array")
        raise ValueError(
            f"--matrix {path!r} holds {len(names)} arrays ({listed}): pick one "
            f"with --matrix {path}:KEY"
        )
    if key not in names:
        raise ValueError(f"--matrix {path!r} has no array {key!r}; it holds {listed}")
    return key


# --- .csv ----------------------------------------------------------------------


def _is_number(text):
    try:
        float(text)
    except ValueError:
        return False
    return True


def _read_csv(path):
    with open(path, encoding="utf-8-sig") as f:
        try:
            first = f.readline()
        except UnicodeDecodeError as exc:
            raise ValueError(f"--matrix {path!r} is not a text file") from exc
    header = bool(first.strip()) and not any(map(_is_number, first.split(",")))
    with warnings.catch_warnings():
        # An empty file: reported by check_matrix, with its shape.
        warnings.filterwarnings("ignore", "loadtxt: input contained no data")
        try:
            return np.loadtxt(
                path,
                delimiter=",",
                skiprows=int(header),
                ndmin=2,
                dtype=np.float64,
                encoding="utf-8-sig",
            )
        except ValueError as exc:
            # numpy counts rows from 0 after the skipped ones: find the line.
            problem = _csv_problem(path, header)
            raise ValueError(
                problem or f"cannot read --matrix {path!r} as CSV: {exc}"
            ) from exc


def _csv_problem(path, header):
    """Where a CSV file stops being a table of numbers, for the error message."""
    width = None
    with open(path, encoding="utf-8-sig") as f:
        for number, line in enumerate(f, start=1):
            line = line.partition("#")[0]  # loadtxt's comments
            if (number == 1 and header) or not line.strip():
                continue
            fields = line.rstrip("\r\n").split(",")
            for column, field in enumerate(fields, start=1):
                if not _is_number(field):
                    return (
                        f"--matrix {path!r} line {number}, column {column}: "
                        f"{field.strip()!r} is not a number"
                    )
            if width is not None and len(fields) != width:
                return (
                    f"--matrix {path!r} line {number} has {len(fields)} values, "
                    f"the lines before it {width}"
                )
            width = len(fields)
    return None


# --- the checks ------------------------------------------------------------------


def check_matrix(A, source):
    """``A`` as a float matrix, or a ValueError saying what is wrong with it."""
    if A.dtype.kind not in "biuf":
        what = "complex numbers" if A.dtype.kind == "c" else f"dtype {A.dtype}"
        raise ValueError(f"--matrix {source!r} must hold real numbers, got {what}")
    if A.ndim != 2:
        raise ValueError(
            f"--matrix {source!r} must be a 2-D array, got shape {A.shape}"
        )
    if A.size == 0:
        raise ValueError(f"--matrix {source!r} is empty: shape {A.shape}")
    if A.dtype.kind != "f":
        A = A.astype(np.float64)
    finite = np.isfinite(A)
    if not finite.all():
        n_nan = int(np.count_nonzero(np.isnan(A)))
        n_inf = A.size - int(np.count_nonzero(finite)) - n_nan
        raise ValueError(
            f"--matrix {source!r} holds {n_nan} NaN and {n_inf} infinite values "
            f"(of {A.shape[0]} x {A.shape[1]}): remove or replace them first"
        )
    _check_scale(A, source)
    return A


def _check_scale(A, source):
    """Refuse values whose squares overflow the dtype's arithmetic.

    Fitting multiplies squared norms and squared inner products of rows
    (cosines, Gram matrices): the square of the sum of all squares must stay
    finite, so that sum must stay below the square root of the dtype's
    largest number.
    """
    largest = np.abs(A).max(axis=0)
    dtype = np.result_type(A.dtype, np.float32)
    limit = float(np.sqrt(np.finfo(dtype).max))
    # scaled by the largest value, the sums cannot overflow
    top = float(largest.max())
    if top == 0:
        return
    sums = ((A / top) ** 2).sum(axis=0, dtype=np.float64)
    total = float(sums.sum())
    if np.log(total) + 2 * np.log(top) < np.log(limit):
        return
    with np.errstate(divide="ignore"):
        over = np.flatnonzero(np.log(sums) + 2 * np.log(top) >= np.log(limit))
    column = int(over[0]) if len(over) else int(np.argmax(sums))
    where = f"column {column + 1}" + (
        f" and {len(over) - 1} more" if len(over) > 1 else ""
    )
    raise ValueError(
        f"--matrix {source!r}: its values overflow {dtype} arithmetic (the sum of "
        f"their squares exceeds {limit:.3g}; {where}, up to "
        f"{float(largest[column]):.3g}): rescale the matrix first"
    )
