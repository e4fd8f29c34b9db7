"""Gateway replicas in etcd: each live gateway holds one lease-bound record, and every gateway
watches them all, so each knows how many replicas share the tenants' quotas and what each
replica's clients ask of them.

Key: ``{prefix}/gateways/<gateway-id>`` -> ``{"gateway_id", "http", "grpc", "started_at",
"demand"}`` (JSON), bound to the gateway's lease: a gateway that dies disappears within one
TTL, and one that stops cleanly revokes its lease at once. ``demand`` lists, per quota-limited
(model, tenant), ``[model, tenant, requests/min, tokens/min, in flight or queued]`` as the
replica measured them (controlplane/core/quota_shares.py); the gateway rewrites its record
when they change, at most every ``GatewaySettings.demand_interval_s`` (1 s). A record
without ``demand`` (a replica that publishes none) is counted, and keeps its even share of
every quota.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

from controlplane.adapters.etcd.client import EtcdClient, prefix_range_end
from controlplane.adapters.etcd.listwatch import list_and_watch
from controlplane.core.quota_shares import DemandKey, TenantDemand

DemandEntry = tuple[str, str, float, float, float]
"""(model, tenant, requests/min, tokens/min, in flight or queued)"""
Demands = dict[DemandKey, TenantDemand]

DEFAULT_PREFIX = "/switchboard/v1"
log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class GatewayRecord:
    gateway_id: str
    http: str
    """host:port of the OpenAI HTTP API (and /metrics)."""
    grpc: str = ""
    started_at: float = 0.0
    demand: tuple[DemandEntry, ...] | None = None
    """What this replica's clients ask of each quota-limited (model, tenant); None: it
    publishes no demand."""


class EtcdGatewayRegistry:
    """The ``LeaseStore`` for ``LeasedRecord`` plus the list / watch of every replica."""

    def __init__(self, client: EtcdClient, prefix: str = DEFAULT_PREFIX) -> None:
        self.client = client
        self.prefix = f"{prefix.rstrip('/')}/gateways/"

    def key(self, rec: GatewayRecord) -> bytes:
        return f"{self.prefix}{rec.gateway_id}".encode()

    @staticmethod
    def encode(rec: GatewayRecord) -> bytes:
        body: dict[str, object] = {
            "gateway_id": rec.gateway_id, "http": rec.http, "grpc": rec.grpc,
            "started_at": rec.started_at,
        }  # fmt: skip
        if rec.demand is not None:
            body["demand"] = [list(entry) for entry in rec.demand]
        return json.dumps(body, separators=(",", ":")).encode()

    @staticmethod
    def decode_demand(value: bytes) -> Demands | None:
        """A record's published demands (None: it publishes none, or cannot be read)."""
        try:
            entries = json.loads(value).get("demand")
            if entries is None:
                return None
            return {
                (str(model), str(tenant)): TenantDemand(float(rpm), float(tpm), float(load))
                for model, tenant, rpm, tpm, load in entries
            }
        except (ValueError, TypeError, AttributeError):
            log.warning("unreadable gateway record: %r", value[:200])
            return None

    async def register(self, record: GatewayRecord, ttl_s: int) -> int:
        return await self.client.put_with_new_lease(self.key(record), self.encode(record), ttl_s)

    async def update(self, record: GatewayRecord, lease_id: int) -> int:
        return await self.client.put(self.key(record), self.encode(record), lease=lease_id)

    async def keepalive(self, lease_id: int) -> int:
        return await self.client.keepalive_once(lease_id)

    async def deregister(self, lease_id: int) -> None:
        await self.client.revoke_lease(lease_id)

    async def snapshot(self) -> tuple[dict[str, Demands | None], int]:
        """Every live gateway id with its published demands, and the revision read at."""
        kvs, revision = await self.client.get_prefix(self.prefix.encode())
        return {
            kv.key.decode(errors="replace")[len(self.prefix) :]: self.decode_demand(kv.value)
            for kv in kvs
        }, revision

    async def watch(self, start_revision: int) -> AsyncIterator[tuple[str, Demands | None, bool]]:
        """(gateway id, its published demands, alive) changes from ``start_revision`` until
        the stream breaks."""
        start = self.prefix.encode()
        async for ev in self.client.watch_range(
            start, prefix_range_end(start), start_revision=start_revision
        ):
            gateway_id = ev.kv.key.decode(errors="replace")[len(self.prefix) :]
            if ev.deleted:
                yield gateway_id, None, False
            else:
                yield gateway_id, self.decode_demand(ev.kv.value), True


class GatewayPeers:
    """The live gateway replicas and their published demands, watch-fed; ``count()`` and
    ``demands()`` never touch etcd, and the count is at least 1 (this replica counts itself
    before its own record is seen). ``me``: this replica's id (its own demand is not a
    peer's)."""

    def __init__(self, registry: EtcdGatewayRegistry, me: str = "") -> None:
        self._registry = registry
        self.me = me
        self._demands: dict[str, Demands | None] = {}
        self.synced = asyncio.Event()
        self.ever_synced = asyncio.Event()

    def count(self) -> int:
        return max(1, len(self._demands))

    def ids(self) -> list[str]:
        return sorted(self._demands)

    def demands(self, model: str, tenant: str) -> tuple[list[TenantDemand], int]:
        """The other replicas' published demands for (model, tenant) (zero from one that
        published demands without it; none from one that publishes none), and the number of
        live replicas, this one included."""
        others: list[TenantDemand] = []
        zero = TenantDemand()
        key = (model, tenant)
        for gateway_id, demands in self._demands.items():
            if demands is not None and gateway_id != self.me:
                others.append(demands.get(key, zero))
        n = len(self._demands) + (0 if self.me in self._demands else 1)
        return others, max(1, n)

    async def run(self) -> None:
        async def relist() -> int:
            demands, revision = await self._registry.snapshot()
            self._changed(demands)
            return revision

        async def apply(ev: tuple[str, Demands | None, bool]) -> None:
            gateway_id, demands, alive = ev
            current = dict(self._demands)
            if alive:
                current[gateway_id] = demands
            else:
                current.pop(gateway_id, None)
            self._changed(current)

        await list_and_watch(
            "gateway",
            relist,
            self._registry.watch,
            apply,
            synced=self.synced,
            ever_synced=self.ever_synced,
        )

    def _changed(self, demands: dict[str, Demands | None]) -> None:
        if len(demands) != len(self._demands):
            n = max(1, len(demands))
            log.info("gateway replicas: %d (quotas are shared %d ways, by demand)", n, n)
        self._demands = demands
