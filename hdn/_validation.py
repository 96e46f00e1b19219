"""Input checks shared by every public function: shapes, devices, dtypes, masks."""

from __future__ import annotations

import torch
from torch import Tensor

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _as_bhw(x: Tensor, name: str) -> Tensor:
    if not isinstance(x, Tensor):
        raise ValueError(f"Invalid {name}: expected a torch.Tensor, got {type(x).__name__}.")
    if x.dim() == 4:
        if x.shape[1] != 1:
            raise ValueError(
                f"Invalid {name} shape: we expect (B, 1, H, W) or (B, H, W). Got: {tuple(x.shape)}."
            )
        return x[:, 0]
    if x.dim() == 3:
        return x
    raise ValueError(
        f"Invalid {name} shape: we expect (B, 1, H, W) or (B, H, W). Got: {tuple(x.shape)}."
    )


def single_image(x: Tensor, name: str) -> Tensor:
    """``(H, W)``, ``(1, H, W)`` or ``(1, 1, H, W)`` -> detached ``(1, H, W)`` on the CPU.

    For the workbook's explorers, which draw with matplotlib: a tensor that requires grad, or
    one on a GPU, would fail at ``.numpy()``.
    """
    if isinstance(x, Tensor) and x.dim() == 2:
        x = x.unsqueeze(0)
    x = _as_bhw(x, name)
    if x.shape[0] != 1:
        raise ValueError(f"Invalid {name} shape: we expect one image (H, W) or (1, H, W). Got: {tuple(x.shape)}.")
    return x.detach().cpu()


def stats_dtype(*tensors: Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32 (half inputs get float32 statistics)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def finite(x: Tensor) -> Tensor:
    """``torch.isfinite(x)`` for floating-point ``x`` in two passes instead of four:
    ``x - x`` is 0 exactly where ``x`` is finite (NaN for NaN and the infinities)."""
    return torch.sub(x, x) == 0


def check_depth_inputs(
    pred: Tensor, target: Tensor, mask: Tensor | None
) -> tuple[Tensor, Tensor, Tensor]:
    """Validate ``pred``, ``target`` and ``mask`` and bring them to ``(B, H, W)``.

    Args:
        pred: prediction, ``(B, 1, H, W)`` or ``(B, H, W)``, floating point.
        target: ground truth, same shape and device as ``pred``, floating point.
        mask: boolean validity mask of the same shape, or ``None`` for "finite target".

    Returns:
        ``(pred, target, valid)``, each ``(B, H, W)``; ``valid`` is ``mask & isfinite(target)``.
        ``pred`` and ``target`` keep their dtypes.
    """
    p = _as_bhw(pred, "pred")
    g = _as_bhw(target, "target")
    if p.shape != g.shape:
        raise ValueError(
            f"Invalid target shape: we expect the shape of pred {tuple(pred.shape)}. "
            f"Got: {tuple(target.shape)}."
        )
    if p.device != g.device:
        raise ValueError(
            f"Invalid target device: we expect pred's device {p.device}. Got: {g.device}."
        )
    for name, t in (("pred", p), ("target", g)):
        if t.dtype not in _FLOAT_DTYPES:
            raise ValueError(
                f"Invalid {name} dtype: we expect float16, bfloat16, float32 or float64. "
                f"Got: {t.dtype}."
            )
    valid = finite(g)
    if mask is not None:
        m = _as_bhw(mask, "mask")
        if m.shape != p.shape:
            raise ValueError(
                f"Invalid mask shape: we expect the shape of pred {tuple(pred.shape)}. "
                f"Got: {tuple(mask.shape)}."
            )
        if m.dtype != torch.bool:
            raise ValueError(f"Invalid mask dtype: we expect torch.bool. Got: {m.dtype}.")
        if m.device != p.device:
            raise ValueError(
                f"Invalid mask device: we expect pred's device {p.device}. Got: {m.device}."
            )
        valid = valid & m
    return p, g, valid


def check_levels(levels: int) -> int:
    if isinstance(levels, bool) or not isinstance(levels, int) or levels < 1:
        raise ValueError(f"Invalid levels: we expect an integer >= 1. Got: {levels!r}.")
    return levels
