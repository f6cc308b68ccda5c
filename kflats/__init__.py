"""kflats: projective clustering and the compression of layers built on it.

``KSubspaces`` finds k subspaces of dimension j that best fit the rows of a
matrix; ``kflats.factorize`` turns a matrix into per-cluster factor pairs;
``kflats.torch`` (optional, needs torch) builds layers from those factors.
"""

from ._ksubspaces import KSubspaces
from ._seeding import ksubspaces_plusplus

__version__ = "0.1.0.dev0"

__all__ = ["KSubspaces", "ksubspaces_plusplus", "__version__"]
