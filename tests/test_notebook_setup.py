"""The notebooks' setup: the Colab cell names the repository of pyproject.toml, nothing else
points outside the repository, and the package metadata a package index shows is complete."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _colab_cell(path: Path) -> str:
    cells = json.loads(path.read_text())["cells"]
    sources = ["".join(c["source"]) for c in cells if c["cell_type"] == "code"]
    return sources[0]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_colab_cell_installs_from_the_repository_named_in_pyproject(path):
    source = _colab_cell(path)
    assert "google.colab" in source, "the first code cell must be the Colab install cell"
    found = re.findall(r'^REPOSITORY = "([^"]+)"$', source, flags=re.MULTILINE)
    assert found == [PROJECT["urls"]["Repository"]]
    assert 'git+{REPOSITORY}' in source
    # the URL appears once, as the constant: no second, drifting copy
    assert source.count("https://") == 1


def test_nothing_points_outside_the_repository():
    tracked = [p for p in ROOT.rglob("*") if p.is_file() and ".git" not in p.parts
               and ".venv" not in p.parts and p.suffix in (".md", ".py", ".ipynb", ".toml",
                                                          ".cff", ".yml", ".cfg")]
    offenders = [str(p.relative_to(ROOT)) for p in tracked if "../shared" in p.read_text()]
    # this file names the pattern it looks for
    assert offenders == [str(Path(__file__).relative_to(ROOT))]


def test_package_index_metadata_is_complete():
    assert PROJECT["license"] == "MIT" and (ROOT / "LICENSE").read_text().startswith("MIT License")
    assert PROJECT["authors"] and PROJECT["classifiers"]
    assert {"Repository", "Documentation", "Issues"} <= set(PROJECT["urls"])


def test_citation_cites_the_software_and_the_paper_with_its_six_authors():
    text = (ROOT / "CITATION.cff").read_text()
    assert text.startswith("cff-version: 1.2.0") and "type: software" in text
    paper = text.split("preferred-citation:")[1]
    names = re.findall(r"family-names: (\w+)\n\s+given-names: (\w+)", paper)
    assert names == [("Zhang", "Chi"), ("Yin", "Wei"), ("Wang", "Zhibin"), ("Yu", "Gang"),
                     ("Fu", "Bin"), ("Shen", "Chunhua")]
    assert "Hierarchical Normalization for Robust Monocular Depth Estimation" in paper


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_code_lines_are_at_most_100_characters(path):
    cells = json.loads(path.read_text())["cells"]
    long = [
        (index, line)
        for index, cell in enumerate(cells)
        if cell["cell_type"] == "code"
        for line in "".join(cell["source"]).split("\n")
        if len(line) > 100
    ]
    assert not long, f"{path.name}: code lines over 100 characters (cell, line): {long}"


# --- "Open in Colab" badges -------------------------------------------------------------------
# The link opens the notebook from the repository named in pyproject.toml; the image is a file
# of the repository (docs/_static/colab-badge.svg), since the site fetches nothing from outside.
BADGE = re.compile(r"\[!\[Open in Colab\]\(([^)\s]+)\)\]\(([^)\s]+)\)")
BADGE_IMAGE = ROOT / "docs" / "_static" / "colab-badge.svg"


def _colab_url(notebook: str) -> str:
    repository = PROJECT["urls"]["Repository"]
    assert repository.startswith("https://github.com/"), "Colab opens notebooks from GitHub"
    slug = repository.removeprefix("https://github.com/").removesuffix(".git")
    return f"https://colab.research.google.com/github/{slug}/blob/main/notebooks/{notebook}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_opens_with_a_colab_badge_for_itself(path):
    cells = json.loads(path.read_text())["cells"]
    first = next("".join(c["source"]) for c in cells if c["cell_type"] == "markdown")
    assert BADGE.findall(first) == [("../docs/_static/colab-badge.svg", _colab_url(path.name))]
    later = ["".join(c["source"]) for c in cells[1:] if c["cell_type"] == "markdown"]
    assert not any("colab.research.google.com" in text for text in later)


def test_readme_colab_badge_opens_the_first_notebook():
    badges = BADGE.findall((ROOT / "README.md").read_text())
    assert badges == [("docs/_static/colab-badge.svg", _colab_url(NOTEBOOKS[0].name))]


def test_colab_badge_is_a_local_image_that_reads_open_in_colab():
    svg = BADGE_IMAGE.read_text()
    assert svg.lstrip().startswith("<svg") and 'aria-label="Open in Colab"' in svg
    # nothing in it is fetched: no links, images or fonts from elsewhere
    assert not re.search(r"(href|src)\s*=|url\(|@import", svg)
