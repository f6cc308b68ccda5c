"""Tiny compressed folders for the export tests, built here (nothing downloaded).

Each is a sentence-transformers model (a 2-layer random encoder with
MiniLM's tokenizer, then mean pooling) whose modules kflats compressed: by
hand, one form per module so that every ONNX form is met, or by
``compress(..., unit="bytes")`` as users do.
"""

import shutil
import warnings

import torch
from torch import nn

from kflats.datasets import load_sentences, minilm_model_dir
from kflats.quantize import quantize_module_
from kflats.torch import (
    ProjectiveEmbedding,
    ProjectiveLinear,
    compress,
    save_compressed,
)

HIDDEN, INTERMEDIATE = 48, 96
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt")


def _config(family):
    import transformers as t

    common = dict(vocab_size=30522, max_position_embeddings=128)
    if family == "bert":
        return t.BertModel, t.BertConfig(
            hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=INTERMEDIATE, **common,
        )  # fmt: skip
    if family == "distilbert":
        return t.DistilBertModel, t.DistilBertConfig(
            dim=HIDDEN, n_layers=2, n_heads=2, hidden_dim=INTERMEDIATE, **common
        )
    if family == "mpnet":
        return t.MPNetModel, t.MPNetConfig(
            hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=INTERMEDIATE, **common,
        )  # fmt: skip
    raise ValueError(family)


def tiny_sentence_transformer(family, folder, seed=0):
    """A random 2-layer ``family`` encoder with mean pooling, saved to ``folder``."""
    from sentence_transformers import SentenceTransformer

    try:  # sentence-transformers >= 6 moved the modules
        from sentence_transformers.sentence_transformer.modules import (
            Pooling,
            Transformer,
        )
    except ImportError:  # pragma: no cover - older sentence-transformers
        from sentence_transformers.models import Pooling, Transformer

    cls, config = _config(family)
    torch.manual_seed(seed)
    hf_dir = folder.parent / f"{folder.name}-hf"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cls(config).eval().save_pretrained(hf_dir)
    for name in TOKENIZER_FILES:
        shutil.copy(minilm_model_dir() / name, hf_dir / name)
    word = Transformer(str(hf_dir), max_seq_length=64)
    pooling = Pooling(HIDDEN)
    return SentenceTransformer(modules=[word, pooling], device="cpu").eval()


def _swap(model, name, layer):
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, layer)


def _linear(hf, name, *, k, j, side, affine=False):
    layer = ProjectiveLinear.from_linear(
        hf.get_submodule(name), k=k, j=j, side=side, affine=affine, random_state=0
    )
    _swap(hf, name, layer)
    return layer


def compress_by_hand_(model):
    """Every form of the export met once, in a BERT (hidden 48, intermediate 96).

    Returns the modules' names by the form each should take.
    """
    hf = model[0].auto_model
    q = "encoder.layer.{}.attention.self.{}"
    forms = {
        "embeddings.word_embeddings": (4, 16, False),  # GatherBlockQuantized
        "embeddings.position_embeddings": (5, 16, False),  # widened to 8
        q.format(0, "query"): (4, 16, False),  # MatMulNBits
        q.format(0, "key"): (3, 48, False),  # widened to 4, cut into 16s
        q.format(0, "value"): (8, 24, False),  # no block: DequantizeLinear
        "encoder.layer.0.attention.output.dense": (4, 16, True),  # no zeros
        q.format(1, "value"): (2, 16, True),  # widened to 4 (2 at level 4)
        "encoder.layer.1.output.dense": (6, 32, True),  # DequantizeLinear (8)
    }
    for name, (bits, group, symmetric) in forms.items():
        module = hf.get_submodule(name)
        quantize_module_(module, bits, group, symmetric=symmetric, method="rtn")
    # factors: quantized (output side: MatMulNBits; input side: DequantizeLinear)
    layer = _linear(hf, "encoder.layer.0.intermediate.dense", k=1, j=16, side="output")
    quantize_module_(layer, 4, 16, method="rtn")
    layer = _linear(hf, "encoder.layer.0.output.dense", k=2, j=16, side="input")
    quantize_module_(layer, 5, 16, method="rtn")  # stored as 8 bits
    layer = _linear(hf, "encoder.layer.1.attention.output.dense", k=3, j=16,
                    side="output")  # fmt: skip
    quantize_module_(layer, 2, 16, method="rtn")
    # factors in float32, affine flats
    _linear(hf, q.format(1, "query"), k=2, j=8, side="output", affine=True)
    _linear(hf, "encoder.layer.1.intermediate.dense", k=1, j=8, side="input",
            affine=True)  # fmt: skip
    _linear(hf, q.format(1, "key"), k=3, j=8, side="input", affine=True)
    return forms


def projective_embedding_(model, *, ranks=(16, 24, 20), bits=4, affine=False):
    """The word embedding as clusters of random factors, quantized at ``bits``.

    Groups of 16: a rank of 16 takes GatherBlockQuantized's blocks; ranks 24
    and 20 take groups of 12 and 20 (the divisors nearest 16), which no block
    divides.
    """
    hf = model[0].auto_model
    n, d = hf.get_input_embeddings().weight.shape
    torch.manual_seed(0)
    labels = torch.randint(0, len(ranks), (n,))
    layer = ProjectiveEmbedding(n, d, ranks, labels, affine=affine)
    if affine:
        with torch.no_grad():
            layer.means.normal_()
    if bits:
        quantize_module_(layer, bits, 16, method="rtn")
    hf.set_input_embeddings(layer)
    return layer


def compress_in_bytes_(model, share=0.2):
    """``compress(..., unit="bytes")`` of the Linear layers, as users run it.

    The size asked leaves the Linear layers ``share`` of their float32 bytes
    (the rest of the folder as it is), calibrated on kflats' sentences: the
    plan then picks quantized dense forms (3 to 8 bits) and factors.
    """
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    linear = sum(
        p.numel() * p.element_size()
        for m in model.modules()
        if isinstance(m, nn.Linear)
        for p in m.parameters()
    )
    return compress(
        model,
        int(total - (1 - share) * linear),
        nn.Linear,
        calibration=load_sentences("calibration")[:16],
        unit="bytes",
        random_state=0,
    )


def save(model, folder):
    save_compressed(model, folder)
    return folder
