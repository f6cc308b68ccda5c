"""What each module's fit minimises under a calibration: its objective."""

from torch import nn

from kflats.torch.models import adapter_for


class _Objective:
    """What a module's fit minimises under a calibration.

    An Embedding: its rows weighted by ``row_weights`` (smoothed token
    counts), and, when an output head shares the table, its columns
    whitened by the head's ``input_moment``. A Linear: the expected output
    error under its input second moment, damped by ``damping`` (see
    :func:`kflats.factorize.damped_moment`).

    ``input_moment`` is a float64 ``(in, in)`` array, given, or read from a
    calibration when asked for (``moments``: the calibrated modules whose
    mean moment it is): the objectives of a model's 200 modules hold no
    moment of their own until one is used.
    """

    def __init__(
        self, row_weights=None, input_moment=None, damping=0.0, *, moments=None
    ):
        self.row_weights = row_weights
        self.damping = damping
        self._moment = input_moment
        self._moments = moments  # (calibration, names), read on demand

    @property
    def input_moment(self):
        if self._moment is not None or self._moments is None:
            return self._moment
        calibration, names = self._moments
        moment = calibration.input_moment(names[0])
        for name in names[1:]:
            moment += calibration.input_moment(name)
        if len(names) > 1:
            moment /= len(names)
        return moment

    def __repr__(self):
        kind = "row weights" if self.row_weights is not None else "moment"
        return f"_Objective({kind}, damping={self.damping})"


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
            moments = (calibration, [name])
            out[name] = _Objective(damping=damping, moments=moments)
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
    return {"moments": (calibration, heads), "damping": damping}
