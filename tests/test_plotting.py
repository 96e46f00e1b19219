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
