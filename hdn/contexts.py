"""Contexts: which pixels are normalised together, as data the loss can consume.

A :class:`Contexts` object describes, for a batch of ``B`` images of ``H x W`` pixels, a
hierarchy of *levels*; each level assigns pixels to contexts (segment ids, see
:class:`hdn._core.segments.ContextLevel`). The loss never asks what kind of contexts it got.

Generators (docs/semantics.md §3 and §4):

* :func:`depth_range` (DR): level ``l`` splits the valid depth range into ``2**l`` equal
  bins, ``2**L - 1`` contexts in all.
* :func:`depth_percentile` (DP): level ``l`` splits the valid depths into ``2**l`` bins of
  equal count (quantiles), ``2**L - 1`` contexts.
* :func:`spatial_grid` (DS): level ``l`` cuts the image into a ``2**l x 2**l`` grid,
  ``(4**L - 1) / 3`` contexts.
* :func:`random_depth_intervals`, :func:`random_crops`: the follow-up work's random
  contexts (pooled aggregation, prediction median without gradient), seeded by a
  :class:`torch.Generator`.
* :func:`from_labels`: one level per user label map (superpixels, semantic masks, ...).
* :func:`whole_image`: one context per image, i.e. image-level SSI.

Level 0 of DR, DP and DS is always the whole image.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from hdn._core.runs import RunLayout
from hdn._core.runs import _pool as _select_pool
from hdn._core.segments import ContextLevel
from hdn._validation import _as_bhw, check_levels

__all__ = [
    "CONTEXT_NAMES",
    "Contexts",
    "GridContexts",
    "IntervalContexts",
    "LabelContexts",
    "PairContexts",
    "build",
    "check_contexts",
    "depth_percentile",
    "depth_range",
    "from_labels",
    "random_crops",
    "random_depth_intervals",
    "spatial_grid",
    "whole_image",
]

CONTEXT_NAMES = ("dr", "dp", "ds")


class Contexts:
    """Base class: a batch's contexts, level by level.

    Subclasses set ``shape = (B, H, W)``, ``valid`` (``(B, H, W)`` bool), ``num_levels``,
    and implement :meth:`level`. ``aggregation`` ("mean" or "pooled") and
    ``detach_pred_median`` say how :func:`hdn.hdn_loss` combines the contexts.
    """

    shape: tuple[int, int, int]
    valid: Tensor
    num_levels: int
    aggregation: str = "mean"
    detach_pred_median: bool = False

    def level(self, index: int) -> ContextLevel:  # pragma: no cover - abstract
        raise NotImplementedError

    def row_layout(self, valid: Tensor, target: Tensor | None = None) -> RunLayout | None:
        """The levels as runs of one pixel order (:mod:`hdn._core.runs`) for the valid pixels ``(B, H, W)``, or
        ``None`` where they are not nested partitions of one member set (then the loss uses
        the general segment core)."""
        return None

    def contexts_per_image(self, index: int) -> int:
        """Number of contexts of one image at level ``index``."""
        return self.level(index).per_image

    @property
    def num_contexts(self) -> int:
        """Number of contexts per image, all levels together."""
        return sum(self.contexts_per_image(i) for i in range(self.num_levels))

    def level_masks(self, index: int) -> Tensor:
        """The contexts of one level as boolean masks ``(K, B, H, W)`` (for plotting).

        Masks are intersected with the valid pixels. The loss never builds these.
        """
        B, H, W = self.shape
        lvl = self.level(index)
        k = lvl.index
        pix = lvl.pix if lvl.pix is not None else torch.arange(k.numel(), device=k.device)
        keep = k >= 0
        masks = torch.zeros(lvl.per_image, B * H * W, dtype=torch.bool, device=k.device)
        masks[k[keep], pix[keep]] = True
        return masks.view(lvl.per_image, B, H, W) & self.valid.unsqueeze(0)

    def to_masks(self) -> Tensor:
        """All contexts as boolean masks ``(C, B, H, W)``, level 0 first, for plotting."""
        return torch.cat([self.level_masks(i) for i in range(self.num_levels)], dim=0)

    def level_ids(self, index: int) -> Tensor:
        """Context index of every pixel at a partition level, ``(B, H, W)`` int64, -1 = none."""
        lvl = self.level(index)
        if lvl.pix is not None:
            raise ValueError(f"Invalid index: level {index} has overlapping contexts; use level_masks.")
        return torch.where(self.valid, lvl.index.view(self.shape), -1)

    def __repr__(self) -> str:
        B, H, W = self.shape
        return (
            f"{type(self).__name__}(B={B}, H={H}, W={W}, levels={self.num_levels}, "
            f"contexts_per_image={self.num_contexts}, aggregation={self.aggregation!r})"
        )


def _depths(target: Tensor) -> Tensor:
    """A detached target, in float32 for half inputs (contexts are found in float32)."""
    g = target.detach()
    return g.float() if g.dtype in (torch.float16, torch.bfloat16) else g


def _prepare_target(target: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
    g = _as_bhw(target, "target").detach()
    valid = torch.isfinite(g)
    if mask is not None:
        m = _as_bhw(mask, "mask")
        if m.shape != g.shape or m.dtype != torch.bool:
            raise ValueError(
                f"Invalid mask: we expect a bool tensor of target's shape {tuple(g.shape)}. "
                f"Got: {m.dtype} {tuple(m.shape)}."
            )
        valid = valid & m
    return _depths(g), valid  # invalid entries keep their (possibly non-finite) values


class IntervalContexts(Contexts):
    """Nested depth-interval bins: bin ``i`` of level ``l`` holds ``lower <= g < upper``.

    Args:
        target: ``(B, H, W)`` depth (finite where valid; other entries are never read as depths).
        valid: ``(B, H, W)`` bool.
        lower: per level ``l``, ``(B, 2**l)`` lower bin edges (non-decreasing along bins).
        upper: per level ``l``, ``(B, 2**l)`` upper bin edges (non-decreasing along bins).
        sorted_rows: ``sorted_valid_values(target, valid)`` (values, counts and order) if
            already known; the order's places past each image's valid count need not be
            filled (``invalid_tail=False``).

    The levels must nest: the edges of level ``l`` are every ``2**(L-1-l)``-th edge of the
    finest level (true for DR and DP, whose edges are the same float computations at the
    same fractions), so everything is found once, at the finest level. In each image's
    sorted depths a finest bin is a run of positions; the bins that hold a pixel form a
    range ``[first, last]``, and at a coarser level the range is the finest one shifted
    right by the level gap. Bins overlap only where DR's ``+ 1e-30`` survives rounding (an
    edge within 1e-30 of zero): then a pixel is in several bins, exactly as in the released
    code, and the loss gets the levels as (pixel, bin) pairs. Otherwise the loss gets the
    finest bins as rows (:meth:`row_layout`).

    Attributes:
        overlapping: whether some pixel is in two bins of a level.
        target_order: ``(B*H*W,)`` int32, the target's value order (image-major, invalid
            last, ties by pixel index); the general segment core reads its medians off it.
        sorted_by_target_order: True: along ``target_order`` every level's bin ids ascend
            within an image (bins are intervals of the target), which the loss relies on.
    """

    sorted_by_target_order = True

    def __init__(
        self,
        target: Tensor,
        valid: Tensor,
        lower: list[Tensor],
        upper: list[Tensor],
        sorted_rows: tuple[Tensor, Tensor, Tensor] | None = None,
    ):
        self.shape = tuple(target.shape)  # type: ignore[assignment]
        self.valid = valid
        self.lower, self.upper = lower, upper
        self.num_levels = L = len(lower)
        for lvl in range(L):
            step = 2 ** (L - 1 - lvl)
            if lower[lvl].shape[1] != 2**lvl or not (
                torch.equal(lower[lvl], lower[-1][:, ::step]) and torch.equal(upper[lvl], upper[-1][:, step - 1 :: step])
            ):
                raise ValueError(f"Invalid lower/upper: level {lvl} does not nest in the finest level.")
        self._target = target
        if sorted_rows is None:
            sorted_rows = sorted_valid_values(target, valid, invalid_tail=False)
        rows, count, order = sorted_rows
        # finest bins as runs [start, end) of each image's sorted depths, (B, K)
        valid_end = count.unsqueeze(1)
        self._start = torch.minimum(torch.searchsorted(rows, lower[-1].contiguous()), valid_end)
        self._end = torch.minimum(torch.searchsorted(rows, upper[-1].contiguous()), valid_end)
        self._count = count
        # bins overlap where a run starts before its predecessor ends
        self.overlapping = bool((self._start[:, 1:] < self._end[:, :-1]).any())
        self._target_version = target._version
        self._sorted_order = order  # (B, H*W) int32, pixel within its image
        self._tail_complete = False  # invalid pixels' places: filled when target_order is made
        self._sorted_values = rows
        self._order: Tensor | None = None
        self._pixel_bins: tuple[Tensor, Tensor | None] | None = None

    @property
    def target_order(self) -> Tensor:
        if self._order is None:
            if not self._tail_complete:
                complete_invalid_tail(self._sorted_order, self._count, self.valid)
                self._tail_complete = True
            B, P = self._sorted_order.shape
            if B * P < 2**31:
                offset = torch.arange(B, device=self._sorted_order.device, dtype=torch.int32) * P
                self._order = (self._sorted_order + offset.unsqueeze(1)).view(-1)
            else:
                offset = torch.arange(B, device=self._sorted_order.device) * P
                self._order = (self._sorted_order.long() + offset.unsqueeze(1)).view(-1)
        return self._order

    def level(self, index: int) -> ContextLevel:
        if self._pixel_bins is None:  # made on first use: the run core never needs them
            self._pixel_bins = _bins_of_runs(self._start, self._end, self._count, self.target_order, self.overlapping)
        last, first = self._pixel_bins
        shift = self.num_levels - 1 - index
        last = last >> shift  # -1 >> n == -1: in no bin
        if first is None:
            return ContextLevel(last, 2**index)
        first = first >> shift
        extra = (first < last) & (last >= 0)  # pixels in more than one bin at this level
        if not bool(extra.any()):
            return ContextLevel(last, 2**index)
        n = last.numel()
        extra_pix = extra.nonzero().squeeze(1)
        repeats = (last - first).index_select(0, extra_pix).long()
        pair_pix = torch.repeat_interleave(extra_pix, repeats)
        offsets = torch.arange(pair_pix.numel(), device=last.device) - torch.repeat_interleave(
            torch.cumsum(repeats, 0) - repeats, repeats
        )
        pair_bin = first.long().index_select(0, pair_pix) + offsets
        pix = torch.cat([torch.arange(n, device=last.device), pair_pix])
        return ContextLevel(torch.cat([last.long(), pair_bin]), 2**index, pix)

    def row_layout(self, valid: Tensor, target: Tensor | None = None) -> RunLayout | None:
        """Finest bins as runs of their pixels in value order (:class:`hdn._core.runs.RunLayout`).

        A finest bin is a run of each image's pixels in value order (the order the target
        was sorted in when the contexts were made), so the layout needs no further sort.
        ``None`` when bins overlap or when ``valid`` is not the contexts' own mask (then the
        loss uses the general segment core). If ``target`` is (unchanged) the depth these
        contexts were built from, the layout carries the target in run order, read off the
        sorted depths, and every bin's median is its middle member."""
        if self.overlapping or not (valid is self.valid or torch.equal(valid, self.valid)):
            return None
        length = (self._end - self._start).clamp(min=0)
        same = (
            target is not None
            and target.data_ptr() == self._target.data_ptr()
            and target.shape == self._target.shape
            and target.dtype == self._target.dtype
            and target._version == self._target_version
        )
        values = self._sorted_values if same else None
        num_valid = int(self._count.sum())  # (the maximum-depth pixels are valid, in no bin)
        return RunLayout.from_sorted(self._sorted_order, self._start, length, self.num_levels, values, num_valid)


def sorted_valid_values(target: Tensor, valid: Tensor, *, invalid_tail: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """Each image's valid values ascending, then ``+inf``: ``(B, H*W)``; the valid counts
    ``(B,)``; and the order, ``(B, H*W)`` int32: the pixel (within its image) at each sorted
    place, ties (and the invalid pixels at the end) by pixel index (on CPU -0.0 sorts
    before 0.0).

    With ``invalid_tail=False`` the order's places past each image's valid count may hold
    anything: :func:`complete_invalid_tail` fills them later, where they are needed.

    On CPU, float32 values sort in NumPy as one int64 key per pixel (the value's
    order-preserving bits above the pixel index: vectorised sorting networks, no argsort),
    two threads when torch may use two; where no image is more than half valid (sparse
    LiDAR-like depth), only the valid keys are sorted. Elsewhere a stable :func:`torch.sort`."""
    B = target.shape[0]
    rows = torch.where(valid, target, float("inf")).reshape(B, -1)
    count = valid.reshape(B, -1).view(torch.uint8).sum(1, dtype=torch.int32).long()  # (no int64 copy)
    if rows.device.type != "cpu" or rows.dtype != torch.float32 or rows.shape[1] >= 2**31:
        values, order = torch.sort(rows, dim=1, stable=True)
        return values, count, order.to(torch.int32)
    order = torch.empty(rows.shape, dtype=torch.int32)
    x, o, n = rows.numpy(), order.numpy(), count.numpy()
    if B > 1 and torch.get_num_threads() > 1 and x.size >= 2**16:
        halves = [(0, B // 2), (B // 2, B)]
        unfilled = any(list(_select_pool().map(lambda h: _sort_with_order(x[h[0] : h[1]], o[h[0] : h[1]], n[h[0] : h[1]]), halves)))
    else:
        unfilled = _sort_with_order(x, o, n)
    if invalid_tail and unfilled:
        complete_invalid_tail(order, count, valid)
    return rows, count, order


def complete_invalid_tail(order: Tensor, count: Tensor, valid: Tensor) -> Tensor:
    """Fill, in place, the places of ``order`` (``(B, P)`` int32) past each image's valid
    count ``count`` (``(B,)``) with that image's invalid pixels ascending (``valid``: its
    ``B * P`` bool mask). Returns ``order``."""
    B, P = order.shape
    invalid = ~valid.reshape(B, P)
    tail = torch.arange(P, device=order.device).unsqueeze(0) >= count.unsqueeze(1)
    order[tail] = invalid.nonzero()[:, 1].to(torch.int32)
    return order


_INF_BITS = np.int32(0x7F800000)  # float32 +inf as int32 bits
_PAD_INDEX = np.int32(0x7FFFFFFF)


def _sort_with_order(values: np.ndarray, order: np.ndarray, count: np.ndarray) -> bool:
    """Sort the float32 rows of ``values`` (``+inf`` where invalid, ``count`` finite values
    per row) in place, their pixel indices into ``order`` (int32): one int64 key per entry,
    the value's bits (made order-preserving: a negative float's bits but the sign are
    flipped) above the index, sorted with NumPy's SIMD sort.

    When no row is more than half finite, only the finite keys are sorted, as a
    ``(rows, max count)`` matrix padded with ``+inf`` keys, and ``order``'s places past each
    row's count are left unfilled (see :func:`complete_invalid_tail`). Returns whether they
    were."""
    rows, width = values.shape
    bits = values.view(np.int32)
    longest = int(count.max()) if rows else 0
    if 2 * longest > width:
        key = np.empty((rows, width), dtype=np.int64)
        words = _words(key)
        words[..., 0] = np.arange(width, dtype=np.int32)
        negative = _fold_sign(bits, words[..., 1])
        key.sort(axis=1)
        np.copyto(order, words[..., 0])
        np.copyto(bits, words[..., 1])
        if negative:
            bits ^= (bits >> 31) & 0x7FFFFFFF
        return False
    flat = np.flatnonzero(bits != _INF_BITS)  # the finite entries, row by row
    packed = np.empty(flat.size, dtype=np.int64)
    packed_words = _words(packed)
    negative = _fold_sign(bits.reshape(-1)[flat], packed_words[..., 1])
    packed_words[..., 0] = flat % width if rows > 1 else flat
    key = np.empty((rows, longest), dtype=np.int64)
    words = _words(key)
    words[..., 1], words[..., 0] = _INF_BITS, _PAD_INDEX
    key[np.arange(longest) < count[:, None]] = packed  # row by row, as ``flat``
    key.sort(axis=1)
    np.copyto(order[:, :longest], words[..., 0])
    np.copyto(bits[:, :longest], words[..., 1])
    bits[:, longest:] = _INF_BITS
    if negative:
        head = bits[:, :longest]
        head ^= (head >> 31) & 0x7FFFFFFF
    return bool((count < width).any())


def _words(key: np.ndarray) -> np.ndarray:
    """``key``'s int64 entries as ``(..., 2)`` int32 (low word, high word)."""
    words = key.view(np.int32).reshape(*key.shape, 2)
    return words[..., ::-1] if sys.byteorder != "little" else words  # pragma: no branch


def _fold_sign(bits: np.ndarray, out: np.ndarray) -> bool:
    """Write float32 ``bits`` into ``out`` as order-preserving int32 (a negative float's bits
    but the sign flipped); return whether any was negative."""
    negative = bool((bits < 0).any())
    if negative:
        np.bitwise_xor(bits, (bits >> 31) & 0x7FFFFFFF, out=out)
    else:
        out[...] = bits
    return negative


def _bins_of_runs(
    start: Tensor, end: Tensor, count: Tensor, order: Tensor, overlapping: bool
) -> tuple[Tensor, Tensor | None]:
    """The bins of every pixel, from the finest bins as runs of each image's sorted depths.

    Bin ``i`` holds the sorted positions ``start[:, i] <= r < end[:, i]`` (a bin starts at
    the first position with value >= its lower edge and ends at the first with value >= its
    upper edge). The bins that hold position ``r`` are ``first(r) .. last(r)`` with
    ``last(r)`` = (number of bins starting at or before ``r``) - 1 and ``first(r)`` = number
    of bins ending at or before ``r``: two cumulative sums label all positions, and
    ``order`` takes the labels back to the pixels.

    Args:
        start, end: ``(B, K)`` run bounds in ``[0, P]``.
        count: ``(B,)`` valid pixels per image.
        order: ``(B * P,)`` the target's image-major value order.
        overlapping: whether any two runs overlap.

    Returns:
        ``last`` (int32 ``(N,)``, -1 for a pixel in no bin) and ``first`` (int32 ``(N,)``),
        or ``None`` for ``first`` when no pixel is in more than one bin.
    """
    B = start.shape[0]
    P = order.numel() // max(B, 1)
    position = torch.arange(P, device=start.device).unsqueeze(0)

    def _count_at_or_before(where: Tensor) -> Tensor:
        marks = torch.zeros(B, P + 1, dtype=torch.int32, device=start.device)
        marks.scatter_add_(1, where, torch.ones_like(where, dtype=torch.int32))
        return torch.cumsum(marks[:, :P], dim=1, dtype=torch.int32)

    last = _count_at_or_before(start) - 1
    first = _count_at_or_before(end)
    member = (first <= last) & (position < count.unsqueeze(1))
    last = last.masked_fill_(~member, -1)

    def _to_pixels(labels: Tensor) -> Tensor:
        out = torch.empty(labels.numel(), dtype=labels.dtype, device=labels.device)
        return out.index_copy_(0, order.long(), labels.reshape(-1))

    return _to_pixels(last), (_to_pixels(first) if overlapping else None)


def whole_image(target: Tensor, mask: Tensor | None = None) -> Contexts:
    """One context per image (the valid mask): image-level SSI.

    Args:
        target: ``(B, 1, H, W)`` or ``(B, H, W)``.
        mask: optional bool mask of the same shape.
    """
    return spatial_grid(target, mask, levels=1)


def depth_range(target: Tensor, mask: Tensor | None = None, *, levels: int = 3) -> IntervalContexts:
    """Depth-range (DR) contexts: equal-width bins of the valid depth range.

    At level ``l`` bin ``i`` holds ``lo + (hi - lo) * (i * w) <= g < lo + (hi - lo) *
    ((i + 1) * w) + 1e-30`` with ``w = 2**-l``, computed in the target's dtype (float32 for
    half inputs). As in the released code the ``1e-30`` vanishes in floating point, so the
    pixels equal to the maximum depth are in no bin.

    Args:
        target: ``(B, 1, H, W)`` or ``(B, H, W)`` depth.
        mask: optional bool mask of the same shape; non-finite depths are always invalid.
        levels: number of levels ``L >= 1``; ``2**L - 1`` contexts per image.

    Returns:
        :class:`IntervalContexts`.

    Examples:
        >>> g = torch.arange(8.0).view(1, 1, 2, 4)
        >>> ctx = depth_range(g, levels=2)
        >>> ctx.num_contexts
        3
        >>> ctx.level_ids(1)[0].tolist()
        [[0, 0, 0, 0], [1, 1, 1, -1]]
    """
    check_levels(levels)
    return _depth_range(*_prepare_target(target, mask), levels)


def _depth_range(g: Tensor, valid: Tensor, levels: int) -> IntervalContexts:
    sorted_rows, count, order = sorted_valid_values(g, valid, invalid_tail=False)
    empty = (count == 0).unsqueeze(1)
    lo = sorted_rows[:, :1].masked_fill(empty, 0)
    hi = sorted_rows.gather(1, (count - 1).clamp(min=0).unsqueeze(1)).masked_fill_(empty, 0)
    lower, upper = [], []
    for lvl in range(levels):
        bins = 2**lvl
        frac = torch.arange(bins + 1, dtype=g.dtype, device=g.device) / bins
        edges = lo + (hi - lo) * frac
        lower.append(edges[:, :-1].contiguous())
        upper.append((edges[:, 1:] + 1e-30).contiguous())
    return IntervalContexts(g, valid, lower, upper, (sorted_rows, count, order))


def _sorted_quantiles(sorted_rows: Tensor, count: Tensor, fractions: Tensor) -> Tensor:
    """Linear-interpolation quantiles (torch.quantile's rule) of the first ``count`` entries
    of each sorted row; ``(B, Q)``. Ranks are computed in float64, so rows longer than
    2**24 entries are handled exactly."""
    ranks = fractions.to(torch.float64).unsqueeze(0) * (count.to(torch.float64) - 1).clamp(min=0).unsqueeze(1)
    below = ranks.floor()
    weight = (ranks - below).to(sorted_rows.dtype)
    below_i = below.to(torch.int64)
    above_i = ranks.ceil().to(torch.int64)
    lo = sorted_rows.gather(1, below_i)
    hi = sorted_rows.gather(1, above_i)
    return torch.lerp(lo, hi, weight)


def depth_percentile(
    target: Tensor, mask: Tensor | None = None, *, levels: int = 3
) -> IntervalContexts:
    """Depth-percentile (DP) contexts: equal-count bins of the valid depths.

    At level ``l`` bin ``i`` holds ``q(i / 2**l) <= g < q((i + 1) / 2**l)``, ``q`` the
    linearly interpolated quantile of the image's valid depths (as ``torch.nanquantile``,
    but without its size limit of 2**24 pixels and with half-precision inputs computed in
    float32). The pixels equal to the maximum depth are in no bin (released behaviour).

    Args:
        target: ``(B, 1, H, W)`` or ``(B, H, W)`` depth.
        mask: optional bool mask; non-finite depths are always invalid.
        levels: number of levels ``L >= 1``; ``2**L - 1`` contexts per image.

    Returns:
        :class:`IntervalContexts`.

    Examples:
        >>> g = torch.tensor([[1.0, 2.0, 3.0, 10.0, 20.0]]).view(1, 1, 1, 5)
        >>> depth_percentile(g, levels=2).level_ids(1)[0].tolist()
        [[0, 0, 1, 1, -1]]
    """
    check_levels(levels)
    return _depth_percentile(*_prepare_target(target, mask), levels)


def _depth_percentile(g: Tensor, valid: Tensor, levels: int) -> IntervalContexts:
    sorted_rows, count, order = sorted_valid_values(g, valid, invalid_tail=False)
    lower, upper = [], []
    for lvl in range(levels):
        bins = 2**lvl
        frac = torch.arange(bins + 1, dtype=torch.float64, device=g.device) / bins
        q = _sorted_quantiles(sorted_rows, count, frac)
        q = torch.where(count.unsqueeze(1) > 0, q, torch.zeros_like(q))
        lower.append(q[:, :-1].contiguous())
        upper.append(q[:, 1:].contiguous())
    return IntervalContexts(g, valid, lower, upper, (sorted_rows, count, order))


class GridContexts(Contexts):
    """Spatial grid (DS): level ``l`` cuts every image into ``2**l x 2**l`` cells.

    Cell ``(r, c)`` covers rows ``[int(r * w * H), int((r + 1) * w * H))`` and columns
    ``[int(c * w * W), int((c + 1) * w * W))``, ``w = 2**-l``.
    """

    def __init__(self, valid: Tensor, levels: int):
        B, H, W = valid.shape
        if 2 ** (levels - 1) > min(H, W):
            raise ValueError(
                f"Invalid levels: DS level {levels - 1} needs a {2 ** (levels - 1)}x"
                f"{2 ** (levels - 1)} grid, finer than the {H}x{W} image; use levels <= "
                f"{int(math.log2(min(H, W))) + 1}."
            )
        self.shape = (B, H, W)
        self.valid = valid
        self.num_levels = levels

    def row_layout(self, valid: Tensor, target: Tensor | None = None) -> RunLayout:
        """Finest cells in quadtree order, as runs (:class:`hdn._core.runs.RunLayout`)."""
        return RunLayout.grid(valid.view(self.shape), self.num_levels)

    @staticmethod
    def _cell_index(size: int, cells: int, device) -> Tensor:
        w = 1 / cells
        starts = torch.tensor([int(i * w * size) for i in range(1, cells)], dtype=torch.int64)
        return torch.searchsorted(starts, torch.arange(size), right=True).to(device)

    def level(self, index: int) -> ContextLevel:
        B, H, W = self.shape
        cells = 2**index
        dev = self.valid.device
        rows = self._cell_index(H, cells, dev)
        cols = self._cell_index(W, cells, dev)
        cell = (rows.unsqueeze(1) * cells + cols.unsqueeze(0)).to(torch.int32)
        return ContextLevel(cell.expand(B, H, W).reshape(-1), cells * cells)


def spatial_grid(target: Tensor, mask: Tensor | None = None, *, levels: int = 3) -> GridContexts:
    """Spatial (DS) contexts: a ``2**l x 2**l`` grid at level ``l``, ``(4**L - 1) / 3`` contexts.

    Args:
        target: ``(B, 1, H, W)`` or ``(B, H, W)``; only its shape and validity are used.
        mask: optional bool mask; non-finite target values are always invalid.
        levels: ``L >= 1`` with ``2**(L - 1) <= min(H, W)``.

    Returns:
        :class:`GridContexts`.

    Examples:
        >>> ctx = spatial_grid(torch.rand(1, 1, 3, 5), levels=2)
        >>> ctx.num_contexts
        5
        >>> ctx.level_ids(1)[0].tolist()
        [[0, 0, 1, 1, 1], [2, 2, 3, 3, 3], [2, 2, 3, 3, 3]]
    """
    check_levels(levels)
    _, valid = _prepare_target(target, mask)
    return GridContexts(valid, levels)


class LabelContexts(Contexts):
    """Contexts from label maps: one level per map; pixels with equal label form a context.

    Args:
        labels: list of ``(B, H, W)`` int64 maps with compact labels in ``[0, K_l)`` or -1.
        counts: ``K_l`` per level.
        valid: ``(B, H, W)`` bool.
    """

    def __init__(self, labels: list[Tensor], counts: list[int], valid: Tensor):
        self.shape = tuple(valid.shape)  # type: ignore[assignment]
        self.valid = valid
        self._labels, self._counts = labels, counts
        self.num_levels = len(labels)

    def level(self, index: int) -> ContextLevel:
        return ContextLevel(self._labels[index].reshape(-1), self._counts[index])


def from_labels(
    labels: Tensor | Sequence[Tensor], target: Tensor | None = None, mask: Tensor | None = None
) -> LabelContexts:
    """Contexts from the user's own label maps (superpixels, semantic segments, ...).

    Args:
        labels: an integer map ``(B, H, W)`` / ``(B, 1, H, W)``, or a sequence of them (one
            level each, e.g. superpixels at several granularities). Pixels that share a label
            in an image form one context; negative labels mean "in no context". Labels need
            not be contiguous.
        target: optional depth whose non-finite entries are invalid.
        mask: optional bool validity mask.

    Returns:
        :class:`LabelContexts`.

    Examples:
        >>> lab = torch.tensor([[[5, 5, 9], [-1, 9, 9]]])
        >>> from_labels(lab).level_ids(0).tolist()
        [[[0, 0, 1], [-1, 1, 1]]]
    """
    maps = [labels] if isinstance(labels, Tensor) else list(labels)
    if not maps:
        raise ValueError("Invalid labels: we expect at least one label map. Got: an empty sequence.")
    maps = [_as_bhw(m, "labels") for m in maps]
    shape = maps[0].shape
    for m in maps:
        if m.shape != shape or m.dtype.is_floating_point or m.dtype == torch.bool:
            raise ValueError(
                f"Invalid labels: we expect integer maps of one shape {tuple(shape)}. "
                f"Got: {m.dtype} {tuple(m.shape)}."
            )
    if target is not None:
        _, valid = _prepare_target(target, mask)
        if valid.shape != shape:
            raise ValueError(
                f"Invalid target shape: we expect the labels' shape {tuple(shape)}. Got: {tuple(valid.shape)}."
            )
    elif mask is not None:
        valid = _as_bhw(mask, "mask").bool()
    else:
        valid = torch.ones(shape, dtype=torch.bool, device=maps[0].device)
    compact, counts = [], []
    for m in maps:
        m = m.to(torch.int64)
        B = m.shape[0]
        keep = m >= 0
        shifted = torch.where(keep, m, 0)
        span = int(shifted.max()) + 1 if shifted.numel() else 1
        key = torch.arange(B, device=m.device).view(B, 1, 1) * span + shifted
        uniq, inverse = torch.unique(key[keep], return_inverse=True)
        per_image = torch.bincount(uniq // span, minlength=B)
        K = max(int(per_image.max()) if per_image.numel() else 0, 1)
        first = torch.cumsum(per_image, 0) - per_image
        local = inverse - first[uniq[inverse] // span]
        lab = torch.full_like(m, -1)
        lab[keep] = local
        compact.append(lab)
        counts.append(K)
    return LabelContexts(compact, counts, valid)


class PairContexts(Contexts):
    """Overlapping contexts given as (pixel, segment) pairs, in one level.

    Used by the random variants: ``aggregation="pooled"`` and the prediction's median
    without gradient, as in the follow-up work (docs/semantics.md §4).
    """

    aggregation = "pooled"
    detach_pred_median = True

    def __init__(self, valid: Tensor, pix: Tensor, index: Tensor, per_image: int, description: Tensor):
        self.shape = tuple(valid.shape)  # type: ignore[assignment]
        self.valid = valid
        self.num_levels = 1
        self._pix, self._index, self._per_image = pix, index, per_image
        self.description = description

    def level(self, index: int) -> ContextLevel:
        if index != 0:
            raise IndexError(index)
        return ContextLevel(self._index, self._per_image, self._pix)


def _pairs_from_membership(member: Tensor) -> tuple[Tensor, Tensor]:
    """``member`` (K, B, P) bool -> flat pixel indices and context indices ``k``."""
    P = member.shape[2]
    k, b, i = member.nonzero(as_tuple=True)
    return b * P + i, k


def _check_generator(num: int, generator: torch.Generator | None) -> None:
    if isinstance(num, bool) or not isinstance(num, int) or num < 0:
        raise ValueError(f"Invalid num: we expect an integer >= 0. Got: {num!r}.")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"Invalid generator: we expect a torch.Generator. Got: {type(generator).__name__}.")


def random_depth_intervals(
    target: Tensor,
    mask: Tensor | None = None,
    *,
    num: int = 8,
    min_width: float = 0.1,
    generator: torch.Generator | None = None,
) -> PairContexts:
    """Random depth-interval contexts plus the whole image (follow-up work, docs/semantics.md §4).

    For each image, ``num`` intervals ``[lo + (hi - lo) * a, lo + (hi - lo) * (a + w)]`` of
    the valid depth range ``[lo, hi]`` with ``w ~ U(min_width, 1)`` and ``a ~ U(0, 1 - w)``
    (closed intervals); context 0 is the whole image. Losses are pooled over all
    (context, pixel) pairs and the prediction's median carries no gradient.

    Args:
        target: ``(B, 1, H, W)`` or ``(B, H, W)`` depth.
        mask: optional bool mask.
        num: number of random intervals per image.
        min_width: smallest interval width as a fraction of the range, in (0, 1].
        generator: the random source (sampled on CPU, so results do not depend on device).

    Returns:
        :class:`PairContexts` whose ``description`` is ``(B, num, 2)`` interval bounds.
    """
    _check_generator(num, generator)
    if not 0 < min_width <= 1:
        raise ValueError(f"Invalid min_width: we expect a fraction in (0, 1]. Got: {min_width!r}.")
    g, valid = _prepare_target(target, mask)
    B = g.shape[0]
    flat, vflat = g.reshape(B, -1), valid.reshape(B, -1)
    inf = torch.tensor(float("inf"), dtype=g.dtype, device=g.device)
    lo = torch.where(vflat, flat, inf).amin(dim=1)
    hi = torch.where(vflat, flat, -inf).amax(dim=1)
    lo = torch.where(vflat.any(1), lo, 0)
    hi = torch.where(vflat.any(1), hi, 0)
    width = min_width + (1 - min_width) * torch.rand(B, num, generator=generator, dtype=torch.float64)
    start = (1 - width) * torch.rand(B, num, generator=generator, dtype=torch.float64)
    span = (hi - lo).to(torch.float64).cpu().unsqueeze(1)
    a = (lo.to(torch.float64).cpu().unsqueeze(1) + span * start)
    b = a + span * width
    bounds = torch.stack([a, b], dim=-1).to(device=g.device, dtype=g.dtype)
    inside = (flat.unsqueeze(0) >= bounds[..., 0].T.unsqueeze(-1)) & (
        flat.unsqueeze(0) <= bounds[..., 1].T.unsqueeze(-1)
    )
    member = torch.cat([vflat.unsqueeze(0), inside & vflat.unsqueeze(0)], dim=0)
    pix, index = _pairs_from_membership(member)
    return PairContexts(valid, pix, index, num + 1, bounds)


def random_crops(
    target: Tensor,
    mask: Tensor | None = None,
    *,
    num: int = 8,
    min_size: float = 1 / 8,
    max_size: float = 1 / 2,
    generator: torch.Generator | None = None,
) -> PairContexts:
    """Random rectangular crops plus the whole image (follow-up work, docs/semantics.md §4).

    Each crop has a height drawn uniformly from ``[ceil(min_size * H), floor(max_size * H)]``
    (at least 1) and likewise a width, at a uniform position inside the image. Losses are
    pooled over all (context, pixel) pairs; the prediction's median carries no gradient.

    Args:
        target: ``(B, 1, H, W)`` or ``(B, H, W)``; only shape and validity are used.
        mask: optional bool mask.
        num: crops per image.
        min_size, max_size: edge-length range as fractions of the image side.
        generator: the random source (sampled on CPU).

    Returns:
        :class:`PairContexts` whose ``description`` is ``(B, num, 4)`` boxes
        ``(top, left, height, width)``.
    """
    _check_generator(num, generator)
    if not 0 < min_size <= max_size <= 1:
        raise ValueError(
            f"Invalid min_size/max_size: we expect 0 < min_size <= max_size <= 1. Got: {min_size}, {max_size}."
        )
    _, valid = _prepare_target(target, mask)
    B, H, W = valid.shape

    def _draw(side: int) -> tuple[Tensor, Tensor]:
        smallest = max(1, math.ceil(min_size * side))
        largest = max(smallest, math.floor(max_size * side))
        length = smallest + (torch.rand(B, num, generator=generator, dtype=torch.float64) * (largest - smallest + 1)).long()
        length = length.clamp(max=largest)
        offset = (torch.rand(B, num, generator=generator, dtype=torch.float64) * (side - length + 1)).long()
        return offset, length

    top, height = _draw(H)
    left, width = _draw(W)
    boxes = torch.stack([top, left, height, width], dim=-1).to(valid.device)
    r = torch.arange(H, device=valid.device).view(1, 1, H, 1)
    c = torch.arange(W, device=valid.device).view(1, 1, 1, W)
    tb, lb, hb, wb = (boxes[..., j].T.reshape(num, B, 1, 1) for j in range(4))
    inside = (r >= tb) & (r < tb + hb) & (c >= lb) & (c < lb + wb)
    member = torch.cat([valid.unsqueeze(0), inside & valid.unsqueeze(0)], dim=0).reshape(num + 1, B, H * W)
    pix, index = _pairs_from_membership(member)
    return PairContexts(valid, pix, index, num + 1, boxes)


def check_contexts(contexts: object, shape: tuple[int, ...], device: torch.device, *, name: str = "contexts") -> Contexts:
    """A :class:`Contexts` built for ``shape`` ``(B, H, W)`` on ``device``, else a ValueError naming ``name``."""
    if not isinstance(contexts, Contexts):
        raise ValueError(
            f"Invalid {name}: we expect one of {CONTEXT_NAMES} or a hdn.contexts.Contexts. "
            f"Got: {type(contexts).__name__}."
        )
    if tuple(contexts.shape) != tuple(shape):
        raise ValueError(
            f"Invalid {name}: we expect contexts built for shape {tuple(shape)}. Got: {tuple(contexts.shape)}."
        )
    if contexts.valid.device != device:
        raise ValueError(f"Invalid {name}: we expect contexts on {device}. Got: {contexts.valid.device}.")
    return contexts


_BUILDERS = {"dr": depth_range, "dp": depth_percentile, "ds": spatial_grid}
_CHECKED_BUILDERS = {
    "dr": _depth_range,
    "dp": _depth_percentile,
    "ds": lambda g, valid, levels: GridContexts(valid, levels),
}


def build(name: str, target: Tensor, mask: Tensor | None = None, *, levels: int = 3) -> Contexts:
    """Contexts by name: ``"dr"``, ``"dp"`` or ``"ds"``."""
    if name not in _BUILDERS:
        raise ValueError(f"Invalid context: we expect one of {CONTEXT_NAMES} or a Contexts object. Got: {name!r}.")
    return _BUILDERS[name](target, mask, levels=levels)


def build_checked(name: str, target: Tensor, valid: Tensor, levels: int) -> Contexts:
    """:func:`build` for inputs that :func:`hdn._validation.check_depth_inputs` already checked:
    ``target`` and ``valid`` ``(B, H, W)``, ``valid`` the finite and unmasked pixels."""
    if name not in _CHECKED_BUILDERS:
        raise ValueError(f"Invalid context: we expect one of {CONTEXT_NAMES} or a Contexts object. Got: {name!r}.")
    return _CHECKED_BUILDERS[name](_depths(target), valid, levels)
