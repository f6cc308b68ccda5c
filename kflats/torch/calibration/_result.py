"""Calibration: what :func:`calibrate` recorded, by module name, and its file.

Token counts for Embeddings and input second moments for Linears, and the
first model-input batches of the pass; :meth:`Calibration.save` writes them
to an ``.npz`` file (no pickle), which :meth:`Calibration.load` reads back
as untrusted data, every member checked before it is used.
"""

import json
import numbers

import numpy as np
from torch import nn

from kflats.torch.layers import dense_features

_FORMAT = "kflats.torch.Calibration"
_VERSION = 1


class Calibration:
    """What :func:`calibrate` recorded, by qualified module name.

    For each :class:`torch.nn.Embedding`, how often each row (token id) was
    looked up; for each :class:`torch.nn.Linear`, the sum of ``x x^T`` over
    its input rows ``x`` (float32 as :func:`calibrate` records it, one array
    for the modules that read the same input; float64 kept as given) and
    their number. Padding positions are
    left out. No activation is kept.

    Parameters
    ----------
    records : dict
        ``name -> {"kind": "Embedding", "counts": ndarray (num_embeddings,)}``
        or ``name -> {"kind": "Linear", "moment_sum": ndarray (in, in),
        "n_rows": int}``.
    n_sequences : int, default=0
        Number of sequences (sentences) the pass read.
    architecture : str, default=""
        Class of the model the pass ran on (informative).
    probe : list of dict, default=()
        The first model-input batches of the pass (about 64 sequences of
        token ids and masks; no activations), as dicts of integer arrays.
        :func:`compress` runs them to weigh each module's error by how much
        it moves the model's output.

    Attributes
    ----------
    names : tuple of str
        The recorded modules, in model order.

    See Also
    --------
    calibrate : Build one.
    kflats.torch.compress : Its ``calibration=`` takes one.

    Examples
    --------
    >>> import numpy as np
    >>> from kflats.torch import Calibration
    >>> cal = Calibration({"emb": {"kind": "Embedding",
    ...                            "counts": np.array([3, 0, 1])}})
    >>> cal.token_weights("emb", smoothing=0.5).tolist()
    [3.5, 0.5, 1.5]
    """

    def __init__(self, records, *, n_sequences=0, architecture="", probe=()):
        self.probe = [{k: np.asarray(v) for k, v in batch.items()} for batch in probe]
        checked = {}
        for name, rec in records.items():
            kind = rec.get("kind")
            if kind == "Embedding":
                counts = np.asarray(rec["counts"])
                if counts.ndim != 1 or counts.dtype.kind not in "iu":
                    raise ValueError(
                        f"counts of {name!r} must be a 1-D integer array, got "
                        f"shape {counts.shape}, dtype {counts.dtype}"
                    )
                checked[name] = {"kind": kind, "counts": counts.astype(np.int64)}
            elif kind == "Linear":
                S = np.asarray(rec["moment_sum"])  # shared arrays stay shared
                if S.dtype not in (np.float32, np.float64):
                    S = S.astype(np.float64)
                if S.ndim != 2 or S.shape[0] != S.shape[1]:
                    raise ValueError(
                        f"moment_sum of {name!r} must be square, got {S.shape}"
                    )
                checked[name] = {
                    "kind": kind,
                    "moment_sum": S,
                    "n_rows": int(rec["n_rows"]),
                }
            else:
                raise ValueError(
                    f"record {name!r} has kind {kind!r}; expected 'Embedding' "
                    "or 'Linear'"
                )
        self._records = checked
        self.n_sequences = int(n_sequences)
        self.architecture = str(architecture)

    @property
    def names(self):
        """The recorded module names, in model order."""
        return tuple(self._records)

    def __contains__(self, name):
        return name in self._records

    def __repr__(self):
        kinds = [r["kind"] for r in self._records.values()]
        return (
            f"Calibration({kinds.count('Embedding')} Embedding, "
            f"{kinds.count('Linear')} Linear, n_sequences={self.n_sequences})"
        )

    def _get(self, name, kind):
        rec = self._records.get(name)
        if rec is None:
            raise KeyError(
                f"the calibration has no record of module {name!r}; it holds "
                f"{list(self._records)[:8]}{' ...' if len(self._records) > 8 else ''}"
            )
        if rec["kind"] != kind:
            raise ValueError(f"{name!r} was recorded as a {rec['kind']}, not a {kind}")
        return rec

    def token_counts(self, name):
        """How often each row of Embedding ``name`` was looked up.

        Parameters
        ----------
        name : str

        Returns
        -------
        counts : ndarray of shape (num_embeddings,), int64
        """
        return self._get(name, "Embedding")["counts"].copy()

    def token_weights(self, name, smoothing=1.0):
        """Row weights for Embedding ``name``: ``count + smoothing``.

        The weight of a token is how often the calibration text used it,
        plus ``smoothing``: a token the calibration never saw keeps the
        weight ``smoothing`` (default 1, as if seen once), so text that
        uses it later still finds it approximated, only with less care than
        a frequent one.

        Parameters
        ----------
        name : str
        smoothing : float, default=1.0
            Must be > 0: a zero weight would let the fit ignore a row.

        Returns
        -------
        weights : ndarray of shape (num_embeddings,), float64
        """
        if isinstance(smoothing, bool) or not (
            isinstance(smoothing, numbers.Real) and 0 < smoothing < np.inf
        ):
            raise ValueError(f"smoothing must be a finite float > 0, got {smoothing!r}")
        return self._get(name, "Embedding")["counts"] + float(smoothing)

    def input_moment(self, name):
        """``E[x x^T]`` of the inputs of Linear ``name`` (undamped).

        Parameters
        ----------
        name : str

        Returns
        -------
        moment : ndarray of shape (in_features, in_features), float64
        """
        rec = self._get(name, "Linear")
        if rec["n_rows"] == 0:
            raise ValueError(f"the calibration saw no input of {name!r}")
        return np.divide(rec["moment_sum"], rec["n_rows"], dtype=np.float64)

    def _check_covers(self, model, names):
        """Raise unless every module in ``names`` was recorded with its shape."""
        named = dict(model.named_modules())
        for name in names:
            module = named[name]
            rec = self._records.get(name)
            kind = "Embedding" if isinstance(module, nn.Embedding) else "Linear"
            if rec is None or rec["kind"] != kind:
                raise ValueError(
                    f"the calibration has no {kind} record of {name!r}: it was "
                    "recorded on another model or for other targets (run "
                    "calibrate with these targets on this model)"
                )
            if kind == "Embedding":
                found, want = rec["counts"].shape[0], module.num_embeddings
            else:
                found, want = rec["moment_sum"].shape[0], dense_features(module)[0]
            if found != want:
                raise ValueError(
                    f"the calibration of {name!r} has size {found}, the module "
                    f"{want}: it was recorded on another model"
                )
            if kind == "Embedding" and not rec["counts"].any():
                raise ValueError(f"the calibration never looked up {name!r}")
            if kind == "Linear" and rec["n_rows"] == 0:
                raise ValueError(f"the calibration saw no input of {name!r}")

    def save(self, path):
        """Write the calibration to an ``.npz`` file (no pickle).

        Parameters
        ----------
        path : str or path-like or file-like

        Examples
        --------
        >>> import numpy as np, os, tempfile
        >>> from kflats.torch import Calibration
        >>> cal = Calibration({"fc": {"kind": "Linear",
        ...                           "moment_sum": np.eye(2), "n_rows": 4}})
        >>> path = os.path.join(tempfile.mkdtemp(), "cal.npz")
        >>> cal.save(path)
        >>> Calibration.load(path).input_moment("fc").tolist()
        [[0.25, 0.0], [0.0, 0.25]]
        """
        meta = {
            "n_sequences": self.n_sequences,
            "architecture": self.architecture,
            "modules": [
                {"name": n, "kind": r["kind"], "n_rows": r.get("n_rows", 0)}
                for n, r in self._records.items()
            ],
        }
        arrays = {
            "format": np.array(_FORMAT),
            "version": np.array(_VERSION),
            "meta": np.array(json.dumps(meta)),
        }
        for i, rec in enumerate(self._records.values()):
            key = "counts" if rec["kind"] == "Embedding" else "moment_sum"
            arrays[f"{key}_{i}"] = rec[key]
        meta["probe"] = [list(batch) for batch in self.probe]
        arrays["meta"] = np.array(json.dumps(meta))
        for b, batch in enumerate(self.probe):
            for i, value in enumerate(batch.values()):
                arrays[f"probe_{b}_{i}"] = value
        np.savez(path, **arrays)

    @classmethod
    def load(cls, path):
        """Read a calibration written by :meth:`save`.

        Parameters
        ----------
        path : str or path-like or file-like

        Returns
        -------
        calibration : Calibration

        Raises
        ------
        ValueError
            If the file is not a kflats calibration, or is corrupt.
        """
        from kflats._npz import NpzArchive

        with NpzArchive(path, what="a kflats calibration file") as npz:
            return cls(**_read_calibration(npz))


def _read_calibration(npz):
    """The arguments of :class:`Calibration` held in an open archive, checked."""
    meta = _read_meta(npz)
    records, probe_keys = _check_meta(npz, meta)
    checked = _read_records(npz, records)
    probe = [
        {key: npz.read(f"probe_{b}_{i}", kinds="biuU") for i, key in enumerate(keys)}
        for b, keys in enumerate(probe_keys)
    ]
    return {
        "records": checked,
        "n_sequences": _count(npz, meta.get("n_sequences"), "n_sequences"),
        "architecture": meta["architecture"],
        "probe": probe,
    }


def _corrupt(npz, problem):
    return ValueError(f"{npz.where} is a corrupt kflats calibration file: {problem}")


def _count(npz, value, what):
    if type(value) is not int or value < 0:
        raise _corrupt(npz, f"{what} must be an integer >= 0, got {value!r}")
    return value


def _read_meta(npz):
    """The file's format and version, checked, and its "meta" JSON member."""
    where = npz.where
    if "format" not in npz or npz.string("format") != _FORMAT:
        raise ValueError(
            f"{where} is not a kflats calibration file (written by Calibration.save)"
        )
    version = npz.read("version", kinds="biufcU") if "version" in npz else None
    if (
        version is None
        or version.shape != ()
        or version.dtype.kind not in "iu"
        or int(version) != _VERSION
    ):
        shown = None if version is None else version.tolist()
        if version is not None and version.size > 4:
            shown = f"an array of shape {version.shape}"
        raise ValueError(
            f"{where} has format version {shown!r}; this kflats reads the integer "
            f"version {_VERSION}"
        )
    try:
        return json.loads(npz.string("meta"))
    except ValueError as exc:
        raise ValueError(f"{where}, member 'meta': not valid JSON: {exc}") from None


def _check_meta(npz, meta):
    """The module entries and probe batches "meta" lists, against the members.

    Returns the module entries by name and the input names of each probe
    batch; the archive must hold the members they name, and no other.
    """
    if not isinstance(meta, dict):
        raise _corrupt(npz, "its 'meta' is not a JSON object")
    modules, probe_keys = meta.get("modules"), meta.get("probe", [])
    if not isinstance(modules, list) or not isinstance(probe_keys, list):
        raise _corrupt(npz, "'meta' needs a list of modules (and of probe keys)")
    if not isinstance(meta.get("architecture"), str):
        raise _corrupt(
            npz, f"architecture {meta.get('architecture')!r} is not a string"
        )
    expected, records = {"format", "version", "meta"}, {}
    for i, m in enumerate(modules):
        if not isinstance(m, dict) or m.get("kind") not in ("Embedding", "Linear"):
            raise _corrupt(
                npz, f"module entry {i} is not an Embedding or Linear record"
            )
        name = m.get("name")
        if not isinstance(name, str):
            raise _corrupt(npz, f"module entry {i} has name {name!r}, not a string")
        if name in records:
            raise _corrupt(npz, f"module {name!r} is recorded twice")
        records[name] = m
        expected.add(f"{'counts' if m['kind'] == 'Embedding' else 'moment_sum'}_{i}")
    for b, keys in enumerate(probe_keys):
        if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
            raise _corrupt(npz, f"probe batch {b} is not a list of input names")
        if len(set(keys)) != len(keys):
            raise _corrupt(npz, f"probe batch {b} names an input twice")
        expected.update(f"probe_{b}_{i}" for i in range(len(keys)))
    npz.only(expected)
    missing = sorted(expected.difference(npz.names))
    if missing:
        raise _corrupt(npz, f"member(s) {missing[:4]} missing")
    return records, probe_keys


def _read_records(npz, records):
    """Each module's counts or moment, read and checked."""
    checked = {}
    for i, (name, m) in enumerate(records.items()):
        if m["kind"] == "Embedding":
            counts = npz.read(f"counts_{i}", kinds="iu", ndim=1)
            if counts.size and counts.min() < 0:
                raise _corrupt(
                    npz, f"the token counts of {name!r} hold negative values"
                )
            checked[name] = {"kind": "Embedding", "counts": counts}
            continue
        n_rows = _count(npz, m.get("n_rows"), f"the row count of {name!r}")
        header = npz.header(f"moment_sum_{i}")
        if len(header.shape) != 2 or header.shape[0] != header.shape[1]:
            raise _corrupt(npz, f"the moment of {name!r} is not square: {header.shape}")
        if header.dtype.kind == "c":
            raise _corrupt(npz, f"the moment of {name!r} is complex ({header.dtype})")
        S = npz.read(f"moment_sum_{i}", kinds="f", ndim=2)
        if not np.isfinite(S).all():
            raise _corrupt(npz, f"the moment of {name!r} holds non-finite values")
        checked[name] = {"kind": "Linear", "moment_sum": S, "n_rows": n_rows}
    return checked
