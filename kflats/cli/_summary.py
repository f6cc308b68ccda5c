"""The summary ``kflats compress`` prints: sizes, fidelity, the model's own
outputs, latency, and warnings last."""

from .report import FILES


def _human(n, unit=""):
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if n >= scale:
            return f"{n / scale:.1f}{suffix}{unit}"
    return f"{n}{unit}"


def summary(data, out, files):
    """Print the summary, the last lines of ``kflats compress``: numbers and fidelity.

    A warning that the result lost most of the model comes last, loud.
    """
    totals, fid = data["totals"], data["fidelity"]
    k, s = fid["kflats"], fid["svd"]
    print(
        f"parameters: {_human(totals['params_before'])} -> "
        f"{_human(totals['params_after'])} "
        f"({totals['params_after'] / totals['params_before']:.3f} of the model)"
    )
    asked = totals.get("size_asked")
    asked = "" if asked is None else f"; size asked {_human(asked, 'B')}"
    counted = FILES.get(totals.get("format"), "the folder's weight files")
    print(
        f"bytes: {_human(totals['bytes_before'], 'B')} -> "
        f"{_human(totals['folder_bytes'], 'B')} ({counted}{asked})"
    )
    print(
        f"fidelity on {data['evaluation']['texts']} held-out texts: mean cosine "
        f"1.000 -> {k['mean_cosine']:.4f} (worst {k['worst_cosine']:.3f}, top-5 "
        f"overlap {k['top5_overlap']:.3f}); "
        f"{data.get('baseline', 'truncated SVD, same size')}: "
        f"{s['mean_cosine']:.4f}"
    )
    healed = data.get("healed")
    if healed is not None and healed["validation"]:
        measures = [v for _, v in healed["validation"]]
        print(
            f"heal: {healed['steps_run']} steps on {healed['texts']} texts; kept step "
            f"{healed['best_step']}, its loss on {healed['held_out']} held-out texts "
            f"{measures[0]:.4g} -> {min(measures):.4g}"
        )
    outside = data.get("outside")
    if outside is not None:
        print(
            f"fidelity on {outside['texts']} texts from another source: mean cosine "
            f"{outside['kflats']['mean_cosine']:.4f} ({abs(outside['drop']):.4f} "
            f"{'below' if outside['drop'] >= 0 else 'above'} the held-out texts); "
            f"the baseline: {outside['svd']['mean_cosine']:.4f}"
        )
    metrics = data.get("model_metrics")
    if metrics is not None:
        shown = ", ".join(
            f"{key.replace('_', ' ')} {value:.4g}"
            for key, value in metrics["kflats"].items()
            if key != "n_texts"
        )
        print(f"{metrics['kind'].replace('_', ' ')} outputs: {shown}")
    probe = data.get("probe")
    if probe is not None:
        print(
            f"probe accuracy on {probe['texts']} labelled texts: "
            f"{probe['original']:.4f} -> {probe['kflats']:.4f}"
        )
    latency = data.get("latency")
    if latency is not None:
        print(
            "latency, compressed / original: batch 32 "
            f"{latency['batch_32']['ratio']:.2f}, batch 1 "
            f"{latency['batch_1']['ratio']:.2f}"
        )
    print(f"written to {out}: the model, {', '.join(files)}")
    for warning in data.get("warnings", ()):
        print(f"WARNING: {warning.upper()[:1]}{warning[1:]}.")
