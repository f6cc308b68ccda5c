"""kflats.factorize on all-MiniLM-L6-v2: error and wall time at a size budget.

Run from the repository root (needs ``pip install kflats[nlp]``; nothing is
downloaded)::

    python benchmarks/factorize_report.py                 # default k grid
    python benchmarks/factorize_report.py --k 1 6         # search only these k

It prints, for the word-embedding table (30522 x 384) at budgets 0.6 and 0.4,
and for two Linear weights (an attention projection and a feed-forward weight,
factorized on their input features as the torch layers use them):

- ``svd``: :func:`kflats.factorize.svd_factors` at the budget;
- ``uniform``: :func:`kflats.factorize.factorize` with uniform ranks;
- ``adaptive``: the same with ``ranks="adaptive"``;

each with its relative squared Frobenius error, the fraction of parameters it
keeps, the chosen k and ranks, and its wall time (one run, after a warm-up
fit that compiles the Numba kernels). The machine's load only ever adds time.
"""

import argparse
import os
import time

import numpy as np

from kflats import KSubspaces
from kflats.datasets import load_minilm_embeddings, load_minilm_weights
from kflats.factorize import K_GRID, factorize, factorize_linear, svd_factors

LINEAR = [
    "encoder.layer.0.attention.self.query.weight",
    "encoder.layer.0.intermediate.dense.weight",
]


def describe_ranks(ranks):
    if len(set(ranks)) == 1:
        return f"{ranks[0]} x{len(ranks)}" if len(ranks) > 1 else str(ranks[0])
    return ",".join(str(r) for r in ranks)


def run(name, fn, *args, **kwargs):
    start = time.perf_counter()
    f = fn(*args, **kwargs)
    seconds = time.perf_counter() - start
    print(
        f"  {name:<9} error {f.error:.4f}  kept {f.compression:.4f}  "
        f"k={f.k:<2} ranks {describe_ranks(f.ranks):<28} {seconds:7.2f} s",
        flush=True,
    )
    return f


def report(title, A, budgets, ks, seed, linear):
    n, d = A.T.shape if linear else A.shape
    print(f"\n{title}: factorized matrix {n} x {d}, {A.dtype}", flush=True)
    for budget in budgets:
        print(f" budget {budget}", flush=True)
        # a Linear weight W (out x in) is factorized on its input features,
        # the rows of W.T, as the layers of kflats.torch use it
        run("svd", svd_factors, A.T if linear else A, budget=budget)
        for ranks in ("uniform", "adaptive"):
            f = run(
                ranks,
                factorize_linear if linear else factorize,
                A,
                ks,
                budget=budget,
                ranks=ranks,
                random_state=seed,
            )
        print(
            "   search (adaptive, before refinement): "
            + "  ".join(f"k={c.k} j={c.j}: {c.error:.4f}" for c in f.search),
            flush=True,
        )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, nargs="+", default=None, help="k to search")
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.6, 0.4])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-embedding", action="store_true")
    args = parser.parse_args()
    ks = args.k
    print(
        f"kflats.factorize report; k grid {tuple(ks) if ks else K_GRID}, "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}"
    )
    # compile the Numba kernels before timing anything
    warm = np.random.default_rng(0).normal(size=(500, 16)).astype(np.float32)
    KSubspaces(k=2, j=3, random_state=0).fit(warm)

    if not args.skip_embedding:
        A = load_minilm_embeddings()
        report("word embeddings", A, args.budgets, ks, args.seed, linear=False)
    weights = load_minilm_weights(LINEAR)
    for name in LINEAR:
        W = weights[name]
        report(
            f"{name} (W.T, input features)",
            W,
            args.budgets,
            ks,
            args.seed,
            linear=True,
        )
    print(f"\nload average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
