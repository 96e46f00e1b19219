"""The site and the lab as a reader meets them, where this can be checked without a browser.

- The API page (docs/api.md, written by hand) lists every public module of ``hdn``, once.
- Every docstring that the API page shows is well-formed: each ``Args:``/``Attributes:`` entry
  names one parameter, and napoleon's reStructuredText of it parses without a warning.
- No notebook code cell shows a test-harness comment (``# NBVAL_IGNORE_OUTPUT``): the cell's
  ``nbval-*`` tag says it instead.
- The notebooks' links work in JupyterLab (``make lab`` serves the repository's root), on the
  site, and outside a clone (an ``online`` copy in the repository named in pyproject.toml).

``make book-check`` checks the rendered site in Chromium (tests/browser/book.check.mjs).
"""

from __future__ import annotations

import importlib
import inspect
import io
import json
import os
import pkgutil
import re
import subprocess
from pathlib import Path
from typing import ClassVar

import pytest
import tomllib

import hdn

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
API_PAGE = ROOT / "docs" / "api.md"
REPOSITORY = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["urls"]["Repository"]


def _public_modules() -> list[str]:
    names = ["hdn"] + [m.name for m in pkgutil.walk_packages(hdn.__path__, "hdn.")]
    return sorted(n for n in names if not any(p.startswith("_") for p in n.split(".")))


def _api_modules() -> list[str]:
    return re.findall(r"^\.\. automodule:: (\S+)", API_PAGE.read_text(), flags=re.MULTILINE)


def test_api_page_lists_every_public_module_once():
    listed = _api_modules()
    assert len(listed) == len(set(listed)), f"listed twice: {sorted(n for n in listed if listed.count(n) > 1)}"
    missing = sorted(set(_public_modules()) - set(listed))
    extra = sorted(set(listed) - set(_public_modules()))
    assert not missing, f"public modules missing from docs/api.md: {missing}"
    assert not extra, f"docs/api.md names modules that are not public modules of hdn: {extra}"


# --- the docstrings the API page shows ----------------------------------------------------------


def _documented() -> list[tuple[str, str, object]]:
    """(name, kind, object) of every docstring the API page shows, as autodoc picks them:
    each listed module, its members (``__all__``, else its own public names), their methods and
    properties that have a docstring of their own."""
    out = []
    for modname in _api_modules():
        module = importlib.import_module(modname)
        out.append((modname, "module", module))
        names = getattr(module, "__all__", None)
        if names is None:
            names = [n for n, v in vars(module).items() if not n.startswith("_")
                     and getattr(v, "__module__", None) == modname]
        for name in names:
            obj = getattr(module, name)
            if not (inspect.isclass(obj) or inspect.isfunction(obj)) or obj.__module__ != modname:
                continue
            out.append((f"{modname}.{name}", "class" if inspect.isclass(obj) else "function", obj))
            if inspect.isclass(obj):
                for attr, member in vars(obj).items():
                    func = member.fget if isinstance(member, property) else getattr(member, "__func__", member)
                    if attr.startswith("_") or not inspect.isfunction(func) or not func.__doc__:
                        continue
                    out.append((f"{modname}.{name}.{attr}", "method", func))
    return out


DOCUMENTED = _documented()
ENTRY = re.compile(r"^(\*{0,2}[A-Za-z_]\w*)( \([^()]*(\([^()]*\)[^()]*)*\))?: \S")
SECTIONS = ("Args:", "Arguments:", "Attributes:", "Keyword Args:", "Raises:")


def _entry_problems(doc: str) -> list[str]:
    """Each entry of an Args/Attributes/Raises section: ``name: text`` or ``name (type): text``
    at the section's indent plus one level, continued by deeper-indented lines."""
    lines = inspect.cleandoc(doc).splitlines()
    problems = []
    i = 0
    while i < len(lines):
        if lines[i].strip() not in SECTIONS:
            i += 1
            continue
        section, indent = lines[i].strip(), len(lines[i]) - len(lines[i].lstrip())
        i += 1
        entry_indent = None
        while i < len(lines) and (not lines[i].strip() or len(lines[i]) - len(lines[i].lstrip()) > indent):
            line = lines[i]
            i += 1
            if not line.strip():
                continue
            here = len(line) - len(line.lstrip())
            entry_indent = here if entry_indent is None else entry_indent
            if here > entry_indent:
                continue  # a continuation line
            if here < entry_indent or not (ENTRY.match(line.strip()) or (
                    section == "Raises:" and re.match(r"^[\w.]+: \S", line.strip()))):
                problems.append(f"{section} {line.strip()[:70]!r}")
    return problems


@pytest.mark.parametrize("name,kind,obj", DOCUMENTED, ids=[d[0] for d in DOCUMENTED])
def test_docstring_entries_name_one_parameter_each(name, kind, obj):
    assert not _entry_problems(obj.__doc__ or ""), _entry_problems(obj.__doc__ or "")


def _render_problems(name: str, kind: str, obj: object) -> list[str]:
    """Warnings of docutils on napoleon's reStructuredText of the docstring, and field names
    that are not one identifier (Sphinx's own roles and directives read as plain ones)."""
    from docutils import nodes
    from docutils.core import publish_doctree
    from docutils.parsers.rst import Directive, directives, roles
    from sphinx.ext.napoleon import Config
    from sphinx.ext.napoleon.docstring import GoogleDocstring

    def role(name, rawtext, text, lineno, inliner, options=None, content=None):
        return [nodes.literal(rawtext, text)], []

    for r in ("func", "class", "mod", "data", "attr", "meth", "exc", "obj", "ref", "any", "doc",
              "py:func", "py:class", "py:mod", "py:data", "py:attr", "py:meth", "py:obj"):
        roles.register_local_role(r, role)

    class Plain(Directive):
        has_content, optional_arguments, final_argument_whitespace = True, 3, True
        option_spec: ClassVar = {"linenos": directives.flag, "emphasize-lines": directives.unchanged}

        def run(self):
            return [nodes.literal_block("", "\n".join(self.content))]

    for d in ("code-block", "seealso", "versionadded", "versionchanged", "deprecated", "testcode"):
        directives.register_directive(d, Plain)

    config = Config(napoleon_use_ivar=True, napoleon_numpy_docstring=False)
    what = {"module": "module", "class": "class", "function": "function", "method": "method"}[kind]
    rst = str(GoogleDocstring(inspect.cleandoc(obj.__doc__ or ""), config, what=what, name=name, obj=obj))
    problems = []
    for m in re.finditer(r"^\s*:(param|ivar|type|vartype|raises|keyword|kwtype)\s+([^:]+):", rst, re.MULTILINE):
        pattern = r"[\w.]+" if m.group(1) == "raises" else r"(\\?\*){0,2}[A-Za-z_]\w*"
        if not re.fullmatch(pattern, m.group(2).strip()):
            problems.append(f"field {m.group(1)} {m.group(2)!r}")
    doctree = publish_doctree(rst, settings_overrides={
        "report_level": 5, "halt_level": 5, "warning_stream": io.StringIO()})
    for msg in doctree.findall(nodes.system_message):
        if msg["level"] >= 2:
            problems.append(msg.astext().replace("\n", " ")[:200])
    return problems


@pytest.mark.parametrize("name,kind,obj", DOCUMENTED, ids=[d[0] for d in DOCUMENTED])
def test_docstring_renders_without_warnings(name, kind, obj):
    pytest.importorskip("sphinx.ext.napoleon", reason="the docs extra (pip install -e '.[docs]')")
    assert not _render_problems(name, kind, obj)


def test_the_entry_check_finds_free_prose_and_two_names_in_one_entry():
    bad = '''Summary.

    Attributes:
        context, level, model: the ipywidgets controls; ``output``: the ``Output`` the
        figure is drawn into; ``widget``: all of them in a ``VBox``.
    '''
    assert len(_entry_problems(bad)) == 2
    good = '''Summary.

    Args:
        x (Tensor): a map,
            on two lines.
        y: another.

    Raises:
        ValueError: when it is bad.
    '''
    assert _entry_problems(good) == []


# --- the notebooks as the lab and the site show them ------------------------------------------

HARNESS = re.compile(r"^\s*#\s*(NBVAL_[A-Z_]+|PYTEST_VALIDATE_[A-Z_]+)\s*$", re.MULTILINE)


def _cells(path: Path) -> list[dict]:
    return json.loads(path.read_text())["cells"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_no_code_cell_shows_a_test_harness_comment(path):
    found = [i for i, c in enumerate(_cells(path))
             if c["cell_type"] == "code" and HARNESS.search("".join(c["source"]))]
    assert not found, f"{path.name}: cells {found} hold a harness comment; use the nbval-* cell tag"


def test_nbval_honours_the_ignore_output_tag():
    from nbval.plugin import find_metadata_tags

    assert dict(find_metadata_tags({"tags": ["nbval-ignore-output"]})) == {"check": False}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_written_as_the_project_writes_it(path):
    raw = path.read_text()
    assert json.dumps(json.loads(raw), indent=1, ensure_ascii=False) + "\n" == raw


LINK = re.compile(r"\]\(([^)\s]+)\)")
IMAGE = re.compile(r"!\[[^\]]*\]\(([^)\s]+)\)")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_links_resolve_in_a_clone_and_online(path):
    """A relative link names a file of the repository (the lab serves its root, the site builds
    it); a file of the repository linked relatively is also linked online, for a reader outside a
    clone (an image, such as the Colab badge, is shown, not followed: it needs no online copy);
    an online link to the repository names a file that exists."""
    online_prefix = f"{REPOSITORY}/blob/main/"
    for i, cell in enumerate(_cells(path)):
        if cell["cell_type"] != "markdown":
            continue
        text = "".join(cell["source"])
        links = LINK.findall(text)
        online = {u[len(online_prefix):] for u in links if u.startswith(online_prefix)}
        images = set(IMAGE.findall(text))
        for url in links:
            if url.startswith(("http://", "https://")):
                if url.startswith(REPOSITORY):
                    assert url.startswith(online_prefix), f"{path.name} cell {i}: {url}"
                    assert (ROOT / url[len(online_prefix):].split("#")[0]).is_file(), f"{path.name} cell {i}: {url}"
                continue
            if url.startswith(("#", "mailto:")):
                continue
            target = (path.parent / url.split("#")[0]).resolve()
            assert target.is_file() and ROOT in target.parents, f"{path.name} cell {i}: {url} names no file"
            relative = target.relative_to(ROOT).as_posix()
            if not relative.startswith("notebooks/") and url not in images:
                assert relative in online, f"{path.name} cell {i}: {url} has no online copy ({online_prefix}{relative})"


# --- make lab and the browser targets --------------------------------------------------------


def _make_n(*args: str) -> str:
    out = subprocess.run(["make", "-n", "--no-print-directory", *args], cwd=ROOT,
                         capture_output=True, text=True, check=True)
    return out.stdout


def test_make_lab_serves_the_repository_and_opens_on_the_notebooks():
    commands = _make_n("-o", ".venv/.installed", "lab").replace("\\\n", " ")
    lab = [line for line in commands.splitlines() if "jupyter lab" in line]
    assert len(lab) == 1, lab
    assert f'--ServerApp.root_dir="{ROOT}"' in lab[0] or f"--ServerApp.root_dir={ROOT}" in lab[0]
    assert "--LabApp.default_url=/lab/tree/notebooks" in lab[0]
    assert ("--allow-root" in lab[0]) == (os.geteuid() == 0)


def test_browser_targets_install_npm_and_chromium_when_missing():
    stamp = _make_n("-W", "tests/browser/package.json", "tests/browser/node_modules/.installed")
    assert "command -v npm" in stamp and "apt-get install" in stamp and " npm;" in stamp
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^book-html: .*\$\(NODE_STAMP\)", makefile, re.MULTILINE)
    assert re.search(r"^browser-deps: \$\(CHROMIUM\) \$\(NODE_STAMP\)", makefile, re.MULTILINE)
    assert re.search(r"^\$\(CHROMIUM\):\n\t.*apt-get install .*chromium", makefile, re.MULTILINE)
