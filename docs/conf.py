"""Sphinx configuration of the hdn book: `make book` (docs/conf.py, sources from the repository root).

The book is built from the repository root (``sphinx-build -c docs . build/book/html``) so
that the notebooks and the README are read where they are: ``notebooks/*.ipynb`` with their
stored outputs (myst-nb, no execution), ``docs/*.md`` (MyST), ``README.md``, the READMEs of
``data/`` and ``benchmarks/`` (so that the README's links to them resolve) and an API
reference from the docstrings (autodoc, Google-style sections by napoleon).

Nothing is loaded from the network when a page is read: MathJax comes from the npm package
that ``tests/browser/package.json`` installs (``npm ci`` in ``make book``), copied into the
site. Widgets are not live in a static page; the notebooks draw the same figure statically
before each widget.

What a reader sees is adjusted here and in ``docs/_static/hdn.css`` rather than in the notebooks
(``make book-check`` checks each point in Chromium):

* maths written as ``$...$`` inside raw HTML (the ``<details>`` hints and solutions) is typeset
  like the rest (:func:`_math_in_raw_html`);
* notebook cells, wide code blocks and wide figures span the text column and the margin beside
  it (the theme's ``full-width``), code and text outputs wrap instead of scrolling sideways, and
  a display equation too wide for its column is set smaller (``docs/_static/hdn.js``);
* the API reference shows each docstring once, where it is written: it leaves out class members
  without a docstring of their own (PyTorch's ``forward`` and ``extra_repr``, a base class's
  method, a NamedTuple field's generated "Alias for field number 0").
"""

from __future__ import annotations

import hashlib
import html
import inspect
import re
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
include_patterns = [
    "docs/*.md", "notebooks/*.ipynb", "README.md", "data/README.md", "benchmarks/README.md",
]
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
html_context = {
    "default_mode": "light",  # an explicit mode: the theme logs a console error without one
    # this file's own digest: editing the transforms below rewrites every page (an incremental
    # build otherwise keeps pages whose sources did not change)
    "hdn_conf": hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:12],
}
html_last_updated_fmt = None
html_static_path = ["_static"]  # docs/_static: hdn.css
html_css_files = ["hdn.css"]
html_js_files = ["hdn.js"]  # fits wide display equations into their column

# MathJax from the npm package (tests/browser/node_modules/mathjax), copied into _static.
_MATHJAX = ROOT / "tests" / "browser" / "node_modules" / "mathjax" / "es5"
_STAGE = ROOT / "build" / "book" / "static"
if _MATHJAX.is_dir():
    target = _STAGE / "mathjax"
    if not (target / "tex-mml-chtml.js").is_file():
        shutil.copytree(_MATHJAX, target, dirs_exist_ok=True)
    html_static_path.append(str(_STAGE))
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


# --- what the reader sees ---------------------------------------------------------------------
# Inline $...$ as MyST's dollarmath reads it: no space inside either dollar, no letter, digit or
# dollar right after the closing one; $$...$$ is display maths.
_DISPLAY_MATH = re.compile(r"\$\$(.+?)\$\$", re.DOTALL)
_INLINE_MATH = re.compile(r"(?<![\\$\w])\$(?=\S)([^$]*?\S)(?<!\\)\$(?![\w$])")
_VERBATIM = re.compile(r"(<(code|pre|script|style|kbd|samp|tt)\b.*?</\2\s*>|<[^>]*>)", re.DOTALL | re.IGNORECASE)


def _typeset_dollars(text: str) -> str:
    """``$...$`` and ``$$...$$`` in an HTML fragment's text as Sphinx writes maths (MathJax's
    ``\\(...\\)`` and ``\\[...\\]`` in ``math`` elements); tags, code and scripts unchanged."""

    def math(body: str, display: bool) -> str:
        body = html.escape(html.unescape(body), quote=False)
        if display:
            return f'<div class="math notranslate nohighlight">\\[{body}\\]</div>'
        return f'<span class="math notranslate nohighlight">\\({body}\\)</span>'

    parts = _VERBATIM.split(text)
    out = []
    # split() with two groups yields: text, whole tag or verbatim element, inner group, text, ...
    for i in range(0, len(parts), 3):
        chunk = _DISPLAY_MATH.sub(lambda m: math(m.group(1), True), parts[i])
        out.append(_INLINE_MATH.sub(lambda m: math(m.group(1), False), chunk))
        if i + 1 < len(parts):
            out.append(parts[i + 1])
    return "".join(out)


def _math_in_raw_html(app, doctree, docname) -> None:
    """Typeset ``$...$`` inside raw HTML: MyST passes an HTML block such as a ``<details>`` hint
    through untouched, so its maths would reach the page as raw text (Jupyter typesets it)."""
    from docutils import nodes

    for node in list(doctree.findall(nodes.raw)):
        if "html" not in node.get("format", "").split() or "$" not in node.astext():
            continue
        new = _typeset_dollars(node.astext())
        if new != node.astext():
            node.replace_self(nodes.raw(new, new, format="html"))


_WIDE_IMAGE_PX = 800  # a figure this wide (natural size) would be shrunk in the text column
_WIDE_CODE_CHARS = 76  # a code line this long would wrap in the text column (688 px at 1280 px)


def _wide_content(app, doctree, docname) -> None:
    """Notebook cells, code blocks of the text flow with long lines, and paragraphs holding only
    a wide image take the theme's ``full-width`` class: the text column plus the margin, where
    the page's table of contents folds away."""
    from docutils import nodes

    for node in doctree.findall(nodes.container):
        if node.get("nb_element") == "cell_code":
            node["classes"].append("full-width")
    for block in doctree.findall(nodes.literal_block):
        if isinstance(block.parent, nodes.section) and max(
            (len(line) for line in block.astext().splitlines()), default=0
        ) > _WIDE_CODE_CHARS:
            block["classes"].append("full-width")
    for image in list(doctree.findall(nodes.image)):
        para = image.parent
        if not isinstance(para, nodes.paragraph) or len(para.children) != 1:
            continue
        import imagesize  # a dependency of Sphinx

        path = Path(app.srcdir) / image["uri"]
        width = imagesize.get(str(path))[0] if path.is_file() else -1  # -1: unknown, stays as it is
        if width >= _WIDE_IMAGE_PX:
            box = nodes.container(classes=["full-width", "hdn-wide-figure"])
            para.replace_self(box)
            box += para


_GENERATED_DOC = re.compile(r"Alias for field number \d+")  # a NamedTuple field's docstring


def _borrowed_docstring(obj) -> bool:
    """Whether a class member has no docstring written for it: one it would inherit (PyTorch's
    ``forward`` and ``extra_repr``; a base class's method, documented there) or one that Python
    generates (a NamedTuple field's "Alias for field number 0"; its class's Attributes say it)."""
    doc = getattr(obj, "__doc__", None)
    if isinstance(doc, str) and _GENERATED_DOC.fullmatch(doc.strip()):
        return True
    func = obj.fget if isinstance(obj, property) else getattr(obj, "__func__", obj)
    return inspect.isfunction(func) and not func.__doc__


def _skip_borrowed_docstrings(app, what, name, obj, skip, options):
    """autodoc-skip-member: leave out what :func:`_borrowed_docstring` finds."""
    if what in ("class", "exception") and _borrowed_docstring(obj):
        return True
    return None


def setup(app):
    app.connect("build-finished", _redirect_to_the_root_doc)
    app.connect("doctree-resolved", _math_in_raw_html)
    app.connect("doctree-resolved", _wide_content)
    app.connect("autodoc-skip-member", _skip_borrowed_docstrings)
