"""The ONNX form of each module a slot stands for, built from its own tensors.

- a Linear: ``x @ W^T + b``, one ``MatMulNBits`` (bias included) for a
  quantized weight where its groups allow it, a float32 ``MatMul`` and
  ``Add`` for a float one (as torch's exporter writes it);
- an Embedding: ``GatherBlockQuantized`` for a quantized table, a
  ``Gather`` for a float one;
- a :class:`~kflats.torch.ProjectiveLinear` as its factor products, as
  :mod:`kflats.torch.functional` computes them: input features clustered,
  each cluster's features gathered (``Gather``) through its coefficients,
  the results concatenated through the stacked bases; output neurons
  clustered (and a :class:`~kflats.torch.ProjectiveTiedHead`, with its
  embedding's factors), the stacked bases first, each cluster's slice
  through its coefficients, the neurons put back in order (``Gather``);
- a :class:`~kflats.torch.ProjectiveEmbedding`: each token's cluster and
  row read from two small tables, each cluster's coefficients gathered (a
  token of another cluster gets zeros), concatenated through the stacked
  bases (``k`` times the flops of the cluster's own product, on an
  embedding's few tokens).

Each factor, quantized or float, goes through :class:`~._graph.Pieces`,
which picks its operator.
"""

import numpy as np
from torch import nn

from kflats.torch.layers import (
    ProjectiveEmbedding,
    ProjectiveLinear,
    ProjectiveTiedHead,
)

__all__ = ["build_module"]


def _np(tensor):
    return tensor.detach().cpu().float().numpy()


def _order_and_place(module):
    """Rows ordered by cluster (ascending within one), and each row's place."""
    labels = module.labels.cpu().numpy()
    order = np.argsort(labels, kind="stable")
    place = np.empty_like(order)
    place[order] = np.arange(order.size)
    return order, place


def _factor(tensors, key, value):
    """A factor as its QuantizedTensor, or its float values."""
    return tensors[key] if key in tensors else _np(value)


def _coefficients(module, tensors, c):
    return _factor(tensors, f"coefficients.{c}", module.coefficients[c])


def _slice_last(p, x, start, stop, name):
    """``x[..., start:stop]``."""
    bounds = [p.const(f"{name}.{what}", np.array([v])) for what, v in
              (("start", start), ("stop", stop), ("axis", -1))]  # fmt: skip
    return p.node("Slice", [x, *bounds], name)


def _zeros(p, like, width, name):
    """Zeros of shape ``(*like.shape[:-1], width)`` (float ``like``)."""
    first = _slice_last(p, like, 0, 1, name)
    zeros = p.const(f"{name}.zeros", np.zeros((1, width), np.float32))
    return p.node("MatMul", [first, zeros], name)


def _bias(p, module, name):
    bias = getattr(module, "bias", None)
    return None if bias is None else p.const(f"{name}.bias", _np(bias))


def _output_side(p, x, name, sizes, ranks, coefficient, bases, means, place, bias):
    """``y[R_c] = U_c (V_c x) (+ mu_c . x) + b``, neurons put back in order."""
    k = len(ranks)
    z = p.matmul(x, bases, f"{name}.bases", transpose=True)  # (.., R)
    offsets = None
    if means is not None:
        offsets = p.matmul(x, means, f"{name}.means", transpose=True)  # (.., k)
    outs, start = [], 0
    for c in range(k):
        r, n = ranks[c], sizes[c]
        if n == 0:
            start += r
            continue
        if r == 0:
            y = _zeros(p, x, n, f"{name}.empty.{c}")
        else:
            zc = z if k == 1 else _slice_last(p, z, start, start + r, f"{name}.z.{c}")
            own_bias = bias if k == 1 and offsets is None else None
            y = p.matmul(zc, coefficient(c), f"{name}.coefficients.{c}", transpose=True,
                         bias=own_bias)  # fmt: skip
            if own_bias is not None:
                return y
        if offsets is not None:
            y = p.node(
                "Add", [y, _slice_last(p, offsets, c, c + 1, f"{name}.mu.{c}")], name
            )
        outs.append(y)
        start += r
    y = outs[0] if len(outs) == 1 else p.node("Concat", outs, name, axis=-1)
    if k > 1:
        y = p.node("Gather", [y, p.const(f"{name}.positions", place)], name, axis=-1)
    return y if bias is None else p.node("Add", [y, bias], name)


def _input_side(p, x, module, tensors, name):
    """``y = sum_c (x[R_c] @ U_c) @ V_c (+ x[R_c] . 1 mu_c) + b``."""
    order, _ = _order_and_place(module)
    sizes, ranks, k = module.sizes, module.ranks, module.k
    identity = k == 1 and np.array_equal(order, np.arange(order.size))
    parts, sums, start = [], [], 0
    for c in range(k):
        n, r = sizes[c], ranks[c]
        if n == 0:
            if r:
                parts.append(_zeros(p, x, r, f"{name}.empty.{c}"))
            sums.append(None)
            continue
        xc = x
        if not identity:
            rows = order[start : start + n]
            xc = p.node(
                "Gather", [x, p.const(f"{name}.features.{c}", rows)], name, axis=-1
            )
        if r:
            U = _coefficients(module, tensors, c)
            parts.append(p.matmul(xc, U, f"{name}.coefficients.{c}"))
        if module.means is not None:
            axes = p.const(f"{name}.axes", np.array([-1]))
            sums.append(p.node("ReduceSum", [xc, axes], name, keepdims=1))
        start += n
    bias = _bias(p, module, name)
    bases = _factor(tensors, "bases", module.bases)
    z = parts[0] if len(parts) == 1 else p.node("Concat", parts, name, axis=-1)
    if module.means is None:
        return p.matmul(z, bases, f"{name}.bases", bias=bias)
    y = p.matmul(z, bases, f"{name}.bases")
    sums = [s if s is not None else _zeros(p, x, 1, f"{name}.nosum") for s in sums]
    S = sums[0] if k == 1 else p.node("Concat", sums, name, axis=-1)
    y = p.node("Add", [y, p.matmul(S, _np(module.means), f"{name}.means")], name)
    return y if bias is None else p.node("Add", [y, bias], name)


def _embedding(p, ids, module, tensors, name):
    """A token's row: its cluster's coefficients (zeros in the others') @ bases."""
    sizes, ranks, k = module.sizes, module.ranks, module.k
    labels = module.labels.cpu().numpy()
    bases = _factor(tensors, "bases", module.bases)
    if k == 1:
        coeff = p.gather(
            ids, _coefficients(module, tensors, 0), f"{name}.coefficients.0"
        )
        y = p.matmul(coeff, bases, f"{name}.bases")
        if module.means is not None:
            y = p.node("Add", [y, p.const(f"{name}.means", _np(module.means)[0])], name)
        return y
    _, place = _order_and_place(module)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    within = (place - starts[labels.astype(np.int64)]).astype(np.int32)
    label = p.node("Gather", [p.const(f"{name}.labels", labels), ids], name, axis=0)
    row = p.node("Gather", [p.const(f"{name}.rows", within), ids], name, axis=0)
    shape = []  # the ids' shape, made once if a cluster's gather needs it

    def lead():
        shape[:] = shape or [p.node("Shape", [ids], name)]
        return shape[0]

    parts = []
    for c in range(k):
        if ranks[c] == 0:
            continue
        if sizes[c] == 0:  # bases without tokens: zeros through them
            nought = p.node("Mul", [ids, p.const(f"{name}.nought", np.array(0))], name)
            zeros = np.zeros((1, ranks[c]), np.float32)
            parts.append(p.gather(nought, zeros, f"{name}.empty.{c}"))
            continue
        mine = p.node(
            "Equal", [label, p.const(f"{name}.cluster.{c}", labels.dtype.type(c))], name
        )
        rows = p.node(
            "Where",
            [mine, row, p.const(f"{name}.outside.{c}", np.int32(sizes[c]))],
            name,
        )
        U = _coefficients(module, tensors, c)
        parts.append(
            p.gather(rows, U, f"{name}.coefficients.{c}", zero_row=True, lead=lead)
        )
    coeff = parts[0] if len(parts) == 1 else p.node("Concat", parts, name, axis=-1)
    y = p.matmul(coeff, bases, f"{name}.bases")
    if module.means is not None:
        which = p.node("Cast", [label], name, to=7)  # int64
        mu = p.node(
            "Gather", [p.const(f"{name}.means", _np(module.means)), which], name, axis=0
        )
        y = p.node("Add", [y, mu], name)
    return y


def build_module(p, x, name, module, tensors, slots):
    """The ONNX form of one slotted module applied to ``x``; its output's name.

    Parameters
    ----------
    p : kflats.torch.export._graph.Pieces
    x : str
        The name of the module's input in the graph.
    name : str
        The module's qualified name.
    module : torch.nn.Module
    tensors : dict of str to QuantizedTensor
        The module's quantized tensors, by name within it.
    slots : dict
        Every slotted module, ``name -> (module, tensors)`` (a tied head
        reads its embedding's).
    """
    if isinstance(module, ProjectiveTiedHead):
        emb = module.embedding
        owner = next((n for n, (m, _) in slots.items() if m is emb), None)
        if owner is None:
            raise ValueError(
                f"{name!r}: the embedding of this tied head is not part of the model"
            )
        emb_tensors = slots[owner][1]
        return _output_side(
            p, x, owner, emb.sizes, emb.ranks,
            lambda c: _coefficients(emb, emb_tensors, c),
            _factor(emb_tensors, "bases", emb.bases),
            None if emb.means is None else _np(emb.means),
            _order_and_place(emb)[1], _bias(p, module, name),
        )  # fmt: skip
    if isinstance(module, ProjectiveLinear):
        if module.side == "input":
            return _input_side(p, x, module, tensors, name)
        return _output_side(
            p, x, name, module.sizes, module.ranks,
            lambda c: _coefficients(module, tensors, c),
            _factor(tensors, "bases", module.bases),
            None if module.means is None else _np(module.means),
            _order_and_place(module)[1], _bias(p, module, name),
        )  # fmt: skip
    if isinstance(module, ProjectiveEmbedding):
        return _embedding(p, x, module, tensors, name)
    if isinstance(module, nn.Linear):
        return p.matmul(x, _factor(tensors, "weight", module.weight), f"{name}.weight",
                        transpose=True, bias=_bias(p, module, name))  # fmt: skip
    if isinstance(module, nn.Embedding):
        if module.max_norm is not None:
            raise ValueError(
                f"{name!r}: an Embedding with max_norm renormalises its rows; "
                "kflats export cannot write it"
            )
        return p.gather(x, _factor(tensors, "weight", module.weight), f"{name}.weight")
    raise ValueError(
        f"{name!r} is a {type(module).__name__}; kflats export writes projective "
        "and quantized Linear and Embedding layers (not a shared embedding)"
    )
