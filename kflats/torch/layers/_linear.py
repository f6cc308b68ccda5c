"""ProjectiveLinear: a Linear layer stored as per-cluster factors of its weight."""

import math

import numpy as np
import torch
from torch import nn

from kflats.factorize import ProjectiveFactors, factorize_linear
from kflats.torch import functional as F
from kflats.torch.layers._base import WeightSpec, _Projective
from kflats.torch.layers._dense import dense_weight, is_conv1d, weight_as_numpy
from kflats.torch.layers._packed import pack_linear, packed_linear

__all__ = ["ProjectiveLinear"]


class ProjectiveLinear(_Projective):
    """A Linear layer stored as factor pairs of clusters of its inputs or outputs.

    ``side="input"``: with the input features split into clusters ``R_c``,
    the layer computes ``y = sum_c (x[R_c] @ U_c) @ V_c + b``: k small layers
    in parallel on disjoint slices of the input, recombined by one
    fully-connected layer (``sum(ranks)`` to ``out_features``). FLOPs per row:
    ``sum_c n_c j_c + sum(ranks) * out_features`` instead of
    ``in_features * out_features``.

    ``side="output"``: with the output neurons split into clusters ``R_c``,
    ``y[R_c] = U_c (V_c x) + b[R_c]``: k two-layer products in parallel, each
    producing its own neurons. FLOPs per row: ``sum(ranks) * in_features +
    sum_c n_c j_c``.

    Parameters
    ----------
    in_features, out_features : int
    ranks : sequence of int
        Rank of each cluster (at most ``out_features`` on the input side,
        ``in_features`` on the output side).
    labels : array-like, default=None
        Cluster id of each input feature (shape (in_features,)) or output
        neuron (shape (out_features,)). ``None``: k contiguous blocks.
    side : {"input", "output"}, default="input"
        Which side of the weight is clustered.
    bias : bool, default=True
    affine : bool, default=False
        Whether each cluster also has a mean (affine flats).
    device, dtype : optional

    Attributes
    ----------
    coefficients : torch.nn.ParameterList
        ``coefficients[c]`` of shape (n_c, ranks[c]), the features (input
        side) or neurons (output side) of cluster c in ascending order.
    bases : torch.nn.Parameter of shape (sum(ranks), m)
        The stacked bases, m = out_features on the input side (bases over
        the outputs), m = in_features on the output side.
    means : torch.nn.Parameter of shape (k, bases.shape[1]) or None
    bias : torch.nn.Parameter of shape (out_features,) or None
    labels : torch.Tensor of shape (in_features,) or (out_features,)
    side : str
    k, n_params : int
    compression : float
        ``n_params / (in_features * out_features)`` (the bias not counted).

    See Also
    --------
    ProjectiveEmbedding
    kflats.factorize.factorize_linear : How the factors are found.

    Notes
    -----
    For inference (no gradient to record) the layer runs a packed form, kept
    until a factor changes: the clusters' coefficients placed in one block
    matrix, so that the forward is two GEMMs with contiguous operands (or
    one, with their product, where that is no more flops), equal to the
    grouped form up to floating-point rounding.

    Examples
    --------
    >>> import torch
    >>> from kflats.torch import ProjectiveLinear
    >>> _ = torch.manual_seed(0)
    >>> linear = torch.nn.Linear(64, 32)
    >>> layer = ProjectiveLinear.from_linear(linear, k=2, j=8, random_state=0)
    >>> layer  # doctest: +NORMALIZE_WHITESPACE
    ProjectiveLinear(in_features=64, out_features=32, k=2, ranks=(8, 8),
                     compression=0.531, bias=True)
    >>> layer(torch.randn(5, 64)).shape
    torch.Size([5, 32])
    >>> layer.to_dense()
    Linear(in_features=64, out_features=32, bias=True)
    """

    def __init__(
        self,
        in_features,
        out_features,
        ranks,
        labels=None,
        *,
        side="input",
        bias=True,
        affine=False,
        device=None,
        dtype=None,
    ):
        super().__init__()
        if in_features < 1 or out_features < 1:
            raise ValueError(
                "in_features and out_features must be positive, got "
                f"{in_features} and {out_features}"
            )
        if side not in ("input", "output"):
            raise ValueError(f"side must be 'input' or 'output', got {side!r}")
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.side = side
        rows, cols = (self.in_features, self.out_features)
        if side == "output":
            rows, cols = cols, rows
        self._init_factors(
            rows,
            cols,
            ranks,
            labels,
            affine,
            device,
            dtype,
            "input feature" if side == "input" else "output neuron",
        )
        if bias:
            self.bias = nn.Parameter(
                torch.empty(self.out_features, device=device, dtype=dtype)
            )
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self):
        """Random factors, and a bias drawn like :class:`torch.nn.Linear`'s."""
        self._reset_factors(self.in_features, self.out_features)
        with torch.no_grad():
            # entries of U V get nn.Linear's variance, 1 / (3 in_features)
            for U in self.coefficients:
                U.mul_(1.0 / math.sqrt(3 * self.in_features))
            if self.bias is not None:
                bound = 1.0 / math.sqrt(self.in_features)
                nn.init.uniform_(self.bias, -bound, bound)

    @property
    def compression(self):
        """``n_params / (in_features * out_features)``."""
        return self.n_params / (self.in_features * self.out_features)

    @property
    def weight(self):
        """Shape, dtype and device of the weight, for code written for Linear.

        A :class:`WeightSpec` of shape (out_features, in_features), not a
        tensor: the dense weight is never made.
        """
        return WeightSpec(self, (self.out_features, self.in_features))

    @classmethod
    def from_factors(cls, factors, bias=None, *, device=None, dtype=None):
        """Build the layer from the factors of a weight, of either side.

        Parameters
        ----------
        factors : kflats.factorize.ProjectiveFactors
            As :func:`kflats.factorize.factorize_linear` returns them: the
            factors of ``W.T`` (in_features x out_features, marked
            ``transposed=True``) give an input-side layer, those of ``W``
            (out_features x in_features) an output-side layer.
        bias : Tensor or array-like of shape (out_features,), default=None
            Copied into the layer; ``None`` builds a layer without bias.
        device, dtype : optional
            Default: the bias's device (else CPU) and the factors' dtype.

        Returns
        -------
        layer : ProjectiveLinear
            Computes ``x @ factors.reconstruct() + bias``.

        Examples
        --------
        >>> import numpy as np, torch
        >>> from kflats.factorize import factorize_linear
        >>> from kflats.torch import ProjectiveLinear
        >>> W = np.random.default_rng(0).normal(size=(6, 10)).astype(np.float32)
        >>> f = factorize_linear(W, k=2, j=3, side="input", random_state=0)
        >>> layer = ProjectiveLinear.from_factors(f)
        >>> x = torch.randn(4, 10)
        >>> expected = x.numpy() @ f.reconstruct()
        >>> np.allclose(layer(x).detach().numpy(), expected, atol=1e-5)
        True
        >>> g = factorize_linear(W, k=2, j=3, side="output", random_state=0)
        >>> layer = ProjectiveLinear.from_factors(g)
        >>> layer.side, np.allclose(layer(x).detach().numpy(),
        ...                         x.numpy() @ g.reconstruct().T, atol=1e-5)
        ('output', True)
        """
        if not isinstance(factors, ProjectiveFactors):
            raise TypeError(
                f"factors must be a ProjectiveFactors, got {type(factors).__name__}"
            )
        if factors.transposed:
            side, (in_features, out_features) = "input", factors.shape
        else:
            side, (out_features, in_features) = "output", factors.shape
        if bias is not None:
            bias = torch.as_tensor(bias)
            if bias.shape != (out_features,):
                raise ValueError(
                    f"bias must have shape ({out_features},), got {tuple(bias.shape)}"
                )
            if device is None:
                device = bias.device
        if dtype is None:
            dtype = torch.float64 if factors.dtype == np.float64 else torch.float32
        layer = cls(
            in_features,
            out_features,
            factors.ranks,
            torch.from_numpy(factors.labels),
            side=side,
            bias=bias is not None,
            affine=factors.means is not None,
            device=device,
            dtype=dtype,
        )
        layer._copy_factors(factors)
        if bias is not None:
            with torch.no_grad():
                layer.bias.copy_(bias)
        return layer

    @classmethod
    def from_linear(cls, linear, k=None, j=None, *, budget=None, **factorize_params):
        """Compress a :class:`torch.nn.Linear` by projective clustering of its weight.

        Parameters
        ----------
        linear : torch.nn.Linear or transformers Conv1D
            The layer to compress; its device, dtype and bias are kept. A
            GPT-2 ``Conv1D`` (weight stored in x out, ``y = x W + b``) is a
            Linear in all but name: its weight is read transposed.
        k, j, budget :
            As in :func:`kflats.factorize.factorize_linear`.
        **factorize_params
            Further parameters of :func:`kflats.factorize.factorize_linear`
            (``side``, ``input_moment`` for the calibrated objective,
            ``damping``) and :func:`kflats.factorize.factorize`.

        Returns
        -------
        layer : ProjectiveLinear
            The attribute ``factorization_error`` holds the relative error of
            the fit (calibrated when ``input_moment`` is given), and
            ``weight_error`` the plain relative squared Frobenius error of
            the weight.

        Examples
        --------
        >>> import torch
        >>> from kflats.torch import ProjectiveLinear
        >>> linear = torch.nn.Linear(48, 24)
        >>> layer = ProjectiveLinear.from_linear(linear, budget=0.5, k=2,
        ...                                      random_state=0)
        >>> layer.compression <= 0.5
        True
        """
        if not (isinstance(linear, nn.Linear) or is_conv1d(linear)):
            raise TypeError(
                "linear must be a torch.nn.Linear (or a transformers Conv1D), got "
                f"{type(linear).__name__}"
            )
        weight = dense_weight(linear)
        factors = factorize_linear(
            weight_as_numpy(weight), k, j, budget=budget, **factorize_params
        )
        layer = cls.from_factors(
            factors,
            None if linear.bias is None else linear.bias.detach(),
            device=weight.device,
            dtype=weight.dtype,
        )
        layer.factorization_error = factors.error
        layer.weight_error = factors.weight_error
        return layer

    def forward(self, input):
        # read once: a factor held packed is dequantized at each read
        coefficients = list(self.coefficients)
        bases, means = self.bases, self.means
        packed = self._packed(
            lambda U, V, mu: pack_linear(self.side, self._order, self.sizes, U, V, mu),
            coefficients,
            bases,
            means,
        )
        if packed is not None:
            return packed_linear(input, *packed, self.bias)
        if self.side == "output":
            return F.projective_linear_output(
                input, self._place, coefficients, bases, self.bias, means
            )
        return F.projective_linear(
            input, self._order, self.sizes, coefficients, bases, self.bias, means
        )

    def to_dense(self):
        """A plain :class:`torch.nn.Linear` holding the reconstructed weight.

        Returns
        -------
        linear : torch.nn.Linear
            Same device, dtype and bias.

        Examples
        --------
        >>> import torch
        >>> from kflats.torch import ProjectiveLinear
        >>> layer = ProjectiveLinear(8, 4, ranks=(2, 2))
        >>> x = torch.randn(3, 8)
        >>> torch.allclose(layer.to_dense()(x), layer(x), atol=1e-6)
        True
        """
        with torch.no_grad():
            weight = self._reconstruct()
            if self.side == "input":
                weight = weight.T
        linear = nn.Linear(
            self.in_features,
            self.out_features,
            bias=self.bias is not None,
            device=weight.device,
            dtype=weight.dtype,
        )
        with torch.no_grad():
            linear.weight.copy_(weight)
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    def extra_repr(self):
        side = ", side='output'" if self.side == "output" else ""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"{self._factor_repr()}{side}, bias={self.bias is not None}"
        )
