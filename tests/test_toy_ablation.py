"""hdn.toy.experiments.toy_ablation: the CLI writes one row per run and a figure; summarize's math."""

from __future__ import annotations

import json
import math

import matplotlib
import pytest

from hdn.toy.experiments.toy_ablation import (
    ROW_KEYS,
    format_table,
    load_results,
    main,
    plot_summary,
    summarize,
)
from hdn.toy.synthetic import make_split, save_split

matplotlib.use("Agg")


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "tiny.npz"
    save_split(
        path, {"train": make_split(4, 3, 16, 16), "test": make_split(2, 3, 16, 16, stream=1)}
    )
    return path


def test_cli_writes_one_row_per_run_with_the_schema_and_a_figure(tmp_path, tiny_data):
    out, figure = tmp_path / "ablation.json", tmp_path / "ablation.png"
    argv = [
        "--steps", "2", "--seeds", "0", "--losses", "ssi", "hdn-dr", "--levels", "2",
        "--batch-size", "2", "--base", "8", "--depth", "2", "--data", str(tiny_data),
        "--out", str(out), "--figure", str(figure),
    ]  # fmt: skip
    main(argv)
    report = json.loads(out.read_text())
    assert list(report) == ["meta", "rows"]
    meta, rows = load_results(out)
    assert list(meta) == sorted(meta)
    assert meta["complete"] is True and meta["runs_done"] == meta["runs_planned"] == 2
    assert meta["command"].startswith("python -m hdn.toy.experiments.toy_ablation --steps 2")
    assert meta["elapsed_s"] > 0
    assert "git_commit" in meta and "git_dirty" in meta
    assert [r["loss"] for r in rows] == ["ssi", "hdn-dr"]
    for row in rows:
        assert tuple(row) == ROW_KEYS
        assert (row["levels"], row["seed"], row["steps"], row["device"]) == (2, 0, 2, "cpu")
        assert 0 <= row["delta1"] <= 1 and row["abs_rel"] >= 0 and row["fine_detail_error"] >= 0
        assert row["fine_detail_interior"] >= 0 or math.isnan(row["fine_detail_interior"])
        assert row["wall_time_s"] >= row["train_time_s"] >= 0
    assert figure.stat().st_size > 1000

    # A second call with the same options trains nothing and keeps the rows.
    again = main(argv)
    assert [(r["loss"], r["abs_rel"]) for r in again] == [(r["loss"], r["abs_rel"]) for r in rows]


def _row(loss, seed, abs_rel, delta1=0.5, fine=0.1, steps=10):
    return {"loss": loss, "levels": 3, "seed": seed, "steps": steps, "abs_rel": abs_rel,
            "delta1": delta1, "fine_detail_error": fine, "fine_detail_interior": fine / 2,
            "wall_time_s": 2.0}  # fmt: skip


def test_summarize_gives_mean_and_sample_std_per_loss_in_loss_order():
    rows = [
        _row("hdn-dr", 1, 0.2, fine=0.04),
        _row("ssi", 0, 1.0, delta1=0.2),
        _row("hdn-dr", 0, 0.4, fine=0.02),
        _row("ssi", 1, 2.0, delta1=0.4),
        _row("ssi", 2, 3.0, delta1=0.6),
        _row("ssi", 0, 9.0, steps=20),  # another step count: its own group
    ]
    table = summarize(rows)
    assert [(e["loss"], e["steps"], e["n"]) for e in table] == [
        ("ssi", 10, 3), ("ssi", 20, 1), ("hdn-dr", 10, 2),
    ]  # fmt: skip
    ssi, ssi20, dr = table
    assert ssi["seeds"] == [0, 1, 2]
    assert ssi["abs_rel_mean"] == pytest.approx(2.0) and ssi["abs_rel_std"] == pytest.approx(1.0)
    assert ssi["delta1_mean"] == pytest.approx(0.4) and ssi["delta1_std"] == pytest.approx(0.2)
    assert dr["abs_rel_mean"] == pytest.approx(0.3)
    assert dr["abs_rel_std"] == pytest.approx(math.sqrt(0.02))
    assert dr["fine_detail_error_mean"] == pytest.approx(0.03)
    assert ssi["fine_detail_error_std"] == pytest.approx(0.0, abs=1e-12)
    assert math.isnan(ssi20["abs_rel_std"]) and ssi20["abs_rel_mean"] == 9.0
    text = format_table(table)
    assert text.splitlines()[0].split() == ["loss", "levels", "steps", "n", "abs_rel", "delta1",
                                            "fine_detail_error", "fine_detail_interior"]  # fmt: skip
    assert "2.000 +- 1.000" in text and "nan" in text
    assert "0.0300 +- 0.0141" in format_table(table, digits={"fine_detail_error": 4})


def test_plot_summary_draws_one_bar_per_loss_for_each_metric():
    rows = [_row("ssi", s, 1.0 + s) for s in range(3)] + [_row("hdn-ds", s, 0.5) for s in range(3)]
    fig = plot_summary(rows)
    axes = fig.axes
    assert len(axes) == 4
    assert all(len(ax.patches) == 2 for ax in axes)
    assert [t.get_text() for t in axes[0].get_xticklabels()] == ["ssi", "hdn-ds"]
    assert all(ax.get_ylabel() and ax.get_title() for ax in axes)
    assert fig._suptitle is not None and "3 seed" in fig._suptitle.get_text()
    matplotlib.pyplot.close(fig)


def test_load_results_rejects_a_file_without_rows(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text("[]")
    with pytest.raises(ValueError, match="Invalid results file"):
        load_results(path)


def test_interior_fine_detail_error_ignores_silhouettes_but_not_a_flat_interior():
    import torch

    from hdn.metrics import fine_detail_error
    from hdn.toy.experiments.toy_ablation import interior_fine_detail_error

    d = torch.full((1, 1, 16, 16), 40.0)
    d[..., 4:12, 2:10] = 1.0 + 0.05 * torch.arange(8.0)  # a near box with a relief ramp
    bled = d.clone()
    bled[..., 4:12, 9] = 20.0  # far depth bleeding into the box's right edge column
    kw = {"near_fraction": 64 / 256}
    assert float(fine_detail_error(bled, d, **kw)) > 0.05  # the silhouette spoils the fit
    assert float(interior_fine_detail_error(bled, d, margin=1, **kw)) < 1e-5
    flat = torch.where(d < 2, torch.tensor(1.2), d)  # the box without its relief
    assert float(interior_fine_detail_error(flat, d, margin=1, **kw)) > 0.05
    with pytest.raises(ValueError, match="Invalid margin"):
        interior_fine_detail_error(d, d, margin=-1)
