#!/usr/bin/env python
"""Registry scale: N simulated node agents heartbeating through one etcd on this machine.

Everything runs on 127.0.0.1, is started here and is stopped by PID at the end:

* one etcd (``controlplane.local.procs.EtcdServer``);
* the real control plane, ``python -m controlplane controlplane`` (replica ``bench``);
* K agent shards: this file re-invoked with ``--agent-shard``. Each shard runs N/K real
  ``NodeAgent`` coroutines over real ``EtcdNodeRegistry`` / ``EtcdClient`` objects; a thin
  subclass of the registry only counts and times ``register`` / ``keepalive`` calls.

Phases, in order:

1. **Cold registration.** All shards connect, then start their agents at one instant (t0).
   Reported: per-agent registration latency, and when the control plane's cache holds all N
   nodes (``GetStatus.node_count`` polled every 100 ms, confirmed by ``ListNodes``).
2. **Steady state** (``--steady-seconds``): keepalives completed per second across all shards
   (sum over agents of 1 / own refresh period, from each ack's timestamp), against the rate
   the agents must sustain, N / (TTL/3); keepalive latency; failures and lost leases; CPU and
   RSS of etcd, the control plane and the shards (psutil, every second); etcd's own counters
   from ``/metrics``.
3. **Restarted control plane.** A second control-plane process is started with N nodes
   registered; reported: time to its port file, and to ``ListNodes`` returning N.
4. **Failure detection.** The shards holding exactly ``--kill-fraction`` of the agents are
   SIGKILLed at t_kill, so their leases are *not* revoked and expire by TTL, as when hosts die.
   A ``WatchNodes`` stream on the control plane (and, to split the delay, a raw etcd watch)
   timestamps each DELETED event. Victim shards log every keepalive ack, so each killed node's
   expected detection time, last ack + TTL, is known and reported next to the measured one.

Usage (from the repository root)::

    .venv/bin/python benchmarks/registry_scale.py --quick      # 200 nodes, TTL 3 s, 5 s window
    .venv/bin/python benchmarks/registry_scale.py              # 1,000 nodes, TTL 10 s
    .venv/bin/python benchmarks/registry_scale.py --nodes 10000 \\
        --out benchmarks/results/registry_scale_10k.json

Writes ``--out`` (JSON) and prints a summary. Every wait is bounded; the shards also exit on
their own after ``--max-run-seconds`` or when this process dies.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import logging
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any, TextIO

import grpc
import psutil
from switchboard.v1 import control_plane_pb2, control_plane_pb2_grpc, nodes_pb2, nodes_pb2_grpc

from controlplane.adapters.etcd.client import EtcdClient, LeaseNotFound
from controlplane.adapters.etcd.nodes import DEFAULT_PREFIX, EtcdNodeRegistry, InventoryRecord
from controlplane.core.model import NodeInventory
from controlplane.errors import SwitchboardError
from controlplane.local.procs import EtcdServer, ManagedProcess, stop_pid
from controlplane.nodeagent.agent import NodeAgent
from controlplane.nodeagent.inventory import DeclaredGpus, DeclaredProbe, declared_gpus

log = logging.getLogger("registry_scale")

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "benchmarks" / "results" / "registry_scale.json"
MAX_NODES = 10_000
GPUS_PER_NODE = 8
STATS_INTERVAL_S = 1.0
# Clients of the control plane read whole listings: 10,000 nodes are ~15 MB of protobuf.
GRPC_CLIENT_OPTIONS = [("grpc.max_receive_message_length", 512 * 1024 * 1024)]


# --- small helpers ---------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0..100) by linear interpolation; None for no values."""
    if not values:
        return None
    s = sorted(values)
    k = (len(s) - 1) * q / 100.0
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def distribution(values: Sequence[float], digits: int = 3) -> dict[str, Any]:
    def r(x: float | None) -> float | None:
        return None if x is None else round(x, digits)

    return {
        "count": len(values),
        "min": r(min(values)) if values else None,
        "p50": r(percentile(values, 50)),
        "p90": r(percentile(values, 90)),
        "p99": r(percentile(values, 99)),
        "max": r(max(values)) if values else None,
        "mean": r(sum(values) / len(values)) if values else None,
    }


def iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="milliseconds")


def node_name(shard: int, i: int) -> str:
    return f"sim-{shard:03d}-{i:05d}"


def rnd(x: float | None, digits: int = 3) -> float | None:
    return None if x is None else round(x, digits)


# =============================================================================================
# Agent shard (child process): many real NodeAgents on one event loop
# =============================================================================================


@dataclass
class ShardCounters:
    ka_ok: int = 0
    ka_fail: int = 0  # keepalive failed, lease not known gone (agent retries the same lease)
    lease_lost: int = 0  # keepalive answered "lease not found": the agent registers again
    reg_ok: int = 0
    reg_fail: int = 0
    agent_exits: int = 0  # NodeAgent.run() ended with an error (should stay 0)
    ka_done: list[tuple[float, float, int]] = field(default_factory=list)  # (ack, ms, agent)
    reg_lat_ms: list[float] = field(default_factory=list)
    reg_first: list[float] = field(default_factory=list)  # each agent's first registration

    def line(self, now: float, registered: int) -> dict[str, Any]:
        """A cumulative snapshot plus the samples since the previous one (then cleared)."""
        out: dict[str, Any] = {
            "k": "stats",
            "t": round(now, 4),
            "ka_ok": self.ka_ok,
            "ka_fail": self.ka_fail,
            "lease_lost": self.lease_lost,
            "reg_ok": self.reg_ok,
            "reg_fail": self.reg_fail,
            "agent_exits": self.agent_exits,
            "registered": registered,
            "ka": [[round(t, 4), round(ms, 2), i] for t, ms, i in self.ka_done],
            "reg_lat": [round(x, 2) for x in self.reg_lat_ms],
            "reg_first": [round(x, 4) for x in self.reg_first],
        }
        self.ka_done.clear()
        self.reg_lat_ms.clear()
        self.reg_first.clear()
        return out


class CountingRegistry(EtcdNodeRegistry):
    """The project's registry, unchanged, with every register/keepalive counted and timed."""

    def __init__(
        self,
        client: EtcdClient,
        prefix: str,
        counters: ShardCounters,
        trace: Callable[[str, float], None] | None,
    ) -> None:
        super().__init__(client, prefix)
        self._c = counters
        self._trace = trace
        self._node_of_lease: dict[int, tuple[str, int]] = {}  # lease -> (node id, agent index)
        self._registered_once: set[str] = set()

    async def register(self, inv: NodeInventory, ttl_s: int) -> int:
        start = time.perf_counter()
        try:
            lease = await super().register(inv, ttl_s)
        except SwitchboardError:
            self._c.reg_fail += 1
            raise
        now = time.time()
        self._c.reg_ok += 1
        self._c.reg_lat_ms.append((time.perf_counter() - start) * 1000.0)
        if inv.node_id not in self._registered_once:
            self._registered_once.add(inv.node_id)
            self._c.reg_first.append(now)
        self._node_of_lease[lease] = (inv.node_id, int(inv.node_id.rsplit("-", 1)[1]))
        if self._trace is not None:
            self._trace(inv.node_id, now)
        return lease

    async def keepalive(self, lease_id: int) -> int:
        start = time.perf_counter()
        try:
            ttl = await super().keepalive(lease_id)
        except LeaseNotFound:
            self._c.lease_lost += 1
            raise
        except SwitchboardError:
            self._c.ka_fail += 1
            raise
        now = time.time()
        self._c.ka_ok += 1
        node_id, index = self._node_of_lease.get(lease_id, (f"lease-{lease_id:x}", -1))
        self._c.ka_done.append((now, (time.perf_counter() - start) * 1000.0, index))
        if self._trace is not None:
            self._trace(node_id, now)
        return ttl


def make_agent(
    registry: EtcdNodeRegistry, node_id: str, shard: int, ttl_s: int, report_s: float
) -> NodeAgent:
    base = NodeInventory(
        node_id=node_id,
        labels={"zone": f"zone-{shard % 4}", "bench": "registry-scale"},
        hostname=node_id,
        address="127.0.0.1",
        agent_version="bench",
    )
    probe = DeclaredProbe(declared_gpus(DeclaredGpus(count=GPUS_PER_NODE), node_id))
    return NodeAgent(
        registry, probe, base, clock=time.time, lease_ttl_s=ttl_s, report_interval_s=report_s
    )


async def _run_agent(agent: NodeAgent, delay_s: float, counters: ShardCounters) -> None:
    if delay_s > 0:
        await asyncio.sleep(delay_s)
    try:
        await agent.run()
    except asyncio.CancelledError:
        raise
    except Exception:
        counters.agent_exits += 1
        log.exception("agent stopped")


async def _warm_up(client: EtcdClient, deadline: float) -> None:
    """Open the client's channel with one cheap read, so connecting is not in the timed part."""
    while True:
        try:
            await client.get_range(b"/bench-warmup/", b"/bench-warmup0")
            return
        except SwitchboardError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


def _read_go_time(go_file: Path) -> float | None:
    try:
        return float(go_file.read_text())
    except (OSError, ValueError):
        return None


async def _wait_go(go_file: Path, deadline: float, stop: asyncio.Event) -> float | None:
    while time.monotonic() < deadline and not stop.is_set():
        go_at = _read_go_time(go_file)
        if go_at is not None:
            return go_at
        await asyncio.sleep(0.02)
    return None


async def shard_main(a: argparse.Namespace, out: TextIO) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    parent = os.getppid()
    deadline = time.monotonic() + a.max_seconds
    counters = ShardCounters()

    def emit(obj: dict[str, Any]) -> None:
        out.write(json.dumps(obj, separators=(",", ":")) + "\n")  # line-buffered file

    def trace(node_id: str, t: float) -> None:
        emit({"k": "ack", "n": node_id, "t": round(t, 4)})

    clients = [EtcdClient(a.endpoint) for _ in range(a.clients)]
    registries = [
        CountingRegistry(c, a.prefix, counters, trace if a.trace else None) for c in clients
    ]
    agents = [
        make_agent(registries[i % len(registries)], node_name(a.shard, i), a.shard, a.ttl, 5.0)
        for i in range(a.count)
    ]
    tasks: list[asyncio.Task[None]] = []
    try:
        for c in clients:
            await _warm_up(c, time.monotonic() + 30.0)
        emit({"k": "ready", "t": time.time(), "pid": os.getpid()})
        go_at = await _wait_go(Path(a.go_file), deadline, stop)
        if go_at is None:
            return 1
        await asyncio.sleep(max(0.0, go_at - time.time()))
        n = len(agents)
        tasks = [
            asyncio.create_task(_run_agent(ag, a.ramp * i / n, counters))
            for i, ag in enumerate(agents)
        ]
        while not stop.is_set() and time.monotonic() < deadline and os.getppid() == parent:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), STATS_INTERVAL_S)
            emit(counters.line(time.time(), sum(ag.registered.is_set() for ag in agents)))
        return 0
    finally:
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=3.0)  # agents revoke their leases on the way out
        for c in clients:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(c.close(), 2.0)


def run_shard(a: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    with open(a.stats_file, "a", buffering=1) as out:
        return asyncio.run(shard_main(a, out))


# =============================================================================================
# Orchestrator (parent process)
# =============================================================================================


class BenchError(Exception):
    """A phase could not complete; the results so far are still written."""


@dataclass(frozen=True)
class Config:
    nodes: int
    ttl: int
    steady_seconds: float
    shards: int
    kill_fraction: float
    clients_per_shard: int
    ramp_seconds: float
    register_timeout: float
    restart_timeout: float
    max_run_seconds: float
    out: Path
    keep_logs: bool
    quick: bool

    @property
    def per_shard(self) -> int:
        return self.nodes // self.shards

    @property
    def victim_shards(self) -> int:
        return round(self.shards * self.kill_fraction)

    @property
    def keepalive_interval(self) -> float:
        return max(self.ttl / 3.0, 0.2)  # NodeAgent._maintain

    @property
    def steady_window(self) -> float:
        """``steady_seconds`` rounded to a whole number of keepalive intervals."""
        periods = max(1, round(self.steady_seconds / self.keepalive_interval))
        return periods * self.keepalive_interval


@dataclass
class Shard:
    index: int
    node_ids: list[str]
    victim: bool
    stats_path: Path
    proc: ManagedProcess
    offset: int = 0
    partial: bytes = b""
    ready_at: float | None = None
    stats: list[dict[str, Any]] = field(default_factory=list)  # counters only
    ka_done: list[tuple[float, float, int]] = field(default_factory=list)  # (ack, ms, agent)
    reg_lat: list[float] = field(default_factory=list)
    reg_first: list[float] = field(default_factory=list)
    last_ack: dict[str, float] = field(default_factory=dict)

    def poll(self) -> None:
        """Read the lines the shard appended since the last call."""
        try:
            with open(self.stats_path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return
        self.offset += len(data)
        lines = (self.partial + data).split(b"\n")
        self.partial = lines.pop()
        for raw in lines:
            if not raw.strip():
                continue
            rec = json.loads(raw)
            kind = rec.get("k")
            if kind == "ack":
                t = float(rec["t"])
                if t > self.last_ack.get(rec["n"], 0.0):
                    self.last_ack[rec["n"]] = t
            elif kind == "stats":
                t = float(rec["t"])
                self.ka_done.extend((float(x[0]), float(x[1]), int(x[2])) for x in rec.pop("ka"))
                self.reg_lat.extend(rec.pop("reg_lat"))
                self.reg_first.extend(rec.pop("reg_first"))
                self.stats.append(rec)
            elif kind == "ready":
                self.ready_at = float(rec["t"])

    @property
    def latest(self) -> dict[str, Any]:
        return self.stats[-1] if self.stats else {}

    def window(self, t0: float, t1: float) -> tuple[dict[str, Any], dict[str, Any]] | None:
        inside = [s for s in self.stats if t0 <= s["t"] <= t1]
        return (inside[0], inside[-1]) if len(inside) >= 2 else None


class Sampler:
    """CPU time and RSS of named process groups (and the whole machine), every second."""

    def __init__(self) -> None:
        self._procs: dict[int, psutil.Process] = {}
        self.groups: dict[str, list[int]] = {}
        # (t, {pid: (cpu seconds, rss bytes)}, (machine busy s, machine total s))
        self.passes: list[tuple[float, dict[int, tuple[float, int]], tuple[float, float]]] = []

    def add(self, group: str, pid: int) -> None:
        with contextlib.suppress(psutil.Error):
            self._procs[pid] = psutil.Process(pid)
            self.groups.setdefault(group, []).append(pid)

    def sample(self) -> None:
        now = time.time()
        row: dict[int, tuple[float, int]] = {}
        for pid, p in list(self._procs.items()):
            try:
                with p.oneshot():
                    ct = p.cpu_times()
                    row[pid] = (ct.user + ct.system, p.memory_info().rss)
            except psutil.Error:
                del self._procs[pid]
        m = psutil.cpu_times()
        total = sum(m)
        busy = total - m.idle - getattr(m, "iowait", 0.0)
        self.passes.append((now, row, (busy, total)))

    def window(self, t0: float, t1: float) -> dict[str, Any]:
        inside = [p for p in self.passes if t0 <= p[0] <= t1]
        if len(inside) < 2:
            return {}
        (ta, first, ma), (tb, last, mb) = inside[0], inside[-1]
        dt = tb - ta
        out: dict[str, Any] = {"seconds": round(dt, 2)}
        for group, pids in self.groups.items():
            cpu = sum(last[p][0] - first[p][0] for p in pids if p in first and p in last)
            rss = [sum(row[p][1] for p in pids if p in row) for _, row, _ in inside]
            rss = [r for r in rss if r > 0]
            out[group] = {
                "cpu_percent_of_one_core": round(100.0 * cpu / dt, 1) if dt > 0 else None,
                "rss_mib_mean": round(sum(rss) / len(rss) / 2**20, 1) if rss else None,
                "rss_mib_max": round(max(rss) / 2**20, 1) if rss else None,
                "processes": len(pids),
            }
        busy, total = mb[0] - ma[0], mb[1] - ma[1]
        out["machine_cpu_busy_percent"] = round(100.0 * busy / total, 1) if total > 0 else None
        # Whatever else ran on the machine meanwhile (other users' processes skew the figures).
        ours = sum(v["cpu_percent_of_one_core"] or 0.0 for v in out.values() if isinstance(v, dict))
        cores = os.cpu_count() or 1
        busy_cores = 100.0 * cores * busy / total if total > 0 else 0.0
        out["other_processes_cpu_percent_of_one_core"] = round(max(0.0, busy_cores - ours), 1)
        return out

    def rss_now(self, pid: int) -> float | None:
        p = self._procs.get(pid)
        try:
            return None if p is None else round(p.memory_info().rss / 2**20, 1)
        except psutil.Error:
            return None


_METRICS = {
    "etcd_debugging_lease_granted_total",
    "etcd_debugging_lease_revoked_total",
    "etcd_debugging_lease_renewed_total",
    "etcd_debugging_mvcc_keys_total",
    "etcd_debugging_mvcc_watcher_total",
    "etcd_mvcc_db_total_size_in_bytes",
    "etcd_server_proposals_committed_total",
    "etcd_server_slow_apply_total",
    "etcd_disk_wal_fsync_duration_seconds_count",
    "etcd_disk_wal_fsync_duration_seconds_sum",
    "process_resident_memory_bytes",
    "process_cpu_seconds_total",
    "go_goroutines",
}


def scrape_etcd_metrics(port: int) -> dict[str, float]:
    """A few of etcd's /metrics, plus per-method gRPC stream/call counts for the Lease API."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name_labels, _, value = line.rpartition(" ")
        name = name_labels.split("{", 1)[0]
        try:
            v = float(value)
        except ValueError:
            continue
        if name in _METRICS:
            out[name] = out.get(name, 0.0) + v
        elif name in ("grpc_server_started_total", "grpc_server_msg_received_total"):
            for method in ("LeaseKeepAlive", "LeaseGrant", "Put", "Range", "Watch"):
                if f'grpc_method="{method}"' in name_labels:
                    key = f"{name}{{{method}}}"
                    out[key] = out.get(key, 0.0) + v
    return out


def etcd_version() -> str:
    try:
        r = subprocess.run(
            [shutil.which("etcd") or "etcd", "--version"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        return " ".join(r.stdout.split("\n")[0].split()[-1:]) or r.stdout.strip()
    except (OSError, subprocess.SubprocessError) as e:
        return f"unknown ({e})"


def machine_info() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break

    def version(pkg: str) -> str:
        try:
            return metadata.version(pkg)
        except metadata.PackageNotFoundError:
            return "not installed"

    return {
        "cpu_count": os.cpu_count(),
        "cpu_model": model,
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "etcd_version": etcd_version(),
        "grpcio": version("grpcio"),
        "aetcd": version("aetcd"),
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
    }


class ControlPlaneClient:
    def __init__(self, port: int) -> None:
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=GRPC_CLIENT_OPTIONS)
        self.nodes = nodes_pb2_grpc.NodeRegistryStub(self.channel)
        self.cp = control_plane_pb2_grpc.ControlPlaneStub(self.channel)

    async def status(self) -> control_plane_pb2.ControlPlaneStatus | None:
        try:
            return await self.cp.GetStatus(control_plane_pb2.GetStatusRequest(), timeout=5)
        except grpc.aio.AioRpcError:
            return None

    async def list_nodes(self) -> tuple[int, float, int] | None:
        """(node count, seconds the call took, response bytes), or None while unavailable."""
        start = time.perf_counter()
        try:
            resp = await self.nodes.ListNodes(nodes_pb2.ListNodesRequest(), timeout=30)
        except grpc.aio.AioRpcError:
            return None
        return len(resp.nodes), time.perf_counter() - start, resp.ByteSize()

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.channel.close()


def _read_port(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


async def wait_port_file(proc: ManagedProcess, path: Path, timeout_s: float) -> int:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        port = _read_port(path)
        if port:
            return port
        if not proc.alive():
            raise BenchError(f"{proc.name} exited:\n{proc.tail()}")
        await asyncio.sleep(0.02)
    raise BenchError(f"{proc.name} wrote no port file in {timeout_s}s:\n{proc.tail()}")


class Bench:
    def __init__(self, cfg: Config, work: Path) -> None:
        self.cfg = cfg
        self.work = work
        self.etcd: EtcdServer | None = None
        self.cp1: ManagedProcess | None = None
        self.cp1_client: ControlPlaneClient | None = None
        self.etcd_client: EtcdClient | None = None  # the benchmark's own, for a raw watch
        self.shards: list[Shard] = []
        self.extra_procs: list[ManagedProcess] = []
        self.sampler = Sampler()
        self.go_at = 0.0
        self.result: dict[str, Any] = {}

    # --- process management --------------------------------------------------------------
    def start_etcd(self) -> EtcdServer:
        self.etcd = EtcdServer(self.work / "etcd-data", log_path=self.work / "etcd.log")
        self.etcd.start()
        assert self.etcd.process is not None
        self.sampler.add("etcd", self.etcd.process.pid)
        return self.etcd

    def spawn_controlplane(self, replica: str) -> tuple[ManagedProcess, Path]:
        assert self.etcd is not None
        port_file = self.work / f"{replica}.port"
        argv = [
            sys.executable, "-m", "controlplane", "controlplane",
            "--etcd", self.etcd.endpoint,
            "--listen", "127.0.0.1:0",
            "--port-file", str(port_file),
            "--replica-id", replica,
        ]  # fmt: skip
        proc = ManagedProcess(f"controlplane-{replica}", argv, self.work / f"{replica}.log")
        proc.start()
        return proc, port_file

    def spawn_shards(self) -> None:
        assert self.etcd is not None
        cfg = self.cfg
        go_file = self.work / "go"
        for k in range(cfg.shards):
            victim = k < cfg.victim_shards
            stats = self.work / f"shard-{k:03d}.jsonl"
            argv = [
                sys.executable, str(Path(__file__).resolve()), "--agent-shard",
                "--endpoint", self.etcd.endpoint,
                "--shard", str(k),
                "--count", str(cfg.per_shard),
                "--ttl", str(cfg.ttl),
                "--clients", str(cfg.clients_per_shard),
                "--ramp", str(cfg.ramp_seconds),
                "--stats-file", str(stats),
                "--go-file", str(go_file),
                "--max-seconds", str(cfg.max_run_seconds),
            ]  # fmt: skip
            if victim:
                argv.append("--trace")
            proc = ManagedProcess(f"shard-{k}", argv, self.work / f"shard-{k:03d}.log").start()
            self.sampler.add("agent_shards", proc.pid)
            ids = [node_name(k, i) for i in range(cfg.per_shard)]
            self.shards.append(Shard(k, ids, victim, stats, proc))

    def stop_all(self) -> None:
        """Stop everything this run started, by PID: shards first, etcd last."""
        procs = [s.proc for s in self.shards] + self.extra_procs
        if self.cp1 is not None:
            procs.append(self.cp1)
        for p in procs:
            if p.alive():
                with contextlib.suppress(OSError):
                    assert p.proc is not None
                    p.proc.terminate()
        for p in procs:
            p.stop(grace_s=6.0)
        if self.etcd is not None:
            self.etcd.stop()
            if self.etcd.process is not None and self.etcd.process.alive():
                stop_pid(self.etcd.process.pid)

    def poll_shards(self) -> None:
        for s in self.shards:
            s.poll()

    async def _background(self) -> None:
        """Tail the shards' files every 200 ms and sample processes every second."""
        next_sample = 0.0
        while True:
            self.poll_shards()
            if time.monotonic() >= next_sample:
                self.sampler.sample()
                next_sample = time.monotonic() + 1.0
            await asyncio.sleep(0.2)

    # --- phases --------------------------------------------------------------------------
    async def run(self) -> None:
        cfg = self.cfg
        self.start_etcd()
        assert self.etcd is not None and self.etcd.process is not None
        self.result["etcd_rss_mib_idle"] = self.sampler.rss_now(self.etcd.process.pid)
        self.etcd_client = EtcdClient(self.etcd.endpoint)
        await _warm_up(self.etcd_client, time.monotonic() + 20.0)
        self.cp1, pf = self.spawn_controlplane("bench")
        self.sampler.add("controlplane", self.cp1.pid)
        port = await wait_port_file(self.cp1, pf, 60.0)
        self.cp1_client = ControlPlaneClient(port)
        deadline = time.monotonic() + 30.0
        while time.monotonic() < deadline:
            st = await self.cp1_client.status()
            if st is not None and st.cache_synced:
                break
            await asyncio.sleep(0.1)
        else:
            raise BenchError(f"control plane never synced:\n{self.cp1.tail()}")
        self.sampler.add("benchmark_driver", os.getpid())

        bg = asyncio.create_task(self._background())
        try:
            if not await self.phase_register():
                await self.phase_steady()  # what the agents achieve in that state, then stop
                return
            await asyncio.sleep(cfg.keepalive_interval + 2.0)  # every agent refreshed once
            await self.phase_steady()
            await self.phase_restart()
            await asyncio.sleep(2.0)
            await self.phase_failure()
        finally:
            bg.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await bg
            self.poll_shards()
            self.result["totals"] = self.totals()
            await self.cp1_client.close()
            await self.etcd_client.close()

    async def phase_register(self) -> bool:
        cfg = self.cfg
        t_spawn = time.time()
        self.spawn_shards()
        deadline = time.monotonic() + 60.0 + cfg.shards * 3.0
        while time.monotonic() < deadline:
            self.poll_shards()
            dead = [s for s in self.shards if not s.proc.alive()]
            if dead:
                raise BenchError(f"shard {dead[0].index} exited:\n{dead[0].proc.tail()}")
            if all(s.ready_at for s in self.shards):
                break
            await asyncio.sleep(0.1)
        else:
            raise BenchError("agent shards did not become ready in time")
        t_ready = time.time()
        assert self.cp1_client is not None and self.cp1 is not None

        assert self.etcd is not None
        m0 = await asyncio.to_thread(scrape_etcd_metrics, self.etcd.client_port)
        self.go_at = time.time() + 0.5
        go = self.work / "go"
        tmp = self.work / "go.tmp"
        tmp.write_text(f"{self.go_at}")
        tmp.replace(go)

        n = cfg.nodes
        t_count: float | None = None
        t_list: float | None = None
        list_info: tuple[int, float, int] | None = None
        last_count = 0
        timeline: list[tuple[float, int, int]] = []  # (s after go, cache nodes, agents registered)
        deadline = time.monotonic() + cfg.register_timeout
        while time.monotonic() < deadline:
            st = await self.cp1_client.status()
            now = time.time()
            if st is not None:
                last_count = st.node_count
                if t_count is None and st.node_count >= n:
                    t_count = now
            if not timeline or now - self.go_at - timeline[-1][0] >= 1.0:
                agents = sum(int(s.latest.get("registered", 0)) for s in self.shards)
                timeline.append((round(now - self.go_at, 2), last_count, agents))
            if t_count is not None:
                list_info = await self.cp1_client.list_nodes()
                if list_info is not None and list_info[0] == n:
                    t_list = time.time()
                    break
            await asyncio.sleep(0.1)
        # give the shards a moment to report the last registrations
        for _ in range(30):
            self.poll_shards()
            if sum(s.latest.get("registered", 0) for s in self.shards) >= n:
                break
            await asyncio.sleep(0.2)
        m1 = await asyncio.to_thread(scrape_etcd_metrics, self.etcd.client_port)
        etcd_delta = {k: round(m1[k] - m0.get(k, 0.0), 3) for k in sorted(m1)}
        reg_at = sorted(t for s in self.shards for t in s.reg_first)
        reg_lat = [x for s in self.shards for x in s.reg_lat]
        agents_done = reg_at[-1] if len(reg_at) >= n else None
        self.result["registration"] = {
            "nodes": n,
            "shard_startup_s": round(t_ready - t_spawn, 3),
            "go_at": iso(self.go_at),
            "ramp_seconds": cfg.ramp_seconds,
            "agent_registered_after_go_s": distribution([t - self.go_at for t in reg_at]),
            "register_call_latency_ms": distribution(reg_lat, 2),
            "all_agents_registered_s": rnd(agents_done - self.go_at) if agents_done else None,
            "cache_node_count_reached_n_s": rnd(t_count - self.go_at) if t_count else None,
            "listnodes_returned_n_s": rnd(t_list - self.go_at) if t_list else None,
            "controlplane_lag_after_last_registration_s": (
                rnd(t_count - agents_done) if t_count and agents_done else None
            ),
            "converged": t_list is not None,
            "register_calls_ok": sum(s.latest.get("reg_ok", 0) for s in self.shards),
            "register_failures": sum(s.latest.get("reg_fail", 0) for s in self.shards),
            "keepalive_failures": sum(s.latest.get("ka_fail", 0) for s in self.shards),
            "leases_lost": sum(s.latest.get("lease_lost", 0) for s in self.shards),
            "listnodes_at_n": (
                {
                    "seconds": round(list_info[1], 4),
                    "response_mib": round(list_info[2] / 2**20, 2),
                }
                if list_info is not None
                else None
            ),
            "cpu_during_registration": self.sampler.window(self.go_at - 1.0, time.time()),
            "etcd_rss_mib_after": self.sampler.rss_now(self._etcd_pid()),
            "etcd_metrics_delta": etcd_delta,
            "timeline_s_cache_agents": timeline[:600],
        }
        if t_list is None:
            self.result["errors"].append(
                f"registration did not converge: control plane saw {last_count}/{n} nodes"
                f" {cfg.register_timeout:.0f}s after the agents started"
            )
        return t_list is not None

    def _etcd_pid(self) -> int:
        assert self.etcd is not None and self.etcd.process is not None
        return self.etcd.process.pid

    async def phase_steady(self) -> None:
        cfg = self.cfg
        assert self.etcd is not None
        m0 = await asyncio.to_thread(scrape_etcd_metrics, self.etcd.client_port)
        ws = time.time()
        await asyncio.sleep(cfg.steady_window)
        we = time.time()
        m1 = await asyncio.to_thread(scrape_etcd_metrics, self.etcd.client_port)
        # ListNodes at N, after the window so it does not disturb it (3 calls)
        assert self.cp1_client is not None
        listings = [await self.cp1_client.list_nodes() for _ in range(3)]
        list_s = [x[1] for x in listings if x is not None]
        list_mib = max((x[2] / 2**20 for x in listings if x is not None), default=0.0)
        await asyncio.sleep(STATS_INTERVAL_S + 0.5)  # the lines that close the window
        self.poll_shards()

        # Keepalives acked inside [ws, we), a window of a whole number of keepalive intervals.
        # Sustained rate = the sum over agents of 1 / (each agent's own refresh period): exact
        # even when refreshes come in bursts that straddle the window's edges.
        done: list[tuple[float, float]] = []
        by_agent: dict[tuple[int, int], list[float]] = {}
        for s in self.shards:
            for t, ms, idx in s.ka_done:
                if ws <= t < we:
                    done.append((t, ms))
                    by_agent.setdefault((s.index, idx), []).append(t)
        rate = 0.0
        gaps: list[float] = []
        for ts in by_agent.values():
            ts.sort()
            if len(ts) >= 2:
                gaps.extend(b - a for a, b in itertools.pairwise(ts))
                rate += (len(ts) - 1) / (ts[-1] - ts[0])
        few = cfg.nodes - sum(1 for ts in by_agent.values() if len(ts) >= 2)
        ok = len(done)
        lat = [ms for _, ms in done]
        per_second = [0] * max(1, int(we - ws))
        for t, _ in done:
            per_second[min(int(t - ws), len(per_second) - 1)] += 1
        fail = lost = 0
        for s in self.shards:
            w = s.window(ws, we)
            if w is not None:
                fail += w[1]["ka_fail"] - w[0]["ka_fail"]
                lost += w[1]["lease_lost"] - w[0]["lease_lost"]
        required = cfg.nodes / cfg.keepalive_interval
        span = (m1.get("process_cpu_seconds_total", 0.0), m0.get("process_cpu_seconds_total", 0.0))
        delta = {k: round(m1[k] - m0.get(k, 0.0), 3) for k in sorted(m1)}
        renewed = delta.get("etcd_debugging_lease_renewed_total", 0.0)
        streams = delta.get("grpc_server_started_total{LeaseKeepAlive}", 0.0)
        self.result["steady_state"] = {
            "window_s": round(we - ws, 2),
            "window": [iso(ws), iso(we)],
            "keepalive": {
                "required_per_s": round(required, 1),
                "achieved_per_s": round(rate, 1),
                "achieved_over_required": round(rate / required, 4) if required else None,
                "completed": ok,
                "failures": fail,
                "leases_lost": lost,
                "latency_ms": distribution(lat, 2),
                "acks_in_window_per_s": round(ok / (we - ws), 1),
                "mean_refresh_period_s": round(cfg.nodes / rate, 3) if rate else None,
                "refresh_gap_s": distribution(gaps),
                "agents_with_under_2_acks_in_window": few,
                "per_second_min": min(per_second),
                "per_second_max": max(per_second),
                "etcd_renewals_per_s": round(renewed / (we - ws), 1),
                "etcd_keepalive_streams_opened_per_s": round(streams / (we - ws), 1),
                "etcd_keepalive_streams_per_renewal": (
                    round(streams / renewed, 3) if renewed else None
                ),
            },
            "resources": self.sampler.window(ws, we),
            "listnodes_after_window": {
                "seconds": [round(x, 4) for x in list_s],
                "response_mib": round(list_mib, 2),
            },
            "etcd": {
                "cpu_percent_from_metrics": round(100.0 * (span[0] - span[1]) / (we - ws), 1),
                "rss_mib": round(m1.get("process_resident_memory_bytes", 0.0) / 2**20, 1),
                "db_size_mib": round(m1.get("etcd_mvcc_db_total_size_in_bytes", 0.0) / 2**20, 2),
                "keys": m1.get("etcd_debugging_mvcc_keys_total"),
                "goroutines": m1.get("go_goroutines"),
                "metrics_delta_over_window": delta,
            },
        }

    async def phase_restart(self) -> None:
        cfg = self.cfg
        n = cfg.nodes
        t_spawn = time.time()
        proc, pf = self.spawn_controlplane("bench-restart")
        self.extra_procs.append(proc)
        out: dict[str, Any] = {"nodes_registered": n, "converged": False}
        self.result["restarted_controlplane"] = out
        client: ControlPlaneClient | None = None
        try:
            port = await wait_port_file(proc, pf, 60.0)
            t_port = time.time()
            out["port_file_s"] = round(t_port - t_spawn, 3)
            client = ControlPlaneClient(port)
            t_synced: float | None = None
            last: control_plane_pb2.ControlPlaneStatus | None = None
            deadline = time.monotonic() + cfg.restart_timeout
            while time.monotonic() < deadline and proc.alive():
                st = await client.status()
                last = st if st is not None else last
                if st is not None and st.cache_synced and st.node_count >= n:
                    t_synced = time.time()
                    break
                await asyncio.sleep(0.05)
            if t_synced is None:
                out["last_status"] = (
                    {"cache_synced": last.cache_synced, "node_count": last.node_count}
                    if last is not None
                    else None
                )
                out["error"] = f"not converged within {cfg.restart_timeout}s"
                out["log_tail"] = proc.tail(12)
                last_line = proc.tail(1).strip()
                self.result["errors"].append(
                    f"restarted control plane did not reach {n} nodes in {cfg.restart_timeout}s"
                    + (f"; its log ends: {last_line}" if last_line else "")
                )
                return
            info = await client.list_nodes()
            t_list = time.time()
            out.update(
                converged=info is not None and info[0] == n,
                cache_synced_with_n_s=round(t_synced - t_spawn, 3),
                listnodes_returned_n_s=round(t_list - t_spawn, 3),
                after_port_file_s=round(t_synced - t_port, 3),
                listnodes_count=info[0] if info else None,
                rss_mib=self.sampler.rss_now(proc.pid) or rss_of(proc.pid),
            )
        finally:
            if client is not None:
                await client.close()
            proc.stop(grace_s=6.0)

    async def phase_failure(self) -> None:
        cfg = self.cfg
        assert self.cp1_client is not None and self.etcd is not None
        victims = [s for s in self.shards if s.victim]
        victim_ids = {nid for s in victims for nid in s.node_ids}
        cp_events: list[tuple[float, int, str]] = []
        etcd_deleted: dict[str, float] = {}
        synced = asyncio.Event()

        call = self.cp1_client.nodes.WatchNodes(nodes_pb2.WatchNodesRequest(skip_initial=False))

        async def read_cp() -> None:
            async for ev in call:
                if ev.type == nodes_pb2.NodeEvent.TYPE_SYNCED:
                    synced.set()
                elif synced.is_set():
                    cp_events.append((time.time(), ev.type, ev.node.node_id))

        assert self.etcd_client is not None
        etcd = self.etcd_client
        registry = EtcdNodeRegistry(etcd, DEFAULT_PREFIX)
        etcd_watch_error = ""

        async def read_etcd(rev: int) -> None:
            async for rec in registry.watch(rev + 1):
                if isinstance(rec, InventoryRecord) and rec.leased is None:
                    etcd_deleted.setdefault(rec.node_id, time.time())

        cp_task = asyncio.create_task(read_cp())
        etcd_task: asyncio.Task[None] | None = None
        try:
            await asyncio.wait_for(synced.wait(), 60.0)
            for _ in range(3):  # the raw etcd watch only splits the delay: best effort
                try:
                    _, rev = await etcd.get_range(b"/bench-warmup/", b"/bench-warmup0")
                except SwitchboardError as e:
                    etcd_watch_error = str(e)
                    continue
                etcd_task = asyncio.create_task(read_etcd(rev))
                etcd_watch_error = ""
                break
            await asyncio.sleep(1.0)  # let the etcd watch be created
            self.poll_shards()

            t_kill = time.time()
            for s in victims:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(s.proc.pid, signal.SIGKILL)
            for s in victims:
                s.proc.kill()  # reaps it
            for s in victims:
                s.poll()  # acks written before the kill
            last_ack = {nid: t for s in victims for nid, t in s.last_ack.items()}

            timeout = cfg.ttl * 3.0 + 10.0
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                seen = {nid for _, typ, nid in cp_events if typ == nodes_pb2.NodeEvent.TYPE_DELETED}
                if victim_ids <= seen:
                    break
                await asyncio.sleep(0.05)
            await asyncio.sleep(1.0)  # catch any collateral deletions
            t_end = time.time()
        finally:
            call.cancel()
            cp_task.cancel()
            if etcd_task is not None:
                etcd_task.cancel()
            for task in (cp_task, etcd_task):
                if task is not None:
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await task

        deleted: dict[str, float] = {}
        collateral: list[str] = []
        readded: list[str] = []
        for t, typ, nid in cp_events:
            if typ == nodes_pb2.NodeEvent.TYPE_DELETED:
                if nid in victim_ids:
                    deleted.setdefault(nid, t)
                else:
                    collateral.append(nid)
            elif typ == nodes_pb2.NodeEvent.TYPE_ADDED:
                readded.append(nid)
        latency = [deleted[n] - t_kill for n in deleted]
        expected = [last_ack[n] + cfg.ttl - t_kill for n in victim_ids if n in last_ack]
        since_ack = [t_kill - last_ack[n] for n in victim_ids if n in last_ack]
        residual = [deleted[n] - (last_ack[n] + cfg.ttl) for n in deleted if n in last_ack]
        etcd_latency = [etcd_deleted[n] - t_kill for n in victim_ids if n in etcd_deleted]
        cp_lag = [deleted[n] - etcd_deleted[n] for n in deleted if n in etcd_deleted]
        st = await self.cp1_client.status()
        self.result["failure_detection"] = {
            "killed_shards": [s.index for s in victims],
            "killed_nodes": len(victim_ids),
            "kill_fraction": round(len(victim_ids) / cfg.nodes, 4),
            "killed_at": iso(t_kill),
            "ttl_s": cfg.ttl,
            "keepalive_interval_s": round(cfg.keepalive_interval, 3),
            "detected": len(deleted),
            "all_detected": len(deleted) == len(victim_ids),
            "timeout_s": round(timeout, 1),
            "observed_for_s": round(t_end - t_kill, 2),
            "latency_s": distribution(latency),
            "expected_latency_s": distribution(expected),
            "time_since_last_ack_at_kill_s": distribution(since_ack),
            "residual_vs_expected_s": distribution(residual),
            "etcd_watch_latency_s": distribution(etcd_latency),
            "controlplane_after_etcd_s": distribution(cp_lag, 4),
            "etcd_watch_error": etcd_watch_error or None,
            "first_to_last_detection_s": rnd(max(latency) - min(latency)) if latency else None,
            "nodes_missing_ack_trace": len(victim_ids - set(last_ack)),
            "collateral_deletions": len(collateral),
            "collateral_examples": collateral[:10],
            "re_added": len(readded),
            "controlplane_node_count_after": st.node_count if st is not None else None,
            "relationship": (
                "expected latency = last keepalive ack + TTL - kill time = TTL - (time since last"
                " ack); with acks every TTL/3 it lies in [2/3 TTL, TTL]. residual = measured -"
                " expected: etcd's expiry sweep (every 500 ms, at most ~1000 revocations/s) plus"
                " the control plane's watch-to-WatchNodes path, minus the ack's own latency (etcd"
                " renewed the lease before the agent saw the reply, so residuals can be < 0)"
            ),
        }

    def totals(self) -> dict[str, Any]:
        keys = ("ka_ok", "ka_fail", "lease_lost", "reg_ok", "reg_fail", "agent_exits")
        tot = {k: sum(int(s.latest.get(k, 0)) for s in self.shards) for k in keys}
        survivors = [s for s in self.shards if not s.victim]
        tot["survivor_leases_lost"] = sum(int(s.latest.get("lease_lost", 0)) for s in survivors)
        tot["survivor_keepalive_failures"] = sum(int(s.latest.get("ka_fail", 0)) for s in survivors)
        tot["re_registrations"] = max(0, tot["reg_ok"] - self.cfg.nodes)
        return tot


def rss_of(pid: int) -> float | None:
    try:
        return round(psutil.Process(pid).memory_info().rss / 2**20, 1)
    except psutil.Error:
        return None


# --- report ----------------------------------------------------------------------------------


def _fmt(d: dict[str, Any] | None, unit: str = "s") -> str:
    if not d or not d.get("count"):
        return "n/a"
    return f"p50 {d['p50']}{unit}  p99 {d['p99']}{unit}  max {d['max']}{unit}  (n={d['count']})"


def print_summary(r: dict[str, Any]) -> None:
    p = r["parameters"]
    print()
    print(f"== registry scale: {p['nodes']} nodes, TTL {p['ttl_s']}s, {p['shards']} shards ==")
    print(f"   machine: {r['machine']['cpu_count']} CPUs, etcd {r['machine']['etcd_version']}")
    reg = r.get("registration")
    if reg:
        how = f"starts spread over {p['ramp_seconds']} s" if p["ramp_seconds"] else "start at once"
        print(f"registration (cold, all agents {how}):")
        print(f"   agents registered after go: {_fmt(reg['agent_registered_after_go_s'])}")
        print(f"   register call latency:      {_fmt(reg['register_call_latency_ms'], 'ms')}")
        print(f"   cache holds N after:        {reg['cache_node_count_reached_n_s']} s")
        print(
            f"   register calls ok {reg['register_calls_ok']}, failed {reg['register_failures']};"
            f" keepalive failures {reg['keepalive_failures']}, leases lost {reg['leases_lost']}"
        )
        if not reg["converged"]:
            tl = reg["timeline_s_cache_agents"]
            print(f"   NOT converged; (s, cache nodes, agents registered) last: {tl[-3:]}")
        print(f"   ListNodes == N after:       {reg['listnodes_returned_n_s']} s")
        ln = reg.get("listnodes_at_n")
        if ln:
            print(f"   ListNodes at N:             {ln['seconds']} s, {ln['response_mib']} MiB")
    ss = r.get("steady_state")
    if ss:
        ka = ss["keepalive"]
        print(f"steady state ({ss['window_s']} s):")
        print(
            f"   keepalives/s: {ka['achieved_per_s']} achieved / {ka['required_per_s']} required"
            f" ({ka['achieved_over_required']}); etcd renewals/s {ka['etcd_renewals_per_s']}"
        )
        print(f"   keepalive latency: {_fmt(ka['latency_ms'], 'ms')}")
        print(
            f"   acks per 1-s bucket: min {ka['per_second_min']}, max {ka['per_second_max']};"
            f" mean refresh period {ka['mean_refresh_period_s']} s"
        )
        print(f"   failures {ka['failures']}, leases lost {ka['leases_lost']}")
        streams = ka["etcd_keepalive_streams_per_renewal"]
        print(f"   LeaseKeepAlive streams opened per renewal: {streams}")
        res = ss["resources"]
        for g in ("etcd", "controlplane", "agent_shards", "benchmark_driver"):
            if g in res:
                x = res[g]
                print(
                    f"   {g:17s} CPU {x['cpu_percent_of_one_core']}% of a core,"
                    f" RSS mean {x['rss_mib_mean']} MiB, max {x['rss_mib_max']} MiB"
                )
        print(
            f"   machine CPU busy: {res.get('machine_cpu_busy_percent')}% of all cores;"
            f" other processes {res.get('other_processes_cpu_percent_of_one_core')}% of a core"
        )
    rc = r.get("restarted_controlplane")
    if rc:
        if rc.get("converged"):
            print(
                f"restarted control plane: port file {rc['port_file_s']} s, ListNodes == N"
                f" {rc['listnodes_returned_n_s']} s after spawn"
            )
        else:
            print(f"restarted control plane: NOT converged: {rc.get('error')}")
    fd = r.get("failure_detection")
    if fd:
        print(
            f"failure detection ({fd['killed_nodes']} killed, {fd['detected']} detected,"
            f" collateral {fd['collateral_deletions']}):"
        )
        print(f"   measured:  {_fmt(fd['latency_s'])}")
        print(f"   expected:  {_fmt(fd['expected_latency_s'])}  (last ack + TTL)")
        print(f"   residual:  {_fmt(fd['residual_vs_expected_s'])}")
        print(f"   CP after etcd: {_fmt(fd['controlplane_after_etcd_s'])}")
    if r.get("totals"):
        print(f"totals: {r['totals']}")
    for e in r.get("errors", []):
        print(f"ERROR: {e}")
    print(f"status: {r['status']}; wrote {r['output']}")


# --- entry points ----------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--nodes", type=int, default=None, help="simulated agents (default 1000)")
    ap.add_argument("--ttl", type=int, default=None, help="lease TTL, seconds (default 10)")
    ap.add_argument("--steady-seconds", type=float, default=None, help="default 20")
    ap.add_argument("--shards", type=int, default=10, help="agent processes (default 10)")
    ap.add_argument("--kill-fraction", type=float, default=0.1, help="default 0.1")
    ap.add_argument("--clients-per-shard", type=int, default=1, help="etcd channels per shard")
    ap.add_argument(
        "--ramp-seconds", type=float, default=0.0, help="spread agent starts (default 0: at once)"
    )
    ap.add_argument("--register-timeout", type=float, default=None)
    ap.add_argument("--restart-timeout", type=float, default=None)
    ap.add_argument("--max-run-seconds", type=float, default=900.0)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--keep-logs", action="store_true", help="keep the work dir (logs, etcd)")
    ap.add_argument("--quick", action="store_true", help="200 nodes, TTL 3 s, 5 s steady window")
    # agent-shard mode (internal)
    ap.add_argument("--agent-shard", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--endpoint", help=argparse.SUPPRESS)
    ap.add_argument("--shard", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--count", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--clients", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--ramp", type=float, default=0.0, help=argparse.SUPPRESS)
    ap.add_argument("--stats-file", help=argparse.SUPPRESS)
    ap.add_argument("--go-file", help=argparse.SUPPRESS)
    ap.add_argument("--max-seconds", type=float, default=900.0, help=argparse.SUPPRESS)
    ap.add_argument("--trace", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--prefix", default=DEFAULT_PREFIX, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def make_config(a: argparse.Namespace) -> Config:
    nodes = a.nodes if a.nodes is not None else (200 if a.quick else 1000)
    ttl = a.ttl if a.ttl is not None else (3 if a.quick else 10)
    steady = a.steady_seconds if a.steady_seconds is not None else (5.0 if a.quick else 20.0)
    if not 1 <= nodes <= MAX_NODES:
        raise SystemExit(f"--nodes must be in [1, {MAX_NODES}]")
    if not 2 <= ttl <= 300:
        raise SystemExit("--ttl must be in [2, 300] (the project's lease TTL bounds)")
    if a.shards < 1 or nodes % a.shards:
        raise SystemExit(f"--nodes {nodes} must be a multiple of --shards {a.shards}")
    victims = a.shards * a.kill_fraction
    if not 0 < a.kill_fraction < 1 or abs(victims - round(victims)) > 1e-9 or round(victims) < 1:
        raise SystemExit(
            f"--shards {a.shards} x --kill-fraction {a.kill_fraction} must be a whole number >= 1"
            " (the killed shards must hold exactly that fraction of the agents)"
        )
    if not 1 <= a.clients_per_shard <= nodes // a.shards:
        raise SystemExit("--clients-per-shard must be in [1, nodes per shard]")
    return Config(
        nodes=nodes,
        ttl=ttl,
        steady_seconds=max(steady, 3.0),
        shards=a.shards,
        kill_fraction=a.kill_fraction,
        clients_per_shard=a.clients_per_shard,
        ramp_seconds=max(a.ramp_seconds, 0.0),
        register_timeout=a.register_timeout or min(300.0, max(60.0, nodes / 40.0)),
        restart_timeout=a.restart_timeout or min(180.0, max(30.0, nodes / 100.0)),
        max_run_seconds=a.max_run_seconds,
        out=a.out,
        keep_logs=a.keep_logs,
        quick=a.quick,
    )


def run_benchmark(cfg: Config) -> dict[str, Any]:
    started = time.time()
    work = Path(tempfile.mkdtemp(prefix="sb-registry-scale-"))
    result: dict[str, Any] = {
        "benchmark": "registry_scale",
        "started_at": iso(started),
        "machine": machine_info(),
        "parameters": {
            "nodes": cfg.nodes,
            "ttl_s": cfg.ttl,
            "keepalive_interval_s": round(cfg.keepalive_interval, 3),
            "steady_seconds": cfg.steady_seconds,
            "steady_window_s": round(cfg.steady_window, 3),
            "shards": cfg.shards,
            "agents_per_shard": cfg.per_shard,
            "etcd_clients_per_shard": cfg.clients_per_shard,
            "kill_fraction": cfg.kill_fraction,
            "ramp_seconds": cfg.ramp_seconds,
            "gpus_per_node": GPUS_PER_NODE,
            "register_timeout_s": cfg.register_timeout,
            "restart_timeout_s": cfg.restart_timeout,
            "quick": cfg.quick,
        },
        "method": (
            "real NodeAgent/EtcdNodeRegistry/EtcdClient in agent shard processes; real control"
            " plane process; one etcd; agents of killed shards are SIGKILLed (no lease revoke)"
        ),
        "errors": [],
    }
    bench = Bench(cfg, work)
    bench.result = result
    try:
        asyncio.run(asyncio.wait_for(bench.run(), cfg.max_run_seconds))
    except (BenchError, TimeoutError, SwitchboardError, OSError, RuntimeError) as e:
        result["errors"].append(f"{type(e).__name__}: {e}")
    except KeyboardInterrupt:
        result["errors"].append("interrupted")
    finally:
        bench.stop_all()
        if cfg.keep_logs:
            result["work_dir"] = str(work)
        else:
            shutil.rmtree(work, ignore_errors=True)
    finished = time.time()
    result["finished_at"] = iso(finished)
    result["duration_s"] = round(finished - started, 1)
    result["machine"]["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    complete = all(
        k in result
        for k in ("registration", "steady_state", "restarted_controlplane", "failure_detection")
    )
    result["status"] = "ok" if complete and not result["errors"] else "incomplete"
    return result


def main(argv: Sequence[str] | None = None) -> int:
    a = parse_args(argv)
    if a.agent_shard:
        return run_shard(a)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    cfg = make_config(a)
    result = run_benchmark(cfg)
    cfg.out.parent.mkdir(parents=True, exist_ok=True)
    out = cfg.out.resolve()
    result["output"] = str(out.relative_to(REPO)) if out.is_relative_to(REPO) else str(out)
    cfg.out.write_text(json.dumps(result, indent=2) + "\n")
    print_summary(result)
    return 0 if result["status"] == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
