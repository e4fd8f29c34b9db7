"""The gateway side of pools, live stats, routing profiles, tenant fair share and decision
traces: worker records and settings carry the pool, load reports carry batch context and
queued prefill tokens (sim engine), the view and the SLA adapter pass them to the core, the
YAML profiles file, the tenant ledger, the decision log (``switchboard explain request``)."""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path
from typing import Any

import pytest

from controlplane.adapters.etcd.workers import decode_worker, encode_worker
from controlplane.config import EtcdSettings
from controlplane.core.deployments import PoolRole
from controlplane.core.model import WorkerRecord
from controlplane.core.reconcile import ReplicaPlacement
from controlplane.core.routing import DEFAULT_TABLE, DeploymentFacts, SlaAwareRouter
from controlplane.core.routing.profiles import DEFAULT_PROFILE, MOE_PROFILE, StageSpec
from controlplane.deployspec import spec_from_dict
from controlplane.errors import InvalidArgument
from controlplane.gateway.decisions import DecisionLog, normalize_request_id
from controlplane.gateway.model_routing import ModelRoutingCache, model_routing
from controlplane.gateway.pipeline import Progress
from controlplane.gateway.routing import WorkerSnapshot
from controlplane.gateway.routing_profiles import load_profiles, profiles_from_dict
from controlplane.gateway.sla_routing import SlaGatewayRouter, TenantLedger, worker_state
from controlplane.gateway.workers_view import ModelInfo
from controlplane.reconciler import ReconcilerSettings, worker_settings
from tests.unit.test_gateway_sla_wiring import SIM, QuietView, gateway, rec, report
from workers.engines.sim_core import SimConfig, SimRequest, SimScheduler
from workers.main import (
    WorkerSettings,
    check_pool,
    chunked_prefill,
    worker_settings_from_dict,
    worker_settings_to_dict,
)
from workers.profiles import load_profile

ROOT = Path(__file__).resolve().parents[2]
TINY = load_profile("tiny-test")

# --- worker records and settings -----------------------------------------------------------------


def test_worker_records_carry_the_pool_and_old_records_still_decode() -> None:
    r = WorkerRecord(
        "w1", "m", "both", "sim", "127.0.0.1:1", deployment="chat", pool="long_context",
        long_context_threshold_tokens=32_768, chunked_prefill=True,
    )  # fmt: skip
    assert decode_worker(encode_worker(r)) == r
    old = json.loads(encode_worker(r))
    for key in ("deployment", "pool", "long_context_threshold_tokens", "chunked_prefill"):
        del old[key]
    back = decode_worker(json.dumps(old).encode())
    assert (back.pool, back.long_context_threshold_tokens, back.chunked_prefill) == ("", 0, False)


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"pool": "huge"}, "--pool 'huge' is not one of prefill, decode, aggregated, long_context"),
        ({"pool": "long_context"}, "needs --long-context-threshold > 0"),
        ({"long_context_threshold_tokens": -1}, "must be >= 0"),
    ],
)
def test_worker_pool_settings_are_checked(kw: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        check_pool(WorkerSettings(**kw))
    check_pool(WorkerSettings(pool="long_context", long_context_threshold_tokens=8192))


@pytest.mark.parametrize(
    ("engine", "args", "chunked"),
    [
        ("sim", "", True),
        ("cpu", "", False),
        ("vllm", "", True),
        ("vllm", '{"enable_chunked_prefill": false}', False),
        ("trtllm", "", False),
        ("trtllm", '{"enable_chunked_prefill": true}', True),
    ],
)
def test_chunked_prefill_per_engine(engine: str, args: str, chunked: bool) -> None:
    assert chunked_prefill(WorkerSettings(engine=engine, engine_args=args)) is chunked


def test_placed_workers_get_their_deployment_pool_and_threshold() -> None:
    spec = spec_from_dict(
        {
            "name": "chat", "model": "m", "engine": "sim",
            "pools": [
                {"role": "aggregated", "replicas": 1},
                {"role": "long_context", "replicas": 1, "context_threshold_tokens": 16_384},
            ],
        }
    )  # fmt: skip
    placement = ReplicaPlacement("chat-lc-0", "chat", PoolRole.LONG_CONTEXT, 0, "t", "n1")
    fields = worker_settings(spec, placement, None, EtcdSettings(), ReconcilerSettings())
    settings = worker_settings_from_dict(json.loads(json.dumps(fields)))
    assert (settings.deployment, settings.pool, settings.long_context_threshold_tokens) == (
        "chat", "long_context", 16_384,
    )  # fmt: skip
    assert worker_settings_from_dict(worker_settings_to_dict(settings)) == settings


# --- live stats ----------------------------------------------------------------------------------


def test_sim_stats_report_queued_prefill_and_batch_context() -> None:
    sched = SimScheduler(TINY, SimConfig(max_num_batched_tokens=64))
    sched.add_request(SimRequest("a", tuple(range(1, 201)), 4), 0.0)
    sched.add_request(SimRequest("b", tuple(range(1, 41)), 4), 0.0)
    s = sched.stats(0.0)
    assert (s.queued_prefill_tokens, s.batch_context_tokens) == (240, 0)
    sched.step(0.0)  # a 64-token chunk of "a"
    s = sched.stats(0.0)
    assert s.queued_prefill_tokens == 240 - 64
    assert s.batch_context_tokens == 64
    now = 0.0
    for _ in range(50):
        if not sched.has_work():
            break
        now += sched.step(now).duration_s
    assert sched.stats(now).queued_prefill_tokens == 0


def test_reports_and_records_reach_the_core() -> None:
    view = QuietView()
    view.put(
        rec("d1", pool="decode", chunked_prefill=True),
        rec("lc", "both", pool="long_context", long_context_threshold_tokens=900),
        models=(SIM,),
    )
    view.on_report(
        "d1",
        report(running_requests=3, batch_context_tokens=1200, queued_prefill_tokens=500,
               dp_rank_running=[2, 1]),
    )  # fmt: skip
    view.on_report("lc", report(running_requests=1))
    snaps = {s.worker_id: s for s in view.snapshots("sim-model", lambda _w: True)}
    d1, lc = snaps["d1"], snaps["lc"]
    assert (d1.pool, d1.chunked_prefill, d1.batch_size, d1.batch_context_tokens) == (
        "decode", True, 3, 1200,
    )  # fmt: skip
    assert (d1.queued_prefill_tokens, d1.dp_rank_running) == (500, (2, 1))
    assert (lc.pool, lc.queued_prefill_tokens) == ("long_context", None)  # not reported: unknown
    assert view.long_context_threshold_tokens("sim-model") == 900
    state = worker_state(d1, model="sim-model", timing=TINY)
    assert (state.pool, state.context_tokens, state.queued_prefill_tokens) == ("decode", 1200, 500)
    assert state.chunked_prefill and state.dp_rank_running == (2, 1)


def test_model_routing_facts_from_the_deployment() -> None:
    moe = ModelInfo(
        "mix", "sim", engine_args={"profile": "mixtral-8x7b-tp2-h100"}, deployment="mix",
        dp_size=2, expert_parallel=True, long_context_threshold_tokens=20_000,
    )  # fmt: skip
    facts = model_routing(moe).deployment
    assert (facts.name, facts.dp_size, facts.long_context_threshold_tokens) == ("mix", 2, 20_000)
    assert facts.moe and facts.efficient_batch_size > 8
    assert model_routing(SIM).deployment.efficient_batch_size == 0  # dense: no packing
    cache = ModelRoutingCache({"sim-model": SIM}.get, threshold_lookup=lambda _m: 700)
    assert cache.facts_for("sim-model").long_context_threshold_tokens == 700
    cache = ModelRoutingCache({"mix": moe}.get, threshold_lookup=lambda _m: 700)
    assert cache.facts_for("mix").long_context_threshold_tokens == 20_000  # the deployment's wins


def test_the_gateway_adapter_fills_facts_routes_long_prompts_to_the_pool_and_charges_tenants() -> (
    None
):
    view = QuietView()
    view.put(
        rec("d1", pool="decode"),
        rec("p1", "prefill", pool="prefill"),
        rec("lc", "both", pool="long_context", long_context_threshold_tokens=600),
        models=(SIM,),
    )
    cache = ModelRoutingCache(view.model_info, threshold_lookup=view.long_context_threshold_tokens)
    ledger = TenantLedger(clock=lambda: 0.0)
    sla = SlaGatewayRouter(
        SlaAwareRouter(), timing_for=cache.timing_for, facts_for=cache.facts_for,
        ledger=ledger, rng=random.Random(0),
    )  # fmt: skip
    view.kv_sink = sla
    gw = gateway(view)
    gw.sla_router = sla
    gw.model_routing = cache
    long_route = gw._route("sim-model", tuple(range(1, 801)), 8, frozenset(), False,
                           tenant="acme", request_id="r-long")  # fmt: skip
    short_route = gw._route("sim-model", tuple(range(1, 21)), 8, frozenset(), False,
                            tenant="acme", request_id="r-short")  # fmt: skip
    assert (long_route.decode.worker_id, short_route.decode.worker_id) == ("lc", "d1")
    shares = ledger.shares()
    assert shares is not None and dict(shares.by_worker) == {
        "lc": {"acme": 808.0}, "d1": {"acme": 28.0},
    }  # fmt: skip
    entry = gw.decisions.get("cmpl-r-long")
    assert entry is not None and entry.tenant == "acme"
    body = entry.to_json()
    assert body["routes"][0]["decode"] == "lc"
    assert "LongContext" in body["routes"][0]["plugins"]
    assert "long-context pool prefills its own prompts" in body["explanation"]
    assert gw.decisions.get("nope") is None


# --- routing profiles file -----------------------------------------------------------------------


def test_the_documented_default_is_the_built_in_table() -> None:
    assert load_profiles(ROOT / "docs" / "routing-profiles.yaml") == DEFAULT_TABLE
    assert profiles_from_dict(None) == DEFAULT_TABLE
    assert profiles_from_dict({}) == DEFAULT_TABLE


def test_a_profiles_file_per_deployment_and_class(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(
        "default:\n"
        "  classes:\n"
        "    batch: {decode: {scorers: {KvHeadroom: 2, LoadBalance: 1}}}\n"
        "deployments:\n"
        "  chat:\n"
        "    prefill: {scorers: {TtftHeadroom: 1}}\n"
        "    classes:\n"
        "      interactive: {decode: {scorers: {ItlHeadroom: 5, TtftHeadroom: 1}}}\n"
    )
    table = load_profiles(path)
    chat = DeploymentFacts(name="chat")
    label, spec = table.spec(chat, "m", "interactive")
    assert label == "chat/interactive"
    assert spec.decode == StageSpec((("ItlHeadroom", 5.0), ("TtftHeadroom", 1.0)))
    assert spec.prefill == DEFAULT_PROFILE.prefill  # left out: the default's
    label, spec = table.spec(chat, "m", "standard")
    assert (label, spec.prefill, spec.decode) == (
        "chat", StageSpec((("TtftHeadroom", 1.0),)), DEFAULT_PROFILE.decode,
    )  # fmt: skip
    assert table.spec(DeploymentFacts(name="x"), "m", "batch")[1].decode == StageSpec(
        (("KvHeadroom", 2.0), ("LoadBalance", 1.0))
    )
    assert table.spec(DeploymentFacts(name="x", dp_size=4), "m", "standard")[1] == MOE_PROFILE


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("deployments: {chat: {decode: {scorers: {Foo: 1}}}}",
         "deployments.chat.decode: unknown scorer 'Foo'"),
        ("default: {decode: {scorers: {LoadBalance: -2}}}", "default.decode: scorer LoadBalance"),
        ("default: {decode: {scorer: {LoadBalance: 1}}}", "default.decode.scorers: Field required"),
        ("default: {decode: {scorers: {LoadBalance: 1}}, x: 1}", "default.x: Extra inputs"),
        ("moe: {prefill: {scorers: {LoadBalance: 1}, picker: Coin}}",
         "moe.prefill: unknown picker 'Coin'"),
        ("deployments: [1, 2]", "deployments: Input should be a valid dictionary"),
        ("default: {decode: [", "not valid YAML"),
    ],
)  # fmt: skip
def test_bad_profile_files_say_where(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(text)
    with pytest.raises(InvalidArgument, match=message.replace("(", r"\(")) as e:
        load_profiles(path)
    assert str(path) in str(e.value)
    with pytest.raises(InvalidArgument, match="cannot read routing profiles"):
        load_profiles(tmp_path / "missing.yaml")


# --- tenant ledger -------------------------------------------------------------------------------


def test_tenant_ledger_decays_and_forgets() -> None:
    now = [0.0]
    ledger = TenantLedger(half_life_s=10.0, clock=lambda: now[0])
    assert ledger.shares() is None
    ledger.add("w1", "a", 800)
    ledger.add("w2", "b", 100)
    ledger.add("w2", "", 100)  # no tenant: not counted
    shares = ledger.shares()
    assert shares is not None and shares.over_fair_share() == {"a"}
    now[0] = 10.0  # one half-life
    shares = ledger.shares()
    assert shares is not None
    assert dict(shares.by_tenant) == pytest.approx({"a": 400.0, "b": 50.0})
    ledger.forget_worker("w1")
    assert "w1" not in ledger.shares().by_worker  # type: ignore[union-attr]
    now[0] = 200.0  # everything decays away
    assert ledger.shares() is None


# --- decision log --------------------------------------------------------------------------------


def test_decision_log_is_a_bounded_ring_by_request_id() -> None:
    log = DecisionLog(capacity=3, max_routes_per_request=2)
    for i in range(5):
        log.record(f"r{i}", tenant="t", model="m", sla_class="standard", policy="least_loaded",
                   decode="d1", prefill="", trace=None, at=float(i))  # fmt: skip
    assert len(log) == 3 and log.get("r0") is None and log.get("r4") is not None
    for _ in range(3):  # retries and migrations: at most 2 kept
        log.record("r4", tenant="t", model="m", sla_class="", policy="sla", decode="d2",
                   prefill="p1", trace=None, at=9.0)  # fmt: skip
    entry = log.get("chatcmpl-r4")
    assert entry is not None and [r.decode for r in entry.routes] == ["d1", "d2"]
    text = entry.explain()
    assert "re-route 1: policy sla, decode d2, prefill p1" in text
    assert "least loaded" in text
    log.record("", tenant="t", model="m", sla_class="", policy="sla", decode="d", prefill="",
               trace=None, at=0.0)  # fmt: skip
    assert len(log) == 3
    assert normalize_request_id("cmpl-abc") == "abc" and normalize_request_id("abc") == "abc"


def test_progress_is_untouched_by_decision_recording() -> None:
    view = QuietView()
    view.put(rec("d1"), models=(SIM,))
    gw = gateway(view)
    progress = Progress()
    gw._route("sim-model", tuple(range(1, 30)), 4, frozenset(), False, progress=progress,
              request_id="x1", sla_class="interactive")  # fmt: skip
    entry = gw.decisions.get("x1")
    assert entry is not None and entry.sla_class == "interactive"
    assert entry.routes[0].trace is not None and progress.route == ""
    snap = WorkerSnapshot("w", "e", "decode", running=2)
    assert worker_state(snap, model="m", timing=TINY).batch_size == 2
    assert dataclasses.replace(snap, batch_size=5).batch_size == 5
