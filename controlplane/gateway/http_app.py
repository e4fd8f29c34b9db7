"""The gateway's OpenAI-compatible HTTP API: a raw ASGI application (run under uvicorn).

Routes: ``POST /v1/chat/completions``, ``POST /v1/completions`` (streamed or not), ``GET
/v1/models`` (models with serving workers), ``GET /health``, ``GET /metrics`` (Prometheus),
``GET /openapi.json``.

A generation request: read the body (413 past ``max_body_bytes``; 415 unless the content type is
JSON), parse it strictly (400 naming the field), look the model up (404), tokenize with the
model's tokenizer, check it against the context window (400), ask the ``RequestGate`` (401 /
403 / 429), then stream tokens from ``Gateway.stream`` through the shared response writers
(workers/openai_protocol.py): headers go out only with the first token, so anything that fails
before it (no worker: 503) is still a plain error body; later errors are an SSE error event.
A client disconnect cancels the handler; the token stream's ``finally`` aborts the workers'
requests. No framework sits in the token path (see docs/architecture.md, "Gateway").

Debugging a route: a generation request sent with ``X-Switchboard-Debug: route`` gets an
``X-Switchboard-Route`` response header, one line of at most 400 characters naming the decode
worker, the prefill worker (or ``local``) and the plugins that decided
(``sla_routing.route_summary``); the body does not change.
"""

from __future__ import annotations

import asyncio
import logging
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote

import orjson
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from controlplane.gateway.errors import GATEWAY_ERROR_TABLE, RateLimited
from controlplane.gateway.gate import AdmissionTicket, RequestContext, RequestGate
from controlplane.gateway.pipeline import Gateway, Progress
from controlplane.telemetry import tracing
from workers.engine import TokenChunk
from workers.openai_protocol import (
    JSON_HEADERS,
    ApiError,
    AsgiMessage,
    ChatCompletionRequest,
    ClientGone,
    CompletionRequest,
    Exchange,
    GenerationRequest,
    Handler,
    Receive,
    ResponseSpec,
    Scope,
    Send,
    api_error,
    dispatch,
    header,
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

log = logging.getLogger(__name__)


def bearer_token(value: bytes | None) -> str:
    if not value:
        return ""
    scheme, _, token = value.decode("latin-1").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


def gate_error(exc: BaseException) -> ApiError:
    err = api_error(exc, GATEWAY_ERROR_TABLE)
    if isinstance(exc, RateLimited):
        err.headers = ((b"retry-after", str(max(1, round(exc.retry_after_s))).encode()),)
    return err


class GatewayApp:
    """The ASGI application; see the module docstring."""

    def __init__(
        self,
        gateway: Gateway,
        gate: RequestGate,
        *,
        max_body_bytes: int = 4 << 20,
        clock: Callable[[], float] = time.time,
        replicas: Callable[[], int] = lambda: 1,
        whoami: Callable[[str], str] | None = None,
        metrics_registry: CollectorRegistry | None = None,
        siblings: Callable[[], list[str]] | None = None,
        ready: Callable[[], bool] | None = None,
    ) -> None:
        self.gateway = gateway
        self.whoami = whoami
        self.metrics_registry = (
            metrics_registry if metrics_registry is not None else gateway.metrics.registry
        )
        """What ``/metrics`` serves (``telemetry.metrics.serving_registry``)."""
        self.ready = ready if ready is not None else gateway.view.synced.is_set
        """Everything this gateway reads from etcd before it answers as itself is loaded (the
        workers, and the tenants and deployments where it has them): ``/health`` says
        "syncing" until then."""
        self.siblings = siblings
        """The private addresses of this gateway's other processes (``--processes``), asked for
        a ``/debug/requests`` record this process lacks; None: one process."""
        """API key -> tenant name (raises Unauthenticated), for ``GET /debug/requests/{id}``;
        None (no tenants): every caller sees every request."""
        self.replicas = replicas
        self.gate = gate
        self.metrics = gateway.metrics
        self.max_body_bytes = max_body_bytes
        self.clock = clock
        self.draining = False
        self._created = int(clock())
        self._routes: dict[tuple[str, str], Handler] = {
            ("POST", "/v1/completions"): self._completions,
            ("POST", "/v1/chat/completions"): self._chat_completions,
            ("GET", "/v1/models"): self._models,
            ("GET", "/health"): self._health,
            ("GET", "/metrics"): self._metrics,
            ("GET", "/openapi.json"): self._openapi,
        }
        self._openapi_body = orjson.dumps(openapi_schema())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith(DEBUG_REQUESTS):
            await self._debug_request(scope, receive, send)
            return
        await dispatch(self._routes, scope, receive, send)

    async def _debug_request(self, scope: Scope, receive: Receive, send: Send) -> None:
        """``GET /debug/requests/{id}``: a recent request's routing decisions (the tenant's
        own only; ``controlplane/gateway/decisions.py``)."""
        if scope["method"] != "GET":
            err = ApiError(
                405, f"{scope['method']} is not allowed; use GET", code="method_not_allowed"
            )
            await send_error(send, err, [(b"allow", b"GET")])
            return
        request_id = unquote(scope["path"][len(DEBUG_REQUESTS) :])
        try:
            caller = None
            if self.whoami is not None:
                caller = self.whoami(bearer_token(header(scope, b"authorization")))
        except Exception as e:
            await send_error(send, gate_error(e))
            return
        entry = self.gateway.decisions.get(request_id) if request_id else None
        asked_by_sibling = header(scope, SIBLING_HEADER) is not None  # it does not ask on
        if entry is None and request_id and self.siblings is not None and not asked_by_sibling:
            found = await self._from_siblings(scope["path"], scope)
            if found is not None:
                await send_body(send, 200, found, JSON_HEADERS)
                return
        if entry is None or (caller is not None and entry.tenant != caller):
            await send_error(
                send,
                ApiError(
                    404,
                    f"no recent request {request_id[:80]!r} of yours on this gateway",
                    type="not_found_error",
                    code="not_found",
                ),
            )
            return
        await send_body(send, 200, orjson.dumps(entry.to_json()), JSON_HEADERS)

    async def _from_siblings(self, path: str, scope: Scope) -> bytes | None:
        """The first sibling process's answer 200 to ``GET path`` (with the caller's key: it
        checks the tenant as this one would), else None."""
        assert self.siblings is not None
        headers = {SIBLING_HEADER.decode(): "1"}
        auth = header(scope, b"authorization")
        if auth is not None:
            headers["authorization"] = auth.decode("latin-1")
        for address in self.siblings():
            request = urllib.request.Request(f"http://{address}{path}", headers=headers)
            try:
                body: bytes = await asyncio.to_thread(_read_url, request)
                return body
            except (urllib.error.URLError, OSError, TimeoutError):
                continue  # not there (404), or that process is restarting
        return None

    # -- small routes -----------------------------------------------------------------------------

    async def _models(self, scope: Scope, receive: Receive, send: Send) -> None:
        view = self.gateway.view
        api_key = bearer_token(header(scope, b"authorization"))
        try:
            models = self.gate.visible_models(api_key, view.served_models())
        except Exception as e:
            await send_error(send, gate_error(e))
            return
        data = [
            {
                "id": model,
                "object": "model",
                "created": self._created,
                "owned_by": "switchboard",
                "max_model_len": view.max_context_tokens(model),
            }
            for model in models
        ]
        await send_body(send, 200, orjson.dumps({"object": "list", "data": data}), JSON_HEADERS)

    async def _health(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.draining:
            await send_body(send, 503, b'{"status":"draining"}', JSON_HEADERS)
        elif not self.ready():
            await send_body(send, 503, b'{"status":"syncing"}', JSON_HEADERS)
        else:
            body = orjson.dumps({"status": "ok", "replicas": self.replicas()})
            await send_body(send, 200, body, JSON_HEADERS)

    async def _metrics(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = generate_latest(self.metrics_registry)
        await send_body(send, 200, body, [(b"content-type", CONTENT_TYPE_LATEST.encode())])

    async def _openapi(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send_body(send, 200, self._openapi_body, JSON_HEADERS)

    # -- generation -------------------------------------------------------------------------------

    async def _completions(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._generation(scope, receive, send, chat=False)

    async def _chat_completions(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._generation(scope, receive, send, chat=True)

    async def _generation(self, scope: Scope, receive: Receive, send: Send, *, chat: bool) -> None:
        route = scope["path"]
        progress = Progress(arrived=self.gateway.clock())
        if self.gateway.tracer is not None:
            progress.span = tracing.start_span(
                self.gateway.tracer,
                "gateway.request",
                tracing.parent_from_headers(scope["headers"]),
                kind=tracing.SpanKind.SERVER,
                attributes={"http.route": route},
            )
        state: dict[str, Any] = {"model": ""}
        exchange = Exchange()
        try:
            _check_content_type(scope)
            body = await read_body(receive, self.max_body_bytes)
        except ApiError as e:
            self.gateway.finish(route, str(e.status), "", progress, error=True)
            await send_error(send, e)
            return
        except ClientGone:
            self.gateway.finish(route, "499", "", progress, error=True, disconnected=True)
            return
        task = asyncio.current_task()
        assert task is not None
        watcher = asyncio.get_running_loop().create_task(watch_disconnect(receive, exchange, task))
        try:
            status = await self._serve(scope, body, send, exchange, state, progress, chat=chat)
            self.gateway.finish(route, str(status), state["model"], progress, error=status != 200)
        except asyncio.CancelledError:
            if not exchange.disconnected:
                raise
            task.uncancel()  # we cancelled ourselves: the client is gone
            self.gateway.finish(
                route, "499", state["model"], progress, error=True, disconnected=True
            )
        except Exception:
            self.gateway.finish(route, "500", state["model"], progress, error=True)
            raise
        finally:
            if state["model"]:
                self.metrics.child(self.metrics.in_flight, state["model"]).dec()
            watcher.cancel()

    async def _serve(
        self,
        scope: Scope,
        body: bytes,
        send: Send,
        exchange: Exchange,
        state: dict[str, Any],
        progress: Progress,
        *,
        chat: bool,
    ) -> int:
        ticket: AdmissionTicket | None = None
        if _wants_route_debug(scope):
            progress.explain_route = True
            send = _with_route_header(send, progress)
        try:
            try:
                if self.draining:
                    raise ApiError(
                        503, "the gateway is shutting down", type="service_unavailable_error"
                    )
                req = parse_generation(body, chat=chat)
                if not req.model:
                    raise ApiError(400, "model: Field required", param="model")
                model = req.model
                api_key = bearer_token(header(scope, b"authorization"))
                if not self.gate.visible_models(api_key, [model]):  # 401 first, then 404
                    raise model_not_found(model, "GET /v1/models lists the models you can use")
                if not self.gateway.view.has_model(model):
                    raise model_not_found(model, "GET /v1/models lists the served models")
                state["model"] = model
                self.metrics.child(self.metrics.in_flight, model).inc()
                tokenizer = self.gateway.tokenizer(model)
                prepared = prepare(
                    req, tokenizer, max_context_tokens=self.gateway.max_context_tokens(model)
                )
                self.gateway.validate(model, prepared.prompt, prepared.sampling)
                request_id = request_id_header(scope) or new_request_id()
                ticket = await self.gate.admit(
                    RequestContext(
                        request_id=request_id,
                        model=model,
                        api_key=api_key,
                        route=scope["path"],
                        prompt_tokens=len(prepared.prompt),
                        max_tokens=prepared.sampling.max_tokens,
                        sla_class=_sla_class(req, scope),
                    )
                )
                progress.tenant = ticket.tenant_id
                tenant = self.metrics.tenant_label(ticket.tenant_id)
                self.metrics.child(self.metrics.prompt_tokens, tenant, model).inc(
                    len(prepared.prompt)
                )
                stream = self.gateway.stream(
                    request_id,
                    model,
                    prepared.prompt,
                    prepared.sampling,
                    progress,
                    sla_class=ticket.sla_class,
                    tenant=ticket.tenant_id,
                )
                try:
                    first = await anext(stream)
                except StopAsyncIteration:
                    first = TokenChunk((), "abort")
            except Exception as e:
                if isinstance(e, RateLimited):
                    progress.rejected = e
                err = gate_error(e)
                exchange.responded = True
                await send_error(send, err)
                return err.status
            spec = ResponseSpec(
                chat=prepared.chat,
                request_id=request_id,
                model=model,
                created=int(self.clock()),
                prompt_tokens=len(prepared.prompt),
                stops=prepared.stops,
                include_usage=prepared.include_usage,
            )
            try:
                if prepared.stream:
                    await send_stream_response(
                        spec, tokenizer, first, stream, send, exchange,
                        error_table=GATEWAY_ERROR_TABLE,
                    )  # fmt: skip
                else:
                    await send_json_response(spec, tokenizer, first, stream, send, exchange)
            except Exception as e:
                if prepared.stream:
                    raise
                err = gate_error(e)
                exchange.responded = True
                await send_error(send, err)
                return err.status
            finally:
                await stream.aclose()
            return 200
        finally:
            if ticket is not None:
                self.gate.release(ticket, progress.tokens)


DEBUG_REQUESTS = "/debug/requests/"
SIBLING_HEADER = b"x-switchboard-sibling"
"""Marks a ``/debug/requests`` lookup one process of a gateway sends another."""


def _read_url(request: urllib.request.Request) -> bytes:
    with urllib.request.urlopen(request, timeout=2.0) as resp:
        body: bytes = resp.read()
        return body


ROUTE_HEADER = b"x-switchboard-route"


def _wants_route_debug(scope: Scope) -> bool:
    """``X-Switchboard-Debug`` names ``route`` (comma-separated, any case)."""
    value = header(scope, b"x-switchboard-debug")
    if not value:
        return False
    return b"route" in (part.strip().lower() for part in value.split(b","))


def _with_route_header(send: Send, progress: Progress) -> Send:
    """``send`` that adds ``X-Switchboard-Route`` (``progress.route``, if a route was made by
    then) to the response's headers."""

    async def wrapped(message: AsgiMessage) -> None:
        if message["type"] == "http.response.start" and progress.route:
            headers = [*message.get("headers", ()), (ROUTE_HEADER, progress.route.encode())]
            message = {**message, "headers": headers}
        await send(message)

    return wrapped


def _sla_class(req: GenerationRequest, scope: Scope) -> str:
    """The requested SLA class: the body's ``sla_class`` wins over the ``X-SLA-Class`` header
    ("" = neither: the tenant's default)."""
    if req.sla_class is not None:
        return req.sla_class
    return (header(scope, b"x-sla-class") or b"").decode("latin-1")


def _check_content_type(scope: Scope) -> None:
    value = header(scope, b"content-type")
    if value is None:
        return  # lenient: a body without a content type is parsed as JSON
    media = value.split(b";", 1)[0].strip().lower()
    if media != b"application/json" and not media.endswith(b"+json"):
        raise ApiError(
            415,
            f"content-type {media.decode('latin-1')!r} is not supported; send application/json",
            code="unsupported_media_type",
        )


# --- OpenAPI -------------------------------------------------------------------------------------


def openapi_schema() -> dict[str, Any]:
    """OpenAPI 3.1 description of the routes; request bodies from the pydantic models."""
    error = {
        "type": "object",
        "properties": {
            "error": {
                "type": "object",
                "properties": {
                    "message": {"type": "string"},
                    "type": {"type": "string"},
                    "param": {"type": ["string", "null"]},
                    "code": {"type": ["string", "null"]},
                },
                "required": ["message", "type"],
            }
        },
    }
    err_ref = {"$ref": "#/components/schemas/Error"}

    def errors(*codes: int) -> dict[str, Any]:
        return {
            str(c): {
                "description": _REASONS[c],
                "content": {"application/json": {"schema": err_ref}},
            }
            for c in codes
        }

    def generation(name: str, schema: str) -> dict[str, Any]:
        return {
            "post": {
                "summary": name,
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}
                    },
                },
                "responses": {
                    "200": {
                        "description": "The completion (JSON), or server-sent events if stream",
                        "content": {
                            "application/json": {"schema": {"type": "object"}},
                            "text/event-stream": {"schema": {"type": "string"}},
                        },
                    },
                    **errors(400, 401, 403, 404, 413, 415, 429, 503),
                },
                "security": [{"bearer": []}],
            }
        }

    schemas: dict[str, Any] = {"Error": error}
    for model in (ChatCompletionRequest, CompletionRequest):
        doc = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(doc.pop("$defs", {}))
        schemas[model.__name__] = doc
    return {
        "openapi": "3.1.0",
        "info": {"title": "Switchboard gateway", "version": "1"},
        "paths": {
            "/v1/chat/completions": generation("Chat completion", "ChatCompletionRequest"),
            "/v1/completions": generation("Text completion", "CompletionRequest"),
            "/v1/models": {
                "get": {
                    "summary": "Models with serving workers",
                    "responses": {"200": {"description": "OpenAI model list"}},
                }
            },
            "/health": {
                "get": {
                    "summary": "Liveness",
                    "responses": {"200": {"description": "ok"}, "503": {"description": "not yet"}},
                }
            },
            "/metrics": {
                "get": {
                    "summary": "Prometheus metrics",
                    "responses": {"200": {"description": "text exposition format"}},
                }
            },
        },
        "components": {
            "schemas": schemas,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }


_REASONS = {
    400: "Malformed request",
    401: "Missing or unknown API key",
    403: "Not allowed for this key",
    404: "Unknown model",
    413: "Body too large",
    415: "Wrong content type",
    429: "Over quota",
    503: "No worker can serve the model now",
}
