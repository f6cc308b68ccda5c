"""kflats.torch on all-MiniLM-L6-v2: sentence-embedding fidelity and speed.

Run from the repository root (needs ``pip install kflats[nlp]``; nothing is
downloaded)::

    python benchmarks/torch_report.py            # full report
    python benchmarks/torch_report.py --quick    # small fits, fewer repeats

It prints

1. fidelity: the word-embedding table compressed to each budget by kflats and
   by a truncated SVD of the same size; mean and worst cosine between the
   compressed and the original model's normalised sentence embeddings, and the
   mean overlap of each sentence's 5 nearest neighbours, on the English
   sentences of ``benchmarks/data/sentences.txt``;
2. the forward time of ProjectiveEmbedding against the SVD-factorised
   embedding of the same size (``Embedding(n, r)`` then ``Linear(r, d)``) and
   against ``nn.Embedding``, on 32 x 128 token ids;
3. the forward time of ProjectiveLinear against ``nn.Linear`` at batch 64, on
   MiniLM's feed-forward layers;
4. the encode time of the whole model with the compressed embedding against
   the original.

Timings interleave the variants and report the minimum over repeats (the
machine's noise only ever adds time) with the median beside it.
"""

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from kflats.factorize import factorize, factorize_linear, svd_factors  # noqa: E402
from kflats.torch import (  # noqa: E402
    ProjectiveEmbedding,
    ProjectiveLinear,
    token_frequencies,
)
from kflats.torch.evaluation import fidelity  # noqa: E402
from kflats.torch.evaluation import sentence_embeddings as encode  # noqa: E402

DATA = Path(__file__).parent / "data" / "sentences.txt"


def load_model():
    from sentence_transformers import SentenceTransformer

    from kflats.datasets import minilm_model_dir

    return SentenceTransformer(str(minilm_model_dir()), device="cpu")


def word_embeddings_owner(model):
    return model[0].auto_model.embeddings


def calibration_weights(tokenizer, n):
    """Token frequencies on a calibration text disjoint from the test sentences.

    The text is the English prose of Python's own reference documentation
    (``pydoc_data.topics``, shipped with CPython, so nothing is downloaded);
    add-one smoothing keeps every token's weight positive.
    """
    from pydoc_data.topics import topics

    lines = [line for text in topics.values() for line in text.splitlines() if line]
    weights = token_frequencies(tokenizer, lines, vocab_size=n, smoothing=1.0)
    return weights, int(weights.sum() - n)


def timeit(functions, repeats):
    """Interleaved timing: {name: (min seconds, median seconds)}."""
    times = {name: [] for name in functions}
    with torch.inference_mode():
        for f in functions.values():
            f()
            f()
        for _ in range(repeats):
            for name, f in functions.items():
                start = time.perf_counter()
                f()
                times[name].append(time.perf_counter() - start)
    return {name: (min(t), float(np.median(t))) for name, t in times.items()}


def svd_embedding(factors, device=None):
    """The SVD form of an embedding: Embedding(n, r) followed by Linear(r, d)."""
    U, V = factors.U[0], factors.V[0]
    rank, d = V.shape
    small = nn.Embedding(U.shape[0], rank)
    up = nn.Linear(rank, d, bias=False)
    with torch.no_grad():
        small.weight.copy_(torch.from_numpy(U))
        up.weight.copy_(torch.from_numpy(V.T.copy()))
    return nn.Sequential(small, up)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.6, 0.4])
    parser.add_argument(
        "--k",
        type=int,
        nargs="+",
        default=None,
        help="numbers of clusters to search (default: kflats' own grid)",
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    repeats = 10 if args.quick else 40
    k = args.k if args.k else ([4] if args.quick else None)
    torch.manual_seed(args.seed)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")

    model = load_model().eval()
    owner = word_embeddings_owner(model)
    original = owner.word_embeddings
    A = original.weight.detach().numpy()
    sentences = [s.strip() for s in DATA.read_text().splitlines() if s.strip()]
    reference = encode(model, sentences)
    n, d = A.shape
    print(f"word embeddings {n} x {d}; {len(sentences)} sentences from {DATA.name}")

    # 1. fidelity ------------------------------------------------------------
    print("\n1. Sentence-embedding fidelity (no fine-tuning)")
    header = (
        f"{'budget':>6}  {'method':<13} {'k':>2}  {'params':>9}  {'ratio':>5}  "
        f"{'rel.err':>7}  {'mean cos':>8}  {'worst cos':>9}  {'top-5 overlap':>13}"
        f"  {'fit s':>6}"
    )
    print(header)
    weights, n_calib = calibration_weights(model.tokenizer, n)
    fitted = {}
    for budget in args.budgets:
        runs = []
        for weighted in (False, True):
            w = weights if weighted else None
            tag = "+calib" if weighted else ""
            start = time.perf_counter()
            svd = svd_factors(A, budget=budget, sample_weight=w)
            runs.append(("svd" + tag, svd, time.perf_counter() - start))
            start = time.perf_counter()
            kf = factorize(
                A,
                k,
                budget=budget,
                ranks="adaptive",
                sample_weight=w,
                random_state=args.seed,
            )
            runs.append(("kflats" + tag, kf, time.perf_counter() - start))
            if not weighted:
                fitted[budget] = (kf, svd)
        for name, f, secs in runs:
            owner.word_embeddings = ProjectiveEmbedding.from_factors(
                f, padding_idx=original.padding_idx
            )
            scores = fidelity(reference, encode(model, sentences))
            mean, worst = scores["mean_cosine"], scores["worst_cosine"]
            overlap = scores["top5_overlap"]
            owner.word_embeddings = original
            print(
                f"{budget:>6.2f}  {name:<13} {f.k:>2}  {f.n_params:>9}  "
                f"{f.compression:>5.3f}  {f.error:>7.4f}  {mean:>8.4f}  "
                f"{worst:>9.4f}  {overlap:>13.3f}  {secs:>6.1f}"
            )
        print(f"{'':>6}  kflats ranks: {runs[1][1].ranks}, +calib: {runs[3][1].ranks}")
    print(
        f"  +calib: rows weighted by token frequency on {n_calib} tokens of "
        "calibration text (pydoc_data.topics), disjoint from the test sentences;"
        "\n  rel.err is weighted for those rows"
    )

    # 2. embedding forward ---------------------------------------------------
    budget = args.budgets[0]
    kf, svd = fitted[budget]
    layer = ProjectiveEmbedding.from_factors(kf, padding_idx=original.padding_idx)
    svd_layer = svd_embedding(svd)
    print(
        f"\n2. Embedding forward, 32 x 128 token ids, budget {budget} "
        f"(kflats k={kf.k}, SVD rank {svd.ranks[0]})"
    )
    batches = {
        "uniform random ids": torch.randint(0, n, (32, 128)),
        "ids of the sentences": model.tokenizer(
            (sentences * 2)[:32] if len(sentences) >= 16 else sentences,
            padding="max_length",
            truncation=True,
            max_length=128,
            return_tensors="pt",
        )["input_ids"],
    }
    for label, ids in batches.items():
        t = timeit(
            {
                "ProjectiveEmbedding": lambda ids=ids: layer(ids),
                "SVD form": lambda ids=ids: svd_layer(ids),
                "nn.Embedding": lambda ids=ids: original(ids),
            },
            repeats * 5,
        )
        base = t["SVD form"][0]
        print(f"  {label} ({len(torch.unique(ids))} distinct)")
        for name, (best, med) in t.items():
            print(
                f"    {name:<20} min {best * 1e3:7.3f} ms  median {med * 1e3:7.3f} ms"
                f"  {best / base:5.2f}x SVD form"
            )

    # 3. linear forward ------------------------------------------------------
    print("\n3. ProjectiveLinear vs nn.Linear, batch 64 (MiniLM layer 0 feed-forward)")
    encoder = model[0].auto_model.encoder.layer[0]
    linears = {
        "intermediate 384->1536": encoder.intermediate.dense,
        "output 1536->384": encoder.output.dense,
    }
    for name, linear in linears.items():
        for lin_budget in (0.5, 0.3):
            f = factorize_linear(
                linear.weight.detach().numpy(),
                [2, 4],
                budget=lin_budget,
                ranks="adaptive",
                random_state=args.seed,
            )
            proj = ProjectiveLinear.from_factors(f, linear.bias.detach())
            x = torch.randn(64, linear.in_features)
            t = timeit(
                {
                    "ProjectiveLinear": lambda p=proj, x=x: p(x),
                    "nn.Linear": lambda m=linear, x=x: m(x),
                },
                repeats * 10,
            )
            ratio = t["ProjectiveLinear"][0] / t["nn.Linear"][0]
            print(
                f"  {name:<24} budget {lin_budget}: k={f.k} ranks={f.ranks} "
                f"{t['ProjectiveLinear'][0] * 1e3:.3f} ms vs "
                f"{t['nn.Linear'][0] * 1e3:.3f} ms  ({ratio:.2f}x nn.Linear, "
                f"rel.err {f.error:.3f})"
            )

    # 4. whole model ---------------------------------------------------------
    print(f"\n4. MiniLM encode of the {len(sentences)} sentences, batch 32")

    # one model, its embedding swapped in and out: no second copy to perturb caches
    def encode_with(embedding):
        owner.word_embeddings = embedding
        try:
            return encode(model, sentences)
        finally:
            owner.word_embeddings = original

    t = timeit(
        {
            "original": lambda: encode_with(original),
            f"kflats embedding ({budget})": lambda: encode_with(layer),
        },
        max(5, repeats // 2),
    )
    base = t["original"][0]
    for name, (best, med) in t.items():
        print(
            f"  {name:<24} min {best:.3f} s  median {med:.3f} s  "
            f"{best / base:.3f}x original"
        )


if __name__ == "__main__":
    main()
