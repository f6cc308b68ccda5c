"""compress: replace the Embedding and Linear modules of a model in place."""

import fnmatch
import math
import numbers
import time
from typing import NamedTuple

from torch import nn

from ._layers import ProjectiveEmbedding, ProjectiveLinear

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
        Relative squared Frobenius error of the weight's reconstruction.
    seconds : float
        Time the fit took.
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


class CompressionReport(tuple):
    """The :class:`ModuleReport` of every module :func:`compress` replaced.

    A tuple of :class:`ModuleReport`, in model order; ``str(report)`` is a
    table.

    Attributes
    ----------
    params_before, params_after : int
        Totals over the replaced modules.

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


def _default_target(model):
    for name, module in model.named_modules():
        getter = getattr(module, "get_input_embeddings", None)
        if callable(getter):
            emb = getter()
            for inner, sub in module.named_modules():
                if sub is emb:
                    return [name + "." + inner if name and inner else name or inner]
    raise ValueError(
        "targets=None selects the word-embedding table of a Hugging Face "
        "transformers model (get_input_embeddings()), and no submodule of "
        f"{type(model).__name__} has one; pass targets= (names, patterns or "
        "module types)"
    )


def _select(model, targets):
    """Names of the modules to replace; checks that every target matches."""
    named = dict(model.named_modules())
    if targets is None:
        names = _default_target(model)
    else:
        if isinstance(targets, (str, type)):
            targets = [targets]
        try:
            targets = list(targets)
        except TypeError:
            raise TypeError(
                "targets must be a name pattern (str), a module type, or a list "
                f"of them, got {type(targets).__name__}"
            ) from None
        if not targets:
            raise ValueError("targets is empty: it selects no module")
        names = []
        for target in targets:
            if isinstance(target, str):
                hits = [n for n in named if n and fnmatch.fnmatchcase(n, target)]
            elif isinstance(target, type) and issubclass(target, nn.Module):
                hits = [n for n, m in named.items() if n and isinstance(m, target)]
            else:
                raise TypeError(
                    "each target must be a name pattern (str) or a subclass of "
                    f"torch.nn.Module, got {target!r}"
                )
            if not hits:
                raise ValueError(
                    f"target {target!r} matches no module of {type(model).__name__}"
                )
            names.extend(hits)
        names = list(dict.fromkeys(names))
    wrong = [
        f"{n} ({type(named[n]).__name__})"
        for n in names
        if type(named[n]) not in (nn.Embedding, nn.Linear)
    ]
    if wrong:
        raise TypeError(
            "compress replaces torch.nn.Embedding and torch.nn.Linear modules "
            f"only; targets select {', '.join(wrong)}"
        )
    return names, named


def _check_budget(budget, names, named):
    if (
        not isinstance(budget, numbers.Real)
        or isinstance(budget, bool)
        or not 0 < budget <= 1
    ):
        raise ValueError(f"budget must be a float in (0, 1], got {budget!r}")
    for name in names:
        module = named[name]
        if isinstance(module, nn.Embedding):
            n, d = module.num_embeddings, module.embedding_dim
        else:
            n, d = module.in_features, module.out_features
        if n + d > math.floor(budget * n * d):
            raise ValueError(
                f"budget={budget} cannot be met for {name!r} ({n} x {d}): a "
                f"single factor pair of rank 1 needs {n + d} numbers, the "
                f"budget allows {math.floor(budget * n * d)} "
                f"(budget >= {(n + d) / (n * d):.4g})"
            )
    return float(budget)


def compress(
    model,
    budget,
    targets=None,
    *,
    k=None,
    ranks="adaptive",
    progress=None,
    **factorize_params,
):
    """Replace Embedding and Linear modules of a model by projective layers.

    Every selected :class:`torch.nn.Embedding` becomes a
    :class:`ProjectiveEmbedding` and every selected :class:`torch.nn.Linear` a
    :class:`ProjectiveLinear` (input features clustered), each keeping at most
    ``budget`` of the module's weight numbers. All modules are fitted first and
    replaced only when every fit succeeded: on any error the model is left
    unchanged.

    Parameters
    ----------
    model : torch.nn.Module
        Modified in place.
    budget : float in (0, 1]
        Fraction of each weight's numbers that its factors may store (cluster
        ids included, bias excluded).
    targets : str, type, or list of them, default=None
        Which modules to replace. A string is a pattern on qualified module
        names (:mod:`fnmatch` syntax, so ``"encoder.layer.*.output.dense"``);
        a type selects every module of that type (``torch.nn.Linear``). A
        module matching any target is selected; every target must match at
        least one module. ``None``: the word-embedding table of a Hugging Face
        transformers model, found through ``get_input_embeddings()`` (also
        inside a wrapper such as a sentence-transformers model).
    k : int or sequence of int, default=None
        Numbers of clusters to search (see :func:`kflats.factorize.factorize`);
        ``None`` searches :data:`kflats.factorize.K_GRID`, which includes the
        truncated SVD (k = 1).
    ranks : {"adaptive", "uniform"}, default="adaptive"
        Rank allocation across clusters.
    progress : bool, default=None
        Show a tqdm progress bar over the modules. ``None``: only when the
        modules hold more than two million numbers in all (and tqdm is
        installed).
    **factorize_params
        Further parameters of :func:`kflats.factorize.factorize`
        (``affine``, ``random_state``, ``sample_weight`` for a single target,
        ``n_init``, ``max_iter``, ...).

    Returns
    -------
    report : CompressionReport
        One :class:`ModuleReport` per replaced module.

    Raises
    ------
    ValueError
        If ``budget`` is out of range or too small for a selected module, or
        a target matches no module.
    TypeError
        If a selected module is neither an Embedding nor a Linear, or a target
        is neither a string nor a module type.

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
    names, named = _select(model, targets)
    budget = _check_budget(budget, names, named)
    if "sample_weight" in factorize_params and len(names) > 1:
        raise ValueError(
            "sample_weight applies to the rows of one matrix; with several "
            f"targets ({len(names)}) compress them one call at a time"
        )
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
            if isinstance(module, nn.Embedding):
                layer = ProjectiveEmbedding.from_embedding(
                    module, k, budget=budget, ranks=ranks, **factorize_params
                )
                shape = (module.num_embeddings, module.embedding_dim)
                kind = "Embedding"
            else:
                layer = ProjectiveLinear.from_linear(
                    module, k, budget=budget, ranks=ranks, **factorize_params
                )
                shape = (module.out_features, module.in_features)
                kind = "Linear"
            seconds = time.perf_counter() - start
            bias = 0 if getattr(module, "bias", None) is None else module.bias.numel()
            reports.append(
                ModuleReport(
                    name,
                    kind,
                    shape,
                    layer.k,
                    layer.ranks,
                    module.weight.numel() + bias,
                    layer.n_params + bias,
                    layer.factorization_error,
                    seconds,
                )
            )
            replacements.append((name, layer.train(module.training)))
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    for name, layer in replacements:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, layer)
    return CompressionReport(reports)
