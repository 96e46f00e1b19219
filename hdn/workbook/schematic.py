"""The method figures of the workbook: HDN as a pipeline, and why a near context keeps relief.

- :func:`hdn_schematic` draws HDN (Zhang et al., NeurIPS 2022, method section) from real data:
  ground truth -> the contexts of every level -> the ground truth normalised within each
  context -> the per-level residuals -> their per-pixel mean, the map whose sum over ``N_v``
  is :func:`hdn.hdn_loss`.
- :func:`near_bump_profile`, :func:`profile_normalisations` and :func:`profile_figure`: a
  1-D depth profile (a near object with a small bump before a far background) normalised at
  image level and within its near DR context.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.patches import ConnectionPatch
from torch import Tensor

from hdn import contexts as _contexts
from hdn.normalization import context_normalize, ssi_normalize
from hdn.workbook.explorer import CONTEXT_TITLES, level_loss_maps, per_pixel_loss_map
from hdn.workbook.plotting import show_depth_bins, show_grid_contexts, show_map

__all__ = [
    "DepthProfile",
    "ProfileNormalisations",
    "hdn_schematic",
    "near_bump_profile",
    "profile_figure",
    "profile_normalisations",
]


def _single(x: Tensor, name: str) -> Tensor:
    """``(H, W)`` or ``(1, H, W)`` -> detached ``(1, H, W)`` on the CPU (matplotlib draws it)."""
    if not isinstance(x, Tensor):
        raise ValueError(f"Invalid {name}: we expect a torch.Tensor. Got: {type(x).__name__}.")
    if x.dim() == 2:
        x = x.unsqueeze(0)
    if x.dim() != 3 or x.shape[0] != 1:
        raise ValueError(
            f"Invalid {name} shape: we expect (H, W) or (1, H, W). Got: {tuple(x.shape)}."
        )
    return x.detach().cpu()


def hdn_schematic(
    depth: Tensor,
    valid: Tensor,
    pred: Tensor,
    *,
    kind: str = "dr",
    levels: int = 3,
) -> Figure:
    """HDN as a pipeline, drawn from one image: one row per level ``l = 0 .. L-1``.

    Columns: the ground truth ``g`` (left, once); the contexts of level ``l`` (DR / DP bins
    with their depth intervals, DS cells over the depth); ``g_hat^C``, the ground truth
    normalised within each context; ``|p_hat^C - g_hat^C|``, the level's residual; and, right,
    once, the per-pixel mean over the levels that hold the pixel, ``ell_i``
    (:func:`hdn.workbook.explorer.per_pixel_loss_map`). Arrows join the stages.

    Args:
        depth: ``(H, W)`` or ``(1, H, W)`` ground-truth depth in metres (NaN = invalid).
        valid: bool mask of the same shape.
        pred: the prediction, same shape (any scale and shift).
        kind: ``"dr"``, ``"dp"`` or ``"ds"``.
        levels: number of levels ``L``.

    Returns:
        A :class:`matplotlib.figure.Figure` (not managed by pyplot); the ground truth and the
        mean sit in the middle row.

    Examples:
        >>> g = torch.linspace(2.0, 5.0, 48).view(1, 6, 8)
        >>> fig = hdn_schematic(g, torch.ones(1, 6, 8, dtype=torch.bool), 2 * g, levels=2)
        >>> titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
        >>> print(*[t for t in titles if t.startswith(("ground", "level 1:", "per-pixel"))], sep=" | ")
        ground truth $g$ | level 1: 2 contexts | per-pixel mean $\\ell_i$ over levels
    """
    if kind not in CONTEXT_TITLES:
        raise ValueError(f"Invalid kind: we expect one of {tuple(CONTEXT_TITLES)}. Got: {kind!r}.")
    g, v, p = _single(depth, "depth"), _single(valid, "valid").bool(), _single(pred, "pred")
    if not g.shape == v.shape == p.shape:
        raise ValueError(
            f"Invalid shapes: depth, valid and pred must agree. Got: {g.shape}, {v.shape}, {p.shape}."
        )
    ctx = _contexts.build(kind, g, v, levels=levels)
    p = p.to(g.dtype)
    per_level = level_loss_maps(p, g, v, ctx)
    mean_map = per_pixel_loss_map(p, g, v, ctx)
    top = float(per_level.max()) or 1.0
    top = float(np.quantile(per_level[:, v].cpu().numpy(), 0.995)) or top

    middle = levels // 2  # ground truth and mean sit in the middle row, one image high
    mosaic = [
        [
            "gt" if lvl == middle else ".",
            f"c{lvl}",
            f"n{lvl}",
            f"e{lvl}",
            "mean" if lvl == middle else ".",
        ]
        for lvl in range(levels)
    ]
    fig = Figure(figsize=(15, 2.2 * levels + 0.4), layout="constrained")
    axes = fig.subplot_mosaic(mosaic, width_ratios=[1.0, 1.15, 1.0, 1.0, 1.0])
    show_map(axes["gt"], g[0], valid=v[0], title="ground truth $g$")
    for lvl in range(levels):
        k = ctx.contexts_per_image(lvl)
        title = f"level {lvl}: {k} context" + ("s" if k > 1 else "")
        if kind == "ds":
            show_grid_contexts(axes[f"c{lvl}"], g[0], lvl, valid=v[0], title=title, legend=False)
        else:
            show_depth_bins(axes[f"c{lvl}"], ctx, lvl, title=title, legend=lvl == 0)
        member = (ctx.level_ids(lvl) >= 0)[0]
        show_map(
            axes[f"n{lvl}"],
            context_normalize(g, ctx, lvl, v)[0],
            kind="normalized",
            valid=member,
            vmin=-3,
            vmax=3,
            legend=False,
            colorbar=lvl == levels - 1,
            title=r"$\hat g^C$ within each context",
        )
        show_map(
            axes[f"e{lvl}"],
            per_level[lvl, 0],
            kind="loss",
            valid=member,
            vmax=top,
            legend=False,
            colorbar=lvl == levels - 1,
            title=rf"level {lvl} residual $|\hat p^C - \hat g^C|$",
        )
    show_map(
        axes["mean"],
        mean_map[0],
        kind="loss",
        valid=v[0],
        vmax=top,
        legend=False,
        title=r"per-pixel mean $\ell_i$ over levels",
    )
    for lvl in range(levels):  # ground truth -> contexts, residuals -> mean
        for a, b in (("gt", f"c{lvl}"), (f"e{lvl}", "mean")):
            fig.add_artist(
                ConnectionPatch(
                    xyA=(1.02, 0.5),
                    coordsA=axes[a].transAxes,
                    xyB=(-0.25, 0.5),
                    coordsB=axes[b].transAxes,
                    arrowstyle="-|>",
                    color="0.3",
                    linewidth=1.0,
                    mutation_scale=12,
                )
            )
    fig.suptitle(
        f"HDN with {CONTEXT_TITLES[kind]} contexts, L = {levels}: ground truth -> contexts per "
        "level -> each context normalised -> per-pixel mean of the residuals"
    )
    return fig


@dataclass(frozen=True)
class DepthProfile:
    """A 1-D depth profile: one image row of ``n`` pixels, as ``(1, 1, n)`` tensors.

    Attributes:
        depth: depth in metres.
        near: bool, the near object's pixels.
        bump: bool, the pixels of the bump on the object.
        bump_height_m: how much nearer the bump's top is than the surface around it.
    """

    depth: Tensor
    near: Tensor
    bump: Tensor
    bump_height_m: float


def near_bump_profile(
    n: int = 400,
    *,
    near_m: tuple[float, float] = (1.5, 1.6),
    far_m: tuple[float, float] = (20.0, 50.0),
    near_fraction: float = 0.4,
    bump_height_m: float = 0.03,
) -> DepthProfile:
    """A near, slightly slanted surface with one smooth bump, then a far slanted plane.

    Args:
        n: number of pixels.
        near_m: depth of the near surface at its first and last pixel (metres).
        far_m: depth of the far plane at its first and last pixel (metres).
        near_fraction: share of the pixels on the near surface.
        bump_height_m: height of the bump (a raised cosine, a fifth of the near part wide).

    Examples:
        >>> prof = near_bump_profile(100)
        >>> prof.depth.shape, int(prof.near.sum()), round(prof.bump_height_m, 2)
        (torch.Size([1, 1, 100]), 40, 0.03)
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 20:
        raise ValueError(f"Invalid n: we expect an integer >= 20. Got: {n!r}.")
    if not 0 < near_fraction < 1:
        raise ValueError(
            f"Invalid near_fraction: we expect a number in (0, 1). Got: {near_fraction!r}."
        )
    if not (0 < near_m[0] and near_m[1] + bump_height_m < far_m[0] <= far_m[1]):
        raise ValueError(
            f"Invalid near_m / far_m: the near surface must lie before the far plane. Got: {near_m}, {far_m}."
        )
    x = torch.arange(n, dtype=torch.float64)
    k = round(near_fraction * n)
    near = x < k
    t_near = x / max(k - 1, 1)
    t_far = (x - k) / max(n - k - 1, 1)
    depth = torch.where(
        near, near_m[0] + (near_m[1] - near_m[0]) * t_near, far_m[0] + (far_m[1] - far_m[0]) * t_far
    )
    centre, half = 0.5 * (k - 1), 0.1 * k
    u = ((x - centre) / half).clamp(-1, 1)
    bump = near & ((x - centre).abs() < half)
    depth = depth - torch.where(bump, bump_height_m * 0.5 * (1 + torch.cos(torch.pi * u)), 0.0)
    view = (1, 1, n)
    return DepthProfile(depth.view(view), near.view(view), bump.view(view), float(bump_height_m))


@dataclass(frozen=True)
class ProfileNormalisations:
    """The profile normalised two ways, and the near DR context it uses.

    Attributes:
        image_level: ``g_hat`` with one context, the whole row (notebook 01).
        near_context: ``g_hat^C`` within the DR bin that holds the near object, NaN elsewhere.
        near_bin: ``(lower, upper)`` depth edges of that bin (metres).
        level: the DR level of that bin.
        bump_image_level: the bump's height in units of the image-level ``g_hat``.
        bump_near_context: the bump's height in units of the near context's ``g_hat^C``.
    """

    image_level: Tensor
    near_context: Tensor
    near_bin: tuple[float, float]
    level: int
    bump_image_level: float
    bump_near_context: float


def _bump_height(x_hat: Tensor, profile: DepthProfile) -> float:
    """Height of the bump in a normalised map: the surface's fit at the bump minus its top."""
    x = x_hat.reshape(-1).double()
    idx = torch.arange(x.numel(), dtype=torch.float64)
    ring = (profile.near & ~profile.bump).reshape(-1)
    slope, intercept = np.polyfit(idx[ring].numpy(), x[ring].numpy(), 1)
    bump = profile.bump.reshape(-1)
    surface = intercept + slope * idx[bump].numpy()
    return float(np.max(np.abs(x[bump].numpy() - surface)))


def profile_normalisations(profile: DepthProfile, levels: int = 3) -> ProfileNormalisations:
    """Normalise the profile at image level and within the DR bin of level ``levels - 1``
    that holds its near object.

    Examples:
        >>> out = profile_normalisations(near_bump_profile(200))
        >>> out.level, out.bump_near_context > 100 * out.bump_image_level
        (2, True)
    """
    g = profile.depth
    valid = torch.ones_like(g, dtype=torch.bool)
    ctx = _contexts.depth_range(g, valid, levels=levels)
    level = levels - 1
    ids = ctx.level_ids(level)
    first = int(ids[profile.near].min())
    if not bool((ids[profile.near] == first).all()) or bool((ids[~profile.near] == first).any()):
        raise ValueError(
            f"Invalid levels: at level {level} no DR bin holds the near object alone; use more levels."
        )
    image_level = ssi_normalize(g, valid)
    near_context = torch.where(ids == first, context_normalize(g, ctx, level, valid), torch.nan)
    lo, hi = float(ctx.lower[level][0, first]), float(ctx.upper[level][0, first])
    return ProfileNormalisations(
        image_level=image_level,
        near_context=near_context,
        near_bin=(lo, hi),
        level=level,
        bump_image_level=_bump_height(image_level, profile),
        bump_near_context=_bump_height(near_context, profile),
    )


def profile_figure(profile: DepthProfile, normalised: ProfileNormalisations) -> Figure:
    """Three panels: the depth profile with the near DR bin shaded; the image-level
    ``g_hat`` along the row; and, over the near object's pixels only, the image-level
    ``g_hat`` against the near context's ``g_hat^C`` (one axis, so the bump's sizes compare).

    Examples:
        >>> prof = near_bump_profile(100)
        >>> fig = profile_figure(prof, profile_normalisations(prof))
        >>> len(fig.axes), fig.axes[2].get_xlabel()
        (3, 'column (px)')
    """
    x = np.arange(profile.depth.shape[-1])
    g = profile.depth.reshape(-1).numpy()
    near = profile.near.reshape(-1).numpy()
    image_level = normalised.image_level.reshape(-1).double().numpy()
    near_ctx = normalised.near_context.reshape(-1).double().numpy()
    lo, hi = normalised.near_bin
    fig = Figure(figsize=(13, 3.0), layout="constrained")
    a, b, c = fig.subplots(1, 3)
    a.axhspan(
        lo, hi, color="tab:orange", alpha=0.2, label=f"near DR context (level {normalised.level})"
    )
    a.plot(x, g, color="black", linewidth=1.2, label="depth $g$")
    a.set(title="a depth profile: near object, far plane", xlabel="column (px)", ylabel="depth (m)")
    a.legend(loc="upper left", fontsize=7)
    b.plot(x, image_level, color="tab:blue", linewidth=1.2)
    b.set(
        title=r"image level: $\hat g$ (one $t$, one $s$)",
        xlabel="column (px)",
        ylabel=r"$\hat g$ (no unit)",
    )
    xs = x[near]
    c.plot(
        xs,
        image_level[near],
        color="tab:blue",
        linewidth=1.2,
        label=rf"image-level $\hat g$ (bump {normalised.bump_image_level:.4f})",
    )
    c.plot(
        xs,
        near_ctx[near],
        color="tab:orange",
        linewidth=1.2,
        label=rf"near-context $\hat g^C$ (bump {normalised.bump_near_context:.2f})",
    )
    c.set(
        title="the near object's pixels, both normalisations",
        xlabel="column (px)",
        ylabel="normalised depth (no unit)",
    )
    c.legend(loc="upper left", fontsize=7)
    return fig
