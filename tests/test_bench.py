"""The benchmark script runs and reports consistent ratios (its figures are not tested:
speed is measured by ``python -m hdn.bench``, never by timed tests)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from hdn.bench import GOALS, SCENES, goal_rows, nanmedian_ssi_loss, scene_target


def _tables(out: str) -> dict[str, dict[str, list[str]]]:
    """Rows of each scene's table: {scene: {loss: fields}}."""
    tables: dict[str, dict[str, list[str]]] = {}
    scene = None
    for line in out.splitlines():
        if line.startswith("== cpu, scene"):
            scene = line.split("'")[1]
            tables[scene] = {}
        elif scene and line.split()[:1] in (["ssi"], ["dr"], ["dp"], ["ds"]):
            tables[scene][line.split()[0]] = line.split()[1:]
    return tables


def _consistent(ratio: float, ratio_half_unit: float, num: float, den: float, half_unit: float) -> bool:
    """Whether a printed ratio agrees with its printed numerator and denominator, given
    that each was rounded to the printed digits (``half_unit``: half the last digit)."""
    low = max(num - half_unit, 0.0) / (den + half_unit)
    high = (num + half_unit) / max(den - half_unit, 1e-12)
    return low - ratio_half_unit - 1e-9 <= ratio <= high + ratio_half_unit + 1e-9


def test_printed_ratio_check_allows_rounding_only():
    assert _consistent(0.8, 0.05, 0.4, 0.4, 0.05)  # 0.36 / 0.44 prints as 0.4 / 0.4 and 0.8
    assert not _consistent(2.0, 0.05, 0.4, 0.4, 0.05)
    assert not _consistent(1.2, 0.005, 12.0, 12.0, 0.005)


def test_benchmark_prints_time_memory_and_ratios_for_every_loss_and_scene():
    cmd = [
        sys.executable, "-m", "hdn.bench", "--batch", "1", "--size", "32", "--levels", "3",
        "--rounds", "1", "--repeats", "1", "--threads", "1", "--skip-large",
        "--scenes", "ramp", "lidar", "--runs", "2",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=600).stdout
    tables = _tables(out)
    assert set(tables) == {"ramp", "lidar"}
    for rows in tables.values():
        assert set(rows) == {"ssi", "dr", "dp", "ds"}
        for fields in rows.values():
            hdn_ms, ref_ms, speedup, hdn_mib, ref_mib, mem_ratio, x_ssi, mem_x_ssi, torch_ms, ratio = map(
                float, fields)
            assert hdn_ms > 0 and ref_ms > 0 and hdn_mib >= 0 and ref_mib >= 0 and x_ssi > 0
            assert mem_x_ssi >= 0
            assert _consistent(speedup, 0.05, ref_ms, hdn_ms, 0.005)
            assert hdn_mib < 0.1 or _consistent(mem_ratio, 0.05, ref_mib, hdn_mib, 0.05)
            assert torch_ms > 0 and _consistent(ratio, 0.005, torch_ms, hdn_ms, 0.005)
        assert rows["ssi"][6] == "1.00"  # ssi_loss against itself
    assert out.count("against the torch.nanmedian version") == 4  # two scenes, two runs
    assert "interleaved rounds" in out
    # a goals table per run: every goal, one figure and verdict per scene
    assert out.count("goals per scene") == 2
    lines = out.splitlines()
    for name, _, _, _ in GOALS:
        rows = [line[len(name):].split() for line in lines if line.startswith(name)]
        assert len(rows) == 2 and all(len(r) == 4 and r[1] in "+-" and r[3] in "+-" for r in rows)
    assert "cpu: goals met on every scene, per run: " in out


def test_goal_rows_apply_each_bound_per_scene():
    row = {"speedup": 60.0, "x_ssi": 3.9, "mem_ratio": 5.0, "mem_x_ssi": 3.0, "torch_over_cpu": 1.5}
    results = {scene: {c: dict(row) for c in ("ssi", "dr", "dp", "ds")} for scene in ("a", "b")}
    results["a"]["ssi"]["over_nanmedian"] = results["b"]["ssi"]["over_nanmedian"] = 1.5
    results["b"]["dr"]["x_ssi"] = 4.01  # one loss over 4x ssi_loss fails that goal on b only
    results["b"]["ds"]["torch_over_cpu"] = float("nan")  # not measured (CUDA)
    got = dict(goal_rows(results))
    assert all(ok for name, cells in got.items() for ok in [cells[0][1]])  # bounds are inclusive
    assert got["every HDN loss <= 4x ssi_loss"] == [(3.9, True), (4.01, False)]
    assert got["torch (CUDA) kernels <= 1.5x the CPU's"][1][1] is None


def test_benchmark_scaling_and_counts_tables():
    cmd = [
        sys.executable, "-m", "hdn.bench", "--levels", "2", "--repeats", "1", "--threads", "1",
        "--skip-large", "--scenes", "ramp", "--batch", "1", "--size", "16", "--rounds", "1",
        "--scaling", "--scaling-sizes", "16", "24", "32", "--counts",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=900).stdout
    scaling = [line.split() for line in out.splitlines() if line.split()[:1] in (["pixels"], ["levels"], ["batch"])]
    assert [r[0] for r in scaling] == ["pixels"] * 3 + ["levels"] * 6 + ["batch"] * 5
    assert [int(r[1]) for r in scaling[:3]] == [16, 24, 32]
    assert {int(r[1]) for r in scaling[3:]} == {16}
    counts = [line.split() for line in out.splitlines()
              if line.split()[:1] in (["ssi"], ["dr"], ["dp"], ["ds"]) and len(line.split()) == 4]
    assert {(c[0], int(c[1])) for c in counts} >= {("ssi", 1), ("dr", 6), ("ds", 6)}
    assert all(int(c[2]) >= 0 and int(c[3]) > 0 for c in counts)


@pytest.mark.parametrize("scene", SCENES)
def test_scene_targets_are_deterministic_and_have_valid_pixels(scene):
    a, b = scene_target(scene, 2, 48), scene_target(scene, 2, 48)
    assert a.shape == (2, 1, 48, 48) and torch.equal(a.isfinite(), b.isfinite())
    assert torch.equal(a.nan_to_num(0), b.nan_to_num(0))
    assert bool(a.isfinite().any(dim=(1, 2, 3)).all()) and bool((a[a.isfinite()] > 0).all())


def test_nanmedian_ssi_matches_hdn_on_sparse_targets():
    import hdn

    g = scene_target("lidar", 3, 40)
    p = torch.rand(g.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert torch.allclose(nanmedian_ssi_loss(p, g.double()), hdn.ssi_loss(p, g.double()), atol=1e-9)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM and clear_refs are Linux's")
def test_peak_memory_is_reset_before_the_measured_call():
    # The lifetime peak counts what came before the call (and, in a worker, the parent's
    # resident set at the fork): after the reset, a freed 64 MiB block is no longer in it.
    import numpy as np

    from hdn.bench import _peak_rss_bytes, _reset_peak_rss, _rss_bytes

    base = _rss_bytes()
    block = np.ones(2**24, dtype=np.float32)  # 64 MiB, touched
    del block
    assert _peak_rss_bytes() - base >= 48 * 2**20
    if not _reset_peak_rss():
        pytest.skip("this kernel does not reset VmHWM")
    base = _rss_bytes()
    assert _peak_rss_bytes() - base < 16 * 2**20
    block = np.ones(2**23, dtype=np.float32)  # 32 MiB
    del block
    assert _peak_rss_bytes() - base >= 24 * 2**20
