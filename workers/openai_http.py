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
import uuid
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    MutableMapping,
    Sequence,
)
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, TypeVar

import orjson
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from controlplane.errors import (
    AlreadyExists,
    Conflict,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    SwitchboardError,
    Unavailable,
)
from workers.engine import (
    InferenceEngine,
    KvHandle,
    KvUnavailable,
    Role,
    SamplingParams,
    TokenChunk,
)
from workers.tokenizer import IncrementalDecoder, Message, Tokenizer

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
AsgiMessage = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[AsgiMessage]]
Send = Callable[[AsgiMessage], Awaitable[None]]

MAX_REQUEST_ID_CHARS = 256

# --- errors --------------------------------------------------------------------------------------

# The one table from Switchboard errors to HTTP status and OpenAI error type. Order matters: the
# first matching class wins (subclasses before their bases; KvUnavailable is a NotFound).
ERROR_TABLE: tuple[tuple[type[SwitchboardError], int, str], ...] = (
    (InvalidArgument, 400, "invalid_request_error"),
    (NotFound, 404, "not_found_error"),
    (AlreadyExists, 409, "conflict_error"),
    (Conflict, 409, "conflict_error"),
    (FailedPrecondition, 400, "invalid_request_error"),
    (Unavailable, 503, "service_unavailable_error"),
)


class ApiError(Exception):
    """An error answered to the client: HTTP status and the OpenAI error object."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> bytes:
        return orjson.dumps(
            {
                "error": {
                    "message": self.message,
                    "type": self.type,
                    "param": self.param,
                    "code": self.code,
                }
            }
        )


def api_error(exc: BaseException) -> ApiError:
    """``exc`` as what the client is told (unexpected errors are logged, with the traceback)."""
    if isinstance(exc, ApiError):
        return exc
    for cls, status, kind in ERROR_TABLE:
        if isinstance(exc, cls):
            return ApiError(status, str(exc), type=kind)
    log.error("request failed", exc_info=exc)
    return ApiError(500, f"internal error: {type(exc).__name__}", type="internal_error")


# --- request bodies (pydantic at the edge, strict: no silent coercion) ---------------------------

_STRICT = ConfigDict(extra="ignore", strict=True)
PositiveInt = Annotated[int, Field(ge=1)]


class StreamOptions(BaseModel):
    model_config = _STRICT
    include_usage: bool = False


class KvTransferParams(BaseModel):
    """vLLM's ``kv_transfer_params`` (NIXL connector keys) plus ``switchboard_kv``."""

    model_config = ConfigDict(extra="allow", strict=True)
    do_remote_decode: bool = False
    do_remote_prefill: bool = False
    remote_engine_id: str | None = None
    remote_request_id: str | None = None
    remote_host: str | None = None
    remote_port: int | None = None
    switchboard_kv: dict[str, Any] | None = None


class _SamplingFields(BaseModel):
    model_config = _STRICT
    model: str | None = None
    max_tokens: PositiveInt | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    seed: int | None = None
    n: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    min_tokens: int | None = None  # accepted and not enforced: the sim emits no EOS by itself
    kv_transfer_params: KvTransferParams | None = None


class CompletionRequest(_SamplingFields):
    prompt: str | list[int] | list[str] | list[list[int]]
    echo: bool = False
    logprobs: int | None = None


class TextPart(BaseModel):
    model_config = _STRICT
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = _STRICT
    role: str
    content: str | list[TextPart] | None = None


class ChatCompletionRequest(_SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: PositiveInt | None = None
    logprobs: bool = False


_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "list", "dict", "none"})
_Model = TypeVar("_Model", bound=BaseModel)


def _parse(model: type[_Model], body: bytes) -> _Model:
    if not body:
        raise ApiError(400, "the request body is empty; send a JSON object")
    try:
        return model.model_validate_json(body)
    except ValidationError as e:
        err = e.errors(include_url=False)[0]
        if err["type"] == "json_invalid":
            raise ApiError(
                400, f"the body is not valid JSON: {err['msg'].removeprefix('Invalid JSON: ')}"
            ) from None
        parts = [
            str(p)
            for p in err["loc"]
            if isinstance(p, int) or (p not in _TYPE_TAGS and "[" not in p and "-" not in p)
        ]
        param = ".".join(parts) or None
        message = f"{param}: {err['msg']}" if param else err["msg"]
        raise ApiError(400, message, param=param) from None


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
class _Exchange:
    """One HTTP request/response cycle, as the disconnect watcher sees it."""

    responded: bool = False
    disconnected: bool = False


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


_JSON_HEADERS = [(b"content-type", b"application/json")]
_SSE_HEADERS = [
    (b"content-type", b"text/event-stream"),
    (b"cache-control", b"no-cache"),
]
_DONE = b"data: [DONE]\n\n"


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
    ) -> None:
        self.engine = engine
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
        self.registry.register(_MetricsCollector(self))
        self._created = int(clock())
        self._routes: dict[tuple[str, str], Callable[[Scope, Receive, Send], Awaitable[None]]] = {
            ("POST", "/v1/completions"): self._completions,
            ("POST", "/v1/chat/completions"): self._chat_completions,
            ("GET", "/v1/models"): self._models,
            ("GET", "/health"): self._health,
            ("GET", "/metrics"): self._metrics,
        }
        self._paths = {path for _, path in self._routes}

    # -- ASGI entry -------------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            handler = self._routes.get((scope["method"], scope["path"]))
            if handler is not None:
                await handler(scope, receive, send)
                return
            if scope["path"] in self._paths:
                allowed = ", ".join(sorted(m for m, p in self._routes if p == scope["path"]))
                err = ApiError(
                    405,
                    f"{scope['method']} is not allowed on {scope['path']}; use {allowed}",
                    code="method_not_allowed",
                )
                await _send_error(send, err, [(b"allow", allowed.encode())])
            else:
                err = ApiError(
                    404, f"no route {scope['path']}", type="not_found_error", code="not_found"
                )
                await _send_error(send, err)
        elif kind == "lifespan":
            await _lifespan(receive, send)

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
        await _send_body(send, 200, orjson.dumps(body), _JSON_HEADERS)

    async def _health(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.draining:
            await _send_body(send, 503, b'{"status":"draining"}', _JSON_HEADERS)
        else:
            await _send_body(send, 200, b'{"status":"ok"}', _JSON_HEADERS)

    async def _metrics(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = generate_latest(self.registry)
        await _send_body(send, 200, body, [(b"content-type", CONTENT_TYPE_LATEST.encode())])

    # -- generation routes ------------------------------------------------------------------------

    async def _completions(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._generation(scope, receive, send, chat=False)

    async def _chat_completions(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._generation(scope, receive, send, chat=True)

    async def _generation(self, scope: Scope, receive: Receive, send: Send, *, chat: bool) -> None:
        route = scope["path"]
        exchange = _Exchange()
        try:
            body = await self._read_body(receive)
        except ApiError as e:
            self.counters.count(route, e.status)
            await _send_error(send, e)
            return
        except _ClientGone:
            self.counters.disconnects += 1
            return
        task = asyncio.current_task()
        assert task is not None
        watcher = asyncio.get_running_loop().create_task(_watch(receive, exchange, task))
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

    async def _serve(
        self, scope: Scope, body: bytes, send: Send, exchange: _Exchange, *, chat: bool
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
            await _send_error(send, err)
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
            await _send_error(send, err)
            return err.status
        finally:
            await stream.aclose()
        return 200

    def _job(self, scope: Scope, body: bytes, *, chat: bool) -> _Job:
        if self.draining:
            raise ApiError(503, "the server is shutting down", type="service_unavailable_error")
        req: CompletionRequest | ChatCompletionRequest = (
            _parse(ChatCompletionRequest, body) if chat else _parse(CompletionRequest, body)
        )
        if req.model is not None and req.model != self.model:
            raise ApiError(
                404,
                f"the model {req.model!r} does not exist here; this server serves {self.model!r}",
                type="not_found_error",
                param="model",
                code="model_not_found",
            )
        if req.n is not None and req.n != 1:
            raise ApiError(400, f"n: only n=1 is supported, got {req.n}", param="n")
        if isinstance(req, ChatCompletionRequest):
            if req.logprobs:
                raise ApiError(400, "logprobs: not supported", param="logprobs")
            prompt = self._chat_prompt(req.messages)
            max_tokens = req.max_completion_tokens or req.max_tokens
            if max_tokens is None:  # as vLLM: the rest of the context window
                max_tokens = max(1, self.engine.max_context_tokens - len(prompt))
        else:
            if req.echo:
                raise ApiError(400, "echo: not supported", param="echo")
            if req.logprobs is not None:
                raise ApiError(400, "logprobs: not supported", param="logprobs")
            prompt = self._completion_prompt(req.prompt)
            max_tokens = req.max_tokens if req.max_tokens is not None else 16
        stop_ids = tuple(req.stop_token_ids or ())
        if not req.ignore_eos:
            stop_ids += self.tokenizer.eos_token_ids
        stops = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
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
            prompt=prompt,
            sampling=SamplingParams(
                max_tokens=max_tokens,
                temperature=1.0 if req.temperature is None else req.temperature,
                top_p=1.0 if req.top_p is None else req.top_p,
                seed=req.seed,
                stop_token_ids=stop_ids,
            ),
            stream=req.stream,
            include_usage=req.stream_options is not None and req.stream_options.include_usage,
            stops=tuple(s for s in stops if s),
            kv=kv,
        )

    def _completion_prompt(
        self, prompt: str | list[int] | list[str] | list[list[int]]
    ) -> tuple[int, ...]:
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt)
        if not prompt:
            raise ApiError(400, "prompt: must not be empty", param="prompt")
        first = prompt[0]
        if isinstance(first, int):
            return tuple(prompt)  # type: ignore[arg-type]  # list[int] by the union's validation
        if len(prompt) > 1:
            raise ApiError(
                400,
                f"prompt: batches are not supported (got {len(prompt)} prompts); send one prompt "
                "per request",
                param="prompt",
            )
        if isinstance(first, str):
            return self.tokenizer.encode(first)
        return tuple(first)

    def _chat_prompt(self, messages: Sequence[ChatMessage]) -> tuple[int, ...]:
        plain: list[Message] = []
        for m in messages:
            if m.content is None or isinstance(m.content, str):
                content = m.content or ""
            else:
                content = "\n".join(part.text for part in m.content)
            plain.append({"role": m.role, "content": content})
        text = self.tokenizer.apply_chat_template(plain)
        return self.tokenizer.encode(text, add_special_tokens=False)

    def _request_id(self, scope: Scope, kv: KvTransferParams | None) -> str:
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                if not value or len(value) > MAX_REQUEST_ID_CHARS:
                    raise ApiError(
                        400,
                        f"X-Request-Id must be 1 to {MAX_REQUEST_ID_CHARS} characters",
                        param="X-Request-Id",
                    )
                return bytes(value).decode("latin-1")
        if kv is not None and kv.do_remote_prefill and kv.remote_request_id:
            return kv.remote_request_id
        return uuid.uuid4().hex

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

    async def _text_deltas(
        self, job: _Job, first: TokenChunk, stream: AsyncIterator[TokenChunk], counts: list[int]
    ) -> AsyncIterator[tuple[str, str | None]]:
        """(text delta, finish reason) per engine chunk, with stop strings applied.

        ``counts[0]`` is kept at the number of tokens generated so far.
        """
        decoder = IncrementalDecoder(self.tokenizer)
        stops = job.stops
        hold = max((len(s) for s in stops), default=1) - 1
        held = ""
        chunk: TokenChunk | None = first
        while chunk is not None:
            counts[0] += len(chunk.token_ids)
            self.counters.generation_tokens += len(chunk.token_ids)
            finish = chunk.finish_reason
            text = held + decoder.push(chunk.token_ids)
            if finish is not None:
                text += decoder.flush()
            held = ""
            if stops:
                cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
                if cut >= 0:
                    text, finish = text[:cut], "stop"
                elif finish is None and hold:
                    held = text[-hold:]
                    text = text[: len(text) - len(held)]
            yield text, finish
            if finish is not None:
                return
            chunk = await anext(stream, None)
        yield held, "abort"  # the engine's stream ended without a finish reason

    def _usage(self, job: _Job, completion_tokens: int) -> dict[str, int]:
        return {
            "prompt_tokens": len(job.prompt),
            "completion_tokens": completion_tokens,
            "total_tokens": len(job.prompt) + completion_tokens,
        }

    async def _json_response(
        self,
        job: _Job,
        first: TokenChunk,
        stream: AsyncIterator[TokenChunk],
        send: Send,
        exchange: _Exchange,
    ) -> None:
        counts = [0]
        finish: str | None = None
        if job.stops:
            parts: list[str] = []
            async for delta, reason in self._text_deltas(job, first, stream, counts):
                parts.append(delta)
                finish = reason
            text = "".join(parts)
        else:  # no text to watch while generating: decode once at the end
            ids: list[int] = []
            chunk: TokenChunk | None = first
            while chunk is not None:
                ids.extend(chunk.token_ids)
                finish = chunk.finish_reason
                if finish is not None:
                    break
                chunk = await anext(stream, None)
            counts[0] = len(ids)
            self.counters.generation_tokens += len(ids)
            text = self.tokenizer.decode(ids)
            finish = finish or "abort"
        choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": finish}
        if job.chat:
            choice["message"] = {"role": "assistant", "content": text}
            kind, prefix = "chat.completion", "chatcmpl-"
        else:
            choice["text"] = text
            kind, prefix = "text_completion", "cmpl-"
        body: dict[str, Any] = {
            "id": prefix + job.request_id,
            "object": kind,
            "created": int(self.clock()),
            "model": self.model,
            "choices": [choice],
            "usage": self._usage(job, counts[0]),
        }
        if job.kv_out is not None:  # the prefill half's answer
            body["kv_transfer_params"] = job.kv_out.model_dump()
        exchange.responded = True
        await _send_body(send, 200, orjson.dumps(body), _JSON_HEADERS)

    async def _stream_response(
        self,
        job: _Job,
        first: TokenChunk,
        stream: AsyncIterator[TokenChunk],
        send: Send,
        exchange: _Exchange,
    ) -> None:
        created = int(self.clock())
        if job.chat:
            base: dict[str, Any] = {
                "id": "chatcmpl-" + job.request_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": self.model,
            }
        else:
            base = {
                "id": "cmpl-" + job.request_id,
                "object": "text_completion",
                "created": created,
                "model": self.model,
            }
        if job.include_usage:
            base["usage"] = None
        dumps = orjson.dumps
        await send({"type": "http.response.start", "status": 200, "headers": _SSE_HEADERS})
        counts = [0]
        lead = b""
        if job.chat:  # the first chunk names the role, as OpenAI's do
            delta = {"role": "assistant", "content": ""}
            lead = b"data: " + dumps({**base, "choices": [_chat_choice(delta, None)]}) + b"\n\n"
        try:
            async for text, finish in self._text_deltas(job, first, stream, counts):
                if not text and finish is None:
                    continue
                if job.chat:
                    choice = _chat_choice({"content": text} if text else {}, finish)
                else:
                    choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
                event = b"data: " + dumps({**base, "choices": [choice]}) + b"\n\n"
                if lead:
                    event, lead = lead + event, b""
                await send({"type": "http.response.body", "body": event, "more_body": True})
        except Exception as e:  # headers are gone: report in the stream, then end it
            err = api_error(e)
            tail = b"data: " + err.body() + b"\n\n" + _DONE
        else:
            tail = b""
            if job.include_usage:
                usage = {**base, "choices": [], "usage": self._usage(job, counts[0])}
                tail = b"data: " + dumps(usage) + b"\n\n"
            tail += _DONE
        exchange.responded = True
        await send({"type": "http.response.body", "body": lead + tail, "more_body": False})

    # -- plumbing ---------------------------------------------------------------------------------

    async def _read_body(self, receive: Receive) -> bytes:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _ClientGone
        body: bytes = message.get("body", b"")
        if not message.get("more_body", False):
            if len(body) > self.max_body_bytes:
                raise self._too_large()
            return body
        parts = [body]
        size = len(body)
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _ClientGone
            part: bytes = message.get("body", b"")
            size += len(part)
            if size > self.max_body_bytes:
                raise self._too_large()
            parts.append(part)
            if not message.get("more_body", False):
                return b"".join(parts)

    def _too_large(self) -> ApiError:
        return ApiError(413, f"the request body exceeds {self.max_body_bytes} bytes")


def _chat_choice(delta: dict[str, str], finish: str | None) -> dict[str, Any]:
    return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}


class _ClientGone(Exception):
    """The client disconnected before its request body arrived."""


async def _watch(receive: Receive, exchange: _Exchange, handler: asyncio.Task[Any]) -> None:
    """Cancel ``handler`` if the client disconnects before its response is complete."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            if not exchange.responded:
                exchange.disconnected = True
                handler.cancel()
            return


async def _send_body(
    send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]]
) -> None:
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def _send_error(
    send: Send, err: ApiError, extra_headers: Iterable[tuple[bytes, bytes]] = ()
) -> None:
    await _send_body(send, err.status, err.body(), [*_JSON_HEADERS, *extra_headers])


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


# --- metrics -------------------------------------------------------------------------------------


class _MetricsCollector(Collector):
    """Engine gauges (``engine.stats()``) and request counters, computed at scrape time.

    ``switchboard_engine_*`` and ``switchboard_http_*`` are this server's names; the
    ``vllm:*`` gauges repeat three of them under vLLM's names, so tools that read a vLLM
    server's load (routers, autoscalers) read a simulated one the same way.
    """

    def __init__(self, app: OpenAIApp) -> None:
        self._app = app

    def collect(self) -> Iterable[Metric]:
        app = self._app
        model = [app.model]
        s = app.engine.stats()
        usage = s.kv_blocks_used / s.kv_blocks_total if s.kv_blocks_total else 0.0

        def gauge(name: str, doc: str, value: float, label: str = "model") -> GaugeMetricFamily:
            g = GaugeMetricFamily(name, doc, labels=[label])
            g.add_metric(model, value)
            return g

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            c = CounterMetricFamily(name, doc, labels=["model"])
            c.add_metric(model, value)
            return c

        yield gauge(
            "switchboard_engine_running_requests", "Requests the engine is running.",
            s.running_requests,
        )  # fmt: skip
        yield gauge(
            "switchboard_engine_waiting_requests", "Requests waiting for the engine.",
            s.waiting_requests,
        )  # fmt: skip
        yield gauge(
            "switchboard_engine_kv_cache_usage_ratio", "KV-cache blocks in use / all blocks.", usage
        )
        yield gauge(
            "switchboard_engine_kv_blocks_used", "KV-cache blocks in use.", s.kv_blocks_used
        )
        yield gauge(
            "switchboard_engine_kv_blocks_total", "KV-cache blocks in all.", s.kv_blocks_total
        )
        yield gauge(
            "switchboard_engine_prefix_cache_hit_rate",
            "Prompt tokens served from the prefix cache / prompt tokens, recent admissions.",
            s.prefix_cache_hit_rate,
        )
        yield gauge(
            "switchboard_engine_tokens_per_second", "Tokens generated per second, recent window.",
            s.tokens_per_second,
        )  # fmt: skip
        yield gauge(
            "switchboard_engine_batch_size", "Sequences in the last engine step.", s.last_batch_size
        )
        requests = CounterMetricFamily(
            "switchboard_http_requests",
            "Generation requests answered, by route and HTTP status.",
            labels=["model", "route", "status"],
        )
        for (route, status), n in sorted(app.counters.requests.items()):
            requests.add_metric([app.model, route, str(status)], n)
        yield requests
        c = app.counters
        yield counter("switchboard_http_prompt_tokens", "Prompt tokens accepted.", c.prompt_tokens)
        yield counter(
            "switchboard_http_generation_tokens", "Tokens generated.", c.generation_tokens
        )
        yield counter(
            "switchboard_http_kv_fetch_fallbacks",
            "Decode requests whose KV was gone, prefilled locally instead.",
            c.kv_fetch_fallbacks,
        )
        yield counter(
            "switchboard_http_client_disconnects",
            "Requests whose client went away before the answer was complete (aborted).",
            c.disconnects,
        )
        yield gauge(
            "vllm:num_requests_running", "vLLM name: running requests.", s.running_requests,
            "model_name",
        )  # fmt: skip
        yield gauge(
            "vllm:num_requests_waiting", "vLLM name: waiting requests.", s.waiting_requests,
            "model_name",
        )  # fmt: skip
        yield gauge(
            "vllm:kv_cache_usage_perc", "vLLM name: KV-cache usage, 0-1.", usage, "model_name"
        )
