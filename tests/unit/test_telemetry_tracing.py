"""Tracing helpers (propagation, off = nothing made) and the fleet's gauges / service discovery."""

from __future__ import annotations

import asyncio
import json

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry

from controlplane.core.model import (
    Gpu,
    Node,
    NodeInventory,
    NodeSchedulingStatus,
    SchedulingState,
    WorkerRecord,
    WorkerState,
)
from controlplane.telemetry import tracing
from controlplane.telemetry.fleet import FleetTelemetry, sd_target_groups
from controlplane.telemetry.metrics import ControlPlaneMetrics


@pytest.fixture
def spans() -> tuple[tracing.Tracer, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider.get_tracer("test"), exporter


def test_off_makes_nothing() -> None:
    assert tracing.start_span(None, "x") is None
    assert tracing.grpc_metadata(None) is None
    assert tracing.attach_span(None) is None
    tracing.detach(None)
    tracing.end_span(None, RuntimeError("ignored"))
    assert tracing.current_span() is None


def test_setup_is_off_without_an_endpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(tracing.ENDPOINT_ENV, raising=False)
    assert tracing.setup_tracing("svc", "") is None
    assert tracing.otlp_endpoint("") is None
    monkeypatch.setenv(tracing.ENDPOINT_ENV, "http://127.0.0.1:4317")
    assert tracing.otlp_endpoint("") == "http://127.0.0.1:4317"
    assert tracing.otlp_endpoint("127.0.0.1:9") == "127.0.0.1:9"  # the flag wins


def test_grpc_metadata_carries_the_parent(
    spans: tuple[tracing.Tracer, InMemorySpanExporter],
) -> None:
    tracer, exporter = spans
    parent = tracing.start_span(tracer, "parent")
    assert parent is not None
    md = tracing.grpc_metadata(parent)
    assert md is not None and md[0][0] == "traceparent"
    # the receiving side sees metadata as (key, str | bytes) pairs among others
    ctx = tracing.parent_from_metadata([("authorization", "x"), *md])
    child = tracing.start_span(tracer, "child", ctx, kind=tracing.SpanKind.SERVER)
    tracing.end_span(child)
    tracing.end_span(parent)
    got = {s.name: s for s in exporter.get_finished_spans()}
    assert got["child"].context.trace_id == got["parent"].context.trace_id
    assert got["child"].parent is not None
    assert got["child"].parent.span_id == got["parent"].context.span_id


def test_http_traceparent_is_accepted_and_bad_ones_ignored(
    spans: tuple[tracing.Tracer, InMemorySpanExporter],
) -> None:
    tracer, exporter = spans
    trace_id, span_id = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    headers = [(b"Content-Type", b"json"), (b"TraceParent", f"00-{trace_id}-{span_id}-01".encode())]
    ctx = tracing.parent_from_headers(headers)
    span = tracing.start_span(tracer, "gateway.request", ctx)
    tracing.end_span(span, "status 500")
    (done,) = exporter.get_finished_spans()
    assert f"{done.context.trace_id:032x}" == trace_id
    assert done.parent is not None and f"{done.parent.span_id:016x}" == span_id
    assert not done.status.is_ok
    assert tracing.parent_from_headers([(b"traceparent", b"garbage")]) is None
    assert tracing.parent_from_headers([]) is None
    assert tracing.parent_from_metadata(None) is None


def test_a_span_without_parent_starts_a_new_trace_even_inside_another(
    spans: tuple[tracing.Tracer, InMemorySpanExporter],
) -> None:
    tracer, exporter = spans
    outer = tracing.start_span(tracer, "outer")
    token = tracing.attach_span(outer)
    try:
        assert tracing.current_span() is outer
        fresh = tracing.start_span(tracer, "fresh")  # explicit: no ambient parent
    finally:
        tracing.detach(token)
    tracing.end_span(fresh)
    tracing.end_span(outer)
    got = {s.name: s for s in exporter.get_finished_spans()}
    assert got["fresh"].parent is None
    assert got["fresh"].context.trace_id != got["outer"].context.trace_id


# --- fleet -----------------------------------------------------------------------------------


def _node(node_id: str, state: SchedulingState, healthy: tuple[bool, ...], metrics: str) -> Node:
    gpus = tuple(Gpu(i, "H100", 80 << 30, 80 << 30, healthy=h) for i, h in enumerate(healthy))
    return Node(
        NodeInventory(node_id, gpus=gpus, metrics_endpoint=metrics),
        NodeSchedulingStatus(state=state),
    )


WORKERS = [
    WorkerRecord("w-2", "m", "decode", "sim", "127.0.0.1:2", metrics_endpoint="127.0.0.1:9002"),
    WorkerRecord(
        "w-1",
        "m",
        "prefill",
        "sim",
        "127.0.0.1:1",
        metrics_endpoint="127.0.0.1:9001",
        deployment="d",
        pool="prefill",
    ),
    WorkerRecord("w-3", "m", "decode", "sim", "127.0.0.1:3", state=WorkerState.DRAINING),
]
NODES = [
    _node("n-1", SchedulingState.SCHEDULABLE, (True, True), "127.0.0.1:9101"),
    _node("n-2", SchedulingState.CORDONED, (True, False), ""),
    _node("n-3", SchedulingState.SCHEDULABLE, (False, False), "127.0.0.1:9103"),
]


def test_one_gateways_processes_are_one_scrape_target() -> None:
    """``gateway --processes 2`` registers two ids on one address, whose /metrics is their sum:
    scraping it twice would count every request twice."""
    gateways = [("gw-b-1", "127.0.0.1:8000"), ("gw-b-0", "127.0.0.1:8000"), ("gw-c", "h:1")]
    groups = [g for g in sd_target_groups([], [], gateways)]
    assert [(g["targets"], g["labels"]["__meta_switchboard_gateway_id"]) for g in groups] == [
        (["127.0.0.1:8000"], "gw-b-0"),
        (["h:1"], "gw-c"),
    ]


def test_sd_target_groups_list_every_published_endpoint() -> None:
    groups = sd_target_groups(WORKERS, NODES, [("gw-1", "127.0.0.1:8000"), ("gw-2", "")])
    assert [g["targets"] for g in groups] == [
        ["127.0.0.1:9001"], ["127.0.0.1:9002"],  # workers by id; w-3 published none
        ["127.0.0.1:9101"], ["127.0.0.1:9103"],  # node agents
        ["127.0.0.1:8000"],  # gateways with an HTTP endpoint
    ]  # fmt: skip
    assert groups[0]["labels"] == {
        "component": "worker",
        "__meta_switchboard_worker_id": "w-1",
        "__meta_switchboard_model": "m",
        "__meta_switchboard_role": "prefill",
        "__meta_switchboard_node": "",
        "__meta_switchboard_deployment": "d",
        "__meta_switchboard_pool": "prefill",
    }
    assert {g["labels"]["component"] for g in groups} == {"worker", "node_agent", "gateway"}
    # what Prometheus reads: every label value a string, every target host:port
    assert all(isinstance(v, str) for g in groups for v in g["labels"].values())


def test_fleet_refresh_sets_gauges_and_serves_targets() -> None:
    metrics = ControlPlaneMetrics(CollectorRegistry())
    workers = list(WORKERS)

    async def list_workers() -> list[WorkerRecord]:
        return workers

    async def list_gateways() -> list[tuple[str, str]]:
        return [("gw", "127.0.0.1:8000")]

    fleet = FleetTelemetry(metrics, list_workers, lambda: NODES, list_gateways)
    assert json.loads(fleet.sd_targets()[1]) == []  # nothing before the first refresh
    asyncio.run(fleet.refresh())
    get = metrics.registry.get_sample_value
    assert get("switchboard_workers", {"model": "m", "role": "decode", "state": "serving"}) == 1
    assert get("switchboard_workers", {"model": "m", "role": "decode", "state": "draining"}) == 1
    assert get("switchboard_nodes", {"state": "ready"}) == 1
    assert get("switchboard_nodes", {"state": "cordoned"}) == 1
    assert get("switchboard_nodes", {"state": "unhealthy"}) == 1
    assert get("switchboard_nodes", {"state": "draining"}) == 0
    assert get("switchboard_gpus", {"state": "healthy"}) == 2
    assert get("switchboard_gpus", {"state": "unschedulable"}) == 1
    assert get("switchboard_gpus", {"state": "unhealthy"}) == 3
    content_type, body = fleet.sd_targets()
    assert content_type == "application/json"
    assert len(json.loads(body)) == 5
    workers.pop()  # the draining worker left: its series reads 0, not its last value
    asyncio.run(fleet.refresh())
    assert get("switchboard_workers", {"model": "m", "role": "decode", "state": "draining"}) == 0
