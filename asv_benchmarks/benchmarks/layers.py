"""Benchmarks of the torch layers against torch.nn and the SVD form, on CPU.

Forward and backward time of :class:`~kflats.torch.ProjectiveEmbedding` and
:class:`~kflats.torch.ProjectiveLinear` (both sides) against the dense layer
and against the SVD form, two factors as plain torch layers (the projective
layer with k = 1), all storing about ``BUDGET`` of the dense layer's numbers.
The projective layers are built with their constructors: random factors and
random cluster ids, since the time of a pass does not depend on the values.

``time_forward`` is inference (eval mode, no autograd); ``time_backward`` is
the backward of a forward recorded in ``setup``, gradients cleared first.
Torch runs on ``TORCH_THREADS`` threads. Skipped when torch is not installed.
"""

import numpy as np

from . import common
from .common import zipf_weights

BUDGET = 0.25
TORCH_THREADS = 1


def _rank(n, d, k):
    """The largest rank of k clusters of n rows within BUDGET * n * d numbers."""
    ids = n if k > 1 else 0
    return int((BUDGET * n * d - ids) // (n + k * d))


def _import_torch():
    try:
        import torch
    except ImportError as exc:
        raise NotImplementedError(f"torch unavailable: {exc}") from exc
    torch.set_num_threads(TORCH_THREADS)
    torch.manual_seed(0)
    return torch


class _LayerBenchmark(common.Benchmark):
    """Forward and backward of ``self.layer`` on ``self.x``."""

    def time_forward(self, form):
        with self.torch.no_grad():
            self.layer.eval()(self.x)

    def time_backward(self, form):
        self.layer.zero_grad(set_to_none=True)
        if self.x.requires_grad:
            self.x.grad = None
        self.out.backward(self.grad, retain_graph=True)

    def _record(self):
        """Record one training forward, for ``time_backward``."""
        self.layer.train()
        self.out = self.layer(self.x)
        self.grad = self.torch.randn_like(self.out)


class EmbeddingBenchmark(_LayerBenchmark):
    """A 30522 x 384 table (float32), a batch of 32 x 128 token ids.

    ``form``: ``nn.Embedding``; the SVD form ``nn.Embedding(n, r)`` then
    ``nn.Linear(r, 384, bias=False)``, r = 94; ``ProjectiveEmbedding`` with
    k = 1 (r = 94) or k = 8 (rank 86 each). The ids are drawn with Zipf
    frequencies, so that they repeat as in text.
    """

    param_names = ["form"]
    params = (["dense", "svd", "projective-k1", "projective-k8"],)

    def setup(self, form):
        torch = self.torch = _import_torch()
        from torch import nn

        from kflats.torch import ProjectiveEmbedding

        n, d = 30_522, 384
        rng = np.random.default_rng(0)
        p = zipf_weights(n)
        ids = rng.choice(n, size=(32, 128), p=p / p.sum())
        self.x = torch.from_numpy(ids)
        if form == "dense":
            self.layer = nn.Embedding(n, d)
        elif form == "svd":
            r = _rank(n, d, 1)
            self.layer = nn.Sequential(nn.Embedding(n, r), nn.Linear(r, d, bias=False))
        else:
            k = int(form.rsplit("k", 1)[1])
            labels = rng.integers(k, size=n)
            self.layer = ProjectiveEmbedding(n, d, [_rank(n, d, k)] * k, labels)
        self._record()


class LinearBenchmark(_LayerBenchmark):
    """A 384 -> 1536 Linear layer (weight 1536 x 384, float32), 4096 rows.

    ``form``: ``nn.Linear``; the SVD form, ``nn.Linear(384, r, bias=False)``
    then ``nn.Linear(r, 1536)``, r = 76; ``ProjectiveLinear`` clustering the
    input features (k = 1: r = 76; k = 8: rank 11 each) or the output neurons
    (k = 1: r = 76; k = 8: rank 31 each). The input requires grad, as a
    hidden layer's does.
    """

    param_names = ["form"]
    params = (["dense", "svd", "input-k1", "input-k8", "output-k1", "output-k8"],)

    def setup(self, form):
        torch = self.torch = _import_torch()
        from torch import nn

        from kflats.torch import ProjectiveLinear

        d_in, d_out = 384, 1536
        self.x = torch.randn(4096, d_in, requires_grad=True)
        if form == "dense":
            self.layer = nn.Linear(d_in, d_out)
        elif form == "svd":
            r = _rank(d_out, d_in, 1)
            self.layer = nn.Sequential(
                nn.Linear(d_in, r, bias=False), nn.Linear(r, d_out)
            )
        else:
            side, k = form.split("-k")
            k = int(k)
            # the clustered rows: input features, or output neurons
            n, m = (d_in, d_out) if side == "input" else (d_out, d_in)
            labels = np.random.default_rng(0).integers(k, size=n)
            self.layer = ProjectiveLinear(
                d_in, d_out, [_rank(n, m, k)] * k, labels, side=side
            )
        self._record()
