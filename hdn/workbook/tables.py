"""Plain-text tables and checks that the workbook's notebooks print.

The notebooks print their numbers as small aligned tables, rounded so that they are the same
on every CPU and thread count (strict nbval compares them). The formatting lives here, so a
code cell says only *what* it tabulates.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import Tensor

__all__ = ["agree_within", "format_table"]


def format_table(
    rows: Mapping[str, Sequence[object]],
    columns: Sequence[str],
    *,
    fmt: str | Sequence[str] = ".3f",
    title: str = "",
    width: int | None = None,
) -> str:
    """An aligned text table: one labelled row per entry of ``rows``.

    Args:
        rows: row label -> one value per column; floats are formatted with ``fmt``,
            integers and anything else with ``str``.
        columns: column headers.
        fmt: format spec of the floats, e.g. ``".3f"`` or ``".2e"``, or one per column.
        title: text above the row labels, in the header line.
        width: width of every value column (default: per column, its widest header or
            value plus 2).

    Returns:
        the table, lines joined by newlines (no trailing newline).

    Examples:
        >>> print(format_table({"SSI": [0.1547, 2], "DS": [0.31744, 13]}, ["loss", "n"], fmt=".4f"))
               loss   n
        SSI  0.1547   2
        DS   0.3174  13
    """
    if isinstance(columns, str):
        raise ValueError(f"Invalid columns: we expect a sequence of headers. Got: {columns!r}.")
    fmts = [fmt] * len(columns) if isinstance(fmt, str) else list(fmt)
    if len(fmts) != len(columns):
        raise ValueError(f"Invalid fmt: we expect one format or {len(columns)}. Got: {fmt!r}.")
    cells = {}
    for label, values in rows.items():
        values = list(values)
        if len(values) != len(columns):
            raise ValueError(
                f"Invalid row {label!r}: we expect {len(columns)} values, one per column. "
                f"Got: {len(values)}."
            )
        cells[label] = [_cell(v, f) for v, f in zip(values, fmts, strict=True)]
    if width is None:
        widths = [2 + max([len(c)] + [len(r[k]) for r in cells.values()])
                  for k, c in enumerate(columns)]
    else:
        widths = [width] * len(columns)
    label_width = max([len(title)] + [len(label) for label in cells])
    lines = [title.ljust(label_width) + "".join(c.rjust(w) for c, w in zip(columns, widths))]
    for label, values in cells.items():
        lines.append(label.ljust(label_width) + "".join(v.rjust(w) for v, w in zip(values, widths)))
    return "\n".join(line.rstrip() for line in lines)


def _cell(value: object, fmt: str) -> str:
    if isinstance(value, Tensor) and value.numel() == 1:
        value = value.item()
    if not isinstance(value, float):
        return str(value)
    return format(value, fmt)


def agree_within(a: float | Tensor, b: float | Tensor, rtol: float) -> bool:
    """Whether two numbers agree to a relative tolerance, ``|a - b| <= rtol * max(|a|, |b|)``.

    For comparisons the notebooks print next to their tolerance: a loss and the sum of its
    per-pixel map, both summed in float32 in a different order, agree only to rounding.

    Examples:
        >>> agree_within(0.31745, 0.31738, rtol=1e-3), agree_within(1.0, 1.1, rtol=1e-3)
        (True, False)
    """
    if not rtol >= 0:
        raise ValueError(f"Invalid rtol: we expect a number >= 0. Got: {rtol!r}.")
    a, b = (float(x.detach().double()) if isinstance(x, Tensor) else float(x) for x in (a, b))
    return abs(a - b) <= rtol * max(abs(a), abs(b))
