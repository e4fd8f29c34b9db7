"""``make up MONITORING=1``: Prometheus comes up with everything ``up`` started, the workers the
control plane placed on Ray (found through its ``/sd/targets``) and the rules; Ctrl-C stops it
with the rest.

Runs ``switchboard up --monitoring --worker-engine sim`` directly (``make up`` would first run
the installer; ``make -n`` shows the Makefile passes ``--monitoring``). Needs Ray: ~1 min.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from controlplane.local.procs import free_port, pid_alive
from tests.helpers import wait_until

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]


def test_makefile_passes_monitoring_to_up() -> None:
    out = subprocess.run(
        ["make", "-n", "up", "MONITORING=1", "UP_ARGS=--prometheus-port 9999"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    ).stdout
    assert "-m controlplane up --monitoring --prometheus-port 9999" in out
    plain = subprocess.run(
        ["make", "-n", "up"], cwd=ROOT, capture_output=True, text=True, timeout=30
    ).stdout
    assert "--monitoring" not in plain


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return json.loads(resp.read())["data"]


def test_up_with_monitoring_scrapes_every_component_and_stops_cleanly(tmp_path: Path) -> None:
    ports = {name: free_port() for name in ("etcd", "grpc", "gateway", "prometheus")}
    state = tmp_path / "state"
    log_path = tmp_path / "up.log"
    argv = [
        sys.executable, "-m", "controlplane", "up", "--monitoring", "--worker-engine", "sim",
        "--etcd-port", str(ports["etcd"]), "--grpc-port", str(ports["grpc"]),
        "--gateway-port", str(ports["gateway"]), "--prometheus-port", str(ports["prometheus"]),
        "--state-dir", str(state),
    ]  # fmt: skip
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            argv,
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    prom = f"http://127.0.0.1:{ports['prometheus']}"
    pids: dict[str, int] = {}
    try:

        def banner() -> str:
            if proc.poll() is not None:
                raise AssertionError(f"up exited early:\n{log_path.read_text()[-3000:]}")
            text = log_path.read_text()
            return text if "Switchboard is up." in text else ""

        text = wait_until(banner, 240, interval_s=1.0, what="the banner")
        assert f"Prometheus      {prom}" in text
        assert f"data source: Prometheus at {prom}" in text
        assert "dashboards/json/*.json" in text
        pids = {k: int(v) for k, v in json.loads((state / "up.pids").read_text()).items()}
        assert "prometheus" in pids
        config = (state / "prometheus" / "prometheus.yml").read_text()
        assert "/sd/targets" in config and "alerts.yml" in config

        def scraped() -> dict[str, int]:
            targets = _get(f"{prom}/api/v1/targets?state=active")["activeTargets"]
            jobs: dict[str, int] = {}
            for t in targets:
                if t["health"] == "up":
                    jobs[t["labels"]["job"]] = jobs.get(t["labels"]["job"], 0) + 1
            want = {
                "switchboard-gateway": 1,
                "switchboard-controlplane": 1,
                "switchboard-node-agent": 2,  # the default two Ray nodes' agents
                "switchboard-worker": 2,  # the default deployment's prefill + decode, on Ray
            }
            return jobs if jobs == want else {}

        wait_until(scraped, 90, interval_s=1.0, what="every component scraped and up")
        groups = _get(f"{prom}/api/v1/rules")["groups"]
        names = {r["name"] for g in groups for r in g["rules"]}
        assert {"SwitchboardSLOFastBurn", "SwitchboardNoLeader"} <= names
        assert all(r["health"] == "ok" for g in groups for r in g["rules"])
        leader = _get(f"{prom}/api/v1/query?query=sum(switchboard_leader)")["result"]
        assert leader and float(leader[0]["value"][1]) == 1.0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    assert proc.returncode == 0, log_path.read_text()[-3000:]
    assert not any(pid_alive(p) for p in pids.values()), pids
