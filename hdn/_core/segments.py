"""The segment core: per-segment medians, scales and SSI-normalised values in one pass.

Every loss in :mod:`hdn` is a thin layer over this file. A *level* assigns pixels to
segments (one segment = one context of one image); the functions here compute, for all
segments of a level at once,

* the shift ``t`` = median over the segment (the LOWER middle value for an even count,
  like :func:`torch.median`), 0 for an empty segment,
* the scale ``s`` = sum |x - t| over the segment divided by ``(n + 1)``,
* the normalised values ``(x - t) / (s + 1e-6)``.

No Python loop over pixels, images or contexts: a level with one context per image takes
its medians per image row (:func:`torch.nanmedian`, a selection) and its sums per row;
other levels use the values' order, made once per call by a radix sort of an
order-preserving integer key, and find each segment's median in a (segment, rank bucket)
histogram; depth-interval levels read their target medians straight off that order.

:class:`HierarchicalSSI` is the autograd function behind :func:`hdn.contexts_loss` for
contexts that are not nested partitions (overlapping DR bins, the random variants, label
maps); DS, DR, DP and SSI run on :mod:`hdn._core.runs`, the same semantics on runs of one pixel order. Its
backward is written out analytically (the derivation is in notebook 04), so that only
per-segment statistics are kept between forward and backward: memory grows with
pixels x levels, not with the number of contexts.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

EPS = 1e-6
"""Added to the scale before dividing, as in the released code."""


class ContextLevel(NamedTuple):
    """One level of contexts for a batch, as per-image context indices.

    Attributes:
        index: ``(M,)`` int64 context index of each entry within its image, in
            ``[0, per_image)``, or ``-1`` for an entry in no context of this level.
        per_image: number of contexts per image at this level (``K``).
        pix: ``None`` when entry ``i`` is pixel ``i`` of the flattened ``(B, H, W)`` batch
            (a partition: ``M = B * H * W``); otherwise ``(M,)`` int64 flat pixel indices, so
            that a pixel may belong to several contexts of the level (overlapping contexts).
    """

    index: Tensor
    per_image: int
    pix: Tensor | None = None


class Segments(NamedTuple):
    """A level resolved against the valid pixels, in the core's internal numbering.

    Entry ``e`` of image ``b`` in context ``k`` has segment id ``b * (K + 1) + k``; entries
    in no context (or invalid) get ``b * (K + 1) + K``, their image's *dummy* slot, whose
    statistics are forced to "empty" so that it contributes nothing.
    """

    seg: Tensor  # (M,) int64
    pix: Tensor | None
    num_slots: int  # B * (K + 1)
    dummy: Tensor  # (num_slots,) bool, True at the dummy slots
    member: Tensor  # (M,) bool, True for entries in a real context
    rows: int | None = None  # B when the level is one context per image holding all its valid pixels


class SegmentStats(NamedTuple):
    """Per-segment statistics of one level, one entry per slot (``B * (K + 1)``)."""

    shift: Tensor  # t, 0 for empty segments and dummies
    inv_scale: Tensor  # 1 / (s + eps) with s = sum |x - t| / (n + 1); 0 for dummies
    median_pixel: Tensor  # flat pixel index of the median entry (0 where empty)
    count: Tensor  # n (int64), 0 for dummies


def value_order(x: Tensor, valid: Tensor, batch: int, *, image_major: bool = True) -> Tensor:
    """Indices that sort a flattened batch by value, ties by position.

    With ``image_major`` the order is by (image, validity, value): each image's valid
    entries ascending, then its invalid ones. Without it, the order is by value alone
    (enough wherever segments are told apart by their ids).

    float32 values map to order-preserving non-negative integer keys, which
    :func:`torch.sort` sorts with a radix sort on CPU: the raw bits when no value is
    negative (then no copy is needed), a sign-folded int64 key otherwise. Other dtypes use
    stable comparison sorts.

    Args:
        x: ``(N,)`` values of ``batch`` equal-size images, finite where valid.
        valid: ``(N,)`` bool.
        batch: number of images ``B``.
        image_major: sort by image first.

    Returns:
        ``(N,)`` int64 permutation.
    """
    n = x.numel()
    if x.dtype == torch.float32 and n:
        bits = x.view(torch.int32)
        non_negative = bool(bits.min() >= 0)  # no negative float (and no -0.0)
        if non_negative and not image_major:
            return torch.sort(bits, stable=True).indices
        if non_negative:
            key = bits.masked_fill(~valid, 2**31 - 1).to(torch.int64)
        else:
            key = torch.where(bits >= 0, bits, bits ^ 0x7FFFFFFF).masked_fill_(~valid, 2**31 - 1)
            key = key.to(torch.int64).add_(2**31)
        if image_major:
            key = key.view(batch, -1)
            key += (torch.arange(batch, device=x.device, dtype=torch.int64) * 2**32).view(batch, 1)
        return torch.sort(key.view(-1), stable=True).indices
    order = torch.sort(x, stable=True).indices
    if image_major and n:
        order = order.index_select(0, torch.sort((~valid).index_select(0, order).to(torch.uint8), stable=True).indices)
        image = torch.div(order, max(n // max(batch, 1), 1), rounding_mode="floor")
        order = order.index_select(0, torch.sort(image, stable=True).indices)
    return order


def resolve_level(level: ContextLevel, valid: Tensor, batch: int) -> Segments:
    """Intersect a level with the valid pixels and number its segments internally.

    Args:
        level: the level.
        valid: ``(N,)`` bool, ``N = B * H * W``.
        batch: ``B``.

    Returns:
        :class:`Segments`.
    """
    K = level.per_image
    slots = batch * (K + 1)
    index_dtype = torch.int32 if slots < 2**31 else torch.int64
    if level.pix is None:
        member = valid & (level.index >= 0)
        local = torch.where(member, level.index.to(index_dtype), K).view(batch, -1)
        base = torch.arange(batch, device=valid.device, dtype=index_dtype).mul_(K + 1).view(batch, 1)
        seg = (local + base).view(-1)
    else:
        pixels_per_image = valid.numel() // max(batch, 1)
        member = valid.index_select(0, level.pix) & (level.index >= 0)
        image = torch.div(level.pix, pixels_per_image, rounding_mode="floor")
        seg = image * (K + 1) + torch.where(member, level.index, K)
    dummy = torch.zeros(batch, K + 1, dtype=torch.bool, device=valid.device)
    dummy[:, K] = True
    whole = level.pix is None and K == 1 and torch.equal(member, valid)
    return Segments(seg.to(torch.int64), level.pix, slots, dummy.reshape(-1), member, batch if whole else None)


def value_rank(order: Tensor) -> Tensor:
    """The inverse permutation of ``order`` (each entry's rank in value order), int32 where it fits."""
    n = order.numel()
    dtype = torch.int32 if n < 2**31 else torch.int64
    rank = torch.empty(n, dtype=dtype, device=order.device)
    return rank.index_copy_(0, order.long(), torch.arange(n, dtype=dtype, device=order.device))


def _segment_select(rank: Tensor, seg: Tensor, count: Tensor, slots: int) -> Tensor:
    """The rank of each segment's lower-median entry, found without sorting the entries.

    The ranks are distinct (a permutation). A histogram of (segment, rank bucket) tells,
    per segment, which bucket holds its ``(n - 1) // 2``-th smallest rank and how many of
    its entries come before that bucket; only the entries of that bucket are then sorted,
    a small fraction of all.

    Args:
        rank: ``(M,)`` distinct ranks in ``[0, N)``.
        seg: ``(M,)`` int64 segment ids in ``[0, slots)``.
        count: ``(slots,)`` entries per segment counted for the median (0 = skip).
        slots: number of segments.

    Returns:
        ``(slots,)`` int64 median rank (0 where ``count`` is 0).
    """
    n_ranks = int(rank.max()) + 1
    # about as many histogram cells as entries (at most 2**18), or one bucket per rank
    budget = min(2**18, max(1024, rank.numel()))
    buckets = max(1, min(n_ranks, budget // max(slots, 1)))
    shift = max(0, math.ceil(math.log2(max(n_ranks / buckets, 1))))
    buckets = (n_ranks - 1 >> shift) + 1
    bucket = rank >> shift
    key = seg * buckets
    key += bucket
    cells = segment_counts(key, slots * buckets).view(slots, buckets)
    del key
    below = torch.cumsum(cells, dim=1)
    wanted = torch.div(count - 1, 2, rounding_mode="floor").clamp(min=0)
    target = torch.searchsorted(below, wanted.unsqueeze(1), right=True).squeeze(1).clamp(max=buckets - 1)
    before = torch.where(target > 0, below.gather(1, (target - 1).clamp(min=0).unsqueeze(1)).squeeze(1), 0)
    candidate = (bucket == target.to(bucket.dtype).index_select(0, seg)).nonzero().squeeze(1)
    del bucket
    cand_seg = seg.index_select(0, candidate)
    cand_rank = rank.index_select(0, candidate).long()
    ordered = torch.sort(cand_seg * n_ranks + cand_rank).indices  # distinct keys: no ties
    per_segment = segment_counts(cand_seg, slots)
    first = torch.cumsum(per_segment, 0) - per_segment
    pick = (first + wanted - before).clamp(0, max(candidate.numel() - 1, 0))
    if candidate.numel() == 0:
        return torch.zeros(slots, dtype=torch.int64, device=seg.device)
    return torch.where(count > 0, cand_rank.index_select(0, ordered.index_select(0, pick)), 0)


def segment_stats(
    x: Tensor,
    order: Tensor | None,
    segments: Segments,
    entries_per_slot: Tensor | None = None,
    *,
    rank: Tensor | None = None,
    ascending: bool = False,
) -> tuple[SegmentStats, Tensor]:
    """Median shift and mean-absolute-deviation scale of every segment of a level.

    Differentiable: the shift is a gather of the median entry, the scale a scatter-add,
    so autograd reaches the median pixel and every pixel through the scale.

    Args:
        x: ``(N,)`` values of the flattened batch (finite).
        order: ``value_order(x, ...)``; unused (may be None) when ``segments.rows`` is set,
            where the medians are taken per image row by :func:`torch.nanmedian`.
        segments: the level, resolved.
        entries_per_slot: ``slot_counts(segments)`` if already known.
        rank: ``value_rank(order)`` if already known.
        ascending: the caller knows that the segment ids are non-decreasing along ``order``
            (e.g. depth intervals along the target's value order), so no sort is needed.

    Returns:
        (:class:`SegmentStats`, ``centered``): ``centered = x - t`` per entry ``(M,)``.
    """
    seg, pix, slots = segments.seg, segments.pix, segments.num_slots
    if entries_per_slot is None:
        entries_per_slot = slot_counts(segments)
    count = entries_per_slot.masked_fill(segments.dummy, 0)
    nonempty = count > 0
    if seg.numel() == 0:
        median_pixel = torch.zeros(slots, dtype=torch.int64, device=x.device)
    elif segments.rows is not None:
        B = segments.rows
        rows = torch.where(segments.member, x.detach(), float("nan")).view(B, -1)
        column = torch.nanmedian(rows, dim=1).indices  # lower median, like torch.median
        del rows
        first_pixel = torch.arange(B, device=x.device) * (seg.numel() // B)
        median_pixel = torch.stack([first_pixel + column, torch.zeros_like(column)], dim=1).reshape(-1)
        median_pixel = median_pixel * nonempty
    elif ascending and pix is None:
        # Segment ids ascend along ``order``: each segment is a run of it, and its median
        # the middle of the run.
        start = torch.cumsum(entries_per_slot, 0) - entries_per_slot  # dummies take their place too
        median_pos = (start + torch.div(count - 1, 2, rounding_mode="floor")).clamp(0, seg.numel() - 1)
        median_pixel = order.index_select(0, median_pos).long() * nonempty
    else:
        if rank is None:
            rank = value_rank(order)
        entry_rank = rank if pix is None else rank.index_select(0, pix)
        median_rank = _segment_select(entry_rank, seg, count, slots)
        median_pixel = order.index_select(0, median_rank).long() * nonempty
    shift = x.index_select(0, median_pixel) * nonempty.to(x.dtype)
    centered = (x if pix is None else x.index_select(0, pix)) - shift.index_select(0, seg)
    if segments.rows is not None:
        abs_dev = _segment_sum(segments, centered.abs())  # non-members are 0 - 0
    else:
        abs_dev = x.new_zeros(slots).scatter_add(0, seg, centered.abs())
    scale = abs_dev / (count + 1).to(x.dtype)
    inv_scale = torch.where(segments.dummy, 0.0, 1.0 / (scale + EPS))
    return SegmentStats(shift, inv_scale, median_pixel, count), centered


def center_entries(x: Tensor, stats: SegmentStats, segments: Segments) -> Tensor:
    """``x - t`` for every entry of a level, ``(M,)``."""
    x_entries = x if segments.pix is None else x.index_select(0, segments.pix)
    return x_entries - stats.shift.index_select(0, segments.seg)


def _accumulate(acc: Tensor, values: Tensor, pix: Tensor | None) -> None:
    if pix is None:
        acc.add_(values)
    else:
        acc.index_add_(0, pix, values)


def _segment_sum(segments: Segments, values: Tensor) -> Tensor:
    """Sum of ``values`` (0 outside contexts) per segment slot, ``(slots,)``."""
    if segments.rows is not None:  # one context per image: row sums, then the dummies' zeros
        row_sums = values.view(segments.rows, -1).sum(1)
        return torch.stack([row_sums, torch.zeros_like(row_sums)], dim=1).reshape(-1)
    return values.new_zeros(segments.num_slots).scatter_add_(0, segments.seg, values)


def slot_counts(segments: Segments) -> Tensor:
    """Entries per segment slot of a level (dummies included), ``(slots,)`` int64."""
    if segments.rows is not None:  # one context per image: members, then the rest of the row
        members = segments.member.view(segments.rows, -1).sum(1)
        return torch.stack([members, segments.member.numel() // segments.rows - members], 1).reshape(-1)
    return segment_counts(segments.seg, segments.num_slots)


def segment_counts(seg: Tensor, slots: int) -> Tensor:
    """Entries per segment, ``(slots,)`` int64 (``bincount`` without its min/max pass)."""
    return torch.zeros(slots, dtype=torch.int64, device=seg.device).scatter_add_(
        0, seg, torch.ones((), dtype=torch.int64, device=seg.device).expand(seg.numel())
    )


def _normalization_backward(
    r: Tensor,
    centered: Tensor,
    stats: SegmentStats,
    segments: Segments,
    grad_x: Tensor,
    through_median: bool,
) -> None:
    """Add to ``grad_x`` the gradient of ``sum(r * x_hat)`` w.r.t. ``x``.

    With ``d = s + eps``, ``x_hat_i = (x_i - t) / d`` and ``s = sum_j |x_j - t| / (n + 1)``:
    ``dL/dx_i = r_i / d + dL/ds * sign(x_i - t) / (n + 1)`` directly,
    ``dL/ds = -sum_i r_i x_hat_i / d`` and
    ``dL/dt = -sum_i r_i / d - dL/ds * sum_i sign(x_i - t) / (n + 1)``, which goes to
    the median pixel (unless the median is detached).

    ``r`` and ``centered`` (``x - t`` per entry) are overwritten.
    """
    seg = segments.seg
    inv = stats.inv_scale
    n1 = (stats.count + 1).to(r.dtype)
    sign = torch.sign(centered).to(torch.int8)
    sum_r = _segment_sum(segments, r) if through_median else None
    # sum_i r_i x_hat_i / d = inv**2 * sum_i r_i (x_i - t)
    d_scale_per_n = -_segment_sum(segments, centered.mul_(r)) * inv * inv / n1  # 0 at dummies
    del centered
    per_entry = r.mul_(inv.index_select(0, seg))
    per_entry += d_scale_per_n.index_select(0, seg).mul_(sign)
    _accumulate(grad_x, per_entry, segments.pix)
    del per_entry
    if through_median:
        sum_sign = _segment_sum(segments, sign.to(r.dtype))
        d_shift = (-sum_r * inv - d_scale_per_n * sum_sign) * (stats.count > 0)
        grad_x.index_add_(0, stats.median_pixel, d_shift)


class HierarchicalSSI(torch.autograd.Function):
    """Sum over contexts of ``|p_hat - g_hat|``, aggregated as the HDN papers do.

    ``forward(pred, target, valid, contexts)`` with flat ``(N,)`` inputs; ``contexts`` is an
    :class:`hdn.contexts.Contexts` for the same ``(B, H, W)``. Aggregations:

    * ``"mean"`` (HDN): each pixel's loss is the mean of its per-context losses over the
      contexts that contain it; the result is the sum over pixels divided by the number of
      valid pixels of the batch.
    * ``"pooled"`` (random-context variants): the sum of all (context, pixel) losses divided
      by the number of such pairs.

    Per pixel, the loss map is ``m_i = a_i * sum_{C containing i} |p_hat_i - g_hat_i|`` with
    ``a_i = 1 / |C_i|`` (``"mean"``: the pixel's mean over its contexts) or ``a_i = N_v / P``
    (``"pooled"``: ``P`` pairs), so that ``sum_i m_i / N_v`` is the loss in both cases.
    ``reduction`` (see :data:`hdn._core.runs.REDUCTIONS`): ``"mean"`` that loss, ``"sum"``
    ``sum_i m_i``, ``"per_image"`` ``(B,)`` image ``b``'s ``sum_i m_i / N_v,b`` (``image_valid``,
    0 for an image without valid pixels), ``"none"`` the map ``(N,)``.

    A batch without any valid pixel (or without any pair) gives 0 and a zero gradient.
    """

    @staticmethod
    def forward(ctx, pred: Tensor, target: Tensor, valid: Tensor, contexts, reduction: str = "mean", image_valid: Tensor | None = None) -> Tensor:  # type: ignore[override]
        B = contexts.shape[0]
        zero = torch.zeros((), dtype=pred.dtype, device=pred.device)
        p = torch.where(valid, pred, zero)
        g = torch.where(valid, target, zero)
        # Value orders and ranks are made when a level first needs them.
        order_p = rank_p = rank_g = None
        # Contexts built from the target may carry its value order (same valid pixels).
        order_g = getattr(contexts, "target_order", None)
        target_sorted = order_g is not None and torch.equal(valid, contexts.valid.reshape(-1))
        if not target_sorted:
            order_g = None
        # levels whose ids ascend along the target's order need no sort for its medians
        target_sorted = target_sorted and getattr(contexts, "sorted_by_target_order", False)
        pooled = contexts.aggregation == "pooled"
        per_pixel = not pooled or reduction in ("per_image", "none")  # the pooled mean needs no map
        loss_sum = torch.zeros_like(p)
        in_contexts = torch.zeros(p.shape, dtype=torch.uint8, device=p.device)  # levels per pixel
        saved = []
        pooled_total = zero.clone()
        n_pairs = 0
        for level_index in range(contexts.num_levels):
            segments = resolve_level(contexts.level(level_index), valid, B)
            entries_per_slot = slot_counts(segments)
            if segments.rows is not None:  # one context per image: row medians, no order needed
                sp, p_hat = segment_stats(p, None, segments, entries_per_slot)
                sg, g_hat = segment_stats(g, None, segments, entries_per_slot)
            else:
                if order_p is None:
                    order_p = value_order(p, valid, B, image_major=False)
                    rank_p = value_rank(order_p)
                    order_p = order_p.to(rank_p.dtype)  # only a few entries are read from now on
                sp, p_hat = segment_stats(p, order_p, segments, entries_per_slot, rank=rank_p)
                if not target_sorted and rank_g is None:
                    order_g = value_order(g, valid, B)
                    rank_g = value_rank(order_g)
                    order_g = order_g.to(rank_g.dtype)
                sg, g_hat = segment_stats(
                    g, order_g, segments, entries_per_slot, rank=rank_g, ascending=target_sorted
                )
            diff = p_hat.mul_(sp.inv_scale.index_select(0, segments.seg))
            diff.sub_(g_hat.mul_(sg.inv_scale.index_select(0, segments.seg)))
            del g_hat, p_hat
            saved.append((sp, sg, torch.sign(diff).to(torch.int8)))
            entry_loss = diff.abs_()  # 0 outside contexts, where both are 0
            if pooled:
                pooled_total = pooled_total + entry_loss.sum()
                n_pairs += int(sp.count.sum())
            if per_pixel:
                _accumulate(loss_sum, entry_loss, segments.pix)
            if not pooled:
                _accumulate(in_contexts, segments.member.to(torch.uint8), segments.pix)
            del entry_loss, diff, segments, entries_per_slot
        del order_p, order_g, rank_p, rank_g
        n_valid = int(valid.sum())
        # ``weight``: d loss / d (context, pixel) loss, per pixel, for a unit gradient of the
        # scalar ("mean", "sum"); for "per_image" and "none" the map's a_i, scaled in the backward
        if pooled:
            a = n_valid / n_pairs if n_pairs else 0.0
            if reduction == "mean":
                loss = pooled_total / n_pairs if n_pairs else zero
                weight = torch.full_like(p, 1.0 / n_pairs if n_pairs else 0.0)
            elif reduction == "sum":
                loss = pooled_total * a
                weight = torch.full_like(p, a)
            else:
                loss_map = loss_sum.mul_(a)
                weight = torch.full_like(p, a)
        else:
            weight = in_contexts.clamp_(min=1).to(p.dtype).reciprocal_()
            del in_contexts
            loss_map = loss_sum.mul_(weight)
            if reduction == "mean":
                loss = loss_map.sum() / n_valid if n_valid else zero
                weight = weight.mul_(1.0 / n_valid) if n_valid else weight.zero_()
            elif reduction == "sum":
                loss = loss_map.sum()
        scale = None
        if reduction == "per_image":
            counts = image_valid.to(p.dtype)
            scale = torch.where(counts > 0, 1.0 / counts.clamp(min=1), 0.0)  # (B,)
            loss = loss_map.view(B, -1).sum(1) * scale
        elif reduction == "none":
            loss = loss_map
        del loss_sum
        ctx.contexts = contexts
        ctx.saved = saved
        ctx.reduction, ctx.scale = reduction, scale
        ctx.save_for_backward(p, g, valid, weight)
        return loss

    @staticmethod
    def backward(ctx, grad_output: Tensor):  # type: ignore[override]
        p, g, valid, weight = ctx.saved_tensors
        contexts = ctx.contexts
        B = contexts.shape[0]
        need_p, need_g = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_p = torch.zeros_like(p) if need_p else None
        grad_g = torch.zeros_like(g) if need_g else None
        if ctx.reduction == "per_image":  # d out_b / d m_i = 1 / N_v,b for the pixels of image b
            weight = (weight.view(B, -1) * (grad_output * ctx.scale).unsqueeze(1)).view(-1)
            grad_output = torch.ones((), dtype=weight.dtype, device=weight.device)
        elif ctx.reduction == "none":
            weight = weight * grad_output.reshape(-1)
            grad_output = torch.ones((), dtype=weight.dtype, device=weight.device)
        if need_p or need_g:
            for level_index, (sp, sg, diff_sign) in enumerate(ctx.saved):
                segments = resolve_level(contexts.level(level_index), valid, B)
                w = weight if segments.pix is None else weight.index_select(0, segments.pix)
                # d loss / d p_hat (0 outside contexts); d loss / d g_hat is its negative
                r = diff_sign.to(w.dtype).mul_(w).mul_(grad_output)
                if need_g:
                    _normalization_backward(
                        -r, center_entries(g, sg, segments), sg, segments, grad_g, through_median=True
                    )
                if need_p:
                    _normalization_backward(
                        r, center_entries(p, sp, segments), sp, segments, grad_p,
                        through_median=not contexts.detach_pred_median,
                    )
                del r, segments
        return grad_p, grad_g, None, None, None, None
