"""The nn.Module wrappers, and gradient matching against the slow reference."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from torch import nn

import hdn
from hdn import reference as ref

F64 = torch.float64
NAN = float("nan")


def _inputs(shape=(2, 1, 12, 10), dtype=F64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    pred = torch.randn(shape, generator=gen, dtype=dtype)
    target = 0.5 + 3 * torch.rand(shape, generator=gen, dtype=dtype)
    mask = torch.rand(shape, generator=gen, dtype=dtype) > 0.2
    target.view(-1)[::11] = NAN
    return pred, target, mask


def _loss_and_grads(fn, pred, target, *args, **kwargs):
    p = pred.detach().clone().requires_grad_(True)
    g = target.detach().clone().requires_grad_(True)
    loss = fn(p, g, *args, **kwargs)
    if not loss.requires_grad:  # the reference's sum over no terms is a constant
        return loss.detach(), torch.zeros_like(p), torch.zeros_like(g)
    gp, gg = torch.autograd.grad(loss, [p, g], allow_unused=True)
    gp = torch.zeros_like(p) if gp is None else gp
    gg = torch.zeros_like(g) if gg is None else gg
    return loss.detach(), gp, gg


def _assert_close(actual, expected, rtol=1e-6):
    floor = float(expected.abs().max()) if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * floor + 1e-15)


MODULE_CASES = [
    ("SSILoss()", hdn.SSILoss(), hdn.ssi_loss, {}),
    ("HDNLoss()", hdn.HDNLoss(), hdn.hdn_loss, {}),
    ("HDNLoss(dr, 2)", hdn.HDNLoss("dr", 2), hdn.hdn_loss, {"context": "dr", "levels": 2}),
    ("HDNLoss(dp, 4)", hdn.HDNLoss("dp", 4), hdn.hdn_loss, {"context": "dp", "levels": 4}),
    (
        "HDNLoss(ds, 3)",
        hdn.HDNLoss(context="ds", levels=3),
        hdn.hdn_loss,
        {"context": "ds", "levels": 3},
    ),
    ("GradientMatchingLoss()", hdn.GradientMatchingLoss(), hdn.gradient_matching_loss, {}),
    (
        "GradientMatchingLoss(2)",
        hdn.GradientMatchingLoss(scales=2),
        hdn.gradient_matching_loss,
        {"scales": 2},
    ),
]


@pytest.mark.parametrize(
    ("label", "module", "function", "options"), MODULE_CASES, ids=[c[0] for c in MODULE_CASES]
)
@pytest.mark.parametrize("use_mask", [False, True])
def test_module_equals_its_functional_form(label, module, function, options, use_mask):
    pred, target, mask = _inputs()
    m = mask if use_mask else None
    got = _loss_and_grads(module, pred, target, m)
    want = _loss_and_grads(function, pred, target, m, **options)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("label", "module", "function", "options"), MODULE_CASES, ids=[c[0] for c in MODULE_CASES]
)
def test_modules_are_parameter_free_nn_modules(label, module, function, options):
    assert isinstance(module, nn.Module)
    assert list(module.parameters()) == [] and module.state_dict() == {}
    clone = copy.deepcopy(module).to(torch.float32).train(False)
    pred, target, _ = _inputs(dtype=torch.float32)
    torch.testing.assert_close(clone(pred, target), module(pred, target), rtol=0, atol=0)


def test_hdn_loss_repr_shows_its_options():
    assert repr(hdn.HDNLoss(context="ds", levels=2)) == "HDNLoss(context='ds', levels=2)"
    assert repr(hdn.HDNLoss()) == "HDNLoss(context='dr', levels=3)"
    assert "context='dp'" in repr(nn.ModuleList([hdn.HDNLoss("dp", 5)]))


def _toy_problem():
    """Depth = 2 * channel 0 + 1; channel 1 is noise the initial 1x1 conv leaks in.

    An affine map of the input recovers the depth exactly, so every SSI/HDN loss can
    reach ~0; the gradient must shrink the noise weight."""
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(4, 2, 16, 16, generator=gen)
    target = 2 * x[:, :1] + 1
    model = nn.Conv2d(2, 1, kernel_size=1)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[[[1.0]], [[0.8]]]]))
        model.bias.fill_(0.3)
    return model, x, target


@pytest.mark.parametrize(
    "criterion",
    [
        hdn.SSILoss(),
        hdn.HDNLoss("dr"),
        hdn.HDNLoss("dp"),
        hdn.HDNLoss("ds"),
        hdn.GradientMatchingLoss(),
    ],
    ids=repr,
)
def test_one_optimizer_step_decreases_the_loss_on_an_affine_recoverable_problem(criterion):
    model, x, target = _toy_problem()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    losses = []
    for _ in range(2):
        optimizer.zero_grad()
        loss = criterion(model(x), target)
        loss.backward()
        assert model.weight.grad is not None and torch.isfinite(model.weight.grad).all()
        optimizer.step()
        losses.append(loss.item())
    assert losses[1] < losses[0]
    assert abs(model.weight[0, 1].item()) < 0.8  # the noise weight moved towards 0


def test_hdn_and_gradient_matching_losses_add_up_in_a_training_step():
    model, x, target = _toy_problem()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    criterion, extra = hdn.HDNLoss("dp", levels=2), hdn.GradientMatchingLoss(scales=2)
    losses = []
    for _ in range(8):
        optimizer.zero_grad()
        out = model(x)
        loss = criterion(out, target) + 0.5 * extra(out, target)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(b < a for a, b in itertools.pairwise(losses))
    assert losses[-1] < 0.75 * losses[0]


# --- gradient matching against the reference ---------------------------------------------


@pytest.mark.parametrize("scales", [1, 2, 3, 4])
@pytest.mark.parametrize(
    "shape", [(2, 7, 9), (1, 12, 10), (1, 1, 6), (2, 5, 1)], ids=lambda s: "x".join(map(str, s))
)
def test_gradient_matching_matches_reference_with_mask_and_nans(shape, scales):
    pred, target, mask = _inputs(shape, seed=scales)
    for m in (None, mask):
        got = _loss_and_grads(hdn.gradient_matching_loss, pred, target, m, scales=scales)
        want = _loss_and_grads(ref.gradient_matching_loss, pred, target, m, scales=scales)
        assert got[0].dtype == F64
        _assert_close(got[0], want[0])
        _assert_close(got[1], want[1])
        _assert_close(got[2], want[2])


def test_gradient_matching_is_zero_for_an_affine_map_of_the_target():
    _, target, mask = _inputs((2, 1, 16, 16), seed=9)
    pred = torch.where(torch.isfinite(target), 4 * target - 1, 0.0)
    assert hdn.gradient_matching_loss(pred, target, mask).item() < 1e-5


def test_gradient_matching_accepts_b1hw_and_bhw_alike():
    pred, target, mask = _inputs((2, 1, 9, 7), seed=3)
    four = hdn.gradient_matching_loss(pred, target, mask)
    three = hdn.gradient_matching_loss(pred[:, 0], target[:, 0], mask[:, 0])
    torch.testing.assert_close(four, three, rtol=0, atol=0)
