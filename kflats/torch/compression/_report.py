"""What compress did: one ModuleReport per module, and the CompressionReport."""

import contextlib
import ctypes
import gc
import sys
import time
from typing import NamedTuple

import numpy as np

__all__ = ["CompressionReport", "ModuleReport"]


class Phases:
    """Wall seconds of each phase of a compression, printed as each ends.

    When a phase ends, the memory it freed is handed back to the system
    (:func:`_trim`): its large temporaries (a 49,152 x 576 table's float
    copies) would otherwise stay in the process's heap, and the next phase's
    peak would stand on them.

    Parameters
    ----------
    show : bool
        Print a line to standard error when a phase ends.
    """

    def __init__(self, show=False):
        self.show = bool(show)
        self.seconds = {}

    @contextlib.contextmanager
    def __call__(self, name):
        start = time.perf_counter()
        try:
            yield
        finally:
            _trim()
            seconds = time.perf_counter() - start
            self.seconds[name] = self.seconds.get(name, 0.0) + seconds
            if self.show:
                print(f"kflats compress: {name} {seconds:.1f} s", file=sys.stderr)


def _trim():
    """Collect garbage, and give the heap's free memory back (glibc only)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # pragma: no cover - not glibc
        pass


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
    form : str or None
        ``"projective"`` (factors) or ``"dense"`` (the weight as a matrix);
        ``None`` in reports written before forms were recorded.
    bits : int or None
        Bits of each stored weight entry (or factor entry) when quantized,
        ``None`` for float32.
    group_size : int or None
        Entries per scale of the quantized matrices (``None``: float32, or
        one group per row when ``bits`` is set).
    zero_dtype : str or None
        Of the zero points of a quantized weight kept dense: ``"uint8"``
        (integers) or ``"float16"`` (the grid spanning each group's own
        range, GGUF's Q4_1 and Q5_1 layout); ``None`` otherwise (a
        symmetric grid stores none: GGUF's Q8_0, Q5_0 and Q4_0).
    compact_scales : bool
        Whether the quantized matrices' scales are compact (a byte each,
        under a power of two shared by 8 groups), rather than float16.
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
    form: str | None = None
    bits: int | None = None
    group_size: int | None = None
    zero_dtype: str | None = None
    compact_scales: bool = False


class CompressionReport(tuple):
    """The :class:`ModuleReport` of every module :func:`compress` replaced.

    A tuple of :class:`ModuleReport`, in model order; ``str(report)`` is a
    table.

    Parameters
    ----------
    modules : iterable of ModuleReport
    config : CompressionConfig, default=None
        The configuration of the run, with its targets resolved to the
        selected module names: ``compress(model, report.config)`` repeats it.
    size_asked : int, default=None
        With a budget in bytes: the size it allows the folder's weight
        files, in bytes.
    model_bytes : int, default=None
        With a budget in bytes: the bytes of every tensor the folder holds
        (the selected modules in their forms, every other tensor as it is).
    header_bytes : int, default=None
        With a budget in bytes: the bytes of the folder's safetensors
        headers, at most.
    seconds : dict, default=None
        Wall seconds of each phase of the run (``"calibrate"``, ``"form
        errors"``, ``"sensitivity"``, ``"allocation"``, ``"probe"``,
        ``"fit"``: those it went through).

    Attributes
    ----------
    config : CompressionConfig or None
        As given.
    size_asked, model_bytes, header_bytes : int or None
        As given (``None`` with a budget in numbers).
    seconds : dict
        As given (empty when not given).
    folder_bytes : int or None
        The folder's weight files, at most: ``model_bytes + header_bytes``,
        never above ``size_asked``. A save writes the tensors' bytes
        exactly, and headers within a few bytes a tensor of their bound.
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

    def __new__(
        cls,
        modules=(),
        config=None,
        size_asked=None,
        model_bytes=None,
        header_bytes=None,
        seconds=None,
    ):
        report = super().__new__(cls, modules)
        report.config = config
        report.size_asked, report.model_bytes = size_asked, model_bytes
        report.header_bytes = header_bytes
        report.seconds = dict(seconds or {})
        return report

    def __getnewargs__(self):
        return (
            tuple(self),
            self.config,
            self.size_asked,
            self.model_bytes,
            self.header_bytes,
            self.seconds,
        )

    @property
    def folder_bytes(self):
        if self.model_bytes is None or self.header_bytes is None:
            return None
        return self.model_bytes + self.header_bytes

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
            "bytes_before": ..., "bytes_after": ..., "config": ...}``;
            ``"config"`` is :meth:`CompressionConfig.to_dict` of the run's
            config (``None`` when there is none, or when its ``random_state``
            is a RandomState instance, which no file can hold). With a
            budget in bytes, also ``"size_asked"``, ``"model_bytes"``,
            ``"header_bytes"`` and ``"folder_bytes"``; ``"seconds"`` when
            the phases were timed.
        """
        modules = []
        for m in self:
            entry = m._asdict()
            entry["shape"] = list(m.shape)
            entry["ranks"] = list(m.ranks)
            entry["share"] = m.params_after / max(self.params_after, 1)
            entry["bytes_share"] = m.bytes_after / max(self.bytes_after, 1)
            modules.append(entry)
        out = {
            "modules": modules,
            "params_before": self.params_before,
            "params_after": self.params_after,
            "bytes_before": self.bytes_before,
            "bytes_after": self.bytes_after,
            "config": _config_dict(self.config),
        }
        if self.seconds:
            out["seconds"] = {k: round(v, 2) for k, v in self.seconds.items()}
        if self.size_asked is not None:
            out["size_asked"] = self.size_asked
            out["model_bytes"] = self.model_bytes
            out["header_bytes"] = self.header_bytes
            out["folder_bytes"] = self.folder_bytes
        return out

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
        in_bytes = any(m.bits is not None for m in self) or (
            self.config is not None and self.config.unit == "bytes"
        )
        if in_bytes:
            header += ("form", "bits", "group", "bytes before", "bytes after")
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
            if in_bytes:
                rows[-1] += (
                    str(m.form),
                    "32" if m.bits is None else str(m.bits),
                    "-" if m.group_size is None else str(m.group_size),
                    str(m.bytes_before),
                    str(m.bytes_after),
                )
        widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
        lines = [
            "  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip()
            for r in rows
        ]
        if self.size_asked is not None:
            lines.append(
                f"folder: {self.folder_bytes} bytes at most ({self.model_bytes} of "
                f"tensors, {self.header_bytes} of headers at most), "
                f"{self.size_asked} asked"
            )
        return "\n".join(lines)


def _config_dict(config):
    if config is None or isinstance(config.random_state, np.random.RandomState):
        return None
    return config.to_dict()
