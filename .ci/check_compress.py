"""CI: check what ``kflats compress`` wrote to the folder given on the command line.

The report files exist, and the model that ``kflats.torch.load_compressed``
builds from the folder alone gives the outputs the command evaluated: its
mean cosine to the original model on the held-out sentences is the one in
report.json.
"""

import json
import sys
from pathlib import Path

import numpy as np
from sentence_transformers import SentenceTransformer

from kflats.datasets import load_sentences, minilm_model_dir
from kflats.torch import load_compressed

out = Path(sys.argv[1])
report = json.loads((out / "report.json").read_text())
for name in ["report.md", *report["pictures"]]:
    assert (out / name).stat().st_size > 0, name
assert len(report["pictures"]) == 3, report["pictures"]
assert report["evaluation"]["reloaded_outputs_identical"] is True

texts = load_sentences("heldout")
model = load_compressed(out)
assert isinstance(model, SentenceTransformer), type(model)
original = SentenceTransformer(str(minilm_model_dir()), device="cpu")
kwargs = {"batch_size": 32, "normalize_embeddings": True}
cos = np.sum(original.encode(texts, **kwargs) * model.encode(texts, **kwargs), axis=1)
expected = report["fidelity"]["kflats"]["mean_cosine"]
assert abs(float(cos.mean()) - expected) < 1e-6, (float(cos.mean()), expected)
print(
    f"kflats compress: report files and reloaded outputs check out "
    f"(mean cosine {expected:.4f})"
)
