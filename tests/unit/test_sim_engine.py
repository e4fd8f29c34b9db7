"""The simulated engine: the pure scheduler (SimScheduler) and the async shell (SimEngine).

Everything runs on virtual time: the scheduler takes ``now`` as an argument, and the engine gets
a fake clock whose ``sleep`` advances it instantly. No test looks at the wall clock.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from dataclasses import dataclass, field

import pytest

from controlplane.errors import AlreadyExists, InvalidArgument
from workers.engine import (
    InferenceEngine,
    KvEventKind,
    KvHandle,
    KvUnavailable,
    SamplingParams,
    TokenChunk,
)
from workers.engines.sim import SimEngine, build_sim_engine
from workers.engines.sim_core import (
    SimConfig,
    SimRequest,
    SimScheduler,
    StepResult,
    hash_block,
    hash_blocks,
    sample_token,
)
from workers.profiles import load_profile

TINY = load_profile("tiny-test")  # vocab 1000, 64 blocks of 16 tokens, context 2048


def prompt(n: int, start: int = 0) -> tuple[int, ...]:
    return tuple((start + i) % TINY.vocab_size for i in range(n))


def expected_tokens(key: str, prompt_len: int, n: int) -> list[int]:
    return [sample_token(key, prompt_len + i, TINY.vocab_size) for i in range(n)]


@dataclass
class Run:
    tokens: dict[str, list[int]] = field(default_factory=dict)
    finish: dict[str, str] = field(default_factory=dict)
    cached: dict[str, int] = field(default_factory=dict)
    trace: list[StepResult] = field(default_factory=list)
    now: float = 0.0

    @property
    def preempted(self) -> list[str]:
        return [r for step in self.trace for r in step.preempted]


def drive(
    sched: SimScheduler,
    arrivals: Sequence[tuple[int, SimRequest]] = (),
    *,
    run: Run | None = None,
    max_steps: int = 10_000,
) -> Run:
    """Step until idle; ``arrivals`` are (step index, request), added before that step."""
    run = run or Run()
    pending = sorted(arrivals, key=lambda a: a[0])
    for i in range(max_steps):
        while pending and pending[0][0] <= i:
            sched.add_request(pending.pop(0)[1], run.now)
        if not sched.has_work() and not pending:
            return run
        result = sched.step(run.now)
        run.trace.append(result)
        run.now += result.duration_s
        for out in result.outputs:
            run.tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
            run.cached[out.request_id] = out.num_cached_tokens
            if out.finish_reason:
                run.finish[out.request_id] = out.finish_reason
    raise AssertionError("the scheduler did not go idle")


# --- hashing and sampling ----------------------------------------------------------------------


def test_block_hashes_chain_and_are_stable_across_processes() -> None:
    tokens = prompt(40)
    hashes = hash_blocks(tokens, 16)
    assert len(hashes) == 2  # the 8-token tail is not a full block
    assert hashes[0] == hash_block(0, tokens[:16])
    assert hashes[1] == hash_block(hashes[0], tokens[16:32])
    assert hash_blocks((*tokens[:32], 999), 16) == hashes  # same prefix, same names
    changed = hash_blocks((7, *tokens[1:]), 16)
    assert changed[0] != hashes[0] and changed[1] != hashes[1]  # a hash names the whole prefix
    # blake2b, not Python's salted hash(): routers in other processes compute the same value
    assert hash_block(0, (1, 2, 3)) == 0x009E9B1EAA390C12


@pytest.mark.parametrize(
    ("length", "block_size"),
    [(0, 16), (15, 16), (16, 16), (17, 16), (256, 16), (100, 1), (130, 64), (5, 0)],
)
def test_block_hashes_equal_the_block_by_block_chain(length: int, block_size: int) -> None:
    tokens = tuple((i * 7919 + 13) % 200_000 for i in range(length))
    expected: list[int] = []
    parent = 0
    for start in range(0, length - block_size + 1, block_size) if block_size > 0 else ():
        parent = hash_block(parent, tokens[start : start + block_size])
        expected.append(parent)
    assert hash_blocks(tokens, block_size) == tuple(expected)


def test_sampled_tokens_depend_only_on_key_and_position() -> None:
    a = [sample_token("r1", p, 1000) for p in range(50)]
    assert a == [sample_token("r1", p, 1000) for p in range(50)]
    assert a != [sample_token("r2", p, 1000) for p in range(50)]
    assert all(0 <= t < 1000 for t in a)
    assert len(set(a)) > 30


# --- the scheduler: requirements from the issue -------------------------------------------------


def small_cache(**kw: int | bool) -> SimConfig:
    """12 blocks of 4 tokens = 48 tokens of KV."""
    return SimConfig(block_size=4, kv_capacity_blocks=12, **kw)  # type: ignore[arg-type]


def test_a_workload_larger_than_the_kv_cache_is_preempted_and_still_completes() -> None:
    requests = [SimRequest(f"r{i}", prompt(10, 100 * i), max_tokens=12) for i in range(4)]
    # each needs 22 tokens = 6 blocks; four need 24 blocks, the cache has 12
    sched = SimScheduler(TINY, small_cache(max_num_batched_tokens=64))
    run = drive(sched, [(0, r) for r in requests])

    assert run.preempted, "the cache is too small for all four: someone must be preempted"
    assert sched.num_preemptions == len(run.preempted)
    assert run.finish == {f"r{i}": "length" for i in range(4)}
    for r in requests:
        assert run.tokens[r.request_id] == expected_tokens(r.request_id, 10, 12)
    assert sched.kv_blocks_used == 0 and not sched.has_work()
    # victims are the most recently admitted: the oldest request is never preempted
    assert "r0" not in run.preempted
    assert next(iter(run.finish)) == "r0"
    # a step that had to preempt admits nobody (the victim would only thrash)
    running: set[str] = set()
    for step in run.trace:
        ids = {c.request_id for c in step.scheduled}
        if step.preempted:
            assert ids <= running
        running = ids - {o.request_id for o in step.outputs if o.finish_reason}

    roomy = drive(SimScheduler(TINY, SimConfig(block_size=4)), [(0, r) for r in requests])
    assert not roomy.preempted
    assert roomy.tokens == run.tokens  # preemption costs time, never changes output
    assert run.now > roomy.now  # recomputation is paid for


def test_prefix_reuse_raises_the_hit_rate() -> None:
    system = prompt(64, 500)  # 4 full blocks of 16 shared by both requests
    sched = SimScheduler(TINY)
    run = drive(sched, [(0, SimRequest("a", (*system, 1, 2, 3), max_tokens=2))])
    assert sched.stats(run.now).prefix_cache_hit_rate == 0.0
    computed_a = sched.prompt_tokens_computed

    drive(sched, [(0, SimRequest("b", (*system, 4, 5, 6, 7), max_tokens=2))], run=run)
    assert run.cached["b"] == 64
    assert sched.stats(run.now).prefix_cache_hit_rate == pytest.approx(64 / (67 + 68))
    assert sched.prompt_tokens_computed - computed_a == 4  # only the new suffix is prefilled

    # a fully cached prompt still computes its last block: something has to produce logits
    drive(sched, [(0, SimRequest("c", system, max_tokens=2))], run=run)
    assert run.cached["c"] == 48 and run.tokens["c"] == expected_tokens("c", 64, 2)

    off = SimScheduler(TINY, SimConfig(enable_prefix_caching=False))
    run_off = drive(off, [(0, SimRequest("a", (*system, 1), max_tokens=2))])
    drive(off, [(0, SimRequest("b", (*system, 2), max_tokens=2))], run=run_off)
    assert run_off.cached["b"] == 0 and off.stats(run_off.now).prefix_cache_hit_rate == 0.0
    first_b_step = next(s for s in run.trace if any(c.request_id == "b" for c in s.scheduled))
    first_b_off = next(s for s in run_off.trace if any(c.request_id == "b" for c in s.scheduled))
    assert first_b_step.duration_s < first_b_off.duration_s  # a hit makes prefill cheaper


def test_the_same_inputs_give_the_same_outputs_and_timeline() -> None:
    def workload() -> list[tuple[int, SimRequest]]:
        shared = prompt(40, 7)
        return [
            (0, SimRequest("a", (*shared, 1), max_tokens=20)),
            (0, SimRequest("b", prompt(90, 300), max_tokens=15, seed=42)),
            (3, SimRequest("c", (*shared, 2, 3), max_tokens=30, stop_token_ids=(5, 6))),
            (9, SimRequest("d", prompt(200, 50), max_tokens=8)),
        ]

    config = SimConfig(block_size=8, kv_capacity_blocks=40, max_num_batched_tokens=48)
    one = drive(SimScheduler(TINY, config), workload())
    two = drive(SimScheduler(TINY, config), workload())
    assert one.trace == two.trace  # every step: schedule, duration, tokens, preemptions, events
    assert one.tokens == two.tokens and one.now == two.now
    assert one.preempted, "the workload is sized to exercise preemption too"

    reseeded = [(i, SimRequest(r.request_id, r.prompt_token_ids, r.max_tokens, seed=7))
                for i, r in workload()]  # fmt: skip
    assert drive(SimScheduler(TINY, config), reseeded).tokens != one.tokens


# --- the scheduler: batching, chunking, stops, KV bookkeeping ----------------------------------


def test_a_long_prompt_is_prefilled_in_chunks_within_the_token_budget() -> None:
    sched = SimScheduler(TINY, SimConfig(max_num_batched_tokens=33))
    run = drive(sched, [(0, SimRequest("r", prompt(100), max_tokens=3))])
    chunks = [(s.scheduled[0].num_new_tokens, s.scheduled[0].is_decode) for s in run.trace]
    assert chunks == [(33, False), (33, False), (33, False), (1, False), (1, True), (1, True)]
    assert [s.outputs != () for s in run.trace] == [False, False, False, True, True, True]
    assert run.trace[1].duration_s == pytest.approx(TINY.prefill_ms(33, 33) / 1e3)
    assert run.trace[3].duration_s == pytest.approx(TINY.prefill_ms(1, 99) / 1e3)
    assert run.trace[4].duration_s == pytest.approx(TINY.decode_step_ms(1, 101) / 1e3)


def test_running_decodes_come_first_and_new_prompts_share_the_leftover_budget() -> None:
    sched = SimScheduler(TINY, SimConfig(max_num_batched_tokens=16, max_num_seqs=3))
    for rid in ("a", "b"):
        sched.add_request(SimRequest(rid, prompt(4, ord(rid)), max_tokens=50), 0.0)
    sched.step(0.0)  # both prefill (8 tokens) and sample a first token
    sched.add_request(SimRequest("long", prompt(100), max_tokens=5), 0.0)
    sched.add_request(SimRequest("late", prompt(4), max_tokens=5), 0.0)
    step = sched.step(1.0)
    assert [(c.request_id, c.num_new_tokens, c.is_decode) for c in step.scheduled] == [
        ("a", 1, True),
        ("b", 1, True),
        ("long", 14, False),
    ]
    assert step.duration_s == pytest.approx(
        (TINY.decode_step_ms(2, 5 + 5) + TINY.prefill_compute_ms(14, 0)) / 1e3
    )
    stats = sched.stats(1.0)
    assert (stats.running_requests, stats.waiting_requests) == (3, 1)  # max_num_seqs = 3
    assert stats.last_batch_size == 3


def test_a_stop_token_ends_the_request_early() -> None:
    expected = expected_tokens("r", 8, 10)
    stop = expected[3]
    n = expected.index(stop) + 1
    run = drive(SimScheduler(TINY), [(0, SimRequest("r", prompt(8), 10, stop_token_ids=(stop,)))])
    assert run.finish["r"] == "stop"
    assert run.tokens["r"] == expected[:n]


def test_completed_blocks_are_stored_and_evicted_tail_first_when_space_is_needed() -> None:
    sched = SimScheduler(TINY, SimConfig(block_size=4, kv_capacity_blocks=8))
    a = prompt(16, 1)
    drive(sched, [(0, SimRequest("a", a, max_tokens=1))])
    events = sched.drain_kv_events()
    assert [(e.kind, e.block_hashes) for e in events] == [(KvEventKind.STORED, hash_blocks(a, 4))]
    assert sched.kv_blocks_used == 0 and sched.cached_blocks == 4  # free, but still cached
    assert sched.drain_kv_events() == []

    drive(sched, [(0, SimRequest("b", prompt(27, 200), max_tokens=1))])  # needs 7 of 8 blocks
    evicted = [h for e in sched.drain_kv_events() if e.kind == "evicted" for h in e.block_hashes]
    assert evicted == list(reversed(hash_blocks(a, 4)[1:]))  # a's tail went first, its head stayed
    run = drive(sched, [(0, SimRequest("a2", (*a, 5), max_tokens=1))])
    assert run.cached["a2"] == 4


def test_held_kv_survives_until_taken_and_gives_way_to_new_work() -> None:
    sched = SimScheduler(TINY, SimConfig(block_size=4, kv_capacity_blocks=8, held_kv_ttl_s=5.0))
    run = drive(sched, [(0, SimRequest("p", prompt(10), max_tokens=1, hold_kv_as="kv1"))])
    assert run.finish["p"] == "length" and len(run.tokens["p"]) == 1
    assert sched.kv_blocks_used == 3 and sched.held_count == 1
    held = sched.take_held("kv1", run.now)
    assert (
        held is not None
        and held.num_tokens == 10
        and held.block_hashes == hash_blocks(prompt(10), 4)
    )
    assert sched.kv_blocks_used == 0 and sched.take_held("kv1", run.now) is None

    drive(sched, [(0, SimRequest("q", prompt(10), max_tokens=1, hold_kv_as="kv2"))], run=run)
    assert sched.held_kv("kv2", run.now + 4.9) is not None
    assert sched.held_kv("kv2", run.now + 5.0) is None  # TTL

    drive(sched, [(0, SimRequest("s", prompt(10), max_tokens=1, hold_kv_as="kv3"))], run=run)
    drive(sched, [(0, SimRequest("big", prompt(29, 600), max_tokens=1))], run=run)  # 8 blocks
    assert sched.held_count == 0 and sched.num_held_dropped == 2  # pressure beat holding
    assert not run.preempted


def test_a_growing_request_drops_held_kv_before_anyone_is_preempted() -> None:
    sched = SimScheduler(TINY, SimConfig(block_size=4, kv_capacity_blocks=8))
    drive(sched, [(0, SimRequest("p", prompt(10), max_tokens=1, hold_kv_as="kv"))])
    assert sched.kv_blocks_used == 3
    run = drive(sched, [(0, SimRequest("g", prompt(4, 50), max_tokens=20))])  # grows to 6 blocks
    assert run.finish["g"] == "length" and len(run.tokens["g"]) == 20
    assert sched.num_preemptions == 0 and sched.num_held_dropped == 1


def test_imported_kv_is_decoded_without_prefill() -> None:
    sched = SimScheduler(TINY)
    p = prompt(40)
    first = sample_token("r", 40, TINY.vocab_size)
    req = SimRequest("r", p, 5, initial_output_token_ids=(first,), kv_imported_tokens=40)
    run = drive(sched, [(0, req)])
    assert sched.prompt_tokens_computed == 0
    assert all(c.is_decode for s in run.trace for c in s.scheduled)
    assert run.tokens["r"] == expected_tokens("r", 40, 5)[1:]
    assert run.trace[0].duration_s == pytest.approx(TINY.decode_step_ms(1, 41) / 1e3)
    assert KvEventKind.STORED in {e.kind for e in run.trace[0].kv_events}


def test_abort_frees_the_blocks_and_bad_requests_are_refused() -> None:
    sched = SimScheduler(TINY)
    sched.add_request(SimRequest("r", prompt(100), max_tokens=50), 0.0)
    sched.step(0.0)
    assert sched.kv_blocks_used > 0
    with pytest.raises(AlreadyExists):
        sched.add_request(SimRequest("r", prompt(3), max_tokens=1), 0.0)
    assert sched.abort("r") and not sched.abort("r")
    assert sched.kv_blocks_used == 0 and not sched.has_work()
    with pytest.raises(InvalidArgument, match="KV blocks"):
        sched.add_request(SimRequest("huge", prompt(1000), max_tokens=100), 0.0)
    with pytest.raises(InvalidArgument):
        SimScheduler(TINY, SimConfig(max_num_seqs=0))


# --- the async engine --------------------------------------------------------------------------


class VirtualTime:
    """A clock whose sleep returns at once, having moved the clock forward."""

    def __init__(self) -> None:
        self.now = 100.0
        self.slept = 0.0

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.now += seconds
        self.slept += seconds
        await asyncio.sleep(0)


class LocalFetcher:
    """KvFetcher that reads straight from another in-process engine (no gRPC)."""

    def __init__(self, source: SimEngine) -> None:
        self.source = source
        self.sizes: list[int] = []

    async def fetch(self, handle: KvHandle) -> bytes:
        data = self.source.export_kv(handle.kv_id)
        self.sizes.append(len(data))
        return data


def engine(
    vt: VirtualTime, *, speedup: float = 1.0, trace: list[StepResult] | None = None, **kw: object
) -> SimEngine:
    return SimEngine(
        TINY,
        clock=vt.clock,
        sleep=vt.sleep,
        speedup=speedup,
        on_step=trace.append if trace is not None else None,
        **kw,  # type: ignore[arg-type]
    )


async def collect(stream: object) -> list[TokenChunk]:
    return [chunk async for chunk in stream]  # type: ignore[attr-defined]


def flat(chunks: list[TokenChunk]) -> list[int]:
    return [t for c in chunks for t in c.token_ids]


async def test_generate_streams_one_chunk_per_step_in_simulated_time() -> None:
    vt, trace = VirtualTime(), list[StepResult]()
    eng = engine(vt, trace=trace)
    chunks = await collect(eng.generate("r", prompt(30), SamplingParams(max_tokens=6)))
    assert flat(chunks) == expected_tokens("r", 30, 6)
    assert [len(c.token_ids) for c in chunks] == [1] * 6
    assert [c.finish_reason for c in chunks] == [None] * 5 + ["length"]
    assert vt.slept == pytest.approx(sum(s.duration_s for s in trace))
    assert trace[0].duration_s == pytest.approx(TINY.prefill_ms(30) / 1e3)
    stats = eng.stats()
    assert stats.steps == 6 and stats.tokens_per_second > 0 and stats.kv_blocks_used == 0
    await eng.aclose()


async def test_speedup_runs_the_same_work_faster_on_the_clock() -> None:
    async def run(speedup: float) -> tuple[list[int], float]:
        vt = VirtualTime()
        eng = engine(vt, speedup=speedup)
        tokens = flat(await collect(eng.generate("r", prompt(300), SamplingParams(max_tokens=20))))
        await eng.aclose()
        return tokens, vt.slept

    (slow_tokens, slow), (fast_tokens, fast) = await run(1.0), await run(10.0)
    assert slow_tokens == fast_tokens
    assert fast == pytest.approx(slow / 10)


async def test_concurrent_requests_batch_and_repeat_identically() -> None:
    async def run() -> tuple[list[list[int]], list[StepResult]]:
        vt, trace = VirtualTime(), list[StepResult]()
        eng = engine(vt, trace=trace, config=SimConfig(block_size=4, kv_capacity_blocks=30))
        streams = [
            collect(eng.generate(f"r{i}", prompt(20, 50 * i), SamplingParams(max_tokens=25)))
            for i in range(5)
        ]
        results = await asyncio.gather(*streams)
        assert eng.stats().max_batch_size_seen >= 3
        assert eng.scheduler.num_preemptions > 0  # 5 x 45 tokens into 120 tokens of KV
        await eng.aclose()
        return [flat(r) for r in results], trace

    (tokens_a, trace_a), (tokens_b, trace_b) = await run(), await run()
    assert tokens_a == tokens_b and trace_a == trace_b
    assert tokens_a == [expected_tokens(f"r{i}", 20, 25) for i in range(5)]


async def test_prefill_then_decode_on_another_engine_moves_kv_without_recompute() -> None:
    vt_p, vt_d = VirtualTime(), VirtualTime()
    prefill_engine = engine(vt_p, address="10.0.0.1:7000")
    fetcher = LocalFetcher(prefill_engine)
    decode_trace: list[StepResult] = []
    decode_engine = engine(vt_d, kv_fetcher=fetcher, trace=decode_trace)
    p, sampling = prompt(200), SamplingParams(max_tokens=8)

    res = await prefill_engine.prefill("r", p, sampling)
    assert res.first_token_id == sample_token("r", 200, TINY.vocab_size)
    assert res.kv.source_address == "10.0.0.1:7000" and res.kv.num_tokens == 200
    assert res.kv.size_bytes == 200 * TINY.kv_bytes_per_token
    assert prefill_engine.stats().kv_blocks_used == 13  # held for the decode side

    chunks = await collect(decode_engine.decode("r", p, res.first_token_id, res.kv, sampling))
    assert [res.first_token_id, *flat(chunks)] == expected_tokens("r", 200, 8)
    assert chunks[-1].finish_reason == "length"
    assert decode_engine.scheduler.prompt_tokens_computed == 0  # the prompt was not recomputed
    transfer_s = TINY.kv_transfer_ms(res.kv.size_bytes) / 1e3
    assert vt_d.slept == pytest.approx(transfer_s + sum(s.duration_s for s in decode_trace))
    assert all(s.num_prefill_tokens == 0 for s in decode_trace)
    assert fetcher.sizes[0] < 4096  # a descriptor, not the KV bytes
    assert prefill_engine.stats().kv_blocks_used == 0  # fetched: released
    with pytest.raises(KvUnavailable):
        prefill_engine.export_kv(res.kv.kv_id)  # handed over once

    with pytest.raises(KvUnavailable):  # the router would prefill again
        await collect(decode_engine.decode("r", p, res.first_token_id, res.kv, sampling))


async def test_decode_of_gone_or_mismatched_kv_fails_clearly() -> None:
    vt = VirtualTime()
    source = engine(vt, address="p:1")
    decoder = engine(vt, kv_fetcher=LocalFetcher(source))
    p, sampling = prompt(40), SamplingParams(max_tokens=4)
    unknown = KvHandle("nope", "p:1", 40, 40 * TINY.kv_bytes_per_token)
    with pytest.raises(KvUnavailable):
        await collect(decoder.decode("r", p, 1, unknown, sampling))

    res = await source.prefill("r", p, sampling)
    with pytest.raises(InvalidArgument, match="does not match the prompt"):
        await collect(decoder.decode("r2", prompt(40, 1), 1, res.kv, sampling))
    assert decoder.stats().running_requests == 0


class GatedFetcher(LocalFetcher):
    """A fetcher that waits for ``gate`` first: a transfer the test can hold in flight."""

    def __init__(self, source: SimEngine) -> None:
        super().__init__(source)
        self.gate = asyncio.Event()
        self.started = asyncio.Event()

    async def fetch(self, handle: KvHandle) -> bytes:
        self.started.set()
        await self.gate.wait()
        return await super().fetch(handle)


async def test_abort_during_the_kv_transfer_ends_the_stream_with_abort() -> None:
    vt = VirtualTime()
    source = engine(vt, address="p:1")
    fetcher = GatedFetcher(source)
    decoder = engine(vt, kv_fetcher=fetcher)
    p, sampling = prompt(40), SamplingParams(max_tokens=4)
    res = await source.prefill("r", p, sampling)
    task = asyncio.create_task(
        collect(decoder.decode("r", p, res.first_token_id, res.kv, sampling))
    )
    await fetcher.started.wait()
    assert decoder.stats().waiting_requests == 1  # waiting for its KV
    assert await decoder.abort("r")
    fetcher.gate.set()
    assert await task == [TokenChunk((), "abort")]
    assert decoder.stats().waiting_requests == 0 and decoder.scheduler.steps == 0


async def test_held_kv_expires_after_its_ttl_in_wall_clock_seconds() -> None:
    vt = VirtualTime()
    eng = engine(vt, speedup=10.0, config=SimConfig(held_kv_ttl_s=30.0))
    res = await eng.prefill("r", prompt(40), SamplingParams(max_tokens=4))
    vt.now += 29.0
    assert json.loads(eng.export_kv(res.kv.kv_id))["num_tokens"] == 40
    res = await eng.prefill("r", prompt(40), SamplingParams(max_tokens=4))
    assert res.cached_prompt_tokens == 32  # the released KV stayed in the prefix cache
    vt.now += 30.0
    with pytest.raises(KvUnavailable):
        eng.export_kv(res.kv.kv_id)
    assert eng.stats().kv_blocks_used == 0
    await eng.aclose()


async def test_same_engine_decodes_its_own_prefill_without_a_fetcher() -> None:
    vt = VirtualTime()
    eng = engine(vt, address="me:1")
    p, sampling = prompt(33), SamplingParams(max_tokens=3, seed=9)
    res = await eng.prefill("r", p, sampling)
    chunks = await collect(eng.decode("r", p, res.first_token_id, res.kv, sampling))
    assert [res.first_token_id, *flat(chunks)] == expected_tokens("9", 33, 3)
    assert eng.scheduler.prompt_tokens_computed == 33


async def test_abort_ends_the_stream_with_abort_and_frees_kv() -> None:
    vt = VirtualTime()
    eng = engine(vt)
    stream = eng.generate("r", prompt(50), SamplingParams(max_tokens=500))
    first = await anext(stream)
    assert len(first.token_ids) == 1 and eng.stats().kv_blocks_used > 0
    assert await eng.abort("r")
    rest = await collect(stream)
    assert rest[-1] == TokenChunk((), "abort")
    assert eng.stats().kv_blocks_used == 0 and eng.stats().running_requests == 0
    assert not await eng.abort("r")
    assert not await eng.abort("never-seen")
    await eng.aclose()


async def test_bad_input_is_refused_with_invalid_argument() -> None:
    eng = engine(VirtualTime())
    ok = SamplingParams(max_tokens=4)
    with pytest.raises(InvalidArgument, match="empty"):
        await collect(eng.generate("r", (), ok))
    with pytest.raises(InvalidArgument, match="vocabulary"):
        await collect(eng.generate("r", (1, TINY.vocab_size), ok))
    with pytest.raises(InvalidArgument, match="context window"):
        await eng.prefill("r", prompt(TINY.max_context_tokens), ok)
    with pytest.raises(InvalidArgument, match="max_tokens"):
        await collect(eng.generate("r", (1,), SamplingParams(max_tokens=0)))
    with pytest.raises(InvalidArgument, match="KV blocks"):  # fits the context, not the cache
        await collect(eng.generate("r", prompt(1500), ok))
    assert eng.stats().running_requests == 0


async def test_stats_and_kv_events_reflect_the_work_done() -> None:
    eng = engine(VirtualTime())
    shared = prompt(48, 3)
    for i in range(3):
        await collect(eng.generate(f"r{i}", (*shared, i), SamplingParams(max_tokens=4)))
    stats = eng.stats()
    assert stats.prefix_cache_hit_rate == pytest.approx(2 * 48 / (3 * 49))
    assert stats.kv_blocks_total == TINY.kv_capacity_blocks and stats.steps == 12
    stored = [h for e in eng.drain_kv_events() if e.kind == KvEventKind.STORED
              for h in e.block_hashes]  # fmt: skip
    assert set(hash_blocks(shared, 16)) <= set(stored)
    assert eng.drain_kv_events() == []


async def test_build_sim_engine_names_the_profile_and_satisfies_the_contract() -> None:
    eng: InferenceEngine = build_sim_engine(
        "llama-3.1-8b-h100", model="llama-3.1-8b", address="h:1", speedup=100.0
    )
    assert (eng.model, eng.vocab_size, eng.max_context_tokens) == ("llama-3.1-8b", 128256, 131072)
    assert eng.stats().kv_blocks_total == 440_000 // 16
    chunks = await collect(eng.generate("r", tuple(range(1000)), SamplingParams(max_tokens=2)))
    assert len(flat(chunks)) == 2
    assert isinstance(eng, SimEngine)
    await eng.aclose()
