"""The README's overview figure, redrawn from the package: ``python -m hdn.workbook.figures``.

Middlebury 2014 Motorcycle (Scharstein et al., GCPR 2014): the scene, its depth-range
contexts at one level with their depth intervals, the SSI loss map of a blurred copy of the
ground truth (the prediction that lost its fine detail, as in notebook 01), and how HDN-DR
moves the per-pixel weight relative to SSI (notebook 02, Figure 4). Raw SSI and HDN loss maps
are not drawn on one scale: their totals differ, and only the shares compare.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

from hdn.contexts import depth_range, whole_image
from hdn.data import blurred, middlebury_motorcycle
from hdn.workbook.explorer import per_pixel_loss_map
from hdn.workbook.plotting import show_depth_bins, show_map
from hdn.workbook.tables import weight_change

DEFAULT_PATH = Path(__file__).resolve().parents[2] / "docs" / "overview.png"


def overview_figure(stride: int = 2, levels: int = 3, sigma: float = 2.0):
    """Draw the overview: image, DR bins of level ``levels - 1``, SSI loss map, HDN-DR weight change.

    Args:
        stride: take every ``stride``-th row and column of the 500x741 scene.
        levels: HDN-DR levels; the bins of the finest level are drawn.
        sigma: Gaussian blur (px) that makes the prediction from the ground truth.

    Returns:
        a :class:`matplotlib.figure.Figure` with four panels.

    Examples:
        >>> fig = overview_figure(stride=8, levels=2)
        >>> [ax.get_title() for ax in fig.axes if ax.get_title()]  # colorbars have none
        ['Middlebury Motorcycle (left image)', 'DR contexts, level 1', 'SSI loss per pixel', 'weight change, HDN-DR (L=2) vs SSI']
    """
    from matplotlib.figure import Figure

    scene = middlebury_motorcycle()
    depth = scene.depth[::stride, ::stride].unsqueeze(0)
    valid = scene.valid[::stride, ::stride].unsqueeze(0)
    pred = blurred(depth.nan_to_num(float(depth[valid].mean())), sigma)
    contexts = depth_range(depth, valid, levels=levels)
    ssi_map = per_pixel_loss_map(pred, depth, valid, whole_image(depth, valid), levels=1)
    hdn_map = per_pixel_loss_map(pred, depth, valid, contexts, levels=levels)
    change = weight_change(hdn_map, ssi_map, valid)

    fig = Figure(figsize=(17, 3.4), dpi=80, layout="constrained")
    axes = fig.subplots(1, 4)
    show_map(axes[0], scene.image[:, ::stride, ::stride], kind="image",
             title="Middlebury Motorcycle (left image)")
    show_depth_bins(axes[1], contexts, levels - 1, title=f"DR contexts, level {levels - 1}")
    show_map(axes[2], ssi_map[0], kind="loss", valid=valid[0], title="SSI loss per pixel")
    show_map(axes[3], change[0], kind="normalized", valid=valid[0], vmin=-2, vmax=2,
             label="weight change (x average pixel)",
             title=f"weight change, HDN-DR (L={levels}) vs SSI")
    return fig


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description="Redraw the README's overview figure.")
    parser.add_argument("--out", type=Path, default=DEFAULT_PATH)
    args = parser.parse_args(argv)
    matplotlib.use("Agg")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    overview_figure().savefig(args.out)
    print(args.out)
    return args.out


if __name__ == "__main__":
    main()
