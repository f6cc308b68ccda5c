"""``python -m kflats``: the command line, :func:`kflats.cli.main.main`."""

import sys

from kflats.cli.main import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
