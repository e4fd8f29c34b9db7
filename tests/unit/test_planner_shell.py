"""The planner shell's pure parts: gateway metrics -> observations, field ownership, API view."""

from __future__ import annotations

import pytest
from prometheus_client import generate_latest

from controlplane.adapters.grpc.deployments import (
    ROLE_FROM_PB,
    planner_to_pb,
    spec_from_pb,
    spec_to_pb,
)
from controlplane.core.deployments import PoolRole, keep_planner_replicas
from controlplane.core.routing import ScaledTiming
from controlplane.deployspec import spec_from_dict, spec_to_dict
from controlplane.planner import (
    Histogram,
    ModelCounters,
    merge,
    observe,
    parse_gateway_metrics,
    timing_of,
)
from controlplane.telemetry.metrics import GatewayMetrics
from workers.profiles import load_profile


def serve(m: GatewayMetrics, n: int, cls: str, ttft: float, itl: float, model: str = "m") -> None:
    for _ in range(n):
        m.requests.labels("acme", model, cls, "chat", "200").inc()
        m.ttft.labels("acme", model, cls).observe(ttft)
        m.itl.labels("acme", model, cls).observe(itl)
        m.prompt_tokens.labels("acme", model).inc(1000)
        m.generation_tokens.labels("acme", model).inc(200)


def scrape(m: GatewayMetrics) -> dict[str, ModelCounters]:
    return parse_gateway_metrics(generate_latest(m.registry).decode())


def test_a_window_of_gateway_counters_becomes_an_observation() -> None:
    m = GatewayMetrics()
    serve(m, 10, "interactive", 0.1, 0.01)
    before = scrape(m)["m"]
    serve(m, 90, "interactive", 0.8, 0.06)  # the window: 90 slow requests
    serve(m, 30, "standard", 0.2, 0.02)
    after = scrape(m)["m"]
    obs = observe(before, after, 10.0)
    assert obs is not None
    assert obs.arrival_rps == pytest.approx(12.0)
    assert obs.input_tokens.mean == pytest.approx(1000)
    assert obs.output_tokens.mean == pytest.approx(200)
    by = {c.sla_class: c for c in obs.classes}
    assert by["interactive"].arrival_rps == pytest.approx(9.0)
    # the window's p95 reflects only the slow requests (the earlier fast ones are subtracted)
    assert by["interactive"].ttft_p95_ms is not None and by["interactive"].ttft_p95_ms > 500
    assert by["interactive"].itl_p95_ms is not None and 50 < by["interactive"].itl_p95_ms <= 75
    assert by["standard"].ttft_p95_ms is not None and by["standard"].ttft_p95_ms <= 300


def test_per_request_tpot_wins_over_per_gap_itl() -> None:
    """A gateway exporting TPOT per request: the planner judges ITL on it, not on the gaps
    (whose p95 the router's local prefills keep near the target by design)."""
    m = GatewayMetrics()
    serve(m, 1, "interactive", 0.1, 0.01)
    before = scrape(m)["m"]
    serve(m, 50, "interactive", 0.1, 0.06)  # per-gap ITL p95 above the 50 ms target ...
    for _ in range(50):
        m.tpot.labels("acme", "m", "interactive").observe(0.03)  # ... per request well under
    obs = observe(before, scrape(m)["m"], 10.0)
    assert obs is not None
    itl = obs.classes[0].itl_p95_ms
    assert itl is not None and itl <= 50, itl
    merged = merge([scrape(m), scrape(m)])["m"].classes["interactive"]
    assert merged.tpot.count == 100


def test_requests_refused_before_any_work_are_not_load() -> None:
    m = GatewayMetrics()
    serve(m, 10, "interactive", 0.1, 0.01)
    m.requests.labels("unknown", "m", "unknown", "chat", "401").inc(50)
    m.requests.labels("acme", "m", "interactive", "chat", "429").inc(5)
    assert scrape(m)["m"].requests == 15


def test_a_restarted_gateway_skips_the_window() -> None:
    m = GatewayMetrics()
    serve(m, 50, "interactive", 0.1, 0.01)
    later = scrape(m)["m"]
    fresh = scrape(GatewayMetrics())
    assert observe(later, fresh.get("m", ModelCounters()), 10.0) is None


def test_gateways_are_summed() -> None:
    a, b = GatewayMetrics(), GatewayMetrics()
    serve(a, 10, "interactive", 0.1, 0.01)
    serve(b, 30, "interactive", 0.1, 0.01)
    both = merge([scrape(a), scrape(b)])["m"]
    assert both.requests == 40 and both.classes["interactive"].ttft.count == 40


def test_histogram_quantile_interpolates_like_promql() -> None:
    h = Histogram(((0.1, 50.0), (0.2, 100.0), (float("inf"), 100.0)), 10.0, 100.0)
    assert h.quantile(0.5) == pytest.approx(0.1)
    assert h.quantile(0.75) == pytest.approx(0.15)
    assert Histogram().quantile(0.95) is None


def spec_doc(replicas: int, *, auto: bool = True, lo: int = 1, hi: int = 8) -> dict[str, object]:
    pool = {"replicas": replicas, "min_replicas": lo, "max_replicas": hi, "autoscaling": auto}
    return {
        "name": "llm", "model": "m", "engine": "sim",
        "engine_args": {"profile": "tiny-test", "speedup": "10"},
        "pools": [{"role": "prefill", **pool}, {"role": "decode", **pool}],
    }  # fmt: skip


def test_spec_edits_keep_the_planner_owned_replicas() -> None:
    stored = spec_from_dict(spec_doc(6))
    edit = spec_from_dict(spec_doc(1, hi=4))
    kept = keep_planner_replicas(edit, stored)
    assert [p.replicas for p in kept.pools] == [4, 4]  # clamped into the edit's new max
    assert [p.max_replicas for p in kept.pools] == [4, 4]  # the edit owns the bounds
    # a pool not autoscaled, or one that just turned autoscaling on, takes the document's count
    assert (
        keep_planner_replicas(spec_from_dict(spec_doc(2, auto=False)), stored).pools[0].replicas
        == 2
    )
    turned_on = keep_planner_replicas(edit, spec_from_dict(spec_doc(6, auto=False)))
    assert [p.replicas for p in turned_on.pools] == [1, 1]
    assert keep_planner_replicas(edit, None) is edit


def test_autoscaling_round_trips_through_yaml_and_proto() -> None:
    spec = spec_from_dict(spec_doc(3))
    assert spec_from_dict(spec_to_dict(spec)) == spec
    assert spec_from_pb(spec_to_pb(spec)) == spec
    assert all(p.autoscaling for p in spec.pools)
    assert not any(p.autoscaling for p in spec_from_dict(spec_doc(3, auto=False)).pools)


def test_timing_of_a_sim_deployment_applies_its_speedup() -> None:
    got = timing_of(spec_from_dict(spec_doc(1)))
    assert got is not None
    timing, kv, seqs = got
    base = load_profile("tiny-test")
    assert isinstance(timing, ScaledTiming)
    assert timing.decode_step_ms(4, 400) == pytest.approx(base.decode_step_ms(4, 400) / 10)
    assert kv == base.kv_capacity_tokens and seqs == 256
    assert timing_of(spec_from_dict({**spec_doc(1), "engine_args": {}})) is None


def test_planner_record_becomes_the_api_view() -> None:
    view = planner_to_pb({
        "updated_at": 100.0, "advisory": False, "observed_rps": 41.0, "forecast_rps": 45.5,
        "pools": [{"role": "decode", "current": 2, "desired": 4, "ready": 2, "kind": "itl",
                   "predicted_ms": 38.0, "observed_ms": 62.0, "target_ms": 50.0,
                   "reason": "r", "autoscaling": True}],
        "decisions": [{"time": 90.0, "role": "decode", "from": 2, "to": 4, "reason": "why",
                       "applied": True}],
    })  # fmt: skip
    assert view.forecast_rps == 45.5 and view.updated_at.seconds == 100
    (p,) = view.pools
    assert ROLE_FROM_PB[p.role] is PoolRole.DECODE and (p.current, p.desired) == (2, 4)
    assert p.observed_p95_ms == 62.0 and p.autoscaling
    (d,) = view.decisions
    assert (d.from_replicas, d.to_replicas, d.reason, d.applied) == (2, 4, "why", True)
