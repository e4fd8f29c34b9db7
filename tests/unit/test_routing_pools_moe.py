"""The router's long-context, tenant fair-share and MoE plugins and the profile table, table-
driven on hand-built workers (real 8B H100 / Mixtral timing)."""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Sequence
from typing import Any

import pytest

from controlplane.core.routing import SlaAwareRouter
from controlplane.core.routing.framework import (
    Candidate,
    Decision,
    DeploymentFacts,
    RouteContext,
    RouteRequest,
    Stage,
    TenantShares,
    WorkerState,
)
from controlplane.core.routing.plugins import (
    BatchPackingScorer,
    ChunkedPrefillFilter,
    DpRankBalanceScorer,
    LongContextFilter,
    TenantFairShareScorer,
    rank_batches,
)
from controlplane.core.routing.predict import efficient_batch_size
from controlplane.core.routing.profiles import (
    DEFAULT_PROFILE,
    DEFAULT_TABLE,
    MOE_PROFILE,
    DeploymentProfiles,
    ProfileSpec,
    ProfileTable,
    StageSpec,
)
from controlplane.core.routing.router import candidate
from controlplane.errors import InvalidArgument
from tests.unit.routing_builders import SLA, request, worker
from workers.profiles import load_profile

DEC = RouteContext(Stage.DECODE)
LC = DeploymentFacts(name="llama", long_context_threshold_tokens=32_768)
MIXTRAL = load_profile("mixtral-8x7b-tp2-h100")


def with_facts(req: RouteRequest, facts: DeploymentFacts, tenant: str = "") -> RouteRequest:
    return RouteRequest(
        model=req.model,
        prompt_tokens=req.prompt_tokens,
        max_tokens=req.max_tokens,
        block_hashes=req.block_hashes,
        block_size=req.block_size,
        ttft_target_ms=req.ttft_target_ms,
        itl_target_ms=req.itl_target_ms,
        sla_class=req.sla_class,
        tenant=tenant,
        deployment=facts,
    )


def kept(
    f: LongContextFilter | ChunkedPrefillFilter, req: RouteRequest, ws: list[WorkerState]
) -> list[str]:
    return [w.worker_id for w in f.filter(req, ws, DEC)]


def cands(req: RouteRequest, ws: Sequence[WorkerState]) -> list[Candidate]:
    return [candidate(req, w, 0, Stage.DECODE) for w in ws]


# --- long context ------------------------------------------------------------------------------

BASE = worker("d", pool="decode")
BASE_CHUNKED = worker("dc", pool="decode", chunked_prefill=True)
POOL = worker("lc", "both", pool="long_context")


@pytest.mark.parametrize(
    ("prompt", "workers", "lc_kept", "chunked_kept"),
    [
        # long prompt, a pool worker: the pool only
        (40_000, [BASE, BASE_CHUNKED, POOL], ["lc"], ["lc"]),
        # long prompt, no pool: workers with chunked prefill
        (40_000, [BASE, BASE_CHUNKED], ["d", "dc"], ["dc"]),
        # long prompt, no pool, nobody chunks: everyone (KV room decides)
        (40_000, [BASE], ["d"], ["d"]),
        # short prompt: off the pool while others can take it
        (2_000, [BASE, POOL], ["d"], ["d"]),
        (2_000, [POOL], ["lc"], ["lc"]),
        # exactly the threshold counts as long
        (32_768, [BASE, POOL], ["lc"], ["lc"]),
    ],
)  # fmt: skip
def test_long_context_and_chunked_prefill_filters(
    prompt: int, workers: list[WorkerState], lc_kept: list[str], chunked_kept: list[str]
) -> None:
    req = with_facts(request(prompt), LC)
    after_lc = LongContextFilter().filter(req, workers, DEC)
    assert [w.worker_id for w in after_lc] == lc_kept
    assert kept(ChunkedPrefillFilter(), req, list(after_lc)) == chunked_kept


def test_long_context_reasons_and_no_threshold() -> None:
    req = with_facts(request(40_000), LC)
    assert LongContextFilter().reason(req, BASE, DEC) == (
        "prompt 40000 tokens >= long-context threshold 32768: long_context pool only"
    )
    assert ChunkedPrefillFilter().reason(req, BASE, DEC) == (
        "prompt 40000 tokens >= long-context threshold 32768 and no long_context pool: "
        "needs chunked prefill"
    )
    short = with_facts(request(100), LC)
    assert LongContextFilter().reason(short, POOL, DEC) == (
        "long_context pool is kept for prompts of 32768+ tokens"
    )
    plain = request(40_000)  # no deployment threshold: nothing filtered
    assert kept(LongContextFilter(), plain, [BASE, POOL]) == ["d", "lc"]
    assert kept(ChunkedPrefillFilter(), plain, [BASE, BASE_CHUNKED]) == ["d", "dc"]


def decided(
    req: RouteRequest,
    ws: list[WorkerState],
    seed: int = 0,
    *,
    router: SlaAwareRouter | None = None,
    tenants: TenantShares | None = None,
) -> Decision:
    d = (router or SlaAwareRouter()).decide(req, ws, random.Random(seed), tenants=tenants)
    assert isinstance(d, Decision), d
    return d


def route(req: RouteRequest, ws: list[WorkerState], seed: int = 0) -> tuple[str | None, str]:
    d = decided(req, ws, seed)
    return (d.prefill.worker_id if d.prefill is not None else None), d.decode.worker_id


def test_a_long_prompt_goes_to_the_pool_and_prefills_there() -> None:
    ws = [
        worker("d1", running=2, batch_size=2, context_tokens=2000, pool="decode"),
        worker("p1", "prefill", pool="prefill"),
        worker("lc1", "both", pool="long_context", running=1, batch_size=1,
               context_tokens=60_000, kv_blocks_total=40_000),
    ]  # fmt: skip
    long_req = with_facts(request(50_000, sla=SLA["standard"]), LC)
    d = decided(long_req, ws)
    assert (d.prefill, d.decode.worker_id) == (None, "lc1")
    assert d.trace.disaggregation is not None
    assert d.trace.disaggregation.reason == (
        "the long-context pool prefills its own prompts: no base-pool prefill worker to lend"
    )
    assert {r.worker_id: r.plugin for r in d.trace.decode.rejections} == {
        "d1": "LongContext", "p1": "Role",
    }  # fmt: skip
    # a short interactive request stays off the pool, though lc1's batch is smaller
    assert route(with_facts(request(200), LC), ws)[1] == "d1"


LC_BUSY: dict[str, Any] = {
    "waiting": 1,
    "queued_prefill_tokens": 60_000,
}  # prefilling a long prompt itself
LONG_QUEUED: dict[str, Any] = {"pending_prefill_tokens": 40_000, "pending_prefill_prompts": 1}


@pytest.mark.parametrize(
    ("lc", "prefills", "expected", "rejected"),
    [
        # the pool's worker is busy with another long prompt, two idle base prefill workers:
        # one is lent (the rng breaks the tie between equals), the other stays for the base pool
        (LC_BUSY, {"p1": {}, "p2": {}}, {"p1", "p2"}, {}),
        # one of them busy with short prompts: the idle one is lent
        (LC_BUSY, {"p1": {"pending_prefill_tokens": 2_000}, "p2": {}}, {"p2"},
         {"p1": "busy (2000 prompt tokens queued, 0 waiting)"}),
        (LC_BUSY, {"p1": {"waiting": 2}, "p2": {}}, {"p2"},
         {"p1": "busy (0 prompt tokens queued, 2 waiting)"}),
        # one already holds a long prompt: half the pool of two does, the other is not lent
        (LC_BUSY, {"p1": LONG_QUEUED, "p2": {}}, {None},
         {"p1": "busy (40000 prompt tokens queued, 0 waiting)",
          "p2": "1 of the base pool's 2 prefill workers hold long prompts (at most 1 may)"}),
        # a base pool of one prefill worker never lends it
        (LC_BUSY, {"p1": {}}, {None}, {"p1": "the base pool's only prefill worker"}),
        # a pool of four may lend two: one holding a long prompt, the idle ones may go...
        (LC_BUSY, {"p1": LONG_QUEUED, "p2": {}, "p3": {}, "p4": {}}, {"p2", "p3", "p4"},
         {"p1": "busy (40000 prompt tokens queued, 0 waiting)"}),
        # ...two holding (one by another gateway's prompt, seen in its report): none may
        (LC_BUSY, {"p1": LONG_QUEUED, "p2": {"queued_prefill_tokens": 35_000}, "p3": {},
                   "p4": {}}, {None},
         {"p1": "busy (40000 prompt tokens queued, 0 waiting)",
          "p2": "busy (35000 prompt tokens queued, 0 waiting)",
          "p3": "2 of the base pool's 4 prefill workers hold long prompts (at most 2 may)",
          "p4": "2 of the base pool's 4 prefill workers hold long prompts (at most 2 may)"}),
        # both busy: nobody to lend
        (LC_BUSY, {"p1": {"waiting": 1}, "p2": {"queued_prefill_tokens": 900}}, {None},
         {"p1": "busy (0 prompt tokens queued, 1 waiting)",
          "p2": "busy (900 prompt tokens queued, 0 waiting)"}),
        # a draining one is not part of the pool it could lend from: one is left
        (LC_BUSY, {"p1": {"serving": False}, "p2": {}}, {None},
         {"p2": "the base pool's only prefill worker"}),
        # the pool's worker is idle: its own prefill is sooner than any hand-off (rule (g))
        ({}, {"p1": {}, "p2": {}}, {None}, {}),
    ],
)  # fmt: skip
def test_a_pool_without_prefill_workers_borrows_an_idle_base_prefill_worker(
    lc: dict[str, Any],
    prefills: dict[str, dict[str, Any]],
    expected: set[str | None],
    rejected: dict[str, str],
) -> None:
    ws = [
        worker("d1", pool="decode"),
        worker("lc1", pool="long_context", kv_blocks_total=40_000, **lc),
        *(worker(p, "prefill", pool="prefill", **kw) for p, kw in prefills.items()),
    ]
    long_req = with_facts(request(40_000, sla=SLA["standard"]), LC)
    for seed in range(4):
        d = decided(long_req, ws, seed)
        assert d.decode.worker_id == "lc1"
        assert (d.prefill.worker_id if d.prefill else None) in expected
    verdict = d.trace.disaggregation
    assert verdict is not None
    if d.prefill is not None:
        assert verdict.remote and verdict.local_ttft_miss, verdict.reason
        assert d.trace.prefill is not None
        assert {r.worker_id: r.reason for r in d.trace.prefill.rejections if
                r.plugin == "LongContext"} == {p: f"{why}: not lent to the long_context pool"
                                               for p, why in rejected.items()}  # fmt: skip
    elif rejected:  # nobody to lend: the pool prefills itself, before any prefill stage
        assert verdict.reason.endswith(": no base-pool prefill worker to lend")
        assert d.trace.prefill is None
    else:
        assert "is no sooner" in verdict.reason, verdict.reason


def test_a_lent_prefill_worker_holds_the_long_prompt_so_the_next_one_stays_in_the_pool() -> None:
    """After the router lends p1, its pending long prompt makes p2 the base pool's last free
    prefill worker: a second long prompt waits for the pool; a short one still gets p2."""
    ws = [
        worker("d1", pool="decode", batch_size=8, running=8, context_tokens=16_000),
        worker("lc1", pool="long_context", kv_blocks_total=40_000, **LC_BUSY),
        worker("p1", "prefill", pool="prefill"),
        worker("p2", "prefill", pool="prefill"),
    ]
    first = decided(with_facts(request(40_000, sla=SLA["standard"]), LC), ws)
    assert first.prefill is not None
    lent = first.prefill.worker_id
    ws = [
        dataclasses.replace(w, pending_prefill_tokens=40_000, pending_prefill_prompts=1)
        if w.worker_id == lent
        else w
        for w in ws
    ]
    second = decided(with_facts(request(50_000, sla=SLA["standard"]), LC), ws)
    assert (second.prefill, second.decode.worker_id) == (None, "lc1")
    short = decided(with_facts(request(3_000), LC), ws)
    assert short.decode.worker_id == "d1"
    assert short.prefill is not None and short.prefill.worker_id != lent


def test_interactive_requests_avoid_a_worker_busy_with_a_long_prefill() -> None:
    """No long-context pool: the long prompt's queued prefill tokens (live stats) make that
    worker's predicted TTFT far worse, so a short interactive request goes elsewhere."""
    ws = [
        worker("a", chunked_prefill=True, running=1, batch_size=1, context_tokens=500,
               waiting=1, queued_prefill_tokens=100_000),
        worker("b", chunked_prefill=True, running=3, batch_size=3, context_tokens=3000),
    ]  # fmt: skip
    req = with_facts(request(300), LC)
    assert route(req, ws)[1] == "b"
    d = decided(req, ws)
    ttft = {c.worker_id: c.ttft_ms for c in d.trace.decode.candidates}
    assert ttft["a"] > 10 * ttft["b"]


# --- tenant fair share ---------------------------------------------------------------------------

SHARES = TenantShares(
    by_tenant={"hog": 9000.0, "small": 500.0, "mid": 500.0},
    by_worker={
        "w1": {"hog": 8000.0, "small": 500.0},
        "w2": {"hog": 1000.0, "mid": 500.0},
    },
)


@pytest.mark.parametrize(
    ("tenant", "shares", "expected"),
    [
        ("hog", SHARES, [8000 / 8500, 1000 / 1500, 0.0]),  # stays where it already is
        ("small", SHARES, [1 - 8000 / 8500, 1 - 1000 / 1500, 1.0]),  # away from the hog
        ("new", SHARES, [1 - 8000 / 8500, 1 - 1000 / 1500, 1.0]),
        ("", SHARES, [1.0, 1.0, 1.0]),  # no tenant: abstains
        ("small", None, [1.0, 1.0, 1.0]),  # no data: abstains
        ("a", TenantShares({"a": 5.0}, {"w1": {"a": 5.0}}), [1.0, 1.0, 1.0]),  # one tenant
    ],
)  # fmt: skip
def test_tenant_fair_share(tenant: str, shares: TenantShares | None, expected: list[float]) -> None:
    ws = [worker("w1"), worker("w2"), worker("w3")]
    req = with_facts(request(100), DeploymentFacts(), tenant=tenant)
    ctx = RouteContext(Stage.DECODE, tenants=shares)
    got = TenantFairShareScorer().score(req, cands(req, ws), ctx)
    assert list(got) == pytest.approx(expected)
    assert SHARES.over_fair_share() == {"hog"}


def test_the_router_passes_tenant_shares_to_the_scorer() -> None:
    ws = [worker("w1"), worker("w2")]  # identical but for the tenants on them
    req = with_facts(request(100), DeploymentFacts(), tenant="small")
    d = decided(req, ws, tenants=SHARES)
    assert d.decode.worker_id == "w2"
    assert d.trace.decode.deciders() == ("TenantFairShare",)
    hog = with_facts(request(100), DeploymentFacts(), tenant="hog")
    assert decided(hog, ws, tenants=SHARES).decode.worker_id == "w1"


# --- MoE -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kw", "dp", "ranks"),
    [
        ({"batch_size": 5}, 1, (5,)),
        ({"batch_size": 5, "waiting": 1, "inflight_here": 1}, 1, (7,)),
        ({"batch_size": 5}, 4, (1, 1, 1, 2)),  # spread when the engine says nothing per rank
        ({"batch_size": 6, "dp_rank_running": (4, 0, 1, 1)}, 4, (0, 1, 1, 4)),
        ({"batch_size": 6, "dp_rank_running": (4, 0, 1, 1), "inflight_here": 2}, 4,
         (1, 1, 2, 4)),  # what is on its way lands on the emptiest ranks
        ({"batch_size": 6, "dp_rank_running": (4, 2)}, 4, (1, 1, 2, 2)),  # wrong length: spread
    ],
)  # fmt: skip
def test_rank_batches(kw: dict[str, Any], dp: int, ranks: tuple[int, ...]) -> None:
    w = worker("w", **kw)
    assert rank_batches(w, dp) == ranks


MOE = DeploymentFacts(name="mix", dp_size=4, expert_parallel=True, efficient_batch_size=32)


def test_dp_rank_balance_prefers_the_emptiest_rank_and_even_ranks() -> None:
    ws = [
        worker("even", batch_size=8, dp_rank_running=(2, 2, 2, 2)),
        worker("skewed", batch_size=8, dp_rank_running=(5, 1, 1, 1)),
        worker("one-empty", batch_size=9, dp_rank_running=(3, 3, 3, 0)),
    ]
    req = with_facts(request(100), MOE)
    s = dict(
        zip(
            ("even", "skewed", "one-empty"),
            DpRankBalanceScorer().score(req, cands(req, ws), DEC),
            strict=True,
        )
    )
    assert s["one-empty"] > s["even"] > 0
    assert s["skewed"] < s["even"]
    assert all(0 <= v <= 1 for v in s.values())


@pytest.mark.parametrize(
    ("batch", "sla", "expected"),
    [
        (0, "batch", 1 / 32),
        (15, "batch", 16 / 32),
        (31, "batch", 1.0),
        (63, "batch", 32 / 64),  # past the efficient size: spread again
        (31, "interactive", 1.0),
    ],
)
def test_batch_packing_toward_the_efficient_batch(batch: int, sla: str, expected: float) -> None:
    facts = DeploymentFacts(name="mix", expert_parallel=True, efficient_batch_size=32)
    req = with_facts(request(100, sla=SLA[sla]), facts)
    w = worker("w", batch_size=batch, context_tokens=batch * 500, timing=MIXTRAL)
    assert list(BatchPackingScorer().score(req, cands(req, [w]), DEC)) == pytest.approx([expected])


def test_batch_packing_scores_zero_past_the_itl_target_and_abstains_without_a_size() -> None:
    facts = DeploymentFacts(name="mix", expert_parallel=True, efficient_batch_size=400)
    req = with_facts(request(100, sla=SLA["interactive"]), facts)
    full = worker("w", batch_size=300, context_tokens=300 * 4000, timing=MIXTRAL)
    assert candidate(req, full, 0, Stage.DECODE).itl_ms > (req.itl_target_ms or 0)
    assert list(BatchPackingScorer().score(req, cands(req, [full]), DEC)) == [0.0]
    none = with_facts(request(100), DeploymentFacts())
    assert list(BatchPackingScorer().score(none, cands(none, [full]), DEC)) == [1.0]


def test_moe_router_packs_while_the_itl_target_holds() -> None:
    facts = DeploymentFacts(name="mix", expert_parallel=True, efficient_batch_size=64)
    ws = [
        worker("fuller", batch_size=24, running=24, context_tokens=24 * 800, timing=MIXTRAL),
        worker("emptier", batch_size=2, running=2, context_tokens=2 * 800, timing=MIXTRAL),
    ]
    req = with_facts(request(200, sla=SLA["standard"]), facts)
    assert route(req, ws)[1] == "fuller"  # the MoE default profile packs
    plain = with_facts(request(200, sla=SLA["standard"]), DeploymentFacts(name="mix"))
    assert route(plain, ws)[1] == "emptier"  # a dense deployment's profile spreads
    # the fuller worker past the interactive ITL target: packing stops there
    busy = worker("fuller", batch_size=400, running=400, context_tokens=400 * 4000, timing=MIXTRAL)
    req_i = with_facts(request(200, sla=SLA["interactive"]), facts)
    assert route(req_i, [busy, ws[1]])[1] == "emptier"


def test_efficient_batch_size_is_where_the_per_token_cost_levels_off() -> None:
    b = efficient_batch_size(MIXTRAL)

    def per_token(n: int) -> float:
        return MIXTRAL.decode_step_ms(n, n * 1024) / n

    best = min(per_token(n) for n in range(1, 513))
    assert per_token(b) <= best * 1.05 < per_token(b - 1)
    assert per_token(1) > 5 * per_token(b)  # batching an MoE pays a lot
    assert efficient_batch_size(MIXTRAL, max_batch=8) == 8


# --- profile table -------------------------------------------------------------------------------

TTFT_ONLY = ProfileSpec(StageSpec((("TtftHeadroom", 1.0),)), StageSpec((("TtftHeadroom", 1.0),)))
LOAD_ONLY = ProfileSpec(StageSpec((("LoadBalance", 1.0),)), StageSpec((("LoadBalance", 1.0),)))
PREFIX_ONLY = ProfileSpec(StageSpec((("PrefixOverlap", 1.0),)), DEFAULT_PROFILE.prefill)


@pytest.mark.parametrize(
    ("facts", "model", "cls", "label", "spec"),
    [
        (DeploymentFacts(name="chat"), "m", "interactive", "chat/interactive", TTFT_ONLY),
        (DeploymentFacts(name="chat"), "m", "standard", "chat", LOAD_ONLY),
        (DeploymentFacts(name="other"), "m", "batch", "default/batch", PREFIX_ONLY),
        (DeploymentFacts(name="other"), "m", "standard", "default", DEFAULT_PROFILE),
        (DeploymentFacts(), "hand-started", "standard", "hand-started", LOAD_ONLY),
        (DeploymentFacts(name="moe", dp_size=2), "m", "standard", "moe", MOE_PROFILE),
        (DeploymentFacts(name="chat", dp_size=2), "m", "standard", "chat", LOAD_ONLY),
    ],
)  # fmt: skip
def test_profile_table_resolution(
    facts: DeploymentFacts, model: str, cls: str, label: str, spec: ProfileSpec
) -> None:
    table = ProfileTable(
        default=DeploymentProfiles(DEFAULT_PROFILE, {"batch": PREFIX_ONLY}),
        moe=DeploymentProfiles(MOE_PROFILE),
        deployments={
            "chat": DeploymentProfiles(LOAD_ONLY, {"interactive": TTFT_ONLY}),
            "hand-started": DeploymentProfiles(LOAD_ONLY),
        },
    )
    assert table.spec(facts, model, cls) == (label, spec)
    decode, prefill = table.resolve(facts, model, cls)
    assert decode.name == f"{label}:decode" and prefill.name == f"{label}:prefill"
    assert [ws.scorer.name for ws in decode.scorers] == [n for n, _ in spec.decode.scorers]
    assert table.resolve(facts, model, cls)[0] is decode  # built once


@pytest.mark.parametrize(
    ("scorers", "picker", "message"),
    [
        ((("Nope", 1.0),), "MaxScore", "unknown scorer 'Nope'"),
        ((("LoadBalance", -1.0),), "MaxScore", "weight -1.0 < 0"),
        ((("LoadBalance", 0.0),), "MaxScore", "at least one scorer with a weight > 0"),
        ((("LoadBalance", 1.0), ("LoadBalance", 2.0)), "MaxScore", "named twice"),
        ((("LoadBalance", 1.0),), "Random", "unknown picker 'Random'"),
    ],
)
def test_stage_spec_rejects_bad_profiles(
    scorers: tuple[tuple[str, float], ...], picker: str, message: str
) -> None:
    with pytest.raises(InvalidArgument, match=message):
        StageSpec(scorers, picker)


def test_the_router_uses_the_table_per_deployment_and_class() -> None:
    ws = [worker("busy", running=6, batch_size=6, context_tokens=6000), worker("idle")]
    table = ProfileTable(
        default=DeploymentProfiles(DEFAULT_PROFILE),
        moe=DeploymentProfiles(MOE_PROFILE),
        deployments={"chat": DeploymentProfiles(classes={"batch": PREFIX_ONLY})},
    )
    router = SlaAwareRouter(profiles=table)
    req = with_facts(request(100, sla=SLA["batch"]), DeploymentFacts(name="chat"))
    d = decided(req, ws, 1, router=router)
    assert d.trace.decode.profile == "chat/batch:decode"
    assert set(d.trace.decode.weights) == {"PrefixOverlap"}
    std = with_facts(request(100), DeploymentFacts(name="chat"))
    assert decided(std, ws, 1, router=router).trace.decode.profile == "default:decode"
    assert DEFAULT_TABLE.spec(DeploymentFacts(), "x", "standard") == ("default", DEFAULT_PROFILE)
