"""The .npz file format of ProjectiveFactors: written, and read back as data.

:meth:`ProjectiveFactors.save` writes the factors and their search with
``numpy.savez`` (no pickle); :meth:`ProjectiveFactors.load` checks the
format, version and members, and every shape from the headers, before any
array is read.
"""

import json

import numpy as np

_FORMAT = "kflats.ProjectiveFactors"
_FORMAT_VERSION = 2
_READABLE_VERSIONS = (1, 2)


def _write(factors, path):
    """Write ``factors`` to an ``.npz`` file (see :meth:`ProjectiveFactors.save`)."""
    arrays = {
        "format": np.array(_FORMAT),
        "version": np.array(_FORMAT_VERSION, dtype=np.int64),
        "labels": factors.labels,
        "k": np.array(factors.k, dtype=np.int64),
        "error": np.array(np.nan if factors.error is None else factors.error),
        "has_error": np.array(factors.error is not None),
        "transposed": np.array(factors.transposed),
        "search": np.array(json.dumps([list(c) for c in factors.search])),
        "objective": np.array(factors.objective),
        "weight_error": np.array(
            np.nan if factors.weight_error is None else factors.weight_error
        ),
    }
    for c in range(factors.k):
        arrays[f"U_{c}"] = factors.U[c]
        arrays[f"V_{c}"] = factors.V[c]
    if factors.means is not None:
        arrays["means"] = factors.means
    np.savez(path, **arrays)


def _read(cls, npz):
    """The ``cls`` in an open archive, every header checked before its data."""
    where = npz.where
    k = _check_members(npz, _read_version(npz))
    d = _check_shapes(npz, k)
    try:
        search = _read_search(npz.string("search"))
    except (TypeError, ValueError) as exc:
        raise ValueError(
            f"{where}, member 'search': not a list of (k, j, ranks, n_params, "
            f"error) candidates: {exc}"
        ) from None
    means = None
    if "means" in npz:
        means = npz.read("means", kinds="f", shape=(k, d))
    objective = "frobenius"
    if "objective" in npz:
        objective = npz.string("objective")
    has_error = npz.boolean("has_error")
    error = npz.real("error")
    weight_error = npz.real("weight_error") if "weight_error" in npz else None
    try:
        return cls(
            labels=npz.read("labels", kinds="iu"),
            U=tuple(npz.read(f"U_{c}", kinds="f") for c in range(k)),
            V=tuple(npz.read(f"V_{c}", kinds="f") for c in range(k)),
            means=means,
            error=error if has_error else None,
            transposed=npz.boolean("transposed"),
            search=search,
            objective=objective,
            weight_error=_optional_float(weight_error),
        )
    except (TypeError, ValueError) as exc:
        raise ValueError(
            f"{where} is a corrupt kflats ProjectiveFactors file: {exc}"
        ) from None


def _read_version(npz):
    """The archive's format version, after its format is checked."""
    where = npz.where
    if "format" not in npz or npz.string("format") != _FORMAT:
        raise ValueError(
            f"{where} is not a kflats ProjectiveFactors file (no 'format' "
            f"entry equal to {_FORMAT!r})"
        )
    if "version" not in npz:
        raise ValueError(f"{where} has no format version")
    version = npz.read("version", kinds="biufcU")
    if (
        version.shape != ()
        or version.dtype.kind not in "iu"
        or int(version) not in _READABLE_VERSIONS
    ):
        shown = version.tolist() if version.size < 5 else f"shape {version.shape}"
        raise ValueError(
            f"{where} has format version {shown!r} ({version.dtype}); this "
            f"kflats reads the integer versions {_READABLE_VERSIONS}"
        )
    return version


def _check_members(npz, version):
    """The number of clusters k; the archive holds the members of its version."""
    where = npz.where
    fixed = ["format", "version", "labels", "k", "error", "has_error"]
    fixed += ["transposed", "search"]
    optional = ["means"] + (["objective", "weight_error"] if version >= 2 else [])
    missing = [name for name in fixed if name not in npz]
    if missing:
        raise ValueError(
            f"{where} is a corrupt kflats ProjectiveFactors file: member(s) "
            f"{missing} missing"
        )
    # k is bounded by the members the archive holds: U_c and V_c for each c
    k = npz.integer("k", low=1, high=len(npz.names))
    factors = [f"{m}_{c}" for c in range(k) for m in "UV"]
    npz.only(set(fixed + optional + factors))
    missing = [name for name in factors if name not in npz]
    if missing:
        raise ValueError(
            f"{where} is a corrupt kflats ProjectiveFactors file: member(s) "
            f"{missing[:4]} missing"
        )
    return k


def _check_shapes(npz, k):
    """The columns d of the factors, their shapes read from the headers.

    Sizes must add up before anything is read: labels one per row, each
    ``U_c`` (n_c, j) and ``V_c`` (j, d) of one float dtype, the n_c summing
    to the number of labels.
    """
    where = npz.where
    labels = npz.header("labels")
    if len(labels.shape) != 1 or labels.dtype.kind not in "iu":
        raise ValueError(
            f"{where}, member 'labels': a 1-D integer array expected, got "
            f"shape {labels.shape}, dtype {labels.dtype}"
        )
    heads = {f"{m}_{c}": npz.header(f"{m}_{c}") for c in range(k) for m in "UV"}
    V0 = heads["V_0"]
    if V0.dtype not in (np.float32, np.float64) or len(V0.shape) != 2:
        raise ValueError(
            f"{where}, member 'V_0': a 2-D float32 or float64 array expected, "
            f"got shape {V0.shape}, dtype {V0.dtype}"
        )
    d = V0.shape[1]
    rows = 0
    for c in range(k):
        U, V = heads[f"U_{c}"], heads[f"V_{c}"]
        for name, h in ((f"V_{c}", V), (f"U_{c}", U)):
            if h.dtype != V0.dtype or len(h.shape) != 2:
                raise ValueError(
                    f"{where}, member {name!r}: a 2-D {V0.dtype} array "
                    f"expected, got shape {h.shape}, dtype {h.dtype}"
                )
        if V.shape[1] != d or U.shape[1] != V.shape[0]:
            raise ValueError(
                f"{where} is a corrupt kflats ProjectiveFactors file: U_{c} "
                f"has shape {U.shape} and V_{c} {V.shape} (expected (n_c, j) "
                f"and (j, {d}))"
            )
        rows += U.shape[0]
    if rows != labels.shape[0]:
        raise ValueError(
            f"{where} is a corrupt kflats ProjectiveFactors file: the U_c hold "
            f"{rows} rows, the labels {labels.shape[0]}"
        )
    return d


def _read_search(text):
    """The candidates of a saved search, read strictly from their JSON."""
    import math

    def integer(x):
        if type(x) is not int or x < 0:
            raise ValueError(f"{x!r} is not a non-negative integer")
        return x

    def real(x):
        if type(x) not in (int, float) or math.isnan(x):
            raise ValueError(f"{x!r} is not a number")
        return float(x)

    items = json.loads(text)
    if not isinstance(items, list):
        raise ValueError("not a list")
    search = []
    for item in items:
        if not isinstance(item, list) or len(item) != 5:
            raise ValueError(f"{item!r} is not a list of 5 values")
        k, j, ranks, n_params, error = item
        if not isinstance(ranks, list):
            raise ValueError(f"ranks {ranks!r} is not a list")
        ranks = tuple(integer(r) for r in ranks)
        # a plain tuple: ProjectiveFactors makes each a Candidate
        search.append((integer(k), integer(j), ranks, integer(n_params), real(error)))
    return tuple(search)


def _optional_float(value):
    if value is None or np.isnan(value):
        return None
    return float(value)
