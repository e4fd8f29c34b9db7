"""NodeAgent: keeps one node's lease-bound inventory record alive in etcd.

The registration loop itself (lease, keepalive, re-registration after etcd loses the lease,
never giving up while etcd is away, revoking on stop) is ``controlplane.registration``'s
``LeasedRecord``; this module decides *what* the record is: the declared or NVML-discovered GPUs
with their live figures, re-read every report interval and written only when they change (a
steady fleet costs etcd one keepalive per node per TTL/3 and no writes).

With ``metrics``: the node's GPUs by state (healthy / unhealthy), set at every read, and
failed heartbeats (a registration, update or keepalive that etcd refused or did not answer).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from controlplane.core.model import NodeInventory
from controlplane.core.nodes import validate_inventory
from controlplane.nodeagent.inventory import GpuProbe
from controlplane.registration import LeasedRecord, LeaseStore
from controlplane.telemetry.metrics import NodeAgentMetrics

NodeLeaseStore = LeaseStore[NodeInventory]


class CountingLeaseStore:
    """A ``NodeLeaseStore`` that counts failed calls in ``heartbeat_failures``."""

    def __init__(self, inner: NodeLeaseStore, metrics: NodeAgentMetrics) -> None:
        self._inner = inner
        self._failures = metrics.heartbeat_failures

    async def register(self, record: NodeInventory, ttl_s: int) -> int:
        try:
            return await self._inner.register(record, ttl_s)
        except Exception:
            self._failures.inc()
            raise

    async def update(self, record: NodeInventory, lease_id: int) -> int:
        try:
            return await self._inner.update(record, lease_id)
        except Exception:
            self._failures.inc()
            raise

    async def keepalive(self, lease_id: int) -> int:
        try:
            return await self._inner.keepalive(lease_id)
        except Exception:
            self._failures.inc()
            raise

    async def deregister(self, lease_id: int) -> None:
        await self._inner.deregister(lease_id)


class NodeAgent(LeasedRecord[NodeInventory]):
    def __init__(
        self,
        registry: NodeLeaseStore,
        probe: GpuProbe,
        base: NodeInventory,
        *,
        clock: Callable[[], float],
        lease_ttl_s: int = 10,
        report_interval_s: float = 5.0,
        backoff_initial_s: float = 0.1,
        backoff_max_s: float = 2.0,
        metrics: NodeAgentMetrics | None = None,
    ) -> None:
        self._probe = probe
        self._base = base
        self._metrics = metrics
        super().__init__(
            registry if metrics is None else CountingLeaseStore(registry, metrics),
            self._inventory,
            clock=clock,
            lease_ttl_s=lease_ttl_s,
            report_interval_s=report_interval_s,
            backoff_initial_s=backoff_initial_s,
            backoff_max_s=backoff_max_s,
            name=f"node {base.node_id}",
        )
        self._inventory(None)  # fail fast on a bad declaration

    def _inventory(self, previous: NodeInventory | None) -> NodeInventory:
        """The inventory now; unchanged figures give an equal record (so nothing is written)."""
        gpus = self._probe.read()
        if self._metrics is not None:
            healthy = sum(1 for g in gpus if g.healthy)
            node = self._base.node_id
            self._metrics.node_gpus.labels(node, "healthy").set(healthy)
            self._metrics.node_gpus.labels(node, "unhealthy").set(len(gpus) - healthy)
        if previous is not None and previous.gpus == gpus:
            return previous
        now = self._clock()
        return validate_inventory(
            dataclasses.replace(
                self._base,
                gpus=gpus,
                registered_at=previous.registered_at if previous else now,
                last_heartbeat=now,
            )
        )
