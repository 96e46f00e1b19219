"""The benchmark script runs and reports consistent ratios (its figures are not tested:
speed is measured by ``python -m hdn.bench``, never by timed tests)."""

from __future__ import annotations

import subprocess
import sys


def test_benchmark_prints_time_memory_and_ratios_for_every_loss():
    cmd = [
        sys.executable, "-m", "hdn.bench", "--batch", "1", "--size", "32", "--levels", "3",
        "--rounds", "1", "--repeats", "1", "--threads", "1", "--skip-large",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=600).stdout
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines() if line.split()[:1] in (["ssi"], ["dr"], ["dp"], ["ds"])}
    assert set(rows) == {"ssi", "dr", "dp", "ds"}
    for fields in rows.values():
        hdn_ms, ref_ms, speedup, hdn_mib, ref_mib, mem_ratio, x_ssi = map(float, fields)
        assert hdn_ms > 0 and ref_ms > 0 and hdn_mib >= 0 and ref_mib >= 0 and x_ssi > 0
        assert abs(speedup - ref_ms / hdn_ms) <= 0.05 * speedup + 0.1  # (printed rounded)
        assert abs(mem_ratio - ref_mib / max(hdn_mib, 2**-20)) <= 0.05 * mem_ratio + 0.1 or hdn_mib < 0.1
    assert rows["ssi"][-1] == "1.00"  # ssi_loss against itself
    assert "interleaved rounds" in out
