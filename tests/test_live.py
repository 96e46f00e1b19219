"""hdn.workbook._live: the widgets' in-place redraws show what a full redraw of the figure shows."""

from __future__ import annotations

import base64
import io

import matplotlib
import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from PIL import Image

from hdn.workbook._live import LiveFigure, one_torch_thread
from hdn.workbook.explorer import ContextExplorer, GridExplorer
from hdn.workbook.plotting import figure_png

matplotlib.use("Agg")


def _pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)


def _widget_pixels(ex) -> np.ndarray:
    return _pixels(base64.b64decode(ex.output.outputs[0]["data"]["image/png"]))


@pytest.fixture(scope="module")
def scene():
    torch.manual_seed(0)
    depth = torch.linspace(2.0, 6.0, 40 * 56).view(40, 56) + 0.3 * torch.rand(40, 56)
    valid = torch.ones(40, 56, dtype=torch.bool)
    valid[:5, :7] = False
    return depth, valid, depth + 0.2 * torch.rand(40, 56)


def _assert_same_picture(a: np.ndarray, b: np.ndarray) -> None:
    assert a.shape == b.shape
    differ = np.abs(a - b).max(axis=-1) > 8
    assert differ.mean() < 0.002, f"{differ.sum()} of {differ.size} pixels differ"


def test_live_figure_redraws_only_the_changed_image_and_matches_a_full_draw():
    fig = Figure(figsize=(3, 2), dpi=50, layout="constrained")
    ax = fig.subplots()
    im = ax.imshow(np.zeros((4, 5)), vmin=0, vmax=1)
    ax.set_title("static")
    live = LiveFigure(fig, lambda: [im, *ax.spines.values()])
    first = _pixels(live.png())
    im.set_data(np.eye(4, 5))
    changed = _pixels(live.png())
    assert not np.array_equal(first, changed)
    _assert_same_picture(changed, _pixels(figure_png(fig)))


def test_context_explorer_widget_after_moves_shows_what_a_full_redraw_shows(scene):
    ex = ContextExplorer(*scene, kinds=("dr", "dp"), levels=3)
    first = ex.figure
    for kind, level, index in (("dr", 2, 3), ("dp", 2, 1), ("dp", 0, 0), ("dr", 1, 1)):
        ex.kind.value, ex.level.value, ex.index.value = kind, level, index
        assert ex.figure is first  # one figure, changed in place
        _assert_same_picture(_widget_pixels(ex), _pixels(figure_png(ex.figure)))


def test_grid_explorer_widget_zooms_and_matches_a_full_redraw(scene):
    ex = GridExplorer(*scene, levels=3)
    for level, index in ((2, 5), (2, 15), (1, 2), (0, 0)):
        ex.level.value, ex.index.value = level, index
        _assert_same_picture(_widget_pixels(ex), _pixels(figure_png(ex.figure)))
    assert ex.figure.axes[1].get_xlim() == (-0.5, 55.5)  # level 0: the whole image again


def test_one_torch_thread_restores_the_thread_count():
    before = torch.get_num_threads()
    with one_torch_thread():
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


def test_level_explorer_widget_after_moves_shows_what_a_full_redraw_shows():
    from hdn.toy.models import UNet
    from hdn.workbook.training_explorer import LevelExplorer

    torch.manual_seed(0)
    g = torch.linspace(1.0, 4.0, 256).view(16, 16)
    models = {"a": UNet(base=8, depth=2), "b": UNet(base=8, depth=2)}
    ex = LevelExplorer(models, torch.rand(3, 16, 16), g, levels=3)
    first = ex.figure
    for context, level, model in (("ds", 2, "a"), ("ds", 2, "b"), ("dp", 0, "b"), ("dr", 1, "a")):
        ex.context.value, ex.level.value, ex.model.value = context, level, model
        assert ex.figure is first
        _assert_same_picture(_widget_pixels(ex), _pixels(figure_png(ex.figure)))


def test_descent_explorer_widget_after_moves_shows_what_a_full_redraw_shows():
    from hdn.data import near_far_scene
    from hdn.workbook.gradients import DescentExplorer, smooth_within

    depth, valid = near_far_scene(24, 32, seed=0)
    g, near = depth[None], (depth < 5)[None]
    p0 = torch.where(near, smooth_within(g, near, 3.0), g * (1 + 0.1 * torch.linspace(0, 1, 32)))
    ex = DescentExplorer(p0, g, valid[None], regions={"near": near, "far": ~near}, steps=3, max_level=2)
    for loss, level, step in (("dr", 2, 1), ("ssi", 2, 1), ("ds", 1, 3), ("dp", 2, 0)):
        ex.loss.value, ex.level.value, ex.step.value = loss, level, step
        _assert_same_picture(_widget_pixels(ex), _pixels(figure_png(ex.figure)))
    assert [line.get_visible() for line in ex.figure.axes[1].lines[:4]] == [True, True, True, True]
