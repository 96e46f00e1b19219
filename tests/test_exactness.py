"""The loss core reproduces docs/semantics.md exactly: hdn against the slow reference (hdn.reference).

Every comparison is in float64, values and gradients within 1e-6 relative (gradients with
an absolute floor of 1e-6 times the largest reference gradient). The reference builds one
boolean mask per context and normalises one context of one image at a time, with autograd
for the gradients; hdn uses its engine (hdn/_core/engine.py) and an analytic backward.
"""

from __future__ import annotations

import math
import zlib

import numpy as np
import pytest
import torch

import hdn
from hdn import contexts as C
from hdn import reference as ref

F64 = torch.float64
NAN, INF = float("nan"), float("inf")
CONTEXTS = ("dr", "dp", "ds")
LEVELS = (1, 2, 3, 4, 5)
SHAPES = ((1, 1, 1), (2, 1, 6), (2, 7, 5), (3, 16, 20), (1, 33, 17), (2, 9, 31))


# --- helpers ----------------------------------------------------------------------------


def _gen(*key) -> torch.Generator:
    """A generator seeded from the test's parameters (stable across runs and workers)."""
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def _random_data(shape, *key):
    gen = _gen(*key)
    pred = torch.randn(shape, generator=gen, dtype=F64)
    target = 0.5 + 3 * torch.rand(shape, generator=gen, dtype=F64)
    return pred, target


def _ds_fits(shape, levels) -> bool:
    return 2 ** (levels - 1) <= min(shape[-2], shape[-1])


def _assert_close(actual, expected, rtol=1e-6):
    """Within ``rtol`` relative; absolute floor ``rtol * max|expected|`` (+1e-15 for zeros)."""
    floor = float(expected.abs().max()) if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * floor + 1e-15)


def _loss_and_grads(fn, pred, target, *args, **kwargs):
    """``fn(pred, target, ...)`` with fresh leaves; returns (loss, d/dpred, d/dtarget)."""
    p = pred.detach().clone().requires_grad_(True)
    g = target.detach().clone().requires_grad_(True)
    loss = fn(p, g, *args, **kwargs)
    if not loss.requires_grad:  # the reference's sum over no terms is a constant
        return loss.detach(), torch.zeros_like(p), torch.zeros_like(g)
    gp, gg = torch.autograd.grad(loss, [p, g], allow_unused=True)
    gp = torch.zeros_like(p) if gp is None else gp
    gg = torch.zeros_like(g) if gg is None else gg
    return loss.detach(), gp, gg


def _group_sums(grad, values):
    """Per image, the gradient summed over the pixels that share a value.

    When values tie, the pixel that receives the median's gradient is an implementation
    choice (torch.median does not promise one). Every other pixel's gradient is the same
    in both, and the median's gradient stays inside its tie group, so these sums are
    implementation independent."""
    out = []
    for b in range(values.shape[0]):
        uniq, inv = torch.unique(values[b].reshape(-1), return_inverse=True)
        out.append(torch.zeros(len(uniq), dtype=grad.dtype).index_add_(0, inv, grad[b].reshape(-1)))
    return torch.cat(out)


def _unique_in_image(values):
    """Bool mask of pixels whose value occurs once in its image."""
    keep = torch.zeros_like(values, dtype=torch.bool)
    for b in range(values.shape[0]):
        _, inv, counts = torch.unique(
            values[b].reshape(-1), return_inverse=True, return_counts=True
        )
        keep[b] = (counts[inv] == 1).view(values.shape[1:])
    return keep


def _check_hdn(pred, target, mask, context, levels, *, target_ties=False, pred_ties=False):
    """hdn.hdn_loss against hdn.reference.hdn_loss: value, d/dpred and d/dtarget."""
    got = _loss_and_grads(hdn.hdn_loss, pred, target, mask, context=context, levels=levels)
    want = _loss_and_grads(ref.hdn_loss, pred, target, mask, context=context, levels=levels)
    _compare(got, want, pred, target, target_ties=target_ties, pred_ties=pred_ties)
    return got[0]


def _compare(got, want, pred, target, *, target_ties=False, pred_ties=False):
    (loss, gp, gg), (loss_ref, gp_ref, gg_ref) = got, want
    assert loss.dtype == F64
    _assert_close(loss, loss_ref)
    assert torch.isfinite(gp).all() and torch.isfinite(gg).all()
    if pred_ties:
        unique = _unique_in_image(pred)
        _assert_close(gp[unique], gp_ref[unique])
        floor = 1e-6 * float(gp_ref.abs().max()) + 1e-15
        torch.testing.assert_close(
            _group_sums(gp, pred), _group_sums(gp_ref, pred), rtol=1e-6, atol=floor
        )
    else:
        _assert_close(gp, gp_ref)
    if target_ties:
        # The sums cancel (a median's gradient offsets its context's): tolerance from the
        # per-pixel gradients.
        finite = torch.where(torch.isfinite(target), target, -1.0)
        floor = 1e-6 * float(gg_ref.abs().max()) + 1e-15
        torch.testing.assert_close(
            _group_sums(gg, finite), _group_sums(gg_ref, finite), rtol=1e-6, atol=floor
        )
    else:
        _assert_close(gg, gg_ref)


# --- the fixed hierarchies against the reference ------------------------------------------


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("levels", LEVELS)
@pytest.mark.parametrize("context", CONTEXTS)
def test_hdn_loss_and_gradients_match_reference_on_random_data(context, levels, shape):
    pred, target = _random_data(shape, "random", context, levels, shape)
    if context == "ds" and not _ds_fits(shape, levels):
        with pytest.raises(ValueError, match="levels"):
            hdn.hdn_loss(pred, target, context=context, levels=levels)
        return
    _check_hdn(pred, target, None, context, levels)


@pytest.mark.parametrize("shape", [(2, 9, 31), (3, 16, 20)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("levels", LEVELS)
@pytest.mark.parametrize("context", CONTEXTS)
def test_hdn_loss_matches_reference_with_heavy_ties_in_target(context, levels, shape):
    if context == "ds" and not _ds_fits(shape, levels):
        pytest.skip("DS grid finer than the image (ValueError pinned in the random-data test)")
    pred, target = _random_data(shape, "target-ties", context, levels, shape)
    target = torch.round(target)  # three or four distinct depths per image
    assert len(torch.unique(target)) <= 4
    _check_hdn(pred, target, None, context, levels, target_ties=True)


@pytest.mark.parametrize("levels", LEVELS)
@pytest.mark.parametrize("context", CONTEXTS)
def test_hdn_loss_matches_reference_with_heavy_ties_in_pred(context, levels):
    shape = (2, 9, 31)
    if context == "ds" and not _ds_fits(shape, levels):
        pytest.skip("DS grid finer than the image")
    pred, target = _random_data(shape, "pred-ties", context, levels)
    pred = torch.round(pred * 2) / 2  # about ten distinct values
    _check_hdn(pred, target, None, context, levels, pred_ties=True)


@pytest.mark.parametrize("levels", LEVELS)
@pytest.mark.parametrize("context", CONTEXTS)
def test_hdn_loss_matches_reference_when_half_the_target_is_constant(context, levels):
    shape = (2, 16, 20)
    pred, target = _random_data(shape, "half-constant", context, levels)
    target[:, :8] = 1.75
    _check_hdn(pred, target, None, context, levels, target_ties=True)


@pytest.mark.parametrize("levels", LEVELS)
@pytest.mark.parametrize("context", CONTEXTS)
def test_hdn_loss_matches_reference_on_a_constant_target(context, levels):
    shape = (2, 16, 20)
    pred, _ = _random_data(shape, "constant", context, levels)
    target = torch.full(shape, 2.5, dtype=F64)
    loss = _check_hdn(pred, target, None, context, levels, target_ties=True)
    if context in ("dr", "dp"):
        assert loss == 0  # every pixel equals the maximum: in no bin (docs/semantics.md §3 quirk)


@pytest.mark.parametrize("levels", LEVELS)
@pytest.mark.parametrize("context", CONTEXTS)
def test_hdn_loss_matches_reference_with_a_single_valid_pixel(context, levels):
    shape = (2, 16, 20)
    pred, target = _random_data(shape, "single", context, levels)
    mask = torch.zeros(shape, dtype=torch.bool)
    mask[1, 5, 7] = True
    loss = _check_hdn(pred, target, mask, context, levels)
    assert loss == 0  # one pixel normalises to 0 on both sides


@pytest.mark.parametrize("levels", LEVELS)
@pytest.mark.parametrize("context", CONTEXTS)
def test_hdn_loss_matches_reference_with_an_image_without_valid_pixels(context, levels):
    shape = (3, 16, 20)
    pred, target = _random_data(shape, "empty-image", context, levels)
    mask = torch.ones(shape, dtype=torch.bool)
    mask[1] = False
    loss = _check_hdn(pred, target, mask, context, levels)
    without = _loss_and_grads(
        hdn.hdn_loss, pred[[0, 2]], target[[0, 2]], context=context, levels=levels
    )
    _assert_close(loss, without[0])  # the empty image adds nothing, not even to the count


@pytest.mark.parametrize("levels", LEVELS)
@pytest.mark.parametrize("context", CONTEXTS)
def test_hdn_loss_matches_reference_with_nan_and_inf_in_target(context, levels):
    shape = (2, 9, 31)
    if context == "ds" and not _ds_fits(shape, levels):
        pytest.skip("DS grid finer than the image")
    pred, target = _random_data(shape, "nonfinite", context, levels)
    target[0, 0, :5] = NAN
    target[0, 3, 3] = INF
    target[1, 2, 2:9] = -INF
    target[1, 8, 30] = NAN
    _check_hdn(pred, target, None, context, levels)


@pytest.mark.parametrize("levels", LEVELS)
@pytest.mark.parametrize("context", CONTEXTS)
def test_hdn_loss_matches_reference_with_an_explicit_mask(context, levels):
    shape = (2, 16, 20)
    pred, target = _random_data(shape, "mask", context, levels)
    mask = torch.rand(shape, generator=_gen("mask", context, levels), dtype=F64) > 0.3
    target[0, 1, 1] = NAN  # a masked-in non-finite value is still invalid
    mask[0, 1, 1] = True
    _check_hdn(pred, target, mask, context, levels)


@pytest.mark.parametrize("context", CONTEXTS)
def test_hdn_loss_is_the_same_for_b1hw_and_bhw_inputs(context):
    pred, target = _random_data((2, 9, 31), "layout", context)
    mask = torch.rand(pred.shape, generator=_gen("layout-mask"), dtype=F64) > 0.2
    flat = _loss_and_grads(hdn.hdn_loss, pred, target, mask, context=context, levels=3)
    four = _loss_and_grads(
        hdn.hdn_loss, pred[:, None], target[:, None], mask[:, None], context=context, levels=3
    )
    assert four[1].shape == (2, 1, 9, 31) and four[2].shape == (2, 1, 9, 31)
    _assert_close(four[0], flat[0])
    _assert_close(four[1][:, 0], flat[1])
    _assert_close(four[2][:, 0], flat[2])


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_ssi_loss_and_gradients_match_reference(shape):
    pred, target = _random_data(shape, "ssi", shape)
    mask = torch.rand(shape, generator=_gen("ssi-mask", shape), dtype=F64) > 0.25
    target.view(-1)[::7] = NAN
    for m in (None, mask):
        got = _loss_and_grads(hdn.ssi_loss, pred, target, m)
        want = _loss_and_grads(ref.ssi_loss, pred, target, m)
        _compare(got, want, pred, target)


def test_ds_with_one_level_equals_ssi_loss():
    pred, target = _random_data((3, 7, 5), "ds-l1")
    mask = torch.rand(pred.shape, generator=_gen("ds-l1-mask"), dtype=F64) > 0.2
    got = _loss_and_grads(hdn.hdn_loss, pred, target, mask, context="ds", levels=1)
    want = _loss_and_grads(hdn.ssi_loss, pred, target, mask)
    for a, b in zip(got, want):
        _assert_close(a, b)


@pytest.mark.parametrize("context", ["dr", "dp"])
def test_dr_and_dp_with_one_level_are_ssi_loss_without_the_maximum_pixel(context):
    """semantics §3: level 0 of DR/DP is the bin [lo, hi) (plus 1e-30), so the pixels at the
    image's maximum depth are in no context, yet count in the denominator. Hence
    HDN(L=1) = SSI over the other pixels, times (valid - at_max) / valid, and equals
    ssi_loss only up to that quirk. (Depths in [1, 2] so that lo + (hi - lo) == hi exactly.)"""
    gen = _gen("l1", context)
    pred = torch.randn(3, 7, 5, generator=gen, dtype=F64)
    target = 1 + torch.rand(3, 7, 5, generator=gen, dtype=F64)
    mask = torch.rand(3, 7, 5, generator=gen, dtype=F64) > 0.2
    target[2, 0, :2] = target[2][mask[2]].max()  # a tied maximum
    mask[2, 0, :2] = True
    at_max = target == torch.where(mask, target, -INF).amax(dim=(1, 2), keepdim=True)
    n_valid, n_rest = int(mask.sum()), int((mask & ~at_max).sum())
    got = _loss_and_grads(hdn.hdn_loss, pred, target, mask, context=context, levels=1)
    want = _loss_and_grads(hdn.ssi_loss, pred, target, mask & ~at_max)
    _assert_close(got[0], want[0] * n_rest / n_valid)
    _assert_close(got[1], want[1] * n_rest / n_valid)
    ssi = hdn.ssi_loss(pred, target, mask)
    assert not torch.isclose(got[0], ssi, rtol=1e-3)


# --- Released quirks and counts -------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("builder", [C.depth_range, C.depth_percentile], ids=["dr", "dp"])
def test_maximum_depth_pixel_is_in_no_bin_at_any_level(builder, dtype):
    gen = _gen("max", builder.__name__, str(dtype))
    target = (1 + torch.rand(2, 9, 31, generator=gen, dtype=F64)).to(dtype)  # depths in [1, 2]
    target[1, 4, :3] = target[1].max()  # tied maximum: all of them are out
    ctx = builder(target, levels=5)
    at_max = target == target.amax(dim=(1, 2), keepdim=True)
    assert at_max[0].sum() == 1 and at_max[1].sum() >= 3
    for level in range(5):
        ids = ctx.level_ids(level)
        assert (ids[at_max] == -1).all()
        assert (ids[~at_max] >= 0).all()
        assert int(ids.max()) < 2**level
    assert not ctx.to_masks().any(dim=0)[at_max].any()


def test_maximum_depth_pixel_counts_in_the_denominator():
    """DR: a second pixel at the maximum depth changes neither the range nor anyone's bins;
    it only joins the denominator: 35 valid pixels -> 36, the loss scales by 35 / 36."""
    gen = _gen("denominator")
    pred = torch.randn(1, 6, 6, generator=gen, dtype=F64)
    target = 1 + torch.rand(1, 6, 6, generator=gen, dtype=F64) * 0.9
    target[0, 2, 3] = 2.0
    target[0, 4, 4] = 2.0
    one_out = torch.ones_like(target, dtype=torch.bool)
    one_out[0, 4, 4] = False
    with_35 = hdn.hdn_loss(pred, target, one_out, context="dr", levels=3)
    with_36 = hdn.hdn_loss(pred, target, context="dr", levels=3)
    _assert_close(with_36, with_35 * 35 / 36)
    _assert_close(with_36, ref.hdn_loss(pred, target, context="dr", levels=3))
    pred_far = pred.clone()
    pred_far[0, 2, 3] = 1e6  # the prediction at a maximum pixel does not matter
    for context in ("dr", "dp"):
        _assert_close(
            hdn.hdn_loss(pred_far, target, context=context, levels=3),
            hdn.hdn_loss(pred, target, context=context, levels=3),
        )


@pytest.mark.parametrize("size", [1, 2, 5, 7, 16, 33, 40])
def test_ds_cells_equal_the_released_square_image_formula(size):
    """The released demo uses W for both axes: rows [int(r*w*W), int((r+1)*w*W))."""
    levels = int(math.log2(size)) + 1
    ctx = C.spatial_grid(torch.rand(2, 1, size, size), levels=levels)
    for level in range(levels):
        cells, w = 2**level, 1 / 2**level
        expected = torch.full((size, size), -1, dtype=torch.int64)
        for r in range(cells):
            for c in range(cells):
                rows = slice(int(r * w * size), int((r + 1) * w * size))
                cols = slice(int(c * w * size), int((c + 1) * w * size))
                expected[rows, cols] = r * cells + c
        assert (expected >= 0).all()
        assert torch.equal(ctx.level_ids(level), expected.expand(2, size, size))


@pytest.mark.parametrize("shape", [(1, 3, 40), (2, 7, 5), (1, 33, 17), (1, 16, 9)])
def test_ds_contexts_match_reference_on_non_square_images(shape):
    levels = int(math.log2(min(shape[1:]))) + 1
    ctx = C.spatial_grid(torch.rand(shape), levels=levels)
    assert torch.equal(ctx.to_masks(), torch.stack(ref.ds_contexts(shape, levels)))
    with pytest.raises(ValueError, match="levels"):
        C.spatial_grid(torch.rand(shape), levels=levels + 1)


@pytest.mark.parametrize("levels", LEVELS)
def test_number_of_contexts_is_two_to_the_l_minus_one_and_four_to_the_l_minus_one_over_three(
    levels,
):
    target = torch.rand(2, 1, 16, 16) + 1
    assert C.depth_range(target, levels=levels).num_contexts == 2**levels - 1
    assert C.depth_percentile(target, levels=levels).num_contexts == 2**levels - 1
    assert C.spatial_grid(target, levels=levels).num_contexts == (4**levels - 1) // 3
    for name in CONTEXTS:
        ctx = C.build(name, target, levels=levels)
        assert ctx.to_masks().shape == (ctx.num_contexts, 2, 16, 16)


def test_context_counts_for_three_and_four_levels_are_those_of_spec():
    target = torch.rand(1, 16, 16) + 1
    counts = {
        levels: tuple(C.build(n, target, levels=levels).num_contexts for n in CONTEXTS)
        for levels in (3, 4)
    }
    assert counts == {3: (7, 7, 21), 4: (15, 15, 85)}


@pytest.mark.parametrize(
    "shape", [(1, 1, 1), (2, 7, 5), (3, 16, 20), (2, 9, 31)], ids=lambda s: "x".join(map(str, s))
)
@pytest.mark.parametrize("levels", LEVELS)
@pytest.mark.parametrize("context", CONTEXTS)
def test_context_masks_match_reference_masks(context, levels, shape):
    if context == "ds" and not _ds_fits(shape, levels):
        pytest.skip("DS grid finer than the image")
    gen = _gen("masks", context, levels, shape)
    target = 0.5 + torch.rand(shape, generator=gen, dtype=F64)
    target[:, :, :2] = torch.round(target[:, :, :2] * 4) / 4  # some ties, some on bin edges
    mask = torch.rand(shape, generator=gen, dtype=F64) > 0.2
    if shape[0] > 1:
        mask[1] = False
    target.view(-1)[::5] = NAN
    valid = torch.isfinite(target) & mask
    zeroed = torch.where(valid, target, 0.0)
    ctx = C.build(context, target, mask, levels=levels)
    expected = torch.stack(ref.contexts_by_name(context, zeroed, valid, levels)) & valid
    assert torch.equal(ctx.to_masks(), expected)
    assert torch.equal(ctx.valid, valid)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_dr_pixel_on_a_bin_edge_at_zero_is_in_both_adjacent_bins(dtype):
    """semantics §3: bin i is lo + (hi-lo)*i*w <= g < lo + (hi-lo)*(i+1)*w + 1e-30. When an edge
    is exactly 0 (a signed target such as centred log-depth), the 1e-30 survives and the
    two bins overlap: the pixel at 0 belongs to both."""
    target = torch.tensor([[[-1.0, -0.6, -0.3, 0.0, 0.2, 0.5, 0.7, 1.0]]], dtype=dtype)
    pred = torch.tensor([[[0.3, -1.2, 0.8, 2.0, -0.4, 0.1, 1.5, -0.7]]], dtype=dtype)
    ctx = C.depth_range(target, levels=2)
    expected = torch.stack(ref.dr_contexts(target, torch.ones_like(target, dtype=torch.bool), 2))
    assert expected[1, 0, 0, 3] and expected[2, 0, 0, 3]
    assert torch.equal(ctx.to_masks(), expected)
    got = _loss_and_grads(hdn.hdn_loss, pred.double(), target.double(), context="dr", levels=2)
    want = _loss_and_grads(ref.hdn_loss, pred.double(), target.double(), context="dr", levels=2)
    _compare(got, want, pred.double(), target.double())


@pytest.mark.parametrize("levels", LEVELS)
@pytest.mark.parametrize("context", CONTEXTS)
def test_hdn_loss_matches_reference_on_signed_targets_with_bin_edges_at_zero(context, levels):
    # Image 0: quarters in [-1, 1], so edges fall on 0 and on data values. Image 1: depths
    # in [-1, 0], whose maximum 0 + 1e-30 puts the maximum pixels inside the last bin.
    gen = _gen("signed", context, levels)
    pred = torch.randn(2, 16, 20, generator=gen, dtype=F64)
    target = torch.randint(-4, 5, (2, 16, 20), generator=gen).to(F64) / 4
    target[0, 0, :2] = torch.tensor([-1.0, 1.0])
    target[1] = -target[1].abs()
    target[1, 0, 0] = 0.0
    _check_hdn(pred, target, None, context, levels, target_ties=True)


# --- random-context variants (docs/semantics.md §4) ----------------------------------------------------


def _crop_masks(boxes, valid):
    """Masks of ``(B, num, 4)`` boxes (top, left, height, width), whole image first."""
    B = valid.shape[0]
    masks = [valid]
    for k in range(boxes.shape[1]):
        m = torch.zeros_like(valid)
        for b in range(B):
            top, left, h, w = boxes[b, k].tolist()
            m[b, top : top + h, left : left + w] = True
        masks.append(m & valid)
    return masks


def _interval_masks(bounds, target, valid):
    masks = [valid]
    for k in range(bounds.shape[1]):
        lo, hi = bounds[:, k, 0].view(-1, 1, 1), bounds[:, k, 1].view(-1, 1, 1)
        masks.append((target >= lo) & (target <= hi) & valid)
    return masks


def _random_variant_case(seed):
    gen = _gen("variant", seed)
    shape = (2, 13, 21)
    pred = torch.randn(shape, generator=gen, dtype=F64)
    target = 0.5 + 3 * torch.rand(shape, generator=gen, dtype=F64)
    mask = torch.rand(shape, generator=gen, dtype=F64) > 0.15
    target[1, 3, :4] = NAN
    return pred, target, mask, torch.isfinite(target) & mask


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_crops_loss_matches_reference_pooled_loss(seed):
    pred, target, mask, valid = _random_variant_case(seed)
    ctx = C.random_crops(target, mask, num=5, generator=torch.Generator().manual_seed(seed))
    assert ctx.aggregation == "pooled" and ctx.detach_pred_median
    masks = _crop_masks(ctx.description, valid)
    assert torch.equal(ctx.to_masks(), torch.stack(masks))
    got = _loss_and_grads(hdn.contexts_loss, pred, target, mask, ctx)
    want = _loss_and_grads(ref.pooled_loss, pred, target, valid, masks)
    _compare(got, want, pred, target)
    _assert_close(hdn.hdn_loss(pred, target, mask, context=ctx), got[0])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_depth_intervals_loss_matches_reference_pooled_loss(seed):
    pred, target, mask, valid = _random_variant_case(seed)
    ctx = C.random_depth_intervals(
        target, mask, num=5, generator=torch.Generator().manual_seed(seed)
    )
    assert ctx.aggregation == "pooled" and ctx.detach_pred_median
    masks = _interval_masks(ctx.description, torch.where(valid, target, 0.0), valid)
    assert torch.equal(ctx.to_masks(), torch.stack(masks))
    got = _loss_and_grads(hdn.contexts_loss, pred, target, mask, ctx)
    want = _loss_and_grads(ref.pooled_loss, pred, target, valid, masks)
    _compare(got, want, pred, target)


@pytest.mark.parametrize("builder", [C.random_crops, C.random_depth_intervals])
def test_random_contexts_are_reproducible_from_the_generator_seed(builder):
    _, target, mask, _ = _random_variant_case(7)
    first = builder(target, mask, num=6, generator=torch.Generator().manual_seed(123))
    again = builder(target, mask, num=6, generator=torch.Generator().manual_seed(123))
    other = builder(target, mask, num=6, generator=torch.Generator().manual_seed(124))
    assert torch.equal(first.description, again.description)
    assert torch.equal(first.to_masks(), again.to_masks())
    assert not torch.equal(first.description, other.description)


@pytest.mark.parametrize("min_width", [0.1, 0.5, 1.0])
def test_random_depth_intervals_are_at_least_min_width_of_the_range(min_width):
    _, target, mask, valid = _random_variant_case(3)
    ctx = C.random_depth_intervals(
        target, mask, num=200, min_width=min_width, generator=torch.Generator().manual_seed(5)
    )
    inf = torch.tensor(INF, dtype=F64)
    lo = torch.where(valid, target, inf).amin(dim=(1, 2)).view(-1, 1)
    hi = torch.where(valid, target, -inf).amax(dim=(1, 2)).view(-1, 1)
    a, b = ctx.description[..., 0], ctx.description[..., 1]
    assert ctx.description.shape == (2, 200, 2)
    assert (b - a >= min_width * (hi - lo) * (1 - 1e-12)).all()
    assert (a >= lo * (1 - 1e-12)).all() and (b <= hi * (1 + 1e-12)).all()


@pytest.mark.parametrize("shape", [(2, 16, 16), (1, 7, 40), (1, 2, 3)])
def test_random_crops_are_between_an_eighth_and_a_half_of_each_side(shape):
    target = torch.rand(shape) + 1
    ctx = C.random_crops(target, num=300, generator=torch.Generator().manual_seed(0))
    top, left, h, w = ctx.description.unbind(-1)
    H, W = shape[1:]
    assert ctx.description.shape == (shape[0], 300, 4)
    assert (h >= 1).all() and (w >= 1).all()
    assert (h >= H / 8).all() and (h <= max(1, H // 2)).all()
    assert (w >= W / 8).all() and (w <= max(1, W // 2)).all()
    assert (top >= 0).all() and (left >= 0).all()
    assert (top + h <= H).all() and (left + w <= W).all()


def test_from_labels_loss_matches_reference_hierarchical_loss():
    gen = _gen("labels")
    shape = (2, 11, 14)
    pred = torch.randn(shape, generator=gen, dtype=F64)
    target = 0.5 + 3 * torch.rand(shape, generator=gen, dtype=F64)
    mask = torch.rand(shape, generator=gen, dtype=F64) > 0.2
    target[0, 0, :3] = NAN
    coarse = torch.randint(0, 3, shape, generator=gen) * 10 + 5  # labels 5, 15, 25
    fine = torch.randint(-1, 9, shape, generator=gen) * 7  # -7 is "no context"
    fine[1] = torch.where(fine[1] > 21, 0, fine[1])  # image 1 lacks some labels
    ctx = C.from_labels([coarse, fine], target, mask)
    valid = torch.isfinite(target) & mask
    masks = [
        (lab == value)
        for lab in (coarse, fine)
        for value in torch.unique(lab).tolist()
        if value >= 0
    ]
    got = _loss_and_grads(hdn.contexts_loss, pred, target, mask, ctx)
    want = _loss_and_grads(ref.hierarchical_loss, pred, target, valid, masks)
    _compare(got, want, pred, target)


@pytest.mark.parametrize(
    "builder",
    [
        lambda g: C.depth_range(g, levels=3),
        lambda g: C.depth_percentile(g, levels=3),
        lambda g: C.spatial_grid(g, levels=3),
        lambda g: C.random_depth_intervals(g, num=4, generator=torch.Generator().manual_seed(1)),
        lambda g: C.random_crops(g, num=4, generator=torch.Generator().manual_seed(1)),
    ],
    ids=["dr", "dp", "ds", "intervals", "crops"],
)
def test_contexts_loss_with_a_mask_narrower_than_the_contexts_intersects_every_context(builder):
    """Contexts built on the whole target, a loss mask that takes out a third of the pixels:
    the taken-out pixels shape no context's statistics (docs/semantics.md: a context is
    always intersected with the valid mask)."""
    gen = _gen("narrow mask")
    shape = (2, 12, 17)
    pred = torch.randn(shape, generator=gen, dtype=F64)
    target = 0.5 + 3 * torch.rand(shape, generator=gen, dtype=F64)
    mask = torch.rand(shape, generator=gen, dtype=F64) > 0.33
    ctx = builder(target)
    masks = list(ctx.to_masks().unbind(0))
    assert not all(bool((m <= mask).all()) for m in masks)  # (the contexts reach past the mask)
    got = _loss_and_grads(hdn.contexts_loss, pred, target, mask, ctx)
    if ctx.aggregation == "pooled":
        want = _loss_and_grads(ref.pooled_loss, pred, target, mask, masks, ctx.detach_pred_median)
    else:
        want = _loss_and_grads(ref.hierarchical_loss, pred, target, mask, masks)
    _compare(got, want, pred, target)


# --- precision -------------------------------------------------------------------------


@pytest.mark.parametrize("levels", [1, 3, 4])
@pytest.mark.parametrize("context", CONTEXTS)
def test_float32_loss_is_close_to_the_float64_loss(context, levels):
    pred, target = _random_data((2, 16, 20), "f32", context, levels)
    pred32, target32 = pred.float(), target.float()
    got = _loss_and_grads(hdn.hdn_loss, pred32, target32, context=context, levels=levels)
    want = _loss_and_grads(
        hdn.hdn_loss, pred32.double(), target32.double(), context=context, levels=levels
    )
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.float32
    _assert_close(got[0], want[0].float(), rtol=1e-4)
    _assert_close(got[1], want[1].float(), rtol=1e-3)


@pytest.mark.parametrize("context", ("ssi",) + CONTEXTS)
def test_float32_loss_of_a_nearly_perfect_prediction_keeps_its_digits(context):
    """A prediction equal to the target but for one flattened region: the loss is small next
    to the per-pixel terms, so it rests on accurate float32 row sums (a naive float32
    accumulation over 10^5 pixels was 10 % off here)."""
    from hdn.data import near_far_scene

    depth, ok = near_far_scene(120, 160, seed=0)
    g, valid = depth[None], ok[None]
    near = valid & (g < 5)
    pred = torch.where(near, g[near].mean(), g)
    for levels in (1, 3) if context != "ssi" else (1,):
        kwargs = {} if context == "ssi" else {"context": context, "levels": levels}
        loss = (hdn.ssi_loss if context == "ssi" else hdn.hdn_loss)(pred, g, valid, **kwargs)
        want = (ref.ssi_loss if context == "ssi" else ref.hdn_loss)(pred.double(), g.double(), valid, **kwargs)
        assert loss.dtype == torch.float32
        _assert_close(loss.double(), want, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("context", ("ssi",) + CONTEXTS)
def test_half_precision_inputs_give_the_float32_loss_and_a_gradient_of_their_dtype(context, dtype):
    pred, target = _random_data((2, 16, 20), "half", context, str(dtype))
    pred_h, target_h = pred.to(dtype), target.to(dtype)
    target_h[0, 0, 0] = NAN

    def loss_fn(p, g):
        return hdn.ssi_loss(p, g) if context == "ssi" else hdn.hdn_loss(p, g, context=context)

    got = _loss_and_grads(loss_fn, pred_h, target_h)
    want = _loss_and_grads(loss_fn, pred_h.float(), target_h.float())
    assert got[0].dtype == torch.float32  # statistics in float32
    assert got[1].dtype == dtype and got[2].dtype == dtype
    assert torch.isfinite(got[0]) and torch.isfinite(got[1]).all()
    _assert_close(got[0], want[0], rtol=1e-5)
    torch.testing.assert_close(
        got[1].float(), want[1], rtol=1e-2, atol=1e-2 * float(want[1].abs().max())
    )


# --- a batch without any valid pixel ---------------------------------------------------


@pytest.mark.parametrize(
    "variant", ["ssi", "dr", "dp", "ds", "random_crops", "random_depth_intervals", "labels"]
)
@pytest.mark.parametrize("how", ["mask", "nan"])
def test_batch_without_valid_pixels_gives_zero_loss_and_zero_gradient(variant, how):
    """Documented deviation from the released code (which divides 0 by 0): 0, not NaN."""
    shape = (2, 7, 5)
    pred, target = _random_data(shape, "empty", variant, how)
    mask = torch.zeros(shape, dtype=torch.bool) if how == "mask" else None
    if how == "nan":
        target = torch.full(shape, NAN, dtype=F64)

    def loss_fn(p, g):
        if variant == "ssi":
            return hdn.ssi_loss(p, g, mask)
        if variant in CONTEXTS:
            return hdn.hdn_loss(p, g, mask, context=variant, levels=3)
        if variant == "labels":
            ctx = C.from_labels(torch.zeros(shape, dtype=torch.int64), g, mask)
        else:
            ctx = getattr(C, variant)(g, mask, num=3, generator=torch.Generator().manual_seed(0))
        return hdn.contexts_loss(p, g, mask, ctx)

    p = pred.clone().requires_grad_(True)
    g = target.clone().requires_grad_(True)
    loss = loss_fn(p, g)
    loss.backward()
    assert loss.item() == 0.0 and not loss.isnan()
    assert p.grad is not None and torch.equal(p.grad, torch.zeros_like(p))
    assert g.grad is not None and torch.equal(g.grad, torch.zeros_like(g))


def test_reference_also_gives_zero_for_a_batch_without_valid_pixels():
    pred, target = _random_data((2, 7, 5), "empty-ref")
    mask = torch.zeros(2, 7, 5, dtype=torch.bool)
    for context in CONTEXTS:
        got = _loss_and_grads(hdn.hdn_loss, pred, target, mask, context=context, levels=2)
        want = _loss_and_grads(ref.hdn_loss, pred, target, mask, context=context, levels=2)
        _compare(got, want, pred, target)


# --- large images ----------------------------------------------------------------------


def test_dp_handles_images_larger_than_nanquantile_limit():
    # Takes a few seconds: one 4097 x 4097 image (> 2**24 pixels, where torch.nanquantile
    # raises). Bin edges are checked against float64 numpy quantiles of the sorted values.
    gen = torch.Generator().manual_seed(0)
    H = W = 4097
    assert H * W > 2**24
    target = 1 + torch.rand(1, 1, H, W, generator=gen)
    target[0, 0, 0, :1001] = NAN  # left out; and quantile ranks get a fractional part
    ctx = C.depth_percentile(target, levels=2)
    values = np.sort(target.numpy().ravel())  # NaNs sort last
    values = values[: int(np.isfinite(values).sum())].astype(np.float64)
    for level in range(2):
        rank = np.arange(2**level + 1) / 2**level * (len(values) - 1)
        below, above = np.floor(rank).astype(np.int64), np.ceil(rank).astype(np.int64)
        q = values[below] + (rank - below) * (values[above] - values[below])  # linear rule
        edges = torch.cat([ctx.lower[level][0], ctx.upper[level][0][-1:]]).double().numpy()
        np.testing.assert_allclose(edges, q, rtol=0, atol=2 * 2.0**-23)  # 2 float32 ulps on [1, 2)
    pred = torch.rand(1, 1, H, W, generator=gen)
    loss = hdn.hdn_loss(pred, target, context=ctx)
    assert torch.isfinite(loss) and 0 < loss.item() < 10


# --- CUDA (runs only where a GPU is present) ----------------------------------------------

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, F64])
@pytest.mark.parametrize("context", ("ssi",) + CONTEXTS)
def test_cuda_loss_and_gradients_equal_cpu(context, dtype):
    pred, target = _random_data((2, 33, 17), "cuda", context)
    pred, target = pred.to(dtype), target.to(dtype)
    target[0, 0, :4] = NAN
    mask = torch.rand(pred.shape, generator=_gen("cuda-mask"), dtype=F64) > 0.1

    def loss_fn(p, g, m):
        if context == "ssi":
            return hdn.ssi_loss(p, g, m)
        return hdn.hdn_loss(p, g, m, context=context, levels=4)

    cpu = _loss_and_grads(loss_fn, pred, target, mask)
    gpu = _loss_and_grads(loss_fn, pred.cuda(), target.cuda(), mask.cuda())
    # float32 statistics are summed in another order on the GPU; float16 gradients then
    # round to the nearest half (2**-11 relative)
    rtol = {F64: 1e-6, torch.float32: 1e-4, torch.float16: 2e-3}[dtype]
    for a, b in zip(gpu, cpu):
        assert a.device.type == "cuda" and a.dtype == b.dtype
        _assert_close(a.cpu().double(), b.double(), rtol=rtol)


@needs_cuda
@pytest.mark.parametrize("builder", [C.random_crops, C.random_depth_intervals])
def test_cuda_random_contexts_equal_cpu_for_the_same_seed(builder):
    pred, target, mask, _ = _random_variant_case(11)
    cpu_ctx = builder(target, mask, num=4, generator=torch.Generator().manual_seed(3))
    gpu_ctx = builder(target.cuda(), mask.cuda(), num=4, generator=torch.Generator().manual_seed(3))
    assert torch.equal(gpu_ctx.to_masks().cpu(), cpu_ctx.to_masks())
    cpu = hdn.contexts_loss(pred, target, mask, cpu_ctx)
    gpu = hdn.contexts_loss(pred.cuda(), target.cuda(), mask.cuda(), gpu_ctx)
    _assert_close(gpu.cpu(), cpu)
