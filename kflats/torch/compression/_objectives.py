"""What each module's fit minimises under a calibration: its objective."""

from typing import NamedTuple

import numpy as np
from torch import nn

from kflats.torch.models import adapter_for


class _Objective(NamedTuple):
    """What a module's fit minimises under a calibration.

    An Embedding: its rows weighted by ``row_weights`` (smoothed token
    counts), and, when an output head shares the table, its columns
    whitened by the head's ``input_moment``. A Linear: the expected output
    error under its input second moment, damped by ``damping`` (see
    :func:`kflats.factorize.damped_moment`).
    """

    row_weights: np.ndarray | None = None
    input_moment: np.ndarray | None = None
    damping: float = 0.0


def module_objectives(calibration, names, named, smoothing, damping):
    """Each module's :class:`_Objective`, or ``None`` without a calibration."""
    if calibration is None:
        return dict.fromkeys(names)
    calibration._check_covers(named[""], names)
    out = {}
    for name in names:
        if isinstance(named[name], nn.Embedding):
            out[name] = _Objective(
                row_weights=calibration.token_weights(name, smoothing),
                **_tied_head_moment(named[""], name, calibration, damping),
            )
        else:
            moment = calibration.input_moment(name)
            out[name] = _Objective(input_moment=moment, damping=damping)
    return out


def _tied_head_moment(model, name, calibration, damping):
    """The input moment of an output head tied to Embedding ``name``, if recorded.

    A table that is also the output head computes logits ``h E^T``: its fit
    weighs the rows by their token counts and whitens the columns by the
    head's input moment, so that the logits the model computes move least.
    """
    heads = [
        f
        for f, source in adapter_for(model).ties().items()
        if source == name and f in calibration
    ]
    if not heads:
        return {}
    moment = sum(calibration.input_moment(h) for h in heads) / len(heads)
    return {"input_moment": moment, "damping": damping}
