"""The gateway's adapter over the SLA-aware router core (not yet on the request path)."""

from __future__ import annotations

import random

from controlplane.core.routing import SlaAwareRouter, TimingModel
from controlplane.gateway.routing import NoRoute, Route, WorkerSnapshot
from controlplane.gateway.sla_routing import SlaGatewayRouter
from tests.unit.routing_builders import BLOCK, TIMING, request, tokens
from workers.engine import KvEvent, KvEventKind
from workers.engines.sim_core import hash_blocks


def snap(worker_id: str, role: str = "decode", **kw: object) -> WorkerSnapshot:
    return WorkerSnapshot(
        worker_id=worker_id,
        endpoint=f"127.0.0.1:{worker_id}",
        role=role,
        kv_blocks_total=10_000,
        **kw,  # type: ignore[arg-type]
    )


def timing_for(model: str, s: WorkerSnapshot) -> TimingModel:
    return TIMING


def adapter() -> SlaGatewayRouter:
    return SlaGatewayRouter(SlaAwareRouter(), timing_for=timing_for, rng=random.Random(1))


def test_route_request_maps_the_decision_back_to_snapshots() -> None:
    workers = [snap("d1", running=16), snap("p1", "prefill")]
    route, trace = adapter().route_request(request(8000), workers)
    assert isinstance(route, Route)
    assert route.decode is workers[0] and route.prefill is workers[1]
    assert trace.disaggregation is not None and trace.disaggregation.remote


def test_kv_events_from_the_stats_stream_steer_prefix_requests() -> None:
    router = adapter()
    prompt = tokens(2048, seed=5)
    router.apply_kv_events("d2", [KvEvent(KvEventKind.STORED, hash_blocks(prompt, BLOCK))])
    workers = [snap("d1"), snap("d2"), snap("d3")]
    route, _ = router.route_request(request(prompt + tokens(32, seed=6)), workers)
    assert isinstance(route, Route) and route.decode.worker_id == "d2"
    router.forget_worker("d2")
    assert router.core.index.overlap("d2", hash_blocks(prompt, BLOCK)) == 0


def test_no_route_carries_the_reasons() -> None:
    route, trace = adapter().route_request(request(64), [snap("d1", serving=False)])
    assert route == NoRoute(("d1: draining",))
    assert trace.decode.rejections[0].plugin == "Serving"


def test_the_plain_protocol_falls_back_to_least_loaded() -> None:
    route = adapter().route([snap("d1", running=3), snap("d2")])
    assert isinstance(route, Route) and route.decode.worker_id == "d2"
