"""The metrics module: names, buckets at the SLA targets, the tenant cap, SLO accounting."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from controlplane.core.sla import DEFAULT_SLA_CLASSES, SlaClass
from controlplane.reconciler import placement_reason
from controlplane.telemetry.metrics import (
    OTHER_TENANT,
    UNKNOWN,
    ControlPlaneMetrics,
    GatewayMetrics,
    HttpServerSnapshot,
    MetricsGroup,
    NodeAgentMetrics,
    RequestOutcome,
    SloTargets,
    TenantLabels,
    TokenTimer,
    WorkerHttpMetrics,
    WorkerMetrics,
    exposed_names,
    judge_slo,
    metric_names,
)

CATALOGUE = {
    "switchboard_requests_total", "switchboard_ttft_seconds", "switchboard_itl_seconds",
    "switchboard_e2e_latency_seconds", "switchboard_queue_wait_seconds",
    "switchboard_slo_met_total", "switchboard_slo_missed_total",
    "switchboard_goodput_tokens_total", "switchboard_prompt_tokens_total",
    "switchboard_generation_tokens_total", "switchboard_queue_depth",
    "switchboard_in_flight_requests", "switchboard_admission_rejected_total",
    "switchboard_router_decision_seconds", "switchboard_router_plugin_seconds",
    "switchboard_router_decisions_total", "switchboard_router_reasons_total",
    "switchboard_prefix_cache_hit_tokens_total", "switchboard_prefix_cache_query_tokens_total",
    "switchboard_migrations_total", "switchboard_retries_total",
    "switchboard_kv_reprefills_total", "switchboard_aborts_total",
    "switchboard_circuit_open_total", "switchboard_worker_kv_cache_usage_ratio",
    "switchboard_worker_running_requests", "switchboard_worker_waiting_requests",
    "switchboard_worker_prefix_cache_hit_ratio", "switchboard_kv_transfer_bytes_total",
    "switchboard_kv_transfer_seconds", "switchboard_kv_transfer_failures_total",
    "switchboard_worker_tokens_total", "switchboard_leader", "switchboard_leader_changes_total",
    "switchboard_nodes", "switchboard_gpus", "switchboard_workers",
    "switchboard_placement_failures_total", "switchboard_reconcile_actions_total",
    "switchboard_reconcile_duration_seconds", "switchboard_worker_restarts_total",
    "switchboard_etcd_request_seconds", "switchboard_node_gpus",
    "switchboard_node_heartbeat_failures_total",
}  # fmt: skip


# --- names ---------------------------------------------------------------------------------------


def test_every_catalogue_name_is_defined_with_its_prometheus_suffix() -> None:
    names = metric_names()
    missing = CATALOGUE - set(names)
    assert not missing, f"catalogue names not defined: {sorted(missing)}"
    assert all(n.startswith("switchboard_") for n in names)
    assert all(n.endswith("_total") for n, kind in names.items() if kind == "counter")
    assert names["switchboard_ttft_seconds"] == "histogram"
    assert names["switchboard_queue_depth"] == "gauge"


def test_exposed_names_add_histogram_series() -> None:
    exposed = exposed_names()
    assert {"switchboard_ttft_seconds_bucket", "switchboard_ttft_seconds_sum",
            "switchboard_ttft_seconds_count"} <= exposed  # fmt: skip
    assert "switchboard_ttft_seconds" not in exposed
    assert "switchboard_requests_total" in exposed


def test_a_new_group_is_listed_without_more_code() -> None:
    from prometheus_client import Gauge

    class ScratchMetrics(MetricsGroup):
        def __init__(self, registry: CollectorRegistry | None = None) -> None:
            super().__init__(registry)
            Gauge("switchboard_scratch_probe", "test only", registry=self.registry)

    try:
        assert metric_names()["switchboard_scratch_probe"] == "gauge"
    finally:
        MetricsGroup.groups.remove(ScratchMetrics)
    assert "switchboard_scratch_probe" not in metric_names()


def test_each_component_registers_into_its_own_registry() -> None:
    registries = [CollectorRegistry() for _ in range(4)]
    GatewayMetrics(registries[0])
    WorkerMetrics(registries[1])
    ControlPlaneMetrics(registries[2])
    NodeAgentMetrics(registries[3])
    GatewayMetrics(CollectorRegistry())  # a second gateway in one process: no clash
    with pytest.raises(ValueError):  # the same registry twice: a duplicate name
        GatewayMetrics(registries[0])


# --- buckets -------------------------------------------------------------------------------------


def _bucket_bounds(text: str, name: str) -> set[float]:
    out = set()
    for line in text.splitlines():
        if line.startswith(name + "_bucket{"):
            le = line.split('le="', 1)[1].split('"', 1)[0]
            if le != "+Inf":
                out.add(float(le))
    return out


def test_buckets_resolve_every_sla_target_exactly() -> None:
    m = GatewayMetrics(CollectorRegistry())
    for hist in (m.ttft, m.itl, m.e2e, m.queue_wait):
        hist.labels("t", "m", "c").observe(0.01)
    text = generate_latest(m.registry).decode()
    ttft = _bucket_bounds(text, "switchboard_ttft_seconds")
    itl = _bucket_bounds(text, "switchboard_itl_seconds")
    e2e = _bucket_bounds(text, "switchboard_e2e_latency_seconds")
    queue = _bucket_bounds(text, "switchboard_queue_wait_seconds")
    for cls in DEFAULT_SLA_CLASSES:
        if cls.ttft_p95_ms is not None:
            target = cls.ttft_p95_ms / 1000.0
            assert target in ttft and target in e2e and target in queue, cls.name
        if cls.itl_p95_ms is not None:
            assert cls.itl_p95_ms / 1000.0 in itl, cls.name
    assert {0.5, 2.0} <= ttft and {0.05, 0.1} <= itl  # the documented defaults


def test_a_gateway_with_other_classes_adds_their_targets() -> None:
    gold = SlaClass("gold", priority=0, ttft_p95_ms=250.0, itl_p95_ms=20.0)
    m = GatewayMetrics(CollectorRegistry(), sla_classes=(*DEFAULT_SLA_CLASSES, gold))
    m.ttft.labels("t", "m", "gold").observe(0.1)
    m.itl.labels("t", "m", "gold").observe(0.01)
    text = generate_latest(m.registry).decode()
    assert 0.25 in _bucket_bounds(text, "switchboard_ttft_seconds")
    assert 0.02 in _bucket_bounds(text, "switchboard_itl_seconds")


# --- tenant cap ----------------------------------------------------------------------------------


def test_tenant_label_keeps_the_first_n_tenants_then_says_other() -> None:
    labels = TenantLabels(cap=2)
    assert [labels(t) for t in ("a", "b", "c", "a", "d", "b")] == [
        "a", "b", OTHER_TENANT, "a", OTHER_TENANT, "b",
    ]  # fmt: skip
    assert labels("") == UNKNOWN
    assert labels.seen == 2
    with pytest.raises(ValueError):
        TenantLabels(cap=-1)


def test_gateway_series_stay_bounded_past_the_cap() -> None:
    m = GatewayMetrics(CollectorRegistry(), tenant_cap=3)
    targets = SloTargets(ttft_s=0.5, itl_s=0.05)
    ok = RequestOutcome(ttft_s=0.1, mean_itl_s=0.01, e2e_s=0.5, generated_tokens=10)
    for i in range(50):
        m.record_slo(f"tenant-{i}", "m", "interactive", targets, ok)
    tenants = {
        s.labels["tenant"] for metric in m.slo_met.collect() for s in metric.samples
        if s.name.endswith("_total")
    }  # fmt: skip
    assert tenants == {"tenant-0", "tenant-1", "tenant-2", OTHER_TENANT}
    other = m.registry.get_sample_value(
        "switchboard_slo_met_total",
        {"tenant": OTHER_TENANT, "model": "m", "sla_class": "interactive"},
    )
    assert other == 47


# --- SLO accounting --------------------------------------------------------------------------


INTERACTIVE = SloTargets.of(DEFAULT_SLA_CLASSES[0])


def outcome(ttft: float | None, itl: float | None, **kw: object) -> RequestOutcome:
    return RequestOutcome(ttft_s=ttft, mean_itl_s=itl, e2e_s=kw.pop("e2e", 1.0), **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("o", "reason"),
    [
        (outcome(0.5, 0.05), None),  # exactly at both targets: met
        (outcome(0.2, None), None),  # one token: no ITL to miss
        (outcome(0.5001, 0.01), "ttft"),
        (outcome(0.1, 0.0501), "itl"),
        (outcome(0.9, 0.9), "ttft"),  # both missed: TTFT is named first
        (outcome(None, None), "ttft"),  # no token at all
        (outcome(0.1, 0.01, error=True), "error"),
        (outcome(None, None, shed=True, error=True), "shed"),
    ],
)
def test_judge_slo(o: RequestOutcome, reason: str | None) -> None:
    assert SloTargets(ttft_s=0.5, itl_s=0.05, deadline_s=None) == INTERACTIVE
    assert judge_slo(INTERACTIVE, o) == reason


def test_batch_class_is_judged_by_its_deadline() -> None:
    batch = SloTargets.of(DEFAULT_SLA_CLASSES[2])
    assert batch.ttft_s is None and batch.deadline_s == 3600.0
    assert judge_slo(batch, outcome(30.0, 5.0, e2e=3599.0)) is None
    assert judge_slo(batch, outcome(30.0, 5.0, e2e=3601.0)) == "deadline"


def test_token_timer_with_a_fake_clock() -> None:
    timer = TokenTimer(started=100.0)
    assert timer.tokens(1, 100.3) is None  # the first token: no gap
    assert timer.tokens(2, 100.4) == pytest.approx(0.05)  # 0.1 s over 2 tokens
    assert timer.tokens(0, 100.5) is None  # an empty chunk changes nothing
    assert timer.tokens(1, 100.5) == pytest.approx(0.1)
    assert timer.ttft_s == pytest.approx(0.3)
    # 4 tokens, first at 100.3, last at 100.5: mean ITL over 3 gaps
    assert timer.mean_itl_s == pytest.approx(0.2 / 3)
    o = timer.outcome(101.0)
    assert o.e2e_s == pytest.approx(1.0)
    assert (o.generated_tokens, o.error) == (4, False)


def test_record_slo_counts_met_missed_goodput_and_e2e() -> None:
    m = GatewayMetrics(CollectorRegistry())
    labels = {"tenant": "acme", "model": "m", "sla_class": "interactive"}
    fast = RequestOutcome(ttft_s=0.2, mean_itl_s=0.02, e2e_s=0.6, generated_tokens=21)
    slow = RequestOutcome(ttft_s=0.7, mean_itl_s=0.02, e2e_s=1.1, generated_tokens=21)
    choppy = RequestOutcome(ttft_s=0.2, mean_itl_s=0.08, e2e_s=1.8, generated_tokens=21)
    failed = RequestOutcome(ttft_s=None, mean_itl_s=None, e2e_s=0.1, error=True)
    assert m.record_slo("acme", "m", "interactive", INTERACTIVE, fast) is None
    assert m.record_slo("acme", "m", "interactive", INTERACTIVE, slow) == "ttft"
    assert m.record_slo("acme", "m", "interactive", INTERACTIVE, choppy) == "itl"
    assert m.record_slo("acme", "m", "interactive", INTERACTIVE, failed) == "error"
    get = m.registry.get_sample_value
    assert get("switchboard_slo_met_total", labels) == 1
    assert get("switchboard_goodput_tokens_total", labels) == 21  # only the request that met it
    for reason in ("ttft", "itl", "error"):
        assert get("switchboard_slo_missed_total", {**labels, "reason": reason}) == 1
    # end-to-end latency of the three that produced tokens
    assert get("switchboard_e2e_latency_seconds_count", labels) == 3
    assert get("switchboard_e2e_latency_seconds_bucket", {**labels, "le": "0.75"}) == 1


def test_http_server_metrics_read_their_source_at_scrape_time() -> None:
    snap = HttpServerSnapshot(
        model="m", running_requests=3, kv_blocks_used=16, kv_blocks_total=64,
        requests={("/v1/completions", 200): 5, ("/v1/completions", 400): 1}, disconnects=2,
    )  # fmt: skip
    registry = CollectorRegistry()
    WorkerHttpMetrics(registry, source=lambda: snap)
    get = registry.get_sample_value
    assert get("switchboard_engine_running_requests", {"model": "m"}) == 3
    assert get("switchboard_engine_kv_cache_usage_ratio", {"model": "m"}) == 0.25
    assert get("switchboard_http_requests_total",
               {"model": "m", "route": "/v1/completions", "status": "400"}) == 1  # fmt: skip
    assert get("switchboard_http_client_disconnects_total", {"model": "m"}) == 2
    assert metric_names()["switchboard_http_requests_total"] == "counter"


def test_placement_reason_is_bounded() -> None:
    assert placement_reason("node-3: needs 4 GPUs, 2 free") == "needs N GPUs, N free"
    assert placement_reason("node-7: needs 8 GPUs, 0 free") == "needs N GPUs, N free"
    assert placement_reason("") == "unknown"
    assert len(placement_reason("n: " + "x" * 500)) == 60
