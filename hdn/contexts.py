"""Contexts: which pixels are normalised together, as data the loss engine consumes.

A :class:`Contexts` object describes, for a batch of ``B`` images of ``H x W`` pixels, a
hierarchy of *levels*; :meth:`Contexts.segments` gives a level as
:class:`hdn._core.engine.Segments` (a segment id per pixel, or per (pixel, context) pair where
contexts overlap). Adding a kind of context is writing that one method.

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

Level 0 of DR, DP and DS is always the whole image. DR, DP and DS read nothing back to the
host, so :func:`hdn.hdn_loss` builds them inside a compiled function.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from hdn._core import engine
from hdn._core.engine import Segments, ordered_bits, sorted_members
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

    Subclasses set ``shape = (B, H, W)``, ``valid`` (``(B, H, W)`` bool), ``num_levels`` and
    ``per_image`` (contexts per image at each level), and implement :meth:`segments`.

    ``aggregation`` ("mean" or "pooled") and ``detach_pred_median`` are the published
    defaults of the kind (read-only): :func:`hdn.contexts_loss` takes them unless its own
    arguments say otherwise.
    """

    shape: tuple[int, int, int]
    valid: Tensor
    num_levels: int
    per_image: list[int]
    default_aggregation = "mean"
    default_detach_pred_median = False

    @property
    def aggregation(self) -> str:
        return self.default_aggregation

    @property
    def detach_pred_median(self) -> bool:
        return self.default_detach_pred_median

    def segments(self, level: int) -> Segments:  # pragma: no cover - abstract
        """Level ``level`` as :class:`hdn._core.engine.Segments`: segment ``b * K + k`` is
        context ``k`` of image ``b`` (``K`` = ``per_image[level]``), ``B * K`` the spare."""
        raise NotImplementedError

    def contexts_per_image(self, index: int) -> int:
        """Number of contexts of one image at level ``index``."""
        return self.per_image[index]

    @property
    def num_contexts(self) -> int:
        """Number of contexts per image, all levels together."""
        return sum(self.per_image)

    def _members(self, index: int) -> tuple[Tensor, Tensor]:
        """Context ``k`` and pixel of every membership of level ``index`` (host-synchronising)."""
        level = self.segments(index)
        pixel = torch.arange(level.seg.numel(), device=level.seg.device) % self.valid.numel()
        member = (level.seg < level.num) & self.valid.reshape(-1).gather(0, pixel)
        return (level.seg % self.per_image[index])[member], pixel[member]

    def level_masks(self, index: int) -> Tensor:
        """The contexts of one level as boolean masks ``(K, B, H, W)`` (for plotting).

        Masks are intersected with the valid pixels. The loss never builds these.
        """
        B, H, W = self.shape
        k, pixel = self._members(index)
        masks = torch.zeros(self.per_image[index], B * H * W, dtype=torch.bool, device=self.valid.device)
        masks[k, pixel] = True
        return masks.view(self.per_image[index], B, H, W)

    def to_masks(self) -> Tensor:
        """All contexts as boolean masks ``(C, B, H, W)``, level 0 first, for plotting."""
        return torch.cat([self.level_masks(i) for i in range(self.num_levels)], dim=0)

    def level_ids(self, index: int) -> Tensor:
        """Context index of every pixel at a partition level, ``(B, H, W)`` int64, -1 = none."""
        k, pixel = self._members(index)
        if torch.unique(pixel).numel() != pixel.numel():
            raise ValueError(f"Invalid index: level {index} has overlapping contexts; use level_masks.")
        ids = torch.full((self.valid.numel(),), -1, dtype=torch.int64, device=self.valid.device)
        return ids.index_put_((pixel,), k).view(self.shape)

    def __repr__(self) -> str:
        B, H, W = self.shape
        return (
            f"{type(self).__name__}(B={B}, H={H}, W={W}, levels={self.num_levels}, "
            f"contexts_per_image={self.num_contexts}, aggregation={self.aggregation!r})"
        )


def _partition(valid: Tensor, local: Tensor, keep: Tensor, per_image: int) -> Tensor:
    """Segment ids ``(N,)`` of a level where each pixel is in at most one context: ``local``
    ``(B, P)`` its context in its image where ``keep``, else the spare ``B * per_image``."""
    B = valid.shape[0]
    base = torch.arange(B, device=valid.device).unsqueeze(1) * per_image
    keep = keep & valid.reshape(B, -1)
    return torch.where(keep, base + local, B * per_image).reshape(-1)


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


def sorted_target(target: Tensor, valid: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Each image's valid values ascending, then ``+inf``, ``(B, P)``; the pixel (within its
    image) at each place, ``(B, P)`` int64 (any past the valid count); and the valid counts
    ``(B,)``. One flat stable sort of integer keys (image, then value; two for float64), a
    radix sort on CPU and CUDA, of the valid pixels (:func:`hdn._core.engine.sorted_members`)."""
    B = target.shape[0]
    rows = torch.where(valid, target, float("inf")).reshape(B, -1)
    N, P = rows.numel(), rows.shape[1]
    first = torch.arange(B, device=rows.device).unsqueeze(1)  # (each image's pixels: [b * P, (b + 1) * P))
    keep = valid.reshape(-1)
    if rows.dtype == torch.float32:  # the image above the value's 32 bits
        order = sorted_members((ordered_bits(rows) + (first << 32)).view(-1), keep)[1]
    else:
        order = sorted_members(ordered_bits(rows).view(-1), keep)[1]
        order = order.gather(0, torch.sort(order // P, stable=True).indices)
    rows = rows.view(-1)
    count = keep.view(B, P).sum(1)
    if order.numel() < N:  # the valid pixels only (CPU): to their places in (B, P)
        image = order // P
        start = torch.cumsum(count, 0) - count
        at = image * P + torch.arange(order.numel()) - start[image]
        order = torch.zeros(N, dtype=torch.int64).index_put_((at,), order)
        rows = torch.full_like(rows, float("inf")).index_put_((at,), rows[order[at]])
        return rows.view(B, P), (order % P).view(B, P), count
    return rows.gather(0, order).view(B, P), order.view(B, P) - first * P, count


class _Finest(NamedTuple):
    """What every level of :class:`IntervalContexts` reads, made once at the finest level."""

    last: Tensor  # (B, P) each pixel's last finest bin whose lower edge it reaches (0 if none)
    reached: Tensor  # (B, P) valid and at or above the lowest edge
    inside: Tensor  # (B, P) reached and below that bin's upper edge: then in a bin at every level
    medians: Tensor  # (B, 2**L - 1) each bin's target median pixel, level by level
    image: Tensor  # (B, 1) the image indices
    overlaps: list[bool]  # per level, whether two bins may overlap


class IntervalContexts(Contexts):
    """Depth-interval bins: bin ``i`` of level ``l`` holds the valid ``lower <= g < upper``.

    Args:
        target: ``(B, H, W)`` depth (finite where valid; other entries are never read as depths).
        valid: ``(B, H, W)`` bool.
        lower: per level ``l``, ``(B, 2**l)`` lower bin edges (non-decreasing along bins).
        upper: per level ``l``, ``(B, 2**l)`` upper bin edges (non-decreasing along bins).
        sorted_rows: ``sorted_target(target, valid)``; ``None`` for one level, which needs
            no sort.
        may_overlap: whether an upper edge may pass the next bin's lower edge (DR's
            ``+ 1e-30``): then a pixel may be in two bins of a level, and each level gives
            two entries per pixel. A pixel in three or more bins of a level would need an
            image whose valid range is narrower than ``2**l * 1e-30`` around 0; there it is
            kept in its last two.

    The levels nest (the edges of level ``l`` are every ``2**(L-1-l)``-th edge of the finest
    level, true of DR and DP, whose edges are the same float computations at the same
    fractions), so each pixel's bin is found once, at the finest level. A bin is a run of
    each image's sorted depths, so the target's median of each bin is read at the middle of
    its run: no sort per level.
    """

    def __init__(
        self,
        target: Tensor,
        valid: Tensor,
        lower: list[Tensor],
        upper: list[Tensor],
        sorted_rows: tuple[Tensor, Tensor, Tensor],
        may_overlap: bool = False,
    ):
        self.shape = tuple(target.shape)  # type: ignore[assignment]
        self.valid = valid
        self.lower, self.upper = lower, upper
        self.num_levels = len(lower)
        self.per_image = [edges.shape[1] for edges in lower]
        self._target = target
        self._sorted = sorted_rows
        self._rows = target.reshape(target.shape[0], -1)
        self._may_overlap = may_overlap
        self._fine: tuple | None = None

    def segments(self, level: int) -> Segments:
        B, H, W = self.shape
        if level == 0:  # one bin per image: the image's row, less the pixels outside the bin
            g = self._target.reshape(B, -1)
            inside = self.valid.reshape(B, -1) & (g >= self.lower[0]) & (g < self.upper[0])
            seg = torch.where(inside, torch.arange(B, device=g.device).unsqueeze(1), B).view(-1)
            known = None if self._sorted is None else self._finest().medians[:, 0]  # (L = 1: no sort)
            return Segments(seg, B, rows=(1, H, W), target_median=known)
        K, shift = self.per_image[level], self.num_levels - 1 - level
        fine = self._finest()
        last = fine.last >> shift if shift else fine.last  # the levels nest: finest bin j is in bin j >> shift
        bins = last.add(fine.image, alpha=K)
        seg = torch.where(fine.inside, bins, B * K).view(-1)
        median = torch.nn.functional.pad(fine.medians[:, K - 1 : 2 * K - 1].reshape(-1), (0, 1))
        if not fine.overlaps[level]:
            return Segments(seg, B * K, target_median=median)
        # DR's + 1e-30 can keep a pixel in the bin before as well (no bin before bin 0: -inf)
        upper_before = torch.nn.functional.pad(self.upper[level], (1, 0), value=-float("inf"))
        second = torch.where(fine.reached & (self._rows < upper_before.gather(1, last)), bins - 1, B * K).view(-1)
        return Segments(torch.cat([seg, second]), B * K, 2, target_median=median)

    def _finest(self) -> _Finest:
        """Made once: what every level reads (:class:`_Finest`)."""
        if self._fine is None:
            B, H, W = self.shape
            values, within, _ = self._sorted
            lower, upper = self.lower[-1].contiguous(), self.upper[-1].contiguous()
            last = torch.searchsorted(lower, self._rows, right=True) - 1
            reached = self.valid.reshape(B, -1) & (last >= 0)
            last = last.clamp(min=0)
            # a pixel below its finest bin's upper edge is below its bin's at every level: the
            # coarser upper edges are finest upper edges, and never lower than the bins' inside
            inside = reached & (self._rows < upper.gather(1, last))
            start = torch.searchsorted(values, lower)  # (at most the valid count: +inf after it)
            end = torch.searchsorted(values, upper)
            # every level's bins are runs [start, end) of the sorted depths: their middles, level
            # by level, (B, 2**L - 1)
            steps = [1 << (self.num_levels - 1 - lvl) for lvl in range(self.num_levels)]
            start = torch.cat([start[:, ::step] for step in steps], 1)
            end = torch.cat([end[:, step - 1 :: step] for step in steps], 1)
            middle = torch.div(start + end - 1, 2, rounding_mode="floor").clamp(0, H * W - 1)
            image = torch.arange(B, device=last.device).unsqueeze(1)
            self._fine = _Finest(
                last,
                reached,
                inside,
                within.gather(1, middle) + image * (H * W),
                image,
                self._overlapping_levels(),
            )
        return self._fine

    def _overlapping_levels(self) -> list[bool]:
        """Per level, whether an upper edge may pass the next lower edge (DR's ``+ 1e-30``).
        Read on the CPU, where a host read costs nothing; elsewhere, and under compile,
        assumed for DR."""
        if not self._may_overlap:
            return [False] * self.num_levels
        if not engine.reads_host(self.valid):
            return [True] * self.num_levels
        over = (self.upper[-1][:, :-1] > self.lower[-1][:, 1:]).any(0).tolist() + [False]
        return [any(over[(1 << (self.num_levels - 1 - lvl)) - 1 :: 1 << (self.num_levels - 1 - lvl)]) for lvl in range(self.num_levels)]


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


def _valid_range(g: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
    """Each image's smallest and largest valid depth, ``(B, 1)`` each (+inf and -inf for an
    image without valid pixels)."""
    g = g.reshape(g.shape[0], -1)
    valid = valid.reshape(g.shape)
    lo = torch.where(valid, g, float("inf")).amin(1, keepdim=True)
    return lo, torch.where(valid, g, -float("inf")).amax(1, keepdim=True)


def _depth_range(g: Tensor, valid: Tensor, levels: int) -> IntervalContexts:
    sorted_rows = sorted_target(g, valid) if levels > 1 else None
    lo, hi = _valid_range(g, valid)
    bins = 2 ** (levels - 1)  # the finest level's edges; a coarser level's are every few
    edges = lo + (hi - lo) * torch.linspace(0, 1, bins + 1, dtype=g.dtype, device=g.device)  # (i / bins, exact)
    edges = torch.nan_to_num(edges, nan=0.0)  # (an image without valid pixels: inf - inf)
    lower, upper = _nested_levels(edges, edges + 1e-30, levels)
    return IntervalContexts(g, valid, lower, upper, sorted_rows, may_overlap=True)


def _nested_levels(lower_edges: Tensor, upper_edges: Tensor, levels: int) -> tuple[list[Tensor], list[Tensor]]:
    """Each level's lower and upper bin edges ``(B, 2**l)`` from the finest level's edges
    ``(B, 2**(L-1) + 1)``: level ``l`` takes every ``2**(L-1-l)``-th (the same floats as
    computing them at its own fractions, which are exact)."""
    lower, upper = [], []
    for lvl in range(levels):
        step = 1 << (levels - 1 - lvl)
        lower.append(lower_edges[:, :-1:step])
        upper.append(upper_edges[:, step::step])
    return lower, upper


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
    if levels == 1:  # the quantiles 0 and 1: the valid range, no sort
        sorted_rows, q = None, torch.nan_to_num(torch.cat(_valid_range(g, valid), 1), posinf=0.0, neginf=0.0)
        lower, upper = _nested_levels(q, q, levels)
        return IntervalContexts(g, valid, lower, upper, sorted_rows)
    sorted_rows = values, _, count = sorted_target(g, valid)
    bins = 2 ** (levels - 1)
    frac = torch.arange(bins + 1, dtype=torch.float64, device=g.device) / bins
    q = torch.where(count.unsqueeze(1) > 0, _sorted_quantiles(values, count, frac), 0)
    lower, upper = _nested_levels(q, q, levels)
    return IntervalContexts(g, valid, lower, upper, sorted_rows)


def _grid_cells(size: int, cells: int, device) -> tuple[Tensor, Tensor, Tensor]:
    """Along one side: each coordinate's cell ``(size,)``, each cell's first coordinate and
    length ``(cells,)``; made on ``device`` (no host copy). The bounds are the released rule's
    ``int(i * w * size)``, ``w = 1 / cells``, which is exact in floating point and so equals
    ``i * size // cells``: the cells are ``size // cells`` or ``size // cells + 1`` long."""
    bounds = torch.arange(cells + 1, device=device) * size // cells
    cell = torch.searchsorted(bounds[1:-1], torch.arange(size, device=device), right=True)
    return cell, bounds[:-1], bounds[1:] - bounds[:-1]


class GridContexts(Contexts):
    """Spatial grid (DS): level ``l`` cuts every image into ``2**l x 2**l`` cells.

    Cell ``(r, c)`` covers rows ``[int(r * w * H), int((r + 1) * w * H))`` and columns
    ``[int(c * w * W), int((c + 1) * w * W))``, ``w = 2**-l``. Cells are nearly equal in
    size, so the level also gives them as rows of pixels (padded), for row medians.
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
        self.per_image = [4**lvl for lvl in range(levels)]

    def segments(self, level: int) -> Segments:
        B, H, W = self.shape
        cells = 2**level
        key = (B, H, W, level, str(self.valid.device))
        if torch.compiler.is_compiling():  # (in a graph the layout is made once, at trace)
            layout = _grid_layout(B, H, W, level, self.valid.device)
        elif key not in _GRID_LAYOUTS:
            if len(_GRID_LAYOUTS) >= 16:
                _GRID_LAYOUTS.pop(next(iter(_GRID_LAYOUTS)))
            layout = _GRID_LAYOUTS[key] = _grid_layout(B, H, W, level, self.valid.device)
        else:
            layout = _GRID_LAYOUTS[key]
        cell, rows = layout
        seg = torch.where(self.valid.reshape(-1), cell, B * cells * cells)
        return Segments(seg, B * cells * cells, rows=rows)


_GRID_LAYOUTS: dict[tuple, tuple[Tensor, Tensor | tuple[int, int, int]]] = {}
"""The last few grid layouts, by (B, H, W, level, device): they depend on nothing else."""


def _grid_layout(B: int, H: int, W: int, level: int, dev) -> tuple[Tensor, Tensor | tuple[int, int, int]]:
    """Level ``level``'s cells: each pixel's segment ``(N,)`` (``b * cells**2 + cell``), and
    the cells as rows of their pixels: ``(cells, h, w)`` where they are equal, else a table
    ``(B * cells**2, h * w)`` padded with ``N`` (:class:`hdn._core.engine.Segments`)."""
    cells = 2**level
    r, top, heights = _grid_cells(H, cells, dev)
    c, left, widths = _grid_cells(W, cells, dev)
    cell = (r.unsqueeze(1) * cells + c.unsqueeze(0)).reshape(1, -1)
    seg = (cell + torch.arange(B, device=dev).unsqueeze(1) * (cells * cells)).reshape(-1)
    if H % cells == 0 and W % cells == 0:  # equal cells: a strided view of the pixels
        return seg, (cells, H // cells, W // cells)
    h, w = -(-H // cells), -(-W // cells)  # the longest cells (see _grid_cells)
    dy, dx = torch.arange(h, device=dev), torch.arange(w, device=dev)
    pixel = (top.unsqueeze(1) + dy)[:, None, :, None] * W + (left.unsqueeze(1) + dx)[None, :, None, :]
    inside = (dy < heights.unsqueeze(1))[:, None, :, None] & (dx < widths.unsqueeze(1))[None, :, None, :]
    first = (torch.arange(B, device=dev) * (H * W)).view(B, 1, 1, 1, 1)
    return seg, torch.where(inside, pixel + first, B * H * W).reshape(B * cells * cells, h * w)


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
        self._labels = labels
        self.per_image = list(counts)
        self.num_levels = len(labels)

    def segments(self, level: int) -> Segments:
        B = self.shape[0]
        labels = self._labels[level].reshape(B, -1)
        K = self.per_image[level]
        return Segments(_partition(self.valid, labels, labels >= 0, K), B * K)


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
    """Overlapping contexts in one level, as a membership mask per context.

    Used by the random variants, whose published defaults are the pooled aggregation and the
    prediction's median without gradient (docs/semantics.md §4). The level has one entry per
    (context, pixel), members or not, so its size depends on the shape alone: a compiled loss
    takes new draws without recompiling.

    Args:
        valid: ``(B, H, W)`` bool.
        member: ``(K, B, H * W)`` bool, context ``k``'s pixels in each image.
        description: what the contexts are (bounds or boxes), for display.
    """

    default_aggregation = "pooled"
    default_detach_pred_median = True

    def __init__(self, valid: Tensor, member: Tensor, description: Tensor):
        self.shape = tuple(valid.shape)  # type: ignore[assignment]
        self.valid = valid
        self.num_levels = 1
        K, B, P = member.shape
        self.per_image = [K]
        self._member = member & valid.reshape(1, B, P)
        self.description = description

    def segments(self, level: int) -> Segments:
        if level != 0:
            raise IndexError(level)
        K, B, _ = self._member.shape
        context = torch.arange(K, device=self.valid.device).view(K, 1, 1)
        image = torch.arange(B, device=self.valid.device).view(1, B, 1)
        seg = torch.where(self._member, image * K + context, B * K).reshape(-1)
        return Segments(seg, B * K, K)


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
    return PairContexts(valid, torch.cat([vflat.unsqueeze(0), inside], dim=0), bounds)


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
        min_size: smallest edge length, as a fraction of the image side.
        max_size: largest edge length, as a fraction of the image side.
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
    member = torch.cat([valid.unsqueeze(0), inside], dim=0).reshape(num + 1, B, H * W)
    return PairContexts(valid, member, boxes)


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
