"""compress: replace the Embedding and Linear modules of a model in place.

Four steps: select the modules, plan the budget (numbers per module,
:mod:`kflats.torch._plan`), fit every module, swap them in. The settings
arrive as one :class:`CompressionConfig`, from the caller or from
:func:`compress`'s keywords.
"""

import time
from collections.abc import Mapping
from dataclasses import replace

import numpy as np
from torch import nn

from .._size import dense_size
from ..factorize import damped_moment
from ..factorize._linear import (
    _check_row_weights,
    _factorize_linear,
    _shared_seed,
    _unwhiten,
    _whiten,
)
from ..factorize._search import _factorize
from ..factorize._validation import _check_sample_weight
from ._byte_forms import _check_bytes_feasible
from ._bytes import _check_bytes_config, _compress_bytes
from ._calibration import Calibration, calibrate
from ._config import _CONSTRAINTS, CompressionConfig, _check, _search_options_of
from ._layers import (
    ProjectiveEmbedding,
    ProjectiveLinear,
    _dense_weight,
    _weight_as_numpy,
)
from ._models import swap
from ._plan import _check_feasible, _plan_numbers
from ._report import CompressionReport, ModuleReport
from ._sensitivity import _bar, _objectives, _rows_cols
from ._targets import _select

__all__ = ["compress"]

# fits larger than this many numbers (in total) show a progress bar


def compress(
    model,
    budget,
    targets=None,
    *,
    calibration=None,
    allocation=None,
    k=None,
    ranks=None,
    side=None,
    tokenizer=None,
    smoothing=None,
    damping=None,
    progress=None,
    sample_weight=None,
    unit=None,
    bits=None,
    group_size=None,
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
    budget : float in (0, 1], int, or CompressionConfig
        With ``unit="numbers"``: fraction of the weight numbers to keep
        (cluster ids included, biases excluded): of all the selected
        modules together with ``allocation="global"``, of each module with
        ``"uniform"``. Or a
        :class:`CompressionConfig` that holds the budget and every setting
        below but ``calibration``, ``tokenizer``, ``progress`` and
        ``sample_weight`` (the data of the run), which are then not given
        again. With ``unit="bytes"``, see ``unit``.
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
        their own ``k``; the modules it leaves out search the grid (it
        becomes the config's ``overrides``).
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
        their own side; the Linear modules it leaves out use ``"auto"`` (it
        becomes the config's ``overrides``).
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
    sample_weight : array-like of shape (num_embeddings,), default=None
        Row weights of a single Embedding target without calibration (see
        :func:`kflats.factorize.factorize`).
    unit : {"numbers", "bytes"}, default="numbers"
        What ``budget`` counts. ``"bytes"``: a float in (0, 1] is a fraction
        of the selected modules' float32 bytes (weights and biases), an int
        >= 2 a size in bytes. Each module then takes the form the global
        allocation chooses, by calibrated error gained per byte, among:
        kept float32; dense at one of ``bits`` (group-wise, calibrated
        rounding: GPTQ-style error feedback along a Linear's input moment,
        token weights for an embedding); projective factors at a rank, in
        float32 or at one of ``bits``: k = 1 (the truncated SVD of the
        calibrated weight, the output side of a Linear) or, for an
        Embedding, its rows clustered into ``k`` subspaces (by default
        k = 16 for a table of at least 4096 rows, global allocation; the
        factors with k > 1 in float32 or at the ``bits`` up to 4).
        Dense quantization at each bit width is measured; the error of
        quantized factors is modelled as relative noise on what the factors
        keep, measured once per module and bit width at one rank (the
        report gives the measured error of the chosen form). Uniform
        quantization of every module at any of ``bits`` that fits is a
        point of the search, so the plan's
        predicted error is never above it; with a calibration, the candidate
        plans (greedy from the smallest forms, from each uniform start, and
        uniform itself) are run on its probe batches and the one whose
        output moves least is kept. A quantized module holds the
        dequantized values in its float parameters
        (:func:`kflats.quantize.quantize_module_`). ``k`` (an int or the
        numbers to try) applies to the Embedding modules only, ``ranks``
        and ``side`` do not apply.
    bits : sequence of int, default=(8, 6, 4, 3, 2)
        Bit widths of the forms of ``unit="bytes"``.
    group_size : int or None, default=None
        Entries per scale with ``unit="bytes"`` (see
        :class:`CompressionConfig`).
    **factorize_params
        Further parameters of :func:`kflats.factorize.factorize`
        (``affine``, ``random_state``, ``n_refine``, and KSubspaces' ``init``,
        ``n_init``, ``max_iter``, ``tol``, ...): fields of the config.

    Returns
    -------
    report : CompressionReport
        One :class:`ModuleReport` per selected module (a module the global
        allocation kept dense is reported with k = 0 and stays as it was);
        ``report.config`` is the run's :class:`CompressionConfig`, its
        targets resolved to the selected names.

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
    CompressionConfig : The settings of a run, as data.
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

    A budget in bytes: a tenth of the float32 bytes of both modules, each
    stored dense at a few bits or as quantized factors:

    >>> small = torch.nn.Sequential(torch.nn.Embedding(300, 32),
    ...                             torch.nn.Linear(32, 64))
    >>> in_bytes = compress(small, 0.1, [torch.nn.Embedding, torch.nn.Linear],
    ...                     unit="bytes")
    >>> in_bytes.bytes_after <= 0.1 * in_bytes.bytes_before
    True
    >>> sorted({m.form for m in in_bytes} - {"dense", "projective"})
    []

    The run's settings come back as a :class:`CompressionConfig`, which runs
    it again:

    >>> report.config.targets, report.config.k
    (('0',), 2)
    >>> again = torch.nn.Sequential(torch.nn.Embedding(300, 32))
    >>> compress(again, report.config)[0].k
    2
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    settings = {"targets": targets, "allocation": allocation, "k": k, "ranks": ranks}
    settings.update(side=side, smoothing=smoothing, damping=damping)
    settings.update(unit=unit, bits=bits, group_size=group_size)
    config, legacy = _as_config(budget, settings, factorize_params)
    bytes_unit = config.unit == "bytes"
    if bytes_unit:
        _check_bytes_config(config, sample_weight)
    # 1. select
    names, named = _select(model, config.targets)
    if bytes_unit:
        _check_bytes_feasible(config, names, named)
    else:
        _check_feasible(config.budget, names, named, config.allocation)
    for param, value in legacy.items():
        _check_names(value, names, param)
    config.check_overrides_match(names)
    _check_sample_weight_use(sample_weight, names, calibration)
    # what each module's fit minimises
    if calibration is not None and not isinstance(calibration, Calibration):
        calibration = calibrate(
            model, calibration, tokenizer=tokenizer, targets=names, progress=progress
        )
    objectives = _objectives(
        calibration, names, named, config.smoothing, config.damping
    )
    if config.ranks is None:
        ranks = "uniform" if calibration is None else "adaptive"
        config = replace(config, ranks=ranks)
    config = replace(config, targets=tuple(names))
    if bytes_unit:  # forms chosen, fitted and swapped in bytes
        return _compress_bytes(
            model, names, named, config, objectives, calibration, progress
        )
    # 2. plan the budget
    probe = calibration.probe if calibration is not None else None
    numbers_of = _plan_numbers(
        model,
        names,
        named,
        config.budget,
        config.allocation,
        objectives,
        probe,
        progress,
    )
    # 3. fit every module
    reports, layers = _fit_all(
        names, named, numbers_of, objectives, config, sample_weight, progress
    )
    # 4. swap (the modules that share a replaced table follow it)
    swap(model, layers.items())
    return CompressionReport(reports, config=config)


def _as_config(budget, settings, factorize_params):
    """One CompressionConfig from a config or from compress's keywords.

    Returns the config and the per-module dicts given as ``k=`` or ``side=``
    (their names are checked against the selection).
    """
    if isinstance(budget, CompressionConfig):
        given = [n for n, v in settings.items() if v is not None]
        given += sorted(factorize_params)
        if given:
            raise ValueError(
                "compress takes a CompressionConfig or its settings as keywords, "
                f"not both: got a config and {given}; set them in the config"
            )
        return budget, {}
    fields = {n: v for n, v in settings.items() if v is not None}
    legacy, overrides = {}, {}
    for param in ("k", "side"):
        value = fields.get(param)
        if isinstance(value, Mapping):
            legacy[param] = value
            del fields[param]
            for name, v in value.items():
                if v is not None:  # None: the default for that module
                    overrides.setdefault(name, {})[param] = v
    fit_params = dict(factorize_params)
    for param in ("random_state", "affine", "n_refine"):
        if param in fit_params:
            fields[param] = fit_params.pop(param)
    if "affine" in fields:
        fields["affine"] = bool(fields["affine"])
    config = CompressionConfig(
        budget, overrides=overrides, fit_params=fit_params, **fields
    )
    return config, legacy


def _check_names(value, names, param):
    """Every module a per-module dict names is selected."""
    unknown = sorted(set(value) - set(names))
    if unknown:
        raise ValueError(
            f"{param} names modules that targets does not select: {unknown}; the "
            f"selected modules are {names}"
        )


def _check_sample_weight_use(sample_weight, names, calibration):
    if sample_weight is not None and (len(names) > 1 or calibration is not None):
        raise ValueError(
            "sample_weight applies to the rows of one matrix without a "
            f"calibration; with {len(names)} targets or a calibration, use "
            "calibration= (or compress one module per call)"
        )


def _fit_all(names, named, numbers_of, objectives, config, sample_weight, progress):
    """Fit every module: its report, and its new layer unless it stays dense."""
    options = _search_options_of(config)
    bar = _progress_bar(names, named, progress)
    reports, layers = [], {}
    try:
        for name in names:
            module = named[name]
            if bar is not None:
                bar.set_postfix_str(name)
            start = time.perf_counter()
            layer = None
            if numbers_of[name] is not None:  # else kept dense by the allocation
                k, side = config.module_settings(name)
                layer = _fit_module(
                    module,
                    name,
                    numbers_of[name],
                    objectives[name],
                    k,
                    side,
                    options,
                    sample_weight,
                )
                layers[name] = layer.train(module.training)
            reports.append(
                _module_report(name, module, layer, time.perf_counter() - start)
            )
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return reports, layers


def _progress_bar(names, named, progress):
    return _bar(names, named, progress, "kflats compress")


def _fit_module(
    module, name, numbers, objective, k, side, options, sample_weight, rank=None
):
    """The projective layer of one module, fitted to store ``numbers``.

    ``rank``: fit at that rank instead (``numbers`` is then ``None``).
    """
    what = f"the share of {name!r}"
    weight = _dense_weight(module)  # (out, in), a Conv1D's transposed
    W = _weight_as_numpy(weight)
    if isinstance(module, nn.Embedding):
        if module.max_norm is not None:
            raise ValueError(
                f"{name}.max_norm is set; ProjectiveEmbedding does not renormalise "
                "rows, so it cannot reproduce such a layer"
            )
        w = objective.row_weights if objective is not None else sample_weight
        w = _check_sample_weight(w, W.shape[0])
        if objective is not None and objective.input_moment is not None:
            if rank is not None:  # a tied table's fit takes its size in numbers
                numbers = rank * sum(W.shape)
            factors = _fit_tied_table(W, w, objective, k, numbers, options, what)
        else:
            factors = _factorize(W, w, k, rank, numbers, options, what)
        layer = ProjectiveEmbedding.from_factors(
            factors,
            padding_idx=module.padding_idx,
            device=weight.device,
            dtype=weight.dtype,
        )
    else:
        moment = None
        if objective is not None:
            moment = damped_moment(
                objective.input_moment, W.shape[1], objective.damping
            )
        _check_row_weights(sample_weight, moment, side)
        options = options._replace(random_state=_shared_seed(options.random_state))
        factors = _factorize_linear(
            W, k, rank, numbers, side, moment, sample_weight, options, what
        )
        bias = None if module.bias is None else module.bias.detach()
        layer = ProjectiveLinear.from_factors(
            factors, bias, device=weight.device, dtype=weight.dtype
        )
    layer.factorization_error = factors.error
    layer.weight_error = factors.weight_error
    return layer


def _fit_tied_table(W, w, objective, k, numbers, options, what):
    """Factors of a table that is also an output head: rows weighted, columns
    whitened by the head's input moment, then brought back."""
    _, L = damped_moment(objective.input_moment, W.shape[1], objective.damping)
    whitened = _factorize(
        _whiten(W, L).astype(W.dtype), w, k, None, numbers, options, what
    )
    factors = replace(
        whitened,
        V=tuple(_unwhiten(v, L, W.dtype) for v in whitened.V),
        means=None if whitened.means is None else _unwhiten(whitened.means, L, W.dtype),
    )
    W64 = W.astype(np.float64)
    weight_error = float(np.sum((W64 - factors.reconstruct()) ** 2) / np.sum(W64**2))
    return replace(factors, weight_error=weight_error)


def _module_report(name, module, layer, seconds):
    """The ModuleReport of a module and its new layer (``None``: kept dense)."""
    n, d = _rows_cols(module)
    bias = 0 if getattr(module, "bias", None) is None else module.bias.numel()
    before = dense_size(n, d).numbers + bias
    state_bytes = _state_bytes(module)
    if layer is None:  # as it was: no clusters, no error, no time
        after = {"k": 0, "ranks": (), "params_after": before, "error": 0.0}
        after.update(seconds=0.0, weight_error=0.0, bytes_after=state_bytes)
        after.update(side=None, form="dense")
    else:
        after = {"k": layer.k, "ranks": layer.ranks}
        after.update(params_after=layer.n_params + bias, seconds=seconds)
        after.update(error=layer.factorization_error, weight_error=layer.weight_error)
        after.update(bytes_after=_state_bytes(layer), side=getattr(layer, "side", None))
        after["form"] = "projective"
    return ModuleReport(
        name=name,
        kind=_kind_name(module),
        shape=(n, d),
        params_before=before,
        bytes_before=state_bytes,
        **after,
    )


def _kind_name(module):
    return "Embedding" if isinstance(module, nn.Embedding) else "Linear"


def _state_bytes(module):
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


def _check_budget(budget, names, named, allocation):
    """The budget checked, and feasible for these modules (the command line's check)."""
    _check("budget", budget, _CONSTRAINTS["budget"])
    _check_feasible(float(budget), names, named, allocation)
    return float(budget)
