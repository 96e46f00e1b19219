"""Procedural RGB-D scenes that carry what HDN is about, deterministic by seed.

Each scene is a 64 x 64 (or any size) view of

- a **far background**: hilly terrain 15-60 m away (inverse depth linear in the image row,
  as for a ground plane, plus low-frequency relief), sometimes a far building, and a sky
  above a wavy skyline;
- **near objects** 1-3 m away, covering about 35-55 % of the non-sky pixels, with **fine
  relief** of a few cm to a few dm: stepped boxes, domes with bumps, corrugated panels, and
  thin poles / fence bars. Nearer objects sit lower in the image and look larger (they have
  sizes in metres), and their textures have a fixed period in metres.

So the depth range of an image is dominated by the background, and image-level
normalisation squeezes the near relief into a tiny part of the normalised range: the
situation where hierarchical contexts help.

The RGB image carries cues a small CNN can learn depth from: Lambertian shading from
surface normals computed from the depth, per-object colour and texture (in world units,
so that far texture is finer), and haze that grows with depth (``exp(-beta * d)``).

What the loss sees and what the metrics see:

- ``depth`` is the metric depth in metres; evaluation (:func:`hdn.metrics.zero_shot_metrics`)
  compares predictions with it after least-squares alignment;
- ``gt = scale * depth + shift`` is the depth as observed through a per-scene unknown
  positive scale and shift, as when datasets recorded with different sensors are mixed.
  The training losses see ``gt`` only; ``scale`` and ``shift`` are kept for reference.
- Invalid pixels (sky, sensor holes, flying pixels at depth edges) are NaN in ``depth`` and
  ``gt`` and False in ``valid``.

Everything is drawn from one ``numpy.random.Generator(PCG64(seed))`` and stored quantised
(RGB to 1/255, depth to 1 mm), which makes the arrays bit-for-bit reproducible.

Examples:
    >>> scene = make_scene(0, height=32, width=32)
    >>> scene.rgb.shape, scene.depth.shape, scene.rgb.dtype
    ((3, 32, 32), (32, 32), dtype('float32'))
    >>> bool(np.array_equal(scene.gt[scene.valid], (scene.scale * scene.depth + scene.shift)[scene.valid]))
    True
"""

from __future__ import annotations

import argparse
import hashlib
import io
import time
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "SPLIT_FIELDS",
    "TOY_SPLIT_OPTIONS",
    "TOY_SPLIT_PATH",
    "TOY_SPLIT_SHA256",
    "Scene",
    "arrays_sha256",
    "decode_split",
    "draw_checked_split",
    "encode_split",
    "file_sha256",
    "load_split",
    "make_scene",
    "make_split",
    "save_split",
    "toy_split",
]

#: Arrays of one split as returned by :func:`make_split` and :func:`load_split`.
SPLIT_FIELDS = ("rgb", "depth", "valid", "gt", "scale", "shift", "scene_seed")

_DEPTH_STEP = 1e-3  # metres per stored depth unit (uint16 millimetres)
_MAX_DEPTH = 60.0  # background depth is clipped here; 60 m fits into uint16 millimetres
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)  # fixed timestamp: the same arrays give the same file

SeedLike = int | Sequence[int]

#: Options of the committed toy split: the command in ``data/README.md``,
#: ``python -m hdn.toy.synthetic --out data/toy_rgbd.npz --train 256 --test 64 --size 64 --seed 0``.
TOY_SPLIT_OPTIONS = {"train": 256, "test": 64, "size": 64, "seed": 0}

#: :func:`arrays_sha256` of the committed toy split, the one place in the package that holds it
#: (``tests/test_synthetic.py`` keeps it equal to the checksum that ``data/README.md`` states).
TOY_SPLIT_SHA256 = "66ad6c8c2b6e65f430dc398e8e13bfdc4a84ea3fab467ae7b8a63ee81f844a19"

#: Where the committed split lies in a clone of the repository (absent after a wheel install).
TOY_SPLIT_PATH = Path(__file__).resolve().parents[2] / "data" / "toy_rgbd.npz"


@dataclass(frozen=True)
class Scene:
    """One synthetic RGB-D scene.

    Attributes:
        rgb: ``(3, H, W)`` float32 in ``[0, 1]`` (multiples of 1/255).
        depth: ``(H, W)`` float32 metric depth in metres (multiples of 1 mm); NaN where invalid.
        valid: ``(H, W)`` bool, False on sky, holes and flying pixels.
        gt: ``(H, W)`` float32, ``scale * depth + shift`` (float32 arithmetic); NaN where
            invalid. This is what a training loss sees.
        scale: the scene's positive ground-truth scale (float32 value).
        shift: the scene's ground-truth shift (float32 value).
        seed: the seed the scene was drawn from.
    """

    rgb: np.ndarray
    depth: np.ndarray
    valid: np.ndarray
    gt: np.ndarray
    scale: float
    shift: float
    seed: tuple[int, ...]


# --------------------------------------------------------------------------- rendering


def _value_noise(rng: np.random.Generator, h: int, w: int, cells: int) -> np.ndarray:
    """Smooth noise in ``[-1, 1]``: random values on a ``cells x cells`` grid, smoothstep-interpolated."""
    grid = rng.uniform(-1.0, 1.0, (cells + 1, cells + 1))
    y = np.linspace(0.0, cells, h)
    x = np.linspace(0.0, cells, w)
    y0 = np.minimum(y.astype(np.int64), cells - 1)
    x0 = np.minimum(x.astype(np.int64), cells - 1)
    fy = y - y0
    fx = x - x0
    fy = (fy * fy * (3 - 2 * fy))[:, None]
    fx = (fx * fx * (3 - 2 * fx))[None, :]
    top = grid[y0][:, x0] * (1 - fx) + grid[y0][:, x0 + 1] * fx
    bottom = grid[y0 + 1][:, x0] * (1 - fx) + grid[y0 + 1][:, x0 + 1] * fx
    return top * (1 - fy) + bottom * fy


def _place(rng: np.random.Generator, W: int, H: int) -> tuple[float, float, float]:
    """Distance ``z0`` (1-3 m) and image centre of a near object.

    Nearer objects sit lower in the image, as things standing on a ground plane do (the
    elevation cue); their size in pixels is their size in metres times ``f / z0``.
    """
    z0 = rng.uniform(1.0, 3.0)
    uc = rng.uniform(0.1, 0.9) * W
    vc = (0.8 - 0.15 * (z0 - 1) + rng.uniform(-0.05, 0.05)) * H
    return z0, uc, vc


def _box(rng, u, v, f, W, H):
    """A tilted box face, 40-70 cm wide, with 2-4 steps of 2-15 cm."""
    z0, uc, vc = _place(rng, W, H)
    hw, hh = rng.uniform(0.2, 0.35) * f / z0, rng.uniform(0.15, 0.3) * f / z0
    inside = (np.abs(u - uc) < hw) & (np.abs(v - vc) < hh)
    # the face is tilted by up to +-20 cm across, so that its shading varies
    z = z0 + rng.uniform(-0.2, 0.2) * (u - uc) / hw + rng.uniform(-0.2, 0.2) * (v - vc) / hh
    n_steps = int(rng.integers(2, 5))
    along = (u - uc + hw) / (2 * hw) if rng.random() < 0.5 else (v - vc + hh) / (2 * hh)
    index = np.clip((along * n_steps).astype(np.int64), 0, n_steps - 1)
    heights = np.concatenate(
        [[0.0], np.cumsum(rng.choice([-1, 1], n_steps - 1) * rng.uniform(0.02, 0.15, n_steps - 1))]
    )
    return inside, z + heights[index], (uc, vc, z0)


def _dome(rng, u, v, f, W, H):
    """A (flattened) sphere of 18-30 cm radius with 3-8 Gaussian bumps of 1-8 cm."""
    z0, uc, vc = _place(rng, W, H)
    radius_m = rng.uniform(0.18, 0.3)
    r = radius_m * f / z0
    rho2 = ((u - uc) ** 2 + (v - vc) ** 2) / r**2
    inside = rho2 < 1
    z = z0 - rng.uniform(0.4, 1.0) * radius_m * np.sqrt(np.clip(1 - rho2, 0, None))
    for _ in range(int(rng.integers(3, 9))):
        bu, bv = uc + rng.uniform(-0.7, 0.7) * r, vc + rng.uniform(-0.7, 0.7) * r
        sigma = rng.uniform(0.08, 0.2) * r
        amp = rng.choice([-1, 1]) * rng.uniform(0.01, 0.08)
        z = z - amp * np.exp(-((u - bu) ** 2 + (v - bv) ** 2) / (2 * sigma**2))
    return inside, z, (uc, vc, z0)


def _panel(rng, u, v, f, W, H):
    """A slanted panel, 60-90 cm wide, with a corrugation of 1-5 cm and a raised frame."""
    z0, uc, vc = _place(rng, W, H)
    hw, hh = rng.uniform(0.3, 0.45) * f / z0, rng.uniform(0.15, 0.25) * f / z0
    inside = (np.abs(u - uc) < hw) & (np.abs(v - vc) < hh)
    z = z0 + rng.uniform(-0.3, 0.3) * (u - uc) / hw
    angle = rng.uniform(0, np.pi)
    period_px = rng.uniform(0.06, 0.12) * f / z0
    phase = (np.cos(angle) * (u - uc) + np.sin(angle) * (v - vc)) / period_px
    z = z + rng.uniform(0.01, 0.05) * np.sin(2 * np.pi * phase)
    border = max(1.0, 0.12 * min(hw, hh))
    frame = (np.abs(u - uc) > hw - border) | (np.abs(v - vc) > hh - border)
    z = z - np.where(frame, rng.uniform(0.03, 0.12), 0.0)
    return inside, z, (uc, vc, z0)


def _poles(rng, u, v, f, W, H):
    """1-4 thin cylinders (poles, fence bars) 2-5 cm thick, 8-20 cm apart."""
    inside = np.zeros(u.shape, dtype=bool)
    z = np.full(u.shape, np.inf)
    z0, base_u, vc = _place(rng, W, H)
    spacing = rng.uniform(0.08, 0.2) * f / z0
    top, bottom = vc - rng.uniform(0.4, 1.0) * f / z0, vc + rng.uniform(0.1, 0.4) * f / z0
    lean = rng.uniform(-0.25, 0.25)
    for k in range(int(rng.integers(1, 5))):
        half = max(0.5, rng.uniform(0.01, 0.025) * f / z0)
        centre = base_u + k * spacing + lean * (v - bottom)
        dist = np.abs(u - centre)
        on = (dist < half) & (v > top) & (v < bottom)
        zk = (
            z0
            + rng.uniform(-0.1, 0.1)
            - (half * z0 / f) * np.sqrt(np.clip(1 - (dist / half) ** 2, 0, None))
        )
        closer = on & (zk < z)
        inside |= closer
        z = np.where(closer, zk, z)
    return inside, z, (base_u, vc, z0)


_OBJECTS = (_box, _dome, _panel, _poles)


def _surface_normals(points: np.ndarray, depth: np.ndarray) -> np.ndarray:
    """Unit normals ``(3, H, W)`` from back-projected points, facing the camera.

    Along each axis the one-sided difference with the smaller depth jump is used, so that
    the normals stay clean up to depth discontinuities.
    """
    tangents = []
    for axis in (1, 2):
        diff = np.diff(points, axis=axis)
        jump = np.abs(np.diff(depth, axis=axis - 1))
        pad_after = [(0, 0)] * 3
        pad_after[axis] = (0, 1)
        pad_before = [(0, 0)] * 3
        pad_before[axis] = (1, 0)
        forward = np.pad(diff, pad_after, mode="edge")
        backward = np.pad(diff, pad_before, mode="edge")
        jpad_after = [(0, 0)] * 2
        jpad_after[axis - 1] = (0, 1)
        jpad_before = [(0, 0)] * 2
        jpad_before[axis - 1] = (1, 0)
        j_forward = np.pad(jump, jpad_after, constant_values=np.inf)
        j_backward = np.pad(jump, jpad_before, constant_values=np.inf)
        tangents.append(np.where(j_forward <= j_backward, forward, backward))
    normal = np.cross(tangents[1], tangents[0], axis=0)  # d/du x d/dv
    normal = normal / (np.linalg.norm(normal, axis=0, keepdims=True) + 1e-12)
    return np.where(normal[2:3] > 0, -normal, normal)  # the camera looks along +z


def _render(
    seed: tuple[int, ...], height: int, width: int
) -> tuple[np.ndarray, np.ndarray, float, float]:
    """Draw one scene: RGB as uint8 ``(3, H, W)``, depth as uint16 mm ``(H, W)`` (0 = invalid), scale, shift."""
    rng = np.random.Generator(np.random.PCG64(list(seed)))
    H, W = height, width
    v, u = np.mgrid[0:H, 0:W].astype(np.float64)
    f = W * rng.uniform(0.9, 1.3)
    rx, ry = (u - (W - 1) / 2) / f, (v - (H - 1) / 2) / f

    # far background: terrain between a wavy skyline and the bottom row, sometimes a building
    skyline = rng.uniform(0.15, 0.4) * H + 0.1 * H * _value_noise(rng, 1, W, 4)[0]
    sky = v < skyline[None, :]
    t = np.clip((v - skyline) / (H - skyline), 0, 1)
    d_far, d_near = rng.uniform(40.0, 60.0), rng.uniform(15.0, 22.0)
    terrain = 1 / (1 / d_far + t * (1 / d_near - 1 / d_far))
    terrain = terrain * (1 + 0.05 * _value_noise(rng, H, W, 3))
    depth = np.where(sky, np.inf, np.clip(terrain, 15.0, _MAX_DEPTH))
    label = np.where(sky, 0, 1)
    if rng.random() < 0.5:
        bu, bw = rng.uniform(0.1, 0.9) * W, rng.uniform(0.08, 0.25) * W
        b_top = rng.uniform(0.05, 0.3) * H
        b_depth = rng.uniform(18.0, 35.0)
        building = (np.abs(u - bu) < bw) & (v > b_top) & (b_depth < depth)
        depth = np.where(building, b_depth + 0.02 * (u - bu), depth)
        label = np.where(building, 2, label)

    # near objects with fine relief, composited by a z-buffer, until they cover 35-55 % of the
    # non-sky pixels (so that the nearest quarter of every scene lies on near objects)
    min_cover, kinds, centres = rng.uniform(0.35, 0.55), [], []
    while len(kinds) < 2 or (
        len(kinds) < 12 and (label >= 3).sum() < min_cover * (label != 0).sum()
    ):
        kind = int(rng.integers(0, len(_OBJECTS) if kinds else len(_OBJECTS) - 1))  # solid first
        inside, z, centre = _OBJECTS[kind](rng, u, v, f, W, H)
        closer = inside & (np.maximum(z, 0.5) < depth)
        depth = np.where(closer, np.maximum(z, 0.5), depth)
        label = np.where(closer, 3 + len(kinds), label)
        kinds.append(kind)
        centres.append(centre)

    finite = np.where(sky & (label == 0), _MAX_DEPTH, depth)
    points = np.stack([rx * finite, ry * finite, finite])
    normal = _surface_normals(points, finite)

    # albedo: a colour per region times a texture in world units
    n_regions = 3 + len(kinds)
    colours = rng.uniform(0.25, 0.9, (n_regions, 3))
    albedo = colours[label].transpose(2, 0, 1)
    grain = 1 + 0.05 * rng.standard_normal((H, W))
    texture = 1 + 0.25 * _value_noise(rng, H, W, 8)  # background: mottled
    for k, (cu, cv, cz) in enumerate(centres):
        X, Y = (points[0] - (cu - (W - 1) / 2) / f * cz), (points[1] - (cv - (H - 1) / 2) / f * cz)
        period = 0.1  # metres: the texture is finer in the image when the object is farther
        style = int(rng.integers(0, 3))
        if style == 0:  # checker
            pattern = np.sign(np.sin(2 * np.pi * X / period) * np.sin(2 * np.pi * Y / period))
        elif style == 1:  # stripes
            a = rng.uniform(0, np.pi)
            pattern = np.sin(2 * np.pi * (np.cos(a) * X + np.sin(a) * Y) / period)
        else:  # plain
            pattern = np.zeros_like(X)
        texture = np.where(label == 3 + k, 1 + 0.2 * pattern, texture)
    albedo = np.clip(albedo * texture * grain, 0, 1)

    # Lambertian shading, then haze growing with depth, then a sky and sensor noise
    light = np.array([rng.uniform(-1, 1), rng.uniform(-1, 0.3), -1.0])
    light /= np.linalg.norm(light)
    ambient = rng.uniform(0.2, 0.4)
    shade = ambient + (1 - ambient) * np.clip(np.tensordot(light, normal, axes=1), 0, 1)
    airlight = rng.uniform(0.65, 0.95) * np.array(
        [1.0, rng.uniform(1.0, 1.05), rng.uniform(1.03, 1.15)]
    )
    beta = rng.uniform(0.015, 0.04)
    transmission = np.exp(-beta * finite)
    rgb = albedo * shade * transmission + airlight[:, None, None] * (1 - transmission)
    sky_rgb = airlight[:, None, None] * (
        1 - 0.3 * np.clip((skyline[None, :] - v) / H, 0, 1)
    ) + 0.03 * _value_noise(rng, H, W, 4)
    rgb = np.where((label == 0)[None], sky_rgb, rgb)
    rgb = np.clip(rgb + 0.005 * rng.standard_normal(rgb.shape), 0, 1)

    # invalid pixels: sky, a few sensor holes, some flying pixels at depth edges
    valid = label != 0
    for _ in range(int(rng.integers(0, 4))):
        hu, hv = rng.uniform(0, W), rng.uniform(0, H)
        a, b = rng.uniform(1.0, 4.0, 2) * W / 64
        valid &= ((u - hu) / a) ** 2 + ((v - hv) / b) ** 2 > 1
    log_depth = np.log(finite)
    edge = np.zeros((H, W), dtype=bool)
    edge[:, 1:] |= np.abs(np.diff(log_depth, axis=1)) > 0.3
    edge[1:, :] |= np.abs(np.diff(log_depth, axis=0)) > 0.3
    valid &= ~(edge & (rng.random((H, W)) < 0.3))

    rgb_u8 = np.rint(rgb * 255).astype(np.uint8)
    depth_mm = np.where(valid, np.rint(np.where(valid, depth, 0) / _DEPTH_STEP), 0).astype(
        np.uint16
    )
    # per-scene unknown affine map of the ground truth: gt = scale * depth + shift > 0
    scale = float(np.float32(np.exp(rng.uniform(np.log(0.2), np.log(5.0)))))
    shift = float(np.float32(scale * rng.uniform(-0.4, 3.0)))
    return rgb_u8, depth_mm, scale, shift


def _decode(rgb_u8: np.ndarray, depth_mm: np.ndarray, scale: np.ndarray, shift: np.ndarray):
    """Stored integers -> float32 arrays. Broadcasts over leading batch dimensions."""
    rgb = rgb_u8.astype(np.float32) / np.float32(255)
    valid = depth_mm > 0
    depth = np.where(
        valid, depth_mm.astype(np.float32) * np.float32(_DEPTH_STEP), np.float32(np.nan)
    )
    scale = np.asarray(scale, dtype=np.float32)[..., None, None]
    shift = np.asarray(shift, dtype=np.float32)[..., None, None]
    gt = (scale * depth + shift).astype(np.float32)
    return rgb, depth.astype(np.float32), valid, gt


def _seed_tuple(seed: SeedLike) -> tuple[int, ...]:
    if isinstance(seed, (int, np.integer)):
        seeds: tuple = (seed,)
    elif isinstance(seed, (Sequence, np.ndarray)):
        seeds = tuple(seed)
    else:
        seeds = ()
    if not seeds or any(
        isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 0 for s in seeds
    ):
        raise ValueError(
            f"Invalid seed: we expect a non-negative int or a sequence of them. Got: {seed!r}."
        )
    return tuple(int(s) for s in seeds)


def _check_size(height: int, width: int) -> None:
    for name, n in (("height", height), ("width", width)):
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 8:
            raise ValueError(f"Invalid {name}: we expect an int >= 8. Got: {n!r}.")


def make_scene(seed: SeedLike, height: int = 64, width: int = 64) -> Scene:
    """Draw one procedural RGB-D scene, bit-for-bit determined by ``seed``.

    Args:
        seed: a non-negative int, or a sequence of them (the entropy of a
            ``numpy.random.SeedSequence``; :func:`make_split` uses ``(seed, stream, index)``).
        height: image height in pixels (>= 8); object sizes scale with the image.
        width: image width in pixels (>= 8).

    Returns:
        a :class:`Scene` with ``rgb (3, H, W)``, ``depth``, ``valid``, ``gt`` ``(H, W)``.

    Examples:
        >>> a, b = make_scene(3, 16, 24), make_scene(3, 16, 24)
        >>> bool(np.array_equal(a.rgb, b.rgb) and np.array_equal(a.valid, b.valid))
        True
    """
    seeds = _seed_tuple(seed)
    _check_size(height, width)
    rgb_u8, depth_mm, scale, shift = _render(seeds, height, width)
    rgb, depth, valid, gt = _decode(rgb_u8, depth_mm, scale, shift)
    return Scene(rgb, depth, valid, gt, float(np.float32(scale)), float(np.float32(shift)), seeds)


def make_split(
    n: int, seed: int, height: int = 64, width: int = 64, *, stream: int = 0
) -> dict[str, np.ndarray]:
    """Draw ``n`` scenes with seeds ``(seed, stream, i)``, stacked into arrays.

    Args:
        n: number of scenes.
        seed: base seed.
        height: image height in pixels.
        width: image width in pixels.
        stream: tells splits with the same base seed apart (the CLI uses 0 for train, 1 for test).

    Returns:
        dict with ``rgb (n, 3, H, W)`` float32, ``depth``, ``gt`` ``(n, H, W)`` float32 (NaN where
        invalid), ``valid (n, H, W)`` bool, ``scale``, ``shift`` ``(n,)`` float32 and
        ``scene_seed (n, 3)`` int64.
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"Invalid n: we expect an int >= 0. Got: {n!r}.")
    _check_size(height, width)
    seeds = np.array([(seed, stream, i) for i in range(n)], dtype=np.int64).reshape(n, 3)
    rendered = [_render(tuple(int(s) for s in row), height, width) for row in seeds]
    rgb_u8 = np.stack([r[0] for r in rendered]) if n else np.zeros((0, 3, height, width), np.uint8)
    depth_mm = np.stack([r[1] for r in rendered]) if n else np.zeros((0, height, width), np.uint16)
    scale = np.array([r[2] for r in rendered], dtype=np.float32)
    shift = np.array([r[3] for r in rendered], dtype=np.float32)
    return decode_split(
        {
            "rgb_u8": rgb_u8,
            "depth_mm": depth_mm,
            "scale": scale,
            "shift": shift,
            "scene_seed": seeds,
        }
    )


# --------------------------------------------------------------------------- storage


def encode_split(split: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The compact stored form of a split: ``rgb_u8``, ``depth_mm`` (uint16, 0 = invalid), ``scale``, ``shift``, ``scene_seed``.

    Raises:
        ValueError: if the arrays are not exactly representable (e.g. modified after drawing).
    """
    rgb_u8 = np.rint(np.asarray(split["rgb"], dtype=np.float64) * 255).astype(np.uint8)
    valid = np.asarray(split["valid"], dtype=bool)
    depth = np.where(valid, np.asarray(split["depth"], dtype=np.float64), 0.0)
    depth_mm = np.rint(depth / _DEPTH_STEP).astype(np.uint16)
    stored = {
        "rgb_u8": rgb_u8,
        "depth_mm": depth_mm,
        "scale": np.asarray(split["scale"], dtype="<f4"),
        "shift": np.asarray(split["shift"], dtype="<f4"),
        "scene_seed": np.asarray(split["scene_seed"], dtype="<i8"),
    }
    back = decode_split(stored)
    same = all(
        np.array_equal(back[key], np.asarray(split[key]), equal_nan=key in ("depth", "gt"))
        for key in ("rgb", "depth", "valid", "gt")
    )
    if not same:
        raise ValueError(
            "Invalid split: its arrays are not the quantised ones that make_split draws."
        )
    return stored


def decode_split(stored: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Inverse of :func:`encode_split`: float32 ``rgb``, ``depth``, ``gt``, bool ``valid``, ..."""
    rgb, depth, valid, gt = _decode(
        stored["rgb_u8"], stored["depth_mm"], stored["scale"], stored["shift"]
    )
    return {
        "rgb": rgb,
        "depth": depth,
        "valid": valid,
        "gt": gt,
        "scale": np.asarray(stored["scale"], dtype=np.float32),
        "shift": np.asarray(stored["shift"], dtype=np.float32),
        "scene_seed": np.asarray(stored["scene_seed"], dtype=np.int64),
    }


def arrays_sha256(arrays: Mapping[str, np.ndarray]) -> str:
    """SHA-256 over each array's name, dtype, shape and bytes, in sorted name order.

    Unlike the hash of an ``.npz`` file, this does not depend on zip timestamps or on the
    zlib version that compressed the file.
    """
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}\0{a.dtype.str}\0{a.shape}\0".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def save_split(path: str | Path, splits: Mapping[str, Mapping[str, np.ndarray]]) -> str:
    """Write splits (e.g. ``{"train": ..., "test": ...}``) to a compressed ``.npz``.

    Arrays are stored as ``{split}_{name}`` in their compact form (:func:`encode_split`).
    The zip entries carry a fixed timestamp, so the same arrays give the same file with a
    given zlib.

    Returns:
        :func:`arrays_sha256` of the stored arrays (equal to :func:`file_sha256` of ``path``).
    """
    stored = _stored_splits(splits)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name in sorted(stored):
            buffer = io.BytesIO()
            np.lib.format.write_array(
                buffer, np.ascontiguousarray(stored[name]), allow_pickle=False
            )
            info = zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_DATE)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            archive.writestr(info, buffer.getvalue(), compresslevel=9)
    return arrays_sha256(stored)


def _read_stored(path: str | Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as npz:
        return {name: npz[name] for name in npz.files}


def file_sha256(path: str | Path) -> str:
    """:func:`arrays_sha256` of the arrays stored in a split file (not of its bytes)."""
    return arrays_sha256(_read_stored(path))


def load_split(path: str | Path) -> dict[str, dict[str, np.ndarray]]:
    """Read a file written by :func:`save_split` with ``np.load(path, allow_pickle=False)``.

    Returns:
        ``{split: {"rgb", "depth", "valid", "gt", "scale", "shift", "scene_seed"}}``
        with the arrays of :func:`make_split`.
    """
    return _decode_stored(_read_stored(path))


def _stored_splits(splits: Mapping[str, Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """The arrays that :func:`save_split` writes for ``splits`` (``{split}_{name}``)."""
    return {
        f"{split}_{key}": value
        for split, arrays in splits.items()
        for key, value in encode_split(arrays).items()
    }


def _decode_stored(stored: Mapping[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
    names = sorted({key.split("_", 1)[0] for key in stored})
    return {
        split: decode_split(
            {k[len(split) + 1 :]: v for k, v in stored.items() if k.startswith(split + "_")}
        )
        for split in names
    }


def _check_sha256(stored: Mapping[str, np.ndarray], sha256: str, source: str) -> None:
    digest = arrays_sha256(stored)
    if digest != sha256:
        raise RuntimeError(
            f"The toy split from {source} has arrays sha256 {digest}, not the expected {sha256}. "
            "A regenerated split differs if NumPy draws other numbers (see data/README.md for "
            "the versions that made it); a file differs if it was modified."
        )


def draw_checked_split(
    train: int, test: int, size: int, seed: int, sha256: str
) -> dict[str, dict[str, np.ndarray]]:
    """Draw a train/test split as ``python -m hdn.toy.synthetic`` does and check its checksum.

    Args:
        train: number of training scenes (stream 0).
        test: number of test scenes (stream 1).
        size: image height and width.
        seed: base seed.
        sha256: expected :func:`arrays_sha256` of the arrays that :func:`save_split` would store.

    Returns:
        ``{"train": split, "test": split}`` as :func:`load_split` returns them.

    Raises:
        RuntimeError: if the drawn arrays do not have the checksum ``sha256``.
    """
    splits = {
        "train": make_split(train, seed, size, size, stream=0),
        "test": make_split(test, seed, size, size, stream=1),
    }
    _check_sha256(_stored_splits(splits), sha256, f"make_split(seed={seed})")
    return splits


def toy_split(path: str | Path | None = TOY_SPLIT_PATH) -> dict[str, dict[str, np.ndarray]]:
    """The committed toy split of notebook 05, in a clone or not, checked against its checksum.

    Reads ``path`` (by default ``data/toy_rgbd.npz`` of the repository) when it exists. Outside
    a clone (a wheel install, Colab) it draws the same 256 training and 64 test scenes again
    from their seeds (:data:`TOY_SPLIT_OPTIONS`; about 11 s on one CPU core), which is
    bit-for-bit reproducible. Either way the arrays must have the checksum
    :data:`TOY_SPLIT_SHA256`.

    Args:
        path: split file to read if it exists; None = always draw the split.

    Returns:
        ``{"test": split, "train": split}`` as :func:`load_split` returns them, in the same
        (sorted) order whether read or drawn, so that code iterating over it prints the same.

    Raises:
        RuntimeError: if the file or the drawn split does not have the expected checksum.
    """
    if path is not None and Path(path).exists():
        stored = _read_stored(path)
        _check_sha256(stored, TOY_SPLIT_SHA256, str(path))
        splits = _decode_stored(stored)
    else:
        splits = draw_checked_split(**TOY_SPLIT_OPTIONS, sha256=TOY_SPLIT_SHA256)
    return {name: splits[name] for name in sorted(splits)}


# --------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> str:
    """``python -m hdn.toy.synthetic --out data/toy_rgbd.npz --train 256 --test 64 --size 64 --seed 0``."""
    parser = argparse.ArgumentParser(
        prog="python -m hdn.toy.synthetic", description="Write a synthetic RGB-D train/test split."
    )
    parser.add_argument("--out", required=True, help="output .npz path")
    parser.add_argument("--train", type=int, default=256, help="number of training scenes")
    parser.add_argument("--test", type=int, default=64, help="number of test scenes")
    parser.add_argument("--size", type=int, default=64, help="image height and width")
    parser.add_argument(
        "--seed", type=int, default=0, help="base seed (train: stream 0, test: stream 1)"
    )
    args = parser.parse_args(argv)
    start = time.perf_counter()
    splits = {
        "train": make_split(args.train, args.seed, args.size, args.size, stream=0),
        "test": make_split(args.test, args.seed, args.size, args.size, stream=1),
    }
    digest = save_split(args.out, splits)
    seconds = time.perf_counter() - start
    size = Path(args.out).stat().st_size
    print(f"wrote {args.out} ({size / 1e6:.2f} MB) in {seconds:.1f} s")
    print(f"arrays sha256: {digest}")
    return digest


if __name__ == "__main__":
    main()
