"""Wrong calls get a ValueError naming the argument; hard data gets a finite, correct answer."""

from __future__ import annotations

import pytest
import torch

import hdn
from hdn import contexts as C
from hdn import reference as ref

NAN, INF = float("nan"), float("inf")


def _inputs(shape=(2, 1, 8, 8), dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    pred = torch.randn(shape, generator=gen).to(dtype)
    target = (1 + torch.rand(shape, generator=gen)).to(dtype)
    return pred, target


def _all_losses():
    """Every public loss entry point, as f(pred, target, mask)."""
    return {
        "ssi_loss": lambda p, g, m=None: hdn.ssi_loss(p, g, m),
        "hdn_loss_dr": lambda p, g, m=None: hdn.hdn_loss(p, g, m, context="dr"),
        "hdn_loss_dp": lambda p, g, m=None: hdn.hdn_loss(p, g, m, context="dp"),
        "hdn_loss_ds": lambda p, g, m=None: hdn.hdn_loss(p, g, m, context="ds"),
        "gradient_matching_loss": lambda p, g, m=None: hdn.gradient_matching_loss(p, g, m),
        "SSILoss": lambda p, g, m=None: hdn.SSILoss()(p, g, m),
        "HDNLoss": lambda p, g, m=None: hdn.HDNLoss(context="dp", levels=2)(p, g, m),
    }


LOSS_NAMES = list(_all_losses())


def _call(name, *args):
    return _all_losses()[name](*args)


# --- shapes, dtypes, devices ------------------------------------------------------------


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_target_shape_different_from_pred_is_rejected_naming_target(name):
    pred, target = _inputs()
    with pytest.raises(ValueError, match=r"target shape.*expect"):
        _call(name, pred, target[:, :, :7])
    with pytest.raises(ValueError, match="target"):
        _call(name, pred, target[:1])
    with pytest.raises(ValueError, match="target"):
        _call(name, pred, target[0, 0])  # 2-D


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_mask_shape_different_from_pred_is_rejected_naming_mask(name):
    pred, target = _inputs()
    with pytest.raises(ValueError, match=r"mask shape.*expect"):
        _call(name, pred, target, torch.ones(2, 1, 8, 7, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask"):
        _call(name, pred, target, torch.ones(1, 1, 8, 8, dtype=torch.bool))


@pytest.mark.parametrize("mask_dtype", [torch.float32, torch.int64, torch.uint8])
@pytest.mark.parametrize("name", LOSS_NAMES)
def test_mask_that_is_not_bool_is_rejected_naming_mask(name, mask_dtype):
    pred, target = _inputs()
    with pytest.raises(ValueError, match=r"mask dtype.*bool"):
        _call(name, pred, target, torch.ones(2, 1, 8, 8, dtype=mask_dtype))


@pytest.mark.parametrize(
    "bad_shape",
    [(1, 2, 1, 8, 8), (2, 2, 8, 8), (8, 8), (64,)],
    ids=["5d", "two_channels", "2d", "1d"],
)
@pytest.mark.parametrize("name", LOSS_NAMES)
def test_pred_that_is_not_b1hw_or_bhw_is_rejected_naming_pred(name, bad_shape):
    pred = torch.rand(bad_shape)
    target = torch.rand(bad_shape) + 1
    with pytest.raises(ValueError, match=r"pred shape.*\(B, 1, H, W\) or \(B, H, W\)"):
        _call(name, pred, target)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.complex64])
@pytest.mark.parametrize("name", LOSS_NAMES)
def test_non_floating_pred_or_target_is_rejected_naming_it(name, dtype):
    pred, target = _inputs()
    with pytest.raises(ValueError, match=r"pred dtype.*float"):
        _call(name, pred.to(dtype), target)
    with pytest.raises(ValueError, match=r"target dtype.*float"):
        _call(name, pred, target.to(dtype))


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_non_tensor_pred_or_target_is_rejected_naming_it(name):
    pred, target = _inputs()
    with pytest.raises(ValueError, match="pred"):
        _call(name, pred.tolist(), target)
    with pytest.raises(ValueError, match="target"):
        _call(name, pred, target.numpy())


def _other_device() -> str:
    # No GPU here: the 'meta' device is a device all the same, and hdn checks devices
    # before computing anything.
    return "cuda" if torch.cuda.is_available() else "meta"


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_device_mismatch_between_pred_target_and_mask_is_rejected(name):
    pred, target = _inputs()
    mask = torch.ones(2, 1, 8, 8, dtype=torch.bool)
    other = _other_device()
    with pytest.raises(ValueError, match=r"target device.*expect"):
        _call(name, pred, target.to(other), mask)
    with pytest.raises(ValueError, match=r"target device.*pred"):
        _call(name, pred.to(other), target, mask)
    with pytest.raises(ValueError, match=r"mask device.*expect"):
        _call(name, pred, target, mask.to(other))


# --- options ------------------------------------------------------------------------------


@pytest.mark.parametrize("levels", [0, -1, 2.5, True, False, "3", None])
@pytest.mark.parametrize("context", ["dr", "dp", "ds"])
def test_levels_that_are_not_an_integer_at_least_one_are_rejected(context, levels):
    pred, target = _inputs()
    with pytest.raises(ValueError, match=r"levels.*integer >= 1"):
        hdn.hdn_loss(pred, target, context=context, levels=levels)
    with pytest.raises(ValueError, match="levels"):
        hdn.HDNLoss(context=context, levels=levels)
    with pytest.raises(ValueError, match="levels"):
        C.build(context, target, levels=levels)


@pytest.mark.parametrize("context", ["xx", "DR", "", "dr ", None, 3])
def test_unknown_context_is_rejected_naming_context(context):
    pred, target = _inputs()
    with pytest.raises(ValueError, match=r"context.*'dr', 'dp', 'ds'"):
        hdn.hdn_loss(pred, target, context=context)
    with pytest.raises(ValueError, match="context"):
        hdn.HDNLoss(context=context)


def test_contexts_built_for_another_batch_are_rejected_naming_context():
    pred, target = _inputs()
    ctx = C.depth_range(target[:1], levels=2)
    with pytest.raises(ValueError, match="context"):
        hdn.hdn_loss(pred, target, context=ctx)
    with pytest.raises(ValueError, match="context"):
        hdn.contexts_loss(pred, target, None, ctx)
    with pytest.raises(ValueError, match="context"):
        hdn.contexts_loss(pred, target, None, "dr")


@pytest.mark.parametrize(
    ("shape", "levels"), [((1, 8, 8), 5), ((1, 3, 40), 3), ((2, 40, 1), 2), ((1, 7, 7), 4)]
)
def test_ds_levels_finer_than_the_image_are_rejected_naming_levels(shape, levels):
    pred, target = torch.rand(shape), torch.rand(shape) + 1
    with pytest.raises(ValueError, match=r"levels.*finer than"):
        hdn.hdn_loss(pred, target, context="ds", levels=levels)
    with pytest.raises(ValueError, match="levels"):
        hdn.HDNLoss(context="ds", levels=levels)(pred, target)
    hdn.hdn_loss(pred, target, context="ds", levels=levels - 1)  # one level coarser is fine


def test_hdn_loss_module_rejects_bad_options_at_construction():
    with pytest.raises(ValueError, match="context"):
        hdn.HDNLoss(context="xx")
    with pytest.raises(ValueError, match="levels"):
        hdn.HDNLoss(levels=0)
    with pytest.raises(ValueError, match="levels"):
        hdn.HDNLoss(levels=2.5)
    with pytest.raises(ValueError, match="levels"):
        hdn.HDNLoss(levels=True)


@pytest.mark.parametrize("scales", [0, -2, 1.5, True])
def test_gradient_matching_scales_that_are_not_a_positive_integer_are_rejected(scales):
    pred, target = _inputs()
    with pytest.raises(ValueError, match="scales"):
        hdn.gradient_matching_loss(pred, target, scales=scales)
    with pytest.raises(ValueError, match="scales"):
        hdn.GradientMatchingLoss(scales=scales)(pred, target)


def test_random_context_options_are_checked_naming_them():
    _, target = _inputs()
    with pytest.raises(ValueError, match="num"):
        C.random_crops(target, num=-1)
    with pytest.raises(ValueError, match="num"):
        C.random_depth_intervals(target, num=2.0)
    with pytest.raises(ValueError, match="generator"):
        C.random_crops(target, generator=0)
    with pytest.raises(ValueError, match="min_width"):
        C.random_depth_intervals(target, min_width=0.0)
    with pytest.raises(ValueError, match="min_width"):
        C.random_depth_intervals(target, min_width=1.5)
    with pytest.raises(ValueError, match="min_size"):
        C.random_crops(target, min_size=0.6, max_size=0.5)
    with pytest.raises(ValueError, match="labels"):
        C.from_labels(torch.rand(2, 8, 8))
    with pytest.raises(ValueError, match="labels"):
        C.from_labels([])


# --- hard data: finite, correct answers ---------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("name", LOSS_NAMES)
def test_image_without_valid_pixels_inside_a_batch_gives_a_finite_loss(name, dtype):
    pred, target = _inputs((3, 1, 8, 8), dtype)
    target[1] = NAN
    mask = torch.ones(3, 1, 8, 8, dtype=torch.bool)
    mask[2] = False
    p = pred.clone().requires_grad_(True)
    loss = _call(name, p, target, mask)
    loss.backward()
    assert torch.isfinite(loss) and loss > 0
    assert torch.isfinite(p.grad).all()
    assert (p.grad[1:] == 0).all()  # the empty images get no gradient
    keep = _call(name, pred[:1].float(), target[:1].float())
    torch.testing.assert_close(loss.float(), keep, rtol=1e-5, atol=0)  # same as image 0 alone


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_batch_without_valid_pixels_gives_zero_loss_and_zero_gradient(name):
    pred, target = _inputs()
    for target_, mask in [
        (torch.full_like(target, NAN), None),
        (target, torch.zeros_like(target, dtype=torch.bool)),
    ]:
        p = pred.clone().requires_grad_(True)
        loss = _call(name, p, target_, mask)
        loss.backward()
        assert loss.item() == 0.0
        assert torch.equal(p.grad, torch.zeros_like(p))


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("context", ["dr", "dp"])
def test_constant_depth_is_in_no_depth_bin_and_gives_zero_loss(context, dtype):
    # Every pixel equals the maximum: in no DR/DP bin (docs/semantics.md §3), loss 0, finite gradient.
    pred, _ = _inputs(dtype=dtype)
    target = torch.full_like(pred, 3.0)
    p = pred.clone().requires_grad_(True)
    loss = hdn.hdn_loss(p, target, context=context, levels=3)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(p.grad, torch.zeros_like(p))


@pytest.mark.parametrize("name", ["ssi_loss", "hdn_loss_ds", "SSILoss"])
def test_constant_depth_gives_the_mean_absolute_normalised_prediction(name):
    # The target normalises to 0, so the loss is mean |p_hat| (finite, no 0 / 0).
    pred, _ = _inputs(dtype=torch.float64)
    target = torch.full_like(pred, 3.0)
    p = pred.clone().requires_grad_(True)
    loss = _call(name, p, target)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(p.grad).all()
    if name != "hdn_loss_ds":
        expected = ref.ssi_loss(pred[:, 0], target[:, 0])
        torch.testing.assert_close(loss, expected, rtol=1e-6, atol=0)
        p_hat = torch.stack(
            [ref.normalize(pred[b, 0], torch.ones(8, 8, dtype=torch.bool)) for b in range(2)]
        )
        torch.testing.assert_close(loss, p_hat.abs().mean(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("name", LOSS_NAMES)
def test_nan_and_inf_in_target_are_invalid_pixels(name, dtype):
    pred, target = _inputs(dtype=dtype)
    target[0, 0, 0, :3] = NAN
    target[0, 0, 5, 5] = INF
    target[1, 0, 2, :] = -INF
    p = pred.clone().requires_grad_(True)
    loss = _call(name, p, target)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(p.grad).all()
    finite = torch.isfinite(target)
    assert (p.grad[~finite] == 0).all()
    clean = torch.where(finite, target, torch.ones((), dtype=dtype))
    same = _call(name, pred, clean, finite)  # same as masking them out explicitly
    torch.testing.assert_close(loss, same, rtol=0, atol=0)


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_prediction_at_invalid_pixels_does_not_matter_even_if_not_finite(name):
    pred, target = _inputs()
    mask = torch.ones_like(target, dtype=torch.bool)
    mask[0, 0, 0, :2] = False
    target[1, 0, 3, 3] = NAN
    bad = pred.clone()
    bad[0, 0, 0, 0], bad[0, 0, 0, 1], bad[1, 0, 3, 3] = NAN, INF, -INF
    p = bad.clone().requires_grad_(True)
    loss = _call(name, p, target, mask)
    loss.backward()
    torch.testing.assert_close(loss, _call(name, pred, target, mask), rtol=0, atol=0)
    assert torch.isfinite(p.grad).all()


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_float16_depths_give_a_finite_loss_close_to_float32(name):
    # Depths up to 60000 (near the float16 maximum 65504) and a prediction in metres.
    gen = torch.Generator().manual_seed(1)
    target = (1 + 60000 * torch.rand(2, 1, 16, 16, generator=gen)).half()
    pred = (0.01 * torch.randn(2, 1, 16, 16, generator=gen)).half()
    p = pred.clone().requires_grad_(True)
    loss = _call(name, p, target)
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert p.grad.dtype == torch.float16 and torch.isfinite(p.grad).all()
    torch.testing.assert_close(loss, _call(name, pred.float(), target.float()), rtol=1e-5, atol=0)


def test_extreme_but_finite_float64_depths_give_finite_losses():
    gen = torch.Generator().manual_seed(2)
    for scale in (1e-300, 1e-30, 1e30, 1e300):
        target = scale * (1 + torch.rand(2, 9, 9, generator=gen, dtype=torch.float64))
        pred = torch.randn(2, 9, 9, generator=gen, dtype=torch.float64)
        for name in ("dr", "dp", "ds"):
            loss = hdn.hdn_loss(pred, target, context=name, levels=3)
            assert torch.isfinite(loss)
