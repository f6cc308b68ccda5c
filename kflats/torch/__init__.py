"""PyTorch layers built on projective clustering, and model compression.

Needs PyTorch (``pip install kflats[torch]``); ``import kflats`` alone never
imports torch.

- :class:`ProjectiveEmbedding` and :class:`ProjectiveLinear` replace an
  :class:`torch.nn.Embedding` or :class:`torch.nn.Linear` by one low-rank
  factor pair per cluster of rows (tokens, or input features).
- :func:`compress` replaces chosen modules of a model in place, under a
  :class:`CompressionConfig` (or its settings as keywords); its
  :class:`CompressionReport` says what it did, and holds the config.
- :func:`save_compressed` writes a compressed model to a self-contained
  folder (safetensors and JSON, no pickle; a transformers or
  sentence-transformers model with its config and tokenizer);
  :func:`load_compressed` rebuilds the model from it, without the original
  weights and without fitting again.
- :func:`calibrate` records, in one pass over calibration text, what the
  calibrated objectives need (token counts, input second moments);
  :func:`compress` takes the :class:`Calibration` it returns.
- :func:`heal` distils the compressed model towards the original.
- :func:`token_frequencies` weighs embedding rows by how often a calibration
  text uses each token (pass it as ``sample_weight``).
- :mod:`kflats.torch.functional` holds the pure forward functions.
"""

try:
    import torch  # noqa: F401
except ImportError as exc:  # pragma: no cover - exercised in a subprocess test
    raise ImportError(
        "kflats.torch needs PyTorch, which is not installed. Install it with "
        "`pip install kflats[torch]`."
    ) from exc

from kflats.torch import functional
from kflats.torch.calibration import Calibration, calibrate, token_frequencies
from kflats.torch.compression import (
    CompressionConfig,
    CompressionReport,
    ModuleReport,
    compress,
    heal,
)
from kflats.torch.io import load_compressed, save_compressed
from kflats.torch.layers import (
    ProjectiveEmbedding,
    ProjectiveLinear,
    ProjectiveTiedHead,
    WeightSpec,
)

__all__ = [
    "Calibration",
    "CompressionConfig",
    "CompressionReport",
    "ModuleReport",
    "ProjectiveEmbedding",
    "ProjectiveLinear",
    "ProjectiveTiedHead",
    "WeightSpec",
    "calibrate",
    "compress",
    "functional",
    "heal",
    "load_compressed",
    "save_compressed",
    "token_frequencies",
]
