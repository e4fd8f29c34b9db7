"""Helpers shared by the integration and e2e tests: real processes on 127.0.0.1."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
from switchboard.v1 import control_plane_pb2, control_plane_pb2_grpc, nodes_pb2, nodes_pb2_grpc

from controlplane.local.procs import ManagedProcess

T = TypeVar("T")
PYTHON = sys.executable


def wait_until(
    predicate: Callable[[], T], timeout_s: float, interval_s: float = 0.05, what: str = ""
) -> T:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    last: T = predicate()
    while not last:
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what or predicate}")
        time.sleep(interval_s)
        last = predicate()
    return last


@dataclass
class ControlPlaneProc:
    process: ManagedProcess
    port_file: Path
    replica_id: str
    port: int = 0
    channel: grpc.Channel | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def wait_serving(self, timeout_s: float = 20.0) -> ControlPlaneProc:
        def ready() -> bool:
            if not self.process.alive():
                raise AssertionError(f"control plane exited:\n{self.process.tail()}")
            return self.port_file.exists() and self.port_file.read_text().strip() != ""

        wait_until(ready, timeout_s, what="control plane port file")
        self.port = int(self.port_file.read_text())
        self.channel = grpc.insecure_channel(self.address)

        def synced() -> bool:
            status = self.try_status()
            return status is not None and status.cache_synced

        wait_until(synced, timeout_s, what="control plane cache synced")
        return self

    @property
    def nodes(self) -> nodes_pb2_grpc.NodeRegistryStub:
        assert self.channel is not None
        return nodes_pb2_grpc.NodeRegistryStub(self.channel)

    def status(self) -> control_plane_pb2.ControlPlaneStatus:
        assert self.channel is not None
        stub = control_plane_pb2_grpc.ControlPlaneStub(self.channel)
        return stub.GetStatus(control_plane_pb2.GetStatusRequest(), timeout=5)

    def try_status(self) -> control_plane_pb2.ControlPlaneStatus | None:
        try:
            return self.status()
        except grpc.RpcError:
            return None

    def list_nodes(self, selector: str = "") -> list[nodes_pb2.Node]:
        resp = self.nodes.ListNodes(nodes_pb2.ListNodesRequest(label_selector=selector), timeout=5)
        return list(resp.nodes)

    def node_ids(self) -> set[str]:
        try:
            return {n.node_id for n in self.list_nodes()}
        except grpc.RpcError:
            return set()

    def close(self) -> None:
        if self.channel is not None:
            self.channel.close()
            self.channel = None

    def stop(self) -> None:
        self.close()
        self.process.stop()

    def kill(self) -> None:
        self.close()
        self.process.kill()


def start_controlplane(
    tmp: Path,
    etcd_endpoint: str,
    replica_id: str,
    *,
    leader_ttl_s: int = 3,
    prefix: str = "",
    extra: list[str] | None = None,
) -> ControlPlaneProc:
    port_file = tmp / f"{replica_id}.port"
    port_file.unlink(missing_ok=True)
    argv = [
        PYTHON, "-m", "controlplane", "controlplane",
        "--etcd", etcd_endpoint,
        "--listen", "127.0.0.1:0",
        "--replica-id", replica_id,
        "--leader-ttl", str(leader_ttl_s),
        "--port-file", str(port_file),
    ]  # fmt: skip
    if prefix:
        argv += ["--prefix", prefix]
    argv += extra or []
    proc = ManagedProcess(replica_id, argv, tmp / f"{replica_id}.log").start()
    return ControlPlaneProc(proc, port_file, replica_id).wait_serving()


def start_agent(
    tmp: Path,
    etcd_endpoint: str,
    node_id: str,
    *,
    gpus: int = 4,
    ttl_s: int = 2,
    labels: dict[str, str] | None = None,
    extra: list[str] | None = None,
) -> ManagedProcess:
    argv = [
        PYTHON, "-m", "controlplane", "node-agent",
        "--etcd", etcd_endpoint,
        "--node-id", node_id,
        "--gpus", str(gpus),
        "--gpu-memory-gib", "80",
        "--ttl", str(ttl_s),
        "--report-interval", "1",
    ]  # fmt: skip
    for k, v in (labels or {}).items():
        argv += ["--label", f"{k}={v}"]
    argv += extra or []
    return ManagedProcess(node_id, argv, tmp / f"agent-{node_id}.log").start()


@dataclass
class EventCollector:
    """Reads a WatchNodes stream on a thread and timestamps every event."""

    events: list[tuple[float, nodes_pb2.NodeEvent]] = field(default_factory=list)
    error: grpc.RpcError | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def snapshot(self) -> list[tuple[float, nodes_pb2.NodeEvent]]:
        with self._lock:
            return list(self.events)

    def of_type(self, event_type: int) -> list[tuple[float, nodes_pb2.NodeEvent]]:
        return [(t, e) for t, e in self.snapshot() if e.type == event_type]


@contextmanager
def watch_nodes(
    cp: ControlPlaneProc, request: nodes_pb2.WatchNodesRequest | None = None
) -> Iterator[EventCollector]:
    collector = EventCollector()
    call = cp.nodes.WatchNodes(request or nodes_pb2.WatchNodesRequest())

    def pump() -> None:
        try:
            for ev in call:
                with collector._lock:
                    collector.events.append((time.monotonic(), ev))
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.CANCELLED:
                collector.error = e

    thread = threading.Thread(target=pump, daemon=True)
    thread.start()
    try:
        yield collector
    finally:
        call.cancel()
        thread.join(5)


@dataclass
class WorkerProc:
    process: ManagedProcess
    port_file: Path
    worker_id: str
    port: int = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def wait_serving(self, timeout_s: float = 20.0) -> WorkerProc:
        def ready() -> bool:
            if not self.process.alive():
                raise AssertionError(f"worker exited:\n{self.process.tail()}")
            return self.port_file.exists() and self.port_file.read_text().strip() != ""

        wait_until(ready, timeout_s, what="worker port file")
        self.port = int(self.port_file.read_text())
        return self


def start_worker(
    tmp: Path,
    etcd_endpoint: str,
    worker_id: str,
    *,
    role: str,
    profile: str = "llama-3.1-8b-h100",
    model: str = "llama-3.1-8b",
    ttl_s: int = 2,
    extra: list[str] | None = None,
    engine: str = "sim",
    model_path: Path | None = None,
    ready_timeout_s: float = 20.0,
) -> WorkerProc:
    """A ``switchboard worker`` process; sim by default, ``engine="cpu"`` with ``model_path``."""
    port_file = tmp / f"{worker_id}.port"
    if engine == "sim":
        engine_flags = ["--profile", profile]
    else:
        engine_flags = ["--model-path", str(model_path), "--engine-args", '{"threads": 1}']
    argv = [
        PYTHON, "-m", "controlplane", "worker",
        "--etcd", etcd_endpoint,
        "--engine", engine,
        *engine_flags,
        "--model", model,
        "--role", role,
        "--worker-id", worker_id,
        "--ttl", str(ttl_s),
        "--port-file", str(port_file),
        *(extra or []),
    ]  # fmt: skip
    proc = ManagedProcess(worker_id, argv, tmp / f"{worker_id}.log").start()
    return WorkerProc(proc, port_file, worker_id).wait_serving(ready_timeout_s)


def start_ray_cluster(
    head: dict[str, Any], nodes: Sequence[dict[str, Any]] = ()
) -> tuple[Any, list[Any]]:
    """A local Ray cluster (``ray.cluster_utils.Cluster``): a head started with ``head``'s
    arguments and one more node per entry of ``nodes``, all registered; returns the cluster
    and its nodes, head first. Ray waits a fixed 30 s for its GCS to write its port and for a
    raylet to register; on a loaded 2-core machine each has timed out once in a CI run, so a
    start that times out is tried once more on a fresh cluster, after stopping what the
    failed one started (anything else is raised at once)."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    from ray.cluster_utils import Cluster

    for attempt in (1, 2):
        cluster: Any = None
        try:
            cluster = Cluster(initialize_head=True, head_node_args=head)
            started = [cluster.head_node, *(cluster.add_node(**args) for args in nodes)]
            cluster.wait_for_nodes()
            return cluster, started
        except Exception as e:
            if cluster is not None:
                cluster.shutdown()
            else:  # the head never came up: its processes are nobody's to stop
                kill_ray_session(str(e))
            if attempt == 2 or "timed out" not in str(e).lower():
                raise
    raise AssertionError("unreachable")


def kill_ray_session(message: str) -> None:
    """SIGKILL the processes whose command line names the Ray session directory that
    ``message`` names (a head that failed to start)."""
    m = re.search(r"(/\S*/session_[^/\s]+)", message)
    if m is None:
        return
    session = m.group(1).encode()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            if session in (proc / "cmdline").read_bytes():
                os.kill(int(proc.name), signal.SIGKILL)
