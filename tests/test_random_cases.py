"""Seeded random cases against the reference: the parametrized tests' gaps, searched at random.

Each case draws a batch (1-3 images of 1-16 x 1-16 pixels), a target (scales from 1e-3 to
1e3, ties, signed values, non-finite entries), masks, a context kind, levels and a reduction.
In float64 it compares hdn with hdn.reference: the value, d/dpred and d/dtarget; in float32,
the per-image values, with the reference run in float32 too. Both paths of the engine run:
the CPU one (a sparse batch compacted to its valid pixels, members-only sorts, DR's overlap
check) and the device one (``reads_host`` off), which CUDA and ``torch.compile`` take.
``contexts_loss`` cases hand in contexts built from one mask and pass another (narrower,
unrelated, or none), with both aggregations.
"""

from __future__ import annotations

import random

import pytest
import torch
from test_exactness import _compare, _loss_and_grads

import hdn
from hdn import contexts as C
from hdn import reference as ref
from hdn._core import engine

F64 = torch.float64
CASES_PER_CHUNK = 40
CHUNKS = range(6)


def _assert_matches(got, want, pred, target, case):
    """:func:`test_exactness._compare` (target gradients summed over tied values), naming the
    case on failure."""
    try:
        _compare(got, want, pred, target, target_ties=True)
    except AssertionError as error:
        raise AssertionError(f"{case}: {error}") from error


def _target(r: random.Random, gen: torch.Generator, shape) -> torch.Tensor:
    scale = 10 ** r.uniform(-3, 3)
    target = scale * (r.choice([0.0, 0.5, 100.0]) + torch.rand(shape, generator=gen, dtype=F64))
    if r.random() < 0.3:  # ties
        target = (target / scale * r.choice([2, 3, 5])).round() * scale
    if r.random() < 0.2:  # signed, bin edges near 0
        target = target - target.mean()
    if r.random() < 0.3:  # non-finite entries are invalid
        bad = torch.rand(shape, generator=gen) < r.random() * 0.6
        fill = r.choice([float("nan"), float("inf"), -float("inf")])
        target = torch.where(bad, torch.tensor(fill, dtype=F64), target)
    return target


def _weighted(fn, reduction, weights):
    """``fn`` with ``reduction``, reduced to a scalar by fixed random ``weights``."""

    def loss(p, g, *args, **kwargs):
        out = fn(p, g, *args, reduction=reduction, **kwargs)
        return out if weights is None else (out * weights).sum()

    return loss


def _reduction(r, gen, shape):
    reduction = r.choice(["mean", "sum", "per_image", "none"])
    size = {"per_image": shape[:1], "none": shape}.get(reduction)
    return reduction, None if size is None else torch.rand(size, generator=gen, dtype=F64)


def _hdn_case(seed: int) -> None:
    r, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    shape = (r.randint(1, 3), r.randint(1, 12), r.randint(1, 12))
    kind, levels = r.choice(["dr", "dp", "ds", "ssi"]), r.randint(1, 4)
    if kind == "ds" and 2 ** (levels - 1) > min(shape[1:]):
        levels = 1
    target = _target(r, gen, shape)
    mask = torch.rand(shape, generator=gen) < r.random() if r.random() < 0.6 else None
    pred = torch.randn(shape, generator=gen, dtype=F64) * 10 ** r.uniform(-3, 3)
    reduction, weights = _reduction(r, gen, shape)
    case = f"seed {seed}: {kind}, L = {levels}, {shape}, {reduction}"
    if kind == "ssi":
        got = _loss_and_grads(_weighted(hdn.ssi_loss, reduction, weights), pred, target, mask)
        want = _loss_and_grads(_weighted(ref.ssi_loss, reduction, weights), pred, target, mask)
    else:
        kw = {"context": kind, "levels": levels}
        got = _loss_and_grads(_weighted(hdn.hdn_loss, reduction, weights), pred, target, mask, **kw)
        want = _loss_and_grads(
            _weighted(ref.hdn_loss, reduction, weights), pred, target, mask, **kw
        )
    _assert_matches(got, want, pred, target, case)


def _contexts_case(seed: int) -> None:
    r, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    shape = (r.randint(1, 3), r.randint(1, 12), r.randint(1, 12))
    kind, levels = r.choice(["dr", "dp", "ds", "crops", "intervals", "labels"]), r.randint(1, 4)
    if kind == "ds" and 2 ** (levels - 1) > min(shape[1:]):
        levels = 1
    target = _target(r, gen, shape)
    built_with = torch.rand(shape, generator=gen) < r.uniform(0.2, 1) if r.random() < 0.5 else None
    draw = r.random()
    if draw < 0.3:  # the contexts' own mask
        mask = built_with
    else:  # narrower than it, or unrelated
        mask = torch.rand(shape, generator=gen) < r.uniform(0.1, 1)
        if draw < 0.6 and built_with is not None:
            mask = mask & built_with
    if kind in ("dr", "dp", "ds"):
        builder = {"dr": C.depth_range, "dp": C.depth_percentile, "ds": C.spatial_grid}[kind]
        ctx = builder(target, built_with, levels=levels)
        valid = torch.isfinite(target) & (True if built_with is None else built_with)
        masks = ref.contexts_by_name(kind, torch.where(valid, target, 0.0), valid, levels)
    else:
        if kind == "labels":
            high = r.randint(1, 6)
            labels = [torch.randint(-1, high, shape, generator=gen) for _ in range(levels)]
            ctx = C.from_labels(labels, target, built_with)
        else:
            builder = C.random_crops if kind == "crops" else C.random_depth_intervals
            seeded = torch.Generator().manual_seed(seed)
            ctx = builder(target, built_with, num=r.randint(1, 6), generator=seeded)
        masks = list(ctx.to_masks())
    valid = torch.isfinite(target) & (True if mask is None else mask) & ctx.valid
    aggregation = r.choice(["mean", "pooled"])
    detach = aggregation == "pooled" and r.random() < 0.5
    pred = torch.randn(shape, generator=gen, dtype=F64)
    reduction, weights = _reduction(r, gen, shape)
    case = f"seed {seed}: {kind}, L = {levels}, {shape}, {aggregation}, {reduction}"
    kw = {"aggregation": aggregation, "detach_pred_median": detach}
    got = _loss_and_grads(
        _weighted(hdn.contexts_loss, reduction, weights), pred, target, mask, ctx, **kw
    )
    if aggregation == "mean":
        mean = _weighted(ref.hierarchical_loss, reduction, weights)
        want = _loss_and_grads(mean, pred, target, valid, masks)
    else:
        pooled = _weighted(ref.pooled_loss, reduction, weights)
        want = _loss_and_grads(pooled, pred, target, valid, masks, detach)
    _assert_matches(got, want, pred, target, case)


@pytest.fixture(params=["cpu path", "device path"])
def path(request, monkeypatch):
    if request.param == "device path":  # the branches CUDA and torch.compile take
        monkeypatch.setattr(engine, "reads_host", lambda x: False)
    return request.param


@pytest.mark.parametrize("chunk", CHUNKS)
def test_random_hdn_and_ssi_cases_match_the_reference(path, chunk):
    for i in range(CASES_PER_CHUNK):
        _hdn_case(1000 * chunk + i)


@pytest.mark.parametrize("chunk", CHUNKS)
def test_random_contexts_loss_cases_with_other_masks_match_the_reference(path, chunk):
    for i in range(CASES_PER_CHUNK):
        _contexts_case(50_000 + 1000 * chunk + i)


def _float32_case(seed: int) -> None:
    """float32 inputs against the reference run in float32 too (DR and DP bin edges are
    computed in the target's dtype, so a float64 reference would bin other pixels)."""
    r, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    shape = (r.randint(1, 3), r.randint(2, 16), r.randint(2, 16))
    kind, levels = r.choice(["dr", "dp", "ds", "ssi"]), r.randint(1, 4)
    if kind == "ds" and 2 ** (levels - 1) > min(shape[1:]):
        levels = 1
    scale = 10 ** r.uniform(-3, 3)
    target = (scale * (r.choice([0.0, 0.5, 100.0]) + torch.rand(shape, generator=gen))).float()
    mask = torch.rand(shape, generator=gen) < r.uniform(0.2, 1) if r.random() < 0.5 else None
    pred = (torch.randn(shape, generator=gen) * 10 ** r.uniform(-2, 2)).float()
    kw = {} if kind == "ssi" else {"context": kind, "levels": levels}
    ours, theirs = (hdn.ssi_loss, ref.ssi_loss) if kind == "ssi" else (hdn.hdn_loss, ref.hdn_loss)
    loss = ours(pred, target, mask, reduction="per_image", **kw)
    loss_ref = theirs(pred, target, mask, reduction="per_image", **kw)
    case = f"seed {seed}: {kind}, L = {levels}, {shape}, float32"
    floor = 1e-5 * float(loss_ref.abs().max()) + 1e-12
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=floor, msg=lambda m: f"{case}: {m}")


@pytest.mark.parametrize("chunk", range(3))
def test_random_float32_cases_match_the_reference_in_float32(path, chunk):
    for i in range(CASES_PER_CHUNK):
        _float32_case(90_000 + 1000 * chunk + i)
