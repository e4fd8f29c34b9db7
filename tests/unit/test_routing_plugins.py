"""The router's stock plugins on hand-built workers: each filter's reason, each scorer's range
and direction, the picker's ties."""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Sequence

import pytest

from controlplane.core.routing.framework import (
    Candidate,
    Filter,
    RouteContext,
    RouteRequest,
    RoutingProfile,
    Scorer,
    Stage,
    WeightedScorer,
    WorkerState,
)
from controlplane.core.routing.plugins import (
    ContextLengthFilter,
    ExcludedFilter,
    ItlScorer,
    KvHeadroomFilter,
    KvHeadroomScorer,
    LoadBalanceScorer,
    LongContextFilter,
    MaxScorePicker,
    ModelFilter,
    PrefixOverlapScorer,
    RoleFilter,
    ServingFilter,
    TtftScorer,
    default_decode_profile,
    headroom,
)
from tests.unit.routing_builders import SLA, request, worker


def dropped(
    f: Filter, req: RouteRequest, workers: Sequence[WorkerState], ctx: RouteContext
) -> dict[str, str]:
    kept = {w.worker_id for w in f.filter(req, workers, ctx)}
    return {w.worker_id: f.reason(req, w, ctx) for w in workers if w.worker_id not in kept}


DEC = RouteContext(Stage.DECODE)
PRE = RouteContext(Stage.PREFILL)


@pytest.mark.parametrize(
    ("filt", "ctx", "w", "req", "reason"),
    [
        (ExcludedFilter(), RouteContext(Stage.DECODE, exclude=frozenset({"x"})), worker("x"),
         request(64), "failed this request"),
        (RoleFilter(), DEC, worker("x", "prefill"), request(64), "role prefill does not decode"),
        (RoleFilter(), PRE, worker("x", "decode"), request(64), "role decode does not prefill"),
        (RoleFilter(), PRE, worker("x", "both"), request(64), "role both does not prefill"),
        (ModelFilter(), DEC, worker("x", model="other"), request(64),
         "serves 'other', not 'llama'"),
        (ServingFilter(), DEC, worker("x", serving=False), request(64), "draining"),
        (ServingFilter(), DEC, worker("x", circuit_allows=False), request(64), "circuit open"),
        (ContextLengthFilter(), DEC, worker("x", max_context_tokens=1000), request(900),
         "context 1028 tokens > max 1000"),
        (ContextLengthFilter(), PRE, worker("x", max_context_tokens=1000), request(1000),
         "context 1001 tokens > max 1000"),
        # (160 + 128) / 16 = 18 blocks to hold prompt and output
        (KvHeadroomFilter(), DEC, worker("x", kv_blocks_total=100, kv_blocks_used=95),
         request(160), "needs 18 KV blocks, 5 free"),
        # a prefill worker holds the prompt only: 10 blocks
        (KvHeadroomFilter(), PRE, worker("x", kv_blocks_total=100, kv_blocks_used=95),
         request(160), "needs 10 KV blocks, 5 free"),
        # cached blocks need no room: 18 - 6 = 12
        (KvHeadroomFilter(), RouteContext(Stage.DECODE, cached_blocks={"x": 6}),
         worker("x", kv_blocks_total=100, kv_blocks_used=95), request(160),
         "needs 12 KV blocks, 5 free"),
    ],
)  # fmt: skip
def test_each_filter_says_why(
    filt: Filter, ctx: RouteContext, w: WorkerState, req: RouteRequest, reason: str
) -> None:
    assert dropped(filt, req, [w], ctx) == {"x": reason}


@pytest.mark.parametrize(
    ("filt", "ctx", "w", "req"),
    [
        (ExcludedFilter(), RouteContext(Stage.DECODE, exclude=frozenset({"y"})), worker("x"),
         request(64)),
        (RoleFilter(), DEC, worker("x", "both"), request(64)),
        (RoleFilter(), PRE, worker("x", "prefill"), request(64)),
        (ContextLengthFilter(), DEC, worker("x", max_context_tokens=0), request(200_000)),
        (ContextLengthFilter(), PRE, worker("x", max_context_tokens=1000), request(900)),
        (KvHeadroomFilter(), DEC, worker("x", kv_blocks_total=0), request(200_000)),
        (KvHeadroomFilter(), RouteContext(Stage.DECODE, cached_blocks={"x": 13}),
         worker("x", kv_blocks_total=100, kv_blocks_used=95), request(160)),
    ],
)  # fmt: skip
def test_filters_pass_what_fits(
    filt: Filter, ctx: RouteContext, w: WorkerState, req: RouteRequest
) -> None:
    assert dropped(filt, req, [w], ctx) == {}


def test_long_context_filter_keeps_the_pool_when_it_has_a_worker() -> None:
    f = LongContextFilter(threshold_tokens=1000)
    pool = [worker("a", pool="decode"), worker("lc", pool="long_context")]
    assert dropped(f, request(2000), pool, DEC) == {
        "a": "prompt 2000 tokens >= long-context threshold 1000: long_context pool only"
    }
    assert dropped(f, request(999), pool, DEC) == {  # below the threshold: off the pool
        "lc": "long_context pool is kept for prompts of 1000+ tokens"
    }
    assert dropped(f, request(999), [pool[1]], DEC) == {}  # ... unless it is all there is
    no_pool = [worker("a", pool="decode"), worker("b", pool="decode")]
    assert dropped(f, request(2000), no_pool, DEC) == {}  # no pool: KV room decides


# --- scorers -------------------------------------------------------------------------------


def cand(
    w: WorkerState | None = None, *, cached_blocks: int = 0, ttft: float = 0.0, itl: float = 0.0
) -> Candidate:
    return Candidate(w or worker("x"), cached_blocks, cached_blocks * 16, ttft, itl)


REQ = request(640)  # 40 blocks
BATCH_REQ = request(640, sla=SLA["batch"])  # no latency targets

Knob = Callable[[float], Candidate]

SCORER_CASES: list[tuple[Scorer, RouteRequest, Knob, Sequence[float], int]] = [
    # scorer, request, candidate from a knob, knob values (rising), direction (+1 rising)
    (TtftScorer(), REQ, lambda v: cand(ttft=v), [0, 50, 200, 499, 500, 2000], -1),
    (TtftScorer(), BATCH_REQ, lambda v: cand(ttft=v), [0, 50, 200, 499, 500, 2000], -1),
    (ItlScorer(), REQ, lambda v: cand(itl=v), [0, 5, 20, 49, 50, 300], -1),
    (ItlScorer(), BATCH_REQ, lambda v: cand(itl=v), [1, 5, 20, 49, 50, 300], -1),
    (PrefixOverlapScorer(), REQ, lambda v: cand(cached_blocks=int(v)), [0, 1, 10, 39, 40], +1),
    (KvHeadroomScorer(), REQ,
     lambda v: cand(worker("x", kv_blocks_total=1000, kv_blocks_used=int(v))),
     [0, 100, 500, 900, 958, 959, 1000], -1),
    (LoadBalanceScorer(), REQ, lambda v: cand(worker("x", running=int(v))), [0, 1, 4, 64], -1),
    (LoadBalanceScorer(), REQ, lambda v: cand(worker("x", waiting=int(v))), [0, 1, 4, 64], -1),
]  # fmt: skip


@pytest.mark.parametrize(("scorer", "req", "knob", "values", "direction"), SCORER_CASES)
def test_scorers_stay_in_range_and_move_the_right_way(
    scorer: Scorer, req: RouteRequest, knob: Knob, values: Sequence[float], direction: int
) -> None:
    candidates = [knob(v) for v in values]
    scores = list(scorer.score(req, candidates, DEC))
    # the latency headroom scorers go below 0 (to -1) only for a predicted target miss
    targets = {"TtftHeadroom": req.ttft_target_ms, "ItlHeadroom": req.itl_target_ms}
    target = targets.get(scorer.name)
    lows = [-1.0 if target is not None and v > target else 0.0 for v in values]
    assert all(lo <= s <= 1.0 for lo, s in zip(lows, scores, strict=True)), scores
    assert all(s >= 0 for lo, s in zip(lows, scores, strict=True) if lo == 0.0), scores
    pairs = list(itertools.pairwise(scores))
    if direction > 0:
        assert all(a <= b for a, b in pairs), scores
    else:
        assert all(a >= b for a, b in pairs), scores
    assert scores[0] != scores[-1], "the knob must matter"


@pytest.mark.parametrize(
    ("predicted", "target", "expected"),
    [
        ([0.0, 250.0, 500.0], 500.0, [1.0, 0.5, 0.0]),  # 0 at the target
        ([1000.0, 2000.0, 5000.0], 500.0, [-0.5, -0.75, -0.9]),  # past it: worse, more so
        ([100.0, 200.0, 400.0], None, [1.0, 0.5, 0.25]),  # no target: against the fastest
        ([0.0, 10.0], None, [1.0, 0.0]),
    ],
)
def test_headroom(predicted: list[float], target: float | None, expected: list[float]) -> None:
    assert headroom(predicted, target) == pytest.approx(expected)


def test_prefix_scorer_is_zero_for_a_prompt_without_full_blocks() -> None:
    assert PrefixOverlapScorer().score(request(10), [cand()], DEC) == [0.0]


def test_kv_scorer_does_not_penalise_unknown_capacity() -> None:
    assert KvHeadroomScorer().score(REQ, [cand(worker("x", kv_blocks_total=0))], DEC) == [1.0]


# --- picker --------------------------------------------------------------------------------


def test_max_score_picker_takes_the_best_and_breaks_ties_with_the_rng() -> None:
    p = MaxScorePicker()
    cs = [cand(worker(i)) for i in ("a", "b", "c")]
    assert p.pick(cs, [0.2, 0.9, 0.5], random.Random(0)) == 1
    tie = [0.7, 0.7, 0.1]
    assert {p.pick(cs, tie, random.Random(s)) for s in range(20)} == {0, 1}
    assert [p.pick(cs, tie, random.Random(s)) for s in range(20)] == [
        p.pick(cs, tie, random.Random(s)) for s in range(20)
    ]


def test_a_profiles_weights_are_normalised_once_and_named() -> None:
    profile = default_decode_profile()
    assert profile.weights == (3 / 9, 2 / 9, 2 / 9, 1 / 9, 1 / 9)
    assert profile.scorer_names == (
        "ItlHeadroom",
        "TtftHeadroom",
        "PrefixOverlap",
        "KvHeadroom",
        "LoadBalance",
    )
    assert dict(profile.weight_map) == dict(zip(profile.scorer_names, profile.weights, strict=True))
    unweighted = RoutingProfile(
        "none", (), (WeightedScorer(LoadBalanceScorer(), 0.0),), MaxScorePicker()
    )
    assert unweighted.weights == (0.0,)
