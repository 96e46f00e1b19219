"""Tests for hdn.alignment: per-image least-squares scale and shift (MiDaS)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from hdn.alignment import align_least_squares, compute_scale_and_shift


def _img(values, dtype=torch.float32):
    """A (1, 1, 1, N) tensor from a list of values."""
    return torch.tensor(values, dtype=dtype).reshape(1, 1, 1, -1)


def test_exact_line_gives_hand_computed_scale_and_shift():
    pred, target = _img([1.0, 2.0, 3.0]), _img([3.0, 5.0, 7.0])
    aligned, scale, shift = align_least_squares(pred, target)
    assert scale.tolist() == [2.0]
    assert shift.tolist() == [1.0]
    assert torch.equal(aligned, target)


def test_noisy_fit_matches_hand_computed_normal_equations():
    # p = [0, 1, 2], g = [0, 2, 1]: mean p = 1, mean g = 1, cov = 1, var = 2
    # -> s = 1/2, t = 1 - 1/2 = 1/2.
    scale, shift = compute_scale_and_shift(_img([0.0, 1.0, 2.0]), _img([0.0, 2.0, 1.0]))
    assert torch.allclose(scale, torch.tensor([0.5]))
    assert torch.allclose(shift, torch.tensor([0.5]))


def test_masked_out_outlier_does_not_move_the_fit():
    pred, target = _img([1.0, 2.0, 3.0, 4.0]), _img([3.0, 5.0, 7.0, 100.0])
    mask = _img([1, 1, 1, 0], dtype=torch.bool)
    aligned, scale, shift = align_least_squares(pred, target, mask)
    assert scale.tolist() == [2.0]
    assert shift.tolist() == [1.0]
    # The aligned map covers every pixel, masked ones included: 2 * 4 + 1.
    assert aligned.flatten().tolist() == [3.0, 5.0, 7.0, 9.0]


def test_fit_matches_torch_lstsq_reference_on_random_masked_batch():
    gen = torch.Generator().manual_seed(0)
    pred = torch.rand(3, 1, 5, 7, generator=gen, dtype=torch.float64)
    target = 3.0 * pred - 0.5 + 0.1 * torch.randn(3, 1, 5, 7, generator=gen, dtype=torch.float64)
    mask = torch.rand(3, 1, 5, 7, generator=gen) > 0.3
    scale, shift = compute_scale_and_shift(pred, target, mask)
    for b in range(3):
        p, g = pred[b][mask[b]], target[b][mask[b]]
        design = torch.stack([p, torch.ones_like(p)], dim=1)
        ref = torch.linalg.lstsq(design, g[:, None]).solution.flatten()
        assert torch.allclose(scale[b], ref[0], atol=1e-10)
        assert torch.allclose(shift[b], ref[1], atol=1e-10)


def test_constant_prediction_gives_zero_scale_and_mean_target_shift():
    aligned, scale, shift = align_least_squares(_img([2.0, 2.0, 2.0]), _img([1.0, 2.0, 6.0]))
    assert scale.tolist() == [0.0]
    assert shift.tolist() == [3.0]
    assert aligned.flatten().tolist() == [3.0, 3.0, 3.0]


def test_constant_prediction_with_inexact_mean_is_still_singular():
    # 0.1 is not representable: the float32 mean of 7 copies may differ from 0.1 by an
    # ulp, leaving a rounding-noise variance that must not be divided by.
    _, scale, shift = align_least_squares(
        torch.full((1, 1, 1, 7), 0.1), torch.arange(7.0).reshape(1, 1, 1, 7)
    )
    assert scale.tolist() == [0.0]
    assert torch.allclose(shift, torch.tensor([3.0]))


def test_single_valid_pixel_gives_zero_scale_and_its_target_as_shift():
    mask = _img([0, 1, 0], dtype=torch.bool)
    _, scale, shift = align_least_squares(_img([1.0, 2.0, 3.0]), _img([9.0, 4.0, 9.0]), mask)
    assert scale.tolist() == [0.0]
    assert shift.tolist() == [4.0]


def test_image_without_valid_pixel_gets_zero_and_leaves_other_images_alone():
    pred = torch.tensor([[[1.0, 2.0, 3.0]], [[1.0, 2.0, 3.0]]], requires_grad=True)
    target = torch.tensor([[[3.0, 5.0, 7.0]], [[1.0, 1.0, 1.0]]])
    mask = torch.tensor([[[True, True, True]], [[False, False, False]]])
    aligned, scale, shift = align_least_squares(pred, target, mask)
    assert scale.tolist() == [2.0, 0.0]
    assert shift.tolist() == [1.0, 0.0]
    assert torch.equal(aligned[1], torch.zeros(1, 3))
    aligned.sum().backward()
    assert torch.isfinite(pred.grad).all()


def test_non_finite_target_is_ignored_with_and_without_mask():
    pred = _img([1.0, 2.0, 3.0, 4.0, 5.0])
    target = _img([3.0, float("nan"), 7.0, float("inf"), 11.0])
    aligned, scale, shift = align_least_squares(pred, target)
    assert scale.tolist() == [2.0]
    assert shift.tolist() == [1.0]
    assert torch.isfinite(aligned).all()
    # A mask that keeps the non-finite pixels is intersected with isfinite(target).
    mask = torch.ones_like(pred, dtype=torch.bool)
    _, scale_m, shift_m = align_least_squares(pred, target, mask)
    assert scale_m.tolist() == [2.0]
    assert shift_m.tolist() == [1.0]


def test_gradient_is_finite_when_target_has_nan():
    pred = _img([1.0, 2.0, 3.0, 4.0]).requires_grad_()
    target = _img([3.0, float("nan"), 7.0, 8.0])
    aligned, _, _ = align_least_squares(pred, target)
    valid = torch.isfinite(target)
    ((aligned - target)[valid] ** 2).sum().backward()
    assert torch.isfinite(pred.grad).all()


def test_alignment_passes_gradcheck_in_float64():
    gen = torch.Generator().manual_seed(1)
    pred = torch.rand(2, 1, 3, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    target = torch.rand(2, 1, 3, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(2, 1, 3, 4, generator=gen) > 0.2
    assert torch.autograd.gradcheck(lambda p, g: align_least_squares(p, g, mask), (pred, target))


def test_bhw_and_b1hw_inputs_give_the_same_result():
    gen = torch.Generator().manual_seed(2)
    pred = torch.rand(2, 1, 4, 6, generator=gen)
    target = torch.rand(2, 1, 4, 6, generator=gen)
    mask = torch.rand(2, 1, 4, 6, generator=gen) > 0.5
    a4, s4, t4 = align_least_squares(pred, target, mask)
    a3, s3, t3 = align_least_squares(pred[:, 0], target[:, 0], mask[:, 0])
    assert a4.shape == (2, 1, 4, 6) and a3.shape == (2, 4, 6)
    assert torch.equal(a4[:, 0], a3) and torch.equal(s4, s3) and torch.equal(t4, t3)


def test_batched_result_equals_per_image_results_on_non_square_images():
    gen = torch.Generator().manual_seed(3)
    pred = torch.rand(4, 5, 3, generator=gen)
    target = 2.0 * pred + torch.rand(4, 5, 3, generator=gen)
    aligned, scale, shift = align_least_squares(pred, target)
    for b in range(4):
        ab, sb, tb = align_least_squares(pred[b : b + 1], target[b : b + 1])
        assert torch.allclose(aligned[b], ab[0])
        assert torch.allclose(scale[b], sb[0]) and torch.allclose(shift[b], tb[0])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_are_computed_in_float32_and_returned_in_input_dtype(dtype):
    pred, target = _img([1.0, 2.0, 3.0], dtype), _img([3.0, 5.0, 7.0], dtype)
    aligned, scale, shift = align_least_squares(pred, target)
    assert aligned.dtype == scale.dtype == shift.dtype == dtype
    assert scale.tolist() == [2.0] and shift.tolist() == [1.0]
    assert aligned.flatten().tolist() == [3.0, 5.0, 7.0]


def test_float64_inputs_are_computed_in_float64():
    # A 1e-9 relative slope on a 1e3 offset is lost in float32 but kept in float64.
    pred = _img([1000.0, 1000.0 + 1e-6, 1000.0 + 2e-6], torch.float64)
    target = _img([0.0, 1.0, 2.0], torch.float64)
    aligned, scale, _ = align_least_squares(pred, target)
    assert scale.dtype == torch.float64
    assert torch.allclose(scale, torch.tensor([1e6], dtype=torch.float64), rtol=1e-6)
    assert torch.allclose(aligned, target, atol=1e-6)


def test_shape_mismatch_raises_value_error_naming_target():
    with pytest.raises(ValueError, match="target"):
        align_least_squares(torch.rand(1, 1, 4, 4), torch.rand(1, 1, 4, 5))


def test_multi_channel_pred_raises_value_error_naming_pred():
    with pytest.raises(ValueError, match="pred"):
        align_least_squares(torch.rand(1, 3, 4, 4), torch.rand(1, 3, 4, 4))


def test_non_bool_mask_raises_value_error_naming_mask():
    with pytest.raises(ValueError, match="mask"):
        align_least_squares(torch.rand(1, 4, 4), torch.rand(1, 4, 4), torch.ones(1, 4, 4))


def test_mask_shape_mismatch_raises_value_error_naming_mask():
    mask = torch.ones(1, 4, 5, dtype=torch.bool)
    with pytest.raises(ValueError, match="mask"):
        compute_scale_and_shift(torch.rand(1, 4, 4), torch.rand(1, 4, 4), mask)


def test_integer_pred_raises_value_error_naming_pred():
    with pytest.raises(ValueError, match="pred"):
        align_least_squares(torch.ones(1, 4, 4, dtype=torch.int64), torch.rand(1, 4, 4))


_depths = st.lists(
    st.floats(min_value=0.1, max_value=100.0, allow_nan=False), min_size=2, max_size=40
)


@settings(max_examples=100, deadline=None)
@given(
    g=_depths,
    a=st.floats(min_value=1e-2, max_value=1e2),
    b=st.floats(min_value=-100.0, max_value=100.0),
)
def test_aligning_an_affine_copy_recovers_the_target(g, a, b):
    target = torch.tensor(g, dtype=torch.float64).reshape(1, 1, -1)
    assume(float(target.max() - target.min()) > 1e-3 * float(target.abs().max()))
    aligned, scale, _ = align_least_squares(a * target + b, target)
    assert torch.allclose(aligned, target, rtol=0.0, atol=1e-8 * (1.0 + abs(b)) * 100.0)
    assert torch.allclose(scale, torch.tensor([1.0 / a], dtype=torch.float64), rtol=1e-8)
    # And the other way round: the fit recovers a and b themselves.
    s, t = compute_scale_and_shift(target, a * target + b)
    assert torch.allclose(s, torch.tensor([a], dtype=torch.float64), rtol=1e-8)
    assert torch.allclose(t, torch.tensor([b], dtype=torch.float64), atol=1e-8 * (1 + abs(b)) * 100)
