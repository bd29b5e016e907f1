"""Sphinx configuration of the condconv_ref documentation.

Build:     sphinx-build -W -b html docs docs/_build/html
Examples:  python -m pytest tests/test_docs.py   (the pages' >>> examples, scripts, figures)

The ``>>>`` examples of the pages under docs/ run in the ordinary test suite
(``tests/test_docs.py``), and those of the docstrings under
``pytest --doctest-modules``; the docstring examples rely on their module's
globals, which Sphinx's doctest builder does not provide, so it is not used.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "_ext"))
os.environ.setdefault("MPLBACKEND", "Agg")

import condconv_ref  # noqa: E402
from api_pages import api_sources, write_api_pages  # noqa: E402

# The API reference pages are written from the package's __all__ lists before
# anything is read, and autosummary is pointed at exactly those pages (a new
# page is not yet among the environment's documents in an incremental build).
write_api_pages(HERE)

project = "condconv_ref"
author = "condconv_ref contributors"
copyright = "condconv_ref contributors"
release = condconv_ref.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "numpydoc",
    "myst_parser",
    "matplotlib.sphinxext.plot_directive",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "_scripts", "_templates", "_ext", "Thumbs.db", ".DS_Store"]
templates_path = ["_templates"]
default_role = "math"

# -- autodoc / autosummary / numpydoc ---------------------------------------
autosummary_generate = sorted(api_sources())
autosummary_imported_members = True
autodoc_typehints = "none"
autodoc_member_order = "bysource"
numpydoc_show_class_members = False
numpydoc_class_members_toctree = False
numpydoc_attributes_as_param_list = False

# -- markdown pages written by other issues (golden format, performance, ...) -
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "deflist"]
myst_heading_anchors = 3
# Pages of other issues may start at '##' or skip a level; that is a style
# choice of theirs, not a broken build.
suppress_warnings = ["myst.header"]

# -- figures ------------------------------------------------------------------
plot_basedir = str(HERE / "_scripts")
plot_working_directory = str(HERE / "_scripts")
plot_include_source = False
plot_html_show_source_link = True
plot_html_show_formats = False
plot_formats = [("png", 110)]
plot_rcparams = {"figure.autolayout": True, "font.size": 10}

# -- HTML -----------------------------------------------------------------------
html_theme = "pydata_sphinx_theme"
html_title = f"condconv_ref {release}"
html_static_path = ["_static"]
html_theme_options = {
    "navigation_with_keys": False,
    "show_toc_level": 2,
    "secondary_sidebar_items": ["page-toc", "sourcelink"],
}
