r"""Gradient analysis: what each loss teaches every pixel (notebook 04).

Helpers to look at :math:`\partial \mathcal L / \partial p`, the gradient a loss sends to
each pixel of a prediction map ``p``:

* :func:`loss_gradient`: the gradient map of any loss, by autograd.
* :func:`ssi_gradient_parts`: the image-level SSI gradient written out by hand, split into
  its sign, scale and median terms (they sum to autograd's gradient).
* :func:`ssi_loss_count_n`: an *analysis-only* SSI variant whose scale divides by ``n``
  instead of the released ``n + 1``; it is not the loss that :mod:`hdn` trains with.
* :func:`make_loss`: SSI or HDN-DR/DP/DS by name, optionally with the prediction's median
  detached (the follow-up work's variant).
* :func:`gradient_mass_by_region`, :func:`detail_regions`: where the gradient goes (near/far,
  fine/smooth; :func:`hdn.workbook.explorer.depth_quantile_regions` gives depth quarters).
* :func:`descend`, :func:`step_lengths`, :func:`aligned_error`, :func:`aligned_error_map`,
  :class:`DescentExplorer`: gradient descent on the map itself (no network), with one step
  for the whole map or an equal step per region, and a widget to step through it.

All maps are ``(B, H, W)``; inputs may also be ``(B, 1, H, W)``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import partial
from itertools import pairwise
from typing import NamedTuple

import torch
from torch import Tensor

from hdn import contexts as _contexts
from hdn._core.engine import EPS
from hdn._validation import _as_bhw, check_depth_inputs, check_levels, single_image, stats_dtype
from hdn.data import blurred
from hdn.losses import contexts_loss

__all__ = [
    "LOSS_NAMES",
    "DescentExplorer",
    "LossFn",
    "SSIGradientParts",
    "aligned_error",
    "aligned_error_map",
    "descend",
    "detail_regions",
    "gradient_mass_by_region",
    "level_gradients",
    "loss_gradient",
    "make_loss",
    "median_gradient_share",
    "smallest_context_size",
    "smooth_within",
    "ssi_gradient_parts",
    "ssi_loss_count_n",
    "step_lengths",
]

LossFn = Callable[[Tensor, Tensor, "Tensor | None"], Tensor]
"""A loss ``loss_fn(pred, target, mask) -> scalar``, as :func:`hdn.ssi_loss`."""

LOSS_NAMES = ("ssi", "dr", "dp", "ds")
"""Names understood by :func:`make_loss`: image-level SSI and HDN-DR / DP / DS."""


def loss_gradient(loss_fn: LossFn, pred: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor:
    """The gradient of a loss with respect to every pixel of the prediction.

    .. math:: G_i = \\frac{\\partial \\mathcal L(p, g)}{\\partial p_i}

    Args:
        loss_fn: ``loss_fn(pred, target, mask) -> scalar``.
        pred: ``(B, 1, H, W)`` or ``(B, H, W)`` prediction (not modified, gradient not kept).
        target: same shape.
        mask: optional bool mask.

    Returns:
        ``(B, H, W)`` gradient map, dtype of ``pred`` (zeros if the loss ignores ``pred``).

    Examples:
        >>> import hdn
        >>> g = torch.tensor([[[1.0, 2.0, 4.0]]])
        >>> loss_gradient(hdn.ssi_loss, g.flip(-1), g).shape
        torch.Size([1, 1, 3])
    """
    p = pred.detach().clone().requires_grad_(True)
    loss = loss_fn(p, target, mask)
    grad = torch.autograd.grad(loss, p, allow_unused=True)[0] if loss.requires_grad else None
    if grad is None:
        grad = torch.zeros_like(p)
    return _as_bhw(grad, "pred")


class SSIGradientParts(NamedTuple):
    """The image-level SSI gradient, term by term (each ``(B, H, W)``).

    Attributes:
        sign: ``r_i / d``, the direct term: the residual's sign over the scale.
        scale: ``dL/ds * sign(p_i - t) / (n + 1)``, through the mean absolute deviation.
        median: ``dL/dt`` at the median pixel of each image, 0 elsewhere.
    """

    sign: Tensor
    scale: Tensor
    median: Tensor

    @property
    def total(self) -> Tensor:
        """``sign + scale + median``: the full gradient."""
        return self.sign + self.scale + self.median


def _lower_median(x: Tensor) -> tuple[Tensor, Tensor]:
    """Value and position of the lower median of a 1-D tensor (ties by position, as the core)."""
    order = torch.sort(x, stable=True).indices
    index = order[(x.numel() - 1) // 2]
    return x[index], index


def ssi_gradient_parts(pred: Tensor, target: Tensor, mask: Tensor | None = None) -> SSIGradientParts:
    """The analytic gradient of :func:`hdn.ssi_loss` with respect to ``pred``, in three terms.

    Per image, over its ``n`` valid pixels, with ``t`` the lower median of ``p`` (at pixel
    ``m``), ``s = sum_j |p_j - t| / (n + 1)``, ``d = s + 1e-6``, ``p_hat = (p - t) / d`` and
    ``r_i = sign(p_hat_i - g_hat_i) / N_v`` (``N_v`` valid pixels in the whole batch):

    .. math::

        \\frac{\\partial \\mathcal L}{\\partial p_i} =
        \\underbrace{\\frac{r_i}{d}}_{\\text{sign}}
        + \\underbrace{\\frac{\\partial \\mathcal L}{\\partial s}
            \\frac{\\operatorname{sign}(p_i - t)}{n + 1}}_{\\text{scale}}
        + \\underbrace{[i = m]\\,\\frac{\\partial \\mathcal L}{\\partial t}}_{\\text{median}},

        \\frac{\\partial \\mathcal L}{\\partial s} = -\\sum_j \\frac{r_j \\hat p_j}{d},

        \\frac{\\partial \\mathcal L}{\\partial t} = -\\sum_j \\frac{r_j}{d}
            - \\frac{\\partial \\mathcal L}{\\partial s}\\sum_j \\frac{\\operatorname{sign}(p_j - t)}{n + 1}.

    Written independently of :mod:`hdn._core.engine` (one image at a time) so that each can check
    the other.

    Args:
        pred: ``(B, 1, H, W)`` or ``(B, H, W)``.
        target: same shape; non-finite values are invalid.
        mask: optional bool mask.

    Returns:
        :class:`SSIGradientParts`, each ``(B, H, W)`` in float32 (float64 for float64 input),
        0 at invalid pixels.

    Examples:
        >>> import hdn
        >>> p = torch.tensor([[[1.0, 3.0, 2.0, 7.0]]])
        >>> g = torch.tensor([[[1.0, 2.0, 3.0, 4.0]]])
        >>> parts = ssi_gradient_parts(p, g)
        >>> torch.allclose(parts.total, loss_gradient(hdn.ssi_loss, p, g))
        True
    """
    p3, g3, valid = check_depth_inputs(pred, target, mask)
    dtype = stats_dtype(p3, g3)
    p3, g3 = p3.detach().to(dtype), g3.detach().to(dtype)
    sign_term, scale_term, median_term = (torch.zeros_like(p3) for _ in range(3))
    n_valid = int(valid.sum())
    for b in range(p3.shape[0]):
        v = valid[b]
        n = int(v.sum())
        if n == 0:
            continue
        x, y = p3[b][v], g3[b][v]
        t, m = _lower_median(x)
        t_g, _ = _lower_median(y)
        d = (x - t).abs().sum() / (n + 1) + EPS
        d_g = (y - t_g).abs().sum() / (n + 1) + EPS
        x_hat, y_hat = (x - t) / d, (y - t_g) / d_g
        r = torch.sign(x_hat - y_hat) / n_valid
        side = torch.sign(x - t)
        d_loss_d_scale = -(r * x_hat).sum() / d
        d_loss_d_shift = -r.sum() / d - d_loss_d_scale * side.sum() / (n + 1)
        sign_term[b][v] = r / d
        scale_term[b][v] = d_loss_d_scale * side / (n + 1)
        median_b = torch.zeros_like(x)
        median_b[m] = d_loss_d_shift
        median_term[b][v] = median_b
    return SSIGradientParts(sign_term, scale_term, median_term)


def _mad_normalize(x: Tensor, count_offset: int) -> Tensor:
    """``(x - t) / (s + 1e-6)`` of a 1-D tensor, ``s = sum |x - t| / (n + count_offset)``;
    autograd reaches the median element (``torch.median`` picks the lower middle value)."""
    t = torch.median(x)
    s = (x - t).abs().sum() / (x.numel() + count_offset)
    return (x - t) / (s + EPS)


def _ssi_autograd(pred: Tensor, target: Tensor, mask: Tensor | None, count_offset: int) -> Tensor:
    p3, g3, valid = check_depth_inputs(pred, target, mask)
    dtype = stats_dtype(p3, g3)
    total = p3.new_zeros((), dtype=dtype)
    n_valid = int(valid.sum())
    if n_valid == 0:
        return (p3.to(dtype) * 0).sum()
    for b in range(p3.shape[0]):
        v = valid[b]
        if not bool(v.any()):
            continue
        p_hat = _mad_normalize(p3[b][v].to(dtype), count_offset)
        g_hat = _mad_normalize(g3[b][v].to(dtype), count_offset)
        total = total + (p_hat - g_hat).abs().sum()
    return total / n_valid


def ssi_loss_count_n(pred: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor:
    """Image-level SSI loss with the scale divided by ``n``: an alternative for analysis only.

    The released code (and :func:`hdn.ssi_loss`) divides the summed absolute deviation by
    ``n + 1``. This variant divides by ``n``, the plain mean absolute deviation, so that the
    effect of the ``+ 1`` can be measured; it is written with autograd, one image at a time,
    and is not used by any loss of :mod:`hdn`:

    .. math:: s = \\frac{1}{n}\\sum_{i \\in v}|x_i - t|

    Args:
        pred: ``(B, 1, H, W)`` or ``(B, H, W)``.
        target: same shape; non-finite values are invalid.
        mask: optional bool mask.

    Returns:
        scalar (float32, or float64 for float64 inputs).

    Examples:
        >>> import hdn
        >>> p, g = torch.tensor([[[1.0, 3.0, 2.0, 7.0]]]), torch.tensor([[[1.0, 2.0, 3.0, 4.0]]])
        >>> round(float(ssi_loss_count_n(p, g) / hdn.ssi_loss(p, g)), 4)  # n / (n + 1)
        0.8
    """
    return _ssi_autograd(pred, target, mask, count_offset=0)


def make_loss(name: str, levels: int = 1, *, detach_pred_median: bool = False) -> LossFn:
    """SSI or HDN-DR / DP / DS as a ``loss_fn(pred, target, mask)``.

    Args:
        name: ``"ssi"`` (image level; ``levels`` ignored), ``"dr"``, ``"dp"`` or ``"ds"``.
        levels: hierarchy depth ``L >= 1`` for the HDN losses.
        detach_pred_median: build the contexts with the prediction's median taken without
            gradient (the follow-up work's choice); ``False`` is the released HDN loss.

    Returns:
        the loss function; with ``detach_pred_median=False`` it equals :func:`hdn.ssi_loss` /
        :func:`hdn.hdn_loss`.

    Examples:
        >>> import hdn
        >>> g = torch.rand(1, 1, 8, 8) + 1
        >>> p = torch.rand(1, 1, 8, 8)
        >>> bool(make_loss("dp", 2)(p, g, None) == hdn.hdn_loss(p, g, context="dp", levels=2))
        True
    """
    if name not in LOSS_NAMES:
        raise ValueError(f"Invalid name: we expect one of {LOSS_NAMES}. Got: {name!r}.")
    check_levels(levels)

    def loss_fn(pred: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor:
        if name == "ssi":
            ctx = _contexts.whole_image(target, mask)
        else:
            ctx = _contexts.build(name, target, mask, levels=levels)
        return contexts_loss(pred, target, mask, ctx, detach_pred_median=detach_pred_median)

    loss_fn.__name__ = f"{name}_L{levels}" if name != "ssi" else "ssi"
    return loss_fn


def smooth_within(depth: Tensor, region: Tensor, sigma: float) -> Tensor:
    """Gaussian-blur a depth map using only the pixels of a region (normalised convolution).

    Inside ``region`` each pixel becomes the Gaussian-weighted mean of the region's pixels
    around it, so a near object blurred this way keeps a sharp outline and loses only its
    inner relief; outside ``region`` the map is unchanged.

    Args:
        depth: ``(..., H, W)`` depth (finite inside ``region``; other values are ignored).
        region: bool mask broadcastable to ``depth``.
        sigma: Gaussian standard deviation in pixels, ``>= 0``.

    Returns:
        map of ``depth``'s shape and dtype.

    Examples:
        >>> d = torch.tensor([[1.0, 1.0, 9.0, 9.0]])
        >>> smooth_within(d, d < 5, 2.0)
        tensor([[1., 1., 9., 9.]])
    """
    region = region.expand_as(depth)
    weight = region.to(depth.dtype)
    inside = torch.where(region, depth, torch.zeros((), dtype=depth.dtype, device=depth.device))
    smooth = blurred(inside, sigma) / blurred(weight, sigma).clamp(min=torch.finfo(depth.dtype).tiny)
    return torch.where(region, smooth, depth)


def detail_regions(
    depth: Tensor, valid: Tensor, *, sigma: float = 2.0, fraction: float = 0.2
) -> dict[str, Tensor]:
    """Split the valid pixels into fine structure and smooth regions.

    A pixel's detail is ``|g - smooth_within(g, valid, sigma)|``, what a Gaussian blur of
    ``sigma`` pixels would remove there; the ``fraction`` of valid pixels with the most detail
    are ``"fine"``, the rest ``"smooth"``.

    Args:
        depth: ``(..., H, W)`` depth.
        valid: bool mask of the same shape.
        sigma: blur in pixels.
        fraction: share of valid pixels labelled fine, in ``(0, 1)``.

    Returns:
        ``{"fine": mask, "smooth": mask}``.
    """
    if not 0 < fraction < 1:
        raise ValueError(f"Invalid fraction: we expect a number in (0, 1). Got: {fraction!r}.")
    detail = (depth - smooth_within(depth, valid, sigma)).abs()
    values = detail[valid]
    if values.numel() == 0:
        return {"fine": valid.clone(), "smooth": valid.clone()}
    k = max(1, round(fraction * values.numel()))
    threshold = torch.topk(values, k).values[-1]
    fine = valid & (detail >= threshold)
    return {"fine": fine, "smooth": valid & ~fine}


def gradient_mass_by_region(grad: Tensor, regions: Mapping[str, Tensor]) -> dict[str, float]:
    """Share of the gradient's total absolute mass ``sum_i |G_i|`` that falls in each region.

    :func:`hdn.workbook.explorer.region_loss_share` applied to ``|G|`` (in float64).

    Args:
        grad: gradient map, e.g. from :func:`loss_gradient`.
        regions: name -> bool mask with as many elements as ``grad``.

    Returns:
        name -> share in ``[0, 1]`` (0 for all when the gradient is zero). Shares of
        disjoint regions that cover the map sum to 1.

    Examples:
        >>> g = torch.tensor([[1.0, -3.0, 0.0, 4.0]])
        >>> gradient_mass_by_region(g, {"left": torch.tensor([[True, True, False, False]])})
        {'left': 0.5}
    """
    from hdn.workbook.explorer import region_loss_share

    return region_loss_share(grad.detach().abs().double(), regions)


def _mad_align(pred: Tensor, target: Tensor, region: Tensor) -> Tensor:
    """``pred`` mapped onto ``target`` over ``region`` by medians and mean absolute deviations."""
    p, g = pred[region], target[region]
    t_p, t_g = _lower_median(p)[0], _lower_median(g)[0]
    s_p, s_g = (p - t_p).abs().mean(), (g - t_g).abs().mean()
    return (pred - t_p) / s_p.clamp(min=torch.finfo(p.dtype).tiny) * s_g + t_g


def aligned_error_map(pred: Tensor, target: Tensor, regions: Mapping[str, Tensor]) -> Tensor:
    """Per-pixel error after aligning the prediction to the target region by region.

    Within each region the prediction is shifted and scaled onto the target by their
    medians and mean absolute deviations (robust, like the SSI normalisation), so the map
    shows shape errors in the target's units (metres), not offsets between regions.

    Args:
        pred: ``(B, 1, H, W)`` or ``(B, H, W)``.
        target: same shape.
        regions: name -> bool mask of the same ``(B, H, W)`` (or ``(H, W)``); each is aligned
            over all its pixels at once (use one image).

    Returns:
        ``(B, H, W)`` absolute error, NaN outside every region.
    """
    p, g = _as_bhw(pred, "pred").detach(), _as_bhw(target, "target").detach()
    out = torch.full_like(p, float("nan"))
    for region in regions.values():
        r = region.expand_as(p)
        if bool(r.any()):
            out = torch.where(r, (_mad_align(p, g, r) - g).abs(), out)
    return out


def aligned_error(pred: Tensor, target: Tensor, region: Tensor) -> float:
    """Mean of :func:`aligned_error_map` over one region (target units, e.g. metres).

    Args:
        pred: ``(B, 1, H, W)`` or ``(B, H, W)``, one image in practice.
        target: same shape.
        region: bool mask of the same ``(B, H, W)`` (or ``(H, W)``), not empty.

    Returns:
        the mean absolute error after median / mean-absolute-deviation alignment in the region.

    Examples:
        >>> g = torch.tensor([[[1.0, 2.0, 4.0, 8.0]]])
        >>> aligned_error(3 * g + 1, g, torch.ones_like(g, dtype=torch.bool))
        0.0
    """
    return float(aligned_error_map(pred, target, {"r": region})[region.expand(_as_bhw(pred, "pred").shape)].mean())


def descend(
    pred0: Tensor,
    target: Tensor,
    mask: Tensor | None,
    loss_fn: LossFn,
    steps: int,
    lr: float,
    *,
    normalize: bool = True,
    regions: Mapping[str, Tensor] | None = None,
    schedule: str = "constant",
) -> list[Tensor]:
    """Gradient descent on the prediction map itself (no network).

    ``p_{k+1} = p_k - lr_k * G_k / mean_i |G_{k,i}|`` with ``G_k`` the gradient of
    ``loss_fn`` at ``p_k`` and the mean over the valid pixels, so every step moves the map by
    ``lr_k`` (in the map's units, e.g. metres) per pixel on average and the loss only decides
    *where* it moves. With ``normalize=False`` it is textbook ``p - lr_k * G``. Deterministic.

    With one mean over all valid pixels, a region's own mean move per step is
    ``lr * (its share of sum |G|) / (its share of the pixels)`` (:func:`step_lengths`
    measures it), so losses that concentrate their gradient also take longer steps there.
    ``regions`` removes that difference: the mean is taken per region (the valid pixels in
    no region form one more group), so every region moves by ``lr_k`` per pixel on average
    and the loss decides only the direction within each region.

    Args:
        pred0: ``(B, 1, H, W)`` or ``(B, H, W)`` start.
        target: same shape.
        mask: optional bool mask.
        loss_fn: ``loss_fn(pred, target, mask) -> scalar``.
        steps: number of steps, ``>= 0``.
        lr: step length (``normalize=True``) or learning rate.
        normalize: divide the gradient by its mean absolute value first.
        regions: optional name -> bool mask of the image; with ``normalize``, the mean
            absolute gradient is taken within each region (equal step per region).
        schedule: ``"constant"`` (``lr_k = lr``) or ``"linear"``
            (``lr_k = lr * (1 - k / steps)``, decaying to 0 at the last step).

    Returns:
        ``steps + 1`` detached ``(B, H, W)`` maps, ``pred0`` first.

    Examples:
        >>> import hdn
        >>> g = torch.rand(1, 6, 6) + 1
        >>> maps = descend(torch.rand(1, 6, 6), g, None, hdn.ssi_loss, steps=3, lr=0.01)
        >>> len(maps), maps[0].shape
        (4, torch.Size([1, 6, 6]))
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"Invalid steps: we expect an integer >= 0. Got: {steps!r}.")
    if schedule not in _SCHEDULES:
        raise ValueError(f"Invalid schedule: we expect one of {_SCHEDULES}. Got: {schedule!r}.")
    p = _as_bhw(pred0, "pred0").detach().clone()
    _, _, valid = check_depth_inputs(p, target, mask)
    groups = _step_groups(valid, regions)
    snapshots = [p.clone()]
    for k in range(steps):
        grad = loss_gradient(loss_fn, p, target, mask)
        if normalize:
            grad = _normalize_per_group(grad, groups)
        rate = lr * (1 - k / steps) if schedule == "linear" else lr
        p = p - rate * grad
        snapshots.append(p.clone())
    return snapshots


_SCHEDULES = ("constant", "linear")


def _step_groups(valid: Tensor, regions: Mapping[str, Tensor] | None) -> list[Tensor]:
    """The pixel groups whose mean |G| sets the step: all valid pixels, or one per region."""
    if regions is None:
        return [valid]
    groups, covered = [], torch.zeros_like(valid)
    for name, region in regions.items():
        r = region.to(torch.bool)
        if r.shape != valid.shape:
            try:
                r = r.expand_as(valid)
            except RuntimeError:
                raise ValueError(
                    f"Invalid region {name!r} shape: we expect {tuple(valid.shape)} or "
                    f"broadcastable to it. Got: {tuple(region.shape)}."
                ) from None
        r = r & valid & ~covered
        covered = covered | r
        groups.append(r)
    groups.append(valid & ~covered)
    return [g for g in groups if bool(g.any())]


def _normalize_per_group(grad: Tensor, groups: list[Tensor]) -> Tensor:
    """``grad`` divided, within each group, by the group's mean |grad| (0 where it is 0)."""
    out = torch.zeros_like(grad)
    for group in groups:
        scale = grad.abs()[group].mean()
        if float(scale) > 0:
            out = torch.where(group, grad / scale, out)
    return out


def step_lengths(maps: list[Tensor], regions: Mapping[str, Tensor]) -> dict[str, list[float]]:
    """Mean move per pixel, ``mean_i |p_{k+1,i} - p_{k,i}|``, of every step in each region.

    With :func:`descend`'s default normalisation over all valid pixels, a region's step is
    ``lr * (its share of sum |G|) / (its share of the pixels)``: this measures it.

    Args:
        maps: the ``steps + 1`` maps of :func:`descend`.
        regions: name -> bool mask of the maps' shape (or broadcastable to it), not empty.

    Returns:
        name -> ``steps`` step lengths (the maps' units, e.g. metres).

    Examples:
        >>> maps = [torch.zeros(1, 1, 2, dtype=torch.float64), torch.tensor([[[0.1, 0.3]]], dtype=torch.float64)]
        >>> step_lengths(maps, {"left": torch.tensor([[[True, False]]])})
        {'left': [0.1]}
    """
    if len(maps) < 2:
        raise ValueError(f"Invalid maps: we expect at least 2 maps (one step). Got: {len(maps)}.")
    out = {}
    for name, region in regions.items():
        r = region.to(torch.bool).expand_as(maps[0])
        if not bool(r.any()):
            raise ValueError(f"Invalid region {name!r}: we expect at least one pixel.")
        out[name] = [float((b - a).abs()[r].double().mean()) for a, b in pairwise(maps)]
    return out


def _percent_of_start(curve: list[float]) -> list[float]:
    start = curve[0] if curve[0] > 0 else float("nan")  # nothing to recover: no curve
    return [100 * c / start for c in curve]


class DescentExplorer:
    """Step through gradient descent on a map under SSI and HDN-DR / DP / DS (a widget).

    ``widget`` is an ipywidgets ``VBox``: a ``Dropdown`` ``loss``, an ``IntSlider`` ``level``
    (the number of levels ``L``, ignored and disabled for SSI) and an ``IntSlider`` ``step``.
    Every change calls :meth:`on_change`, which draws :meth:`render` into ``output``; the last
    figure stays in ``figure`` and its ``(loss, level, step)`` in ``state``. Runs are computed
    on first use and cached, so moving the step slider only redraws. The widget keeps one
    figure and changes its image, curves and texts in place (only those are redrawn).

    Args:
        pred0: ``(H, W)``, ``(1, H, W)`` or ``(1, 1, H, W)`` starting prediction.
        target: same shape, e.g. depth in metres.
        mask: optional bool mask.
        regions: name -> bool mask of the image; the figure plots each region's
            :func:`aligned_error` against the step.
        focus: the region whose error map is drawn (default: the first).
        steps: descent steps per run.
        lr: mean per-pixel step length (see :func:`descend`).
        max_level: largest ``L`` on the level slider.
        detach_pred_median: use the follow-up variant (see :func:`make_loss`).
        unit: ``(name, factor)`` for the error map, e.g. ``("cm", 100.0)`` for metres.
        loss: initial value of the loss dropdown.
        level: initial value of the level slider.
        precompute: run every (loss, L) of the controls up front (one descent each), so that
            no move of a control waits for a descent; False computes each on first use.
    """

    LOSSES = (("SSI", "ssi"), ("HDN-DR", "dr"), ("HDN-DP", "dp"), ("HDN-DS", "ds"))

    def __init__(
        self,
        pred0: Tensor,
        target: Tensor,
        mask: Tensor | None = None,
        *,
        regions: Mapping[str, Tensor],
        focus: str | None = None,
        steps: int = 40,
        lr: float = 1e-3,
        max_level: int = 4,
        detach_pred_median: bool = True,
        unit: tuple[str, float] = ("cm", 100.0),
        loss: str = "dr",
        level: int = 2,
        precompute: bool = True,
    ):
        import ipywidgets as widgets

        self.pred0 = single_image(pred0, "pred0")
        self.target = single_image(target, "target")
        self.mask = None if mask is None else single_image(mask, "mask")
        if not regions:
            raise ValueError("Invalid regions: we expect at least one named mask.")
        self.regions = {name: single_image(r, f"region {name!r}") for name, r in regions.items()}
        self.focus = focus if focus is not None else next(iter(self.regions))
        if self.focus not in self.regions:
            raise ValueError(f"Invalid focus: we expect one of {list(self.regions)}. Got: {focus!r}.")
        self.steps, self.lr, self.max_level = steps, lr, check_levels(max_level)
        self.detach_pred_median = detach_pred_median
        self.unit = unit
        self._runs: dict[tuple[str, int], list[Tensor]] = {}
        self._curves: dict[tuple[str, int], dict[str, list[float]]] = {}
        self._errors: dict[tuple[str, int, int], Tensor] = {}  # cropped error maps, by (loss, level, step)
        self._live = None  # the widget's (_DescentPanels, LiveFigure), made on the first draw

        self.loss = widgets.Dropdown(options=self.LOSSES, value=loss, description="loss")
        self.level = widgets.IntSlider(
            value=level, min=1, max=max_level, description="levels L", continuous_update=False
        )
        self.step = widgets.IntSlider(value=steps, min=0, max=steps, description="step", continuous_update=False)
        self.output = widgets.Output()
        self.widget = widgets.VBox([widgets.HBox([self.loss, self.level, self.step]), self.output])
        self.state: tuple[str, int, int] | None = None
        self.figure = None
        self.renders = 0
        for control in (self.loss, self.level, self.step):
            control.observe(self.on_change, names="value")
        if precompute:
            for name in LOSS_NAMES:
                for lvl in range(1, max_level + 1) if name != "ssi" else (1,):
                    self.curves(name, lvl)
        self.on_change()

    @staticmethod
    def _key(loss: str, level: int) -> tuple[str, int]:
        return (loss, 1) if loss == "ssi" else (loss, level)

    def run(self, loss: str, level: int) -> list[Tensor]:
        """The ``steps + 1`` maps of one run (cached)."""
        self._check(loss, level)
        key = self._key(loss, level)
        if key not in self._runs:
            from hdn.workbook._live import one_torch_thread

            fn = make_loss(key[0], key[1], detach_pred_median=self.detach_pred_median)
            with one_torch_thread():  # small maps: threads only wait on each other
                self._runs[key] = descend(self.pred0, self.target, self.mask, fn, self.steps, self.lr)
        return self._runs[key]

    def curves(self, loss: str, level: int) -> dict[str, list[float]]:
        """Region name -> aligned error (target units) at every step of one run (cached)."""
        key = self._key(loss, level)
        if key not in self._curves:
            maps = self.run(*key)
            self._curves[key] = {
                name: [aligned_error(m, self.target, region) for m in maps] for name, region in self.regions.items()
            }
        return self._curves[key]

    def label(self, loss: str, level: int) -> str:
        """Display name of a run, e.g. ``"HDN-DR, L = 3"``."""
        name = {v: k for k, v in self.LOSSES}[loss]
        return name if loss == "ssi" else f"{name}, L = {level}"

    def render(self, loss: str, level: int, step: int):
        """Draw one (loss, level, step).

        Panels: the focus region's error after alignment (:func:`aligned_error_map`) at that
        step, on the colour scale of step 0, cropped to the region; every region's
        :func:`aligned_error` relative to step 0 against the step (SSI dashed for comparison),
        with a line at ``step``.

        Returns:
            A :class:`matplotlib.figure.Figure` (not managed by pyplot).
        """
        self._check_step(loss, level, step)
        return _DescentPanels(self, loss, level, step).figure

    def _check_step(self, loss: str, level: int, step: int) -> None:
        self._check(loss, level)
        if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step <= self.steps:
            raise ValueError(f"Invalid step: we expect an integer in [0, {self.steps}]. Got: {step!r}.")

    def _error_map(self, loss: str, level: int, step: int) -> Tensor:
        """The focus region's error after alignment at one step, cropped and in display units (cached)."""
        key = (*self._key(loss, level), step)
        if key not in self._errors:
            from hdn.workbook._live import one_torch_thread

            focus = {self.focus: self.regions[self.focus]}
            rows, cols = torch.nonzero(focus[self.focus][0], as_tuple=True)
            crop = (slice(int(rows.min()), int(rows.max()) + 1), slice(int(cols.min()), int(cols.max()) + 1))
            pred = self.pred0 if step == 0 else self.run(loss, level)[step]
            with one_torch_thread():
                self._errors[key] = aligned_error_map(pred, self.target, focus)[0][crop] * self.unit[1]
        return self._errors[key]

    def on_change(self, change: dict | None = None) -> None:
        """Re-render the selection into ``output`` (the controls' callback).

        The PNG is written into the ``Output`` widget's ``outputs`` state (what
        ``Output.append_display_data`` does), so no display message is sent to the notebook and
        the callback behaves the same in a kernel, under nbval and in plain Python.
        """
        from hdn.workbook._live import LiveFigure, one_torch_thread, png_message

        self.level.disabled = self.loss.value == "ssi"
        state = (self.loss.value, self.level.value, self.step.value)
        self._check_step(*state)
        with one_torch_thread():
            if self._live is None:
                panels = _DescentPanels(self, *state)
                self._live = (panels, LiveFigure(panels.figure, panels.dynamic))
            else:
                self._live[0].update(*state)
            panels, live = self._live
            png = live.png()
        self.state, self.figure = state, panels.figure
        self.renders += 1
        text = f"{self.label(state[0], state[1])}, step {state[2]}"
        self.output.outputs = (png_message(png, text),)

    def _check(self, loss: str, level: int) -> None:
        if loss not in LOSS_NAMES:
            raise ValueError(f"Invalid loss: we expect one of {LOSS_NAMES}. Got: {loss!r}.")
        if isinstance(level, bool) or not isinstance(level, int) or not 1 <= level <= self.max_level:
            raise ValueError(f"Invalid level: we expect an integer in [1, {self.max_level}]. Got: {level!r}.")


def level_gradients(
    pred: Tensor, target: Tensor, mask: Tensor | None, contexts: _contexts.Contexts
) -> Tensor:
    """Each level's part of an HDN gradient: the gradient of one level's contexts on their own.

    Level ``l``'s contexts become a one-level hierarchy (:func:`hdn.contexts.from_labels`),
    and autograd gives its loss's gradient. A pixel whose levels' parts differ in sign is
    pulled in opposite directions by its contexts.

    Args:
        pred: ``(B, 1, H, W)`` or ``(B, H, W)``.
        target: same shape.
        mask: optional bool mask.
        contexts: the hierarchy, e.g. :func:`hdn.contexts.depth_range` of ``target``.

    Returns:
        ``(L, B, H, W)``: the gradient of level ``l = 0 .. L-1`` alone.

    Examples:
        >>> g = torch.rand(1, 6, 6) + 1
        >>> ctx = _contexts.depth_range(g, None, levels=2)
        >>> level_gradients(torch.rand(1, 6, 6), g, None, ctx).shape
        torch.Size([2, 1, 6, 6])
    """
    parts = []
    for level in range(contexts.num_levels):
        one_level = _contexts.from_labels(contexts.level_ids(level), target, mask)
        parts.append(
            loss_gradient(partial(_contexts_loss_of, one_level), pred, target, mask)
        )
    return torch.stack(parts)


def _contexts_loss_of(
    contexts: _contexts.Contexts, pred: Tensor, target: Tensor, mask: Tensor | None
) -> Tensor:
    return contexts_loss(pred, target, mask, contexts)


def smallest_context_size(name: str, target: Tensor, mask: Tensor | None, levels: int) -> int:
    """The number of valid pixels of the smallest non-empty context of a hierarchy.

    Args:
        name: ``"dr"``, ``"dp"`` or ``"ds"`` (see :func:`hdn.contexts.build`).
        target: ``(B, 1, H, W)`` or ``(B, H, W)`` ground truth.
        mask: optional bool mask.
        levels: number of levels ``L``.

    Returns:
        the smallest ``n > 0`` over all contexts of all images (0 if every context is empty).

    Examples:
        >>> smallest_context_size("ds", torch.rand(1, 8, 8) + 1, None, 2)
        16
    """
    counts = _contexts.build(name, target, mask, levels=levels).to_masks().flatten(1).sum(1)
    counts = counts[counts > 0]
    return int(counts.min()) if counts.numel() else 0


def median_gradient_share(
    name: str, levels: int, pred: Tensor, target: Tensor, mask: Tensor | None = None
) -> float:
    """Share of ``sum_i |G_i|`` that the prediction's median pixels carry.

    The released loss's gradient minus that of the same loss with the prediction's median
    detached (:func:`make_loss`) is the median term of every context; this returns its
    absolute sum over the released gradient's.

    Args:
        name: a name of :data:`LOSS_NAMES`.
        levels: number of levels ``L`` (ignored for ``"ssi"``).
        pred: as for :func:`loss_gradient`.
        target: as for :func:`loss_gradient`.
        mask: as for :func:`loss_gradient`.

    Returns:
        a share in ``[0, 1]`` (0 when the gradient is zero).

    Examples:
        >>> g = torch.rand(1, 6, 6, dtype=torch.float64) + 1
        >>> 0 < median_gradient_share("ssi", 1, torch.rand(1, 6, 6, dtype=torch.float64), g) < 1
        True
    """
    released = loss_gradient(make_loss(name, levels), pred, target, mask)
    detached = loss_gradient(make_loss(name, levels, detach_pred_median=True), pred, target, mask)
    total = released.abs().double().sum()
    return float((released - detached).abs().double().sum() / total) if float(total) > 0 else 0.0


class _DescentPanels:
    """The figure of :meth:`DescentExplorer.render`, whose artists :meth:`update` changes in place.

    Panels: the focus region's error map (colour scale of step 0, so it is fixed) and the
    regions' error curves, SSI dashed for comparison, with a line at the step.
    """

    COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple")

    def __init__(self, explorer: DescentExplorer, loss: str, level: int, step: int):
        from matplotlib.figure import Figure

        from hdn.workbook.plotting import show_map

        self.ex = ex = explorer
        unit_name, _ = ex.unit
        start = ex._error_map("ssi", 1, 0)
        fig = self.figure = Figure(figsize=(9.5, 3.2), layout="constrained")
        self.ax_map, self.ax_curve = ax_map, ax_curve = fig.subplots(1, 2)
        self.image = show_map(
            ax_map, ex._error_map(loss, level, step), kind="loss", title=f"{ex.focus}: error after alignment",
            label=f"|aligned p - g| ({unit_name})", vmax=float(torch.nan_to_num(start, nan=0.0).max()),
        )
        steps = range(ex.steps + 1)
        self.lines, self.ssi_lines = [], []
        for i, name in enumerate(ex.regions):
            color = self.COLORS[i % len(self.COLORS)]
            ssi = _percent_of_start(ex.curves("ssi", 1)[name])
            self.lines.append(ax_curve.plot(steps, ssi, color=color, label=name)[0])
            self.ssi_lines.append(ax_curve.plot(steps, ssi, color=color, ls="--", label=f"{name} (SSI)")[0])
        self.marker = ax_curve.axvline(step, color="0.4", lw=1)
        ax_curve.set_xlabel("gradient-descent step")
        ax_curve.set_ylabel("aligned error (% of step 0)")
        self.update(loss, level, step)

    def dynamic(self) -> list:
        """What :meth:`update` changes, in drawing order (for :class:`~hdn.workbook._live.LiveFigure`)."""
        legend = self.ax_map.get_legend()
        return [self.image, *self.ax_map.spines.values(), *([] if legend is None else [legend]), self.ax_map.title,
                self.ax_curve]

    def update(self, loss: str, level: int, step: int) -> None:
        """Show another (loss, level, step)."""
        ex, ax = self.ex, self.ax_curve
        self.image.set_data(ex._error_map(loss, level, step).numpy())  # NaN outside the region: grey
        self.ax_map.title.set_text(f"{ex.focus}: error after alignment, step {step}")
        for name, line, ssi_line in zip(ex.regions, self.lines, self.ssi_lines):
            line.set_ydata(_percent_of_start(ex.curves(loss, level)[name]))
            ssi_line.set_visible(loss != "ssi")
        self.marker.set_xdata([step, step])
        ax.relim(visible_only=True)
        ax.autoscale_view()
        ax.set_title(ex.label(loss, level))
        handles = [h for pair in zip(self.lines, self.ssi_lines) for h in pair if h.get_visible()]
        ax.legend(handles=handles, fontsize=7)
