"""`switchboard up` / `make up`: the whole system on one machine, in the foreground.

Starts, in order, and stops in reverse on Ctrl-C (SIGINT) or SIGTERM, each by PID:

1. etcd on 127.0.0.1 (data under ``<state-dir>/etcd``);
2. a local multi-node Ray cluster on loopback (``ray.cluster_utils.Cluster``), each Ray node
   declaring ``--gpus-per-node`` GPUs and labelled ``switchboard.io/node-id=local-<i>``;
3. one node agent per Ray node (declared inventory, bound to that Ray node's id);
4. the control plane (gRPC on 127.0.0.1:<grpc-port>);
5. the deployment ``local`` (one prefill and one decode replica), applied through the
   Deployments API: the control plane's leader places its workers on the Ray cluster as actors,
   and they register in etcd under ``/switchboard/v1/workers/``. By default the ``cpu`` engine
   serves a small random-weight Llama (``switchboard make-model``, made once into
   ``~/.cache/switchboard/models/tiny-llama`` and reused), with a real prefill -> KV hand-off
   -> decode; ``--worker-engine sim`` uses the calibrated simulated engine instead.
6. the tenant ``demo`` (all models, all SLA classes, generous quotas), its API key written to
   ``<state-dir>/demo-api-key`` (mode 0600) and printed; a later ``up`` reuses both (a missing
   or stale key file gets a rotated key). See ``controlplane/local/demo_tenant.py``.

7. the tenant gateway (``switchboard gateway``): the OpenAI API on
   ``http://127.0.0.1:<gateway-port>/v1`` and the gRPC Inference service on a free port.
8. with ``--monitoring`` (``make up MONITORING=1``): Prometheus on
   ``127.0.0.1:<prometheus-port>`` (data under ``<state-dir>/prometheus``), scraping the
   gateway, the control plane and the node agents (each given a free ``--metrics-port``) and the
   workers the control plane lists at ``/sd/targets``, with ``deploy/prometheus/rules/`` loaded.

Later parts of the system are added to ``LocalCluster.start`` the same way.
Logs go to ``<state-dir>/logs/``; the PIDs of everything started are in ``<state-dir>/up.pids``
while it runs, so a crashed ``up`` can be cleaned up by PID (never by process name).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from controlplane.local.procs import EtcdServer, ManagedProcess, pid_alive, port_open, stop_pid

log = logging.getLogger(__name__)

NODE_LABEL = "switchboard.io/node-id"


@dataclass(frozen=True)
class UpSettings:
    state_dir: Path = Path(".switchboard")
    """Where etcd data, logs and the PID file live."""
    etcd_port: int = 2379
    grpc_port: int = 50051
    """Control plane gRPC port."""
    ray_nodes: int = 2
    gpus_per_node: int = 4
    """GPUs each Ray node declares (no real GPU is needed)."""
    gpu_model: str = "NVIDIA H100 80GB HBM3"
    gpu_memory_gib: float = 80.0
    lease_ttl_s: int = 10
    ray_object_store_bytes: int = 80 * 1024 * 1024
    """Per Ray node; kept small, this machine has 2 cores."""
    worker_engine: str = "cpu"
    """Engine of the local prefill and decode workers: cpu (a real small model) or sim."""
    model: str = "tiny-llama"
    """Model name the local workers serve (tenants use it)."""
    model_path: str = ""
    """cpu: the model directory; empty: the default model, made on first use."""
    sim_profile: str = "llama-3.1-8b-h100"
    """sim: the simulated-engine profile of the local workers (workers/profiles/)."""
    gateway_port: int = 8000
    """The tenant gateway's HTTP port (OpenAI API); its gRPC Inference port is any free one."""
    monitoring: bool = False
    """Also run Prometheus (``make up MONITORING=1``): see ``_start_prometheus``."""
    prometheus_port: int = 9090
    """Prometheus' HTTP port on 127.0.0.1 (with ``monitoring``)."""


@dataclass
class _Started:
    etcd: EtcdServer | None = None
    ray: Any = None  # ray.cluster_utils.Cluster
    ray_pids: list[int] = field(default_factory=list)
    children: list[ManagedProcess] = field(default_factory=list)


class LocalCluster:
    def __init__(self, settings: UpSettings) -> None:
        self.s = settings
        self.started = _Started()
        self._stop = threading.Event()
        self.logs = settings.state_dir / "logs"
        self.pid_file = settings.state_dir / "up.pids"
        self.demo_api_key = ""
        self.gateway_grpc_port = 0
        self.metrics_targets: dict[str, str] = {}
        """Component name -> host:port of its /metrics (with ``monitoring``)."""
        self.prometheus_url = ""

    # --- lifecycle ---------------------------------------------------------------------------
    def run_foreground(self) -> int:
        """Start everything, print the endpoints, wait for Ctrl-C; return an exit code."""
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._on_signal)
        code = 0
        try:
            self.preflight()
            self.start()
            self.print_endpoints()
            code = self.watch()
        except KeyboardInterrupt:
            code = 0
        except Exception as e:  # report and clean up; never leave children behind
            print(f"switchboard up: {e}", file=sys.stderr)
            code = 1
        finally:
            self.stop()
        return code

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._stop.set()

    def preflight(self) -> None:
        self.s.state_dir.mkdir(parents=True, exist_ok=True)
        if self.pid_file.exists():
            with contextlib.suppress(ValueError, OSError):
                alive = {
                    name: pid
                    for name, pid in json.loads(self.pid_file.read_text()).items()
                    if pid_alive(int(pid))
                }
                if alive:
                    raise RuntimeError(
                        f"another `switchboard up` is running from {self.s.state_dir} "
                        f"(pids {alive}); stop it first (Ctrl-C) or kill those pids"
                    )
            self.pid_file.unlink(missing_ok=True)
        ports = [
            (self.s.etcd_port, "etcd", "--etcd-port"),
            (self.s.grpc_port, "control plane", "--grpc-port"),
            (self.s.gateway_port, "gateway", "--gateway-port"),
        ]
        if self.s.monitoring:
            ports.append((self.s.prometheus_port, "Prometheus", "--prometheus-port"))
        for port, what, flag in ports:
            if port_open(port):
                raise RuntimeError(
                    f"port {port} for {what} is already in use on 127.0.0.1; "
                    f"pick another with UP_ARGS='{flag} N'"
                )
        if self.s.ray_nodes < 1 or self.s.gpus_per_node < 0:
            raise RuntimeError("--ray-nodes must be >= 1 and --gpus-per-node >= 0")

    def start(self) -> None:
        self._say(f"starting etcd on 127.0.0.1:{self.s.etcd_port}")
        self.started.etcd = EtcdServer(
            self.s.state_dir / "etcd",
            client_port=self.s.etcd_port,
            log_path=self.logs / "etcd.log",
        ).start()
        self._write_pids()

        self._say(f"starting a {self.s.ray_nodes}-node Ray cluster on 127.0.0.1")
        ray_node_ids = self._start_ray()
        self._write_pids()

        for i, ray_node_id in enumerate(ray_node_ids):
            node_id = f"local-{i}"
            self._spawn(
                f"agent-{node_id}",
                [
                    "node-agent",
                    "--etcd", self.etcd_endpoint,
                    "--node-id", node_id,
                    "--gpus", str(self.s.gpus_per_node),
                    "--gpu-model", self.s.gpu_model,
                    "--gpu-memory-gib", str(self.s.gpu_memory_gib),
                    "--ttl", str(self.s.lease_ttl_s),
                    "--ray-node-id", ray_node_id,
                    "--label", "zone=local",
                    "--label", f"rack=rack-{i}",
                    *self._metrics_args(f"agent-{node_id}"),
                ],
            )  # fmt: skip
        self._spawn(
            "controlplane",
            [
                "controlplane",
                "--etcd", self.etcd_endpoint,
                "--listen", f"127.0.0.1:{self.s.grpc_port}",
                "--replica-id", "local-controlplane",
                "--ray-address", self.ray_address,
                "--worker-ttl", str(self.s.lease_ttl_s),
                *self._metrics_args("controlplane"),
            ],
        )  # fmt: skip
        self._wait_for_nodes()
        self._apply_default_deployment()
        self._ensure_demo_tenant()
        self._start_gateway()
        if self.s.monitoring:
            self._start_prometheus()

    # --- monitoring (make up MONITORING=1) ----------------------------------------------------
    def _metrics_args(self, name: str) -> list[str]:
        """``--metrics-port P`` for a component with ``monitoring`` (P: a free port, recorded
        as a scrape target), nothing without."""
        if not self.s.monitoring:
            return []
        from controlplane.local.procs import free_port

        port = free_port()
        self.metrics_targets[name] = f"127.0.0.1:{port}"
        return ["--metrics-port", str(port)]

    def prometheus_config(self) -> dict[str, Any]:
        """Static targets for what ``up`` started itself; the workers the control plane places
        (on ports chosen at start) through its HTTP service discovery."""
        from controlplane.local.monitoring import ScrapeTargets, prometheus_config

        controlplane = self.metrics_targets.get("controlplane", "")
        return prometheus_config(
            ScrapeTargets(
                gateways=[f"127.0.0.1:{self.s.gateway_port}"],
                controlplanes=[controlplane] if controlplane else [],
                node_agents=[t for n, t in self.metrics_targets.items() if n.startswith("agent-")],
                sd_urls=[f"http://{controlplane}/sd/targets"] if controlplane else [],
            )
        )

    def _start_prometheus(self) -> None:
        from controlplane.local.monitoring import PrometheusServer

        self._say(f"starting Prometheus on http://127.0.0.1:{self.s.prometheus_port}")
        server = PrometheusServer(
            self.s.state_dir / "prometheus",
            self.prometheus_config(),
            port=self.s.prometheus_port,
            log_path=self.logs / "prometheus.log",
        )
        try:
            server.start()
        finally:
            if server.process is not None:
                self.started.children.append(server.process)
                self._write_pids()
        self.prometheus_url = server.url

    def default_deployment(self) -> dict[str, Any]:
        """The deployment `up` applies: one prefill and one decode replica of the local model."""
        if self.s.worker_engine == "cpu":
            engine: dict[str, Any] = {
                "engine": "cpu",
                "model_path": self._ensure_model(),
                "engine_args": {"threads": "1"},
            }
        else:
            engine = {"engine": "sim", "engine_args": {"profile": self.s.sim_profile}}
        return {
            "name": "local",
            "model": self.s.model,
            **engine,
            "pools": [
                {"role": "prefill", "replicas": 1, "min_replicas": 0, "max_replicas": 4},
                {"role": "decode", "replicas": 1, "min_replicas": 0, "max_replicas": 4},
            ],
        }

    def _apply_default_deployment(self) -> None:
        import grpc
        from switchboard.v1 import deployments_pb2, deployments_pb2_grpc

        from controlplane.adapters.grpc.deployments import spec_to_pb
        from controlplane.deployspec import spec_from_dict

        spec = spec_from_dict(self.default_deployment())
        self._say(f"applying deployment/{spec.name} ({spec.engine.value}: 1 prefill + 1 decode)")
        with grpc.insecure_channel(f"127.0.0.1:{self.s.grpc_port}") as channel:
            deployments_pb2_grpc.DeploymentsStub(channel).Apply(
                deployments_pb2.ApplyDeploymentRequest(spec=spec_to_pb(spec)), timeout=30
            )

    def _ensure_demo_tenant(self) -> None:
        """Create the ``demo`` tenant (or reuse it and its key file); see local/demo_tenant.py."""
        import asyncio

        from controlplane.local.demo_tenant import KEY_FILE_NAME, ensure_demo_tenant

        self.demo_api_key, what = asyncio.run(
            ensure_demo_tenant(self.etcd_endpoint, self.s.state_dir)
        )
        self._say(f"tenant/demo {what}; its API key is in {self.s.state_dir / KEY_FILE_NAME}")

    def _start_gateway(self, timeout_s: float = 60.0) -> None:
        """The tenant gateway (HTTP on ``gateway_port``), once the deployment is applied."""
        port_file = self.s.state_dir / "gateway.port"
        port_file.unlink(missing_ok=True)
        self._say(f"starting the gateway on http://127.0.0.1:{self.s.gateway_port}")
        proc = self._spawn(
            "gateway",
            [
                "gateway",
                "--etcd", self.etcd_endpoint,
                "--listen", f"127.0.0.1:{self.s.gateway_port}",
                "--grpc-listen", "127.0.0.1:0",
                "--port-file", str(port_file),
            ],
        )  # fmt: skip
        deadline = time.monotonic() + timeout_s
        while not (port_file.exists() and port_file.read_text().strip()):
            if not proc.alive():
                raise RuntimeError(f"gateway exited:\n{proc.tail()}")
            if time.monotonic() > deadline or self._stop.is_set():
                raise RuntimeError(f"the gateway did not start within {timeout_s:.0f}s")
            time.sleep(0.2)
        self.gateway_grpc_port = int(port_file.read_text().split()[1])

    def _ensure_model(self) -> str:
        from workers.engines.cpu_model import default_model_dir, ensure_model, is_model_dir

        path = Path(self.s.model_path) if self.s.model_path else default_model_dir()
        if self.s.model_path and not (path / "config.json").is_file():
            raise RuntimeError(f"no model at {path}")
        if not self.s.model_path and not is_model_dir(path):
            self._say(f"making the default cpu model in {path} (once, ~10 s)")
        if not self.s.model_path:
            ensure_model(path)
        return str(path)

    @property
    def etcd_endpoint(self) -> str:
        return f"127.0.0.1:{self.s.etcd_port}"

    def _start_ray(self) -> list[str]:
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        from ray.cluster_utils import Cluster

        common: dict[str, Any] = {
            "node_ip_address": "127.0.0.1",
            "num_cpus": 1,
            "num_gpus": self.s.gpus_per_node,
            "object_store_memory": self.s.ray_object_store_bytes,
        }
        cluster: Any = Cluster(
            initialize_head=True,
            head_node_args={
                **common,
                "include_dashboard": False,
                "labels": {NODE_LABEL: "local-0"},
            },
        )
        self.started.ray = cluster
        self._collect_ray_pids()
        for i in range(1, self.s.ray_nodes):
            cluster.add_node(**common, labels={NODE_LABEL: f"local-{i}"})
            self._collect_ray_pids()
        cluster.wait_for_nodes()
        self.ray_address = str(cluster.address)
        return [str(node.node_id) for node in cluster.list_all_nodes()]

    def _collect_ray_pids(self) -> None:
        cluster: Any = self.started.ray
        pids: list[int] = []
        for node in cluster.list_all_nodes():
            for infos in node.all_processes.values():
                pids.extend(int(info.process.pid) for info in infos)
        self.started.ray_pids = sorted(set(pids))

    def _spawn(self, name: str, args: list[str]) -> ManagedProcess:
        proc = ManagedProcess(
            name, [sys.executable, "-m", "controlplane", *args], self.logs / f"{name}.log"
        ).start()
        self.started.children.append(proc)
        self._write_pids()
        return proc

    def _write_pids(self) -> None:
        pids: dict[str, int] = {}
        if self.started.etcd is not None and self.started.etcd.process is not None:
            pids["etcd"] = self.started.etcd.process.pid
        for i, pid in enumerate(self.started.ray_pids):
            pids[f"ray-{i}"] = pid
        for child in self.started.children:
            pids[child.name] = child.pid
        self.pid_file.write_text(json.dumps(pids, indent=2) + "\n")

    def _wait_for_nodes(self, timeout_s: float = 60.0) -> None:
        import grpc
        from switchboard.v1 import nodes_pb2, nodes_pb2_grpc

        deadline = time.monotonic() + timeout_s
        with grpc.insecure_channel(f"127.0.0.1:{self.s.grpc_port}") as channel:
            stub = nodes_pb2_grpc.NodeRegistryStub(channel)
            while time.monotonic() < deadline and not self._stop.is_set():
                for child in self.started.children:
                    if not child.alive():
                        raise RuntimeError(f"{child.name} exited:\n{child.tail()}")
                try:
                    resp = stub.ListNodes(nodes_pb2.ListNodesRequest(), timeout=2)
                    if len(resp.nodes) >= self.s.ray_nodes:
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.2)
        if not self._stop.is_set():
            raise RuntimeError(f"nodes did not register within {timeout_s:.0f}s")

    def print_endpoints(self) -> None:
        if self._stop.is_set():
            return
        total = self.s.ray_nodes * self.s.gpus_per_node
        lines = [
            "",
            "Switchboard is up.",
            f"  etcd            127.0.0.1:{self.s.etcd_port}",
            f"  Ray             {self.ray_address}  ({self.s.ray_nodes} nodes, {total} GPUs)",
            f"  control plane   127.0.0.1:{self.s.grpc_port}  (gRPC: NodeRegistry, ControlPlane)",
            f"  deployment      local: 1 prefill + 1 decode, {self.s.worker_engine} engine, "
            f"model {self.s.model}"
            + (f" ({self.s.sim_profile})" if self.s.worker_engine == "sim" else "")
            + ", as Ray actors",
            f"  gateway         http://127.0.0.1:{self.s.gateway_port}/v1  (OpenAI API; "
            f"gRPC Inference on 127.0.0.1:{self.gateway_grpc_port})",
            *(
                [
                    f"  Prometheus      {self.prometheus_url}  (rules: deploy/prometheus/rules/;"
                    f" config: {self.s.state_dir / 'prometheus' / 'prometheus.yml'})",
                    f"  Grafana         data source: Prometheus at {self.prometheus_url};"
                    " dashboards: Dashboards > New > Import each dashboards/json/*.json",
                ]
                if self.prometheus_url
                else []
            ),
            f"  logs            {self.logs}/",
            f"  demo tenant     demo, API key {self.demo_api_key}"
            f"  (in {self.s.state_dir / 'demo-api-key'})",
            "",
            f"  try: switchboard nodes --endpoint 127.0.0.1:{self.s.grpc_port}",
            f"       switchboard describe deployment local --endpoint 127.0.0.1:{self.s.grpc_port}",
            "  Ctrl-C stops everything.",
            "",
        ]
        print("\n".join(lines), flush=True)

    def watch(self) -> int:
        """Block until asked to stop; a child dying unexpectedly stops everything (exit 1)."""
        while not self._stop.wait(0.5):
            for child in self.started.children:
                if not child.alive():
                    print(f"switchboard up: {child.name} exited:\n{child.tail()}", file=sys.stderr)
                    return 1
        return 0

    def stop(self) -> None:
        self._say("stopping")
        for child in reversed(self.started.children):
            child.stop(grace_s=5.0)
        if self.started.ray is not None:
            with contextlib.suppress(Exception):
                self.started.ray.shutdown()
        for pid in self.started.ray_pids:  # Ray may ignore SIGTERM: make sure, by PID
            stop_pid(pid, grace_s=2.0)
        if self.started.etcd is not None:
            self.started.etcd.stop()
        self.pid_file.unlink(missing_ok=True)
        self._say("stopped")

    def _say(self, message: str) -> None:
        print(f"[switchboard up] {message}", flush=True)
