"""Keeping one lease-bound record alive in etcd, whatever etcd does.

Theory of operation
-------------------
Node agents (their node's inventory) and workers (their endpoint and capacity) both publish one
record that must exist exactly while its process lives. ``LeasedRecord`` runs that loop::

    ┌────────────┐  grant lease + put   ┌────────────┐  keepalive every ttl/3   ┌──────────┐
    │ REGISTERING├─────────────────────►│ REGISTERED ├─────────────────────────►│ (same)   │
    └─────▲──────┘                      └─────┬──────┘  re-take the snapshot    └──────────┘
          │ lease gone (LeaseNotFound)        │         every report interval; write it
          └───────────────────────────────────┘         only if it changed
          etcd unreachable while REGISTERING: back off (0.1 s doubling to 2 s) and retry
          etcd unreachable while REGISTERED: keep refreshing the *same* lease with backoff —
          a restarted etcd keeps its leases, so the record never flaps; only when etcd says the
          lease is gone (expired, or etcd lost its data) does it register anew.

It never gives up because etcd was away. ``InvalidArgument`` from the snapshot (a configuration
error) ends ``run``; cancelling ``run`` revokes the lease so the record disappears at once.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable
from typing import Generic, Protocol, TypeVar

from controlplane.adapters.etcd.client import LeaseNotFound
from controlplane.core.nodes import validate_lease_ttl
from controlplane.errors import InvalidArgument, SwitchboardError

log = logging.getLogger(__name__)

R = TypeVar("R")
R_contra = TypeVar("R_contra", contravariant=True)


class LeaseStore(Protocol[R_contra]):
    """What the loop needs from a registry (EtcdNodeRegistry, EtcdWorkerRegistry)."""

    async def register(self, record: R_contra, ttl_s: int) -> int: ...
    async def update(self, record: R_contra, lease_id: int) -> int: ...
    async def keepalive(self, lease_id: int) -> int: ...
    async def deregister(self, lease_id: int) -> None: ...


class LeasedRecord(Generic[R]):
    def __init__(
        self,
        store: LeaseStore[R],
        snapshot: Callable[[R | None], R],
        *,
        clock: Callable[[], float],
        lease_ttl_s: int = 10,
        report_interval_s: float = 5.0,
        backoff_initial_s: float = 0.1,
        backoff_max_s: float = 2.0,
        name: str = "record",
        rng: random.Random | None = None,
    ) -> None:
        """``snapshot(previous)`` returns the record to publish now (``previous`` is the last one
        written under the current lease, or None when registering); it may raise
        InvalidArgument for a configuration error."""
        self._store = store
        self._snapshot = snapshot
        self._clock = clock
        self._ttl = validate_lease_ttl(lease_ttl_s)
        self._report_s = report_interval_s
        self._backoff = (backoff_initial_s, backoff_max_s)
        self._name = name
        self._rng = rng or random.Random()
        self.lease_id = 0
        self.registrations = 0  # how many times the record has been (re-)registered
        self.registered = asyncio.Event()
        self.current: R | None = None

    async def run(self) -> None:
        """Register and stay registered until cancelled; then deregister."""
        delay = self._backoff[0]
        try:
            while True:
                try:
                    record = self._snapshot(None)
                    self.lease_id = await self._store.register(record, self._ttl)
                    self.current = record
                    self.registrations += 1
                    self.registered.set()
                    log.info("registered %s with lease %x, TTL %ds", self._name, self.lease_id,
                             self._ttl)  # fmt: skip
                    delay = self._backoff[0]
                    await self._maintain()
                except InvalidArgument:
                    raise
                except LeaseNotFound as e:
                    log.warning("%s: lease lost (%s): registering again", self._name, e)
                    self.registered.clear()
                    continue
                except SwitchboardError as e:
                    log.warning("%s: cannot register yet (%s); retrying in %.1fs",
                                self._name, e, delay)  # fmt: skip
                self.registered.clear()
                await asyncio.sleep(self._jittered(delay))
                delay = min(delay * 2, self._backoff[1])
        finally:
            await self.deregister()

    def _jittered(self, delay: float) -> float:
        """Full jitter in [delay/2, delay]: thousands of agents must not retry in step."""
        return delay * (0.5 + 0.5 * self._rng.random())

    async def _maintain(self) -> None:
        """Refresh the lease and publish changes; returns only via LeaseNotFound.

        Refreshes run on a fixed schedule (every TTL/3, jittered by up to 10%, measured from
        the previous refresh's *start*), so a slow etcd does not stretch the period and agents
        that registered together drift apart instead of refreshing in bursts.
        """
        interval = max(self._ttl / 3.0, 0.2)
        loop = asyncio.get_running_loop()
        next_report = self._clock() + self._report_s
        delay = self._backoff[0]
        due = loop.time() + interval * (0.9 + 0.1 * self._rng.random())
        while True:
            if delay == self._backoff[0]:
                await asyncio.sleep(max(0.0, due - loop.time()))
                due += interval * (0.9 + 0.1 * self._rng.random())
            else:
                await asyncio.sleep(self._jittered(delay))
                due = loop.time() + interval
            try:
                await self._store.keepalive(self.lease_id)
                if self._clock() >= next_report:
                    next_report = self._clock() + self._report_s
                    await self.publish()
                delay = self._backoff[0]
            except LeaseNotFound:
                raise
            except SwitchboardError as e:
                # etcd away: keep the same lease; it survives an etcd restart.
                log.warning("%s: lease refresh failed (%s); retrying in %.1fs",
                            self._name, e, delay)  # fmt: skip
                delay = min(delay * 2, self._backoff[1])

    async def publish(self) -> None:
        """Take a snapshot now and write it if it changed (callers may force an early report)."""
        if not self.lease_id:
            return
        fresh = self._snapshot(self.current)
        if fresh != self.current:
            await self._store.update(fresh, self.lease_id)
            self.current = fresh

    async def deregister(self) -> None:
        lease, self.lease_id = self.lease_id, 0
        self.registered.clear()
        if lease:
            try:
                await asyncio.wait_for(self._store.deregister(lease), 2.0)
                log.info("%s: deregistered (revoked lease %x)", self._name, lease)
            except (SwitchboardError, TimeoutError) as e:
                log.info("%s: could not revoke lease %x (it will expire): %s", self._name, lease, e)
