"""The report of ``kflats compress``: report.json, report.md and the pictures."""

import json
import os

import numpy as np

_PICTURES = {
    "fidelity_vs_budget.png": "Fidelity on held-out text against budget",
    "module_shares.png": "Each module's share of the budget",
    "embedding_spectra.png": "Singular values of the embedding's clusters",
}
# what folder_bytes counts, by --format
FILES = {"onnx": "the ONNX model file", "gguf": "the GGUF file, model.gguf"}


def _short_names(names):
    """Module names without the prefix they all share."""
    if len(names) < 2:
        return list(names)
    parts = [n.split(".") for n in names]
    common = 0
    while (
        all(len(p) > common + 1 for p in parts) and len({p[common] for p in parts}) == 1
    ):
        common += 1
    return [".".join(p[common:]) for p in parts]


def _in_bytes(data):
    """Whether the curve's points carry the bytes each model took."""
    return all("bytes" in p for p in data["curve"])


def _budget_bytes(data):
    """The size asked, in bytes: the folder's (before, the selected modules')."""
    if _whole_folder(data):
        return data["totals"]["size_asked"]
    budget = data["settings"]["budget"]
    return budget if budget > 1 else budget * data["compression"]["bytes_before"]


def _whole_folder(data):
    """Whether the report's sizes are the folder's (not the selected modules')."""
    return data["totals"].get("size_asked") is not None


def _fidelity_picture(ax, data):
    curve, in_bytes = data["curve"], _in_bytes(data)
    baseline = "uniform quantization" if in_bytes else "truncated SVD"
    for key, label, style in (
        ("kflats", "kflats, calibrated", "o-"),
        ("svd", baseline, "s--"),
    ):
        points = sorted(
            (p["bytes"][key] / 1e6 if in_bytes else p["budget"], p[key]["mean_cosine"])
            for p in curve
        )
        ax.plot(*zip(*points, strict=True), style, label=label)
    at = data["settings"]["budget"]
    if in_bytes:
        at = _budget_bytes(data) / 1e6
    if "kflats_before_heal" in data["fidelity"]:
        c = data["compression"]
        ax.plot(
            [c.get("folder_bytes", c["bytes_after"]) / 1e6 if in_bytes else at],
            [data["fidelity"]["kflats"]["mean_cosine"]],
            "*",
            markersize=14,
            label=f"kflats + heal ({data['settings']['heal_steps']} steps)",
        )
    ax.axvline(at, color="0.7", lw=1, zorder=0)
    ax.set_xlabel(
        ("MB of the folder's weight files" if _whole_folder(data) else "MB of the "
         "selected modules")
        if in_bytes
        else "budget: fraction of the selected modules' numbers kept"
    )  # fmt: skip
    ax.set_ylabel("mean cosine to the original's embeddings")
    ax.set_title(
        f"Held-out text ({data['evaluation']['texts']} texts, never calibrated on)"
    )
    ax.grid(alpha=0.3)
    ax.legend()


def _shares_picture(fig, data):
    modules = data["compression"]["modules"]
    names = _short_names([m["name"] for m in modules])
    budget = data["settings"]["budget"]
    if data["settings"].get("unit") == "bytes":  # the budget counts bytes
        unit, before, after, key = "bytes", "bytes_before", "bytes_after", "bytes_share"
        c = data["compression"]
        if "size_asked" in c:  # what the rest of the folder leaves the modules
            rest = c["model_bytes"] - c["bytes_after"] + c["header_bytes"]
            budget = (c["size_asked"] - rest) / c["bytes_before"]
        elif budget > 1:  # a size: the fraction of the modules' float32 bytes
            budget /= sum(m["bytes_before"] for m in modules)
    else:
        unit, before, after, key = "numbers", "params_before", "params_after", "share"
    kept = [m[after] / m[before] for m in modules]
    share = [m.get(key, 0.0) for m in modules]
    colors = ["C1" if m["kind"] == "Embedding" else "C0" for m in modules]
    left, right = fig.subplots(1, 2, sharey=True)
    y = np.arange(len(modules))
    left.barh(y, share, color=colors)
    left.set_yticks(y, names, fontsize=7)
    left.invert_yaxis()
    left.set_xlabel(f"share of the compressed {unit}")
    right.barh(y, kept, color=colors)
    right.axvline(budget, color="k", lw=1, ls="--")
    right.set_xlabel(f"own {unit} kept (dashed: the budget)")
    right.set_xlim(0, 1.05)
    fig.suptitle("Where the budget went (orange: embedding, blue: Linear)")


def singular_values(A):
    """The singular values of ``A`` (float64), largest first, from the
    eigenvalues of its smaller Gram matrix: a picture's precision (about
    1e-8 of the largest), 5x faster than an SVD on a 30,522 x 384 table."""
    G = A.T @ A if A.shape[0] >= A.shape[1] else A @ A.T
    values = np.linalg.eigvalsh(G)[::-1]
    return np.sqrt(np.clip(values, 0.0, None))


def _spectra_picture(ax, base, model, name):
    import torch

    weight = base.get_submodule(name).weight.detach().to("cpu", torch.float64)
    layer = model.get_submodule(name)
    A = weight.numpy()
    labels = layer.labels.to("cpu", torch.int64).numpy()
    whole = singular_values(A)
    scale = whole[0]
    ax.semilogy(whole / scale, color="k", lw=2, label=f"whole table {A.shape}")
    for c, rank in enumerate(layer.ranks):
        rows = A[labels == c]
        if len(rows) == 0:
            continue
        s = singular_values(rows) / scale
        (line,) = ax.semilogy(s, lw=1, label=f"cluster {c}: {len(rows)} rows")
        if 0 < rank <= len(s):
            ax.plot(rank - 1, s[rank - 1], "o", color=line.get_color())
    ax.set_xlabel("index (dots: the rank each cluster keeps)")
    ax.set_ylabel("singular value / the table's largest")
    ax.set_title(f"{name.rsplit('.', 1)[-1]}: {layer.k} clusters and the whole table")
    ax.grid(alpha=0.3)
    if layer.k <= 16:
        ax.legend(fontsize=7, ncol=2)


def draw_pictures(folder, data, base, model, names):
    """Draw the pictures into folder; returns their file names.

    Needs matplotlib; without it, no picture is drawn (report.md says so).
    """
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    from kflats.torch import ProjectiveEmbedding

    drawn = []
    fig, ax = plt.subplots(figsize=(6.4, 4.4), layout="constrained")
    _fidelity_picture(ax, data)
    fig.savefig(os.path.join(folder, "fidelity_vs_budget.png"), dpi=110)
    plt.close(fig)
    drawn.append("fidelity_vs_budget.png")

    n = len(data["compression"]["modules"])
    fig = plt.figure(figsize=(9, 1.2 + 0.2 * n), layout="constrained")
    _shares_picture(fig, data)
    fig.savefig(os.path.join(folder, "module_shares.png"), dpi=110)
    plt.close(fig)
    drawn.append("module_shares.png")

    embedding = next(
        (n for n in names if isinstance(model.get_submodule(n), ProjectiveEmbedding)),
        None,
    )
    if embedding is not None:
        fig, ax = plt.subplots(figsize=(6.4, 4.4), layout="constrained")
        _spectra_picture(ax, base, model, embedding)
        fig.savefig(os.path.join(folder, "embedding_spectra.png"), dpi=110)
        plt.close(fig)
        drawn.append("embedding_spectra.png")
    return drawn


def _ranks(ranks):
    if not ranks:
        return "dense"
    shown = ", ".join(str(r) for r in ranks[:6])
    return f"{shown}, ..." if len(ranks) > 6 else shown


def _mb(n):
    return f"{n / 1e6:.2f} MB"


def _budget_text(settings):
    budget, unit = settings["budget"], settings.get("unit", "numbers")
    if unit == "bytes" and budget > 1:
        return f"{_mb(budget)} (a size in bytes: the folder's weight files)"
    if unit == "bytes":
        return f"{budget:g} of the whole model's bytes (the folder's weight files)"
    return f"{budget:g} of the {unit}"


def _md_head(data):
    s, c = data["settings"], data["compression"]
    lines = ["# kflats compress report", "", f"`{data['command']}`", ""]
    for warning in data.get("warnings", ()):
        lines += [f"> **WARNING: {warning}.**", ""]
    return lines + [
        f"Model: `{data['model']['source']}` ({data['model']['class']}). "
        f"Budget {_budget_text(s)} over {len(c['modules'])} modules "
        f"(targets {', '.join(s['targets'])}; allocation {s['allocation']}; "
        f"ranks {s['ranks']}; heal steps {s['heal_steps']}; seed {data['seed']}). "
        f"Calibration: {data['calibration']['texts']} texts from "
        f"{data['calibration']['source']}.",
        "",
    ]


def _md_totals(data):
    t, c = data["totals"], data["compression"]
    return [
        "## Before and after",
        "",
        "| | before | after | ratio |",
        "|---|---|---|---|",
        f"| parameters, whole model | {t['params_before']:,} | "
        f"{t['params_after']:,} | {t['params_after'] / t['params_before']:.3f} |",
        f"| bytes of the tensors, whole model | {_mb(t['bytes_before'])} "
        f"| {_mb(t['bytes_after'])} "
        f"| {t['bytes_after'] / t['bytes_before']:.3f} |",
        *_md_folder(t),
        f"| numbers of the compressed modules | {c['params_before']:,} | "
        f"{c['params_after']:,} | {c['params_after'] / c['params_before']:.3f} |",
        "",
    ]


def _md_folder(t):
    """Rows: the folder's weight files (headers included), and the size asked."""
    files = FILES.get(t.get("format"), "the folder's weight files")
    rows = ((files, "folder_bytes"), ("size asked", "size_asked"))
    return [
        f"| {label} | | {t[key]:,} bytes | {t[key] / t['bytes_before']:.3f} |"
        for label, key in rows
        if t.get(key) is not None
    ]


def _md_fidelity(data):
    f = data["fidelity"]
    lines = [
        f"Fidelity on {data['evaluation']['texts']} held-out texts "
        f"({data['evaluation']['source']}, never calibrated on): cosine between "
        "the original's and the compressed model's sentence embeddings, and the "
        "overlap of each text's 5 nearest neighbours.",
        "",
        "| model | mean cosine | worst cosine | top-5 overlap |",
        "|---|---|---|---|",
    ]
    rows = [("kflats", "kflats")]
    if "kflats_before_heal" in f:
        rows = [("kflats_before_heal", "kflats, before heal"), ("kflats", "kflats")]
    rows.append(("svd", data.get("baseline", "truncated SVD, same size")))
    outside = data.get("outside")
    if outside is not None:  # text from another source than the calibration's
        n, seen = outside["texts"], outside["source"]
        for key, what in (("kflats", "kflats"), ("svd", "the baseline")):
            rows.append((outside[key], f"{what}, {n} texts from elsewhere ({seen})"))
    for key, label in rows:
        v = f[key] if isinstance(key, str) else key
        lines.append(
            f"| {label} | {v['mean_cosine']:.4f} | {v['worst_cosine']:.4f} "
            f"| {v['top5_overlap']:.3f} |"
        )
    if len(data["curve"]) > 1:
        lines += _md_curve(data)
    return lines


def _md_curve(data):
    if not _in_bytes(data):
        lines = [
            "",
            "At other budgets (kflats with each module's k and side from this "
            "run, no heal; SVD of each module at the budget):",
            "",
            "| budget | kflats mean cosine | SVD mean cosine |",
            "|---|---|---|",
        ]
        return lines + [
            f"| {p['budget']:g} | {p['kflats']['mean_cosine']:.4f} "
            f"| {p['svd']['mean_cosine']:.4f} |"
            for p in data["curve"]
        ]
    lines = [
        "",
        "Fidelity against bytes (each size a compress of its own, no heal; "
        f"the baseline: {data.get('baseline')}); "
        + (
            "bytes of the folder's weight files (headers at their bound):"
            if _whole_folder(data)
            else "bytes of the selected modules:"
        ),
        "",
        "| budget | kflats bytes | kflats mean cosine | baseline bytes "
        "| baseline mean cosine |",
        "|---|---|---|---|---|",
    ]
    for p in data["curve"]:
        budget = _mb(p["budget"]) if p["budget"] > 1 else f"{p['budget']:g}"
        lines.append(
            f"| {budget} | {_mb(p['bytes']['kflats'])} "
            f"| {p['kflats']['mean_cosine']:.4f} | {_mb(p['bytes']['svd'])} "
            f"| {p['svd']['mean_cosine']:.4f} |"
        )
    return lines


def _md_probe(data):
    p = data.get("probe")
    if p is None:
        return []
    return [
        "",
        f"A downstream check on {p['texts']} labelled texts ({p['source']}, "
        f"{p['labels']} labels): the accuracy of a logistic-regression probe on "
        f"the sentence embeddings, {p['folds']}-fold cross-validated.",
        "",
        "| model | probe accuracy |",
        "|---|---|",
        f"| original | {p['original']:.4f} |",
        f"| kflats | {p['kflats']:.4f} |",
    ]


def _md_model_metrics(data):
    m = data.get("model_metrics")
    if m is None:
        return []
    keys = [key for key in m["kflats"] if key != "n_texts"]
    lines = [
        "",
        f"The model's own outputs ({m['kind'].replace('_', ' ')}) on the first "
        f"{m['texts']} held-out texts, against the original's:",
        "",
        "| model | " + " | ".join(key.replace("_", " ") for key in keys) + " |",
        "|---" * (len(keys) + 1) + "|",
    ]
    baseline = data.get("baseline", "truncated SVD, same size")
    for key, label in (("kflats", "kflats"), ("svd", baseline)):
        values = " | ".join(f"{m[key][k]:.4g}" for k in keys)
        lines.append(f"| {label} | {values} |")
    return lines


def _md_latency(data):
    t = data.get("latency")
    if t is None:
        return []
    rows = [
        f"| {batch} | {t[f'batch_{batch}']['original']:.1f} ms "
        f"| {t[f'batch_{batch}']['kflats']:.1f} ms "
        f"| {t[f'batch_{batch}']['ratio']:.2f} |"
        for batch in (32, 1)
    ]
    return [
        "",
        f"Latency on CPU, {t['threads']} torch threads: the median of "
        f"{t['repeats']} runs of each model on held-out texts, timed in turn "
        "(tokenization included).",
        "",
        "| batch | original | kflats | ratio |",
        "|---|---|---|---|",
        *rows,
    ]


def _md_modules(data):
    lines = [
        "",
        "## Modules",
        "",
        "Error: relative squared error under the calibrated objective "
        "(frequency-weighted rows, whitened inputs), and the plain relative "
        "error of the weight.",
        "",
        "| module | kind | shape | form | bits | k | ranks | side | numbers "
        "before | after | bytes before | after | calibrated error | plain error "
        "| s |",
        "|---" * 15 + "|",
    ]
    for m in data["compression"]["modules"]:
        plain = m["weight_error"]
        bits = m.get("bits")
        lines.append(
            f"| `{m['name']}` | {m['kind']} | {m['shape'][0]} × {m['shape'][1]} "
            f"| {m.get('form') or 'projective'} | {bits or 32} "
            f"| {m['k']} | {_ranks(m['ranks'])} | {m['side'] or ''} "
            f"| {m['params_before']:,} | {m['params_after']:,} "
            f"| {m['bytes_before']:,} | {m['bytes_after']:,} | {m['error']:.4f} "
            f"| {'' if plain is None else f'{plain:.4f}'} | {m['seconds']:.1f} |"
        )
    return lines


def _md_pictures_and_run(data, pictures):
    lines = ["", "## Pictures", ""]
    if not pictures:
        lines.append("(matplotlib is not installed: no pictures.)")
    for name in pictures:
        lines += [f"![{_PICTURES[name]}]({name})", ""]
    seconds = data.get("seconds", {})
    return lines + [
        "## Run",
        "",
        "Seconds: "
        + ", ".join(f"{k} {v:.1f}" for k, v in seconds.items())
        + ". Versions: "
        + ", ".join(f"{k} {v}" for k, v in data["versions"].items())
        + ".",
        "",
    ]


def _markdown(data, pictures):
    return "\n".join(
        _md_head(data)
        + _md_totals(data)
        + _md_fidelity(data)
        + _md_model_metrics(data)
        + _md_latency(data)
        + _md_probe(data)
        + _md_modules(data)
        + _md_pictures_and_run(data, pictures)
    )


def write_report(folder, data, pictures):
    """Write report.json and report.md; returns every report file's name."""
    with open(os.path.join(folder, "report.json"), "w", encoding="utf-8") as fh:
        json.dump({**data, "pictures": pictures}, fh, indent=2)
        fh.write("\n")
    with open(os.path.join(folder, "report.md"), "w", encoding="utf-8") as fh:
        fh.write(_markdown(data, pictures))
    return ["report.md", "report.json", *pictures]
