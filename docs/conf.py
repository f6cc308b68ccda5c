"""Sphinx configuration of the kflats documentation.

Build with ``python -m sphinx -b html docs docs/_build/html``. The build works
offline: intersphinx gives up on unreachable inventories after a short timeout
(a warning, not an error), and the API pages of the optional parts
(:mod:`kflats.factorize`, :mod:`kflats.torch`) are left out when they cannot be
imported.
"""

import importlib
import os
from pathlib import Path

import kflats

HERE = Path(__file__).resolve().parent

# -- Project -----------------------------------------------------------------

project = "kflats"
author = "The kflats developers"
copyright = "The kflats developers"
version = kflats.__version__
release = kflats.__version__

# -- General -----------------------------------------------------------------

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.intersphinx",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "numpydoc",
    "sphinx_gallery.gen_gallery",
]

templates_path = ["_templates"]
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store", "**.ipynb_checkpoints"]
default_role = "literal"
nitpicky = False

autosummary_generate = True
autodoc_default_options = {"members": True, "inherited-members": False}
autodoc_typehints = "none"

numpydoc_show_class_members = False
numpydoc_class_members_toctree = False
numpydoc_xref_param_type = False

# -- Optional API pages --------------------------------------------------------
# An API page is built only when its module imports: kflats.torch needs torch,
# and a checkout may not hold every module yet.

OPTIONAL_API = {
    "kflats.factorize": "api/factorize",
    "kflats.torch": "api/torch",
}


def _importable(name):
    try:
        importlib.import_module(name)
    except ImportError:
        return False
    return True


AVAILABLE_API = [doc for mod, doc in OPTIONAL_API.items() if _importable(mod)]
exclude_patterns += [
    doc + ".rst" for doc in OPTIONAL_API.values() if doc not in AVAILABLE_API
]


def _add_optional_api(app, docname, source):
    """Append the importable optional API pages to the API toctree."""
    if docname != "api/index":
        return
    entries = "".join(f"   {doc.split('/')[-1]}\n" for doc in AVAILABLE_API)
    source[0] = source[0].replace("   .. optional-api\n", entries)


def setup(app):
    app.connect("source-read", _add_optional_api)


# -- intersphinx -------------------------------------------------------------
# Unreachable inventories (no network) only warn; keep the wait short.

intersphinx_mapping = {
    "python": ("https://docs.python.org/3", None),
    "numpy": ("https://numpy.org/doc/stable/", None),
    "scipy": ("https://docs.scipy.org/doc/scipy/", None),
    "sklearn": ("https://scikit-learn.org/stable/", None),
    "torch": ("https://pytorch.org/docs/stable/", None),
}
intersphinx_timeout = float(os.environ.get("KFLATS_INTERSPHINX_TIMEOUT", "3"))
if os.environ.get("KFLATS_DOCS_OFFLINE"):
    intersphinx_mapping = {}

# -- sphinx-gallery ----------------------------------------------------------

sphinx_gallery_conf = {
    "examples_dirs": str(HERE.parent / "examples"),
    "gallery_dirs": "auto_examples",
    "filename_pattern": r"/plot_",
    "ignore_pattern": r"__init__\.py",
    "doc_module": ("kflats",),
    "backreferences_dir": "generated/backreferences",
    "matplotlib_animations": False,
    "remove_config_comments": True,
    "within_subsection_order": "FileNameSortKey",
    "download_all_examples": False,
    "image_scrapers": ("matplotlib",),
    "capture_repr": ("_repr_html_", "__repr__"),
    "min_reported_time": 1,
}
os.environ.setdefault("MPLBACKEND", "Agg")

# -- HTML --------------------------------------------------------------------

try:
    import pydata_sphinx_theme  # noqa: F401

    html_theme = "pydata_sphinx_theme"
    html_theme_options = {
        "navigation_with_keys": False,
        "show_toc_level": 2,
        "secondary_sidebar_items": ["page-toc", "sourcelink"],
    }
except ImportError:
    html_theme = "alabaster"
    html_theme_options = {}

html_title = f"kflats {release}"
html_show_sourcelink = True
