"""The calibrated error of a module's weight replaced by another form, and
the keywords that quantize a module under its objective."""

import numpy as np
import torch
from torch import nn

from kflats.factorize import damped_moment
from kflats.factorize._linear import whiten
from kflats.torch.layers import dense_weight


class _Measure:
    """The relative calibrated error of a module's weight replaced by another.

    Weights are compared as ``(out, in)`` matrices (an embedding's table as
    it is): a Conv1D's as :func:`~kflats.torch.layers.dense_weight` reads it.
    """

    def __init__(self, module, objective):
        # as the module holds it (float32): rows are taken in float64 by chunks
        self.W = dense_weight(module).detach().to("cpu", torch.float32).numpy()
        self.rows = None
        self.L = None
        # rows weighted (a table's token counts), columns whitened (a Linear's
        # input moment; a table's tied head's): both for a tied table, the
        # metric its factors' spectra are taken in (_Partition), so that its
        # dense and factor forms are compared alike
        if objective is not None and objective.row_weights is not None:
            self.rows = np.sqrt(np.asarray(objective.row_weights, dtype=np.float64))
        if objective is not None and objective.input_moment is not None:
            _, self.L = damped_moment(
                objective.input_moment, self.W.shape[1], objective.damping
            )
        self.total = self._energy(self.W)

    def _chunks(self, A, B=None):
        """Rows of ``A - B`` in float64, by chunks of about ``_CHUNK`` entries."""
        step = max(1, _CHUNK // A.shape[1])
        for a in range(0, A.shape[0], step):
            D = np.asarray(A[a : a + step], dtype=np.float64)
            if B is not None:
                D = D - B[a : a + step]
            yield a, D

    def _energy(self, A, B=None):
        total = 0.0
        for a, D in self._chunks(A, B):
            if self.rows is not None:
                D = D * self.rows[a : a + len(D), None]
            if self.L is not None:
                D = whiten(D, self.L)
            total += float(np.einsum("ij,ij->", D, D))
        return total

    def __call__(self, W_hat):
        err = self._energy(self.W, _as_numpy(W_hat))
        return err / self.total if self.total > 0 else 0.0

    def plain(self, W_hat):
        W_hat = _as_numpy(W_hat)
        total = sum(float(np.einsum("ij,ij->", D, D)) for _, D in self._chunks(self.W))
        diff = sum(
            float(np.einsum("ij,ij->", D, D)) for _, D in self._chunks(self.W, W_hat)
        )
        return diff / total if total > 0 else 0.0


# entries of a matrix measured at once, in float64
_CHUNK = 1 << 20


def _as_numpy(W):
    """A weight as a numpy array, as it is (float32 stays float32)."""
    return W.detach().to("cpu").numpy() if torch.is_tensor(W) else np.asarray(W)


def _quantize_kw(module, objective, method="calibrated"):
    """Keywords of quantize_module_ for a module's objective."""
    kw = {"method": method}
    if objective is None:
        return kw
    if isinstance(module, (nn.Embedding,)) or objective.row_weights is not None:
        kw["token_weights"] = objective.row_weights
    else:
        kw["moment"] = objective.input_moment
        kw["damping"] = objective.damping
    return kw
