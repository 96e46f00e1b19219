"""Experiments that train many models, and the results they committed.

- :mod:`hdn.toy.experiments.toy_ablation`: every loss variant x several seeds on the toy split
  (a small reproduction of the ablations in the experiments section of Zhang et al., NeurIPS 2022).
- :mod:`hdn.toy.experiments.fine_detail`: the pre-registered fine-detail ablation of notebook 06
  (rows in ``results/fine_detail.jsonl``, shipped as package data).

The committed results lie in the package folder ``hdn/toy/experiments/results/`` (its
``README.md`` says how each file was made) and are shipped with the package, so that the
notebooks read them in a clone and after ``pip install`` alike::

    from hdn.toy.experiments import load_results
    meta, rows = load_results("toy_ablation_600.json")
"""

from __future__ import annotations

import json
from importlib import resources
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

__all__ = ["load_results", "result_names", "results_file"]


def _results_dir() -> Traversable:
    return resources.files(__name__) / "results"


def result_names() -> list[str]:
    """Names of the committed result files (``.json`` and ``.jsonl``), sorted.

    Examples:
        >>> "toy_ablation_600.json" in result_names()
        True
    """
    return sorted(
        entry.name
        for entry in _results_dir().iterdir()
        if entry.is_file() and entry.name.endswith((".json", ".jsonl"))
    )


def results_file(name: str) -> Traversable:
    """The committed result file ``name`` (a file name such as ``"toy_ablation.json"``).

    Returns an :mod:`importlib.resources` traversable: ``.read_text()`` reads it, and
    ``importlib.resources.as_file(...)`` gives a real path where one is needed.

    Raises:
        ValueError: if ``name`` is not a plain file name of the results folder.
    """
    names = result_names()
    if not isinstance(name, str) or name not in names:
        raise ValueError(
            f"Invalid name: we expect one of the committed result files {names}. Got: {name!r}."
        )
    return _results_dir() / name


def load_results(name: str) -> tuple[dict[str, object], list[dict[str, object]]]:
    """Read a committed ablation file of the results folder: returns ``(meta, rows)``.

    Args:
        name: file name in ``hdn/toy/experiments/results/``, e.g. ``"toy_ablation_600.json"``.

    Returns:
        ``meta`` (command, options, versions, timings) and ``rows`` (one dict per run), as
        :func:`hdn.toy.experiments.toy_ablation.load_results` reads them from a path.

    Raises:
        ValueError: if ``name`` is not a committed JSON file with ``meta`` and ``rows``.

    Examples:
        >>> meta, rows = load_results("toy_ablation_600.json")
        >>> meta["steps"], len(rows), sorted({r["seed"] for r in rows})
        (600, 18, [0, 1, 2])
    """
    if isinstance(name, str) and not name.endswith(".json"):
        raise ValueError(f"Invalid name: we expect a .json file name. Got: {name!r}.")
    return _parse_report(results_file(name).read_text(), name)


def _parse_report(text: str, source: object) -> tuple[dict[str, object], list[dict[str, object]]]:
    report = json.loads(text)
    if not isinstance(report, dict) or "rows" not in report or "meta" not in report:
        raise ValueError(
            f"Invalid results file {source}: we expect an object with 'meta' and 'rows'."
        )
    return report["meta"], report["rows"]
