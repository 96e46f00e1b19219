"""Helpers of notebook 05 (training on the toy split): calibration, tables, context statistics.

- :func:`box_blur` and :func:`calibration_predictions`: predictions of known quality (the
  ground truth, noisy, blurred, log, flat) on which a fine-detail measure is calibrated;
- :func:`format_rows`: an aligned text table of named rows of numbers;
- :func:`level_table` and :func:`format_level_table`: each model's loss at each level of
  each context hierarchy (:func:`hdn.workbook.training_explorer.level_losses`);
- :func:`nearest_bin_stats`: what the nearest depth-range (DR) bin of the finest level holds.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from hdn import contexts as _contexts
from hdn.workbook.training_explorer import level_losses

__all__ = [
    "box_blur",
    "calibration_predictions",
    "format_level_table",
    "format_rows",
    "level_table",
    "nearest_bin_stats",
]


def box_blur(x: Tensor, mask: Tensor, size: int) -> Tensor:
    """Mean of the valid pixels in a ``size x size`` window around each valid pixel.

    Invalid pixels neither contribute nor receive a value (they stay 0), so a blur does not
    pull zeros into the borders of the valid region.

    Args:
        x: ``(B, 1, H, W)`` map.
        mask: bool ``(B, 1, H, W)``, True = valid.
        size: odd window size >= 1.

    Returns:
        ``(B, 1, H, W)``, 0 where ``mask`` is False.

    Examples:
        >>> x = torch.tensor([[[[1.0, 2.0, 3.0, 100.0]]]])
        >>> m = torch.tensor([[[[True, True, True, False]]]])
        >>> box_blur(x, m, 3).tolist()
        [[[[1.5, 2.0, 2.5, 0.0]]]]
    """
    if isinstance(size, bool) or not isinstance(size, int) or size < 1 or size % 2 == 0:
        raise ValueError(f"Invalid size: we expect an odd int >= 1. Got: {size!r}.")
    if x.dim() != 4 or x.shape[1] != 1 or mask.shape != x.shape:
        raise ValueError(
            f"Invalid shapes: we expect x and mask (B, 1, H, W). Got: {tuple(x.shape)}, "
            f"{tuple(mask.shape)}."
        )
    mask = mask.bool()
    w = torch.ones(1, 1, size, size, dtype=x.dtype, device=x.device) / size**2
    num = torch.nn.functional.conv2d(torch.where(mask, x, 0.0), w, padding=size // 2)
    den = torch.nn.functional.conv2d(mask.to(x.dtype), w, padding=size // 2)
    return torch.where(mask, num / den.clamp(min=1e-6), 0.0)


def calibration_predictions(depth: Tensor, valid: Tensor, *, seed: int = 0) -> dict[str, Tensor]:
    """Predictions of known quality for ``depth``: exact, noisy, blurred, log, flat.

    Args:
        depth: ``(B, 1, H, W)`` metric depth (NaN where invalid).
        valid: bool ``(B, 1, H, W)``.
        seed: seed of the noise (a ``torch.Generator``).

    Returns:
        name -> ``(B, 1, H, W)`` prediction: ``"ground truth"``, ``"GT x (1 + 1 % noise)"``,
        ``"GT, 3x3 blur"``, ``"GT, 5x5 blur"``, ``"GT, 9x9 blur"``, ``"log depth"`` and
        ``"flat (x + 1e-6 noise)"`` (a constant map with a tiny noise, so that least squares
        has something to fit).

    Examples:
        >>> d = torch.full((1, 1, 4, 4), 2.0)
        >>> refs = calibration_predictions(d, d > 0)
        >>> list(refs)[:2], bool(torch.equal(refs["ground truth"], d))
        (['ground truth', 'GT x (1 + 1 % noise)'], True)
    """
    d0 = torch.nan_to_num(depth)
    noise = torch.randn(d0.shape, generator=torch.Generator().manual_seed(seed)).to(d0)
    return {
        "ground truth": d0,
        "GT x (1 + 1 % noise)": d0 * (1 + 0.01 * noise),
        "GT, 3x3 blur": box_blur(d0, valid, 3),
        "GT, 5x5 blur": box_blur(d0, valid, 5),
        "GT, 9x9 blur": box_blur(d0, valid, 9),
        "log depth": torch.log(d0.clamp(min=0.1)),
        "flat (x + 1e-6 noise)": 1e-6 * noise,
    }


def format_rows(
    rows: Mapping[str, Mapping[str, float]],
    columns: Mapping[str, int],
    name: str = "",
) -> str:
    """Rows of numbers as an aligned text table.

    Args:
        rows: row name -> {column: value}.
        columns: column -> number of decimals, in the order to print.
        name: header of the first column (the row names).

    Examples:
        >>> print(format_rows({"ssi": {"abs_rel": 2.0301, "delta1": 0.3274}},
        ...                   {"abs_rel": 3, "delta1": 2}, name="loss"))
        loss  abs_rel  delta1
        ssi     2.030    0.33
    """
    if not columns:
        raise ValueError("Invalid columns: we expect at least one column.")
    header = [name, *columns]
    lines = [
        [str(row), *(f"{float(values[c]):.{d}f}" for c, d in columns.items())]
        for row, values in rows.items()
    ]
    widths = [max(len(c) for c in column) for column in zip(header, *lines)]

    def fmt(cells: Sequence[str]) -> str:
        return "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))
        ).rstrip()

    return "\n".join([fmt(header), *(fmt(line) for line in lines)])


def level_table(
    preds: Mapping[str, Tensor],
    gt: Tensor,
    valid: Tensor,
    *,
    kinds: Sequence[str] = ("dr", "dp", "ds"),
    levels: int = 3,
) -> dict[str, dict[str, list[float]]]:
    """Each model's loss at each level ``l = 0 .. levels-1`` of each context kind.

    Returns:
        model -> kind -> ``levels`` floats (:func:`~hdn.workbook.training_explorer.level_losses`).
    """
    return {
        model: {kind: level_losses(p, gt, valid, kind=kind, levels=levels) for kind in kinds}
        for model, p in preds.items()
    }


def format_level_table(table: Mapping[str, Mapping[str, Sequence[float]]], digits: int = 3) -> str:
    """The output of :func:`level_table` as text: one row per model, ``KIND l=0, l=1, ...``.

    Examples:
        >>> print(format_level_table({"ssi": {"dr": [0.5, 0.75]}, "hdn-dr": {"dr": [0.4, 0.6]}}))
        model   DR l=0     l=1
        ssi      0.500   0.750
        hdn-dr   0.400   0.600
    """
    if not table:
        raise ValueError("Invalid table: we expect at least one model.")
    groups = list(next(iter(table.values())).items())
    width = max(6, *(len(f"{v:.{digits}f}") for k in table.values() for vs in k.values() for v in vs))
    name_width = max(len("model"), *(len(m) for m in table))

    def line(first: str, cells: Sequence[Sequence[str]]) -> str:
        return (first.ljust(name_width) + "  " + "    ".join(
            "  ".join(c.rjust(width) for c in group) for group in cells
        )).rstrip()

    header = [
        [f"{kind.upper()} l=0" if lvl == 0 else f"l={lvl}" for lvl in range(len(values))]
        for kind, values in groups
    ]
    rows = [
        line(model, [[f"{v:.{digits}f}" for v in kinds[kind]] for kind, _ in groups])
        for model, kinds in table.items()
    ]
    return "\n".join([line("model", header), *rows])


def _scale(x: Tensor) -> Tensor:
    """The SSI scale of a context: ``sum |x - lower median| / (n + 1)`` (docs/semantics.md)."""
    t = x.median()  # torch.median: the lower of the two middle values
    return (x - t).abs().sum() / (x.numel() + 1)


def nearest_bin_stats(
    gt: Tensor,
    depth: Tensor,
    valid: Tensor,
    *,
    levels: int = 3,
    near_depth: float = 5.0,
) -> dict[str, float]:
    """What the nearest DR bin of the finest level ``l = levels - 1`` holds, over a batch.

    Args:
        gt: ``(B, 1, H, W)`` labels the loss sees (the DR bins are cut on them).
        depth: ``(B, 1, H, W)`` metric depth in metres.
        valid: bool ``(B, 1, H, W)``.
        levels: the hierarchy depth ``L``; the finest level has ``2**(L-1)`` bins.
        near_depth: pixels nearer than this many metres count as near.

    Returns:
        ``images`` (B), ``only_near`` (images whose nearest bin holds only near pixels),
        ``all_near_inside`` (images whose near pixels all lie in that bin), and
        ``scale_ratio_median``: the median over the images of the SSI scale of ``gt`` over
        the image's valid pixels divided by its scale over the nearest bin (how much tighter
        the bin normalises than the image does).

    Examples:
        >>> d = torch.tensor([[[[1.0, 1.2, 1.1, 20.0, 40.0, 60.0, 50.0, 30.0]]]])
        >>> s = nearest_bin_stats(2 * d + 1, d, d > 0, levels=3)
        >>> s["images"], s["only_near"], s["all_near_inside"], round(s["scale_ratio_median"], 1)
        (1, 1, 1, 348.2)
    """
    if gt.dim() != 4 or gt.shape[1] != 1 or depth.shape != gt.shape or valid.shape != gt.shape:
        raise ValueError(
            f"Invalid shapes: we expect gt, depth and valid (B, 1, H, W). Got: {tuple(gt.shape)}, "
            f"{tuple(depth.shape)}, {tuple(valid.shape)}."
        )
    ctx = _contexts.build("dr", gt, valid, levels=levels)
    ids = ctx.level_ids(levels - 1)
    only_near = all_inside = 0
    ratios = []
    for b in range(gt.shape[0]):
        ok = ctx.valid[b]
        inside = ids[b] == 0
        near = ok & (depth[b, 0] < near_depth)
        if not inside.any():
            continue
        only_near += bool((depth[b, 0][inside] < near_depth).all())
        all_inside += bool((near <= inside).all())
        g = gt[b, 0]
        ratios.append(float(_scale(g[ok]) / _scale(g[inside]).clamp(min=1e-12)))
    return {
        "images": int(gt.shape[0]),
        "only_near": int(only_near),
        "all_near_inside": int(all_inside),
        "scale_ratio_median": float(np.median(ratios)) if ratios else float("nan"),
    }
