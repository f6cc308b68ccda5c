"""The bytes a quantized matrix is stored in, before it is quantized."""

import numpy as np

from ._grid import (
    _check_axis,
    _packed_len,
    check_bits,
    check_group_size,
    check_scale_dtype,
    check_zero_dtype,
)
from ._scales import check_scale_layout, compact_nbytes

__all__ = ["quantized_nbytes"]


def quantized_nbytes(
    shape,
    bits,
    group_size,
    *,
    axis=1,
    symmetric=False,
    scale_dtype="float16",
    zero_dtype="uint8",
    scale_layout=None,
):
    """Bytes a :class:`QuantizedTensor` of this shape takes, without building it.

    Parameters
    ----------
    shape : (int, int)
    bits : int
        One of 2, 3, 4, 5, 6, 8.
    group_size : int or None
    axis : {0, 1}, default=1
    symmetric : bool, default=False
    scale_dtype : {"float16", "float32"}, default="float16"
    zero_dtype : {"uint8", "float16"}, default="uint8"
        Of the zero points (none stored when ``symmetric``).
    scale_layout : {None, 0, 1}, default=None
        Compact scales along the lines (0) or along each line (1), as
        :class:`QuantizedTensor`'s: a byte a group and a byte each 8 groups.
        ``compact_scales=True`` gives 1 in :func:`quantize` and in
        :func:`quantize_calibrated` along the columns (``axis=0``), 0 in
        :func:`quantize_calibrated` along the rows.

    Returns
    -------
    nbytes : int

    Examples
    --------
    >>> from kflats.quantize import quantized_nbytes
    >>> quantized_nbytes((384, 1536), bits=4, group_size=32)  # codes, scales, zeros
    340992
    >>> quantized_nbytes((384, 1536), bits=4, group_size=32, zero_dtype="float16")
    368640
    >>> quantized_nbytes((384, 1536), bits=4, group_size=32, scale_layout=1)
    324864
    """
    bits = check_bits(bits)
    axis = _check_axis(axis)
    lines, length = (int(shape[0]), int(shape[1]))[:: 1 if axis == 1 else -1]
    g = check_group_size(group_size, length, "the line length ({})")
    n_groups = lines * (length // g)
    scale = np.dtype(check_scale_dtype(scale_dtype)).itemsize
    layout = check_scale_layout(scale_layout)
    scales = n_groups * scale
    if layout is not None:
        if scale != 2:
            raise ValueError("scale_layout needs scale_dtype='float16'")
        scales = compact_nbytes((lines, length // g), layout)
    zeros = 0 if symmetric else np.dtype(check_zero_dtype(zero_dtype)).itemsize
    if zeros == 1 and bits < 8:  # integer zero points, packed at `bits` bits
        zeros = _packed_len(n_groups, bits)
    else:
        zeros *= n_groups
    return _packed_len(lines * length, bits) + scales + zeros
