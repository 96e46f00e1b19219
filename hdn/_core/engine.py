"""The loss engine: SSI normalisation over any contexts, sync-free and one graph under compile.

Contexts arrive as data (:class:`Segments`): per level, a segment id per entry, non-members in
one spare segment whose number is known before any tensor is read; an entry is a pixel, or a
(pixel, context) pair where contexts overlap. Per level: counts by ``scatter_add``, offsets by
``cumsum``, each segment's lower median at ``offset + (n - 1) // 2`` of one sort on a
(segment, value) key, scales by segment sums; then the per-pixel mean (or pooled sum) over
contexts and the reduction. One analytic backward per level keeps a sign per entry instead of
autograd's float tensors. Every shape follows from the inputs' shapes: no host sync.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

EPS = 1e-6
REDUCTIONS = ("mean", "sum", "per_image", "none")


class Segments(NamedTuple):
    """One level of contexts for a batch of ``N = B * H * W`` pixels.

    Attributes:
        seg: ``(M,)`` int64, each entry's segment in ``[0, num]``; ``num`` is the spare
            segment of non-members (invalid pixels, pixels in no context of the level).
        num: the number of real segments (``B`` times the contexts per image).
        index: ``(M,)`` int64, each entry's pixel; ``None`` when entry ``i`` is pixel ``i``.
        rows: optional, for contexts of nearly equal size (the whole image, grid cells),
            whose medians are then taken per row by :func:`torch.nanmedian` instead of from
            the sort: ``(num + 1, C)`` int64 pixels of each segment padded with ``N`` (the
            spare's row all padding), or an int ``C`` when segment ``s`` is pixels
            ``[s * C, (s + 1) * C)`` and ``num * C == N``.
        target_median: optional ``(num + 1,)`` int64, the pixel of each segment's lower
            target median (any pixel for the spare), where the contexts know it already
            (intervals of a sorted target).
    """

    seg: Tensor
    num: int
    index: Tensor | None = None
    rows: Tensor | int | None = None
    target_median: Tensor | None = None


def ordered_bits(x: Tensor) -> Tensor:
    """int64 keys that sort like the float values of ``x`` (float32: in ``[0, 2**32)``)."""
    if x.dtype == torch.float64:
        bits = x.view(torch.int64)
        return bits ^ ((bits >> 63) & 0x7FFFFFFFFFFFFFFF)
    bits = (x if x.dtype == torch.float32 else x.to(torch.float32)).view(torch.int32)
    return (bits ^ ((bits >> 31) & 0x7FFFFFFF)).to(torch.int64) + 2**31


def _sort_key(x: Tensor, seg: Tensor, index: Tensor | None) -> Tensor:
    """Distinct int64 keys ordering entries by segment, then value (ties by position)."""
    if x.dtype == torch.float32:  # the value's 32 bits below the segment
        bits = ordered_bits(x)
        bits = bits if index is None else bits.gather(0, index)
        return (seg << 32) | bits  # (ties: the sort below is stable)
    order = torch.sort(ordered_bits(x), stable=True).indices
    rank = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=x.device))
    return seg * x.numel() + (rank if index is None else rank.gather(0, index))


class _Counts(NamedTuple):
    member: Tensor  # (M,) bool
    count: Tensor  # (S + 1,) int64 members per segment (0 for the spare)
    offsets: Tensor  # (S + 1,) int64 where each segment starts among the sorted entries


def _counts(level: Segments) -> _Counts:
    member = level.seg < level.num
    count = torch.zeros(level.num + 1, dtype=torch.int64, device=level.seg.device)
    count = count.scatter_add(0, level.seg, member.to(torch.int64))
    return _Counts(member, count, torch.cumsum(count, 0) - count)


def segment_sum(values: Tensor, level: Segments) -> Tensor:
    """Per-segment sums of the entries ``values`` (``(R, M)``, or ``(R, num, C)`` laid out as
    :func:`_entries`), accumulated in float64, ``(R, S + 1)``: a context's sum never depends
    on another's values."""
    if _dense(level):
        return torch.nn.functional.pad(values.sum(2, dtype=torch.float64), (0, 1))
    sums = torch.zeros(values.shape[0], level.num + 1, dtype=torch.float64, device=values.device)
    values = values if values.dtype == torch.float64 else values.to(torch.float64)
    return sums.scatter_add(1, level.seg.expand(values.shape), values)


def _dense(level: Segments) -> bool:
    """Whether the level gives its segments as rows (nearly equal sizes): then entries are laid
    out ``(R, num, C)`` and per-segment values broadcast along the rows."""
    return level.rows is not None and level.index is None


def _entries(x: Tensor, level: Segments, fill: float = 0) -> Tensor:
    """Pixel values ``(R, N)`` at the level's entries: ``(R, num, C)`` (padding ``fill``) or
    ``(R, M)``."""
    if isinstance(level.rows, int):
        return x.view(x.shape[0], level.num, level.rows)
    if level.rows is not None:
        return torch.cat([x, x.new_full((x.shape[0], 1), fill)], 1)[:, level.rows[: level.num]]
    return x if level.index is None else x.index_select(1, level.index)


def _spread(values: Tensor, level: Segments) -> Tensor:
    """Per-segment values ``(R, S + 1)`` at every entry (broadcastable to :func:`_entries`)."""
    return values[:, : level.num, None] if _dense(level) else values.index_select(1, level.seg)


def _to_pixels(values: Tensor, level: Segments, shape: torch.Size) -> Tensor:
    """Entry values (laid out as :func:`_entries`, without the leading ``R`` for a 1-D
    ``shape``) back to their pixels, summed: ``shape``, ``(R, N)`` or ``(N,)``."""
    if isinstance(level.rows, int) and level.index is None or level.rows is None and level.index is None:
        return values.reshape(shape)
    flat, dim = values.reshape(*shape[:-1], -1), len(shape) - 1
    if _dense(level):  # rows of pixels padded with N: the padding lands in a column dropped here
        out = values.new_zeros(*shape[:-1], shape[-1] + 1)
        return out.index_add(dim, level.rows[: level.num].reshape(-1), flat)[..., :-1]
    return values.new_zeros(shape).index_add(dim, level.index, flat)


def _median_pixels(x: Tensor, level: Segments, c: _Counts, known: Tensor | None = None) -> Tensor:
    """The pixel of each segment's lower median of each row of ``x`` ``(R, N)``, ``(R, S + 1)``
    (any pixel for an empty segment); ``known``: the last row's, if known already."""
    R, N = x.shape
    if known is not None and R == 2:
        return torch.stack([_median_pixels(x[:1], level, c)[0], known])
    if _dense(level):
        column = torch.nanmedian(_entries(torch.where(c.member, x, float("nan")), level, float("nan")), dim=2).indices
        if isinstance(level.rows, int):
            return torch.nn.functional.pad(torch.arange(0, N, level.rows, device=x.device) + column, (0, 1))
        pixel = level.rows[: level.num].gather(1, column.T).T  # (the padding's N for an empty cell)
        return torch.nn.functional.pad(pixel.clamp(max=N - 1), (0, 1))
    middle = (c.offsets + (c.count - 1).clamp(min=0) // 2).clamp(max=level.seg.numel() - 1)
    entries = [torch.sort(_sort_key(row, level.seg, level.index), stable=True).indices[middle] for row in x]
    entry = entries[0].unsqueeze(0) if R == 1 else torch.stack(entries)
    return entry if level.index is None else level.index[entry]


def _statistics(x: Tensor, level: Segments, c: _Counts, median: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """For rows ``x`` ``(R, N)``: per entry its value less its segment's shift ``t`` (0 off the
    members, laid out as :func:`_entries`), and per segment ``t`` and ``s + eps``
    (``(R, S + 1)``)."""
    t = torch.where(c.count > 0, x.gather(1, median), 0)
    member = _entries(c.member.unsqueeze(0), level) if _dense(level) else c.member
    centered = torch.where(member, _entries(x, level) - _spread(t, level), 0)  # no NaN reaches the spare
    denominator = (segment_sum(centered.abs(), level) / (c.count + 1)).to(x.dtype) + EPS
    return centered, t, denominator


def normalize(x: Tensor, level: Segments) -> Tensor:
    """``(x - t) / (s + eps)`` for every entry of a level (``(N,)`` at the pixels where
    ``index`` is None), 0 off the members (docs/semantics.md §1), differentiable by autograd.
    ``x``: ``(N,)`` pixel values."""
    if level.seg.numel() == 0:
        return x.new_zeros(0)
    c = _counts(level)
    x = x.unsqueeze(0)
    centered, _, denominator = _statistics(x, level, c, _median_pixels(x.detach(), level, c))
    normalized = (centered / _spread(denominator, level))[0]
    return normalized if level.index is not None else _to_pixels(normalized, level, x.shape[1:])


class _LevelLoss(torch.autograd.Function):
    """One level: per pixel, the sum of ``|p_hat - g_hat|`` over its contexts, ``(N,)``, and
    its number of contexts (not differentiable). Prediction and target are stacked, ``(2, N)``,
    so that each step is one operation for both. The backward keeps, per entry, the sign of
    ``p_hat - g_hat`` (int8) and recomputes the centred values from the inputs."""

    @staticmethod
    def forward(ctx, p, g, seg, index, rows, target_median, num: int, detach_pred_median: bool):  # type: ignore[override]
        level = Segments(seg, num, index, rows, target_median)
        c = _counts(level)
        x = torch.stack([p, g])
        median = _median_pixels(x, level, c, target_median)
        centered, t, den = _statistics(x, level, c, median)
        member = _entries(c.member.unsqueeze(0), level)[0] if _dense(level) else c.member
        normalized = centered / _spread(den, level)
        diff = torch.where(member, normalized[0] - normalized[1], 0)  # (a row's NaN stays in its segment)
        sign = torch.sign(diff).to(torch.int8)  # 0 off the members
        loss = _to_pixels(diff.abs(), level, p.shape)
        count = _to_pixels(member.to(p.dtype), level, p.shape)
        flat_median = median + torch.arange(0, 2 * p.numel(), p.numel(), device=p.device).unsqueeze(1)
        row_tensor = rows if torch.is_tensor(rows) else None
        ctx.save_for_backward(p, g, seg, index, row_tensor, sign, c.count, t, den, flat_median.view(-1))
        ctx.num, ctx.rows, ctx.detach_pred_median = num, rows if isinstance(rows, int) else None, detach_pred_median
        ctx.mark_non_differentiable(count)
        return loss, count

    @staticmethod
    def backward(ctx, grad_loss, _):  # type: ignore[override]
        p, g, seg, index, row_tensor, sign, count, t, den, median = ctx.saved_tensors
        level = Segments(seg, ctx.num, index, ctx.rows if row_tensor is None else row_tensor)
        x = torch.stack([p, g])
        member = _entries((seg < ctx.num).unsqueeze(0), level) if _dense(level) else seg < ctx.num
        centered = torch.where(member, _entries(x, level) - _spread(t, level), 0)
        upstream = _entries(grad_loss.unsqueeze(0), level)[0] * sign
        a = torch.stack([upstream, -upstream])  # d loss / d (p_hat, g_hat) per entry
        # d/dc of a * c / D: directly, and through D = sum |c| / (n + 1) + eps
        grad_den = segment_sum(a * centered, level) / den.to(torch.float64).square()
        grad_c = a / _spread(den, level) - _spread((grad_den / (count + 1)).to(x.dtype), level) * centered.sign()
        grad_c = torch.where(member, grad_c, 0)
        grad_x = _to_pixels(grad_c, level, x.shape)
        # t is the median pixel's value: it takes -sum(grad_c) (0 for an empty segment)
        grad_t = segment_sum(grad_c, level).to(x.dtype)
        if ctx.detach_pred_median:
            grad_t = grad_t * torch.tensor([[0.0], [1.0]], dtype=x.dtype, device=x.device)
        grad_p, grad_g = grad_x.reshape(-1).index_add(0, median, grad_t.view(-1), alpha=-1).view(2, -1)
        return grad_p, grad_g, None, None, None, None, None, None


def contexts_ssi_loss(
    p: Tensor,
    g: Tensor,
    valid: Tensor,
    levels: Sequence[Segments],
    batch: int,
    *,
    pooled: bool = False,
    detach_pred_median: bool = False,
    reduction: str = "mean",
) -> Tensor:
    """SSI loss over the contexts of ``levels`` (docs/semantics.md §2 and §4).

    Args:
        p, g: ``(N,)`` prediction and target in the statistics dtype.
        valid: ``(N,)`` bool, the pixels counted in ``N_v`` (the target is read only there).
        levels: the contexts, level by level (an iterable: each level may be made on use).
        batch: ``B`` (``N = B * H * W``).
        pooled: pool all (context, pixel) losses over their number (the random variants),
            instead of each pixel's mean over its contexts.
        detach_pred_median: take the prediction's medians without gradient.
        reduction: one of :data:`REDUCTIONS` (see :func:`hdn.hdn_loss`).

    Returns:
        the reduced loss; ``"none"`` gives the ``(N,)`` map.
    """
    g = torch.where(valid, g, 0)
    loss_sum = in_contexts = p.new_zeros(p.shape)
    for i, level in enumerate(level for level in levels if level.seg.numel()):
        loss, count = _LevelLoss.apply(
            p, g, level.seg, level.index, level.rows, level.target_median, level.num, detach_pred_median
        )
        loss_sum, in_contexts = (loss, count) if i == 0 else (loss_sum + loss, in_contexts + count)
    n_valid = valid.sum().to(p.dtype).clamp(min=1)  # (every map below is 0 without members)
    if pooled:  # each pixel's share of the pooled mean, scaled to sum to it over N_v
        loss_map = loss_sum * (n_valid / in_contexts.sum().clamp(min=1))
    else:
        loss_map = loss_sum / in_contexts.clamp(min=1)
    if reduction == "mean":
        return loss_map.sum() / n_valid
    if reduction == "sum":
        return loss_map.sum()
    if reduction == "per_image":
        return loss_map.view(batch, -1).sum(1) / valid.reshape(batch, -1).sum(1).to(p.dtype).clamp(min=1)
    return loss_map
