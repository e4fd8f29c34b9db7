"""GatewayPeers on a real etcd: the replicas' records carry their clients' demand, every
replica reads the others' (its own aside), and a record without demand counts as a replica
that lends nothing."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

from controlplane.adapters.etcd.client import EtcdClient
from controlplane.adapters.etcd.gateways import EtcdGatewayRegistry, GatewayPeers, GatewayRecord
from controlplane.core.quota_shares import TenantDemand
from controlplane.local.procs import EtcdServer


async def _until(check: Callable[[], bool], what: str) -> None:
    for _ in range(200):
        if check():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


async def test_peers_read_each_others_demand_from_etcd(etcd: EtcdServer) -> None:
    client = EtcdClient(etcd.endpoint)
    registry = EtcdGatewayRegistry(client)
    peers = GatewayPeers(registry, me="a")
    task = asyncio.create_task(peers.run())
    try:
        mine = GatewayRecord("a", "127.0.0.1:1", demand=(("m", "acme", 99.0, 9.0, 9.0),))
        lease = await registry.register(mine, 10)
        other = GatewayRecord("b", "127.0.0.1:2", demand=(("m", "acme", 30.0, 3000.0, 2.0),))
        lease_b = await registry.register(other, 10)
        old = GatewayRecord("c", "127.0.0.1:3")  # publishes no demand
        await registry.register(old, 10)
        assert "demand" not in json.loads(registry.encode(old))

        await _until(lambda: peers.count() == 3, "three replicas")
        assert peers.demands("m", "acme") == ([TenantDemand(30.0, 3000.0, 2.0)], 3)
        assert peers.demands("m", "other-tenant") == ([TenantDemand()], 3)

        # a new demand comes in through the watch; a replica that leaves is not counted
        await registry.update(GatewayRecord("b", "127.0.0.1:2", demand=()), lease_b)
        await _until(lambda: peers.demands("m", "acme")[0] == [TenantDemand()], "b's update")
        await registry.deregister(lease)
        await _until(lambda: peers.count() == 2, "a gone")
        assert peers.demands("m", "acme") == ([TenantDemand()], 3)  # b, c, and a itself
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await client.close()
