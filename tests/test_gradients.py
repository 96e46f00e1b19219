"""hdn.workbook.gradients: the analytic SSI gradient, gradient maps, descent on a map, the explorer."""

from __future__ import annotations

import base64

import numpy as np
import pytest
import torch

import hdn
from hdn import reference
from hdn._core.engine import EPS
from hdn.data import near_far_scene
from hdn.workbook.gradients import (
    DescentExplorer,
    aligned_error,
    aligned_error_map,
    descend,
    detail_regions,
    gradient_mass_by_region,
    level_gradients,
    loss_gradient,
    make_loss,
    median_gradient_share,
    smallest_context_size,
    smooth_within,
    ssi_gradient_parts,
    ssi_loss_count_n,
    step_lengths,
)


def _inputs(shape=(2, 1, 7, 9), seed=0, dtype=torch.float64, holes=True):
    gen = torch.Generator().manual_seed(seed)
    pred = torch.rand(shape, generator=gen, dtype=dtype) * 3
    target = torch.rand(shape, generator=gen, dtype=dtype) * 10 + 1
    mask = torch.rand(shape, generator=gen) > 0.2 if holes else None
    return pred, target, mask


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(2, 1, 7, 9), (1, 6, 6), (3, 5, 4)])
def test_ssi_gradient_parts_sum_to_autograd_gradient(dtype, shape):
    pred, target, mask = _inputs(shape, dtype=dtype)
    parts = ssi_gradient_parts(pred, target, mask)
    expected = loss_gradient(hdn.ssi_loss, pred, target, mask)
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    torch.testing.assert_close(parts.total, expected.to(parts.total.dtype), atol=tol, rtol=1e-5)


def test_ssi_gradient_parts_match_reference_autograd():
    pred, target, mask = _inputs((2, 8, 5), seed=3)
    p = pred.clone().requires_grad_(True)
    reference.ssi_loss(p, target, mask).backward()
    torch.testing.assert_close(ssi_gradient_parts(pred, target, mask).total, p.grad, atol=1e-12, rtol=1e-9)


def test_ssi_sign_term_has_the_same_magnitude_at_every_valid_pixel():
    pred, target, mask = _inputs((2, 6, 7), seed=1)
    parts = ssi_gradient_parts(pred, target, mask)
    n_valid = int(mask.sum())
    for b in range(2):
        v = mask[b]
        x = pred[b][v]
        t = x.sort().values[(x.numel() - 1) // 2]
        d = (x - t).abs().sum() / (x.numel() + 1) + EPS
        torch.testing.assert_close(parts.sign[b][v].abs(), torch.full_like(x, 1 / (n_valid * float(d))))
        assert bool((parts.sign[b][~v] == 0).all())


def test_ssi_median_term_lands_on_one_pixel_per_image():
    pred, target, mask = _inputs((3, 5, 6), seed=2)
    median = ssi_gradient_parts(pred, target, mask).median
    assert (median != 0).flatten(1).sum(1).tolist() == [1, 1, 1]
    for b in range(3):
        x = pred[b][mask[b]]
        lower = x.sort().values[(x.numel() - 1) // 2]
        assert float(pred[b][median[b] != 0]) == float(lower)


def test_ssi_median_term_is_what_detaching_the_prediction_median_removes():
    pred, target, mask = _inputs((2, 6, 6), seed=4)
    released = loss_gradient(make_loss("ssi"), pred, target, mask)
    detached = loss_gradient(make_loss("ssi", detach_pred_median=True), pred, target, mask)
    torch.testing.assert_close(released - detached, ssi_gradient_parts(pred, target, mask).median)


def test_ssi_gradient_parts_are_zero_for_an_image_without_valid_pixels():
    pred, target, mask = _inputs((2, 4, 5), seed=5)
    mask[1] = False
    parts = ssi_gradient_parts(pred, target, mask)
    assert all(bool((part[1] == 0).all()) for part in parts)
    torch.testing.assert_close(parts.total, loss_gradient(hdn.ssi_loss, pred, target, mask))


def test_ssi_with_plus_one_through_autograd_equals_ssi_loss():
    from hdn.workbook.gradients import _ssi_autograd

    pred, target, mask = _inputs((2, 7, 6), seed=6)
    fn = lambda p, g, m: _ssi_autograd(p, g, m, count_offset=1)
    torch.testing.assert_close(fn(pred, target, mask), hdn.ssi_loss(pred, target, mask))
    torch.testing.assert_close(
        loss_gradient(fn, pred, target, mask), loss_gradient(hdn.ssi_loss, pred, target, mask)
    )


def test_count_n_variant_scales_loss_and_gradient_by_n_over_n_plus_1_per_image():
    pred, target, _ = _inputs((1, 5, 7), seed=7, holes=False)
    n = 35
    ratio = ssi_loss_count_n(pred, target) / hdn.ssi_loss(pred, target)
    assert abs(float(ratio) - n / (n + 1)) < 1e-6
    g_n = loss_gradient(ssi_loss_count_n, pred, target)
    g_n1 = loss_gradient(hdn.ssi_loss, pred, target)
    torch.testing.assert_close(g_n, g_n1 * n / (n + 1), atol=1e-9, rtol=1e-5)


@pytest.mark.parametrize("name", ["ssi", "dr", "dp", "ds"])
@pytest.mark.parametrize("levels", [1, 3])
def test_make_loss_equals_the_public_losses(name, levels):
    pred, target, mask = _inputs((2, 1, 8, 9), seed=8)
    got = make_loss(name, levels)(pred, target, mask)
    want = hdn.ssi_loss(pred, target, mask) if name == "ssi" else hdn.hdn_loss(
        pred, target, mask, context=name, levels=levels
    )
    torch.testing.assert_close(got, want)


def test_make_loss_detached_median_matches_reference_pooled_gradient_off_the_median():
    pred, target, mask = _inputs((1, 6, 7), seed=9)
    got = loss_gradient(make_loss("ssi", detach_pred_median=True), pred, target, mask)
    p = pred.clone().requires_grad_(True)
    valid = reference.valid_mask(target, mask)
    # one context (the image): pooled and per-pixel-mean aggregation coincide
    reference.pooled_loss(p, target, valid, [valid], detach_pred_median=True).backward()
    torch.testing.assert_close(got, p.grad)


def test_make_loss_rejects_unknown_names_and_levels():
    with pytest.raises(ValueError, match="Invalid name"):
        make_loss("dx")
    with pytest.raises(ValueError, match="Invalid levels"):
        make_loss("dr", 0)


def test_loss_gradient_returns_bhw_for_4d_input_and_zeros_when_unused():
    pred, target, mask = _inputs((2, 1, 4, 5))
    assert loss_gradient(hdn.ssi_loss, pred, target, mask).shape == (2, 4, 5)
    zero = loss_gradient(lambda p, g, m: g.sum(), pred, target, mask)
    assert bool((zero == 0).all())


def test_gradient_mass_shares_of_a_partition_sum_to_one():  # float64 sums
    grad = torch.randn(2, 5, 6, generator=torch.Generator().manual_seed(0))
    left = torch.zeros(2, 5, 6, dtype=torch.bool)
    left[..., :3] = True
    shares = gradient_mass_by_region(grad, {"left": left, "right": ~left})
    assert abs(sum(shares.values()) - 1) < 1e-12
    assert shares["left"] == pytest.approx(float(grad[left].abs().sum() / grad.abs().sum()))
    assert gradient_mass_by_region(torch.zeros(3), {"a": torch.ones(3, dtype=torch.bool)}) == {"a": 0.0}


def test_detail_regions_label_the_requested_fraction_as_fine():
    depth, valid = near_far_scene(32, 40, seed=2)
    regions = detail_regions(depth, valid, sigma=2.0, fraction=0.25)
    assert abs(regions["fine"].float().mean().item() - 0.25) < 0.02
    assert bool((regions["fine"] ^ regions["smooth"]).all())


def test_smooth_within_keeps_outside_pixels_and_constant_regions():
    depth = torch.cat([torch.full((6, 4), 2.0), torch.linspace(20, 30, 24).view(6, 4)], dim=1)
    region = torch.zeros(6, 8, dtype=torch.bool)
    region[:, :4] = True
    out = smooth_within(depth, region, 1.5)
    torch.testing.assert_close(out[:, :4], depth[:, :4])  # no bleeding from the far side
    assert torch.equal(out[:, 4:], depth[:, 4:])


def test_aligned_error_is_zero_for_a_scaled_and_shifted_prediction():
    depth, _ = near_far_scene(24, 32, seed=3, dtype=torch.float64)
    g = depth[None]
    near = (depth < 5)[None]
    assert aligned_error(2.5 * g - 4, g, near) < 1e-12
    err = aligned_error_map(2.5 * g - 4, g, {"near": near})
    assert bool(err[~near].isnan().all())


def test_descend_is_deterministic_and_moves_lr_per_pixel_on_average():
    pred, target, mask = _inputs((1, 8, 9), seed=10)
    fn = make_loss("dr", 2)
    a = descend(pred, target, mask, fn, steps=5, lr=0.05)
    b = descend(pred, target, mask, fn, steps=5, lr=0.05)
    assert len(a) == 6 and torch.equal(a[0], pred)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    first_step = (a[1] - a[0]).abs()[mask].mean()
    assert float(first_step) == pytest.approx(0.05, rel=1e-9)


def test_descend_without_normalisation_is_plain_gradient_descent():
    pred, target, mask = _inputs((1, 6, 6), seed=11)
    maps = descend(pred, target, mask, hdn.ssi_loss, steps=1, lr=3.0, normalize=False)
    torch.testing.assert_close(maps[1], pred[:] - 3.0 * loss_gradient(hdn.ssi_loss, pred, target, mask))


def test_descend_lowers_the_ssi_loss_of_a_blurred_map():
    depth, _ = near_far_scene(32, 40, seed=4)
    g = depth[None]
    p0 = hdn.data.blurred(g, 2.0)
    maps = descend(p0, g, None, hdn.ssi_loss, steps=10, lr=0.005)
    assert float(hdn.ssi_loss(maps[-1], g)) < float(hdn.ssi_loss(maps[0], g))


def test_descend_rejects_negative_steps():
    pred, target, mask = _inputs((1, 4, 4))
    with pytest.raises(ValueError, match="Invalid steps"):
        descend(pred, target, mask, hdn.ssi_loss, steps=-1, lr=0.1)


@pytest.fixture
def explorer():
    depth, valid = near_far_scene(32, 40, seed=0)
    g = depth[None]
    near = (depth < 5)[None]
    bend = 1 + 0.1 * torch.linspace(0, 1, 40)
    p0 = torch.where(near, smooth_within(g, near, 3.0), g * bend)
    ex = DescentExplorer(
        p0, g, valid[None], regions={"near object": near, "background": ~near}, steps=4, lr=1e-3, max_level=3
    )
    return ex


def _titles(fig):
    return [ax.get_title() for ax in fig.axes]


def test_explorer_renders_the_initial_state(explorer):
    assert explorer.state == ("dr", 2, 4)
    assert "HDN-DR, L = 2" in _titles(explorer.figure)
    assert "near object: error after alignment, step 4" in _titles(explorer.figure)


def test_explorer_sliders_set_from_python_rerender_the_figure(explorer):
    explorer.loss.value = "ds"
    explorer.level.value = 3
    explorer.step.value = 1
    assert explorer.state == ("ds", 3, 1)
    titles = _titles(explorer.figure)
    assert "HDN-DS, L = 3" in titles
    assert "near object: error after alignment, step 1" in titles
    assert ("ds", 3) in explorer._runs


def test_explorer_writes_the_rendered_png_into_its_output_widget(explorer):
    explorer.loss.value = "dp"
    (out,) = explorer.output.outputs
    assert out["data"]["text/plain"] == "HDN-DP, L = 2, step 4"
    assert base64.b64decode(out["data"]["image/png"])[:8] == b"\x89PNG\r\n\x1a\n"


def test_explorer_disables_the_level_slider_for_ssi(explorer):
    explorer.loss.value = "ssi"
    assert explorer.level.disabled
    assert "SSI" in _titles(explorer.figure)
    explorer.loss.value = "dp"
    assert not explorer.level.disabled


def test_explorer_figure_changes_with_the_step(explorer):
    first = explorer.render("dr", 2, 0)
    last = explorer.render("dr", 2, 4)
    a = first.axes[0].images[0].get_array()
    b = last.axes[0].images[0].get_array()
    assert not (a == b).all()


def test_explorer_runs_are_cached_and_curves_start_at_the_initial_error(explorer):
    run = explorer.run("dp", 3)
    assert explorer.run("dp", 3) is run and len(run) == 5
    curves = explorer.curves("dp", 3)
    near = explorer.regions["near object"]
    assert curves["near object"][0] == pytest.approx(aligned_error(explorer.pred0, explorer.target, near))


def test_explorer_counts_renders_and_rejects_bad_arguments(explorer):
    before = explorer.renders
    explorer.step.value = 2
    assert explorer.renders == before + 1
    with pytest.raises(ValueError, match="Invalid step"):
        explorer.render("dr", 2, 99)
    with pytest.raises(ValueError, match="Invalid loss"):
        explorer.render("xx", 2, 0)
    with pytest.raises(ValueError, match="Invalid level"):
        explorer.render("dr", 4, 0)
    with pytest.raises(ValueError, match="Invalid focus"):
        DescentExplorer(explorer.pred0, explorer.target, regions=explorer.regions, focus="nope", steps=1)


def test_explorer_draws_no_curve_for_a_region_with_nothing_to_recover():
    depth, valid = near_far_scene(24, 32, seed=1)
    near = depth < 5
    p0 = smooth_within(depth, near, 3.0)  # the background is exact
    ex = DescentExplorer(p0, depth, valid, regions={"near": near, "far": ~near}, steps=2, max_level=2)
    far_line = ex.figure.axes[1].lines[2]  # near, near (SSI), far, far (SSI)
    assert far_line.get_label() == "far"
    assert bool(np.isnan(far_line.get_ydata()).all())  # no curve


def test_descend_with_regions_moves_every_region_by_lr_per_pixel_on_average():
    depth, valid = near_far_scene(24, 32, seed=2, dtype=torch.float64)
    g, valid = depth[None], valid[None]
    near = valid & (g < 5)
    p0 = torch.where(near, smooth_within(g, near, 3.0), 1.05 * g)
    regions = {"near": near, "far": valid & ~near}
    maps = descend(p0, g, valid, make_loss("dr", 3), steps=2, lr=1e-3, regions=regions)
    for lengths in step_lengths(maps, regions).values():
        assert lengths == pytest.approx([1e-3, 1e-3], rel=1e-9)
    # one mean over all pixels: a region's step is lr * (share of sum |G|) / (share of pixels)
    plain = descend(p0, g, valid, make_loss("dr", 3), steps=1, lr=1e-3)
    share = gradient_mass_by_region(loss_gradient(make_loss("dr", 3), p0, g, valid), regions)
    pixels = float(near.sum() / valid.sum())
    assert step_lengths(plain, regions)["near"][0] == pytest.approx(1e-3 * share["near"] / pixels)


def test_descend_with_regions_steps_the_pixels_in_no_region_as_one_more_group():
    pred, target, mask = _inputs((1, 8, 9), seed=12)
    left = torch.zeros_like(mask)
    left[..., :4] = True
    maps = descend(pred, target, mask, make_loss("ssi"), steps=1, lr=0.01, regions={"left": left})
    rest = mask & ~left
    assert float((maps[1] - maps[0]).abs()[mask & left].mean()) == pytest.approx(0.01, rel=1e-9)
    assert float((maps[1] - maps[0]).abs()[rest].mean()) == pytest.approx(0.01, rel=1e-9)


def test_descend_linear_schedule_decays_the_step_to_zero():
    pred, target, mask = _inputs((1, 8, 9), seed=13)
    maps = descend(pred, target, mask, make_loss("dp", 2), steps=4, lr=0.02, schedule="linear")
    lengths = step_lengths(maps, {"all": mask})["all"]
    assert lengths == pytest.approx([0.02, 0.015, 0.01, 0.005], rel=1e-9)


def test_descend_keeps_its_old_behaviour_without_regions():
    pred, target, mask = _inputs((1, 7, 8), seed=14)
    fn = make_loss("ds", 2)
    new = descend(pred, target, mask, fn, steps=2, lr=0.01)
    p = pred.clone()
    for k in range(2):
        grad = loss_gradient(fn, p, target, mask)
        p = p - 0.01 * (grad / grad.abs()[mask].mean())  # descend's order of operations
        torch.testing.assert_close(new[k + 1], p, rtol=0, atol=0)


def test_descend_rejects_unknown_schedules_and_misshapen_regions():
    pred, target, mask = _inputs((1, 4, 4))
    with pytest.raises(ValueError, match="Invalid schedule"):
        descend(pred, target, mask, hdn.ssi_loss, steps=1, lr=0.1, schedule="cosine")
    with pytest.raises(ValueError, match="Invalid region 'r' shape"):
        descend(pred, target, mask, hdn.ssi_loss, steps=1, lr=0.1,
                regions={"r": torch.ones(3, 3, dtype=torch.bool)})


def test_step_lengths_rejects_empty_regions_and_single_maps():
    maps = [torch.zeros(1, 2, 2), torch.ones(1, 2, 2)]
    with pytest.raises(ValueError, match="Invalid region 'none'"):
        step_lengths(maps, {"none": torch.zeros(1, 2, 2, dtype=torch.bool)})
    with pytest.raises(ValueError, match="Invalid maps"):
        step_lengths(maps[:1], {"all": torch.ones(1, 2, 2, dtype=torch.bool)})


def test_level_gradients_of_a_one_level_hierarchy_equal_the_ssi_gradient():
    pred, target, mask = _inputs((2, 6, 7), seed=15)
    ctx = hdn.contexts.spatial_grid(target, mask, levels=1)  # level 0: the whole image
    parts = level_gradients(pred, target, mask, ctx)
    assert parts.shape == (1, 2, 6, 7)
    torch.testing.assert_close(parts[0], loss_gradient(hdn.ssi_loss, pred, target, mask))


def test_level_gradients_sum_to_the_hdn_gradient_up_to_the_per_pixel_mean():
    pred, target, mask = _inputs((1, 8, 8), seed=16)
    ctx = hdn.contexts.spatial_grid(target, mask, levels=2)  # every pixel in one cell per level
    parts = level_gradients(pred, target, mask, ctx)
    full = loss_gradient(lambda p, g, v: hdn.contexts_loss(p, g, v, ctx), pred, target, mask)
    torch.testing.assert_close(parts.sum(0) / 2, full)


def test_smallest_context_size_counts_valid_pixels_of_the_smallest_cell():
    target = torch.rand(1, 8, 12, dtype=torch.float64) + 1
    assert smallest_context_size("ds", target, None, 3) == 2 * 3
    mask = torch.ones(1, 8, 12, dtype=torch.bool)
    mask[0, 0, 0] = False
    assert smallest_context_size("ds", target, mask, 3) == 5


def test_median_gradient_share_is_the_median_terms_share_for_ssi():
    pred, target, mask = _inputs((1, 6, 7), seed=17)
    parts = ssi_gradient_parts(pred, target, mask)
    expected = float(parts.median.abs().sum() / parts.total.abs().sum())
    assert median_gradient_share("ssi", 1, pred, target, mask) == pytest.approx(expected, rel=1e-9)
