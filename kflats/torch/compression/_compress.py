"""compress: replace the Embedding and Linear modules of a model in place.

The settings arrive as one :class:`CompressionConfig`, from the caller or
built from :func:`compress`'s keywords (:func:`_as_config`, the thin keyword
front). Then, once: select the modules, pick the planner of the config's
unit (:data:`PLANNERS`: :class:`~._plan_numbers.NumbersPlanner`,
:class:`~._plan_bytes.BytesPlanner`), check the budget is feasible,
calibrate, and hand the rest (plan, fit every module, swap them in) to the
planner.
"""

import time
from collections.abc import Mapping
from dataclasses import replace

from torch import nn

from kflats.torch.calibration import Calibration, calibrate
from kflats.torch.compression._config import (
    _CONSTRAINTS,
    CompressionConfig,
    _check,
)
from kflats.torch.compression._objectives import module_objectives
from kflats.torch.compression._plan_bytes import BytesPlanner
from kflats.torch.compression._plan_numbers import NumbersPlanner, _check_feasible
from kflats.torch.models import select_modules

__all__ = ["compress"]

# the planner of each unit: check(config, names, named, sample_weight) before
# anything is measured, then compress(model, names, named, config, objectives,
# calibration, sample_weight, progress); ``named`` maps every module's
# qualified name to it, the model itself under ""
PLANNERS = {planner.unit: planner for planner in (NumbersPlanner, BytesPlanner)}


def compress(
    model,
    budget,
    targets=None,
    *,
    calibration=None,
    tokenizer=None,
    progress=None,
    sample_weight=None,
    **settings,
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
        What to keep: see :class:`CompressionConfig`'s ``budget`` (with
        ``unit="numbers"``, the default, a fraction of the selected modules'
        weight numbers; with ``unit="bytes"``, the size of the saved
        folder's weight files, all of them: a fraction of the whole model's
        float32 bytes, or a size in bytes). Or a whole :class:`CompressionConfig`,
        which holds the budget and every setting: ``compress(model,
        config)``, the settings then not given again as keywords.
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
    tokenizer : callable, default=None
        For calibration texts, when the model has no tokenizer of its own.
    progress : bool, default=None
        Show a tqdm progress bar over the modules. ``None``: only when the
        modules hold more than two million numbers in all (and tqdm is
        installed).
    sample_weight : array-like of shape (num_embeddings,), default=None
        Row weights of a single Embedding target without calibration (see
        :func:`kflats.factorize.factorize`).
    **settings
        The settings of the run, as keywords: the fields of
        :class:`CompressionConfig` (``unit``, ``allocation``, ``k``,
        ``ranks``, ``side``, ``smoothing``, ``damping``, ``affine``,
        ``n_refine``, ``random_state``, ``bits``, ``group_size``), and
        further parameters of :class:`kflats.KSubspaces` (``init``,
        ``n_init``, ``max_iter``, ``tol``, ...), which become its
        ``fit_params``. ``k`` and ``side`` may also be dicts from module
        names (as in the report) to their own value, which become the
        config's ``overrides``; the modules they leave out take the
        default.

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
        If ``budget`` is out of range or too small for the selected modules
        (in bytes: below the smallest folder reachable, whose size the
        message gives; raised before anything is calibrated or fitted), a
        target matches no module, or the calibration is empty or was
        recorded on another model or for other targets.
    TypeError
        If a selected module is neither an Embedding nor a Linear, or a target
        is neither a string nor a module type.

    See Also
    --------
    CompressionConfig : The settings of a run, as data.
    calibrate : Record a calibration once, for many budgets.
    heal : Distil the compressed model towards the original.

    Notes
    -----
    How the budget is shared out (``allocation``):

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

    What ``unit="bytes"`` does: the budget is a size of the folder that
    :func:`kflats.torch.save_compressed` writes, its weight files, all of
    them: every tensor of the model (the modules left float too: position
    embeddings, norms, the biases of modules not selected) and the
    safetensors headers (counted by an upper bound, a few bytes a tensor
    above the header written). A float in (0, 1] is a fraction of the
    bytes of every tensor of the model as it is (float32 for most models),
    an int >= 2 a size in bytes. The folder's weight files are never
    larger; when even the smallest forms cannot make them fit, compress
    raises before anything is calibrated or fitted, naming the smallest
    size reachable. The report gives the size asked and the folder's bytes
    (``report.size_asked``, ``report.folder_bytes``). The selected modules
    share what the rest of the folder leaves: each takes the form the global
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

    A budget in bytes: the saved folder's weight files to a tenth of the
    model's float32 bytes, both modules stored dense at a few bits or as
    quantized factors:

    >>> small = torch.nn.Sequential(torch.nn.Embedding(300, 32),
    ...                             torch.nn.Linear(32, 64))
    >>> in_bytes = compress(small, 0.1, [torch.nn.Embedding, torch.nn.Linear],
    ...                     unit="bytes")
    >>> in_bytes.size_asked, in_bytes.folder_bytes <= in_bytes.size_asked
    (4684, True)
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
    config, per_module = _as_config(budget, targets, settings)
    return _compress(
        model, config, per_module, calibration, tokenizer, progress, sample_weight
    )


def _compress(
    model, config, per_module, calibration, tokenizer, progress, sample_weight
):
    """compress under one config: select, check, calibrate, then its unit's
    planner plans, fits and swaps in."""
    planner = PLANNERS[config.unit]
    names, named = select_modules(model, config.targets)
    planner.check(config, names, named, sample_weight)
    for param, value in per_module.items():
        _check_names(value, names, param)
    config.check_overrides_match(names)
    _check_sample_weight_use(sample_weight, names, calibration)
    # what each module's fit minimises
    seconds = {}
    if calibration is not None and not isinstance(calibration, Calibration):
        start = time.perf_counter()
        calibration = calibrate(
            model, calibration, tokenizer=tokenizer, targets=names, progress=progress
        )
        seconds["calibrate"] = time.perf_counter() - start
    objectives = module_objectives(
        calibration, names, named, config.smoothing, config.damping
    )
    if config.ranks is None:
        ranks = "uniform" if calibration is None else "adaptive"
        config = replace(config, ranks=ranks)
    config = replace(config, targets=tuple(names))
    report = planner.compress(
        model, names, named, config, objectives, calibration, sample_weight, progress
    )
    report.seconds = {**seconds, **getattr(report, "seconds", {})}
    return report


# compress's keywords that are fields of the config (None: the field's default)
_FIELDS = (
    "allocation",
    "k",
    "ranks",
    "side",
    "smoothing",
    "damping",
    "unit",
    "bits",
    "format",
    "group_size",
)
# fields whose None is a value of its own (not "the default")
_FIT_FIELDS = ("random_state", "affine", "n_refine")


def _as_config(budget, targets, settings):
    """One CompressionConfig from a config, or from compress's keywords: the
    thin keyword front.

    Returns the config and the per-module dicts given as ``k=`` or ``side=``
    (their names are checked against the selection).
    """
    if isinstance(budget, CompressionConfig):
        given = [n for n in _FIELDS if settings.get(n) is not None]
        given += sorted(set(settings) - set(_FIELDS))
        given = (["targets"] if targets is not None else []) + given
        if given:
            raise ValueError(
                "compress takes a CompressionConfig or its settings as keywords, "
                f"not both: got a config and {given}; set them in the config"
            )
        return budget, {}
    fit_params = {n: v for n, v in settings.items() if n not in _FIELDS}
    fields = {n: settings[n] for n in _FIELDS if settings.get(n) is not None}
    if targets is not None:
        fields["targets"] = targets
    per_module, overrides = {}, {}
    for param in ("k", "side"):
        value = fields.get(param)
        if isinstance(value, Mapping):
            per_module[param] = value
            del fields[param]
            for name, v in value.items():
                if v is not None:  # None: the default for that module
                    overrides.setdefault(name, {})[param] = v
    for param in _FIT_FIELDS:
        if param in fit_params:
            fields[param] = fit_params.pop(param)
    if "affine" in fields:
        fields["affine"] = bool(fields["affine"])
    config = CompressionConfig(
        budget, overrides=overrides, fit_params=fit_params, **fields
    )
    return config, per_module


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


def check_budget(
    budget, names, named, allocation, unit="numbers", k=None, format="kflats"
):
    """A budget checked, and feasible for these modules.

    The command line's check, before any heavy work (no calibration, no
    fit). In numbers, returns the budget as a float. In bytes (``named``
    holds the model under ``""``, as :func:`~kflats.torch.models.select_modules`
    returns it), the budget is a size of the whole folder: below the
    smallest size reachable it raises, naming that size; returns the budget
    as the config holds it. ``format``: that of
    :class:`CompressionConfig` (another than ``"kflats"`` needs a model
    with its weights, to trace).
    """
    if unit == "bytes":
        config = CompressionConfig(
            budget, names, unit="bytes", allocation=allocation, k=k, format=format
        )
        BytesPlanner.check(config, names, named, None)
        return config.budget
    _check("budget", budget, _CONSTRAINTS["budget"])
    _check_feasible(float(budget), names, named, allocation)
    return float(budget)
