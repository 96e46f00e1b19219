"""Depth scenes for the workbook: a real Middlebury stereo scene and a synthetic near/far one.

Nothing here touches the network: the Middlebury scene ships inside scikit-image, and the
synthetic scene is drawn from a seeded ``torch.Generator``.
"""

from __future__ import annotations

import functools
import math
import numbers
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "MotorcycleScene",
    "NearFarScene",
    "blurred",
    "middlebury_motorcycle",
    "near_far_scene",
]

# Calibration of scikit-image's 4x down-sampled copy of Middlebury 2014 "Motorcycle"
# (from the docstring of skimage.data.stereo_motorcycle).
_FOCAL_PX = 994.978
_BASELINE_M = 0.193001
_DOFFS_PX = 31.086
_CX_PX = 311.193
_CY_PX = 254.877

# The near object of near_far_scene lies closer than this, the background farther.
_NEAR_FAR_SPLIT_M = 5.0


@dataclass(frozen=True, eq=False)
class MotorcycleScene:
    """The Middlebury 2014 "Motorcycle" scene: left image, ground-truth depth and disparity.

    Attributes:
        image: left RGB image, ``(3, H, W)``, values in ``[0, 1]``.
        depth: depth along the optical axis in metres, ``(H, W)``; NaN where ``~valid``.
        disparity: disparity in pixels of this image, ``(H, W)``; NaN where ``~valid``.
        valid: ``(H, W)`` bool, True where the ground truth is known and the depth positive.
        focal_px: focal length in pixels.
        baseline_m: stereo baseline in metres.
        doffs_px: x-difference of the two principal points in pixels, so that
            ``depth = baseline_m * focal_px / (disparity + doffs_px)``.
        cx_px: principal point x in pixels.
        cy_px: principal point y in pixels.
    """

    image: Tensor
    depth: Tensor
    disparity: Tensor
    valid: Tensor
    focal_px: float = _FOCAL_PX
    baseline_m: float = _BASELINE_M
    doffs_px: float = _DOFFS_PX
    cx_px: float = _CX_PX
    cy_px: float = _CY_PX


class NearFarScene(NamedTuple):
    """A synthetic depth map and its validity mask (unpacks as ``depth, valid``).

    Attributes:
        depth: ``(H, W)`` depth in metres (finite everywhere, also where invalid).
        valid: ``(H, W)`` bool, False on the pixels marked invalid.
    """

    depth: Tensor
    valid: Tensor


def _check_dtype(dtype: torch.dtype) -> None:
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"Invalid dtype: we expect a floating-point torch.dtype. Got: {dtype!r}.")


def _check_int(value: int, name: str, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"Invalid {name}: we expect an integer >= {minimum}. Got: {value!r}.")


@functools.lru_cache(maxsize=1)
def _motorcycle_arrays() -> tuple[np.ndarray, np.ndarray]:
    from skimage.data import stereo_motorcycle  # the files ship inside scikit-image

    left, _, disparity = stereo_motorcycle()
    left.flags.writeable = False
    disparity.flags.writeable = False
    return left, disparity


def middlebury_motorcycle(
    device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
) -> MotorcycleScene:
    """Load the Middlebury 2014 "Motorcycle" scene with metric ground-truth depth.

    The scene is the copy bundled with scikit-image (``skimage.data.stereo_motorcycle``):
    the left image and its ground-truth disparity, down-sampled 4x to 500 x 741. Depth
    follows from the calibration of that copy (focal length f = 994.978 px, baseline
    B = 193.001 mm, principal-point offset d_offs = 31.086 px):

    .. math::

        Z = \\frac{B f}{d + d_{offs}}

    Valid depths lie between about 2.1 m and 5.0 m; about 93% of the pixels are valid.
    Pixels without ground truth (scikit-image marks them with ``inf``) are NaN in both
    ``depth`` and ``disparity`` and False in ``valid``.

    Reference: D. Scharstein, H. Hirschmueller, Y. Kitajima, G. Krathwohl, N. Nesic,
    X. Wang and P. Westling, "High-Resolution Stereo Datasets with Subpixel-Accurate
    Ground Truth", GCPR 2014.

    Args:
        device: where the tensors go; ``None`` for the CPU.
        dtype: floating-point dtype of ``image``, ``depth`` and ``disparity``.

    Returns:
        A :class:`MotorcycleScene`: ``image`` ``(3, 500, 741)``, ``depth``, ``disparity``
        and ``valid`` ``(500, 741)``, and the calibration constants.

    Examples:
        >>> scene = middlebury_motorcycle()
        >>> scene.image.shape, scene.depth.shape
        (torch.Size([3, 500, 741]), torch.Size([500, 741]))
        >>> round(scene.valid.float().mean().item(), 2)
        0.93
        >>> d = scene.depth[scene.valid]
        >>> round(d.min().item(), 1), round(d.max().item(), 1)
        (2.1, 5.0)
    """
    _check_dtype(dtype)
    left, disparity = _motorcycle_arrays()
    disparity = disparity.astype(np.float64)
    valid = np.isfinite(disparity) & (disparity + _DOFFS_PX > 0)
    disparity = np.where(valid, disparity, np.nan)
    with np.errstate(invalid="ignore"):
        depth = _BASELINE_M * _FOCAL_PX / (disparity + _DOFFS_PX)
    image = np.ascontiguousarray(left.transpose(2, 0, 1)).astype(np.float64) / 255.0

    def as_tensor(a: np.ndarray, dt: torch.dtype) -> Tensor:
        return torch.from_numpy(a).to(device=device, dtype=dt)

    return MotorcycleScene(
        image=as_tensor(image, dtype),
        depth=as_tensor(depth, dtype),
        disparity=as_tensor(disparity, dtype),
        valid=as_tensor(valid, torch.bool),
    )


def near_far_scene(
    height: int = 96,
    width: int = 128,
    seed: int = 0,
    *,
    hole_fraction: float = 0.0,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> NearFarScene:
    """A synthetic depth map with a finely relieved near object before a far slanted plane.

    It isolates one effect: a global scale/shift normalisation is dominated by the 20-50 m
    background, so errors of a few centimetres on the near object barely register, while
    a local (hierarchical) normalisation sees them. The scene, drawn from ``seed``, holds

    - a background plane (in 3D) whose depth runs from about 20 m to about 50 m across the
      image in a random direction (inverse depth is linear in the pixel coordinates);
    - a near object, an ellipse at 1.2-1.8 m covering a fifth to a quarter of the image, whose
      surface carries fine relief: four terraces 1.5 cm apart and six Gaussian bumps
      2-4 cm high, all towards the camera.

    Every pixel of the object is nearer than 5 m and every background pixel farther than
    20 m, so ``depth < 5`` is the object's mask.

    Args:
        height: image height H in pixels, at least 16.
        width: image width W in pixels, at least 16.
        seed: seed of the ``torch.Generator``; equal seeds give identical scenes.
        hole_fraction: fraction in ``[0, 1)`` of pixels, drawn at random, to mark invalid.
            ``depth`` keeps its (finite) value there, so blurring never meets NaN.
        device: where the tensors go; ``None`` for the CPU.
        dtype: floating-point dtype of ``depth``.

    Returns:
        A :class:`NearFarScene` ``(depth, valid)``: ``depth`` ``(H, W)`` in metres and
        ``valid`` ``(H, W)`` bool (all True when ``hole_fraction`` is 0).

    Examples:
        >>> depth, valid = near_far_scene(96, 128, seed=0)
        >>> depth.shape, depth.dtype, bool(valid.all())
        (torch.Size([96, 128]), torch.float32, True)
        >>> near = depth < 5  # the object; the background lies at 20-50 m
        >>> 0.1 < near.float().mean().item() < 0.35
        True
    """
    _check_int(height, "height", 16)
    _check_int(width, "width", 16)
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise ValueError(f"Invalid seed: we expect an integer. Got: {seed!r}.")
    if not isinstance(hole_fraction, numbers.Real) or not 0.0 <= hole_fraction < 1.0:
        raise ValueError(
            f"Invalid hole_fraction: we expect a number in [0, 1). Got: {hole_fraction!r}."
        )
    _check_dtype(dtype)

    gen = torch.Generator().manual_seed(int(seed))

    def uniform(lo: float, hi: float) -> float:
        return lo + (hi - lo) * torch.rand((), generator=gen, dtype=torch.float64).item()

    f64 = {"dtype": torch.float64}
    y = torch.arange(height, **f64)[:, None].expand(height, width)
    x = torch.arange(width, **f64)[None, :].expand(height, width)

    # Background: a plane, so inverse depth is linear in (x, y); it spans [1/far, 1/near].
    angle = uniform(0.0, 2.0 * math.pi)
    ramp = math.cos(angle) * x / width + math.sin(angle) * y / height
    ramp = (ramp - ramp.min()) / (ramp.max() - ramp.min())
    far, near = uniform(40.0, 50.0), uniform(20.0, 25.0)
    depth = 1.0 / (1.0 / far + ramp * (1.0 / near - 1.0 / far))

    # Near object: an ellipse around the centre.
    cy, cx = height * uniform(0.4, 0.6), width * uniform(0.4, 0.6)
    ry, rx = height * uniform(0.25, 0.3), width * uniform(0.25, 0.3)
    inside = ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 <= 1.0

    # Relief towards the camera: terraces across the object, plus Gaussian bumps.
    terrace = ((x - (cx - rx)) / (2.0 * rx) * 4.0).floor().clamp(0.0, 3.0) * 0.015
    bumps = torch.zeros(height, width, **f64)
    side = min(height, width)
    for _ in range(6):
        by, bx = cy + ry * uniform(-0.6, 0.6), cx + rx * uniform(-0.6, 0.6)
        sigma = max(1.0, side * uniform(0.02, 0.04))
        bumps += uniform(0.02, 0.04) * torch.exp(
            -((y - by) ** 2 + (x - bx) ** 2) / (2.0 * sigma**2)
        )
    object_depth = uniform(1.2, 1.8) - terrace - bumps
    depth = torch.where(inside, object_depth, depth)

    valid = torch.rand(height, width, generator=gen, **f64) >= hole_fraction
    return NearFarScene(depth=depth.to(device=device, dtype=dtype), valid=valid.to(device=device))


def blurred(depth: Tensor, sigma: float) -> Tensor:
    """Gaussian-blur a depth map: a stand-in for a prediction that lost its fine detail.

    The separable kernel :math:`k(i) \\propto \\exp(-i^2 / 2\\sigma^2)`, for
    :math:`|i| \\le \\lceil 3\\sigma \\rceil`, is normalised to sum to 1, so constant maps
    stay constant. Borders are padded by reflection; on an axis shorter than the kernel the
    kernel is cut to the axis length (and renormalised). Non-finite values spread to their
    neighbours: fill invalid pixels first. Gradients flow to ``depth``.

    Args:
        depth: depth map, ``(..., H, W)``, floating point.
        sigma: standard deviation of the Gaussian in pixels, ``>= 0``; 0 returns a copy.

    Returns:
        The blurred map, same shape, dtype and device as ``depth``, computed in float64 and
        rounded to ``depth``'s dtype (the same on every machine).

    Examples:
        >>> depth, _ = near_far_scene(seed=0)
        >>> smooth = blurred(depth, sigma=2.0)
        >>> smooth.shape
        torch.Size([96, 128])
        >>> flat = torch.full((1, 1, 8, 8), 3.0)
        >>> torch.allclose(blurred(flat, 1.5), flat)
        True
    """
    if not isinstance(depth, Tensor):
        raise ValueError(f"Invalid depth: expected a torch.Tensor, got {type(depth).__name__}.")
    if depth.dim() < 2:
        raise ValueError(f"Invalid depth shape: we expect (..., H, W). Got: {tuple(depth.shape)}.")
    if not depth.is_floating_point():
        raise ValueError(f"Invalid depth dtype: we expect floating point. Got: {depth.dtype}.")
    if (
        isinstance(sigma, bool)
        or not isinstance(sigma, numbers.Real)
        or not math.isfinite(sigma)
        or sigma < 0
    ):
        raise ValueError(f"Invalid sigma: we expect a finite number >= 0. Got: {sigma!r}.")
    if sigma == 0 or depth.numel() == 0:
        return depth.clone()

    height, width = depth.shape[-2:]
    # In float64, whatever the input's precision: float32 convolutions take different kernels
    # (and summation orders) on different CPUs, so a float32 result would differ in its last
    # bits from machine to machine; rounded from float64 it is the same everywhere.
    work = torch.float64
    out = depth.to(work).reshape(-1, 1, height, width)
    radius = math.ceil(3.0 * sigma)
    for axis, size in ((-1, width), (-2, height)):
        r = min(radius, size - 1)
        if r == 0:
            continue
        offsets = torch.arange(-r, r + 1, dtype=work, device=depth.device)
        kernel = torch.exp(-(offsets**2) / (2.0 * float(sigma) ** 2))
        kernel = kernel / kernel.sum()
        if axis == -1:
            out = F.conv2d(F.pad(out, (r, r, 0, 0), mode="reflect"), kernel.view(1, 1, 1, -1))
        else:
            out = F.conv2d(F.pad(out, (0, 0, r, r), mode="reflect"), kernel.view(1, 1, -1, 1))
    return out.reshape(depth.shape).to(depth.dtype)
