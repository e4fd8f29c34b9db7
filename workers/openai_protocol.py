"""The OpenAI HTTP protocol, shared by every server that speaks it (workers and the gateway).

Everything here is independent of where the tokens come from: request bodies (pydantic, strict),
errors (``ApiError`` and the one table from Switchboard errors to HTTP statuses), turning a
parsed request into prompt ids and ``SamplingParams`` (``prepare``), the ASGI plumbing (body
reader with a size limit, disconnect watcher, lifespan) and the two response writers, JSON and
SSE (``send_json_response`` / ``send_stream_response``), which consume an async stream of
``TokenChunk`` and apply stop strings on the decoded text.

``workers/openai_http.py`` (one engine) and ``controlplane/gateway/http_app.py`` (many workers)
both use it, so a client sees the same bodies, events and errors from either. The module pulls in
pydantic and orjson only (no grpc, etcd or torch).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Mapping,
    MutableMapping,
    Sequence,
)
from dataclasses import dataclass
from typing import Annotated, Any, Literal, TypeVar

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from controlplane.errors import (
    AlreadyExists,
    Conflict,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from workers.engine import SamplingParams, TokenChunk
from workers.tokenizer import IncrementalDecoder, Message, Tokenizer

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
AsgiMessage = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[AsgiMessage]]
Send = Callable[[AsgiMessage], Awaitable[None]]

MAX_REQUEST_ID_CHARS = 256

# --- errors --------------------------------------------------------------------------------------

ErrorTable = tuple[tuple[type[BaseException], int, str], ...]

# The one table from Switchboard errors to HTTP status and OpenAI error type. Order matters: the
# first matching class wins (subclasses before their bases; KvUnavailable is a NotFound).
ERROR_TABLE: ErrorTable = (
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
        headers: Sequence[tuple[bytes, bytes]] = (),
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = tuple(headers)

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


def api_error(exc: BaseException, table: ErrorTable = ERROR_TABLE) -> ApiError:
    """``exc`` as what the client is told (unexpected errors are logged, with the traceback)."""
    if isinstance(exc, ApiError):
        return exc
    for cls, status, kind in table:
        if isinstance(exc, cls):
            return ApiError(status, str(exc), type=kind)
    log.error("request failed", exc_info=exc)
    return ApiError(500, f"internal error: {type(exc).__name__}", type="internal_error")


def model_not_found(model: str, detail: str) -> ApiError:
    return ApiError(
        404,
        f"the model {model!r} does not exist or you do not have access to it; {detail}",
        type="not_found_error",
        param="model",
        code="model_not_found",
    )


# --- request bodies (pydantic at the edge, strict: no silent coercion) ---------------------------

_STRICT = ConfigDict(extra="ignore", strict=True)
PositiveInt = Annotated[int, Field(ge=1)]
Int64 = Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]
"""What the Worker API's int64 fields hold (a larger seed was a 500, not a 400)."""
SlaClassName = Annotated[
    str,
    Field(
        min_length=1,
        max_length=63,
        pattern=r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$",
        description=(
            "The gateway's SLA class for this request (e.g. interactive, standard, batch); "
            "wins over the X-SLA-Class header; left out: the header, else the tenant's default. "
            "Unknown: 400; not allowed for the tenant: 403. A one-engine server ignores it."
        ),
    ),
]


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
    seed: Int64 | None = None
    n: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    min_tokens: int | None = None  # accepted and not enforced: the sim emits no EOS by itself
    kv_transfer_params: KvTransferParams | None = None
    sla_class: SlaClassName | None = None


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


GenerationRequest = CompletionRequest | ChatCompletionRequest

_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "list", "dict", "none"})
_Model = TypeVar("_Model", bound=BaseModel)


def parse_request(model: type[_Model], body: bytes) -> _Model:
    """``body`` as ``model``, or a 400 ``ApiError`` naming the first bad field."""
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


def parse_generation(body: bytes, *, chat: bool) -> GenerationRequest:
    return (
        parse_request(ChatCompletionRequest, body)
        if chat
        else parse_request(CompletionRequest, body)
    )


# --- request -> prompt ids and sampling ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Prepared:
    """A parsed generation request turned into what a token source needs."""

    chat: bool
    prompt: tuple[int, ...]
    sampling: SamplingParams
    stream: bool
    include_usage: bool
    stops: tuple[str, ...]


def completion_prompt(
    tokenizer: Tokenizer, prompt: str | list[int] | list[str] | list[list[int]]
) -> tuple[int, ...]:
    if isinstance(prompt, str):
        return tokenizer.encode(prompt)
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
        return tokenizer.encode(first)
    return tuple(first)


def chat_prompt(tokenizer: Tokenizer, messages: Sequence[ChatMessage]) -> tuple[int, ...]:
    plain: list[Message] = []
    for m in messages:
        if m.content is None or isinstance(m.content, str):
            content = m.content or ""
        else:
            content = "\n".join(part.text for part in m.content)
        plain.append({"role": m.role, "content": content})
    text = tokenizer.apply_chat_template(plain)
    return tokenizer.encode(text, add_special_tokens=False)


def stop_token_ids(
    requested: Iterable[int], ignore_eos: bool, eos_token_ids: tuple[int, ...]
) -> tuple[int, ...]:
    """The ids that end a request: the client's, plus the model's EOS unless ``ignore_eos``
    (the HTTP and gRPC APIs alike)."""
    return tuple(requested) + (() if ignore_eos else eos_token_ids)


def prepare(req: GenerationRequest, tokenizer: Tokenizer, *, max_context_tokens: int) -> Prepared:
    """Prompt ids, sampling and output options of ``req`` (400s for what is not supported).

    ``max_tokens`` defaults to 16 for completions and, as vLLM does, to the rest of the context
    window for chat. Stop token ids are the request's plus the tokenizer's EOS unless
    ``ignore_eos``.
    """
    if req.n is not None and req.n != 1:
        raise ApiError(400, f"n: only n=1 is supported, got {req.n}", param="n")
    if isinstance(req, ChatCompletionRequest):
        if req.logprobs:
            raise ApiError(400, "logprobs: not supported", param="logprobs")
        prompt = chat_prompt(tokenizer, req.messages)
        max_tokens = req.max_completion_tokens or req.max_tokens
        if max_tokens is None:
            max_tokens = max(1, max_context_tokens - len(prompt))
        chat = True
    else:
        if req.echo:
            raise ApiError(400, "echo: not supported", param="echo")
        if req.logprobs is not None:
            raise ApiError(400, "logprobs: not supported", param="logprobs")
        prompt = completion_prompt(tokenizer, req.prompt)
        max_tokens = req.max_tokens if req.max_tokens is not None else 16
        chat = False
    stop_ids = stop_token_ids(req.stop_token_ids or (), req.ignore_eos, tokenizer.eos_token_ids)
    stops = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
    return Prepared(
        chat=chat,
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
    )


def header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope["headers"]:
        if key == name:
            return bytes(value)
    return None


def request_id_header(scope: Scope) -> str | None:
    """The ``X-Request-Id`` header (400 if it is empty or too long), or None."""
    value = header(scope, b"x-request-id")
    if value is None:
        return None
    if not value or len(value) > MAX_REQUEST_ID_CHARS:
        raise ApiError(
            400,
            f"X-Request-Id must be 1 to {MAX_REQUEST_ID_CHARS} characters",
            param="X-Request-Id",
        )
    return value.decode("latin-1")


# --- ASGI plumbing -------------------------------------------------------------------------------

JSON_HEADERS = [(b"content-type", b"application/json")]
SSE_HEADERS = [
    (b"content-type", b"text/event-stream"),
    (b"cache-control", b"no-cache"),
]
DONE = b"data: [DONE]\n\n"


@dataclass(slots=True)
class Exchange:
    """One HTTP request/response cycle, as the disconnect watcher sees it."""

    responded: bool = False
    disconnected: bool = False


class ClientGone(Exception):
    """The client disconnected before its request body arrived."""


async def read_body(receive: Receive, max_bytes: int) -> bytes:
    """The whole request body; 413 past ``max_bytes``, ``ClientGone`` on a disconnect."""
    message = await receive()
    if message["type"] == "http.disconnect":
        raise ClientGone
    body: bytes = message.get("body", b"")
    if not message.get("more_body", False):
        if len(body) > max_bytes:
            raise too_large(max_bytes)
        return body
    parts = [body]
    size = len(body)
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        part: bytes = message.get("body", b"")
        size += len(part)
        if size > max_bytes:
            raise too_large(max_bytes)
        parts.append(part)
        if not message.get("more_body", False):
            return b"".join(parts)


def too_large(max_bytes: int) -> ApiError:
    return ApiError(413, f"the request body exceeds {max_bytes} bytes", code="body_too_large")


async def watch_disconnect(
    receive: Receive, exchange: Exchange, handler: asyncio.Task[Any]
) -> None:
    """Cancel ``handler`` if the client disconnects before its response is complete."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            if not exchange.responded:
                exchange.disconnected = True
                handler.cancel()
            return


def new_request_id() -> str:
    """A request id: 32 hex digits, 16 drawn at random once per process and a 16-digit counter.
    Unique across processes and gateway replicas as uuid4's are in practice, at a tenth of the
    cost (no random draw per request)."""
    return f"{_id_prefix}{next(_id_counter):016x}"


def _new_id_source() -> None:
    global _id_prefix, _id_counter
    _id_prefix = os.urandom(8).hex()
    _id_counter = itertools.count()


_id_prefix = ""
_id_counter = itertools.count()
_new_id_source()
os.register_at_fork(after_in_child=_new_id_source)  # a forked child draws its own prefix


async def send_body(
    send: Send, status: int, body: bytes, headers: Iterable[tuple[bytes, bytes]]
) -> None:
    await send({"type": "http.response.start", "status": status, "headers": list(headers)})
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def send_error(
    send: Send, err: ApiError, extra_headers: Iterable[tuple[bytes, bytes]] = ()
) -> None:
    await send_body(send, err.status, err.body(), [*JSON_HEADERS, *err.headers, *extra_headers])


Handler = Callable[[Scope, Receive, Send], Awaitable[None]]


async def dispatch(
    routes: Mapping[tuple[str, str], Handler], scope: Scope, receive: Receive, send: Send
) -> None:
    """The ASGI entry of a route table keyed by (method, path): 405 (with ``Allow``) for a known
    path with another method, 404 for an unknown path, lifespan events acknowledged."""
    kind = scope["type"]
    if kind == "http":
        handler = routes.get((scope["method"], scope["path"]))
        if handler is not None:
            await handler(scope, receive, send)
            return
        methods = sorted(m for m, p in routes if p == scope["path"])
        if methods:
            allowed = ", ".join(methods)
            err = ApiError(
                405,
                f"{scope['method']} is not allowed on {scope['path']}; use {allowed}",
                code="method_not_allowed",
            )
            await send_error(send, err, [(b"allow", allowed.encode())])
        else:
            err = ApiError(
                404, f"no route {scope['path']}", type="not_found_error", code="not_found"
            )
            await send_error(send, err)
    elif kind == "lifespan":
        await lifespan(receive, send)


async def lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


# --- responses -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ResponseSpec:
    """What the response writers need to know about the request they answer."""

    chat: bool
    request_id: str
    model: str
    created: int
    prompt_tokens: int
    stops: tuple[str, ...] = ()
    include_usage: bool = False


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def chat_choice(delta: dict[str, str], finish: str | None) -> dict[str, Any]:
    return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}


async def text_deltas(
    tokenizer: Tokenizer,
    stops: tuple[str, ...],
    first: TokenChunk,
    stream: AsyncIterator[TokenChunk],
    counts: list[int],
) -> AsyncIterator[tuple[str, str | None]]:
    """(text delta, finish reason) per token chunk, with stop strings applied.

    ``counts[0]`` is kept at the number of tokens generated so far. While stop strings are
    watched, the last ``len(longest stop) - 1`` characters are held back until they can no longer
    start a match; generation ends at the first match (the match itself is not returned).
    """
    decoder = IncrementalDecoder(tokenizer)
    hold = max((len(s) for s in stops), default=1) - 1
    held = ""
    chunk: TokenChunk | None = first
    while chunk is not None:
        counts[0] += len(chunk.token_ids)
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
    yield held, "abort"  # the token stream ended without a finish reason


async def send_json_response(
    spec: ResponseSpec,
    tokenizer: Tokenizer,
    first: TokenChunk,
    stream: AsyncIterator[TokenChunk],
    send: Send,
    exchange: Exchange,
    *,
    extra: dict[str, Any] | None = None,
) -> int:
    """Consume ``stream`` and answer one JSON completion; returns the completion tokens."""
    counts = [0]
    finish: str | None = None
    if spec.stops:
        parts: list[str] = []
        async for delta, reason in text_deltas(tokenizer, spec.stops, first, stream, counts):
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
        text = tokenizer.decode(ids)
        finish = finish or "abort"
    choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": finish}
    if spec.chat:
        choice["message"] = {"role": "assistant", "content": text}
        kind, prefix = "chat.completion", "chatcmpl-"
    else:
        choice["text"] = text
        kind, prefix = "text_completion", "cmpl-"
    body: dict[str, Any] = {
        "id": prefix + spec.request_id,
        "object": kind,
        "created": spec.created,
        "model": spec.model,
        "choices": [choice],
        "usage": usage(spec.prompt_tokens, counts[0]),
    }
    if extra:
        body.update(extra)
    exchange.responded = True
    await send_body(send, 200, orjson.dumps(body), JSON_HEADERS)
    return counts[0]


async def send_stream_response(
    spec: ResponseSpec,
    tokenizer: Tokenizer,
    first: TokenChunk,
    stream: AsyncIterator[TokenChunk],
    send: Send,
    exchange: Exchange,
    *,
    error_table: ErrorTable = ERROR_TABLE,
) -> int:
    """Consume ``stream`` as server-sent events; returns the completion tokens.

    Errors after the headers went out are reported in the stream as ``data: {"error": ...}``
    before ``data: [DONE]``.
    """
    if spec.chat:
        base: dict[str, Any] = {
            "id": "chatcmpl-" + spec.request_id,
            "object": "chat.completion.chunk",
            "created": spec.created,
            "model": spec.model,
        }
    else:
        base = {
            "id": "cmpl-" + spec.request_id,
            "object": "text_completion",
            "created": spec.created,
            "model": spec.model,
        }
    if spec.include_usage:
        base["usage"] = None
    dumps = orjson.dumps
    await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
    counts = [0]
    lead = b""
    if spec.chat:  # the first chunk names the role, as OpenAI's do
        delta = {"role": "assistant", "content": ""}
        lead = b"data: " + dumps({**base, "choices": [chat_choice(delta, None)]}) + b"\n\n"
    try:
        async for text, finish in text_deltas(tokenizer, spec.stops, first, stream, counts):
            if not text and finish is None:
                continue
            if spec.chat:
                choice = chat_choice({"content": text} if text else {}, finish)
            else:
                choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
            event = b"data: " + dumps({**base, "choices": [choice]}) + b"\n\n"
            if lead:
                event, lead = lead + event, b""
            await send({"type": "http.response.body", "body": event, "more_body": True})
    except Exception as e:  # headers are gone: report in the stream, then end it
        err = api_error(e, error_table)
        tail = b"data: " + err.body() + b"\n\n" + DONE
    else:
        tail = b""
        if spec.include_usage:
            body = {**base, "choices": [], "usage": usage(spec.prompt_tokens, counts[0])}
            tail = b"data: " + dumps(body) + b"\n\n"
        tail += DONE
    exchange.responded = True
    await send({"type": "http.response.body", "body": lead + tail, "more_body": False})
    return counts[0]
