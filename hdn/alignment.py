r"""Least-squares scale-and-shift alignment of a prediction to a ground truth (MiDaS).

A relative-depth network predicts depth (or inverse depth) only up to an unknown scale
and shift. Before comparing with a ground truth, the prediction is aligned per image by
the scale :math:`s` and shift :math:`t` that minimise the squared error over the valid
pixels (Ranftl et al., "Towards Robust Monocular Depth Estimation: Mixing Datasets for Zero-shot
Cross-dataset Transfer", TPAMI 2022, Sec. 5).
"""

from __future__ import annotations

import torch
from torch import Tensor

from hdn._validation import check_depth_inputs, stats_dtype

__all__ = ["align_least_squares", "compute_scale_and_shift"]

# A prediction whose standard deviation over the valid pixels is below
# ``_SINGULAR_TOL * eps * max|p|`` is treated as constant: at that level the spread is
# rounding noise of the mean, and dividing by it would return an arbitrary scale.
_SINGULAR_TOL = 64.0


def _flatten_inputs(
    pred: Tensor, target: Tensor, mask: Tensor | None
) -> tuple[Tensor, Tensor, Tensor]:
    """Check the inputs and return ``(p, g, valid)`` flattened to ``(B, H*W)``.

    ``p`` and ``g`` are in the compute dtype (float64 if either input is float64, else
    float32); ``valid`` is ``mask & isfinite(target)`` (``isfinite(target)`` alone when
    ``mask`` is None).
    """
    p, g, valid = check_depth_inputs(pred, target, mask)
    dtype = stats_dtype(p, g)
    batch = p.shape[0]
    return (
        p.reshape(batch, -1).to(dtype),
        g.reshape(batch, -1).to(dtype),
        valid.reshape(batch, -1),
    )


def _scale_and_shift(p: Tensor, g: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
    """Per-row least-squares ``(scale, shift)`` of ``p`` onto ``g`` over ``valid``.

    All inputs are ``(B, N)``; ``p`` and ``g`` may hold anything (NaN, inf) where
    ``valid`` is False. Returns two ``(B,)`` tensors; see :func:`compute_scale_and_shift`
    for the singular cases.
    """
    # Zero the invalid entries first (with ``where``, not a product) so that neither the
    # forward values nor the backward pass ever touch a NaN or inf from those pixels.
    p0 = torch.where(valid, p, 0.0)
    g0 = torch.where(valid, g, 0.0)
    n = valid.sum(dim=1).to(p.dtype)
    n_safe = n.clamp(min=1.0)
    p_mean = p0.sum(dim=1) / n_safe
    g_mean = g0.sum(dim=1) / n_safe
    dp = torch.where(valid, p0 - p_mean[:, None], 0.0)
    dg = torch.where(valid, g0 - g_mean[:, None], 0.0)
    var = (dp * dp).sum(dim=1)  # = det(A) / n for the normal matrix A
    cov = (dp * dg).sum(dim=1)

    if p0.shape[1] > 0:
        p_max = p0.detach().abs().amax(dim=1)
    else:
        p_max = p0.new_zeros(p0.shape[0])
    tol = n * (_SINGULAR_TOL * torch.finfo(p.dtype).eps * p_max) ** 2
    singular = (n < 2) | (var.detach() <= tol)

    # The denominator is replaced by 1 in the singular rows so that the unused branch
    # of ``where`` stays finite and its (zero) gradient does not turn into NaN.
    scale = torch.where(singular, 0.0, cov / torch.where(singular, 1.0, var))
    shift = g_mean - scale * p_mean
    return scale, shift


def compute_scale_and_shift(
    pred: Tensor, target: Tensor, mask: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    r"""Compute the per-image least-squares scale and shift that map ``pred`` onto ``target``.

    .. math::

        (s, t) = \arg\min_{s,\,t} \sum_{i \in V} (s\,p_i + t - g_i)^2,
        \qquad
        \begin{pmatrix} \sum p_i^2 & \sum p_i \\ \sum p_i & n \end{pmatrix}
        \begin{pmatrix} s \\ t \end{pmatrix}
        = \begin{pmatrix} \sum p_i g_i \\ \sum g_i \end{pmatrix},

    where :math:`V` is the set of valid pixels of the image and :math:`n = |V|`. The
    2x2 normal equations are solved in closed form, written with centred values for
    numerical accuracy (identical to the MiDaS solution):
    :math:`s = \sum (p_i - \bar p)(g_i - \bar g) / \sum (p_i - \bar p)^2` and
    :math:`t = \bar g - s \bar p`.

    Singular systems are guarded: when an image has fewer than 2 valid pixels, or its
    prediction is constant over them (standard deviation below ``64 * eps * max|p|``
    of the compute dtype), the scale is 0 and the shift is the mean of the valid
    target values (0 if the image has no valid pixel). The result is then the best
    constant fit, and stays finite and differentiable.

    A pixel is valid where ``mask`` is True and ``target`` is finite; non-finite
    target values are always ignored, with or without a mask. The computation runs in
    float32 (float64 if ``pred`` or ``target`` is float64), vectorised over the batch.

    Args:
        pred: the prediction, shape :math:`(B, 1, H, W)` or :math:`(B, H, W)`.
        target: the ground truth, same shape as ``pred``.
        mask: bool validity mask, same shape as ``pred``, or None (every pixel with a
            finite target is valid).

    Returns:
        ``(scale, shift)``, each of shape :math:`(B,)` and dtype ``pred.dtype``.

    Examples:
        >>> pred = torch.tensor([[[1.0, 2.0, 3.0]]])
        >>> target = torch.tensor([[[3.0, 5.0, 7.0]]])
        >>> compute_scale_and_shift(pred, target)
        (tensor([2.]), tensor([1.]))
    """
    p, g, valid = _flatten_inputs(pred, target, mask)
    scale, shift = _scale_and_shift(p, g, valid)
    return scale.to(pred.dtype), shift.to(pred.dtype)


def align_least_squares(
    pred: Tensor, target: Tensor, mask: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    r"""Align ``pred`` to ``target`` per image with the least-squares scale and shift.

    .. math::

        \hat p = s\,p + t, \qquad
        (s, t) = \arg\min_{s,\,t} \sum_{i \in V} (s\,p_i + t - g_i)^2,

    with :math:`V` the valid pixels of the image (``mask`` and finite ``target``).
    The scale and shift come from :func:`compute_scale_and_shift`, including its guard
    for singular systems: an image with fewer than 2 valid pixels or a constant
    prediction gets scale 0 and shift = mean of its valid target values (0 if it has
    none), i.e. a constant aligned prediction. The aligned map is computed for every
    pixel, valid or not. The whole operation is differentiable with respect to
    ``pred`` (and ``target``).

    Args:
        pred: the prediction, shape :math:`(B, 1, H, W)` or :math:`(B, H, W)`.
        target: the ground truth, same shape as ``pred``.
        mask: bool validity mask, same shape as ``pred``, or None (every pixel with a
            finite target is valid).

    Returns:
        ``(aligned, scale, shift)``: the aligned prediction with the shape of ``pred``,
        and the per-image scale and shift of shape :math:`(B,)`; all of dtype
        ``pred.dtype`` (computed in float32, or float64 for float64 inputs).

    Examples:
        >>> pred = torch.tensor([[[[1.0, 2.0, 3.0]]]])
        >>> target = torch.tensor([[[[3.0, 5.0, 7.0]]]])
        >>> aligned, scale, shift = align_least_squares(pred, target)
        >>> aligned
        tensor([[[[3., 5., 7.]]]])
        >>> scale, shift
        (tensor([2.]), tensor([1.]))
    """
    p, g, valid = _flatten_inputs(pred, target, mask)
    scale, shift = _scale_and_shift(p, g, valid)
    aligned = scale[:, None] * p + shift[:, None]
    return (
        aligned.reshape(pred.shape).to(pred.dtype),
        scale.to(pred.dtype),
        shift.to(pred.dtype),
    )
