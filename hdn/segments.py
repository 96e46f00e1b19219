"""The segment core: per-segment medians, scales and SSI-normalised values in one pass.

Every loss in :mod:`hdn` is a thin layer over this file. A *level* assigns pixels to
segments (one segment = one context of one image); the functions here compute, for all
segments of a level at once,

* the shift ``t`` = median over the segment (the LOWER middle value for an even count,
  like :func:`torch.median`), 0 for an empty segment,
* the scale ``s`` = sum |x - t| over the segment divided by ``(n + 1)``,
* the normalised values ``(x - t) / (s + 1e-6)``.

Segments are found by sorting, never by a Python loop: the values are ordered once per
call (a radix sort of an order-preserving integer key), and each level only needs a
stable sort of its small integer segment ids in that order.

:class:`HierarchicalSSI` is the autograd function behind :func:`hdn.hdn_loss`. Its
backward is written out analytically (the derivation is in notebook 04), so that only
per-segment statistics are kept between forward and backward: memory grows with
pixels x levels, not with the number of contexts.
"""

from __future__ import annotations

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


class SegmentStats(NamedTuple):
    """Per-segment statistics of one level, one entry per slot (``B * (K + 1)``)."""

    shift: Tensor  # t, 0 for empty segments and dummies
    inv_scale: Tensor  # 1 / (s + eps) with s = sum |x - t| / (n + 1); 0 for dummies
    median_pixel: Tensor  # flat pixel index of the median entry (0 where empty)
    count: Tensor  # n (int64), 0 for dummies


def value_order(x: Tensor, image_of: Tensor | None = None, valid: Tensor | None = None) -> Tensor:
    """Indices that sort a flat tensor by (image, validity, value), ties by position.

    float32 values map to an order-preserving non-negative int64 key, which
    :func:`torch.sort` sorts with a radix sort on CPU; other dtypes use stable sorts.

    Args:
        x: ``(N,)`` floating tensor without NaN at valid entries.
        image_of: optional ``(N,)`` int64 image index of each entry (major key).
        valid: optional ``(N,)`` bool; invalid entries sort after the valid ones of their image.

    Returns:
        ``(N,)`` int64 permutation.
    """
    if x.dtype == torch.float32:
        bits = x.view(torch.int32).to(torch.int64)
        key = torch.where(bits >= 0, bits + 2**31, -1 - bits)
        if valid is not None:
            key = torch.where(valid, key, 2**32 - 1)
        if image_of is not None:
            key = key + image_of * 2**32
        return torch.sort(key, stable=True).indices
    order = torch.sort(x, stable=True).indices
    if valid is not None:
        order = order.index_select(0, torch.sort((~valid).index_select(0, order).to(torch.uint8), stable=True).indices)
    if image_of is not None:
        order = order.index_select(0, torch.sort(image_of.index_select(0, order), stable=True).indices)
    return order


def _small_ints(x: Tensor, upper: int) -> Tensor:
    """The same non-negative integers (< ``upper``) in the narrowest dtype that sorts fast."""
    if upper < 2**15:
        return x.to(torch.int16)
    if upper < 2**31:
        return x.to(torch.int32)
    return x


def resolve_level(level: ContextLevel, valid: Tensor, image_of: Tensor, pixels_per_image: int) -> Segments:
    """Intersect a level with the valid pixels and number its segments internally.

    Args:
        level: the level.
        valid: ``(N,)`` bool, ``N = B * pixels_per_image``.
        image_of: ``(N,)`` int64 image index of each pixel.
        pixels_per_image: ``H * W``.

    Returns:
        :class:`Segments`.
    """
    K = level.per_image
    B = valid.numel() // max(pixels_per_image, 1)
    if level.pix is None:
        inside, image = valid, image_of
    else:
        inside, image = valid.index_select(0, level.pix), torch.div(level.pix, pixels_per_image, rounding_mode="floor")
    local = torch.where(inside & (level.index >= 0), level.index, K)
    seg = image * (K + 1) + local
    dummy = torch.zeros(B, K + 1, dtype=torch.bool, device=valid.device)
    dummy[:, K] = True
    return Segments(seg, level.pix, B * (K + 1), dummy.reshape(-1))


def segment_stats(x: Tensor, order: Tensor, segments: Segments) -> SegmentStats:
    """Median shift and mean-absolute-deviation scale of every segment of a level.

    Differentiable: the shift is a gather of the median entry, the scale a scatter-add,
    so autograd reaches the median pixel and every pixel through the scale.

    Args:
        x: ``(N,)`` values of the flattened batch (finite).
        order: ``value_order(x, ...)``.
        segments: the level, resolved.

    Returns:
        :class:`SegmentStats`.
    """
    seg, pix, slots = segments.seg, segments.pix, segments.num_slots
    entries_per_slot = torch.bincount(seg, minlength=slots)
    count = entries_per_slot.masked_fill(segments.dummy, 0)
    n_entries = seg.numel()
    if pix is None:
        # Entries are pixels: walk them in value order; a stable sort by segment id then
        # lists every segment's values in ascending order. Skip the sort when the ids are
        # already ascending in that order (interval contexts of the target are).
        in_order = _small_ints(seg.index_select(0, order), slots)
        if n_entries > 1 and bool((in_order[1:] >= in_order[:-1]).all()):
            by_segment = None
        else:
            by_segment = torch.sort(in_order, stable=True).indices
    else:
        rank = torch.empty_like(order)
        rank.index_copy_(0, order, torch.arange(order.numel(), device=order.device))
        key = seg * order.numel() + rank.index_select(0, pix)
        by_segment = torch.sort(key, stable=True).indices
    start = torch.cumsum(entries_per_slot, 0) - entries_per_slot  # dummies take their place too
    nonempty = count > 0
    median_pos = (start + torch.div(count - 1, 2, rounding_mode="floor")).clamp(0, max(n_entries - 1, 0))
    if n_entries == 0:
        median_pixel = torch.zeros(slots, dtype=torch.int64, device=x.device)
    else:
        pos = median_pos if by_segment is None else by_segment.index_select(0, median_pos)
        median_pixel = (order if pix is None else pix).index_select(0, pos)
        median_pixel = median_pixel * nonempty
    shift = x.index_select(0, median_pixel) * nonempty.to(x.dtype)
    centered = (x if pix is None else x.index_select(0, pix)) - shift.index_select(0, seg)
    abs_dev = torch.zeros(slots, dtype=x.dtype, device=x.device).scatter_add(0, seg, centered.abs())
    scale = abs_dev / (count + 1).to(x.dtype)
    inv_scale = torch.where(segments.dummy, 0.0, 1.0 / (scale + EPS))
    return SegmentStats(shift, inv_scale, median_pixel, count)


def normalize_entries(x: Tensor, stats: SegmentStats, segments: Segments) -> tuple[Tensor, Tensor]:
    """``(x - t)`` and ``(x - t) / (s + eps)`` for every entry of a level, ``(M,)`` each;
    entries in no context get 0."""
    seg = segments.seg
    x_entries = x if segments.pix is None else x.index_select(0, segments.pix)
    centered = x_entries - stats.shift.index_select(0, seg)
    return centered, centered * stats.inv_scale.index_select(0, seg)


def _accumulate(acc: Tensor, values: Tensor, pix: Tensor | None) -> None:
    if pix is None:
        acc.add_(values)
    else:
        acc.index_add_(0, pix, values)


def _normalization_backward(
    grad_hat: Tensor,
    centered: Tensor,
    x_hat: Tensor,
    stats: SegmentStats,
    segments: Segments,
    grad_x: Tensor,
    through_median: bool,
) -> None:
    """Add to ``grad_x`` the gradient of ``sum(grad_hat * x_hat)`` w.r.t. ``x``.

    With ``d = s + eps``, ``x_hat_i = (x_i - t) / d`` and ``s = sum_j |x_j - t| / (n + 1)``:
    ``dL/dx_i = grad_hat_i / d + dL/ds * sign(x_i - t) / (n + 1)`` directly,
    ``dL/ds = -sum_i grad_hat_i x_hat_i / d`` and
    ``dL/dt = -sum_i grad_hat_i / d - dL/ds * sum_i sign(x_i - t) / (n + 1)``, which goes to
    the median pixel (unless the median is detached).
    """
    seg, slots = segments.seg, segments.num_slots
    zeros = grad_hat.new_zeros(slots)
    inv = stats.inv_scale
    sum_gx = zeros.scatter_add(0, seg, grad_hat * x_hat)
    sign = torch.sign(centered)
    n1 = (stats.count + 1).to(grad_hat.dtype)
    d_scale_per_n = -sum_gx * inv / n1  # 0 at dummies (inv = 0)
    per_entry = grad_hat * inv.index_select(0, seg) + d_scale_per_n.index_select(0, seg) * sign
    _accumulate(grad_x, per_entry, segments.pix)
    if through_median:
        sum_g = zeros.scatter_add(0, seg, grad_hat)
        sum_sign = zeros.scatter_add(0, seg, sign)
        d_shift = (-sum_g * inv - d_scale_per_n * sum_sign) * (stats.count > 0)
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

    A batch without any valid pixel (or without any pair) gives 0 and a zero gradient.
    """

    @staticmethod
    def forward(ctx, pred: Tensor, target: Tensor, valid: Tensor, contexts) -> Tensor:  # type: ignore[override]
        B, H, W = contexts.shape
        zero = torch.zeros((), dtype=pred.dtype, device=pred.device)
        p = torch.where(valid, pred, zero)
        g = torch.where(valid, target, zero)
        image_of = torch.arange(B, device=p.device).repeat_interleave(H * W)
        order_p = value_order(p, image_of, valid)
        order_g = value_order(g, image_of, valid)
        pooled = contexts.aggregation == "pooled"
        loss_sum = torch.zeros_like(p)
        in_contexts = torch.zeros_like(p)
        saved_stats = []
        pooled_total = zero.clone()
        n_pairs = 0
        for level_index in range(contexts.num_levels):
            segments = resolve_level(contexts.level(level_index), valid, image_of, H * W)
            sp = segment_stats(p, order_p, segments)
            sg = segment_stats(g, order_g, segments)
            entry_loss = (normalize_entries(p, sp, segments)[1] - normalize_entries(g, sg, segments)[1]).abs_()
            if pooled:
                pooled_total = pooled_total + entry_loss.sum()
                n_pairs += int(sp.count.sum())
            else:
                _accumulate(loss_sum, entry_loss, segments.pix)
                _accumulate(in_contexts, (~segments.dummy).to(p.dtype).index_select(0, segments.seg), segments.pix)
            saved_stats.append((sp, sg))
        n_valid = int(valid.sum())
        if pooled:
            loss = pooled_total / n_pairs if n_pairs else zero
            weight = torch.full_like(p, 1.0 / n_pairs) if n_pairs else torch.zeros_like(p)
        else:
            in_contexts.clamp_(min=1)
            loss = (loss_sum / in_contexts).sum() / n_valid if n_valid else zero
            weight = in_contexts.reciprocal_().mul_(1.0 / n_valid) if n_valid else torch.zeros_like(p)
        ctx.contexts = contexts
        ctx.saved_stats = saved_stats
        ctx.save_for_backward(p, g, valid, weight, image_of)
        return loss

    @staticmethod
    def backward(ctx, grad_output: Tensor):  # type: ignore[override]
        p, g, valid, weight, image_of = ctx.saved_tensors
        contexts = ctx.contexts
        B, H, W = contexts.shape
        need_p, need_g = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_p = torch.zeros_like(p) if need_p else None
        grad_g = torch.zeros_like(g) if need_g else None
        if need_p or need_g:
            scaled_weight = weight * grad_output
            for level_index, (sp, sg) in enumerate(ctx.saved_stats):
                segments = resolve_level(contexts.level(level_index), valid, image_of, H * W)
                p_centered, p_hat = normalize_entries(p, sp, segments)
                g_centered, g_hat = normalize_entries(g, sg, segments)
                w = scaled_weight if segments.pix is None else scaled_weight.index_select(0, segments.pix)
                r = w * torch.sign(p_hat - g_hat)  # 0 outside contexts, where both are 0
                if need_p:
                    _normalization_backward(
                        r, p_centered, p_hat, sp, segments, grad_p,
                        through_median=not contexts.detach_pred_median,
                    )
                if need_g:
                    _normalization_backward(-r, g_centered, g_hat, sg, segments, grad_g, through_median=True)
        ctx.saved_stats = None
        return grad_p, grad_g, None, None
