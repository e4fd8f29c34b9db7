"""The TensorRT-LLM adapter (TrtllmEngine) against a hand-written fake of TensorRT-LLM's LLM API.

TensorRT-LLM needs an NVIDIA GPU; these tests pin down what the adapter sends to the LLM API and
how it maps what comes back. tests/gpu/test_trtllm.py runs the same flow on a real engine.
"""

from __future__ import annotations

import asyncio
import base64
import importlib.util
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from controlplane.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    Unavailable,
)
from tests.fakes import (
    FakeClock,
    FakeDisaggregatedParams,
    FakeTrtllmLLM,
    FakeTrtllmRequestError,
    FakeTrtllmSamplingParams,
    fake_trtllm_token,
)
from workers.engine import (
    EngineStats,
    InferenceEngine,
    KvEventKind,
    KvHandle,
    KvUnavailable,
    PrefillResult,
    Role,
    SamplingParams,
    TokenChunk,
)
from workers.engines.trtllm import (
    DEFAULT_CACHE_TRANSCEIVER_BACKEND,
    TrtllmApi,
    TrtllmEngine,
    build_trtllm_engine,
    decode_context_params,
    encode_context_params,
    import_trtllm_api,
    kv_bytes_per_token,
    kv_events_from_trtllm,
    llm_args_for_role,
    model_limits,
    stats_from_iteration,
)
from workers.main import WorkerSettings
from workers.service import kv_from_pb, kv_to_pb

VOCAB = 1000
PROMPT = (11, 22, 33, 44, 55)
GREEDY = SamplingParams(max_tokens=6)
LLAMA_CONFIG = {  # TinyLlama-1.1B's shape
    "vocab_size": 32000,
    "max_position_embeddings": 4096,
    "num_hidden_layers": 22,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "hidden_size": 2048,
}


def make_engine(
    llm: FakeTrtllmLLM | None = None,
    *,
    clock: FakeClock | None = None,
    kv_events: bool = False,
    poll_interval_s: float = 0,  # tests call refresh_stats themselves
) -> TrtllmEngine:
    return TrtllmEngine(
        llm or FakeTrtllmLLM(VOCAB),
        sampling_params=FakeTrtllmSamplingParams,
        disaggregated_params=FakeDisaggregatedParams,
        request_error=FakeTrtllmRequestError,
        model="tiny",
        vocab_size=VOCAB,
        max_context_tokens=64,
        address="10.0.0.7:7001",
        kv_bytes_per_token=1024,
        kv_events=kv_events,
        poll_interval_s=poll_interval_s,
        clock=clock or FakeClock(),
    )


def expected(prompt: tuple[int, ...], n: int) -> list[int]:
    return [fake_trtllm_token(prompt, p, VOCAB) for p in range(n)]


async def collect(stream: AsyncIterator[TokenChunk]) -> list[TokenChunk]:
    return [chunk async for chunk in stream]


def tokens_of(chunks: list[TokenChunk]) -> list[int]:
    return [t for c in chunks for t in c.token_ids]


async def prefill_then_decode(
    prefill: TrtllmEngine, decode: TrtllmEngine, sampling: SamplingParams = GREEDY
) -> tuple[PrefillResult, list[TokenChunk]]:
    res = await prefill.prefill("r1", PROMPT, sampling)
    chunks = await collect(decode.decode("r1", PROMPT, res.first_token_id, res.kv, sampling))
    return res, chunks


def test_the_engine_is_an_inference_engine() -> None:
    engine: InferenceEngine = make_engine()
    assert engine.model == "tiny" and engine.vocab_size == VOCAB


# --- prefill: a context-only request -------------------------------------------------------------


async def test_prefill_sends_a_context_only_request_for_one_token() -> None:
    llm = FakeTrtllmLLM(VOCAB)
    llm.cached_tokens = 3
    engine = make_engine(llm)
    sampling = SamplingParams(max_tokens=6, temperature=0.7, top_p=0.9, seed=5, stop_token_ids=(9,))

    res = await engine.prefill("r1", PROMPT, sampling)

    [call] = llm.calls
    assert call.inputs == {"prompt_token_ids": list(PROMPT)}
    assert call.streaming is False
    assert call.disaggregated_params == FakeDisaggregatedParams(request_type="context_only")
    sp = call.sampling_params
    assert (sp.max_tokens, sp.temperature, sp.top_p, sp.seed) == (1, 0.7, 0.9, 5)
    assert sp.stop_token_ids == [9] and sp.include_stop_str_in_output and not sp.detokenize
    assert res.request_id == "r1"
    assert res.first_token_id == expected(PROMPT, 1)[0]
    assert res.cached_prompt_tokens == 3
    assert res.kv.source_address == "10.0.0.7:7001"
    assert res.kv.num_tokens == len(PROMPT)
    assert res.kv.size_bytes == len(PROMPT) * 1024
    assert res.kv.kv_id == "r1#ctx1"


async def test_prefill_returns_the_context_hand_off_in_engine_params() -> None:
    res = await make_engine().prefill("r1", PROMPT, GREEDY)
    p = res.kv.engine_params
    assert p["engine"] == "trtllm" and p["model"] == "tiny"
    assert p["ctx_request_id"] == "1"
    assert base64.b64decode(p["opaque_state"]) == b"\x00ctx-state\xff" + (1).to_bytes(4, "big")
    assert json.loads(p["first_gen_tokens"]) == [res.first_token_id]
    assert p["disagg_request_id"] == "10001"
    assert p["ctx_dp_rank"] == "0"
    assert json.loads(p["ctx_info_endpoint"]) == "tcp://10.0.0.7:5555"
    assert p["ctx_finish_reason"] == "not_finished"
    assert "draft_tokens" not in p  # None on the context side: not carried
    assert all(isinstance(v, str) for v in p.values())


async def test_engine_params_survive_the_worker_services_json_round_trip() -> None:
    llm = FakeTrtllmLLM(VOCAB)
    prefill, decode = make_engine(llm), make_engine(llm)
    res = await prefill.prefill("r1", PROMPT, GREEDY)

    wire = kv_to_pb(res.kv)  # json.dumps of engine_params, as the Worker service sends it
    back = kv_from_pb(type(wire).FromString(wire.SerializeToString()))

    assert back == res.kv
    chunks = await collect(decode.decode("r1", PROMPT, res.first_token_id, back, GREEDY))
    assert tokens_of(chunks) == expected(PROMPT, 6)[1:]


def test_hand_off_encoding_round_trips_every_carried_field() -> None:
    params = FakeDisaggregatedParams(
        request_type="context_only",
        first_gen_tokens=[7],
        ctx_request_id=42,
        opaque_state=bytes(range(256)),
        draft_tokens=[1, 2, 3],
        disagg_request_id=2**40,
        ctx_dp_rank=3,
        ctx_info_endpoint="tcp://h:1",
    )
    encoded = json.loads(
        json.dumps(encode_context_params(params, model="m", ctx_finish_reason="length"))
    )
    fields, finish = decode_context_params(encoded, model="m")
    assert finish == "length"
    assert FakeDisaggregatedParams(request_type="context_only", **fields) == params


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"engine": "vllm", "ctx_request_id": "1"}, "from engine 'vllm'"),
        ({"engine": "trtllm", "model": "other", "ctx_request_id": "1"}, "for model 'other'"),
        ({"engine": "trtllm"}, "no ctx_request_id"),
        ({"engine": "trtllm", "ctx_request_id": "x"}, "ctx_request_id"),
        ({"engine": "trtllm", "ctx_request_id": "1", "opaque_state": "@@"}, "opaque_state"),
        ({"engine": "trtllm", "ctx_request_id": "1", "first_gen_tokens": "[1.5]"}, "first_gen"),
    ],
)
async def test_decode_rejects_a_hand_off_it_cannot_use(
    params: dict[str, str], message: str
) -> None:
    llm = FakeTrtllmLLM(VOCAB)
    kv = KvHandle("kv", "10.0.0.7:7001", len(PROMPT), 0, engine_params=params)
    with pytest.raises(InvalidArgument, match=message):
        await collect(make_engine(llm).decode("r1", PROMPT, 5, kv, GREEDY))
    assert llm.calls == []


# --- decode: a generation-only request ----------------------------------------------------------


async def test_decode_sends_a_generation_only_request_with_the_hand_off() -> None:
    llm = FakeTrtllmLLM(VOCAB)
    res, _ = await prefill_then_decode(make_engine(llm), make_engine(llm))

    ctx, gen = llm.calls
    assert gen.inputs == {"prompt_token_ids": list(PROMPT)}  # the same prompt
    assert gen.streaming is True
    assert gen.sampling_params.max_tokens == GREEDY.max_tokens  # the total, first token included
    assert ctx.disaggregated_params is not None and gen.disaggregated_params is not None
    handed = llm.requests[0].outputs[0].disaggregated_params
    assert gen.disaggregated_params == FakeDisaggregatedParams(
        **{**vars(handed), "request_type": "generation_only"}
    )
    assert gen.disaggregated_params.opaque_state == handed.opaque_state  # type: ignore[union-attr]
    assert gen.disaggregated_params.first_gen_tokens == [res.first_token_id]


async def test_decode_streams_one_chunk_per_engine_output_without_the_first_token() -> None:
    llm = FakeTrtllmLLM(VOCAB)  # one fake plays both instances: it holds the context's KV
    _, chunks = await prefill_then_decode(make_engine(llm), make_engine(llm))
    want = expected(PROMPT, 6)
    # the engine's first output is [first, t1]: the first token is the prefill worker's
    assert chunks == [TokenChunk((t,), None) for t in want[1:-1]] + [
        TokenChunk((want[-1],), "length")
    ]


async def test_disaggregated_tokens_equal_an_aggregated_run() -> None:
    llm = FakeTrtllmLLM(VOCAB)
    res, chunks = await prefill_then_decode(make_engine(llm), make_engine(llm))
    aggregated = await collect(make_engine(llm).generate("agg", PROMPT, GREEDY))
    assert [res.first_token_id, *tokens_of(chunks)] == tokens_of(aggregated)
    assert tokens_of(aggregated) == expected(PROMPT, 6)
    assert aggregated[-1].finish_reason == chunks[-1].finish_reason == "length"
    agg_call = llm.calls[-1]
    assert agg_call.disaggregated_params is None and agg_call.streaming


async def test_decode_of_one_token_still_releases_the_context_kv() -> None:
    llm = FakeTrtllmLLM(VOCAB)
    _, chunks = await prefill_then_decode(make_engine(llm), make_engine(llm), SamplingParams(1))
    assert chunks == [TokenChunk((), "length")]
    assert len(llm.calls) == 2  # the generation request was sent: it frees the context's KV
    assert llm.held == {}


async def test_decode_stops_without_the_engine_when_the_context_phase_stopped() -> None:
    llm = FakeTrtllmLLM(VOCAB)
    llm.eos_token_id = expected(PROMPT, 1)[0]
    res, chunks = await prefill_then_decode(make_engine(llm), make_engine(llm))
    assert res.kv.engine_params["ctx_finish_reason"] == "stop"
    assert chunks == [TokenChunk((), "stop")]
    assert len(llm.calls) == 1


async def test_decode_stops_when_the_first_token_is_a_stop_token() -> None:
    llm = FakeTrtllmLLM(VOCAB)
    first = expected(PROMPT, 1)[0]
    sampling = SamplingParams(max_tokens=6, stop_token_ids=(first,))
    _, chunks = await prefill_then_decode(make_engine(llm), make_engine(llm), sampling)
    assert chunks == [TokenChunk((), "stop")]
    assert len(llm.calls) == 1


async def test_a_stop_token_ends_the_stream_and_is_kept() -> None:
    stop = expected(PROMPT, 6)[2]
    chunks = await collect(
        make_engine().generate("r1", PROMPT, SamplingParams(6, stop_token_ids=(stop,)))
    )
    assert tokens_of(chunks) == expected(PROMPT, 3)
    assert chunks[-1].finish_reason == "stop"


async def test_a_stream_never_exceeds_max_tokens() -> None:
    llm = FakeTrtllmLLM(VOCAB)
    llm.overshoot = 3  # an engine that runs past max_tokens
    engine = make_engine(llm)
    agg = await collect(engine.generate("a", PROMPT, GREEDY))
    assert tokens_of(agg) == expected(PROMPT, 6) and agg[-1].finish_reason == "length"
    _, dec = await prefill_then_decode(make_engine(llm), engine)
    assert len(tokens_of(dec)) == 5 and dec[-1].finish_reason == "length"
    assert len(llm.aborted) == 2  # the overrunning engine requests were stopped


# --- input validation -----------------------------------------------------------------------------


BAD_INPUTS = [
    pytest.param(PROMPT, SamplingParams(max_tokens=0), "max_tokens", id="max_tokens=0"),
    pytest.param(PROMPT, SamplingParams(max_tokens=-3), "max_tokens", id="max_tokens<0"),
    pytest.param((1, VOCAB), GREEDY, "outside the vocabulary", id="token>=vocab"),
    pytest.param((1, -1), GREEDY, "outside the vocabulary", id="token<0"),
    pytest.param(tuple(range(64)), GREEDY, "context window", id="prompt-too-long"),
    pytest.param(tuple(range(60)), GREEDY, "exceeds the context window", id="no-room"),
    pytest.param((), GREEDY, "empty", id="empty"),
]


@pytest.mark.parametrize(("prompt", "sampling", "message"), BAD_INPUTS)
async def test_bad_input_is_rejected_before_the_engine_is_touched(
    prompt: tuple[int, ...], sampling: SamplingParams, message: str
) -> None:
    llm = FakeTrtllmLLM(VOCAB)
    engine = make_engine(llm)
    kv = KvHandle("kv", "x:1", len(prompt), 0, {"engine": "trtllm", "ctx_request_id": "1"})
    with pytest.raises(InvalidArgument, match=message):
        await engine.prefill("r", prompt, sampling)
    with pytest.raises(InvalidArgument, match=message):
        await collect(engine.generate("r", prompt, sampling))
    with pytest.raises(InvalidArgument, match=message):
        await collect(engine.decode("r", prompt, 1, kv, sampling))
    assert llm.calls == []


async def test_decode_checks_the_first_token_and_the_prompt_length() -> None:
    llm = FakeTrtllmLLM(VOCAB)
    engine = make_engine(llm)
    kv = KvHandle("kv", "x:1", len(PROMPT), 0, {"engine": "trtllm", "ctx_request_id": "1"})
    with pytest.raises(InvalidArgument, match="first_token_id"):
        await collect(engine.decode("r", PROMPT, VOCAB, kv, GREEDY))
    with pytest.raises(InvalidArgument, match="holds 5 prompt tokens"):
        await collect(engine.decode("r", PROMPT[:4], 1, kv, GREEDY))
    assert llm.calls == []


async def test_a_request_id_in_flight_cannot_be_reused() -> None:
    llm = FakeTrtllmLLM(VOCAB)
    llm.gate = asyncio.Event()
    engine = make_engine(llm)
    stream = engine.generate("r1", PROMPT, GREEDY)
    await anext(stream)
    with pytest.raises(AlreadyExists):
        await engine.prefill("r1", PROMPT, GREEDY)
    await stream.aclose()


# --- abort ----------------------------------------------------------------------------------------


async def test_abort_aborts_the_in_flight_output_and_the_stream_ends_with_abort() -> None:
    llm = FakeTrtllmLLM(VOCAB)
    llm.gate = asyncio.Event()  # the request makes one step, then waits
    engine = make_engine(llm)
    stream = engine.generate("r1", PROMPT, GREEDY)
    first = await anext(stream)
    assert first == TokenChunk((expected(PROMPT, 1)[0],), None)

    assert await engine.abort("r1") is True
    rest = await collect(stream)

    assert rest == [TokenChunk((), "abort")]
    assert llm.requests[0].aborted and llm.aborted == [1]
    assert await engine.abort("r1") is False  # no longer running
    assert engine.stats().running_requests == 0


async def test_abort_during_decode_ends_the_stream_with_abort() -> None:
    llm = FakeTrtllmLLM(VOCAB)
    prefill, decode = make_engine(llm), make_engine(llm)
    res = await prefill.prefill("r1", PROMPT, GREEDY)
    llm.gate = asyncio.Event()
    stream = decode.decode("r1", PROMPT, res.first_token_id, res.kv, GREEDY)
    await anext(stream)
    assert await decode.abort("r1")
    assert await collect(stream) == [TokenChunk((), "abort")]
    assert llm.requests[1].aborted


async def test_abort_of_an_unknown_request_is_false() -> None:
    assert await make_engine().abort("nope") is False


async def test_a_caller_that_goes_away_aborts_the_engine_request() -> None:
    llm = FakeTrtllmLLM(VOCAB)
    llm.gate = asyncio.Event()
    engine = make_engine(llm)
    stream = engine.generate("r1", PROMPT, GREEDY)
    await anext(stream)
    await stream.aclose()  # e.g. the gRPC client hung up
    assert llm.requests[0].aborted
    assert await engine.abort("r1") is False


async def test_a_finished_request_is_not_aborted() -> None:
    llm = FakeTrtllmLLM(VOCAB)
    engine = make_engine(llm)
    await engine.prefill("r1", PROMPT, GREEDY)  # its KV must stay held for the decode side
    await collect(engine.generate("r2", PROMPT, GREEDY))
    assert llm.aborted == []


# --- error translation ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "expected_type"),
    [
        (ValueError("The sum of prompt length and max_tokens should not exceed max_seq_len"),
         InvalidArgument),
        (TypeError("bad inputs"), InvalidArgument),
        (RuntimeError("LLM is shutting down"), Unavailable),
        (FakeTrtllmRequestError("queue full"), Unavailable),
    ],
)  # fmt: skip
async def test_submission_errors_are_translated(
    error: Exception, expected_type: type[Exception]
) -> None:
    llm = FakeTrtllmLLM(VOCAB)
    llm.fail_submit = error
    engine = make_engine(llm)
    with pytest.raises(expected_type, match=str(error)):
        await engine.prefill("r1", PROMPT, GREEDY)
    with pytest.raises(expected_type, match=str(error)):
        await collect(engine.generate("r2", PROMPT, GREEDY))
    assert engine.stats().running_requests == 0 and not engine._flights


async def test_engine_failures_mid_request_are_unavailable() -> None:
    llm = FakeTrtllmLLM(VOCAB)
    llm.fail_stream_after = 2
    engine = make_engine(llm)
    stream = engine.generate("r1", PROMPT, GREEDY)
    assert len(tokens_of([await anext(stream), await anext(stream)])) == 2
    with pytest.raises(Unavailable, match="engine failure mid-request") as info:
        await anext(stream)
    assert not isinstance(info.value, KvUnavailable)
    assert isinstance(info.value.__cause__, FakeTrtllmRequestError)


async def test_a_failed_context_phase_is_unavailable() -> None:
    llm = FakeTrtllmLLM(VOCAB)
    llm.fail_stream_after = 0
    with pytest.raises(Unavailable, match="engine failure"):
        await make_engine(llm).prefill("r1", PROMPT, GREEDY)


async def test_decode_of_a_kv_that_is_gone_raises_kv_unavailable() -> None:
    llm = FakeTrtllmLLM(VOCAB)
    prefill, decode = make_engine(llm), make_engine(llm)
    res = await prefill.prefill("r1", PROMPT, GREEDY)
    llm.held.clear()  # the context side timed out and dropped the KV
    with pytest.raises(KvUnavailable, match="is gone"):
        await collect(decode.decode("r1", PROMPT, res.first_token_id, res.kv, GREEDY))


async def test_a_generation_failure_after_tokens_is_not_a_kv_problem() -> None:
    llm = FakeTrtllmLLM(VOCAB)
    prefill, decode = make_engine(llm), make_engine(llm)
    res = await prefill.prefill("r1", PROMPT, GREEDY)
    llm.fail_stream_after = 2
    stream = decode.decode("r1", PROMPT, res.first_token_id, res.kv, GREEDY)
    got = [await anext(stream) for _ in range(2)]
    assert len(tokens_of(got)) == 2
    with pytest.raises(Unavailable) as info:
        await anext(stream)
    assert not isinstance(info.value, KvUnavailable)


async def test_export_kv_says_the_kv_is_not_served_over_fetch_kv() -> None:
    with pytest.raises(FailedPrecondition, match="cache transceiver"):
        make_engine().export_kv("r1#ctx1")


# --- stats and KV events --------------------------------------------------------------------------


def iteration(it: int, **over: object) -> dict[str, object]:
    record: dict[str, object] = {
        "iter": it,
        "numActiveRequests": 3,
        "numQueuedRequests": 2,
        "maxNumActiveRequests": 64,
        "inflightBatchingStats": {"numScheduledRequests": 3, "numPausedRequests": 1,
                                  "numContextRequests": 1, "numGenRequests": 2},
        "kvCacheStats": {"maxNumBlocks": 500, "usedNumBlocks": 120, "freeNumBlocks": 380,
                         "tokensPerBlock": 32, "cacheHitRate": 0.25},
    }  # fmt: skip
    record.update(over)
    return record


def test_iteration_stats_map_onto_engine_stats() -> None:
    s = stats_from_iteration(iteration(9), EngineStats(max_batch_size_seen=7))
    assert s == EngineStats(
        running_requests=3,
        waiting_requests=3,  # queued + paused
        kv_blocks_used=120,
        kv_blocks_total=500,
        prefix_cache_hit_rate=0.25,
        last_batch_size=3,
        max_batch_size_seen=7,
        steps=10,
    )
    # a JSON string (some releases) and a sparse record (keys missing keep what was known)
    again = stats_from_iteration(json.dumps({"iter": 10, "numActiveRequests": 1}), s)
    assert (again.running_requests, again.kv_blocks_total, again.steps) == (1, 500, 11)


async def test_stats_are_polled_while_busy_and_cheap_to_read() -> None:
    llm = FakeTrtllmLLM(VOCAB)
    llm.gate = asyncio.Event()
    clock = FakeClock(100.0)
    engine = make_engine(llm, clock=clock)
    assert engine.stats() == EngineStats(queued_prefill_tokens=0)

    stream = engine.generate("r1", PROMPT, GREEDY)
    await anext(stream)  # one token out
    llm.stats_records = [iteration(1), json.dumps(iteration(2, numActiveRequests=1))]
    clock.now = 102.0
    await engine.refresh_stats()

    s = engine.stats()
    assert (s.running_requests, s.waiting_requests, s.kv_blocks_total, s.steps) == (1, 3, 500, 3)
    assert s.tokens_per_second == pytest.approx(0.5)  # 1 token over 2 s
    assert llm.stats_records == []

    llm.gate.set()
    await collect(stream)
    llm.stats_records = [iteration(7)]
    clock.now = 104.0
    # one more fetch after the last request finished; TensorRT-LLM's shared IterationResult
    # went "done" after the first drain, so this also checks the poller revives it
    await engine.refresh_stats()
    s = engine.stats()
    assert s.kv_blocks_used == 120 and s.steps == 8
    assert s.running_requests == 0 and s.waiting_requests == 0  # nothing in flight here
    assert s.tokens_per_second == pytest.approx(2.5)  # the other 5 tokens over 2 s

    llm.stats_records = [iteration(99)]
    clock.now = 106.0
    await engine.refresh_stats()  # idle: TensorRT-LLM is not asked
    assert llm.stats_records == [iteration(99)]
    assert engine.stats().tokens_per_second == 0.0


class EndlessStats:
    """A busy engine: a new iteration record every time one is read, 10 ms apart."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.records: list[object] = []
        self.served = 0

    def __aiter__(self) -> EndlessStats:
        return self

    async def __anext__(self) -> dict[str, object]:
        self.clock.now += 0.01
        self.served += 1
        return iteration(self.served)


async def test_a_stats_drain_ends_while_the_engine_keeps_reporting() -> None:
    llm = FakeTrtllmLLM(VOCAB)
    clock = FakeClock()
    engine = make_engine(llm, clock=clock)  # stats_timeout_s = 0.05
    endless = EndlessStats(clock)
    llm.stats_result = endless  # type: ignore[assignment]
    await collect(engine.generate("r1", PROMPT, GREEDY))
    await engine.refresh_stats()
    assert 5 <= endless.served <= 7
    assert engine.stats().steps == endless.served + 1  # the newest record wins


async def test_stats_survive_a_failing_or_odd_engine() -> None:
    llm = FakeTrtllmLLM(VOCAB)
    engine = make_engine(llm)
    await collect(engine.generate("r1", PROMPT, GREEDY))
    llm.stats_records = [None, "not json", {"iter": "x"}, iteration(4)]
    await engine.refresh_stats()
    assert engine.stats().steps == 5


async def test_the_stats_task_runs_in_the_background() -> None:
    llm = FakeTrtllmLLM(VOCAB)
    engine = make_engine(llm, poll_interval_s=0.001)
    await collect(engine.generate("r1", PROMPT, GREEDY))
    llm.stats_records = [iteration(1)]
    for _ in range(200):
        if engine.stats().kv_blocks_total:
            break
        await asyncio.sleep(0.005)
    assert engine.stats().kv_blocks_total == 500
    await engine.aclose()
    assert llm.shut_down


def test_kv_cache_events_map_onto_kv_events() -> None:
    events = [
        {"event_id": 1, "data": {"type": "created", "num_blocks_per_cache_level": [10]}},
        {"event_id": 2, "data": {"type": "stored", "parent_hash": None,
                                 "blocks": [{"block_hash": 5, "tokens": []},
                                            {"block_hash": -1, "tokens": []}]}},
        json.dumps({"event_id": 3, "data": {"type": "removed", "block_hashes": [5]}}),
        {"event_id": 4, "data": {"type": "updated", "block_hash": 5}},
        [{"event_id": 5, "data": {"type": "removed", "block_hashes": [7, 8]}}],  # per iteration
    ]  # fmt: skip
    got = kv_events_from_trtllm(events)
    assert [(e.kind, e.block_hashes) for e in got] == [
        (KvEventKind.STORED, (5, 2**64 - 1)),  # uint64 on the wire
        (KvEventKind.EVICTED, (5,)),
        (KvEventKind.EVICTED, (7, 8)),
    ]


async def test_kv_events_are_drained_when_enabled() -> None:
    llm = FakeTrtllmLLM(VOCAB)
    engine = make_engine(llm, kv_events=True)
    await collect(engine.generate("r1", PROMPT, GREEDY))
    llm.kv_event_records = [{"data": {"type": "stored", "blocks": [{"block_hash": 9}]}}]
    await engine.refresh_stats()
    assert [e.block_hashes for e in engine.drain_kv_events()] == [(9,)]
    assert engine.drain_kv_events() == []


# --- composition ----------------------------------------------------------------------------------


def test_prefill_and_decode_workers_get_a_cache_transceiver() -> None:
    prefill = llm_args_for_role({"max_batch_size": 8}, Role.PREFILL)
    assert prefill == {
        "max_batch_size": 8,
        "enable_iter_perf_stats": True,
        "cache_transceiver_config": {"backend": DEFAULT_CACHE_TRANSCEIVER_BACKEND},
        "disable_overlap_scheduler": True,
    }
    decode = llm_args_for_role({}, Role.DECODE)
    assert decode["cache_transceiver_config"] == {"backend": "DEFAULT"}
    assert "disable_overlap_scheduler" not in decode
    both = llm_args_for_role({}, Role.BOTH)
    assert both == {"enable_iter_perf_stats": True}


def test_the_operators_engine_args_win() -> None:
    args = {
        "cache_transceiver_config": {"backend": "NIXL", "kv_transfer_timeout_ms": 30000},
        "enable_iter_perf_stats": False,
        "disable_overlap_scheduler": False,
    }
    assert llm_args_for_role(args, Role.PREFILL) == args
    filled = llm_args_for_role({"cache_transceiver_config": {"max_tokens_in_buffer": 4096}},
                               Role.DECODE)  # fmt: skip
    assert filled["cache_transceiver_config"] == {
        "max_tokens_in_buffer": 4096,
        "backend": "DEFAULT",
    }
    with pytest.raises(InvalidArgument, match="model-path"):
        llm_args_for_role({"model": "x"}, Role.BOTH)


def test_model_limits_and_kv_size_come_from_the_model_config() -> None:
    llama = LLAMA_CONFIG
    assert model_limits(llama, {}, None) == (32000, 4096)
    assert model_limits(llama, {}, 2048) == (32000, 2048)
    assert model_limits(llama, {"max_seq_len": 1024}, 2048) == (32000, 1024)
    assert model_limits({"text_config": llama}, {}, None) == (32000, 4096)
    assert kv_bytes_per_token(llama) == 2 * 22 * 4 * 64 * 2
    assert kv_bytes_per_token({**llama, "head_dim": 128}, 1) == 2 * 22 * 4 * 128
    assert kv_bytes_per_token({}) == 0
    with pytest.raises(FailedPrecondition, match="vocab_size"):
        model_limits({}, {}, None)
    with pytest.raises(FailedPrecondition, match="max_seq_len"):
        model_limits({"vocab_size": 10}, {}, None)


def test_a_missing_tensorrt_llm_is_a_failed_precondition() -> None:
    with pytest.raises(FailedPrecondition, match="pip install tensorrt-llm"):
        import_trtllm_api("switchboard_no_such_module")


@pytest.mark.skipif(
    importlib.util.find_spec("tensorrt_llm") is not None, reason="TensorRT-LLM is installed here"
)
def test_build_without_tensorrt_llm_raises_failed_precondition() -> None:
    settings = WorkerSettings(engine="trtllm", role=Role.PREFILL, model_path="/models/tiny")
    with pytest.raises(FailedPrecondition) as info:
        build_trtllm_engine(settings, "127.0.0.1:7001", None)
    message = str(info.value)
    assert "the trtllm engine needs TensorRT-LLM and an NVIDIA GPU" in message
    assert "pip install tensorrt-llm" in message


def test_build_needs_a_model_path_and_valid_engine_args() -> None:
    with pytest.raises(InvalidArgument, match="model-path"):
        build_trtllm_engine(WorkerSettings(engine="trtllm"), "127.0.0.1:7001", None)
    bad = WorkerSettings(engine="trtllm", model_path="/m", engine_args="[1]")
    with pytest.raises(InvalidArgument, match="JSON object"):
        build_trtllm_engine(bad, "127.0.0.1:7001", None)


def fake_api(made: dict[str, Any], error: Exception | None = None) -> TrtllmApi:
    def llm(**kwargs: Any) -> FakeTrtllmLLM:
        if error is not None:
            raise error
        made.update(kwargs)
        return FakeTrtllmLLM(32000)

    return TrtllmApi(
        llm=llm,
        sampling_params=FakeTrtllmSamplingParams,
        disaggregated_params=FakeDisaggregatedParams,
        request_error=FakeTrtllmRequestError,
    )


async def test_build_wires_an_llm_from_the_worker_settings(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(LLAMA_CONFIG))
    kv_cache = {"event_buffer_max_size": 1024, "enable_block_reuse": True, "dtype": "fp8"}
    settings = WorkerSettings(
        model="tiny-llama",
        engine="trtllm",
        role=Role.PREFILL,
        model_path=str(tmp_path),
        engine_args=json.dumps({"max_seq_len": 2048, "kv_cache_config": kv_cache}),
    )
    made: dict[str, Any] = {}
    engine = build_trtllm_engine(settings, "10.0.0.7:7001", None, api=fake_api(made))

    assert made == {
        "model": str(tmp_path),
        "max_seq_len": 2048,
        "kv_cache_config": kv_cache,
        "enable_iter_perf_stats": True,
        "cache_transceiver_config": {"backend": "DEFAULT"},
        "disable_overlap_scheduler": True,
    }
    assert (engine.model, engine.vocab_size, engine.max_context_tokens) == (
        "tiny-llama",
        32000,
        2048,
    )
    assert engine.kv_bytes_per_token == 2 * 22 * 4 * 64 * 1  # fp8 KV cache
    assert engine.address == "10.0.0.7:7001"
    res = await engine.prefill("r1", PROMPT, GREEDY)  # the engine works over what LLM() returned
    assert res.kv.engine_params["model"] == "tiny-llama"
    assert engine._kv_events_enabled  # event_buffer_max_size > 0


@pytest.mark.parametrize(
    ("error", "expected_type"),
    [(ValueError("LLM got invalid argument: bogus"), InvalidArgument),
     (RuntimeError("CUDA out of memory"), FailedPrecondition)],
)  # fmt: skip
def test_build_translates_llm_start_failures(
    tmp_path: Path, error: Exception, expected_type: type[Exception]
) -> None:
    (tmp_path / "config.json").write_text(json.dumps(LLAMA_CONFIG))
    settings = WorkerSettings(engine="trtllm", model_path=str(tmp_path))
    with pytest.raises(expected_type, match=str(error)):
        build_trtllm_engine(settings, "10.0.0.7:7001", None, api=fake_api({}, error))


async def test_queued_prefill_tokens_count_prompts_until_their_first_output() -> None:
    llm = FakeTrtllmLLM(VOCAB)
    llm.first_gate = asyncio.Event()
    prefill, decode = make_engine(llm), make_engine(llm)
    ctx = asyncio.create_task(prefill.prefill("r1", PROMPT, GREEDY))
    longer = (*PROMPT, *PROMPT)
    agg = prefill.generate("r2", longer, GREEDY)
    first = asyncio.create_task(anext(agg))
    while len(llm.calls) < 2:
        await asyncio.sleep(0)
    assert prefill.stats().queued_prefill_tokens == len(PROMPT) + len(longer)
    llm.first_gate.set()
    res = await ctx
    await first
    assert prefill.stats().queued_prefill_tokens == 0  # first outputs back
    await collect(agg)
    # a generation-only request loads the context worker's KV: nothing to prefill
    llm.first_gate = asyncio.Event()
    stream = decode.decode("r1", PROMPT, res.first_token_id, res.kv, GREEDY)
    step = asyncio.create_task(anext(stream))
    while len(llm.calls) < 3:
        await asyncio.sleep(0)
    assert decode.stats().queued_prefill_tokens == 0
    llm.first_gate.set()
    await step
    await collect(stream)
