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

import numpy as np

MATRIX_HELP = (
    "'minilm' (the bundled all-MiniLM-L6-v2 embedding table, default), or a 2-D "
    "array of real numbers in FILE.npy, FILE.npz (one array, or FILE.npz:KEY to "
    "pick one) or FILE.csv (comma-separated numbers, one row a line; a first "
    "line with no number in it is a header and is skipped)"
)


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


# every plain dtype: check_matrix then says what a matrix must hold
_ANY = "biufcSU"


def _read_numpy(path, key):
    """An array of an .npy or .npz file, read with kflats' checked reader.

    Headers come before data (``kflats._npz``): a file that declares more
    data than it holds, or Python objects, is refused before any memory is
    taken for it.
    """
    from kflats._npz import NpzArchive, read_npy

    with open(path, "rb") as f:
        magic = f.read(6)
    if magic != b"\x93NUMPY" and magic[:4] != b"PK\x03\x04":
        raise ValueError(f"--matrix {path!r} is not a NumPy .npy or .npz file")
    try:
        if magic == b"\x93NUMPY":
            if key is not None:
                raise ValueError(
                    f"--matrix {path!r} holds a single array, not arrays by name: "
                    f"drop ':{key}'"
                )
            return read_npy(path, kinds=_ANY)
        with NpzArchive(path) as archive:
            key = _pick_key(list(archive.names), key, path)
            return archive.read(key, kinds=_ANY)
    except ValueError as exc:
        message = str(exc)
        if message.startswith("--matrix"):
            raise
        # "'FILE' is not an .npz archive: ..." or "'FILE': what went wrong"
        is_not = message.split(": ", 1)[0].endswith(("is not an .npz archive",))
        prefix = "--matrix" if is_not else "cannot read --matrix"
        raise ValueError(f"{prefix} {message}") from None


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
