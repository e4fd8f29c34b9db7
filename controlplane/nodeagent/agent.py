"""NodeAgent: keeps one node's lease-bound registration alive in etcd, whatever etcd does.

Theory of operation
-------------------
::

    ┌────────────┐  grant lease + put   ┌────────────┐  keepalive every ttl/3   ┌──────────┐
    │ REGISTERING├─────────────────────►│ REGISTERED ├─────────────────────────►│ (same)   │
    └─────▲──────┘                      └─────┬──────┘  re-read GPUs every      └──────────┘
          │ lease gone (LeaseNotFound)        │         report interval; write if changed
          └───────────────────────────────────┘
          etcd unreachable while REGISTERING: back off (0.1 s doubling to 2 s) and retry
          etcd unreachable while REGISTERED: keep refreshing the *same* lease with backoff —
          a restarted etcd keeps its leases, so the node never flaps; only when etcd says the
          lease is gone (expired, or etcd lost its data) does the agent register anew.

The agent never exits because etcd was away. It exits on a bad inventory (a configuration
error) or when asked to stop; then it revokes its lease so the node leaves at once.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable
from typing import Protocol

from controlplane.adapters.etcd.client import LeaseNotFound
from controlplane.core.model import NodeInventory
from controlplane.core.nodes import validate_inventory, validate_lease_ttl
from controlplane.errors import InvalidArgument, SwitchboardError
from controlplane.nodeagent.inventory import GpuProbe

log = logging.getLogger(__name__)


class NodeLeaseStore(Protocol):
    """What the agent needs from the registry (EtcdNodeRegistry in production)."""

    async def register(self, inv: NodeInventory, ttl_s: int) -> int: ...
    async def update(self, inv: NodeInventory, lease_id: int) -> int: ...
    async def keepalive(self, lease_id: int) -> int: ...
    async def deregister(self, lease_id: int) -> None: ...


class NodeAgent:
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
    ) -> None:
        self._registry = registry
        self._probe = probe
        self._base = base
        self._clock = clock
        self._ttl = validate_lease_ttl(lease_ttl_s)
        self._report_s = report_interval_s
        self._backoff = (backoff_initial_s, backoff_max_s)
        self.lease_id = 0
        self.registrations = 0  # how many times the node has (re-)registered
        self.registered = asyncio.Event()
        validate_inventory(self._inventory())  # fail fast on a bad declaration

    def _inventory(self, registered_at: float = 0.0) -> NodeInventory:
        now = self._clock()
        return dataclasses.replace(
            self._base,
            gpus=self._probe.read(),
            registered_at=registered_at or now,
            last_heartbeat=now,
        )

    async def run(self) -> None:
        """Register and stay registered until cancelled; then deregister."""
        delay = self._backoff[0]
        try:
            while True:
                try:
                    inv = validate_inventory(self._inventory())
                    self.lease_id = await self._registry.register(inv, self._ttl)
                    self.registrations += 1
                    self.registered.set()
                    log.info(
                        "registered node %s (%d GPUs) with lease %x, TTL %ds",
                        inv.node_id,
                        inv.gpu_count,
                        self.lease_id,
                        self._ttl,
                    )
                    delay = self._backoff[0]
                    await self._maintain(inv)
                except InvalidArgument:
                    raise
                except LeaseNotFound as e:
                    log.warning("lease lost (%s): registering again", e)
                    self.registered.clear()
                    continue
                except SwitchboardError as e:
                    log.warning("cannot register yet (%s); retrying in %.1fs", e, delay)
                self.registered.clear()
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._backoff[1])
        finally:
            await self._deregister()

    async def _maintain(self, inv: NodeInventory) -> None:
        """Refresh the lease and report changed figures; returns only via LeaseNotFound."""
        interval = max(self._ttl / 3.0, 0.2)
        next_report = self._clock() + self._report_s
        delay = self._backoff[0]
        while True:
            await asyncio.sleep(interval if delay == self._backoff[0] else delay)
            try:
                await self._registry.keepalive(self.lease_id)
                if self._clock() >= next_report:
                    next_report = self._clock() + self._report_s
                    fresh = self._inventory(registered_at=inv.registered_at)
                    if fresh.gpus != inv.gpus:
                        inv = validate_inventory(fresh)
                        await self._registry.update(inv, self.lease_id)
                delay = self._backoff[0]
            except LeaseNotFound:
                raise
            except SwitchboardError as e:
                # etcd away: keep the same lease; it survives an etcd restart.
                log.warning("lease refresh failed (%s); retrying in %.1fs", e, delay)
                delay = min(delay * 2, self._backoff[1])

    async def _deregister(self) -> None:
        lease, self.lease_id = self.lease_id, 0
        self.registered.clear()
        if lease:
            try:
                await asyncio.wait_for(self._registry.deregister(lease), 2.0)
                log.info("deregistered (revoked lease %x)", lease)
            except (SwitchboardError, TimeoutError) as e:
                log.info("could not revoke lease %x (it will expire): %s", lease, e)
