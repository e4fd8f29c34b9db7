"""Hand-written fakes, passed in through constructors (no mock.patch)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass, field

from controlplane.adapters.etcd.client import LeaseNotFound
from controlplane.core.model import Gpu, NodeInventory
from controlplane.errors import Unavailable


@dataclass
class FakeNodeLeaseStore:
    """An in-memory lease store with switchable failure modes.

    ``down``: every call raises Unavailable (etcd unreachable).
    ``forget_leases()``: every existing lease vanishes (etcd came back without its data).
    """

    down: bool = False
    next_lease: int = 100
    leases: set[int] = field(default_factory=set)
    records: dict[str, tuple[NodeInventory, int]] = field(default_factory=dict)
    calls: list[str] = field(default_factory=list)
    keepalives: int = 0
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def _check(self, op: str) -> None:
        self.calls.append(op)
        self.changed.set()
        if self.down:
            raise Unavailable("fake etcd is down")

    def forget_leases(self) -> None:
        self.leases.clear()
        self.records.clear()

    async def register(self, inv: NodeInventory, ttl_s: int) -> int:
        self._check("register")
        self.next_lease += 1
        self.leases.add(self.next_lease)
        self.records[inv.node_id] = (inv, self.next_lease)
        return self.next_lease

    async def update(self, inv: NodeInventory, lease_id: int) -> int:
        self._check("update")
        if lease_id not in self.leases:
            raise LeaseNotFound("fake: lease not found")
        self.records[inv.node_id] = (inv, lease_id)
        return 1

    async def keepalive(self, lease_id: int) -> int:
        self._check("keepalive")
        if lease_id not in self.leases:
            raise LeaseNotFound("fake: lease not found")
        self.keepalives += 1
        return 10

    async def deregister(self, lease_id: int) -> None:
        self._check("deregister")
        self.leases.discard(lease_id)
        for node_id, (_, lease) in list(self.records.items()):
            if lease == lease_id:
                del self.records[node_id]


class ScriptedProbe:
    """A GPU probe that returns a new reading each time it is advanced."""

    def __init__(self, readings: list[tuple[Gpu, ...]]) -> None:
        self._readings: Iterator[tuple[Gpu, ...]] = iter(readings)
        self.current = next(self._readings)

    def advance(self) -> None:
        self.current = next(self._readings, self.current)

    def read(self) -> tuple[Gpu, ...]:
        return self.current


class FakeClock:
    def __init__(self, start: float = 1_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now
