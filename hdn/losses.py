"""SSI and HDN losses: the functional forms and their thin ``nn.Module`` wrappers."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from hdn import contexts as _contexts
from hdn._core.rows import RowHierarchicalSSI, RowLayout
from hdn._core.segments import HierarchicalSSI
from hdn._validation import check_depth_inputs, check_levels, stats_dtype
from hdn.normalization import ssi_normalize

__all__ = [
    "GradientMatchingLoss",
    "HDNLoss",
    "SSILoss",
    "contexts_loss",
    "gradient_matching_loss",
    "hdn_loss",
    "ssi_loss",
]


def contexts_loss(pred: Tensor, target: Tensor, mask: Tensor | None, contexts: _contexts.Contexts) -> Tensor:
    """SSI loss over arbitrary contexts (the common core of :func:`ssi_loss` and :func:`hdn_loss`).

    Args:
        pred: ``(B, 1, H, W)`` or ``(B, H, W)``.
        target: same shape.
        mask: bool mask or ``None``.
        contexts: a :class:`hdn.contexts.Contexts` of the same ``(B, H, W)``.

    Returns:
        scalar loss (float32, or float64 for float64 inputs).
    """
    p, g, valid = check_depth_inputs(pred, target, mask)
    _contexts.check_contexts(contexts, p.shape, p.device, name="context")
    return _checked_loss(p, g, valid, contexts)


def _checked_loss(p: Tensor, g: Tensor, valid: Tensor, contexts: _contexts.Contexts) -> Tensor:
    """:func:`contexts_loss` on inputs from :func:`check_depth_inputs`, ``(B, H, W)``."""
    return _apply_core(*_prepare_core(p, g, valid, contexts))


def _prepare_core(
    p: Tensor, g: Tensor, valid: Tensor, contexts: _contexts.Contexts
) -> tuple[Tensor, Tensor, Tensor, RowLayout | _contexts.Contexts]:
    """Flat statistics-dtype inputs and what the loss runs on: the contexts' row layout
    where they have one (then the contexts themselves are no longer needed), else the
    contexts for the general segment core."""
    dtype = stats_dtype(p, g)
    if valid is not contexts.valid:  # (contexts built here share the mask)
        valid = valid & contexts.valid
    target = g
    p, g = p.to(dtype).reshape(-1), g.to(dtype).reshape(-1)
    # The row core takes nested partitions (DS, DR, DP, whole image) and a finite
    # prediction; a prediction that is not finite at a valid pixel must give a non-finite
    # loss, which the general core reproduces. Invalid pixels never matter.
    finite = bool(torch.isfinite(p.sum()))
    if not finite:
        p = torch.where(valid.reshape(-1), p, 0)
        finite = bool(torch.isfinite(p.sum()))
    rows = contexts.aggregation == "mean" and not contexts.detach_pred_median and finite
    layout = contexts.row_layout(valid, target) if rows else None
    return p, g, valid.reshape(-1), contexts if layout is None else layout


def _apply_core(p: Tensor, g: Tensor, valid: Tensor, core: RowLayout | _contexts.Contexts) -> Tensor:
    if isinstance(core, RowLayout):
        return RowHierarchicalSSI.apply(p, g, core)
    return HierarchicalSSI.apply(p, g, valid, core)


def ssi_loss(pred: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor:
    """Image-level scale-and-shift-invariant mean absolute error.

    .. math:: \\mathcal L = \\frac{1}{\\sum_b n_b}\\sum_b\\sum_{i \\in v_b}
              \\left|\\hat p_i - \\hat g_i\\right|,\\qquad
              \\hat x = \\frac{x - \\operatorname{median}(x)}{\\frac{1}{n+1}\\sum|x - \\operatorname{median}(x)| + 10^{-6}}

    Args:
        pred: ``(B, 1, H, W)`` or ``(B, H, W)``, float16/bfloat16/float32/float64.
        target: same shape and device; non-finite values are invalid.
        mask: optional bool mask of the same shape (``None``: finite target).

    Returns:
        scalar; 0 (with zero gradient) when the batch has no valid pixel.

    Examples:
        >>> g = torch.rand(2, 1, 8, 8) + 1
        >>> float(ssi_loss(3 * g + 5, g)) < 1e-4
        True
    """
    p, g, valid = check_depth_inputs(pred, target, mask)
    return _checked_loss(p, g, valid, _contexts.GridContexts(valid, 1))


def hdn_loss(
    pred: Tensor,
    target: Tensor,
    mask: Tensor | None = None,
    *,
    context: str | _contexts.Contexts = "dr",
    levels: int = 3,
) -> Tensor:
    """Hierarchical depth normalization (HDN) loss.

    Every context ``C`` (a set of valid pixels) normalises prediction and target on its own,
    ``|p_hat_C - g_hat_C|`` per pixel; each pixel's loss is the mean over the contexts that
    contain it, and the batch loss the sum over pixels divided by the number of valid
    pixels (pixels in no context count 0):

    .. math:: \\mathcal L = \\frac{1}{N_v}\\sum_i \\frac{1}{|\\mathcal C_i|}\\sum_{C \\in \\mathcal C_i}
              \\left|\\hat p^C_i - \\hat g^C_i\\right|

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

    Returns:
        scalar; 0 with zero gradient when the batch has no valid pixel.

    Examples:
        >>> g = torch.rand(2, 1, 16, 16) + 1
        >>> float(hdn_loss(2 * g + 1, g, context="dp", levels=3)) < 1e-4
        True
    """
    if isinstance(context, str):
        check_levels(levels)
        p, g, valid = check_depth_inputs(pred, target, mask)
        if context not in _contexts.CONTEXT_NAMES:
            raise ValueError(
                f"Invalid context: we expect one of {_contexts.CONTEXT_NAMES} or a Contexts object. Got: {context!r}."
            )
        prepared = _prepare_core(p, g, valid, _contexts.build_checked(context, g, valid, levels))
        # the contexts built here are gone before the loss runs (their sorted order is as
        # large as an image batch); the row layout holds what the loss needs
        return _apply_core(*prepared)
    return contexts_loss(pred, target, mask, context)


def gradient_matching_loss(
    pred: Tensor, target: Tensor, mask: Tensor | None = None, *, scales: int = 4
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

    Returns:
        scalar.

    Examples:
        >>> g = torch.rand(1, 1, 16, 16) + 1
        >>> float(gradient_matching_loss(4 * g - 1, g)) < 1e-5
        True
    """
    if isinstance(scales, bool) or not isinstance(scales, int) or scales < 1:
        raise ValueError(f"Invalid scales: we expect an integer >= 1. Got: {scales!r}.")
    p, g, valid = check_depth_inputs(pred, target, mask)
    residual = ssi_normalize(p, valid) - ssi_normalize(g, valid)
    total = residual.sum() * 0  # keeps the graph: a batch without valid pixels gets a zero gradient
    for k in range(scales):
        step = 2**k
        r, v = residual[:, ::step, ::step], valid[:, ::step, ::step]
        vx = v[:, :, 1:] & v[:, :, :-1]
        vy = v[:, 1:, :] & v[:, :-1, :]
        gx = torch.where(vx, (r[:, :, 1:] - r[:, :, :-1]).abs(), 0)
        gy = torch.where(vy, (r[:, 1:, :] - r[:, :-1, :]).abs(), 0)
        n = int(v.sum())
        if n:
            total = total + (gx.sum() + gy.sum()) / n
    return total / scales


class SSILoss(nn.Module):
    """Module form of :func:`ssi_loss`.

    Examples:
        >>> g = torch.rand(2, 1, 8, 8) + 1
        >>> SSILoss()(g * 2, g).item() < 1e-4
        True
    """

    def forward(self, pred: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor:
        return ssi_loss(pred, target, mask)


class HDNLoss(nn.Module):
    """Module form of :func:`hdn_loss`; stores ``context`` and ``levels``.

    Examples:
        >>> loss = HDNLoss(context="ds", levels=2)
        >>> g = torch.rand(2, 1, 8, 8) + 1
        >>> loss(g * 2, g).item() < 1e-4
        True
    """

    def __init__(self, context: str = "dr", levels: int = 3):
        super().__init__()
        check_levels(levels)
        if context not in _contexts.CONTEXT_NAMES:
            raise ValueError(f"Invalid context: we expect one of {_contexts.CONTEXT_NAMES}. Got: {context!r}.")
        self.context, self.levels = context, levels

    def forward(self, pred: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor:
        return hdn_loss(pred, target, mask, context=self.context, levels=self.levels)

    def extra_repr(self) -> str:
        return f"context={self.context!r}, levels={self.levels}"


class GradientMatchingLoss(nn.Module):
    """Module form of :func:`gradient_matching_loss`."""

    def __init__(self, scales: int = 4):
        super().__init__()
        if isinstance(scales, bool) or not isinstance(scales, int) or scales < 1:
            raise ValueError(f"Invalid scales: we expect an integer >= 1. Got: {scales!r}.")
        self.scales = scales

    def extra_repr(self) -> str:
        return f"scales={self.scales}"

    def forward(self, pred: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor:
        return gradient_matching_loss(pred, target, mask, scales=self.scales)

