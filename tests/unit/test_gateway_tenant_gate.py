"""TenantGate's queue-depth gauges: right after every queue change, also now that a release
with nothing queued leaves them alone."""

from __future__ import annotations

import asyncio

from prometheus_client import CollectorRegistry

from controlplane.core.tenants import Tenant
from controlplane.gateway.gate import RequestContext
from controlplane.gateway.tenant_gate import TenantGate
from controlplane.telemetry.metrics import GatewayMetrics

MODEL = "m"


class Keys:
    def authenticate(self, api_key: str) -> Tenant | None:
        return Tenant("acme", ("*",), ()) if api_key == "key" else None


def ctx(request_id: str) -> RequestContext:
    return RequestContext(request_id, MODEL, "key", "/v1/completions", 10, 10)


def depths(metrics: GatewayMetrics) -> dict[str, float]:
    return {
        s.labels["sla_class"]: s.value
        for family in metrics.queue_depth.collect()
        for s in family.samples
        if s.labels["model"] == MODEL
    }


async def test_queue_depth_gauges_follow_the_queue() -> None:
    metrics = GatewayMetrics(CollectorRegistry())
    gate = TenantGate(Keys(), lambda _model: 1, metrics=metrics)
    first = await gate.admit(ctx("r1"))
    assert depths(metrics) == {}  # nothing queued yet: no gauge touched
    waiting = asyncio.ensure_future(gate.admit(ctx("r2")))  # no free slot: it queues
    await asyncio.sleep(0)
    assert depths(metrics) == {"interactive": 0.0, "standard": 1.0, "batch": 0.0}
    gate.release(first, 10)  # its slot goes to r2
    second = await waiting
    assert depths(metrics) == {"interactive": 0.0, "standard": 0.0, "batch": 0.0}
    gate.release(second, 10)  # nothing queued: the gauges keep their (right) values
    assert depths(metrics) == {"interactive": 0.0, "standard": 0.0, "batch": 0.0}
    assert gate.stats()[MODEL].queued == 0  # type: ignore[attr-defined]
