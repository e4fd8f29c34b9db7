"""The SLA-aware router on the gateway's request path: per-model routing facts, the route
summary (debug header), the view feeding KV events to the prefix index, and ``Gateway._route``
(SLA route, least-loaded models, fallback, retries that exclude a failed worker)."""

from __future__ import annotations

import dataclasses
import random
from typing import Any, cast

import pytest
from switchboard.v1 import worker_pb2

from controlplane.core.model import WorkerRecord
from controlplane.core.routing import SlaAwareRouter
from controlplane.core.sla import SlaClass
from controlplane.errors import InvalidArgument, Unavailable
from controlplane.gateway.model_routing import (
    DEFAULT_BLOCK_SIZE,
    ModelRouting,
    ModelRoutingCache,
    model_routing,
)
from controlplane.gateway.pipeline import Gateway, Progress
from controlplane.gateway.routing import (
    CircuitBreakers,
    LeastLoadedRouter,
    NoRoute,
    Route,
    WorkerSnapshot,
)
from controlplane.gateway.sla_routing import MAX_SUMMARY_CHARS, SlaGatewayRouter, route_summary
from controlplane.gateway.workers_view import (
    LoadReport,
    ModelInfo,
    WorkerChannels,
    WorkersView,
    kv_events,
)
from controlplane.telemetry.metrics import GatewayMetrics
from workers.engine import KvEvent, KvEventKind
from workers.engines.sim_core import hash_blocks
from workers.profiles import load_profile

TINY = load_profile("tiny-test")
SIM = ModelInfo(model="sim-model", engine="sim", engine_args={"profile": "tiny-test"})
CPU = ModelInfo(model="cpu-model", engine="cpu", model_path="/models/x")


# --- per-model facts -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("info", "block_size", "policy"),
    [
        (SIM, TINY.block_size, "sla"),
        (ModelInfo("m", "sim"), load_profile("llama-3.1-8b-h100").block_size, "sla"),
        (CPU, DEFAULT_BLOCK_SIZE, "least_loaded"),
        (ModelInfo("m", "cpu", engine_args={"block_size": "32"}), 32, "least_loaded"),
        (ModelInfo("m", "cpu", engine_args={"block_size": "x"}), 16, "least_loaded"),
        (ModelInfo("m", "vllm", engine_args={"block_size": "0"}), 16, "least_loaded"),
    ],
)  # fmt: skip
def test_model_routing_from_the_deployment(info: ModelInfo, block_size: int, policy: str) -> None:
    facts = model_routing(info)
    assert (facts.block_size, facts.policy) == (block_size, policy)


def test_cache_builds_once_per_deployment_and_falls_back_on_a_bad_profile() -> None:
    infos = {"sim-model": SIM, "bad": ModelInfo("bad", "sim", engine_args={"profile": "nope"})}
    built: list[str] = []

    def factory(info: ModelInfo) -> ModelRouting:
        built.append(info.model)
        return model_routing(info)

    cache = ModelRoutingCache(infos.get, factory)
    assert cache.get("sim-model").timing is not None
    cache.get("sim-model")
    assert built == ["sim-model"]
    assert cache.get("bad") == ModelRouting()  # logged; least loaded
    assert cache.get("unknown") == ModelRouting()  # no deployment record
    infos["sim-model"] = ModelInfo("sim-model", "sim", engine_args={"profile": "llama-3.1-8b-h100"})
    assert cache.get("sim-model").block_size == load_profile("llama-3.1-8b-h100").block_size
    assert built == ["sim-model", "bad", "sim-model"]  # a changed deployment: built again
    with pytest.raises(Exception, match="no timing model"):
        cache.timing_for("unknown", snap("d1"))


# --- the summary ---------------------------------------------------------------------------------


def snap(worker_id: str, role: str = "decode", **kw: Any) -> WorkerSnapshot:
    fields: dict[str, Any] = {"kv_blocks_total": 64, "max_context_tokens": 2048}
    fields.update(kw)
    return WorkerSnapshot(worker_id, f"127.0.0.1:{worker_id}", role, **fields)


def sla_adapter() -> SlaGatewayRouter:
    return SlaGatewayRouter(SlaAwareRouter(), timing_for=lambda m, s: TINY, rng=random.Random(0))


def test_summary_names_workers_and_deciders_and_is_bounded() -> None:
    from controlplane.core.routing import RouteRequest

    router = sla_adapter()
    prompt = list(range(100, 420))
    hashes = hash_blocks(prompt, TINY.block_size)
    router.apply_kv_events("d2", [KvEvent(KvEventKind.STORED, hashes)])
    request = RouteRequest(
        model="m", prompt_tokens=len(prompt), max_tokens=4, block_hashes=hashes, block_size=16
    )
    workers = [snap("d1"), snap("d2"), snap("d3", serving=False)]
    route, trace = router.route_request(request, workers)
    line = route_summary(route, trace)
    assert line.startswith("policy=sla; decode=d2; prefill=local; by=")
    assert "PrefixOverlap" in line.split("by=")[1].split(";")[0]
    assert f"cached={len(hashes)}" in line
    assert "filtered=Serving" in line
    assert "why=" in line
    assert "held=" not in line
    held = route_summary(route, trace, held_s=0.2346)
    assert "; held=235ms; by=" in held  # before the why, which a cut shortens first
    assert route_summary(Route(snap("a"), snap("p", "prefill")), policy="least_loaded") == (
        "policy=least_loaded; decode=a; prefill=p; by=LeastLoaded"
    )
    assert route_summary(NoRoute(("x",))).startswith("policy=sla; decode=none")
    weird = route_summary(Route(snap("w\r\nX-Evil: 1" + "é" * 1000)), policy="least_loaded")
    assert len(weird) == MAX_SUMMARY_CHARS and weird.endswith("...")
    assert weird.isascii() and "\r" not in weird and "\n" not in weird


def test_worker_states_are_built_again_only_when_what_they_come_from_changes() -> None:
    from controlplane.core.routing import DecodeProgress, RouteRequest
    from controlplane.gateway.sla_routing import worker_state

    router = sla_adapter()
    request = RouteRequest(model="m", prompt_tokens=20, max_tokens=4, block_size=16)
    workers = [snap("d1"), snap("d2")]
    _, first = router._prepare(request, workers)
    _, again = router._prepare(request, workers)
    assert all(a is b for a, b in zip(first, again, strict=True))  # the same snapshots
    busy = dataclasses.replace(workers[0], running=3, inflight_here=1)
    _, changed = router._prepare(request, [busy, workers[1]])
    assert changed[0] is not first[0] and changed[1] is first[1]
    assert changed[0] == worker_state(busy, model="m", timing=TINY)
    progress = (DecodeProgress(itl_target_ms=50.0, tokens=2, max_tokens=8),)
    router.decoding_for = lambda wid: progress if wid == "d2" else ()
    _, decoding = router._prepare(request, [busy, workers[1]])
    assert decoding[0] is changed[0] and decoding[1].decoding == progress
    _, other_model = router._prepare(dataclasses.replace(request, model="m2"), [busy])
    assert other_model[0].model == "m2"
    router.forget_worker("d2")  # it left: nothing of it is kept
    assert "d2" not in router._states


def test_context_window_and_long_context_threshold_follow_the_records() -> None:
    view = QuietView()
    small = dataclasses.replace(rec("d2"), max_context_tokens=1024)
    view.put(rec("d1"), dataclasses.replace(small, long_context_threshold_tokens=900))
    assert view.max_context_tokens("sim-model") == 1024
    assert view.long_context_threshold_tokens("sim-model") == 900
    view.put(rec("d1"))
    assert view.max_context_tokens("sim-model") == 2048
    assert view.long_context_threshold_tokens("sim-model") == 0
    assert view.max_context_tokens("unknown") == 0


# --- the view feeds the prefix index -------------------------------------------------------------


class Sink:
    def __init__(self) -> None:
        self.events: list[tuple[str, str, tuple[int, ...]]] = []
        self.forgotten: list[str] = []

    def apply_kv_events(self, worker_id: str, events: Any) -> None:
        self.events += [(worker_id, str(e.kind), e.block_hashes) for e in events]

    def forget_worker(self, worker_id: str) -> None:
        self.forgotten.append(worker_id)


class QuietView(WorkersView):
    """No etcd, no stats streams: records and reports are put in by the test."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(cast(Any, None), "/sb", WorkerChannels(), **kw)

    def _start_stats(self, rec: WorkerRecord) -> None:
        return None

    def put(self, *records: WorkerRecord, models: tuple[ModelInfo, ...] = ()) -> None:
        by_model: dict[str, list[WorkerRecord]] = {}
        for r in sorted(records, key=lambda r: r.worker_id):
            by_model.setdefault(r.model, []).append(r)
        self._by_model = by_model
        self._models = {m.model: m for m in models}


def rec(worker_id: str, role: str = "decode", model: str = "sim-model", **kw: Any) -> WorkerRecord:
    return WorkerRecord(
        worker_id, model, role, "sim", f"127.0.0.1:{worker_id}", max_context_tokens=2048,
        kv_blocks_total=64, **kw,
    )  # fmt: skip


def report(**kw: Any) -> worker_pb2.WorkerStats:
    return worker_pb2.WorkerStats(kv_blocks_total=64, **kw)


async def test_reports_feed_kv_events_and_leaving_workers_are_forgotten() -> None:
    sink = Sink()
    view = QuietView(kv_sink=sink)
    ev = worker_pb2.KvBlockEvent
    msg = report(
        running_requests=2,
        kv_events=[
            ev(kind=ev.KIND_STORED, block_hashes=[1, 2]),
            ev(kind=ev.KIND_EVICTED, block_hashes=[2]),
            ev(kind=ev.KIND_UNSPECIFIED, block_hashes=[3]),
        ],
    )
    assert [e.kind for e in kv_events(msg)] == [KvEventKind.STORED, KvEventKind.EVICTED]
    view.on_report("d1", msg)
    assert view.loads["d1"].running == 2
    assert sink.events == [("d1", "stored", (1, 2)), ("d1", "evicted", (2,))]
    view.on_report("d1", report())  # no events: nothing sent
    assert len(sink.events) == 2

    await view._replace({b"d1": rec("d1"), b"d2": rec("d2")})
    moved = WorkerRecord("d2", "sim-model", "decode", "sim", "127.0.0.1:9")
    await view._replace({b"d2": moved})  # d1 left; d2 restarted elsewhere
    assert sorted(sink.forgotten) == ["d1", "d2"]


# --- Gateway._route ------------------------------------------------------------------------------


def gateway(view: QuietView, **kw: Any) -> Gateway:
    sla = SlaGatewayRouter(
        SlaAwareRouter(), timing_for=ModelRoutingCache(view.model_info).timing_for,
        rng=random.Random(0),
    )  # fmt: skip
    view.kv_sink = sla
    return Gateway(
        view, LeastLoadedRouter(), CircuitBreakers(), GatewayMetrics(), sla_router=sla, **kw
    )


def test_sla_route_follows_kv_events_and_retries_exclude_the_failed_worker() -> None:
    view = QuietView()
    view.put(rec("d1"), rec("d2"), rec("p1", "prefill"), models=(SIM,))
    gw = gateway(view)
    prompt = tuple(range(200, 520))  # 20 blocks
    view.on_report(
        "d2",
        report(kv_events=[worker_pb2.KvBlockEvent(
            kind=worker_pb2.KvBlockEvent.KIND_STORED, block_hashes=hash_blocks(prompt, 16)
        )]),
    )  # fmt: skip
    progress = Progress(explain_route=True)
    route = gw._route("sim-model", prompt, 8, frozenset(), False, progress=progress)
    assert route.decode.worker_id == "d2" and route.prefill is None
    assert progress.route.startswith("policy=sla; decode=d2; prefill=local; by=")
    assert "PrefixOverlap" in progress.route

    # a retry after d2 failed: d2 excluded, aggregated
    progress = Progress(explain_route=True)
    route = gw._route("sim-model", prompt, 8, frozenset({"d2"}), True, progress=progress)
    assert route.decode.worker_id == "d1" and route.prefill is None
    assert "filtered=Excluded" in progress.route
    assert "aggregated route asked for" in progress.route

    # busy decode workers, the batch class (no ITL target): a long prompt goes to p1, a short
    # one stays local (its prefill costs less than the KV transfer)
    for w in ("d1", "d2"):
        view.loads[w] = LoadReport(running=1, kv_blocks_total=64)
    long_route = gw._route("sim-model", tuple(range(600, 920)), 4, frozenset(), False,
                           sla_class="batch")  # fmt: skip
    assert long_route.prefill is not None and long_route.prefill.worker_id == "p1"
    short_route = gw._route("sim-model", tuple(range(10)), 4, frozenset(), False,
                            sla_class="batch")  # fmt: skip
    assert short_route.prefill is None
    # interactive: tiny-test's prefill fits the 50 ms ITL slack: local
    assert gw._route("sim-model", tuple(range(600, 920)), 4, frozenset(), False,
                     sla_class="interactive").prefill is None  # fmt: skip


def test_models_without_timing_route_least_loaded_and_kv_filter_falls_back() -> None:
    view = QuietView()
    view.put(
        rec("c1", model="cpu-model"), rec("c2", model="cpu-model"), rec("d1"), models=(SIM, CPU)
    )
    view.loads["c1"] = LoadReport(running=3)
    gw = gateway(view)
    progress = Progress(explain_route=True)
    route = gw._route("cpu-model", tuple(range(40)), 8, frozenset(), False, progress=progress)
    assert route.decode.worker_id == "c2"
    assert progress.route == "policy=least_loaded; decode=c2; prefill=local; by=LeastLoaded"

    # prompt + max_tokens is more KV than tiny-test has: the SLA filter leaves nobody, least
    # loaded routes it anyway (the engine queues / preempts, as before the SLA router)
    route = gw._route("sim-model", tuple(range(40)), 2000, frozenset(), False, progress=progress)
    assert route.decode.worker_id == "d1"
    assert progress.route.startswith("policy=least_loaded; decode=d1; prefill=local;")
    assert "fallback=KvHeadroom" in progress.route
    metrics = gw.metrics.routes
    assert metrics.labels("sim-model", "least_loaded_fallback", "local")._value.get() == 1
    assert metrics.labels("cpu-model", "least_loaded", "local")._value.get() == 1

    view.loads["d1"] = LoadReport(draining=True)
    with pytest.raises(Unavailable, match="draining"):
        gw._route("sim-model", tuple(range(40)), 8, frozenset(), False)


def test_sla_class_defaults_to_standard() -> None:
    gw = gateway(QuietView())
    assert gw.sla_class("m", "").name == "standard"
    assert gw.sla_class("m", "nope").name == "standard"
    assert gw.sla_class("m", "batch").itl_p95_ms is None
    # a model whose deployment defines its own classes: its targets, else its first class
    own = {"rt": SlaClass("rt", priority=0, ttft_p95_ms=200.0, itl_p95_ms=20.0)}
    gw.sla_classes = lambda model: own if model == "custom" else {}
    assert gw.sla_class("custom", "rt").ttft_p95_ms == 200.0
    assert gw.sla_class("custom", "").name == "rt"
    with pytest.raises(InvalidArgument):
        model_routing(ModelInfo("m", "sim", engine_args={"profile": "nope"}))


def test_a_sim_deployments_speedup_scales_its_timing() -> None:
    """Its workers run ``speedup`` times faster (the reconciler starts them so): every
    predicted duration is divided by it; an unreadable speedup leaves the profile as it is."""
    base = model_routing(SIM).timing
    slow = model_routing(
        ModelInfo("m", "sim", engine_args={"profile": "tiny-test", "speedup": "0.5"})
    ).timing
    bad = model_routing(ModelInfo("m", "sim", engine_args={"profile": "tiny-test", "speedup": "x"}))
    assert base is not None and slow is not None and bad.timing is not None
    assert slow.prefill_ms(320, 0) == pytest.approx(2 * base.prefill_ms(320, 0))
    assert slow.prefill_compute_ms(320, 64) == pytest.approx(2 * base.prefill_compute_ms(320, 64))
    assert slow.decode_step_ms(4, 4000) == pytest.approx(2 * base.decode_step_ms(4, 4000))
    assert slow.kv_transfer_ms(1 << 20) == pytest.approx(2 * base.kv_transfer_ms(1 << 20))
    assert slow.kv_bytes_per_token == base.kv_bytes_per_token
    assert bad.timing.prefill_ms(320, 0) == pytest.approx(base.prefill_ms(320, 0))


def test_a_prefill_lent_to_the_long_context_pool_is_counted() -> None:
    """lc's own queue (200 prompts reported) puts a long prompt past the standard class's
    TTFT target there: an idle base prefill worker is lent, and the lend is counted."""
    view = QuietView()
    view.put(
        rec("d1", pool="decode"),
        rec("p1", "prefill", pool="prefill"),
        rec("p2", "prefill", pool="prefill"),
        rec("lc", pool="long_context", long_context_threshold_tokens=600),
        models=(SIM,),
    )
    view.loads["lc"] = LoadReport(waiting=200, queued_prefill_tokens=200_000)
    cache = ModelRoutingCache(view.model_info, threshold_lookup=view.long_context_threshold_tokens)
    sla = SlaGatewayRouter(
        SlaAwareRouter(), timing_for=cache.timing_for, facts_for=cache.facts_for,
        rng=random.Random(0),
    )  # fmt: skip
    gw = Gateway(view, LeastLoadedRouter(), CircuitBreakers(), GatewayMetrics(), sla_router=sla)
    gw.model_routing = cache
    lent = gw.metrics.long_context_lent.labels("sim-model")
    route = gw._route("sim-model", tuple(range(1, 801)), 8, frozenset(), False)
    assert route.decode.worker_id == "lc"
    assert route.prefill is not None and route.prefill.worker_id in ("p1", "p2")
    assert lent._value.get() == 1
    # a short prompt's remote prefill is not a lend; nor is a long one the pool keeps
    gw._route("sim-model", tuple(range(1, 21)), 8, frozenset(), False)
    view.loads["lc"] = LoadReport()
    kept = gw._route("sim-model", tuple(range(1, 801)), 8, frozenset(), False)
    assert (kept.decode.worker_id, kept.prefill) == ("lc", None)
    assert lent._value.get() == 1
