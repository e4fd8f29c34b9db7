"""An OpenAI-compatible HTTP server over any ``InferenceEngine``: a raw ASGI application.

Theory of operation
-------------------
``OpenAIApp`` is an ASGI 3 callable (run it under uvicorn with ``loop="uvloop"`` and
``http="httptools"``; no framework sits in the token path, see the team's HTTP-stack notes). It
serves one engine under one model name, with a ``Tokenizer`` (workers/tokenizer.py) between text
and token ids:

- ``POST /v1/completions``: prompt (text or token ids) -> text; streamed or not
- ``POST /v1/chat/completions``: messages -> chat template -> text; streamed or not
- ``GET /v1/models``: the one served model
- ``GET /health``: 200, or 503 while shutting down
- ``GET /metrics``: Prometheus text, engine gauges and request counters

**A request**: read the body (at most ``max_body_bytes``), parse it with pydantic in strict mode
(a wrong type or range is a 400 naming the field), check the model name (404), tokenize, build
``SamplingParams`` and hand the ids to the engine. Streaming responses send their headers only
once the engine produced the first tokens, so anything the engine rejects (prompt longer than
the context, ids outside the vocabulary) is still a plain 4xx with an OpenAI error body. Errors
after that arrive in the stream as a ``data: {"error": ...}`` event before ``data: [DONE]``.

**Errors** are OpenAI-shaped, ``{"error": {"message", "type", "param", "code"}}``; Switchboard
errors from the engine map to HTTP statuses in one table, ``ERROR_TABLE`` (anything else is a
500 whose traceback goes to the log, not to the client).

**Client disconnects**: once the body is read, a watcher task waits on ``receive()``; an
``http.disconnect`` before the response is complete cancels the handler, whose ``finally`` aborts
the engine request, so its KV cache is freed at once.

**Stop strings** are matched on the decoded text: generation ends at the first match (the
match itself is not returned) and the engine request is aborted. While streaming, the last
``len(longest stop) - 1`` characters are held back until they can no longer start a match.
Stop token ids (``stop_token_ids``, and the tokenizer's EOS ids unless ``ignore_eos``) are the
engine's business.

**Prefill/decode disaggregation** follows vLLM's ``kv_transfer_params`` protocol, as driven by
vllm-router ``--vllm-pd-disaggregation`` and vLLM's toy disaggregation proxy:

1. the router sends the request to a prefill server with ``max_tokens=1``, ``stream=false`` and
   ``kv_transfer_params={"do_remote_decode": true, ...}``. The server runs ``engine.prefill``
   (the engine holds the KV) and answers an ordinary one-token completion plus a top-level
   ``kv_transfer_params``: vLLM's keys (``do_remote_prefill: true``, ``remote_engine_id``,
   ``remote_request_id``, ``remote_host`` / ``remote_port`` = the Worker gRPC service of the
   process that holds the KV) and ``switchboard_kv`` (KV id, tokens, bytes, engine parameters
   and the first token);
2. the router sends the original request with those ``kv_transfer_params`` to a decode server,
   which calls ``engine.decode`` with the rebuilt ``KvHandle`` (the engine's ``KvFetcher`` pulls
   the KV over gRPC ``FetchKv``) and answers the whole completion, the prefill's first token
   included, as vLLM's decode instance does. If the KV is gone (``KvUnavailable``: expired,
   evicted, prefill server restarted) it prefills locally instead, like vLLM's "recompute"
   policy, and counts it in ``switchboard_http_kv_fetch_fallbacks_total``.

The engine request id is the ``X-Request-Id`` header when there is one (routers send the same
id to both halves), else the prefill's ``remote_request_id`` on a decode, else a fresh one. The
simulated engine samples from (seed or request id, position), so a disaggregated request gives
the same tokens as an aggregated one.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import orjson
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from controlplane.telemetry import tracing
from controlplane.telemetry.metrics import HttpServerSnapshot, WorkerHttpMetrics
from controlplane.telemetry.tracing import Tracer
from workers.engine import (
    InferenceEngine,
    KvHandle,
    KvUnavailable,
    Role,
    SamplingParams,
    TokenChunk,
)
from workers.openai_protocol import (
    JSON_HEADERS,
    ApiError,
    ClientGone,
    Exchange,
    KvTransferParams,
    Receive,
    ResponseSpec,
    Scope,
    Send,
    api_error,
    dispatch,
    model_not_found,
    new_request_id,
    parse_generation,
    prepare,
    read_body,
    request_id_header,
    send_body,
    send_error,
    send_json_response,
    send_stream_response,
    watch_disconnect,
)
from workers.tokenizer import Tokenizer

log = logging.getLogger(__name__)

# --- the app -------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Counters:
    """Request counters, read by the metrics collector at scrape time (no per-request locks)."""

    requests: dict[tuple[str, int], int] = field(default_factory=dict)
    prompt_tokens: int = 0
    generation_tokens: int = 0
    kv_fetch_fallbacks: int = 0
    disconnects: int = 0

    def count(self, route: str, status: int) -> None:
        key = (route, status)
        self.requests[key] = self.requests.get(key, 0) + 1


@dataclass(slots=True)
class _Job:
    """A parsed generation request, ready for the engine."""

    route: str
    chat: bool
    request_id: str
    prompt: tuple[int, ...]
    sampling: SamplingParams
    stream: bool
    include_usage: bool
    stops: tuple[str, ...]
    kv: KvTransferParams | None
    kv_out: KvTransferParams | None = None
    """The prefill half's answer: where the decode half finds the KV."""


class OpenAIApp:
    """The ASGI application; see the module docstring.

    Args:
        engine: serves the tokens.
        tokenizer: text <-> ids for ``engine``'s model.
        model: the name clients send as ``model`` (default: ``engine.model``).
        role: ``prefill`` servers refuse ``do_remote_prefill``; ``decode`` servers refuse
            ``do_remote_decode``; ``both`` serves either half and plain requests.
        kv_address: "host:port" of the Worker gRPC service that exports this engine's held KV
            (goes into ``kv_transfer_params.remote_host`` / ``remote_port``); "" = none, and
            ``do_remote_decode`` requests are refused.
        engine_id: ``kv_transfer_params.remote_engine_id`` (default: ``kv_address``).
        max_body_bytes: larger request bodies get 413.
        clock: wall-clock seconds, for the ``created`` fields.
        tracer: OpenTelemetry tracer (None: off): a ``worker.http.request`` span per
            generation request, child of the client's ``traceparent``; it is the current span
            while the engine runs, so a KV fetch (``kv.transfer``) hangs under it.
    """

    def __init__(
        self,
        engine: InferenceEngine,
        tokenizer: Tokenizer,
        *,
        model: str | None = None,
        role: Role = Role.BOTH,
        kv_address: str = "",
        engine_id: str = "",
        max_body_bytes: int = 32 << 20,
        clock: Callable[[], float] = time.time,
        tracer: Tracer | None = None,
    ) -> None:
        self.engine = engine
        self.tracer = tracer
        self.tokenizer = tokenizer
        self.model = model or engine.model
        self.role = role
        self.kv_address = kv_address
        self.engine_id = engine_id or kv_address or self.model
        self.max_body_bytes = max_body_bytes
        self.clock = clock
        self.draining = False
        self.counters = _Counters()
        self.registry = CollectorRegistry(auto_describe=False)
        WorkerHttpMetrics(self.registry, source=self._snapshot)
        self.registry.register(_VllmAliases(self))
        self._created = int(clock())
        self._routes: dict[tuple[str, str], Callable[[Scope, Receive, Send], Awaitable[None]]] = {
            ("POST", "/v1/completions"): self._completions,
            ("POST", "/v1/chat/completions"): self._chat_completions,
            ("GET", "/v1/models"): self._models,
            ("GET", "/health"): self._health,
            ("GET", "/metrics"): self._metrics,
        }

    # -- ASGI entry -------------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await dispatch(self._routes, scope, receive, send)

    def _snapshot(self) -> HttpServerSnapshot:
        """The figures ``WorkerHttpMetrics`` reports at a scrape."""
        s, c = self.engine.stats(), self.counters
        return HttpServerSnapshot(
            model=self.model,
            running_requests=s.running_requests,
            waiting_requests=s.waiting_requests,
            kv_blocks_used=s.kv_blocks_used,
            kv_blocks_total=s.kv_blocks_total,
            prefix_cache_hit_rate=s.prefix_cache_hit_rate,
            tokens_per_second=s.tokens_per_second,
            batch_size=s.last_batch_size,
            requests=dict(c.requests),
            prompt_tokens=c.prompt_tokens,
            generation_tokens=c.generation_tokens,
            kv_fetch_fallbacks=c.kv_fetch_fallbacks,
            disconnects=c.disconnects,
        )

    # -- small routes -----------------------------------------------------------------------------

    async def _models(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = {
            "object": "list",
            "data": [
                {
                    "id": self.model,
                    "object": "model",
                    "created": self._created,
                    "owned_by": "switchboard",
                    "root": self.engine.model,
                    "max_model_len": self.engine.max_context_tokens,
                }
            ],
        }
        await send_body(send, 200, orjson.dumps(body), JSON_HEADERS)

    async def _health(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.draining:
            await send_body(send, 503, b'{"status":"draining"}', JSON_HEADERS)
        else:
            await send_body(send, 200, b'{"status":"ok"}', JSON_HEADERS)

    async def _metrics(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = generate_latest(self.registry)
        await send_body(send, 200, body, [(b"content-type", CONTENT_TYPE_LATEST.encode())])

    # -- generation routes ------------------------------------------------------------------------

    async def _completions(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._generation(scope, receive, send, chat=False)

    async def _chat_completions(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._generation(scope, receive, send, chat=True)

    async def _generation(self, scope: Scope, receive: Receive, send: Send, *, chat: bool) -> None:
        route = scope["path"]
        exchange = Exchange()
        try:
            body = await read_body(receive, self.max_body_bytes)
        except ApiError as e:
            self.counters.count(route, e.status)
            await send_error(send, e)
            return
        except ClientGone:
            self.counters.disconnects += 1
            return
        task = asyncio.current_task()
        assert task is not None
        watcher = asyncio.get_running_loop().create_task(watch_disconnect(receive, exchange, task))
        span = None
        if self.tracer is not None:
            span = tracing.start_span(
                self.tracer,
                "worker.http.request",
                tracing.parent_from_headers(scope["headers"]),
                kind=tracing.SpanKind.SERVER,
                attributes={"http.route": route, "switchboard.role": str(self.role)},
            )
        token = tracing.attach_span(span)
        status = 499
        try:
            status = await self._serve(scope, body, send, exchange, chat=chat)
            self.counters.count(route, status)
        except asyncio.CancelledError:
            if not exchange.disconnected:
                raise
            task.uncancel()  # we cancelled ourselves: the client is gone
            self.counters.disconnects += 1
        finally:
            watcher.cancel()
            tracing.detach(token)
            if span is not None:
                span.set_attribute("http.status_code", status)
                tracing.end_span(span, f"status {status}" if status != 200 else None)

    async def _serve(
        self, scope: Scope, body: bytes, send: Send, exchange: Exchange, *, chat: bool
    ) -> int:
        """Answer one generation request; the HTTP status sent."""
        try:
            job = self._job(scope, body, chat=chat)
            stream = self._tokens(job)
            try:
                first = await anext(stream)
            except StopAsyncIteration:
                first = TokenChunk((), "abort")
        except Exception as e:
            err = api_error(e)
            exchange.responded = True
            await send_error(send, err)
            return err.status
        self.counters.prompt_tokens += len(job.prompt)
        try:
            if job.stream:  # reports its own errors once the headers are out
                await self._stream_response(job, first, stream, send, exchange)
            else:
                await self._json_response(job, first, stream, send, exchange)
        except Exception as e:
            if job.stream:
                raise
            err = api_error(e)  # the JSON answer: nothing was sent yet
            exchange.responded = True
            await send_error(send, err)
            return err.status
        finally:
            await stream.aclose()
        return 200

    def _job(self, scope: Scope, body: bytes, *, chat: bool) -> _Job:
        if self.draining:
            raise ApiError(503, "the server is shutting down", type="service_unavailable_error")
        req = parse_generation(body, chat=chat)
        if req.model is not None and req.model != self.model:
            raise model_not_found(req.model, f"this server serves {self.model!r}")
        prepared = prepare(req, self.tokenizer, max_context_tokens=self.engine.max_context_tokens)
        kv = req.kv_transfer_params
        if kv is not None and not (kv.do_remote_decode or kv.do_remote_prefill):
            kv = None
        if kv is not None and kv.do_remote_decode and req.stream:
            raise ApiError(
                400,
                "kv_transfer_params.do_remote_decode needs stream=false (the answer carries the "
                "KV's kv_transfer_params)",
                param="stream",
            )
        return _Job(
            route=scope["path"],
            chat=chat,
            request_id=self._request_id(scope, kv),
            prompt=prepared.prompt,
            sampling=prepared.sampling,
            stream=prepared.stream,
            include_usage=prepared.include_usage,
            stops=prepared.stops,
            kv=kv,
        )

    def _request_id(self, scope: Scope, kv: KvTransferParams | None) -> str:
        rid = request_id_header(scope)
        if rid is not None:
            return rid
        if kv is not None and kv.do_remote_prefill and kv.remote_request_id:
            return kv.remote_request_id
        return new_request_id()

    # -- the token stream: aggregated, prefill half or decode half --------------------------------

    def _tokens(self, job: _Job) -> AsyncGenerator[TokenChunk, None]:
        kv = job.kv
        if kv is None:
            return self._generate(job)
        if kv.do_remote_decode and kv.do_remote_prefill:
            raise ApiError(
                400,
                "kv_transfer_params: do_remote_decode and do_remote_prefill are exclusive",
                param="kv_transfer_params",
            )
        if kv.do_remote_decode:
            if self.role is Role.DECODE:
                raise ApiError(
                    400,
                    "kv_transfer_params.do_remote_decode: this is a decode server; send the "
                    "prefill half to a prefill server",
                    param="kv_transfer_params",
                )
            if not self.kv_address:
                raise ApiError(
                    400,
                    "kv_transfer_params.do_remote_decode: this server exports no KV",
                    param="kv_transfer_params",
                )
            return self._prefill(job)
        if self.role is Role.PREFILL:
            raise ApiError(
                400,
                "kv_transfer_params.do_remote_prefill: this is a prefill server; send the decode "
                "half to a decode server",
                param="kv_transfer_params",
            )
        handle, first_token = self._kv_handle(kv)
        return self._decode(job, handle, first_token)

    async def _generate(self, job: _Job) -> AsyncGenerator[TokenChunk, None]:
        finished = False
        try:
            async for chunk in self.engine.generate(job.request_id, job.prompt, job.sampling):
                finished = chunk.finish_reason is not None
                yield chunk
        finally:
            if not finished:
                await self._abort(job.request_id)

    async def _prefill(self, job: _Job) -> AsyncGenerator[TokenChunk, None]:
        one = SamplingParams(
            max_tokens=1,
            temperature=job.sampling.temperature,
            top_p=job.sampling.top_p,
            seed=job.sampling.seed,
            stop_token_ids=job.sampling.stop_token_ids,
        )
        try:
            res = await self.engine.prefill(job.request_id, job.prompt, one)
        except asyncio.CancelledError:
            await self._abort(job.request_id)
            raise
        if res.first_token_id in job.sampling.stop_token_ids:
            await self._abort(job.request_id)  # nothing left to decode: drop the held KV
            yield TokenChunk((res.first_token_id,), "stop")
            return
        host, _, port = self.kv_address.rpartition(":")
        job.kv_out = KvTransferParams(
            do_remote_prefill=True,
            do_remote_decode=False,
            remote_engine_id=self.engine_id,
            remote_request_id=job.request_id,
            remote_host=host,
            remote_port=int(port),
            switchboard_kv={
                "kv_id": res.kv.kv_id,
                "source_address": res.kv.source_address,
                "num_tokens": res.kv.num_tokens,
                "size_bytes": res.kv.size_bytes,
                "engine_params": dict(res.kv.engine_params),
                "first_token_id": res.first_token_id,
            },
        )
        yield TokenChunk((res.first_token_id,), "length")

    def _kv_handle(self, kv: KvTransferParams) -> tuple[KvHandle, int]:
        d = kv.switchboard_kv
        if d is None:
            raise ApiError(
                400,
                "kv_transfer_params.switchboard_kv is missing: the prefill answer did not come "
                "from a Switchboard server",
                param="kv_transfer_params.switchboard_kv",
            )

        def need(key: str, kind: type) -> Any:
            value = d.get(key)
            if not isinstance(value, kind) or isinstance(value, bool):
                raise ApiError(
                    400,
                    f"kv_transfer_params.switchboard_kv.{key}: must be a {kind.__name__}",
                    param=f"kv_transfer_params.switchboard_kv.{key}",
                )
            return value

        params = d.get("engine_params") or {}
        if not isinstance(params, dict):
            raise ApiError(
                400,
                "kv_transfer_params.switchboard_kv.engine_params: must be an object",
                param="kv_transfer_params.switchboard_kv.engine_params",
            )
        source = d.get("source_address")
        if not isinstance(source, str) or not source:
            if not kv.remote_host or kv.remote_port is None:
                raise ApiError(
                    400,
                    "kv_transfer_params: remote_host and remote_port are required",
                    param="kv_transfer_params.remote_host",
                )
            source = f"{kv.remote_host}:{kv.remote_port}"
        handle = KvHandle(
            kv_id=need("kv_id", str),
            source_address=source,
            num_tokens=need("num_tokens", int),
            size_bytes=need("size_bytes", int),
            engine_params={str(k): str(v) for k, v in params.items()},
        )
        return handle, need("first_token_id", int)

    async def _decode(
        self, job: _Job, kv: KvHandle, first_token: int
    ) -> AsyncGenerator[TokenChunk, None]:
        finished = False
        stream = self.engine.decode(job.request_id, job.prompt, first_token, kv, job.sampling)
        try:
            try:
                head = await anext(stream)
            except KvUnavailable as e:
                log.info("request %s: %s; prefilling here instead", job.request_id, e)
                self.counters.kv_fetch_fallbacks += 1
                async for chunk in self._generate(job):
                    finished = True
                    yield chunk
                return
            except StopAsyncIteration:
                head = TokenChunk((), "abort")
            finished = head.finish_reason is not None
            yield TokenChunk((first_token, *head.token_ids), head.finish_reason)
            async for chunk in stream:
                finished = chunk.finish_reason is not None
                yield chunk
        finally:
            if isinstance(stream, AsyncGenerator):
                await stream.aclose()
            if not finished:
                await self._abort(job.request_id)

    async def _abort(self, request_id: str) -> None:
        try:
            await self.engine.abort(request_id)
        except Exception:
            log.warning("abort of %s failed", request_id, exc_info=True)

    # -- responses --------------------------------------------------------------------------------

    def _spec(self, job: _Job) -> ResponseSpec:
        return ResponseSpec(
            chat=job.chat,
            request_id=job.request_id,
            model=self.model,
            created=int(self.clock()),
            prompt_tokens=len(job.prompt),
            stops=job.stops,
            include_usage=job.include_usage,
        )

    async def _counted(self, stream: AsyncIterator[TokenChunk]) -> AsyncIterator[TokenChunk]:
        async for chunk in stream:
            self.counters.generation_tokens += len(chunk.token_ids)
            yield chunk

    async def _json_response(
        self,
        job: _Job,
        first: TokenChunk,
        stream: AsyncIterator[TokenChunk],
        send: Send,
        exchange: Exchange,
    ) -> None:
        self.counters.generation_tokens += len(first.token_ids)
        extra = None
        if job.kv_out is not None:  # the prefill half's answer
            extra = {"kv_transfer_params": job.kv_out.model_dump()}
        await send_json_response(
            self._spec(job), self.tokenizer, first, self._counted(stream), send, exchange,
            extra=extra,
        )  # fmt: skip

    async def _stream_response(
        self,
        job: _Job,
        first: TokenChunk,
        stream: AsyncIterator[TokenChunk],
        send: Send,
        exchange: Exchange,
    ) -> None:
        self.counters.generation_tokens += len(first.token_ids)
        await send_stream_response(
            self._spec(job), self.tokenizer, first, self._counted(stream), send, exchange
        )


# --- metrics -------------------------------------------------------------------------------------


class _VllmAliases(Collector):
    """Three engine gauges again under vLLM's names (``vllm:*``), so tools that read a vLLM
    server's load (routers, autoscalers) read this one the same way. Compatibility aliases,
    not Switchboard metrics: Switchboard's own are ``WorkerHttpMetrics``
    (controlplane/telemetry/metrics.py)."""

    def __init__(self, app: OpenAIApp) -> None:
        self._app = app

    def collect(self) -> Iterable[Metric]:
        app = self._app
        s = app.engine.stats()
        usage = s.kv_blocks_used / s.kv_blocks_total if s.kv_blocks_total else 0.0
        for name, doc, value in (
            ("vllm:num_requests_running", "vLLM name: running requests.", s.running_requests),
            ("vllm:num_requests_waiting", "vLLM name: waiting requests.", s.waiting_requests),
            ("vllm:kv_cache_usage_perc", "vLLM name: KV-cache usage, 0-1.", usage),
        ):
            g = GaugeMetricFamily(name, doc, labels=["model_name"])
            g.add_metric([app.model], value)
            yield g
