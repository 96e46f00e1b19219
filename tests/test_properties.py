"""Property tests: the SSI and HDN losses are invariant to positive affine maps.

With ``x' = a x + b`` (``a > 0``) the median and scale map as ``t' = a t + b`` and
``s' = a s``, so ``x'_hat = (x - t) / (s + eps / a)``: the invariance is exact except for
the ``eps = 1e-6`` added to the scale. Its effect is bounded, per context ``C`` and
pixel ``i``, by ``|x_i - t_C| * |1 / (s_C + eps / a) - 1 / (s_C + eps)|`` and, by the
triangle inequality, on the loss by the same per-pixel mean and batch mean that the loss
itself takes (:func:`_eps_bound`). For well spread data this is ~1e-5 relative (it
exceeds 1e-4 for contexts with a tiny spread, e.g. two close depths alone in a bin); the
tests allow this bound plus 1e-9 for float64 rounding instead of a blanket tolerance.

Contexts: DS and SSI do not look at target values, DR and DP do. A positive affine map
of the target keeps every DR/DP bin in exact arithmetic, but the edges
``lo + (hi - lo) * i / 2**l`` and the interpolated quantiles are rounded, and a pixel
on an edge can change sides. The maximum pixel is the common case: ``lo + (hi - lo)``
rounds above ``hi`` for about 3% of random float64 ranges in [0, 10], and then the maximum is in the
last bin instead of in none, so the loss of continuous targets jumps under some maps. So for the target-side test of DR/DP, depths are multiples
of 1/16 in [1, 5], and ``a``, ``b`` multiples of 1/16 with ``a * 1 + b > 0``: then every
product, edge and quantile is computed exactly (small dyadic numbers), bins are
preserved exactly (asserted), and no edge lands on 0, where the released formula's
``+ 1e-30`` would make two bins overlap.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import hdn
from hdn import reference as ref

F64 = torch.float64
EPS = 1e-6
ROUNDING = 1e-9
LOSSES = ("ssi", "dr", "dp", "ds")
SETTINGS = settings(max_examples=25, deadline=None)


@st.composite
def _cases(draw, loss_name, dyadic_target=False):
    """(pred, target, mask, levels) in float64, small random shapes, DS levels valid."""
    B, H, W = draw(st.integers(1, 2)), draw(st.integers(2, 12)), draw(st.integers(2, 12))
    max_levels = 3 if loss_name != "ds" else min(3, int(math.log2(min(H, W))) + 1)
    levels = draw(st.integers(1, max_levels)) if loss_name != "ssi" else 1
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    pred = torch.randn(B, H, W, generator=gen, dtype=F64)
    kind = draw(st.sampled_from(["continuous", "ties", "dyadic"]))
    if dyadic_target or kind == "dyadic":
        target = 1 + torch.randint(0, 65, (B, H, W), generator=gen).to(F64) / 16
    else:
        target = 0.5 + 3 * torch.rand(B, H, W, generator=gen, dtype=F64)
        if kind == "ties":
            target = torch.round(target)
    mask = None
    if draw(st.booleans()):
        mask = torch.rand(B, H, W, generator=gen, dtype=F64) > 0.2
    return pred, target, mask, levels


def _loss(name, pred, target, mask, levels):
    if name == "ssi":
        return hdn.ssi_loss(pred, target, mask)
    return hdn.hdn_loss(pred, target, mask, context=name, levels=levels)


def _context_masks(name, target, valid, levels):
    if name == "ssi":
        return [valid]
    zeroed = torch.where(valid, target, 0.0)
    return [m & valid for m in ref.contexts_by_name(name, zeroed, valid, levels)]


def _eps_bound(x, masks, valid, a):
    """Bound on the change of the loss when ``x`` (pred or target side) is replaced by
    ``a x + b``: per context ``|x - t| * |1/(s + eps/a) - 1/(s + eps)|``, averaged per pixel
    over its contexts, summed, over the valid count (the loss's own aggregation)."""
    B = x.shape[0]
    acc, count = torch.zeros_like(x), torch.zeros_like(x)
    for m in masks:
        for b in range(B):
            c = m[b]
            n = int(c.sum())
            if n == 0:
                continue
            values = x[b][c]
            t = torch.median(values)
            s = (values - t).abs().sum() / (n + 1)
            change = (x[b] - t).abs() * abs(1 / (s + EPS / a) - 1 / (s + EPS))
            acc[b] += torch.where(c, change, 0.0)
            count[b] += c.to(F64)
    n_valid = int(valid.sum())
    return float((acc / count.clamp(min=1)).sum() / n_valid) if n_valid else 0.0


_scale = st.floats(0.1, 10.0, allow_nan=False)
_shift = st.floats(-5.0, 5.0, allow_nan=False)


@pytest.mark.parametrize("name", LOSSES)
@SETTINGS
@given(data=st.data(), a=_scale, b=_shift)
def test_positive_affine_map_of_pred_leaves_every_loss_unchanged(name, data, a, b):
    pred, target, mask, levels = data.draw(_cases(name))
    valid = torch.isfinite(target) if mask is None else mask
    base = float(_loss(name, pred, target, mask, levels))
    moved = float(_loss(name, a * pred + b, target, mask, levels))
    bound = _eps_bound(pred, _context_masks(name, target, valid, levels), valid, a)
    assert abs(moved - base) <= bound + ROUNDING * (1 + base)


@pytest.mark.parametrize("name", LOSSES)
@SETTINGS
@given(
    data=st.data(),
    a16=st.integers(2, 160),  # a = a16 / 16 in [0.125, 10]
    b16=st.integers(-80, 80),  # b = b16 / 16 in [-5, 5]
)
def test_positive_affine_map_of_target_leaves_every_loss_unchanged(name, data, a16, b16):
    pred, target, mask, levels = data.draw(_cases(name, dyadic_target=True))
    a, b = a16 / 16, max(b16, 1 - a16) / 16  # depths >= 1, so a * depth + b >= 1/16 > 0
    moved_target = a * target + b
    valid = torch.isfinite(target) if mask is None else mask
    masks = _context_masks(name, target, valid, levels)
    if name in ("dr", "dp"):  # exact arithmetic: the same bins (see the module docstring)
        moved_masks = _context_masks(name, moved_target, valid, levels)
        assert all(torch.equal(m, n) for m, n in zip(masks, moved_masks))
        ctx = hdn.contexts.build(name, target, mask, levels=levels)
        moved_ctx = hdn.contexts.build(name, moved_target, mask, levels=levels)
        assert torch.equal(ctx.to_masks(), moved_ctx.to_masks())
    base = float(_loss(name, pred, target, mask, levels))
    moved = float(_loss(name, pred, moved_target, mask, levels))
    bound = _eps_bound(target, masks, valid, a)
    assert abs(moved - base) <= bound + ROUNDING * (1 + base)


@pytest.mark.parametrize("name", ["ssi", "ds"])
@SETTINGS
@given(data=st.data(), a=_scale, b=_shift)
def test_continuous_affine_map_of_target_leaves_spatial_losses_unchanged(name, data, a, b):
    # SSI and DS contexts ignore target values, so any positive a, b will do.
    pred, target, mask, levels = data.draw(_cases(name))
    valid = torch.isfinite(target) if mask is None else mask
    base = float(_loss(name, pred, target, mask, levels))
    moved = float(_loss(name, pred, a * target + b, mask, levels))
    bound = _eps_bound(target, _context_masks(name, target, valid, levels), valid, a)
    assert abs(moved - base) <= bound + ROUNDING * (1 + base)


@pytest.mark.parametrize("name", LOSSES)
@SETTINGS
@given(data=st.data(), a=_scale, b=_shift)
def test_prediction_equal_to_an_affine_map_of_the_target_gives_zero_loss(name, data, a, b):
    _, target, mask, levels = data.draw(_cases(name))
    valid = torch.isfinite(target) if mask is None else mask
    loss = float(_loss(name, a * target + b, target, mask, levels))
    # p_hat = (g - t) / (s + eps / a) against g_hat = (g - t) / (s + eps): the same bound.
    bound = _eps_bound(target, _context_masks(name, target, valid, levels), valid, a)
    assert 0 <= loss <= bound + ROUNDING
    # No blanket "< 1e-4": depths 1.0358 and 1.0304 alone in a DR bin (s = 0.0018) with
    # a = 0.25 give 2.9e-4, within the bound. On well spread data it holds, see below.


@pytest.mark.parametrize("name", LOSSES)
def test_prediction_equal_to_an_affine_map_of_well_spread_target_gives_loss_below_1e_4(name):
    gen = torch.Generator().manual_seed(0)
    target = 0.5 + 3 * torch.rand(2, 32, 32, generator=gen, dtype=F64)
    for a, b in [(0.1, -5.0), (0.5, 2.0), (10.0, 5.0), (3.0, -1.0)]:
        assert float(_loss(name, a * target + b, target, None, 3)) < 1e-4
