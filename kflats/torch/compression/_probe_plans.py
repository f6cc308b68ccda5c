"""Candidate plans run on the calibration's probe: the one whose output moves least.

The byte planner (:mod:`._plan_bytes`) predicts a plan's distortion by adding
its modules' weighted errors, which misjudges plans that push a few modules
far; so each candidate plan is put in place and run on the probe batches,
and the one whose output is nearest the original's is kept.

The probe runs in batches of at most 8 sequences
(:func:`~._fisher.micro_batches`). The
original's outputs are kept for every batch, so that each plan is put in
place once; its log-probabilities are kept in float32, or, past 16 MB a
batch (a vocabulary of 49,152 tokens by 41 positions by 8 sequences: 64 MB),
in float16, which moves every plan's KL divergence alike (the same rounding
of the same reference) and leaves their order as it is.
"""

import contextlib

import numpy as np
import torch

from kflats.torch.compression._fisher import LOGIT_KINDS, micro_batches
from kflats.torch.models import adapter_for, tie_replacements

# log-probabilities of a batch kept in float32 up to this many (16 MB)
_EXACT = 1 << 22


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
def placed(model, named, plan, measured):
    """The model with a plan's forms in place (dense weights dequantized,
    projective layers swapped in with the modules tied to them), restored on
    exit."""
    saved, swapped = {}, {}
    try:
        with torch.no_grad():
            layers = {}
            for name, form in plan.items():
                if form.kind == "dense":
                    weight = named[name].weight
                    saved[name] = weight.detach().clone()
                    weight.copy_(measured[name].dense_weight(form).to(weight.dtype))
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
        with torch.no_grad():
            for name, weight in saved.items():
                named[name].weight.copy_(weight)


def best_on_probe(model, named, plans, measured, batches):
    """Index of the plan whose model moves least from the original on ``batches``.

    Each plan is put in place in turn (:func:`placed`) and run on the
    batches (model inputs on the model's device); the model is always
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
    scores = []
    try:
        with torch.no_grad():
            reference = [_reference(adapter, b) for b in batches]
            for plan in plans:
                with placed(model, named, plan, measured):
                    total = 0.0
                    for batch, ref in zip(batches, reference, strict=True):
                        out = adapter.final(adapter.run(dict(batch)))
                        total += _distortion(adapter, out, ref, batch)
                scores.append(total / len(batches))
    finally:
        model.train(was_training)
    return int(np.argmin(scores)), scores
