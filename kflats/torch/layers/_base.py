"""What the projective layers share: cluster ids, coefficients, stacked bases.

:class:`_Projective` holds the factors of :class:`ProjectiveEmbedding` and
:class:`ProjectiveLinear` (checked cluster ids, one coefficient matrix per
cluster, the clusters' bases stacked, optional means), their reconstruction
and their packed inference form; :class:`WeightSpec` is what a layer's
``weight`` answers for code written for dense layers.
"""

import math

import numpy as np
import torch
from torch import nn

from kflats._size import factors_size
from kflats.factorize import ProjectiveFactors
from kflats.torch.layers._packed import PackedCache, cacheable
from kflats.torch.layers._packed_tensor import PackedTensor


class WeightSpec:
    """What a projective layer's ``weight`` tells: shape, dtype and device.

    Code written for dense layers reads ``layer.weight.dtype`` or
    ``.device`` (T5's feed-forward casts its input to ``wo.weight.dtype``);
    a projective layer has no dense weight, and answers with this small
    read-only record instead of making the matrix. It is not a tensor.

    Attributes
    ----------
    shape : torch.Size
        The dense weight's shape.
    dtype : torch.dtype
    device : torch.device
    requires_grad : bool

    Examples
    --------
    >>> from kflats.torch import ProjectiveLinear
    >>> layer = ProjectiveLinear(8, 4, ranks=(2, 2))
    >>> layer.weight
    WeightSpec(shape=(4, 8), dtype=torch.float32, device=cpu)
    """

    __slots__ = ("_layer", "_shape")

    def __init__(self, layer, shape):
        self._layer = layer
        self._shape = torch.Size(shape)

    @property
    def shape(self):
        return self._shape

    @property
    def dtype(self):
        return self._layer._bases_held().dtype

    @property
    def device(self):
        return self._layer._bases_held().device

    @property
    def requires_grad(self):
        return self._layer._bases_held().requires_grad

    @property
    def ndim(self):
        return len(self._shape)

    def size(self, dim=None):
        return self._shape if dim is None else self._shape[dim]

    def dim(self):
        return len(self._shape)

    def __repr__(self):
        return (
            f"WeightSpec(shape={tuple(self._shape)}, dtype={self.dtype}, "
            f"device={self.device})"
        )


def _check_ranks_labels(n, d, ranks, labels, name_n):
    try:
        ranks = tuple(int(r) for r in ranks)
    except TypeError:
        raise TypeError(f"ranks must be a sequence of int, got {ranks!r}") from None
    if not ranks:
        raise ValueError("ranks must hold one rank per cluster, got an empty sequence")
    k = len(ranks)
    if any(r < 0 or r > d for r in ranks):
        raise ValueError(f"ranks must lie in 0..{d}, got {ranks}")
    if labels is None:
        labels = torch.div(torch.arange(n) * k, max(n, 1), rounding_mode="floor")
    else:
        if torch.is_tensor(labels):
            labels = labels.detach().cpu()
        else:
            labels = torch.as_tensor(np.asarray(labels))
        if labels.shape != (n,) or labels.dtype.is_floating_point:
            raise ValueError(
                f"labels must be an integer tensor of shape ({n},) (one cluster "
                f"id per {name_n}), got shape {tuple(labels.shape)}, "
                f"dtype {labels.dtype}"
            )
        labels = labels.to(torch.int64)
        if n and (int(labels.min()) < 0 or int(labels.max()) >= k):
            raise ValueError(
                f"labels must lie in 0..{k - 1} (k = len(ranks)), got values in "
                f"{int(labels.min())}..{int(labels.max())}"
            )
    sizes = tuple(torch.bincount(labels, minlength=k).tolist())
    return ranks, labels, sizes


def _order(labels):
    """Rows ordered by cluster (ascending within a cluster), and each row's place."""
    order = torch.argsort(labels.to(torch.int64), stable=True)
    place = torch.empty_like(order)
    place[order] = torch.arange(order.numel(), device=order.device)
    return order, place


def label_dtype(k):
    """The smallest integer dtype that holds the cluster ids 0 .. k-1."""
    for dtype in (torch.uint8, torch.int16, torch.int32):
        if k - 1 <= torch.iinfo(dtype).max:
            return dtype
    return torch.int64  # pragma: no cover - more than 2**31 clusters


def _as_tensor(a, device, dtype):
    return torch.as_tensor(np.ascontiguousarray(a)).to(device=device, dtype=dtype)


class _Projective(nn.Module):
    """Storage shared by the two layers: labels, coefficients, stacked bases."""

    # inference (no gradient for the factors) runs the packed form
    # (kflats.torch.layers._packed), built once and kept until a factor changes
    _packed_inference = True
    # whether the forward reads the rows in cluster order (``_order``, n int64:
    # a Linear's input features); every layer reads each row's place in it
    _reads_order = True

    def _init_factors(self, n, d, ranks, labels, affine, device, dtype, name_n):
        factory = {"device": device, "dtype": dtype}
        ranks, labels, sizes = _check_ranks_labels(n, d, ranks, labels, name_n)
        self.ranks = ranks
        self.sizes = sizes
        self.affine = bool(affine)
        self.factorization_error = None
        self.weight_error = None
        self.register_buffer("labels", labels.to(device, label_dtype(len(ranks))))
        self.coefficients = nn.ParameterList(
            nn.Parameter(torch.empty(s, r, **factory))
            for s, r in zip(sizes, ranks, strict=True)
        )
        self.bases = nn.Parameter(torch.empty(sum(ranks), d, **factory))
        if self.affine:
            self.means = nn.Parameter(torch.empty(len(ranks), d, **factory))
        else:
            self.register_parameter("means", None)
        order, place = _order(self.labels)
        if self._reads_order:
            self.register_buffer("_order", order, persistent=False)
        self.register_buffer("_place", place, persistent=False)
        self._packed_cache = PackedCache()
        self.register_load_state_dict_post_hook(_refresh_after_load)

    def _packed(self, build, coefficients, bases, means):
        """The packed form (``build(coefficients, bases, means)``), or None.

        None when the forward must record gradients for the factors (it then
        runs the grouped form), or when a factor is recomputed at each
        access (a parametrization). Factors held as their codes
        (:meth:`_holds_codes`) take the form the same layer holding
        trainable floats takes (grouped while gradients are recorded, so
        that both compute the same floats) and a packed form built for this
        call alone: no float copy of them is kept between calls.
        """
        tensors = (bases, means, *coefficients)
        if not self._packed_inference:
            return None
        if self._holds_codes():
            if torch.is_grad_enabled():
                return None
            return build(coefficients, bases, means)
        if torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in tensors
        ):
            return None
        if not cacheable(tensors):
            return None
        return self._packed_cache.get(
            tensors, lambda: build(coefficients, bases, means)
        )

    def _holds_codes(self):
        """Whether a factor is held packed, as codes dequantized on use."""
        return any(
            isinstance(m, PackedTensor)
            for m in (*self._modules.values(), *self.coefficients._modules.values())
        )

    def _bases_held(self):
        """The bases, or their PackedTensor: their dtype and device, no floats made."""
        packed = self._modules.get("bases")
        return packed if isinstance(packed, PackedTensor) else self.bases

    def _apply(self, fn, *args, **kwargs):
        self._packed_cache.clear()
        return super()._apply(fn, *args, **kwargs)

    @property
    def k(self):
        """Number of clusters."""
        return len(self.ranks)

    @property
    def n_params(self):
        """Numbers the factors store: coefficients, bases, means, cluster ids.

        Counted like :attr:`kflats.factorize.ProjectiveFactors.n_params` (the
        cluster ids count when k > 1); a Linear layer's bias is not included.
        """
        d = self._bases_held().shape[1]
        return factors_size(self.sizes, self.ranks, d, self.affine).numbers

    def _bases_of(self, c):
        start = sum(self.ranks[:c])
        return self.bases[start : start + self.ranks[c]]

    def _reset_factors(self, n, d):
        with torch.no_grad():
            for c, U in enumerate(self.coefficients):
                if U.numel():
                    nn.init.normal_(U, std=math.sqrt(d / self.ranks[c]))
                if self.ranks[c]:
                    nn.init.orthogonal_(self._bases_of(c))
            if self.means is not None:
                self.means.zero_()

    def _copy_factors(self, factors):
        device, dtype = self.bases.device, self.bases.dtype
        with torch.no_grad():
            for c in range(factors.k):
                self.coefficients[c].copy_(_as_tensor(factors.U[c], device, dtype))
                self._bases_of(c).copy_(_as_tensor(factors.V[c], device, dtype))
            if self.means is not None:
                self.means.copy_(_as_tensor(factors.means, device, dtype))

    def _reconstruct(self):
        """Dense (n x d) matrix of the factors, rows in original order."""
        blocks = []
        for c, U in enumerate(self.coefficients):
            block = U @ self._bases_of(c)
            if self.means is not None:
                block = block + self.means[c]
            blocks.append(block)
        stacked = torch.cat(blocks)
        return stacked.index_select(0, self._place)

    def to_factors(self):
        """The layer's current factors, as numpy arrays.

        Returns
        -------
        factors : kflats.factorize.ProjectiveFactors
            For an input-side :class:`ProjectiveLinear`, the factors of
            ``weight.T`` (``transposed=True``); for an output-side one, those
            of ``weight``.

        Examples
        --------
        >>> import torch
        >>> from kflats.torch import ProjectiveEmbedding
        >>> layer = ProjectiveEmbedding(10, 4, ranks=(2, 1))
        >>> layer.to_factors().ranks
        (2, 1)
        """

        def to_np(t):
            t = t.detach().cpu()
            if t.dtype not in (torch.float32, torch.float64):
                t = t.to(torch.float32)
            return t.numpy()

        labels = self.labels.cpu().numpy()
        return ProjectiveFactors(
            labels,
            tuple(to_np(U) for U in self.coefficients),
            tuple(to_np(self._bases_of(c)) for c in range(self.k)),
            means=None if self.means is None else to_np(self.means),
            transposed=getattr(self, "side", None) == "input",
        )

    def __repr__(self):
        # the coefficient list is storage, not a sub-layer: keep the repr short
        return f"{self._get_name()}({self.extra_repr()})"

    def _factor_repr(self):
        n, d = len(self.labels), self._bases_held().shape[1]
        ranks = self.ranks
        shown = ranks if len(ranks) <= 8 else (*ranks[:8], "...")
        text = f"k={self.k}, ranks={tuple(shown)}".replace("'...'", "...")
        text += f", compression={self.n_params / max(n * d, 1):.3f}"
        if self.affine:
            text += ", affine=True"
        return text


def _refresh_after_load(module, incompatible_keys):
    """Recompute the derived index buffers after ``load_state_dict``."""
    labels = module.labels
    sizes = tuple(
        torch.bincount(labels.cpu().to(torch.int64), minlength=module.k).tolist()
    )
    if len(sizes) != module.k or sizes != module.sizes:
        raise RuntimeError(
            f"loaded labels give cluster sizes {sizes}, but the layer was built "
            f"for {module.sizes}; build the layer with the same labels"
        )
    order, place = _order(labels)
    if module._reads_order:
        module._order.copy_(order)
    module._place.copy_(place)
    module._packed_cache.clear()
