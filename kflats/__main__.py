"""Command line of kflats: ``kflats factorize`` and ``kflats fit``.

Both work on a matrix's rows — by default the word-embedding table of the
bundled all-MiniLM-L6-v2 model, else a 2-D array in a ``.npy`` file.

- ``kflats factorize --budget 0.6`` compresses the matrix into per-cluster
  factor pairs keeping that fraction of its parameters, prints the error next to
  truncated SVD at the same budget, and saves the factors with ``--output``.
- ``kflats fit`` fits KSubspaces and prints the cost it reached.
"""

import argparse
import sys
import time

import numpy as np


def _load_matrix(source):
    if source == "minilm":
        from kflats.datasets import load_minilm_embeddings

        return load_minilm_embeddings(), "all-MiniLM-L6-v2 word embeddings"
    if not source.endswith(".npy"):
        raise SystemExit(
            f"kflats: --matrix must be 'minilm' or a path to a .npy file, got "
            f"{source!r}."
        )
    try:
        A = np.load(source, allow_pickle=False)
    except OSError as exc:
        raise SystemExit(f"kflats: cannot read --matrix {source!r}: {exc}") from exc
    if A.ndim != 2:
        raise SystemExit(
            f"kflats: --matrix must hold a 2-D array, got shape {A.shape}."
        )
    return A, source


def _positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text}")
    return value


def _cmd_fit(args):
    from kflats import KSubspaces

    A, name = _load_matrix(args.matrix)
    n, d = A.shape
    print(f"matrix: {name}, {n} x {d}, {A.dtype}")
    start = time.perf_counter()
    ks = KSubspaces(
        k=args.k, j=args.j, affine=args.affine, random_state=args.random_state
    ).fit(A)
    elapsed = time.perf_counter() - start
    A64 = A.astype(np.float64)
    total = float(np.einsum("ij,ij->", A64, A64))
    if args.affine:
        total = float(((A64 - A64.mean(axis=0)) ** 2).sum())
    sizes = np.bincount(ks.labels_, minlength=args.k)
    print(
        f"KSubspaces(k={args.k}, j={args.j}{', affine' if args.affine else ''}): "
        f"{ks.n_iter_} iterations in {elapsed:.2f} s (first run includes Numba "
        "compilation)"
    )
    print(f"  rows per subspace: {sizes.tolist()}")
    print(f"  relative cost inertia / ||A||^2: {ks.inertia_ / total:.4f}")
    if not args.affine:
        params = args.k * args.j * d + n * args.j + (n if args.k > 1 else 0)
        rank = max(1, params // (n + d))
        s = np.linalg.svd(A64, compute_uv=False)
        print(
            f"  truncated SVD with as many parameters (rank {rank}): relative "
            f"cost {(s[rank:] ** 2).sum() / total:.4f}"
        )
    return 0


def _budget(text):
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1], got {text}")
    return value


def _cmd_factorize(args):
    from kflats.factorize import factorize, svd_factors

    A, name = _load_matrix(args.matrix)
    n, d = A.shape
    print(f"matrix: {name}, {n} x {d}, {A.dtype}; budget {args.budget:g}")
    start = time.perf_counter()
    svd = svd_factors(A, budget=args.budget)
    svd_time = time.perf_counter() - start
    start = time.perf_counter()
    factors = factorize(
        A,
        k=args.k,
        budget=args.budget,
        ranks=args.ranks,
        random_state=args.random_state,
    )
    elapsed = time.perf_counter() - start
    print(
        f"truncated SVD (rank {svd.ranks[0]}): relative error {svd.error:.4f}, "
        f"{svd.compression:.3f} of the parameters, {svd_time:.2f} s"
    )
    ranks = factors.ranks
    shown = ranks if len(ranks) <= 8 else f"{ranks[:8]}..."
    print(
        f"kflats ({args.ranks} ranks, k={factors.k}, ranks {shown}): relative "
        f"error {factors.error:.4f}, {factors.compression:.3f} of the parameters, "
        f"{elapsed:.2f} s (the first call includes Numba compilation)"
    )
    if args.output:
        factors.save(args.output)
        print(f"factors saved to {args.output}")
    return 0


def main(argv=None):
    """Entry point of the ``kflats`` command."""
    parser = argparse.ArgumentParser(
        prog="kflats",
        description="Projective clustering and layer compression with kflats.",
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--matrix",
        default="minilm",
        help="'minilm' (the bundled all-MiniLM-L6-v2 embedding table, default) "
        "or a .npy file holding a 2-D array",
    )
    common.add_argument("--random-state", type=int, default=0)
    sub = parser.add_subparsers(dest="command", required=True)
    fac = sub.add_parser(
        "factorize",
        parents=[common],
        help="compress a matrix into per-cluster factor pairs under a budget",
    )
    fac.add_argument(
        "--budget",
        type=_budget,
        default=0.6,
        help="fraction of the parameters to keep (0.6)",
    )
    fac.add_argument(
        "--ranks",
        choices=["adaptive", "uniform"],
        default="adaptive",
        help="per-cluster ranks (adaptive, default) or one rank for all",
    )
    fac.add_argument(
        "--k",
        type=_positive_int,
        nargs="+",
        default=None,
        help="number(s) of clusters to try (default: kflats' search grid)",
    )
    fac.add_argument("--output", help="save the factors to this .npz file")
    fac.set_defaults(func=_cmd_factorize)
    fit = sub.add_parser(
        "fit",
        parents=[common],
        help="fit k subspaces to the rows of a matrix and report the cost",
    )
    fit.add_argument("--k", type=_positive_int, default=5, help="subspaces (5)")
    fit.add_argument("--j", type=_positive_int, default=216, help="dimension (216)")
    fit.add_argument("--affine", action="store_true", help="fit affine flats")
    fit.set_defaults(func=_cmd_fit)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, ImportError) as exc:
        print(f"kflats: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
