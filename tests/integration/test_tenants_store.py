"""Tenants against a real etcd: the store (CAS writes), the watch-fed TenantCache that
authenticates keys without etcd, the `switchboard tenants` CLI, `up`'s demo tenant, and that no
key secret ever reaches a log."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import stat
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from controlplane.adapters.etcd.client import EtcdClient
from controlplane.adapters.etcd.tenants import EtcdTenantStore, TenantCache
from controlplane.cli import main as cli_main
from controlplane.core.tenants import Quotas, Tenant, parse_api_key
from controlplane.errors import AlreadyExists, Conflict, NotFound
from controlplane.local.demo_tenant import ensure_tenant_key
from controlplane.local.procs import EtcdServer

WAIT_S = 10.0  # bounded waits for the watch; never an assertion on how fast


def spec(name: str = "acme", **kw: object) -> Tenant:
    base = Tenant(
        name=name,
        allowed_models=("tiny-llama",),
        sla_classes=("interactive", "standard"),
        quotas=Quotas(requests_per_minute=60, tokens_per_minute=10_000, max_concurrent=4),
    )
    return dataclasses.replace(base, **kw)  # type: ignore[arg-type]


def secret_of(api_key: str) -> str:
    parsed = parse_api_key(api_key)
    assert parsed is not None
    return parsed[1]


@pytest.fixture
async def store(etcd: EtcdServer) -> AsyncIterator[EtcdTenantStore]:
    client = EtcdClient(etcd.endpoint)
    try:
        yield EtcdTenantStore(client)
    finally:
        await client.close()


async def started(cache: TenantCache) -> asyncio.Task[None]:
    task = asyncio.create_task(cache.run())
    await asyncio.wait_for(cache.ever_synced.wait(), WAIT_S)
    return task


async def stopped(task: asyncio.Task[None]) -> None:
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def seen(cache: TenantCache, tenant: Tenant) -> None:
    assert await cache.wait_for_revision(tenant.resource_version, WAIT_S)


# --- the store -----------------------------------------------------------------------------


async def test_create_get_list_rotate_delete(store: EtcdTenantStore) -> None:
    issued = await store.create(spec())
    assert issued.api_key.startswith(f"sb-{issued.key_id}-")
    assert issued.tenant.key_ids == (issued.key_id,)
    assert issued.tenant.created_at > 0
    got = await store.get("acme")
    assert got == issued.tenant
    raw = await store.client.get(b"/switchboard/v1/tenants/acme")
    assert raw is not None and secret_of(issued.api_key).encode() not in raw.value

    with pytest.raises(AlreadyExists):
        await store.create(spec())
    await store.create(spec("beta", allowed_models=("*",), sla_classes=()))
    assert [t.name for t in await store.list_all()] == ["acme", "beta"]

    rotated = await store.rotate_key("acme")
    assert rotated.tenant.key_ids == (rotated.key_id,)  # the old key is removed
    assert rotated.key_id != issued.key_id
    graced = await store.rotate_key("acme", grace_s=300)
    assert graced.tenant.key_ids == (rotated.key_id, graced.key_id)
    assert graced.tenant.key_hashes[0].expires_at > 0

    await store.delete("acme")
    with pytest.raises(NotFound):
        await store.get("acme")
    with pytest.raises(NotFound):
        await store.delete("acme")
    with pytest.raises(NotFound):
        await store.rotate_key("acme")
    assert [t.name for t in await store.list_all()] == ["beta"]


async def test_writes_are_compare_and_swap(store: EtcdTenantStore) -> None:
    issued = await store.create(spec())
    stale = issued.tenant
    await store.rotate_key("acme")  # someone else writes in between
    with pytest.raises(Conflict):
        await store.update(dataclasses.replace(stale, quotas=Quotas(max_concurrent=1)))
    with pytest.raises(Conflict):
        await store.delete("acme", resource_version=stale.resource_version)
    fresh = await store.get("acme")
    updated = await store.update(dataclasses.replace(fresh, quotas=Quotas(max_concurrent=1)))
    assert updated.resource_version > fresh.resource_version
    assert (await store.get("acme")).quotas == Quotas(max_concurrent=1)
    await store.delete("acme", resource_version=updated.resource_version)


async def test_concurrent_rotations_all_land(store: EtcdTenantStore) -> None:
    await store.create(spec())
    results = await asyncio.gather(*(store.rotate_key("acme", grace_s=600) for _ in range(3)))
    final = await store.get("acme")
    assert {r.key_id for r in results} <= set(final.key_ids)


async def test_malformed_records_are_skipped(store: EtcdTenantStore) -> None:
    await store.create(spec())
    await store.client.put(b"/switchboard/v1/tenants/broken", b"{not json")
    acme = await store.client.get(b"/switchboard/v1/tenants/acme")
    assert acme is not None
    await store.client.put(b"/switchboard/v1/tenants/other", acme.value)  # names "acme"
    assert [t.name for t in await store.list_all()] == ["acme"]


# --- the cache -----------------------------------------------------------------------------


async def test_cache_authenticates_through_the_watch(store: EtcdTenantStore) -> None:
    before = await store.create(spec("early"))  # seen by the initial list
    cache = TenantCache(store)
    task = await started(cache)
    try:
        assert cache.authenticate(before.api_key) == before.tenant

        issued = await store.create(spec())  # seen through the watch
        await seen(cache, issued.tenant)
        assert cache.authenticate(issued.api_key) == issued.tenant
        assert cache.get("acme") == issued.tenant
        assert [t.name for t in cache.list_tenants()] == ["acme", "early"]

        wrong = issued.api_key[:-2] + ("xx" if not issued.api_key.endswith("xx") else "yy")
        for bad in (wrong, f"sb-{issued.key_id}", "sb-000000000000-" + "a" * 43, "", "x" * 999):
            assert cache.authenticate(bad) is None
        # another tenant's key id with this tenant's secret
        assert cache.authenticate(f"sb-{before.key_id}-{secret_of(issued.api_key)}") is None

        rotated = await store.rotate_key("acme")
        await seen(cache, rotated.tenant)
        assert cache.authenticate(issued.api_key) is None  # rotated out at once
        assert cache.authenticate(rotated.api_key) == rotated.tenant

        graced = await store.rotate_key("acme", grace_s=600)
        await seen(cache, graced.tenant)
        assert cache.authenticate(rotated.api_key) == graced.tenant  # still in its grace
        assert cache.authenticate(graced.api_key) == graced.tenant

        await store.delete("acme")  # the next write after graced's
        assert await cache.wait_for_revision(graced.tenant.resource_version + 1, WAIT_S)
        assert cache.authenticate(graced.api_key) is None
        assert cache.authenticate(rotated.api_key) is None
        assert cache.get("acme") is None
        assert cache.authenticate(before.api_key) == before.tenant
    finally:
        await stopped(task)


async def test_cache_survives_an_etcd_restart(etcd: EtcdServer, store: EtcdTenantStore) -> None:
    first = await store.create(spec("first"))
    cache = TenantCache(store, backoff_max_s=0.5)
    task = await started(cache)
    try:
        etcd.stop()
        etcd.start()
        second = await store.create(spec("second"))
        await seen(cache, second.tenant)
        assert cache.authenticate(second.api_key) == second.tenant
        assert cache.authenticate(first.api_key) == first.tenant
    finally:
        await stopped(task)


async def test_secrets_are_never_logged(
    etcd: EtcdServer, store: EtcdTenantStore, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)  # every logger, at every level
    cache = TenantCache(store)
    task = await started(cache)
    try:
        issued = await store.create(spec())
        await seen(cache, issued.tenant)
        logging.getLogger("test").info("issued %r", issued)  # repr must hide the key
        assert cache.authenticate(issued.api_key) is not None
        assert cache.authenticate(issued.api_key + "x") is None
        rotated = await store.rotate_key("acme", grace_s=10)
        await seen(cache, rotated.tenant)
        assert cache.authenticate(rotated.api_key) is not None
        with pytest.raises(AlreadyExists):
            await store.create(spec())
    finally:
        await stopped(task)
    assert "tenant acme created" in caplog.text  # the logs were captured
    for key in (issued.api_key, rotated.api_key):
        assert secret_of(key) not in caplog.text
        assert secret_of(key) not in etcd.log_path.read_text()


# --- CLI and `up` ----------------------------------------------------------------------------


def test_cli_create_list_rotate_delete(
    etcd: EtcdServer, capsys: pytest.CaptureFixture[str]
) -> None:
    flags = ["--etcd", etcd.endpoint]
    quotas = ["--rpm", "60", "--tpm", "1000", "--max-concurrent", "2"]
    classes = ["--sla-classes", "interactive,standard"]
    cli_main(["tenants", "create", "acme", *flags, "--models", "m1,m2", *classes, *quotas])
    out, err = capsys.readouterr()
    key = out.strip()
    assert parse_api_key(key) is not None
    assert "cannot be shown again" in err

    cli_main(["tenants", "list", *flags])
    out, _ = capsys.readouterr()
    key_id = key.split("-")[1]
    assert "acme" in out and "m1,m2" in out and "interactive,standard" in out and key_id in out
    assert secret_of(key) not in out

    cli_main(["tenants", "rotate-key", "acme", *flags])
    out, err = capsys.readouterr()
    assert parse_api_key(out.strip()) is not None and out.strip() != key
    assert "no longer works" in err

    with pytest.raises(SystemExit, match="already exists"):
        cli_main(["tenants", "create", "acme", *flags])
    with pytest.raises(SystemExit, match=r"tenant\.default_sla_class"):
        cli_main(["tenants", "create", "x", *flags, "--sla-classes", "interactive"])
    cli_main(["tenants", "delete", "acme", *flags])
    assert "tenant/acme deleted" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="not found"):
        cli_main(["tenants", "delete", "acme", *flags])


async def test_demo_tenant_is_created_reused_and_rotated(
    store: EtcdTenantStore, tmp_path: Path
) -> None:
    demo = spec("demo", allowed_models=("*",), sla_classes=())
    key_file = tmp_path / "state" / "demo-api-key"

    key, what = await ensure_tenant_key(store, demo, key_file)
    assert what == "created"
    assert key_file.read_text().strip() == key
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600

    again, what = await ensure_tenant_key(store, demo, key_file)
    assert (again, what) == (key, "reused")

    key_file.unlink()
    rotated, what = await ensure_tenant_key(store, demo, key_file)
    assert what == "rotated" and rotated != key
    assert key_file.read_text().strip() == rotated
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600

    key_file.write_text(key + "\n")  # a stale key (rotated out): rotate again
    fresh, what = await ensure_tenant_key(store, demo, key_file)
    assert what == "rotated" and fresh not in (key, rotated)


def test_up_makes_the_demo_tenant_once(etcd: EtcdServer, tmp_path: Path) -> None:
    from controlplane.local.up import LocalCluster, UpSettings

    settings = UpSettings(state_dir=tmp_path / "state", etcd_port=etcd.client_port)
    first = LocalCluster(settings)
    first._ensure_demo_tenant()
    key_file = settings.state_dir / "demo-api-key"
    assert key_file.read_text().strip() == first.demo_api_key != ""
    second = LocalCluster(settings)  # `make up` again: same tenant, same key
    second._ensure_demo_tenant()
    assert second.demo_api_key == first.demo_api_key
