"""The SLA-aware router's pipeline on hand-built snapshots (timing: llama-3.1-8b-h100).

Decode worker first, then local or remote prefill; prefix affinity through the index; long
context to its pool; TTFT predictions that decide; traces that say which plugins decided.
"""

from __future__ import annotations

import random

import pytest

from controlplane.core.routing import (
    Decision,
    PrefixIndex,
    SlaAwareRouter,
    Unroutable,
    WorkerState,
)
from controlplane.core.routing.framework import RouteRequest
from tests.unit.routing_builders import BLOCK, SLA, request, tokens, worker
from workers.engines.sim_core import hash_blocks

RNG = random.Random(7)


def decide(
    router: SlaAwareRouter,
    req: RouteRequest,
    workers: list[WorkerState],
    seed: int = 0,
    **kw: bool | frozenset[str],
) -> Decision:
    d = router.decide(req, workers, random.Random(seed), **kw)  # type: ignore[arg-type]
    assert isinstance(d, Decision), d
    return d


def ids(d: Decision) -> tuple[str | None, str]:
    return (d.prefill.worker_id if d.prefill else None, d.decode.worker_id)


def busy(worker_id: str, role: str = "decode", batch: int = 16, **kw: object) -> WorkerState:
    """A decode worker with a running batch of ``batch`` sequences at 1k context each."""
    return worker(
        worker_id, role, running=batch, batch_size=batch, context_tokens=batch * 1024, **kw
    )


# --- prefix affinity -------------------------------------------------------------------------

SYSTEM = tokens(2048, seed=1)


def chat(suffix_seed: int) -> RouteRequest:
    return request(SYSTEM + tokens(64, seed=100 + suffix_seed))


def test_a_shared_prefix_follows_the_worker_the_router_sent_it_to() -> None:
    workers = [worker("d1"), worker("d2"), worker("d3")]
    for seed in range(5):
        router = SlaAwareRouter()
        first = router.route(chat(0), workers, random.Random(seed))
        assert isinstance(first, Decision)
        for n in range(1, 4):
            again = router.route(chat(n), workers, random.Random(seed + n))
            assert isinstance(again, Decision)
            assert again.decode.worker_id == first.decode.worker_id


def test_a_shared_prefix_goes_where_kv_events_say_it_is_even_with_some_load() -> None:
    index = PrefixIndex()
    index.apply_event("d2", "stored", hash_blocks(SYSTEM, BLOCK))
    router = SlaAwareRouter(index)
    workers = [worker("d1"), busy("d2", batch=3), worker("d3")]
    for seed in range(5):
        d = decide(router, chat(9), workers, seed)
        assert d.decode.worker_id == "d2"
        assert d.trace.decode.candidate("d2").cached_blocks == len(SYSTEM) // BLOCK
        assert d.trace.decode.deciders()[:2] == ("PrefixOverlap", "TtftHeadroom")
    index.apply_event("d2", "evicted", hash_blocks(SYSTEM, BLOCK))
    assert decide(router, chat(9), workers).decode.worker_id != "d2"


# --- conditional disaggregation --------------------------------------------------------------

PD = [busy("d1"), worker("p1", "prefill")]


@pytest.mark.parametrize(
    ("prompt", "sla", "remote", "why"),
    [
        (256, "interactive", False, "fits the ITL slack"),
        # ITL slack on d1 (8B, 16 x 1k context, target 50 ms) is ~41 ms: ~1.3k tokens of prefill
        (1000, "interactive", False, "fits the ITL slack"),
        (1600, "interactive", True, "> ITL slack"),
        (8000, "interactive", True, "> ITL slack"),
        # no ITL target, no slack: anything longer than its KV transfer goes remote
        (256, "batch", True, "> KV transfer"),
    ],
)
def test_short_prompts_prefill_locally_and_long_ones_remotely(
    prompt: int, sla: str, remote: bool, why: str
) -> None:
    d = decide(SlaAwareRouter(), request(prompt, sla=SLA[sla]), PD)
    assert ids(d) == (("p1" if remote else None), "d1")
    verdict = d.trace.disaggregation
    assert verdict is not None and verdict.remote is remote
    assert why in verdict.reason
    assert verdict.interference_ms > 0 and verdict.transfer_ms > 0
    assert (d.trace.prefill is not None) is remote


@pytest.mark.parametrize(
    ("queued", "remote"),
    [
        (0, False),  # a 1k prompt fits d1's ~41 ms ITL slack
        (300, False),  # a little queued: still fits
        (2000, True),  # two 1k prompts already queued on d1 ride in the same steps: no slack
    ],
)
def test_prefills_queued_on_the_decode_worker_use_its_itl_slack_first(
    queued: int, remote: bool
) -> None:
    d1 = busy("d1", pending_prefill_tokens=queued)
    d = decide(SlaAwareRouter(), request(1000, sla=SLA["interactive"]), [d1, PD[1]])
    assert ids(d) == (("p1" if remote else None), "d1")
    verdict = d.trace.disaggregation
    assert verdict is not None and verdict.remote is remote
    assert ("> ITL slack" if remote else "fits the ITL slack") in verdict.reason


def test_a_long_prompt_mostly_cached_on_the_decode_worker_stays_local() -> None:
    prompt = tokens(8000, seed=3)
    index = PrefixIndex()
    index.stored("d1", hash_blocks(prompt[:7936], BLOCK))
    d = decide(SlaAwareRouter(index), request(prompt), PD)
    assert ids(d) == (None, "d1")
    assert d.trace.disaggregation is not None
    assert "496 blocks cached on d1" in d.trace.disaggregation.reason


@pytest.mark.parametrize(
    ("workers", "kw", "why"),
    [
        ([worker("d1"), worker("p1", "prefill")], {}, "decode batch empty"),
        (PD, {"aggregated": True}, "aggregated route asked for"),
        ([busy("d1")], {}, "no prefill worker"),
        ([busy("d1"), worker("p1", "prefill", serving=False)], {}, "no prefill worker can take"),
    ],
)
def test_reasons_to_keep_a_long_prefill_local(
    workers: list[WorkerState], kw: dict[str, bool], why: str
) -> None:
    d = decide(SlaAwareRouter(), request(8000), workers, **kw)
    assert ids(d) == (None, "d1")
    assert d.trace.disaggregation is not None
    assert why in d.trace.disaggregation.reason


def test_remote_prefill_is_refused_when_it_would_miss_a_target_local_meets() -> None:
    # p1 has 10 prompts of 4k queued (~1.35 s); d1 prefills 4k in ~0.14 s beside its batch
    workers = [busy("d1"), worker("p1", "prefill", waiting=10, queued_prefill_tokens=40_000)]
    d = decide(SlaAwareRouter(), request(4000), workers)
    assert ids(d) == (None, "d1")
    assert d.trace.disaggregation is not None
    assert "would miss the 500 ms target" in d.trace.disaggregation.reason


@pytest.mark.parametrize(
    ("prefill_queue", "remote", "why"),
    [
        # d1's own queue (~10 x 4k prompts from this router, ~1.3 s) misses 500 ms: idle p1 takes it
        (0, True, "misses the 500 ms target"),
        # p1's queue is longer still: local stays, with the reason
        (80_000, False, "is no sooner"),
    ],
)
def test_a_local_prefill_that_would_miss_ttft_moves_to_a_sooner_prefill_worker(
    prefill_queue: int, remote: bool, why: str
) -> None:
    # a short prompt on an idle-batch decode worker would stay local (rule c): its queue decides
    d1 = worker("d1", pending_prefill_tokens=40_000)
    p1 = worker("p1", "prefill", waiting=20 if prefill_queue else 0,
                queued_prefill_tokens=prefill_queue)  # fmt: skip
    d = decide(SlaAwareRouter(), request(256), [d1, p1])
    assert ids(d) == (("p1" if remote else None), "d1")
    verdict = d.trace.disaggregation
    assert verdict is not None and verdict.remote is remote
    assert why in verdict.reason and "decode batch empty" in verdict.reason
    without_queue = decide(SlaAwareRouter(), request(256), [worker("d1"), p1])
    assert ids(without_queue) == (None, "d1")  # the same prompt with no queue stays local


def test_past_the_target_a_smaller_miss_still_beats_a_bigger_one() -> None:
    # both decode workers would miss the TTFT target; the shorter queue wins every seed
    workers = [
        worker("d-long", pending_prefill_tokens=120_000),
        worker("d-short", pending_prefill_tokens=40_000),
    ]
    for seed in range(8):
        d = decide(SlaAwareRouter(), request(512), workers, seed, aggregated=True)
        assert d.decode.worker_id == "d-short"
        scores = {c.worker_id: c.scores["TtftHeadroom"] for c in d.trace.decode.candidates}
        assert scores["d-long"] < scores["d-short"] < 0


# --- TTFT prediction decides the prefill worker ----------------------------------------------


@pytest.mark.parametrize(
    ("queued_prompts", "expected"),
    [
        (1, "p-hit"),  # one 2k prompt ahead (~66 ms) beats prefilling 7.7k cached tokens again
        (8, "p-idle"),  # eight 4k prompts ahead (~1.1 s): the idle worker is faster
    ],
)
def test_prefill_worker_by_predicted_ttft_prefix_hit_vs_idle(
    queued_prompts: int, expected: str
) -> None:
    prompt = tokens(8000, seed=4)
    index = PrefixIndex()
    index.stored("p-hit", hash_blocks(prompt[:7680], BLOCK))
    queued = 2000 if queued_prompts == 1 else 4000 * queued_prompts
    workers = [
        busy("d1"),
        worker("p-hit", "prefill", running=1, waiting=queued_prompts,
               queued_prefill_tokens=queued),
        worker("p-idle", "prefill"),
    ]  # fmt: skip
    d = decide(SlaAwareRouter(index), request(prompt), workers)
    assert ids(d) == (expected, "d1")
    trace = d.trace.prefill
    assert trace is not None
    hit, idle = trace.candidate("p-hit"), trace.candidate("p-idle")
    assert (hit.ttft_ms < idle.ttft_ms) is (expected == "p-hit")
    assert trace.deciders()[0] == "TtftHeadroom"


# --- long context ----------------------------------------------------------------------------

LONG = 40_000


def test_long_context_goes_to_its_pool_never_to_an_interactive_worker() -> None:
    router = SlaAwareRouter(long_context_threshold_tokens=32_768)
    workers = [
        worker("i1", "both", pool="aggregated"),  # idle, roomy: would win on every score
        busy("lc1", "both", batch=4, pool="long_context", kv_blocks_total=40_000),
    ]
    for seed in range(10):
        d = decide(router, request(LONG), workers, seed)
        assert ids(d) == (None, "lc1")
    rejected = {r.worker_id: r.plugin for r in d.trace.decode.rejections}
    assert rejected == {"i1": "LongContext"}
    assert decide(router, request(2000), workers).decode.worker_id == "i1"  # short: anyone


def test_long_context_prefill_also_uses_the_pool() -> None:
    router = SlaAwareRouter(long_context_threshold_tokens=32_768)
    workers = [
        busy("d-i", pool="decode"),
        busy("d-lc", pool="long_context", kv_blocks_total=40_000),
        worker("p-i", "prefill", pool="prefill"),
        worker("p-lc", "prefill", pool="long_context", running=2, waiting=1),
    ]
    d = decide(router, request(LONG), workers)
    assert ids(d) == ("p-lc", "d-lc")


def test_without_a_pool_long_context_goes_where_the_kv_fits() -> None:
    router = SlaAwareRouter(long_context_threshold_tokens=32_768)
    workers = [
        worker("i1", "both", kv_blocks_total=10_000, kv_blocks_used=8_000),  # 2k free < 2.5k
        busy("i2", "both", batch=8),
    ]
    d = decide(router, request(LONG), workers)
    assert ids(d) == (None, "i2")
    (rej,) = d.trace.decode.rejections
    assert (rej.worker_id, rej.plugin) == ("i1", "KvHeadroom")
    assert rej.reason == "needs 2508 KV blocks, 2000 free"


# --- traces, purity, ties, no route ----------------------------------------------------------


def test_the_trace_names_the_plugins_that_decided() -> None:
    index = PrefixIndex()
    index.stored("d-b", hash_blocks(SYSTEM, BLOCK))
    workers = [
        worker("p1", "prefill"),
        worker("d-drain", serving=False),
        worker("d-full", kv_blocks_used=10_000),
        worker("d-a"),
        worker("d-b"),
    ]
    d = decide(SlaAwareRouter(index), chat(1), workers)
    assert ids(d) == (None, "d-b")
    assert set(d.trace.plugins()) >= {"Role", "Serving", "KvHeadroom", "PrefixOverlap"}
    text = d.trace.explain()
    assert "decode (default:decode): chose d-b" in text
    assert "rejected d-drain: draining [Serving]" in text
    assert "rejected p1: role prefill does not decode [Role]" in text
    assert "decided by PrefixOverlap" in text
    assert "prefill local: decode batch empty" in text


def test_decide_is_a_pure_read_and_route_records_both_workers() -> None:
    router = SlaAwareRouter()
    req = request(8000)
    decide(router, req, PD)
    assert len(router.index) == 0
    d = router.route(req, PD, RNG)
    assert isinstance(d, Decision) and ids(d) == ("p1", "d1")
    assert router.index.overlap("d1", req.block_hashes) == 500
    assert router.index.overlap("p1", req.block_hashes) == 500


def test_ties_are_broken_by_the_injected_rng_reproducibly() -> None:
    router = SlaAwareRouter()
    workers = [worker("d1"), worker("d2"), worker("d3")]
    req = request(300)
    picks = [decide(router, req, workers, seed).decode.worker_id for seed in range(30)]
    assert set(picks) == {"d1", "d2", "d3"}
    assert picks == [decide(router, req, workers, seed).decode.worker_id for seed in range(30)]


def test_excluded_workers_are_skipped() -> None:
    d = decide(SlaAwareRouter(), request(300), [worker("d1"), worker("d2", running=5)],
               exclude=frozenset({"d1"}))  # fmt: skip
    assert ids(d) == (None, "d2")
    assert d.trace.decode.rejections[0].reason == "failed this request"


def test_no_route_says_why_for_every_worker() -> None:
    workers = [
        worker("p1", "prefill"),
        worker("d1", serving=False),
        worker("d2", circuit_allows=False),
        worker("d3", model="other"),
        worker("d4", max_context_tokens=4096),
    ]
    out = SlaAwareRouter().decide(request(8000), workers, RNG)
    assert isinstance(out, Unroutable)
    assert out.reasons == (
        "d1: draining",
        "d2: circuit open",
        "d3: serves 'other', not 'llama'",
        "d4: context 8128 tokens > max 4096",
        "p1: role prefill does not decode",
    )
    assert out.message("llama").startswith("no worker can serve model 'llama' now (d1: draining")
    empty = SlaAwareRouter().decide(request(10), [], RNG)
    assert isinstance(empty, Unroutable) and empty.reasons == ()
    assert "no workers registered" in empty.message("llama")
