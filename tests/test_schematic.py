"""The method figures of notebook 02 (hdn.workbook.schematic) and the README figure."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import pytest
import torch

import hdn
from hdn.workbook.figures import overview_figure
from hdn.workbook.schematic import (
    hdn_schematic,
    near_bump_profile,
    profile_figure,
    profile_normalisations,
)


def _scene():
    g = torch.linspace(2.0, 5.0, 12 * 16).view(1, 12, 16)
    g = g + 0.1 * torch.sin(torch.arange(16.0)).view(1, 1, 16)
    valid = torch.ones_like(g, dtype=torch.bool)
    valid[0, 0, :3] = False
    return g, valid, 2 * g.flip(-1).roll(1, -2) * 0.1 + g


@pytest.mark.parametrize("kind", ["dr", "dp", "ds"])
def test_schematic_has_one_row_per_level_and_ends_in_the_hdn_loss_map(kind):
    g, valid, pred = _scene()
    fig = hdn_schematic(g, valid, pred, kind=kind, levels=3)
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert titles.count("ground truth $g$") == 1
    assert [t for t in titles if t.startswith("level ") and "context" in t] == [
        "level 0: 1 context",
        f"level 1: {2 if kind != 'ds' else 4} contexts",
        f"level 2: {4 if kind != 'ds' else 16} contexts",
    ]
    # the mean's panel shows the per-pixel map whose sum over N_v is hdn_loss
    mean_ax = next(
        ax for ax in fig.axes if ax.get_title() == r"per-pixel mean $\ell_i$ over levels"
    )
    shown = mean_ax.images[0].get_array()
    loss = hdn.hdn_loss(pred, g, valid, context=kind, levels=3)
    assert float(shown.filled(0).sum()) / int(valid.sum()) == pytest.approx(float(loss), rel=1e-5)
    assert len(fig.artists) == 2 * 3  # arrows: ground truth -> each level, each level -> mean


def test_schematic_rejects_unknown_kinds_and_mismatched_shapes():
    g, valid, pred = _scene()
    with pytest.raises(ValueError, match="Invalid kind"):
        hdn_schematic(g, valid, pred, kind="xy")
    with pytest.raises(ValueError, match="Invalid shapes"):
        hdn_schematic(g, valid, pred[..., :-1])


def test_near_context_keeps_the_bump_that_image_level_normalisation_squeezes():
    prof = near_bump_profile(400)
    out = profile_normalisations(prof, levels=3)
    # the near bin of DR level 2 holds the object alone
    assert out.level == 2 and out.near_bin[1] < 20.0 <= float(prof.depth[~prof.near].min())
    assert float(prof.depth.min()) == pytest.approx(1.5 - 0.03 * 0 - 0.0, abs=0.031)
    # image level: s is set by the far plane (metres), so 3 cm are a few thousandths of a unit
    assert out.bump_image_level < 0.005
    # near context: s is the object's own (centimetres), so the bump is about one unit
    assert 0.5 < out.bump_near_context < 3.0
    assert torch.isnan(out.near_context[~prof.near]).all()


def test_profile_normalisations_refuses_a_hierarchy_too_shallow_to_isolate_the_object():
    with pytest.raises(ValueError, match="Invalid levels"):
        profile_normalisations(near_bump_profile(100), levels=1)


def test_near_bump_profile_rejects_bad_arguments():
    with pytest.raises(ValueError, match="Invalid n"):
        near_bump_profile(5)
    with pytest.raises(ValueError, match="Invalid near_fraction"):
        near_bump_profile(100, near_fraction=1.0)
    with pytest.raises(ValueError, match="Invalid near_m"):
        near_bump_profile(100, near_m=(30.0, 31.0))


def test_profile_figure_compares_both_normalisations_on_one_axis():
    prof = near_bump_profile(100)
    fig = profile_figure(prof, profile_normalisations(prof))
    labels = [t.get_text() for t in fig.axes[2].get_legend().get_texts()]
    assert labels[0].startswith("image-level") and labels[1].startswith("near-context")
    assert fig.axes[0].get_ylabel() == "depth (m)"


def test_overview_figure_shows_a_weight_change_not_two_raw_loss_maps_on_one_scale():
    fig = overview_figure(stride=8, levels=2)
    last = next(ax for ax in fig.axes if ax.get_title().startswith("weight change"))
    im = last.images[0]
    assert im.get_clim() == (-2, 2) and im.cmap.name.startswith("RdBu_r")
    # the weight changes of the valid pixels sum to 0: weight moves, it is not added
    assert abs(float(im.get_array().sum())) < 1e-3 * im.get_array().count()
