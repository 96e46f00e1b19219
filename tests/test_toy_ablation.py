"""hdn.toy.experiments.toy_ablation: the CLI writes one row per run and a figure; summarize's math."""

from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib
import pytest
import tomllib

from hdn.toy import experiments
from hdn.toy.experiments.toy_ablation import (
    RESULTS_DIR,
    ROW_KEYS,
    format_paired_table,
    format_table,
    load_results,
    main,
    paired_differences,
    plot_paired_differences,
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


ROOT = Path(__file__).resolve().parents[1]


def test_committed_results_are_read_by_name_from_the_package():
    assert {"toy_ablation.json", "toy_ablation_600.json"} <= set(experiments.result_names())
    for name, steps in (("toy_ablation.json", 300), ("toy_ablation_600.json", 600)):
        meta, rows = experiments.load_results(name)
        assert meta["steps"] == steps and meta["complete"] is True
        assert len(rows) == meta["runs_done"] == 18
        assert all(tuple(r) == ROW_KEYS and r["steps"] == steps for r in rows)
        # the same file as the path-based reader sees it
        assert load_results(RESULTS_DIR / name) == (meta, rows)


def test_results_folder_is_package_data_with_its_readme():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["hdn.toy.experiments"]
    assert "results/*.json" in patterns and "results/README.md" in patterns
    assert RESULTS_DIR == ROOT / "hdn" / "toy" / "experiments" / "results"
    readme = (RESULTS_DIR / "README.md").read_text()
    for name in experiments.result_names():
        assert f"`{name}`" in readme, name


@pytest.mark.parametrize("bad", ["missing.json", "../results/toy_ablation.json", "README.md", 3])
def test_load_results_by_name_rejects_what_is_not_a_committed_json_file(bad):
    with pytest.raises(ValueError, match="Invalid name"):
        experiments.load_results(bad)


def test_cli_writes_into_the_package_results_folder_by_default():
    from hdn.toy.experiments.toy_ablation import _parser

    args = _parser().parse_args([])
    assert Path(args.out) == RESULTS_DIR / "toy_ablation.json"
    assert Path(args.figure) == RESULTS_DIR / "toy_ablation.png"


def test_paired_differences_pair_runs_by_seed_and_count_wins():
    rows = [
        _row("ssi", 0, 1.0, delta1=0.4), _row("ssi", 1, 2.0, delta1=0.5),
        _row("hdn-dr", 0, 0.5, delta1=0.6), _row("hdn-dr", 1, 2.5, delta1=0.4),
        _row("hdn-ds", 0, 0.9), _row("hdn-ds", 2, 0.1),  # seed 2 has no SSI run to pair with
    ]  # fmt: skip
    paired = paired_differences(rows)
    assert [(p["loss"], p["seeds"]) for p in paired] == [("hdn-dr", [0, 1]), ("hdn-ds", [0])]
    dr = paired[0]
    assert dr["abs_rel_diffs"] == pytest.approx([-0.5, 0.5]) and dr["abs_rel_better"] == 1
    assert dr["delta1_diffs"] == pytest.approx([0.2, -0.1]) and dr["delta1_better"] == 1
    assert dr["delta1_mean"] == pytest.approx(0.05)
    assert paired[1]["abs_rel_diffs"] == pytest.approx([-0.1]) and paired[1]["abs_rel_better"] == 1
    text = format_paired_table(paired, metrics=["abs_rel", "delta1"])
    assert text.splitlines()[1].split() == ["10", "hdn-dr", "+0.000", "(1/2", "better)",
                                            "+0.050", "(1/2", "better)"]  # fmt: skip
    with pytest.raises(ValueError, match="Invalid baseline"):
        paired_differences(rows, baseline=None)


def test_plot_paired_differences_draws_one_dot_per_seed_and_a_zero_line():
    rows = [_row(n, s, 1.0 + s, steps=k) for n in ("ssi", "hdn-dr", "hdn-ds") for s in range(3)
            for k in (10, 20)]  # fmt: skip
    fig = plot_paired_differences(rows, metrics=["abs_rel", "delta1"])
    assert len(fig.axes) == 2
    for ax in fig.axes:
        dots = [line for line in ax.get_lines() if line.get_marker() == "o"]
        assert sum(len(line.get_xdata()) for line in dots) == 2 * 2 * 3  # losses x steps x seeds
        assert any(list(line.get_ydata()) == [0.0, 0.0] for line in ax.get_lines())
        assert ax.get_title() and ax.get_xlabel() and ax.get_ylabel()
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["hdn-dr", "hdn-ds"]
    matplotlib.pyplot.close(fig)
