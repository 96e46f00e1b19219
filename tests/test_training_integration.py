"""The losses inside real training code: torch.compile, autocast, half precision,
non-contiguous and channels-last inputs, and the contexts' space (depth or disparity).

``torch.compile`` may break the graph at the loss (its cores are autograd Functions that
select medians in NumPy); it must not fail, and the compiled step must compute what the
eager one does. The backend is ``aot_eager``: it runs dynamo and AOTAutograd, the parts
that meet the loss, in a few seconds; inductor also works on the CPU (a C++ compiler is
needed) and is tested once, at the smallest size, since its C++ compilation alone takes
tens of seconds on two cores.
"""

from __future__ import annotations

import shutil

import pytest
import torch
from torch import nn

import hdn
from hdn import contexts as C

LOSSES = {
    "dr": lambda p, g, m, **kw: hdn.hdn_loss(p, g, m, context="dr", levels=3, **kw),
    "dp": lambda p, g, m, **kw: hdn.hdn_loss(p, g, m, context="dp", levels=3, **kw),
    "ds": lambda p, g, m, **kw: hdn.hdn_loss(p, g, m, context="ds", levels=3, **kw),
    "ssi": hdn.ssi_loss,
    "crops": lambda p, g, m, **kw: hdn.hdn_loss(
        p, g, m, context=C.random_crops(g, m, num=4, generator=torch.Generator().manual_seed(0)), **kw
    ),
    "gm": hdn.gradient_matching_loss,
}
REDUCTIONS = ("mean", "sum", "per_image", "none")


def _batch(shape=(2, 1, 16, 16), seed=0):
    gen = torch.Generator().manual_seed(seed)
    rgb = torch.rand(shape[0], 3, *shape[2:], generator=gen)
    target = 1 + 4 * torch.rand(shape, generator=gen)
    mask = torch.rand(shape, generator=gen) > 0.3  # sparse ground truth (LiDAR-like)
    return rgb, target, mask


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 1, 1))


def _step_grads(model, loss_fn, rgb, target, mask, compiled_backend=None):
    def step(x, g, m):
        return loss_fn(model(x), g, m)

    run = torch.compile(step, backend=compiled_backend) if compiled_backend else step
    model.zero_grad()
    loss = run(rgb, target, mask)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("name", ["dr", "dp", "ds", "ssi", "crops", "gm"])
def test_torch_compile_of_a_training_step_matches_eager(name):
    torch._dynamo.reset()
    model = _model()
    rgb, target, mask = _batch()
    eager = _step_grads(model, LOSSES[name], rgb, target, mask)
    compiled = _step_grads(model, LOSSES[name], rgb, target, mask, compiled_backend="aot_eager")
    torch.testing.assert_close(compiled[0], eager[0], rtol=1e-5, atol=1e-6)
    for a, b in zip(compiled[1], eager[1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("reduction", ["per_image", "none"])
def test_torch_compile_of_the_non_scalar_reductions_matches_eager(reduction):
    torch._dynamo.reset()
    model = _model()
    rgb, target, mask = _batch()
    weights = torch.rand(2) if reduction == "per_image" else torch.rand(2, 1, 16, 16)

    def fn(p, g, m):
        return (hdn.hdn_loss(p, g, m, context="dp", reduction=reduction) * weights).sum()

    eager = _step_grads(model, fn, rgb, target, mask)
    compiled = _step_grads(model, fn, rgb, target, mask, compiled_backend="aot_eager")
    torch.testing.assert_close(compiled[0], eager[0], rtol=1e-5, atol=1e-6)
    for a, b in zip(compiled[1], eager[1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None, reason="inductor needs a C++ compiler")
def test_torch_compile_with_inductor_on_the_cpu_matches_eager():
    torch._dynamo.reset()
    model = _model()
    rgb, target, mask = _batch((1, 1, 8, 8))
    eager = _step_grads(model, LOSSES["dr"], rgb, target, mask)
    compiled = _step_grads(model, LOSSES["dr"], rgb, target, mask, compiled_backend="inductor")
    torch.testing.assert_close(compiled[0], eager[0], rtol=1e-4, atol=1e-6)
    for a, b in zip(compiled[1], eager[1]):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_bfloat16_autocast_gives_a_finite_float32_loss_and_gradients_of_the_parameters_dtype(name):
    model = _model()
    rgb, target, mask = _batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        pred = model(rgb)
        assert pred.dtype == torch.bfloat16
        pred.retain_grad()
        loss = LOSSES[name](pred, target, mask)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert pred.grad.dtype == torch.bfloat16 and torch.isfinite(pred.grad).all()
    assert float(pred.grad.abs().sum()) > 0
    for p in model.parameters():
        assert p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", sorted(LOSSES))
def test_half_inputs_give_finite_losses_and_gradients_of_their_dtype(name, dtype, reduction):
    _, target, mask = _batch()
    pred = (torch.rand(target.shape, generator=torch.Generator().manual_seed(1)) + 0.5).to(dtype).requires_grad_(True)
    g = target.to(dtype).requires_grad_(True)
    out = LOSSES[name](pred, g, mask, reduction=reduction)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    full = LOSSES[name](pred.detach().float(), g.detach().float(), mask, reduction=reduction)
    torch.testing.assert_close(out, full, rtol=1e-5, atol=1e-6)  # statistics in float32
    out.sum().backward()
    for x in (pred, g):
        assert x.grad.dtype == dtype and torch.isfinite(x.grad).all()


def _layouts(target):
    """The same values as a non-contiguous slice, a transposed view and a channels-last tensor."""
    return {
        "channel_slice_of_channels_last": lambda x: torch.cat([x, x, x], 1).to(memory_format=torch.channels_last)[:, :1],
        "transposed": lambda x: x.transpose(-1, -2).contiguous().transpose(-1, -2),
        "channels_last": lambda x: x.contiguous(memory_format=torch.channels_last),
        "strided": lambda x: torch.repeat_interleave(x, 2, dim=-1)[..., ::2],
    }


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("layout", ["channel_slice_of_channels_last", "transposed", "channels_last", "strided"])
@pytest.mark.parametrize("name", sorted(LOSSES))
def test_non_contiguous_and_channels_last_inputs_give_the_contiguous_result(name, layout, reduction):
    _, target, mask = _batch((2, 1, 12, 10))
    pred = torch.rand(target.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    target = target.double()
    make = _layouts(target)[layout]
    results = []
    for arrange in (lambda x: x, make):
        p, g = arrange(pred).requires_grad_(True), arrange(target).requires_grad_(True)
        m = arrange(mask)
        if arrange is make:
            assert not (p.is_contiguous() and g.is_contiguous()) or layout == "channels_last"
        out = LOSSES[name](p, g, m, reduction=reduction)
        weight = torch.rand(out.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
        gp, gg = torch.autograd.grad((out * weight).sum(), [p, g])
        results.append((out.detach(), gp, gg))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


# --- depth or disparity ----------------------------------------------------------------


def test_dr_contexts_follow_the_targets_space_disparity_bins_differ_from_depth_bins():
    depth = torch.linspace(1, 10, 64).view(1, 1, 8, 8)
    in_depth = C.depth_range(depth, levels=2).level_masks(1)
    in_disparity = C.depth_range(1 / depth, levels=2).level_masks(1)
    # depth bins split [1, 10] at 5.5; disparity bins split [0.1, 1] at 0.55, i.e. depth 1.82
    assert int(in_depth[0].sum()) == 32
    assert int(in_disparity[0].sum()) != int(in_depth[0].sum())
    near_in_disparity = (1 / depth).view(-1)[in_disparity[1].view(-1)]
    assert float(near_in_disparity.min()) >= 0.55


def test_a_disparity_target_is_a_loss_in_disparity_and_zero_for_an_affine_disparity_prediction():
    _, depth, mask = _batch()
    disparity = torch.where(mask, 1 / depth, float("nan"))  # invalid pixels: non-finite
    assert float(hdn.hdn_loss(3 * disparity + 0.2, disparity, context="dr")) < 1e-4
    # an affine copy of depth is not affine in disparity: not zero
    assert float(hdn.hdn_loss(depth, disparity, context="dr")) > 0.05
