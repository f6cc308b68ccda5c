"""CI: check what ``kflats compress`` wrote to the folder given on the command line.

The report files exist, and the model that ``kflats.torch.load_compressed``
builds from the folder alone gives the outputs the command evaluated: its
mean cosine to the original model on the held-out sentences, measured by the
same evaluation (:mod:`kflats.torch.evaluation`), is the one in report.json.
"""

import json
import sys
from pathlib import Path

from sentence_transformers import SentenceTransformer

from kflats.datasets import load_sentences, minilm_model_dir
from kflats.torch import load_compressed
from kflats.torch.evaluation import fidelity, sentence_embeddings

out = Path(sys.argv[1])
report = json.loads((out / "report.json").read_text())
for name in ["report.md", *report["pictures"]]:
    assert (out / name).stat().st_size > 0, name
assert len(report["pictures"]) >= 2, report["pictures"]
# a size in bytes is the folder's: its weight files never take more
asked = report["totals"].get("size_asked")
if asked is not None:
    weights = sum(p.stat().st_size for p in out.rglob("*.safetensors"))
    assert weights <= asked, (weights, asked)
    assert weights == report["totals"]["folder_bytes"], report["totals"]
assert report["evaluation"]["reloaded_outputs_identical"] is True
assert report["warnings"] == [], report["warnings"]

texts = load_sentences("heldout")
model = load_compressed(out)
assert isinstance(model, SentenceTransformer), type(model)
original = SentenceTransformer(str(minilm_model_dir()), device="cpu")
measured = fidelity(
    sentence_embeddings(original, texts), sentence_embeddings(model, texts)
)
expected = report["fidelity"]["kflats"]
for key in ("mean_cosine", "worst_cosine", "top5_overlap"):
    assert abs(measured[key] - expected[key]) < 1e-6, (key, measured, expected)
print(
    f"kflats compress: report files and reloaded outputs check out "
    f"(mean cosine {expected['mean_cosine']:.4f})"
)
