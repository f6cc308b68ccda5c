"""Memory and latency of a compressed folder loaded packed, unpacked, and the original.

Loads a folder written by ``kflats compress`` twice, packed (the default of
``load_compressed``: quantized matrices held as their codes, dequantized in
the layers' forward) and with ``unpack=True`` (float parameters), beside the
original float32 model, and reports for each:

- the bytes of the tensors it holds (parameters and buffers, a storage
  shared by two names counted once), against the folder's weight files;
- the time of ``model.encode`` on ``--sentences`` held-out sentences at each
  batch size (``--batches``), the three models run in turn ``--repeats``
  times, on ``--threads`` torch threads: medians, minima (less sensitive to
  other processes' load) and their ratios to the original in the same run;
- whether the packed model's embeddings equal the unpacked one's.

Run from the repository root::

    kflats compress --size 9.1MB --out /tmp/m9 --quiet
    python benchmarks/packed_report.py /tmp/m9
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


def held_bytes(model):
    """Bytes of the tensors a model holds: parameters and buffers, storages once."""
    seen = {}
    for t in [*model.parameters(), *model.buffers()]:
        storage = t.untyped_storage()
        seen[(storage.data_ptr(), t.device)] = storage.nbytes()
    return sum(seen.values())


def folder_bytes(folder):
    return sum(p.stat().st_size for p in Path(folder).rglob("*.safetensors"))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", help="a folder written by kflats compress")
    parser.add_argument("--original", default=None, help="default: bundled MiniLM")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--sentences", type=int, default=64)
    parser.add_argument("--batches", default="32,1")
    parser.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="wall-clock time, or this process's CPU time (less sensitive to "
        "other processes on a shared machine; with one thread, a fair measure)",
    )
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(args.threads)
    models = {
        "original": SentenceTransformer(
            args.original or str(minilm_model_dir()), device="cpu"
        ),
        "unpacked": load_compressed(args.folder, unpack=True),
        "packed": load_compressed(args.folder),
    }
    texts = load_sentences("heldout")[: args.sentences]
    on_disk = folder_bytes(args.folder)
    memory = {key: held_bytes(m) for key, m in models.items()}
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    out = {
        "clock": args.clock,
        "threads": args.threads,
        "repeats": args.repeats,
        "sentences": len(texts),
        "folder_weight_bytes": on_disk,
        "held_bytes": memory,
        "held_over_folder": {k: round(v / on_disk, 3) for k, v in memory.items()},
        "held_over_original": {
            k: round(v / memory["original"], 3) for k, v in memory.items()
        },
    }
    print(json.dumps({k: v for k, v in out.items()}, indent=1), flush=True)
    for batch in (int(b) for b in args.batches.split(",")):

        def encode(model, batch=batch):
            return model.encode(texts, batch_size=batch, convert_to_numpy=True)

        outputs = {key: encode(m) for key, m in models.items()}  # warm-up
        same = bool(np.array_equal(outputs["packed"], outputs["unpacked"]))
        times = {key: [] for key in models}
        for _ in range(args.repeats):
            for key, model in models.items():
                start = clock()
                encode(model)
                times[key].append(clock() - start)
        median = {key: 1000 * float(np.median(t)) for key, t in times.items()}
        low = {key: 1000 * float(np.min(t)) for key, t in times.items()}
        row = {
            **{f"{key}_ms": round(v, 1) for key, v in median.items()},
            **{
                f"{key}_ratio": round(v / median["original"], 3)
                for key, v in median.items()
            },
            **{f"{key}_min_ms": round(v, 1) for key, v in low.items()},
            **{
                f"{key}_min_ratio": round(v / low["original"], 3)
                for key, v in low.items()
            },
            "packed_equals_unpacked": same,
        }
        out[f"batch_{batch}"] = row
        print(f"batch {batch}: {json.dumps(row)}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
