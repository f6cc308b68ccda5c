"""``kflats fit``: k subspaces fitted to a matrix's rows, its cost, and ``--out``.

With ``--out``, the fitted model is saved as a pickle-free ``.npz``
(``labels_``, ``bases_``, ``inertia_``, ``k``, ``j``, ``affine``, and
``means_`` when affine).
"""

import time

import numpy as np

from ._common import integer_at_least, matrix_and_out, save_output


def add_parser(subparsers, common):
    """Register ``kflats fit`` on the ``kflats`` command's subparsers."""
    parser = subparsers.add_parser(
        "fit",
        parents=[common],
        help="fit k subspaces to the rows of a matrix and report the cost",
    )
    parser.add_argument(
        "--k", type=integer_at_least(1), default=5, help="subspaces (5)"
    )
    parser.add_argument(
        "--j", type=integer_at_least(1), default=216, help="dimension (216)"
    )
    parser.add_argument("--affine", action="store_true", help="fit affine flats")
    parser.add_argument(
        "--out",
        metavar="PATH",
        help="save the fitted model to this .npz file, without pickle: labels_, "
        "bases_, inertia_, k, j, affine, and means_ when affine",
    )
    parser.set_defaults(func=run)
    return parser


def run(args):
    """Run ``kflats fit`` with parsed arguments; returns the exit status."""
    from kflats import KSubspaces

    A, out = matrix_and_out(args)
    start = time.perf_counter()
    ks = KSubspaces(
        k=args.k, j=args.j, affine=args.affine, random_state=args.random_state
    ).fit(A)
    elapsed = time.perf_counter() - start
    print(
        f"KSubspaces(k={args.k}, j={args.j}{', affine' if args.affine else ''}): "
        f"{ks.n_iter_} iterations in {elapsed:.2f} s (first run includes Numba "
        "compilation)"
    )
    _print_costs(A, ks, args)
    if out:
        arrays = {
            "labels_": ks.labels_,
            "bases_": ks.bases_,
            "inertia_": np.float64(ks.inertia_),
            "k": np.int64(args.k),
            "j": np.int64(args.j),
            "affine": np.bool_(args.affine),
        }
        if args.affine:
            arrays["means_"] = ks.means_
        save_output(out, lambda f: np.savez(f, **arrays), args, "model")
    return 0


def _print_costs(A, ks, args):
    """The fit's relative cost, beside truncated SVD with as many numbers."""
    n, d = A.shape
    A64 = A.astype(np.float64)
    total = float(np.einsum("ij,ij->", A64, A64))
    if args.affine:
        total = float(((A64 - A64.mean(axis=0)) ** 2).sum())
    sizes = np.bincount(ks.labels_, minlength=args.k)
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
