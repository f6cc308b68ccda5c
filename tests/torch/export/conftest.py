"""Compressed folders of three encoder families, and their ONNX exports, built once."""

import pytest

FAMILIES = ("bert", "distilbert", "mpnet")


def _build(family, root):
    from ._folders import (
        compress_by_hand_,
        compress_in_bytes_,
        projective_embedding_,
        save,
        tiny_sentence_transformer,
    )

    model = tiny_sentence_transformer(family, root / "original")
    if family == "bert":  # one module in each form the export writes
        compress_by_hand_(model)
    elif family == "distilbert":  # the word embedding as quantized factors
        projective_embedding_(model, affine=True)
    else:  # compress(..., unit="bytes"), as users do
        compress_in_bytes_(model)
    return save(model, root / "compressed")


@pytest.fixture(scope="session")
def exported(tmp_path_factory):
    """``family -> (compressed folder, OnnxExport)``, each built on first use."""
    from kflats.torch.export import export_onnx

    cache = {}

    def get(family):
        if family not in cache:
            root = tmp_path_factory.mktemp(family)
            folder = _build(family, root)
            cache[family] = folder, export_onnx(folder, root / "onnx")
        return cache[family]

    return get
