"""compress: replace the Embedding and Linear modules of a model in place."""

import heapq
import math
import numbers
import time
from collections.abc import Mapping
from typing import NamedTuple

import numpy as np
import torch
from scipy import linalg
from threadpoolctl import threadpool_limits
from torch import nn

from ..factorize import damped_moment
from ._calibration import Calibration, calibrate
from ._layers import ProjectiveEmbedding, ProjectiveLinear, _dense_weight, _features
from ._models import adapter_for, swap
from ._targets import _select

__all__ = ["CompressionReport", "ModuleReport", "compress"]

# fits larger than this many numbers (in total) show a progress bar
_PROGRESS_NUMBERS = 2_000_000


class ModuleReport(NamedTuple):
    """What :func:`compress` did to one module.

    Attributes
    ----------
    name : str
        Qualified name of the module in the model.
    kind : str
        ``"Embedding"`` or ``"Linear"``.
    shape : tuple of int
        ``(num_embeddings, embedding_dim)`` or ``(out_features, in_features)``.
    k : int
        Number of clusters of the fit.
    ranks : tuple of int
        Rank of each cluster.
    params_before : int
        Numbers the original module stored (weight and bias).
    params_after : int
        Numbers the compressed module stores (factors, cluster ids when k > 1,
        and the bias).
    error : float
        Relative error of the fit under its objective: calibrated (token
        frequencies for an Embedding, the expected output error for a
        Linear) when :func:`compress` had a calibration, else the relative
        squared Frobenius error of the weight.
    seconds : float
        Time the fit took.
    weight_error : float or None
        Relative squared Frobenius error of the weight, beside ``error``.
    bytes_before, bytes_after : int
        Bytes of the module's state dict (what a checkpoint stores) before
        and after: weight and bias, then factors, cluster ids (in the
        smallest integer type that holds k) and bias.
    side : str or None
        For a Linear: ``"input"`` or ``"output"``, the clustered side;
        ``None`` for an Embedding, or a module kept dense.
    """

    name: str
    kind: str
    shape: tuple
    k: int
    ranks: tuple
    params_before: int
    params_after: int
    error: float
    seconds: float
    weight_error: float | None = None
    bytes_before: int = 0
    bytes_after: int = 0
    side: str | None = None


class CompressionReport(tuple):
    """The :class:`ModuleReport` of every module :func:`compress` replaced.

    A tuple of :class:`ModuleReport`, in model order; ``str(report)`` is a
    table.

    Attributes
    ----------
    params_before, params_after : int
        Totals over the replaced modules.
    bytes_before, bytes_after : int
        Totals of the modules' state-dict bytes.

    Examples
    --------
    >>> from kflats.torch import CompressionReport, ModuleReport
    >>> r = CompressionReport([ModuleReport("emb", "Embedding", (100, 8), 2,
    ...                                      (3, 3), 800, 478, 0.25, 0.01)])
    >>> r.params_after
    478
    >>> print(r)  # doctest: +NORMALIZE_WHITESPACE
    module  kind       shape     k  ranks   params before  params after  ratio
    error   seconds
    emb     Embedding  100 x 8   2  (3, 3)  800            478           0.598
    0.2500  0.0
    """

    @property
    def params_before(self):
        return sum(m.params_before for m in self)

    @property
    def params_after(self):
        return sum(m.params_after for m in self)

    @property
    def bytes_before(self):
        return sum(m.bytes_before for m in self)

    @property
    def bytes_after(self):
        return sum(m.bytes_after for m in self)

    def to_dict(self):
        """The report as plain JSON-ready data: one dict per module, and totals.

        Returns
        -------
        report : dict
            ``{"modules": [...], "params_before": ..., "params_after": ...,
            "bytes_before": ..., "bytes_after": ...}``.
        """
        modules = []
        for m in self:
            entry = m._asdict()
            entry["shape"] = list(m.shape)
            entry["ranks"] = list(m.ranks)
            entry["share"] = m.params_after / max(self.params_after, 1)
            modules.append(entry)
        return {
            "modules": modules,
            "params_before": self.params_before,
            "params_after": self.params_after,
            "bytes_before": self.bytes_before,
            "bytes_after": self.bytes_after,
        }

    def __repr__(self):
        return f"CompressionReport({list(self)!r})"

    def __str__(self):
        header = (
            "module",
            "kind",
            "shape",
            "k",
            "ranks",
            "params before",
            "params after",
            "ratio",
            "error",
            "seconds",
        )
        rows = [header]
        for m in self:
            ranks = m.ranks if len(m.ranks) <= 6 else (*m.ranks[:6], "...")
            rows.append(
                (
                    m.name,
                    m.kind,
                    f"{m.shape[0]} x {m.shape[1]}",
                    str(m.k),
                    str(tuple(ranks)).replace("'...'", "..."),
                    str(m.params_before),
                    str(m.params_after),
                    f"{m.params_after / m.params_before:.3f}",
                    f"{m.error:.4f}",
                    f"{m.seconds:.1f}",
                )
            )
        widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
        return "\n".join(
            "  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip()
            for r in rows
        )


def _check_budget(budget, names, named, allocation):
    if (
        not isinstance(budget, numbers.Real)
        or isinstance(budget, bool)
        or not 0 < budget <= 1
    ):
        raise ValueError(f"budget must be a float in (0, 1], got {budget!r}")
    budget = float(budget)
    shapes = [_rows_cols(named[name]) for name in names]
    if allocation == "global":
        total = sum(n * d for n, d in shapes)
        need = sum(n + d for n, d in shapes)
        if need > math.floor(budget * total):
            raise ValueError(
                f"budget={budget} cannot be met for the {len(names)} selected "
                f"modules: rank 1 for each needs {need} numbers, the budget "
                f"allows {math.floor(budget * total)} (budget >= "
                f"{need / total:.4g})"
            )
        return budget
    for name, (n, d) in zip(names, shapes, strict=True):
        if n + d > math.floor(budget * n * d):
            raise ValueError(
                f"budget={budget} cannot be met for {name!r} ({n} x {d}): a "
                f"single factor pair of rank 1 needs {n + d} numbers, the "
                f"budget allows {math.floor(budget * n * d)} "
                f"(budget >= {(n + d) / (n * d):.4g})"
            )
    return budget


def _rows_cols(module):
    if isinstance(module, nn.Embedding):
        return module.num_embeddings, module.embedding_dim
    return _features(module)[::-1]


def _state_bytes(module):
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


def _weight64(module):
    return _dense_weight(module).detach().to("cpu", torch.float64).numpy()


class _Spectrum(NamedTuple):
    """A module's (calibrated) weight by its k = 1 truncated SVD."""

    gains: np.ndarray  # squared singular values / total: 1 - cumsum = error
    V: np.ndarray  # (d, m) right singular vectors of the (whitened) weight
    L: np.ndarray | None  # Cholesky factor of a Linear's damped input moment


def _spectrum(module, objective):
    """The truncated SVD that the module's objective makes exact, k = 1.

    ``objective`` is ``("weights", w)`` for an Embedding's rows, ``("moment",
    C, damping)`` for a Linear, or ``None``: the SVD of the row-weighted
    table, of the whitened weight ``W L``, or of the weight.
    """
    A = _weight64(module)
    L = None
    if objective is not None and objective[0] == "weights":
        A = A * np.sqrt(objective[1])[:, None]
    elif objective is not None:
        _, L = damped_moment(objective[1], A.shape[1], objective[2])
        A = A @ L
    # the d x d Gram matrix: cheaper than an SVD for tall tables
    G = A.T @ A
    # one thread: a small eigenproblem gains little from more, and threads
    # that wait on a busy machine cost a hundredfold
    with threadpool_limits(1, user_api="blas"):
        evals, V = linalg.eigh(G)
    evals, V = np.clip(evals[::-1], 0, None), V[:, ::-1]
    total = float(np.trace(G))
    gains = evals / total if total > 0 else evals
    return _Spectrum(gains, V, L)


def _truncated(module, spectrum, rank):
    """The module's weight replaced by its k = 1 factors of this rank."""
    W = _weight64(module)
    V = spectrum.V[:, :rank]
    if spectrum.L is None:
        return W @ V @ V.T
    # (W L V V^T) L^-1, by a triangular solve
    WLV = (W @ spectrum.L @ V) @ V.T
    return linalg.solve_triangular(spectrum.L, WLV.T, lower=True, trans="T").T


def _distortion(model, probe, reference=None):
    """How far the model's final outputs on the probe are from ``reference``."""
    adapter = adapter_for(model)
    with torch.no_grad():
        outs = [adapter.final(adapter.run(batch)) for batch in probe]
        if reference is None:
            return outs
        total = sum(
            float(adapter.distortion(out, ref, batch))
            for out, ref, batch in zip(outs, reference, probe, strict=True)
        )
    return total / len(outs)


# each module's sensitivity is measured with its k = 1 factors at the rank
# whose calibrated relative error is about this
_PROBE_ERROR = 0.05


def _sensitivities(model, names, named, spectra, probe):
    """Output distortion per unit of relative error, for each module.

    Each module in turn has its weight replaced by its (calibrated) k = 1
    factors at the rank where their relative error is about 5%, the probe
    batches of the calibration run through the model, and the distortion of
    its final output (``1 - cosine`` of sentence embeddings, or the relative
    squared error of the last hidden state) divided by that error. The
    weight is always put back.
    """
    device = next(model.parameters()).device
    probe = [
        {
            k: str(v) if v.dtype.kind == "U" else torch.as_tensor(v).to(device)
            for k, v in batch.items()
        }
        for batch in probe
    ]
    was_training = model.training
    model.eval()
    try:
        reference = _distortion(model, probe)
        out = {}
        for name in names:
            module, spectrum = named[name], spectra[name]
            n, d = _rows_cols(module)
            error = 1 - np.cumsum(spectrum.gains)
            rank = int(np.searchsorted(-error, -_PROBE_ERROR)) + 1
            rank = min(rank, (n * d - 1) // (n + d), spectrum.gains.size)
            rel = float(error[rank - 1]) if rank >= 1 else 1.0
            if rel <= 0:
                out[name] = 0.0
                continue
            weight = _dense_weight(module)
            saved = weight.detach().clone()
            try:
                with torch.no_grad():
                    weight.copy_(torch.as_tensor(_truncated(module, spectrum, rank)))
                out[name] = _distortion(model, probe, reference) / rel
            finally:
                with torch.no_grad():
                    weight.copy_(saved)
    finally:
        model.train(was_training)
    return out


def _global_allocation(names, named, spectra, budget, scale=None):
    """Numbers per module under one total budget: greedy by gain per number.

    Every module starts at rank 1; then rank steps (each costing ``n + d``
    numbers and gaining the next relative squared singular value, times the
    module's ``scale``, its output sensitivity) are taken
    in order of gain per number across all modules while they fit, a module's
    steps in rank order (its gains per number never increase). A module whose
    rank reaches the point where factors stop saving numbers may instead stay
    dense, a step that gains all of its remaining error.

    Returns ``{name: numbers}``, ``None`` for a module best kept dense.
    """
    shapes = {name: _rows_cols(named[name]) for name in names}
    scale = scale or {}
    total = math.floor(budget * sum(n * d for n, d in shapes.values()))
    rank = {name: 1 for name in names}
    dense = dict.fromkeys(names, False)
    room = total - sum(n + d for n, d in shapes.values())
    heap = []

    def push(name):
        n, d = shapes[name]
        gains, r = spectra[name].gains * scale.get(name, 1.0), rank[name]
        r_max = (n * d - 1) // (n + d)  # beyond it, factors store more than W
        if r < min(r_max, gains.size):
            heapq.heappush(heap, (-gains[r] / (n + d), name, "rank", n + d))
        else:  # stay dense: all the remaining error, for the numbers left
            cost = n * d - r * (n + d)
            gain = float(gains[r:].sum())
            if gain > 0:
                heapq.heappush(heap, (-gain / max(cost, 1), name, "dense", cost))

    for name in names:
        push(name)
    while heap:
        _, name, step, cost = heapq.heappop(heap)
        if cost > room:
            continue  # this module's next step does not fit; others may
        room -= cost
        if step == "dense":
            dense[name] = True
            continue
        rank[name] += 1
        push(name)
    out = {}
    for name in names:
        n, d = shapes[name]
        out[name] = None if dense[name] else rank[name] * (n + d)
    # numbers no step could use go to the modules in turn, less than one rank
    # step each, so that the clustered fits (ids, several bases) have room
    # to do better than k = 1
    spare = room
    for name in names:
        if out[name] is not None and spare > 0:
            n, d = shapes[name]
            extra = min(spare, n * d - out[name] - 1, (n + d) - 1)
            if extra > 0:
                out[name] += extra
                spare -= extra
    return out


def _objectives(calibration, names, named, smoothing, damping):
    """Per module: ("weights", w) (Embedding), ("moment", C, damping) (Linear)."""
    if calibration is None:
        return dict.fromkeys(names)
    calibration._check_covers(named[""], names)
    out = {}
    for name in names:
        if isinstance(named[name], nn.Embedding):
            out[name] = ("weights", calibration.token_weights(name, smoothing))
        else:
            out[name] = ("moment", calibration.input_moment(name), damping)
    return out


def _per_module(value, names, param):
    """``value`` for each selected module: the same for all, or looked up by name."""
    if not isinstance(value, Mapping):
        return dict.fromkeys(names, value)
    unknown = sorted(set(value) - set(names))
    if unknown:
        raise ValueError(
            f"{param} names modules that targets does not select: {unknown}; the "
            f"selected modules are {names}"
        )
    return {name: value.get(name) for name in names}


def _fit(module, objective, budget, k, ranks, side, params):
    if isinstance(module, nn.Embedding):
        if objective is not None:
            params = {**params, "sample_weight": objective[1]}
        return ProjectiveEmbedding.from_embedding(
            module, k, budget=budget, ranks=ranks, **params
        )
    if objective is not None:
        params = {**params, "input_moment": objective[1], "damping": objective[2]}
    return ProjectiveLinear.from_linear(
        module, k, budget=budget, ranks=ranks, side=side, **params
    )


def compress(
    model,
    budget,
    targets=None,
    *,
    calibration=None,
    allocation="global",
    k=None,
    ranks=None,
    side="auto",
    tokenizer=None,
    smoothing=1.0,
    damping=1e-2,
    progress=None,
    **factorize_params,
):
    """Replace Embedding and Linear modules of a model by projective layers.

    Every selected :class:`torch.nn.Embedding` becomes a
    :class:`ProjectiveEmbedding` and every selected :class:`torch.nn.Linear` a
    :class:`ProjectiveLinear`. With a ``calibration``, each fit minimises
    what the model's outputs feel on that text: an Embedding's rows are
    weighted by their smoothed token counts, a Linear minimises its expected
    output error ``E||(W - W_hat) x||^2`` (see
    :func:`kflats.factorize.factorize_linear`). All modules are fitted first
    and replaced only when every fit succeeded: on any error the model is
    left unchanged.

    Parameters
    ----------
    model : torch.nn.Module
        Modified in place.
    budget : float in (0, 1]
        Fraction of the weight numbers to keep (cluster ids included, biases
        excluded): of all the selected modules together with
        ``allocation="global"``, of each module with ``"uniform"``.
    targets : str, type, or list of them, default=None
        Which modules to replace. A string is a pattern on qualified module
        names (:mod:`fnmatch` syntax, so ``"encoder.layer.*.output.dense"``);
        a type selects every module of that type (``torch.nn.Linear``). A
        module matching any target is selected; every target must match at
        least one module. ``None``: the word-embedding table of a Hugging Face
        transformers model, found through ``get_input_embeddings()`` (also
        inside a wrapper such as a sentence-transformers model).
    calibration : Calibration or list of str, default=None
        What the model will read: a :class:`Calibration` from
        :func:`calibrate` (it must hold every target), or calibration texts,
        which are run through :func:`calibrate` first (``tokenizer=`` for a
        model that is not a sentence-transformers model). ``None``: the plain
        weight error is minimised.
    allocation : {"global", "uniform"}, default="global"
        ``"global"``: ``budget`` is shared out across the modules greedily,
        by error gained per number stored, the idea of adaptive ranks one
        level up. A module's errors by rank come from the spectrum of its
        truncated SVD (frequency-weighted for a calibrated Embedding,
        whitened for a calibrated Linear); with a calibration they are
        weighted by the module's measured sensitivity, how far the model's
        final output moves (on the calibration's probe batches) per unit of
        the module's relative error; without, plain relative errors count
        alike. A module may stay dense when that pays. ``"uniform"``: each
        module keeps ``budget`` of its own numbers.
    k : int, sequence of int, dict or None, default=None
        Numbers of clusters to search (see :func:`kflats.factorize.factorize`);
        ``None`` searches :data:`kflats.factorize.K_GRID`, which includes the
        truncated SVD (k = 1). A dict maps module names (as in the report) to
        their own ``k``; the modules it leaves out search the grid.
    ranks : {"adaptive", "uniform"} or None, default=None
        Rank allocation across the clusters of a module. ``None``:
        ``"adaptive"`` with a calibration, ``"uniform"`` without. Without
        calibration, the adaptive allocation minimises the plain squared
        error, which counts each token by its squared norm; the most
        frequent tokens of a language model have the smallest norms, so it
        starves exactly the clusters that text uses most.
    side : {"auto", "input", "output"} or dict, default="auto"
        Which side of a Linear weight to cluster (see
        :func:`kflats.factorize.factorize_linear`). A dict maps module names to
        their own side; the Linear modules it leaves out use ``"auto"``.
    tokenizer : callable, default=None
        For calibration texts, when the model has no tokenizer of its own.
    smoothing : float, default=1.0
        Added to every token count (see :meth:`Calibration.token_weights`):
        a token the calibration never saw keeps weight 1.
    damping : float, default=1e-2
        Added to the diagonal of each Linear's input moment, relative to its
        mean (see :func:`kflats.factorize.damped_moment`).
    progress : bool, default=None
        Show a tqdm progress bar over the modules. ``None``: only when the
        modules hold more than two million numbers in all (and tqdm is
        installed).
    **factorize_params
        Further parameters of :func:`kflats.factorize.factorize`
        (``affine``, ``random_state``, ``sample_weight`` for a single target
        without calibration, ``n_init``, ``max_iter``, ...).

    Returns
    -------
    report : CompressionReport
        One :class:`ModuleReport` per selected module (a module the global
        allocation kept dense is reported with k = 0 and stays as it was).

    Raises
    ------
    ValueError
        If ``budget`` is out of range or too small for the selected modules,
        a target matches no module, or the calibration is empty or was
        recorded on another model or for other targets.
    TypeError
        If a selected module is neither an Embedding nor a Linear, or a target
        is neither a string nor a module type.

    See Also
    --------
    calibrate : Record a calibration once, for many budgets.
    heal : Distil the compressed model towards the original.

    Examples
    --------
    >>> import torch
    >>> from kflats.torch import compress
    >>> _ = torch.manual_seed(0)
    >>> model = torch.nn.Sequential(torch.nn.Embedding(300, 32),
    ...                             torch.nn.Linear(32, 64))
    >>> report = compress(model, budget=0.5, targets=torch.nn.Embedding, k=2,
    ...                   random_state=0)
    >>> type(model[0]).__name__, report[0].name, report[0].params_after <= 4800
    ('ProjectiveEmbedding', '0', True)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if allocation not in ("global", "uniform"):
        raise ValueError(
            f"allocation must be 'global' or 'uniform', got {allocation!r}"
        )
    if ranks is not None and ranks not in ("adaptive", "uniform"):
        raise ValueError(f"ranks must be 'adaptive', 'uniform' or None, got {ranks!r}")
    names, named = _select(model, targets)
    budget = _check_budget(budget, names, named, allocation)
    k_of = _per_module(k, names, "k")
    side_of = _per_module(side, names, "side")
    bad = {
        n: v for n, v in side_of.items() if v not in (None, "auto", "input", "output")
    }
    if bad:
        raise ValueError(
            f"side must be 'auto', 'input' or 'output' (or a dict of them), got {bad}"
        )
    if "sample_weight" in factorize_params and (
        len(names) > 1 or calibration is not None
    ):
        raise ValueError(
            "sample_weight applies to the rows of one matrix without a "
            f"calibration; with {len(names)} targets or a calibration, use "
            "calibration= (or compress one module per call)"
        )
    if calibration is not None and not isinstance(calibration, Calibration):
        calibration = calibrate(
            model, calibration, tokenizer=tokenizer, targets=names, progress=progress
        )
    objectives = _objectives(calibration, names, named, smoothing, damping)
    if ranks is None:
        ranks = "uniform" if calibration is None else "adaptive"

    shapes = {name: _rows_cols(named[name]) for name in names}
    if allocation == "global" and len(names) > 1:
        spectra = {name: _spectrum(named[name], objectives[name]) for name in names}
        scale = None
        if calibration is not None and calibration.probe:
            scale = _sensitivities(model, names, named, spectra, calibration.probe)
        numbers_of = _global_allocation(names, named, spectra, budget, scale)
    else:
        numbers_of = {
            name: math.floor(budget * shapes[name][0] * shapes[name][1])
            for name in names
        }

    size = sum(named[n].weight.numel() for n in names)
    show = size > _PROGRESS_NUMBERS if progress is None else bool(progress)
    bar = None
    if show:
        try:
            from tqdm.auto import tqdm
        except ImportError:  # pragma: no cover - tqdm is in the torch extra
            tqdm = None
        if tqdm is not None:
            bar = tqdm(total=len(names), desc="kflats compress", unit="module")

    replacements, reports = [], []
    try:
        for name in names:
            module = named[name]
            if bar is not None:
                bar.set_postfix_str(name)
            start = time.perf_counter()
            n, d = shapes[name]
            kind = "Embedding" if isinstance(module, nn.Embedding) else "Linear"
            bias = 0 if getattr(module, "bias", None) is None else module.bias.numel()
            before = _state_bytes(module)
            if numbers_of[name] is None:  # kept dense by the global allocation
                reports.append(
                    ModuleReport(
                        name,
                        kind,
                        (n, d),
                        0,
                        (),
                        n * d + bias,
                        n * d + bias,
                        0.0,
                        0.0,
                        0.0,
                        before,
                        before,
                        None,
                    )
                )
            else:
                # + 0.5: floor(budget * n * d) gives back exactly these numbers
                share = min((numbers_of[name] + 0.5) / (n * d), 1.0)
                layer = _fit(
                    module,
                    objectives[name],
                    share,
                    k_of[name],
                    ranks,
                    side_of[name] or "auto",
                    factorize_params,
                )
                reports.append(
                    ModuleReport(
                        name,
                        kind,
                        (n, d),
                        layer.k,
                        layer.ranks,
                        n * d + bias,
                        layer.n_params + bias,
                        layer.factorization_error,
                        time.perf_counter() - start,
                        layer.weight_error,
                        before,
                        _state_bytes(layer),
                        getattr(layer, "side", None),
                    )
                )
                replacements.append((name, layer.train(module.training)))
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    swap(model, replacements)
    return CompressionReport(reports)
