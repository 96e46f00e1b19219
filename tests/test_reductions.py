"""Every ``reduction`` of every loss against the slow reference (hdn.reference): values and
gradients in float64 within 1e-6, on every kind of level (rows, sorted segments, pairs), over odd and
non-square shapes, empty masks and ties; and the identities that tie the reductions
together (``map.sum() / N_v == mean``, ``per_image`` is the image alone, ...).

Gradients of the non-scalar reductions are those of ``sum(w * out)`` for a random weight
``w`` of the output's shape, so every per-pixel (or per-image) weight is exercised.
"""

from __future__ import annotations

import zlib

import pytest
import torch
from torch.autograd import gradcheck

import hdn
from hdn import contexts as C
from hdn import reference as ref

F64 = torch.float64
NAN = float("nan")
REDUCTIONS = ("mean", "sum", "per_image", "none")
SHAPES = ((1, 1, 1), (2, 1, 6), (2, 7, 5), (3, 16, 20), (1, 33, 17), (2, 9, 31))


def _gen(*key) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def _data(shape, *key, holes=True):
    gen = _gen(*key)
    pred = torch.randn(shape, generator=gen, dtype=F64)
    target = 0.5 + 3 * torch.rand(shape, generator=gen, dtype=F64)
    mask = torch.rand(shape, generator=gen) > 0.2 if holes else None
    return pred, target, mask


def _assert_close(actual, expected, rtol=1e-6):
    floor = float(expected.abs().max()) if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * floor + 1e-15)


def _out_and_grads(fn, pred, target, weight, *args, **kwargs):
    """``fn(pred, target, ...)`` and the gradients of ``sum(weight * out)``."""
    p = pred.detach().clone().requires_grad_(True)
    g = target.detach().clone().requires_grad_(True)
    out = fn(p, g, *args, **kwargs)
    objective = (out * weight.reshape(out.shape)).sum() if weight is not None else out.sum()
    if not objective.requires_grad:
        return out.detach(), torch.zeros_like(p), torch.zeros_like(g)
    gp, gg = torch.autograd.grad(objective, [p, g], allow_unused=True)
    return out.detach(), torch.zeros_like(p) if gp is None else gp, torch.zeros_like(g) if gg is None else gg


def _weight(reduction, shape, *key):
    """A random positive weight of the reduction's output shape (``None`` for scalars)."""
    gen = _gen("weight", *key)
    if reduction == "none":
        return 0.5 + torch.rand(shape, generator=gen, dtype=F64)
    if reduction == "per_image":
        return 0.5 + torch.rand(shape[0], generator=gen, dtype=F64)
    return None


def _check(fast, slow, pred, target, reduction, *key, fast_kwargs=None, slow_args=(), slow_kwargs=None):
    weight = _weight(reduction, pred.shape, *key)
    got = _out_and_grads(fast, pred, target, weight, reduction=reduction, **(fast_kwargs or {}))
    want = _out_and_grads(slow, pred, target, weight, *slow_args, reduction=reduction, **(slow_kwargs or {}))
    assert got[0].dtype == F64
    assert got[0].shape == want[0].shape
    for a, b in zip(got, want):
        assert torch.isfinite(a).all()
        _assert_close(a, b)
    return got


def _bhw(shape):
    return shape if len(shape) == 3 else (shape[0], *shape[2:])


def _ref_hdn(context, levels):
    def fn(p, g, mask=None, *, reduction):
        out = ref.hdn_loss(p.reshape(_bhw(p.shape)), g.reshape(_bhw(g.shape)),
                           None if mask is None else mask.reshape(_bhw(mask.shape)), context, levels, reduction)
        return out.reshape(p.shape) if reduction == "none" else out
    return fn


# --- the fixed hierarchies and SSI, every reduction against the reference -----------------


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("context", ("dr", "dp", "ds"))
def test_hdn_loss_reductions_and_gradients_match_reference(context, shape, reduction):
    levels = 3 if context != "ds" or min(shape[-2:]) >= 4 else 1
    pred, target, mask = _data(shape, context, shape, reduction)
    shape4 = (shape[0], 1, *shape[1:])
    pred, target, mask = pred.view(shape4), target.view(shape4), mask.view(shape4)  # (B, 1, H, W)
    _check(lambda p, g, **kw: hdn.hdn_loss(p, g, mask, context=context, levels=levels, **kw),
           lambda p, g, **kw: _ref_hdn(context, levels)(p, g, mask, **kw),
           pred, target, reduction, context, shape)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_ssi_loss_reductions_and_gradients_match_reference(shape, reduction):
    pred, target, mask = _data(shape, "ssi", shape, reduction)
    _check(lambda p, g, **kw: hdn.ssi_loss(p, g, mask, **kw),
           lambda p, g, **kw: ref.ssi_loss(p, g, mask, **kw), pred, target, reduction, "ssi", shape)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("context", ("dr", "dp", "ds"))
def test_reductions_match_reference_with_an_image_without_valid_pixels(context, reduction):
    pred, target, mask = _data((3, 9, 12), "empty", context, reduction)
    mask[1] = False
    out = _check(lambda p, g, **kw: hdn.hdn_loss(p, g, mask, context=context, levels=3, **kw),
                 _ref_hdn_masked(context, 3, mask), pred, target, reduction, "empty", context)
    if reduction == "per_image":
        assert float(out[0][1]) == 0.0
    if reduction == "none":
        assert float(out[0][1].abs().sum()) == 0.0 and float(out[1][1].abs().sum()) == 0.0


def _ref_hdn_masked(context, levels, mask):
    return lambda p, g, **kw: ref.hdn_loss(p, g, mask, context, levels, **kw)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("context", ("dr", "dp", "ds", "ssi"))
def test_batch_without_valid_pixels_gives_zeros_and_zero_gradients_for_every_reduction(context, reduction):
    pred, target, _ = _data((2, 8, 8), "no-valid")
    mask = torch.zeros(2, 8, 8, dtype=torch.bool)
    fn = hdn.ssi_loss if context == "ssi" else lambda p, g, m, **kw: hdn.hdn_loss(p, g, m, context=context, **kw)
    p = pred.clone().requires_grad_(True)
    out = fn(p, target, mask, reduction=reduction)
    assert out.shape == {"mean": (), "sum": (), "per_image": (2,), "none": (2, 8, 8)}[reduction]
    assert float(out.abs().sum()) == 0.0
    out.sum().backward()
    assert float(p.grad.abs().sum()) == 0.0


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("context", ("dr", "dp", "ds"))
def test_reductions_match_reference_with_heavy_ties_in_the_target(context, reduction):
    """Ties put several pixels at a median; the values and the prediction's gradient (no
    ties in the prediction) do not depend on which tied target pixel takes the median."""
    pred, target, mask = _data((2, 12, 10), "ties", context, reduction)
    target = torch.round(target * 2) / 2  # a handful of distinct depths
    weight = _weight(reduction, pred.shape, "ties", context)
    got = _out_and_grads(hdn.hdn_loss, pred, target, weight, mask, context=context, levels=3, reduction=reduction)
    want = _out_and_grads(ref.hdn_loss, pred, target, weight, mask, context, 3, reduction)
    _assert_close(got[0], want[0])
    _assert_close(got[1], want[1])


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_reductions_of_dr_with_two_entries_per_pixel_match_reference(reduction, monkeypatch):
    """The DR levels of CUDA and of compiled code (two entries per pixel, for bins that may
    overlap), run on the CPU, where eager DR drops the second entry when no bins overlap."""
    monkeypatch.setattr(C.IntervalContexts, "_overlapping_levels", lambda self: [True] * self.num_levels)
    context = "dr"
    pred, target, mask = _data((2, 9, 13), "kth", context, reduction)
    _check(lambda p, g, **kw: hdn.hdn_loss(p, g, mask, context=context, levels=3, **kw),
           _ref_hdn_masked(context, 3, mask), pred, target, reduction, "kth", context)


# --- overlapping, label and pooled contexts --------------------------


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_label_contexts_reductions_match_reference(reduction):
    gen = _gen("labels")
    shape = (2, 11, 14)
    pred, target, mask = _data(shape, "labels", reduction)
    target[0, 0, :3] = NAN
    coarse = torch.randint(0, 3, shape, generator=gen) * 10 + 5
    fine = torch.randint(-1, 9, shape, generator=gen) * 7  # -7: in no context
    ctx = C.from_labels([coarse, fine], target, mask)
    valid = torch.isfinite(target) & mask
    masks = [(lab == v) for lab in (coarse, fine) for v in torch.unique(lab).tolist() if v >= 0]
    _check(lambda p, g, **kw: hdn.contexts_loss(p, g, mask, ctx, **kw),
           lambda p, g, **kw: ref.hierarchical_loss(p, g, valid, masks, **kw), pred, target, reduction, "labels")


def _crop_masks(boxes, valid):
    masks = [valid]
    for k in range(boxes.shape[1]):
        m = torch.zeros_like(valid)
        for b in range(valid.shape[0]):
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


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("kind", ("crops", "intervals"))
def test_pooled_random_contexts_reductions_match_reference(kind, reduction):
    pred, target, mask = _data((2, 13, 21), "pooled", kind, reduction)
    target[1, 3, :4] = NAN
    valid = torch.isfinite(target) & mask
    gen = torch.Generator().manual_seed(3)
    if kind == "crops":
        ctx = C.random_crops(target, mask, num=5, generator=gen)
        masks = _crop_masks(ctx.description, valid)
    else:
        ctx = C.random_depth_intervals(target, mask, num=5, generator=gen)
        masks = _interval_masks(ctx.description, torch.where(valid, target, 0.0), valid)
    assert ctx.aggregation == "pooled"
    _check(lambda p, g, **kw: hdn.contexts_loss(p, g, mask, ctx, **kw),
           lambda p, g, **kw: ref.pooled_loss(p, g, valid, masks, **kw), pred, target, reduction, "pooled", kind)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gradient_matching_reductions_match_reference(reduction):
    pred, target, mask = _data((2, 9, 11), "gm", reduction)
    target[0, 2, 3] = NAN
    _check(lambda p, g, **kw: hdn.gradient_matching_loss(p, g, mask, scales=3, **kw),
           lambda p, g, **kw: ref.gradient_matching_loss(p, g, mask, 3, **kw), pred, target, reduction, "gm")


# --- identities between the reductions ----------------------------------------------


def _all(fn, pred, target, mask):
    return {r: fn(pred, target, mask, reduction=r) for r in REDUCTIONS}


LOSSES = {
    "dr": lambda p, g, m, **kw: hdn.hdn_loss(p, g, m, context="dr", levels=4, **kw),
    "dp": lambda p, g, m, **kw: hdn.hdn_loss(p, g, m, context="dp", levels=4, **kw),
    "ds": lambda p, g, m, **kw: hdn.hdn_loss(p, g, m, context="ds", levels=3, **kw),
    "ssi": hdn.ssi_loss,
    "labels": lambda p, g, m, **kw: hdn.contexts_loss(p, g, m, C.from_labels(torch.arange(g.numel()).view(g.shape) % 5, g, m), **kw),
    "crops": lambda p, g, m, **kw: hdn.contexts_loss(p, g, m, C.random_crops(g, m, num=4, generator=torch.Generator().manual_seed(0)), **kw),
    "gm": hdn.gradient_matching_loss,
}


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_map_sum_over_valid_count_is_the_mean_and_sum_is_the_map_sum(name):
    pred, target, mask = _data((3, 1, 17, 12), "identity", name)
    out = _all(LOSSES[name], pred, target, mask)
    n_valid = int(mask.sum())
    assert out["none"].shape == pred.shape
    _assert_close(out["none"].sum() / n_valid, out["mean"])
    _assert_close(out["sum"], out["none"].sum())
    assert float(out["none"][~mask].abs().sum()) == 0.0  # 0 at invalid pixels
    per_image_valid = mask.flatten(1).sum(1).to(F64)
    _assert_close(out["per_image"], out["none"].flatten(1).sum(1) / per_image_valid)
    # "mean" is the per-image losses' average weighted by the valid counts
    _assert_close((out["per_image"] * per_image_valid).sum() / n_valid, out["mean"])


@pytest.mark.parametrize("context", ("dr", "dp", "ds", "ssi"))
def test_per_image_loss_is_the_loss_of_that_image_alone(context):
    pred, target, mask = _data((3, 14, 10), "alone", context)
    fn = LOSSES[context]
    per_image = fn(pred, target, mask, reduction="per_image")
    alone = torch.stack([fn(pred[b : b + 1], target[b : b + 1], mask[b : b + 1]) for b in range(3)])
    _assert_close(per_image, alone)


def test_none_keeps_the_layout_of_bhw_inputs():
    pred, target, mask = _data((2, 7, 9), "layout")
    assert hdn.hdn_loss(pred, target, mask, reduction="none").shape == (2, 7, 9)
    assert hdn.ssi_loss(pred.unsqueeze(1), target.unsqueeze(1), reduction="none").shape == (2, 1, 7, 9)


@pytest.mark.parametrize("reduction", ("per_image", "none"))
@pytest.mark.parametrize("context", ("dr", "dp", "ds", "labels"))
def test_gradcheck_of_the_non_scalar_reductions(context, reduction):
    """torch.autograd.gradcheck on inputs without near-ties (a perturbation cannot move a median)."""
    gen = _gen("gradcheck", context, reduction)
    shape = (2, 5, 6)
    n = 30
    pred = torch.stack([torch.randperm(n, generator=gen).double() for _ in range(2)]).view(shape) / n + 0.5
    target = torch.stack([torch.randperm(n, generator=gen).double() for _ in range(2)]).view(shape) / 7 + 1
    mask = torch.rand(shape, generator=gen) > 0.15
    if context == "labels":
        ctx = C.from_labels(torch.arange(60).view(shape) % 3, target, mask)
        def fn(p, g):
            return hdn.contexts_loss(p, g, mask, ctx, reduction=reduction)
    else:
        def fn(p, g):
            return hdn.hdn_loss(p, g, mask, context=context, levels=2, reduction=reduction)
    p = pred.clone().requires_grad_(True)
    assert gradcheck(lambda q: fn(q, target), (p,), eps=1e-6, atol=1e-5)
    if context == "ds":  # the target's bins (DR/DP) change under a perturbation of a bin edge
        g = target.clone().requires_grad_(True)
        assert gradcheck(lambda t: fn(pred, t), (g,), eps=1e-6, atol=1e-5)


# --- modules and bad input -----------------------------------------------------------


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_modules_store_and_apply_the_reduction(reduction):
    pred, target, mask = _data((2, 1, 8, 8), "modules")
    for module, fn in (
        (hdn.HDNLoss("dp", 2, reduction=reduction), lambda: hdn.hdn_loss(pred, target, mask, context="dp", levels=2, reduction=reduction)),
        (hdn.SSILoss(reduction=reduction), lambda: hdn.ssi_loss(pred, target, mask, reduction=reduction)),
        (hdn.GradientMatchingLoss(2, reduction=reduction), lambda: hdn.gradient_matching_loss(pred, target, mask, scales=2, reduction=reduction)),
    ):
        torch.testing.assert_close(module(pred, target, mask), fn())
        assert module.reduction == reduction
        assert (f"reduction={reduction!r}" in repr(module)) == (reduction != "mean")  # the default is not shown


@pytest.mark.parametrize("bad", ["avg", "", None, 1, "Mean"])
def test_unknown_reduction_raises_value_error_naming_the_argument(bad):
    pred, target, _ = _data((1, 4, 4), "bad")
    calls = [
        lambda: hdn.hdn_loss(pred, target, reduction=bad),
        lambda: hdn.ssi_loss(pred, target, reduction=bad),
        lambda: hdn.gradient_matching_loss(pred, target, reduction=bad),
        lambda: hdn.contexts_loss(pred, target, None, C.whole_image(target), reduction=bad),
        lambda: hdn.HDNLoss(reduction=bad),
        lambda: hdn.SSILoss(reduction=bad),
        lambda: hdn.GradientMatchingLoss(reduction=bad),
    ]
    for call in calls:
        with pytest.raises(ValueError, match="Invalid reduction"):
            call()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("reduction", ("sum", "per_image", "none"))
@pytest.mark.parametrize("context", ("dr", "dp", "ds"))
def test_cuda_reductions_and_gradients_equal_cpu(context, reduction):
    pred, target, mask = _data((2, 1, 24, 20), "cuda", context, reduction)
    weight = _weight(reduction, pred.shape, "cuda", context)
    cpu = _out_and_grads(hdn.hdn_loss, pred, target, weight, mask, context=context, reduction=reduction)
    gpu = _out_and_grads(
        hdn.hdn_loss, pred.cuda(), target.cuda(), None if weight is None else weight.cuda(), mask.cuda(),
        context=context, reduction=reduction,
    )
    for a, b in zip(gpu, cpu):
        _assert_close(a.cpu(), b)
