"""A small U-Net that maps an RGB image to a depth-like map.

The network ends in a plain 1x1 convolution: no activation, no softplus. The SSI and HDN
losses normalise prediction and target by their own median and mean absolute deviation,
so they are blind to any positive scale and any shift of the prediction; the output is
"depth up to an unknown scale and shift" and needs neither positivity nor units.
Evaluation aligns it to metric depth by least squares (:func:`hdn.metrics.zero_shot_metrics`).

Design choices for a network trained on a CPU and bit-for-bit reproducible:
GroupNorm instead of BatchNorm (no dependence on the batch, same behaviour in train and
eval mode), average pooling and transposed convolutions (deterministic backward passes
on CUDA as well, unlike max pooling and bilinear upsampling).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = ["UNet", "count_parameters"]


def _block(in_channels: int, out_channels: int) -> nn.Sequential:
    groups = 8 if out_channels % 8 == 0 else 1
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.GroupNorm(groups, out_channels),
        nn.ReLU(inplace=True),
        nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
        nn.GroupNorm(groups, out_channels),
        nn.ReLU(inplace=True),
    )


class UNet(nn.Module):
    """U-Net with ``depth`` down/up stages and ``base * 2**k`` channels at stage ``k``.

    Encoder: a double 3x3 convolution block per stage, 2x2 average pooling between stages,
    a bottleneck block with ``base * 2**depth`` channels. Decoder: 2x2 transposed
    convolutions, concatenation with the encoder features of the same size, a double
    convolution block. Head: a 1x1 convolution to one channel, without activation.

    The defaults (``base=16, depth=3``) have about 0.47 M parameters.

    Args:
        in_channels: channels of the input image (3 for RGB).
        base: channels of the first stage.
        depth: number of 2x down-samplings; ``H`` and ``W`` must be divisible by ``2**depth``.

    Shape:
        input ``(B, in_channels, H, W)`` -> output ``(B, 1, H, W)``.

    Examples:
        >>> net = UNet()
        >>> net(torch.rand(2, 3, 32, 48)).shape
        torch.Size([2, 1, 32, 48])
        >>> count_parameters(net) < 1_000_000
        True
    """

    def __init__(self, in_channels: int = 3, base: int = 16, depth: int = 3):
        super().__init__()
        for name, value, low in (
            ("in_channels", in_channels, 1),
            ("base", base, 1),
            ("depth", depth, 0),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"Invalid {name}: we expect an int >= {low}. Got: {value!r}.")
        self.in_channels = in_channels
        self.base = base
        self.depth = depth
        widths = [base * 2**k for k in range(depth + 1)]
        self.encoders = nn.ModuleList(
            _block(c_in, c_out) for c_in, c_out in zip([in_channels, *widths[:-2]], widths[:-1])
        )
        self.bottleneck = _block(widths[-2] if depth else in_channels, widths[-1])
        self.ups = nn.ModuleList(
            nn.ConvTranspose2d(widths[k + 1], widths[k], 2, stride=2)
            for k in reversed(range(depth))
        )
        self.decoders = nn.ModuleList(
            _block(2 * widths[k], widths[k]) for k in reversed(range(depth))
        )
        self.head = nn.Conv2d(widths[0], 1, 1)

    def forward(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor) or x.dim() != 4 or x.shape[1] != self.in_channels:
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(
                f"Invalid input shape, we expect (B, {self.in_channels}, H, W). Got: {got}."
            )
        factor = 2**self.depth
        H, W = x.shape[-2:]
        if H % factor or W % factor:
            raise ValueError(
                f"Invalid input size: we expect H and W divisible by 2**depth = {factor}. Got: {H} x {W}."
            )
        skips = []
        for encoder in self.encoders:
            x = encoder(x)
            skips.append(x)
            x = F.avg_pool2d(x, 2)
        x = self.bottleneck(x)
        for up, decoder, skip in zip(self.ups, self.decoders, reversed(skips)):
            x = decoder(torch.cat([up(x), skip], dim=1))
        return self.head(x)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters of ``model``."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
