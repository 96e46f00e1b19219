"""Small computations and tables the notebooks print, kept out of the notebooks' cells.

- :func:`shift_and_scale`: the SSI statistics ``t`` and ``s`` of each image, written out;
- :func:`loss_weights` and :func:`weight_change`: a loss map as per-pixel weights, and how
  the weights move from one loss to another (the fair way to compare SSI and HDN maps);
- :func:`share_rows` and :func:`format_table`: region shares of several loss maps, and a
  fixed-width text table of them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from hdn._validation import _as_bhw
from hdn.workbook.explorer import region_loss_share

__all__ = ["format_table", "loss_weights", "share_rows", "shift_and_scale", "weight_change"]


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
    rows: Mapping[str, Sequence[float]],
    columns: Sequence[str],
    *,
    corner: str = "",
    digits: int = 3,
    width: int = 9,
) -> str:
    """A fixed-width text table: one line of column names, then one line per row.

    Args:
        rows: row name -> one number per column.
        columns: the column names.
        corner: text above the row names.
        digits: decimals of every number.
        width: minimum width of a number column.

    Examples:
        >>> print(format_table({"near": [0.2154, 0.311]}, ["SSI", "DP"], corner="share"))
        share      SSI       DP
         near    0.215    0.311
    """
    columns = list(columns)
    for name, values in rows.items():
        if len(values) != len(columns):
            raise ValueError(
                f"Invalid rows: row {name!r} has {len(values)} values, we expect {len(columns)}."
            )
    first = max([len(corner), *(len(str(name)) for name in rows)])
    col = max([width, digits + 3, *(len(c) + 1 for c in columns)])
    lines = [f"{corner:<{first}}" + "".join(f"{c:>{col}}" for c in columns)]
    for name, values in rows.items():
        lines.append(f"{name!s:>{first}}" + "".join(f"{float(x):>{col}.{digits}f}" for x in values))
    return "\n".join(lines)
