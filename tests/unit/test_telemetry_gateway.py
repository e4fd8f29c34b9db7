"""The gateway's router metrics and spans (``Gateway._route``) and its end-of-request accounting
(``Gateway.finish``), over a view filled by hand and a fake clock."""

from __future__ import annotations

import random

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry

from controlplane.core.routing import SlaAwareRouter
from controlplane.gateway.errors import RateLimited
from controlplane.gateway.model_routing import ModelRoutingCache
from controlplane.gateway.pipeline import Gateway, Progress
from controlplane.gateway.routing import CircuitBreakers, LeastLoadedRouter
from controlplane.gateway.sla_routing import SlaGatewayRouter
from controlplane.telemetry import tracing
from controlplane.telemetry.metrics import GatewayMetrics, TokenTimer
from tests.unit.test_gateway_sla_wiring import SIM, QuietView, rec

MODEL = "sim-model"


class FakeClock:
    """Advances ``step`` seconds at every reading."""

    def __init__(self, step: float = 0.001) -> None:
        self.now = 1000.0
        self.step = step

    def __call__(self) -> float:
        self.now += self.step
        return self.now


def build(clock: FakeClock, tracer: tracing.Tracer | None = None) -> tuple[Gateway, GatewayMetrics]:
    view = QuietView()
    view.put(rec("d1"), rec("d2"), rec("p1", "prefill"), models=(SIM,))
    sla = SlaGatewayRouter(
        SlaAwareRouter(), timing_for=ModelRoutingCache(view.model_info).timing_for,
        rng=random.Random(0),
    )  # fmt: skip
    view.kv_sink = sla
    metrics = GatewayMetrics(CollectorRegistry())
    gw = Gateway(
        view, LeastLoadedRouter(), CircuitBreakers(), metrics, sla_router=sla, clock=clock,
        tracer=tracer, plugin_timing_every=4,
    )  # fmt: skip
    return gw, metrics


def test_route_metrics_with_sampled_plugin_timing() -> None:
    clock = FakeClock()
    gw, m = build(clock)
    get = m.registry.get_sample_value
    prompt = tuple(range(200, 520))  # 20 blocks
    gw._route(MODEL, prompt, 8, frozenset(), False)
    plugins = {
        s.labels["plugin"]: s.value
        for metric in m.router_plugin.collect() for s in metric.samples
        if s.name.endswith("_sum")
    }  # fmt: skip
    assert {"Role", "KvHeadroom", "PrefixOverlap"} <= set(plugins)
    # the fake clock moves 1 ms per reading, a plugin run is read twice: 1 ms per run (a name
    # that is both a filter and a scorer ran twice)
    assert all(abs(v - 0.001 * round(v / 0.001)) < 1e-9 and v > 0.0009 for v in plugins.values())
    assert plugins["Role"] == pytest.approx(0.001), plugins
    assert get("switchboard_router_decisions_total",
               {"model": MODEL, "policy": "sla", "prefill": "local"}) == 1  # fmt: skip
    assert get("switchboard_router_decision_seconds_count", {"model": MODEL, "policy": "sla"}) == 1
    reasons = sum(
        s.value for metric in m.router_reasons.collect() for s in metric.samples
        if s.name.endswith("_total")
    )  # fmt: skip
    assert reasons == 1
    assert get("switchboard_prefix_cache_query_tokens_total", {"model": MODEL}) == len(prompt)
    # the same prompt again: the router remembers where it sent it, so those blocks are hits
    gw._route(MODEL, prompt, 8, frozenset(), False)
    assert get("switchboard_prefix_cache_hit_tokens_total", {"model": MODEL}) == len(prompt)
    # plugins are timed on one decision in 4 (the 1st and the 5th)
    for _ in range(3):
        gw._route(MODEL, prompt, 8, frozenset(), False)
    count = get("switchboard_router_plugin_seconds_count", {"plugin": "Role"})
    assert count == 2
    assert get("switchboard_router_decision_seconds_count", {"model": MODEL, "policy": "sla"}) == 5


def test_router_span_hangs_under_the_request_span() -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("t")
    gw, _ = build(FakeClock(), tracer)
    progress = Progress(span=tracing.start_span(tracer, "gateway.request"))
    gw._route(MODEL, tuple(range(200, 520)), 8, frozenset(), False, progress=progress)
    gw._route(MODEL, tuple(range(200, 520)), 8, frozenset(), False)  # no span: no router span
    gw.finish("/v1/completions", "200", MODEL, progress, error=False)
    spans = {s.name: s for s in exporter.get_finished_spans()}
    assert set(spans) == {"gateway.request", "router.decision"}
    router, request = spans["router.decision"], spans["gateway.request"]
    assert router.parent is not None and router.parent.span_id == request.context.span_id
    assert router.attributes is not None
    assert router.attributes["switchboard.policy"] == "sla"
    assert router.attributes["switchboard.decode_worker"] in ("d1", "d2")
    assert request.attributes is not None and request.attributes["switchboard.status"] == "200"


def test_finish_counts_each_request_once_by_outcome() -> None:
    clock = FakeClock(step=0.0)
    gw, m = build(clock)
    get = m.registry.get_sample_value

    def served(ttft: float, gap: float, tokens: int, **kw: bool) -> Progress:
        p = Progress(arrived=clock.now, tenant="acme", sla_class="interactive")
        p.timer = TokenTimer(clock.now)
        p.timer.tokens(1, clock.now + ttft)
        p.timer.tokens(tokens - 1, clock.now + ttft + gap * (tokens - 1))
        p.tokens = tokens
        return p

    assert gw.finish("/v1/completions", "200", MODEL, served(0.1, 0.01, 10), error=False) is None
    assert gw.finish("/v1/completions", "200", MODEL, served(0.9, 0.01, 10), error=False) == "ttft"
    failed = served(0.1, 0.01, 3)
    failed.failed = True  # the stream raised after its tokens (an SSE error event; status 200)
    assert gw.finish("/v1/completions", "200", MODEL, failed, error=False) == "error"
    gone = served(0.1, 0.01, 3)
    assert gw.finish("/v1/completions", "499", MODEL, gone, error=True, disconnected=True) == (
        "error"
    )
    late = served(0.1, 0.01, 3)
    late.failed, late.abort_reason = True, "timeout"  # its last worker call hit the deadline
    assert gw.finish("/v1/completions", "200", MODEL, late, error=False) == "error"
    shed = Progress(rejected=RateLimited("shed", tenant="acme", sla_class="batch", reason="shed"))
    assert gw.finish("/v1/completions", "429", MODEL, shed, error=True) == "shed"
    assert gw.finish("/v1/completions", "401", "", Progress(), error=True) is None

    who = {"tenant": "acme", "model": MODEL, "sla_class": "interactive"}
    assert get("switchboard_slo_met_total", who) == 1
    assert get("switchboard_goodput_tokens_total", who) == 10
    assert get("switchboard_slo_missed_total", {**who, "reason": "ttft"}) == 1
    assert get("switchboard_slo_missed_total", {**who, "reason": "error"}) == 3
    assert get("switchboard_slo_missed_total",
               {**who, "sla_class": "batch", "reason": "shed"}) == 1  # fmt: skip
    assert get("switchboard_aborts_total", {"model": MODEL, "reason": "client_disconnect"}) == 1
    assert get("switchboard_aborts_total", {"model": MODEL, "reason": "error"}) == 1
    assert get("switchboard_aborts_total", {"model": MODEL, "reason": "timeout"}) == 1
    assert get("switchboard_requests_total", {**who, "route": "/v1/completions",
                                              "status": "200"}) == 4  # fmt: skip
    unknown = {"tenant": "unknown", "model": "", "sla_class": "unknown"}
    assert get("switchboard_requests_total",
               {**unknown, "route": "/v1/completions", "status": "401"}) == 1  # fmt: skip
