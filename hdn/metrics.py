r"""Zero-shot depth evaluation metrics: AbsRel, delta accuracy, RMSE and two fine-detail errors.

The protocol of MiDaS and HDN: align the prediction to the ground truth by a per-image
least-squares scale and shift (in depth or in inverse depth, chosen explicitly), then
compare the aligned depth :math:`\hat d` with the ground-truth depth :math:`d` on the
valid pixels. :func:`abs_rel`, :func:`delta_accuracy` and :func:`rmse` take depth that
is already aligned; :func:`zero_shot_metrics` runs the whole protocol.
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

import torch
from torch import Tensor

from hdn.alignment import _flatten_inputs, _scale_and_shift

__all__ = [
    "abs_rel",
    "delta_accuracy",
    "fine_detail_error",
    "relief_error",
    "relief_maps",
    "rmse",
    "zero_shot_metrics",
]

_SPACES = ("depth", "inverse_depth")

# Default lower bound on an aligned inverse depth before it is inverted back to depth
# (depths are thereby capped at 1e6 units); ``depth_cap`` replaces it by 1 / depth_cap.
_MIN_INVERSE_DEPTH = 1e-6


def _metric_inputs(
    pred: Tensor, target: Tensor, mask: Tensor | None
) -> tuple[Tensor, Tensor, Tensor]:
    """Flatten and check the inputs; valid = mask & finite target & target > 0."""
    p, g, valid = _flatten_inputs(pred, target, mask)
    return p, g, valid & (g > 0)


def _check_space(space: object) -> str:
    if space is None:
        raise ValueError(
            "Missing space: pass space='depth' or space='inverse_depth' explicitly "
            "(the space in which the prediction is aligned to the ground truth)."
        )
    if space not in _SPACES:
        raise ValueError(f"Invalid space, we expect one of {_SPACES}. Got: {space!r}")
    return str(space)


def _check_depth_cap(depth_cap: float | None) -> float:
    """Return the lower bound for aligned inverse depth implied by ``depth_cap``."""
    if depth_cap is None:
        return _MIN_INVERSE_DEPTH
    is_number = isinstance(depth_cap, (int, float)) and not isinstance(depth_cap, bool)
    if not (is_number and math.isfinite(depth_cap) and depth_cap > 0):
        raise ValueError(
            f"Invalid depth_cap, we expect a positive finite number or None. Got: {depth_cap!r}"
        )
    return 1.0 / float(depth_cap)


def _align_depth(
    p: Tensor, g: Tensor, valid: Tensor, space: str, min_inverse_depth: float
) -> Tensor:
    """Least-squares align ``p`` (B, N) to depth ``g`` over ``valid``; return depth."""
    if space == "depth":
        scale, shift = _scale_and_shift(p, g, valid)
        return scale[:, None] * p + shift[:, None]
    inverse_g = 1.0 / torch.where(valid, g, 1.0)
    scale, shift = _scale_and_shift(p, inverse_g, valid)
    inverse_hat = (scale[:, None] * p + shift[:, None]).clamp(min=min_inverse_depth)
    return 1.0 / inverse_hat


def _safe(d_hat: Tensor, d: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
    """Replace invalid entries by 1 so that no NaN/inf reaches the forward or backward."""
    return torch.where(valid, d_hat, 1.0), torch.where(valid, d, 1.0)


def _pooled_mean(values: Tensor, valid: Tensor) -> Tensor:
    """Mean of ``values`` over all valid entries of the batch (NaN if there is none)."""
    return torch.where(valid, values, 0.0).sum() / valid.sum()


def _abs_rel(d_hat: Tensor, d: Tensor, valid: Tensor) -> Tensor:
    d_hat, d = _safe(d_hat, d, valid)
    return _pooled_mean((d_hat - d).abs() / d, valid)


def _delta(d_hat: Tensor, d: Tensor, valid: Tensor, k: float) -> Tensor:
    d_hat, d = _safe(d_hat, d, valid)
    positive = d_hat > 0
    d_hat_pos = torch.where(positive, d_hat, 1.0)
    ratio = torch.maximum(d_hat_pos / d, d / d_hat_pos)
    hit = positive & (ratio < 1.25**k)
    return _pooled_mean(hit.to(d.dtype), valid)


def _rmse(d_hat: Tensor, d: Tensor, valid: Tensor) -> Tensor:
    d_hat, d = _safe(d_hat, d, valid)
    return _pooled_mean((d_hat - d) ** 2, valid).sqrt()


def abs_rel(pred: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor:
    r"""Compute the absolute relative error of an already aligned depth map.

    .. math::

        \text{AbsRel} = \frac{1}{|V|} \sum_{i \in V} \frac{|\hat d_i - d_i|}{d_i}

    The mean runs over all valid pixels of the whole batch pooled together (not a mean
    of per-image means), where a pixel is valid if ``mask`` is True, the target is
    finite and the target is > 0. No alignment is done here; see
    :func:`zero_shot_metrics` for the full protocol.

    Args:
        pred: aligned predicted depth :math:`\hat d`, shape :math:`(B, 1, H, W)` or
            :math:`(B, H, W)`.
        target: ground-truth depth :math:`d`, same shape as ``pred``.
        mask: bool validity mask, same shape as ``pred``, or None.

    Returns:
        0-dim tensor (float32, or float64 for float64 inputs); NaN if no pixel is valid.

    Examples:
        >>> d = torch.tensor([[[1.0, 2.0, 4.0]]])
        >>> d_hat = torch.tensor([[[1.0, 3.0, 4.0]]])
        >>> abs_rel(d_hat, d)
        tensor(0.1667)
    """
    p, g, valid = _metric_inputs(pred, target, mask)
    return _abs_rel(p, g, valid)


def delta_accuracy(
    pred: Tensor, target: Tensor, mask: Tensor | None = None, k: float = 1
) -> Tensor:
    r"""Compute the threshold accuracy :math:`\delta_k` of an already aligned depth map.

    .. math::

        \delta_k = \frac{1}{|V|} \left|\left\{ i \in V :
        \max\left(\frac{\hat d_i}{d_i}, \frac{d_i}{\hat d_i}\right) < 1.25^k \right\}\right|

    The fraction is taken over all valid pixels of the whole batch pooled together
    (mask True, target finite and > 0). A non-positive prediction never counts as a hit.

    Args:
        pred: aligned predicted depth :math:`\hat d`, shape :math:`(B, 1, H, W)` or
            :math:`(B, H, W)`.
        target: ground-truth depth :math:`d`, same shape as ``pred``.
        mask: bool validity mask, same shape as ``pred``, or None.
        k: the exponent of the threshold :math:`1.25^k` (usually 1, 2 or 3), > 0.

    Returns:
        0-dim tensor in [0, 1] (float32, or float64 for float64 inputs); NaN if no
        pixel is valid.

    Examples:
        >>> d = torch.tensor([[[1.0, 2.0, 4.0]]])
        >>> d_hat = torch.tensor([[[1.0, 3.0, 4.0]]])
        >>> delta_accuracy(d_hat, d, k=1), delta_accuracy(d_hat, d, k=2)
        (tensor(0.6667), tensor(1.))
    """
    if isinstance(k, bool) or not isinstance(k, (int, float)) or not k > 0:
        raise ValueError(f"Invalid k, we expect a positive number. Got: {k!r}")
    p, g, valid = _metric_inputs(pred, target, mask)
    return _delta(p, g, valid, float(k))


def rmse(pred: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor:
    r"""Compute the root mean squared error of an already aligned depth map.

    .. math::

        \text{RMSE} = \sqrt{\frac{1}{|V|} \sum_{i \in V} (\hat d_i - d_i)^2}

    The mean runs over all valid pixels of the whole batch pooled together (mask True,
    target finite and > 0). The result is in the units of ``target``.

    Args:
        pred: aligned predicted depth :math:`\hat d`, shape :math:`(B, 1, H, W)` or
            :math:`(B, H, W)`.
        target: ground-truth depth :math:`d`, same shape as ``pred``.
        mask: bool validity mask, same shape as ``pred``, or None.

    Returns:
        0-dim tensor (float32, or float64 for float64 inputs); NaN if no pixel is valid.

    Examples:
        >>> d = torch.tensor([[[1.0, 2.0, 4.0]]])
        >>> d_hat = torch.tensor([[[1.0, 3.0, 4.0]]])
        >>> rmse(d_hat, d)  # sqrt(1 / 3)
        tensor(0.5774)
    """
    p, g, valid = _metric_inputs(pred, target, mask)
    return _rmse(p, g, valid)


def zero_shot_metrics(
    pred: Tensor,
    target: Tensor,
    mask: Tensor | None = None,
    *,
    space: Literal["depth", "inverse_depth"] | None = None,
    depth_cap: float | None = None,
) -> dict[str, float]:
    r"""Evaluate a relative-depth prediction against ground-truth depth after alignment.

    The prediction is first aligned per image by least squares
    (:func:`hdn.alignment.align_least_squares`) over the valid pixels, in the space
    named by ``space``:

    - ``"depth"``: ``pred`` is taken as (affine) depth and
      :math:`\hat d = s\,p + t` with :math:`(s, t)` fitted to :math:`d`;
    - ``"inverse_depth"``: ``pred`` is taken as (affine) inverse depth / disparity;
      :math:`(s, t)` is fitted to :math:`1/d`, and the aligned inverse depth is
      clamped to a small positive minimum before inversion,
      :math:`\hat d = 1 / \max(s\,p + t, \epsilon)`, so that the division is finite.
      :math:`\epsilon = 1/\text{depth\_cap}` if ``depth_cap`` is given (the MiDaS
      protocol caps depth at the dataset's maximum, e.g. 10 m for NYUv2, 80 m for
      KITTI), else :math:`\epsilon = 10^{-6}` (depth capped at :math:`10^6` units).

    Then, over the valid pixels of the whole batch pooled together,

    .. math::

        \text{AbsRel} = \operatorname{mean} \frac{|\hat d - d|}{d},

        \delta_k = \operatorname{mean}\left[\max\left(\frac{\hat d}{d},
        \frac{d}{\hat d}\right) < 1.25^k\right],

        \text{RMSE} = \sqrt{\operatorname{mean}(\hat d - d)^2}.

    A pixel is valid if ``mask`` is True, the target is finite and the target is > 0;
    the same pixels are used for the alignment and for the metrics. An image with a
    singular alignment (fewer than 2 valid pixels, constant prediction) is aligned to
    the constant mean of its valid targets. Runs without gradient.

    Args:
        pred: the prediction (depth or inverse depth, up to scale and shift), shape
            :math:`(B, 1, H, W)` or :math:`(B, H, W)`.
        target: ground-truth depth, same shape as ``pred``.
        mask: bool validity mask, same shape as ``pred``, or None.
        space: ``"depth"`` or ``"inverse_depth"``; keyword-only and required, since the
            two protocols give different numbers.
        depth_cap: optional maximum depth for the ``"inverse_depth"`` clamp (ignored
            for ``"depth"``).

    Returns:
        dict with float values under the keys ``"abs_rel"``, ``"delta1"``,
        ``"delta2"``, ``"delta3"`` and ``"rmse"`` (NaN if no pixel is valid).

    Examples:
        >>> d = torch.tensor([[[1.0, 2.0, 4.0, 8.0]]])
        >>> metrics = zero_shot_metrics(3.0 * d + 1.0, d, space="depth")
        >>> {name: round(value, 4) for name, value in metrics.items()}
        {'abs_rel': 0.0, 'delta1': 1.0, 'delta2': 1.0, 'delta3': 1.0, 'rmse': 0.0}
        >>> metrics = zero_shot_metrics(2.0 / d + 0.5, d, space="inverse_depth")
        >>> round(metrics["abs_rel"], 4)
        0.0
    """
    space = _check_space(space)
    min_inverse_depth = _check_depth_cap(depth_cap)
    with torch.no_grad():
        p, g, valid = _metric_inputs(pred, target, mask)
        d_hat = _align_depth(p, g, valid, space, min_inverse_depth)
        values = {
            "abs_rel": _abs_rel(d_hat, g, valid),
            "delta1": _delta(d_hat, g, valid, 1.0),
            "delta2": _delta(d_hat, g, valid, 2.0),
            "delta3": _delta(d_hat, g, valid, 3.0),
            "rmse": _rmse(d_hat, g, valid),
        }
    return {name: float(value) for name, value in values.items()}


def _nearest_pixels(g: Tensor, valid: Tensor, near_fraction: float) -> tuple[Tensor, Tensor]:
    """Mark the ``ceil(near_fraction * n)`` valid pixels of smallest ``g`` in each row.

    Returns the ``(B, N)`` bool near mask and the ``(B,)`` number of near pixels. Ties
    are broken by pixel index (stable sort), so the count is exact.
    """
    n = valid.sum(dim=1)
    # The small offset keeps e.g. 0.1 * 30 = 3.0000000000000004 from rounding up to 4.
    m = torch.ceil(n.to(torch.float64) * near_fraction - 1e-9).clamp(min=0).to(n.dtype)
    m = torch.minimum(m, n)
    keys = torch.where(valid, g, torch.inf)
    order = torch.argsort(keys, dim=1, stable=True)
    ranks = torch.arange(g.shape[1], device=g.device)
    near_sorted = ranks[None, :] < m[:, None]
    near = torch.zeros_like(valid).scatter(1, order, near_sorted)
    return near, m


def fine_detail_error(
    pred: Tensor,
    target: Tensor,
    mask: Tensor | None = None,
    *,
    near_fraction: float = 0.25,
    space: Literal["depth", "inverse_depth"] = "depth",
    depth_cap: float | None = None,
) -> Tensor:
    r"""Measure how well the relief of the nearest part of the scene is reproduced.

    For each image, let :math:`N` be the :math:`m = \lceil f\,n \rceil` valid pixels
    with the smallest ground-truth depth (:math:`n` valid pixels, :math:`f` =
    ``near_fraction``; ties broken by pixel index). The prediction is aligned to the
    ground truth by least squares **on** :math:`N` **only** (a local alignment, in
    ``space`` as in :func:`zero_shot_metrics`), and the error is the AbsRel there:

    .. math::

        E = \frac{1}{|I|} \sum_{b \in I} \frac{1}{m_b} \sum_{i \in N_b}
        \frac{|\hat d^{N}_i - d_i|}{d_i},

        \hat d^{N} = s_N\,p + t_N,\;
        (s_N, t_N) = \arg\min_{s,t} \sum_{i \in N} (s\,p_i + t - d_i)^2,

    where :math:`I` is the set of images with :math:`m_b \ge 2` (each image weighs
    equally, unlike the pooled :func:`abs_rel`).

    Why: with image-level alignment the least-squares fit is dominated by the far
    range, whose depth values and errors are largest, so a prediction that flattens
    or distorts the nearby relief (object edges, small structures close to the camera,
    where HDN claims its gain) is barely penalised, while an error in the far range
    spoils every metric. Aligning on the near region alone asks a sharper question:
    up to its own scale and shift, is the near relief right? A prediction exact on
    the near region scores 0 whatever it does further away; a blurred near relief
    scores > 0.

    A pixel is valid if ``mask`` is True, the target is finite and the target is > 0.
    The result is differentiable with respect to ``pred``.

    Args:
        pred: the prediction (depth or inverse depth, up to scale and shift), shape
            :math:`(B, 1, H, W)` or :math:`(B, H, W)`.
        target: ground-truth depth, same shape as ``pred``.
        mask: bool validity mask, same shape as ``pred``, or None.
        near_fraction: the fraction :math:`f \in (0, 1]` of valid pixels, nearest
            first, that forms the near region.
        space: ``"depth"`` or ``"inverse_depth"``: the space of ``pred`` and of the
            alignment (inverse depth is clamped as in :func:`zero_shot_metrics`).
        depth_cap: optional maximum depth for the ``"inverse_depth"`` clamp.

    Returns:
        0-dim tensor (float32, or float64 for float64 inputs); NaN if no image has at
        least 2 near pixels.

    Examples:
        >>> d = torch.tensor([[[1.0, 1.5, 1.2, 1.1, 5.0, 6.0, 7.0, 8.0]]])
        >>> wrong_far = torch.tensor([[[1.0, 1.5, 1.2, 1.1, 9.0, 0.0, 3.0, 9.0]]])
        >>> round(float(fine_detail_error(2.0 * wrong_far + 1.0, d, near_fraction=0.5)), 4)
        0.0
        >>> flat_near = torch.tensor([[[1.2, 1.2, 1.2, 1.2, 5.0, 6.0, 7.0, 8.0]]])
        >>> fine_detail_error(flat_near, d, near_fraction=0.5) > 0
        tensor(True)
    """
    space = _check_space(space)
    min_inverse_depth = _check_depth_cap(depth_cap)
    if (
        isinstance(near_fraction, bool)
        or not isinstance(near_fraction, (int, float))
        or not 0 < near_fraction <= 1
    ):
        raise ValueError(
            f"Invalid near_fraction, we expect a number in (0, 1]. Got: {near_fraction!r}"
        )
    p, g, valid = _metric_inputs(pred, target, mask)
    near, m = _nearest_pixels(g, valid, float(near_fraction))
    d_hat = _align_depth(p, g, near, space, min_inverse_depth)
    d_hat, d = _safe(d_hat, g, near)
    per_image = torch.where(near, (d_hat - d).abs() / d, 0.0).sum(dim=1)
    per_image = per_image / m.clamp(min=1).to(per_image.dtype)
    used = m >= 2
    return torch.where(used, per_image, 0.0).sum() / used.sum()


# --------------------------------------------------------------------------- relief error


def _components(near: Tensor) -> Tensor:
    """4-connected components of a bool ``(B, H, W)`` map: labels ``0..`` per image, -1 outside.

    Label propagation: every pixel of ``near`` starts with its own index and repeatedly takes
    the largest index among its 4-neighbours in ``near`` until nothing changes.
    """
    B, H, W = near.shape
    index = torch.arange(1, H * W + 1, device=near.device).view(1, H, W).expand(B, H, W)
    lab = torch.where(near, index, 0)
    while True:
        padded = torch.nn.functional.pad(lab, (1, 1, 1, 1))
        neighbours = torch.stack(
            [lab, padded[:, :-2, 1:-1], padded[:, 2:, 1:-1], padded[:, 1:-1, :-2], padded[:, 1:-1, 2:]]
        )
        new = torch.where(near, neighbours.amax(dim=0), 0)
        if torch.equal(new, lab):
            break
        lab = new
    out = torch.full_like(lab, -1)
    for b in range(B):
        ids = lab[b][lab[b] > 0]
        if ids.numel():
            _, compact = torch.unique(ids, return_inverse=True)
            out[b][lab[b] > 0] = compact
    return out


def _erode_labels(labels: Tensor, radius: int) -> Tensor:
    """Keep a labelled pixel only if its whole ``(2 radius + 1)^2`` window carries the same label."""
    if radius == 0:
        return labels
    k = 2 * radius + 1
    padded = torch.nn.functional.pad(labels[:, None].double(), (radius,) * 4, value=-1.0)
    high = torch.nn.functional.max_pool2d(padded, k, stride=1)[:, 0]
    low = -torch.nn.functional.max_pool2d(-padded, k, stride=1)[:, 0]
    keep = (high == low) & (labels >= 0)
    return torch.where(keep, labels, -1)


def _gaussian_kernel(sigma: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    radius = max(1, math.ceil(3 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=dtype, device=device)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    return kernel / kernel.sum()


def _blur_within(x: Tensor, region: Tensor, sigma: float) -> Tensor:
    """Normalised Gaussian blur of ``x`` ``(K, H, W)`` using the pixels of ``region`` only."""
    kernel = _gaussian_kernel(sigma, x.dtype, x.device)
    r = (kernel.numel() - 1) // 2

    def blur(y: Tensor) -> Tensor:
        y = y[:, None]
        y = torch.nn.functional.conv2d(y, kernel.view(1, 1, 1, -1), padding=(0, r))
        y = torch.nn.functional.conv2d(y, kernel.view(1, 1, -1, 1), padding=(r, 0))
        return y[:, 0]

    weight = region.to(x.dtype)
    num = blur(torch.where(region, x, 0.0))
    den = blur(weight).clamp(min=torch.finfo(x.dtype).tiny)
    return num / den


def _detrend(x: Tensor, region: Tensor) -> Tensor:
    """``x`` minus its least-squares plane ``a + b u + c v`` over ``region``, per map ``(K, H, W)``."""
    _, H, W = x.shape
    v, u = torch.meshgrid(
        torch.arange(H, dtype=x.dtype, device=x.device),
        torch.arange(W, dtype=x.dtype, device=x.device),
        indexing="ij",
    )
    basis = torch.stack([torch.ones_like(u), u - (W - 1) / 2, v - (H - 1) / 2])  # (3, H, W)
    w = region.to(x.dtype)
    gram = torch.einsum("khw,ahw,bhw->kab", w, basis, basis)
    rhs = torch.einsum("khw,ahw->ka", w * x, basis)
    gram = gram + 1e-9 * torch.eye(3, dtype=x.dtype, device=x.device)
    coef = torch.linalg.solve(gram, rhs)
    return x - torch.einsum("ka,ahw->khw", coef, basis)


def _high_pass(y: Tensor, region: Tensor, sigma: float) -> Tensor:
    """``h = y - G_sigma *_region y`` for ``y``, a map already detrended over ``region``."""
    return torch.where(region, y - _blur_within(y, region, sigma), 0.0)


class _ReliefTerms(NamedTuple):
    """Per object ``k`` of :func:`_relief_terms`: its image ``owner[k]``, interior ``region[k]``
    ``(H, W)``, scale ``scale[k]``, high-passed prediction ``hp[k]`` and target ``hg[k]``,
    error ``error[k]`` and whether it has relief; ``owner`` is None when there is no object."""

    batch: int
    shape: tuple[int, int]
    device: torch.device
    owner: Tensor | None = None
    region: Tensor | None = None
    scale: Tensor | None = None
    hp: Tensor | None = None
    hg: Tensor | None = None
    error: Tensor | None = None
    has_relief: Tensor | None = None


def _relief_terms(pred, target, near, mask, sigma, erode, min_pixels, align) -> _ReliefTerms:
    """The checked inputs of :func:`relief_error` and its per-object terms (float64)."""
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not sigma > 0:
        raise ValueError(f"Invalid sigma: we expect a number > 0. Got: {sigma!r}.")
    for name, value, low in (("erode", erode, 0), ("min_pixels", min_pixels, 2)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"Invalid {name}: we expect an int >= {low}. Got: {value!r}.")
    if align not in ("plane", "affine"):
        raise ValueError(f"Invalid align: we expect 'plane' or 'affine'. Got: {align!r}.")
    if not isinstance(pred, Tensor) or pred.dim() not in (3, 4) or (pred.dim() == 4 and pred.shape[1] != 1):
        got = tuple(pred.shape) if isinstance(pred, Tensor) else type(pred).__name__
        raise ValueError(f"Invalid pred shape, we expect (B, 1, H, W) or (B, H, W). Got: {got}")
    shape = pred.shape[-2:]
    B = pred.shape[0]

    def bhw(x: Tensor | None, name: str) -> Tensor | None:
        if x is None:
            return None
        if not isinstance(x, Tensor) or x.numel() != B * shape[0] * shape[1]:
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"Invalid {name} shape, we expect that of pred {tuple(pred.shape)}. Got: {got}")
        return x.reshape(B, *shape)

    p = bhw(pred, "pred").detach().double()
    g = bhw(target, "target").detach().double()
    near_b = bhw(near, "near")
    if near_b.dtype != torch.bool:
        raise ValueError(f"Invalid near: we expect a bool tensor. Got: {near_b.dtype}.")
    valid = torch.isfinite(g) & torch.isfinite(p)
    m = bhw(mask, "mask")
    if m is not None:
        valid = valid & m.bool()
    labels = _erode_labels(_components(near_b & valid), erode)
    regions, owners = [], []
    for b in range(B):
        for k in range(int(labels[b].max()) + 1):
            region = labels[b] == k
            if int(region.sum()) >= min_pixels:
                regions.append(region)
                owners.append(b)
    if regions:
        region = torch.stack(regions)
        owner = torch.tensor(owners, device=p.device)
        pk = torch.where(region, p[owner], 0.0)
        gk = torch.where(region, g[owner], 0.0)
        w = region.double()
        n = w.sum(dim=(1, 2))
        mp = pk.sum(dim=(1, 2)) / n
        mg = gk.sum(dim=(1, 2)) / n
        yp = torch.where(region, _detrend(pk, region), 0.0)
        yg = torch.where(region, _detrend(gk, region), 0.0)
        if align == "plane":
            dp, dg = yp, yg
        else:
            dp = torch.where(region, pk - mp[:, None, None], 0.0)
            dg = torch.where(region, gk - mg[:, None, None], 0.0)
        var = (dp * dp).sum(dim=(1, 2))
        cov = (dp * dg).sum(dim=(1, 2))
        # Flat: nothing but a plane, up to float32 rounding (1e-6 of the values' size).
        flat = yp.square().sum(dim=(1, 2)) <= 1e-12 * pk.square().sum(dim=(1, 2))
        s = torch.where(flat, 0.0, cov / torch.where(flat, 1.0, var))
        hp = _high_pass(yp, region, float(sigma))
        hg = _high_pass(yg, region, float(sigma))
        res = torch.where(region, s[:, None, None] * hp - hg, 0.0)
        ref = torch.where(region, hg, 0.0)
        num = res.square().sum(dim=(1, 2)).sqrt()
        den = ref.square().sum(dim=(1, 2)).sqrt()
        has_relief = den > 1e-12 * (mg.abs() + 1) * n.sqrt()
        e = num / torch.where(has_relief, den, 1.0)
        return _ReliefTerms(B, shape, p.device, owner, region, s, hp, hg, e, has_relief)
    return _ReliefTerms(B, shape, p.device)


def relief_error(
    pred: Tensor,
    target: Tensor,
    near: Tensor,
    mask: Tensor | None = None,
    *,
    sigma: float = 2.0,
    erode: int = 2,
    min_pixels: int = 9,
    align: Literal["affine", "plane"] = "affine",
    reduction: Literal["mean", "none"] = "mean",
) -> Tensor:
    r"""Per-object relief error: how much of each near object's fine relief the prediction misses.

    Each 4-connected component of ``near & valid`` is one object. Its interior :math:`E_o`
    is the component eroded by ``erode`` pixels (a pixel stays if its whole
    :math:`(2e+1)^2` window lies in the component), so that the object's outline, which
    any loss learns, does not count. Inside :math:`E_o` alone the prediction is aligned to
    the ground truth by least squares, both are high-passed by a Gaussian of ``sigma``
    pixels normalised to :math:`E_o` (:math:`G_\sigma *_{E} x = G_\sigma * (x 1_E) / G_\sigma * 1_E`),
    and the residual relief is measured relative to the object's own relief (the high-pass
    first removes the least-squares plane of :math:`x` over :math:`E_o`, :math:`\pi_o(x)`, so
    that a tilted flat surface has no relief even at the interior's border):

    .. math::

        h(x) = y - G_\sigma *_{E_o} y,\; y = x - \pi_o(x), \qquad
        e_o = \frac{\lVert s_o\, h(p) - h(g) \rVert_{E_o}}{\lVert h(g) \rVert_{E_o}} .

    The scale :math:`s_o` comes from one of two alignments (``align``):

    * ``"affine"`` (default, the metric notebook 06 pre-registered): up to scale and shift,
      :math:`(s_o, t_o) = \arg\min_{s,t} \sum_{i \in E_o} (s\,p_i + t - g_i)^2`. The
      object's tilt counts in the fit.
    * ``"plane"``: up to scale, shift *and tilt*,
      :math:`s_o = \arg\min_s \sum_{i \in E_o} (s\,y(p)_i - y(g)_i)^2`. The tilt is not part
      of the relief, and from the image of a uniformly coloured surface it is ambiguous with
      the albedo; under ``"affine"`` a prediction with the relief right and the tilt wrong
      gets a small or even negative scale, and so an error near or above 1.

    So :math:`e_o = 0` for a prediction affine to the ground truth on the object and
    :math:`e_o = 1` for a flat one (a constant or a plane); it is
    independent of any positive scale and shift of ``target`` (depth or disparity-like labels
    give the same value when they are affine to each other). Objects with fewer than
    ``min_pixels`` interior pixels or without relief (:math:`\lVert h(g) \rVert = 0`) are
    skipped. An image's error is the mean of its objects' :math:`e_o`; the batch error
    (``reduction="mean"``) is the mean over the images that have at least one object.

    A pixel is valid if ``mask`` is True and the target is finite. Computed in float64.

    Args:
        pred: prediction, :math:`(B, 1, H, W)` or :math:`(B, H, W)`.
        target: ground truth (depth, or anything affine to it on each object), same shape.
        near: bool map of near-object pixels, same shape.
        mask: bool validity mask, same shape, or None.
        sigma: high-pass scale in pixels, > 0.
        erode: erosion radius in pixels, >= 0.
        min_pixels: smallest interior that counts as an object, >= 2.
        align: ``"affine"`` (scale and shift fitted to the raw values) or ``"plane"`` (scale
            fitted after removing each object's least-squares plane), see above.
        reduction: ``"mean"`` (0-dim tensor) or ``"none"`` (``(B,)``, NaN for images without
            an object).

    Returns:
        float64 tensor; NaN for ``"mean"`` if no image has an object.

    Examples:
        >>> y, x = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
        >>> g = 2.0 + 0.05 * torch.sin(x) * torch.cos(y)
        >>> near = torch.ones(1, 16, 16, dtype=torch.bool)
        >>> round(float(relief_error(3 * g[None] - 1, g[None], near)), 4)
        0.0
        >>> float(relief_error(torch.ones(1, 16, 16), g[None], near))
        1.0
    """
    if reduction not in ("mean", "none"):
        raise ValueError(f"Invalid reduction: we expect 'mean' or 'none'. Got: {reduction!r}.")
    terms = _relief_terms(pred, target, near, mask, sigma, erode, min_pixels, align)
    B = terms.batch
    errors = torch.full((B,), math.nan, dtype=torch.float64, device=terms.device)
    if terms.owner is not None:
        for b in range(B):
            sel = (terms.owner == b) & terms.has_relief
            if bool(sel.any()):
                errors[b] = terms.error[sel].mean()
    if reduction == "none":
        return errors
    used = ~torch.isnan(errors)
    return errors[used].mean() if bool(used.any()) else torch.tensor(math.nan, dtype=torch.float64)


def relief_maps(
    pred: Tensor,
    target: Tensor,
    near: Tensor,
    mask: Tensor | None = None,
    *,
    sigma: float = 2.0,
    erode: int = 2,
    min_pixels: int = 9,
    align: Literal["affine", "plane"] = "plane",
) -> dict[str, Tensor]:
    r"""The per-pixel relief that :func:`relief_error` compares, for figures.

    Inside every object interior :math:`E_o`: the target's high-pass relief :math:`h(g)` and
    the prediction's, scaled as :func:`relief_error` scales it, :math:`s_o\, h(p)`; 0 outside
    the interiors. :func:`relief_error` is the norm of their difference relative to that of
    :math:`h(g)`, per object. The arguments are those of :func:`relief_error` (``align``
    defaults to ``"plane"`` here, the alignment that ignores each object's tilt).

    Returns:
        ``{"target": h(g), "pred": s h(p)}`` float64 and ``"interior"`` bool, each
        ``(B, H, W)``.

    Examples:
        >>> y, x = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
        >>> g = (2.0 + 0.05 * torch.sin(x) * torch.cos(y))[None].double()
        >>> maps = relief_maps(3 * g - 1, g, torch.ones(1, 16, 16, dtype=torch.bool))
        >>> bool(torch.allclose(maps["pred"], maps["target"])), int(maps["interior"].sum())
        (True, 144)
    """
    terms = _relief_terms(pred, target, near, mask, sigma, erode, min_pixels, align)
    B, (H, W) = terms.batch, terms.shape
    out = {name: torch.zeros(B, H, W, dtype=torch.float64, device=terms.device)
           for name in ("target", "pred")}  # fmt: skip
    interior = torch.zeros(B, H, W, dtype=torch.bool, device=terms.device)
    if terms.owner is not None:  # the interiors are disjoint: a sum per image places each one
        out["target"].index_add_(0, terms.owner, torch.where(terms.region, terms.hg, 0.0))
        scaled = torch.where(terms.region, terms.scale[:, None, None] * terms.hp, 0.0)
        out["pred"].index_add_(0, terms.owner, scaled)
        interior.index_put_((terms.owner,), terms.region, accumulate=True)
    return {**out, "interior": interior}
