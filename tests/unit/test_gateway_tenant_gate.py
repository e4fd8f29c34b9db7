"""TenantGate: queue-depth gauges right after every queue change (also now that a release with
nothing queued leaves them alone); which rejections are 429 and which 503."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from prometheus_client import CollectorRegistry

from controlplane.core.admission import AdmissionConfig
from controlplane.core.tenants import Quotas, Tenant
from controlplane.gateway.errors import GATE_STATUS, GATEWAY_ERROR_TABLE, Overloaded, RateLimited
from controlplane.gateway.gate import RequestContext
from controlplane.gateway.tenant_gate import TenantGate
from controlplane.telemetry.metrics import GatewayMetrics
from workers.openai_protocol import api_error

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


async def test_overload_is_503_and_the_tenants_own_limit_429() -> None:
    # Over the tenant's own quota: RateLimited (429). The fleet full, whoever asks: Overloaded
    # (503), as the admission core's Rejected.status says; both carry the reason.
    class Capped:
        def authenticate(self, api_key: str) -> Tenant | None:
            quotas = Quotas(requests_per_minute=1) if api_key == "capped" else Quotas()
            return Tenant(api_key, ("*",), (), quotas=quotas)

    gate = TenantGate(Capped(), lambda _model: 1, config=AdmissionConfig(max_queued=0))
    held = await gate.admit(RequestContext("r1", MODEL, "capped", "/v1/completions", 10, 10))
    with pytest.raises(RateLimited) as over_quota:
        await gate.admit(RequestContext("r2", MODEL, "capped", "/v1/completions", 10, 10))
    assert not isinstance(over_quota.value, Overloaded)
    assert over_quota.value.reason == "rate_limited_requests"
    with pytest.raises(Overloaded) as full:  # the one slot is taken and nothing may queue
        await gate.admit(RequestContext("r3", MODEL, "other", "/v1/completions", 10, 10))
    assert full.value.reason == "queue_full" and full.value.retry_after_s == 1.0
    errors = (over_quota.value, full.value)
    answers = [api_error(e, GATEWAY_ERROR_TABLE) for e in errors]
    assert [(a.status, a.type) for a in answers] == [
        (429, "rate_limit_error"),
        (503, "service_unavailable_error"),
    ]
    codes = [next(code for cls, code in GATE_STATUS if isinstance(e, cls)) for e in errors]
    assert codes == [grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE]
    gate.release(held, 10)
