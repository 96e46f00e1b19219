"""The pre-registered gap dose-response (#29): its plan, gate, trend rule and command."""

from __future__ import annotations

import pytest

from hdn.toy.experiments import gap_dose as gd
from hdn.toy.relief import BACKGROUNDS


def _rows(control=0.5, slope=-0.1, seeds=gd.SEEDS, backgrounds=BACKGROUNDS):
    out = []
    for s in seeds:
        for b in backgrounds:
            values = {"object": control, "ssi": 1.0, "hdn-dr": 1.0 + slope * gd.GAP_RANK[b] + 0.01 * s,
                      "hdn-ds": 0.9}  # fmt: skip
            out += [{"config": {"arm": a, "seed": s, "background": b},
                     "metrics": {"relief_error_plane": v}} for a, v in values.items()]  # fmt: skip
    return out


def test_plan_runs_the_controls_first_then_whole_seeds_then_the_disparity_arm():
    plan = gd.plan()
    assert len(plan) == 5 * 4 + 5 * 4 * 4 + 5 and len({c.key() for c in plan}) == len(plan)
    arms = [c.arm for c in plan]
    assert set(arms[:20]) == {"object"} and "object" not in arms[20:]
    assert {c.background for c in plan[:20]} == set(BACKGROUNDS)
    disparity = [c for c in plan if c.disparity_fraction == 1.0]
    assert plan[-5:] == disparity and {(c.arm, c.background) for c in disparity} == {
        ("ssi", "ground")
    }
    assert all(
        (c.steps, c.levels, c.tilt, c.pool, c.batch_size) == (3000, 3, 0.002, 4096, 12)
        for c in plan
    )
    seeds = [c.seed for c in plan[20:-5]]
    assert seeds == sorted(seeds)  # whole seeds first


def test_control_gate_needs_every_seed_and_every_seed_below_the_gate():
    rows = _rows()
    assert gd.control_passes(rows, "far") is True
    assert gd.control_passes(rows[: len(rows) // 2], "ground") is None  # seeds missing
    failing = _rows(control=0.8)
    assert gd.control_passes(failing, "mid") is False
    assert gd.control_passes(rows, "far", seeds=[0, 1]) is True


def test_trend_is_the_mean_per_seed_slope_over_the_settings_that_passed():
    mean, low, high = gd.trend(_rows(slope=-0.1), "hdn-dr")
    assert (
        mean == pytest.approx(-0.1) and low == pytest.approx(-0.1) and high == pytest.approx(-0.1)
    )
    assert gd.trend(_rows(), "hdn-ds")[0] == pytest.approx(0.0, abs=1e-12)
    # a setting whose control failed is left out of the trend
    rows = [r for r in _rows() if r["config"]["background"] != "ground"]
    rows += [r for r in _rows(control=0.9, slope=5.0) if r["config"]["background"] == "ground"]
    assert gd.trend(rows, "hdn-dr")[0] == pytest.approx(-0.1)
    with pytest.raises(ValueError, match="two settings"):
        gd.trend(_rows(control=0.9), "hdn-dr")


def test_cli_runs_controls_only_and_resumes(tmp_path, monkeypatch):
    monkeypatch.setitem(gd.SETTING, "pool", 8)
    monkeypatch.setitem(gd.SETTING, "base", 8)
    out = tmp_path / "gap.jsonl"
    argv = ["--seeds", "0", "--steps", "1", "--controls-only", "--shard", "1/4", "--out", str(out)]
    rows = gd.main(argv)
    # shard 1 of 4 runs the plan's second run: the control in "mid"
    assert [(r["config"]["arm"], r["config"]["background"]) for r in rows] == [("object", "mid")]
    assert '"background": "mid"' in rows[0]["key"] and rows[0]["device"] == "cpu"
    assert gd.main(argv) == []
    with pytest.raises(ValueError, match="shard"):
        gd.main(["--shard", "4/4", "--out", str(out)])


def _with_scenes(rows):
    return [{**r, "relief_plane_per_scene": [r["metrics"]["relief_error_plane"] + e for e in (-0.01, 0.0, 0.01)]}
            for r in rows]  # fmt: skip


def test_the_disparity_arm_pairs_by_seed_under_its_own_name():
    rows = _rows(seeds=[0, 1], backgrounds=["ground"])
    rows += [{"config": {"arm": "ssi", "seed": s, "background": "ground", "disparity_fraction": 1.0},
              "metrics": {"relief_error_plane": 0.7}} for s in (0, 1)]  # fmt: skip
    ground = gd.setting_rows(rows, "ground")
    assert sorted({r["config"]["arm"] for r in ground}) == sorted(
        ["object", "ssi", "hdn-dr", "hdn-ds", gd.DISPARITY_ARM]
    )
    assert gd.setting_rows(rows, "far") == []
    assert rows[-1]["config"]["arm"] == "ssi"  # the caller's rows are left as they were


def test_differences_follow_the_rule_and_skip_failed_controls_and_lone_seeds():
    rows = _rows(slope=-0.1)
    rows = [r for r in rows if r["config"]["background"] != "mid"]
    rows += [r for r in _rows(control=0.9) if r["config"]["background"] == "mid"]  # gate fails
    rows += [{"config": {"arm": "ssi", "seed": s, "background": "ground", "disparity_fraction": 1.0},
              "metrics": {"relief_error_plane": 0.5}} for s in gd.SEEDS]  # fmt: skip
    rows += [{"config": {"arm": "hdn-dp", "seed": 0, "background": "far"},
              "metrics": {"relief_error_plane": 0.1}}]  # one seed: no interval
    table = {(d["background"], d["arm"], d["baseline"]): d for d in gd.differences(_with_scenes(rows))}
    assert {b for b, _, _ in table} == {"far", "close", "ground"}
    far_dr = table["far", "hdn-dr", "ssi"]
    assert far_dr["seeds"] == 5 and far_dr["mean"] == pytest.approx(-0.3 + 0.02)
    assert far_dr["verdict"] == "keeps finer near detail" and far_dr["high"] < 0
    assert far_dr["boot_low"] <= far_dr["mean"] <= far_dr["boot_high"]
    ground_dr = table["ground", "hdn-dr", "ssi"]  # 0.01 * seed: 0.00 ... 0.04
    assert ground_dr["mean"] == pytest.approx(0.02) and ground_dr["verdict"] == "loses near detail"
    assert table["ground", "hdn-ds", gd.DISPARITY_ARM]["verdict"] == "loses near detail"
    assert ("far", "hdn-dp", "ssi") not in table


def test_dose_response_gives_each_arm_its_interval_and_progress_counts_the_plan():
    rows = _rows(seeds=[0, 1, 2])
    points = {(p["background"], p["arm"]): p for p in gd.dose_response(rows)}
    assert points["far", "object"]["mean"] == pytest.approx(0.5) and points["far", "object"]["seeds"] == 3
    dr = points["close", "hdn-dr"]
    assert dr["low"] < dr["mean"] < dr["high"] and dr["rank"] == 1
    assert gd.dose_response(_rows(seeds=[0])) == []
    planned = gd.plan()
    done = [{"key": c.key()} for c in planned[:7]] + [{"key": "another experiment"}]
    assert gd.progress(done) == (7, len(planned)) == (7, 105)


def test_committed_rows_are_planned_runs_of_one_clean_commit_controls_first():
    rows = gd.load_rows()
    planned = [c.key() for c in gd.plan()]
    keys = [r["key"] for r in rows]
    assert len(keys) == len(set(keys)) and set(keys) <= set(planned)
    assert {(r["git_commit"], r["git_dirty"]) for r in rows} == {(rows[0]["git_commit"], False)}
    # the controls come first: every control's row lies before the first comparison's
    arms = [r["config"]["arm"] for r in rows]
    first_comparison = next((i for i, a in enumerate(arms) if a != "object"), len(rows))
    assert set(planned[:20]) <= set(keys[:first_comparison])
    assert all(gd.control_passes(rows, b) is not None for b in BACKGROUNDS)
