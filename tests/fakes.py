"""Hand-written fakes, passed in through constructors (no mock.patch)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

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


class FakeEngine:
    """A scripted InferenceEngine: emits ``tokens`` one per step, every ``step_s`` seconds.

    Holds prefilled KV as ``kv_bytes`` per request; ``gate`` (when set) must be opened before a
    decode stream finishes, so tests can hold a request in flight.
    """

    model = "fake"
    max_context_tokens = 4096
    vocab_size = 1000

    def __init__(self, kv_bytes: bytes = b"kv" * 10, step_s: float = 0.0) -> None:
        from workers.engine import EngineStats

        self.kv_bytes = kv_bytes
        self.step_s = step_s
        self.held: dict[str, bytes] = {}
        self.aborted: list[str] = []
        self.gate: asyncio.Event | None = None
        self._stats = EngineStats(kv_blocks_total=64)

    async def prefill(self, request_id: str, prompt: tuple[int, ...], sampling: Any) -> Any:
        from workers.engine import KvHandle, PrefillResult, validate_prompt

        validate_prompt(prompt, sampling, vocab_size=self.vocab_size,
                        max_context_tokens=self.max_context_tokens)  # fmt: skip
        kv_id = f"kv-{request_id}"
        self.held[kv_id] = self.kv_bytes
        handle = KvHandle(kv_id, "127.0.0.1:1", len(prompt), len(self.kv_bytes))
        return PrefillResult(request_id, first_token_id=prompt[-1], kv=handle)

    async def _tokens(self, request_id: str, start: int, n: int) -> AsyncIterator[Any]:
        from workers.engine import TokenChunk

        for i in range(n):
            await asyncio.sleep(self.step_s)
            if request_id in self.aborted:
                yield TokenChunk((), "abort")
                return
            last = i == n - 1
            if last and self.gate is not None:
                await self.gate.wait()
            yield TokenChunk((start + i,), "length" if last else None)

    def decode(self, request_id: str, prompt: tuple[int, ...], first: int, kv: Any,
               sampling: Any) -> AsyncIterator[Any]:  # fmt: skip
        from workers.engine import KvUnavailable

        if kv.kv_id not in self.held:
            raise KvUnavailable(f"KV {kv.kv_id} not held")
        return self._tokens(request_id, first + 1, sampling.max_tokens - 1)

    def generate(
        self, request_id: str, prompt: tuple[int, ...], sampling: Any
    ) -> AsyncIterator[Any]:
        return self._tokens(request_id, 0, sampling.max_tokens)

    async def abort(self, request_id: str) -> bool:
        self.aborted.append(request_id)
        self.held.pop(f"kv-{request_id}", None)
        return True

    def export_kv(self, kv_id: str) -> bytes:
        from workers.engine import KvUnavailable

        if kv_id not in self.held:
            raise KvUnavailable(f"KV {kv_id} is not held here (expired or evicted)")
        return self.held[kv_id]

    def stats(self) -> Any:
        return self._stats

    def drain_kv_events(self) -> list[Any]:
        return []
