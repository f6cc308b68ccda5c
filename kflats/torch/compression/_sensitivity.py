"""How much each module matters: its k = 1 spectrum, and how far the output moves.

The global allocation of a budget (:mod:`._plan_numbers`) weighs each
module's errors by rank (the spectrum of its calibrated weight) by its
sensitivity: how far the model's final output moves, on the calibration's
probe batches, per unit of the module's relative error.
"""

import collections
import contextlib
import functools
import hashlib
from typing import NamedTuple

import numpy as np
import torch
from scipy import linalg
from torch import nn

from kflats._size import saving_rank
from kflats._threads import one_blas_thread
from kflats.factorize import damped_moment
from kflats.factorize._linear import unwhiten, whiten
from kflats.torch._progress import progress_bar
from kflats.torch.layers import dense_features, dense_weight
from kflats.torch.models import adapter_for

# each module's sensitivity is measured with its k = 1 factors at the rank
# whose calibrated relative error is about this
# the probe rank: where a module's truncation error is about this. The
# sensitivity probe takes the first rank of the full spectrum under it; the
# rounding noise of quantized factors (_form_errors) the rank of their coarser
# grid nearest to it (a grid can step over it)
PROBE_ERROR = 0.05
# modules holding more than this many numbers (in total) show progress bars
_PROGRESS_NUMBERS = 2_000_000


def _rows_cols(module):
    """``(num_embeddings, embedding_dim)`` or ``(out_features, in_features)``."""
    if isinstance(module, nn.Embedding):
        return module.num_embeddings, module.embedding_dim
    return dense_features(module)[::-1]  # a Linear, or a Conv1D


def _weight64(module):
    return dense_weight(module).detach().to("cpu", torch.float64).numpy()


class _Spectrum(NamedTuple):
    """A module's (calibrated) weight by its k = 1 truncated SVD."""

    gains: np.ndarray  # squared singular values / total: 1 - cumsum = error
    V: np.ndarray  # (d, m) right singular vectors of the (whitened) weight
    L: np.ndarray | None  # Cholesky factor of a Linear's damped input moment


def _weight_spectrum(module, objective):
    """The truncated SVD that the module's objective makes exact, k = 1.

    The SVD of the row-weighted table (an Embedding's objective), of the
    whitened weight ``W L`` (a Linear's), or of the weight (no objective).
    """
    A = _weight64(module)
    L = None
    if objective is not None and objective.row_weights is not None:
        A = A * np.sqrt(objective.row_weights)[:, None]
    if objective is not None and objective.input_moment is not None:
        _, L = damped_moment(objective.input_moment, A.shape[1], objective.damping)
        A = whiten(A, L)
    n, d = A.shape
    if n < d:
        return _wide_spectrum(A, L)
    # the d x d Gram matrix: cheaper than an SVD for tall tables
    G = A.T @ A
    # one thread: a small eigenproblem gains little from more, and threads
    # that wait on a busy machine cost a hundredfold
    with one_blas_thread():
        evals, V = linalg.eigh(G)
    evals, V = np.clip(evals[::-1], 0, None), V[:, ::-1]
    total = float(np.trace(G))
    gains = evals / total if total > 0 else evals
    return _Spectrum(gains, V, L)


def _wide_spectrum(A, L):
    """:func:`_weight_spectrum` of a matrix with fewer rows than columns.

    The n x n Gram matrix ``A A^T`` has the same nonzero eigenvalues as the
    d x d one, and its eigenvectors ``U`` give the right singular vectors
    ``V = A^T U / s``: an n x n eigenproblem instead of a d x d one (768
    against 3072 for a transformer's feed-forward output). The spectrum
    keeps its d gains (the last ``d - n`` are zero) and ``V`` the directions
    of nonzero singular values.
    """
    n, d = A.shape
    K = A @ A.T
    with one_blas_thread():
        evals, U = linalg.eigh(K)
    evals, U = np.clip(evals[::-1], 0, None), U[:, ::-1]
    s = np.sqrt(evals)
    keep = s > (s[0] * n * np.finfo(np.float64).eps if s.size else 0)
    V = (A.T @ U[:, keep]) / s[keep]
    total = float(np.trace(K))
    gains = np.concatenate([evals, np.zeros(d - n)])
    gains = gains / total if total > 0 else gains
    return _Spectrum(gains, V, L)


def _truncated(module, spectrum, rank):
    """The module's weight replaced by its k = 1 factors of this rank."""
    W = _weight64(module)
    V = spectrum.V[:, :rank]
    if spectrum.L is None:
        return W @ V @ V.T
    return unwhiten((W @ spectrum.L @ V) @ V.T, spectrum.L)


def _final_outputs(model, probe):
    """The model's final outputs on the probe batches, with its adapter, batch."""
    adapter = adapter_for(model)
    with torch.no_grad():
        return [(adapter.final(adapter.run(b)), adapter, b) for b in probe]


def _output_distortion(outputs, reference):
    """How far final outputs are from the reference's, averaged over batches.

    The distortion of the model's adapter for its output kind
    (:meth:`kflats.torch.models.ModelAdapter.distortion`): ``1 - cosine``
    of sentence embeddings, the KL divergence of token or class
    distributions for logits, the relative squared error of the last hidden
    state over its unmasked tokens.
    """
    total = 0.0
    with torch.no_grad():
        for (out, adapter, batch), (ref, _, _) in zip(outputs, reference, strict=True):
            total += float(adapter.distortion(out, ref, batch))
    return total / len(outputs)


def _probe_rank(spectrum, n, d):
    """The rank whose relative error is about ``PROBE_ERROR``, and that error."""
    error = 1 - np.cumsum(spectrum.gains)
    rank = int(np.searchsorted(-error, -PROBE_ERROR)) + 1
    rank = min(rank, saving_rank(n, d), spectrum.gains.size)
    return rank, (float(error[rank - 1]) if rank >= 1 else 1.0)


def _bar(names, named, progress, desc):
    """A progress bar over the modules, or None.

    ``progress=None``: shown when the modules hold more than
    ``_PROGRESS_NUMBERS`` numbers (the probes of a small model are quick).
    """
    size = sum(named[n].weight.numel() for n in names)
    return progress_bar(
        progress, size > _PROGRESS_NUMBERS, total=len(names), desc=desc, unit="module"
    )


def _spectra(names, named, objectives, progress=None):
    """Each module's :func:`_weight_spectrum`, with a progress bar."""
    bar = _bar(names, named, progress, "kflats spectra")
    out = {}
    try:
        for name in names:
            out[name] = _weight_spectrum(named[name], objectives[name])
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return out


# the sensitivities last measured, by a fingerprint of all they depend on: a
# command that compresses copies of one model at several budgets (kflats
# compress's curve) probes the model once
_MEASURED = collections.OrderedDict()
_MEASURED_KEPT = 2


def _sensitivities(model, names, named, spectra, probe, progress=None):
    """:func:`_measure_sensitivities`, or the same measure made before.

    Measures are kept by a fingerprint of their inputs (the model's class
    and every tensor of its state, the probe batches, and each module's
    spectrum at its probe rank), so an equal model probed on equal batches
    is not probed again.
    """
    key = _fingerprint(model, names, named, spectra, probe)
    if key in _MEASURED:
        _MEASURED.move_to_end(key)
        return dict(_MEASURED[key])
    out = _measure_sensitivities(model, names, named, spectra, probe, progress)
    _MEASURED[key] = dict(out)
    while len(_MEASURED) > _MEASURED_KEPT:
        _MEASURED.popitem(last=False)
    return out


def _fingerprint(model, names, named, spectra, probe):
    """A digest of what the sensitivities of ``names`` depend on."""
    h = hashlib.blake2b(digest_size=20)

    def add(array):
        array = np.ascontiguousarray(array)
        h.update(f"{array.dtype}{array.shape}".encode())
        h.update(array.tobytes())

    h.update(repr(model).encode())
    for key, tensor in model.state_dict().items():
        h.update(key.encode())
        t = tensor.detach().cpu().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    for batch in probe:
        for key in sorted(batch):
            h.update(key.encode())
            value = batch[key]
            add(value.cpu().numpy() if torch.is_tensor(value) else np.asarray(value))
    for name in names:
        spectrum = spectra[name]
        rank, _ = _probe_rank(spectrum, *_rows_cols(named[name]))
        h.update(name.encode())
        add(spectrum.gains)
        add(spectrum.V[:, :rank])
        if spectrum.L is not None:
            add(spectrum.L)
    return h.hexdigest()


def _measure_sensitivities(model, names, named, spectra, probe, progress=None):
    """Output distortion per unit of relative error, for each module.

    Each module in turn has its weight replaced by its (calibrated) k = 1
    factors at the rank where their relative error is about 5%, the probe
    batches of the calibration run through the model, and the distortion of
    its final output (:func:`_output_distortion`) divided by that error. The
    weight is always put back.

    The blocks that run before a module's own block cannot see its weight:
    their outputs, recorded once on the unchanged model, are replayed instead
    of computed (:class:`_Replay`), so that the probe of a module in the last
    block costs one block, not the whole stack. The outputs are the same.
    ``progress``: as :func:`_bar`.
    """
    probe = _probe_batches(model, probe)
    was_training = model.training
    model.eval()
    bar = _bar(names, named, progress, "kflats sensitivity")
    try:
        replay = _Replay(model)
        with replay.recording():
            reference = _final_outputs(model, probe)
        out = {}
        for name in names:
            module, spectrum = named[name], spectra[name]
            rank, rel = _probe_rank(spectrum, *_rows_cols(module))
            if rel <= 0:
                out[name] = 0.0
                continue
            weight = dense_weight(module)  # a view: writing it writes the module
            saved = weight.detach().clone()
            try:
                with torch.no_grad():
                    weight.copy_(torch.as_tensor(_truncated(module, spectrum, rank)))
                outputs = replay.final_outputs(model, probe, name)
                out[name] = _output_distortion(outputs, reference) / rel
            finally:
                with torch.no_grad():
                    weight.copy_(saved)
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
        model.train(was_training)
    return out


class _Replay:
    """The outputs of a model's blocks on the probe batches, replayed.

    A forward pass runs its blocks in order: those that finish before the
    block holding a module starts do not depend on that module's weight.
    :meth:`recording` keeps, per probe batch, each block's output in the
    order the blocks finish; :meth:`final_outputs` then runs the model with
    the blocks before the module's own returning their recorded outputs.
    A batch in which a block runs more than once (shared blocks) is run
    whole.
    """

    def __init__(self, model):
        named = dict(model.named_modules())
        self.blocks = [
            (f"{stack}.{i}", block)
            for stack in adapter_for(model).block_stacks()
            for i, block in enumerate(named[stack].children())
        ]
        self.logs = []  # per batch: [(block index, output)] in finishing order

    @contextlib.contextmanager
    def recording(self):
        """Record the blocks' outputs of each forward pass run inside."""

        def hook(index):
            def record(module, args, output):
                if self.logs:
                    self.logs[-1].append((index, output))

            return record

        handles = [
            block.register_forward_hook(hook(i))
            for i, (_, block) in enumerate(self.blocks)
        ]
        pre = [
            block.register_forward_pre_hook(self._new_pass)
            for _, block in self.blocks[:1]
        ]
        try:
            yield
        finally:
            for handle in handles + pre:
                handle.remove()

    def _new_pass(self, module, args):
        self.logs.append([])

    def _skipped(self, b, name):
        """``{block index: output}`` that batch ``b`` may replay for ``name``."""
        own = next(
            (i for i, (n, _) in enumerate(self.blocks) if name.startswith(n + ".")),
            None,
        )
        log = self.logs[b] if b < len(self.logs) else []
        order = [i for i, _ in log]
        if own is None or own not in order or len(set(order)) != len(order):
            return {}
        return dict(log[: order.index(own)])

    def final_outputs(self, model, probe, name):
        """:func:`_final_outputs`, the blocks before ``name``'s replayed."""
        if len(self.logs) != len(probe):  # the first block ran once per batch
            return _final_outputs(model, probe)
        out = []
        for b, batch in enumerate(probe):
            with self._replaying(self._skipped(b, name)):
                out += _final_outputs(model, [batch])
        return out

    @contextlib.contextmanager
    def _replaying(self, outputs):
        saved = {}
        for i, output in outputs.items():
            block = self.blocks[i][1]
            saved[i] = vars(block).get("forward")
            block.forward = functools.partial(_replayed, output)
        try:
            yield
        finally:
            for i, forward in saved.items():
                block = self.blocks[i][1]
                if forward is None:
                    del block.forward
                else:
                    block.forward = forward


def _replayed(output, *args, **kwargs):
    """A recorded block output, copied (the caller may change it in place)."""
    if torch.is_tensor(output):
        return output.clone()
    if type(output) in (tuple, list):
        return type(output)(_replayed(o) for o in output)
    return output


def _probe_batches(model, probe):
    """The calibration's probe batches as model inputs on the model's device."""
    device = next(model.parameters()).device
    return [
        {
            k: str(v) if v.dtype.kind == "U" else torch.as_tensor(v).to(device)
            for k, v in batch.items()
        }
        for batch in probe
    ]
