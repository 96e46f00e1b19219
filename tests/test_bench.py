"""The benchmark (benchmarks/bench.py) runs, and its baselines compute the losses they stand
for. Its figures are not tested: speed is measured by running it, never by timed tests."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import hdn
from hdn import reference as ref

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench.py"
_spec = importlib.util.spec_from_file_location("hdn_benchmark", BENCH)
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


@pytest.mark.parametrize("context", ["dr", "dp", "ds"])
def test_the_mask_algorithm_is_the_reference_loss(context):
    gen = torch.Generator().manual_seed(3)
    target = torch.rand(2, 1, 12, 17, generator=gen, dtype=torch.float64) * 4 + 1
    target[0, 0, :3, :4] = float("nan")
    pred = torch.randn(2, 1, 12, 17, generator=gen, dtype=torch.float64)
    p1, p2 = pred.clone().requires_grad_(True), pred.clone().requires_grad_(True)
    got = bench.mask_loss(p1, target, context, 3)
    want = ref.hdn_loss(p2[:, 0], target[:, 0], context=context, levels=3)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    got.backward()
    want.backward()
    torch.testing.assert_close(p1.grad, p2.grad, rtol=1e-8, atol=1e-12)


def test_the_nanmedian_ssi_is_hdn_ssi_on_sparse_targets():
    target = bench.scene_target("lidar", 2, 48).double()
    pred = torch.rand(target.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    torch.testing.assert_close(bench.nanmedian_ssi_loss(pred, target), hdn.ssi_loss(pred, target))


@pytest.mark.parametrize("scene", bench.SCENES)
def test_scene_targets_are_deterministic_and_have_valid_pixels(scene):
    a, b = bench.scene_target(scene, 2, 32), bench.scene_target(scene, 2, 32)
    assert a.shape == (2, 1, 32, 32) and torch.equal(a.nan_to_num(-1), b.nan_to_num(-1))
    assert a.isfinite().any(dim=(1, 2, 3)).all()


def test_goal_rows_judge_each_goal():
    times = {"ramp": {"ssi": {"hdn": 10.0, "nanmedian": 12.0}, "dr": {"hdn": 30.0, "mask": 60.0},
                      "dp": {"hdn": 10.0, "mask": 100.0}, "ds": {"hdn": 10.0, "mask": 200.0}}}
    memory = {"ramp": {"ssi": 10.0, "dr": 40.0, "dp": 20.0, "ds": 20.0}}
    counts = {"dr": {"1": (120, 0), "2": (320, 1)}}
    verdicts = {goal: met for goal, _, met in bench.goal_rows(times, memory, counts)}
    assert verdicts["ramp: SSI no slower than nanmedian"]
    assert not verdicts["ramp: DR >= 3x the mask algorithm"]  # 2x
    assert verdicts["ramp: DP >= 8x the mask algorithm"] and verdicts["ramp: DS >= 15x the mask algorithm"]
    assert not verdicts["ramp: peak memory <= 3x SSI's"]  # 4x
    assert not verdicts["dr: <= 150 top-level ops per level"]  # 160 at L = 2
    assert not verdicts["dr: no host reads"]


def test_the_benchmark_prints_every_table_and_the_goals():
    cmd = [sys.executable, str(BENCH), "--batch", "1", "--size", "32", "--levels", "2", "--rounds", "1",
           "--repeats", "1", "--threads", "1", "--scenes", "ramp", "lidar", "--impls", "hdn", "mask"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=900).stdout
    for scene in ("ramp", "lidar"):
        block = out.split(f"== scene {scene!r} ==")[1].split("==")[0]
        rows = {line.split()[0]: line.split()[1:] for line in block.splitlines()[2:] if line.split()[:1] in (["ssi"], ["dr"], ["dp"], ["ds"])}
        assert set(rows) == set(bench.LOSSES)
        for fields in rows.values():
            hdn_ms, _, base_ms, speedup, _x_ssi, mib, _ = map(float, fields)
            assert hdn_ms > 0 and base_ms > 0 and mib >= 0
            low, high = max(base_ms - 0.05, 0) / (hdn_ms + 0.05), (base_ms + 0.05) / max(hdn_ms - 0.05, 1e-9)
            assert low - 0.005 <= speedup <= high + 0.005  # (each figure rounded as printed)
    assert "top-level ATen operations" in out
    goals = out.split("== goals, run 1:")[1].splitlines()[1:]
    assert goals and all(line[:4] in ("met ", "MISS") for line in goals if line.strip())
