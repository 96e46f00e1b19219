"""torch.autograd.gradcheck, in float64 on small inputs, for every differentiable function of hdn.

The SSI-type losses are piecewise smooth: they have kinks where a residual
``p_hat - g_hat`` changes sign, where two values swap places around a median, and (for the
target) where a depth crosses a DR/DP bin edge. Finite differences with ``eps = 1e-6``
are exact enough away from those kinks, so the inputs are continuous random values and
every test first asserts that no two values of an image lie within ``_MIN_GAP`` of each
other. The tolerances are gradcheck's defaults.
"""

from __future__ import annotations

import pytest
import torch
from torch.autograd import gradcheck

import hdn
from hdn import contexts as C
from hdn import reference
from hdn.alignment import align_least_squares
from hdn.workbook.gradients import ssi_loss_count_n

EPS = 1e-6
_MIN_GAP = 1e-4  # 100 x eps: a perturbation cannot reorder values or cross a sign change

SHAPES = [(2, 1, 5, 6), (1, 1, 7, 5), (2, 5, 7)]


def _spaced(shape, lo, hi, gen):
    """Random values in [lo, hi], each image a shuffled, jittered ladder: no two closer than
    a fifth of a rung, so no ties and no near-ties."""
    B, n = shape[0], int(torch.tensor(shape[1:]).prod())
    rung = (hi - lo) / n
    rows = [
        lo + (torch.randperm(n, generator=gen).double() + 0.2 + 0.6 * torch.rand(n, generator=gen, dtype=torch.float64))
        * rung
        for _ in range(B)
    ]
    return torch.stack(rows).reshape(shape)


def _inputs(shape, seed, holes=True, accept=None):
    """(pred, target, mask) from the first seed >= ``seed`` whose inputs ``accept`` approves
    (the check that they lie away from every kink); the gradchecks themselves are never loosened."""
    for attempt in range(200):
        gen = torch.Generator().manual_seed(seed + 1000 * attempt)
        pred = _spaced(shape, 0.5, 2.5, gen)
        target = _spaced(shape, 1.0, 5.0, gen)
        mask = (torch.rand(shape, generator=gen) > 0.15) if holes else None
        if accept is None or accept(pred, target, mask):
            _assert_no_near_ties(pred)
            _assert_no_near_ties(target)
            return pred, target, mask
    raise AssertionError("no seed gave inputs away from the kinks")


def _assert_no_near_ties(x):
    flat = x.reshape(x.shape[0], -1).sort(dim=1).values
    assert float((flat[:, 1:] - flat[:, :-1]).min()) > _MIN_GAP


def _check(fn, *inputs):
    """gradcheck with respect to every input that requires grad."""
    assert gradcheck(fn, inputs, eps=EPS)


def _residual_margin(pred, target, mask, contexts):
    """How far the inputs are from a kink of ``|p_hat - g_hat|`` in any (context, pixel) pair.

    For a context of three or more pixels that is the smallest non-zero ``|p_hat - g_hat|``;
    exact zeros are not kinks (the pixel that is the median of both maps has both normalised
    values 0 whatever the inputs). A context of two pixels ``a < b`` (in order) has
    ``x_hat = (0, 3 |b - a| / (|b - a| + 3e-6))``: the residual's sign follows
    ``|b - a|`` of pred against target, so there the margin is the gap between those."""
    p = pred.reshape(contexts.shape)
    g = target.reshape(contexts.shape)
    valid = contexts.valid if mask is None else contexts.valid & mask.reshape(contexts.shape)
    margin = float("inf")
    for m in contexts.to_masks():
        m = m & valid
        for b in range(p.shape[0]):
            n = int(m[b].sum())
            if n == 2:
                dp, dg = p[b][m[b]], g[b][m[b]]
                if bool((dp[1] > dp[0]) == (dg[1] > dg[0])):
                    margin = min(margin, abs(float((dp[1] - dp[0]).abs() - (dg[1] - dg[0]).abs())))
            elif n > 2:
                r = (reference.normalize(p[b], m[b]) - reference.normalize(g[b], m[b]))[m[b]].abs()
                if bool((r > 0).any()):
                    margin = min(margin, float(r[r > 0].min()))
    return margin


def _away_from_kinks(make_contexts, edges=False):
    """An ``accept`` for :func:`_inputs`: residuals (and, with ``edges``, depths and DR/DP bin
    edges) at least ``_MIN_GAP`` apart in every context that ``make_contexts`` builds."""

    def accept(pred, target, mask):
        ctx = make_contexts(target, mask)
        if _residual_margin(pred, target, mask, ctx) <= _MIN_GAP:
            return False
        return not edges or _edge_margin(target, ctx) > _MIN_GAP

    return accept


def _edge_margin(target, ctx):
    """Smallest distance between a depth and a DR/DP bin edge that is not that depth itself
    (an edge at a pixel's own value moves with it); infinite for other contexts."""
    if not isinstance(ctx, C.IntervalContexts):
        return float("inf")
    g = target.reshape(target.shape[0], -1)
    margin = float("inf")
    for lower, upper in zip(ctx.lower, ctx.upper, strict=True):
        gap = (g.unsqueeze(2) - torch.cat([lower, upper], dim=1).unsqueeze(1)).abs()
        if bool((gap > 0).any()):
            margin = min(margin, float(gap[gap > 0].min()))
    return margin


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("wrt", ["pred", "target", "both"])
def test_gradcheck_ssi_loss(shape, wrt):
    pred, target, mask = _inputs(shape, seed=0, accept=_away_from_kinks(C.whole_image))
    pred.requires_grad_(wrt in ("pred", "both"))
    target.requires_grad_(wrt in ("target", "both"))
    _check(lambda p, g: hdn.ssi_loss(p, g, mask), pred, target)


@pytest.mark.parametrize("context", ["dr", "dp", "ds"])
@pytest.mark.parametrize("levels", [1, 2, 3])
@pytest.mark.parametrize("shape", SHAPES)
def test_gradcheck_hdn_loss_wrt_prediction(context, levels, shape):
    build = lambda g, m: C.build(context, g, m, levels=levels)
    pred, target, mask = _inputs(shape, seed=1, accept=_away_from_kinks(build))
    pred.requires_grad_(True)
    _check(lambda p: hdn.hdn_loss(p, target, mask, context=context, levels=levels), pred)


@pytest.mark.parametrize("context", ["dr", "dp", "ds"])
@pytest.mark.parametrize("levels", [1, 2, 3])
@pytest.mark.parametrize("shape", SHAPES)
def test_gradcheck_hdn_loss_wrt_target_with_contexts_rebuilt_from_it(context, levels, shape):
    build = lambda g, m: C.build(context, g, m, levels=levels)
    pred, target, mask = _inputs(shape, seed=2, accept=_away_from_kinks(build, edges=True))
    pred.requires_grad_(True)
    target.requires_grad_(True)
    _check(lambda p, g: hdn.hdn_loss(p, g, mask, context=context, levels=levels), pred, target)


def _random_contexts(kind, seed):
    def make(target, mask):
        gen = torch.Generator().manual_seed(seed)
        if kind == "intervals":
            return C.random_depth_intervals(target, mask, num=4, min_width=0.3, generator=gen)
        return C.random_crops(target, mask, num=4, min_size=0.3, max_size=0.7, generator=gen)

    return make


@pytest.mark.parametrize("kind", ["intervals", "crops"])
@pytest.mark.parametrize("shape", SHAPES)
def test_gradcheck_contexts_loss_random_contexts_with_median_gradient(kind, shape):
    make = _random_contexts(kind, seed=0)
    pred, target, mask = _inputs(shape, seed=3, accept=_away_from_kinks(make))
    ctx = make(target, mask)
    pred.requires_grad_(True)
    target.requires_grad_(True)
    # the variant whose backward is the forward's true gradient
    _check(lambda p, g: hdn.contexts_loss(p, g, mask, ctx, detach_pred_median=False), pred, target)


def _median_pixels(pred, mask, ctx):
    """Where the lower median of pred lies in each context, as a bool map of pred's shape."""
    p = pred.reshape(ctx.shape)
    valid = ctx.valid if mask is None else ctx.valid & mask.reshape(ctx.shape)
    frozen = torch.zeros(ctx.shape, dtype=torch.bool)
    for m in ctx.to_masks():
        for b in range(p.shape[0]):
            where = (m[b] & valid[b]).nonzero()
            if len(where):
                values = p[b][m[b] & valid[b]]
                i = where[values.sort(stable=True).indices[(len(values) - 1) // 2]]
                frozen[b, i[0], i[1]] = True
    return frozen.reshape(pred.shape)


@pytest.mark.parametrize("kind", ["intervals", "crops"])
@pytest.mark.parametrize("shape", SHAPES)
def test_gradcheck_contexts_loss_random_contexts_detached_median(kind, shape):
    """The default (prediction median without gradient) is the true gradient at every pixel that
    is no context's median, the true target gradient, and the reference's autograd gradient."""
    make = _random_contexts(kind, seed=1)
    pred, target, mask = _inputs(shape, seed=4, accept=_away_from_kinks(make))
    ctx = make(target, mask)
    assert ctx.detach_pred_median
    frozen = _median_pixels(pred, mask, ctx)
    assert 0 < int(frozen.sum()) < frozen.numel()
    base = pred.clone()
    free = pred.clone().requires_grad_(True)
    _check(lambda q: hdn.contexts_loss(torch.where(frozen, base, q), target, mask, ctx), free)
    target_g = target.clone().requires_grad_(True)
    _check(lambda g: hdn.contexts_loss(pred, g, mask, ctx), target_g)

    p = pred.clone().requires_grad_(True)
    hdn.contexts_loss(p, target, mask, ctx).backward()
    p_ref = pred.clone().reshape(ctx.shape).requires_grad_(True)
    valid = reference.valid_mask(target.reshape(ctx.shape), None if mask is None else mask.reshape(ctx.shape))
    reference.pooled_loss(p_ref, target.reshape(ctx.shape), valid, list(ctx.to_masks())).backward()
    torch.testing.assert_close(p.grad.reshape(ctx.shape), p_ref.grad)


@pytest.mark.parametrize("shape", SHAPES)
def test_gradcheck_contexts_loss_from_labels(shape):
    fine = torch.randint(0, 4, shape, generator=torch.Generator().manual_seed(5))
    make = lambda g, m: C.from_labels([fine // 2, fine], g, m)
    pred, target, mask = _inputs(shape, seed=5, accept=_away_from_kinks(make))
    ctx = make(target, mask)
    pred.requires_grad_(True)
    target.requires_grad_(True)
    _check(lambda p, g: hdn.contexts_loss(p, g, mask, ctx), pred, target)


def _residuals_apart(pred, target, mask):
    """Gradient matching has kinks where two neighbouring residuals are equal."""
    r = hdn.ssi_normalize(pred, mask) - hdn.ssi_normalize(target, mask)
    dx, dy = (r[..., 1:] - r[..., :-1]).abs(), (r[..., 1:, :] - r[..., :-1, :]).abs()
    return bool(dx[dx > 0].min() > _MIN_GAP) and bool(dy[dy > 0].min() > _MIN_GAP)


@pytest.mark.parametrize("scales", [1, 2, 3])
@pytest.mark.parametrize("shape", SHAPES)
def test_gradcheck_gradient_matching_loss(scales, shape):
    accept = lambda p, g, m: _away_from_kinks(C.whole_image)(p, g, m) and _residuals_apart(p, g, m)
    pred, target, mask = _inputs(shape, seed=6, accept=accept)
    pred.requires_grad_(True)
    target.requires_grad_(True)
    _check(lambda p, g: hdn.gradient_matching_loss(p, g, mask, scales=scales), pred, target)


@pytest.mark.parametrize("shape", SHAPES)
def test_gradcheck_ssi_normalize(shape):
    x, _, mask = _inputs(shape, seed=7)
    x.requires_grad_(True)
    _check(lambda x: hdn.ssi_normalize(x, mask), x)


@pytest.mark.parametrize("context", ["dr", "dp", "ds"])
@pytest.mark.parametrize("level", [0, 1, 2])
@pytest.mark.parametrize("shape", SHAPES)
def test_gradcheck_context_normalize(context, level, shape):
    x, target, mask = _inputs(shape, seed=8)
    ctx = C.build(context, target, mask, levels=3)
    x.requires_grad_(True)
    _check(lambda x: hdn.context_normalize(x, ctx, level, mask), x)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("holes", [False, True])
def test_gradcheck_align_least_squares(shape, holes):
    pred, target, mask = _inputs(shape, seed=9, holes=holes)
    pred.requires_grad_(True)
    target.requires_grad_(True)
    _check(lambda p, g: align_least_squares(p, g, mask), pred, target)


@pytest.mark.parametrize("shape", SHAPES)
def test_gradcheck_ssi_loss_count_n_analysis_variant(shape):
    pred, target, mask = _inputs(shape, seed=10, accept=_away_from_kinks(C.whole_image))
    pred.requires_grad_(True)
    target.requires_grad_(True)
    _check(lambda p, g: ssi_loss_count_n(p, g, mask), pred, target)
