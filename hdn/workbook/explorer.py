"""Per-pixel loss maps and interactive context explorers for the workbook.

:func:`hdn.hdn_loss` returns one number. To see *where* a loss puts its weight, the
notebooks need the per-pixel terms it sums:

.. math:: \\ell_i = \\frac{1}{|\\mathcal C_i|}\\sum_{C \\in \\mathcal C_i}\\left|\\hat p^C_i - \\hat g^C_i\\right|,
          \\qquad \\mathcal L = \\frac{1}{N_v}\\sum_i \\ell_i

(``mean`` aggregation, docs/semantics.md §2), computed here level by level with
:func:`hdn.context_normalize`. For the random variants (``pooled`` aggregation,
docs/semantics.md §4) the map is rescaled so that the same identity, ``map.sum() / N_v == loss``, holds.

The explorers (:class:`ContextExplorer`, :class:`GridExplorer`) are ipywidgets front ends
over a pure :meth:`~ContextExplorer.render` that returns a matplotlib figure, so that the
callbacks can be tested by setting widget values from Python.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import torch
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from torch import Tensor

from hdn import contexts as _contexts
from hdn._validation import _as_bhw, check_depth_inputs, check_levels, single_image
from hdn.contexts import CONTEXT_NAMES, Contexts, from_labels
from hdn.normalization import context_normalize
from hdn.workbook._live import LiveFigure, masked_map, one_torch_thread, png_message, update_map
from hdn.workbook.plotting import draw_grid, grid_edges, show_map

__all__ = [
    "CONTEXT_TITLES",
    "ContextExplorer",
    "GridExplorer",
    "boundary_regions",
    "depth_quantile_regions",
    "level_loss_maps",
    "per_pixel_loss_map",
    "region_loss_share",
]

CONTEXT_TITLES = {"dr": "DR (depth range)", "dp": "DP (depth percentile)", "ds": "DS (spatial grid)"}
"""Display names of the built-in context kinds."""

HIGHLIGHT = "tab:orange"
"""Colour of the selected context in the explorers."""


def _resolve(
    pred: Tensor, target: Tensor, mask: Tensor | None, contexts: str | Contexts, levels: int
) -> tuple[Tensor, Tensor, Tensor, Contexts]:
    """Checked ``(B, H, W)`` inputs, the valid pixels the loss uses, and the contexts."""
    p, g, valid = check_depth_inputs(pred, target, mask)
    if isinstance(contexts, str):
        check_levels(levels)
        contexts = _contexts.build(contexts, target, mask, levels=levels)
    _contexts.check_contexts(contexts, p.shape, p.device)
    return p, g, valid & contexts.valid, contexts


def _level_terms(p: Tensor, g: Tensor, valid: Tensor, contexts: Contexts, level: int) -> tuple[Tensor, Tensor]:
    """Per pixel: the sum of ``|p_hat - g_hat|`` over the contexts of one level that hold it,
    and how many contexts of that level hold it; both ``(B, H, W)``."""
    if contexts.segments(level).copies == 1:  # a partition: one context per pixel at most
        member = (contexts.level_ids(level) >= 0) & valid
        diff = (context_normalize(p, contexts, level, valid) - context_normalize(g, contexts, level, valid)).abs()
        return torch.where(member, diff, 0.0), member.to(diff.dtype)
    overlapping = contexts.level_masks(level)
    return _summed(_one_context_terms(p, g, inside & valid) for inside in overlapping)


def _one_context_terms(p: Tensor, g: Tensor, inside: Tensor) -> tuple[Tensor, Tensor]:
    """``|p_hat - g_hat|`` normalised within one context ``inside`` (0 outside) and its 0/1
    membership; both ``(B, H, W)``. Overlapping contexts are normalised one at a time."""
    single = from_labels(torch.where(inside, 0, -1), mask=inside)
    diff = (context_normalize(p, single, 0, inside) - context_normalize(g, single, 0, inside)).abs()
    return torch.where(inside, diff, 0.0), inside.to(diff.dtype)


def _summed(pairs: Iterable[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """Element-wise sums of the ``(term, count)`` pairs, added in order."""
    total = count = None
    for term, hits in pairs:
        total = term if total is None else total + term
        count = hits if count is None else count + hits
    return total, count


def level_loss_maps(
    pred: Tensor,
    target: Tensor,
    mask: Tensor | None = None,
    contexts: str | Contexts = "dr",
    *,
    levels: int = 3,
) -> Tensor:
    """``|p_hat - g_hat|`` of every level of a hierarchy, each pixel normalised in its context.

    Args:
        pred: ``(B, 1, H, W)`` or ``(B, H, W)`` prediction.
        target: same shape; non-finite values are invalid.
        mask: optional bool mask.
        contexts: ``"dr"``, ``"dp"``, ``"ds"`` or a :class:`~hdn.contexts.Contexts`.
        levels: hierarchy depth when ``contexts`` is a name.

    Returns:
        ``(L, B, H, W)``: at level ``l`` the absolute difference of the normalised maps at
        pixels in a context of that level (summed over the contexts that hold a pixel when a
        level's contexts overlap), 0 elsewhere.

    Examples:
        >>> g = torch.arange(1.0, 17.0).view(1, 4, 4)
        >>> level_loss_maps(2 * g + 1, g, contexts="ds", levels=2).abs().max() < 1e-5
        tensor(True)
    """
    p, g, valid, contexts = _resolve(pred, target, mask, contexts, levels)
    return torch.stack([_level_terms(p, g, valid, contexts, lvl)[0] for lvl in range(contexts.num_levels)])


def per_pixel_loss_map(
    pred: Tensor,
    target: Tensor,
    mask: Tensor | None = None,
    contexts: str | Contexts = "dr",
    *,
    levels: int = 3,
) -> Tensor:
    """The per-pixel terms of :func:`hdn.hdn_loss`: ``map.sum() / N_v`` is the loss.

    With ``mean`` aggregation (DR, DP, DS, label maps) pixel ``i`` holds the mean of
    ``|p_hat - g_hat|`` over the contexts that contain it, 0 if none does:

    .. math:: \\ell_i = \\frac{1}{|\\mathcal C_i|}\\sum_{C \\in \\mathcal C_i}\\left|\\hat p^C_i - \\hat g^C_i\\right|

    With ``pooled`` aggregation (random crops or depth intervals) the loss is the sum over all
    (context, pixel) pairs divided by the number of pairs ``P``; the map then holds each
    pixel's sum over its contexts times ``N_v / P``, so the identity above still holds.

    Args:
        pred: ``(B, 1, H, W)`` or ``(B, H, W)`` prediction.
        target: same shape; non-finite values are invalid.
        mask: optional bool mask.
        contexts: ``"dr"``, ``"dp"``, ``"ds"`` or a :class:`~hdn.contexts.Contexts` for this batch.
        levels: hierarchy depth when ``contexts`` is a name (``levels=1``: image-level SSI).

    Returns:
        ``(B, H, W)`` map, 0 at invalid pixels (float32, or float64 for float64 inputs).

    Examples:
        >>> g = torch.rand(1, 1, 8, 8) + 1
        >>> p = g + 0.1 * torch.rand(1, 1, 8, 8)
        >>> m = per_pixel_loss_map(p, g, contexts="dp", levels=2)
        >>> from hdn import hdn_loss
        >>> bool(torch.isclose(m.sum() / 64, hdn_loss(p, g, context="dp", levels=2)))
        True
    """
    p, g, valid, contexts = _resolve(pred, target, mask, contexts, levels)
    per_level = (_level_terms(p, g, valid, contexts, lvl) for lvl in range(contexts.num_levels))
    total, count = _summed(per_level)
    if contexts.aggregation == "pooled":
        pairs = count.sum()
        scale = valid.sum().to(total.dtype) / pairs if pairs > 0 else total.new_zeros(())
        return total * scale
    return torch.where(count > 0, total / count.clamp(min=1), 0.0)


def region_loss_share(loss_map: Tensor, regions: Mapping[str, Tensor]) -> dict[str, float]:
    """Fraction of a loss map's total that falls in each region.

    Passing ``valid.float()`` as the map gives each region's share of the valid pixels,
    which is the share a region would get if every pixel weighed the same.

    Args:
        loss_map: non-negative map, e.g. from :func:`per_pixel_loss_map`.
        regions: name -> bool mask with as many elements as ``loss_map``; regions may
            overlap and need not cover the image.

    Returns:
        name -> share in ``[0, 1]`` (0 for every region when the map sums to 0).

    Examples:
        >>> loss = torch.tensor([[1.0, 3.0], [0.0, 4.0]])
        >>> region_loss_share(loss, {"left": torch.tensor([[True, False], [True, False]])})
        {'left': 0.125}
    """
    if not isinstance(loss_map, Tensor):
        raise ValueError(f"Invalid loss_map: expected a torch.Tensor, got {type(loss_map).__name__}.")
    total = float(loss_map.sum())
    shares = {}
    for name, region in regions.items():
        if not isinstance(region, Tensor) or region.dtype != torch.bool or region.numel() != loss_map.numel():
            raise ValueError(
                f"Invalid region {name!r}: we expect a bool tensor with {loss_map.numel()} elements. "
                f"Got: {getattr(region, 'dtype', type(region).__name__)} {tuple(getattr(region, 'shape', ()))}."
            )
        inside = float(loss_map.reshape(-1)[region.reshape(-1).to(loss_map.device)].sum())
        shares[name] = inside / total if total > 0 else 0.0
    return shares


def depth_quantile_regions(depth: Tensor, valid: Tensor | None = None, parts: int = 4) -> dict[str, Tensor]:
    """Split each image's valid pixels into ``parts`` equal-count regions, nearest first.

    Pixels are ranked by depth (ties by position) and cut into ``parts`` groups of (almost)
    equal size, so every region holds the same share of the valid pixels.

    Args:
        depth: ``(B, 1, H, W)``, ``(B, H, W)`` or ``(H, W)`` depth; non-finite values are invalid.
        valid: optional bool mask of the same shape.
        parts: number of regions, at least 1.

    Returns:
        ``{"0-25% (nearest)": mask, "25-50%": mask, ..., "75-100% (farthest)": mask}`` for
        ``parts=4``; masks have the shape of ``depth`` without a channel axis.

    Examples:
        >>> d = torch.tensor([[4.0, 1.0], [3.0, 2.0]])
        >>> {k: v.int().tolist() for k, v in depth_quantile_regions(d, parts=2).items()}
        {'0-50% (nearest)': [[0, 1], [0, 1]], '50-100% (farthest)': [[1, 0], [1, 0]]}
    """
    if isinstance(parts, bool) or not isinstance(parts, int) or parts < 1:
        raise ValueError(f"Invalid parts: we expect an integer >= 1. Got: {parts!r}.")
    flat2d = isinstance(depth, Tensor) and depth.dim() == 2
    g = _as_bhw(depth[None] if flat2d else depth, "depth")
    ok = torch.isfinite(g)
    if valid is not None:
        ok = ok & _as_bhw(valid[None] if flat2d else valid, "valid").bool()
    B = g.shape[0]
    keys = torch.where(ok, g, torch.inf).reshape(B, -1)
    order = torch.sort(keys, dim=1, stable=True).indices
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(keys.shape[1], device=g.device).expand(B, -1))
    n = ok.reshape(B, -1).sum(dim=1, keepdim=True)
    part = torch.where(ok.reshape(B, -1), rank * parts // n.clamp(min=1), -1).reshape(g.shape)
    regions = {}
    for k in range(parts):
        lo, hi = round(100 * k / parts), round(100 * (k + 1) / parts)
        name = f"{lo}-{hi}%" + (" (nearest)" if k == 0 else " (farthest)" if k == parts - 1 and parts > 1 else "")
        regions[name] = (part == k)[0] if flat2d else part == k
    return regions


def boundary_regions(inside: Tensor, valid: Tensor | None = None, radius: int = 3) -> dict[str, Tensor]:
    """Split the valid pixels into an object's interior, a band around its boundary, and the rest.

    The band holds the pixels within ``radius`` pixels (a square window) of the object's
    boundary, on either side: there, a blurred prediction mixes near and far depths.

    Args:
        inside: bool mask of the object, ``(H, W)`` or ``(B, H, W)``.
        valid: optional bool mask of the same shape.
        radius: half-width of the band in pixels, ``>= 1``.

    Returns:
        ``{"interior": ..., "boundary band": ..., "exterior": ...}``, disjoint masks whose
        union is ``valid``.

    Examples:
        >>> box = torch.zeros(7, 7, dtype=torch.bool)
        >>> box[1:6, 1:6] = True
        >>> {k: int(v.sum()) for k, v in boundary_regions(box, radius=1).items()}
        {'interior': 9, 'boundary band': 40, 'exterior': 0}
    """
    if isinstance(radius, bool) or not isinstance(radius, int) or radius < 1:
        raise ValueError(f"Invalid radius: we expect an integer >= 1. Got: {radius!r}.")
    if not isinstance(inside, Tensor) or inside.dtype != torch.bool or inside.dim() not in (2, 3):
        raise ValueError(
            f"Invalid inside: we expect a bool tensor (H, W) or (B, H, W). Got: {getattr(inside, 'dtype', inside)!r}."
        )
    ok = torch.ones_like(inside) if valid is None else valid.bool()
    x = inside.float().reshape(-1, 1, *inside.shape[-2:])
    size = 2 * radius + 1
    grown = torch.nn.functional.max_pool2d(x, size, stride=1, padding=radius).reshape(inside.shape) > 0.5
    shrunk = -torch.nn.functional.max_pool2d(-x, size, stride=1, padding=radius).reshape(inside.shape) > 0.5
    return {"interior": shrunk & ok, "boundary band": grown & ~shrunk & ok, "exterior": ~grown & ok}


class ContextExplorer:
    """Pick a context of a hierarchy with sliders and see its pixels and normalised depths.

    ``widget`` is an ipywidgets ``VBox``: a dropdown ``kind`` (DR / DP / ...), a slider
    ``level`` and a slider ``index`` (the bin, or cell) whose maximum follows the level.
    Every change calls :meth:`on_change`, which draws :meth:`render` into ``output``; the last
    figure stays in ``figure``. :meth:`render` is pure and usable without widgets.

    Args:
        depth: ground-truth depth ``(H, W)`` in metres (NaN = invalid), or ``(1, H, W)``.
        valid: optional bool mask of the same shape.
        pred: optional prediction; adds a panel with ``|p_hat - g_hat|`` in the context.
        kinds: context kinds offered by the dropdown, from ``("dr", "dp", "ds")``.
        levels: hierarchy depth ``L``; the level slider runs over ``0 .. L-1``.

    Examples:
        >>> depth = torch.linspace(2.0, 5.0, 48).view(6, 8)
        >>> ex = ContextExplorer(depth, levels=3)
        >>> ex.level.value = 2
        >>> ex.index.max
        3
    """

    index_name = "bin"

    def __init__(
        self,
        depth: Tensor,
        valid: Tensor | None = None,
        pred: Tensor | None = None,
        *,
        kinds: Sequence[str] = ("dr", "dp"),
        levels: int = 4,
    ):
        import ipywidgets as widgets

        check_levels(levels)
        kinds = tuple(kinds)
        if not kinds or len(set(kinds)) != len(kinds) or not set(kinds) <= set(CONTEXT_NAMES):
            raise ValueError(f"Invalid kinds: we expect distinct names from {CONTEXT_NAMES}. Got: {kinds!r}.")
        g = single_image(depth, "depth")
        v = torch.isfinite(g)
        if valid is not None:
            v = v & single_image(valid, "valid").bool()
        self.depth, self.valid, self.levels, self.kinds = g, v, levels, kinds
        self.pred = None if pred is None else single_image(pred, "pred").to(g.dtype)
        if self.pred is not None and self.pred.shape != g.shape:
            raise ValueError(f"Invalid pred shape: we expect {tuple(g.shape)[1:]}. Got: {tuple(self.pred.shape)[1:]}.")
        with one_torch_thread():
            self.contexts = {k: _contexts.build(k, g, v, levels=levels) for k in kinds}
        # Caches: nothing a slider changes is computed twice.
        self._normalized: dict[tuple[str, int], tuple[Tensor, Tensor | None]] = {}
        self._ids: dict[tuple[str, int], Tensor] = {}
        self._counts: dict[tuple[str, int], int] = {}
        self._sizes: dict[tuple[str, int], list[int]] = {}
        self._live: dict[bool, tuple[_ContextPanels, LiveFigure]] = {}  # one figure per zoom mode
        for k in kinds:  # every level up front (one thread: a few tens of ms each), so no move computes
            for lvl in range(levels):
                self.normalized(k, lvl)
                self._size(k, lvl, 0)

        self.kind = widgets.Dropdown(
            options=[(CONTEXT_TITLES[k], k) for k in kinds], value=kinds[0], description="contexts"
        )
        self.level = widgets.IntSlider(
            value=min(1, levels - 1), min=0, max=levels - 1, description="level", continuous_update=False
        )
        count = self.count(kinds[0], self.level.value)
        self.index = widgets.IntSlider(
            value=0, min=0, max=count - 1, description=self.index_name, continuous_update=False
        )
        self.output = widgets.Output()
        controls = [self.kind, self.level, self.index] if len(kinds) > 1 else [self.level, self.index]
        self.widget = widgets.VBox([widgets.HBox(controls), self.output])
        self.figure: Figure | None = None
        self.renders = 0
        self._syncing = False
        self.kind.observe(self._on_structure, names="value")
        self.level.observe(self._on_structure, names="value")
        self.index.observe(self.on_change, names="value")
        self.on_change()

    # --- what is shown -------------------------------------------------------------------

    def count(self, kind: str, level: int) -> int:
        """Number of contexts of ``kind`` at ``level`` (``2**level`` bins or ``4**level`` cells)."""
        key = (kind, level)
        if key not in self._counts:
            self._counts[key] = self.contexts[kind].contexts_per_image(level)
        return self._counts[key]

    def context_mask(self, kind: str, level: int, index: int) -> Tensor:
        """The ``(H, W)`` bool mask of one context (valid pixels only)."""
        self._check(kind, level, index)
        return self._level_ids(kind, level) == index

    def _level_ids(self, kind: str, level: int) -> Tensor:
        """``(H, W)`` context index of every pixel at ``level``, -1 outside (cached; levels are partitions)."""
        key = (kind, level)
        if key not in self._ids:
            with one_torch_thread():
                self._ids[key] = self.contexts[kind].level_ids(level)[0]
        return self._ids[key]

    def _size(self, kind: str, level: int, index: int) -> int:
        """Number of pixels of one context (counts of a level cached)."""
        key = (kind, level)
        if key not in self._sizes:
            ids = self._level_ids(kind, level)
            counts = torch.bincount(ids[ids >= 0], minlength=self.count(kind, level))
            self._sizes[key] = counts.tolist()
        return self._sizes[key][index]

    def normalized(self, kind: str, level: int) -> tuple[Tensor, Tensor | None]:
        """``(g_hat, p_hat)`` of a whole level, each ``(H, W)``; ``p_hat`` is None without ``pred``."""
        key = (kind, level)
        if key not in self._normalized:
            ctx = self.contexts[kind]
            with one_torch_thread():
                g_hat = context_normalize(self.depth, ctx, level, self.valid)[0]
                p_hat = None if self.pred is None else context_normalize(self.pred, ctx, level, self.valid)[0]
            self._normalized[key] = (g_hat, p_hat)
        return self._normalized[key]

    def describe(self, kind: str, level: int, index: int) -> str:
        """One-line title of a context: kind, level, which bin or cell, its extent, its size."""
        self._check(kind, level, index)
        n = self._size(kind, level, index)
        name = kind.upper()
        if kind == "ds":
            cells = 2**level
            r, c = divmod(index, cells)
            _, H, W = self.depth.shape
            rows, cols = grid_edges(H, level) + [H], grid_edges(W, level) + [W]
            return (
                f"{name} level {level}, cell {index} (row {r}, col {c} of {cells}x{cells}): "
                f"rows {rows[r]}-{rows[r + 1] - 1}, cols {cols[c]}-{cols[c + 1] - 1}, {n:,} px"
            )
        ctx = self.contexts[kind]
        lo, hi = float(ctx.lower[level][0, index]), float(ctx.upper[level][0, index])
        return f"{name} level {level}, bin {index} of 0-{2**level - 1}: {lo:.3f} m <= depth < {hi:.3f} m, {n:,} px"

    def render(self, kind: str, level: int, index: int) -> Figure:
        """Draw one context: where it is, its normalised depths, its depth histogram (and loss).

        Panels (in ``figure.axes`` order): the context over the depth map; ``g_hat`` inside
        the context; a histogram of the context's depths against the whole image's; with a
        prediction, ``|p_hat - g_hat|`` inside the context (colours clipped at its 99th percentile).

        Returns:
            A :class:`matplotlib.figure.Figure` (not managed by pyplot) titled by :meth:`describe`.
        """
        self._check(kind, level, index)
        with one_torch_thread():
            return _ContextPanels(self, kind, level, index).figure

    # --- widget callbacks ----------------------------------------------------------------

    def on_change(self, change: dict | None = None) -> None:
        """Re-render the selected context into ``output`` (the sliders' callback).

        The widget keeps one figure: the first call lays it out, later calls change its
        images, lines and texts in place and redraw only those (:class:`~hdn.workbook._live.LiveFigure`).
        The PNG is written into the ``Output`` widget's ``outputs`` state (what
        ``Output.append_display_data`` does), so no display message is sent to the notebook
        and the callback behaves the same in a kernel, under nbval and in plain Python.
        """
        if self._syncing:
            return
        state = (self.kind.value, self.level.value, self.index.value)
        self._check(*state)
        zoom = state[0] == "ds"  # DS zooms onto the cell: other axes change than for DR / DP
        with one_torch_thread():
            if zoom not in self._live:
                panels = _ContextPanels(self, *state)
                self._live[zoom] = (panels, LiveFigure(panels.figure, panels.dynamic, freeze=panels.frozen))
            else:
                self._live[zoom][0].update(*state)
            panels, live = self._live[zoom]
            png = live.png()
        self.figure = panels.figure
        self.renders += 1
        self.output.outputs = (png_message(png, self.figure.get_suptitle()),)

    def _on_structure(self, change: dict | None = None) -> None:
        """Kind or level changed: give the index slider the new number of contexts, re-render."""
        self._syncing = True
        try:
            self.index.max = self.count(self.kind.value, self.level.value) - 1
        finally:
            self._syncing = False
        self.on_change()

    def _check(self, kind: str, level: int, index: int) -> None:
        if kind not in self.contexts:
            raise ValueError(f"Invalid kind: we expect one of {self.kinds}. Got: {kind!r}.")
        if not 0 <= level < self.levels:
            raise ValueError(f"Invalid level: we expect 0 <= level < {self.levels}. Got: {level}.")
        count = self.count(kind, level)
        if not 0 <= index < count:
            raise ValueError(f"Invalid index: level {level} of {kind!r} has {count} contexts. Got: {index}.")


class GridExplorer(ContextExplorer):
    """:class:`ContextExplorer` for the spatial grid (DS): sliders ``level`` and ``cell``.

    Cell ``index`` of level ``l`` is row ``index // 2**l``, column ``index % 2**l``; the
    slider ``index`` (labelled "cell") runs over ``0 .. 4**l - 1``.

    Examples:
        >>> ex = GridExplorer(torch.rand(6, 10) + 1, levels=3)
        >>> ex.level.value = 2
        >>> ex.index.max
        15
    """

    index_name = "cell"

    def __init__(self, depth: Tensor, valid: Tensor | None = None, pred: Tensor | None = None, *, levels: int = 4):
        super().__init__(depth, valid, pred, kinds=("ds",), levels=levels)


class _ContextPanels:
    """The figure of :meth:`ContextExplorer.render`, whose artists :meth:`update` changes in place.

    :meth:`ContextExplorer.render` draws a new one for each call; the widget keeps one and
    updates it, so that moving a control changes image data (``AxesImage.set_data``), a few
    lines and texts instead of building and laying out a figure again.
    """

    def __init__(self, explorer: ContextExplorer, kind: str, level: int, index: int):
        self.ex = ex = explorer
        depth, valid = ex.depth[0], ex.valid[0]
        self.shape = tuple(depth.shape)
        panels = 3 if ex.pred is None else 4
        fig = self.figure = Figure(figsize=(3.6 * panels, 3.0), layout="constrained")
        axes = self.axes = fig.subplots(1, panels)
        inside = ex.context_mask(kind, level, index)
        g_hat, p_hat = ex.normalized(kind, level)

        show_map(axes[0], depth, kind="depth", valid=valid, cmap="gray", title="the context on the scene")
        self.overlay = axes[0].imshow(
            np.ma.masked_array(np.ones(inside.shape), mask=~inside.numpy()),
            cmap=ListedColormap([HIGHLIGHT]), vmin=0, vmax=1, alpha=0.7,
        )
        self.g_image = show_map(axes[1], g_hat, kind="normalized", valid=inside, title=r"$\hat g$ in the context")

        d = depth[valid].numpy()
        self.bins = np.linspace(d.min(), d.max(), 61) if d.size else 10
        axes[2].hist(d, bins=self.bins, color="lightgrey", label="whole image")
        _, self.bins, self.bars = axes[2].hist(depth[inside].numpy(), bins=self.bins, color=HIGHLIGHT,
                                               label="this context")
        axes[2].set(title="depths of the context", xlabel="depth (m)", ylabel="pixels")
        self.legend = axes[2].legend(loc="upper right", fontsize=7)

        self.loss_image = None
        if p_hat is not None:
            self.loss_image = show_map(axes[3], (p_hat - g_hat).abs(), kind="loss", valid=inside, vmax=1.0,
                                       title=r"$|\hat p - \hat g|$")
        self.lines: list = []
        self.zoom = kind == "ds"  # update() keeps to kinds of the same zoom mode
        self.suptitle = fig.suptitle(ex.describe(kind, level, index))
        self.frozen = [axes[2]]  # the bin edges are replaced on a frozen histogram
        self.update(kind, level, index)

    def dynamic(self) -> list:
        """What :meth:`update` can change, in drawing order (for :class:`~hdn.workbook._live.LiveFigure`)."""
        axes = self.axes
        maps = [self.g_image] if self.loss_image is None else [self.g_image, self.loss_image]
        artists = [self.overlay, *self.grid_lines, *axes[0].spines.values(), *_legends(axes[0])]
        for image in maps:
            if self.zoom:  # limits and ticks change with the cell
                artists.append(image.axes)
            else:  # the image, the legend above it and the title change
                artists += [image, *image.axes.spines.values(), *_legends(image.axes), image.axes.title]
            artists.append(image.colorbar.ax)
        return [*artists, *self.bars, *self.edge_lines, *axes[2].spines.values(), self.legend, self.suptitle]

    def update(self, kind: str, level: int, index: int) -> None:
        """Show another context (a kind of the same zoom mode: DS, or DR / DP)."""
        if (kind == "ds") != self.zoom:
            raise ValueError(f"Invalid kind: this figure shows {'DS' if self.zoom else 'DR / DP'}. Got: {kind!r}.")
        ex, axes = self.ex, self.axes
        inside = ex.context_mask(kind, level, index)
        g_hat, p_hat = ex.normalized(kind, level)
        self.overlay.set_data(np.ma.masked_array(np.ones(inside.shape), mask=~inside.numpy()))
        for line in self.lines:
            line.remove()
        before = set(axes[0].lines)
        if kind == "ds":
            draw_grid(axes[0], *inside.shape, level)
        self.grid_lines = [line for line in axes[0].lines if line not in before]

        shown = masked_map(g_hat, inside)
        data = shown.compressed()
        top = (float(np.abs(data).max()) or 1.0) if data.size else 1.0
        update_map(self.g_image, shown, -top, top)

        counts, _ = np.histogram(ex.depth[0][inside].numpy(), bins=self.bins)
        for bar, count in zip(self.bars, counts):
            bar.set_height(count)
        self.edge_lines = []
        if kind != "ds":
            ctx = ex.contexts[kind]
            for edge in torch.cat([ctx.lower[level][0], ctx.upper[level][0, -1:]]).tolist():
                self.edge_lines.append(axes[2].axvline(edge, color="black", linestyle="--", linewidth=0.7))
        self.lines = self.grid_lines + self.edge_lines

        if p_hat is not None:
            loss = (p_hat - g_hat).abs()
            mean = float(loss[inside].mean()) if inside.any() else 0.0
            top = float(torch.quantile(loss[inside].double(), 0.99)) if inside.any() else 1.0
            update_map(self.loss_image, masked_map(loss, inside), 0.0, max(top, 1e-6))
            axes[3].title.set_text(rf"$|\hat p - \hat g|$ (mean {mean:.3f})")
        H, W = self.shape
        rows, cols = torch.nonzero(inside, as_tuple=True)
        for ax in axes[1::2]:
            if kind == "ds" and rows.numel():  # a cell is small: zoom the per-context panels onto it
                ax.set_xlim(int(cols.min()) - 0.5, int(cols.max()) + 0.5)
                ax.set_ylim(int(rows.max()) + 0.5, int(rows.min()) - 0.5)
            else:
                ax.set_xlim(-0.5, W - 0.5)
                ax.set_ylim(H - 0.5, -0.5)
        self.suptitle.set_text(ex.describe(kind, level, index))


def _legends(ax) -> list:
    return [] if ax.get_legend() is None else [ax.get_legend()]

