"""Plotting helpers for the workbook: one look for every figure, so readers compare like with like.

The notebooks draw with plain matplotlib; what they would otherwise repeat in every cell
(colormaps, colorbars with units, masking invalid pixels, DS grid lines) lives here.

Conventions:

* depth in metres: :data:`DEPTH_CMAP`, colorbar "depth (m)";
* normalised depth ``x_hat`` (no unit): :data:`NORMALIZED_CMAP`, centred on 0;
* per-pixel loss ``|p_hat - g_hat|`` (no unit): :data:`LOSS_CMAP`, from 0;
* context labels: :data:`CONTEXT_CMAP`, pixels in no context in :data:`NONE_COLOR`;
* DR / DP bins: :func:`show_depth_bins`, one colour per bin in depth order (:func:`bin_colours`),
  a colorbar whose segments are the bins' depth intervals in metres; :func:`show_bin_histogram`
  the same bins as a histogram of the depths with the bin edges;
* DS cells: :func:`show_grid_contexts`, the cell boundaries drawn over the depth map.

Invalid pixels (``valid`` False, no ground truth) and pixels outside the shown context are drawn
in one grey, :data:`INVALID_COLOR`, in every kind of map, with a legend entry "no ground truth".
It is never white, because white is the zero of the diverging map of normalised depths: a
pixel without ground truth must not look like a pixel at the median.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from itertools import pairwise

import matplotlib as mpl
import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.colors import BoundaryNorm, ListedColormap
from matplotlib.figure import Figure
from matplotlib.image import AxesImage
from matplotlib.patches import Patch
from torch import Tensor

__all__ = [
    "CONTEXT_CMAP",
    "DEPTH_CMAP",
    "INVALID_COLOR",
    "LOSS_CMAP",
    "MAP_KINDS",
    "NONE_COLOR",
    "NORMALIZED_CMAP",
    "add_invalid_legend",
    "bin_colours",
    "draw_grid",
    "figure_png",
    "grid_cell_sizes",
    "grid_edges",
    "relative_log_magnitude",
    "show_bin_histogram",
    "show_contexts",
    "show_depth_bins",
    "show_grid_contexts",
    "show_map",
    "show_relative_magnitude_maps",
    "use_workbook_style",
]

DEPTH_CMAP = "viridis"
NORMALIZED_CMAP = "RdBu_r"
LOSS_CMAP = "inferno"
CONTEXT_CMAP = "tab20"
#: Colour of pixels with no ground truth (and of pixels in no context), in every map kind.
INVALID_COLOR = "#8c8c8c"
NONE_COLOR = INVALID_COLOR
INVALID_LABEL = "no ground truth"
# tab20 without its two greys, which would read as "no ground truth".
_CONTEXT_COLOURS = [c for i, c in enumerate(mpl.colormaps[CONTEXT_CMAP].colors) if i not in (14, 15)]

MAP_KINDS = {
    # kind: (colormap, default colorbar label)
    "depth": (DEPTH_CMAP, "depth (m)"),
    "normalized": (NORMALIZED_CMAP, r"normalised $\hat x$ (no unit)"),
    "loss": (LOSS_CMAP, r"$|\hat p - \hat g|$ (no unit)"),
    "image": (None, None),
}


def use_workbook_style(dpi: int = 80) -> None:
    """Small, crisp figures: ``dpi`` for screen and PNG, 9 pt text, constrained layout.

    Args:
        dpi: dots per inch of every new figure (the notebooks keep PNG outputs small).
    """
    mpl.rcParams.update(
        {
            "figure.dpi": dpi,
            "savefig.dpi": dpi,
            "font.size": 9,
            "axes.titlesize": 9,
            "figure.titlesize": 10,
            "figure.constrained_layout.use": True,
            "image.interpolation": "nearest",
        }
    )


def _numpy(x: Tensor | np.ndarray) -> np.ndarray:
    if isinstance(x, Tensor):
        x = x.detach().to("cpu", torch.float64 if x.is_floating_point() else x.dtype)
        return x.numpy()
    return np.asarray(x)


def _image_2d(x: Tensor | np.ndarray, name: str) -> np.ndarray:
    a = _numpy(x)
    if a.ndim == 3 and a.shape[0] == 1:
        a = a[0]
    if a.ndim == 4 and a.shape[:2] == (1, 1):
        a = a[0, 0]
    if a.ndim != 2:
        raise ValueError(f"Invalid {name} shape: we expect (H, W), (1, H, W) or (1, 1, H, W). Got: {a.shape}.")
    return a


def show_map(
    ax: Axes,
    values: Tensor | np.ndarray,
    *,
    kind: str = "depth",
    title: str,
    valid: Tensor | np.ndarray | None = None,
    label: str | None = None,
    vmin: float | None = None,
    vmax: float | None = None,
    cmap: str | None = None,
    colorbar: bool = True,
    legend: bool = True,
) -> AxesImage:
    """Draw one map with the workbook's colormap and a labelled colorbar.

    Args:
        ax: the axes.
        values: ``(H, W)`` map (or ``(1, H, W)``); for ``kind="image"`` an RGB ``(3, H, W)``
            tensor or ``(H, W, 3)`` array in ``[0, 1]``.
        kind: ``"depth"`` (metres), ``"normalized"`` (symmetric about 0), ``"loss"`` (from 0)
            or ``"image"``.
        title: axes title.
        valid: optional ``(H, W)`` bool; pixels where it is False (and non-finite values) are
            drawn in :data:`INVALID_COLOR`.
        label: colorbar label; default from :data:`MAP_KINDS`.
        vmin: lower colour limit; ``"normalized"`` defaults to the symmetric range of the
            shown values, ``"loss"`` to ``[0, max]``.
        vmax: upper colour limit (defaults as for ``vmin``).
        cmap: colormap name replacing the kind's (e.g. ``"gray"`` for a background).
        colorbar: draw the colorbar.
        legend: when some pixel is hidden, add the legend entry "no ground truth" for
            :data:`INVALID_COLOR` (:func:`add_invalid_legend`).

    Returns:
        The :class:`~matplotlib.image.AxesImage`; its array is a masked array whose mask is
        ``~valid``.

    Examples:
        >>> fig = Figure()
        >>> im = show_map(fig.subplots(), torch.ones(4, 5), title="flat", vmin=0, vmax=2)
        >>> im.get_array().shape, im.axes.get_title()
        ((4, 5), 'flat')
    """
    if kind not in MAP_KINDS:
        raise ValueError(f"Invalid kind: we expect one of {tuple(MAP_KINDS)}. Got: {kind!r}.")
    if kind == "image":
        a = _numpy(values)
        if a.ndim == 3 and a.shape[0] == 3:
            a = a.transpose(1, 2, 0)
        im = ax.imshow(np.clip(a, 0, 1))
    else:
        a = _image_2d(values, "values").astype(np.float64)
        hidden = ~np.isfinite(a)
        if valid is not None:
            hidden |= ~_image_2d(valid, "valid").astype(bool)
        shown = np.ma.masked_array(a, mask=hidden)
        default_cmap, default_label = MAP_KINDS[kind]
        cmap = default_cmap if cmap is None else cmap
        label = default_label if label is None else label
        data = shown.compressed()
        if kind == "normalized" and vmin is None and vmax is None and data.size:
            vmax = float(np.abs(data).max()) or 1.0
            vmin = -vmax
        if kind == "loss" and vmin is None:
            vmin = 0.0
        colours = mpl.colormaps[cmap].with_extremes(bad=INVALID_COLOR)
        im = ax.imshow(shown, cmap=colours, vmin=vmin, vmax=vmax)
        if colorbar:
            ax.figure.colorbar(im, ax=ax, shrink=0.85, label=label)
        if legend and hidden.any():
            add_invalid_legend(ax)
    ax.set_title(title)
    ax.set_xlabel("column (px)")
    ax.set_ylabel("row (px)")
    return im


def add_invalid_legend(ax: Axes, label: str = INVALID_LABEL) -> None:
    """Add a legend entry for :data:`INVALID_COLOR` (pixels with no ground truth) to ``ax``.

    Examples:
        >>> fig = Figure()
        >>> ax = fig.subplots()
        >>> add_invalid_legend(ax)
        >>> [t.get_text() for t in ax.get_legend().get_texts()]
        ['no ground truth']
    """
    handle = Patch(facecolor=INVALID_COLOR, edgecolor="none", label=label)
    ax.legend(handles=[handle], loc="lower left", fontsize=7, framealpha=0.85,
              handlelength=1.0, borderpad=0.3)


def show_contexts(
    ax: Axes,
    ids: Tensor | np.ndarray,
    *,
    title: str,
    count: int | None = None,
    colorbar: bool = True,
) -> AxesImage:
    """Draw a context-index map (``level_ids``): one colour per context, :data:`NONE_COLOR` for -1.

    For label contexts (superpixels, segments), whose indices carry no order. DR and DP bins
    are drawn with their depth intervals by :func:`show_depth_bins`, DS cells as a grid over
    the depth map by :func:`show_grid_contexts`.

    Args:
        ax: the axes.
        ids: ``(H, W)`` integer map, ``-1`` where a pixel is in no context.
        title: axes title.
        count: number of contexts ``K`` (colours ``0 .. K-1``); default ``max(ids) + 1``.
        colorbar: draw a colorbar labelled "context index".

    Returns:
        The :class:`~matplotlib.image.AxesImage` (its array holds the ids, masked at -1).
    """
    a = _image_2d(ids, "ids").astype(np.int64)
    k = int(a.max()) + 1 if count is None else int(count)
    k = max(k, 1)
    cmap = ListedColormap([_CONTEXT_COLOURS[i % len(_CONTEXT_COLOURS)] for i in range(k)])
    cmap = cmap.with_extremes(bad=NONE_COLOR)
    im = ax.imshow(np.ma.masked_less(a, 0), cmap=cmap, vmin=-0.5, vmax=k - 0.5)
    if colorbar:
        cb = ax.figure.colorbar(im, ax=ax, shrink=0.85, label="context index")
        cb.set_ticks(np.arange(k) if k <= 16 else np.linspace(0, k - 1, 5).round())
    ax.set_title(title)
    ax.set_xlabel("column (px)")
    ax.set_ylabel("row (px)")
    return im


def grid_edges(size: int, level: int) -> list[int]:
    """Start index of every DS cell along one side of ``size`` pixels at ``level``.

    Uses the rule of docs/semantics.md §3, ``int(i * w * size)`` with ``w = 2**-level``.

    Examples:
        >>> grid_edges(371, 2)
        [0, 92, 185, 278]
    """
    w = 1 / 2**level
    return [int(i * w * size) for i in range(2**level)]


def grid_cell_sizes(size: int, level: int) -> list[int]:
    """The distinct lengths (pixels) of the DS cells along one side at level ``l``, ascending.

    Truncation (:func:`grid_edges`) makes neighbouring cells differ by at most one pixel.

    Examples:
        >>> grid_cell_sizes(371, 2), grid_cell_sizes(250, 0)
        ([92, 93], [250])
    """
    edges = grid_edges(size, level) + [size]
    return sorted({b - a for a, b in pairwise(edges)})


def draw_grid(ax: Axes, height: int, width: int, level: int, **line_kw) -> None:
    """Draw the DS cell boundaries of ``level`` on an image of ``height x width`` pixels."""
    style = {"color": "white", "linewidth": 0.8, "alpha": 0.9} | line_kw
    for r in grid_edges(height, level)[1:]:
        ax.axhline(r - 0.5, **style)
    for c in grid_edges(width, level)[1:]:
        ax.axvline(c - 0.5, **style)


def bin_colours(count: int, cmap: str = DEPTH_CMAP) -> list[tuple[float, float, float, float]]:
    """``count`` colours for depth bins, nearest bin first, evenly spread over ``cmap``.

    Colours follow the bin index, not the bin's depth, so that neighbouring bins stay
    distinguishable where bins are narrow (DP in a crowded depth range); their order is the
    depth order, as in a depth map.

    Examples:
        >>> len(bin_colours(8)), bin_colours(1)[0] == bin_colours(3)[1]
        (8, True)
    """
    if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 1:
        raise ValueError(f"Invalid count: we expect an integer >= 1. Got: {count!r}.")
    colours = mpl.colormaps[cmap]
    return [tuple(colours(x)) for x in (np.arange(count) + 0.5) / count]


def _bin_edges(contexts, level: int, image: int) -> np.ndarray:
    """The ``2**level + 1`` edges (lower edges, then the last upper edge) of one image's bins."""
    lower, upper = getattr(contexts, "lower", None), getattr(contexts, "upper", None)
    if lower is None or upper is None:
        raise ValueError(
            "Invalid contexts: we expect depth-interval contexts with bin edges (DR or DP, "
            f"hdn.contexts.depth_range / depth_percentile). Got: {type(contexts).__name__}."
        )
    if isinstance(level, bool) or not isinstance(level, (int, np.integer)) or not 0 <= level < len(lower):
        raise ValueError(f"Invalid level: we expect 0 <= level < {len(lower)}. Got: {level!r}.")
    if not 0 <= image < lower[level].shape[0]:
        raise ValueError(f"Invalid image: we expect 0 <= image < {lower[level].shape[0]}. Got: {image!r}.")
    lo, hi = _numpy(lower[level][image]), _numpy(upper[level][image])
    return np.concatenate([lo, hi[-1:]]).astype(np.float64)


def _edge_label(edge: float, unit: str) -> str:
    return f"{edge:.2f}" if unit else f"{edge:.3g}"


def show_depth_bins(
    ax: Axes,
    contexts,
    level: int,
    *,
    title: str,
    image: int = 0,
    cmap: str = DEPTH_CMAP,
    unit: str = "m",
    colorbar: bool = True,
    legend: bool = True,
) -> AxesImage:
    """Draw the DR or DP bins of one level, each in its colour, with their depth intervals.

    The colorbar is the depth axis cut at the bin edges: each segment is one bin's
    interval ``[lower, upper)`` in metres, drawn to scale, so equal-width DR bins give equal
    segments and DP bins narrow ones where the pixels crowd. Its ticks are the bin edges
    (inner edges closer than about a tenth of the range to a labelled one go unlabelled). Pixels in no bin
    (no ground truth, or the maximum-depth pixel that the released bins leave out) are grey
    (:data:`INVALID_COLOR`), with the legend entry "no ground truth / no bin".

    Args:
        ax: the axes.
        contexts: :class:`~hdn.contexts.IntervalContexts` from
            :func:`hdn.contexts.depth_range` or :func:`hdn.contexts.depth_percentile`.
        level: the level ``l`` whose ``2**l`` bins are drawn.
        title: axes title.
        image: which image of the batch.
        cmap: colormap the bin colours are taken from (:func:`bin_colours`).
        unit: unit of the depths, for the colorbar label ("" for none, e.g. disparity bins).
        colorbar: draw the colorbar of the bin intervals.
        legend: add the grey legend entry when some pixel is in no bin.

    Returns:
        The :class:`~matplotlib.image.AxesImage`; its array holds the bin index of every
        pixel, masked where it is in no bin.

    Examples:
        >>> from hdn.contexts import depth_range
        >>> depth = torch.linspace(2.0, 5.0, 12).view(1, 3, 4)
        >>> fig = Figure()
        >>> im = show_depth_bins(fig.subplots(), depth_range(depth, levels=2), 1, title="DR")
        >>> [t.get_text() for t in fig.axes[-1].get_yticklabels()]
        ['2.00', '3.50', '5.00']
    """
    edges = _bin_edges(contexts, level, image)
    ids = _numpy(contexts.level_ids(level)[image]).astype(np.int64)
    k = edges.size - 1
    colours = ListedColormap(bin_colours(k, cmap)).with_extremes(bad=INVALID_COLOR)
    shown = np.ma.masked_less(ids, 0)
    im = ax.imshow(shown, cmap=colours, vmin=-0.5, vmax=k - 0.5)
    if colorbar:
        _bin_colorbar(ax, edges, colours, unit)
    if legend and shown.mask.any():
        add_invalid_legend(ax, label=f"{INVALID_LABEL} / no bin")
    ax.set_title(title)
    ax.set_xlabel("column (px)")
    ax.set_ylabel("row (px)")
    return im


def _bin_colorbar(ax: Axes, edges: np.ndarray, colours: ListedColormap, unit: str) -> None:
    """A colorbar whose segments are the bins' intervals (to scale when the edges increase)."""
    k = edges.size - 1
    label = f"depth bin ({unit})" if unit else "bin interval"
    if np.all(np.diff(edges) > 0):  # proportional segments, ticks at the edges
        norm = BoundaryNorm(edges, k)
        mappable = mpl.cm.ScalarMappable(norm=norm, cmap=colours)
        positions = edges
    else:  # empty bins (repeated edges): one equal segment per bin, ticks at the edges
        mappable = mpl.cm.ScalarMappable(norm=BoundaryNorm(np.arange(k + 1) - 0.5, k), cmap=colours)
        positions = np.arange(k + 1) - 0.5
    cb = ax.figure.colorbar(mappable, ax=ax, shrink=0.85, label=label, spacing="proportional")
    keep = _spaced_ticks(positions)
    cb.set_ticks(positions[keep], labels=[_edge_label(edges[i], unit) for i in keep])
    cb.minorticks_off()


def _spaced_ticks(positions: np.ndarray, gap: float = 0.07, most: int = 9) -> list[int]:
    """Indices of the edges to label: both ends, and inner edges at least ``gap`` of the
    range from their labelled neighbours (so that DP's crowded edges do not overprint).

    Examples:
        >>> _spaced_ticks(np.array([2.11, 2.30, 2.39, 2.51, 2.76, 3.58, 3.81, 4.35, 5.0]))
        [0, 3, 5, 7, 8]
    """
    span = float(positions[-1] - positions[0]) or 1.0
    gap = max(gap, 1.0 / most)
    keep = [0]
    for i in range(1, positions.size - 1):
        if (positions[i] - positions[keep[-1]]) / span >= gap and (positions[-1] - positions[i]) / span >= gap:
            keep.append(i)
    return keep + [positions.size - 1]


def show_bin_histogram(
    ax: Axes,
    depth: Tensor | np.ndarray,
    contexts,
    level: int,
    *,
    title: str,
    image: int = 0,
    valid: Tensor | np.ndarray | None = None,
    bars: int = 60,
    cmap: str = DEPTH_CMAP,
    unit: str = "m",
) -> None:
    """Histogram of one image's valid depths, each bar coloured by its DR / DP bin, edges dashed.

    The companion of :func:`show_depth_bins` (same colours): where a map shows where the bins
    lie in the image, the histogram shows how many pixels each bin's interval holds.

    Args:
        ax: the axes.
        depth: ``(H, W)`` or ``(1, H, W)`` depth of that image (NaN = invalid).
        contexts: DR or DP contexts built from ``depth`` (see :func:`show_depth_bins`).
        level: the level whose bins colour the bars.
        title: axes title.
        image: which image of the contexts' batch ``depth`` is.
        valid: optional bool mask; non-finite depths are invalid anyway.
        bars: number of histogram bars over the valid depth range.
        cmap: as in :func:`show_depth_bins`.
        unit: as in :func:`show_depth_bins`.

    Examples:
        >>> from hdn.contexts import depth_percentile
        >>> depth = torch.linspace(2.0, 5.0, 12).view(1, 3, 4)
        >>> fig = Figure()
        >>> ax = fig.subplots()
        >>> show_bin_histogram(ax, depth, depth_percentile(depth, levels=2), 1, title="DP", bars=6)
        >>> len(ax.patches), len(ax.lines)  # 6 bars, 3 dashed edges
        (6, 3)
    """
    edges = _bin_edges(contexts, level, image)
    d = _image_2d(depth, "depth").astype(np.float64)
    keep = np.isfinite(d)
    if valid is not None:
        keep &= _image_2d(valid, "valid").astype(bool)
    values = d[keep]
    if isinstance(bars, bool) or not isinstance(bars, (int, np.integer)) or bars < 1:
        raise ValueError(f"Invalid bars: we expect an integer >= 1. Got: {bars!r}.")
    lo, hi = (float(values.min()), float(values.max())) if values.size else (0.0, 1.0)
    counts, bar_edges = np.histogram(values, bins=bars, range=(lo, hi if hi > lo else lo + 1))
    centres = (bar_edges[:-1] + bar_edges[1:]) / 2
    k = edges.size - 1
    which = np.clip(np.searchsorted(edges, centres, side="right") - 1, 0, k - 1)
    colours = bin_colours(k, cmap)
    ax.bar(centres, counts, width=np.diff(bar_edges), color=[colours[i] for i in which],
           edgecolor="none")
    for edge in edges:
        ax.axvline(edge, color="black", linestyle="--", linewidth=0.7)
    ax.set_title(title)
    ax.set_xlabel(f"depth ({unit})" if unit else "value")
    ax.set_ylabel("pixels")


def show_grid_contexts(
    ax: Axes,
    depth: Tensor | np.ndarray,
    level: int,
    *,
    title: str,
    valid: Tensor | np.ndarray | None = None,
    colorbar: bool = True,
    legend: bool = True,
    vmin: float | None = None,
    vmax: float | None = None,
    **line_kw,
) -> AxesImage:
    """Draw the DS cells of ``level`` as a grid over the depth map (metres, with its colorbar).

    DS contexts are places, not depths: a colour per cell would say nothing that the cell
    boundaries do not, so the depth map stays visible and the ``2**l x 2**l`` cells of
    docs/semantics.md §3 (:func:`grid_edges`) are drawn on top.

    Args:
        ax: the axes.
        depth: ``(H, W)`` or ``(1, H, W)`` depth in metres (NaN = invalid).
        level: grid level ``l`` (``4**l`` cells).
        title: axes title.
        valid: optional bool mask (grey where False).
        colorbar: as in :func:`show_map`.
        legend: as in :func:`show_map`.
        vmin: lower colour limit in metres (share the limits across panels to compare levels).
        vmax: upper colour limit in metres.
        **line_kw: line style of the grid (default white, 0.8 pt).

    Returns:
        The depth map's :class:`~matplotlib.image.AxesImage`.

    Examples:
        >>> fig = Figure()
        >>> ax = fig.subplots()
        >>> im = show_grid_contexts(ax, torch.rand(6, 10) + 1, 2, title="DS level 2")
        >>> len(ax.lines)  # 3 inner row and 3 inner column boundaries
        6
    """
    if isinstance(level, bool) or not isinstance(level, (int, np.integer)) or level < 0:
        raise ValueError(f"Invalid level: we expect an integer >= 0. Got: {level!r}.")
    im = show_map(ax, depth, kind="depth", valid=valid, title=title, colorbar=colorbar, legend=legend,
                  vmin=vmin, vmax=vmax)
    height, width = im.get_array().shape
    draw_grid(ax, height, width, level, **line_kw)
    return im


def figure_png(fig: Figure) -> bytes:
    """The figure as PNG bytes at its own dpi (for widgets and tests)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def relative_log_magnitude(
    values: Tensor | np.ndarray, valid: Tensor | np.ndarray | None = None
) -> tuple[np.ndarray, float]:
    """``log10(|x| / median |x|)`` of a map, the median over its valid, finite pixels.

    Maps of losses whose overall magnitudes differ (a gradient of one loss can be ten times
    another's everywhere) then share one colour scale that shows *where* each map is large
    relative to its own typical pixel. The median is taken over the non-zero values when more
    than half are zero; a map that is zero everywhere uses 1. Zeros become ``-inf``.

    Args:
        values: ``(H, W)`` (or ``(1, H, W)``) map, e.g. a gradient.
        valid: optional bool map of the pixels that count.

    Returns:
        ``(log_ratio, reference)``: the ``(H, W)`` float64 array (NaN where not valid) and
        the median ``|x|`` it divides by.

    Examples:
        >>> ratio, ref = relative_log_magnitude(torch.tensor([[1.0, -10.0, 100.0]]))
        >>> ratio.tolist(), ref
        ([[-1.0, 0.0, 1.0]], 10.0)
    """
    a = np.abs(_image_2d(values, "values").astype(np.float64))
    ok = np.isfinite(a)
    if valid is not None:
        ok &= _image_2d(valid, "valid").astype(bool)
    data = a[ok]
    reference = float(np.median(data)) if data.size else 0.0
    if reference == 0.0 and (data > 0).any():
        reference = float(np.median(data[data > 0]))
    if reference == 0.0:
        reference = 1.0
    with np.errstate(divide="ignore"):
        out = np.log10(a / reference)
    return np.where(ok, out, np.nan), reference


def show_relative_magnitude_maps(
    axes: Sequence[Axes],
    maps: Mapping[str, Tensor | np.ndarray] | Sequence[tuple[str, Tensor | np.ndarray]],
    *,
    valid: Tensor | np.ndarray | Sequence[Tensor | np.ndarray] | None = None,
    vmin: float = -2.0,
    vmax: float = 2.0,
    cmap: str = "magma",
    label: str = r"$\log_{10}(|G| \,/\, \mathrm{median}\,|G|)$ of the panel (no unit)",
) -> list[AxesImage]:
    """Draw several maps as :func:`relative_log_magnitude`, each over its own median, on one
    colour scale with one shared colorbar.

    Args:
        axes: one axes per map, in the order of ``maps`` (e.g. ``axes.flat`` of a grid).
        maps: panel title -> ``(H, W)`` map, or a sequence of ``(title, map)`` pairs (titles
            may then repeat, e.g. the same loss in every row of a grid).
        valid: one bool mask for all panels, one per panel, or ``None``.
        vmin: lower colour limit in decades around each panel's median (values below are
            drawn in the lowest colour, and so are exact zeros, ``-inf``).
        vmax: upper colour limit in decades around each panel's median (values above are
            drawn in the highest colour).
        cmap: colormap name.
        label: the shared colorbar's label.

    Returns:
        the images, one per panel.

    Examples:
        >>> fig = Figure()
        >>> ims = show_relative_magnitude_maps(fig.subplots(1, 2), {"a": torch.ones(3, 3),
        ...                                    "b": 5 * torch.ones(3, 3)})
        >>> [float(im.get_array().mean()) for im in ims], len(fig.axes)  # two panels, one bar
        ([0.0, 0.0], 3)
    """
    axes = list(np.asarray(axes, dtype=object).flat)
    panels = list(maps.items()) if isinstance(maps, Mapping) else [tuple(p) for p in maps]
    if len(axes) != len(panels):
        raise ValueError(f"Invalid axes: we expect one per map ({len(panels)}). Got: {len(axes)}.")
    if valid is None or isinstance(valid, (Tensor, np.ndarray)):
        masks = [valid] * len(panels)
    else:
        masks = list(valid)
        if len(masks) != len(panels):
            raise ValueError(
                f"Invalid valid: we expect one mask or {len(panels)}. Got: {len(masks)}."
            )
    images = []
    for ax, (title, values), mask in zip(axes, panels, masks, strict=True):
        ratio, _ = relative_log_magnitude(values, mask)
        shown = np.where(np.isneginf(ratio), vmin, ratio)  # exact zeros: the lowest colour
        images.append(show_map(ax, shown, kind="loss", title=title, valid=mask, vmin=vmin,
                               vmax=vmax, cmap=cmap, colorbar=False))
    if images:
        axes[0].figure.colorbar(images[0], ax=axes, shrink=0.85, label=label)
    return images
