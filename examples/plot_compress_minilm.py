"""
======================================================
Compressing MiniLM with ``kflats compress``, read back
======================================================

``kflats compress`` takes a model folder and writes a smaller one, with a
report (see :ref:`cli`). Here it compresses the word embedding of the bundled
all-MiniLM-L6-v2 (30522 × 384, about half of the model's parameters) to 60% of
its numbers, calibrated on the sentences that ship with kflats, and we read
the report and its pictures. Nothing is downloaded; this takes about a minute
on two cores.

The whole model (the embedding and the 36 Linear layers of the encoder), to
a folder of 0.15 of its float32 bytes, is the command's default; from a
shell::

    kflats compress --out minilm

Here ``--unit numbers --budget 0.6`` keeps 60% of the embedding's numbers as
float32 factors instead.

Needs ``pip install kflats[nlp]``.
"""

# %%
# Run the command
# ---------------
# ``main`` is what the ``kflats`` command runs; the list is its arguments.
import json
import os
import tempfile

import matplotlib.image as mpimg
import matplotlib.pyplot as plt

from kflats.__main__ import main

out = os.path.join(tempfile.mkdtemp(), "minilm-embedding-0.6")
status = main(
    ["compress", "--targets", "embedding", "--unit", "numbers", "--budget", "0.6"]
    + ["--out", out, "--quiet"]
)
print("exit status", status)

# %%
# The report
# ----------
# ``report.json`` holds every figure of ``report.md``.
with open(os.path.join(out, "report.json"), encoding="utf-8") as fh:
    report = json.load(fh)

for m in report["compression"]["modules"]:
    print(
        f"{m['name']}: k={m['k']}, ranks {m['ranks']}, "
        f"{m['params_before']:,} -> {m['params_after']:,} numbers, "
        f"calibrated error {m['error']:.4f}, plain error {m['weight_error']:.4f}"
    )
for name, f in report["fidelity"].items():
    print(
        f"{name}: mean cosine {f['mean_cosine']:.4f}, worst "
        f"{f['worst_cosine']:.3f}, top-5 overlap {f['top5_overlap']:.3f}"
    )

# %%
# The pictures
# ------------
# Fidelity against budget for kflats and SVD at the same size, each module's
# share (one module here), and the spectra of the embedding's clusters
# against the whole table's: each cluster's singular values fall faster than
# the table's, which is why k small subspaces beat one large one.
for picture in report["pictures"]:
    image = mpimg.imread(os.path.join(out, picture))
    fig, ax = plt.subplots(figsize=(image.shape[1] / 110, image.shape[0] / 110))
    ax.imshow(image)
    ax.set_axis_off()
    fig.tight_layout(pad=0)

# %%
# Load the compressed model
# -------------------------
# The folder is self-contained: :func:`kflats.torch.load_compressed` builds
# the SentenceTransformer from it alone.
from kflats.torch import load_compressed  # noqa: E402

model = load_compressed(out)
embedding = model.encode(["kflats keeps the meaning of a sentence."])
print(type(model).__name__, embedding.shape)
print(next(m for m in model.modules() if type(m).__name__ == "ProjectiveEmbedding"))
