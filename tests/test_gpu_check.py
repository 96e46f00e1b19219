"""The GPU check (benchmarks/gpu_check.py) runs to the end on the CPU, so that a session lent a
GPU only has to start it (the issue: prepare everything on the CPU first)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


def test_the_gpu_check_runs_on_the_cpu_and_writes_its_tables(tmp_path):
    cmd = [sys.executable, str(SCRIPT), "--device", "cpu", "--quick", "--out", str(tmp_path),
           "--skip", "tests", "notebook"]
    subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=600)
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert result["device"] == "cpu"
    assert all(v["ok"] for v in result["exactness"].values())
    assert set(result["host_syncs"]) == {"ssi", "dr", "dp", "ds"}
    for rows in result["speed"]["scenes"].values():
        assert set(rows) == {"ssi", "dr", "dp", "ds"}
        assert all(row["hdn"] > 0 and row["baseline"] > 0 for row in rows.values())
    step = result["training_step"]
    assert set(step["step_ms"]) == {"l1", "ssi", "dr", "dp", "ds"}
    assert all(0 <= share < 1 for share in step["loss_share"].values())
    text = (tmp_path / "gpu_check.txt").read_text()
    assert "exactness vs reference" in text and "loss share of the step" in text
