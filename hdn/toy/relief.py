"""Procedural scenes whose near relief is visible in the image: the data of notebook 06.

Notebook 05's scenes gave a network few cues for the fine relief of near objects (textured
surfaces, relief a few pixels wide at 64 x 64) and no model learned it. These scenes are built
so that the relief *can* be learned:

- a **far background** 20-60 m away: a ground-like ramp (depth growing towards the top of the
  image) with low-frequency undulation, a textured colour and haze;
- **one or two near objects** 1.5-3 m away, each in its own horizontal slot (they never touch,
  so each is one connected component of the ``near`` map), a slightly tilted plane plus
  **relief**: a few Gaussian bumps and dimples 1.5-3 px wide and a few cm high;
- the RGB of a near object is its **uniform albedo** (no texture) times Lambertian shading from
  the surface normals under one fixed light, so every bump shows as a bright and a dark flank,
  plus a little haze. The background keeps a texture, so "smooth and shaded" means "near".

What a loss sees: ``gt = scale * depth + shift`` with a per-scene scale and shift (as for
mixed datasets), or, for a ``disparity_fraction`` of the scenes, ``gt = scale / depth + shift``
(labels affine in disparity, whose relief has the opposite sign). :func:`hdn.metrics.relief_error`
is blind to the scale and shift of the labels on each object, so it can be computed on ``depth``.

Scenes are drawn at run time from a ``numpy.random.Generator(PCG64(SeedSequence(seed)))``;
the same seed gives the same arrays on any machine (float64 arithmetic, stored as float32).

Examples:
    >>> s = make_relief_scene(0, size=32)
    >>> s.rgb.shape, s.depth.shape, s.near.dtype
    ((3, 32, 32), (32, 32), dtype('bool'))
    >>> bool((s.depth[s.near] < 4).all() and (s.depth[~s.near] > 15).all())
    True
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

__all__ = ["BACKGROUNDS", "LIGHT", "ReliefScene", "make_relief_batch", "make_relief_scene"]

#: What stands behind the near objects (1.5-3 m away), from isolated in depth to no gap at all:
#: ``"far"`` a background 20-60 m away (notebook 06's attempts), ``"mid"`` 8-15 m, ``"close"``
#: 3-6 m, just behind the objects, and ``"ground"``: no gap, the objects stand on a textured
#: ground plane whose depth runs from about 1 m at the bottom of the image to 25-40 m at the
#: top, so that the ground beside each object has the object's depth.
BACKGROUNDS = ("far", "mid", "close", "ground")

# Per background: bounds of the depth at the bottom row, at the top row, and the amplitude (m)
# of the low-frequency undulation; "ground" uses the first two as the ground's depth at the
# bottom and the top row and the third as a relative undulation.
_BACKGROUND_DEPTHS = {
    "far": ((20.0, 30.0), (40.0, 60.0), 3.0),
    "mid": ((8.0, 10.0), (12.0, 15.0), 1.0),
    "close": ((3.5, 4.5), (5.0, 6.0), 0.3),
    "ground": ((0.9, 1.2), (25.0, 40.0), 0.02),
}

#: Direction towards the light in camera coordinates (x right, y down, z forward), unit length.
LIGHT = np.array([-0.55, -0.6, -0.58]) / np.linalg.norm([-0.55, -0.6, -0.58])

SeedLike = int | Sequence[int]


@dataclass(frozen=True)
class ReliefScene:
    """One scene.

    Attributes:
        rgb: ``(3, H, W)`` float32 in ``[0, 1]``.
        depth: ``(H, W)`` float32 metric depth in metres (all pixels valid).
        smooth: ``(H, W)`` float32, the same depth without the objects' relief (the "flat"
            reference of the calibration ladder).
        near: ``(H, W)`` bool, the near objects' pixels.
        labels: ``(H, W)`` int64, object index ``0..K-1`` on near pixels, -1 elsewhere.
        gt: ``(H, W)`` float32 training labels, affine in depth (or in disparity if ``disparity``).
        disparity: whether ``gt`` is affine in ``1 / depth``.
        seed: the seed the scene was drawn from.
    """

    rgb: np.ndarray
    depth: np.ndarray
    smooth: np.ndarray
    near: np.ndarray
    labels: np.ndarray
    gt: np.ndarray
    disparity: bool
    seed: tuple[int, ...]


def _noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Smooth noise in ``[-1, 1]``: bilinear interpolation of a random ``(cells+1)^2`` grid."""
    grid = rng.uniform(-1.0, 1.0, (cells + 1, cells + 1))
    t = np.linspace(0.0, cells, size)
    i = np.minimum(t.astype(np.int64), cells - 1)
    f = t - i
    rows = grid[i] * (1 - f)[:, None] + grid[i + 1] * f[:, None]
    return rows[:, i] * (1 - f)[None, :] + rows[:, i + 1] * f[None, :]


def _shading(depth: np.ndarray, f: float) -> np.ndarray:
    """Lambertian shading ``max(0, n . LIGHT)`` of the surface ``depth`` seen by a pinhole camera."""
    size = depth.shape[0]
    c = (size - 1) / 2
    v, u = np.mgrid[0:size, 0:size].astype(np.float64)
    points = np.stack([(u - c) / f * depth, (v - c) / f * depth, depth])
    du = np.gradient(points, axis=2)
    dv = np.gradient(points, axis=1)
    n = np.cross(du, dv, axis=0)
    n /= np.linalg.norm(n, axis=0, keepdims=True) + 1e-12
    n *= -np.sign(n[2:3])  # face the camera (z < 0)
    return np.clip(np.tensordot(LIGHT, n, axes=1), 0.0, 1.0)


def _seed_tuple(seed: SeedLike) -> tuple[int, ...]:
    words = (seed,) if isinstance(seed, (int, np.integer)) else tuple(seed)
    if not words or any(
        isinstance(w, bool) or not isinstance(w, (int, np.integer)) or w < 0 for w in words
    ):
        raise ValueError(
            f"Invalid seed: we expect a non-negative int or a sequence of them. Got: {seed!r}."
        )
    return tuple(int(w) for w in words)


def make_relief_scene(
    seed: SeedLike,
    size: int = 32,
    disparity_fraction: float = 0.0,
    tilt: float = 0.01,
    background: str = "far",
) -> ReliefScene:
    """Draw the scene of ``seed`` at ``size x size`` pixels.

    Args:
        seed: a non-negative int or a sequence of them (e.g. ``(run_seed, step, index)``).
        size: image side in pixels, >= 16.
        disparity_fraction: probability in ``[0, 1]`` that the labels are affine in disparity.
        tilt: largest slope of a near object's plane, in units of its distance per pixel
            (``>= 0``; the slope is drawn uniformly in ``[-tilt, tilt]`` along each image axis).
        background: what stands behind the objects, one of :data:`BACKGROUNDS`; the default
            ``"far"`` gives the scenes of notebook 06's attempts, unchanged. The other
            backgrounds draw the same random numbers, so a seed gives the same objects
            (albedo, relief, outline; on ``"ground"`` moved to stand on the ground).

    Returns:
        a :class:`ReliefScene`.
    """
    words = _seed_tuple(seed)
    if isinstance(size, bool) or not isinstance(size, int) or size < 16:
        raise ValueError(f"Invalid size: we expect an int >= 16. Got: {size!r}.")
    if not 0.0 <= disparity_fraction <= 1.0:
        raise ValueError(
            f"Invalid disparity_fraction: we expect a number in [0, 1]. Got: {disparity_fraction!r}."
        )
    if isinstance(tilt, bool) or not isinstance(tilt, (int, float)) or not 0.0 <= tilt < 0.1:
        raise ValueError(f"Invalid tilt: we expect a number in [0, 0.1). Got: {tilt!r}.")
    if background not in BACKGROUNDS:
        raise ValueError(f"Invalid background: we expect one of {BACKGROUNDS}. Got: {background!r}.")
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence(list(words))))
    f = float(size)  # focal length in pixels: a field of view of about 53 degrees
    v, u = np.mgrid[0:size, 0:size].astype(np.float64)
    (low_a, low_b), (high_a, high_b), undulation = _BACKGROUND_DEPTHS[background]
    near_row, far_row = rng.uniform(low_a, low_b), rng.uniform(high_a, high_b)
    if background == "ground":
        # A ground plane seen from above it: depth A / (row + c), near_row at the bottom row and
        # far_row at the top one, with a small relative undulation.
        c = (size - 1) * near_row / (far_row - near_row)
        ground = far_row * c / (v + c)
        bg = ground * (1.0 + undulation * _noise(rng, size, 3))
    else:
        # A background whose depth grows towards the top of the image, gently undulating.
        bg = far_row + (near_row - far_row) * v / (size - 1) + undulation * _noise(rng, size, 3)
    bg_albedo = rng.uniform(0.3, 0.7, 3)[:, None, None] * (1 + 0.35 * _noise(rng, size, size // 4))
    rgb = bg_albedo * (0.35 + 0.65 * _shading(bg, f))
    depth, smooth = bg.copy(), bg.copy()
    labels = np.full((size, size), -1, dtype=np.int64)
    count = int(rng.integers(1, 3))
    slot = size / count
    for k in range(count):
        w = int(rng.uniform(0.6, 0.85) * slot)
        h = int(rng.uniform(0.45, 0.75) * size)
        left = int(k * slot + rng.uniform(1, max(1.0, slot - w - 1)))
        top = int(rng.uniform(0.2 * size, size - h - 1))
        z0 = rng.uniform(1.5, 3.0)
        if background == "ground":  # stand on the ground: the bottom row where it is z0 away
            bottom = min(size - 1, round(far_row * c / z0 - c))
            h = min(h, bottom - 1)
            top = bottom - h
        tilt_u, tilt_v = rng.uniform(-1.0, 1.0, 2) * tilt * z0
        plane = z0 + tilt_u * (u - left - w / 2) + tilt_v * (v - top - h / 2)
        relief = np.zeros_like(plane)
        for _ in range(int(rng.integers(3, 7))):
            cy, cx = rng.uniform(top + 1, top + h - 1), rng.uniform(left + 1, left + w - 1)
            width = rng.uniform(1.5, 3.0)
            height = rng.choice([-1.0, 1.0]) * rng.uniform(0.02, 0.05) * z0
            relief += height * np.exp(-0.5 * ((u - cx) ** 2 + (v - cy) ** 2) / width**2)
        surface = plane + relief
        inside = (u >= left) & (u < left + w) & (v >= top) & (v < top + h)
        if rng.uniform() < 0.5:  # an ellipse instead of a rectangle
            ry, rx = h / 2, w / 2
            inside &= ((u - left - rx + 0.5) / rx) ** 2 + ((v - top - ry + 0.5) / ry) ** 2 <= 1.0
        albedo = rng.uniform(0.35, 0.95, 3)[:, None, None]
        rgb = np.where(inside, albedo * (0.15 + 0.85 * _shading(surface, f)), rgb)
        depth = np.where(inside, surface, depth)
        smooth = np.where(inside, plane, smooth)
        labels[inside] = k
    haze = 1.0 - np.exp(-0.015 * depth)
    rgb = rgb * (1 - haze) + 0.75 * haze
    disparity = bool(rng.uniform() < disparity_fraction)
    scale, shift = rng.uniform(0.5, 2.0), rng.uniform(-1.0, 1.0)
    gt = scale / depth + shift if disparity else scale * depth + shift
    return ReliefScene(
        rgb=np.clip(rgb, 0.0, 1.0).astype(np.float32),
        depth=depth.astype(np.float32),
        smooth=smooth.astype(np.float32),
        near=labels >= 0,
        labels=labels,
        gt=gt.astype(np.float32),
        disparity=disparity,
        seed=words,
    )


def make_relief_batch(
    seeds: Sequence[SeedLike],
    size: int = 32,
    disparity_fraction: float = 0.0,
    tilt: float = 0.01,
    background: str = "far",
) -> dict[str, Tensor]:
    """The scenes of ``seeds`` stacked as tensors.

    Returns:
        Tensors by key, ``"rgb"`` ``(N, 3, H, W)``; ``"depth"``, ``"smooth"`` and ``"gt"``
        ``(N, 1, H, W)`` float32; ``"near"`` ``(N, 1, H, W)`` bool; ``"labels"``
        ``(N, 1, H, W)`` int64; ``"disparity"`` ``(N,)`` bool.

    Examples:
        >>> batch = make_relief_batch([(0, 0, i) for i in range(4)], size=32)
        >>> batch["rgb"].shape, batch["labels"].shape
        (torch.Size([4, 3, 32, 32]), torch.Size([4, 1, 32, 32]))
    """
    scenes = [make_relief_scene(s, size, disparity_fraction, tilt, background) for s in seeds]
    if not scenes:
        raise ValueError("Invalid seeds: we expect at least one seed. Got: an empty sequence.")

    def stack(name: str) -> Tensor:
        return torch.from_numpy(np.stack([getattr(s, name) for s in scenes]))

    out = {"rgb": stack("rgb")}
    for name in ("depth", "smooth", "gt", "near", "labels"):
        out[name] = stack(name).unsqueeze(1)
    out["disparity"] = torch.tensor([s.disparity for s in scenes])
    return out
