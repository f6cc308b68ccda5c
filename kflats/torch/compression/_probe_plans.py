"""Candidate plans run on the calibration's probe: the one whose output moves least.

The byte planner (:mod:`._plan_bytes`) predicts a plan's distortion by adding
its modules' weighted errors, which misjudges plans that push a few modules
far; so each candidate plan is put in place and run on the probe batches,
and the one whose output is nearest the original's is kept.

The probe runs in batches of at most 8 sequences
(:func:`~._fisher.micro_batches`), the original and every plan on one batch
before the next: no output outlives its batch, and a plan's dense weights
are dequantized as their modules run (:func:`placed`), each (module, form)
once and kept for the next plans and batches up to :data:`_KEPT_BYTES`
(beyond that, dequantized at each run). The original's
log-probabilities are kept for the batch in float32, or, past 16 MB (a
vocabulary of 49,152 tokens by 41 positions by 8 sequences: 64 MB), in
float16, which moves every plan's KL divergence alike (the same rounding of
the same reference) and leaves their order as it is.
"""

import contextlib

import numpy as np
import torch
from torch import nn

from kflats.torch.compression._fisher import LOGIT_KINDS, micro_batches
from kflats.torch.compression._form_errors import _dense_key
from kflats.torch.models import adapter_for, tie_replacements

# log-probabilities of a batch kept in float32 up to this many (16 MB)
_EXACT = 1 << 22

# the dense forms' dequantized weights kept across the probe's plans and
# batches, at most (bytes)
_KEPT_BYTES = 256 << 20


class _Dequantized:
    """Dense forms' weights, dequantized once and kept up to ``max_bytes``.

    Kept in the order first asked and never dropped: the probe asks for the
    same weights in the same order at every batch, and a cycle over more
    than fits would drop each before it is asked again.
    """

    def __init__(self, max_bytes):
        self.max_bytes, self.nbytes, self._kept = max_bytes, 0, {}

    def weight(self, name, measured, form, dtype):
        key = (name, *_dense_key(form))
        w = self._kept.get(key)
        if w is None:
            w = measured.dense_weight(form).to(dtype)
            size = w.numel() * w.element_size()
            if self.nbytes + size <= self.max_bytes:
                self._kept[key] = w
                self.nbytes += size
        return w


def _reference(adapter, batch):
    """What a plan's output is compared with: the original's, kept small."""
    out = adapter.final(adapter.run(dict(batch)))
    if adapter.output_kind in LOGIT_KINDS:
        logp = torch.log_softmax(out.float(), dim=-1)
        return logp if logp.numel() <= _EXACT else logp.to(torch.float16)
    return out


def _distortion(adapter, out, reference, batch):
    """The adapter's distortion of ``out`` from the kept reference."""
    if adapter.output_kind not in LOGIT_KINDS:
        return float(adapter.distortion(out, reference, batch))
    t = reference.float()
    s = torch.log_softmax(out.float(), dim=-1)
    kl = (t.exp() * (t - s)).sum(-1)
    mask = adapter.mask(batch)
    if adapter.output_kind == "classifier" or mask is None or mask.shape != kl.shape:
        return float(kl.mean())
    m = mask.to(kl.dtype)
    return float((kl * m).sum() / m.sum().clamp_min(1))


@contextlib.contextmanager
def placed(model, named, plan, measured, kept=None):
    """The model with a plan's forms in place, restored on exit.

    A dense form's weight is dequantized when its module runs and dropped
    after (a forward pre-hook puts it in the place of the parameter, in every
    module that holds that parameter, a tied head too; a forward hook puts
    the parameter back), so that no copy of the model's weights is kept
    beyond what ``kept`` (a :class:`_Dequantized`) holds; projective layers
    are swapped in, with the modules tied to them.
    """
    handles, swapped = [], {}
    holders = _holders(model)
    kept = _Dequantized(0) if kept is None else kept
    try:
        layers = {}
        for name, form in plan.items():
            if form.kind == "dense":
                weight = named[name]._parameters["weight"]
                source = (name, measured[name], form, kept)
                for module in holders.get(id(weight), [named[name]]):
                    handles += _dequantized_in(module, weight, source)
            elif form.kind == "projective":
                layers[name] = measured[name].layer(form)
        layers.update(tie_replacements(model, layers))
        for name, layer in layers.items():
            parent, _, child = name.rpartition(".")
            owner = model.get_submodule(parent)
            swapped[name] = (owner, child, getattr(owner, child))
            setattr(owner, child, layer)
        yield model
    finally:
        for owner, child, original in swapped.values():
            setattr(owner, child, original)
        for handle in handles:
            handle.remove()


def _holders(model):
    """The modules holding each parameter, by the parameter's id."""
    out = {}
    for _, module in model.named_modules(remove_duplicate=False):
        weight = module._parameters.get("weight")
        if weight is not None and module not in out.setdefault(id(weight), []):
            out[id(weight)].append(module)
    return out


def _dequantized_in(module, weight, source):
    """Hooks that hold the dequantized form in ``module.weight`` while it runs."""
    name, measured, form, kept = source

    def put(mod, args):
        w = kept.weight(name, measured, form, weight.dtype)
        mod._parameters["weight"] = nn.Parameter(w, requires_grad=False)

    def back(mod, args, output):
        mod._parameters["weight"] = weight

    return [module.register_forward_pre_hook(put), module.register_forward_hook(back)]


def best_on_probe(model, named, plans, measured, batches):
    """Index of the plan whose model moves least from the original on ``batches``.

    Batch by batch, the original runs, then each plan put in place in turn
    (:func:`placed`): no output is kept beyond its batch. The model is always
    restored.

    Returns
    -------
    best : int
    scores : list of float
        Each plan's mean distortion over the batches.
    """
    adapter = adapter_for(model)
    batches = list(micro_batches(batches))
    was_training = model.training
    model.eval()
    totals = np.zeros(len(plans))
    kept = _Dequantized(_KEPT_BYTES)
    try:
        with torch.no_grad():
            for batch in batches:
                reference = _reference(adapter, batch)
                for i, plan in enumerate(plans):
                    with placed(model, named, plan, measured, kept):
                        out = adapter.final(adapter.run(dict(batch)))
                    totals[i] += _distortion(adapter, out, reference, batch)
                    del out
    finally:
        model.train(was_training)
    scores = [float(t) / len(batches) for t in totals]
    return int(np.argmin(scores)), scores


# candidate plans run on the probe: the lowest predicted errors, and uniform
# quantization (each run costs a pass over the probe)
_CHECKED = 4


def checked_plans(plans):
    """The plans worth running on the probe: the first :data:`_CHECKED` (the
    lowest predicted errors first), the best without factor forms if none of
    those is (the factors' errors are modelled, the dense forms' measured),
    and any uniform quantization among the others (every module dense at the
    same bits), so that the plan kept is never worse on the probe than
    uniform quantization that fits."""

    def uniform(plan):
        grids = {(f.kind, f.bits, f.zero_dtype) for f in plan.values()}
        return len(grids) == 1 and next(iter(grids))[0] == "dense"

    def no_factors(plan):
        return all(f.kind != "projective" for f in plan.values())

    first = plans[:_CHECKED]
    if not any(no_factors(p) for p in first):  # the best plan without factors
        first += [p for p in plans[_CHECKED:] if no_factors(p)][:1]
    return first + [p for p in plans[_CHECKED:] if uniform(p) and p not in first]
