"""Latency of a compressed model against its original, forward passes only.

Loads a folder written by ``kflats compress`` (or ``save_compressed``) and
the original model, tokenizes the first held-out sentences once, and times
the forward of: the original, the compressed model (its projective layers
packed for inference, the default), and the compressed model with each
cluster's product run on its own (the grouped form). The three run in turn,
``--repeats`` times each, on ``--threads`` torch threads; the medians, the
minima (less sensitive to other processes' load) and their ratios to the
original are printed (and written with ``--json``).

Run from the repository root::

    python -m kflats compress --budget 0.6 --out /tmp/lat --curve none --quiet
    python benchmarks/latency_report.py /tmp/lat
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kflats.datasets import load_sentences, minilm_model_dir  # noqa: E402
from kflats.torch import load_compressed  # noqa: E402
from kflats.torch.layers import ProjectiveEmbedding, ProjectiveLinear  # noqa: E402


def _set_packed(model, packed):
    for module in model.modules():
        if isinstance(module, (ProjectiveEmbedding, ProjectiveLinear)):
            module._packed_inference = packed


def _time(run, features):
    start = time.perf_counter()
    run(features)
    return time.perf_counter() - start


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", help="a folder written by kflats compress")
    parser.add_argument("--original", default=None, help="default: bundled MiniLM")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--batches", default="1,32")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(args.threads)
    original = SentenceTransformer(args.original or str(minilm_model_dir()))
    compressed = load_compressed(args.folder)
    original.eval()
    compressed.eval()
    texts = load_sentences("heldout")
    out = {"threads": args.threads, "repeats": args.repeats}

    def forward(model, packed=True):
        def run(features):
            _set_packed(model, packed)
            with torch.inference_mode():
                return model(dict(features))["sentence_embedding"]

        return run

    runs = {
        "original": forward(original),
        "packed": forward(compressed, True),
        "grouped": forward(compressed, False),
    }
    for batch in (int(b) for b in args.batches.split(",")):
        features = original.tokenize(texts[:batch])
        outputs = {key: run(features) for key, run in runs.items()}  # warm-up
        gap = (outputs["packed"] - outputs["grouped"]).abs().max().item()
        times = {key: [] for key in runs}
        for _ in range(args.repeats):
            for key, run in runs.items():
                times[key].append(_time(run, features))
        ms = {key: 1000 * float(np.median(t)) for key, t in times.items()}
        # the fastest run of each, less sensitive to other processes' load
        low = {key: 1000 * float(np.min(t)) for key, t in times.items()}
        row = {
            **{f"{key}_ms": round(v, 3) for key, v in ms.items()},
            "packed_ratio": round(ms["packed"] / ms["original"], 3),
            "grouped_ratio": round(ms["grouped"] / ms["original"], 3),
            **{f"{key}_min_ms": round(v, 3) for key, v in low.items()},
            "packed_min_ratio": round(low["packed"] / low["original"], 3),
            "grouped_min_ratio": round(low["grouped"] / low["original"], 3),
            "max_abs_gap_packed_grouped": gap,
        }
        out[f"batch_{batch}"] = row
        print(f"batch {batch}: {row}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
