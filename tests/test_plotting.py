"""The workbook's plotting helpers (hdn.workbook.plotting)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib as mpl
import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

from hdn.contexts import spatial_grid
from hdn.workbook.plotting import (
    DEPTH_CMAP,
    LOSS_CMAP,
    NORMALIZED_CMAP,
    draw_grid,
    figure_png,
    grid_edges,
    show_contexts,
    show_map,
    use_workbook_style,
)


def _colorbar_label(fig):
    return fig.axes[-1].get_ylabel()


def test_show_map_masks_invalid_pixels_and_labels_the_colorbar_in_metres():
    fig = Figure()
    depth = torch.tensor([[1.0, 2.0], [float("nan"), 4.0]])
    valid = torch.tensor([[True, False], [True, True]])
    im = show_map(fig.subplots(), depth, valid=valid, title="depth")
    assert im.get_array().mask.tolist() == [[False, True], [True, False]]
    assert im.cmap.name.startswith(DEPTH_CMAP)
    assert _colorbar_label(fig) == "depth (m)"
    ax = fig.axes[0]
    assert (ax.get_title(), ax.get_xlabel(), ax.get_ylabel()) == ("depth", "column (px)", "row (px)")


def test_normalised_maps_are_centred_on_zero_and_losses_start_at_zero():
    fig = Figure()
    a, b = fig.subplots(1, 2)
    im = show_map(a, torch.tensor([[-1.0, 3.0]]), kind="normalized", title="x_hat")
    assert im.get_clim() == (-3.0, 3.0) and im.cmap.name.startswith(NORMALIZED_CMAP)
    im = show_map(b, torch.tensor([[0.5, 2.0]]), kind="loss", title="loss")
    assert im.get_clim() == (0.0, 2.0) and im.cmap.name.startswith(LOSS_CMAP)
    with pytest.raises(ValueError, match="Invalid kind"):
        show_map(a, torch.zeros(2, 2), kind="height", title="?")


def test_show_map_accepts_single_image_batches_and_rgb():
    fig = Figure()
    a, b = fig.subplots(1, 2)
    assert show_map(a, torch.rand(1, 1, 3, 4), title="b").get_array().shape == (3, 4)
    assert show_map(b, torch.rand(3, 5, 6), kind="image", title="rgb").get_array().shape == (5, 6, 3)
    with pytest.raises(ValueError, match="Invalid values shape"):
        show_map(a, torch.rand(2, 3, 4), title="two images")


def test_show_contexts_colours_each_context_and_greys_out_pixels_in_none():
    fig = Figure()
    ids = torch.tensor([[0, 1, -1], [2, 2, 1]])
    im = show_contexts(fig.subplots(), ids, title="contexts")
    arr = im.get_array()
    assert arr.mask.tolist() == [[False, False, True], [False, False, False]]
    assert im.cmap.N == 3 and _colorbar_label(fig) == "context index"


def test_grid_edges_follow_the_spec_truncation_rule_on_non_square_images():
    assert grid_edges(250, 2) == [0, 62, 125, 187]
    assert grid_edges(371, 3) == [int(i / 8 * 371) for i in range(8)]
    ids = spatial_grid(torch.rand(1, 1, 25, 37), levels=3).level_ids(2)[0]
    starts = [int(c) for c in torch.nonzero(torch.diff(ids[0]), as_tuple=True)[0] + 1]
    assert [0, *starts] == grid_edges(37, 2)


def test_draw_grid_draws_the_inner_cell_boundaries():
    fig = Figure()
    ax = fig.subplots()
    draw_grid(ax, 25, 37, 2)
    assert len(ax.lines) == 3 + 3


def test_workbook_style_sets_a_small_dpi_and_figure_png_returns_png_bytes():
    with mpl.rc_context():
        use_workbook_style(dpi=50)
        assert mpl.rcParams["figure.dpi"] == 50
        fig = Figure(figsize=(2, 1))
        fig.subplots().imshow(np.zeros((4, 4)))
        png = figure_png(fig)
    assert png.startswith(b"\x89PNG")


def test_show_grid_over_depth_draws_depth_in_metres_with_the_level_grid():
    from hdn.workbook.plotting import show_grid_over_depth

    fig = Figure()
    depth = torch.rand(10, 15) + 1
    valid = torch.ones(10, 15, dtype=torch.bool)
    valid[0, 0] = False
    im = show_grid_over_depth(fig.subplots(), depth, 2, valid=valid, title="DS level l = 2")
    assert im.cmap.name.startswith(DEPTH_CMAP) and _colorbar_label(fig) == "depth (m)"
    assert len(im.axes.lines) == 3 + 3  # inner boundaries of a 4 x 4 grid
    assert im.axes.get_legend() is not None  # the grey "no ground truth" entry
    with pytest.raises(ValueError, match="Invalid level"):
        show_grid_over_depth(fig.subplots(), depth, -1, title="bad")


def test_relative_log_magnitude_divides_by_the_valid_median():
    from hdn.workbook.plotting import relative_log_magnitude

    values = torch.tensor([[1.0, -10.0, 1000.0], [100.0, 0.0, 5.0]])
    valid = torch.tensor([[True, True, False], [True, True, True]])
    ratio, reference = relative_log_magnitude(values, valid)
    assert reference == 5.0  # median of |1|, |-10|, |100|, |0|, |5|
    assert np.isnan(ratio[0, 2]) and np.isneginf(ratio[1, 1])
    assert ratio[1, 0] == pytest.approx(np.log10(20))
    # more than half zeros: the median of the non-zero values
    assert relative_log_magnitude(torch.tensor([[0.0, 0.0, 0.0, 2.0, 4.0]]))[1] == 3.0
    assert relative_log_magnitude(torch.zeros(2, 2))[1] == 1.0


def test_relative_magnitude_maps_share_one_colour_scale_and_one_colorbar():
    from hdn.workbook.plotting import show_relative_magnitude_maps

    fig = Figure()
    axes = fig.subplots(1, 3)
    base = torch.rand(6, 6) + 0.5
    maps = {"x": base, "10 x": 10 * base, "with zero": base * (torch.arange(6) > 0)}
    images = show_relative_magnitude_maps(axes, maps, vmin=-1.5, vmax=1.5)
    assert len(fig.axes) == 4  # three panels, one shared colorbar
    assert {im.get_clim() for im in images} == {(-1.5, 1.5)}
    np.testing.assert_allclose(images[0].get_array(), images[1].get_array(), atol=1e-6)
    assert float(images[2].get_array()[:, 0].max()) == -1.5  # exact zeros: the lowest colour
    assert "median" in fig.axes[-1].get_ylabel()
    with pytest.raises(ValueError, match="Invalid axes"):
        show_relative_magnitude_maps(axes[:2], maps)


def test_relative_magnitude_maps_fill_a_grid_with_repeated_titles_and_per_panel_masks():
    from hdn.workbook.plotting import show_relative_magnitude_maps

    fig = Figure()
    axes = fig.subplots(2, 2)
    valid = torch.ones(4, 4, dtype=torch.bool)
    valid[0, 0] = False
    panels = [("SSI", torch.rand(4, 4) + 1), ("DR", torch.rand(4, 4) + 1)] * 2
    images = show_relative_magnitude_maps(axes, panels, valid=[valid, None, None, valid])
    assert [im.axes.get_title() for im in images] == ["SSI", "DR", "SSI", "DR"]
    assert len(fig.axes) == 5  # four panels, one shared colorbar
    assert images[0].get_array().mask[0, 0] and not images[1].get_array().mask.any()


def test_grid_cell_sizes_differ_by_at_most_one_pixel_and_cover_the_side():
    from hdn.workbook.plotting import grid_cell_sizes

    for size in (250, 371, 7):
        for level in range(4):
            sizes = grid_cell_sizes(size, level)
            assert max(sizes) - min(sizes) <= 1
            assert min(sizes) * 2**level <= size <= max(sizes) * 2**level
