"""Notebook 05's slider sweep: its plan, the training curve and kept predictions of a run, the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from hdn.metrics import relief_error
from hdn.toy.experiments import fine_detail as fd
from hdn.toy.experiments import level_sweep as ls

TINY = {"steps": 4, "pool": 8, "batch_size": 2, "test_scenes": 4, "base": 8}


def test_plan_has_every_slider_position_once_per_seed_and_ssi_at_level_one():
    plan = ls.plan()
    assert len(plan) == len(ls.SEEDS) * (1 + 3 * 3 + 1)
    assert len({c.key() for c in plan}) == len(plan)
    first_seed = [(c.arm, c.levels) for c in plan if c.seed == 0]
    assert first_seed[0] == ("ssi", 1) and first_seed[-1][0] == "object"
    assert {(a, lv) for a, lv in first_seed[1:-1]} == {
        (f"hdn-{k}", lv) for k in ls.KINDS for lv in (2, 3, 4)
    }
    # seed by seed, so that an interrupted sweep leaves whole seeds
    assert [c.seed for c in plan] == sorted(c.seed for c in plan)
    for c in plan:
        assert (c.steps, c.curve_points, c.kept_scenes) == (3000, 20, 4)
        assert (c.pool, c.batch_size, c.tilt) == (4096, 12, 0.002)  # attempt 2's setting


def test_arm_config_maps_level_one_of_every_kind_to_the_same_ssi_run():
    keys = {ls.arm_config(k, 1, 0).key() for k in ls.KINDS}
    assert len(keys) == 1
    assert ls.arm_config("ds", 4, 2).arm == "hdn-ds" and ls.arm_config("ds", 4, 2).levels == 4


@pytest.mark.parametrize(
    "kind, level, word", [("xx", 2, "kind"), ("dr", 5, "level"), ("dr", 0, "level")]
)
def test_arm_config_rejects_unknown_positions(kind, level, word):
    with pytest.raises(ValueError, match=word):
        ls.arm_config(kind, level, 0)


def test_a_run_logs_its_curve_and_keeps_the_predictions_it_was_scored_on():
    config = fd.RunConfig(arm="hdn-dr", levels=2, curve_points=2, kept_scenes=2, **TINY)
    row = fd.run(config)
    assert [p["step"] for p in row["curve"]] == [2, 4]
    for point in row["curve"]:
        assert np.isfinite(point["loss"]) and point["loss"] > 0
        assert 0 < point["relief_error_plane"] < 3
    kept = fd.kept_predictions(row)
    assert kept.shape == (2, 32, 32) and kept.dtype == np.float16
    # The kept predictions are those the row's metric was computed on (up to float16 rounding).
    test = fd.make_test_set(config)
    again = relief_error(torch.from_numpy(kept.astype(np.float32))[:, None], test["depth"][:2],
                         test["near"][:2], sigma=fd.SIGMA, erode=fd.ERODE, align="plane",
                         reduction="none")  # fmt: skip
    assert again.tolist() == pytest.approx(row["relief_plane_per_scene"][:2], abs=2e-2)
    # The last curve point is the final model: its relief error is the row's metric.
    assert row["curve"][-1]["relief_error_plane"] == pytest.approx(
        row["metrics"]["relief_error_plane"], rel=1e-9
    )
    assert '"curve_points": 2' in row["key"] and '"kept_scenes": 2' in row["key"]


def test_rows_without_curve_or_kept_scenes_keep_their_old_keys():
    rows = fd.load_rows(name="fine_detail_attempt2.jsonl")
    assert all(fd.RunConfig(**r["config"]).key() == r["key"] for r in rows)
    with pytest.raises(ValueError, match="predictions"):
        fd.kept_predictions(rows[0])


@pytest.mark.parametrize(
    "kwargs, word",
    [({"curve_points": -1}, "curve_points"), ({"kept_scenes": 5, "test_scenes": 4}, "kept_scenes")],
)
def test_run_config_rejects_bad_curve_and_kept_options(kwargs, word):
    with pytest.raises(ValueError, match=word):
        fd.RunConfig(**kwargs)


def test_float16_encoding_round_trips_and_names_a_wrong_dtype():
    x = torch.linspace(-3, 3, 12).view(3, 4)
    assert np.array_equal(fd.decode_float16(fd.encode_float16(x)), x.numpy().astype(np.float16))
    entry = json.loads(json.dumps(fd.encode_float16(x)))  # survives JSON
    assert fd.decode_float16(entry).shape == (3, 4)
    with pytest.raises(ValueError, match="dtype"):
        fd.decode_float16({**entry, "dtype": "float32"})


def test_cli_runs_its_shard_resumes_and_finds_rows(tmp_path, monkeypatch):
    out = tmp_path / "sweep.jsonl"
    monkeypatch.setitem(ls.SETTING, "pool", 8)
    monkeypatch.setitem(ls.SETTING, "base", 8)
    monkeypatch.setitem(ls.SETTING, "curve_points", 2)
    # shard 4/11 of one seed: the 5th run of the plan only (SSI, then DR, DP, DS at L = 2, then DR)
    argv = ["--seeds", "0", "--steps", "2", "--shard", "4/11", "--out", str(out)]
    rows = ls.main(argv)
    assert [(r["config"]["arm"], r["config"]["levels"]) for r in rows] == [("hdn-dr", 3)]
    stored = ls.load_rows(out)
    assert len(stored) == 1 and stored[0]["device"] == "cpu" and "git_commit" in stored[0]
    assert [p["step"] for p in stored[0]["curve"]] == [1, 2]
    assert ls.find_row(stored, "dr", 3, 0) == stored[0]
    assert ls.find_row(stored, "dr", 3, 1) is None and ls.find_row(stored, "dp", 3, 0) is None
    assert ls.main(argv) == []  # resumable: nothing left to run
    with pytest.raises(ValueError, match="shard"):
        ls.main(["--shard", "3/2", "--out", str(out)])


def test_run_calls_back_every_step_with_the_curve_points_and_records_its_device():
    calls = []
    config = fd.RunConfig(arm="ssi", levels=1, curve_points=2, **{**TINY, "steps": 3})
    row = fd.run(config, device="cpu", callback=lambda *args: calls.append(args))
    assert [c[0] for c in calls] == [1, 2, 3]
    assert all(np.isfinite(c[1]) for c in calls)
    points = [c[2] for c in calls]
    assert points[0] is None and points[1:] == row["curve"]  # curve at steps round(3/2) = 2 and 3
    assert row["device"] == "cpu"
