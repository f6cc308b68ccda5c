"""Calibrated compression of all-MiniLM-L6-v2: fidelity on text kflats never saw.

Run from the repository root (needs ``pip install kflats[nlp]``; nothing is
downloaded)::

    python benchmarks/compress_report.py                     # every setting
    python benchmarks/compress_report.py --settings emb:0.4 --seeds 0
    python benchmarks/compress_report.py --settings all:0.5 --heal-steps 300

Calibration text: the ``"calibration"`` split of
:func:`kflats.datasets.load_sentences` (1,920 sentences). Evaluation text:
``benchmarks/data/sentences.txt`` (290 sentences written for the benchmarks)
and the ``"heldout"`` split (480); neither is ever calibrated or healed on.

Rows (methods), for each setting:

- ``svd``: truncated SVD of each weight, each module at the budget;
- ``whitened svd``: k = 1 with the calibrated objective (frequency-weighted
  SVD of the embedding, whitened SVD of each Linear: the SVD-LLM-style
  anchor), under the same allocation as kflats;
- ``kflats``: kflats without calibration (the defaults);
- ``kflats cal``: kflats calibrated, global allocation;
- ``kflats cal+heal`` and ``whitened svd+heal``: the same after
  :func:`kflats.torch.heal`.

Columns: mean and worst cosine between the compressed and the original
model's normalised sentence embeddings, mean overlap of each sentence's 5
nearest neighbours, the compression reached, and the seconds of each step.
Settings: ``emb:B`` compresses the word embedding alone to B; ``all:B`` the
word embedding and every Linear layer of the encoder, B of their numbers in
all (global allocation).
"""

import argparse
import copy
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from kflats.datasets import load_sentences, minilm_model_dir  # noqa: E402
from kflats.torch import calibrate, compress, heal  # noqa: E402
from kflats.torch.evaluation import fidelity  # noqa: E402
from kflats.torch.evaluation import sentence_embeddings as encode  # noqa: E402

DATA = Path(__file__).parent / "data" / "sentences.txt"
EMBEDDING = "*word_embeddings"
LINEARS = [
    "*.self.query",
    "*.self.key",
    "*.self.value",
    "*.output.dense",
    "*.intermediate.dense",
]
DEFAULT_SETTINGS = "emb:0.6,emb:0.4,emb:0.2,all:0.6,all:0.5"
METHODS = (
    "svd",
    "whitened svd",
    "kflats",
    "kflats cal",
    "kflats cal+heal",
    "whitened svd+heal",
)


def load_model():
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(minilm_model_dir()), device="cpu")


def run(base, reference, evaluation, calibration, setting, method, seed, heal_steps):
    scope, budget = setting.split(":")
    budget = float(budget)
    targets = [EMBEDDING] if scope == "emb" else [EMBEDDING, *LINEARS]
    model = copy.deepcopy(base)
    kwargs = {"random_state": seed, "progress": False}
    calibrated = method not in ("svd", "kflats")
    if method.startswith("svd") or method.startswith("whitened svd"):
        kwargs["k"] = 1
    if method == "svd":
        kwargs["allocation"] = "uniform"
    if calibrated:
        kwargs["calibration"] = calibration
    times = {}
    start = time.perf_counter()
    report = compress(model, budget, targets, **kwargs)
    times["compress"] = time.perf_counter() - start
    if method.endswith("+heal"):
        torch.manual_seed(seed)
        start = time.perf_counter()
        texts = load_sentences("calibration")
        heal(model, base, texts, steps=heal_steps, progress=False)
        times["heal"] = time.perf_counter() - start
    start = time.perf_counter()
    scores = fidelity(reference, encode(model, evaluation))
    times["evaluate"] = time.perf_counter() - start
    ratio = report.params_after / report.params_before
    return scores, ratio, times


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--settings", default=DEFAULT_SETTINGS)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--heal-steps", type=int, default=300)
    args = parser.parse_args()

    base = load_model()
    base.eval()
    evaluation = [s.strip() for s in DATA.read_text().splitlines() if s.strip()]
    evaluation += load_sentences("heldout")
    calibration_text = load_sentences("calibration")
    assert not set(evaluation) & set(calibration_text)
    reference = encode(base, evaluation)
    start = time.perf_counter()
    calibration = calibrate(base, calibration_text, progress=False)
    print(
        f"calibration: {len(calibration_text)} sentences, "
        f"{time.perf_counter() - start:.1f} s; evaluation: {len(evaluation)} "
        "sentences\n",
        flush=True,
    )
    seeds = [int(s) for s in args.seeds.split(",")]
    print(
        "| setting | method | mean cosine (seeds) | spread | worst cosine | "
        "top-5 overlap | kept | compress s | heal s |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for setting in args.settings.split(","):
        for method in args.methods.split(","):
            # an SVD is the same for every seed: measured once
            once = method in ("svd", "whitened svd")
            results = [
                run(
                    base,
                    reference,
                    evaluation,
                    calibration,
                    setting,
                    method,
                    seed,
                    args.heal_steps,
                )
                for seed in (seeds[:1] if once else seeds)
            ]
            means = [r[0]["mean_cosine"] for r in results]
            print(
                f"| {setting} | {method} | {np.mean(means):.4f} ("
                + " / ".join(f"{m:.4f}" for m in means)
                + f") | {max(means) - min(means):.4f} "
                f"| {min(r[0]['worst_cosine'] for r in results):.3f} "
                f"| {np.mean([r[0]['top5_overlap'] for r in results]):.3f} "
                f"| {results[0][1]:.3f} "
                f"| {np.median([r[2]['compress'] for r in results]):.1f} "
                f"| {np.median([r[2].get('heal', 0.0) for r in results]):.0f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
