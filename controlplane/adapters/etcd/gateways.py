"""Gateway replicas in etcd: each live gateway holds one lease-bound record, and every gateway
watches them all, so each knows how many replicas share the tenants' quotas.

Key: ``{prefix}/gateways/<gateway-id>`` -> ``{"gateway_id", "http", "grpc", "started_at"}``
(JSON), bound to the gateway's lease: a gateway that dies disappears within one TTL, and one
that stops cleanly revokes its lease at once.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

from controlplane.adapters.etcd.client import EtcdClient, prefix_range_end
from controlplane.adapters.etcd.listwatch import list_and_watch

DEFAULT_PREFIX = "/switchboard/v1"
log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class GatewayRecord:
    gateway_id: str
    http: str
    """host:port of the OpenAI HTTP API (and /metrics)."""
    grpc: str = ""
    started_at: float = 0.0


class EtcdGatewayRegistry:
    """The ``LeaseStore`` for ``LeasedRecord`` plus the list / watch of every replica."""

    def __init__(self, client: EtcdClient, prefix: str = DEFAULT_PREFIX) -> None:
        self.client = client
        self.prefix = f"{prefix.rstrip('/')}/gateways/"

    def key(self, rec: GatewayRecord) -> bytes:
        return f"{self.prefix}{rec.gateway_id}".encode()

    @staticmethod
    def encode(rec: GatewayRecord) -> bytes:
        return json.dumps(
            {"gateway_id": rec.gateway_id, "http": rec.http, "grpc": rec.grpc,
             "started_at": rec.started_at},
            separators=(",", ":"),
        ).encode()  # fmt: skip

    async def register(self, record: GatewayRecord, ttl_s: int) -> int:
        return await self.client.put_with_new_lease(self.key(record), self.encode(record), ttl_s)

    async def update(self, record: GatewayRecord, lease_id: int) -> int:
        return await self.client.put(self.key(record), self.encode(record), lease=lease_id)

    async def keepalive(self, lease_id: int) -> int:
        return await self.client.keepalive_once(lease_id)

    async def deregister(self, lease_id: int) -> None:
        await self.client.revoke_lease(lease_id)

    async def snapshot(self) -> tuple[set[str], int]:
        kvs, revision = await self.client.get_prefix(self.prefix.encode())
        return {kv.key.decode(errors="replace")[len(self.prefix) :] for kv in kvs}, revision

    async def watch(self, start_revision: int) -> AsyncIterator[tuple[str, bool]]:
        """(gateway id, alive) changes from ``start_revision`` until the stream breaks."""
        start = self.prefix.encode()
        async for ev in self.client.watch_range(
            start, prefix_range_end(start), start_revision=start_revision
        ):
            yield ev.kv.key.decode(errors="replace")[len(self.prefix) :], not ev.deleted


class GatewayPeers:
    """The live gateway replicas, watch-fed; ``count()`` never touches etcd and is at least 1
    (this replica counts itself before its own record is seen)."""

    def __init__(self, registry: EtcdGatewayRegistry) -> None:
        self._registry = registry
        self._ids: set[str] = set()
        self.synced = asyncio.Event()
        self.ever_synced = asyncio.Event()

    def count(self) -> int:
        return max(1, len(self._ids))

    def ids(self) -> list[str]:
        return sorted(self._ids)

    async def run(self) -> None:
        async def relist() -> int:
            ids, revision = await self._registry.snapshot()
            self._changed(ids)
            return revision

        async def apply(ev: tuple[str, bool]) -> None:
            gateway_id, alive = ev
            ids = set(self._ids)
            if alive:
                ids.add(gateway_id)
            else:
                ids.discard(gateway_id)
            self._changed(ids)

        await list_and_watch(
            "gateway",
            relist,
            self._registry.watch,
            apply,
            synced=self.synced,
            ever_synced=self.ever_synced,
        )

    def _changed(self, ids: set[str]) -> None:
        if len(ids) != len(self._ids):
            log.info("gateway replicas: %d (quotas are split %d ways)", len(ids), max(1, len(ids)))
        self._ids = ids
