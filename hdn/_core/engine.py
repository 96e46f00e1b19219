"""The loss engine: SSI normalisation over any contexts, sync-free and one graph under compile.

Contexts arrive as data (:class:`Segments`): per level, a segment id per entry, non-members in
one spare segment whose number is known before any tensor is read; an entry is a pixel, or a
(pixel, context) pair where contexts overlap. Per level: one sort on a (segment, value) key,
each segment's start and count read off the sorted keys, its lower median at
``start + (n - 1) // 2`` (rows of equal size: ``nanmedian``), scales by segment sums; then
the per-pixel mean (or pooled sum) over contexts and the reduction. One analytic backward per
level keeps a sign per entry. Every shape follows from the inputs' shapes: no host sync.
"""

from __future__ import annotations

from collections.abc import Iterable
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
        copies: entries per pixel, for contexts that overlap: ``M = copies * N`` and entry
            ``e`` is pixel ``e % N`` (each copy a partition of the pixels, say).
        rows: optional, for contexts of nearly equal size (the whole image, grid cells),
            whose medians are then taken per row by :func:`torch.nanmedian` instead of from
            the sort: ``(num, C)`` int64 pixels of each segment padded with ``N``, or, for a
            regular grid, ``(cells, h, w)``: images of ``cells * h`` x ``cells * w`` pixels
            whose segment ``b * cells**2 + r * cells + c`` is cell ``(r, c)`` of image ``b``
            (a strided view: no table; ``(1, H, W)`` is the whole image).
        target_median: optional ``(S,)`` int64 (``S = num + 1``, or ``num`` for rows), the
            pixel of each segment's lower target median (any pixel for the spare), where the
            contexts know it already (intervals of a sorted target).
    """

    seg: Tensor
    num: int
    copies: int = 1
    rows: Tensor | tuple[int, int, int] | None = None
    target_median: Tensor | None = None

    def within(self, keep: Tensor) -> Segments:
        """The level with the pixels outside ``keep`` ``(N,)`` bool taken out of every
        segment (a loss's mask narrower than the contexts' own); the target medians are then
        no longer known."""
        keep = keep if self.copies == 1 else keep.repeat(self.copies)
        return self._replace(seg=torch.where(keep, self.seg, self.num), target_median=None)

    def over(self, pixels: Tensor, place: Tensor) -> Segments:
        """The level over the pixels ``pixels`` ``(n,)`` alone, which hold all its members;
        ``place``: ``(N,)`` each pixel's index in ``pixels`` (-1 if not there)."""
        seg = self.seg.view(self.copies, -1)[:, pixels].reshape(-1)
        known = None if self.target_median is None else place[self.target_median].clamp(min=0)
        if known is not None and known.numel() == self.num:  # (rows have no spare segment)
            known = torch.nn.functional.pad(known, (0, 1))
        return Segments(seg, self.num, self.copies, None, known)  # (empty segments: any pixel)


def ordered_bits(x: Tensor) -> Tensor:
    """int64 keys that sort like the float values of ``x`` (float32: in ``[0, 2**32)``)."""
    if x.dtype == torch.float64:
        bits = x.view(torch.int64)
        return bits ^ ((bits >> 63) & 0x7FFFFFFFFFFFFFFF)
    bits = (x if x.dtype == torch.float32 else x.to(torch.float32)).view(torch.int32)
    return (bits ^ ((bits >> 31) & 0x7FFFFFFF)).to(torch.int64) + 2**31


def value_key(x: Tensor) -> Tensor:
    """Per pixel, an int64 key in ``[0, 2**32)`` that sorts like the values of ``x`` ``(N,)``:
    the order-preserving bits of float32, the rank (ties by position) of float64."""
    if x.dtype != torch.float64:
        return ordered_bits(x)
    order = torch.sort(ordered_bits(x), stable=True).indices
    return torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=x.device))


def reads_host(x: Tensor) -> bool:
    """Whether a branch may read ``x``'s values on the host: on the CPU, where that costs
    nothing, and not under compile. The CPU branches (a sparse batch's valid pixels alone,
    sorting only the members, DR's overlap check) are the only places that ask."""
    return x.device.type == "cpu" and not torch.compiler.is_compiling()


class _Counts(NamedTuple):
    member: Tensor  # (M,) bool
    count: Tensor  # (S,) int64 members per segment (0 for the spare)
    entries: Tensor  # member laid out as the entries (:func:`_member_entries`)
    plus_one: Tensor  # count + 1, the scale's divisor
    middle: Tensor | None = None  # (S,) sorted levels: each lower median's place in a sort
    order: Tensor | None = None  # sorted levels: the entries by (segment, the first row's value)


def _counts(level: Segments, key: Tensor | None = None) -> _Counts:
    """Members and their number per segment; a sorted level (not given as rows) also sorts its
    entries by (segment, ``key``), the first row's :func:`value_key` ``(N,)``, and reads the
    counts off the sorted keys (no ``scatter_add`` into a few addresses)."""
    member = level.seg < level.num
    entries = _member_entries(member, level)
    if _dense(level):
        count = entries.sum(-1)
        return _Counts(member, count, entries, count + 1)
    values, order = _sorted_entries(key, level, member)
    step = 1 << 32
    start = torch.searchsorted(values, torch.arange(0, (level.num + 1) * step, step, device=values.device))
    count = torch.diff(start, append=start[-1:])  # (members sort first: the spare's run is not counted)
    middle = (start + (count - 1).div(2, rounding_mode="floor")).clamp(0, max(order.numel() - 1, 0))
    return _Counts(member, count, entries, count + 1, middle, order)


def _member_entries(member: Tensor, level: Segments) -> Tensor:
    """``member`` ``(M,)`` laid out as :func:`_entries` without the leading ``R``."""
    return _entries(member.unsqueeze(0), level)[0] if _dense(level) else member


def segment_sum(values: Tensor, level: Segments) -> Tensor:
    """Per-segment sums of the entries ``values`` (``(R, M)``, or ``(R, num, C)`` laid out as
    :func:`_entries`) in float64, ``(R, S)``: a context's sum never depends on another's
    values. Rows add runs of up to 64 entries in their own dtype first (no float64 copy of
    the rows; the runs' rounding is that of the context's own values)."""
    if _dense(level):
        run = 64  # the largest power of two up to 64 that divides C (no math.gcd: C may be symbolic)
        while values.shape[2] % run:
            run //= 2
        values = values.unflatten(2, (-1, run)).sum(3) if run > 1 else values
        return values.sum(2, dtype=torch.float64)
    sums = torch.zeros(values.shape[0], level.num + 1, dtype=torch.float64, device=values.device)
    values = values if values.dtype == torch.float64 else values.to(torch.float64)
    return sums.scatter_add(1, level.seg.expand(values.shape), values)


def _dense(level: Segments) -> bool:
    """Whether the level gives its segments as rows (nearly equal sizes): then entries are laid
    out ``(R, num, C)``, per-segment values ``(R, S)`` have no column for the spare
    (``S = num``, else ``num + 1``) and broadcast along the rows."""
    return level.rows is not None and level.copies == 1


def _entries(x: Tensor, level: Segments, fill: float = 0) -> Tensor:
    """Pixel values ``(R, N)`` at the level's entries: ``(R, num, C)`` (padding ``fill``) or
    ``(R, M)``."""
    if isinstance(level.rows, tuple):
        cells, h, w = level.rows
        if cells == 1:
            return x.view(x.shape[0], level.num, h * w)
        return x.view(x.shape[0], -1, cells, h, cells, w).transpose(3, 4).reshape(x.shape[0], level.num, h * w)
    if level.rows is not None:
        return torch.cat([x, x.new_full((x.shape[0], 1), fill)], 1)[:, level.rows]
    return x if level.copies == 1 else x.repeat(1, level.copies)


def _spread(values: Tensor, level: Segments) -> Tensor:
    """Per-segment values ``(R, S)`` at every entry (broadcastable to :func:`_entries`)."""
    return values.unsqueeze(2) if _dense(level) else values.index_select(1, level.seg)


def _to_pixels(values: Tensor, level: Segments, shape: torch.Size) -> Tensor:
    """Entry values (laid out as :func:`_entries`, without the leading ``R`` for a 1-D
    ``shape``) back to their pixels, summed: ``shape``, ``(R, N)`` or ``(N,)``."""
    if torch.is_tensor(level.rows):  # rows of pixels padded with N: the padding lands in a dropped column
        out = values.new_zeros(*shape[:-1], shape[-1] + 1)
        return out.index_add(len(shape) - 1, level.rows.reshape(-1), values.reshape(*shape[:-1], -1))[..., :-1]
    if isinstance(level.rows, tuple) and level.rows[0] > 1:
        cells, h, w = level.rows
        return values.reshape(*shape[:-1], -1, cells, cells, h, w).transpose(-3, -2).reshape(shape)
    if level.copies > 1:
        return values.view(*shape[:-1], level.copies, shape[-1]).sum(-2)
    return values.reshape(shape)


def _median_pixels(
    x: Tensor, level: Segments, c: _Counts, known: Tensor | None = None, keys: list | None = None
) -> Tensor:
    """The pixel of each segment's lower median of each row of ``x`` ``(R, N)``, ``(R, S)``
    (any pixel for an empty segment); ``known``: the last row's, if known already; ``keys``:
    each row's :func:`value_key`, if made already (a sorted level takes row 0's order from
    ``c``, whose sort used ``keys[0]``)."""
    R, N = x.shape
    if known is not None and R == 2:  # the prediction's alone
        return torch.cat([_median_pixels(x[:1], level, c, keys=None if keys is None else keys[:1]), known.unsqueeze(0)])
    if _dense(level):
        rows = _entries(torch.where(c.member, x, float("nan")), level, float("nan")).transpose(0, 1)
        column = torch.nanmedian(rows, dim=2).indices.T  # (segment-major: each thread gets rows of both x)
        if isinstance(level.rows, tuple):  # cell (b, r, c)'s first pixel, plus the column's offset
            cells, h, w = level.rows
            if cells == 1:
                return torch.arange(0, N, h * w, device=x.device) + column
            cell = torch.arange(level.num, device=x.device)
            first = (cell // cells * h * cells + cell % cells) * w  # (images are cells * h rows of cells * w)
            return first + column // w * (cells * w) + column % w
        return level.rows.gather(1, column.T).T.clamp(max=N - 1)  # (the padding's N for an empty cell)
    if not c.order.numel():  # (no member at all: a size known on the host)
        return c.count.clamp(max=0).expand(R, -1)
    later = keys[1:R] if keys is not None and len(keys) >= R else [value_key(row) for row in x[1:]]
    orders = [c.order] + [_sorted_entries(key, level, c.member)[1] for key in later]  # (row 0: c's sort)
    return torch.stack(orders)[:, c.middle] % N  # (entry e is pixel e % N)


def _sorted_entries(key: Tensor, level: Segments, member: Tensor) -> tuple[Tensor, Tensor]:
    """The sorted (segment, value) keys of a row's entries from its :func:`value_key` ``key``
    ``(N,)``, and the entries in that order (ties by position), at least the members."""
    key = key if level.copies == 1 else key.repeat(level.copies)
    return sorted_members(torch.add(key, level.seg, alpha=1 << 32), member)


def sorted_members(key: Tensor, member: Tensor) -> tuple[Tensor, Tensor]:
    """The keys ascending, and the entries in that order (ties by position): at least the
    members, which sort before the spare segment and so come first. On the CPU, where a host
    read costs nothing, only the members are sorted (the sort is the engine's largest cost,
    and sparse targets have few members); elsewhere, and under compile, every entry."""
    if reads_host(key) and 2 * int(member.sum()) < key.numel():  # (compacting costs two gathers)
        kept = member.nonzero().squeeze(1)
        values, order = torch.sort(key[kept], stable=True)
        return values, kept[order]
    return torch.sort(key, stable=True)


def _statistics(x: Tensor, level: Segments, c: _Counts, median: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """For rows ``x`` ``(R, N)``: per entry its value less its segment's shift ``t`` (0 off the
    members, laid out as :func:`_entries`), and per segment ``t`` and ``s + eps``
    (``(R, S)``)."""
    t = x.gather(1, median)  # (any pixel's value for an empty segment: it has no member)
    centered = torch.where(c.entries, _entries(x, level) - _spread(t, level), 0)  # no NaN reaches the spare
    if _dense(level) or x.requires_grad:  # (rows sum runs without a float64 copy; autograd keeps centered)
        magnitude = centered.abs()
    else:  # scatter_add sums in the values' dtype: one float64 copy, made absolute in place
        magnitude = centered.to(torch.float64, copy=True).abs_()
    denominator = (segment_sum(magnitude, level) / c.plus_one).to(x.dtype) + EPS
    return centered, t, denominator


def normalize(x: Tensor, level: Segments) -> Tensor:
    """``(x - t) / (s + eps)`` for every entry of a level (``(N,)`` at the pixels where
    ``copies`` is 1), 0 off the members (docs/semantics.md §1), differentiable by autograd.
    ``x``: ``(N,)`` pixel values."""
    if level.seg.numel() == 0:
        return x.new_zeros(0)
    c = _counts(level, None if _dense(level) else value_key(x.detach()))
    x = x.unsqueeze(0)
    centered, _, denominator = _statistics(x, level, c, _median_pixels(x.detach(), level, c))
    normalized = (centered / _spread(denominator, level))[0]
    return normalized if level.copies > 1 else _to_pixels(normalized, level, x.shape[1:])


class _LevelLoss(torch.autograd.Function):
    """One level: per pixel, the sum of ``|p_hat - g_hat|`` over its contexts, ``(N,)``, and
    its number of contexts (not differentiable). Prediction and target come stacked as well,
    ``x`` ``(2, N)`` (once for all levels), so that each step is one operation for both. The
    backward keeps, per entry, the sign of ``p_hat - g_hat`` (int8), the member flag and the
    segment (int32: the levels' ids are a large share of the peak memory), and recomputes the
    centred values from the inputs, the target's only where the target needs a gradient."""

    @staticmethod
    def forward(ctx, p, g, x, seg, copies, rows, target_median, num: int, detach_pred_median: bool, keys):  # type: ignore[override]
        level = Segments(seg, num, copies, rows, target_median)
        c = _counts(level, None if _dense(level) else keys[0])
        median = _median_pixels(x, level, c, target_median, keys)
        centered, t, den = _statistics(x, level, c, median)
        member = c.entries
        normalized = centered.div_(_spread(den, level))
        diff = torch.where(member, torch.sub(*normalized), 0)  # (a row's NaN stays in its segment)
        sign = torch.sign(diff).to(torch.int8)  # 0 off the members
        loss = _to_pixels(diff.abs_(), level, p.shape)
        count = c.member.to(p.dtype) if copies == 1 else c.member.view(copies, -1).sum(0, dtype=p.dtype)  # (entry e: pixel e % N)
        row_tensor = rows if torch.is_tensor(rows) else None
        ctx.save_for_backward(p, g, seg.to(torch.int32), c.member, row_tensor, sign, c.plus_one, t, den, median)
        ctx.copies, ctx.num, ctx.rows, ctx.detach_pred_median = copies, num, None if torch.is_tensor(rows) else rows, detach_pred_median
        ctx.mark_non_differentiable(count)
        return loss, count

    @staticmethod
    def backward(ctx, grad_loss, _):  # type: ignore[override]
        p, g, seg, member, row_tensor, sign, plus_one, t, den, median = ctx.saved_tensors
        level = Segments(seg, ctx.num, ctx.copies, ctx.rows if row_tensor is None else row_tensor)
        level = level if _dense(level) else level._replace(seg=seg.long())  # (scatter_add takes int64)
        rows = 2 if ctx.needs_input_grad[1] else 1  # (the target's row only where it needs one)
        if rows == 1:
            p, t, den, median = p.unsqueeze(0), t[:1], den[:1], median[:1]
        x = torch.stack([p, g]) if rows == 2 else p
        member = _member_entries(member, level)
        centered = torch.where(member, _entries(x, level) - _spread(t, level), 0)
        upstream = _entries(grad_loss.unsqueeze(0), level)[0] * sign
        a = torch.stack([upstream, -upstream]) if rows == 2 else upstream.unsqueeze(0)  # d loss / d (p_hat, g_hat)
        # d/dc of a * c / D: directly, and through D = sum |c| / (n + 1) + eps (float64: den exact)
        slope = (segment_sum(a * centered, level) / den / den / plus_one).to(x.dtype)
        grad_c = torch.addcmul(a / _spread(den, level), centered.sign_(), _spread(slope, level), value=-1)
        grad_c = grad_c.masked_fill_(~member, 0)
        grad_x = _to_pixels(grad_c, level, x.shape)
        if rows == 1 and ctx.detach_pred_median:
            return grad_x[0], None, None, None, None, None, None, None, None, None
        # t is the median pixel's value: it takes -sum(grad_c) (0 for an empty segment)
        grad_t = segment_sum(grad_c, level).to(x.dtype)
        if ctx.detach_pred_median:
            grad_t = grad_t * torch.tensor([[0.0], [1.0]], dtype=x.dtype, device=x.device)
        grad = grad_x.scatter_add_(1, median, grad_t.neg_())
        return grad[0], grad[1] if rows == 2 else None, None, None, None, None, None, None, None, None


def contexts_ssi_loss(
    p: Tensor,
    g: Tensor,
    valid: Tensor,
    levels: Iterable[Segments],
    batch: int,
    *,
    pooled: bool = False,
    detach_pred_median: bool = False,
    reduction: str = "mean",
) -> Tensor:
    """SSI loss over the contexts of ``levels`` (docs/semantics.md §2 and §4).

    Args:
        p, g: ``(N,)`` prediction and target in the statistics dtype.
        valid: ``(N,)`` bool, the pixels counted in ``N_v``, which hold every member (the
            target is read only there). On the CPU, a batch with fewer than half its pixels
            valid is worked on those alone.
        levels: the contexts, level by level (an iterable: each level may be made on use).
        batch: ``B`` (``N = B * H * W``).
        pooled: pool all (context, pixel) losses over their number (the random variants),
            instead of each pixel's mean over its contexts.
        detach_pred_median: take the prediction's medians without gradient.
        reduction: one of :data:`REDUCTIONS` (see :func:`hdn.hdn_loss`).

    Returns:
        the reduced loss; ``"none"`` gives the ``(N,)`` map.
    """
    n_valid = valid.sum()
    if reads_host(valid) and 2 * int(n_valid) < valid.numel():  # CPU: the valid pixels alone
        pixels = valid.nonzero().squeeze(1)
        place = torch.cumsum(valid, 0) - 1
        loss_sum, in_contexts = _level_sums(
            p[pixels], g[pixels], (level.over(pixels, place) for level in levels), detach_pred_median
        )
        loss_sum = p.new_zeros(p.shape).index_put((pixels,), loss_sum)
        in_contexts = p.new_zeros(p.shape).index_put((pixels,), in_contexts)
    else:
        loss_sum, in_contexts = _level_sums(p, g, levels, detach_pred_median)
    n_valid = n_valid.clamp(min=1)  # (every map below is 0 without members)
    if pooled:  # each pixel's share of the pooled mean, scaled to sum to it over N_v
        loss_map = loss_sum * (n_valid / in_contexts.sum().clamp(min=1))
    else:
        loss_map = loss_sum / in_contexts.clamp(min=1)
    if reduction == "none":
        return loss_map
    # in float64: a float32 sum's last bit depends on how many threads add it
    if reduction == "per_image":
        total = loss_map.view(batch, -1).sum(1, dtype=torch.float64)
        return (total / valid.reshape(batch, -1).sum(1).clamp(min=1)).to(p.dtype)
    total = loss_map.sum(dtype=torch.float64)
    return (total / n_valid if reduction == "mean" else total).to(p.dtype)


def _level_sums(p: Tensor, g: Tensor, levels: Iterable[Segments], detach_pred_median: bool) -> tuple[Tensor, Tensor]:
    """Per pixel, the sum of its losses over the contexts of every level, and its number of
    contexts (:class:`_LevelLoss`), ``(N,)`` each."""
    loss_sum = in_contexts = None
    with torch.no_grad():
        x = torch.stack([p, g])  # (each level's forward reads both rows at once)
    keys: list = []  # the value keys of p and g, made once for the levels that sort
    for level in (level for level in levels if level.seg.numel()):
        if not _dense(level) and not keys:
            keys.append(value_key(p.detach()))
        if not _dense(level) and level.target_median is None and len(keys) < 2:
            keys.append(value_key(g))
        loss, count = _LevelLoss.apply(
            p, g, x, level.seg, level.copies, level.rows, level.target_median, level.num, detach_pred_median,
            None if _dense(level) else keys,
        )
        loss_sum, in_contexts = (loss, count) if loss_sum is None else (loss_sum + loss, in_contexts + count)
    if loss_sum is None:  # no entries (no valid pixel, compacted): 0, with gradients
        return p.new_zeros(p.shape) + (p[:0].sum() + g[:0].sum()), p.new_zeros(p.shape)
    return loss_sum, in_contexts
