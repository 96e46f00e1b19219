"""The workbook's scenes: Middlebury "Motorcycle" with metric depth, the near/far toy, blur."""

from __future__ import annotations

import dataclasses
import socket

import pytest
import torch

from hdn import data as hdn_data
from hdn.data import (
    MotorcycleScene,
    NearFarScene,
    blurred,
    middlebury_motorcycle,
    near_far_scene,
)


@pytest.fixture(scope="module")
def motorcycle() -> MotorcycleScene:
    return middlebury_motorcycle()


def test_motorcycle_has_image_depth_disparity_and_mask_of_one_size(motorcycle):
    assert motorcycle.image.shape == (3, 500, 741)
    for t in (motorcycle.depth, motorcycle.disparity, motorcycle.valid):
        assert t.shape == (500, 741)
    assert motorcycle.image.dtype == motorcycle.depth.dtype == torch.float32
    assert motorcycle.valid.dtype == torch.bool
    assert 0.0 <= motorcycle.image.min() and motorcycle.image.max() <= 1.0


def test_motorcycle_depth_is_metric_and_within_the_scene(motorcycle):
    depth = motorcycle.depth[motorcycle.valid]
    assert 2.0 < depth.min().item() < 2.2  # nearest: about 2.1 m
    assert 4.9 < depth.max().item() < 5.1  # farthest: about 5.0 m
    assert 2.5 < depth.median().item() < 3.0
    assert motorcycle.valid.float().mean().item() == pytest.approx(0.9265, abs=1e-3)


def test_motorcycle_depth_follows_the_calibration(motorcycle):
    v = motorcycle.valid
    assert motorcycle.focal_px == 994.978
    assert motorcycle.baseline_m == pytest.approx(0.193001)
    assert motorcycle.doffs_px == 31.086
    expected = (
        motorcycle.baseline_m
        * motorcycle.focal_px
        / (motorcycle.disparity[v].double() + motorcycle.doffs_px)
    )
    torch.testing.assert_close(motorcycle.depth[v].double(), expected, rtol=1e-6, atol=0.0)


def test_motorcycle_unknown_pixels_are_nan_and_invalid(motorcycle):
    assert torch.isfinite(motorcycle.depth[motorcycle.valid]).all()
    assert (motorcycle.depth[motorcycle.valid] > 0).all()
    assert torch.isnan(motorcycle.depth[~motorcycle.valid]).all()
    assert torch.isnan(motorcycle.disparity[~motorcycle.valid]).all()


def test_motorcycle_scene_is_frozen(motorcycle):
    with pytest.raises(dataclasses.FrozenInstanceError):
        motorcycle.depth = motorcycle.depth * 2


def test_motorcycle_loads_without_network(monkeypatch):
    hdn_data._motorcycle_arrays.cache_clear()  # load from disk again, not from the cache

    def refuse(*args, **kwargs):
        raise AssertionError("hdn.data tried to open a network connection")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    scene = middlebury_motorcycle()
    assert scene.depth.shape == (500, 741)


def test_motorcycle_honours_dtype_and_returns_fresh_tensors(motorcycle):
    scene = middlebury_motorcycle(dtype=torch.float64)
    assert scene.depth.dtype == scene.image.dtype == scene.disparity.dtype == torch.float64
    assert scene.valid.dtype == torch.bool
    scene.depth.fill_(0.0)  # must not leak into later calls
    again = middlebury_motorcycle()
    torch.testing.assert_close(again.depth, motorcycle.depth, equal_nan=True)


def test_motorcycle_rejects_a_non_float_dtype():
    with pytest.raises(ValueError, match="dtype"):
        middlebury_motorcycle(dtype=torch.int32)


def test_near_far_scene_has_the_requested_size_and_dtype():
    scene = near_far_scene(40, 72, seed=3)
    assert isinstance(scene, NearFarScene)
    depth, valid = scene
    assert depth.shape == valid.shape == (40, 72)
    assert depth.dtype == torch.float32 and valid.dtype == torch.bool
    assert valid.all() and torch.isfinite(depth).all()
    assert near_far_scene(40, 72, seed=3, dtype=torch.float64).depth.dtype == torch.float64


@pytest.mark.parametrize("seed", [0, 1, 7, 12345])
def test_near_far_scene_separates_a_relieved_near_object_from_a_far_plane(seed):
    depth, _ = near_far_scene(seed=seed)
    near = depth < 5.0
    assert 0.15 < near.float().mean().item() < 0.35
    assert depth[near].min() > 1.0 and depth[near].max() < 2.0
    assert depth[~near].min() >= 20.0 - 1e-4 and depth[~near].max() <= 50.0 + 1e-4
    relief = depth[near].max() - depth[near].min()
    assert 0.02 < relief.item() < 0.2  # centimetres, not metres
    assert depth[near].unique().numel() > 100  # a surface with detail, not a flat card


def test_near_far_scene_is_deterministic_by_seed():
    a, b, c = near_far_scene(seed=5), near_far_scene(seed=5), near_far_scene(seed=6)
    assert torch.equal(a.depth, b.depth) and torch.equal(a.valid, b.valid)
    assert not torch.equal(a.depth, c.depth)


def test_near_far_scene_does_not_touch_the_global_random_state():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    near_far_scene(seed=1, hole_fraction=0.1)
    assert torch.equal(torch.rand(3), expected)


def test_near_far_scene_holes_only_clear_the_mask():
    full = near_far_scene(seed=2)
    holed = near_far_scene(seed=2, hole_fraction=0.1)
    assert torch.equal(full.depth, holed.depth)
    assert 0.07 < (~holed.valid).float().mean().item() < 0.13


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"height": 8}, "height"),
        ({"width": 3.5}, "width"),
        ({"height": True}, "height"),
        ({"seed": "0"}, "seed"),
        ({"hole_fraction": 1.0}, "hole_fraction"),
        ({"hole_fraction": -0.1}, "hole_fraction"),
        ({"dtype": torch.int64}, "dtype"),
    ],
)
def test_near_far_scene_names_the_bad_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        near_far_scene(**kwargs)


@pytest.mark.parametrize("shape", [(9, 13), (2, 9, 13), (2, 1, 9, 13), (1, 5)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_blurred_keeps_constant_maps_constant(shape, dtype):
    flat = torch.full(shape, 7.25, dtype=dtype)
    out = blurred(flat, 2.5)
    assert out.shape == flat.shape and out.dtype == dtype
    torch.testing.assert_close(out, flat)


def test_blurred_smooths_fine_relief_but_keeps_its_mean():
    depth, _ = near_far_scene(seed=0)
    near = depth < 5.0
    rows = near.any(dim=1).nonzero().squeeze(1)
    cols = near.any(dim=0).nonzero().squeeze(1)
    # the object's central patch, far from the background, as a map of its own
    patch = depth[rows[0] + 10 : rows[-1] - 9, cols[0] + 15 : cols[-1] - 14].double()
    assert patch.max() < 5.0
    out = blurred(patch, 2.0)
    assert out.std() < patch.std()
    assert out.mean().item() == pytest.approx(patch.mean().item(), abs=2e-3)


def test_blurred_matches_a_direct_gaussian_on_an_impulse():
    impulse = torch.zeros(21, 21, dtype=torch.float64)
    impulse[10, 10] = 1.0
    out = blurred(impulse, 1.0)
    i = torch.arange(-3, 4, dtype=torch.float64)
    k = torch.exp(-(i**2) / 2.0)
    k = k / k.sum()
    torch.testing.assert_close(out[7:14, 7:14], k[:, None] * k[None, :])
    assert out.sum().item() == pytest.approx(1.0)


def test_blurred_with_zero_sigma_returns_a_copy():
    depth, _ = near_far_scene(seed=0)
    out = blurred(depth, 0)
    assert torch.equal(out, depth) and out.data_ptr() != depth.data_ptr()


def test_blurred_passes_gradients():
    depth = torch.rand(1, 1, 12, 12, dtype=torch.float64, requires_grad=True)
    blurred(depth, 1.5).sum().backward()
    assert depth.grad is not None and torch.isfinite(depth.grad).all()


@pytest.mark.parametrize(
    ("depth", "sigma", "name"),
    [
        (torch.ones(4, 4), -1.0, "sigma"),
        (torch.ones(4, 4), float("nan"), "sigma"),
        (torch.ones(4, 4), "2", "sigma"),
        (torch.ones(4), 1.0, "depth"),
        (torch.ones(4, 4, dtype=torch.int64), 1.0, "depth"),
        ([[1.0, 2.0]], 1.0, "depth"),
    ],
)
def test_blurred_names_the_bad_argument(depth, sigma, name):
    with pytest.raises(ValueError, match=name):
        blurred(depth, sigma)


def test_blurred_float32_is_the_float64_blur_rounded_so_every_machine_agrees():
    depth, _ = near_far_scene(seed=0)
    out = blurred(depth.float(), 2.0)
    assert out.dtype == torch.float32
    assert torch.equal(out, blurred(depth.double(), 2.0).float())
