"""Scale-and-shift-invariant (SSI) normalisation of depth maps, per image or per context."""

from __future__ import annotations

import torch
from torch import Tensor

from hdn._core.engine import Segments, normalize
from hdn._validation import _as_bhw, stats_dtype
from hdn.contexts import Contexts

__all__ = ["context_normalize", "ssi_normalize"]


def _flat_inputs(x: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor, tuple[int, ...]]:
    x3 = _as_bhw(x, "x")
    valid = torch.isfinite(x3)
    if mask is not None:
        m = _as_bhw(mask, "mask")
        if m.shape != x3.shape or m.dtype != torch.bool or m.device != x3.device:
            raise ValueError(
                f"Invalid mask: we expect a bool tensor of x's shape {tuple(x3.shape)} on {x3.device}. "
                f"Got: {m.dtype} {tuple(m.shape)} on {m.device}."
            )
        valid = valid & m
    xf = x3.to(stats_dtype(x3)).reshape(-1)
    zero = torch.zeros((), dtype=xf.dtype, device=xf.device)
    return torch.where(valid.reshape(-1), xf, zero), valid.reshape(-1), tuple(x3.shape)


def context_normalize(x: Tensor, contexts: Contexts, level: int = 0, mask: Tensor | None = None) -> Tensor:
    """Normalise ``x`` within each context of one partition level.

    .. math:: \\hat x_i = \\frac{x_i - t_C(x)}{s_C(x) + 10^{-6}},\\quad
              t_C = \\operatorname{median}_{C} x,\\quad s_C = \\frac{1}{|C| + 1}\\sum_{j\\in C}|x_j - t_C|

    where ``C`` is the context that holds pixel ``i`` at that level. Differentiable.
    In the example, level 1 of DR has the bins {1, 2, 3} and {10, 11}; 12 is the maximum
    depth, in no bin (released behaviour), so it gets 0.

    Args:
        x: ``(B, 1, H, W)`` or ``(B, H, W)`` depth or prediction.
        contexts: contexts of the same ``(B, H, W)``; the level must be a partition.
        level: which level.
        mask: optional bool mask; non-finite ``x`` and the contexts' invalid pixels are excluded.

    Returns:
        ``(B, H, W)`` normalised map (float32, or float64 for float64 input), 0 at pixels in
        no context.

    Examples:
        >>> from hdn.contexts import depth_range
        >>> g = torch.tensor([[[1.0, 2.0, 3.0, 10.0, 11.0, 12.0]]])
        >>> context_normalize(g, depth_range(g, levels=2), level=1).round(decimals=2)
        tensor([[[-2.,  0.,  2.,  0.,  3.,  0.]]])
    """
    xf, valid, shape = _flat_inputs(x, mask)
    if tuple(contexts.shape) != shape:
        raise ValueError(f"Invalid contexts: we expect contexts for shape {shape}. Got: {tuple(contexts.shape)}.")
    segments = _partition_level(contexts, level)
    valid = valid & contexts.valid.reshape(-1)
    seg = torch.where(valid, segments.seg, segments.num)
    return normalize(xf, Segments(seg, segments.num, rows=segments.rows)).view(shape)


def _partition_level(contexts: Contexts, level: int) -> Segments:
    """A level as one segment per pixel; ``ValueError`` if some pixel is in two contexts."""
    segments = contexts.segments(level)
    if segments.copies == 1:
        return segments
    N = contexts.valid.numel()
    seg = segments.seg.view(segments.copies, N)
    member = seg < segments.num
    if bool((member.sum(0) > 1).any()):
        raise ValueError(f"Invalid level: level {level} has overlapping contexts; normalise per context instead.")
    return Segments(torch.where(member, seg, 0).sum(0) + torch.where(member.any(0), 0, segments.num), segments.num)


def ssi_normalize(x: Tensor, mask: Tensor | None = None) -> Tensor:
    """Image-level SSI normalisation with the median and the mean absolute deviation.

    .. math:: \\hat x = \\frac{x - t(x)}{s(x) + 10^{-6}},\\quad t = \\operatorname{median}_v x,
              \\quad s = \\frac{1}{n + 1}\\sum_{v}|x - t|

    over the ``n`` valid pixels of each image (the ``n + 1`` is the released code's).

    Args:
        x: ``(B, 1, H, W)`` or ``(B, H, W)``.
        mask: optional bool mask of the same shape; non-finite values are invalid.

    Returns:
        ``(B, H, W)`` normalised map, 0 at invalid pixels.

    Examples:
        >>> ssi_normalize(torch.tensor([[[1.0, 2.0, 4.0]]]))  # t = 2, s = (1 + 0 + 2) / 4
        tensor([[[-1.3333,  0.0000,  2.6667]]])
    """
    from hdn.contexts import whole_image

    x3 = _as_bhw(x, "x")
    return context_normalize(x3, whole_image(x3, mask), 0, mask)
