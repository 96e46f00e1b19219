"""The row core (hdn._core.rows): layouts, row selections, and when the loss uses it.

Values and gradients of the losses that run on it are pinned against the reference in
test_exactness.py and test_gradcheck.py; these tests pin the pieces.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

import hdn
from hdn import contexts as C
from hdn import reference as ref
from hdn._core import rows

SHAPES = ((1, 5, 7), (2, 9, 31), (3, 16, 20), (1, 33, 17))


def _numbering(layout: rows.RowLayout) -> torch.Tensor:
    """Every pixel's flat index, laid out (a GatherLayout lays out once)."""
    numbers = torch.arange(layout.num_pixels, dtype=torch.float64)
    return layout.gather_pair(numbers, numbers)[0]


def _member_sets(layout: rows.RowLayout, laid: torch.Tensor, group: int) -> list[set[int]]:
    """The pixels of every row of the ``group`` view."""
    member = layout.member
    R = laid.shape[0] // group
    laid, member = laid.reshape(R, -1), member.reshape(R, -1)
    return [set(laid[r][member[r]].long().tolist()) for r in range(R)]


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
def test_grid_layout_rows_are_the_spec_cells_at_every_level(shape, levels):
    if 2 ** (levels - 1) > min(shape[1:]):
        pytest.skip("grid finer than the image")
    valid = torch.rand(shape, generator=torch.Generator().manual_seed(1)) > 0.2
    layout = rows.GridLayout(valid, levels)
    masks = [m & valid for m in ref.ds_contexts(shape, levels)]
    laid = _numbering(layout)
    first = 0
    for level, group in enumerate(layout.groups):
        cells = 4**level
        want = {frozenset(s) for s in _reference_sets(masks, first, cells)}
        got = {frozenset(s) for s in _member_sets(layout, laid, group)}
        assert got == want
        first += cells


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("permuted", [True, False])
def test_grid_layout_scatter_undoes_gather_with_either_quadtree_path(shape, permuted, monkeypatch):
    if not permuted:  # the index over the cells, used past 11 levels
        monkeypatch.setattr(rows, "_MAX_PERMUTED_BITS", 0)
    levels = 3
    layout = rows.GridLayout(torch.ones(shape, dtype=torch.bool), levels)
    x = torch.randn(shape).reshape(-1)
    laid = layout.gather(x) * layout.member  # padding repeats pixels: zero it as the loss does
    torch.testing.assert_close(layout.scatter(laid), x, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["dr", "dp"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_interval_layout_rows_are_the_bins_at_every_level(name, shape):
    gen = torch.Generator().manual_seed(2)
    target = 1 + 3 * torch.rand(shape, generator=gen, dtype=torch.float64)
    target[0, 0, :2] = float("nan")
    levels = 3
    ctx = C.build(name, target, levels=levels)
    layout = ctx.row_layout(ctx.valid)
    assert isinstance(layout, rows.GatherLayout)
    valid = ref.valid_mask(target)
    masks = ref.contexts_by_name(name, torch.where(valid, target, 0), valid, levels)
    masks = [m & valid for m in masks]
    laid = _numbering(layout)
    first = 0
    for level, group in enumerate(layout.groups):
        bins = 2**level
        assert _member_sets(layout, laid, group) == _reference_sets(masks, first, bins)
        first += bins


def test_interval_layout_padding_reads_minus_then_plus_infinity_and_inverse_finds_every_member():
    target = torch.tensor([[[1.0, 1.1, 1.2, 1.3, 5.0, 9.0, 10.0]]])
    ctx = C.depth_range(target, levels=2)
    layout = ctx.row_layout(ctx.valid)
    x = torch.arange(7, dtype=torch.float64)
    laid, _ = layout.gather_pair(x, x)
    member = layout.member
    for r in range(laid.shape[0]):
        f, n = int(layout.front[r]), int(layout.length[r])
        assert torch.isneginf(laid[r, :f]).all() and torch.isposinf(laid[r, f + n :]).all()
        assert bool(member[r, f : f + n].all()) and int(member[r].sum()) == n
    flat = laid.reshape(-1)
    inside = layout.inverse < flat.numel()
    assert not bool(inside[6])  # the maximum depth is in no bin
    torch.testing.assert_close(flat[layout.inverse[inside].long()], x[inside], rtol=0, atol=0)


def _lower_median(values: torch.Tensor) -> float:
    return float(values.sort().values[(values.numel() - 1) // 2])


@pytest.mark.parametrize("spread", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("threads", [1, 2])
def test_row_lower_medians_match_a_sort_for_any_member_count(dtype, threads, spread):
    gen = torch.Generator().manual_seed(3)
    R, W = 40, 3000  # large enough for the two-thread path
    values = [torch.randn(R, W, generator=gen, dtype=dtype), torch.randint(0, 5, (R, W), generator=gen).to(dtype)]
    member = torch.rand(R, W, generator=gen) > torch.rand(R, 1, generator=gen)
    member[0] = False  # a row without members
    member[1] = True  # a full row
    member[2, 1:] = False  # one member
    count = member.sum(1)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    bounds = [(float(x.min()), float(x.max())) for x in values] if spread else None
    try:
        picked = rows.row_lower_medians(values, member, count, bounds=bounds)
    finally:
        torch.set_num_threads(before)
    for x, (median, column) in zip(values, picked):
        for r in range(R):
            if count[r] == 0:
                assert median[r] == 0
                continue
            want = _lower_median(x[r][member[r]])
            assert float(median[r]) == want
            assert bool(member[r, column[r]]) and float(x[r, column[r]]) == want


@pytest.mark.parametrize("groups_log", [0, 1, 2, 3])
def test_swing_entries_put_every_level_median_at_the_middle_column(groups_log):
    gen = torch.Generator().manual_seed(4)
    K = 8
    lengths = torch.randint(0, 40, (2, K), generator=gen)
    lengths[0, 3] = 0
    width = int(lengths.max())
    P = int(lengths.sum(1).max()) + 3
    order = torch.stack([torch.randperm(P, generator=gen) for b in range(2)])
    start = torch.cumsum(lengths, dim=1) - lengths
    layout = rows.GatherLayout.from_sorted(order, start, lengths, width, levels=4)
    x = torch.randn(2 * P, dtype=torch.float64)
    laid, _ = layout.gather_pair(x, x)
    group = 2**groups_log
    layout.set_swing(laid, group)
    R = laid.shape[0] // group
    work = rows._Workspace(laid)
    ((median, column),) = rows.padded_row_lower_medians([laid.view(R, -1)], work)
    member = layout.member.view(R, -1)
    for r in range(R):
        members = laid.view(R, -1)[r][member[r]]
        if members.numel():
            assert float(median[r]) == _lower_median(members)
            assert bool(member[r, column[r]])


def test_spread_ramps_stay_outside_the_bounds_and_give_up_before_overflowing():
    low, high = rows._spread_ramps((-2.0, 5.0), 1000, np.float32)
    assert (low < -2).all() and (high > 5).all()
    assert len(np.unique(low)) == 1000 and len(np.unique(high)) == 1000
    assert rows._spread_ramps((-3e38, 3e38), 100_000, np.float32) is None
    assert rows._spread_ramps(None, 10, np.float32) is None


def _loss_fn(context: str | None):
    def fn(pred, target, mask=None):
        if context is None:
            return hdn.ssi_loss(pred, target, mask)
        return hdn.hdn_loss(pred, target, mask, context=context, levels=3)

    return fn


@pytest.mark.parametrize("context", [None, "dr", "dp", "ds"])
def test_fixed_hierarchies_run_on_the_row_core(context):
    g = torch.rand(2, 1, 24, 20) + 1
    p = torch.rand(2, 1, 24, 20, requires_grad=True)
    assert type(_loss_fn(context)(p, g).grad_fn).__name__ == "RowHierarchicalSSIBackward"


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


def test_a_bin_that_would_pad_the_rows_past_twice_the_pixels_leaves_the_row_core_and_stays_exact():
    gen = torch.Generator().manual_seed(5)
    target = 1 + 0.1 * torch.rand(1, 1, 64, 64, generator=gen)
    target[..., -1, -1] = 50.0  # one far pixel: almost everything in the first of 8 bins
    target = target.double()
    pred = torch.randn(target.shape, generator=gen, dtype=torch.float64)
    ctx = C.depth_range(target, levels=4)
    assert ctx.row_layout(ctx.valid) is None
    torch.testing.assert_close(
        hdn.hdn_loss(pred, target, context="dr", levels=4), ref.hdn_loss(pred[:, 0], target[:, 0], context="dr", levels=4)
    )


def test_scratch_buffers_kept_between_calls_change_no_result_and_can_be_released():
    g = torch.rand(2, 1, 32, 32) + 1
    p = torch.rand(2, 1, 32, 32)
    first = [hdn.hdn_loss(p, g, context=c, levels=3) for c in ("dr", "ds", "dp")]
    again = [hdn.hdn_loss(p, g, context=c, levels=3) for c in ("dr", "ds", "dp")]
    rows.clear_workspace()
    fresh = [hdn.hdn_loss(p, g, context=c, levels=3) for c in ("dr", "ds", "dp")]
    assert first == again == fresh


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



@pytest.mark.parametrize("name", ["dr", "dp"])
def test_bin_medians_read_at_build_time_equal_the_selected_ones_and_follow_the_target(name):
    gen = torch.Generator().manual_seed(8)
    g = 1 + torch.rand(2, 1, 40, 50, generator=gen, dtype=torch.float64)
    g[0, 0, :3] = float("nan")
    p = torch.randn(g.shape, generator=gen, dtype=torch.float64)
    ctx = C.build(name, g, levels=4)
    assert ctx.row_layout(ctx.valid, g[:, 0]).target_medians is not None
    assert ctx.row_layout(ctx.valid, g[:, 0].clone()).target_medians is None  # another tensor: selected

    def loss_and_grad(target):
        leaf = p.clone().requires_grad_(True)
        loss = hdn.contexts_loss(leaf, target, None, ctx)
        loss.backward()
        return loss.detach(), leaf.grad

    known, selected = loss_and_grad(g), loss_and_grad(g.clone())
    torch.testing.assert_close(known, selected, rtol=1e-12, atol=0)
    g[1, 0, 5, 5] += 0.5  # changed in place after the contexts were built: no longer trusted
    assert ctx.row_layout(ctx.valid, g[:, 0]).target_medians is None


@pytest.mark.parametrize("context", [None, "dr", "ds"])
def test_gradients_are_fresh_tensors_not_kept_scratch_buffers(context):
    g = torch.rand(2, 1, 64, 64) + 1
    p = torch.rand(2, 1, 64, 64, requires_grad=True)
    _loss_fn(context)(p, g).backward()
    first = p.grad.clone()
    other = torch.rand(2, 1, 64, 64, requires_grad=True)
    _loss_fn(context)(other, g * 3).backward()  # reuses the scratch buffers
    torch.testing.assert_close(p.grad, first, rtol=0, atol=0)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("batch", [1, 3])
def test_sorted_valid_values_give_the_values_and_order_of_a_stable_sort(batch, threads):
    gen = torch.Generator().manual_seed(9)
    target = torch.randn(batch, 64, 300, generator=gen)  # large enough for the two-thread path
    target[:, :5] = torch.round(target[:, :5] * 2) / 2  # ties
    target[:, 5, :10] = 0.0
    target[:, 5, 10:20] = -0.0  # equal to 0.0, with another bit pattern
    target[:, 6, :7] = float("nan")
    target[:, 6, 7:9] = float("inf")
    valid = torch.isfinite(target)
    valid[:, 7, :3] = False  # masked out: sorts with the invalid pixels
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        values, count, order = C.sorted_valid_values(target, valid)
    finally:
        torch.set_num_threads(before)
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


@pytest.mark.parametrize("name", ["dr", "dp"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_target_laid_out_from_the_sorted_depths_equals_the_gathered_target(name, dtype):
    gen = torch.Generator().manual_seed(10)
    g = (1 + torch.rand(3, 1, 30, 41, generator=gen)).to(dtype)
    g[1, 0, :4] = float("nan")
    ctx = C.build(name, g, levels=4)
    copied = ctx.row_layout(ctx.valid, g[:, 0])  # the same target: copied from the sorted depths
    gathered = ctx.row_layout(ctx.valid, g[:, 0].clone())  # another tensor: gathered pixel by pixel
    assert copied.laid_target is not None and gathered.laid_target is None
    flat = g.reshape(-1)
    P1, G1 = copied.gather_pair(flat, flat)
    P2, G2 = gathered.gather_pair(flat, flat)
    torch.testing.assert_close(G1, G2, rtol=0, atol=0)  # padding (-inf, +inf) included
    torch.testing.assert_close(P1, P2, rtol=0, atol=0)
    torch.testing.assert_close(copied.inverse, gathered.inverse, rtol=0, atol=0)


def _medians_one_level_at_a_time(layout, P, G, counts):
    """Each level's medians as the per-level functions give them (the reference for the
    all-levels round)."""
    S = P.shape[0]
    out = []
    for group, n in zip(layout.groups, counts):
        R = S // group
        if isinstance(layout, rows.GridLayout):
            picked = rows.row_lower_medians([P.view(R, -1), G.view(R, -1)], layout.member.view(R, -1), n)
        else:
            laid = [P.clone(), G.clone()]
            for x in laid:
                layout.set_swing(x, group)
            work = rows._Workspace(P)
            picked = [(t.masked_fill(n == 0, 0), c) for t, c in rows.padded_row_lower_medians([x.view(R, -1) for x in laid], work)]
        out.append(picked)
    return out


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("case", ["ds", "ds-sparse", "dr", "dp", "dr-known"])
def test_all_levels_selected_in_one_round_equal_one_level_at_a_time(case, threads):
    gen = torch.Generator().manual_seed(11)
    g = 1 + torch.rand(2, 1, 90, 70, generator=gen)  # large enough for the two-thread path
    g[0, 0, :3] = float("nan")
    if case == "ds-sparse":
        g[torch.rand(g.shape, generator=gen) < 0.9] = float("nan")  # many fills: spread
    p = torch.randn(g.shape, generator=gen)
    name = case.split("-")[0]
    ctx = C.build(name, g, levels=4)
    layout = ctx.row_layout(ctx.valid, g[:, 0] if case == "dr-known" else None)
    if name != "ds":
        assert (layout.target_medians is not None) == (case == "dr-known")
    P, G = layout.gather_pair(p.reshape(-1), torch.nan_to_num(g.reshape(-1)))
    S = P.shape[0]
    counts = [layout.length.view(S // group, group).sum(1) for group in layout.groups]
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = layout.level_medians(P, G, counts, rows._Workspace(P), target_column=True)
        without = layout.level_medians(P, G, counts, rows._Workspace(P), target_column=False)
    finally:
        torch.set_num_threads(before)
    want = _medians_one_level_at_a_time(layout, P, G, counts)
    member = layout.member
    for level, group in enumerate(layout.groups):
        R = S // group
        for k, x in enumerate((P, G)):
            (t, col), (t_want, _) = got[level][k], want[level][k]
            torch.testing.assert_close(t, t_want.to(t.dtype), rtol=0, atol=0)
            rows_with_members = counts[level] > 0
            at = col[rows_with_members]
            assert bool(member.view(R, -1)[rows_with_members].gather(1, at.unsqueeze(1)).all())
            torch.testing.assert_close(x.view(R, -1)[rows_with_members].gather(1, at.unsqueeze(1)).squeeze(1), t[rows_with_members])
        torch.testing.assert_close(without[level][1][0], got[level][1][0], rtol=0, atol=0)
        assert without[level][1][1] is None and without[level][0][1] is not None


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
    real_build, real_apply = C.build_checked, losses.RowHierarchicalSSI.apply

    def build(*args, **kwargs):
        contexts = real_build(*args, **kwargs)
        built.append(weakref.ref(contexts))
        return contexts

    def apply(*args):
        assert built and built[-1]() is None  # their sorted order (an image batch) is gone
        return real_apply(*args)

    monkeypatch.setattr(C, "build_checked", build)
    monkeypatch.setattr(losses.RowHierarchicalSSI, "apply", apply)
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


@pytest.mark.parametrize("context", [None, "dr", "dp", "ds"])
def test_torch_selection_path_of_cuda_gives_the_numpy_path_loss_and_gradients(context, monkeypatch):
    """The selections that run on CUDA (torch.kthvalue, swing entries written into the
    tensors) checked on the CPU against NumPy's, for the prediction and the target."""
    gen = torch.Generator().manual_seed(12)
    g = 1 + torch.rand(2, 1, 45, 38, generator=gen, dtype=torch.float64)
    g[0, 0, :2] = float("nan")
    g[1, 0, 10:20, 5:9] = float("nan")  # outside entries inside the grid
    p = torch.randn(g.shape, generator=gen, dtype=torch.float64)

    def run():
        leaf_p, leaf_g = p.clone().requires_grad_(True), g.clone().requires_grad_(True)
        loss = _loss_fn(context)(leaf_p, leaf_g)
        loss.backward()
        return loss.detach(), leaf_p.grad, torch.nan_to_num(leaf_g.grad)

    numpy_path = run()
    monkeypatch.setattr(rows, "_NUMPY_SELECTION", False)
    torch_path = run()
    for a, b in zip(numpy_path, torch_path):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
