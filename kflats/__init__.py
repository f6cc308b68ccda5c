"""kflats: projective clustering and the compression of layers built on it."""

__version__ = "0.1.0.dev0"
