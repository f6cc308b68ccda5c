"""CompressionConfig: what :func:`compress` does, as data checked in one place."""

import fnmatch
import inspect
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import KW_ONLY, asdict, dataclass, field, fields, replace

import numpy as np
from sklearn.utils._param_validation import (
    Interval,
    InvalidParameterError,
    Options,
    StrOptions,
    _Constraint,
    make_constraint,
    validate_parameter_constraints,
)
from torch import nn

from kflats._ksubspaces import KSubspaces
from kflats.quantize._grid import SUPPORTED_BITS

__all__ = ["CompressionConfig"]


class _Interval(Interval):
    """scikit-learn's Interval, refusing bools (``True`` is no number of clusters)."""

    def is_satisfied_by(self, val):
        if isinstance(val, bool) or not isinstance(val, self.type):
            return False
        # float(): Interval's NaN test takes no Fraction
        return (val if isinstance(val, numbers.Integral) else float(val)) in self


class _SequenceOf(Options):
    """A non-empty sequence (not a str) of items that satisfy one constraint.

    An Options only so that scikit-learn's ``make_constraint`` takes it as is
    (it takes no other constraint class of its own).
    """

    def __init__(self, item, text, *, distinct=False):
        _Constraint.__init__(self)
        self.item, self.text, self.distinct = make_constraint(item), text, distinct

    def is_satisfied_by(self, val):
        if isinstance(val, str) or not isinstance(val, Sequence) or not val:
            return False
        if not all(self.item.is_satisfied_by(v) for v in val):
            return False
        return not self.distinct or len(set(val)) == len(val)

    def __str__(self):
        return self.text


_K = _Interval(numbers.Integral, 1, None, closed="left")
_KS = [None, _K, _SequenceOf(_K, "a non-empty sequence of ints >= 1")]
_SIDE = StrOptions({"auto", "input", "output"})
#: Parameters of KSubspaces that a fit may set (the others are the fit's own).
_FIT_PARAMS = tuple(
    name
    for name in inspect.signature(KSubspaces).parameters
    if name not in ("k", "j", "affine", "random_state")
)

#: What an override may set for the modules its pattern matches.
_OVERRIDE_KEYS = {"k": _KS, "side": [_SIDE]}

# scikit-learn's _parameter_constraints: every field, the values it accepts
_CONSTRAINTS = {
    "budget": [_Interval(numbers.Real, 0, 1, closed="right")],
    "unit": [StrOptions({"numbers", "bytes"})],
    "targets": [None, str, type, Sequence],
    "allocation": [StrOptions({"global", "uniform"})],
    "k": _KS,
    "ranks": [None, StrOptions({"adaptive", "uniform"})],
    "side": [_SIDE],
    "overrides": [Mapping],
    "smoothing": [_Interval(numbers.Real, 0, None, closed="left")],
    "damping": [_Interval(numbers.Real, 0, None, closed="left")],
    "affine": ["boolean"],
    "n_refine": [_Interval(numbers.Integral, 0, None, closed="left")],
    # not "random_state": it takes True for 1
    "random_state": [
        None,
        _Interval(numbers.Integral, 0, 2**32 - 1, closed="both"),
        np.random.RandomState,
    ],
    "fit_params": [Mapping],
    "bits": [
        None,
        _SequenceOf(
            Options(numbers.Integral, set(SUPPORTED_BITS)),
            f"a non-empty sequence of distinct ints among {SUPPORTED_BITS}",
            distinct=True,
        ),
    ],
    "group_size": [None, _K],
    "format": [StrOptions({"kflats", "onnx", "gguf"})],
}
#: The bit widths searched when ``bits`` is None, by format: GGUF's also 5
#: bits (its Q5_0 and Q5_1 blocks); no operator of the ONNX file nor any
#: uniform peer of the folder stores 5-bit codes.
DEFAULT_BITS = {
    "kflats": (8, 6, 4, 3, 2),
    "onnx": (8, 6, 4, 3, 2),
    "gguf": (8, 6, 5, 4, 3, 2),
}
#: A budget in bytes may also be a byte count.
_BYTES_BUDGET = [
    *_CONSTRAINTS["budget"],
    _Interval(numbers.Integral, 2, None, closed="left"),
]


def _check(name, value, constraints, caller="CompressionConfig"):
    """Raise InvalidParameterError unless one of the constraints accepts value."""
    validate_parameter_constraints({name: constraints}, {name: value}, caller)


def _check_overrides(overrides):
    for pattern, settings in overrides.items():
        if not isinstance(pattern, str):
            raise InvalidParameterError(
                f"overrides must map name patterns (str) to settings, got key "
                f"{pattern!r}"
            )
        if not isinstance(settings, Mapping):
            raise InvalidParameterError(
                f"overrides[{pattern!r}] must be a dict of settings among "
                f"{sorted(_OVERRIDE_KEYS)}, got {settings!r}"
            )
        unknown = sorted(set(settings) - set(_OVERRIDE_KEYS))
        if unknown:
            raise InvalidParameterError(
                f"overrides[{pattern!r}] sets {unknown}; an override may set "
                f"{sorted(_OVERRIDE_KEYS)}"
            )
        validate_parameter_constraints(
            _OVERRIDE_KEYS, settings, f"CompressionConfig.overrides[{pattern!r}]"
        )


def _target_to_json(target):
    if isinstance(target, type):
        return {"type": f"torch.nn.{target.__name__}"}
    return target


def _target_from_json(target):
    if not isinstance(target, Mapping):
        return target
    path = target.get("type") if set(target) == {"type"} else None
    module_type = None
    if isinstance(path, str) and path.startswith("torch.nn."):
        module_type = getattr(nn, path.removeprefix("torch.nn."), None)
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise InvalidParameterError(
            f"targets: {target!r} is not a module type of torch.nn; a config "
            "names other modules by pattern"
        )
    return module_type


@dataclass(frozen=True)
class CompressionConfig:
    """What :func:`compress` does: the budget, the modules, how each is fitted.

    Every field is checked when the config is made, in one place (with
    scikit-learn's parameter constraints); :meth:`to_dict` and
    :meth:`from_dict` write it to and read it from plain JSON-ready data, so a
    run can be repeated from its report (``report.config``).

    Parameters
    ----------
    budget : float in (0, 1], or int >= 2 with ``unit="bytes"``
        With ``unit="numbers"``: fraction of the selected modules' weight
        numbers to keep (cluster ids included, biases excluded): of all of
        them together with ``allocation="global"``, of each with
        ``"uniform"``. With ``unit="bytes"``, a size of the folder
        :func:`kflats.torch.save_compressed` writes: its weight files, all
        of them (every tensor of the model, the modules left float included:
        position embeddings, norms, biases; and the safetensors headers). A
        float in (0, 1] is a fraction of the bytes of every tensor of the
        model as it is (float32 for most models); an int >= 2 is a size in
        bytes (``9_000_000`` for 9 MB). The selected modules share what the
        rest leaves.
    targets : str, type, list of them, or None, default=None
        Which modules to replace (see :func:`compress`).
    unit : {"numbers", "bytes"}, default="numbers"
        What the budget counts. ``"bytes"``: each module takes the form that
        the allocation chooses among float32, dense at each of ``bits``,
        and projective factors at a rank (k = 1, or k clusters of an
        Embedding's rows), stored in float32 or at each of ``bits`` (see
        :func:`compress`).
    allocation : {"global", "uniform"}, default="global"
        How the budget is shared out across the modules (see :func:`compress`).
    k : int, sequence of int or None, default=None
        Numbers of clusters to search for every module; ``None``: the grid
        :data:`kflats.factorize.K_GRID`. With ``unit="bytes"``: the numbers
        of clusters of the Embedding modules' projective forms (a Linear's
        are k = 1; an override may not give it more); ``None``: 1 and 16
        for a table of at least 4096 rows under the global allocation, 1
        for the others. Factors with k > 1 are stored in float32 or at the
        ``bits`` up to 4 (all ``bits`` when none is).
    ranks : {"adaptive", "uniform"} or None, default=None
        Rank allocation across the clusters of a module; ``None``:
        ``"adaptive"`` with a calibration, ``"uniform"`` without.
    side : {"auto", "input", "output"}, default="auto"
        Which side of a Linear weight to cluster.
    overrides : dict, default={}
        Per-module settings by name pattern (:mod:`fnmatch` syntax), like
        peft's ``rank_pattern``: ``{"*.intermediate.dense": {"k": 1, "side":
        "output"}}``. An override may set ``"k"`` and ``"side"``; the patterns
        apply in order, a later one winning for the settings it names. Each
        pattern must match a selected module.
    smoothing : float >= 0, default=1.0
        Added to every token count of a calibrated Embedding's objective.
    damping : float >= 0, default=1e-2
        Added to the diagonal of a calibrated Linear's input moment, relative
        to its mean.
    affine : bool, default=False
        Fit affine flats (each cluster stores its mean).
    n_refine : int >= 0, default=10
        Rounds of row reassignment with adaptive ranks (see
        :func:`kflats.factorize.factorize`).
    random_state : int, RandomState instance or None, default=None
        Seeds every fit; an int makes the run reproducible.
    fit_params : dict, default={}
        Further parameters of :class:`kflats.KSubspaces` (``init``,
        ``n_init``, ``max_iter``, ``tol``, ``verbose``, ``backend``,
        ``device``).
    bits : sequence of int or None, default=None
        Bit widths the forms of ``unit="bytes"`` may store their matrices
        in (among 2, 3, 4, 5, 6 and 8). ``None``: 8, 6, 4, 3 and 2, and 5
        too with ``format="gguf"`` (its Q5_0 and Q5_1 blocks).
    group_size : int or None, default=None
        Entries per scale of a quantized matrix, with ``unit="bytes"``; it
        must divide the row length of every selected module (its
        ``in_features`` or ``embedding_dim``), and the ranks of projective
        forms are then its multiples. ``None``: dense matrices are tried in
        the groups of uniform quantization by bit width (128 for 8 bits, 64
        for 6, 32 below) and in groups of 128 (6, 5, 4 and 3 bits); factors in
        groups of 32 at most; each halved until it divides the row length
        (one group per row when none of 8 or more does).
    format : {"kflats", "onnx", "gguf"}, default="kflats"
        The file the folder will be exported to, with ``unit="bytes"``.
        ``"kflats"``: the folder itself (:func:`kflats.torch.save_compressed`).
        ``"onnx"``: :func:`kflats.torch.export.export_onnx`'s model file; the
        search keeps only the forms that file holds packed, in its
        operators' own forms (float32; a Linear's weight or its k = 1
        factors at 4 bits, as ``MatMulNBits``; an embedding table at 2, 4
        or 8 bits, or its k = 1 factors' coefficients at 4, as
        ``GatherBlockQuantized``, those factors' small bases dequantized
        when the session starts; groups of a power of two from 16), each
        counted at its bytes in that file, and the budget is a size of that
        file (``onnx/model.onnx``). ``"gguf"``: the GGUF file
        :func:`kflats.torch.export.export_gguf` writes of a causal LM read
        from a GGUF file (:func:`kflats.torch.io.gguf_source`); the search
        keeps float32 and, in groups of 32, Q8_0's, Q5_0's, Q5_1's, Q4_0's
        and Q4_1's grids (8, 5 and 4 bits symmetric, 5 and 4 bits with
        float16 zero points), and the budget is a size of that file, the
        source's metadata included, counted exactly. Another format than
        ``"kflats"`` needs ``unit="bytes"``.

    Raises
    ------
    ValueError
        If a field is out of its range or of the wrong type (the error is
        also a TypeError), naming the field and what it accepts.

    Examples
    --------
    >>> from kflats.torch import CompressionConfig
    >>> config = CompressionConfig(0.5, targets="*.dense",
    ...                            overrides={"out.dense": {"k": 1}})
    >>> config.module_settings("out.dense"), config.module_settings("a.dense")
    ((1, 'auto'), (None, 'auto'))
    >>> CompressionConfig.from_dict(config.to_dict()) == config
    True
    >>> CompressionConfig(1.5)  # doctest: +IGNORE_EXCEPTION_DETAIL
    Traceback (most recent call last):
    ...
    InvalidParameterError: The 'budget' parameter of CompressionConfig must be a
    float in the range (0.0, 1.0]. Got 1.5 instead.
    """

    budget: float
    targets: object = None
    _: KW_ONLY
    unit: str = "numbers"
    allocation: str = "global"
    k: object = None
    ranks: str | None = None
    side: str = "auto"
    overrides: dict = field(default_factory=dict)
    smoothing: float = 1.0
    damping: float = 1e-2
    affine: bool = False
    n_refine: int = 10
    random_state: object = None
    fit_params: dict = field(default_factory=dict)
    bits: tuple | None = None
    group_size: int | None = None
    format: str = "kflats"

    def __post_init__(self):
        _check("unit", self.unit, _CONSTRAINTS["unit"])
        constraints = dict(_CONSTRAINTS)
        if self.unit == "bytes":
            constraints["budget"] = _BYTES_BUDGET
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        validate_parameter_constraints(constraints, values, "CompressionConfig")
        _check_overrides(self.overrides)
        if self.format != "kflats" and self.unit != "bytes":
            raise InvalidParameterError(
                f"format={self.format!r} takes unit='bytes': the forms a file "
                "format holds are chosen under a size in bytes (a budget in "
                "numbers keeps float factors, which any format writes: leave "
                "format='kflats' and export the folder)"
            )
        unknown = sorted(set(self.fit_params) - set(_FIT_PARAMS))
        if unknown:
            raise InvalidParameterError(
                f"fit_params sets {unknown}; it may set the KSubspaces "
                f"parameters {_FIT_PARAMS}"
            )
        set_ = object.__setattr__
        if self.budget <= 1:
            set_(self, "budget", float(self.budget))
        else:  # a byte count
            set_(self, "budget", int(self.budget))
        if self.bits is None:
            set_(self, "bits", DEFAULT_BITS[self.format])
        set_(self, "bits", tuple(int(b) for b in self.bits))
        if self.group_size is not None:
            set_(self, "group_size", int(self.group_size))
        set_(self, "affine", bool(self.affine))
        if isinstance(self.targets, Sequence) and not isinstance(self.targets, str):
            set_(self, "targets", tuple(self.targets))
        if self.k is not None and not isinstance(self.k, numbers.Integral):
            set_(self, "k", tuple(int(v) for v in self.k))
        overrides = {}
        for pattern, settings in self.overrides.items():
            settings = dict(settings)
            if isinstance(settings.get("k"), Sequence):
                settings["k"] = tuple(int(v) for v in settings["k"])
            overrides[pattern] = settings
        set_(self, "overrides", overrides)
        set_(self, "fit_params", dict(self.fit_params))

    def module_settings(self, name):
        """``(k, side)`` for the module of this qualified name, overrides applied.

        Parameters
        ----------
        name : str
            Qualified module name.

        Returns
        -------
        k : int, tuple of int or None
        side : str
        """
        settings = {"k": self.k, "side": self.side}
        for pattern, override in self.overrides.items():
            if fnmatch.fnmatchcase(name, pattern):
                settings.update(override)
        return settings["k"], settings["side"]

    def check_overrides_match(self, names):
        """Raise ValueError if an override pattern matches none of ``names``."""
        for pattern in self.overrides:
            if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
                raise ValueError(
                    f"overrides[{pattern!r}] matches none of the selected modules "
                    f"{list(names)}"
                )

    def to_dict(self):
        """The config as plain JSON-ready data (lists, dicts, str, numbers).

        Returns
        -------
        config : dict
            One entry per field; a module type among the targets is written
            ``{"type": "torch.nn.Linear"}``.

        Raises
        ------
        ValueError
            If ``random_state`` is a RandomState instance, or a target type is
            not one of :mod:`torch.nn`: no file can hold them.
        """
        if isinstance(self.random_state, np.random.RandomState):
            raise InvalidParameterError(
                "random_state is a RandomState instance, which no file can "
                "hold: give an int to write the config"
            )
        out = asdict(replace(self, targets=None))
        targets = self.targets
        if isinstance(targets, (tuple, type)):
            for t in targets if isinstance(targets, tuple) else (targets,):
                if isinstance(t, type) and getattr(nn, t.__name__, None) is not t:
                    raise InvalidParameterError(
                        f"targets holds {t.__module__}.{t.__qualname__}, not a "
                        "type of torch.nn: name those modules by pattern"
                    )
        if isinstance(targets, tuple):
            targets = [_target_to_json(t) for t in targets]
        out["targets"] = _target_to_json(targets)
        if isinstance(self.k, tuple):
            out["k"] = list(self.k)
        out["bits"] = list(self.bits)
        for settings in out["overrides"].values():
            if isinstance(settings.get("k"), tuple):
                settings["k"] = list(settings["k"])
        return out

    @classmethod
    def from_dict(cls, data):
        """The config that :meth:`to_dict` wrote.

        Parameters
        ----------
        data : dict
            As :meth:`to_dict` returns it (``budget`` required).

        Returns
        -------
        config : CompressionConfig

        Raises
        ------
        ValueError
            If ``data`` is not a dict, names a field that does not exist, or
            holds a value a field does not accept.
        """
        if not isinstance(data, Mapping):
            raise InvalidParameterError(
                f"a CompressionConfig is read from a dict, got {type(data).__name__}"
            )
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise InvalidParameterError(
                f"unknown CompressionConfig fields {unknown}; the fields are {names}"
            )
        if "budget" not in data:
            raise InvalidParameterError("a CompressionConfig needs a budget")
        data = dict(data)
        targets = data.get("targets")
        if isinstance(targets, list):
            data["targets"] = [_target_from_json(t) for t in targets]
        else:
            data["targets"] = _target_from_json(targets)
        return cls(**data)


def _search_options_of(config):
    """The checked fit options (:func:`kflats.factorize.factorize`'s) of a config."""
    from kflats.factorize._search import search_options

    return search_options(
        config.ranks,
        config.affine,
        config.random_state,
        config.n_refine,
        config.fit_params,
    )
