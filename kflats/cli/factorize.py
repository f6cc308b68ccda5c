"""``kflats factorize``: a matrix in per-cluster factor pairs under a budget.

Prints the error next to truncated SVD at the same budget and, with
``--out``, saves the :class:`~kflats.factorize.ProjectiveFactors`.
"""

import time

from ._common import budget_type, integer_at_least, matrix_and_out, save_output


def add_parser(subparsers, common):
    """Register ``kflats factorize`` on the ``kflats`` command's subparsers."""
    parser = subparsers.add_parser(
        "factorize",
        parents=[common],
        help="compress a matrix into per-cluster factor pairs under a budget",
    )
    parser.add_argument(
        "--budget",
        type=budget_type(include_one=True),
        default=0.6,
        help="fraction of the parameters to keep (0.6)",
    )
    parser.add_argument(
        "--ranks",
        choices=["adaptive", "uniform"],
        default="adaptive",
        help="per-cluster ranks (adaptive, default) or one rank for all",
    )
    parser.add_argument(
        "--k",
        type=integer_at_least(1),
        nargs="+",
        default=None,
        help="number(s) of clusters to try (default: kflats' search grid)",
    )
    parser.add_argument(
        "--out",
        "--output",
        metavar="PATH",
        help="save the factors to this .npz file (ProjectiveFactors.load reads it)",
    )
    parser.set_defaults(func=run)
    return parser


def run(args):
    """Run ``kflats factorize`` with parsed arguments; returns the exit status."""
    from kflats.factorize import factorize, svd_factors

    A, out = matrix_and_out(args, f"; budget {args.budget:g}")
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
    if out:
        save_output(out, factors.save, args, "factors")
    return 0
