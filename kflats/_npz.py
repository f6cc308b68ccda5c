"""Reading ``.npy`` and ``.npz`` files that may come from anyone.

:func:`numpy.load` trusts the sizes a file declares: a 200-byte ``.npy``
whose header announces ``shape=(2**40,)`` ends in a memory error, and an
``.npz`` is read member by member only when asked, after the archive has
been accepted whole. The readers here check every header before any data:
the dtype is a plain number, boolean or string one (never an object, a
structured or a void dtype), the declared number of bytes is what the member
holds, names are unique, and only the members that are asked for are read.
Every error is a :class:`ValueError` that names the file.
"""

import os
import zipfile
from typing import NamedTuple

import numpy as np
from numpy.lib import format as npformat

__all__ = ["Header", "NpzArchive", "read_npy", "read_npz"]

# the dtype kinds a reader accepts: booleans, integers, floats, complex
# numbers, fixed-size strings; never "O" (pickled objects), "V" or "M"/"m"
_KINDS = "biufcSU"
# numpy's own limit on the header's length (numpy.lib.format's default)
_MAX_HEADER = 10_000


class Header(NamedTuple):
    """What an ``.npy`` header declares, read before the data.

    ``dtype`` is in native byte order (the data is read in the declared
    order, ``declared``, and converted).
    """

    shape: tuple
    dtype: np.dtype
    fortran_order: bool
    declared: np.dtype

    @property
    def nbytes(self):
        """Bytes of data the header announces."""
        return int(np.prod(self.shape, dtype=object)) * self.dtype.itemsize


def _where(path):
    if isinstance(path, (str, bytes, os.PathLike)):
        return repr(os.fsdecode(path))
    name = getattr(path, "name", None)
    return repr(name) if isinstance(name, str) else f"<{type(path).__name__}>"


def _read_header(fp, where):
    """The header of the ``.npy`` stream ``fp``, positioned at its start."""
    try:
        version = npformat.read_magic(fp)
        if version == (1, 0):
            shape, fortran, dtype = npformat.read_array_header_1_0(
                fp, max_header_size=_MAX_HEADER
            )
        elif version == (2, 0):
            shape, fortran, dtype = npformat.read_array_header_2_0(
                fp, max_header_size=_MAX_HEADER
            )
        else:
            raise ValueError(f"unsupported .npy format version {version}")
    except (ValueError, EOFError, SyntaxError, TypeError, OverflowError) as exc:
        raise ValueError(f"{where}: unreadable .npy header: {exc}") from None
    if dtype.hasobject or dtype.names is not None or dtype.kind not in _KINDS:
        raise ValueError(
            f"{where}: dtype {dtype} is not accepted (only plain boolean, "
            "number and string arrays; never pickled objects)"
        )
    if any(not isinstance(s, int) or s < 0 for s in shape):
        raise ValueError(f"{where}: invalid shape {shape}")
    native = dtype.newbyteorder("=") if dtype.byteorder not in "=|" else dtype
    return Header(tuple(shape), native, bool(fortran), dtype)


def _read_data(fp, header, where):
    """The array the header announced, read from ``fp`` (after the header)."""
    count = int(np.prod(header.shape, dtype=np.int64))
    array = np.empty(count, dtype=header.declared)
    view = memoryview(array.view(np.uint8).reshape(-1))
    got = 0
    while got < header.nbytes:
        n = fp.readinto(view[got:])
        if not n:
            raise ValueError(
                f"{where}: truncated: {header.nbytes} bytes of data announced, "
                f"{got} found"
            )
        got += n
    if fp.read(1):
        raise ValueError(f"{where}: more data than its header announces")
    order = "F" if header.fortran_order else "C"
    array = array.reshape(header.shape, order=order)
    if not array.dtype.isnative:
        array = array.astype(array.dtype.newbyteorder("="))
    return array


def read_npy(path, *, kinds="biuf", ndim=None):
    """Read one array from an ``.npy`` file, checking its header first.

    Parameters
    ----------
    path : str or path-like
        The ``.npy`` file.
    kinds : str, default="biuf"
        The accepted :attr:`numpy.dtype.kind` letters (booleans, integers,
        floats by default; ``"c"`` complex, ``"U"``/``"S"`` strings). Object
        arrays are never read.
    ndim : int or None, default=None
        The required number of dimensions, if any.

    Returns
    -------
    array : ndarray
        In native byte order.

    Raises
    ------
    ValueError
        Naming the file: if it is not an ``.npy`` file, its dtype is not
        accepted, its shape has another number of dimensions, or its header
        announces another number of bytes than the file holds (checked
        before any memory is taken for the data).

    Examples
    --------
    >>> import numpy as np, os, tempfile
    >>> from kflats._npz import read_npy
    >>> path = os.path.join(tempfile.mkdtemp(), "a.npy")
    >>> np.save(path, np.eye(2))
    >>> read_npy(path, ndim=2)
    array([[1., 0.],
           [0., 1.]])
    >>> read_npy(path, ndim=1)
    Traceback (most recent call last):
    ...
    ValueError: '...a.npy': a 1-D array expected, the file holds shape (2, 2)
    """
    where = _where(path)
    try:
        fp = open(path, "rb")
    except OSError as exc:
        raise ValueError(f"{where}: cannot be read: {exc}") from None
    with fp:
        start = fp.read(6)
        if start != b"\x93NUMPY":
            what = "a zip archive (.npz)" if start[:2] == b"PK" else "not an .npy file"
            raise ValueError(f"{where}: {what}; an .npy file (numpy.save) expected")
        fp.seek(0)
        header = _read_header(fp, where)
        _check_header(header, kinds, ndim, None, where, "the file holds")
        size = os.fstat(fp.fileno()).st_size - fp.tell()
        if size != header.nbytes:
            raise ValueError(
                f"{where}: its header announces shape {header.shape} of "
                f"{header.dtype} ({header.nbytes} bytes), the file holds {size} "
                "bytes of data"
            )
        return _read_data(fp, header, where)


def _check_header(header, kinds, ndim, shape, where, holds):
    if header.dtype.kind not in kinds:
        raise ValueError(
            f"{where}: dtype {header.dtype} is not accepted here (kinds "
            f"{kinds!r} expected)"
        )
    if ndim is not None and len(header.shape) != ndim:
        raise ValueError(
            f"{where}: a {ndim}-D array expected, {holds} shape {header.shape}"
        )
    if shape is not None and header.shape != tuple(shape):
        raise ValueError(
            f"{where}: shape {tuple(shape)} expected, {holds} shape {header.shape}"
        )


class NpzArchive:
    """An ``.npz`` archive opened for checked, member-by-member reading.

    Opening it reads the zip directory only: the member names (each must be
    a unique ``NAME.npy``). :meth:`header` reads a member's header,
    :meth:`read` its data after checking the header against what the caller
    expects and against the member's size. Use :func:`read_npz` for the
    simple case.

    Parameters
    ----------
    path : str or path-like or binary file-like
        The archive; a file object must be seekable.
    what : str, default="an .npz archive"
        What the file should be, for the error messages.

    Attributes
    ----------
    names : tuple of str
        The member names, without ``.npy``, in archive order.
    where : str
        The file's name as the error messages give it.

    Examples
    --------
    >>> import io, numpy as np
    >>> from kflats._npz import NpzArchive
    >>> buf = io.BytesIO()
    >>> np.savez(buf, x=np.arange(3), y=np.array("text"))
    >>> _ = buf.seek(0)
    >>> with NpzArchive(buf) as npz:
    ...     npz.names, npz.header("x").shape, npz.read("x", kinds="i")
    (('x', 'y'), (3,), array([0, 1, 2]))
    """

    def __init__(self, path, *, what="an .npz archive"):
        self.where = _where(path)
        self.what = what
        try:
            if isinstance(path, (str, bytes, os.PathLike)):
                with open(path, "rb") as fp:
                    start = fp.read(6)
            else:
                position = path.tell()
                start = path.read(6)
                path.seek(position)
            if start[:2] != b"PK":
                kind = ".npy file" if start == b"\x93NUMPY" else "zip archive"
                raise ValueError(
                    f"{self.where} is not {what}: it is "
                    f"{'an' if kind[0] == '.' else 'not a'} {kind}"
                )
            self._zip = zipfile.ZipFile(path)
        except (OSError, zipfile.BadZipFile, zipfile.LargeZipFile, EOFError) as exc:
            raise ValueError(
                f"{self.where} is not {what}: not a readable zip archive ({exc})"
            ) from None
        names, self._infos = [], {}
        for info in self._zip.infolist():
            if not info.filename.endswith(".npy") or info.is_dir():
                self.close()
                raise ValueError(
                    f"{self.where} is not {what}: member {info.filename!r} is not "
                    "an .npy array"
                )
            name = info.filename[: -len(".npy")]
            if name in self._infos:
                self.close()
                raise ValueError(
                    f"{self.where} is not {what}: member {name!r} appears twice"
                )
            names.append(name)
            self._infos[name] = info
        self.names = tuple(names)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        """Close the archive (a file object passed in stays open)."""
        zf = getattr(self, "_zip", None)
        if zf is not None:
            zf.close()

    def __contains__(self, name):
        return name in self._infos

    def only(self, allowed):
        """Refuse any member that ``allowed`` (a container or predicate) excludes."""
        test = allowed if callable(allowed) else allowed.__contains__
        unknown = [name for name in self.names if not test(name)]
        if unknown:
            shown = ", ".join(map(repr, unknown[:5])) + (
                ", ..." if len(unknown) > 5 else ""
            )
            raise ValueError(
                f"{self.where} is not {self.what}: unknown member(s) {shown}"
            )

    def _open(self, name):
        if name not in self._infos:
            raise ValueError(f"{self.where}: member {name!r} is missing")
        try:
            return self._zip.open(self._infos[name])
        except (OSError, zipfile.BadZipFile, NotImplementedError, RuntimeError) as e:
            raise ValueError(f"{self.where}: member {name!r} unreadable: {e}") from None

    def header(self, name):
        """The :class:`Header` of member ``name``, checked against its size."""
        where = f"{self.where}, member {name!r}"
        with self._open(name) as fp:
            header = _read_header(fp, where)
            size = self._infos[name].file_size - fp.tell()
        if size != header.nbytes:
            raise ValueError(
                f"{where}: its header announces shape {header.shape} of "
                f"{header.dtype} ({header.nbytes} bytes), the member holds {size} "
                "bytes of data"
            )
        return header

    def read(self, name, *, kinds="biuf", ndim=None, shape=None):
        """Member ``name``, its header checked before its data is read.

        Parameters
        ----------
        name : str
            The member, without ``.npy``.
        kinds : str, default="biuf"
            Accepted dtype kinds (``"U"`` for a string, ``"c"`` complex).
        ndim : int or None, default=None
            The required number of dimensions.
        shape : tuple of int or None, default=None
            The required shape.

        Returns
        -------
        array : ndarray
            In native byte order.
        """
        where = f"{self.where}, member {name!r}"
        header = self.header(name)
        _check_header(header, kinds, ndim, shape, where, "the member holds")
        try:
            with self._open(name) as fp:
                _read_header(fp, where)
                return _read_data(fp, header, where)
        except (OSError, zipfile.BadZipFile, EOFError) as exc:
            raise ValueError(f"{where}: unreadable data: {exc}") from None

    def string(self, name):
        """Member ``name`` as a Python str: it must hold a 0-d string array."""
        return str(self.read(name, kinds="U", ndim=0))

    def integer(self, name, low=None, high=None):
        """Member ``name`` as a Python int: a 0-d integer array (not bool)."""
        value = int(self.read(name, kinds="iu", ndim=0))
        if (low is not None and value < low) or (high is not None and value > high):
            raise ValueError(
                f"{self.where}, member {name!r}: {value} lies outside {low}..{high}"
            )
        return value

    def boolean(self, name):
        """Member ``name`` as a Python bool: a 0-d boolean array, strictly."""
        return bool(self.read(name, kinds="b", ndim=0))

    def real(self, name):
        """Member ``name`` as a Python float: a 0-d float array (NaN allowed)."""
        return float(self.read(name, kinds="f", ndim=0))


def read_npz(path, members=None, *, kinds="biuf"):
    """Read the members of an ``.npz`` archive, checking each header first.

    Parameters
    ----------
    path : str or path-like or binary file-like
        The archive (:func:`numpy.savez`, :func:`numpy.savez_compressed`).
    members : collection of str or None, default=None
        The members to read, without ``.npy``. Any other member in the
        archive is refused, and so is a missing one. ``None``: every member.
    kinds : str, default="biuf"
        Accepted dtype kinds (see :func:`read_npy`).

    Returns
    -------
    arrays : dict of str to ndarray
        In the order of ``members`` (archive order when ``None``).

    Raises
    ------
    ValueError
        Naming the file: if it is not a zip archive of ``.npy`` members
        (a plain-text file, an ``.npy`` file), a member is unknown, missing,
        duplicated, of a dtype not accepted (never pickled objects), or
        announces more data than it holds.

    Examples
    --------
    >>> import io, numpy as np
    >>> from kflats._npz import read_npz
    >>> buf = io.BytesIO()
    >>> np.savez(buf, a=np.zeros(2), b=np.ones((1, 2)))
    >>> _ = buf.seek(0)
    >>> sorted(read_npz(buf, ["a", "b"]).items())[1]
    ('b', array([[1., 1.]]))
    >>> _ = buf.seek(0)
    >>> read_npz(buf, ["a"])
    Traceback (most recent call last):
    ...
    ValueError: <BytesIO> is not an .npz archive: unknown member(s) 'b'
    """
    with NpzArchive(path) as npz:
        if members is None:
            members = npz.names
        else:
            members = list(members)
            npz.only(set(members))
        return {name: npz.read(name, kinds=kinds) for name in members}
