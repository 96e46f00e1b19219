"""The run core (hdn._core.runs): layouts, segment sums, segmented selections, reliability.

Values and gradients of the losses that run on it are pinned against the reference in
test_exactness.py and test_gradcheck.py (and here, on sparse and skewed targets); these
tests pin the pieces.
"""

from __future__ import annotations

import multiprocessing
import threading

import numpy as np
import pytest
import torch

import hdn
from hdn import bench
from hdn import contexts as C
from hdn import reference as ref
from hdn._core import runs

SHAPES = ((1, 5, 7), (2, 9, 31), (3, 16, 20), (1, 33, 17))


def _runs_of(layout: runs.RunLayout, level: int) -> list[set[int]]:
    """The pixels of every run of a level."""
    order = layout.order.long().tolist()
    n = layout.level_lengths(level)
    starts = np.cumsum(n) - n
    return [set(order[a : a + k]) for a, k in zip(starts.tolist(), n.tolist())]


def _reference_sets(masks: list[torch.Tensor], first: int, count: int) -> list[set[int]]:
    """Per (image, context) of one level, the flat pixels of the reference masks."""
    B = masks[0].shape[0]
    P = masks[0][0].numel()
    out = []
    for b in range(B):
        for k in range(first, first + count):
            out.append({b * P + i for i in masks[k][b].reshape(-1).nonzero().squeeze(1).tolist()})
    return out


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("levels", [1, 2, 3, 4])
@pytest.mark.parametrize("holes", [True, False], ids=["holes", "fully-valid"])
def test_grid_layout_runs_are_the_spec_cells_at_every_level_in_row_major_order(shape, levels, holes):
    if 2 ** (levels - 1) > min(shape[1:]):
        pytest.skip("grid finer than the image")
    valid = torch.rand(shape, generator=torch.Generator().manual_seed(1)) > (0.2 if holes else -1.0)
    layout = runs.RunLayout.grid(valid, levels)
    masks = [m & valid for m in ref.ds_contexts(shape, levels)]
    first = 0
    for level in range(levels):
        cells = 4**level
        want = {frozenset(s) for s in _reference_sets(masks, first, cells)}
        assert {frozenset(s) for s in _runs_of(layout, level)} == want
        first += cells
    # within a finest cell, pixels row-major (the median's tie rule relies on it)
    n = layout.level_lengths(levels - 1)
    order = layout.order.long()
    for a, k in zip((np.cumsum(n) - n).tolist(), n.tolist()):
        assert bool((order[a + 1 : a + k] > order[a : a + k - 1]).all())


@pytest.mark.parametrize("name", ["dr", "dp"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_interval_layout_runs_are_the_bins_at_every_level_in_depth_order(name, shape):
    gen = torch.Generator().manual_seed(2)
    target = 1 + 3 * torch.rand(shape, generator=gen, dtype=torch.float64)
    target[0, 0, :2] = float("nan")
    levels = 3
    ctx = C.build(name, target, levels=levels)
    layout = ctx.row_layout(ctx.valid, target)
    assert isinstance(layout, runs.RunLayout) and layout.target_sorted
    valid = ref.valid_mask(target)
    masks = ref.contexts_by_name(name, torch.where(valid, target, 0), valid, levels)
    masks = [m & valid for m in masks]
    first = 0
    for level in range(levels):
        bins = 2**level
        assert _runs_of(layout, level) == _reference_sets(masks, first, bins)
        first += bins
    laid = layout.laid_target
    torch.testing.assert_close(laid, target.reshape(-1)[layout.order.long()], rtol=0, atol=0)
    n = layout.level_lengths(0)
    for a, k in zip((np.cumsum(n) - n).tolist(), n.tolist()):
        assert bool((laid[a + 1 : a + k] >= laid[a : a + k - 1]).all())


@pytest.mark.parametrize("case", ["tiling", "one-range", "gaps", "empty-bins"])
def test_sorted_layout_takes_exactly_the_places_of_its_bins(case):
    # from_sorted has three ways to find the members: bins that tile every image's places,
    # consecutive bins (one range of places per image), and bins with gaps between them
    gen = torch.Generator().manual_seed(7)
    B, P, K = 3, 40, 4
    order = torch.stack([torch.randperm(P, generator=gen) for _ in range(B)]).to(torch.int32)
    values = torch.sort(torch.rand(B, P, generator=gen, dtype=torch.float64), dim=1).values
    bounds = {
        "tiling": [[0, 10, 20, 30, 40]] * B,
        "one-range": [[0, 7, 9, 30, 37], [3, 3, 20, 21, 40], [0, 10, 20, 30, 40]],
        "gaps": [[0, 7, 9, 30, 37], [3, 3, 20, 21, 40], [0, 10, 20, 30, 40]],
        "empty-bins": [[5, 5, 5, 5, 5], [0, 0, 0, 0, 40], [0, 10, 20, 30, 40]],
    }[case]
    start = torch.tensor([b[:-1] for b in bounds])
    end = torch.tensor([b[1:] for b in bounds])
    if case == "gaps":
        end[0, 1] -= 1  # a gap after bin 1 of image 0, and one after bin 0 of image 1
        end[1, 0] -= 2
        start[1, 0] -= 2
    length = end - start
    layout = runs.RunLayout.from_sorted(order, start, length, levels=3, values=values)
    want = [int(b * P + order[b, p]) for b in range(B) for k in range(K) for p in range(start[b, k], end[b, k])]
    assert layout.order.tolist() == want
    laid = [float(values[b, p]) for b in range(B) for k in range(K) for p in range(start[b, k], end[b, k])]
    assert layout.laid_target.tolist() == laid
    assert layout.host_lengths.tolist() == length.reshape(-1).tolist()
    assert layout.num_members == len(want)


@pytest.mark.parametrize("case", ["random", "empty-runs", "short", "one-run", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_segment_sums_equal_float64_sums_of_every_run(case, dtype):
    gen = np.random.default_rng(3)
    lengths = {
        "random": gen.integers(0, 500, 60),
        "empty-runs": np.array([0, 0, 130, 0, 64, 0, 1, 0]),
        "short": np.array([3, 1, 2]),
        "one-run": np.array([100_003]),
        "none": np.array([0, 0]),
    }[case]
    x = torch.from_numpy(gen.standard_normal(int(lengths.sum())) * 3 + 1).to(dtype)
    got = runs.segment_sums(x, runs._Bounds(lengths, "cpu"))
    starts = np.cumsum(lengths) - lengths
    want = torch.tensor([float(x[a : a + k].double().sum()) for a, k in zip(starts, lengths)], dtype=torch.float64)
    assert got.dtype == dtype and got.shape == (lengths.size,)
    torch.testing.assert_close(got.double(), want, rtol=1e-6 if dtype == torch.float32 else 1e-12, atol=1e-5)


def test_segment_sums_of_long_float32_runs_are_as_accurate_as_a_pairwise_sum():
    x = torch.rand(2**20, generator=torch.Generator().manual_seed(4)) + 0.5
    lengths = np.array([2**19 - 7, 7, 2**19])
    got = runs.segment_sums(x, runs._Bounds(lengths, "cpu")).double()
    starts = np.cumsum(lengths) - lengths
    exact = torch.tensor([float(x[a : a + k].double().sum()) for a, k in zip(starts, lengths)], dtype=torch.float64)
    assert float(((got - exact) / exact).abs().max()) < 1e-7
    running = torch.cumsum(x, 0)  # float32, one entry after another: what the blocks avoid
    ends = torch.as_tensor(np.cumsum(lengths) - 1)
    sequential = torch.diff(running.index_select(0, ends).double(), prepend=torch.zeros(1, dtype=torch.float64))
    assert float(((sequential - exact) / exact).abs().max()) > 1e-6


def _lower_median(values: torch.Tensor) -> float:
    return float(values.sort().values[(values.numel() - 1) // 2])


def _level_of(lengths: np.ndarray) -> runs._Level:
    order = torch.arange(int(lengths.sum()), dtype=torch.int32)
    layout = runs.RunLayout(order, torch.as_tensor(lengths), [1], int(lengths.sum()), 1)
    return runs._Level(layout, 0)


@pytest.mark.parametrize("numpy_kernels", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("case", ["skewed", "equal", "ties", "tiny"])
def test_run_lower_medians_match_a_sort_for_any_run_lengths(case, dtype, threads, numpy_kernels, monkeypatch):
    monkeypatch.setattr(runs, "_NUMPY", numpy_kernels)
    gen = torch.Generator().manual_seed(5)
    lengths = {
        "skewed": np.array([0, 1, 2, 3, 5, 40_000, 17, 0, 900, 2, 33_000]),
        "equal": np.full(12, 5_000),
        "ties": np.array([9, 4_000, 1, 0, 12_345]),
        "tiny": np.array([1, 0, 2, 1]),
    }[case]
    M = int(lengths.sum())
    x = torch.randn(M, generator=gen, dtype=dtype) * 100
    if case == "ties":
        x = torch.round(x / 50)
    level = _level_of(lengths)
    slack = level.slack
    extended = torch.zeros(M + 2 * slack, dtype=dtype)
    extended[slack : slack + M] = x
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        ((median, position),) = level.lower_medians([(extended, extended[slack : slack + M], slack, None)], [True])
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(extended[slack : slack + M], x, rtol=0, atol=0)  # never written
    starts = np.cumsum(lengths) - lengths
    for j, (a, k) in enumerate(zip(starts.tolist(), lengths.tolist())):
        if k == 0:
            assert float(median[j]) == 0 and int(position[j]) == M
            continue
        run = x[a : a + k]
        want = _lower_median(run)
        assert float(median[j]) == want
        first = a + int((run == want).nonzero()[0])  # the first member holding it
        assert int(position[j]) == first


def test_selection_rows_never_hold_one_repeated_fill_value():
    """Padding entries are distinct and below/above every member (introselect slows down
    tenfold on rows of one repeated value)."""
    rows = torch.zeros(3, 10, dtype=torch.float32)
    below = torch.tensor([2, 0, 4])
    n = torch.tensor([5, 10, 1])
    low = -1.0 - torch.arange(1, 11, dtype=torch.float32)
    high = 1.0 + torch.arange(1, 11, dtype=torch.float32)
    runs._fill_padding(rows, below, n, low, high)
    for r in range(3):
        b, k = int(below[r]), int(n[r])
        assert (rows[r, :b] < -1).all() and (rows[r, b + k :] > 1).all() and (rows[r, b : b + k] == 0).all()
        pads = torch.cat([rows[r, :b], rows[r, b + k :]])
        assert pads.unique().numel() == pads.numel()


def _loss_fn(context: str | None):
    def fn(pred, target, mask=None):
        if context is None:
            return hdn.ssi_loss(pred, target, mask)
        return hdn.hdn_loss(pred, target, mask, context=context, levels=3)

    return fn




@pytest.mark.parametrize("context", [None, "dr", "dp", "ds"])
def test_fixed_hierarchies_run_on_the_run_core(context):
    g = torch.rand(2, 1, 24, 20) + 1
    p = torch.rand(2, 1, 24, 20, requires_grad=True)
    assert type(_loss_fn(context)(p, g).grad_fn).__name__ == "RunHierarchicalSSIBackward"


def test_general_core_takes_overlapping_pooled_detached_and_non_finite_cases():
    g = torch.rand(1, 1, 8, 8) + 1
    p = torch.rand(1, 1, 8, 8, requires_grad=True)

    def core(loss):
        return type(loss.grad_fn).__name__

    overlapping = torch.tensor([[[[-1.0, 0.0, 0.0, 1.0]]]])  # DR edge at exactly 0 (docs/semantics.md §3 quirk)
    ctx = C.depth_range(overlapping, levels=2)
    assert ctx.overlapping
    assert core(hdn.contexts_loss(torch.rand(1, 1, 1, 4, requires_grad=True), overlapping, None, ctx)) == "HierarchicalSSIBackward"
    assert core(hdn.contexts_loss(p, g, None, C.random_crops(g, generator=torch.Generator().manual_seed(0)))) == "HierarchicalSSIBackward"
    detached = C.spatial_grid(g, levels=2)
    detached.detach_pred_median = True
    assert core(hdn.contexts_loss(p, g, None, detached)) == "HierarchicalSSIBackward"
    bad = p.detach().clone()
    bad[0, 0, 0, 0] = float("inf")
    assert not torch.isfinite(hdn.hdn_loss(bad, g, context="ds", levels=2))


def _sparse_and_skewed_targets() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(6)
    skewed = 1 + 0.1 * torch.rand(2, 1, 64, 48, generator=gen, dtype=torch.float64)
    skewed[..., -1, -1] = 50.0  # one far pixel: almost everything in the first of 8 DR bins
    lidar = bench.scene_target("lidar", 2, 64, seed=1).double()  # ~5 % valid, lower part
    loguniform = bench.scene_target("loguniform", 2, 64, seed=2).double()
    sky = bench.scene_target("sky", 2, 64, seed=3).double()
    return {"skewed": skewed, "lidar": lidar, "loguniform": loguniform, "sky": sky}


@pytest.mark.parametrize("context", ["ssi", "dr", "dp", "ds"])
@pytest.mark.parametrize("scene", ["skewed", "lidar", "loguniform", "sky"])
def test_sparse_and_skewed_targets_stay_on_the_run_core_and_match_the_reference(scene, context):
    target = _sparse_and_skewed_targets()[scene]
    gen = torch.Generator().manual_seed(7)
    pred = torch.randn(target.shape, generator=gen, dtype=torch.float64).requires_grad_(True)
    if context == "ssi":
        loss = hdn.ssi_loss(pred, target)
        want = ref.ssi_loss(pred[:, 0], target[:, 0])
    else:
        loss = hdn.hdn_loss(pred, target, context=context, levels=4)
        want = ref.hdn_loss(pred[:, 0], target[:, 0], context=context, levels=4)
    assert type(loss.grad_fn).__name__ == "RunHierarchicalSSIBackward"
    (got_grad,) = torch.autograd.grad(loss, pred)
    (want_grad,) = torch.autograd.grad(want, pred)
    torch.testing.assert_close(loss, want, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-6, atol=1e-9)


def test_the_core_keeps_no_scratch_memory_between_calls():
    """The only state kept between calls: the two-thread pool and a small cache of DS
    quadtree orders (one int64 per pixel of an image, at most eight image shapes)."""
    g = torch.rand(2, 1, 32, 32) + 1
    p = torch.rand(2, 1, 32, 32)
    runs._quadtree_places.cache_clear()
    first = [hdn.hdn_loss(p, g, context=c, levels=3) for c in ("dr", "ds", "dp")]
    assert runs._quadtree_places.cache_info().currsize == 1
    for size in range(12, 40, 2):  # more shapes than the cache holds
        hdn.hdn_loss(torch.rand(1, 1, size, size), torch.rand(1, 1, size, size) + 1, context="ds", levels=3)
    assert runs._quadtree_places.cache_info().currsize <= 8
    assert [hdn.hdn_loss(p, g, context=c, levels=3) for c in ("dr", "ds", "dp")] == first


def test_losses_from_two_threads_at_once_equal_the_sequential_ones():
    gen = torch.Generator().manual_seed(6)
    batches = [(torch.rand(2, 1, 64, 64, generator=gen), torch.rand(2, 1, 64, 64, generator=gen) + 1) for _ in range(2)]
    want = [hdn.hdn_loss(p, g, context="ds", levels=3) for p, g in batches]
    got = [None, None]

    def run(i):
        for _ in range(5):
            got[i] = hdn.hdn_loss(*batches[i], context="ds", levels=3)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == want




class _LossesInAWorker(torch.utils.data.Dataset):
    """Computes the losses of one batch inside a DataLoader worker."""

    def __init__(self, batches):
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> torch.Tensor:
        p, g = self.batches[i]
        return torch.stack([hdn.hdn_loss(p, g, context=c, levels=3) for c in ("dr", "dp", "ds")] + [hdn.ssi_loss(p, g)])


def test_losses_inside_forked_dataloader_workers_equal_the_parents():
    """DataLoader workers are forks of a parent that has already run the losses (its
    selection pool and torch's threads exist): the pool is made anew in each worker."""
    gen = torch.Generator().manual_seed(8)
    batches = [(torch.rand(2, 1, 96, 96, generator=gen), torch.rand(2, 1, 96, 96, generator=gen) + 1) for _ in range(4)]
    dataset = _LossesInAWorker(batches)
    want = torch.stack([dataset[i] for i in range(len(dataset))])
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=None, num_workers=2, multiprocessing_context=multiprocessing.get_context("fork")
    )
    got = torch.stack(list(loader))
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_losses_after_set_num_threads_changes_equal_the_first_ones():
    gen = torch.Generator().manual_seed(9)
    p, g = torch.rand(2, 1, 96, 96, generator=gen), torch.rand(2, 1, 96, 96, generator=gen) + 1

    def losses():
        return [hdn.hdn_loss(p, g, context=c, levels=3) for c in ("dr", "dp", "ds")] + [hdn.ssi_loss(p, g)]

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        first = losses()
        torch.set_num_threads(1)
        single = losses()
        torch.set_num_threads(2)
        again = losses()
    finally:
        torch.set_num_threads(before)
    assert first == single == again


@pytest.mark.parametrize("context", [None, "dr", "ds"])
def test_gradients_are_fresh_tensors_not_kept_scratch_buffers(context):
    g = torch.rand(2, 1, 64, 64) + 1
    p = torch.rand(2, 1, 64, 64, requires_grad=True)
    _loss_fn(context)(p, g).backward()
    first = p.grad.clone()
    other = torch.rand(2, 1, 64, 64, requires_grad=True)
    _loss_fn(context)(other, g * 3).backward()  # reuses the scratch buffers
    torch.testing.assert_close(p.grad, first, rtol=0, atol=0)


@pytest.mark.parametrize("valid_rows", [64, 20, 0], ids=["dense", "sparse", "empty"])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("batch", [1, 3])
def test_sorted_valid_values_give_the_values_and_order_of_a_stable_sort(batch, threads, valid_rows):
    gen = torch.Generator().manual_seed(9)
    target = torch.randn(batch, 64, 300, generator=gen)  # large enough for the two-thread path
    target[:, :5] = torch.round(target[:, :5] * 2) / 2  # ties
    target[:, 5, :10] = 0.0
    target[:, 5, 10:20] = -0.0  # equal to 0.0, with another bit pattern
    target[:, 6, :7] = float("nan")
    target[:, 6, 7:9] = float("inf")
    valid = torch.isfinite(target)
    valid[:, 7, :3] = False  # masked out: sorts with the invalid pixels
    valid[:, valid_rows:] = False  # at most half valid: only the valid keys are sorted
    if batch > 1:
        valid[1, 3:5] = False  # images with different counts
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        values, count, order = C.sorted_valid_values(target, valid)
        values_t, count_t, order_t = C.sorted_valid_values(target, valid, invalid_tail=False)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(values_t, values) and torch.equal(count_t, count)
    head = torch.arange(order.shape[1]).unsqueeze(0) < count.unsqueeze(1)
    assert torch.equal(order_t[head], order[head])  # the valid places; the rest is unspecified
    assert torch.equal(C.complete_invalid_tail(order_t, count_t, valid), order)
    want_values = torch.sort(torch.where(valid, target, float("inf")).reshape(batch, -1), dim=1).values
    assert order.dtype == torch.int32
    torch.testing.assert_close(count, valid.reshape(batch, -1).sum(1))
    torch.testing.assert_close(values, want_values, rtol=0, atol=0)
    flat = torch.where(valid, target, float("inf")).reshape(batch, -1)
    torch.testing.assert_close(flat.gather(1, order.long()), want_values, rtol=0, atol=0)
    for b in range(batch):
        o = order[b].long()
        assert torch.equal(o.sort().values, torch.arange(o.numel()))  # a permutation
        # ties in pixel order (as the stable sort), except that -0.0 sorts before 0.0
        key = torch.signbit(flat[b]).logical_not().to(torch.int64)  # -0.0 -> 0, 0.0 -> 1
        tie = values[b][1:] == values[b][:-1]
        later = (key[o[1:]] > key[o[:-1]]) | ((key[o[1:]] == key[o[:-1]]) & (o[1:] > o[:-1]))
        assert bool((later | ~tie).all())


def test_sorted_valid_values_of_float64_and_half_free_inputs_use_the_stable_sort():
    target = torch.tensor([[3.0, 1.0, 2.0, 1.0, float("nan")]], dtype=torch.float64)
    values, count, order = C.sorted_valid_values(target, torch.isfinite(target))
    assert values[0, :4].tolist() == [1.0, 1.0, 2.0, 3.0] and int(count) == 4
    assert order[0].tolist() == [1, 3, 2, 0, 4]


def test_finite_is_torch_isfinite_for_every_float_dtype():
    from hdn._validation import finite

    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        info = torch.finfo(dtype)
        x = torch.tensor([0.0, -0.0, 1.0, info.max, -info.max, info.tiny / 2, float("nan"), float("inf"), -float("inf")])
        x = x.to(dtype)
        got = finite(x)
        assert got.dtype == torch.bool and torch.equal(got, torch.isfinite(x))
    assert finite(torch.empty(0)).shape == (0,)


def test_contexts_built_inside_hdn_loss_are_freed_before_the_loss_runs(monkeypatch):
    import weakref

    from hdn import losses

    built = []
    real_build, real_apply = C.build_checked, losses.RunHierarchicalSSI.apply

    def build(*args, **kwargs):
        contexts = real_build(*args, **kwargs)
        built.append(weakref.ref(contexts))
        return contexts

    def apply(*args):
        assert built and built[-1]() is None  # their sorted order (an image batch) is gone
        return real_apply(*args)

    monkeypatch.setattr(C, "build_checked", build)
    monkeypatch.setattr(losses.RunHierarchicalSSI, "apply", apply)
    g = torch.rand(2, 1, 16, 16) + 1
    for name in ("dr", "dp", "ds"):
        hdn.hdn_loss(torch.rand(2, 1, 16, 16), g, context=name, levels=3)
    assert len(built) == 3


@pytest.mark.parametrize("context", [None, "dr", "ds"])
def test_loss_without_gradients_equals_the_loss_with_them(context):
    g = torch.rand(2, 1, 32, 32) + 1
    p = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        plain = _loss_fn(context)(p, g)
    assert plain == _loss_fn(context)(p.clone().requires_grad_(True), g).detach()


@pytest.mark.parametrize("scene", ["dense", "sparse", "skewed", "ties"])
@pytest.mark.parametrize("context", [None, "dr", "dp", "ds"])
def test_torch_kernels_of_cuda_give_the_numpy_kernels_loss_and_gradients(context, scene, monkeypatch):
    """The kernels that run on CUDA (torch.kthvalue, gathers, the median's first column)
    checked on the CPU against NumPy's, for the prediction and the target; with ties, the
    same pixel of a tie group takes the median's gradient."""
    gen = torch.Generator().manual_seed(12)
    g = 1 + torch.rand(2, 1, 45, 38, generator=gen, dtype=torch.float64)
    g[0, 0, :2] = float("nan")
    g[1, 0, 10:20, 5:9] = float("nan")
    if scene == "sparse":
        g[torch.rand(g.shape, generator=gen) < 0.9] = float("nan")
    elif scene == "skewed":
        g = g**8
    p = torch.randn(g.shape, generator=gen, dtype=torch.float64)
    if scene == "ties":
        g, p = torch.round(g * 4) / 4, torch.round(p * 2) / 2

    def run():
        leaf_p, leaf_g = p.clone().requires_grad_(True), g.clone().requires_grad_(True)
        loss = _loss_fn(context)(leaf_p, leaf_g)
        loss.backward()
        return loss.detach(), leaf_p.grad, torch.nan_to_num(leaf_g.grad)

    numpy_path = run()
    monkeypatch.setattr(runs, "_NUMPY", False)
    torch_path = run()
    for a, b in zip(numpy_path, torch_path):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("scene", ["mixed", "dense"])
@pytest.mark.parametrize("numpy_kernels", [True, False])
@pytest.mark.parametrize("piece", [64, 200, 1000])
@pytest.mark.parametrize("reduction", ["mean", "per_image", "none"])
@pytest.mark.parametrize("context", [None, "dr", "dp", "ds"])
def test_levels_in_small_pieces_give_the_loss_and_gradients_of_one_piece(
    context, reduction, piece, numpy_kernels, scene, monkeypatch
):
    """On CPU a level's passes run piece by piece (``runs._PIECE`` members): pieces that cut
    runs, and pieces of whole rows where runs have one length ("dense": fully valid images
    whose DS cells have one size), give the loss and the gradients (prediction and target)
    of the level in one piece."""
    gen = torch.Generator().manual_seed(5)
    if scene == "dense":
        g = 1 + 9 * torch.rand(3, 1, 36, 44, generator=gen, dtype=torch.float64)
    else:
        g = 1 + 9 * torch.rand(3, 1, 37, 45, generator=gen, dtype=torch.float64)
        g[0, 0, :5] = float("nan")
        g[1][torch.rand(37, 45, generator=gen).unsqueeze(0) < 0.8] = float("nan")  # sparse
        g[2] = g[2] ** 3  # skewed
    p = torch.randn(g.shape, generator=gen, dtype=torch.float64)
    weights = torch.rand(g.shape if reduction == "none" else (3,), generator=gen, dtype=torch.float64)
    monkeypatch.setattr(runs, "_NUMPY", numpy_kernels)

    def run():
        leaf_p, leaf_g = p.clone().requires_grad_(True), g.clone().requires_grad_(True)
        if context is None:
            loss = hdn.ssi_loss(leaf_p, leaf_g, reduction=reduction)
        else:
            loss = hdn.hdn_loss(leaf_p, leaf_g, context=context, levels=3, reduction=reduction)
        (loss if reduction == "mean" else loss * weights).sum().backward()
        return loss.detach(), leaf_p.grad, torch.nan_to_num(leaf_g.grad)

    monkeypatch.setattr(runs, "_PIECE", 2**30)
    whole = run()
    monkeypatch.setattr(runs, "_PIECE", piece)
    valid = g[:, 0].isfinite()
    assert len(runs._Level(runs.RunLayout.whole_image(valid), 0).pieces) > 1  # (several pieces)
    for a, b in zip(whole, run()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
