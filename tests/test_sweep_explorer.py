"""Notebook 05's training explorer, driven from Python without a browser."""

from __future__ import annotations

import copy
from dataclasses import asdict

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

from hdn.toy.experiments import fine_detail as fd
from hdn.toy.experiments import level_sweep as ls
from hdn.workbook.sweep_explorer import ALL_SEEDS, SweepData, SweepExplorer, train_live

TINY = {
    "steps": 2,
    "pool": 8,
    "batch_size": 2,
    "test_scenes": 4,
    "base": 8,
    "curve_points": 2,
    "kept_scenes": 2,
}


@pytest.fixture(scope="module")
def rows():
    """A sweep of two seeds made from one real tiny run: each position gets its own metric,
    curve and predictions, so that every control changes what is drawn."""
    base = fd.run(fd.RunConfig(arm="ssi", levels=1, tilt=0.002, **TINY))
    rng = np.random.default_rng(0)
    kept = fd.kept_predictions(base).astype(np.float32)
    out = []
    for seed in (0, 1):
        for config in ls.plan([seed], **TINY):
            row = copy.deepcopy(base)
            row["config"], row["key"] = asdict(config), config.key()
            row["metrics"]["relief_error_plane"] = float(rng.uniform(0.4, 1.0))
            for point in row["curve"]:
                point["relief_error_plane"] = float(rng.uniform(0.4, 1.0))
                point["loss"] = float(rng.uniform(0.1, 1.0))
            noisy = kept + rng.normal(0, 0.1, kept.shape).astype(np.float32)
            row["predictions"] = fd.encode_float16(torch.from_numpy(noisy))
            out.append(row)
    return out


def _png(ex: SweepExplorer) -> str:
    return ex.output.outputs[0]["data"]["image/png"]


def test_every_control_changes_the_figure(rows):
    ex = SweepExplorer(SweepData(rows), kind="dr", level=2)
    assert ex.renders == 1 and ex.data.seeds == (0, 1)
    for control, value in ((ex.kind, "ds"), (ex.level, 4), (ex.seed, 1), (ex.scene, 1), (ex.level, 1),
                           (ex.kind, "dp"), (ex.seed, ALL_SEEDS)):  # fmt: skip
        before, renders = _png(ex), ex.renders
        control.value = value
        assert ex.renders == renders + 1
        assert _png(ex) != before, (control.description, value)
    assert len(ex.seconds) == ex.renders and all(s > 0 for s in ex.seconds)
    assert "DP (depth percentile), L = 1" in ex.figure.get_suptitle()


def test_the_chosen_level_is_bold_and_the_curves_are_the_seeds_mean(rows):
    data = SweepData(rows)
    ex = SweepExplorer(data, kind="ds", level=3)
    panels = ex._live[0]
    widths = {lv: panels.lines["loss", lv].get_linewidth() for lv in ls.LEVELS}
    assert widths[3] > max(w for lv, w in widths.items() if lv != 3)
    mean = np.mean(
        [[p["relief_error_plane"] for p in data.row("ds", 3, s)["curve"]] for s in (0, 1)], axis=0
    )
    assert np.allclose(panels.lines["relief_error_plane", 3].get_ydata(), mean)
    ex.seed.value = 1
    one = [p["relief_error_plane"] for p in data.row("ds", 3, 1)["curve"]]
    assert np.allclose(panels.lines["relief_error_plane", 3].get_ydata(), one)
    # the chosen marker sits on the seeds' mean of the final metric; the star on seed 1's value
    assert panels.chosen.get_ydata()[0] == pytest.approx(np.mean(data.metric("ds", 3)))
    assert panels.chosen_seed.get_ydata()[0] == pytest.approx(data.metric("ds", 3)[1])


def test_level_one_is_the_same_ssi_run_for_every_kind(rows):
    data = SweepData(rows)
    assert data.row("dr", 1, 0) is data.row("ds", 1, 0)
    assert data.context_ids("ds", 1, 0).unique().tolist() == [0]  # one context: the image
    assert int(data.context_ids("ds", 3, 0).max()) + 1 == 16  # level 2: a 4 x 4 grid


def test_render_gives_a_static_figure_of_the_same_view(rows):
    fig = SweepExplorer(SweepData(rows)).render("dp", 4, 0, 1)
    assert isinstance(fig, Figure)
    assert "L = 4" in fig.get_suptitle() and "seed 0" in fig.get_suptitle()


def test_relief_maps_of_a_kept_prediction_match_the_rows_metric_source(rows):
    data = SweepData(rows)
    maps = data.relief("dr", 2, 0, 0)
    assert maps["target"].shape == (32, 32) and maps["interior"].any()
    assert not maps["pred"][~maps["interior"]].any()
    pred = data.prediction("dr", 2, 0, 0)
    depth = data.scenes["depth"][0, 0].double()
    # aligned by least squares: the residual is orthogonal to a constant
    assert float((pred - depth).mean()) == pytest.approx(0.0, abs=1e-6)


def test_incomplete_rows_and_unknown_values_are_refused(rows):
    with pytest.raises(ValueError, match="rows"):
        SweepData([r for r in rows if r["config"]["arm"] != "object"])
    data = SweepData(rows[:-1] + rows[-1:])
    with pytest.raises(ValueError, match="seed"):
        data.curve("dr", 2, 7)
    with pytest.raises(ValueError, match="position"):
        data.row("dr", 2, 9)
    with pytest.raises(ValueError, match="kind"):
        SweepExplorer(data).render("xx", 2)


def test_train_live_trains_the_chosen_position_and_returns_its_curve():
    row, fig = train_live("ds", 2, 4, pool=8, every=2, display=False)
    assert row["config"]["arm"] == "hdn-ds" and row["config"]["levels"] == 2
    assert [p["step"] for p in row["curve"]] == [2, 4]
    assert isinstance(fig, Figure) and len(fig.axes) == 2 and fig.axes[1].lines
    with pytest.raises(ValueError, match="steps"):
        train_live("ds", 2, 0, display=False)


def test_train_live_shows_the_figure_first_and_again_at_every_curve_point(monkeypatch):
    import IPython.display

    images = []

    class Handle:
        def update(self, image):
            images.append(image.data)

    def display(image, display_id):
        images.append(image.data)
        return Handle()

    def run(config, device, callback):  # two curve points, without training
        curve = [{"step": s, "loss": 1 / s, "relief_error_plane": 1 - s / 8} for s in (2, 4)]
        for step in range(1, 5):
            callback(step, 1 / step, curve[step // 2 - 1] if step % 2 == 0 else None)
        return {"curve": curve}

    monkeypatch.setattr(IPython.display, "display", display)
    monkeypatch.setattr(fd, "run", run)
    train_live("dr", 2, 4, pool=8, every=2, display=True)
    assert len(images) == 3
    assert all(png.startswith(b"\x89PNG\r\n\x1a\n") for png in images)
    assert images[0] != images[-1]  # the curves were drawn in


def test_summary_pairs_each_position_with_ssi_by_seed(rows):
    data = SweepData(rows)
    table = data.summary()
    assert next(iter(table)) == "SSI (L = 1)" and list(table)[-1] == "control (object)"
    assert len(table) == 11 and all(len(v) == 10 for v in table.values())
    x, ssi = data.metric("dp", 4), data.metric("dr", 1)
    mean, low, high = fd.paired_t_interval([a - b for a, b in zip(x, ssi)])
    assert table["DP, L = 4"][3:6] == pytest.approx([mean, low, high])
    assert table["DP, L = 4"][0] == pytest.approx(np.mean(x))
    assert table["SSI (L = 1)"][3:6] == [0.0, 0.0, 0.0]
