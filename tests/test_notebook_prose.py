"""Every number the notebooks' prose quotes is one the notebook itself printed.

Strict nbval keeps each stored output equal to a fresh run; this test keeps the prose equal to
the stored outputs. A decimal number in a markdown cell (``0.215``, ``1.0052``, ``-0.349``) must
round from a number printed by some code cell of the same notebook: ``0.33`` matches a printed
``0.327``, ``2.0`` a printed ``2.030``. Not checked: integers and percentages without a decimal
point, numbers inside ``$...$`` math or ``code`` spans, link targets, heading numbers
("### 3.2 Title"), and references written right after a word that announces them:
"section 3.2", "§3.4", "Sec. 4.1", "Fig. 3.4", "Eq. 2.1", "arXiv 2210.09670" (write "sections
3.3 and §3.4", not "sections 3.3 and 3.4").

A number that comes from elsewhere (the paper, a definition) is exempted in its markdown cell's
metadata, with a reason::

    "metadata": {"prose_numbers_exempt": {"1.25": "delta_1 threshold, a definition"}}

The pages of ``docs/`` (the start page, the notation, the semantics, ...) follow the same rule
against the outputs of every notebook together, since a page speaks for the whole workbook; a
number on a page that is not a result is exempted in ``DOCS_EXEMPT`` below, with a reason.
"""

from __future__ import annotations

import functools
import json
import re
from decimal import ROUND_HALF_EVEN, ROUND_HALF_UP, Decimal
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
DOCS = sorted((ROOT / "docs").glob("*.md"))

# Decimal numbers of docs/*.md that no notebook prints because they are not results (a version,
# an equation or figure number written without "Eq."/"Fig.", a constant of a definition):
# {(page, number): reason}. Keep it short; a result belongs in a notebook's output first.
DOCS_EXEMPT: dict[tuple[str, str], str] = {}
NUMBER = re.compile(r"(?<![\w.])[-−+]?\d+\.\d+(?![\w.]*\d)")
REFERENCE = re.compile(
    r"(?:sections?|secs?\.|§|figures?|figs?\.|tables?|eqs?\.|equations?|arxiv:?|v)\s*$",
    re.IGNORECASE,
)


def _prose(markdown: str) -> str:
    """Markdown without math, code spans, link targets and HTML tags."""
    markdown = re.sub(r"\$\$.*?\$\$", " ", markdown, flags=re.DOTALL)
    markdown = re.sub(r"\$[^$\n]*\$", " ", markdown)
    markdown = re.sub(r"```.*?```", " ", markdown, flags=re.DOTALL)
    markdown = re.sub(r"`[^`\n]*`", " ", markdown)
    markdown = re.sub(r"\]\([^)]*\)", "]", markdown)
    markdown = re.sub(r"<[^>]+>", " ", markdown)
    markdown = re.sub(r"^(#+\s*)[\d.]+", r"\1", markdown, flags=re.MULTILINE)  # "### 3.2 Title"
    return markdown


def quoted_numbers(markdown: str) -> list[str]:
    """Decimal numbers of the prose, without signs, that are not references.

    Examples:
        >>> quoted_numbers("loss 0.215 (section 3.2), $x = 1.5$, `lr=1e-3`, -0.349 and 12 %")
        ['0.215', '0.349']
    """
    text = _prose(markdown)
    found = []
    for match in NUMBER.finditer(text):
        if REFERENCE.search(text[max(0, match.start() - 12) : match.start()]):
            continue
        found.append(match.group().lstrip("+-−"))
    return found


def _printed_numbers(notebook: dict) -> set[Decimal]:
    texts = []
    for cell in notebook["cells"]:
        for output in cell.get("outputs", []):
            if "text" in output:
                texts.append("".join(output["text"]))
            for mime, value in output.get("data", {}).items():
                if mime in ("text/plain", "text/markdown", "text/latex"):
                    texts.append("".join(value))
    numbers = set()
    for match in re.finditer(r"\d+(?:\.\d+)?(?:[eE][-+]?\d+)?", "\n".join(texts)):
        numbers.add(abs(Decimal(match.group())))
    return numbers


def matches_printed(quoted: str, printed: set[Decimal]) -> bool:
    """Whether ``quoted`` is some printed number rounded to ``quoted``'s decimals.

    Examples:
        >>> matches_printed("0.33", {Decimal("0.327")}), matches_printed("0.34", {Decimal("0.327")})
        (True, False)
    """
    q = Decimal(quoted)
    step = Decimal(1).scaleb(q.as_tuple().exponent)
    return any(
        x.quantize(step, rounding=mode) == q
        for x in printed
        for mode in (ROUND_HALF_UP, ROUND_HALF_EVEN)
    )


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_numbers_in_prose_were_printed_by_the_notebook(path):
    notebook = json.loads(path.read_text())
    printed = _printed_numbers(notebook)
    unmatched = []
    for index, cell in enumerate(notebook["cells"]):
        if cell["cell_type"] != "markdown":
            continue
        exempt = cell.get("metadata", {}).get("prose_numbers_exempt", {})
        assert all(str(reason).strip() for reason in exempt.values()), (
            f"cell {index}: every exempt number needs a reason"
        )
        for number in quoted_numbers("".join(cell["source"])):
            if number not in exempt and not matches_printed(number, printed):
                unmatched.append(f"cell {index}: {number}")
    assert not unmatched, (
        "numbers quoted in the prose that no output of the notebook prints "
        "(print them, correct the prose, or exempt them with a reason): " + ", ".join(unmatched)
    )


@functools.cache
def _printed_by_any_notebook() -> frozenset[Decimal]:
    numbers: set[Decimal] = set()
    for path in NOTEBOOKS:
        numbers |= _printed_numbers(json.loads(path.read_text()))
    return frozenset(numbers)


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_numbers_in_docs_pages_were_printed_by_a_notebook(path):
    printed = _printed_by_any_notebook()
    exempt = {number for (page, number) in DOCS_EXEMPT if page == path.name}
    unmatched = [number for number in quoted_numbers(path.read_text())
                 if number not in exempt and not matches_printed(number, printed)]
    assert not unmatched, (
        f"docs/{path.name} quotes numbers that no notebook prints (print them in a notebook, "
        f"correct the page, or add them to DOCS_EXEMPT with a reason): {unmatched}"
    )


def test_docs_exemptions_name_a_page_a_reason_and_a_number_still_quoted_there():
    pages = {path.name: quoted_numbers(path.read_text()) for path in DOCS}
    for (page, number), reason in DOCS_EXEMPT.items():
        assert page in pages and str(reason).strip(), (page, number)
        assert number in pages[page], f"docs/{page} no longer quotes {number}: drop the exemption"


def test_docs_check_flags_a_number_that_no_notebook_printed():
    printed = _printed_by_any_notebook()
    assert quoted_numbers("the loss falls to 0.1234567 (section 2.1)") == ["0.1234567"]
    assert not matches_printed("0.1234567", printed)
