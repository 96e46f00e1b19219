"""Loss maps and the widget explorers of hdn.workbook.explorer (notebooks 01-03)."""

from __future__ import annotations

import base64
import itertools

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pytest
import torch

import hdn
from hdn import contexts as C
from hdn.data import blurred, near_far_scene
from hdn.reference import hierarchical_loss, normalize
from hdn.workbook.explorer import (
    ContextExplorer,
    GridExplorer,
    boundary_regions,
    depth_quantile_regions,
    level_loss_maps,
    per_pixel_loss_map,
    region_loss_share,
)


@pytest.fixture(scope="module")
def scene():
    """A small non-square near/far scene with holes, a blurred prediction, and the mask."""
    depth, valid = near_far_scene(40, 56, seed=3, hole_fraction=0.1)
    pred = blurred(depth, 1.5)
    return depth[None], valid[None], pred[None]


# --- per-pixel loss maps ---------------------------------------------------------------


@pytest.mark.parametrize("kind", ["dr", "dp", "ds"])
@pytest.mark.parametrize("levels", [1, 3])
def test_loss_map_sums_to_hdn_loss_for_built_in_contexts(scene, kind, levels):
    depth, valid, pred = scene
    loss_map = per_pixel_loss_map(pred, depth, valid, kind, levels=levels)
    assert loss_map.shape == depth.shape
    expected = hdn.hdn_loss(pred, depth, valid, context=kind, levels=levels)
    assert float(loss_map.sum() / valid.sum()) == pytest.approx(float(expected), rel=1e-5)


def test_loss_map_with_one_level_is_the_ssi_loss(scene):
    depth, valid, pred = scene
    loss_map = per_pixel_loss_map(pred, depth, valid, C.whole_image(depth, valid))
    assert float(loss_map.sum() / valid.sum()) == pytest.approx(float(hdn.ssi_loss(pred, depth, valid)), rel=1e-5)


def test_loss_map_sums_to_hdn_loss_for_label_contexts_with_two_levels(scene):
    depth, valid, pred = scene
    H, W = depth.shape[1:]
    cols = torch.arange(W).expand(1, H, W)
    rows = torch.arange(H).view(1, H, 1).expand(1, H, W)
    stripes = cols // 9
    blobs = torch.where((rows // 10 + cols // 14) % 3 == 0, -1, rows // 10 * 10 + cols // 14)  # some pixels in none
    ctx = C.from_labels([stripes, blobs], depth, valid)
    loss_map = per_pixel_loss_map(pred, depth, valid, ctx)
    expected = hdn.hdn_loss(pred, depth, valid, context=ctx)
    assert float(loss_map.sum() / valid.sum()) == pytest.approx(float(expected), rel=1e-5)


@pytest.mark.parametrize("make", [C.random_crops, C.random_depth_intervals])
def test_loss_map_of_pooled_random_contexts_sums_to_their_loss(scene, make):
    depth, valid, pred = scene
    ctx = make(depth, valid, num=5, generator=torch.Generator().manual_seed(1))
    loss_map = per_pixel_loss_map(pred, depth, valid, ctx)
    expected = hdn.hdn_loss(pred, depth, valid, context=ctx)
    assert float(loss_map.sum() / valid.sum()) == pytest.approx(float(expected), rel=1e-5)


def test_loss_map_is_the_mean_over_containing_contexts_of_the_reference(scene):
    depth, valid, pred = scene
    ctx = C.depth_range(depth, valid, levels=2)
    masks = list(ctx.to_masks().unbind(0))
    g = torch.where(valid, depth, 0)
    total = sum(torch.where(m, (normalize(pred[0], m[0]) - normalize(g[0], m[0])).abs(), 0) for m in masks)
    count = sum(m.float() for m in masks)
    expected = torch.where(count > 0, total / count.clamp(min=1), 0)
    loss_map = per_pixel_loss_map(pred, depth, valid, ctx)
    torch.testing.assert_close(loss_map, expected, rtol=1e-4, atol=1e-5)
    assert float(loss_map.sum() / valid.sum()) == pytest.approx(
        float(hierarchical_loss(pred, depth, valid, masks)), rel=1e-5
    )


def test_loss_map_is_zero_at_the_maximum_depth_pixel_of_dr_and_dp(scene):
    depth, valid, pred = scene
    where_max = valid & (depth == depth[valid].max())
    for kind in ("dr", "dp"):
        assert (per_pixel_loss_map(pred, depth, valid, kind, levels=3)[where_max] == 0).all()


def test_level_loss_maps_are_zero_outside_contexts_and_average_to_the_loss_map(scene):
    depth, valid, pred = scene
    per_level = level_loss_maps(pred, depth, valid, "ds", levels=3)
    assert per_level.shape == (3, *depth.shape)
    assert (per_level[:, ~valid] == 0).all()
    # DS: every valid pixel is in one cell per level, so the map is the plain mean of levels.
    torch.testing.assert_close(per_level.mean(0), per_pixel_loss_map(pred, depth, valid, "ds", levels=3))


def test_loss_maps_vanish_for_an_affine_copy_of_the_target(scene):
    depth, valid, _ = scene
    assert per_pixel_loss_map(3 * depth + 2, depth, valid, "dp", levels=3).abs().max() < 1e-4


def test_loss_map_rejects_unknown_contexts(scene):
    depth, valid, pred = scene
    with pytest.raises(ValueError, match="Invalid context"):
        per_pixel_loss_map(pred, depth, valid, "grid")
    with pytest.raises(ValueError, match="Invalid contexts"):
        per_pixel_loss_map(pred, depth, valid, 3)


def test_region_loss_share_splits_the_total_by_region():
    loss = torch.tensor([[1.0, 3.0], [0.0, 4.0]])
    left = torch.tensor([[True, False], [True, False]])
    shares = region_loss_share(loss, {"left": left, "right": ~left, "all": torch.ones(2, 2, dtype=torch.bool)})
    assert shares == pytest.approx({"left": 0.125, "right": 0.875, "all": 1.0})
    assert region_loss_share(torch.zeros(2, 2), {"left": left}) == {"left": 0.0}
    with pytest.raises(ValueError, match="Invalid region 'bad'"):
        region_loss_share(loss, {"bad": torch.ones(3, dtype=torch.bool)})


def test_depth_quantile_regions_hold_equal_counts_nearest_first(scene):
    depth, valid, _ = scene
    regions = depth_quantile_regions(depth, valid, parts=4)
    assert list(regions) == ["0-25% (nearest)", "25-50%", "50-75%", "75-100% (farthest)"]
    counts = [int(m.sum()) for m in regions.values()]
    assert max(counts) - min(counts) <= 1 and sum(counts) == int(valid.sum())
    masks = list(regions.values())
    for nearer, farther in itertools.pairwise(masks):
        assert depth[nearer].max() <= depth[farther].min()
    assert not (torch.stack(masks).sum(0)[~valid]).any()
    with pytest.raises(ValueError, match="Invalid parts"):
        depth_quantile_regions(depth, valid, parts=0)


def test_boundary_regions_split_the_valid_pixels_around_the_object(scene):
    depth, valid, _ = scene
    near = depth < 5
    regions = boundary_regions(near, valid, radius=2)
    total = sum(m.int() for m in regions.values())
    assert torch.equal(total.bool(), valid) and total.max() == 1
    assert (near[regions["interior"]]).all() and not (near[regions["exterior"]]).any()
    band = regions["boundary band"]
    assert near[band].any() and (~near[band]).any()  # both sides of the edge
    with pytest.raises(ValueError, match="Invalid radius"):
        boundary_regions(near, valid, radius=0)


# --- explorers ---------------------------------------------------------------------------


@pytest.fixture
def explorer(scene):
    depth, valid, pred = scene
    return ContextExplorer(depth[0], valid[0], pred[0], kinds=("dr", "dp"), levels=4)


def _panels(fig):
    """The explorer's panels, without colorbar axes (those come after the panels)."""
    return fig.axes[:4]


def test_explorer_renders_once_at_start_with_level_one(explorer):
    assert explorer.renders == 1
    assert (explorer.kind.value, explorer.level.value, explorer.index.value) == ("dr", 1, 0)
    assert explorer.index.max == 1
    assert "DR level 1, bin 0" in explorer.figure.get_suptitle()


def test_explorer_writes_the_rendered_png_into_its_output_widget(explorer):
    explorer.index.value = 1
    (shown,) = explorer.output.outputs
    assert shown["output_type"] == "display_data"
    assert base64.b64decode(shown["data"]["image/png"]).startswith(b"\x89PNG")
    assert shown["data"]["text/plain"] == explorer.figure.get_suptitle()
    assert "bin 1" in shown["data"]["text/plain"]


def test_explorer_bin_slider_max_follows_the_level(explorer):
    for level in (0, 3, 2):
        explorer.level.value = level
        assert explorer.index.max == 2**level - 1
    assert explorer.renders == 4  # one render per change, none from the clamped bin


def test_explorer_shows_the_selected_context_mask(explorer, scene):
    depth, valid, _ = scene
    explorer.kind.value = "dp"
    explorer.level.value = 2
    explorer.index.value = 3
    fig = explorer.figure
    overlay = _panels(fig)[0].images[1].get_array()
    expected = C.depth_percentile(depth, valid, levels=4).level_masks(2)[3, 0]
    assert np.array_equal(~overlay.mask, expected.numpy())
    n = int(expected.sum())
    assert fig.get_suptitle().startswith("DP level 2, bin 3 of 0-3")
    assert f"{n:,} px" in fig.get_suptitle()


def test_explorer_normalised_panel_holds_context_normalize_inside_the_context(explorer, scene):
    depth, valid, pred = scene
    explorer.level.value = 3
    explorer.index.value = 5
    shown = _panels(explorer.figure)[1].images[0].get_array()
    ctx = C.depth_range(depth, valid, levels=4)
    inside = ctx.level_masks(3)[5, 0]
    expected = hdn.context_normalize(depth, ctx, 3, valid)[0]
    assert np.array_equal(~shown.mask, inside.numpy())
    np.testing.assert_allclose(shown.compressed(), expected[inside].numpy(), rtol=1e-6)
    loss = _panels(explorer.figure)[3].images[0].get_array()
    p_hat = hdn.context_normalize(pred, ctx, 3, valid)[0]
    np.testing.assert_allclose(loss.compressed(), (p_hat - expected)[inside].abs().numpy(), rtol=1e-5, atol=1e-6)


def test_explorer_switching_kind_keeps_a_valid_bin_and_renders_that_kind(explorer):
    explorer.level.value = 3
    explorer.index.value = 7
    explorer.kind.value = "dp"
    assert explorer.index.value == 7 and explorer.index.max == 7
    assert explorer.figure.get_suptitle().startswith("DP level 3, bin 7")


def test_explorer_render_is_pure_and_checks_its_arguments(explorer):
    renders = explorer.renders
    fig = explorer.render("dr", 0, 0)
    assert explorer.renders == renders
    assert "DR level 0, bin 0" in fig.get_suptitle()
    assert len(_panels(fig)[2].patches) > 0  # the depth histogram
    for bad in (("ds", 0, 0), ("dr", 4, 0), ("dr", 1, 2)):
        with pytest.raises(ValueError, match="Invalid"):
            explorer.render(*bad)


def test_explorer_without_prediction_has_three_panels():
    depth = torch.linspace(2.0, 5.0, 48).view(6, 8)
    ex = ContextExplorer(depth, levels=2)
    assert len([ax for ax in ex.figure.axes if ax.get_title()]) == 3
    assert ex.widget.children[0].children == (ex.kind, ex.level, ex.index)
    assert ex.widget.children[1] is ex.output


def test_explorer_rejects_bad_kinds_and_shapes():
    depth = torch.rand(6, 8) + 1
    with pytest.raises(ValueError, match="Invalid kinds"):
        ContextExplorer(depth, kinds=("dr", "dr"))
    with pytest.raises(ValueError, match="Invalid kinds"):
        ContextExplorer(depth, kinds=("xy",))
    with pytest.raises(ValueError, match="Invalid pred shape"):
        ContextExplorer(depth, pred=torch.rand(6, 7))
    with pytest.raises(ValueError, match="one image"):
        ContextExplorer(torch.rand(2, 6, 8))


def test_grid_explorer_cell_slider_follows_the_level_on_a_non_square_image(scene):
    depth, valid, pred = scene
    ex = GridExplorer(depth[0], valid[0], pred[0], levels=3)
    assert ex.widget.children[0].children == (ex.level, ex.index)
    assert ex.index.description == "cell"
    ex.level.value = 2
    assert ex.index.max == 15
    ex.index.value = 6  # row 1, column 2 of the 4 x 4 grid
    mask = C.spatial_grid(depth, valid, levels=3).level_masks(2)[6, 0]
    overlay = _panels(ex.figure)[0].images[1].get_array()
    assert np.array_equal(~overlay.mask, mask.numpy())
    # rows [int(1/4 * 40), int(2/4 * 40)) = 10-19, columns [int(2/4 * 56), int(3/4 * 56)) = 28-41
    assert ex.figure.get_suptitle() == (
        f"DS level 2, cell 6 (row 1, col 2 of 4x4): rows 10-19, cols 28-41, {int(mask.sum()):,} px"
    )
    ex.level.value = 0
    assert ex.index.max == 0 and ex.index.value == 0
