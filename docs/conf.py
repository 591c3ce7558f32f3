"""Sphinx configuration of the lpwd_optax site.

Build (no network needed; warnings are errors):

    pip install -e '.[docs]'
    sphinx-build -W --keep-going -b html docs docs/_build/html
"""

from __future__ import annotations

import importlib.util
import pathlib
import sys

DOCS = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(DOCS / "_ext"))

import lpwd_optax  # noqa: E402

project = "lpwd_optax"
author = "lpwd_optax authors"
copyright = "the lpwd_optax authors"
version = release = lpwd_optax.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "myst_parser",
    "lpwd_docs",
]

root_doc = "index"
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]
templates_path = ["_templates"]

# Single backticks in docstrings are Python cross-references where a target exists (and code
# otherwise), as in the optax and JAX docstrings.
default_role = "py:obj"
add_function_parentheses = False
add_module_names = False

# API pages: one per public name, generated from the lists in docs/api/*.rst.
autosummary_generate = True
autosummary_ignore_module_all = False
autodoc_typehints = "signature"
autodoc_member_order = "bysource"
autodoc_preserve_defaults = True
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
python_maximum_signature_line_length = 88

# Math: MathJax 3 served from this site (the files come with the sphinx-mathjax-offline wheel),
# SVG output so no web font is fetched either.
_mathjax_spec = importlib.util.find_spec("sphinx-mathjax-offline")
if _mathjax_spec is None or _mathjax_spec.origin is None:
    raise RuntimeError("the docs need MathJax's files: pip install -e '.[docs]'")
MATHJAX_STATIC = pathlib.Path(_mathjax_spec.origin).parent / "static"
mathjax_path = "mathjax/tex-svg.js"

# MyST guides.
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "deflist"]
myst_heading_anchors = 3

# No network at build or view time: no intersphinx, no CDN, no remote images.
html_theme = "sphinx_book_theme"
html_title = f"lpwd_optax {release}"
html_static_path = ["_static", str(MATHJAX_STATIC)]
html_css_files = ["custom.css"]
html_theme_options = {
    "show_toc_level": 2,
    "navigation_with_keys": False,
    "home_page_in_toc": True,
}
html_context = {"default_mode": "light"}
html_show_sourcelink = False
html_last_updated_fmt = None
