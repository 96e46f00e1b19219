"""Sphinx configuration of the hdn book: `make book` (docs/conf.py, sources from the repository root).

The book is built from the repository root (``sphinx-build -c docs . build/book/html``) so
that the notebooks and the README are read where they are: ``notebooks/*.ipynb`` with their
stored outputs (myst-nb, no execution), ``docs/*.md`` (MyST), ``README.md`` and an API
reference from the docstrings (autodoc, Google-style sections by napoleon).

Nothing is loaded from the network when a page is read: MathJax comes from the npm package
that ``tests/browser/package.json`` installs (``npm ci`` in ``make book``), copied into the
site. Widgets are not live in a static page; the notebooks draw the same figure statically
before each widget.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import hdn  # noqa: E402

project = "hdn"
author = "The hdn workbook authors"
copyright = "The hdn workbook authors (MIT licence)"
release = version = hdn.__version__

root_doc = "docs/index"
include_patterns = ["docs/*.md", "notebooks/*.ipynb", "README.md", "data/README.md"]
exclude_patterns = ["build", "**/.ipynb_checkpoints", "**/node_modules"]

extensions = [
    "myst_nb",  # notebooks and MyST markdown (it brings myst_parser)
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
]

# --- notebooks ---------------------------------------------------------------------------
nb_execution_mode = "off"  # the stored outputs, as committed
nb_ipywidgets_js = {}  # no widget manager from a CDN: the static figure before a widget shows it
nb_merge_streams = True
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence"]
myst_heading_anchors = 3
suppress_warnings = ["mystnb.unknown_mime_type"]

# --- API reference -----------------------------------------------------------------------
autodoc_default_options = {"members": True, "show-inheritance": True}
autodoc_member_order = "bysource"
autodoc_typehints = "description"
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_ivar = True  # "Attributes:" as fields: NamedTuple fields are not documented twice

# --- HTML --------------------------------------------------------------------------------
html_theme = "sphinx_book_theme"
html_title = "hdn workbook"
html_theme_options = {
    "show_toc_level": 2,
    "use_download_button": True,
    "home_page_in_toc": True,
}
html_show_sourcelink = False
html_context = {"default_mode": "light"}  # an explicit mode: the theme logs a console error without one
html_last_updated_fmt = None

# MathJax from the npm package (tests/browser/node_modules/mathjax), copied into _static.
_MATHJAX = ROOT / "tests" / "browser" / "node_modules" / "mathjax" / "es5"
_STAGE = ROOT / "build" / "book" / "static"
if _MATHJAX.is_dir():
    target = _STAGE / "mathjax"
    if not (target / "tex-mml-chtml.js").is_file():
        shutil.copytree(_MATHJAX, target, dirs_exist_ok=True)
    html_static_path = [str(_STAGE)]
    mathjax_path = "mathjax/tex-mml-chtml.js"
else:  # pragma: no cover - make book installs it
    print("docs/conf.py: tests/browser/node_modules/mathjax is missing (run `npm ci` in tests/browser); "
          "MathJax would be loaded from its CDN", file=sys.stderr)


def _redirect_to_the_root_doc(app, exception) -> None:
    """build/book/html/index.html: the site's entry, forwarding to the root document."""
    if exception is None and app.builder.format == "html":
        target = app.builder.get_target_uri(root_doc)
        (Path(app.outdir) / "index.html").write_text(
            f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{project}</title>'
            f'<meta http-equiv="refresh" content="0; url={target}"></head>'
            f'<body><p><a href="{target}">{html_title}</a></p></body></html>\n'
        )


def setup(app):
    app.connect("build-finished", _redirect_to_the_root_doc)
