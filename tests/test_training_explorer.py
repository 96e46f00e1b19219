"""hdn.workbook.training_explorer.LevelExplorer: widget values drive what is drawn; maps match the library."""

from __future__ import annotations

import matplotlib
import numpy as np
import pytest
import torch

from hdn import context_normalize, contexts
from hdn.toy.models import UNet
from hdn.toy.synthetic import make_scene
from hdn.workbook.training_explorer import LevelExplorer

matplotlib.use("Agg")


@pytest.fixture(scope="module")
def scene():
    s = make_scene(3, height=16, width=16)
    return torch.from_numpy(s.rgb), torch.from_numpy(s.gt), torch.from_numpy(s.valid)


@pytest.fixture()
def explorer(scene):
    torch.manual_seed(0)
    models = {"a": UNet(base=8, depth=2), "b": UNet(base=8, depth=2)}
    return LevelExplorer(models, *scene, levels=3)


def _drawn_ids(ex: LevelExplorer) -> np.ndarray:
    """The context-index image of the contexts panel (masked -1 filled back)."""
    return np.ma.filled(ex.figure.axes[1].get_images()[0].get_array(), -1)


def test_setting_the_level_slider_redraws_the_contexts_of_that_level(explorer, scene):
    ex = explorer
    renders = ex.renders
    ex.level.value = 1
    assert ex.renders == renders + 1
    _, gt, valid = scene
    expected = contexts.depth_range(gt[None], valid[None], levels=3).level_ids(1)[0]
    assert np.array_equal(_drawn_ids(ex), expected.numpy())
    assert "level 1" in ex.figure.get_suptitle()
    assert ex.output.outputs and "image/png" in ex.output.outputs[0]["data"]


def test_context_dropdown_switches_to_the_spatial_grid(explorer):
    ex = explorer
    ex.context.value = "ds"
    ex.level.value = 2
    ids = _drawn_ids(ex)
    assert np.array_equal(ids, ex.level_ids("ds", 2).numpy())
    r, c = np.mgrid[0:16, 0:16]
    cells = (r // 4) * 4 + c // 4  # a 4 x 4 grid of 4 x 4 pixel cells
    valid = ids >= 0
    assert valid.any() and np.array_equal(ids[valid], cells[valid])
    assert "DS" in ex.figure.get_suptitle()


def test_model_dropdown_changes_the_prediction_and_loss_panels(explorer):
    ex = explorer
    ex.level.value = 2
    before = np.ma.filled(ex.figure.axes[3].get_images()[0].get_array(), 0.0).copy()
    ex.model.value = "b"
    after = np.ma.filled(ex.figure.axes[3].get_images()[0].get_array(), 0.0)
    assert "'b'" in ex.figure.get_suptitle()
    assert not np.allclose(before, after)
    # The loss colour range is shared by the models at one level.
    clim_b = ex.figure.axes[4].get_images()[0].get_clim()
    ex.model.value = "a"
    assert ex.figure.axes[4].get_images()[0].get_clim() == clim_b


def test_maps_are_the_context_normalised_prediction_and_ground_truth(explorer, scene):
    ex = explorer
    _, gt, valid = scene
    ctx = contexts.depth_percentile(gt[None], valid[None], levels=3)
    g_hat, p_hat, loss = ex.maps("dp", 2, "a")
    expected_g = context_normalize(gt[None], ctx, 2, valid[None])[0]
    expected_p = context_normalize(ex.preds["a"][None], ctx, 2, valid[None])[0]
    assert torch.allclose(g_hat, expected_g) and torch.allclose(p_hat, expected_p)
    inside = (ctx.level_ids(2)[0] >= 0) & valid
    assert torch.allclose(loss[inside], (expected_p - expected_g).abs()[inside])
    assert bool((loss[~inside] == 0).all())
    assert ex.level_loss("dp", 2, "a") == pytest.approx(float(loss[valid].mean()))
    table = ex.loss_by_level("dp")
    assert list(table) == ["a", "b"] and all(len(v) == 3 for v in table.values())


def test_an_affine_copy_of_the_ground_truth_has_zero_loss_at_every_level(scene):
    rgb, gt, valid = scene

    class Oracle(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(()))

        def forward(self, x):
            return (3.0 * torch.nan_to_num(gt) + 2.0)[None, None] + 0 * self.w

    ex = LevelExplorer({"oracle": Oracle()}, rgb, gt, valid, levels=3)
    for kind in ("dr", "dp", "ds"):
        assert max(ex.loss_by_level(kind)["oracle"]) < 1e-4


def test_bad_arguments_are_rejected(scene):
    rgb, gt, valid = scene
    net = UNet(base=8, depth=2)
    with pytest.raises(ValueError, match="Invalid models"):
        LevelExplorer({}, rgb, gt, valid)
    with pytest.raises(ValueError, match="Invalid kinds"):
        LevelExplorer({"a": net}, rgb, gt, valid, kinds=("dr", "xx"))
    with pytest.raises(ValueError, match="Invalid gt shape"):
        LevelExplorer({"a": net}, rgb, gt[:8], valid)
    ex = LevelExplorer({"a": net}, rgb, gt, valid, levels=2)
    with pytest.raises(ValueError, match="Invalid level"):
        ex.render("dr", 2, "a")
    with pytest.raises(ValueError, match="Invalid model"):
        ex.maps("dr", 0, "nope")


def test_error_maps_average_to_the_abs_rel_and_fine_detail_metrics(scene):
    from hdn.metrics import fine_detail_error, zero_shot_metrics
    from hdn.workbook.training_explorer import error_maps

    torch.manual_seed(1)
    depth = torch.stack([torch.from_numpy(make_scene(i, 16, 16).depth) for i in range(3)])[:, None]
    valid = torch.isfinite(depth)
    pred = torch.nan_to_num(depth, nan=0.0) + 0.3 * torch.rand_like(depth)
    maps = error_maps(pred, depth, valid, near_fraction=0.25)
    ok = valid[:, 0]
    assert maps["rel_error"][ok].mean().item() == pytest.approx(
        zero_shot_metrics(pred, depth, valid, space="depth")["abs_rel"], rel=1e-4
    )
    near = maps["near"]
    per_image = [maps["near_rel_error"][b][near[b]].mean() for b in range(3)]
    expected = fine_detail_error(pred, depth, valid, near_fraction=0.25)
    assert float(torch.stack(per_image).mean()) == pytest.approx(float(expected), rel=1e-4)
    counts = near.flatten(1).sum(1)
    assert torch.equal(counts, torch.ceil(ok.flatten(1).sum(1) * 0.25).long())
    assert bool((maps["near_rel_error"][~near] == 0).all())


def test_level_losses_of_one_level_hierarchy_is_the_ssi_loss_and_levels_match_the_explorer(scene):
    from hdn import ssi_loss
    from hdn.workbook.training_explorer import level_losses

    rgb, gt, valid = scene
    torch.manual_seed(2)
    pred = torch.rand(2, 1, 16, 16)
    g2, v2 = torch.stack([gt, gt.flip(-1)])[:, None], torch.stack([valid, valid.flip(-1)])[:, None]
    (only,) = level_losses(pred, g2, v2, kind="ds", levels=1)
    assert only == pytest.approx(float(ssi_loss(pred, g2, v2)), rel=1e-5)
    net = UNet(base=8, depth=2)
    ex = LevelExplorer({"n": net}, rgb, gt, valid, levels=3)
    single = level_losses(ex.preds["n"][None, None], gt[None, None], valid[None, None], kind="dp")
    assert single == pytest.approx(ex.loss_by_level("dp")["n"], rel=1e-5)
