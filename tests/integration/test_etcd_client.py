"""The typed etcd facade against a real etcd: leases, create-if-absent, watch, errors."""

from __future__ import annotations

import asyncio

import aetcd.rpc
import pytest

from controlplane.adapters.etcd.client import EtcdClient, EtcdError, LeaseNotFound
from controlplane.errors import Unavailable
from controlplane.local.procs import EtcdServer, free_port


async def live_leases(client: EtcdClient) -> set[int]:
    inner = client._client
    await inner.connect()
    resp = await inner.leasestub.LeaseLeases(aetcd.rpc.LeaseLeasesRequest())
    return {lease.ID for lease in resp.leases}


async def test_put_get_create_and_leases(etcd: EtcdServer) -> None:
    client = EtcdClient(etcd.endpoint)
    try:
        rev = await client.put(b"/t/a", b"1")
        got = await client.get(b"/t/a")
        assert got is not None
        assert got.value == b"1"
        assert got.mod_revision == rev
        created, kv = await client.create(b"/t/a", b"2")
        assert not created
        assert kv.value == b"1"
        lease = await client.grant_lease(5)
        created, kv = await client.create(b"/t/b", b"x", lease=lease)
        assert created
        assert kv.lease == lease
        assert await client.keepalive_once(lease) > 0
        await client.revoke_lease(lease)
        assert await client.get(b"/t/b") is None
        with pytest.raises(LeaseNotFound):
            await client.keepalive_once(lease)
        with pytest.raises(LeaseNotFound):
            await client.put(b"/t/c", b"y", lease=lease)
        kvs, _ = await client.get_prefix(b"/t/")
        assert [kv.key for kv in kvs] == [b"/t/a"]
    finally:
        await client.close()


async def test_failed_registration_write_revokes_its_lease(etcd: EtcdServer) -> None:
    client = EtcdClient(etcd.endpoint)
    try:
        before = await live_leases(client)
        too_big = b"x" * (2 * 1024 * 1024)  # over etcd's request size limit
        with pytest.raises(EtcdError):
            await client.put_with_new_lease(b"/t/big", too_big, 10)
        assert await live_leases(client) == before  # no orphaned lease left behind
        lease = await client.put_with_new_lease(b"/t/ok", b"v", 10)
        assert lease in await live_leases(client)
    finally:
        await client.close()


async def test_watch_sees_puts_and_deletes_in_order(etcd: EtcdServer) -> None:
    client = EtcdClient(etcd.endpoint)
    try:
        rev = await client.put(b"/w/x", b"0")
        seen: list[tuple[bool, bytes, bytes]] = []

        async def watch() -> None:
            async for ev in client.watch_range(b"/w/", b"/w0", start_revision=rev + 1):
                seen.append((ev.deleted, ev.kv.key, ev.kv.value))
                if len(seen) == 3:
                    return

        task = asyncio.create_task(watch())
        await asyncio.sleep(0.2)
        await client.put(b"/w/x", b"1")
        await client.put(b"/w/y", b"2")
        await client.delete(b"/w/x")
        await asyncio.wait_for(task, 5)
        assert seen == [(False, b"/w/x", b"1"), (False, b"/w/y", b"2"), (True, b"/w/x", b"")]
    finally:
        await client.close()


async def test_unreachable_etcd_is_unavailable() -> None:
    client = EtcdClient(f"127.0.0.1:{free_port()}", timeout_s=1.0)
    try:
        with pytest.raises(Unavailable):
            await client.get(b"/x")
        with pytest.raises(Unavailable):
            await client.grant_lease(5)
    finally:
        await client.close()
