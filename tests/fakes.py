"""Hand-written fakes, passed in through constructors (no mock.patch)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

from controlplane.adapters.etcd.client import LeaseNotFound
from controlplane.core.model import Gpu, NodeInventory
from controlplane.errors import Unavailable


@dataclass
class FakeNodeLeaseStore:
    """An in-memory lease store with switchable failure modes.

    ``down``: every call raises Unavailable (etcd unreachable).
    ``forget_leases()``: every existing lease vanishes (etcd came back without its data).
    """

    down: bool = False
    next_lease: int = 100
    leases: set[int] = field(default_factory=set)
    records: dict[str, tuple[NodeInventory, int]] = field(default_factory=dict)
    calls: list[str] = field(default_factory=list)
    keepalives: int = 0
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def _check(self, op: str) -> None:
        self.calls.append(op)
        self.changed.set()
        if self.down:
            raise Unavailable("fake etcd is down")

    def forget_leases(self) -> None:
        self.leases.clear()
        self.records.clear()

    async def register(self, inv: NodeInventory, ttl_s: int) -> int:
        self._check("register")
        self.next_lease += 1
        self.leases.add(self.next_lease)
        self.records[inv.node_id] = (inv, self.next_lease)
        return self.next_lease

    async def update(self, inv: NodeInventory, lease_id: int) -> int:
        self._check("update")
        if lease_id not in self.leases:
            raise LeaseNotFound("fake: lease not found")
        self.records[inv.node_id] = (inv, lease_id)
        return 1

    async def keepalive(self, lease_id: int) -> int:
        self._check("keepalive")
        if lease_id not in self.leases:
            raise LeaseNotFound("fake: lease not found")
        self.keepalives += 1
        return 10

    async def deregister(self, lease_id: int) -> None:
        self._check("deregister")
        self.leases.discard(lease_id)
        for node_id, (_, lease) in list(self.records.items()):
            if lease == lease_id:
                del self.records[node_id]


class ScriptedProbe:
    """A GPU probe that returns a new reading each time it is advanced."""

    def __init__(self, readings: list[tuple[Gpu, ...]]) -> None:
        self._readings: Iterator[tuple[Gpu, ...]] = iter(readings)
        self.current = next(self._readings)

    def advance(self) -> None:
        self.current = next(self._readings, self.current)

    def read(self) -> tuple[Gpu, ...]:
        return self.current


class FakeClock:
    def __init__(self, start: float = 1_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


class FakeEngine:
    """A scripted InferenceEngine: emits ``tokens`` one per step, every ``step_s`` seconds.

    Holds prefilled KV as ``kv_bytes`` per request; ``gate`` (when set) must be opened before a
    decode stream finishes, so tests can hold a request in flight.
    """

    model = "fake"
    max_context_tokens = 4096
    vocab_size = 1000

    def __init__(self, kv_bytes: bytes = b"kv" * 10, step_s: float = 0.0) -> None:
        from workers.engine import EngineStats

        self.kv_bytes = kv_bytes
        self.step_s = step_s
        self.held: dict[str, bytes] = {}
        self.aborted: list[str] = []
        self.gate: asyncio.Event | None = None
        self._stats = EngineStats(kv_blocks_total=64)

    async def prefill(self, request_id: str, prompt: tuple[int, ...], sampling: Any) -> Any:
        from workers.engine import KvHandle, PrefillResult, validate_prompt

        validate_prompt(prompt, sampling, vocab_size=self.vocab_size,
                        max_context_tokens=self.max_context_tokens)  # fmt: skip
        kv_id = f"kv-{request_id}"
        self.held[kv_id] = self.kv_bytes
        handle = KvHandle(kv_id, "127.0.0.1:1", len(prompt), len(self.kv_bytes))
        return PrefillResult(request_id, first_token_id=prompt[-1], kv=handle)

    async def _tokens(self, request_id: str, start: int, n: int) -> AsyncIterator[Any]:
        from workers.engine import TokenChunk

        for i in range(n):
            await asyncio.sleep(self.step_s)
            if request_id in self.aborted:
                yield TokenChunk((), "abort")
                return
            last = i == n - 1
            if last and self.gate is not None:
                await self.gate.wait()
            yield TokenChunk((start + i,), "length" if last else None)

    def decode(self, request_id: str, prompt: tuple[int, ...], first: int, kv: Any,
               sampling: Any) -> AsyncIterator[Any]:  # fmt: skip
        from workers.engine import KvUnavailable

        if kv.kv_id not in self.held:
            raise KvUnavailable(f"KV {kv.kv_id} not held")
        return self._tokens(request_id, first + 1, sampling.max_tokens - 1)

    def generate(
        self, request_id: str, prompt: tuple[int, ...], sampling: Any
    ) -> AsyncIterator[Any]:
        return self._tokens(request_id, 0, sampling.max_tokens)

    async def abort(self, request_id: str) -> bool:
        self.aborted.append(request_id)
        self.held.pop(f"kv-{request_id}", None)
        return True

    def export_kv(self, kv_id: str) -> bytes:
        from workers.engine import KvUnavailable

        if kv_id not in self.held:
            raise KvUnavailable(f"KV {kv_id} is not held here (expired or evicted)")
        return self.held[kv_id]

    def stats(self) -> Any:
        return self._stats

    def drain_kv_events(self) -> list[Any]:
        return []


# --- TensorRT-LLM's LLM API (workers/engines/trtllm.py) -----------------------------------------


class FakeTrtllmRequestError(RuntimeError):
    """Stands in for ``tensorrt_llm.llmapi.RequestError``: the engine failed one request."""


@dataclass
class FakeTrtllmSamplingParams:
    """Stands in for ``tensorrt_llm.SamplingParams``: keeps what it was given, checks like it."""

    max_tokens: int = 32
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop_token_ids: list[int] | None = None
    detokenize: bool = True
    include_stop_str_in_output: bool = False

    def __post_init__(self) -> None:
        if self.temperature is not None and self.temperature < 0:
            raise ValueError(f"require temperature >= 0, got temperature={self.temperature}")


@dataclass
class FakeDisaggregatedParams:
    """Stands in for ``tensorrt_llm.llmapi.DisaggregatedParams`` (the fields that travel)."""

    request_type: str | None = None
    first_gen_tokens: list[int] | None = None
    ctx_request_id: int | None = None
    opaque_state: bytes | None = None
    draft_tokens: list[int] | None = None
    disagg_request_id: int | None = None
    ctx_dp_rank: int | None = None
    ctx_info_endpoint: str | None = None

    def __post_init__(self) -> None:
        kinds = ("context_only", "generation_only", "context_and_generation")
        if self.request_type is not None and self.request_type not in kinds:
            raise ValueError(f"Unknown request type: {self.request_type}")


@dataclass
class FakeCompletionOutput:
    """Stands in for ``tensorrt_llm.executor.result.CompletionOutput``."""

    index: int = 0
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    disaggregated_params: FakeDisaggregatedParams | None = None


@dataclass
class FakeTrtllmCall:
    """One ``generate_async`` call, as the fake LLM received it."""

    inputs: Any
    sampling_params: FakeTrtllmSamplingParams
    streaming: bool
    disaggregated_params: FakeDisaggregatedParams | None


def fake_trtllm_token(prompt: tuple[int, ...], position: int, vocab_size: int) -> int:
    """The fake model's greedy token at ``position`` of the completion: a function of the prompt
    and the position only, so aggregated and disaggregated runs agree."""
    return (sum(prompt) * 7 + position * 13 + 1) % vocab_size


class FakeTrtllmRequest:
    """Stands in for ``tensorrt_llm.llmapi.RequestOutput``: iterate to advance it; abort() it.

    Context-only requests make one token and hold the prompt's "KV" in the LLM under their
    ``ctx_request_id``; generation-only requests need that hold (else they fail the way a lost
    KV transfer does) and, like TensorRT-LLM, start their output with ``first_gen_tokens``.
    """

    def __init__(self, llm: FakeTrtllmLLM, call: FakeTrtllmCall, request_id: int) -> None:
        self.llm = llm
        self.call = call
        self.request_id = request_id
        self.outputs = [FakeCompletionOutput()]
        self.finished = False
        self.aborted = False
        self.cached_tokens = llm.cached_tokens
        self.prompt = tuple(call.inputs["prompt_token_ids"])

    def abort(self) -> None:
        self.aborted = True
        self.llm.aborted.append(self.request_id)

    def __aiter__(self) -> AsyncIterator[FakeTrtllmRequest]:
        return self._run()

    def _plan(self) -> tuple[list[int], list[int]]:
        """(tokens already there, tokens to generate) for this request."""
        sp, dp, vocab = self.call.sampling_params, self.call.disaggregated_params, self.llm.vocab
        kind = dp.request_type if dp is not None else None
        if kind == "generation_only":
            assert dp is not None
            if dp.ctx_request_id not in self.llm.held:
                raise FakeTrtllmRequestError(f"KV of context request {dp.ctx_request_id} is gone")
            if self.llm.held.pop(dp.ctx_request_id) != self.prompt:
                raise FakeTrtllmRequestError("KV is for another prompt")
            first = list(dp.first_gen_tokens or [])
            todo = range(len(first), sp.max_tokens + self.llm.overshoot)
            return first, [fake_trtllm_token(self.prompt, p, vocab) for p in todo]
        count = 1 if kind == "context_only" else sp.max_tokens + self.llm.overshoot
        return [], [fake_trtllm_token(self.prompt, p, vocab) for p in range(count)]

    async def _run(self) -> AsyncIterator[FakeTrtllmRequest]:
        out = self.outputs[0]
        sp, dp = self.call.sampling_params, self.call.disaggregated_params
        stops = set(sp.stop_token_ids or ())
        existing, todo = self._plan()
        out.token_ids.extend(existing)
        if not todo:  # e.g. generation-only with max_tokens=1: the handed-over token is all
            out.finish_reason, self.finished = "length", True
            yield self
            return
        for step, token in enumerate(todo):
            await asyncio.sleep(0)
            if step == 0 and self.llm.first_gate is not None:
                await self.llm.first_gate.wait()
            if step > 0 and self.llm.gate is not None:
                await self.llm.gate.wait()
            if self.aborted:
                out.finish_reason, self.finished = "cancelled", True
                yield self
                return
            if self.llm.fail_stream_after is not None and step >= self.llm.fail_stream_after:
                raise FakeTrtllmRequestError("engine failure mid-request")
            if token == self.llm.eos_token_id:
                out.finish_reason = "stop"
            else:
                out.token_ids.append(token)
                if token in stops:
                    out.finish_reason = "stop"
                elif step == len(todo) - 1:
                    out.finish_reason = "length"
            self.finished = out.finish_reason is not None
            if dp is not None and dp.request_type == "context_only":
                ctx_id = self.request_id
                self.llm.held[ctx_id] = self.prompt
                out.finish_reason = "stop" if out.finish_reason == "stop" else "not_finished"
                out.disaggregated_params = FakeDisaggregatedParams(
                    request_type="context_only",
                    first_gen_tokens=[token],
                    ctx_request_id=ctx_id,
                    opaque_state=b"\x00ctx-state\xff" + ctx_id.to_bytes(4, "big"),
                    disagg_request_id=ctx_id + 10_000,
                    ctx_dp_rank=0,
                    ctx_info_endpoint="tcp://10.0.0.7:5555",
                )
            if self.call.streaming or self.finished:
                yield self
            if self.finished:
                return


class FakeIterationResult:
    """Stands in for ``tensorrt_llm.executor.result.IterationResult``: one shared async iterator
    that, like the real one, yields nothing more after an empty wait until ``mark_undone()``."""

    def __init__(self) -> None:
        self.records: list[Any] = []
        self.done = False

    def mark_undone(self) -> None:
        self.done = False

    def __aiter__(self) -> FakeIterationResult:
        return self

    async def __anext__(self) -> Any:
        if self.done or not self.records:
            self.done = True
            raise StopAsyncIteration
        return self.records.pop(0)


class FakeTrtllmLLM:
    """Stands in for ``tensorrt_llm.LLM``: records calls, scripts outputs, stats and failures.

    ``gate`` (when set) must be opened before any request makes its second step,
    ``first_gate`` before its first (a prompt still being prefilled);
    ``fail_submit`` is raised by ``generate_async``; ``fail_stream_after`` makes every request
    fail after that many steps; ``overshoot`` makes requests run past ``max_tokens``;
    ``eos_token_id`` ends a request with "stop" (the token itself is not output).
    """

    def __init__(self, vocab: int = 1000) -> None:
        self.vocab = vocab
        self.calls: list[FakeTrtllmCall] = []
        self.requests: list[FakeTrtllmRequest] = []
        self.aborted: list[int] = []
        self.held: dict[int, tuple[int, ...]] = {}
        self.stats_records: list[Any] = []
        self.kv_event_records: list[Any] = []
        self.gate: asyncio.Event | None = None
        self.first_gate: asyncio.Event | None = None
        self.fail_submit: Exception | None = None
        self.fail_stream_after: int | None = None
        self.overshoot = 0
        self.eos_token_id: int | None = None
        self.cached_tokens = 0
        self.shut_down = False
        self.stats_result = FakeIterationResult()
        self.events_result = FakeIterationResult()
        self._next_id = 1

    def generate_async(
        self,
        inputs: Any,
        sampling_params: Any = None,
        *,
        streaming: bool = False,
        disaggregated_params: Any = None,
    ) -> FakeTrtllmRequest:
        if self.fail_submit is not None:
            raise self.fail_submit
        call = FakeTrtllmCall(inputs, sampling_params, streaming, disaggregated_params)
        self.calls.append(call)
        request = FakeTrtllmRequest(self, call, self._next_id)
        self._next_id += 1
        self.requests.append(request)
        return request

    def get_stats_async(self, timeout: float | None = 2) -> FakeIterationResult:
        self.stats_result.records = self.stats_records
        self.stats_records = []
        return self.stats_result

    def get_kv_cache_events_async(self, timeout: float | None = 2) -> FakeIterationResult:
        self.events_result.records = self.kv_event_records
        self.kv_event_records = []
        return self.events_result

    def shutdown(self) -> None:
        self.shut_down = True
