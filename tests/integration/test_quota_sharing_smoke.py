"""benchmarks/quota_sharing.py, small and bounded: both settings, 3 s phases, as a user runs
it (real etcd, a sim worker and a two-process gateway on 127.0.0.1). Checks the results file's
structure and that requests were admitted in every phase; rates are not asserted (the short
phases are all burst, and the machine is shared)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_quota_sharing_benchmark_runs_both_settings(tmp_path: Path) -> None:
    out = tmp_path / "quota.json"
    proc = subprocess.run(
        [
            sys.executable, str(ROOT / "benchmarks/quota_sharing.py"),
            "--phase-s", "3", "--quota", "120", "--out", str(out),
        ],
        capture_output=True, text=True, timeout=240, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["quota_per_minute"] == 120
    assert set(result["settings"]) == {"even", "demand"}
    for phases in result["settings"].values():
        assert set(phases) == {"1_connection", "2_connections"}
        for phase in phases.values():
            assert len(phase["admitted_per_second"]) == 3
            assert sum(phase["admitted_per_second"]) > 0
            assert phase["asked_per_s"] == 4.0
    assert set(result["demand_over_even"]) == {"1_connection", "2_connections"}
    assert "demand / even" in proc.stdout
