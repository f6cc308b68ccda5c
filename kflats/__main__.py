"""Command line of kflats: ``kflats fit`` (or ``python -m kflats fit``).

``kflats fit`` fits KSubspaces to a matrix's rows — by default the word-embedding
table of the bundled all-MiniLM-L6-v2 model, else a ``.npy`` file — and prints
what it found next to truncated SVD at the same number of parameters.
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


def main(argv=None):
    """Entry point of the ``kflats`` command."""
    parser = argparse.ArgumentParser(
        prog="kflats",
        description="Projective clustering and layer compression with kflats.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    fit = sub.add_parser(
        "fit", help="fit k subspaces to the rows of a matrix and report the cost"
    )
    fit.add_argument(
        "--matrix",
        default="minilm",
        help="'minilm' (the bundled all-MiniLM-L6-v2 embedding table, default) "
        "or a .npy file holding a 2-D array",
    )
    fit.add_argument("--k", type=_positive_int, default=5, help="subspaces (5)")
    fit.add_argument("--j", type=_positive_int, default=216, help="dimension (216)")
    fit.add_argument("--affine", action="store_true", help="fit affine flats")
    fit.add_argument("--random-state", type=int, default=0)
    fit.set_defaults(func=_cmd_fit)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, ImportError) as exc:
        print(f"kflats: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
