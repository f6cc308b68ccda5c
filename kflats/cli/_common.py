"""What the subcommands share: argparse types, interruption, safe ``--out`` writing.

A user's mistake is reported by raising :class:`ValueError` or :class:`OSError`
with a message that reads well after ``kflats:`` (``main`` prints it as one
line, exit status 2). Writing is atomic: a file or a folder is written under a
hidden temporary name beside ``--out`` and renamed to it only once complete;
Ctrl-C or SIGTERM at any moment leaves nothing behind, and no message names
the temporary path.
"""

import argparse
import contextlib
import os
import shutil
import signal
import stat
import tempfile
import threading
import uuid
from pathlib import Path

# The file that save_compressed writes last into every folder it writes: only
# a folder holding it may be replaced by ``kflats compress --overwrite``.
MARKER = "kflats.json"


class ArgumentParser(argparse.ArgumentParser):
    """ArgumentParser whose errors are one line on stderr, exit status 2.

    argparse prints the usage before the error; ``--help`` still shows it.
    Subparsers are of the same class (``add_subparsers`` uses ``type(self)``).
    """

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


# --- argparse types ------------------------------------------------------------


def budget_type(*, include_one):
    """An argparse type: a fraction in (0, 1], or (0, 1) without ``include_one``."""
    interval = "(0, 1]" if include_one else "(0, 1)"

    def parse(text):
        try:
            value = float(text)
        except ValueError:
            value = float("nan")
        if not (0 < value < 1 or (include_one and value == 1)):
            raise argparse.ArgumentTypeError(
                f"expected a fraction in {interval}, got {text}"
            )
        return value

    return parse


# units of --size: decimal (kB, MB, GB) as disks count, binary (KiB, MiB, GiB)
_SIZE_UNITS = {
    "": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9,
    "kib": 2**10, "mib": 2**20, "gib": 2**30,
}  # fmt: skip


def size_type(text):
    """An argparse type: a size in bytes, as ``9MB``, ``9.5 MiB`` or ``9000000``."""
    import re

    match = re.fullmatch(
        r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*", text
    )
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _SIZE_UNITS:
        why = "" if match is None else f" (unknown unit {match.group(2)!r})"
        raise argparse.ArgumentTypeError(
            "expected a size such as 9MB, 500kB, 1.5GiB or a number of bytes, got "
            f"{text!r}{why}"
        )
    value = float(match.group(1)) * _SIZE_UNITS[unit]
    if not 1 <= value < 2**63:
        raise argparse.ArgumentTypeError(
            f"expected a size of at least 1 byte, got {text!r}"
        )
    return int(value)


def integer_at_least(minimum):
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


# --- interruption --------------------------------------------------------------


class Terminated(BaseException):
    """SIGTERM, raised where the program is, so that every cleanup runs."""


def _raise_terminated(signum, frame):
    raise Terminated


@contextlib.contextmanager
def sigterm_raises():
    """Within: SIGTERM raises :class:`Terminated`, as SIGINT raises KeyboardInterrupt.

    A no-op outside the main thread, where Python cannot set signal handlers.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def _uninterrupted():
    """Hold SIGINT and SIGTERM back (they arrive on exit) around renames."""
    held = {signal.SIGINT, signal.SIGTERM}
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)


def _hidden(target, what):
    """A fresh hidden name beside ``target``, for the temporary copy."""
    return (
        target.parent
        / f".{target.name}.kflats-{os.getpid()}-{uuid.uuid4().hex[:8]}{what}"
    )


def _reason(exc):
    return exc.strerror or str(exc)


# --- --out, a file (kflats fit, kflats factorize) ----------------------------------


def output_file(path, overwrite):
    """The file ``--out PATH`` will write, checked before any work is done.

    ``.npz`` is appended to a name that lacks it. Raises OSError when the file
    exists (and not ``overwrite``), is not a regular file, or its folder does
    not exist.
    """
    if not path.endswith(".npz"):
        path += ".npz"
    if os.path.isdir(path):
        raise IsADirectoryError(f"--out {path!r} is a folder")
    if os.path.lexists(path):
        if not overwrite:
            raise FileExistsError(f"{path!r} exists; pass --overwrite to replace it")
        if not stat.S_ISREG(os.lstat(path).st_mode):
            raise FileExistsError(
                f"--out {path!r} is not a regular file: kflats replaces only a file"
            )
    folder = os.path.dirname(path) or "."
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"cannot write {path!r}: no folder {folder!r}")
    return path


def write_file_atomically(path, write, overwrite):
    """Call ``write(file)`` on a temporary file, then rename it to ``path``.

    The temporary file is in ``path``'s folder, so the rename is atomic: the
    target is either untouched or complete, never half-written.
    """
    target = Path(os.path.abspath(path))
    tmp = _hidden(target, ".tmp")
    try:
        with open(tmp, "xb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        with _uninterrupted():
            if os.path.lexists(target) and not overwrite:  # appeared meanwhile
                raise FileExistsError(
                    f"{path!r} exists; pass --overwrite to replace it"
                )
            os.replace(tmp, target)
    except FileExistsError:
        raise
    except OSError as exc:
        raise OSError(f"cannot write {path!r}: {_reason(exc)}") from None
    finally:
        with _uninterrupted():
            if os.path.lexists(tmp):
                os.remove(tmp)


def matrix_and_out(args, note=""):
    """The ``--matrix`` of ``kflats fit`` or ``factorize``, and its ``--out``.

    ``--out`` is checked first (before the matrix is read), then the matrix
    is read and announced on one line, ``note`` appended. Returns ``(A,
    out)``, ``out`` None without ``--out``.
    """
    from ._arrays import load_matrix

    out = args.out and output_file(args.out, args.overwrite)
    A, name = load_matrix(args.matrix)
    print(f"matrix: {name}, {A.shape[0]} x {A.shape[1]}, {A.dtype}{note}")
    return A, out


def save_output(out, write, args, what):
    """Write ``--out`` atomically with ``write(file)`` and say so."""
    write_file_atomically(out, write, args.overwrite)
    print(f"{what} saved to {out}")


# --- --out, a folder (kflats compress) ------------------------------------------


def _refuse_to_replace(out, shown, marker=MARKER, option="--out"):
    """Why ``out`` may not be replaced by a kflats folder, or None.

    ``marker`` is the file that every folder of this kind holds (kflats.json
    for ``kflats compress``, kflats-export.json for ``kflats export``);
    ``option`` the option that names the folder, for the messages.
    """
    if out.is_symlink():
        return (
            f"{option} {shown!r} is a symbolic link; kflats replaces only a folder "
            "it wrote"
        )
    mode = os.lstat(out).st_mode
    if not stat.S_ISDIR(mode):
        what = "a file" if stat.S_ISREG(mode) else "not a folder"
        return (
            f"{option} {shown!r} is {what}; kflats replaces only a folder it wrote "
            f"(one holding {marker})"
        )
    if not (out / marker).is_file() or (out / marker).is_symlink():
        return (
            f"{option} {shown!r} is not a folder kflats wrote (it holds no {marker}); "
            "kflats replaces only its own folders: choose another --out"
        )
    cwd = Path.cwd().resolve()
    if out.resolve() == cwd or out.resolve() in cwd.parents:
        return f"{option} {shown!r} holds the current folder; name a folder beside it"
    return None


def output_folder(out, overwrite, *, marker=MARKER, option="--out"):
    """The folder ``--out DIR`` will become, checked before any heavy work.

    It may exist only with ``overwrite``, and then only as a folder that
    kflats wrote (it holds ``marker``, ``kflats.json`` by default). Missing
    parent folders are made
    when the results are written; the nearest existing one must be a folder
    in which a folder can be made (tried now, and removed). Returns the
    absolute path.
    """
    shown = str(out)
    out = Path(os.path.abspath(out))
    if out.parent == out:
        raise ValueError(f"{option} {shown!r} is the root folder")
    if os.path.lexists(out):
        if not overwrite:
            raise ValueError(
                f"{option} {shown!r} exists; pass --overwrite to replace it"
            )
        refused = _refuse_to_replace(out, shown, marker, option)
        if refused:
            raise ValueError(refused)
    ancestor = out.parent
    while not os.path.lexists(ancestor):
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ValueError(
            f"{option} {shown!r}: {str(ancestor)!r} is a file, not a folder"
        )
    try:
        os.rmdir(tempfile.mkdtemp(prefix=f".{out.name}.kflats-probe-", dir=ancestor))
    except OSError as exc:
        raise ValueError(
            f"{option} {shown!r}: cannot write in {str(ancestor)!r}: {_reason(exc)}"
        ) from None
    return out


def write_folder_atomically(
    out, fill, *, overwrite, shown=None, marker=MARKER, option="--out"
):
    """Call ``fill(folder)`` on a hidden temporary folder, then rename it to ``out``.

    ``out`` comes from :func:`output_folder`. The temporary folder is made
    beside ``out`` (with any missing parents) and removed on any failure,
    Ctrl-C or SIGTERM included; ``out`` is replaced only once the new folder
    is complete, and only if it is still a folder kflats wrote (holding
    ``marker``; ``option`` names it in messages). Returns what ``fill``
    returns.
    """
    shown = str(out) if shown is None else shown
    tmp = _hidden(out, "")
    try:
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            result = fill(tmp)
        except OSError as exc:
            reason = _reason(exc).replace(str(tmp), shown)
            raise OSError(f"cannot write {option} {shown!r}: {reason}") from None
        except ValueError as exc:  # a message that names the hidden folder
            raise ValueError(str(exc).replace(str(tmp), shown)) from None
        with _uninterrupted():
            _replace(tmp, out, overwrite, shown, marker, option)
        return result
    except BaseException:
        with _uninterrupted():
            shutil.rmtree(tmp, ignore_errors=True)
        raise


def _replace(tmp, out, overwrite, shown, marker, option):
    """Rename tmp to out; an existing out (a kflats folder) is removed after."""
    if not os.path.lexists(out):
        os.replace(tmp, out)
        return
    refused = (
        None
        if overwrite
        else f"{option} {shown!r} exists; pass --overwrite to replace it"
    )
    # it may have changed meanwhile
    refused = refused or _refuse_to_replace(out, shown, marker, option)
    if refused:
        raise ValueError(refused)
    old = _hidden(out, "-old")
    os.replace(out, old)
    try:
        os.replace(tmp, out)
    except OSError:
        os.replace(old, out)
        raise
    shutil.rmtree(old)


def versions():
    """The versions of kflats and the model libraries, for a report."""
    from importlib.metadata import PackageNotFoundError, version

    import kflats

    out = {"kflats": kflats.__version__}
    for package in ("torch", "transformers", "sentence-transformers"):
        try:
            out[package] = version(package)
        except PackageNotFoundError:  # pragma: no cover - all in the nlp extra
            out[package] = None
    return out
