"""Slow, obvious reference implementations, written line by line from docs/semantics.md.

One boolean mask per context, one context and one image at a time, autograd for the
gradients. They exist to check the fast code (tests) and to measure it against
(``benchmarks/bench.py``); they are also the easiest place for a reader to see what the
losses compute. Inputs are ``(B, H, W)``; masks are boolean ``(B, H, W)``.
"""

from __future__ import annotations

import torch
from torch import Tensor


def valid_mask(target: Tensor, mask: Tensor | None = None) -> Tensor:
    """Finite target, and the user's mask."""
    v = torch.isfinite(target)
    return v if mask is None else v & mask


def normalize(x: Tensor, context: Tensor) -> Tensor:
    """semantics §1: ``(x - t) / (s + 1e-6)`` with ``t`` the lower median over the context and
    ``s = sum |x - t| / (n + 1)``; ``x`` and ``context`` are ``(H, W)``."""
    values = x[context]
    n = values.numel()
    if n == 0:
        t = torch.zeros((), dtype=x.dtype)
    else:
        t = torch.median(values)  # the lower of the two middle values for an even count
    s = (values - t).abs().sum() / (n + 1)
    return (x - t) / (s + 1e-6)


def reduce_map(loss_map: Tensor, valid: Tensor, reduction: str = "mean") -> Tensor:
    """A per-pixel loss map ``(B, H, W)`` reduced: ``"mean"`` its sum over the valid pixels of
    the batch (0 without any), ``"sum"`` its sum, ``"per_image"`` each image's sum over that
    image's valid pixels (0 without any), ``"none"`` the map itself."""
    if reduction == "none":
        return loss_map
    if reduction == "sum":
        return loss_map.sum()
    if reduction == "per_image":
        out = []
        for b in range(loss_map.shape[0]):
            n = valid[b].sum()
            out.append(loss_map[b].sum() / n if n > 0 else loss_map[b].sum() * 0)
        return torch.stack(out)
    if reduction != "mean":
        raise ValueError(f"Invalid reduction: {reduction!r}")
    n_valid = valid.sum()
    if n_valid == 0:
        return loss_map.sum() * 0
    return loss_map.sum() / n_valid


def hierarchical_loss(
    pred: Tensor, target: Tensor, valid: Tensor, contexts: list[Tensor], reduction: str = "mean"
) -> Tensor:
    """semantics §2: per-pixel mean over containing contexts, summed, over the valid count.

    Args:
        pred: ``(B, H, W)``.
        target: ``(B, H, W)``.
        valid: ``(B, H, W)`` bool.
        contexts: list of ``(B, H, W)`` bool masks (intersected with ``valid`` here).
        reduction: see :func:`reduce_map`; the map is each pixel's mean over its contexts.
    """
    B = pred.shape[0]
    zero = torch.zeros((), dtype=pred.dtype)
    g = torch.where(valid, target, zero)
    loss_sum = [torch.zeros_like(pred[b]) for b in range(B)]
    count = [torch.zeros_like(pred[b]) for b in range(B)]
    for context in contexts:
        context = context & valid
        for b in range(B):
            c = context[b]
            p_hat = normalize(pred[b], c)
            g_hat = normalize(g[b], c)
            loss_sum[b] = loss_sum[b] + torch.where(c, (p_hat - g_hat).abs(), zero)
            count[b] = count[b] + c.to(pred.dtype)
    loss_sum, count = torch.stack(loss_sum), torch.stack(count)
    per_pixel = torch.where(count > 0, loss_sum / count.clamp(min=1), zero)
    return reduce_map(per_pixel, valid, reduction)


def pooled_loss(
    pred: Tensor,
    target: Tensor,
    valid: Tensor,
    contexts: list[Tensor],
    detach_pred_median: bool = True,
    reduction: str = "mean",
) -> Tensor:
    """semantics §4: sum of all (context, pixel) losses over the number of pairs; optionally the
    prediction's median without gradient.

    For the other reductions (:func:`reduce_map`) the map is, per pixel, the sum of its
    (context, pixel) losses times ``N_v / pairs``, so that its sum over ``N_v`` is the loss."""
    B = pred.shape[0]
    zero = torch.zeros((), dtype=pred.dtype)
    g = torch.where(valid, target, zero)
    total = zero.clone()
    loss_map = [torch.zeros_like(pred[b]) for b in range(B)]
    pairs = 0
    for context in contexts:
        context = context & valid
        for b in range(B):
            c = context[b]
            values = pred[b][c]
            n = values.numel()
            if n == 0:
                continue
            t = torch.median(values)
            if detach_pred_median:
                t = t.detach()
            s = (values - t).abs().sum() / (n + 1)
            p_hat = (pred[b] - t) / (s + 1e-6)
            g_hat = normalize(g[b], c)
            total = total + (p_hat - g_hat).abs()[c].sum()
            loss_map[b] = loss_map[b] + torch.where(c, (p_hat - g_hat).abs(), zero)
            pairs += n
    if reduction != "mean":
        n_valid = int(valid.sum())
        loss_map = torch.stack(loss_map) * (n_valid / pairs if pairs else 0.0)
        return reduce_map(loss_map, valid, reduction)
    return total / pairs if pairs else pred.sum() * 0


def dr_contexts(target: Tensor, valid: Tensor, levels: int) -> list[Tensor]:
    """semantics §3, DR: ``2**L - 1`` masks, level 0 first."""
    B = target.shape[0]
    out = []
    for level in range(levels):
        w = 1 / 2**level
        for i in range(2**level):
            masks = []
            for b in range(B):
                v = valid[b]
                if not v.any():
                    masks.append(torch.zeros_like(v))
                    continue
                g = target[b]
                lo, hi = g[v].min(), g[v].max()
                m = (g >= lo + (hi - lo) * (i * w)) & (g < lo + (hi - lo) * ((i + 1) * w) + 1e-30)
                masks.append(m & v)
            out.append(torch.stack(masks))
    return out


def dp_contexts(target: Tensor, valid: Tensor, levels: int) -> list[Tensor]:
    """semantics §3, DP: quantile bins with torch.nanquantile (linear interpolation)."""
    B = target.shape[0]
    out = []
    for level in range(levels):
        for i in range(2**level):
            masks = []
            for b in range(B):
                v = valid[b]
                if not v.any():
                    masks.append(torch.zeros_like(v))
                    continue
                g = target[b]
                nan_outside = torch.where(v, g, torch.full_like(g, float("nan"))).reshape(-1)
                lo = torch.nanquantile(nan_outside, i / 2**level)
                hi = torch.nanquantile(nan_outside, (i + 1) / 2**level)
                masks.append((g >= lo) & (g < hi) & v)
            out.append(torch.stack(masks))
    return out


def ds_contexts(shape: tuple[int, int, int], levels: int) -> list[Tensor]:
    """semantics §3, DS: grid cells with Python ``int()`` truncation of the bounds."""
    B, H, W = shape
    out = []
    for level in range(levels):
        w = 1 / 2**level
        for r in range(2**level):
            for c in range(2**level):
                m = torch.zeros(B, H, W, dtype=torch.bool)
                m[:, int(r * w * H) : int((r + 1) * w * H), int(c * w * W) : int((c + 1) * w * W)] = True
                out.append(m)
    return out


def contexts_by_name(name: str, target: Tensor, valid: Tensor, levels: int) -> list[Tensor]:
    if name == "dr":
        return dr_contexts(target, valid, levels)
    if name == "dp":
        return dp_contexts(target, valid, levels)
    if name == "ds":
        return ds_contexts(tuple(target.shape), levels)
    raise ValueError(f"Invalid name: {name!r}")


def hdn_loss(
    pred: Tensor, target: Tensor, mask: Tensor | None = None, context: str = "dr", levels: int = 3, reduction: str = "mean"
) -> Tensor:
    """Reference HDN loss, ``(B, H, W)`` inputs."""
    valid = valid_mask(target, mask)
    g = torch.where(valid, target, torch.zeros((), dtype=target.dtype))
    return hierarchical_loss(pred, target, valid, contexts_by_name(context, g, valid, levels), reduction)


def ssi_loss(pred: Tensor, target: Tensor, mask: Tensor | None = None, reduction: str = "mean") -> Tensor:
    """Reference image-level SSI loss."""
    valid = valid_mask(target, mask)
    return hierarchical_loss(pred, target, valid, [valid], reduction)


def gradient_matching_loss(
    pred: Tensor, target: Tensor, mask: Tensor | None = None, scales: int = 4, reduction: str = "mean"
) -> Tensor:
    """semantics §6, pixel by pixel. For the other reductions (:func:`reduce_map`) the map
    holds each difference at its first (left or upper) pixel, ``(y * 2**k, x * 2**k)`` at
    scale ``k``, times ``N_v / (scales * N_v^k)``."""
    valid = valid_mask(target, mask)
    B = pred.shape[0]
    zero = torch.zeros((), dtype=pred.dtype)
    g = torch.where(valid, target, zero)
    residual = torch.stack([
        torch.where(valid[b], normalize(pred[b], valid[b]) - normalize(g[b], valid[b]), zero) for b in range(B)
    ])
    total = zero.clone()
    n_valid = int(valid.sum())
    cells = [[[[] for _ in range(pred.shape[2])] for _ in range(pred.shape[1])] for _ in range(B)]
    for k in range(scales):
        s = 2**k
        r, v = residual[:, ::s, ::s], valid[:, ::s, ::s]
        n = int(v.sum())
        acc = zero.clone()
        for b in range(B):
            for y in range(r.shape[1]):
                for x in range(r.shape[2]):
                    if x + 1 < r.shape[2] and v[b, y, x] and v[b, y, x + 1]:
                        acc = acc + (r[b, y, x + 1] - r[b, y, x]).abs()
                        cells[b][y * s][x * s].append((r[b, y, x + 1] - r[b, y, x]).abs() * (n_valid / (scales * n)))
                    if y + 1 < r.shape[1] and v[b, y, x] and v[b, y + 1, x]:
                        acc = acc + (r[b, y + 1, x] - r[b, y, x]).abs()
                        cells[b][y * s][x * s].append((r[b, y + 1, x] - r[b, y, x]).abs() * (n_valid / (scales * n)))
        if n:
            total = total + acc / n
    if reduction != "mean":
        loss_map = torch.stack([
            torch.stack([torch.stack([sum(c, zero) for c in row]) for row in image]) for image in cells
        ])
        return reduce_map(loss_map, valid, reduction)
    return total / scales
