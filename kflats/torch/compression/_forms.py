"""The forms of one module under a budget in bytes: which exist, and their sizes.

A selected module may be stored as:

- ``"float"``: kept as it is (float32), error 0;
- ``"dense"`` at ``b`` bits: its weight quantized group-wise, in the uniform
  peers' groups and in wider ones (:data:`_DENSE_GROUPS`; 5 bits as 4);
- ``"projective"`` with ``k`` clusters at rank ``r``: k = 1 factors, or, for
  a large Embedding, the factors of its rows clustered into ``k`` subspaces,
  stored in float32 or at ``b`` bits.

Sizes in bytes come from the one formula (:func:`kflats.torch.layers.form_nbytes`,
:func:`kflats.torch.layers.factors_nbytes`): what
:func:`kflats.torch.layers.quantized_state` writes. Their errors are measured
in :mod:`._form_errors`. The feasibility of a budget in bytes, a size of the
whole folder (:mod:`._folder_bytes`), is checked here, before anything is
fitted.
The file formats a folder may be exported to, and what each holds, are in
:mod:`._file_formats`.
"""

import fnmatch
import itertools
import math
from typing import NamedTuple

import numpy as np
from torch import nn

from kflats.torch.compression._file_formats import _file_format, _holds_all
from kflats.torch.compression._folder_bytes import factor_side
from kflats.torch.compression._sensitivity import _rows_cols
from kflats.torch.layers import factors_nbytes, form_nbytes

# group sizes of dense matrices by bit width: first those of the uniform
# peers, then wider groups (fewer scales: 4.16 bits a number at 4 bits g128
# against 4.63 at g32); factors use at most _FACTOR_GROUP, their ranks being
# its multiples
_DENSE_GROUPS = {8: (128,), 6: (64, 128), 4: (32, 128), 3: (32, 128), 2: (32,)}
# and at 5 bits, which no uniform peer stores (GGUF does: Q5_0, Q5_1), those
# of 4 bits
_GROUPS = {**_DENSE_GROUPS, 5: _DENSE_GROUPS[4]}
# dense forms whose zero points are float16 (the grid spans each group's own
# range), by bits: their groups. 4 bits in groups of 32 is GGUF's Q4_1
# layout: a model read from such a file keeps its weights as they are
_FLOAT_ZERO_GROUPS = {4: (32,)}
_FACTOR_GROUP = 32
_MIN_GROUP = 8
# float factors: ranks on a grid of about this many steps
_FLOAT_STEPS = 48
# clusters tried by default for an Embedding of at least _CLUSTER_ROWS rows
# (a vocabulary: its rows cluster); other modules take k = 1 factors
_CLUSTERS = 16
_CLUSTER_ROWS = 4096
# factors with k > 1 clusters are stored in float32 or at most this many bits
# (of those searched; all of them when none is as low)
_CLUSTER_BITS = 4


class _Form(NamedTuple):
    """One way to store a module: its size in bytes and its relative error."""

    kind: str  # "float", "dense" or "projective"
    bits: int | None
    group_size: int | None
    rank: int | None
    nbytes: int
    error: float = math.nan
    k: int = 1  # clusters of a projective form
    zero_dtype: str | None = "uint8"  # of a quantized form's zero points;
    # None: a symmetric grid (no zero points stored)
    compact: bool = False  # a quantized form's scales: compact (a byte each
    # under an exponent per 8 groups) or float16


def grid_options(form):
    """The keywords of a quantized form's grid for ``quantize_module_`` and
    ``form_nbytes``: symmetric, or its zero points' dtype; compact scales."""
    grid = {"compact_scales": True} if form.compact else {}
    if form.zero_dtype is None:
        return {**grid, "symmetric": True}
    return {**grid, "zero_dtype": form.zero_dtype}


def _compact_grid(compact, zero_dtype):
    """Whether a quantized grid takes compact scales: where the file format
    stores them, and its zero points are integers or none (float16 zero
    points, a GGUF layout, keep float16 scales)."""
    return compact and zero_dtype != "float16"


def _bias_numel(module):
    bias = getattr(module, "bias", None)
    return 0 if bias is None else bias.numel()


def _group(length, group_size, preferred):
    """The group size of a matrix with rows of ``length`` (``None``: one per row).

    ``group_size`` when given, else ``preferred`` halved until it divides
    ``length`` (at least :data:`_MIN_GROUP`).
    """
    if group_size is not None:
        return group_size
    g = preferred
    while g >= _MIN_GROUP and length % g:
        g //= 2
    return g if g >= _MIN_GROUP else None


def _check_group_size(group_size, names, named):
    """A given group size divides the row length of every selected module."""
    if group_size is None:
        return
    for name in names:
        n, d = _rows_cols(named[name])
        if d % group_size:
            raise ValueError(
                f"group_size={group_size} does not divide the row length of "
                f"{name!r} ({n} x {d}: {d}); give a divisor of every selected "
                "module's in_features / embedding_dim, or group_size=None"
            )


def _factor_forms(
    sizes, d, bits, group_size, bias, k=1, ranks_at=None, scales=(False,), side=None
):
    """Projective forms of clusters of ``sizes`` rows: float, then at each bits.

    A form's rank ``r`` is a level: each cluster's rank at it is
    ``ranks_at(r)`` (default: ``r``, at most the cluster's rows). Quantized
    forms in each of ``scales`` (compact or not: :attr:`_Form.compact`),
    priced for a layer of ``side`` (:func:`~._folder_bytes.factor_side`).
    """
    if ranks_at is None:
        ranks_at = lambda r: _capped(r, sizes)  # noqa: E731
    top = min(sum(sizes), d) if k == 1 else d
    forms = []
    step = max(1, top // _FLOAT_STEPS)
    for r in range(step, top + 1, step):
        size = factors_nbytes(sizes, ranks_at(r), d, None, bias=bias)
        forms.append(_Form("projective", None, None, r, size, k=k))
    # groups of factors: at most a quarter of the largest rank, so that small
    # modules have several ranks to choose from
    cap = min(_FACTOR_GROUP, max(_MIN_GROUP, 1 << max(top // 4, 1).bit_length() - 1))
    for b in bits:
        g = _group(d, group_size, min(_GROUPS[b][0], cap))
        step = g if g is not None else max(1, top // _FLOAT_STEPS)
        for r, compact in itertools.product(range(step, top + 1, step), scales):
            ranks = ranks_at(r)
            grid = {"bias": bias, "compact_scales": compact, "side": side}
            size = factors_nbytes(sizes, ranks, d, b, g if g else None, **grid)
            forms.append(_Form("projective", b, g, r, size, k=k, compact=compact))
    return forms


def _capped(rank, sizes):
    """Each cluster's rank: ``rank``, at most its rows."""
    return [min(rank, s) for s in sizes]


def _shared_ranks(clusters, sizes, d):
    """Each cluster's ranks at every level ``r = 1 ... d`` (index ``r - 1``).

    At level ``r``, the numbers that ranks ``r`` would keep (each cluster at
    most its rows) are shared out among the clusters by truncation error
    removed per number: every step (cluster ``c`` from rank ``q`` to
    ``q + 1``, gaining its ``q``-th eigenvalue for ``n_c + d`` numbers) in one
    order by gain per number, each level a prefix of it. Every cluster keeps
    rank 1 at least; a level keeps the uniform ranks where those remove
    more.
    """
    k = len(clusters)
    cost = np.array([s + d for s in sizes], dtype=np.float64)
    tails = [np.append(np.cumsum(cl.evals[::-1])[::-1], 0.0) for cl in clusters]
    tops = [min(s, d, cl.evals.size) for s, cl in zip(sizes, clusters, strict=True)]
    owner = np.concatenate([np.full(max(t - 1, 0), c) for c, t in enumerate(tops)])
    ratio = np.concatenate(
        [
            cl.evals[1:t] / cost[c]
            for c, (cl, t) in enumerate(zip(clusters, tops, strict=True))
        ]
    )
    order = np.argsort(-ratio, kind="stable")  # ties: cluster, then rank order
    spent = np.cumsum(cost[owner[order]])

    def residual(ranks):
        return sum(
            tail[min(r, tail.size - 1)] for tail, r in zip(tails, ranks, strict=True)
        )

    levels = []
    for r in range(1, d + 1):
        uniform = [max(1, q) for q in _capped(r, sizes)]
        room = sum((q - 1) * cost[c] for c, q in enumerate(uniform))
        taken = int(np.searchsorted(spent, room, side="right"))
        shared = 1 + np.bincount(owner[order[:taken]], minlength=k)
        ranks = [int(q) for q in shared]
        levels.append(uniform if residual(ranks) > residual(uniform) else ranks)
    return levels


def _forms(module, bits, group_size, holds=_holds_all, grids=(), compact=False):
    """Every form of a module with k = 1 factors, with its bytes (no errors).

    Only those a file format ``holds``
    (:attr:`~._file_formats.FileFormat.holds`); the float form first,
    always held. ``grids``: dense grids ``(bits, group_size, zero_dtype)``
    tried besides these (:attr:`~._file_formats.FileFormat.grids`).
    ``compact`` (:attr:`~._file_formats.FileFormat.compact_scales`): each
    quantized form whose zero points allow it is also given with compact
    scales, after it;
    :func:`_cheaper_scales` keeps the smaller of the two in the folder.
    """
    n, d = _rows_cols(module)
    forms = [_Form("float", None, None, None, form_nbytes(module), 0.0)]
    tried = set()

    def dense(b, g, zeros="uint8"):
        if (b, g, zeros) not in tried:
            tried.add((b, g, zeros))
            form = _Form("dense", b, g, None, 0, zero_dtype=zeros)
            for c in (False, True) if _compact_grid(compact, zeros) else (False,):
                form = form._replace(compact=c)
                size = form_nbytes(module, b, g, **grid_options(form))
                forms.append(form._replace(nbytes=size))

    for b in bits:
        for g in dict.fromkeys(_group(d, group_size, g) for g in _GROUPS[b]):
            dense(b, g)
        for g in _FLOAT_ZERO_GROUPS.get(b, ()):
            if group_size in (None, g) and d % g == 0:
                dense(b, g, "float16")
    for b, g, zeros in grids:
        if b in bits and group_size in (None, g) and d % g == 0:
            dense(b, g, zeros)
    scales = (False, True) if compact else (False,)
    side = factor_side(module)
    forms += _factor_forms(
        [n], d, bits, group_size, _bias_numel(module), 1, None, scales, side
    )
    return [f for f in forms if f.kind == "float" or holds(module, f)]


def _cheaper_scales(name, forms, budget):
    """Of each quantized form given with float16 scales and compact ones
    (:func:`_forms`), the one smaller in the folder: ``budget.priced``.

    Compact scales save about a byte a group, and add a header entry (their
    exponents) to each matrix: a small matrix keeps float16 scales. Float16
    on a tie.
    """
    best = {}
    for f in forms:
        key = f._replace(nbytes=0, error=0.0, compact=False)
        nbytes = budget.priced(name, f).nbytes
        if key not in best or nbytes < best[key][0]:
            best[key] = nbytes, f
    kept = {id(f) for _, f in best.values()}
    return [f for f in forms if id(f) in kept]


def _cluster_counts(name, module, config):
    """The numbers of clusters of a module's projective forms.

    ``k`` unset: k = 1 and :data:`_CLUSTERS` for an Embedding of at least
    :data:`_CLUSTER_ROWS` rows under the global allocation, k = 1 for the
    others. A ``k`` given for the
    whole config applies to the Embedding modules (a Linear keeps k = 1);
    an override may give k > 1 to an Embedding only.
    """
    k, _ = config.module_settings(name)
    embedding = isinstance(module, nn.Embedding)
    overridden = any(
        "k" in o and fnmatch.fnmatchcase(name, p) for p, o in config.overrides.items()
    )
    if not embedding and not overridden:
        return (1,)
    if k is None:
        rows = module.num_embeddings if embedding else 0
        large = rows >= _CLUSTER_ROWS and config.allocation == "global"
        return (1, _CLUSTERS) if large and _quantized_clusters(module, config) else (1,)
    ks = (k,) if isinstance(k, int) else tuple(k)
    n, _ = _rows_cols(module)
    if not embedding and ks != (1,):
        raise ValueError(
            f"k={k!r} for {name!r}: with unit='bytes' the projective forms of "
            "a Linear are k = 1 factors; give k > 1 to Embedding modules only"
        )
    if max(ks) > n:
        raise ValueError(f"k={k!r} for {name!r}: at most its {n} rows (num_embeddings)")
    return tuple(dict.fromkeys(ks))


def _held(module, forms, config):
    """The forms that the config's file format holds (the float form always)."""
    holds = _file_format(config).holds
    return [f for f in forms if f.kind == "float" or holds(module, f)]


def _quantized_clusters(module, config):
    """Whether the config's format holds factors with k > 1 clusters quantized.

    Float factors with k > 1 store more than the dense table at the widest
    bits a format holds: by default they are searched only where their
    quantized forms are held.
    """
    holds = _file_format(config).holds
    return any(
        holds(module, _Form("projective", b, g, g, 0, k=_CLUSTERS))
        for b in config.bits
        if b <= _CLUSTER_BITS
        for g in (config.group_size or _FACTOR_GROUP,)
    )


def _smallest(budget, forms, allocation):
    """The smallest size the folder reaches, in bytes, at ``budget``'s digits.

    Every module in its smallest form (its tensors and header entries), the
    other tensors as they are, the headers; with ``allocation="uniform"``,
    the size at which each module's smallest form fits its share.
    """
    priced = {
        name: [budget.priced(name, f) for f in module_forms]
        for name, module_forms in forms.items()
    }
    least = {name: min(f.nbytes for f in fs) for name, fs in priced.items()}
    if allocation == "global":
        room = sum(least.values())
    else:
        full = {name: fs[0].nbytes for name, fs in priced.items()}
        room = (
            math.ceil(max(least[n] / full[n] for n in forms) * sum(full.values())) + 1
        )  # the shares are real numbers: a byte for their rounding
    return budget.rest + budget.frame + room


def _check_bytes_feasible(config, names, named):
    """Each module's k = 1 forms, and the budget as a size of the folder, checked.

    Also checks each module's numbers of clusters (:func:`_cluster_counts`).
    The budget pays for the whole folder's weight files
    (:class:`~._folder_bytes.FolderBudget`: the model is ``named[""]``);
    forms with k > 1 clusters store more than k = 1 at the same rank, so
    the smallest form of a module is among these. A budget below the
    smallest size reachable raises, naming that size.
    """
    file_format = _file_format(config)
    file_format.check(config)
    _check_group_size(config.group_size, names, named)
    for name in names:
        _cluster_counts(name, named[name], config)
    grids = file_format.grids(config.bits)
    budget = file_format.budget(named[""], names, config.budget)
    forms = {
        name: _cheaper_scales(
            name,
            _forms(
                named[name],
                config.bits,
                config.group_size,
                file_format.holds,
                grids,
                file_format.compact_scales,
            ),
            budget,
        )
        for name in names
    }
    need, digits = _smallest(budget, forms, config.allocation), budget.digits
    while len(str(need)) > digits:  # the offsets of a larger folder: more digits
        digits = len(str(need))
        need = _smallest(budget.with_digits(digits), forms, config.allocation)
    if need > budget.asked:
        shares = "" if config.allocation == "global" else ", each within its share"
        what = getattr(budget, "describes", "the folder's weight files")
        frame = getattr(budget, "frame_describes", None) or (
            "the file's graph" if config.format == "onnx" else "the safetensors headers"
        )
        raise ValueError(
            f"budget={config.budget} cannot be met in bytes: it allows "
            f"{budget.asked} bytes for {what}, and the smallest "
            f"size reachable is {need} bytes (the {len(names)} selected "
            f"module{'s' * (len(names) > 1)} in their smallest forms{shares}"
            + (
                ""
                if config.format == "kflats"
                else f" that format={config.format!r} holds"
            )
            + f", the other {budget.rest} bytes of "
            f"tensors as they are, and {frame}; the model's "
            f"tensors hold {budget.total} bytes)"
        )
    return forms, budget
