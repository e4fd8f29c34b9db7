"""The vLLM adapter without vLLM: its mapping helpers, and ``VllmEngine`` over a fake AsyncLLM."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, cast

import pytest

from controlplane.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from workers.engine import (
    EngineStats,
    KvEvent,
    KvEventKind,
    KvUnavailable,
    Role,
    SamplingParams,
    TokenChunk,
)
from workers.engines.vllm import (
    VllmEngine,
    VllmEngineConfig,
    VllmStatsRecorder,
    block_hash_to_int,
    build_vllm_engine,
    engine_params_from_kv_transfer,
    finish_reason,
    kv_event_from_vllm,
    kv_events_subscription,
    kv_transfer_from_engine_params,
    prefill_kv_transfer_params,
    translate_error,
    vllm_engine_kwargs,
)
from workers.main import WorkerSettings
from workers.service import kv_from_pb, kv_to_pb

# What NixlConnector.request_finished returns on the prefill side (vLLM 0.32, pull mode).
NIXL_PARAMS: dict[str, Any] = {
    "do_remote_prefill": True,
    "do_remote_decode": False,
    "remote_block_ids": [[3, 4, 5]],
    "remote_engine_id": "e-1",
    "remote_request_id": "r1",
    "remote_host": "10.0.0.7",
    "remote_port": 5600,
    "tp_size": 1,
    "remote_num_tokens": 300,
    "remote_blocks_expiry_time": None,
}


# -- mapping helpers ------------------------------------------------------------------------------


def test_kv_transfer_params_round_trip_through_the_grpc_handle() -> None:
    engine_params = engine_params_from_kv_transfer(
        NIXL_PARAMS, kv_connector="NixlConnector", seed=42
    )
    assert all(isinstance(v, str) for v in engine_params.values())
    assert engine_params["engine"] == "vllm"
    assert engine_params["seed"] == "42"

    from workers.engine import KvHandle

    handle = KvHandle("r1", "127.0.0.1:5", 300, 1200, engine_params)
    back = kv_from_pb(kv_to_pb(handle))  # the JSON the Worker gRPC API carries
    assert back.engine_params == engine_params
    params = kv_transfer_from_engine_params(back.engine_params, kv_connector="NixlConnector")
    assert params == NIXL_PARAMS  # already do_remote_prefill=True, do_remote_decode=False

    # ExampleConnector returns no params: decode still asks for a remote prefill.
    empty = engine_params_from_kv_transfer(None, kv_connector="ExampleConnector")
    assert "seed" not in empty
    assert kv_transfer_from_engine_params(empty, kv_connector="ExampleConnector") == {
        "do_remote_prefill": True,
        "do_remote_decode": False,
    }


def test_prefill_asks_the_connector_to_keep_kv_for_a_remote_decode() -> None:
    params = prefill_kv_transfer_params()
    assert params["do_remote_decode"] is True
    assert params["do_remote_prefill"] is False


@pytest.mark.parametrize(
    ("engine_params", "message"),
    [
        ({"engine": "sim"}, "engine 'sim'"),
        ({"engine": "vllm", "kv_connector": "NixlConnector"}, "KV connector"),
        (
            {"engine": "vllm", "kv_connector": "ExampleConnector", "kv_transfer_params": "{x"},
            "not JSON",
        ),
        (
            {"engine": "vllm", "kv_connector": "ExampleConnector", "kv_transfer_params": "[1]"},
            "JSON object",
        ),
    ],
)
def test_handles_that_cannot_be_decoded_here_are_invalid(
    engine_params: dict[str, str], message: str
) -> None:
    with pytest.raises(InvalidArgument, match=message):
        kv_transfer_from_engine_params(engine_params, kv_connector="ExampleConnector")


@pytest.mark.parametrize(
    ("vllm_reason", "ours"),
    [
        (None, None),
        ("stop", "stop"),
        ("length", "length"),
        ("abort", "abort"),
        ("repetition", "stop"),
        ("error", "error"),
        ("something-new", "stop"),
    ],
)
def test_finish_reason_mapping(vllm_reason: str | None, ours: str | None) -> None:
    assert finish_reason(vllm_reason) == ours


# Exceptions named (and nested) like vLLM 0.32's: vllm/exceptions.py, vllm/v1/engine/exceptions.py.
class VLLMError(Exception):
    pass


class VLLMClientError(VLLMError):
    pass


class VLLMValidationError(VLLMClientError):
    pass


class VLLMNotFoundError(VLLMClientError):
    pass


class VLLMServerError(VLLMError):
    pass


class EngineDeadError(VLLMServerError):
    pass


class GracefulHTTPError(VLLMError):
    def __init__(self, message: str, http_status: int) -> None:
        super().__init__(message)
        self.http_status = http_status


class QueueOverflowError(GracefulHTTPError):
    def __init__(self) -> None:
        super().__init__("busy", 503)


@pytest.mark.parametrize(
    ("error", "ours"),
    [
        (VLLMValidationError("bad"), InvalidArgument),
        (VLLMNotFoundError("lora"), NotFound),
        (VLLMClientError("other client error"), InvalidArgument),
        (EngineDeadError("dead"), Unavailable),
        (QueueOverflowError(), Unavailable),
        (GracefulHTTPError("conflict", 409), InvalidArgument),
    ],
)
def test_vllm_errors_become_switchboard_errors(error: Exception, ours: type[Exception]) -> None:
    translated = translate_error(error)
    assert type(translated) is ours
    assert str(error) in str(translated)


def test_unknown_errors_pass_through_untranslated() -> None:
    error = RuntimeError("boom")
    assert translate_error(error) is error
    mine = NotFound("mine")
    assert translate_error(mine) is mine


# Hand-built stats shaped like vllm.v1.metrics.stats (0.32).
@dataclass
class PrefixCacheStats:
    queries: int = 0
    hits: int = 0


@dataclass
class SchedulerStats:
    num_running_reqs: int = 0
    num_waiting_reqs: int = 0
    kv_cache_usage: float = 0.0
    prefix_cache_stats: PrefixCacheStats = field(default_factory=PrefixCacheStats)


@dataclass
class IterationStats:
    num_prompt_tokens: int = 0
    num_generation_tokens: int = 0


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_stats_map_scheduler_and_iteration_stats() -> None:
    clock = FakeClock()
    recorder = VllmStatsRecorder(kv_blocks_total=200, window_s=2.0, clock=clock)
    assert recorder.snapshot() == EngineStats(kv_blocks_total=200, batch_context_tokens=0)

    recorder.record(
        SchedulerStats(3, 2, 0.25, PrefixCacheStats(queries=512, hits=128)),
        IterationStats(num_prompt_tokens=512, num_generation_tokens=3),
    )
    clock.now += 1.0
    recorder.record(SchedulerStats(5, 0, 0.5), IterationStats(num_generation_tokens=5))
    clock.now += 0.5
    recorder.record(SchedulerStats(1, 0, 0.105), None)
    assert recorder.snapshot().last_batch_size == 1
    s = recorder.snapshot()
    assert s.running_requests == 1
    assert s.waiting_requests == 0
    assert s.kv_blocks_used == 21  # round(0.105 * 200)
    assert s.kv_blocks_total == 200
    assert s.batch_context_tokens == 21 * 16  # blocks in use x block size
    assert s.queued_prefill_tokens is None and s.dp_rank_running == ()  # not known; one rank
    assert s.prefix_cache_hit_rate == pytest.approx(0.25)
    assert s.tokens_per_second == pytest.approx((515 + 5) / 2.0)
    assert s.last_batch_size == 1
    assert s.max_batch_size_seen == 5
    assert s.steps == 3

    # A prefill-only step: its request finished in the step (0 running after), 1 token made.
    recorder.record(SchedulerStats(0, 0, 0.105), IterationStats(num_prompt_tokens=0))
    recorder.record(SchedulerStats(0, 0, 0.105), IterationStats(num_generation_tokens=1))
    assert recorder.snapshot().last_batch_size == 1
    assert recorder.snapshot().tokens_per_second == pytest.approx((515 + 5 + 1) / 2.0)

    clock.now += 1.0  # the first iteration leaves the 2 s window
    assert recorder.snapshot().tokens_per_second == pytest.approx((5 + 1) / 2.0)
    clock.now += 5.0
    assert recorder.snapshot().tokens_per_second == 0.0


def test_stats_sum_the_dp_ranks_and_report_each() -> None:
    """With DP attention vLLM's stat logger hears from each rank (``engine_idx``)."""
    recorder = VllmStatsRecorder(kv_blocks_total=100, clock=FakeClock())
    recorder.record(SchedulerStats(3, 1, 0.2), None, engine_idx=0)
    recorder.record(SchedulerStats(1, 0, 0.4), None, engine_idx=1)
    recorder.record(SchedulerStats(2, 2, 0.4), None, engine_idx=0)  # rank 0 again: replaces
    s = recorder.snapshot()
    assert (s.running_requests, s.waiting_requests) == (3, 2)
    assert s.dp_rank_running == (2, 1)
    assert s.kv_blocks_used == 40  # the ranks' mean usage


# Named like vllm.distributed.kv_events (0.32).
@dataclass
class BlockStored:
    block_hashes: list[bytes | int]


@dataclass
class BlockRemoved:
    block_hashes: list[bytes | int]


class AllBlocksCleared:
    pass


def test_kv_events_map_to_ours() -> None:
    digest = bytes(range(1, 33))  # a sha256 block hash
    assert block_hash_to_int(digest) == int.from_bytes(digest[:8], "big")
    assert block_hash_to_int(b"\x01") == 1
    assert block_hash_to_int(-1) == 2**64 - 1
    assert kv_event_from_vllm(BlockStored([digest, 7])) == KvEvent(
        KvEventKind.STORED, (int.from_bytes(digest[:8], "big"), 7)
    )
    assert kv_event_from_vllm(BlockRemoved([9])) == KvEvent(KvEventKind.EVICTED, (9,))
    assert kv_event_from_vllm(AllBlocksCleared()) is None


def test_kv_events_subscription_from_config() -> None:
    assert kv_events_subscription(None) is None
    assert kv_events_subscription({"enable_kv_cache_events": False}) is None
    assert kv_events_subscription({"enable_kv_cache_events": True, "publisher": "null"}) is None
    assert kv_events_subscription({"enable_kv_cache_events": True}) == ("tcp://127.0.0.1:5557", "")
    assert kv_events_subscription(
        {"enable_kv_cache_events": True, "endpoint": "ipc:///tmp/x.sock", "topic": "kv"}
    ) == ("ipc:///tmp/x.sock", "kv")


def test_engine_kwargs_from_settings_and_engine_args() -> None:
    kv = {"kv_connector": "ExampleConnector", "kv_connector_extra_config": {"p": "/kv"}}
    kwargs = vllm_engine_kwargs(
        model_path="/models/m",
        served_model_name="m",
        role=Role.PREFILL,
        engine_args={"max_model_len": 2048, "kv_transfer_config": kv},
    )
    assert kwargs["model"] == "/models/m"
    assert kwargs["served_model_name"] == "m"
    assert kwargs["max_model_len"] == 2048
    assert kwargs["kv_transfer_config"]["kv_role"] == "kv_producer"
    assert "kv_role" not in kv  # the caller's dict is not changed
    for role, kv_role in [(Role.DECODE, "kv_consumer"), (Role.BOTH, "kv_both")]:
        got = vllm_engine_kwargs(
            model_path="/m",
            served_model_name="m",
            role=role,
            engine_args={"kv_transfer_config": kv},
        )
        assert got["kv_transfer_config"]["kv_role"] == kv_role

    with pytest.raises(InvalidArgument, match="kv_producer or kv_both"):
        vllm_engine_kwargs(
            model_path="/m",
            served_model_name="m",
            role=Role.PREFILL,
            engine_args={"kv_transfer_config": {**kv, "kv_role": "kv_consumer"}},
        )
    with pytest.raises(InvalidArgument, match="kv_consumer or kv_both"):
        vllm_engine_kwargs(
            model_path="/m",
            served_model_name="m",
            role=Role.DECODE,
            engine_args={"kv_transfer_config": {**kv, "kv_role": "kv_producer"}},
        )
    with pytest.raises(InvalidArgument, match="--model-path"):
        vllm_engine_kwargs(model_path="", served_model_name="m", role=Role.BOTH, engine_args={})


def test_build_without_vllm_is_a_failed_precondition() -> None:
    pytest.importorskip("controlplane")  # always there; vllm is not in the main venv
    try:
        import vllm  # type: ignore[import-not-found,unused-ignore]  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("vLLM is installed in this Python")
    settings = WorkerSettings(engine="vllm", model="m", model_path="/models/m", role=Role.BOTH)
    with pytest.raises(FailedPrecondition, match=r"setup-vllm-cpu\.sh"):
        build_vllm_engine(settings, "127.0.0.1:1", None)


# -- VllmEngine over a fake AsyncLLM --------------------------------------------------------------


@dataclass
class Completion:
    token_ids: list[int]
    finish_reason: str | None = None


@dataclass
class Output:
    outputs: list[Completion]
    finished: bool = False
    kv_transfer_params: dict[str, Any] | None = None
    num_cached_tokens: int | None = None


Step = tuple[list[int], str | None]


@dataclass
class Call:
    prompt: Any
    params: dict[str, Any]
    request_id: str


class FakeAsyncLlm:
    """Streams scripted steps per request (DELTA outputs); ``abort`` ends a stream like vLLM."""

    def __init__(
        self,
        script: Callable[[Call], list[Step]],
        *,
        kv_transfer_params: dict[str, Any] | None = None,
        fail_with: Exception | None = None,
        step_delay_s: float = 0.0,
    ) -> None:
        self.script = script
        self.kv_transfer_params = kv_transfer_params
        self.fail_with = fail_with
        self.step_delay_s = step_delay_s
        self.calls: list[Call] = []
        self.aborted: list[str] = []
        self.released: list[tuple[str, dict[str, Any]]] = []
        self.shut_down = False
        self._abort_events: dict[str, asyncio.Event] = {}

    async def generate(
        self, prompt: Any, sampling_params: Any, request_id: str
    ) -> AsyncIterator[Any]:
        call = Call(prompt, sampling_params, request_id)
        self.calls.append(call)
        if self.fail_with is not None:
            raise self.fail_with
        aborted = self._abort_events.setdefault(request_id, asyncio.Event())
        try:
            steps = self.script(call)
            for i, (ids, reason) in enumerate(steps):
                if self.step_delay_s:
                    await asyncio.sleep(self.step_delay_s)
                if aborted.is_set():
                    yield Output([Completion([], "abort")], finished=True)
                    return
                last = i == len(steps) - 1
                yield Output(
                    [Completion(ids, reason)],
                    finished=last,
                    kv_transfer_params=self.kv_transfer_params if last else None,
                    num_cached_tokens=0,
                )
        finally:
            self._abort_events.pop(request_id, None)

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)
        event = self._abort_events.get(request_id)
        if event is not None:
            event.set()

    async def notify_kv_transfer_request_rejected(
        self, request_id: str, kv_transfer_params: dict[str, Any]
    ) -> None:
        self.released.append((request_id, kv_transfer_params))

    def shutdown(self) -> None:
        self.shut_down = True


class FakeApi:
    """Builds plain dicts where the real adapter builds vLLM's SamplingParams / TokensPrompt."""

    def sampling_params(
        self,
        sampling: SamplingParams,
        *,
        max_tokens: int,
        seed: int | None,
        kv_transfer_params: dict[str, Any] | None,
    ) -> dict[str, Any]:
        return {
            "max_tokens": max_tokens,
            "temperature": sampling.temperature,
            "seed": seed,
            "kv_transfer_params": kv_transfer_params,
        }

    def tokens_prompt(self, prompt_token_ids: tuple[int, ...]) -> Any:
        return {"prompt_token_ids": list(prompt_token_ids)}


def greedy(call: Call) -> list[Step]:
    """Token i of a request is 100 + i; one token per step; "length" at max_tokens."""
    n = call.params["max_tokens"]
    return [([100 + i], "length" if i == n - 1 else None) for i in range(n)]


def engine(
    llm: FakeAsyncLlm, *, kv_role: str = "kv_both", kv_connector: str = "NixlConnector"
) -> VllmEngine:
    config = VllmEngineConfig(
        model="m",
        max_context_tokens=64,
        vocab_size=1000,
        address="127.0.0.1:7",
        kv_connector=kv_connector,
        kv_role=kv_role,
        kv_bytes_per_token=10,
    )
    return VllmEngine(
        llm, api=FakeApi(), config=config, stats=VllmStatsRecorder(), rng_seed=lambda: 1234
    )


PROMPT = (5, 6, 7, 8)


async def test_prefill_then_decode_streams_only_the_tokens_after_the_first() -> None:
    llm = FakeAsyncLlm(greedy, kv_transfer_params=NIXL_PARAMS)
    eng = engine(llm)
    res = await eng.prefill("r1", PROMPT, SamplingParams(max_tokens=5))
    assert llm.calls[0].params["max_tokens"] == 1
    assert llm.calls[0].params["kv_transfer_params"] == prefill_kv_transfer_params()
    assert llm.calls[0].prompt == {"prompt_token_ids": list(PROMPT)}
    assert res.first_token_id == 100
    assert res.kv.kv_id == "r1"
    assert res.kv.source_address == "127.0.0.1:7"
    assert (res.kv.num_tokens, res.kv.size_bytes) == (4, 40)
    assert "seed" not in res.kv.engine_params  # greedy: nothing to pin

    chunks = [c async for c in eng.decode("r1", PROMPT, 100, res.kv, SamplingParams(max_tokens=5))]
    decode_call = llm.calls[1]
    assert decode_call.params["max_tokens"] == 5
    assert decode_call.params["kv_transfer_params"] == NIXL_PARAMS
    assert [c.token_ids for c in chunks] == [(101,), (102,), (103,), (104,)]
    assert [c.finish_reason for c in chunks] == [None, None, None, "length"]


async def test_sampled_prefill_pins_a_seed_that_decode_reuses() -> None:
    llm = FakeAsyncLlm(greedy, kv_transfer_params=NIXL_PARAMS)
    eng = engine(llm)
    sampled = SamplingParams(max_tokens=3, temperature=0.8)
    res = await eng.prefill("r1", PROMPT, sampled)
    assert llm.calls[0].params["seed"] == 1234
    assert res.kv.engine_params["seed"] == "1234"
    _ = [c async for c in eng.decode("r1", PROMPT, 100, res.kv, sampled)]
    assert llm.calls[1].params["seed"] == 1234


async def test_decode_of_one_token_ends_at_once_and_releases_the_remote_kv() -> None:
    llm = FakeAsyncLlm(greedy, kv_transfer_params=NIXL_PARAMS)
    eng = engine(llm)
    res = await eng.prefill("r1", PROMPT, SamplingParams(max_tokens=1))
    chunks = [c async for c in eng.decode("r1", PROMPT, 100, res.kv, SamplingParams(max_tokens=1))]
    assert [(c.token_ids, c.finish_reason) for c in chunks] == [((), "length")]
    assert len(llm.calls) == 1  # nothing more ran in vLLM
    assert llm.released == [("r1", NIXL_PARAMS)]

    stop = SamplingParams(max_tokens=4, stop_token_ids=(100,))
    chunks = [c async for c in eng.decode("r2", PROMPT, 100, res.kv, stop)]
    assert [(c.token_ids, c.finish_reason) for c in chunks] == [((), "stop")]


async def test_decode_that_cannot_load_the_kv_raises_kv_unavailable() -> None:
    llm = FakeAsyncLlm(lambda call: [([], "error")], kv_transfer_params=NIXL_PARAMS)
    eng = engine(llm)
    handle = engine_params_from_kv_transfer(NIXL_PARAMS, kv_connector="NixlConnector")
    from workers.engine import KvHandle

    kv = KvHandle("r1", "127.0.0.1:9", len(PROMPT), 0, handle)
    with pytest.raises(KvUnavailable):
        _ = [c async for c in eng.decode("r1", PROMPT, 100, kv, SamplingParams(max_tokens=4))]


async def test_generate_streams_chunks_and_translates_vllm_errors() -> None:
    llm = FakeAsyncLlm(greedy)
    eng = engine(llm)
    chunks = [c async for c in eng.generate("g", PROMPT, SamplingParams(max_tokens=3))]
    assert [c.token_ids for c in chunks] == [(100,), (101,), (102,)]
    assert chunks[-1].finish_reason == "length"
    assert llm.calls[0].params["kv_transfer_params"] is None

    failing = engine(FakeAsyncLlm(greedy, fail_with=VLLMValidationError("too long")))
    with pytest.raises(InvalidArgument, match="too long"):
        _ = [c async for c in failing.generate("g", PROMPT, SamplingParams(max_tokens=3))]


async def test_abort_ends_the_stream_with_abort() -> None:
    llm = FakeAsyncLlm(greedy, step_delay_s=0.01)
    eng = engine(llm)
    stream = eng.generate("long", PROMPT, SamplingParams(max_tokens=50))
    first = await anext(stream)
    assert first.token_ids == (100,)
    assert await eng.abort("long")
    rest = [c async for c in stream]
    assert rest[-1].finish_reason == "abort"
    assert set(llm.aborted) == {"long"}  # said again at most once, in case it raced the start
    assert not await eng.abort("long")
    assert not await eng.abort("never-ran")


async def test_input_errors_and_roles() -> None:
    llm = FakeAsyncLlm(greedy, kv_transfer_params=NIXL_PARAMS)
    eng = engine(llm)
    with pytest.raises(InvalidArgument, match="vocabulary"):
        await eng.prefill("r", (1, 1000), SamplingParams(max_tokens=2))
    with pytest.raises(InvalidArgument, match="max_tokens"):
        await eng.prefill("r", PROMPT, SamplingParams(max_tokens=0))
    with pytest.raises(InvalidArgument, match="context window"):
        _ = [c async for c in eng.generate("r", tuple(range(60)), SamplingParams(max_tokens=8))]
    res = await eng.prefill("r", PROMPT, SamplingParams(max_tokens=2))
    with pytest.raises(InvalidArgument, match="holds 4 tokens"):
        _ = [c async for c in eng.decode("r", (1, 2), 100, res.kv, SamplingParams(max_tokens=2))]
    with pytest.raises(FailedPrecondition, match="FetchKv"):
        eng.export_kv("r")
    assert llm.calls[1:] == []  # only the one valid prefill reached vLLM

    producer = engine(FakeAsyncLlm(greedy), kv_role="kv_producer")
    with pytest.raises(FailedPrecondition, match="loads remote KV"):
        _ = [c async for c in producer.decode("r", PROMPT, 100, res.kv, SamplingParams())]
    consumer = engine(FakeAsyncLlm(greedy), kv_role="kv_consumer")
    with pytest.raises(FailedPrecondition, match="keeps KV"):
        await consumer.prefill("r", PROMPT, SamplingParams())
    no_connector = engine(FakeAsyncLlm(greedy), kv_role="", kv_connector="")
    with pytest.raises(FailedPrecondition):
        await no_connector.prefill("r", PROMPT, SamplingParams())


async def test_a_running_request_id_cannot_be_reused() -> None:
    eng = engine(FakeAsyncLlm(greedy, step_delay_s=0.01))
    stream = eng.generate("same", PROMPT, SamplingParams(max_tokens=20))
    await anext(stream)
    with pytest.raises(AlreadyExists):
        await eng.prefill("same", PROMPT, SamplingParams(max_tokens=2))
    await eng.abort("same")
    _ = [c async for c in stream]
    _ = [c async for c in eng.generate("same", PROMPT, SamplingParams(max_tokens=2))]


async def test_stats_and_events_and_close() -> None:
    class Events:
        def __init__(self) -> None:
            self.pending = [KvEvent(KvEventKind.STORED, (1, 2))]
            self.closed = False

        def drain(self) -> list[KvEvent]:
            out, self.pending = self.pending, []
            return out

        def close(self) -> None:
            self.closed = True

    llm = FakeAsyncLlm(greedy)
    recorder = VllmStatsRecorder(kv_blocks_total=10)
    events = Events()
    config = VllmEngineConfig(model="m", max_context_tokens=64, vocab_size=1000, address="a:1")
    eng = VllmEngine(llm, api=FakeApi(), config=config, stats=recorder, kv_events=events)
    recorder.record(SchedulerStats(2, 1, 0.5), None)
    assert eng.stats().kv_blocks_used == 5
    assert eng.stats().running_requests == 2
    assert eng.drain_kv_events() == [KvEvent(KvEventKind.STORED, (1, 2))]
    assert eng.drain_kv_events() == []
    await eng.aclose()
    assert events.closed and llm.shut_down
    assert eng.drain_kv_events() == []
    assert json.loads(json.dumps(eng.config.__dict__))["model"] == "m"


async def test_queued_prefill_tokens_count_prompts_until_their_first_output() -> None:
    llm = FakeAsyncLlm(greedy, kv_transfer_params=NIXL_PARAMS, step_delay_s=0.05)
    eng = engine(llm)
    assert eng.stats().queued_prefill_tokens == 0
    first = asyncio.create_task(eng.prefill("p1", PROMPT, SamplingParams(max_tokens=3)))
    long_prompt = tuple(range(1, 21))
    second = asyncio.create_task(eng.prefill("p2", long_prompt, SamplingParams(max_tokens=3)))
    await asyncio.sleep(0.01)  # both submitted, no output yet
    assert eng.stats().queued_prefill_tokens == len(PROMPT) + len(long_prompt)
    res = await first
    await second
    assert eng.stats().queued_prefill_tokens == 0  # first tokens back

    # a decode that loads its KV over the connector prefills nothing here
    decode = cast(
        AsyncGenerator[TokenChunk, None],
        eng.decode("p1", PROMPT, res.first_token_id, res.kv, SamplingParams(max_tokens=4)),
    )
    chunk = await anext(decode)
    assert chunk.token_ids == (101,)
    assert eng.stats().queued_prefill_tokens == 0
    await decode.aclose()
    # an aggregated request counts until its first chunk; an abort before it clears it too
    gen = cast(
        AsyncGenerator[TokenChunk, None],
        eng.generate("g1", long_prompt, SamplingParams(max_tokens=4)),
    )

    async def first_chunk() -> TokenChunk:
        return await anext(gen)

    pending = asyncio.create_task(first_chunk())
    await asyncio.sleep(0.01)
    assert eng.stats().queued_prefill_tokens == len(long_prompt)
    await pending
    assert eng.stats().queued_prefill_tokens == 0
    await gen.aclose()
