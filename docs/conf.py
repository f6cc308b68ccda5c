"""Sphinx configuration of the kflats documentation.

Build with ``python -m sphinx -W -E -b html docs docs/_build/html`` (the
sphinx-gallery examples run during the build). intersphinx fetches the
inventories of Python, NumPy, SciPy, scikit-learn and PyTorch at build time;
without network each one it cannot reach is a warning, an error under ``-W``, so
an offline build (CI) sets ``KFLATS_DOCS_OFFLINE=1``, which leaves intersphinx
out: references to those projects then show as plain text. The API pages of the
optional parts (:mod:`kflats.factorize`, :mod:`kflats.torch`) are left out when
they cannot be imported.
"""

import importlib
import os
import re
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
# No "inherited-members" here: a default that is not a string replaces the
# directive's own option, and False would undo estimator.rst's
# :inherited-members: (class.rst, for torch modules, leaves it out).
autodoc_default_options = {"members": True}
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


# -- Methods from scikit-learn ------------------------------------------------
# The estimator pages show the methods inherited from scikit-learn (get_params,
# set_output, ...), whose docstrings point into scikit-learn's own glossary,
# user guide and gallery (:term:`meta-estimator`, :ref:`metadata_routing`).
# intersphinx links those when it has scikit-learn's inventory; when it has not
# (an offline build) they stay plain text instead of warning: kflats cannot
# fix them. References in kflats' own docstrings still warn.
#
# The set_{method}_request methods that scikit-learn generates on every
# estimator for each method taking metadata (set_fit_request,
# set_partial_fit_request, ...) are left out: the same text on every page, only
# relevant with metadata routing on. Matching the pattern rather than listing
# names keeps a new one from slipping in.

_METADATA_REQUEST = re.compile(r"set_\w+_request")


def _skip_metadata_requests(app, what, name, obj, skip, options):
    if what == "class" and _METADATA_REQUEST.fullmatch(name):
        return True
    return None  # autodoc decides


def _sklearn_reference_as_text(app, env, node, contnode):
    if ":docstring of sklearn." in (node.source or ""):
        return contnode
    return None  # a reference of kflats' own: warn as usual


def setup(app):
    app.connect("source-read", _add_optional_api)
    app.connect("autodoc-skip-member", _skip_metadata_requests)
    # After intersphinx (priority 500), which links them when it can.
    app.connect("missing-reference", _sklearn_reference_as_text, priority=900)


# -- intersphinx -------------------------------------------------------------
# An unreachable inventory warns (and fails a -W build) after this short wait;
# KFLATS_DOCS_OFFLINE=1 skips the fetch altogether.

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
