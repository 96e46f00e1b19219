"""The small U-Net of hdn.toy.models."""

from __future__ import annotations

import pytest
import torch

from hdn.toy.models import UNet, count_parameters


def test_default_unet_has_fewer_than_one_million_parameters():
    assert 100_000 < count_parameters(UNet()) < 1_000_000


@pytest.mark.parametrize("depth", [0, 1, 3])
@pytest.mark.parametrize("size", [(16, 16), (32, 48)])
def test_unet_maps_rgb_to_a_one_channel_map_of_the_same_size(depth, size):
    net = UNet(base=8, depth=depth)
    out = net(torch.rand(2, 3, *size))
    assert out.shape == (2, 1, *size) and torch.isfinite(out).all()


def test_unet_output_is_unconstrained_in_sign():
    torch.manual_seed(0)
    out = UNet(base=8)(torch.rand(4, 3, 16, 16))
    assert out.min() < 0 < out.max()  # no activation: the SSI losses are affine invariant


@pytest.mark.parametrize("size", [(20, 16), (16, 12), (7, 8)])
def test_unet_rejects_sizes_not_divisible_by_two_to_the_depth(size):
    with pytest.raises(ValueError, match="divisible"):
        UNet(depth=3)(torch.rand(1, 3, *size))


def test_unet_rejects_wrong_channels_and_bad_options():
    with pytest.raises(ValueError, match="we expect"):
        UNet()(torch.rand(1, 1, 16, 16))
    with pytest.raises(ValueError):
        UNet()(torch.rand(3, 16, 16))
    for bad in ({"depth": -1}, {"base": 0}, {"in_channels": 2.0}):
        with pytest.raises(ValueError):
            UNet(**bad)


def test_unet_is_deterministic_and_batch_independent():
    torch.manual_seed(1)
    net = UNet(base=8).eval()
    x = torch.rand(3, 3, 16, 16)
    with torch.no_grad():
        full, single = net(x), net(x[1:2])
    assert torch.equal(full, net(x).detach())
    torch.testing.assert_close(full[1:2], single)  # GroupNorm: no batch statistics


def test_every_parameter_receives_a_gradient():
    net = UNet(base=8, depth=2)
    net(torch.rand(2, 3, 16, 16)).square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())
