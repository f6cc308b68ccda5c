"""How much each module matters to a model whose output is a distribution: Fisher.

The probe of :mod:`._sensitivity` measures each module's sensitivity with a
forward pass per module; on a causal LM of 200 modules and a 49,152-token
vocabulary that is most of the run (about 50 s a module on SmolLM2-135M,
two shared cores, 64 probe sequences). When the output is a distribution
(the logits of a causal LM, a masked LM, an encoder-decoder or a
classifier) and the distortion is the KL divergence from the original's,
its second-order term is the Fisher information of the output
distribution, which one backward pass per batch estimates for every module
at once.

For a module ``y = W x`` whose weight moves by ``dW``, the KL divergence at
position ``t`` is about ``1/2 (g_t^T dW x_t)^2`` averaged over ``g_t``, the
gradient at ``y_t`` of ``log p(y_hat)`` for a token ``y_hat`` drawn from the
model's own distribution (a draw per position). With the rounding error of
each output row ``i`` a fraction ``e`` of that row's calibrated energy
``rho_i = E[y_i^2]``, spread along no favoured input direction,
``E (dW_i x_t)^2 = e rho_i ||x_t||^2 / E||x||^2``, and the mean KL per
position is ``s e`` with

``s = 1/2 sum_i (sum_t g_ti^2 ||x_t||^2) rho_i / (N sum_t ||x_t||^2)``,

``N`` the real positions: the module's sensitivity, in the units of the
probe's (KL per unit of relative calibrated error). An embedding table is
such a module with ``x_t`` a one-hot row. An output head tied to the table
adds a term of its own: there the rounding noise of a token's row ``E_v``
is taken in proportion to the row's plain energy ``||E_v||^2`` (a dense
table's groups lie within rows), the gradient at the logits in expectation
(``p_v (1 - p_v)``), and the term rescaled to the table's objective (rows
weighted by ``w_v``, columns whitened by the head's input moment ``C``):

``s_head = 1/2 [sum_t ||h_t||^2 sum_v p_tv (1 - p_tv) ||E_v||^2] [sum_v w_v
E_v C E_v^T] / (N tr(C) sum_v w_v ||E_v||^2)``,

``C`` and the logits' energies ``E_v C E_v^T`` read off the probe's own
positions.

Measured on SmolLM2-135M (16 probe sentences, 264 positions; each module
alone at 3 bits, g32, the KL divergence measured on the same positions):
the estimate is 1.2-1.9x the measured sensitivity for 8 of 9 Linear
modules across the stack (a value projection 5.4x), the table's input
path 1.43 against 1.46 and its head 16.2 against 10.2 (the head in the
C-weighted form of the Linear modules: 73.4). Without the weights
``||x_t||^2`` (every position alike) the last MLP output's estimate was
7.4x the measured one: its positions differ in norm by orders of
magnitude.
"""

import contextlib

import torch
from torch import nn

from kflats.torch.layers import is_linear
from kflats.torch.models import adapter_for

# output kinds whose distortion is a KL divergence of distributions
LOGIT_KINDS = ("causal_lm", "masked_lm", "seq2seq", "classifier")
# sequences per forward pass (the logits of a 49,152-token vocabulary, their
# softmax and gradient: about 4 x 8 x 41 x 49,152 floats), and per backward
# pass (which also keeps every block's activations); positions whose
# distributions over a vocabulary are summed at once
_MICRO_BATCH, _BACKWARD_BATCH, _POSITIONS = 8, 4, 64


def has_logits(model):
    """Whether the model's distortion is a KL divergence of its logits."""
    return adapter_for(model).output_kind in LOGIT_KINDS


def micro_batches(batches, size=_MICRO_BATCH):
    """Model inputs cut into batches of at most ``size`` sequences."""
    for batch in batches:
        first = next((v for v in batch.values() if torch.is_tensor(v)), None)
        n = first.shape[0] if first is not None and first.dim() > 1 else 1
        for start in range(0, n, size):
            yield {
                k: v[start : start + size] if torch.is_tensor(v) and v.dim() > 1 else v
                for k, v in batch.items()
            }


class _Moments:
    """One module's sums over real positions: ``g^2 ||x||^2`` and ``y^2`` per
    output channel, and ``||x||^2``."""

    def __init__(self):
        self.acc = self.rho = None
        self.xx = 0.0

    def add(self, acc, rho, xx):
        acc, rho = acc.double(), rho.double()
        self.acc = acc if self.acc is None else self.acc + acc
        self.rho = rho if self.rho is None else self.rho + rho
        self.xx += float(xx)

    def sensitivity(self, positions):
        if self.acc is None or positions == 0 or self.xx <= 0:
            return 0.0
        return float(0.5 * (self.acc * self.rho).sum() / (positions * self.xx))


class _HeadMoments:
    """A tied head's sums: ``||h||^2 sum_v p (1 - p) ||E_v||^2``, ``sum_v w_v
    z_v^2`` and ``||h||^2`` over real positions (see the module's notes)."""

    def __init__(self, weight, row_weights):
        E = weight.detach().float()
        self.e2 = (E * E).sum(1)  # ||E_v||^2
        self.w = (
            torch.ones_like(self.e2)
            if row_weights is None
            else torch.as_tensor(row_weights, dtype=torch.float32)
        )
        self.a = self.b = self.xx = 0.0

    def add(self, h, z):
        for a in range(0, len(z), _POSITIONS):  # a vocabulary's width at a time
            hc, zc = h[a : a + _POSITIONS], z[a : a + _POSITIONS]
            hh = (hc * hc).sum(-1)
            p = torch.softmax(zc, dim=-1)
            self.a += float((hh * (p @ self.e2 - (p * p) @ self.e2)).sum())
            self.b += float(((zc * zc) @ self.w).sum())
            self.xx += float(hh.sum())

    def sensitivity(self, positions):
        denom = positions * self.xx * float((self.w * self.e2).sum())
        return 0.0 if denom <= 0 else 0.5 * self.a * self.b / denom


def _real(t, mask):
    """The rows of ``t`` (batch, positions, width) at real positions, 2-D."""
    if mask is not None and t.dim() == 3 and tuple(t.shape[:2]) == tuple(mask.shape):
        return t[mask]
    return t.reshape(-1, t.shape[-1])


class _Hooks:
    """Forward hooks that keep each module's input norms and output energy,
    and tensor hooks that fold the gradient at its output in; a tied head's
    sums from its forward pass alone."""

    def __init__(self, modules, heads):
        self.modules = modules
        self.moments = {
            name: heads[name] if name in heads else _Moments() for name in modules
        }
        self.mask = None

    @contextlib.contextmanager
    def attached(self, first):
        handles = [first.register_forward_hook(self._needs_grad)]
        for name, module in self.modules.items():
            handles.append(module.register_forward_hook(self._hook(name, module)))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    @staticmethod
    def _needs_grad(module, args, output):
        # the first module's output (no parameter trains): where gradients start
        if torch.is_tensor(output) and not output.requires_grad:
            return output.detach().requires_grad_()
        return None

    def _hook(self, name, module):
        embedding = isinstance(module, nn.Embedding)
        moments = self.moments[name]

        def forward(mod, args, output):
            if not torch.is_tensor(output) or not output.requires_grad:
                return
            mask = self.mask
            y = _real(output.detach(), mask).float()
            if isinstance(moments, _HeadMoments):
                moments.add(_real(args[0].detach(), mask).float(), y)
                return
            if embedding:
                xnorm = torch.ones(y.shape[0], dtype=torch.float32)
            else:
                x = _real(args[0].detach(), mask).float()
                xnorm = (x * x).sum(-1)
            rho = (y * y).sum(0)

            def backward(grad):
                g = _real(grad.detach(), mask).float()
                moments.add((g * g * xnorm[:, None]).sum(0), rho, xnorm.sum())

            output.register_hook(backward)

        return forward


def fisher_sensitivities(model, names, named, probe, *, row_weights=None, seed=0):
    """Each module's sensitivity, from one backward pass per probe batch.

    Parameters
    ----------
    model : torch.nn.Module
        Its adapter's output kind is one of :data:`LOGIT_KINDS`.
    names : list of str
        The selected modules (Embedding, Linear or Conv1D).
    named : dict
        Every module by qualified name.
    probe : list of dict
        Model inputs (the calibration's probe batches, on the model's device).
    row_weights : dict, default=None
        The row weights of a table's objective, by name (its tied head's
        term is taken under them); a table without: its rows alike.
    seed : int, default=0
        Of the tokens drawn from the model's distributions.

    Returns
    -------
    sensitivities : dict of str to float
        The mean KL divergence per real position per unit of each module's
        relative calibrated error (see the module's notes); a table tied to
        an output head adds the head's term.
    """
    adapter = adapter_for(model)
    row_weights = row_weights or {}
    ties = {
        follower: source
        for follower, source in adapter.ties().items()
        if source in names and is_linear(named.get(follower))
    }
    modules = {n: named[n] for n in names}
    heads = {}
    for follower, source in ties.items():
        modules[follower] = named[follower]
        heads[follower] = _HeadMoments(named[follower].weight, row_weights.get(source))
    hooks = _Hooks(modules, heads)
    first = _first_module(model, names, named)
    generator = torch.Generator().manual_seed(int(seed))
    positions = 0
    was_training = model.training
    model.eval()
    saved = {p: p.requires_grad for p in model.parameters()}
    try:
        for p in saved:
            p.requires_grad_(False)
        with hooks.attached(first):
            for batch in micro_batches(probe, _BACKWARD_BATCH):
                positions += _backward(adapter, batch, hooks, generator)
    finally:
        for p, flag in saved.items():
            p.requires_grad_(flag)
        model.train(was_training)
    out = {n: hooks.moments[n].sensitivity(positions) for n in names}
    for follower, source in ties.items():
        out[source] += hooks.moments[follower].sensitivity(positions)
    return out


def _first_module(model, names, named):
    """The input embedding: the first module whose output needs gradients."""
    try:
        return named[adapter_for(model).embedding()]
    except (ValueError, KeyError):
        pass
    # no word embedding known: the first selected module in model order
    order = {n: i for i, n in enumerate(named)}
    return named[min(names, key=order.get)]


def _backward(adapter, batch, hooks, generator):
    """One forward and backward pass; returns the real positions it scored."""
    mask = adapter.mask(batch)
    hooks.mask = mask
    with torch.enable_grad():
        logits = adapter.final(adapter.run(dict(batch))).float()
        logp = torch.log_softmax(logits, dim=-1)
        with torch.no_grad():
            drawn = torch.multinomial(
                logp.detach().exp().reshape(-1, logp.shape[-1]), 1, generator=generator
            ).reshape(logp.shape[:-1])
        score = logp.gather(-1, drawn.unsqueeze(-1)).squeeze(-1)
        scored = _scored(adapter, score, mask)
        if scored.numel() and scored.requires_grad:
            scored.sum().backward()
    return int(scored.numel())


def _scored(adapter, score, mask):
    """The log-probabilities at the positions the distortion averages over."""
    if adapter.output_kind == "classifier" or mask is None:
        return score.reshape(-1)
    if mask.shape != score.shape:
        return score.reshape(-1)
    return score[mask]
