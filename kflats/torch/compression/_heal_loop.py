"""The training loop of heal: Adam, its schedule, and the held-out stop.

Every ``eval_every`` steps (and before the first) the output's distortion
is measured on held-out texts the heal never trains on; the trained
matrices of the best measure are copied aside, and restored at the end, so
that a heal that overfits its texts (or cannot help) leaves the model no
worse on text it did not see than it found it. ``patience`` measures without
a better one stop the loop early.
"""

import math

import torch

from kflats.torch._progress import progress_bar
from kflats.torch.calibration._calibrate import check_count

__all__ = ["HealLosses"]

# progress=None shows a bar from this many steps on
_PROGRESS_STEPS = 20


class HealLosses(list):
    """The loss at each step run (a list), and the held-out measures.

    Attributes
    ----------
    validation : list of (int, float)
        ``(step, loss)``: the held-out output distortion after ``step``
        steps (0: before training); empty without held-out texts.
    best_step : int
        The step whose trained matrices the model holds at the end (the
        last step run without held-out texts).
    stopped_early : bool
        Whether ``patience`` measures without improvement ended the loop
        before ``steps``.
    """

    def __init__(self):
        super().__init__()
        self.validation, self.best_step, self.stopped_early = [], 0, False


def check_held_out(texts, validation, eval_every, patience, steps):
    """``(texts, eval_every, patience)`` of the held-out stop, checked; or None."""
    if validation is None:
        return None
    if isinstance(validation, str) or not isinstance(validation, (list, tuple)):
        raise TypeError(
            f"heal: validation must be a list of strings, got "
            f"{type(validation).__name__}"
        )
    held = list(validation)
    if not held or not all(isinstance(t, str) for t in held):
        raise ValueError("heal: validation must be a non-empty list of strings")
    shared = set(held) & set(texts)
    if shared:
        raise ValueError(
            f"heal: validation must be texts apart from data; {len(shared)} "
            f"are in both (e.g. {next(iter(shared))[:40]!r})"
        )
    every = max(1, steps // 10) if eval_every is None else eval_every
    try:
        check_count(every, "eval_every")
        check_count(patience, "patience")
    except ValueError as exc:
        raise ValueError(f"heal: {exc}") from None
    return held, every, patience


def _schedule(optimizer, steps):
    """Linear warm-up over the first 10% of the steps, then a cosine to 0."""
    warmup = max(1, steps // 10)

    def factor(step):
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _held_out_loss(pair, batches):
    """Mean output distortion of the model on the held-out batches."""
    with torch.no_grad():
        total = sum(float(pair.loss(batch, 0.0)) for batch in batches)
    return total / len(batches)


def train(pair, params, *, steps, batch_size, lr, layer_weight, progress, held_out):
    """Adam on ``params``, one random batch a step.

    ``held_out``: None, or ``(texts, eval_every, patience)``. Returns the
    :class:`HealLosses`.
    """
    optimizer = torch.optim.Adam(params, lr=lr)
    schedule = _schedule(optimizer, steps)
    long = steps >= _PROGRESS_STEPS
    bar = progress_bar(progress, long, total=steps, desc="kflats heal", unit="step")
    losses = HealLosses()
    best = None
    if held_out is not None:
        texts, every, patience = held_out
        batches = [
            pair.batch_of(texts[a : a + batch_size])
            for a in range(0, len(texts), batch_size)
        ]
        best = (_held_out_loss(pair, batches), 0, [p.detach().clone() for p in params])
        losses.validation.append((0, best[0]))
        waited = 0
    try:
        for step in range(1, steps + 1):
            indices = torch.randint(len(pair.texts), (batch_size,)).tolist()
            loss = pair.loss(pair.batch(indices), layer_weight)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            schedule.step()
            losses.append(float(loss.detach()))
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{losses[-1]:.4g}")
            if best is None or (step % every and step < steps):
                continue
            measure = _held_out_loss(pair, batches)
            losses.validation.append((step, measure))
            if measure < best[0]:
                best, waited = (measure, step, [p.detach().clone() for p in params]), 0
            else:
                waited += 1
                if waited >= patience and step < steps:
                    losses.stopped_early = True
                    break
    finally:
        if bar is not None:
            bar.close()
    losses.best_step = len(losses)
    if best is not None:
        losses.best_step = best[1]
        with torch.no_grad():
            for p, kept in zip(params, best[2], strict=True):
                p.copy_(kept)
    return losses
