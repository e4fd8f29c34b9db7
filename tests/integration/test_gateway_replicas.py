"""Several gateway replicas on one etcd: each registers under a lease, each watches the others,
and a tenant's quotas are enforced fleet-wide, shared between the replicas by what their
clients ask (controlplane/core/quota_shares.py).

Real etcd, one real sim worker (role both), two real gateway processes.
"""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from controlplane.adapters.etcd.client import EtcdClient
from controlplane.adapters.etcd.tenants import EtcdTenantStore
from controlplane.core.tenants import Quotas, Tenant
from controlplane.local.procs import EtcdServer, ManagedProcess
from tests.helpers import start_worker, wait_until
from tests.integration.test_gateway import get_json, start_gateway

pytestmark = pytest.mark.timeout(300)
MODEL = "llama-3.1-8b"


def _create_tenant(endpoint: str, tenant: Tenant) -> str:
    async def run() -> str:
        client = EtcdClient(endpoint)
        try:
            return (await EtcdTenantStore(client).create(tenant)).api_key
        finally:
            await client.close()

    return asyncio.run(run())


def _complete(port: int, key: str) -> tuple[int, dict[str, Any], str]:
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/completions",
        data=json.dumps({"model": MODEL, "prompt": "hello", "max_tokens": 2}).encode(),
        headers={"content-type": "application/json", "authorization": f"Bearer {key}"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read()), ""
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read()), e.headers.get("retry-after") or ""


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[tuple[EtcdServer, list[tuple[ManagedProcess, int]]]]:
    etcd = EtcdServer(tmp_path / "etcd-data", log_path=tmp_path / "etcd.log").start()
    procs: list[ManagedProcess] = []
    try:
        worker = start_worker(tmp_path, etcd.endpoint, "rep-w", role="both", model=MODEL)
        procs.append(worker.process)
        gateways = []
        for name in ("gw-a", "gw-b"):
            d = tmp_path / name
            d.mkdir()
            proc, http_port, _ = start_gateway(d, etcd.endpoint, ["--gateway-id", name])
            procs.append(proc)
            gateways.append((proc, http_port))
        yield etcd, gateways
    finally:
        for p in reversed(procs):
            p.stop()
        etcd.stop()


def _share(port: int, tenant: str) -> float | None:
    """The replica's ``switchboard_quota_share`` of the tenant's requests/min (None: none)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    for line in text.splitlines():
        if (
            line.startswith("switchboard_quota_share{")
            and f'tenant="{tenant}"' in line
            and 'quota="requests_per_minute"' in line
        ):
            return float(line.rsplit(" ", 1)[1])
    return None


def test_quotas_are_shared_between_live_gateway_replicas_by_demand(
    stack: tuple[EtcdServer, list[tuple[ManagedProcess, int]]],
) -> None:
    etcd, gateways = stack
    (_, port_a), (proc_b, port_b) = gateways
    key = _create_tenant(
        etcd.endpoint, Tenant("capped", ("*",), (), quotas=Quotas(requests_per_minute=4))
    )

    def replicas(port: int) -> int:
        status, body = get_json(f"http://127.0.0.1:{port}/health")
        return int(body.get("replicas", 0)) if status == 200 else 0

    def both_seen() -> bool:
        return replicas(port_a) == 2 and replicas(port_b) == 2

    wait_until(both_seen, 30, what="each gateway to see both replicas")
    # each gateway learns of the new tenant from its etcd watch (GET /v1/models takes no quota)
    wait_until(
        lambda: all(get_json(f"http://127.0.0.1:{p}/v1/models", key)[0] == 200
                    for p in (port_a, port_b)),
        30,
        what="each gateway to know the tenant's key",
    )  # fmt: skip

    # the fleet-wide limit is 4/min. All of the tenant's traffic reaches gateway a (one
    # client, one connection) and b's clients ask for nothing: a admits all 4, not half
    statuses = [_complete(port_a, key) for _ in range(5)]
    assert [s for s, _, _ in statuses] == [200, 200, 200, 200, 429], statuses
    _, body, retry_after = statuses[-1]
    assert "requests_per_minute 4" in body["error"]["message"], body
    assert retry_after and float(retry_after) > 0
    assert _share(port_a, "capped") == 4

    # b's clients start: b always has its even share (2 of 4), whatever a asked before
    served_b = sum(_complete(port_b, key)[0] == 200 for _ in range(3))
    assert served_b >= 2

    # once a sees b's demand in b's record (about a second), a's part is its even share
    def a_shrinks() -> bool:
        assert _complete(port_a, key)[0] == 429  # a's bucket is empty: nothing more admitted
        return _share(port_a, "capped") == 2

    wait_until(a_shrinks, 15, what="gateway a's part to shrink to 2/min")

    # a replica that stops revokes its lease: the other takes the whole quota again
    proc_b.stop()
    wait_until(lambda: replicas(port_a) == 1, 30, what="gateway a to see itself alone")

    def a_grows() -> bool:
        status, body, _ = _complete(port_a, key)
        # its bucket is resized to the whole 4/min, keeping its level: still early for one
        assert status == 429, body
        return "requests_per_minute 4" in body["error"]["message"]

    wait_until(a_grows, 15, what="gateway a's part to be the whole 4/min again")
    assert _share(port_a, "capped") == 4
