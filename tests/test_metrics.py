"""Tests for hdn.metrics: AbsRel, delta accuracy, RMSE, zero-shot protocol, fine detail."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from hdn.metrics import abs_rel, delta_accuracy, fine_detail_error, rmse, zero_shot_metrics

NAN = float("nan")
INF = float("inf")


def _img(values, dtype=torch.float32):
    """A (1, 1, 1, N) tensor from a list of values."""
    return torch.tensor(values, dtype=dtype).reshape(1, 1, 1, -1)


# --- metrics on already aligned depth -------------------------------------------------


def test_abs_rel_delta_rmse_on_hand_computed_example():
    d, d_hat = _img([1.0, 2.0, 4.0]), _img([1.0, 3.0, 4.0])
    # |3 - 2| / 2 = 0.5 on the middle pixel only.
    assert abs_rel(d_hat, d).item() == pytest.approx((0.0 + 0.5 + 0.0) / 3)
    # 3 / 2 = 1.5 > 1.25 fails delta1; 1.5 < 1.25^2 = 1.5625 passes delta2.
    assert delta_accuracy(d_hat, d, k=1).item() == pytest.approx(2 / 3)
    assert delta_accuracy(d_hat, d, k=2).item() == 1.0
    assert delta_accuracy(d_hat, d, k=3).item() == 1.0
    assert rmse(d_hat, d).item() == pytest.approx(math.sqrt(1 / 3))


def test_delta_uses_the_larger_of_the_two_ratios():
    # d_hat / d = 0.5 -> max ratio 2: fails delta1 (1.25), delta2 (1.5625), delta3 (1.953).
    d, d_hat = _img([2.0, 1.0]), _img([1.0, 1.0])
    assert delta_accuracy(d_hat, d, k=1).item() == 0.5
    assert delta_accuracy(d_hat, d, k=3).item() == 0.5


def test_delta_counts_non_positive_prediction_as_a_miss():
    d, d_hat = _img([1.0, 1.0, 1.0]), _img([1.0, 0.0, -1.0])
    assert delta_accuracy(d_hat, d, k=3).item() == pytest.approx(1 / 3)


def test_metrics_pool_all_valid_pixels_of_the_batch():
    # Image 0: errors 0, 0.5, 0 (3 valid); image 1: one valid pixel with AbsRel 1.
    d = torch.tensor([[[1.0, 2.0, 4.0]], [[1.0, 1.0, 1.0]]])
    d_hat = torch.tensor([[[1.0, 3.0, 4.0]], [[2.0, 7.0, 7.0]]])
    mask = torch.tensor([[[True, True, True]], [[True, False, False]]])
    # Pooled: (0 + 0.5 + 0 + 1) / 4, not the mean of per-image means (1/6 + 1) / 2.
    assert abs_rel(d_hat, d, mask).item() == pytest.approx(1.5 / 4)
    assert delta_accuracy(d_hat, d, mask).item() == pytest.approx(2 / 4)
    assert rmse(d_hat, d, mask).item() == pytest.approx(math.sqrt((1.0 + 1.0) / 4))


def test_metrics_ignore_non_finite_and_non_positive_targets():
    d = _img([1.0, NAN, 2.0, INF, 0.0, -3.0, 4.0])
    d_hat = _img([1.0, 5.0, 3.0, 5.0, 5.0, 5.0, 4.0])
    assert abs_rel(d_hat, d).item() == pytest.approx(0.5 / 3)
    assert delta_accuracy(d_hat, d).item() == pytest.approx(2 / 3)
    assert rmse(d_hat, d).item() == pytest.approx(math.sqrt(1 / 3))


def test_metrics_are_nan_when_no_pixel_is_valid():
    d, d_hat = _img([1.0, 2.0]), _img([1.0, 2.0])
    mask = torch.zeros_like(d, dtype=torch.bool)
    assert math.isnan(abs_rel(d_hat, d, mask).item())
    assert math.isnan(delta_accuracy(d_hat, d, mask).item())
    assert math.isnan(rmse(d_hat, d, mask).item())


def test_abs_rel_and_rmse_have_finite_gradients_with_invalid_pixels():
    d = _img([1.0, NAN, 2.0, 0.0])
    d_hat = _img([1.5, NAN, 3.0, 2.0]).requires_grad_()
    (abs_rel(d_hat, d) + rmse(d_hat, d)).backward()
    assert torch.isfinite(d_hat.grad).all()
    assert d_hat.grad.flatten()[1].item() == 0.0


def test_delta_accuracy_rejects_non_positive_k():
    with pytest.raises(ValueError, match="k"):
        delta_accuracy(_img([1.0]), _img([1.0]), k=0)


# --- zero-shot protocol -----------------------------------------------------------------


def test_zero_shot_in_depth_space_matches_hand_computed_alignment():
    # p = [0, 1, 2, 3], d = [1, 2, 2, 3]: mean p = 1.5, mean d = 2, cov = 3, var = 5
    # -> s = 0.6, t = 1.1, d_hat = [1.1, 1.7, 2.3, 2.9].
    metrics = zero_shot_metrics(
        _img([0.0, 1.0, 2.0, 3.0]), _img([1.0, 2.0, 2.0, 3.0]), space="depth"
    )
    assert set(metrics) == {"abs_rel", "delta1", "delta2", "delta3", "rmse"}
    assert all(isinstance(v, float) for v in metrics.values())
    assert metrics["abs_rel"] == pytest.approx((0.1 / 1 + 0.3 / 2 + 0.3 / 2 + 0.1 / 3) / 4)
    # Ratios 1.1, 1.176, 1.15, 1.034 are all below 1.25.
    assert metrics["delta1"] == metrics["delta2"] == metrics["delta3"] == 1.0
    assert metrics["rmse"] == pytest.approx(math.sqrt((0.01 + 0.09 + 0.09 + 0.01) / 4))


def test_zero_shot_in_inverse_depth_space_aligns_to_inverse_target():
    # Same numbers in inverse depth: the aligned inverse depth is [1.1, 1.7, 2.3, 2.9].
    inverse_d = [1.0, 2.0, 2.0, 3.0]
    d = _img([1.0 / x for x in inverse_d])
    metrics = zero_shot_metrics(_img([0.0, 1.0, 2.0, 3.0]), d, space="inverse_depth")
    inverse_hat = [1.1, 1.7, 2.3, 2.9]
    # |1/ih - 1/ig| / (1/ig) = |ig / ih - 1|
    expected = sum(abs(g / h - 1.0) for g, h in zip(inverse_d, inverse_hat)) / 4
    assert metrics["abs_rel"] == pytest.approx(expected, rel=1e-5)
    expected_rmse = math.sqrt(sum((1 / h - 1 / g) ** 2 for g, h in zip(inverse_d, inverse_hat)) / 4)
    assert metrics["rmse"] == pytest.approx(expected_rmse, rel=1e-5)


def test_zero_shot_inverse_depth_clamps_negative_aligned_inverse_depth():
    # Inverse targets [0.01, 0.01, 0.01, 3]: the fit is s = 0.897, t = -0.588, negative
    # at p = 0, so that pixel's aligned inverse depth is clamped before inversion.
    pred = _img([0.0, 1.0, 2.0, 3.0])
    d = _img([100.0, 100.0, 100.0, 1.0 / 3.0])
    default = zero_shot_metrics(pred, d, space="inverse_depth")
    assert all(math.isfinite(v) for v in default.values())
    capped = zero_shot_metrics(pred, d, space="inverse_depth", depth_cap=10.0)
    s, t = 4.485 / 5.0, 0.7575 - 1.5 * 4.485 / 5.0
    d_hat = [10.0] + [1.0 / (s * p + t) for p in (1.0, 2.0, 3.0)]
    d_ref = [100.0, 100.0, 100.0, 1.0 / 3.0]
    expected = sum(abs(h - g) / g for h, g in zip(d_hat, d_ref)) / 4
    assert capped["abs_rel"] == pytest.approx(expected, rel=1e-4)


def test_zero_shot_requires_an_explicit_space():
    with pytest.raises(ValueError, match="space"):
        zero_shot_metrics(_img([1.0, 2.0]), _img([1.0, 2.0]))


def test_zero_shot_rejects_an_unknown_space():
    with pytest.raises(ValueError, match="space"):
        zero_shot_metrics(_img([1.0, 2.0]), _img([1.0, 2.0]), space="disparity")


def test_zero_shot_rejects_a_non_positive_depth_cap():
    with pytest.raises(ValueError, match="depth_cap"):
        zero_shot_metrics(_img([1.0, 2.0]), _img([1.0, 2.0]), space="inverse_depth", depth_cap=0)


def test_zero_shot_rejects_mismatched_shapes_naming_target():
    with pytest.raises(ValueError, match="target"):
        zero_shot_metrics(torch.rand(1, 4, 4), torch.rand(1, 4, 5), space="depth")


def test_zero_shot_rejects_non_bool_mask_naming_mask():
    with pytest.raises(ValueError, match="mask"):
        zero_shot_metrics(
            torch.rand(1, 4, 4), torch.rand(1, 4, 4), torch.ones(1, 4, 4), space="depth"
        )


def test_zero_shot_ignores_masked_outlier_and_non_finite_target():
    d = _img([1.0, 2.0, 4.0, 8.0, 3.0, NAN])
    pred = _img([3.0, 5.0, 9.0, 17.0, 500.0, 1.0])  # 2 d + 1, except the two last pixels
    mask = _img([1, 1, 1, 1, 0, 1], dtype=torch.bool)
    metrics = zero_shot_metrics(pred, d, mask, space="depth")
    assert metrics["abs_rel"] == pytest.approx(0.0, abs=1e-6)
    assert metrics["delta1"] == 1.0


def test_zero_shot_image_without_valid_pixel_does_not_spoil_the_batch():
    d = torch.tensor([[[1.0, 2.0, 4.0]], [[1.0, 2.0, 4.0]]])
    pred = 2.0 * d + 1.0
    mask = torch.tensor([[[True, True, True]], [[False, False, False]]])
    metrics = zero_shot_metrics(pred, d, mask, space="depth")
    assert metrics["abs_rel"] == pytest.approx(0.0, abs=1e-6)
    assert metrics["rmse"] == pytest.approx(0.0, abs=1e-5)


def test_zero_shot_bhw_and_b1hw_inputs_agree():
    gen = torch.Generator().manual_seed(0)
    d = 1.0 + 9.0 * torch.rand(2, 1, 5, 7, generator=gen)
    pred = d + torch.rand(2, 1, 5, 7, generator=gen)
    for space in ("depth", "inverse_depth"):
        assert zero_shot_metrics(pred, d, space=space) == zero_shot_metrics(
            pred[:, 0], d[:, 0], space=space
        )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_zero_shot_accepts_all_float_dtypes(dtype):
    d = torch.tensor([[[1.0, 2.0, 4.0, 8.0]]], dtype=dtype)
    metrics = zero_shot_metrics(3.0 * d + 1.0, d, space="depth")
    assert metrics["abs_rel"] == pytest.approx(0.0, abs=1e-3)
    assert metrics["delta1"] == 1.0


_depths = st.lists(
    st.floats(min_value=0.1, max_value=100.0, allow_nan=False), min_size=2, max_size=40
)


@settings(max_examples=100, deadline=None)
@given(
    g=_depths,
    a=st.floats(min_value=1e-2, max_value=1e2),
    b=st.floats(min_value=-100.0, max_value=100.0),
)
def test_zero_shot_of_an_affine_copy_has_zero_error(g, a, b):
    d = torch.tensor(g, dtype=torch.float64).reshape(1, 1, -1)
    assume(float(d.max() - d.min()) > 1e-3 * float(d.max()))
    depth = zero_shot_metrics(a * d + b, d, space="depth")
    assert depth["abs_rel"] == pytest.approx(0.0, abs=1e-6)
    assert depth["delta1"] == 1.0
    inverse = zero_shot_metrics(a / d + b, d, space="inverse_depth")
    assert inverse["abs_rel"] == pytest.approx(0.0, abs=1e-6)
    assert inverse["delta1"] == 1.0


# --- fine-detail error ----------------------------------------------------------------


def _scene():
    """A near object with a depth edge (1.0 | 1.4) in front of a far wall (5-9.5)."""
    near = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.4, 1.4, 1.4, 1.4])
    far = torch.linspace(5.0, 9.5, 24)
    return torch.cat([near, far]).reshape(1, 4, 8)


def test_fine_detail_error_is_zero_for_exact_near_relief_and_wrong_far_range():
    d = _scene()  # 32 valid pixels, nearest quarter = the 8 near-object pixels
    pred = d.clone()
    pred[:, 1:] = torch.rand(1, 3, 8, generator=torch.Generator().manual_seed(0)) * 50.0
    pred = 0.5 * pred + 2.0  # any scale and shift
    assert fine_detail_error(pred, d).item() == pytest.approx(0.0, abs=1e-6)
    # The image-level protocol, by contrast, is spoiled by the far range.
    assert zero_shot_metrics(pred, d, space="depth")["abs_rel"] > 0.1


def test_fine_detail_error_is_positive_for_blurred_near_relief():
    d = _scene()
    blurred = d.clone()
    near = blurred[0, 0]
    # A 3-tap box blur of the near edge (border pixels replicated).
    padded = torch.cat([near[:1], near, near[-1:]])
    blurred[0, 0] = (padded[:-2] + padded[1:-1] + padded[2:]) / 3.0
    exact = fine_detail_error(d, d).item()
    blur = fine_detail_error(blurred, d).item()
    assert exact == pytest.approx(0.0, abs=1e-6)
    assert blur > 0.01
    flat = d.clone()
    flat[0, 0] = near.mean()
    assert fine_detail_error(flat, d).item() > blur


def test_fine_detail_near_region_has_ceil_fraction_of_valid_pixels():
    # 10 valid pixels: near_fraction 0.25 -> ceil(2.5) = 3 nearest pixels.
    d = _img([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0])
    pred = _img([1.0, 2.0, 3.0, 9.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0])  # wrong 4th nearest
    assert fine_detail_error(pred, d, near_fraction=0.25).item() == pytest.approx(0.0, abs=1e-6)
    assert fine_detail_error(pred, d, near_fraction=0.4).item() > 0.1


def test_fine_detail_error_averages_images_with_at_least_two_near_pixels():
    # Image 0: d = [1, 2, 3, 4], pred = [0, 1, 1, 0]; near_fraction 0.75 -> the 3
    # nearest d = [1, 2, 3] with p = [0, 1, 1]: mean p = 2/3, mean d = 2, cov = 1,
    # var = 2/3 -> s = 1.5, t = 1, d_hat = [1, 2.5, 2.5]: AbsRel (0 + 0.25 + 1/6) / 3.
    # Image 1: only one valid pixel -> excluded from the mean.
    d = torch.tensor([[[1.0, 2.0, 3.0, 4.0]], [[1.0, 2.0, 3.0, 4.0]]])
    pred = torch.tensor([[[0.0, 1.0, 1.0, 0.0]], [[5.0, 1.0, 1.0, 1.0]]])
    mask = torch.tensor([[[True] * 4], [[True, False, False, False]]])
    value = fine_detail_error(pred, d, mask, near_fraction=0.75).item()
    assert value == pytest.approx((0.0 + 0.25 + 1.0 / 6.0) / 3.0)


def test_fine_detail_error_is_nan_when_no_image_has_two_near_pixels():
    d, pred = _img([1.0, 2.0, 3.0, 4.0]), _img([1.0, 2.0, 3.0, 4.0])
    assert math.isnan(fine_detail_error(pred, d, near_fraction=0.25).item())


def test_fine_detail_error_in_inverse_depth_space():
    d = _scene()
    pred = 3.0 / d + 0.2
    pred[:, 1:] = 7.0  # wrong far range
    assert fine_detail_error(pred, d, space="inverse_depth").item() == pytest.approx(0.0, abs=1e-5)


def test_fine_detail_error_has_finite_gradient():
    d = _scene()
    d[0, 3, 7] = NAN
    pred = (d.nan_to_num(1.0) + 0.1 * torch.rand(1, 4, 8)).requires_grad_()
    fine_detail_error(pred, d).backward()
    assert torch.isfinite(pred.grad).all()
    assert pred.grad.abs().sum() > 0


def test_fine_detail_error_bhw_and_b1hw_inputs_agree():
    d = _scene()
    pred = d + 0.1 * torch.rand(1, 4, 8, generator=torch.Generator().manual_seed(1))
    assert torch.equal(fine_detail_error(pred, d), fine_detail_error(pred[:, None], d[:, None]))


@pytest.mark.parametrize("near_fraction", [0.0, -0.1, 1.5])
def test_fine_detail_error_rejects_bad_near_fraction(near_fraction):
    d = _scene()
    with pytest.raises(ValueError, match="near_fraction"):
        fine_detail_error(d, d, near_fraction=near_fraction)


def test_fine_detail_error_rejects_unknown_space():
    d = _scene()
    with pytest.raises(ValueError, match="space"):
        fine_detail_error(d, d, space="log_depth")
