"""The ``kflats`` command line: ``kflats compress``, ``fit`` and ``factorize``.

- :mod:`kflats.cli.main`: the parser and :func:`~kflats.cli.main.main`, the
  entry point (``kflats`` and ``python -m kflats`` call it);
- :mod:`kflats.cli.fit`, :mod:`kflats.cli.factorize`,
  :mod:`kflats.cli.compress`: one module per subcommand, each with
  ``add_parser(subparsers, common)`` and ``run(args) -> int``;
- :mod:`kflats.cli._common`: what the subcommands share: argparse types,
  interruption (SIGTERM), the safe writing of ``--out`` (a file or a folder);
- :mod:`kflats.cli._arrays`: reading ``--matrix`` (fit, factorize);
- :mod:`kflats.cli._texts`: the calibration text and labels of ``kflats
  compress``; :mod:`kflats.cli._evaluate`: its evaluation (fidelity on
  held-out text and on text from another source, the baseline, the curve,
  probe, latency);
- :mod:`kflats.cli.report`: report.json, report.md and the pictures of
  ``kflats compress``; :mod:`kflats.cli._summary`: the summary it prints;
  :mod:`kflats.cli._steps`: its progress.

Importing this package imports neither torch nor transformers: the commands
import them when they run.
"""
