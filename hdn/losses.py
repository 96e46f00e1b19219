"""SSI and HDN losses: the functional forms and their thin ``nn.Module`` wrappers."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from hdn import contexts as _contexts
from hdn._core.engine import REDUCTIONS, contexts_ssi_loss
from hdn._validation import check_depth_inputs, check_levels, stats_dtype
from hdn.normalization import ssi_normalize

__all__ = [
    "REDUCTIONS",
    "GradientMatchingLoss",
    "HDNLoss",
    "SSILoss",
    "contexts_loss",
    "gradient_matching_loss",
    "hdn_loss",
    "ssi_loss",
]


def check_reduction(reduction: object) -> str:
    """``reduction`` if it is one of :data:`REDUCTIONS`, else ``ValueError``."""
    if not isinstance(reduction, str) or reduction not in REDUCTIONS:
        raise ValueError(f"Invalid reduction: we expect one of {REDUCTIONS}. Got: {reduction!r}.")
    return reduction


def contexts_loss(
    pred: Tensor,
    target: Tensor,
    mask: Tensor | None,
    contexts: _contexts.Contexts,
    *,
    reduction: str = "mean",
    aggregation: str | None = None,
    detach_pred_median: bool | None = None,
) -> Tensor:
    """SSI loss over arbitrary contexts (the common core of :func:`ssi_loss` and :func:`hdn_loss`).

    Args:
        pred: ``(B, 1, H, W)`` or ``(B, H, W)``.
        target: same shape.
        mask: bool mask or ``None``. The valid pixels are those of the mask with a finite
            target that the contexts also count valid; every context is intersected with
            them, so pixels the mask leaves out shape no context's median or scale. (The
            loss does not compare masks, which would read the device: contexts built from
            this very target and mask are intersected all the same, and DR and DP then sort
            the target per level. For DR, DP and DS, :func:`hdn_loss` with ``context="dr"``
            and the like builds them without that (DR: about 20 % faster on the CPU).)
        contexts: a :class:`hdn.contexts.Contexts` of the same ``(B, H, W)``.
        reduction: ``"mean"``, ``"sum"``, ``"per_image"`` or ``"none"``, as in :func:`hdn_loss`.
        aggregation: ``"mean"`` (each pixel's mean over its contexts, docs/semantics.md §2)
            or ``"pooled"`` (all (context, pixel) losses over their number, §4); ``None``
            takes the contexts' published default (pooled for the random variants).
        detach_pred_median: take the prediction's medians without gradient; ``None`` takes
            the contexts' default (detached for the random variants).

    Returns:
        the reduced loss (float32, or float64 for float64 inputs). For pooled contexts pixel
        ``i``'s loss is ``m_i = (N_v / P) * sum_{C containing i} |p_hat^C_i - g_hat^C_i|``
        with ``P`` the (context, pixel) pairs of the batch, so that ``sum_i m_i / N_v`` is
        the pooled mean; ``"per_image"`` is then image ``b``'s share of it over ``N_v,b``
        (it depends on the batch through ``N_v / P``), not the pooled mean of the image alone.
    """
    check_reduction(reduction)
    p, g, valid = check_depth_inputs(pred, target, mask)
    _contexts.check_contexts(contexts, p.shape, p.device, name="context")
    aggregation = contexts.aggregation if aggregation is None else aggregation
    if aggregation not in ("mean", "pooled"):
        raise ValueError(f"Invalid aggregation: we expect 'mean' or 'pooled'. Got: {aggregation!r}.")
    detach = contexts.detach_pred_median if detach_pred_median is None else bool(detach_pred_median)
    loss = _engine_loss(p, g, valid, contexts, reduction, pooled=aggregation == "pooled", detach=detach)
    return _output(loss, pred, reduction)


def _engine_loss(
    p: Tensor, g: Tensor, valid: Tensor, contexts: _contexts.Contexts, reduction: str, *, pooled=False, detach=False
) -> Tensor:
    """The engine on checked ``(B, H, W)`` inputs: flat statistics-dtype tensors, the valid
    pixels that both the inputs and the contexts allow, every level's segments."""
    dtype = stats_dtype(p, g)
    levels = (contexts.segments(level) for level in range(contexts.num_levels))  # (made on use)
    if valid is not contexts.valid:  # every context is intersected with the loss's valid pixels
        valid = valid & contexts.valid
        levels = (level.within(valid.reshape(-1)) for level in levels)
    p, g = (x if x.dtype == dtype else x.to(dtype) for x in (p, g))
    return contexts_ssi_loss(
        p.reshape(-1),
        g.reshape(-1),
        valid.reshape(-1),
        levels,
        p.shape[0],
        pooled=pooled,
        detach_pred_median=detach,
        reduction=reduction,
    )


def _output(loss: Tensor, pred: Tensor, reduction: str) -> Tensor:
    """The engine's flat ``(N,)`` map in the input's layout (other reductions as they are)."""
    return loss.view(pred.shape) if reduction == "none" else loss


def ssi_loss(pred: Tensor, target: Tensor, mask: Tensor | None = None, *, reduction: str = "mean") -> Tensor:
    """Image-level scale-and-shift-invariant mean absolute error.

    .. math:: \\mathcal L = \\frac{1}{\\sum_b n_b}\\sum_b\\sum_{i \\in v_b}
              \\left|\\hat p_i - \\hat g_i\\right|,\\qquad
              \\hat x = \\frac{x - \\operatorname{median}(x)}{\\frac{1}{n+1}\\sum|x - \\operatorname{median}(x)| + 10^{-6}}

    Args:
        pred: ``(B, 1, H, W)`` or ``(B, H, W)``, float16/bfloat16/float32/float64.
        target: same shape and device; non-finite values are invalid.
        mask: optional bool mask of the same shape (``None``: finite target).
        reduction: ``"mean"``, ``"sum"``, ``"per_image"`` or ``"none"``, as in :func:`hdn_loss`
            (the map is ``|p_hat_i - g_hat_i|`` at valid pixels).

    Returns:
        scalar (``(B,)`` or a map for the other reductions); 0 (with zero gradient) when the
        batch has no valid pixel.

    Examples:
        >>> g = torch.rand(2, 1, 8, 8) + 1
        >>> float(ssi_loss(3 * g + 5, g)) < 1e-4
        True
        >>> ssi_loss(torch.rand(2, 1, 8, 8), g, reduction="per_image").shape
        torch.Size([2])
    """
    check_reduction(reduction)
    p, g, valid = check_depth_inputs(pred, target, mask)
    return _output(_engine_loss(p, g, valid, _contexts.GridContexts(valid, 1), reduction), pred, reduction)


def hdn_loss(
    pred: Tensor,
    target: Tensor,
    mask: Tensor | None = None,
    *,
    context: str | _contexts.Contexts = "dr",
    levels: int = 3,
    reduction: str = "mean",
) -> Tensor:
    """Hierarchical depth normalization (HDN) loss.

    Every context ``C`` (a set of valid pixels) normalises prediction and target on its own,
    ``|p_hat_C - g_hat_C|`` per pixel; pixel ``i``'s loss ``m_i`` is the mean over the
    contexts ``\\mathcal C_i`` that contain it (0 for a pixel in none), and the batch loss the
    sum over pixels divided by the number ``N_v`` of valid pixels of the batch:

    .. math:: m_i = \\frac{1}{|\\mathcal C_i|}\\sum_{C \\in \\mathcal C_i}
              \\left|\\hat p^C_i - \\hat g^C_i\\right|,\\qquad
              \\mathcal L = \\frac{1}{N_v}\\sum_i m_i

    The contexts are built from ``target`` as given: DR and DP bins follow its values, so
    bins of a disparity target differ from bins of the depth target (train in the space of
    your ground truth, and pass a prediction in the same space).

    Args:
        pred: ``(B, 1, H, W)`` or ``(B, H, W)``.
        target: same shape and device; non-finite values are invalid.
        mask: optional bool mask (``None``: finite target).
        context: ``"dr"`` (depth range), ``"dp"`` (depth percentile), ``"ds"`` (spatial grid),
            or a :class:`hdn.contexts.Contexts` built for this batch (random variants, label
            maps, ...); then ``levels`` is ignored.
        levels: hierarchy depth ``L >= 1``. With ``"ds"``, ``L = 1`` is :func:`ssi_loss`; with
            ``"dr"``/``"dp"`` level 0 still leaves the maximum-depth pixels out (released
            behaviour), so ``L = 1`` differs from :func:`ssi_loss` by those pixels.
        reduction: ``"mean"`` (default) ``L`` above; ``"sum"`` ``sum_i m_i``; ``"per_image"``
            ``(B,)``, image ``b``'s ``sum_{i in b} m_i / N_v,b`` over its own valid pixels
            (0 for an image without any): the loss of that image alone, and ``"mean"`` is
            their average weighted by ``N_v,b``; ``"none"`` the map ``m`` in the input's
            layout, ``(B, 1, H, W)`` or ``(B, H, W)``, 0 at invalid pixels and pixels in no
            context, with ``m.sum() / N_v`` equal to ``"mean"``. Gradients are exact for all.

    Returns:
        the reduced loss, float32 (float64 for float64 inputs); 0 with zero gradient when the
        batch has no valid pixel.

    Examples:
        >>> g = torch.rand(2, 1, 16, 16) + 1
        >>> float(hdn_loss(2 * g + 1, g, context="dp", levels=3)) < 1e-4
        True
        >>> p = torch.rand(2, 1, 16, 16)
        >>> m = hdn_loss(p, g, context="ds", levels=2, reduction="none")
        >>> m.shape
        torch.Size([2, 1, 16, 16])
        >>> bool(torch.isclose(m.sum() / g.numel(), hdn_loss(p, g, context="ds", levels=2)))
        True
    """
    check_reduction(reduction)
    if isinstance(context, str):
        check_levels(levels)
        p, g, valid = check_depth_inputs(pred, target, mask)
        if context not in _contexts.CONTEXT_NAMES:
            raise ValueError(
                f"Invalid context: we expect one of {_contexts.CONTEXT_NAMES} or a Contexts object. Got: {context!r}."
            )
        contexts = _contexts.build_checked(context, g, valid, levels)
        return _output(_engine_loss(p, g, valid, contexts, reduction), pred, reduction)
    return contexts_loss(pred, target, mask, context, reduction=reduction)


def gradient_matching_loss(
    pred: Tensor, target: Tensor, mask: Tensor | None = None, *, scales: int = 4, reduction: str = "mean"
) -> Tensor:
    """Multi-scale gradient matching on the SSI-normalised residual (MiDaS).

    With ``R = p_hat - g_hat`` (image-level SSI normalisation) and ``R^k`` the residual
    subsampled by ``2**k``:

    .. math:: \\mathcal L = \\frac{1}{K}\\sum_{k=0}^{K-1} \\frac{1}{N_v^k}\\sum_i
              \\left(|\\nabla_x R^k_i| + |\\nabla_y R^k_i|\\right)

    where a difference counts only if both of its pixels are valid, and ``N_v^k`` is the
    number of valid pixels at scale ``k`` (a scale without valid pixels adds 0).

    Args:
        pred: ``(B, 1, H, W)`` or ``(B, H, W)``.
        target: same shape; non-finite values are invalid.
        mask: optional bool mask.
        scales: number of scales ``K >= 1``.
        reduction: ``"mean"`` (default) ``L`` above. The other reductions use the map ``m``
            that holds each difference at its first (left or upper) pixel on the full
            grid, weighted ``N_v / (K N_v^k)`` (``N_v = N_v^0``), so that ``m.sum() / N_v``
            is ``L``: ``"sum"`` ``m.sum()``, ``"per_image"`` ``(B,)`` image ``b``'s
            ``sum_{i in b} m_i / N_v,b`` (the weights use the batch's counts, so this is
            the image's share of ``L``, not its loss alone), ``"none"`` the map in the
            input's layout.

    Returns:
        the reduced loss.

    Examples:
        >>> g = torch.rand(1, 1, 16, 16) + 1
        >>> float(gradient_matching_loss(4 * g - 1, g)) < 1e-5
        True
    """
    if isinstance(scales, bool) or not isinstance(scales, int) or scales < 1:
        raise ValueError(f"Invalid scales: we expect an integer >= 1. Got: {scales!r}.")
    check_reduction(reduction)
    p, g, valid = check_depth_inputs(pred, target, mask)
    residual = ssi_normalize(p, valid) - ssi_normalize(g, valid)
    total = residual.sum() * 0  # keeps the graph: a batch without valid pixels gets a zero gradient
    n_valid = int(valid.sum())
    loss_map = residual * 0 if reduction != "mean" else None
    for k in range(scales):
        step = 2**k
        r, v = residual[:, ::step, ::step], valid[:, ::step, ::step]
        vx = v[:, :, 1:] & v[:, :, :-1]
        vy = v[:, 1:, :] & v[:, :-1, :]
        gx = torch.where(vx, (r[:, :, 1:] - r[:, :, :-1]).abs(), 0)
        gy = torch.where(vy, (r[:, 1:, :] - r[:, :-1, :]).abs(), 0)
        n = int(v.sum())
        if not n:
            continue
        if loss_map is None:
            total = total + (gx.sum() + gy.sum()) / n
            continue
        # each difference at its first pixel, (y, x) of scale k at (y * step, x * step)
        at = torch.nn.functional.pad(gx, (0, 1)) + torch.nn.functional.pad(gy, (0, 0, 0, 1))
        weight = n_valid / (scales * n)
        coarse = torch.zeros_like(residual)
        coarse[:, ::step, ::step] = at * weight
        loss_map = loss_map + coarse
    if loss_map is None:
        return total / scales
    return _reduce_map(loss_map, valid, reduction, pred)


def _reduce_map(loss_map: Tensor, valid: Tensor, reduction: str, pred: Tensor) -> Tensor:
    """A ``(B, H, W)`` loss map reduced as ``reduction`` says (not ``"mean"``)."""
    if reduction == "sum":
        return loss_map.sum()
    if reduction == "per_image":
        counts = torch.count_nonzero(valid.reshape(valid.shape[0], -1), dim=1).to(loss_map.dtype)
        return loss_map.flatten(1).sum(1) / counts.clamp(min=1)
    return loss_map.reshape(pred.shape)


class SSILoss(nn.Module):
    """Module form of :func:`ssi_loss`; stores ``reduction`` (shown in the repr unless ``"mean"``).

    Examples:
        >>> g = torch.rand(2, 1, 8, 8) + 1
        >>> SSILoss()(g * 2, g).item() < 1e-4
        True
    """

    def __init__(self, reduction: str = "mean"):
        super().__init__()
        self.reduction = check_reduction(reduction)

    def forward(self, pred: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor:
        return ssi_loss(pred, target, mask, reduction=self.reduction)

    def extra_repr(self) -> str:
        return "" if self.reduction == "mean" else f"reduction={self.reduction!r}"


class HDNLoss(nn.Module):
    """Module form of :func:`hdn_loss`; stores ``context``, ``levels`` and ``reduction``.

    Examples:
        >>> loss = HDNLoss(context="ds", levels=2)
        >>> g = torch.rand(2, 1, 8, 8) + 1
        >>> loss(g * 2, g).item() < 1e-4
        True
    """

    def __init__(self, context: str = "dr", levels: int = 3, reduction: str = "mean"):
        super().__init__()
        check_levels(levels)
        if context not in _contexts.CONTEXT_NAMES:
            raise ValueError(f"Invalid context: we expect one of {_contexts.CONTEXT_NAMES}. Got: {context!r}.")
        self.context, self.levels, self.reduction = context, levels, check_reduction(reduction)

    def forward(self, pred: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor:
        return hdn_loss(pred, target, mask, context=self.context, levels=self.levels, reduction=self.reduction)

    def extra_repr(self) -> str:
        options = f"context={self.context!r}, levels={self.levels}"
        return options if self.reduction == "mean" else f"{options}, reduction={self.reduction!r}"


class GradientMatchingLoss(nn.Module):
    """Module form of :func:`gradient_matching_loss`; stores ``scales`` and ``reduction``."""

    def __init__(self, scales: int = 4, reduction: str = "mean"):
        super().__init__()
        if isinstance(scales, bool) or not isinstance(scales, int) or scales < 1:
            raise ValueError(f"Invalid scales: we expect an integer >= 1. Got: {scales!r}.")
        self.scales, self.reduction = scales, check_reduction(reduction)

    def extra_repr(self) -> str:
        return f"scales={self.scales}" + ("" if self.reduction == "mean" else f", reduction={self.reduction!r}")

    def forward(self, pred: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor:
        return gradient_matching_loss(pred, target, mask, scales=self.scales, reduction=self.reduction)
