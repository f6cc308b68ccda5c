"""Every module quantized alike: the byte road's baseline, the user's alternative."""

from typing import NamedTuple

from kflats.torch.compression._config import CompressionConfig
from kflats.torch.compression._folder_bytes import FolderBudget
from kflats.torch.compression._forms import (
    _DENSE_GROUPS,
    _cheaper_scales,
    _forms,
    grid_options,
)
from kflats.torch.compression._measure import _quantize_kw
from kflats.torch.compression._objectives import module_objectives
from kflats.torch.layers import form_nbytes, quantize_module_


class UniformQuantization(NamedTuple):
    """What :func:`quantize_uniformly` chose: its bits, groups and bytes.

    ``bytes_after``: the quantized modules' bytes; ``folder_bytes``: the
    folder's weight files, at most (every tensor, and the headers' bound).
    """

    bits: int
    group_sizes: list
    bytes_after: int
    folder_bytes: int


def quantize_uniformly(model, names, budget, calibration=None, *, compact_scales=False):
    """Every selected module quantized alike, in place: the user's alternative.

    The bit width and groups (those :func:`kflats.torch.compress` searches
    with ``unit="bytes"``: 8 bits in groups of 128, 6 bits in 64 or 128, 4
    and 3 bits in 32 or 128, 2 bits in 32) whose folder comes closest to
    ``budget`` without exceeding it, or the smallest when none fits; each
    module rounded as compress rounds its dense forms (error fed along the
    calibrated input moment, token weights for an embedding). The budget
    counts as compress's does: the folder's weight files, every tensor and
    the headers.

    Parameters
    ----------
    model : torch.nn.Module
        Modified in place.
    names : list of str
        The modules to quantize (Embedding or Linear), by qualified name.
    budget : float in (0, 1] or int
        A fraction of the bytes of every tensor of the model (float32 for
        most models), or a size in bytes of the folder's weight files.
    calibration : Calibration, default=None
        Recorded on ``model`` for ``names``; ``None``: plain rounding error.
    compact_scales : bool, default=False
        Store each group's scale in a byte under a power of two shared by 8
        groups (:func:`kflats.quantize.quantize`) in each matrix where that
        makes the folder smaller, as ``compress`` does for a folder in
        kflats' format; ``False``: float16 scales, as the quantization peers
        store them.

    Returns
    -------
    chosen : UniformQuantization
        The bits, the group sizes and the bytes of the quantized modules.

    Examples
    --------
    >>> import torch
    >>> from kflats.torch.compression import quantize_uniformly
    >>> model = torch.nn.Sequential(torch.nn.Linear(128, 64))
    >>> quantize_uniformly(model, ["0"], 0.2)
    UniformQuantization(bits=4, group_sizes=[32], bytes_after=5032, folder_bytes=5446)
    >>> quantize_uniformly(torch.nn.Sequential(torch.nn.Linear(128, 64)), ["0"], 0.2,
    ...                    compact_scales=True)
    UniformQuantization(bits=4, group_sizes=[32], bytes_after=4816, folder_bytes=5321)
    """
    named = dict(model.named_modules())
    config = CompressionConfig(budget=budget, unit="bytes")
    folder = FolderBudget(model, names, config.budget)
    bits = tuple(_DENSE_GROUPS)
    forms = {
        n: _cheaper_scales(
            n, _forms(named[n], bits, None, compact=compact_scales), folder
        )
        for n in names
    }
    choices = []  # (bytes in the folder, bits, each module's dense form)
    for bits, groups in _DENSE_GROUPS.items():
        for i in range(len(groups)):
            chosen = {}
            for n in names:
                dense = [f for f in forms[n] if f.kind == "dense" and f.bits == bits]
                chosen[n] = folder.priced(n, dense[min(i, len(dense) - 1)])
            choices.append((sum(f.nbytes for f in chosen.values()), bits, chosen))
    fitting = [c for c in choices if c[0] <= folder.room]

    def size(choice):
        return choice[:2]

    nbytes, bits, chosen = max(fitting, key=size) if fitting else min(choices, key=size)
    objectives = module_objectives(
        calibration, names, named, config.smoothing, config.damping
    )
    for n in names:
        kw = _quantize_kw(named[n], objectives[n])
        grid = grid_options(chosen[n])  # its scales: compact where they pay
        quantize_module_(named[n], bits, chosen[n].group_size, **grid, **kw)
    groups = sorted({f.group_size for f in chosen.values()}, key=str)
    data = sum(
        form_nbytes(named[n], bits, f.group_size, **grid_options(f))
        for n, f in chosen.items()
    )
    return UniformQuantization(bits, groups, data, folder.rest + folder.frame + nbytes)
