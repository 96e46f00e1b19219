"""The workbook's drawing helpers take tensors as the training code holds them.

A prediction fresh from a model requires grad, and may sit on a GPU; matplotlib needs a
NumPy array on the CPU. Each helper detaches and moves its inputs once, so what it draws
equals what it draws from plain CPU tensors.
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pytest
import torch

from hdn.data import blurred, near_far_scene
from hdn.workbook.explorer import ContextExplorer, GridExplorer
from hdn.workbook.gradients import DescentExplorer
from hdn.workbook.schematic import hdn_schematic

DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
    ),
]


@pytest.fixture(scope="module")
def scene():
    depth, valid = near_far_scene(24, 32, seed=2, hole_fraction=0.05)
    return depth, valid, blurred(depth, 1.5)


def _as_from_a_model(depth, valid, pred, device):
    """The scene on ``device``, with a prediction and a depth map that require grad."""
    return (
        depth.to(device).requires_grad_(True),
        valid.to(device),
        (pred.to(device) * 1.0).requires_grad_(True),
    )


def _images(fig):
    return [np.ma.getdata(im.get_array()) for ax in fig.axes for im in ax.images]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("cls", "kind"), [(ContextExplorer, "dr"), (GridExplorer, "ds")])
def test_explorer_renders_tensors_that_require_grad_or_live_on_a_gpu(scene, device, cls, kind):
    depth, valid, pred = scene
    plain = cls(depth, valid, pred, levels=3)
    ex = cls(*_as_from_a_model(depth, valid, pred, device), levels=3)
    assert ex.depth.device.type == "cpu" and not ex.depth.requires_grad
    assert ex.pred.device.type == "cpu" and not ex.pred.requires_grad
    fig, ref = ex.render(kind, 1, 1), plain.render(kind, 1, 1)
    assert fig.get_suptitle() == ref.get_suptitle()
    got, want = _images(fig), _images(ref)
    assert len(got) == len(want) == 4  # context overlay, g_hat, |p_hat - g_hat| over the scene
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert ex.renders == 1 and ex.output.outputs  # the widget drew its first PNG


@pytest.mark.parametrize("device", DEVICES)
def test_schematic_draws_tensors_that_require_grad_or_live_on_a_gpu(scene, device):
    depth, valid, pred = scene
    fig = hdn_schematic(*_as_from_a_model(depth, valid, pred, device), kind="dp", levels=2)
    ref = hdn_schematic(depth, valid, pred, kind="dp", levels=2)
    for a, b in zip(_images(fig), _images(ref), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_descent_explorer_steps_tensors_that_require_grad_or_live_on_a_gpu(scene, device):
    depth, valid, pred = scene
    near = depth < 5
    d, v, p = _as_from_a_model(depth, valid, pred, device)
    ex = DescentExplorer(p, d, v, regions={"near": near.to(device)}, steps=2, max_level=2)
    ref = DescentExplorer(pred, depth, valid, regions={"near": near}, steps=2, max_level=2)
    ex.step.value = ref.step.value = 2
    for a, b in zip(_images(ex.figure), _images(ref.figure), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, equal_nan=True)
