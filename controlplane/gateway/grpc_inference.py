"""The tenant-facing gRPC ``Inference`` service over the gateway's token path.

``Generate`` does what ``POST /v1/(chat/)completions`` with ``stream: true`` does: tokenize (a
prompt, or chat messages through the model's chat template), check the context window, ask the
``RequestGate`` (``authorization: Bearer <key>`` metadata; rejections are UNAUTHENTICATED /
PERMISSION_DENIED / RESOURCE_EXHAUSTED for the tenant's limits / UNAVAILABLE for overload), then
stream ``Gateway.stream``'s tokens with their text (stop strings, stop token ids and
``ignore_eos`` as over HTTP). The last message carries ``finish_reason`` and
``usage``. Other errors go through the shared table (controlplane/adapters/grpc/errors.py): no
worker -> UNAVAILABLE, unknown model -> NOT_FOUND, bad input -> INVALID_ARGUMENT. A cancelled
call aborts the workers' requests (the token stream's ``finally``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
from switchboard.v1 import inference_pb2, inference_pb2_grpc

from controlplane.adapters.grpc.errors import server_stream, unary
from controlplane.errors import InvalidArgument, NotFound
from controlplane.gateway.errors import GATE_STATUS, RateLimited
from controlplane.gateway.gate import AdmissionTicket, RequestContext, RequestGate
from controlplane.gateway.http_app import bearer_token
from controlplane.gateway.pipeline import Gateway, Progress
from controlplane.telemetry import tracing
from workers.engine import SamplingParams, TokenChunk
from workers.openai_protocol import new_request_id, stop_token_ids, text_deltas
from workers.tokenizer import Message

Context = grpc.aio.ServicerContext[Any, Any]
ROUTE = "grpc:Generate"


def _api_key(context: Context) -> str:
    return bearer_token(_metadata(context, "authorization").encode("latin-1"))


def _metadata(context: Context, key: str) -> str:
    for k, v in context.invocation_metadata() or ():
        if k == key:
            return v if isinstance(v, str) else v.decode("latin-1")
    return ""


def sampling_from_request(
    s: inference_pb2.SamplingParams, default_max_tokens: int, eos_token_ids: tuple[int, ...]
) -> SamplingParams:
    """``Generate``'s sampling, as ``prepare`` makes it over HTTP: unset fields take their
    defaults; the stop token ids are the request's plus the model's EOS ids unless
    ``ignore_eos``."""
    return SamplingParams(
        max_tokens=s.max_tokens or default_max_tokens,
        temperature=s.temperature if s.HasField("temperature") else 0.0,
        top_p=s.top_p if s.HasField("top_p") else 1.0,
        seed=s.seed if s.HasField("seed") else None,
        stop_token_ids=stop_token_ids(s.stop_token_ids, s.ignore_eos, eos_token_ids),
    )


class InferenceService(inference_pb2_grpc.InferenceServicer):
    def __init__(self, gateway: Gateway, gate: RequestGate) -> None:
        self.gateway = gateway
        self.gate = gate
        self.metrics = gateway.metrics

    @server_stream
    async def Generate(
        self, request: inference_pb2.GenerateRequest, context: Context
    ) -> AsyncIterator[inference_pb2.GenerateResponse]:
        model = request.model
        code = "OK"
        progress = Progress(arrived=self.gateway.clock())
        if self.gateway.tracer is not None:
            progress.span = tracing.start_span(
                self.gateway.tracer,
                "gateway.request",
                tracing.parent_from_metadata(context.invocation_metadata()),
                kind=tracing.SpanKind.SERVER,
                attributes={"rpc.method": ROUTE},
            )
        try:
            async for msg in self._generate(request, context, progress):
                yield msg
        except BaseException as e:
            code = _code_name(e)
            if progress.rejected is not None:
                code = grpc.StatusCode.RESOURCE_EXHAUSTED.name
            raise
        finally:
            self.gateway.finish(
                ROUTE, code, model, progress, error=code != "OK", disconnected=code == "CANCELLED"
            )

    async def _generate(
        self, request: inference_pb2.GenerateRequest, context: Context, progress: Progress
    ) -> AsyncIterator[inference_pb2.GenerateResponse]:
        gw = self.gateway
        model = request.model
        if not model:
            raise InvalidArgument("model is required")
        if not self.gate.visible_models(_api_key(context), [model]):  # UNAUTHENTICATED first
            raise NotFound(f"model {model!r} does not exist or you do not have access to it")
        if not gw.view.has_model(model):
            raise NotFound(f"model {model!r} is not served here")
        tokenizer = gw.tokenizer(model)
        ctx = gw.max_context_tokens(model)
        which = request.WhichOneof("input")
        if which == "chat":
            if not request.chat.messages:
                raise InvalidArgument("chat.messages must not be empty")
            messages: list[Message] = [
                {"role": m.role, "content": m.content} for m in request.chat.messages
            ]
            prompt = tokenizer.encode(
                tokenizer.apply_chat_template(messages), add_special_tokens=False
            )
            default_max = max(1, ctx - len(prompt)) if ctx else 16
        elif which == "prompt":
            prompt = tokenizer.encode(request.prompt)
            default_max = 16
        else:
            raise InvalidArgument("one of prompt or chat is required")
        s = request.sampling
        sampling = sampling_from_request(s, default_max, tokenizer.eos_token_ids)
        gw.validate(model, prompt, sampling)
        request_id = request.request_id or new_request_id()
        ticket = await self._admit(
            context,
            progress,
            RequestContext(
                request_id=request_id,
                model=model,
                api_key=_api_key(context),
                route=ROUTE,
                prompt_tokens=len(prompt),
                max_tokens=sampling.max_tokens,
                sla_class=request.sla_class,
            ),
        )
        progress.tenant = ticket.tenant_id
        tenant = self.metrics.tenant_label(ticket.tenant_id)
        self.metrics.child(self.metrics.prompt_tokens, tenant, model).inc(len(prompt))
        in_flight = self.metrics.child(self.metrics.in_flight, model)
        in_flight.inc()
        stream = gw.stream(
            request_id,
            model,
            prompt,
            sampling,
            progress,
            sla_class=ticket.sla_class,
            tenant=ticket.tenant_id,
        )
        try:
            first = await anext(stream, TokenChunk((), "abort"))
            current: list[tuple[int, ...]] = [first.token_ids]

            async def recorded() -> AsyncIterator[TokenChunk]:
                async for chunk in stream:
                    current[0] = chunk.token_ids
                    yield chunk

            counts = [0]
            stops = tuple(x for x in s.stop if x)
            async for text, finish in text_deltas(tokenizer, stops, first, recorded(), counts):
                msg = inference_pb2.GenerateResponse(
                    request_id=request_id, text=text, token_ids=list(current[0])
                )
                current[0] = ()
                if finish is not None:
                    msg.finish_reason = finish
                    msg.usage.prompt_tokens = len(prompt)
                    msg.usage.completion_tokens = counts[0]
                yield msg
                if finish is not None:
                    return
        finally:
            await stream.aclose()
            in_flight.dec()
            self.gate.release(ticket, progress.tokens)

    async def _admit(
        self, context: Context, progress: Progress, ctx: RequestContext
    ) -> AdmissionTicket:
        try:
            return await self.gate.admit(ctx)
        except Exception as e:
            if isinstance(e, RateLimited):
                progress.rejected = e
            for cls, code in GATE_STATUS:
                if isinstance(e, cls):
                    await context.abort(code, str(e))
            raise

    @unary
    async def ListModels(
        self, request: inference_pb2.ListModelsRequest, context: Context
    ) -> inference_pb2.ListModelsResponse:
        view = self.gateway.view
        try:
            models = self.gate.visible_models(_api_key(context), view.served_models())
        except Exception as e:
            for cls, code in GATE_STATUS:
                if isinstance(e, cls):
                    await context.abort(code, str(e))
            raise
        return inference_pb2.ListModelsResponse(
            models=[
                inference_pb2.ModelInfo(
                    id=m, owned_by="switchboard", max_context_tokens=view.max_context_tokens(m)
                )
                for m in models
            ]
        )


def _code_name(e: BaseException) -> str:
    from controlplane.adapters.grpc.errors import status_for

    if isinstance(e, grpc.aio.AbortError):
        return "REJECTED"
    for cls, code in GATE_STATUS:
        if isinstance(e, cls):
            return code.name
    if isinstance(e, Exception):
        return status_for(e).name
    return "CANCELLED"
