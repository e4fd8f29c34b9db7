"""``GET /health`` of the gateway's ASGI app: 503 "syncing" until everything it reads from etcd
is loaded (``ready``), 503 "draining" once it drains, else 200 with the replica count."""

from __future__ import annotations

import asyncio
import json
from collections.abc import MutableMapping
from typing import Any

from controlplane.gateway.gate import AllowAll
from controlplane.gateway.http_app import GatewayApp
from tests.unit.test_gateway_sla_wiring import QuietView, gateway


def health(app: GatewayApp) -> tuple[int, dict[str, Any]]:
    sent: list[MutableMapping[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "GET", "path": "/health", "headers": []}
    asyncio.run(app(scope, receive, send))
    start, body = sent[0], b"".join(m.get("body", b"") for m in sent[1:])
    return int(start["status"]), json.loads(body)


def test_health_is_syncing_until_everything_is_loaded_then_ok_then_draining() -> None:
    view = QuietView()
    view.synced.set()  # the workers are loaded ...
    tenants_loaded = [False]  # ... the tenants not yet
    app = GatewayApp(
        gateway(view),
        AllowAll(),
        replicas=lambda: 3,
        ready=lambda: view.synced.is_set() and tenants_loaded[0],
    )
    assert health(app) == (503, {"status": "syncing"})
    tenants_loaded[0] = True
    assert health(app) == (200, {"status": "ok", "replicas": 3})
    app.draining = True
    assert health(app) == (503, {"status": "draining"})


def test_without_ready_the_workers_view_decides() -> None:
    view = QuietView()
    app = GatewayApp(gateway(view), AllowAll())
    assert health(app)[0] == 503
    view.synced.set()
    assert health(app)[0] == 200
