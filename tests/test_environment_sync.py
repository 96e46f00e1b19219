"""pyproject.toml and environment.yml must name the same packages.

Both files are read as text with no extra dependency: tomllib (tomli on Python 3.10) for
the TOML, and a small parser for the plain list format that environment.yml uses.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]

# conda-forge names that differ from the name pip installs.
_CONDA_TO_PIP = {"pytorch": "torch", "python-build": "build"}
# Entries of environment.yml that are tools, not packages of pyproject.toml.
_CONDA_ONLY = {"python", "pip"}


def _normalise(requirement: str) -> str:
    """Package name of a requirement: lower case, runs of ``-_.`` as ``-``, no version."""
    name = re.split(r"[\s<>=!~;\[]", requirement.strip(), maxsplit=1)[0]
    return re.sub(r"[-_.]+", "-", name).lower()


def _yaml_dependency_entries(text: str) -> tuple[list[str], list[str]]:
    """Entries of the top-level ``dependencies:`` list and of its nested ``- pip:`` list.

    Handles the subset of YAML that conda environment files use: ``key:`` lines at column
    0, ``- item`` lines below them, one nested ``- pip:`` list, and ``#`` comments.
    """
    conda: list[str] = []
    pip: list[str] = []
    in_deps = False
    pip_indent: int | None = None
    for raw in text.splitlines():
        line = re.sub(r"(^|\s)#.*$", "", raw).rstrip()
        if not line.strip():
            continue
        if not line[0].isspace():  # a top-level key
            in_deps = line.strip() == "dependencies:"
            pip_indent = None
            continue
        match = re.match(r"^(\s*)-\s+(.*)$", line)
        if not in_deps or match is None:
            continue
        indent, item = len(match.group(1)), match.group(2).strip().strip("'\"")
        if pip_indent is not None and indent > pip_indent:
            pip.append(item)
            continue
        pip_indent = None
        if item == "pip:":
            pip_indent = indent
        else:
            conda.append(item)
    return conda, pip


def _environment_names(text: str) -> set[str]:
    conda, pip = _yaml_dependency_entries(text)
    names = {_CONDA_TO_PIP.get(_normalise(e), _normalise(e)) for e in conda}
    names |= {_normalise(e) for e in pip if not e.startswith("-")}  # skip "-e ." and options
    return names - _CONDA_ONLY


def _pyproject() -> dict:
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)


def _pyproject_names(project: dict) -> set[str]:
    reqs = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        reqs += extra
    return {_normalise(r) for r in reqs}


def test_environment_yml_names_the_same_packages_as_pyproject():
    in_pyproject = _pyproject_names(_pyproject()["project"])
    in_environment = _environment_names((ROOT / "environment.yml").read_text())
    assert {"torch", "numpy", "scikit-image", "pytest"} <= in_pyproject
    assert in_pyproject == in_environment, (
        f"only in pyproject.toml: {sorted(in_pyproject - in_environment)}; "
        f"only in environment.yml: {sorted(in_environment - in_pyproject)}"
    )


def test_environment_yml_asks_for_the_python_pyproject_requires():
    requires = _pyproject()["project"]["requires-python"].replace(" ", "")
    conda, _ = _yaml_dependency_entries((ROOT / "environment.yml").read_text())
    pythons = [e.replace(" ", "") for e in conda if _normalise(e) == "python"]
    assert pythons == [f"python{requires}"]


def test_torch_is_not_pinned_to_one_release():
    torch_reqs = [r for r in _pyproject()["project"]["dependencies"] if _normalise(r) == "torch"]
    assert len(torch_reqs) == 1
    assert "==" not in torch_reqs[0], torch_reqs[0]


def test_environment_parser_reads_nested_pip_list_and_conda_aliases():
    text = """\
name: demo  # a comment
channels:
  - conda-forge
dependencies:
  - python>=3.10
  - pip
  - PyTorch >=2.1  # pytorch is torch
  - scikit_image
  - pip:
      - -e .
      - Some.Package[extra]==1.0
  - tqdm
variables:
  - not-a-package
"""
    assert _environment_names(text) == {"torch", "scikit-image", "some-package", "tqdm"}


def test_a_package_added_to_one_list_only_breaks_the_match():
    text = (ROOT / "environment.yml").read_text()
    in_pyproject = _pyproject_names(_pyproject()["project"])
    grown = text.replace("  - numpy\n", "  - numpy\n  - scipy\n", 1)
    assert grown != text
    assert _environment_names(grown) - in_pyproject == {"scipy"}
    shrunk = text.replace("  - tqdm\n", "", 1)
    assert shrunk != text
    assert in_pyproject - _environment_names(shrunk) == {"tqdm"}
