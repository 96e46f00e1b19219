"""Small computations and plain-text tables that the notebooks print, kept out of their cells.

The notebooks print their numbers as small aligned tables, rounded so that they are the same
on every CPU and thread count (strict nbval compares them); a code cell says only *what* it
tabulates.

- :func:`shift_and_scale`: the SSI statistics ``t`` and ``s`` of each image, written out;
- :func:`loss_weights` and :func:`weight_change`: a loss map as per-pixel weights, and how
  the weights move from one loss to another (the fair way to compare SSI and HDN maps);
- :func:`share_rows`: region shares of several loss maps;
- :func:`format_table`: an aligned text table; :func:`agree_within`: a comparison printed
  with its tolerance.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from hdn._validation import _as_bhw
from hdn.workbook.explorer import region_loss_share

__all__ = [
    "agree_within",
    "format_table",
    "loss_weights",
    "share_rows",
    "shift_and_scale",
    "weight_change",
]


def _valid_of(x: Tensor, mask: Tensor | None, name: str) -> tuple[Tensor, Tensor]:
    if not isinstance(x, Tensor):
        raise ValueError(f"Invalid {name}: we expect a torch.Tensor. Got: {type(x).__name__}.")
    x3 = _as_bhw(x, name)
    valid = torch.isfinite(x3)
    if mask is not None:
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
            raise ValueError(
                f"Invalid mask: we expect a bool tensor. Got: {getattr(mask, 'dtype', type(mask))}."
            )
        m3 = _as_bhw(mask, "mask")
        if m3.shape != x3.shape:
            raise ValueError(
                f"Invalid mask shape: we expect {tuple(x3.shape)}. Got: {tuple(m3.shape)}."
            )
        valid = valid & m3
    return x3, valid


def shift_and_scale(x: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The shift ``t`` (median) and scale ``s`` (mean absolute deviation) of each image.

    .. math:: t(x) = \\operatorname{median}_{i \\in v} x_i, \\qquad
              s(x) = \\frac{1}{n + 1} \\sum_{i \\in v} |x_i - t(x)|

    over the ``n`` valid pixels ``v`` of each image, with the lower median for an even ``n``
    and the released code's ``n + 1`` (docs/semantics.md §1); ``t = s = 0`` for an image
    with no valid pixel. :func:`hdn.ssi_normalize` returns ``(x - t) / (s + 1e-6)``.

    Args:
        x: ``(B, 1, H, W)`` or ``(B, H, W)`` map.
        mask: optional bool mask of the same shape; non-finite values are invalid.

    Returns:
        ``(t, s)``, two ``(B,)`` tensors in the units of ``x``.

    Examples:
        >>> shift_and_scale(torch.tensor([[[1.0, 2.0, 4.0, 10.0]]]))  # t = 2, s = 11 / 5
        (tensor([2.]), tensor([2.2000]))
    """
    x3, valid = _valid_of(x, mask, "x")
    t, s = [], []
    for values, inside in zip(x3, valid):
        v = values[inside]
        if v.numel() == 0:
            t.append(values.new_zeros(())), s.append(values.new_zeros(()))
            continue
        median = v.median()
        t.append(median)
        s.append((v - median).abs().sum() / (v.numel() + 1))
    return torch.stack(t), torch.stack(s)


def loss_weights(loss_map: Tensor, valid: Tensor) -> Tensor:
    """A loss map as per-pixel weights: each pixel's share of the total, times ``N_v``.

    A weight of 1 is the average valid pixel's share, so maps of losses with different
    totals (SSI, HDN at any number of levels) become comparable.

    Args:
        loss_map: non-negative ``(B, H, W)`` map whose sum over the batch is the loss times
            ``N_v`` (:func:`hdn.workbook.explorer.per_pixel_loss_map`).
        valid: ``(B, H, W)`` bool, the valid pixels ``N_v`` counts.

    Returns:
        ``(B, H, W)`` weights, 0 where the map is 0; all 0 when the map sums to 0.

    Examples:
        >>> loss_weights(torch.tensor([[[1.0, 3.0]]]), torch.tensor([[[True, True]]]))
        tensor([[[0.5000, 1.5000]]])
    """
    if not isinstance(loss_map, Tensor) or not isinstance(valid, Tensor):
        raise ValueError("Invalid loss_map or valid: we expect two torch.Tensors.")
    if valid.dtype != torch.bool or valid.shape != loss_map.shape:
        raise ValueError(
            f"Invalid valid: we expect a bool tensor of shape {tuple(loss_map.shape)}. "
            f"Got: {valid.dtype} {tuple(valid.shape)}."
        )
    total = loss_map.sum()
    if total <= 0:
        return torch.zeros_like(loss_map)
    return loss_map / total * valid.sum()


def weight_change(loss_map: Tensor, baseline_map: Tensor, valid: Tensor) -> Tensor:
    """How each pixel's weight moves from ``baseline_map``'s loss to ``loss_map``'s.

    ``loss_weights(loss_map) - loss_weights(baseline_map)``, in units of the average pixel's
    weight: positive where the new loss (HDN) weighs a pixel more than the baseline (SSI).
    The changes sum to 0 over the valid pixels.

    Examples:
        >>> v = torch.tensor([[[True, True]]])
        >>> weight_change(torch.tensor([[[1.0, 1.0]]]), torch.tensor([[[1.0, 3.0]]]), v)
        tensor([[[ 0.5000, -0.5000]]])
    """
    if not isinstance(baseline_map, Tensor) or baseline_map.shape != loss_map.shape:
        raise ValueError(
            f"Invalid baseline_map: we expect a tensor of shape {tuple(loss_map.shape)}. "
            f"Got: {tuple(getattr(baseline_map, 'shape', ()))}."
        )
    return loss_weights(loss_map, valid) - loss_weights(baseline_map, valid)


def share_rows(maps: Mapping[str, Tensor], regions: Mapping[str, Tensor]) -> dict[str, list[float]]:
    """Each region's share of every map's total: ``{region: [share in map 1, map 2, ...]}``.

    Args:
        maps: name -> non-negative map (a loss map, or ``valid.float()`` for the pixel share).
        regions: name -> bool mask (see :func:`hdn.workbook.explorer.region_loss_share`).

    Examples:
        >>> maps = {"a": torch.tensor([1.0, 3.0]), "b": torch.tensor([1.0, 1.0])}
        >>> share_rows(maps, {"left": torch.tensor([True, False])})
        {'left': [0.25, 0.5]}
    """
    shares = [region_loss_share(m, regions) for m in maps.values()]
    return {name: [s[name] for s in shares] for name in regions}


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
