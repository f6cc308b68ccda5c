"""QuantizedTensor: group-wise integer codes packed tightly."""

import numpy as np

from ._grid import (
    SUPPORTED_BITS,
    _check_axis,
    _decode,
    _encode,
    _packed_len,
    check_bits,
    check_group_size,
    pack_codes,
    unpack_codes,
)
from ._scales import (
    check_scale_layout,
    compact_nbytes,
    join_scales,
    snap_scales,
    split_scales,
)

__all__ = ["SUPPORTED_BITS", "QuantizedTensor"]

_META_LEN = 5  # bits, group_size, axis, rows, cols


class QuantizedTensor:
    """A 2-D tensor stored as group-wise integer codes, scales and zero points.

    The matrix is cut into groups of ``group_size`` consecutive entries along
    ``axis`` (``axis=1``: along each row; ``axis=0``: along each column). A
    group has one scale ``s`` and one integer zero point ``z``; its entries are
    the codes ``q`` in ``0 .. 2**bits - 1`` and dequantize to
    ``(q - z) * s``, computed in float32 (deterministic: one rounding). The
    codes are packed tightly: ``bits * size / 8`` bytes, 3-, 5- and 6-bit
    codes running across byte boundaries.

    Build one with :func:`quantize` or :func:`quantize_calibrated`.

    Parameters
    ----------
    codes : ndarray of uint8
        The packed code stream (see :attr:`nbytes`).
    scales : ndarray of float16 or float32, shape (n_groups_per_line, ...)
        One scale per group, shape ``(lines, length // group_size)`` where a
        line is a row (``axis=1``) or a column (``axis=0``).
    zeros : ndarray of uint8 or float16, or None
        Zero point of each group, same shape as ``scales``: integers (uint8),
        or float16 values (a grid that spans the group's own range, as a
        GGUF Q4_1 or Q5_1 block's scale and minimum do); ``None`` for a symmetric
        grid, whose zero point is ``2**(bits - 1)``.
    shape : tuple of int
        ``(rows, cols)`` of the matrix.
    bits : int
        One of 2, 3, 4, 5, 6, 8.
    group_size : int
        Divides the length of a line.
    axis : {0, 1}, default=1
    scale_layout : {None, 0, 1}, default=None
        Compact scales (:func:`quantize` and :func:`quantize_calibrated`
        with ``compact_scales=True``): float16 scales that are 8-bit
        multiples of a power of two shared by 8 neighbouring groups, along
        the lines (0: the groups of one index in 8 consecutive lines) or
        along each line (1). They are stored as a byte a group and a byte
        an exponent (0.28 bits a number at groups of 32, instead of 0.5);
        in memory they are float16 as any. ``None``: float16 or float32
        scales stored as they are.

    Attributes
    ----------
    nbytes : int
        Bytes of codes, scales and zero points.

    Examples
    --------
    >>> import numpy as np
    >>> from kflats.quantize import quantize, QuantizedTensor
    >>> W = np.random.default_rng(0).normal(size=(4, 64)).astype(np.float32)
    >>> qt = quantize(W, bits=3, group_size=32)
    >>> qt
    QuantizedTensor(shape=(4, 64), bits=3, group_size=32, axis=1, nbytes=115)
    >>> qt.codes.nbytes  # 4 * 64 * 3 / 8
    96
    >>> state = qt.to_state("w.")
    >>> sorted(state)
    ['w.codes', 'w.meta', 'w.scales', 'w.zeros']
    >>> again = QuantizedTensor.from_state(state, "w.")
    >>> np.array_equal(again.dequantize(), qt.dequantize())
    True
    """

    def __init__(
        self, codes, scales, zeros, shape, bits, group_size, axis=1, scale_layout=None
    ):
        self.bits = check_bits(bits)
        self.scale_layout = check_scale_layout(scale_layout)
        self.axis = _check_axis(axis)
        try:
            shape = tuple(int(s) for s in shape)
        except TypeError:
            raise TypeError(f"shape must be a pair of ints, got {shape!r}") from None
        if len(shape) != 2 or min(shape) < 1:
            raise ValueError(f"shape must be two positive ints, got {shape}")
        self.shape = shape
        lines, length = shape if self.axis == 1 else shape[::-1]
        what = "the row length ({})" if self.axis == 1 else "the column length ({})"
        self.group_size = check_group_size(group_size, length, what)
        groups = (lines, length // self.group_size)
        codes, scales = np.asarray(codes), np.asarray(scales)
        if codes.dtype != np.uint8 or codes.ndim != 1:
            raise ValueError(
                f"codes must be a 1-D uint8 array, got {codes.dtype} {codes.shape}"
            )
        n_bytes = _packed_len(lines * length, self.bits)
        if codes.shape[0] != n_bytes:
            raise ValueError(
                f"codes must hold {n_bytes} bytes ({lines * length} codes of "
                f"{self.bits} bits), got {codes.shape[0]}"
            )
        if scales.dtype not in (np.float16, np.float32) or scales.shape != groups:
            raise ValueError(
                f"scales must be float16 or float32 of shape {groups}, got "
                f"{scales.dtype} {scales.shape}"
            )
        if not np.all(np.isfinite(scales)) or np.any(scales < 0):
            raise ValueError("scales must be finite and non-negative")
        if zeros is not None:
            zeros = np.asarray(zeros)
            if zeros.dtype not in (np.uint8, np.float16) or zeros.shape != groups:
                raise ValueError(
                    f"zeros must be None or uint8 or float16 of shape {groups}, "
                    f"got {zeros.dtype} {zeros.shape}"
                )
            if zeros.dtype == np.float16 and not np.all(np.isfinite(zeros)):
                raise ValueError("zeros must be finite")
            if (
                zeros.dtype == np.uint8
                and zeros.size
                and int(zeros.max()) >= 1 << self.bits
            ):
                raise ValueError(
                    f"zeros must lie in 0..{(1 << self.bits) - 1} for {self.bits} bits"
                )
        if self.scale_layout is not None and (
            scales.dtype != np.float16
            or split_scales(scales, self.scale_layout) is None
        ):
            raise ValueError(
                f"scale_layout={self.scale_layout} needs float16 scales on its compact "
                "grid (kflats.quantize: compact_scales=True makes them)"
            )
        self.codes, self.scales, self.zeros = codes, scales, zeros

    # -- construction from unpacked codes
    @classmethod
    def _from_codes(
        cls, codes, scales, zeros, shape, bits, group_size, axis, scale_layout=None
    ):
        """Pack ``codes`` of shape (lines, length) in the orientation of ``axis``."""
        packed = pack_codes(codes, bits)
        return cls(packed, scales, zeros, shape, bits, group_size, axis, scale_layout)

    @property
    def _lines(self):
        return self.shape if self.axis == 1 else self.shape[::-1]

    def unpacked_codes(self):
        """The codes as a (lines, length) uint8 array (lines: rows for ``axis=1``)."""
        lines, length = self._lines
        return unpack_codes(self.codes, self.bits, lines * length).reshape(
            lines, length
        )

    def _zeros_or_mid(self):
        if self.zeros is not None:
            return self.zeros
        return np.full(self.scales.shape, 1 << (self.bits - 1), dtype=np.uint8)

    @property
    def symmetric(self):
        """Whether the grid is symmetric (no zero points stored)."""
        return self.zeros is None

    @property
    def zero_dtype(self):
        """``"uint8"`` (integer zero points), ``"float16"``, or None (symmetric)."""
        return None if self.zeros is None else self.zeros.dtype.name

    @property
    def nbytes(self):
        """Bytes stored: the codes, the scales and the zero points (integer
        zero points packed at ``bits`` bits, as :meth:`to_state` writes them)."""
        scales = self.scales.nbytes
        if self.scale_layout is not None:
            scales = compact_nbytes(self.scales.shape, self.scale_layout)
        return int(self.codes.nbytes + scales + self._stored_zeros().nbytes)

    def _stored_zeros(self):
        """The zero points as stored: integer ones packed at ``bits`` bits (a
        zero point lies in ``0 .. 2**bits - 1``: 3 bits, not a byte, at 3
        bits), float16 ones as they are; an empty array without."""
        if self.zeros is None:
            return np.zeros(0, dtype=np.uint8)
        if self.zeros.dtype == np.uint8 and self.bits < 8:
            return pack_codes(self.zeros.reshape(-1), self.bits)
        return self.zeros

    @property
    def T(self):
        """The transposed matrix: the same codes, read along the other axis."""
        return QuantizedTensor(
            self.codes,
            self.scales,
            self.zeros,
            self.shape[::-1],
            self.bits,
            self.group_size,
            1 - self.axis,
            self.scale_layout,
        )

    def dequantize(self):
        """The float32 matrix ``(codes - zeros) * scales``, of shape :attr:`shape`.

        Returns
        -------
        W : ndarray of shape ``shape``, float32
            The same bits on every call and every machine.
        """
        lines, length = self._lines
        g = self.group_size
        codes = self.unpacked_codes().reshape(-1, g)
        out = _decode(codes, self.scales.reshape(-1), self._zeros_or_mid().reshape(-1))
        out = out.reshape(lines, length)
        return out if self.axis == 1 else np.ascontiguousarray(out.T)

    def requantize(self, W, scales=None):
        """Codes of ``W`` on this tensor's grid (its zero points kept).

        Parameters
        ----------
        W : array-like of shape ``shape``
        scales : array-like of the shape of ``scales``, default=None
            New scales (finite, >= 0), stored in this tensor's scale dtype
            (with a :attr:`scale_layout`, rounded up onto its compact grid);
            ``None`` keeps this tensor's.

        Returns
        -------
        QuantizedTensor
            Same zero points and scales (or ``scales``), codes of ``W`` by
            round-to-nearest.
        """
        W = np.asarray(W, dtype=np.float64)
        if W.shape != self.shape:
            raise ValueError(f"W must have shape {self.shape}, got {W.shape}")
        if scales is None:
            scales = self.scales.copy()
        else:
            wide = np.asarray(scales, dtype=np.float64)
            if wide.shape != self.scales.shape or not (
                np.isfinite(wide).all() and (wide >= 0).all()
            ):
                raise ValueError(
                    f"scales must be finite, >= 0 and of shape {self.scales.shape}, "
                    f"got shape {wide.shape}"
                )
            scales = wide.astype(self.scales.dtype)
            if not np.isfinite(scales).all():
                raise ValueError(
                    f"scales must be finite in {self.scales.dtype}, got "
                    f"{float(wide.max())!r}"
                )
            if self.scale_layout is not None:
                scales = snap_scales(np.maximum(wide, scales), self.scale_layout)
        lines, length = self._lines
        M = W if self.axis == 1 else W.T
        groups = M.reshape(-1, self.group_size)
        codes = _encode(
            groups, scales.reshape(-1), self._zeros_or_mid().reshape(-1), self.bits
        )
        return QuantizedTensor._from_codes(
            codes.reshape(lines, length),
            scales,
            None if self.zeros is None else self.zeros.copy(),
            self.shape,
            self.bits,
            self.group_size,
            self.axis,
            self.scale_layout,
        )

    # -- state
    def to_state(self, prefix=""):
        """A flat dict of numpy arrays, for a safetensors file.

        Parameters
        ----------
        prefix : str, default=""
            Prepended to the keys ``codes``, ``scales``, ``zeros`` (absent for a
            symmetric grid) and ``meta`` (int64: bits, group_size, axis, rows,
            cols). Integer zero points are packed at ``bits`` bits, as the
            codes are (a zero point lies in ``0 .. 2**bits - 1``): 1-D, where
            float16 ones keep the shape of the scales. :meth:`from_state`
            reads integer zero points a byte each as well. Compact scales
            (a :attr:`scale_layout`) are stored as ``scale_codes`` (uint8)
            and ``scale_exponents`` (int8) instead of ``scales``, and the
            layout as a sixth entry of ``meta``.

        Returns
        -------
        state : dict of str to ndarray
        """
        meta = [self.bits, self.group_size, self.axis, *self.shape]
        state = {prefix + "codes": self.codes, prefix + "scales": self.scales}
        if self.scale_layout is not None:
            del state[prefix + "scales"]
            codes, exps = split_scales(self.scales, self.scale_layout)
            state[prefix + "scale_codes"], state[prefix + "scale_exponents"] = (
                codes,
                exps,
            )
            meta.append(self.scale_layout)
        state[prefix + "meta"] = np.array(meta, dtype=np.int64)
        if self.zeros is not None:
            state[prefix + "zeros"] = self._stored_zeros()
        return state

    @classmethod
    def from_state(cls, state, prefix=""):
        """Rebuild from :meth:`to_state`, validating every entry (untrusted input).

        Parameters
        ----------
        state : mapping of str to array (numpy arrays or CPU torch tensors)
        prefix : str, default=""

        Returns
        -------
        QuantizedTensor

        Raises
        ------
        ValueError
            If an entry is missing or unexpected, or has the wrong dtype or
            shape, or ``bits`` is not supported.
        """
        keys = {k[len(prefix) :] for k in state if k.startswith(prefix)}
        compact = "scale_codes" in keys or "scale_exponents" in keys
        scale_keys = {"scale_codes", "scale_exponents"} if compact else {"scales"}
        missing = ({"codes", "meta"} | scale_keys) - keys
        if missing:
            raise ValueError(f"state lacks {sorted(prefix + k for k in missing)}")
        unexpected = keys - {"codes", "meta", "zeros"} - scale_keys
        if unexpected:
            raise ValueError(
                f"unexpected entries {sorted(prefix + k for k in unexpected)}"
            )

        def arr(key):
            value = state[prefix + key]
            if hasattr(value, "detach"):  # a torch tensor
                value = value.detach().cpu().numpy()
            return np.asarray(value)

        meta = arr("meta")
        n_meta = _META_LEN + compact
        if meta.dtype.kind not in "iu" or meta.shape != (n_meta,):
            raise ValueError(
                f"{prefix}meta must be {n_meta} integers (bits, group_size, axis, "
                f"rows, cols{', scale layout' if compact else ''}), got "
                f"{meta.dtype} {meta.shape}"
            )
        bits, group_size, axis, rows, cols = (int(v) for v in meta[:_META_LEN])
        layout = check_scale_layout(int(meta[-1])) if compact else None
        if compact:
            scales = join_scales(arr("scale_codes"), arr("scale_exponents"), layout)
        else:
            scales = arr("scales")
        zeros = arr("zeros") if "zeros" in keys else None
        packed = _packed_len(scales.size, bits) if bits in SUPPORTED_BITS else -1
        if (
            zeros is not None
            and zeros.dtype == np.uint8
            and zeros.shape == (packed,)
            and bits < 8
        ):  # integer zero points packed at `bits` bits (an earlier kflats
            # wrote them a byte each, in the shape of the scales)
            zeros = unpack_codes(zeros, bits, scales.size).reshape(scales.shape)
        return cls(
            arr("codes"),
            scales,
            zeros,
            (rows, cols),
            bits,
            group_size,
            axis,
            layout,
        )

    def __repr__(self):
        return (
            f"QuantizedTensor(shape={self.shape}, bits={self.bits}, "
            f"group_size={self.group_size}, axis={self.axis}, nbytes={self.nbytes})"
        )
