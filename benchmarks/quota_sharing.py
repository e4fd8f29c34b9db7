#!/usr/bin/env python
"""Quota sharing between gateway replicas: demand against an even split, side by side.

One tenant may send ``--quota`` requests a minute. A client asks twice that, at a steady
rate, of ``switchboard gateway --processes 2`` (two replicas behind one port; the kernel gives
each *connection* to one of them), first over one keep-alive connection, then over two. The
same run is made with ``--quota-sharing even`` (each replica enforces quota / 2) and with
``--quota-sharing demand`` (each replica's part follows what its clients ask,
controlplane/core/quota_shares.py). Everything runs on 127.0.0.1 (etcd, one sim worker of role
both, the gateway), one fresh stack per setting, stopped by PID at the end.

Per phase: requests admitted (200) in each second, and the steady rate, the mean over the
phase's last third (after the buckets' one-minute burst is spent and the shares settle).
Compared: each setting's steady rate as a fraction of the quota, and demand / even.

Usage::

    .venv/bin/python benchmarks/quota_sharing.py                # ~7 minutes
    .venv/bin/python benchmarks/quota_sharing.py --quick        # smoke: 8 s phases

Writes ``--out`` (default benchmarks/results/quota_sharing.json) and prints a table.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.gateway_overhead import exit_on_sigterm  # noqa: E402
from controlplane.adapters.etcd.client import EtcdClient  # noqa: E402
from controlplane.adapters.etcd.tenants import EtcdTenantStore  # noqa: E402
from controlplane.core.tenants import Quotas, Tenant  # noqa: E402
from controlplane.local.procs import EtcdServer, ManagedProcess  # noqa: E402

PYTHON = sys.executable
MODEL = "llama-3.1-8b"
SETTINGS = ("even", "demand")


def wait_for(check: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"timed out after {timeout_s}s waiting for {what}")


def get(port: int, path: str, key: str = "") -> tuple[int, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path, headers={"authorization": f"Bearer {key}"} if key else {})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def create_tenant(etcd: str, quota: int) -> str:
    async def run() -> str:
        client = EtcdClient(etcd)
        try:
            tenant = Tenant("capped", ("*",), (), quotas=Quotas(requests_per_minute=quota))
            return (await EtcdTenantStore(client).create(tenant)).api_key
        finally:
            await client.close()

    return asyncio.run(run())


def start(tmp: Path, command: str, etcd: str, args: list[str]) -> tuple[ManagedProcess, int]:
    """``switchboard COMMAND --etcd ETCD ARGS`` once it serves, and its (first) port."""
    port_file = tmp / f"{command}.port"
    argv = [PYTHON, "-m", "controlplane", command, "--etcd", etcd, "--port-file", str(port_file)]
    proc = ManagedProcess(command, [*argv, *args], tmp / f"{command}.log").start()

    def ready() -> bool:
        if not proc.alive():
            raise RuntimeError(f"{command} exited:\n{proc.tail()}")
        return port_file.exists() and port_file.read_text().strip() != ""

    wait_for(ready, 60, f"{command} to serve")
    return proc, int(port_file.read_text().split()[0])


def drive(port: int, key: str, connections: int, rate: float, seconds: int) -> list[int]:
    """Ask ``rate`` requests/s over ``connections`` keep-alive connections (in turn) for
    ``seconds``; the requests admitted in each second."""
    body = json.dumps({"model": MODEL, "prompt": "hi", "max_tokens": 1})
    headers = {"content-type": "application/json", "authorization": f"Bearer {key}"}
    conns = [http.client.HTTPConnection("127.0.0.1", port, timeout=30) for _ in range(connections)]
    admitted = [0] * seconds
    start_t = time.monotonic()
    i = 0
    try:
        while time.monotonic() - start_t < seconds:
            due = start_t + i / rate
            if (wait := due - time.monotonic()) > 0:
                time.sleep(wait)
            conn = conns[i % connections]
            conn.request("POST", "/v1/completions", body=body, headers=headers)
            resp = conn.getresponse()
            resp.read()
            second = int(time.monotonic() - start_t)
            if resp.status == 200 and second < seconds:
                admitted[second] += 1
            i += 1
    finally:
        for conn in conns:
            conn.close()
    return admitted


def run_setting(a: argparse.Namespace, sharing: str) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix=f"quota-{sharing}-"))
    etcd = EtcdServer(tmp / "etcd", log_path=tmp / "etcd.log").start()
    procs: list[ManagedProcess] = []
    try:
        key = create_tenant(etcd.endpoint, a.quota)
        worker_args = ["--engine", "sim", "--profile", "llama-3.1-8b-h100", "--model", MODEL,
                       "--role", "both", "--worker-id", "w1"]  # fmt: skip
        procs.append(start(tmp, "worker", etcd.endpoint, worker_args)[0])
        gateway_args = ["--listen", "127.0.0.1:0", "--grpc-listen", "", "--processes", "2",
                        "--quota-sharing", sharing]  # fmt: skip
        gateway, port = start(tmp, "gateway", etcd.endpoint, gateway_args)
        procs.append(gateway)
        wait_for(
            lambda: all(get(port, "/health")[1].get("replicas") == 2 for _ in range(6)),
            30,
            "both processes to see both replicas",
        )
        wait_for(lambda: get(port, "/v1/models", key)[0] == 200, 30, "the tenant's key")
        rate = 2 * a.quota / 60.0
        phases = {}
        for connections in (1, 2):
            per_second = drive(port, key, connections, rate, a.phase_s)
            tail = per_second[-max(1, a.phase_s // 3) :]
            steady = sum(tail) / len(tail)
            phases[f"{connections}_connection{'s' if connections > 1 else ''}"] = {
                "asked_per_s": round(rate, 3),
                "admitted_per_second": per_second,
                "steady_per_s": round(steady, 3),
                "steady_of_quota": round(steady / (a.quota / 60.0), 3),
            }
            print(
                f"  {sharing:6} {connections} connection(s): steady {steady:.2f}/s "
                f"({steady / (a.quota / 60.0):.2f}x the quota)",
                flush=True,
            )
        return phases
    finally:
        for proc in reversed(procs):
            proc.stop()
        etcd.stop()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else "")
    p.add_argument("--quota", type=int, default=600, help="the tenant's requests per minute")
    p.add_argument("--phase-s", type=int, default=100, help="seconds per phase")
    p.add_argument("--quick", action="store_true", help="smoke run: 8 s phases")
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/quota_sharing.json"))
    a = p.parse_args()
    if a.quick:
        a.phase_s = 8
    exit_on_sigterm()
    results = {}
    for sharing in SETTINGS:
        print(f"quota sharing: {sharing}", flush=True)
        results[sharing] = run_setting(a, sharing)
    comparison = {
        phase: round(
            results["demand"][phase]["steady_per_s"]
            / max(results["even"][phase]["steady_per_s"], 1e-9),
            3,
        )
        for phase in results["demand"]
    }
    out = {
        "benchmark": "quota_sharing",
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": {"python": platform.python_version(), "machine": platform.machine()},
        "quota_per_minute": a.quota,
        "phase_s": a.phase_s,
        "settings": results,
        "demand_over_even": comparison,
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1) + "\n")
    print()
    print(f"tenant quota {a.quota}/min ({a.quota / 60:.1f}/s), asked at twice that; steady rate")
    print(f"{'setting':8} | {'1 connection':>16} | {'2 connections':>16}")
    for sharing in SETTINGS:
        cells = [
            f"{v['steady_per_s']:.2f}/s {v['steady_of_quota']:.2f}x"
            for v in results[sharing].values()
        ]
        print(f"{sharing:8} | {cells[0]:>16} | {cells[1]:>16}")
    print(f"demand / even: {comparison}")
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
