"""The Worker gRPC service over any InferenceEngine, with draining and pushed load reports."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import zlib
from collections.abc import AsyncIterator, Iterator
from typing import Any, Protocol

import grpc
from prometheus_client import Counter
from switchboard.v1 import inference_pb2, worker_pb2, worker_pb2_grpc

from controlplane.adapters.grpc.errors import server_stream, unary
from controlplane.errors import FailedPrecondition, InvalidArgument, Unavailable
from controlplane.telemetry import tracing
from controlplane.telemetry.metrics import WorkerMetrics
from controlplane.telemetry.tracing import Span, Tracer
from workers.engine import (
    EngineStats,
    InferenceEngine,
    KvEvent,
    KvEventKind,
    KvHandle,
    Role,
    SamplingParams,
)

log = logging.getLogger(__name__)

Context = grpc.aio.ServicerContext[Any, Any]


class CallContext(Protocol):
    """What the service reads of a call's context: the caller's metadata (trace context)."""

    def invocation_metadata(self) -> Any: ...


DEFAULT_KV_CHUNK_BYTES = 1 << 20
MAX_KV_CHUNK_BYTES = 16 << 20

_KV_KIND = {
    KvEventKind.STORED: worker_pb2.KvBlockEvent.KIND_STORED,
    KvEventKind.EVICTED: worker_pb2.KvBlockEvent.KIND_EVICTED,
}


def sampling_from_pb(msg: inference_pb2.SamplingParams) -> SamplingParams:
    """The Worker API's sampling. Stops are its caller's business (the gateway watches the
    tokens): ``stop``, ``stop_token_ids`` and ``ignore_eos`` are refused, not ignored."""
    if msg.stop or msg.stop_token_ids or msg.ignore_eos:
        raise InvalidArgument(
            "sampling: stop, stop_token_ids and ignore_eos are Inference.Generate's; the Worker "
            "API ends a request at max_tokens (or Abort), its caller watches for stops"
        )
    return SamplingParams(
        max_tokens=msg.max_tokens,
        temperature=msg.temperature if msg.HasField("temperature") else 0.0,
        top_p=msg.top_p if msg.HasField("top_p") else 1.0,
        seed=msg.seed if msg.HasField("seed") else None,
    ).validate()


def kv_to_pb(kv: KvHandle) -> worker_pb2.KvHandle:
    return worker_pb2.KvHandle(
        source_address=kv.source_address,
        kv_id=kv.kv_id,
        num_tokens=kv.num_tokens,
        size_bytes=kv.size_bytes,
        engine_params=json.dumps(dict(kv.engine_params), sort_keys=True),
    )


def kv_from_pb(msg: worker_pb2.KvHandle) -> KvHandle:
    try:
        params = json.loads(msg.engine_params) if msg.engine_params else {}
    except ValueError:
        raise InvalidArgument("kv.engine_params is not JSON") from None
    if not msg.kv_id or not msg.source_address:
        raise InvalidArgument("kv.kv_id and kv.source_address are required")
    return KvHandle(
        kv_id=msg.kv_id,
        source_address=msg.source_address,
        num_tokens=msg.num_tokens,
        size_bytes=msg.size_bytes,
        engine_params={str(k): str(v) for k, v in params.items()},
    )


class WorkerService(worker_pb2_grpc.WorkerServicer):
    """Serves one engine. ``drain()`` stops new work and waits for in-flight work to finish.

    ``metrics`` (with ``model``): tokens by kind, KV bytes sent, and the engine's load as
    gauges (refreshed every report interval). ``tracer``: a ``worker.prefill`` /
    ``worker.decode`` / ``worker.fetch_kv`` span per call, child of the caller's
    ``traceparent`` metadata (see controlplane/telemetry/tracing.py); None: no spans."""

    def __init__(
        self,
        engine: InferenceEngine,
        *,
        worker_id: str,
        role: Role,
        report_interval_s: float = 0.25,
        subscriber_queue: int = 64,
        model: str = "",
        metrics: WorkerMetrics | None = None,
        tracer: Tracer | None = None,
    ) -> None:
        self.engine = engine
        self.worker_id = worker_id
        self.role = role
        self.model = model
        self.metrics = metrics
        self.tracer = tracer
        self._token_counters: dict[str, Counter] = {}
        self.report_interval_s = report_interval_s
        self.draining = False
        self.inflight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._subscribers: set[asyncio.Queue[worker_pb2.WorkerStats]] = set()
        self._subscriber_queue = subscriber_queue
        self._sequence = 0

    # --- admission and in-flight accounting ------------------------------------------------
    @contextlib.contextmanager
    def _work(self, *roles: Role) -> Iterator[None]:
        if self.draining:
            raise Unavailable(f"worker {self.worker_id} is draining; send new work elsewhere")
        if self.role is not Role.BOTH and self.role not in roles:
            raise FailedPrecondition(f"worker {self.worker_id} is a {self.role} worker")
        self.inflight += 1
        self._idle.clear()
        try:
            yield
        finally:
            self.inflight -= 1
            if self.inflight == 0:
                self._idle.set()

    async def drain(self, timeout_s: float) -> bool:
        """Take no new work; wait (up to ``timeout_s``) for in-flight work. True if idle."""
        self.draining = True
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
            return True
        except TimeoutError:
            log.warning("drain timed out with %d requests in flight", self.inflight)
            return False

    # --- RPCs ------------------------------------------------------------------------------
    @unary
    async def Prefill(
        self, request: worker_pb2.PrefillRequest, context: Context
    ) -> worker_pb2.PrefillResponse:
        return await self.prefill(request, context)

    async def prefill(
        self, request: worker_pb2.PrefillRequest, context: CallContext
    ) -> worker_pb2.PrefillResponse:
        """``Prefill`` without gRPC (domain errors raised; also the token transport's)."""
        request_id = _request_id(request.request_id)
        sampling = sampling_from_pb(request.sampling)
        span = self._span("worker.prefill", context, request_id)
        try:
            with self._work(Role.PREFILL):
                res = await self.engine.prefill(
                    request_id, tuple(request.prompt_token_ids), sampling
                )
        except BaseException as e:
            tracing.end_span(span, e)
            raise
        if span is not None:
            span.set_attribute("switchboard.cached_prompt_tokens", res.cached_prompt_tokens)
            tracing.end_span(span)
        if self.metrics is not None:
            self._tokens("prefill", len(request.prompt_token_ids))
        return worker_pb2.PrefillResponse(
            request_id=res.request_id,
            first_token_id=res.first_token_id,
            kv=kv_to_pb(res.kv),
            cached_prompt_tokens=res.cached_prompt_tokens,
        )

    @unary
    async def DecodeUnary(
        self, request: worker_pb2.DecodeRequest, context: Context
    ) -> worker_pb2.DecodeChunk:
        """``Decode``'s chunks as one message: all the tokens, the last chunk's finish reason
        and usage."""
        out = worker_pb2.DecodeChunk()
        async for chunk in self.decode(request, context):
            out.token_ids.extend(chunk.token_ids)
            if chunk.finish_reason:
                out.finish_reason = chunk.finish_reason
                out.usage.CopyFrom(chunk.usage)
        return out

    @server_stream
    async def Decode(
        self, request: worker_pb2.DecodeRequest, context: Context
    ) -> AsyncIterator[worker_pb2.DecodeChunk]:
        async for msg in self.decode(request, context):
            yield msg

    async def decode(
        self, request: worker_pb2.DecodeRequest, context: CallContext
    ) -> AsyncIterator[worker_pb2.DecodeChunk]:
        """``Decode`` without gRPC (domain errors raised; also the token transport's)."""
        request_id = _request_id(request.request_id)
        sampling = sampling_from_pb(request.sampling)
        prompt = tuple(request.prompt_token_ids)
        span = self._span("worker.decode", context, request_id)
        token = tracing.attach_span(span)  # the KV fetcher's span finds its parent here
        error: BaseException | None = None
        try:
            with self._work(Role.DECODE):
                if request.HasField("kv"):
                    stream = self.engine.decode(
                        request_id, prompt, request.first_token_id, kv_from_pb(request.kv), sampling
                    )
                    completion = 1  # the first token came from the prefill worker
                else:
                    stream = self.engine.generate(request_id, prompt, sampling)
                    completion = 0
                    if self.metrics is not None:
                        self._tokens("prefill", len(prompt))
                finished = False
                try:
                    async for chunk in stream:
                        completion += len(chunk.token_ids)
                        if self.metrics is not None and chunk.token_ids:
                            self._tokens("decode", len(chunk.token_ids))
                        msg = worker_pb2.DecodeChunk(token_ids=list(chunk.token_ids))
                        if chunk.finish_reason is not None:
                            finished = True
                            msg.finish_reason = chunk.finish_reason
                            msg.usage.prompt_tokens = len(prompt)
                            msg.usage.completion_tokens = completion
                        yield msg
                finally:
                    if not finished:  # the client went away or something broke: free the KV
                        with contextlib.suppress(Exception):
                            await self.engine.abort(request_id)
        except BaseException as e:
            error = e
            raise
        finally:
            tracing.detach(token)
            tracing.end_span(span, error)

    @server_stream
    async def FetchKv(
        self, request: worker_pb2.FetchKvRequest, context: Context
    ) -> AsyncIterator[worker_pb2.KvChunk]:
        if not request.kv_id:
            raise InvalidArgument("kv_id is required")
        if request.chunk_bytes > MAX_KV_CHUNK_BYTES:
            raise InvalidArgument(f"chunk_bytes exceeds {MAX_KV_CHUNK_BYTES}")
        size = request.chunk_bytes or DEFAULT_KV_CHUNK_BYTES
        span = self._span("worker.fetch_kv", context, request.kv_id)
        error: BaseException | None = None
        try:
            with self._work(Role.PREFILL):
                data = self.engine.export_kv(request.kv_id)
                total = len(data)
                if span is not None:
                    span.set_attribute("switchboard.kv_bytes", total)
                if self.metrics is not None:
                    self.metrics.kv_transfer_bytes.labels(self.model, "send").inc(total)
                offsets = range(0, max(total, 1), size)
                for seq, start in enumerate(offsets):
                    piece = data[start : start + size]
                    yield worker_pb2.KvChunk(
                        sequence=seq,
                        data=piece,
                        total_bytes=total,
                        crc32=zlib.crc32(piece),
                        last=start + size >= total,
                    )
        except BaseException as e:
            error = e
            raise
        finally:
            tracing.end_span(span, error)

    @unary
    async def Abort(
        self, request: worker_pb2.AbortRequest, context: Context
    ) -> worker_pb2.AbortResponse:
        found = await self.engine.abort(_request_id(request.request_id))
        return worker_pb2.AbortResponse(found=found)

    @unary
    async def Stats(
        self, request: worker_pb2.StatsRequest, context: Context
    ) -> worker_pb2.WorkerStats:
        return self._report(self.engine.stats(), [])

    @server_stream
    async def WatchStats(
        self, request: worker_pb2.StatsRequest, context: Context
    ) -> AsyncIterator[worker_pb2.WorkerStats]:
        queue: asyncio.Queue[worker_pb2.WorkerStats] = asyncio.Queue(self._subscriber_queue)
        self._subscribers.add(queue)
        try:
            yield self._report(self.engine.stats(), [])
            while True:
                yield await queue.get()
        finally:
            self._subscribers.discard(queue)

    # --- telemetry -------------------------------------------------------------------------
    def _span(self, name: str, context: CallContext, request_id: str) -> Span | None:
        if self.tracer is None:
            return None
        return tracing.start_span(
            self.tracer,
            name,
            tracing.parent_from_metadata(context.invocation_metadata()),
            kind=tracing.SpanKind.SERVER,
            attributes={
                "switchboard.worker_id": self.worker_id,
                "switchboard.request_id": request_id,
                "switchboard.role": str(self.role),
            },
        )

    def _tokens(self, kind: str, n: int) -> None:
        assert self.metrics is not None
        counter = self._token_counters.get(kind)
        if counter is None:
            labels = (self.worker_id, self.model, str(self.role), kind)
            counter = self._token_counters[kind] = self.metrics.tokens.labels(*labels)
        counter.inc(n)

    def update_gauges(self, stats: EngineStats | None = None) -> None:
        """Set the load gauges from the engine's stats (no-op without metrics)."""
        if self.metrics is None:
            return
        stats = stats if stats is not None else self.engine.stats()
        labels = (self.worker_id, self.model, str(self.role))
        m = self.metrics
        total = stats.kv_blocks_total
        m.kv_cache_usage.labels(*labels).set(stats.kv_blocks_used / total if total else 0.0)
        m.running.labels(*labels).set(stats.running_requests)
        m.waiting.labels(*labels).set(stats.waiting_requests)
        m.prefix_hit_ratio.labels(*labels).set(stats.prefix_cache_hit_rate)

    # --- load reports ----------------------------------------------------------------------
    def _report(self, stats: EngineStats, events: list[KvEvent]) -> worker_pb2.WorkerStats:
        self._sequence += 1
        return worker_pb2.WorkerStats(
            worker_id=self.worker_id,
            running_requests=stats.running_requests,
            waiting_requests=stats.waiting_requests,
            kv_blocks_used=stats.kv_blocks_used,
            kv_blocks_total=stats.kv_blocks_total,
            prefix_cache_hit_rate=stats.prefix_cache_hit_rate,
            tokens_per_second=stats.tokens_per_second,
            last_batch_size=stats.last_batch_size,
            max_batch_size_seen=stats.max_batch_size_seen,
            inflight_requests=self.inflight,
            draining=self.draining,
            kv_events=[
                worker_pb2.KvBlockEvent(kind=_KV_KIND[e.kind], block_hashes=list(e.block_hashes))
                for e in events
            ],
            sequence=self._sequence,
            batch_context_tokens=stats.batch_context_tokens,
            queued_prefill_tokens=stats.queued_prefill_tokens,
            dp_rank_running=list(stats.dp_rank_running),
        )

    async def publish_forever(self) -> None:
        """Push a load report (with the KV events since the last one) to every subscriber."""
        while True:
            await asyncio.sleep(self.report_interval_s)
            events = self.engine.drain_kv_events()
            if self.metrics is not None:
                self.update_gauges()
            if not self._subscribers:
                continue
            report = self._report(self.engine.stats(), events)
            for queue in list(self._subscribers):
                if queue.full():  # a slow subscriber loses its oldest report, not the newest
                    queue.get_nowait()
                queue.put_nowait(report)


def _request_id(value: str) -> str:
    if not value:
        raise InvalidArgument("request_id is required")
    if len(value) > 256:
        raise InvalidArgument("request_id is longer than 256 characters")
    return value
