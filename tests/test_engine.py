"""The loss engine (hdn._core.engine): isolation between images and contexts, non-finite
predictions, one compiled graph without recompilation, no host sync, few operations.

The values themselves are held to hdn.reference by test_exactness, test_reductions and
test_gradcheck; these tests pin what the engine must guarantee beyond them.
"""

from __future__ import annotations

import zlib

import pytest
import torch

import hdn
from hdn import contexts as C
from hdn._core import engine

F64 = torch.float64
NAN = float("nan")
REDUCTIONS = ("mean", "sum", "per_image", "none")


def _gen(*key) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def _loss(kind: str, levels: int = 3):
    """``fn(pred, target, mask, reduction)`` for SSI, DR, DP, DS or label contexts."""
    if kind == "ssi":
        return lambda p, g, m, r: hdn.ssi_loss(p, g, m, reduction=r)
    if kind == "labels":
        def fn(p, g, m, r):
            labels = (torch.arange(p[0].numel()).view(p.shape[1:]) // 7 % 3).expand(p.shape)
            return hdn.contexts_loss(p, g, m, C.from_labels(labels, g, m), reduction=r)
        return fn
    return lambda p, g, m, r: hdn.hdn_loss(p, g, m, context=kind, levels=levels, reduction=r)


def _value_and_grad(fn, pred, target, mask, index):
    p = pred.clone().requires_grad_(True)
    out = fn(p, target, mask, "per_image")[index]
    out.backward()
    return out.detach(), p.grad


# --- 1. a context's statistics depend on its own values only ---------------------------------


def _companions(shape, dtype, gen):
    """Images of every kind to put beside the one under test: huge, tiny, offset, constant,
    without valid pixels."""
    H, W = shape
    base = torch.rand(5, H, W, generator=gen, dtype=F64)
    pred = torch.stack([base[0] * 3e6, base[1] * 1e-3, base[2] + 1e5, torch.full((H, W), 7.0), base[4]])
    target = torch.stack([base[1] * 1e6 + 1, base[2] * 1e-3 + 1e-3, base[3] + 1e4, base[0] + 2, base[3] + 1])
    mask = torch.ones(5, H, W, dtype=torch.bool)
    mask[4] = False
    return pred.to(dtype), target.to(dtype), mask


@pytest.mark.parametrize("dtype", [F64, torch.float32])
@pytest.mark.parametrize("kind", ["ssi", "dr", "dp", "ds", "labels"])
def test_an_images_loss_and_gradient_are_the_same_alone_and_in_any_batch(kind, dtype):
    """The run sums of the former core cancelled: an image after large values lost its digits.
    Here each image's per-image loss and gradient are those of the image alone (float64 within
    1e-12, float32 within its own rounding), wherever it stands in the batch."""
    fn = _loss(kind)
    shape = (9, 12)
    for seed in range(3):
        gen = _gen("alone", kind, seed)
        pred = (torch.randn(1, *shape, generator=gen, dtype=F64) * 0.01).to(dtype)
        target = (torch.rand(1, *shape, generator=gen, dtype=F64) * 0.02 + 0.01).to(dtype)
        mask = torch.rand(1, *shape, generator=gen) > 0.2
        alone, alone_grad = _value_and_grad(fn, pred, target, mask, 0)
        others = _companions(shape, dtype, gen)
        for at in (0, 2, 5):
            p = torch.cat([others[0][:at], pred, others[0][at:]])
            g = torch.cat([others[1][:at], target, others[1][at:]])
            m = torch.cat([others[2][:at], mask, others[2][at:]])
            value, grad = _value_and_grad(fn, p, g, m, at)
            tol = 1e-12 if dtype == F64 else 4 * torch.finfo(dtype).eps
            torch.testing.assert_close(value, alone, rtol=tol, atol=tol * float(alone.abs()) + 1e-30)
            scale = float(alone_grad.abs().max())
            torch.testing.assert_close(grad[at : at + 1], alone_grad, rtol=tol, atol=tol * scale + 1e-30)
            others_grad = torch.cat([grad[:at], grad[at + 1 :]])
            assert torch.isfinite(others_grad).all()


def test_the_reported_cancellation_case_gives_the_image_alone():
    p = torch.tensor([[[1e6, 3e6, 0.0]], [[0.0, 0.01, 0.02]]])
    g = torch.tensor([[[1.0, 2.0, 0.0]], [[1.0, 2.0, 3.0]]])
    m = torch.tensor([[[1, 1, 0]], [[1, 1, 1]]]).bool()
    batch = hdn.ssi_loss(p, g, m, reduction="per_image")[1]
    alone = hdn.ssi_loss(p[1:], g[1:], m[1:], reduction="per_image")[0]
    torch.testing.assert_close(batch, alone, rtol=4 * torch.finfo(torch.float32).eps, atol=0)


@pytest.mark.parametrize("reduction", ["mean", "sum", "per_image"])
@pytest.mark.parametrize("kind", ["ssi", "dr", "dp", "ds", "labels"])
def test_the_loss_and_its_gradient_have_the_same_bits_on_one_and_on_two_threads(kind, reduction):
    """A float32 sum over all pixels can end in another last bit when two threads add it (a
    250 x 371 image, say): the notebooks' stored digits must not depend on the thread count."""
    gen = _gen("threads", kind, reduction)
    target = torch.rand(1, 1, 250, 371, generator=gen) + 0.5
    pred = torch.rand(1, 1, 250, 371, generator=gen)
    mask = torch.rand(1, 1, 250, 371, generator=gen) > 0.1
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            p = pred.clone().requires_grad_(True)
            out = _loss(kind)(p, target, mask, reduction)
            out.sum().backward()
            results.append((out.detach(), p.grad))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(results[0][0], results[1][0])
    assert torch.equal(results[0][1], results[1][1])


# --- 2. and 3. non-finite predictions poison only the contexts that hold them -------------


@pytest.mark.parametrize("bad", [NAN, float("inf"), -float("inf")])
def test_a_non_finite_prediction_in_no_context_contributes_nothing(bad):
    """docs/semantics.md §2: the maximum-depth pixel is in no DR bin, so its prediction is
    never read: the loss is that of the other three pixels (1/3 here), gradient finite."""
    p = torch.tensor([[[[0.5, 1.0, 2.0, bad]]]], requires_grad=True)
    g = torch.tensor([[[[1.0, 2.0, 3.0, 4.0]]]])
    loss = hdn.hdn_loss(p, g, context="dr", levels=1)
    finite = hdn.hdn_loss(torch.tensor([[[[0.5, 1.0, 2.0, 0.0]]]]), g, context="dr", levels=1)
    assert float(loss) == pytest.approx(1 / 3, rel=1e-5)
    assert float(loss) == float(finite)
    loss.backward()
    assert torch.isfinite(p.grad).all() and p.grad[0, 0, 0, 3] == 0


@pytest.mark.parametrize("kind", ["ssi", "dr", "dp", "ds", "labels"])
@pytest.mark.parametrize("reduction", ["per_image", "none"])
def test_a_non_finite_prediction_never_reaches_another_image_or_an_invalid_pixel(kind, reduction):
    """A NaN at flat pixel 0 (the former core's spare slot read it) makes its own image's
    loss NaN and nothing else: the other image's loss and gradient are those of it alone, and
    the map is 0 at invalid pixels."""
    fn = _loss(kind, levels=2)
    gen = _gen("nan", kind)
    pred = torch.rand(2, 4, 6, generator=gen, dtype=F64)
    target = torch.rand(2, 4, 6, generator=gen, dtype=F64) + 1
    mask = torch.ones(2, 4, 6, dtype=torch.bool)
    mask[:, 0, 2] = False
    pred[0, 0, 0] = NAN
    pred[:, 0, 2] = NAN  # invalid pixels may hold anything
    p = pred.clone().requires_grad_(True)
    out = fn(p, target, mask, reduction)
    alone_p = pred[1:].clone().requires_grad_(True)
    alone = fn(alone_p, target[1:], mask[1:], reduction)
    if reduction == "per_image":
        assert torch.isnan(out[0])
        torch.testing.assert_close(out[1:], alone, rtol=1e-12, atol=1e-15)
        out[1].backward()
        alone[0].backward()
    else:
        assert (out[:, 0, 2] == 0).all()
        torch.testing.assert_close(out[1:], alone, rtol=1e-12, atol=1e-15)
        out[1].sum().backward()
        alone.sum().backward()
    torch.testing.assert_close(p.grad[1:], alone_p.grad, rtol=1e-12, atol=1e-15)
    assert (p.grad[:, 0, 2] == 0).all()


def test_a_non_finite_prediction_poisons_only_its_contexts():
    """Two label contexts in one image: a NaN in one leaves the other's pixels finite."""
    labels = torch.tensor([[[0, 0, 0, 1, 1, 1]]])
    pred = torch.tensor([[[NAN, 1.0, 2.0, 0.5, 3.0, 1.0]]], dtype=F64)
    target = torch.tensor([[[1.0, 2.0, 3.0, 1.0, 2.0, 5.0]]], dtype=F64)
    out = hdn.contexts_loss(pred, target, None, C.from_labels(labels), reduction="none")
    assert torch.isnan(out[0, 0, :3]).all() and torch.isfinite(out[0, 0, 3:]).all()


# --- one graph: torch.compile(fullgraph=True), no recompilation -------------------------------


def _batches(shape, dtype=F64):
    """Three batches of one shape: dense; 5 % valid; with an image without valid pixels."""
    gen = _gen("batches", shape)
    out = []
    for how in ("dense", "sparse", "empty-image"):
        pred = torch.randn(shape, generator=gen, dtype=dtype)
        target = torch.rand(shape, generator=gen, dtype=dtype) * 4 + 1
        if how == "dense":
            mask = torch.ones(shape, dtype=torch.bool)
        elif how == "sparse":
            mask = torch.rand(shape, generator=gen) < 0.05
            target = target.exp()  # (skewed depths)
        else:
            mask = torch.rand(shape, generator=gen) > 0.3
            mask[1] = False
        out.append((pred, target, mask))
    return out


def _compiled_matches_eager(fn, batches):
    """``fn(pred, target, mask)`` compiled whole equals eager (values and gradients, float64
    within 1e-6) on every batch, and compiles once."""
    compiled = torch.compile(fn, fullgraph=True, dynamic=False, backend="aot_eager")
    with torch._dynamo.config.patch(error_on_recompile=True):
        for pred, target, mask in batches:
            p1, p2 = pred.clone().requires_grad_(True), pred.clone().requires_grad_(True)
            got, want = compiled(p1, target, mask), fn(p2, target, mask)
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-9)
            (got * torch.linspace(1, 2, got.numel(), dtype=got.dtype).view(got.shape)).sum().backward()
            (want * torch.linspace(1, 2, want.numel(), dtype=want.dtype).view(want.shape)).sum().backward()
            torch.testing.assert_close(p1.grad, p2.grad, rtol=1e-6, atol=1e-9)


@pytest.fixture(autouse=False)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_ssi_loss_compiles_as_one_graph_with_dynamic_shapes(fresh_dynamo):
    """``dynamic=True``: no Python arithmetic on sizes that a symbolic size breaks (the engine's
    row sums pick their run length by a loop of ``%``, not ``math.gcd``). DR, DP and DS do not
    compile with dynamic shapes yet (a Dynamo assertion inside the autograd.Function)."""
    compiled = torch.compile(lambda p, g: hdn.ssi_loss(p, g), fullgraph=True, dynamic=True, backend="aot_eager")
    for shape in ((2, 1, 32, 48), (3, 1, 40, 24)):
        gen = _gen("dynamic", shape)
        target = torch.rand(shape, generator=gen, dtype=F64) + 1
        pred = torch.randn(shape, generator=gen, dtype=F64)
        p1, p2 = pred.clone().requires_grad_(True), pred.clone().requires_grad_(True)
        got, want = compiled(p1, target), hdn.ssi_loss(p2, target)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-9)
        got.backward()
        want.backward()
        torch.testing.assert_close(p1.grad, p2.grad, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("levels", [1, 2, 3, 4, 5, 6])
@pytest.mark.parametrize("kind", ["dr", "dp", "ds"])
def test_hdn_loss_compiles_as_one_graph_at_every_level(kind, levels, fresh_dynamo):
    def fn(p, g, m):
        return hdn.hdn_loss(p, g, m, context=kind, levels=levels)

    _compiled_matches_eager(fn, _batches((2, 33, 40)))


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("kind", ["ssi", "dr", "dp", "ds"])
def test_every_reduction_compiles_as_one_graph(kind, reduction, fresh_dynamo):
    loss = _loss(kind)

    def fn(p, g, m):
        return loss(p, g, m, reduction)

    _compiled_matches_eager(fn, _batches((2, 9, 13)))


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("kind", ["intervals", "crops", "labels"])
def test_contexts_loss_compiles_with_contexts_built_outside(kind, reduction, fresh_dynamo):
    """A constructor may read the host (random draws, a label map's count); the loss does not.
    Contexts of one kind and shape have fixed-size segments, so new batches do not recompile."""
    compiled = torch.compile(
        lambda p, g, m, ctx: hdn.contexts_loss(p, g, m, ctx, reduction=reduction),
        fullgraph=True, dynamic=False, backend="aot_eager",
    )
    with torch._dynamo.config.patch(error_on_recompile=True):
        for i, (pred, target, mask) in enumerate(_batches((2, 9, 13))):
            gen = torch.Generator().manual_seed(i)
            if kind == "intervals":
                ctx = C.random_depth_intervals(target, mask, num=4, generator=gen)
            elif kind == "crops":
                ctx = C.random_crops(target, mask, num=4, generator=gen)
            else:
                ctx = C.from_labels(torch.arange(117).view(1, 9, 13).expand(2, 9, 13) % 4, target, mask)
            p1, p2 = pred.clone().requires_grad_(True), pred.clone().requires_grad_(True)
            got = compiled(p1, target, mask, ctx)
            want = hdn.contexts_loss(p2, target, mask, ctx, reduction=reduction)
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-9)
            got.sum().backward()
            want.sum().backward()
            torch.testing.assert_close(p1.grad, p2.grad, rtol=1e-6, atol=1e-9)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind", ["ssi", "dr", "dp", "ds", "labels"])
def test_no_host_sync_on_cuda(kind):
    fn = _loss(kind)
    pred, target, mask = (t.cuda() for t in _batches((2, 33, 40))[2])
    if kind == "labels":  # (built outside: from_labels reads its label count once)
        ctx = C.from_labels(torch.arange(33 * 40, device="cuda").view(1, 33, 40).expand(2, 33, 40) % 5, target, mask)
        fn = lambda p, g, m, r: hdn.contexts_loss(p, g, m, ctx, reduction=r)
    p = pred.requires_grad_(True)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for reduction in REDUCTIONS:
            fn(p, target, mask, reduction).sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("kind", ["ssi", "dr", "dp", "ds", "labels", "crops"])
def test_the_loss_runs_on_the_meta_device_so_it_reads_nothing_back(kind, reduction):
    """Meta tensors hold no data: any read of a value on the host (``.item()``, ``nonzero``,
    a data-dependent shape) fails there. Forward and backward run through."""
    shape = (2, 1, 24, 20)
    pred = torch.randn(shape, device="meta", requires_grad=True)
    target, mask = torch.empty(shape, device="meta"), torch.empty(shape, device="meta", dtype=torch.bool)
    if kind in ("labels", "crops"):  # contexts built on the CPU (a constructor may read), then moved
        cpu = C.from_labels(torch.arange(480).view(1, 1, 24, 20).expand(2, 1, 24, 20) % 7)
        if kind == "labels":
            ctx = C.LabelContexts([cpu._labels[0].to("meta")], cpu.per_image, mask[:, 0])
        else:
            crops = C.random_crops(torch.ones(shape), num=3, generator=torch.Generator().manual_seed(0))
            ctx = C.PairContexts(mask[:, 0], crops._member.to("meta"), crops.description)
        out = hdn.contexts_loss(pred, target, mask, ctx, reduction=reduction)
    else:
        out = _loss(kind)(pred, target, mask, reduction)
    out.sum().backward()
    assert pred.grad.shape == shape and pred.grad.device.type == "meta"


# --- few kernels ------------------------------------------------------------------------


def top_level_aten_ops(fn) -> int:
    """The number of top-level ATen operations (profiler events ``aten::*`` whose parent is no
    ``aten::*`` event) of ``fn()``: on a GPU, each is a kernel launch or less."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(
        1
        for e in prof.events()
        if e.name.startswith("aten::") and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::"))
    )


_OPS_CASES = [("ssi", 1)] + [(kind, levels) for kind in ("dr", "dp", "ds") for levels in range(1, 7)]


@pytest.mark.parametrize(("kind", "levels"), _OPS_CASES)
def test_at_most_150_top_level_operations_per_level_for_forward_and_backward(kind, levels, monkeypatch):
    """Counted on the device path: the CPU branches that read the host are switched off."""
    monkeypatch.setattr(engine, "reads_host", lambda x: False)
    gen = _gen("ops", kind, levels)
    target = torch.rand(2, 1, 64, 64, generator=gen) + 1
    p = torch.randn(2, 1, 64, 64, generator=gen, requires_grad=True)
    loss = _loss(kind, levels)
    loss(p, target, None, "mean").backward()  # (warm: cached layouts)
    ops = top_level_aten_ops(lambda: loss(p, target, None, "mean").backward())
    assert ops <= 150 * levels, (kind, levels, ops)


# --- the CPU branch for sparse batches -------------------------------------------------------


def _random_kind_loss(kind: str):
    def fn(p, g, m, r):
        gen = torch.Generator().manual_seed(3)
        build = C.random_crops if kind == "crops" else C.random_depth_intervals
        return hdn.contexts_loss(p, g, m, build(g, m, num=4, generator=gen), reduction=r)
    return fn


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("kind", ["ssi", "dr", "dp", "ds", "labels", "crops", "intervals"])
def test_a_sparse_batch_worked_on_its_valid_pixels_alone_equals_the_device_path(kind, reduction, monkeypatch):
    """On the CPU a batch with fewer than half its pixels valid is compacted to them: the
    values and gradients are those of the path that keeps every pixel (float64, 1e-12)."""
    gen = _gen("sparse", kind)
    shape = (3, 1, 18, 23)
    pred = torch.randn(shape, generator=gen, dtype=F64)
    target = torch.rand(shape, generator=gen, dtype=F64) * 5 + 1
    mask = torch.rand(shape, generator=gen) < 0.3
    mask[2] = False  # an image without valid pixels
    pred[~mask] = NAN  # never read where invalid
    loss = _random_kind_loss(kind) if kind in ("crops", "intervals") else _loss(kind)
    calls = []
    over = engine.Segments.over
    monkeypatch.setattr(engine.Segments, "over", lambda *a: calls.append(1) or over(*a))

    def value_and_grad():
        p = pred.clone().requires_grad_(True)
        out = loss(p, target, mask, reduction)
        (out * torch.linspace(1, 2, out.numel(), dtype=F64).view(out.shape)).sum().backward()
        return out.detach(), p.grad

    compacted = value_and_grad()
    assert calls, "the sparse batch took the compacting branch"
    monkeypatch.setattr(engine, "reads_host", lambda x: False)
    calls.clear()
    every_pixel = value_and_grad()
    assert not calls
    for got, want in zip(compacted, every_pixel):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
