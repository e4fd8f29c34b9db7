"""Settings objects, read once at start by the composition root (cli.py)."""

from __future__ import annotations

import os
import socket
import uuid
from dataclasses import dataclass, field

DEFAULT_ETCD = "127.0.0.1:2379"
DEFAULT_CONTROLPLANE = "127.0.0.1:50051"
DEFAULT_PREFIX = "/switchboard/v1"


def env_or(name: str, default: str) -> str:
    return os.environ.get(name) or default


def default_replica_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


@dataclass(frozen=True)
class EtcdSettings:
    endpoint: str = DEFAULT_ETCD
    """etcd client URL, host:port (env SWITCHBOARD_ETCD)."""
    prefix: str = DEFAULT_PREFIX
    """Key prefix of this Switchboard install; several installs can share one etcd."""
    timeout_s: float = 5.0
    """Deadline of each etcd request."""


@dataclass(frozen=True)
class ControlPlaneSettings:
    etcd: EtcdSettings = field(default_factory=EtcdSettings)
    listen: str = DEFAULT_CONTROLPLANE
    """gRPC listen address (host:port; port 0 picks a free one)."""
    replica_id: str = field(default_factory=default_replica_id)
    """Identity in leader election; unique per replica."""
    leader_ttl_s: int = 10
    """Leader lease TTL: a dead leader is replaced within about this long."""
    default_node_ttl_s: int = 10
    """Lease TTL for nodes registered through the RegisterNode RPC when they ask for none."""
    port_file: str = ""
    """If set, the bound port is written here once serving (for tests and `switchboard up`)."""
    ray_address: str = ""
    """Ray GCS address (host:port) the leader places workers on; empty: no reconciler runs
    (deployments are stored and served, but nothing is started)."""
    worker_lease_ttl_s: int = 10
    """Lease TTL of the workers the reconciler starts."""
    metrics_port: int = -1
    """Serve Prometheus ``/metrics`` and ``/sd/targets`` (service discovery of the workers,
    node agents and gateways registered in etcd) on this port of the ``listen`` host:
    -1 = off, 0 = any free port (logged)."""
    planner: str = "off"
    """SLA planner (leader task): "off", "advisory" (records decisions, writes no spec) or
    "on" (writes ``replicas`` of autoscaled pools). See ``controlplane/planner.py``."""
    planner_interval_s: float = 10.0
    planner_metrics_urls: tuple[str, ...] = ()
    """Gateway ``/metrics`` URLs the planner reads load from; empty: every gateway registered
    in etcd."""
    planner_gpu_budget: int = 0
    """GPUs all deployments may hold together (shared by priority); 0: no budget."""
    planner_scale_down_after_s: float = 60.0
    """Load must stay low this long before the planner drains a replica (its stabilisation
    window and cooldown)."""


@dataclass(frozen=True)
class NodeAgentSettings:
    etcd: EtcdSettings = field(default_factory=EtcdSettings)
    node_id: str = ""
    """Node name; default: the hostname, lowercased."""
    lease_ttl_s: int = 10
    """The node disappears this long after its agent stops refreshing."""
    report_interval_s: float = 5.0
    """How often live GPU figures (free memory, health) are re-read and, if changed, written."""
    ray_node_id: str = ""
    """Ray node this host runs, when known."""
    address: str = ""
    """Address the node's workers advertise; default: 127.0.0.1 for declared inventories."""
    metrics_port: int = 0
    """Serve Prometheus ``/metrics`` on ``address``:this port (0 = any free port, -1 = off);
    the endpoint goes into the node's etcd record, where ``/sd/targets`` finds it."""
