"""ONNX pieces written by hand: a node builder, and each matrix in its ONNX form.

A matrix that multiplies (``y = x @ M``) or is gathered from (``y =
T[ids]``) is either float32 or a :class:`~kflats.quantize.QuantizedTensor`.
A quantized one keeps kflats' own codes, scales (in their own dtype; a
float16 scale is cast to float32 exactly) and zero points, re-packed into
the layout of the operator that holds it, never rounded again:

- ``MatMulNBits`` (onnxruntime's com.microsoft domain): groups along the
  product's K, blocks a power of two from 16 (a group that is a multiple of
  one, a whole row of 384 say, is cut into blocks repeating its scale and
  zero point). With float32 activations (``accuracy_level`` below 4, the
  default) 2-, 3- and 4-bit codes, held as 4 bits (the same integers, so
  the same values); with int8 activations (4) also 2 and 8 bits, 3 widened
  to 4, 5 and 6 to 8.
- ``GatherBlockQuantized``: a table's rows, groups along each row, the same
  blocks and widths.
- written out, ``(codes - zeros) * scales`` by Cast, Sub and Mul on the
  packed codes, which onnxruntime folds into a float32 weight when the
  session starts: a matrix the operators cannot take (groups along the
  product's output side, as a factor's are; a group no block divides; 5, 6
  or 8 bits with float32 activations); a table's rows are gathered first and
  dequantized by ``DequantizeLinear``.
- float32: a table grouped along its columns (kflats groups along rows).

Every choice is recorded as a :class:`TensorForm`, and those that are not
the operator's own form say why.
"""

from dataclasses import dataclass

import numpy as np

__all__ = ["MS_DOMAIN", "Pieces", "TensorForm"]

MS_DOMAIN = "com.microsoft"
_NBITS = {2: 2, 3: 4, 4: 4, 5: 8, 6: 8, 8: 8}  # the operators' widths holding each
# MatMulNBits with float32 activations (accuracy_level below 4): onnxruntime's
# CPU kernel runs 2- and 8-bit weights by dequantizing the whole matrix at
# each call (10-19 ms for a 384 x 1536 weight at 12 rows, against 0.17 ms in
# float32 and 0.18 ms at 4 bits; onnxruntime 1.32, AVX2): 2-bit codes are
# widened to 4 bits there, and 5-, 6- and 8-bit codes are dequantized when the
# session starts (a DequantizeLinear there would be fused into a MatMulNBits
# with int8 activations, onnxruntime's session default).
_NBITS_FLOAT = {2: 4, 3: 4, 4: 4}
_MIN_BLOCK = 16


@dataclass(frozen=True)
class TensorForm:
    """What one quantized matrix of the folder became in the ONNX model.

    Attributes
    ----------
    name : str
        The parameter's qualified name in the folder's model.
    shape : tuple of int
    bits, group_size : int
        As the folder stores it.
    op : str
        ``"MatMulNBits"``, ``"GatherBlockQuantized"``, ``"MatMul"`` (codes
        dequantized when the session starts), ``"DequantizeLinear"`` (a
        table's rows gathered, then dequantized) or ``"float32"``.
    onnx_bits, block_size : int or None
        The codes' stored width and the block (or group) of the operator
        (None for float32).
    fallback : str or None
        Why this is not the operator's own form of the folder's codes
        (``None`` when it is). The values are the folder's in every case.
    """

    name: str
    shape: tuple
    bits: int
    group_size: int
    op: str
    onnx_bits: int | None
    block_size: int | None
    fallback: str | None = None

    def to_dict(self):
        return {
            "name": self.name,
            "shape": list(self.shape),
            "bits": self.bits,
            "group_size": self.group_size,
            "op": self.op,
            "onnx_bits": self.onnx_bits,
            "block_size": self.block_size,
            "fallback": self.fallback,
        }


def pack_lines(codes, bits):
    """Codes (..., L) packed along the last axis, low bits first (2, 4, 8 bits)."""
    codes = np.asarray(codes, dtype=np.uint8)
    if bits == 8:
        return np.ascontiguousarray(codes)
    per = 8 // bits
    pad = (-codes.shape[-1]) % per
    if pad:
        codes = np.pad(codes, [(0, 0)] * (codes.ndim - 1) + [(0, pad)])
    grouped = codes.reshape(*codes.shape[:-1], -1, per)
    out = np.zeros(grouped.shape[:-1], dtype=np.uint8)
    for i in range(per):
        out |= grouped[..., i] << np.uint8(i * bits)
    return out


def unpack_lines(packed, bits, length):
    """The ``length`` codes of each line that :func:`pack_lines` packed."""
    packed = np.asarray(packed, dtype=np.uint8)
    if bits == 8:
        return packed[..., :length].copy()
    per = 8 // bits
    mask = np.uint8((1 << bits) - 1)
    parts = [(packed >> np.uint8(i * bits)) & mask for i in range(per)]
    codes = np.stack(parts, axis=-1).reshape(*packed.shape[:-1], -1)
    return codes[..., :length]


def _block(group):
    """The operators' block for a group: a power of two >= 16 dividing it, or None."""
    block = group & -group  # the largest power of two dividing it
    return block if block >= _MIN_BLOCK else None


def _cut(group, block):
    return f"groups of {group} cut into blocks of {block} (scales repeated)"


def _parts(qt):
    """(codes, scales, zeros) as (lines, length) arrays; zeros never None.

    The scales in the folder's own dtype (float16 or float32).
    """
    codes = qt.unpacked_codes()
    scales = qt.scales
    if qt.zeros is None:  # a symmetric grid: its zero point is the middle
        zeros = np.full(qt.scales.shape, 1 << (qt.bits - 1), dtype=np.uint8)
    else:  # integers (uint8), or float16 values, kept as they are
        zeros = np.asarray(qt.zeros)
    return codes, scales, zeros


def _float_zeros(qt):
    """Whether the zero points are float16 values (a grid on each group's own
    range), which the operators' packed zero points cannot hold."""
    return qt.zeros is not None and qt.zeros.dtype != np.uint8


class Pieces:
    """Nodes and initializers of the hand-written parts of the graph.

    Names are unique within the model: each starts with the qualified name
    of the module it belongs to.
    """

    def __init__(self, accuracy_level=0):
        self.accuracy_level = accuracy_level
        self.nodes = []
        self.initializers = []
        self.forms = []
        self._names = set()

    def reserve(self, names):
        """Names the graph already uses, which no piece may take."""
        self._names.update(names)

    def name(self, base):
        name, i = base, 0
        while name in self._names:
            i += 1
            name = f"{base}_{i}"
        self._names.add(name)
        return name

    def const(self, base, array):
        """An initializer holding ``array``; its name."""
        from onnx import numpy_helper

        name = self.name(base)
        self.initializers.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def scales(self, base, scales):
        """Float32 scales: stored in the folder's dtype, a float16 one cast (exactly).

        onnxruntime folds the cast of an initializer once, when the session
        is made: the file holds the folder's bytes, the operators read float32.
        """
        name = self.const(base, np.ascontiguousarray(scales))
        if scales.dtype == np.float32:
            return name
        return self.node("Cast", [name], base, to=1)  # FLOAT

    def node(self, op, inputs, base, *, domain=None, outputs=None, **attrs):
        """Add a node; the name of its (first) output."""
        from onnx import helper

        outputs = outputs or [self.name(f"{base}/{op}")]
        self.nodes.append(
            helper.make_node(
                op,
                inputs,
                outputs,
                name=self.name(f"{base}/{op}_node"),
                domain=domain,
                **attrs,
            )
        )
        return outputs[0]

    def _form(self, name, qt, op, onnx_bits, block, why):
        self.forms.append(
            TensorForm(
                name,
                tuple(qt.shape),
                qt.bits,
                qt.group_size,
                op,
                onnx_bits,
                block,
                why,
            )
        )

    # -- y = x @ M ------------------------------------------------------------

    def matmul(self, x, matrix, name, *, transpose=False, bias=None):
        """``x @ M (+ bias)``, M the matrix (float array or QuantizedTensor) or
        its transpose; the output's name.

        ``name`` is the parameter's qualified name (the initializers' prefix).
        """
        if not hasattr(matrix, "unpacked_codes"):
            M = np.asarray(matrix, dtype=np.float32)
            y = self.node(
                "MatMul", [x, self.const(name, M.T if transpose else M)], name
            )
            return y if bias is None else self.node("Add", [y, bias], name)
        qt = matrix
        along_k = (qt.axis == 1) == transpose
        block = _block(qt.group_size) if along_k else None
        widths = _NBITS if self.accuracy_level >= 4 else _NBITS_FLOAT
        if block is not None and qt.bits in widths and not _float_zeros(qt):
            return self._matmul_nbits(x, qt, name, block, widths[qt.bits], bias)
        if _float_zeros(qt):
            why = "float16 zero points, which MatMulNBits' packed ones cannot hold"
        elif not along_k:
            why = "groups along the product's output side (N), which MatMulNBits "
            why += "cannot take"
        elif block is None:
            why = f"groups of {qt.group_size}: no block of MatMulNBits (a power of "
            why += "two from 16) divides them"
        else:
            why = f"{qt.bits}-bit MatMulNBits is slow with float32 activations, and "
            why += "a DequantizeLinear would be fused into one with int8 activations"
        W = self._dequantized(qt, name, why)  # (lines, length)
        if along_k:  # the lines are M's columns
            W = self.node("Transpose", [W], name, perm=[1, 0])
        y = self.node("MatMul", [x, W], name)
        return y if bias is None else self.node("Add", [y, bias], name)

    def _matmul_nbits(self, x, qt, name, block, bits, bias):
        codes, scales, zeros = _parts(qt)  # (N, K), (N, K / g)
        n, k = codes.shape
        repeat = qt.group_size // block
        scales = np.repeat(scales, repeat, axis=1)
        zeros = np.repeat(zeros, repeat, axis=1)
        blocks = k // block
        B = pack_lines(codes.reshape(n, blocks, block), bits)
        inputs = [x, self.const(f"{name}.codes", B)]
        inputs.append(self.scales(f"{name}.scales", scales))
        symmetric_default = qt.zeros is None and bits == qt.bits
        zp = (
            ""
            if symmetric_default
            else self.const(f"{name}.zeros", pack_lines(zeros, bits))
        )
        inputs += [zp, "", bias or ""]
        while inputs[-1] == "":
            inputs.pop()
        why = []
        if bits != qt.bits:
            why.append(f"{qt.bits}-bit codes widened to {bits} bits (same values)")
        if repeat > 1:
            why.append(_cut(qt.group_size, block))
        self._form(name, qt, "MatMulNBits", bits, block, "; ".join(why) or None)
        level = {"accuracy_level": self.accuracy_level} if self.accuracy_level else {}
        return self.node(
            "MatMulNBits",
            inputs,
            name,
            domain=MS_DOMAIN,
            K=k,
            N=n,
            bits=bits,
            block_size=block,
            **level,
        )

    def _dequantized(self, qt, name, why):
        """The matrix's lines, ``(codes - zeros) * scales``, written out in the graph.

        Every input is an initializer, so onnxruntime folds these operators
        into one float32 weight when the session starts: the file holds the
        packed codes, the product runs in float32 (onnxruntime keeps a
        DequantizeLinear of a weight instead, and runs it at every call).
        """
        codes, scales, zeros = _parts(qt)  # (lines, length), (lines, groups)
        lines, length = codes.shape
        g = qt.group_size
        bits = _NBITS[qt.bits]
        packed = self.const(f"{name}.codes", pack_lines(codes, bits))
        q = self._unpacked(packed, bits, length, np.array([lines]), name)
        grid = (lines, length // g, 1)
        q = self.node("Cast", [q], name, to=1)  # FLOAT
        q = self.node(
            "Reshape",
            [q, self.const(f"{name}.grouped", np.array([lines, length // g, g]))],
            name,
        )
        zero = self.node(
            "Cast", [self.const(f"{name}.zeros", zeros.reshape(grid))], name, to=1
        )
        scale = self.scales(f"{name}.scales", scales.reshape(grid))
        W = self.node("Mul", [self.node("Sub", [q, zero], name), scale], name)
        if bits != qt.bits:
            why += f"; {qt.bits}-bit codes stored as {bits}-bit (same values)"
        self._form(
            name, qt, "MatMul", bits, g, why + "; dequantized when the session starts"
        )
        return self.node(
            "Reshape", [W, self.const(f"{name}.shape", np.array([lines, length]))], name
        )

    def _unpacked(self, packed, bits, length, lead, name):
        """Codes packed along the last axis (:func:`pack_lines`) as uint8 codes.

        ``lead``: the leading dimensions (the dimensions themselves, or a
        function giving a 1-D int64 tensor's name).
        """
        if bits == 8:
            return packed
        if callable(lead):
            lead = lead()
        else:
            lead = self.const(f"{name}.lead", np.asarray(lead, dtype=np.int64))
        per = 8 // bits
        # each byte's codes, low bits first, read from a table of the 256 bytes
        byte = np.arange(256)[:, None] >> (np.arange(per) * bits)
        table = (byte & ((1 << bits) - 1)).astype(np.uint8)  # (256, per)
        index = self.node("Cast", [packed], name, to=6)  # INT32
        table = self.const(f"{name}.unpacking", table)
        both = self.node("Gather", [table, index], name, axis=0)  # (.., bytes, per)
        width = -(-length * bits // 8) * per
        shape = self.const(f"{name}.width", np.array([width]))
        shape = self.node("Concat", [lead, shape], name, axis=0)
        codes = self.node("Reshape", [both, shape], name)
        if width == length:
            return codes
        start = self.const(f"{name}.start", np.array([0]))
        stop = self.const(f"{name}.stop", np.array([length]))
        last = self.const(f"{name}.last", np.array([-1]))
        return self.node("Slice", [codes, start, stop, last], name)

    # -- y = T[ids] ----------------------------------------------------------

    def gather(self, ids, table, name, *, zero_row=False, lead=None):
        """Rows of a table (float array or QuantizedTensor) at ``ids``.

        ``zero_row``: an index equal to the number of rows gives zeros (a
        quantized table gives zeros for any index out of range; a float one
        is given a row of zeros at its end). ``lead``: a function giving
        ``Shape(ids)``'s name, where the caller shares one.
        """
        if hasattr(table, "unpacked_codes") and _float_zeros(table):
            why = "float16 zero points, which GatherBlockQuantized cannot take"
            self._form(name, table, "float32", None, None, f"{why}; dequantized")
            table = table.dequantize()
        if hasattr(table, "unpacked_codes"):
            qt = table
            if qt.axis == 1:
                block = _block(qt.group_size)
                if block is not None:
                    return self._gather_quantized(ids, qt, name, block)
                return self._gather_dequantized(ids, qt, name, zero_row, lead)
            why = (
                "groups along the table's columns, which GatherBlockQuantized "
                "cannot take; dequantized"
            )
            self._form(name, qt, "float32", None, None, why)
            table = qt.dequantize()
        T = np.asarray(table, dtype=np.float32)
        if zero_row:
            T = np.concatenate([T, np.zeros((1, T.shape[1]), np.float32)])
        return self.node("Gather", [self.const(name, T), ids], name, axis=0)

    def _gather_quantized(self, ids, qt, name, block):
        codes, scales, zeros = _parts(qt)  # (rows, d), (rows, d / g)
        bits = _NBITS[qt.bits]
        repeat = qt.group_size // block
        scales = np.repeat(scales, repeat, axis=1)
        zeros = np.repeat(zeros, repeat, axis=1)
        why = []
        if bits != qt.bits:
            why.append(f"{qt.bits}-bit codes widened to {bits} bits (same values)")
        if repeat > 1:
            why.append(_cut(qt.group_size, block))
        self._form(
            name, qt, "GatherBlockQuantized", bits, block, "; ".join(why) or None
        )
        return self.node(
            "GatherBlockQuantized",
            [
                self.const(f"{name}.codes", pack_lines(codes, bits)),
                ids,
                self.scales(f"{name}.scales", scales),
                self.const(f"{name}.zeros", pack_lines(zeros, bits)),
            ],
            name,
            domain=MS_DOMAIN,
            bits=bits,
            block_size=block,
            gather_axis=0,
            quantize_axis=1,
        )

    def _gather_dequantized(self, ids, qt, name, zero_row, lead):
        """The rows' packed codes gathered, unpacked, then ``DequantizeLinear``."""
        codes, scales, zeros = _parts(qt)  # (rows, d), (rows, d / g)
        bits = _NBITS[qt.bits]
        if zero_row:  # codes, zero point and scale 0: a row of zeros
            codes, scales, zeros = (
                np.concatenate([a, np.zeros((1, a.shape[1]), a.dtype)])
                for a in (codes, scales, zeros)
            )
        d = codes.shape[1]
        packed = self.const(f"{name}.codes", pack_lines(codes, bits))
        rows = self.node("Gather", [packed, ids], name, axis=0)  # (.., d * bits / 8)
        if lead is None:
            lead = lambda: self.node("Shape", [ids], name)  # noqa: E731
        rows = self._unpacked(rows, bits, d, lead, name)
        scale = self.node(
            "Gather", [self.scales(f"{name}.scales", scales), ids], name, axis=0
        )
        zero = self.node(
            "Gather", [self.const(f"{name}.zeros", zeros), ids], name, axis=0
        )
        why = (
            f"groups of {qt.group_size}: no block of GatherBlockQuantized (a power of "
            "two from 16) divides them; the rows' codes gathered, then dequantized"
        )
        if bits != qt.bits:
            why += f"; {qt.bits}-bit codes stored as {bits}-bit (same values)"
        self._form(name, qt, "DequantizeLinear", bits, qt.group_size, why)
        return self.node(
            "DequantizeLinear",
            [rows, scale, zero],
            name,
            axis=-1,
            block_size=qt.group_size,
        )
