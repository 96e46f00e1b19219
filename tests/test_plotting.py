"""The workbook's plotting helpers (hdn.workbook.plotting)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib as mpl
import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

from hdn.contexts import depth_percentile, depth_range, spatial_grid
from hdn.workbook.plotting import (
    DEPTH_CMAP,
    INVALID_COLOR,
    LOSS_CMAP,
    NORMALIZED_CMAP,
    bin_colours,
    draw_grid,
    figure_png,
    grid_edges,
    show_bin_histogram,
    show_contexts,
    show_depth_bins,
    show_grid_contexts,
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


def _motorcycle_like_depths():
    # two crowded near layers and a sparse far one, with one pixel without ground truth
    depth = torch.tensor([[2.0, 2.1, 2.2, 2.3], [2.4, 2.5, 4.0, 5.0], [2.05, 2.15, float("nan"), 3.0]])
    return depth[None], torch.isfinite(depth)[None]


def test_bin_colours_follow_depth_order_and_reject_bad_counts():
    colours = bin_colours(4)
    viridis = mpl.colormaps[DEPTH_CMAP]
    assert colours == [tuple(viridis(x)) for x in (0.125, 0.375, 0.625, 0.875)]
    with pytest.raises(ValueError, match="Invalid count"):
        bin_colours(0)


def test_show_depth_bins_labels_the_colorbar_with_the_bin_edges_in_metres():
    depth, valid = _motorcycle_like_depths()
    ctx = depth_range(depth, valid, levels=2)
    fig = Figure()
    im = show_depth_bins(fig.subplots(), ctx, 1, title="DR level 1")
    colorbar = fig.axes[-1]
    assert colorbar.get_ylabel() == "depth bin (m)"
    assert [t.get_text() for t in colorbar.get_yticklabels()] == ["2.00", "3.50", "5.00"]
    # the segments are the bins' depth intervals, to scale
    assert colorbar.get_ylim() == pytest.approx((2.0, 5.0))
    # bin index per pixel; the NaN pixel and the maximum-depth pixel are in no bin (grey)
    ids = im.get_array()
    assert ids.mask.sum() == 2 and ids[0, 0] == 0 and ids[1, 2] == 1
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == ["no ground truth / no bin"]
    assert im.cmap.get_bad().tolist() == list(mpl.colors.to_rgba(INVALID_COLOR))


def test_show_depth_bins_shows_dp_bins_narrow_where_the_pixels_crowd():
    depth, valid = _motorcycle_like_depths()
    ctx = depth_percentile(depth, valid, levels=3)
    fig = Figure()
    show_depth_bins(fig.subplots(), ctx, 2, title="DP level 2", legend=False)
    edges = torch.cat([ctx.lower[2][0], ctx.upper[2][0, -1:]]).tolist()
    colorbar = fig.axes[-1]._colorbar  # the colorbar of the bins (matplotlib keeps it on its axes)
    assert colorbar.norm.boundaries.tolist() == pytest.approx(edges)
    widths = torch.tensor(edges).diff()
    assert widths[0] < widths[-1] / 3  # the crowded near bins are drawn narrow
    ticks = fig.axes[-1].get_yticks().tolist()
    assert ticks[0] == pytest.approx(edges[0]) and ticks[-1] == pytest.approx(edges[-1])
    assert all(min(abs(t - e) for e in edges) < 1e-9 for t in ticks)
    assert fig.axes[0].get_legend() is None


def test_show_depth_bins_rejects_contexts_without_bin_edges_and_bad_levels():
    depth, valid = _motorcycle_like_depths()
    fig = Figure()
    with pytest.raises(ValueError, match="Invalid contexts"):
        show_depth_bins(fig.subplots(), spatial_grid(depth, valid, levels=2), 1, title="DS")
    with pytest.raises(ValueError, match="Invalid level"):
        show_depth_bins(fig.subplots(), depth_range(depth, valid, levels=2), 2, title="DR")


def test_show_depth_bins_falls_back_to_equal_segments_when_a_bin_is_empty():
    # DP edges repeat when many pixels share one depth
    depth = torch.tensor([[1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 2.0, 3.0]])[None]
    ctx = depth_percentile(depth, levels=3)
    edges = torch.cat([ctx.lower[2][0], ctx.upper[2][0, -1:]])
    assert (edges.diff() == 0).any()
    fig = Figure()
    show_depth_bins(fig.subplots(), ctx, 2, title="DP")
    labels = [t.get_text() for t in fig.axes[-1].get_yticklabels()]
    assert labels[0] == "1.00" and labels[-1] == "3.00"


def test_show_bin_histogram_colours_bars_by_bin_and_dashes_the_edges():
    depth, valid = _motorcycle_like_depths()
    ctx = depth_range(depth, valid, levels=2)
    fig = Figure()
    ax = fig.subplots()
    show_bin_histogram(ax, depth[0], ctx, 1, valid=valid[0], title="histogram", bars=6)
    assert len(ax.patches) == 6 and sum(p.get_height() for p in ax.patches) == 11
    first, last = bin_colours(2)
    assert tuple(ax.patches[0].get_facecolor()) == pytest.approx(first)
    assert tuple(ax.patches[-1].get_facecolor()) == pytest.approx(last)
    assert [line.get_xdata()[0] for line in ax.lines] == pytest.approx([2.0, 3.5, 5.0])
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("depth (m)", "pixels")


def test_show_grid_contexts_draws_the_ds_cells_over_the_depth_map():
    fig = Figure()
    ax = fig.subplots()
    im = show_grid_contexts(ax, torch.rand(25, 37) + 1, 2, title="DS level 2")
    assert len(ax.lines) == 6 and _colorbar_label(fig) == "depth (m)"
    assert [line.get_ydata()[0] + 0.5 for line in ax.lines[:3]] == grid_edges(25, 2)[1:]
    assert im.get_array().shape == (25, 37)
    with pytest.raises(ValueError, match="Invalid level"):
        show_grid_contexts(ax, torch.rand(4, 4), -1, title="?")


def test_show_grid_contexts_shares_colour_limits_and_marks_invalid_pixels():
    fig = Figure()
    depth = torch.rand(10, 15) + 1
    valid = torch.ones(10, 15, dtype=torch.bool)
    valid[0, 0] = False
    im = show_grid_contexts(fig.subplots(), depth, 2, valid=valid, title="DS level l = 2",
                            vmin=0.5, vmax=4.0)
    assert im.get_clim() == (0.5, 4.0)
    assert im.cmap.name.startswith(DEPTH_CMAP) and _colorbar_label(fig) == "depth (m)"
    assert len(im.axes.lines) == 3 + 3  # inner boundaries of a 4 x 4 grid
    assert im.axes.get_legend() is not None  # the grey "no ground truth" entry
    with pytest.raises(ValueError, match="Invalid level"):
        show_grid_contexts(fig.subplots(), depth, -1, title="bad")


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
