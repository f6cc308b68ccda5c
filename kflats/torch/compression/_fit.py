"""One module fitted as a projective layer, and the report of a module's new form."""

from dataclasses import replace

import numpy as np
from torch import nn

from kflats._size import dense_size
from kflats.factorize import damped_moment
from kflats.factorize._linear import (
    check_row_weights,
    linear_factors,
    shared_seed,
    unwhiten,
    whiten,
)
from kflats.factorize._search import search_factors
from kflats.factorize._validation import check_sample_weight
from kflats.torch.compression._report import ModuleReport
from kflats.torch.compression._sensitivity import _rows_cols
from kflats.torch.layers import (
    ProjectiveEmbedding,
    ProjectiveLinear,
    dense_weight,
    weight_as_numpy,
)


def _fit_module(
    module, name, numbers, objective, k, side, options, sample_weight, rank=None
):
    """The projective layer of one module, fitted to store ``numbers``.

    ``rank``: fit at that rank instead (``numbers`` is then ``None``).
    """
    what = f"the share of {name!r}"
    weight = dense_weight(module)  # (out, in), a Conv1D's transposed
    W = weight_as_numpy(weight)
    if isinstance(module, nn.Embedding):
        if module.max_norm is not None:
            raise ValueError(
                f"{name}.max_norm is set; ProjectiveEmbedding does not renormalise "
                "rows, so it cannot reproduce such a layer"
            )
        w = objective.row_weights if objective is not None else sample_weight
        w = check_sample_weight(w, W.shape[0])
        if objective is not None and objective.input_moment is not None:
            if rank is not None:  # a tied table's fit takes its size in numbers
                numbers = rank * sum(W.shape)
            factors = _fit_tied_table(W, w, objective, k, numbers, options, what)
        else:
            factors = search_factors(W, w, k, rank, numbers, options, what)
        layer = ProjectiveEmbedding.from_factors(
            factors,
            padding_idx=module.padding_idx,
            device=weight.device,
            dtype=weight.dtype,
        )
    else:
        moment = None
        if objective is not None:
            moment = damped_moment(
                objective.input_moment, W.shape[1], objective.damping
            )
        check_row_weights(sample_weight, moment, side)
        options = options._replace(random_state=shared_seed(options.random_state))
        factors = linear_factors(
            W, k, rank, numbers, side, moment, sample_weight, options, what
        )
        bias = None if module.bias is None else module.bias.detach()
        layer = ProjectiveLinear.from_factors(
            factors, bias, device=weight.device, dtype=weight.dtype
        )
    layer.factorization_error = factors.error
    layer.weight_error = factors.weight_error
    return layer


def _fit_tied_table(W, w, objective, k, numbers, options, what):
    """Factors of a table that is also an output head: rows weighted, columns
    whitened by the head's input moment, then brought back."""
    _, L = damped_moment(objective.input_moment, W.shape[1], objective.damping)
    whitened = search_factors(
        whiten(W, L).astype(W.dtype), w, k, None, numbers, options, what
    )
    factors = replace(
        whitened,
        V=tuple(unwhiten(v, L, W.dtype) for v in whitened.V),
        means=None if whitened.means is None else unwhiten(whitened.means, L, W.dtype),
    )
    W64 = W.astype(np.float64)
    weight_error = float(np.sum((W64 - factors.reconstruct()) ** 2) / np.sum(W64**2))
    return replace(factors, weight_error=weight_error)


def _module_report(name, module, layer, seconds):
    """The ModuleReport of a module and its new layer (``None``: kept dense)."""
    n, d = _rows_cols(module)
    bias = 0 if getattr(module, "bias", None) is None else module.bias.numel()
    before = dense_size(n, d).numbers + bias
    state_bytes = _state_bytes(module)
    if layer is None:  # as it was: no clusters, no error, no time
        after = {"k": 0, "ranks": (), "params_after": before, "error": 0.0}
        after.update(seconds=0.0, weight_error=0.0, bytes_after=state_bytes)
        after.update(side=None, form="dense")
    else:
        after = {"k": layer.k, "ranks": layer.ranks}
        after.update(params_after=layer.n_params + bias, seconds=seconds)
        after.update(error=layer.factorization_error, weight_error=layer.weight_error)
        after.update(bytes_after=_state_bytes(layer), side=getattr(layer, "side", None))
        after["form"] = "projective"
    return ModuleReport(
        name=name,
        kind=_kind_name(module),
        shape=(n, d),
        params_before=before,
        bytes_before=state_bytes,
        **after,
    )


def _kind_name(module):
    return "Embedding" if isinstance(module, nn.Embedding) else "Linear"


def _state_bytes(module):
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())
