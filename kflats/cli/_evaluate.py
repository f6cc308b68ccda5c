"""The evaluation of ``kflats compress``: fidelity, the baseline, the curve.

On held-out text: the compressed model beside the original, the baseline
at the same size (truncated SVD of each module for a budget in numbers;
every module quantized alike, at the widest bits that fit, for a budget in
bytes), both at other budgets (``--curve``; in bytes, each point a size of
the folder of its own, its bytes recorded), the model's own outputs
(perplexity, labels), a probe on the user's labels, and the latency of both
models.

A causal LM is read a token at a time over a whole vocabulary: its
calibration takes the first :data:`CAUSAL_CALIBRATION` of kflats' own
calibration sentences (a user's ``--calibration`` file whole), the heal the
sentences the calibration left (:func:`text_splits`), the fidelity of its
hidden states the first :data:`CAUSAL_HELDOUT` held-out sentences, and its
own outputs (perplexity, KL divergence and top-1 agreement of the
next-token distributions against the original's) are scored on text from
another source than the calibration's: kflats' ``"outside"`` sentences.
"""

import copy
import sys

import numpy as np

# what the report compares kflats with, by the unit of the budget
BASELINES = {
    "numbers": "truncated SVD, same size",
    "bytes": "uniform quantization (calibrated), the widest bits that fit",
}


def _hushed():
    """The model libraries' logs and progress bars quiet (imports torch)."""
    from kflats.torch.io import hushed

    return hushed()


# kflats' calibration sentences a causal LM is calibrated on (about 4,300
# tokens for SmolLM2's tokenizer), held-out sentences its hidden states are
# compared on, and outside sentences its next-token predictions are scored on
CAUSAL_CALIBRATION, CAUSAL_HELDOUT, CAUSAL_OUTSIDE = 256, 64, 160


def _causal(job):
    from kflats.torch.models import adapter_for

    return adapter_for(job.base).output_kind == "causal_lm"


def text_splits(job):
    """The texts of the calibration and of the heal, apart.

    A causal LM calibrated on kflats' own sentences takes the first
    :data:`CAUSAL_CALIBRATION` and heals on the others; else both read every
    text (a user's file is used whole).
    """
    own = job.args.calibration is None
    if _causal(job) and own and len(job.texts) > CAUSAL_CALIBRATION:
        return job.texts[:CAUSAL_CALIBRATION], job.texts[CAUSAL_CALIBRATION:]
    return job.texts, job.texts


# the heal's texts held out to stop it (a tenth, 8 to 128 of them)
_HEAL_HELD_OUT = (8, 128)


def heal_splits(job):
    """The heal's training texts, and the texts held out to stop it.

    The heal reads the texts :func:`text_splits` gives it, less a tenth (8 to
    128 texts), on which its output's distortion is measured as it trains
    (:func:`kflats.torch.heal`'s ``validation``): the model keeps the best
    step's matrices.
    """
    texts = list(dict.fromkeys(text_splits(job)[1]))  # each text once
    low, high = _HEAL_HELD_OUT
    n = min(high, max(low, len(texts) // 10))
    if len(texts) < 2 * n:  # too few to hold any out
        return texts, None
    return texts[:-n], texts[-n:]


def heldout_texts(job):
    """The held-out sentences the fidelity is measured on (fewer for a causal LM)."""
    from kflats.datasets import load_sentences

    texts = load_sentences("heldout")
    return texts[:CAUSAL_HELDOUT] if _causal(job) else texts


def compress_options(job):
    """The keywords of the run's :func:`kflats.torch.compress`, at any budget."""
    args = job.args
    return {
        "calibration": job.calibration,
        "allocation": args.allocation,
        "unit": args.unit,
        "k": args.k,
        "ranks": args.ranks,
        "tokenizer": job.tokenizer,
        "random_state": args.seed,
        "format": getattr(args, "format", "kflats"),
    }


def evaluate(job):
    """Fill ``job`` with the compressed model's fidelity, the baseline's, the
    curve, the probe, the model's own metrics and the latency."""
    ev = job.evaluator
    with _hushed(), job.steps("evaluate", "evaluating the compressed model"):
        job.compressed = ev.outputs(job.model)
        job.fidelity["kflats"] = ev.compare(job.reference, job.compressed)
    with _hushed(), job.steps("svd", "SVD at the same size"):
        job.svd_model, job.svd_report = _baseline(job, job.args.budget)
        job.baseline = BASELINES[job.args.unit]
        if job.args.unit == "bytes":
            q = job.svd_report
            groups = ", ".join(str(g) for g in q.group_sizes)
            job.baseline += f": {q.bits} bits, groups of {groups}"
        job.fidelity["svd"] = ev.compare(job.reference, ev.outputs(job.svd_model))
    job.outside = _outside(job)
    job.curve = _curve_points(job)
    job.probe = _probe(job) if job.labelled else None
    warning = ev.warning(job.fidelity["kflats"])
    if warning:
        job.warnings.append(warning)
    job.model_metrics = _model_metrics(job)
    job.svd_model = None  # the baseline's scores are kept; its weights freed
    # nor is the calibration read again (SmolLM2's input moments: 0.4 GB),
    # which the save and the export would stand on
    job.calibration = None
    with _hushed(), job.steps("latency", "timing both models", bar=False):
        job.latency = _latency(job)


def _outside(job):
    """Fidelity of kflats and of the baseline on text from another source than
    the calibration's (kflats' ``"outside"`` sentences), and how far kflats'
    falls from its fidelity on the held-out sentences, which share the
    calibration's register."""
    from kflats.datasets import load_sentences
    from kflats.torch.evaluation import evaluator

    texts = load_sentences("outside")
    if _causal(job):
        texts = texts[:CAUSAL_OUTSIDE]
    ev = evaluator(texts, tokenizer=job.tokenizer)
    out = {"texts": len(texts), "source": "kflats.datasets: outside"}
    with _hushed(), job.steps("outside", "on text from another source"):
        reference = ev.outputs(job.base)
        for key, model in (("kflats", job.model), ("svd", job.svd_model)):
            out[key] = ev.compare(reference, ev.outputs(model))
    heldout = job.fidelity["kflats"]["mean_cosine"]
    out["drop"] = heldout - out["kflats"]["mean_cosine"]
    return out


# the forward passes timed for the report: 2 threads, batch 32 and batch 1
_LATENCY_THREADS, _LATENCY_REPEATS = 2, 7


def _latency(job):
    """Median time of the original's and the compressed model's outputs.

    On held-out texts, batch 32 and batch 1, both models timed in turn (the
    same machine load for both), on ``_LATENCY_THREADS`` torch threads.
    """
    import time

    import torch

    ev = job.evaluator
    threads = torch.get_num_threads()
    torch.set_num_threads(_LATENCY_THREADS)
    out = {"threads": _LATENCY_THREADS, "repeats": _LATENCY_REPEATS}
    try:
        for batch in (32, 1):
            texts = job.heldout[:batch]
            times = {"original": [], "kflats": []}
            for model in (job.base, job.model):  # warm-up
                ev.outputs_of(model, texts)
            for _ in range(_LATENCY_REPEATS):
                for key, model in (("original", job.base), ("kflats", job.model)):
                    start = time.perf_counter()
                    ev.outputs_of(model, texts)
                    times[key].append(time.perf_counter() - start)
            ms = {key: 1000 * float(np.median(t)) for key, t in times.items()}
            ms["ratio"] = ms["kflats"] / ms["original"]
            out[f"batch_{batch}"] = ms
    finally:
        torch.set_num_threads(threads)
    return out


# the output kinds whose own outputs (logits) are evaluated besides cosine
_LOGIT_KINDS = ("causal_lm", "classifier", "masked_lm", "seq2seq")
# held-out texts the model's own outputs are evaluated on (a causal LM's
# logits cost a vocabulary per position)
_MODEL_TEXTS = 200


def _model_metrics(job):
    """What the model's own outputs say (perplexity, labels), kflats and SVD."""
    from kflats.torch.models import adapter_for

    adapter = adapter_for(job.base)
    kind = adapter.output_kind
    if kind not in _LOGIT_KINDS:
        return None
    texts, source = job.heldout[:_MODEL_TEXTS], "kflats.datasets: heldout"
    if kind == "causal_lm":  # text from another source than the calibration's
        from kflats.datasets import load_sentences

        texts = load_sentences("outside")[:CAUSAL_OUTSIDE]
        source = "kflats.datasets: outside"
    metrics = {"kind": kind, "texts": len(texts), "source": source}
    with _hushed(), job.steps("model", f"evaluating the {kind} outputs"):
        for key, model in (("kflats", job.model), ("svd", job.svd_model)):
            metrics[key] = adapter.evaluate(
                job.base, model, texts, tokenizer=job.tokenizer, batch_size=8
            )
    lost = _lost(kind, metrics["kflats"])
    if lost:
        job.warnings.append(lost)
    return metrics


def _lost(kind, scores):
    """A sentence when the model's own outputs say most of it is lost."""
    ratio = scores.get("perplexity_ratio")
    if ratio is not None and ratio > 10:
        return (
            f"the compressed model lost most of the original: perplexity x{ratio:.1f} "
            "on held-out text; raise --budget, or heal (--heal-steps)"
        )
    agreement = scores.get("label_agreement")
    if agreement is not None and agreement < 0.5:
        return (
            f"the compressed model lost most of the original: it agrees with the "
            f"original's labels on {agreement:.2f} of held-out texts"
        )
    return None


def _baseline(job, budget):
    """The baseline at budget, and its report: each module truncated by SVD
    (numbers), or every module quantized alike (bytes:
    :func:`kflats.torch.compression.quantize_uniformly`, with compact scales
    where the folder's format stores them)."""
    from kflats.torch import compress

    svd = copy.deepcopy(job.base)
    if job.args.unit == "bytes":
        from kflats.torch.compression import quantize_uniformly
        from kflats.torch.layers import pack_quantized_

        compact = getattr(job.args, "format", "kflats") == "kflats"
        report = quantize_uniformly(
            svd, job.names, budget, job.calibration, compact_scales=compact
        )
        return pack_quantized_(svd), report
    report = compress(
        svd, budget, job.names, k=1, allocation="uniform", ranks="uniform",
        random_state=job.args.seed, progress=False,
    )  # fmt: skip
    return svd, report


def _around(budget, curve, unit):
    """The budgets besides ``budget`` that the report compares at.

    By default ``budget`` +- 0.1 for a budget in numbers; none for one in
    bytes (each point there is a search of its own: ask with ``--curve``).
    """
    if curve is None:
        if unit == "bytes":
            return []
        curve = (round(budget - 0.1, 6), round(budget + 0.1, 6))
        curve = tuple(b for b in curve if 0.05 <= b < 1)
    return sorted(set(curve) - {budget})


def _point(job, budget, fidelities, reports):
    """One point of the curve; in bytes, with the bytes each model's folder
    takes (its weight files, the headers at their bound)."""
    point = {"budget": budget, **fidelities}
    if job.args.unit == "bytes":
        point["bytes"] = {key: r.folder_bytes for key, r in reports.items()}
    return point


def _curve_options(job):
    """compress's keywords at the other budgets: in numbers, each module's k
    and side from this run."""
    options = {**compress_options(job), "progress": False}
    if job.args.unit == "numbers":
        options["k"] = {m.name: m.k or 1 for m in job.report}
        options["side"] = {m.name: m.side for m in job.report if m.side is not None}
    return options


def _curve_points(job):
    """kflats and the baseline at the other budgets, sorted by size."""
    from kflats.torch import compress

    args, ev = job.args, job.evaluator
    unhealed = job.fidelity.get("kflats_before_heal", job.fidelity["kflats"])
    fidelities = {"kflats": unhealed, "svd": job.fidelity["svd"]}
    reports = {"kflats": job.report, "svd": job.svd_report}
    curve = [_point(job, args.budget, fidelities, reports)]
    around = _around(args.budget, args.curve, args.unit)
    if job.steps.show and around:
        from tqdm.auto import tqdm

        around = tqdm(around, desc="kflats and SVD at other budgets", unit="budget")
    with _hushed(), job.steps("curve", "", bar=False):
        for budget in around:
            other = copy.deepcopy(job.base)
            try:
                report = compress(other, budget, job.names, **_curve_options(job))
                svd, svd_report = _baseline(job, budget)
            except ValueError as exc:  # a budget too small for some module
                if job.steps.show:
                    print(
                        f"kflats: no curve point at {budget:g}: {exc}", file=sys.stderr
                    )
                continue
            fidelities = {
                key: ev.compare(job.reference, ev.outputs(model))
                for key, model in (("kflats", other), ("svd", svd))
            }
            reports = {"kflats": report, "svd": svd_report}
            curve.append(_point(job, budget, fidelities, reports))
    return sorted(curve, key=lambda p: p.get("bytes", {}).get("kflats", p["budget"]))


def _probe(job):
    """Probe accuracy on the labelled texts, original and compressed."""
    from kflats.torch.evaluation import probe_accuracy, sentence_embeddings

    from ._texts import FOLDS

    texts, labels = job.labelled
    scores = {"source": str(job.args.eval_labels), "texts": len(texts)}
    scores["labels"] = len(set(labels))
    scores["folds"] = FOLDS
    with _hushed(), job.steps("probe", "probing the labels"):
        for key, model in (("original", job.base), ("kflats", job.model)):
            X = sentence_embeddings(model, texts, tokenizer=job.tokenizer)
            scores[key] = probe_accuracy(
                X, labels, folds=FOLDS, random_state=job.args.seed
            )
    return scores
