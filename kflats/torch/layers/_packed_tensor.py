"""PackedTensor: a quantized matrix held in memory as it is stored, dequantized on use.

A layer loaded packed holds each quantized matrix as this small module, in
the slot of the float parameter it replaces: its buffers are the codes,
scales, zero points and meta that the folder stores under the parameter's
name (``<name>.codes``, ...), so the layer's state dict is the folder's, and
calling it dequantizes the whole matrix (:meth:`PackedTensor.forward`) or
some rows of it (:meth:`PackedTensor.rows`) into a new float tensor that the
caller drops after use.
"""

import numpy as np
import torch
from torch import nn

from kflats.quantize._tensor import QuantizedTensor
from kflats.torch.layers._dequantize import (
    dequantize_matrix,
    dequantize_rows,
    kernel_operands,
)

__all__ = ["PackedTensor"]


class PackedTensor(nn.Module):
    """A quantized matrix as codes, scales and zero points; floats made on call.

    Parameters
    ----------
    codes : uint8 Tensor of shape (n_bytes,)
    scales : float16 or float32 Tensor of shape (lines, groups per line)
    zeros : uint8 or float16 Tensor of the shape of ``scales``, or None
        (symmetric grid)
    meta : int64 Tensor of shape (5,) or (6,)
        bits, group size, axis, rows, cols, and the layout of compact
        scales when they are (see
        :meth:`kflats.quantize.QuantizedTensor.to_state`; their float16
        values are held here).
    dtype : torch.dtype, default=torch.float32
        Of the floats it gives: the dtype of the parameter it stands for.

    Attributes
    ----------
    shape : torch.Size
    bits, group_size, axis : int
    nbytes : int
        Bytes of its buffers (meta included).

    Notes
    -----
    The buffers follow the module to another device but keep their dtypes:
    ``model.half()`` changes :attr:`dtype`, the dtype of the floats made,
    not the stored scales.

    Examples
    --------
    >>> import numpy as np
    >>> from kflats.quantize import quantize
    >>> from kflats.torch.layers import PackedTensor
    >>> qt = quantize(np.arange(64.0).reshape(2, 32), bits=4, group_size=16)
    >>> packed = PackedTensor.from_quantized(qt)
    >>> packed
    PackedTensor(shape=(2, 32), bits=4, group_size=16, axis=1, nbytes=84)
    >>> np.array_equal(packed().numpy(), qt.dequantize())
    True
    >>> sorted(packed.state_dict())
    ['codes', 'meta', 'scales', 'zeros']
    """

    def __init__(self, codes, scales, zeros, meta, dtype=torch.float32):
        super().__init__()
        self.register_buffer("codes", codes)
        self.register_buffer("scales", scales)
        self.register_buffer("zeros", zeros)
        self.register_buffer("meta", meta)
        # a sixth entry: the layout of compact scales (held float16 here)
        bits, group_size, axis, rows, cols, *layout = (int(v) for v in meta.tolist())
        self.bits, self.group_size, self.axis = bits, group_size, axis
        self.scale_layout = layout[0] if layout else None
        self.shape = torch.Size((rows, cols))
        self.dtype = dtype
        self._operands = (None, None)  # (buffers, what a CPU kernel reads of them)

    @classmethod
    def from_quantized(cls, qt, *, dtype=torch.float32, device=None):
        """The packed form of a :class:`~kflats.quantize.QuantizedTensor`.

        On the CPU the buffers share the tensor's arrays (no copy).
        """
        # the zero points a byte each, in the shape of the scales (a file
        # packs integer ones at `bits` bits: the kernels read them as bytes)
        meta = [qt.bits, qt.group_size, qt.axis, *qt.shape]
        if qt.scale_layout is not None:
            meta.append(qt.scale_layout)
        meta = np.array(meta, dtype=np.int64)

        def tensor(value):
            return None if value is None else torch.from_numpy(value).to(device)

        return cls(
            tensor(qt.codes), tensor(qt.scales), tensor(qt.zeros), tensor(meta), dtype
        )

    def quantized_tensor(self):
        """The :class:`~kflats.quantize.QuantizedTensor` of the buffers.

        Its arrays are views of the buffers on the CPU (copies from another
        device).
        """
        zeros = None if self.zeros is None else self.zeros.cpu().numpy()
        return QuantizedTensor(
            self.codes.cpu().numpy(),
            self.scales.cpu().numpy(),
            zeros,
            self.shape,
            self.bits,
            self.group_size,
            self.axis,
            self.scale_layout,
        )

    # a packed matrix is read, never trained (unpack_quantized_ gives floats)
    requires_grad = False

    @property
    def device(self):
        return self.codes.device

    @property
    def nbytes(self):
        return sum(t.numel() * t.element_size() for t in self.buffers())

    def __getstate__(self):
        # the kept views are derived data: a copy or a pickle starts without
        state = self.__dict__.copy()
        state["_operands"] = (None, None)
        return state

    def _tensors(self):
        """The buffers, and the views a CPU kernel reads of them (kept)."""
        buffers = self._buffers
        tensors = (buffers["codes"], buffers["scales"], buffers["zeros"])
        kept, operands = self._operands
        if kept is None or any(a is not b for a, b in zip(kept, tensors, strict=True)):
            operands = kernel_operands(*tensors, self.bits)
            self._operands = (tensors, operands)
        return tensors, operands

    def forward(self):
        """The whole matrix, in :attr:`dtype` (a new tensor at each call)."""
        tensors, operands = self._tensors()
        out = dequantize_matrix(
            *tensors,
            self.bits,
            self.group_size,
            self.axis,
            self.shape,
            operands,
        )
        return out if out.dtype == self.dtype else out.to(self.dtype)

    def rows(self, index):
        """Rows ``index`` (a 1-D integer tensor) of the matrix, in :attr:`dtype`.

        Only their codes are unpacked: an embedding lookup costs the rows it
        reads, not the table.
        """
        index = index.to(torch.int64)
        if index.numel() and (
            int(index.min()) < 0 or int(index.max()) >= self.shape[0]
        ):
            raise IndexError(
                f"index out of range: rows 0..{self.shape[0] - 1}, got values in "
                f"{int(index.min())}..{int(index.max())}"
            )
        tensors, operands = self._tensors()
        out = dequantize_rows(
            *tensors,
            self.bits,
            self.group_size,
            self.axis,
            self.shape,
            index,
            operands,
        )
        return out if out.dtype == self.dtype else out.to(self.dtype)

    def _apply(self, fn, recurse=True):
        # moved with the model, never cast: the buffers are the stored bits
        probe = fn(torch.empty(0, dtype=self.dtype, device=self.codes.device))
        for name, t in self._buffers.items():
            if t is not None:
                moved = fn(t)
                self._buffers[name] = (
                    moved if moved.dtype == t.dtype else t.to(moved.device)
                )
        if probe.is_floating_point():
            self.dtype = probe.dtype
        self._operands = (None, None)
        return self

    def _load_from_state_dict(self, state_dict, prefix, *args):
        super()._load_from_state_dict(state_dict, prefix, *args)
        expected = [self.bits, self.group_size, self.axis, *self.shape]
        if self.scale_layout is not None:
            expected.append(self.scale_layout)
        if self.meta.tolist() != expected:
            self.meta.copy_(torch.tensor(expected))
            error_msgs = args[-1]
            error_msgs.append(
                f"{prefix}meta: a PackedTensor keeps its form (bits, group size, "
                f"axis, shape) {expected}; load a state of that form"
            )

    def extra_repr(self):
        return (
            f"shape={tuple(self.shape)}, bits={self.bits}, group_size="
            f"{self.group_size}, axis={self.axis}, nbytes={self.nbytes}"
        )
