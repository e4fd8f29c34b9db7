"""EtcdNodeRegistry: node records in etcd.

Key layout (``prefix`` defaults to ``/switchboard/v1``)::

    {prefix}/nodes/<node-id>             inventory, JSON, bound to the agent's lease
    {prefix}/node-scheduling/<node-id>   cordon / drain status, JSON, no lease

Both live under ``{prefix}/node``, so one range read gives an atomic snapshot of both and one
watch delivers both kinds of change in revision order.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

from controlplane.adapters.etcd.client import EtcdClient, KeyValue, prefix_range_end
from controlplane.adapters.etcd.codec import (
    decode_inventory,
    decode_scheduling,
    encode_inventory,
    encode_scheduling,
)
from controlplane.core.model import NodeInventory, NodeSchedulingStatus
from controlplane.core.nodeview import LeasedInventory
from controlplane.errors import InvalidArgument

log = logging.getLogger(__name__)

DEFAULT_PREFIX = "/switchboard/v1"


@dataclass(frozen=True, slots=True)
class InventoryRecord:
    node_id: str
    leased: LeasedInventory | None  # None: deleted (lease expired or revoked)
    revision: int


@dataclass(frozen=True, slots=True)
class SchedulingRecord:
    node_id: str
    status: NodeSchedulingStatus | None  # None: deleted (back to schedulable)
    revision: int


NodeRecord = InventoryRecord | SchedulingRecord


@dataclass(frozen=True, slots=True)
class NodeSnapshot:
    inventories: dict[str, LeasedInventory]
    scheduling: dict[str, NodeSchedulingStatus]
    revision: int


class EtcdNodeRegistry:
    """Reads and writes node records; knows the key layout and nothing about gRPC."""

    def __init__(self, client: EtcdClient, prefix: str = DEFAULT_PREFIX) -> None:
        self.client = client
        self.prefix = prefix.rstrip("/")
        self._nodes = f"{self.prefix}/nodes/".encode()
        self._sched = f"{self.prefix}/node-scheduling/".encode()
        self._range = (
            f"{self.prefix}/node".encode(),
            prefix_range_end(f"{self.prefix}/node".encode()),
        )

    def inventory_key(self, node_id: str) -> bytes:
        return self._nodes + node_id.encode()

    def scheduling_key(self, node_id: str) -> bytes:
        return self._sched + node_id.encode()

    # --- agent side ----------------------------------------------------------------------
    async def register(self, inv: NodeInventory, ttl_s: int) -> int:
        """Grant a lease and write the inventory bound to it; returns the lease id."""
        return await self.client.put_with_new_lease(
            self.inventory_key(inv.node_id), encode_inventory(inv), ttl_s
        )

    async def update(self, inv: NodeInventory, lease_id: int) -> int:
        """Rewrite the inventory under its lease (raises LeaseNotFound once it expired)."""
        return await self.client.put(
            self.inventory_key(inv.node_id), encode_inventory(inv), lease=lease_id
        )

    async def keepalive(self, lease_id: int) -> int:
        return await self.client.keepalive_once(lease_id)

    async def deregister(self, lease_id: int) -> None:
        """Revoke the lease: the node disappears at once instead of after its TTL."""
        await self.client.revoke_lease(lease_id)

    async def get_inventory(self, node_id: str) -> LeasedInventory | None:
        kv = await self.client.get(self.inventory_key(node_id))
        return None if kv is None else LeasedInventory(decode_inventory(kv.value), kv.lease)

    # --- SRE side ------------------------------------------------------------------------
    async def set_scheduling(self, node_id: str, status: NodeSchedulingStatus) -> int:
        return await self.client.put(self.scheduling_key(node_id), encode_scheduling(status))

    async def clear_scheduling(self, node_id: str) -> int:
        return await self.client.delete(self.scheduling_key(node_id))

    # --- control-plane side --------------------------------------------------------------
    async def snapshot(self) -> NodeSnapshot:
        kvs, revision = await self.client.get_range(*self._range)
        inventories: dict[str, LeasedInventory] = {}
        scheduling: dict[str, NodeSchedulingStatus] = {}
        for kv in kvs:
            rec = self._decode(kv, deleted=False, revision=revision)
            if isinstance(rec, InventoryRecord) and rec.leased is not None:
                inventories[rec.node_id] = rec.leased
            elif isinstance(rec, SchedulingRecord) and rec.status is not None:
                scheduling[rec.node_id] = rec.status
        return NodeSnapshot(inventories, scheduling, revision)

    async def watch(self, start_revision: int) -> AsyncIterator[NodeRecord]:
        """Record changes from ``start_revision``; raises Unavailable when the watch breaks."""
        async for ev in self.client.watch_range(*self._range, start_revision=start_revision):
            rec = self._decode(ev.kv, deleted=ev.deleted, revision=ev.kv.mod_revision)
            if rec is not None:
                yield rec

    def _decode(self, kv: KeyValue, *, deleted: bool, revision: int) -> NodeRecord | None:
        try:
            if kv.key.startswith(self._nodes):
                node_id = kv.key[len(self._nodes) :].decode()
                leased = None if deleted else LeasedInventory(decode_inventory(kv.value), kv.lease)
                return InventoryRecord(node_id, leased, revision)
            if kv.key.startswith(self._sched):
                node_id = kv.key[len(self._sched) :].decode()
                status = None if deleted else decode_scheduling(kv.value)
                return SchedulingRecord(node_id, status, revision)
        except (InvalidArgument, UnicodeDecodeError) as e:
            log.warning("ignoring malformed record %r: %s", kv.key, e)
        return None
