"""The TensorRT-LLM engine ("trtllm"): ``InferenceEngine`` over TensorRT-LLM's LLM API.

Theory of operation
-------------------
``TrtllmEngine`` drives one ``tensorrt_llm.LLM`` (the PyTorch backend, the default ``LLM`` since
TensorRT-LLM 1.0). Every request is one ``llm.generate_async(...)`` call, whose result (a
``RequestOutput``) is both the async iterator of the request's progress and its abort handle. A
small *pump* task per request iterates that result and turns the cumulative
``outputs[0].token_ids`` into deltas on an ``asyncio.Queue``; the caller's coroutine reads the
queue. ``abort`` calls ``RequestOutput.abort()`` and puts an "aborted" marker on the same queue,
so a stream ends with "abort" at once even if the engine never answers again.

Disaggregated serving follows TensorRT-LLM's own context-first flow (``trtllm-serve
disaggregated``) with the router in the role of its disaggregated server:

1. ``prefill`` sends a *context-only* request: ``DisaggregatedParams(request_type=
   "context_only")``, ``max_tokens=1``, not streamed. TensorRT-LLM computes the prompt's KV cache
   and the first token, keeps the KV for the generation side, and returns in
   ``outputs[0].disaggregated_params`` the state the generation side needs: ``ctx_request_id``,
   ``opaque_state`` (bytes: where and how to pull the KV), ``first_gen_tokens``, speculative
   ``draft_tokens``, and on newer releases ``disagg_request_id``, ``ctx_dp_rank``,
   ``ctx_info_endpoint``, ``schedule_style``, ``ctx_usage``. Those travel to the decode worker in
   ``KvHandle.engine_params`` (strings only: ints in decimal, token lists and endpoints as JSON,
   ``opaque_state`` in base64 — the same encoding trtllm-serve uses for
   ``encoded_opaque_state``), together with ``engine``, ``model`` and ``ctx_finish_reason``.
2. ``decode`` sends a *generation-only* request for the same prompt with those fields and
   ``request_type="generation_only"``, streamed. TensorRT-LLM's **cache transceiver** pulls the KV
   from the context instance (UCX / NIXL / MPI, chosen by ``cache_transceiver_config``); nothing
   goes through Switchboard's ``FetchKv``, so ``export_kv`` raises ``FailedPrecondition``. The
   generation request's output starts with the first token it was handed
   (``_prepare_disagg_gen_transmission_complete`` adds ``first_gen_tokens`` as its first output
   token), so the pump drops that leading token: the caller already has it from ``prefill``.
   ``max_tokens`` is the request's total, first token included, as trtllm-serve sends it.
   When the context phase already finished with "stop" (EOS, or a stop token), decode ends with
   "stop" without a generation request, as trtllm-serve's disaggregated server does.

If the context side's KV is gone when the generation request asks for it (transfer failed or
timed out — ``cache_transceiver_config.kv_transfer_timeout_ms`` — or the prefill worker
restarted), TensorRT-LLM fails the request; an engine error before decode has streamed anything
is therefore reported as ``KvUnavailable`` and the router prefills again. A context phase that
is never followed by a generation request keeps its KV until that timeout: set it in the prefill
worker's engine args (TensorRT-LLM has no default).

Token deltas are one ``TokenChunk`` per engine output (``stream_interval`` in the engine args
batches steps). TensorRT-LLM finish reasons map to ours: "stop" and "length" as they are,
"cancelled" and "timeout" to "abort". Stop tokens are kept in the output
(``include_stop_str_in_output=True``), as the sim engine and vLLM do. As a guard, a stream never
yields more than ``max_tokens`` tokens in all (counting decode's first token).

``stats()`` is synchronous and cheap: a background task (started on first use, every
``poll_interval_s``) drains ``llm.get_stats_async(timeout)`` while requests are in flight (and
once after the last one ends) and maps the newest iteration stats (``numActiveRequests``,
``numQueuedRequests`` + ``inflightBatchingStats.numPausedRequests``,
``kvCacheStats.usedNumBlocks`` / ``maxNumBlocks`` / ``cacheHitRate``,
``inflightBatchingStats.numScheduledRequests``, ``iter``) onto a cached ``EngineStats``;
``tokens_per_second`` is counted here from the tokens streamed. The async variant, on the event
loop, because the requests were made from the loop: TensorRT-LLM then keeps the stats in an
``AsyncQueue`` whose sync ``get`` returns None on timeout, which ``get_stats`` cannot digest.
``get_stats_async`` returns one shared ``IterationResult`` that stops yielding for good after
one empty wait until a new request comes in; the poller calls its ``mark_undone()`` first so
long-running requests keep reporting. (On RPC-based executors the call itself waits up to
``stats_timeout_s`` for the RPC; keep it small.) Iteration stats need
``enable_iter_perf_stats`` (``build_trtllm_engine`` turns it on), so ``kv_blocks_total`` is 0
until the first request has run. With ``kv_cache_config.event_buffer_max_size > 0`` the same task
drains ``get_kv_cache_events_async`` ("stored" → STORED, "removed" → EVICTED) for
``drain_kv_events()``.

Errors are translated once, here: ``ValueError`` / ``TypeError`` from ``generate_async`` (its
argument checks) → ``InvalidArgument``; ``RequestError`` and any other engine failure →
``Unavailable`` (``KvUnavailable`` on the generation-only path, see above). Input is validated
with ``validate_prompt`` before TensorRT-LLM is touched.

API reference
-------------
The mapping follows TensorRT-LLM 1.x (PyTorch backend), read in the main-branch sources of the
1.2 to 1.3 line: ``tensorrt_llm/disaggregated_params.py`` (``DisaggregatedParams`` fields),
``tensorrt_llm/llmapi/llm.py`` (``generate_async(inputs, sampling_params, ..., streaming,
disaggregated_params, ...)``, ``get_stats_async``, ``get_kv_cache_events_async``,
``shutdown``; a
context-only request is forced to ``max_tokens=1``), ``tensorrt_llm/executor/result.py``
(``CompletionOutput.token_ids`` / ``finish_reason`` / ``disaggregated_params``,
``GenerationResult.abort()`` / ``finished``, finish reasons "stop", "length", "timeout",
"cancelled", "not_finished"), ``tensorrt_llm/sampling_params.py``,
``tensorrt_llm/serve/openai_protocol.py`` (``to_disaggregated_params``: base64 ``opaque_state``),
``tensorrt_llm/serve/openai_disagg_service.py`` (context-first flow),
``tensorrt_llm/_torch/pyexecutor/py_executor.py`` (first token of a generation-only request),
``tensorrt_llm/llmapi/llm_args.py`` (``CacheTransceiverConfig``: ``backend`` "DEFAULT" | "UCX" |
"NIXL" | "MPI", ``max_tokens_in_buffer``, ``kv_transfer_timeout_ms``),
``examples/disaggregated/README.md`` (context servers run with ``disable_overlap_scheduler``)
and ``tests/unittest/llmapi/apps/_test_openai_metrics.py`` (iteration stats keys).

``tensorrt_llm`` is imported only by ``build_trtllm_engine``; ``TrtllmEngine`` takes the LLM
object and the API classes it needs through its constructor, so it runs on CPU against a fake.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
import time
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Mapping,
    Sequence,
)
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from controlplane.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    SwitchboardError,
    Unavailable,
)
from workers.engine import (
    EngineStats,
    KvEvent,
    KvEventKind,
    KvFetcher,
    KvHandle,
    KvUnavailable,
    PrefillResult,
    Role,
    SamplingParams,
    TokenChunk,
    validate_prompt,
)

if TYPE_CHECKING:
    from workers.main import WorkerSettings

log = logging.getLogger(__name__)

ENGINE_NAME = "trtllm"
DEFAULT_CACHE_TRANSCEIVER_BACKEND = "DEFAULT"
"""``cache_transceiver_config.backend`` when the engine args name none: TensorRT-LLM's own
choice (UCX or NIXL, depending on the release and ``TRTLLM_USE_*_KVCACHE``)."""
INSTALL_HINT = (
    "the trtllm engine needs TensorRT-LLM and an NVIDIA GPU; pip install tensorrt-llm "
    "(see https://nvidia.github.io/TensorRT-LLM/installation/linux.html), or choose "
    "--engine vllm, cpu or sim"
)

_MAX_RECORDS_PER_DRAIN = 4096
_FINISH_REASONS = {"stop": "stop", "length": "length", "cancelled": "abort", "timeout": "abort"}
_UINT64 = (1 << 64) - 1

# DisaggregatedParams fields carried from the context phase to the generation phase, by how they
# are written into KvHandle.engine_params (a Mapping[str, str]). Only fields the context phase
# set travel, so a field an older release lacks is never passed to its constructor.
_INT_FIELDS = ("ctx_request_id", "disagg_request_id", "ctx_dp_rank", "schedule_style")
_TOKEN_FIELDS = ("first_gen_tokens", "draft_tokens")
_JSON_FIELDS = ("ctx_info_endpoint", "ctx_usage")
_BYTES_FIELDS = ("opaque_state",)


# -- the slice of TensorRT-LLM's API this adapter uses -------------------------------------------


class TrtllmCompletion(Protocol):
    """``tensorrt_llm.executor.result.CompletionOutput``: one sequence of a request."""

    @property
    def token_ids(self) -> Sequence[int] | None: ...

    @property
    def finish_reason(self) -> str | None: ...

    @property
    def disaggregated_params(self) -> Any: ...


class TrtllmRequest(Protocol):
    """``tensorrt_llm.llmapi.RequestOutput``: a request's progress and its abort handle.

    Async iteration waits for the next engine response and yields the same, updated object.
    """

    @property
    def outputs(self) -> Sequence[TrtllmCompletion]: ...

    @property
    def finished(self) -> bool: ...

    def abort(self) -> None: ...

    def __aiter__(self) -> AsyncIterator[Any]: ...


class TrtllmLLM(Protocol):
    """``tensorrt_llm.LLM``: the calls this adapter makes."""

    def generate_async(
        self,
        inputs: Any,
        sampling_params: Any = None,
        *,
        streaming: bool = False,
        disaggregated_params: Any = None,
    ) -> TrtllmRequest: ...

    def get_stats_async(self, timeout: float | None = 2) -> AsyncIterable[Any]: ...

    def get_kv_cache_events_async(self, timeout: float | None = 2) -> AsyncIterable[Any]: ...

    def shutdown(self) -> None: ...


@dataclass(frozen=True)
class TrtllmApi:
    """The TensorRT-LLM classes an engine is built from (``tensorrt_llm.llmapi``)."""

    llm: Callable[..., Any]
    sampling_params: Callable[..., Any]
    disaggregated_params: Callable[..., Any]
    request_error: type[BaseException]


# -- pure helpers --------------------------------------------------------------------------------


def encode_context_params(
    params: Any, *, model: str, ctx_finish_reason: str | None
) -> dict[str, str]:
    """The context phase's ``DisaggregatedParams`` as ``KvHandle.engine_params`` (strings only).

    Raises Unavailable when the context phase produced no hand-off (no request id to pull from).
    """
    out = {"engine": ENGINE_NAME, "model": model}
    if ctx_finish_reason:
        out["ctx_finish_reason"] = ctx_finish_reason
    for name in _INT_FIELDS:
        value = getattr(params, name, None)
        if value is not None:
            out[name] = str(int(value))
    for name in _TOKEN_FIELDS:
        value = getattr(params, name, None)
        if value is not None:
            out[name] = json.dumps([int(t) for t in value])
    for name in _JSON_FIELDS:
        value = getattr(params, name, None)
        if value is not None:
            try:
                out[name] = json.dumps(value, sort_keys=True)
            except (TypeError, ValueError):
                log.warning("trtllm: %s of type %s is not JSON; not carried to decode", name,
                            type(value).__name__)  # fmt: skip
    for name in _BYTES_FIELDS:
        value = getattr(params, name, None)
        if value is not None:
            out[name] = base64.b64encode(bytes(value)).decode("ascii")
    if "ctx_request_id" not in out and "disagg_request_id" not in out:
        raise Unavailable("TensorRT-LLM's context phase returned no ctx_request_id to hand off")
    return out


def decode_context_params(
    engine_params: Mapping[str, str], *, model: str
) -> tuple[dict[str, Any], str | None]:
    """``KvHandle.engine_params`` back to ``DisaggregatedParams`` keyword arguments.

    Returns (kwargs without ``request_type``, the context phase's finish reason). Raises
    InvalidArgument for a handle that is not a trtllm hand-off for this model, or is malformed.
    """
    engine = engine_params.get("engine")
    if engine != ENGINE_NAME:
        raise InvalidArgument(f"KV handle is from engine {engine!r}; a trtllm decode needs trtllm")
    if engine_params.get("model", model) != model:
        raise InvalidArgument(
            f"KV handle is for model {engine_params.get('model')!r}, not {model!r}"
        )
    kwargs: dict[str, Any] = {}
    for name, value in engine_params.items():
        try:
            if name in _INT_FIELDS:
                kwargs[name] = int(value)
            elif name in _TOKEN_FIELDS:
                tokens = json.loads(value)
                if not isinstance(tokens, list) or not all(isinstance(t, int) for t in tokens):
                    raise ValueError("not a list of token ids")
                kwargs[name] = tokens
            elif name in _JSON_FIELDS:
                kwargs[name] = json.loads(value)
            elif name in _BYTES_FIELDS:
                kwargs[name] = base64.b64decode(value, validate=True)
        except (ValueError, binascii.Error) as e:
            raise InvalidArgument(f"kv.engine_params[{name!r}] is malformed: {e}") from None
    if "ctx_request_id" not in kwargs and "disagg_request_id" not in kwargs:
        raise InvalidArgument("kv.engine_params has no ctx_request_id: not a context hand-off")
    return kwargs, engine_params.get("ctx_finish_reason")


def _as_dict(item: Any) -> dict[str, Any]:
    """A stats or event record: a dict, or the JSON string some releases hand out."""
    if isinstance(item, str | bytes):
        item = json.loads(item)
    return item if isinstance(item, dict) else {}


def stats_from_iteration(stat: Any, previous: EngineStats) -> EngineStats:
    """One TensorRT-LLM iteration-stats record mapped onto ``EngineStats`` (missing keys keep
    the previous value; ``tokens_per_second`` is not in the record and is kept)."""
    s = _as_dict(stat)
    kv = s.get("kvCacheStats") or {}
    ifb = s.get("inflightBatchingStats") or {}
    batch = int(ifb.get("numScheduledRequests", previous.last_batch_size))
    hit = float(kv.get("cacheHitRate", previous.prefix_cache_hit_rate))
    return replace(
        previous,
        running_requests=int(s.get("numActiveRequests", previous.running_requests)),
        waiting_requests=int(s.get("numQueuedRequests", 0)) + int(ifb.get("numPausedRequests", 0)),
        kv_blocks_used=int(kv.get("usedNumBlocks", previous.kv_blocks_used)),
        kv_blocks_total=int(kv.get("maxNumBlocks", previous.kv_blocks_total)),
        prefix_cache_hit_rate=min(1.0, max(0.0, hit)),
        last_batch_size=batch,
        max_batch_size_seen=max(previous.max_batch_size_seen, batch),
        steps=int(s["iter"]) + 1 if "iter" in s else previous.steps,
    )


def _flatten(items: Iterable[Any]) -> Iterable[Any]:
    """Records, whether they come one by one or in per-iteration lists."""
    for item in items:
        if isinstance(item, list):
            yield from item
        else:
            yield item


def kv_events_from_trtllm(events: Iterable[Any]) -> list[KvEvent]:
    """TensorRT-LLM KV cache events ("stored" / "removed"; others ignored) as ``KvEvent``s."""
    out: list[KvEvent] = []
    for raw in _flatten(events):
        data = _as_dict(raw).get("data") or {}
        kind = data.get("type")
        if kind == "stored":
            hashes = [b["block_hash"] for b in data.get("blocks", []) if "block_hash" in b]
            if hashes:
                out.append(KvEvent(KvEventKind.STORED, tuple(int(h) & _UINT64 for h in hashes)))
        elif kind == "removed" and data.get("block_hashes"):
            hashes = data["block_hashes"]
            out.append(KvEvent(KvEventKind.EVICTED, tuple(int(h) & _UINT64 for h in hashes)))
    return out


def llm_args_for_role(args: Mapping[str, Any], role: Role) -> dict[str, Any]:
    """The ``LLM(**kwargs)`` for a worker of ``role``, from the operator's engine args.

    Always: ``enable_iter_perf_stats`` (on unless set), which ``stats()`` reads. Prefill and
    decode workers: a ``cache_transceiver_config`` (backend "DEFAULT" unless named), without which
    TensorRT-LLM cannot hand KV between instances; prefill workers also
    ``disable_overlap_scheduler`` (unless set), which TensorRT-LLM's context servers require.
    """
    if "model" in args:
        raise InvalidArgument("--engine-args must not set 'model'; use --model-path")
    out = dict(args)
    out.setdefault("enable_iter_perf_stats", True)
    if role in (Role.PREFILL, Role.DECODE):
        transceiver = out.get("cache_transceiver_config")
        if transceiver is None:
            out["cache_transceiver_config"] = {"backend": DEFAULT_CACHE_TRANSCEIVER_BACKEND}
        elif isinstance(transceiver, Mapping) and transceiver.get("backend") is None:
            out["cache_transceiver_config"] = {
                **transceiver,
                "backend": DEFAULT_CACHE_TRANSCEIVER_BACKEND,
            }
    if role is Role.PREFILL:
        out.setdefault("disable_overlap_scheduler", True)
    return out


def read_model_config(model_path: str) -> dict[str, Any]:
    """``<model_path>/config.json`` (Hugging Face layout), or {} when there is none."""
    path = Path(model_path) / "config.json"
    try:
        parsed = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return parsed if isinstance(parsed, dict) else {}


def _hub_model_config(model: str) -> dict[str, Any]:
    """The model's config through transformers (a TensorRT-LLM dependency): hub ids too."""
    try:
        from transformers import AutoConfig

        loaded: dict[str, Any] = AutoConfig.from_pretrained(model).to_dict()
        return loaded
    except Exception as e:
        log.warning("trtllm: cannot read the config of %s: %s", model, e)
        return {}


def _text_config(config: Mapping[str, Any]) -> Mapping[str, Any]:
    nested = config.get("text_config")
    return nested if isinstance(nested, Mapping) else config


def model_limits(
    config: Mapping[str, Any], args: Mapping[str, Any], llm_max_seq_len: int | None
) -> tuple[int, int]:
    """(vocab_size, max_context_tokens) from the model config and the engine's max_seq_len."""
    text = _text_config(config)
    vocab = text.get("vocab_size")
    if not isinstance(vocab, int) or vocab <= 0:
        raise FailedPrecondition("the model's config.json names no vocab_size")
    for candidate in (
        args.get("max_seq_len"),
        llm_max_seq_len,
        text.get("max_position_embeddings"),
    ):
        if isinstance(candidate, int) and candidate > 0:
            return vocab, candidate
    raise FailedPrecondition("cannot tell the context window: set max_seq_len in --engine-args")


def kv_bytes_per_token(config: Mapping[str, Any], kv_dtype_bytes: int = 2) -> int:
    """KV cache bytes per token (all layers, K and V) from a Hugging Face config; 0 if unknown."""
    text = _text_config(config)
    layers = text.get("num_hidden_layers")
    heads = text.get("num_attention_heads")
    kv_heads = text.get("num_key_value_heads", heads)
    head_dim = text.get("head_dim")
    if head_dim is None and isinstance(heads, int) and heads > 0:
        hidden = text.get("hidden_size")
        head_dim = hidden // heads if isinstance(hidden, int) else None
    if not all(isinstance(v, int) and v > 0 for v in (layers, kv_heads, head_dim)):
        return 0
    assert isinstance(layers, int) and isinstance(kv_heads, int) and isinstance(head_dim, int)
    return 2 * layers * kv_heads * head_dim * kv_dtype_bytes


def _kv_dtype_bytes(args: Mapping[str, Any]) -> int:
    kv_cache = args.get("kv_cache_config")
    dtype = kv_cache.get("dtype") if isinstance(kv_cache, Mapping) else None
    return 1 if isinstance(dtype, str) and dtype.startswith(("fp8", "int8", "nvfp4")) else 2


# -- the engine ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Step:
    """What one engine output added: new token ids, and the finish reason on the last one."""

    token_ids: tuple[int, ...]
    finish_reason: str | None


class _Aborted:
    """Queue marker: ``abort`` was called."""


_ABORTED = _Aborted()
_Item = _Step | _Aborted | BaseException


@dataclass(eq=False)
class _Flight:
    """One request in flight: its engine handle, the pump feeding its queue, abort state."""

    request_id: str
    queue: asyncio.Queue[_Item] = field(default_factory=asyncio.Queue)
    handle: TrtllmRequest | None = None
    pump: asyncio.Task[None] | None = None
    aborted: bool = False
    unprefilled: int = 0
    """Prompt tokens this engine computes for the request, until its first output."""


class TrtllmEngine:
    """``InferenceEngine`` over one TensorRT-LLM ``LLM`` (see the module docstring).

    Args:
        llm: a ``tensorrt_llm.LLM`` (or a fake with the same calls).
        sampling_params: ``tensorrt_llm.SamplingParams`` (called with keyword arguments).
        disaggregated_params: ``tensorrt_llm.llmapi.DisaggregatedParams``.
        request_error: ``tensorrt_llm.llmapi.RequestError``, the engine's per-request failure.
        model: the model name tenants use.
        vocab_size: token ids must be below this.
        max_context_tokens: prompt + max_tokens must fit in this.
        address: "host:port" of this worker; goes into ``KvHandle.source_address``.
        kv_bytes_per_token: KV size of one token, for ``KvHandle.size_bytes`` (0 if unknown).
        kv_events: drain TensorRT-LLM's KV cache events (needs ``event_buffer_max_size > 0``).
        poll_interval_s: how often the stats task runs; 0 turns it off (tests call
            ``refresh_stats``).
        stats_timeout_s: how long one stats or KV-events drain waits for more records.
        clock: monotonic seconds, for ``tokens_per_second``.
        sleep: awaitable sleep, for the stats task.
    """

    def __init__(
        self,
        llm: TrtllmLLM,
        *,
        sampling_params: Callable[..., Any],
        disaggregated_params: Callable[..., Any],
        request_error: type[BaseException],
        model: str,
        vocab_size: int,
        max_context_tokens: int,
        address: str = "trtllm:0",
        kv_bytes_per_token: int = 0,
        kv_events: bool = False,
        poll_interval_s: float = 0.25,
        stats_timeout_s: float = 0.05,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        if vocab_size <= 0 or max_context_tokens <= 0:
            raise InvalidArgument("vocab_size and max_context_tokens must be > 0")
        self.model = model
        self.vocab_size = vocab_size
        self.max_context_tokens = max_context_tokens
        self.address = address
        self.kv_bytes_per_token = kv_bytes_per_token
        self._llm = llm
        self._sampling_params = sampling_params
        self._disaggregated_params = disaggregated_params
        self._request_error = request_error
        self._kv_events_enabled = kv_events
        self._poll_interval_s = poll_interval_s
        self._stats_timeout_s = stats_timeout_s
        self._clock = clock
        self._sleep = sleep
        self._flights: dict[str, _Flight] = {}
        self._stats = EngineStats()
        self._kv_events: list[KvEvent] = []
        self._dirty = False  # requests came or went since the last engine stats fetch
        self._tokens_out = 0
        self._rate_mark = (clock(), 0)
        self._tokens_per_second = 0.0
        self._poller: asyncio.Task[None] | None = None

    # -- InferenceEngine -------------------------------------------------------------------------

    async def prefill(
        self, request_id: str, prompt_token_ids: tuple[int, ...], sampling: SamplingParams
    ) -> PrefillResult:
        self._validate(prompt_token_ids, sampling)
        flight = self._open(request_id)
        try:
            handle = self._submit(
                flight,
                prompt_token_ids,
                self._sampling(sampling, max_tokens=1),
                disaggregated=self._disaggregated_params(request_type="context_only"),
                streaming=False,
            )
            finish: str | None = None
            tokens: list[int] = []
            while finish is None:
                item = await flight.queue.get()
                if isinstance(item, _Aborted):
                    raise FailedPrecondition(f"request {request_id!r} was aborted during prefill")
                if isinstance(item, BaseException):
                    raise self._translate(item, submitting=False) from item
                tokens.extend(item.token_ids)
                finish = item.finish_reason
            completion = handle.outputs[0]
            params = completion.disaggregated_params
            if params is None:
                params = getattr(handle, "disaggregated_params", None)
            if params is None:
                raise Unavailable("TensorRT-LLM's context phase returned no disaggregated_params")
            first_gen = getattr(params, "first_gen_tokens", None) or ()
            first = tokens[0] if tokens else (int(first_gen[0]) if first_gen else None)
            if first is None:
                raise Unavailable("TensorRT-LLM's context phase returned no first token")
            engine_params = encode_context_params(
                params, model=self.model, ctx_finish_reason=finish
            )
        finally:
            self._close(flight)
        hand_off = engine_params.get("ctx_request_id") or engine_params["disagg_request_id"]
        return PrefillResult(
            request_id=request_id,
            first_token_id=first,
            kv=KvHandle(
                kv_id=f"{request_id}#ctx{hand_off}",
                source_address=self.address,
                num_tokens=len(prompt_token_ids),
                size_bytes=len(prompt_token_ids) * self.kv_bytes_per_token,
                engine_params=engine_params,
            ),
            cached_prompt_tokens=int(getattr(handle, "cached_tokens", 0) or 0),
        )

    async def decode(
        self,
        request_id: str,
        prompt_token_ids: tuple[int, ...],
        first_token_id: int,
        kv: KvHandle,
        sampling: SamplingParams,
    ) -> AsyncGenerator[TokenChunk, None]:
        self._validate(prompt_token_ids, sampling)
        if not 0 <= first_token_id < self.vocab_size:
            raise InvalidArgument(f"first_token_id {first_token_id} is outside the vocabulary")
        fields, ctx_finish = decode_context_params(kv.engine_params, model=self.model)
        if kv.num_tokens and kv.num_tokens != len(prompt_token_ids):
            raise InvalidArgument(
                f"KV {kv.kv_id!r} holds {kv.num_tokens} prompt tokens, the prompt has "
                f"{len(prompt_token_ids)}"
            )
        if ctx_finish == "stop" or first_token_id in sampling.stop_token_ids:
            yield TokenChunk((), "stop")
            return
        try:
            disaggregated = self._disaggregated_params(request_type="generation_only", **fields)
        except (TypeError, ValueError) as e:
            raise InvalidArgument(f"this TensorRT-LLM cannot read the KV hand-off: {e}") from e
        stream = self._stream(
            request_id, prompt_token_ids, sampling, disaggregated, first_token_id=first_token_id
        )
        async with contextlib.aclosing(stream):  # a caller that leaves stops the engine now
            async for chunk in stream:
                yield chunk

    async def generate(
        self, request_id: str, prompt_token_ids: tuple[int, ...], sampling: SamplingParams
    ) -> AsyncGenerator[TokenChunk, None]:
        self._validate(prompt_token_ids, sampling)
        stream = self._stream(request_id, prompt_token_ids, sampling, None)
        async with contextlib.aclosing(stream):  # a caller that leaves stops the engine now
            async for chunk in stream:
                yield chunk

    async def abort(self, request_id: str) -> bool:
        flight = self._flights.get(request_id)
        if flight is None:
            return False
        if not flight.aborted:
            flight.aborted = True
            self._abort_handle(flight)
            flight.queue.put_nowait(_ABORTED)
        return True

    def export_kv(self, kv_id: str) -> bytes:
        raise FailedPrecondition(
            f"KV {kv_id!r}: the trtllm engine does not serve KV over FetchKv; TensorRT-LLM's "
            "cache transceiver moves it when the decode worker sends the generation request"
        )

    def stats(self) -> EngineStats:
        """The newest iteration record, plus ``queued_prefill_tokens``: the prompts this
        engine computes whose first output is not back (an upper bound: prefix-cache hits
        and computed chunks included), which the router's TTFT prediction reads."""
        self._ensure_poller()
        s = replace(
            self._stats,
            tokens_per_second=self._tokens_per_second,
            queued_prefill_tokens=sum(f.unprefilled for f in self._flights.values()),
        )
        if not self._flights:  # the newest iteration record may predate the last finish
            s = replace(s, running_requests=0, waiting_requests=0)
        return s

    def drain_kv_events(self) -> list[KvEvent]:
        self._ensure_poller()
        events, self._kv_events = self._kv_events, []
        return events

    # -- lifecycle -------------------------------------------------------------------------------

    async def refresh_stats(self) -> None:
        """One stats round: the token rate, then (while busy) TensorRT-LLM's stats and events."""
        now = self._clock()
        since, tokens = self._rate_mark
        if now > since:
            self._tokens_per_second = (self._tokens_out - tokens) / (now - since)
            self._rate_mark = (now, self._tokens_out)
        if not (self._flights or self._dirty):
            return
        self._dirty = False
        records = await self._drain(self._llm.get_stats_async, "get_stats_async")
        for record in records:
            try:
                self._stats = stats_from_iteration(record, self._stats)
            except (TypeError, ValueError, KeyError) as e:
                log.debug("trtllm: unreadable iteration stats %r: %s", record, e)
        if self._kv_events_enabled:
            events = await self._drain(
                self._llm.get_kv_cache_events_async, "get_kv_cache_events_async"
            )
            try:
                self._kv_events.extend(kv_events_from_trtllm(events))
            except (TypeError, ValueError, KeyError) as e:
                log.debug("trtllm: unreadable KV cache events: %s", e)

    async def aclose(self) -> None:
        """Abort what is in flight, stop the stats task and shut TensorRT-LLM down."""
        for request_id in list(self._flights):
            await self.abort(request_id)
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
            self._poller = None
        try:
            await asyncio.to_thread(self._llm.shutdown)
        except Exception:
            log.exception("trtllm: shutdown failed")

    # -- internals -------------------------------------------------------------------------------

    def _validate(self, prompt: tuple[int, ...], sampling: SamplingParams) -> None:
        validate_prompt(
            prompt, sampling, vocab_size=self.vocab_size, max_context_tokens=self.max_context_tokens
        )

    def _sampling(self, sampling: SamplingParams, *, max_tokens: int) -> Any:
        kwargs: dict[str, Any] = {
            "max_tokens": max_tokens,
            "temperature": sampling.temperature,
            "detokenize": False,  # Switchboard speaks token ids
            "include_stop_str_in_output": True,  # keep stop tokens, like the other engines
        }
        if sampling.temperature > 0 and sampling.top_p < 1.0:
            kwargs["top_p"] = sampling.top_p
        if sampling.seed is not None:
            kwargs["seed"] = sampling.seed
        if sampling.stop_token_ids:
            kwargs["stop_token_ids"] = list(sampling.stop_token_ids)
        try:
            return self._sampling_params(**kwargs)
        except (TypeError, ValueError) as e:
            raise InvalidArgument(f"TensorRT-LLM rejected the sampling parameters: {e}") from e

    def _open(self, request_id: str) -> _Flight:
        if request_id in self._flights:
            raise AlreadyExists(f"request {request_id!r} is already running")
        flight = _Flight(request_id)
        self._flights[request_id] = flight
        self._ensure_poller()
        return flight

    def _submit(
        self,
        flight: _Flight,
        prompt: tuple[int, ...],
        sampling: Any,
        *,
        disaggregated: Any,
        streaming: bool,
        first_token_id: int | None = None,
    ) -> TrtllmRequest:
        """``generate_async`` and a pump task feeding ``flight.queue``."""
        try:
            handle = self._llm.generate_async(
                {"prompt_token_ids": list(prompt)},
                sampling,
                streaming=streaming,
                disaggregated_params=disaggregated,
            )
        except Exception as e:
            raise self._translate(e, submitting=True) from e
        self._dirty = True
        flight.handle = handle
        # a generation-only request's KV comes from the context worker: nothing to prefill
        flight.unprefilled = len(prompt) if first_token_id is None else 0
        flight.pump = asyncio.get_running_loop().create_task(
            self._pump(flight, handle, first_token_id), name=f"trtllm-{flight.request_id}"
        )
        return handle

    async def _pump(
        self, flight: _Flight, handle: TrtllmRequest, first_token_id: int | None
    ) -> None:
        """Iterate the engine's result; put token deltas (and the end) on the flight's queue."""
        seen = 0
        leading = first_token_id is not None  # a generation-only output starts with it
        try:
            async for _ in handle:
                flight.unprefilled = 0
                completion = handle.outputs[0]
                ids = completion.token_ids or ()
                if leading and ids:
                    leading = False
                    seen = 1 if ids[0] == first_token_id else 0
                new = tuple(int(t) for t in ids[seen:])
                seen = max(seen, len(ids))
                self._tokens_out += len(new)
                finish = completion.finish_reason
                if finish is None and handle.finished:
                    finish = "abort"  # finished without a reason: do not leave the caller hanging
                flight.queue.put_nowait(_Step(new, finish))
                if finish is not None:
                    return
            flight.queue.put_nowait(RuntimeError("the result stream ended before the request"))
        except Exception as e:
            flight.queue.put_nowait(e)
        finally:
            flight.unprefilled = 0

    async def _stream(
        self,
        request_id: str,
        prompt: tuple[int, ...],
        sampling: SamplingParams,
        disaggregated: Any,
        *,
        first_token_id: int | None = None,
    ) -> AsyncGenerator[TokenChunk, None]:
        """A streamed request (aggregated, or generation-only with ``first_token_id``)."""
        generation_only = first_token_id is not None
        budget = sampling.max_tokens - (1 if generation_only else 0)
        flight = self._open(request_id)
        try:
            self._submit(
                flight,
                prompt,
                self._sampling(sampling, max_tokens=sampling.max_tokens),
                disaggregated=disaggregated,
                streaming=True,
                first_token_id=first_token_id,
            )
            sent = 0
            while True:
                item = await flight.queue.get()
                if isinstance(item, _Aborted):
                    yield TokenChunk((), "abort")
                    return
                if isinstance(item, BaseException):
                    raise self._translate(
                        item, submitting=False, kv_lost=generation_only and sent == 0
                    ) from item
                tokens, finish = item.token_ids, item.finish_reason
                room = budget - sent
                if len(tokens) > room:  # never more than max_tokens, whatever the engine does
                    tokens, finish = tokens[:room], "length"
                elif len(tokens) == room and finish is None:
                    finish = "length"
                sent += len(tokens)
                if finish is None:
                    if tokens:
                        yield TokenChunk(tokens)
                    continue
                yield TokenChunk(tokens, self._finish_reason(finish))
                return
        finally:
            self._close(flight)

    def _finish_reason(self, reason: str) -> str:
        mapped = _FINISH_REASONS.get(reason)
        if mapped is None:
            log.warning("trtllm: unexpected finish reason %r; reporting 'abort'", reason)
            return "abort"
        return mapped

    def _abort_handle(self, flight: _Flight) -> None:
        handle = flight.handle
        if handle is None or handle.finished:
            return
        try:
            handle.abort()
        except Exception:
            log.warning("trtllm: abort of %s failed", flight.request_id, exc_info=True)

    def _close(self, flight: _Flight) -> None:
        """The caller is done (finished, failed, aborted or gone): stop the engine's work on it."""
        if self._flights.get(flight.request_id) is flight:
            del self._flights[flight.request_id]
        self._dirty = True
        if not flight.aborted:
            self._abort_handle(flight)
        if flight.pump is not None and not flight.pump.done():
            flight.pump.cancel()

    def _translate(
        self, error: BaseException, *, submitting: bool, kv_lost: bool = False
    ) -> SwitchboardError:
        """A TensorRT-LLM failure as a Switchboard error (the one translation point)."""
        if isinstance(error, SwitchboardError):
            return error
        text = f"{type(error).__name__}: {error}"
        if submitting and isinstance(error, ValueError | TypeError):
            return InvalidArgument(f"TensorRT-LLM rejected the request: {text}")
        if kv_lost:
            return KvUnavailable(
                f"the generation request failed before its first token (the context KV is "
                f"gone, or its transfer failed): {text}"
            )
        if isinstance(error, self._request_error):
            return Unavailable(f"TensorRT-LLM failed the request: {text}")
        return Unavailable(f"TensorRT-LLM engine error: {text}")

    def _ensure_poller(self) -> None:
        if self._poll_interval_s <= 0 or (self._poller is not None and not self._poller.done()):
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._poller = loop.create_task(self._poll_forever(), name="trtllm-stats")

    async def _poll_forever(self) -> None:
        while True:
            await self._sleep(self._poll_interval_s)
            try:
                await self.refresh_stats()
            except Exception:  # a stats hiccup must never stop the loop
                log.exception("trtllm: stats refresh failed")

    async def _drain(self, call: Callable[[float], AsyncIterable[Any]], name: str) -> list[Any]:
        """What a TensorRT-LLM ``IterationResult`` holds now (waiting at most
        ``stats_timeout_s`` for more); [] when the call fails."""
        records: list[Any] = []
        deadline = self._clock() + self._stats_timeout_s
        try:
            iteration_result = call(self._stats_timeout_s)
            mark_undone = getattr(iteration_result, "mark_undone", None)
            if callable(mark_undone):  # it stays "done" after one empty wait otherwise
                mark_undone()
            async for record in iteration_result:
                records.append(record)
                # a busy engine adds records as fast as they are read: take what is there
                if len(records) >= _MAX_RECORDS_PER_DRAIN or self._clock() > deadline:
                    break
        except Exception as e:
            log.debug("trtllm: %s failed: %s", name, e)
        return records


# -- composition ---------------------------------------------------------------------------------


def import_trtllm_api(module: str = "tensorrt_llm") -> TrtllmApi:
    """The TensorRT-LLM classes, imported now; FailedPrecondition when they cannot be."""
    import importlib

    try:
        importlib.import_module(module)
        llmapi = importlib.import_module(f"{module}.llmapi")
        return TrtllmApi(
            llm=llmapi.LLM,
            sampling_params=llmapi.SamplingParams,
            disaggregated_params=llmapi.DisaggregatedParams,
            request_error=llmapi.RequestError,
        )
    except Exception as e:  # ImportError, or a CUDA library that will not load
        raise FailedPrecondition(f"{INSTALL_HINT} (importing {module} failed: {e})") from e


def build_trtllm_engine(
    settings: WorkerSettings,
    address: str,
    kv_fetcher: KvFetcher | None = None,
    *,
    api: TrtllmApi | None = None,
) -> TrtllmEngine:
    """The composition root's entry: a ``TrtllmEngine`` over ``LLM(model=settings.model_path,
    **engine_args)``, with the role's defaults (see ``llm_args_for_role``).

    ``kv_fetcher`` is not used: TensorRT-LLM moves KV with its own cache transceiver. ``api``
    defaults to the real TensorRT-LLM, imported now (tests pass fakes).
    """
    from workers.main import engine_args

    if not settings.model_path:
        raise InvalidArgument("the trtllm engine needs --model-path (a model directory or hub id)")
    args = llm_args_for_role(engine_args(settings), settings.role)
    api = api or import_trtllm_api()
    config = read_model_config(settings.model_path) or _hub_model_config(settings.model_path)
    try:
        llm = api.llm(model=settings.model_path, **args)
    except ValueError as e:
        raise InvalidArgument(f"TensorRT-LLM rejected the engine args: {e}") from e
    except Exception as e:
        raise FailedPrecondition(f"TensorRT-LLM could not start: {type(e).__name__}: {e}") from e
    llm_max_seq_len = getattr(getattr(llm, "args", None), "max_seq_len", None)
    vocab_size, max_context = model_limits(config, args, llm_max_seq_len)
    kv_cache = args.get("kv_cache_config")
    event_buffer = kv_cache.get("event_buffer_max_size", 0) if isinstance(kv_cache, Mapping) else 0
    return TrtllmEngine(
        llm,
        sampling_params=api.sampling_params,
        disaggregated_params=api.disaggregated_params,
        request_error=api.request_error,
        model=settings.model,
        vocab_size=vocab_size,
        max_context_tokens=max_context,
        address=address,
        kv_bytes_per_token=kv_bytes_per_token(config, _kv_dtype_bytes(args)),
        kv_events=bool(event_buffer),
    )


__all__ = [
    "TrtllmApi",
    "TrtllmEngine",
    "build_trtllm_engine",
    "decode_context_params",
    "encode_context_params",
    "import_trtllm_api",
    "kv_events_from_trtllm",
    "llm_args_for_role",
    "model_limits",
    "stats_from_iteration",
]
