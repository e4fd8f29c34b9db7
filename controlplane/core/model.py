"""Domain model: frozen dataclasses shared by the core, the adapters and the shells."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

GIB = 1024**3


class NodeHealth(enum.StrEnum):
    HEALTHY = "Healthy"
    DEGRADED = "Degraded"  # serving, some GPUs unhealthy
    UNHEALTHY = "Unhealthy"


class SchedulingState(enum.StrEnum):
    SCHEDULABLE = "Schedulable"
    CORDONED = "Cordoned"  # no new placements; running workers stay
    DRAINING = "Draining"  # cordoned, and running workers are drained and replaced


def _frozen_map(m: Mapping[str, str] | None) -> Mapping[str, str]:
    return MappingProxyType(dict(sorted((m or {}).items())))


@dataclass(frozen=True, slots=True)
class Gpu:
    """One GPU of a node, as its agent reports it."""

    index: int
    model: str
    memory_total_bytes: int
    memory_free_bytes: int
    uuid: str = ""
    nvlink_domain: str = ""
    healthy: bool = True


@dataclass(frozen=True, slots=True)
class NodeInventory:
    """What a node agent registers: identity, topology, live GPU figures. Lease-bound in etcd."""

    node_id: str
    gpus: tuple[Gpu, ...] = ()
    labels: Mapping[str, str] = field(default_factory=dict)
    hostname: str = ""
    address: str = ""
    ray_node_id: str = ""
    agent_version: str = ""
    health_message: str = ""
    registered_at: float = 0.0  # unix seconds
    last_heartbeat: float = 0.0  # unix seconds
    metrics_endpoint: str = ""
    """host:port of the node agent's Prometheus ``/metrics`` ("" none)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "labels", _frozen_map(self.labels))
        object.__setattr__(self, "gpus", tuple(self.gpus))

    @property
    def health(self) -> NodeHealth:
        """Healthy when every GPU is; Unhealthy when none is (and there are GPUs)."""
        if not self.gpus:
            return NodeHealth.UNHEALTHY if self.health_message else NodeHealth.HEALTHY
        healthy = sum(1 for g in self.gpus if g.healthy)
        if healthy == len(self.gpus):
            return NodeHealth.HEALTHY
        return NodeHealth.DEGRADED if healthy else NodeHealth.UNHEALTHY

    @property
    def gpu_count(self) -> int:
        return len(self.gpus)

    @property
    def memory_free_bytes(self) -> int:
        return sum(g.memory_free_bytes for g in self.gpus)

    @property
    def memory_total_bytes(self) -> int:
        return sum(g.memory_total_bytes for g in self.gpus)


@dataclass(frozen=True, slots=True)
class NodeSchedulingStatus:
    """Cordon / drain state set by SREs. Stored apart from the inventory, without a lease."""

    state: SchedulingState = SchedulingState.SCHEDULABLE
    reason: str = ""
    since: float = 0.0  # unix seconds


@dataclass(frozen=True, slots=True)
class Node:
    """A registered node as the control plane sees it: inventory + scheduling status."""

    inventory: NodeInventory
    scheduling: NodeSchedulingStatus = NodeSchedulingStatus()
    lease_id: int = 0

    @property
    def node_id(self) -> str:
        return self.inventory.node_id

    @property
    def schedulable(self) -> bool:
        return (
            self.scheduling.state is SchedulingState.SCHEDULABLE
            and self.inventory.health is not NodeHealth.UNHEALTHY
        )


class WorkerState(enum.StrEnum):
    SERVING = "Serving"
    DRAINING = "Draining"  # takes no new work; finishes in-flight requests, then leaves


@dataclass(frozen=True, slots=True)
class WorkerRecord:
    """What a worker publishes under its lease: how to reach it and what it can take."""

    worker_id: str
    model: str
    role: str  # "prefill" | "decode" | "both"
    engine: str  # "vllm" | "trtllm" | "cpu" | "sim"
    endpoint: str  # host:port of its Worker gRPC service
    node_id: str = ""
    max_context_tokens: int = 0
    kv_blocks_total: int = 0
    state: WorkerState = WorkerState.SERVING
    started_at: float = 0.0
    deployment: str = ""
    """The deployment that placed it ("" for a worker started by hand)."""
    pool: str = ""
    """Its pool's kind (``PoolRole``: prefill | decode | aggregated | long_context); "" unknown."""
    long_context_threshold_tokens: int = 0
    """The deployment's long-context threshold: prompts of at least this many tokens go to its
    long_context pool; 0: none."""
    chunked_prefill: bool = False
    """The engine prefills long prompts in chunks between decode steps."""
    metrics_endpoint: str = ""
    """host:port of its Prometheus ``/metrics`` ("" none): the control plane's
    ``/sd/targets`` lists it for Prometheus."""
    token_endpoint: str = ""
    """host:port of its token transport (Prefill / Decode frames on one connection per
    gateway, workers/token_transport.py); "": gateways use its gRPC service."""
