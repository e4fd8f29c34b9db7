"""OpenTelemetry tracing: one trace per request across the gateway and its workers.

**Off unless configured.** ``setup_tracing`` returns a tracer only when an OTLP endpoint is
given (``--otlp-endpoint``) or set in ``OTEL_EXPORTER_OTLP_ENDPOINT``; otherwise None, and
every component holds ``tracer: Tracer | None = None``. Each hook on the request path starts
with ``if tracer is None`` (the helpers here return None at once), so with tracing off no span,
context or carrier object is made: the cost is a few attribute checks per request.

**The tree of one request** (span names; process in brackets)::

    gateway.request           [gateway]        SERVER; parent: the client's traceparent, if any
    ├── router.decision       [gateway]        the routing decision (policy, workers chosen)
    ├── worker.prefill        [prefill worker] SERVER; parent sent in gRPC metadata
    └── worker.decode         [decode worker]  SERVER; parent sent in gRPC metadata
        └── kv.transfer       [decode worker]  CLIENT: pulling the prefilled KV
            └── worker.fetch_kv [prefill worker] SERVER; parent sent in gRPC metadata

An aggregated request (no prefill worker) has no prefill / KV spans; a retried or migrated
request has one ``router.decision`` and one worker span per attempt. The worker's OpenAI HTTP
server makes a ``worker.http.request`` span, parent from the client's traceparent.

**Propagation** is W3C Trace Context (``traceparent`` / ``tracestate``): HTTP headers in, gRPC
metadata out and in. Context is passed explicitly (the parent span as an argument), never
through ``contextvars`` on the gateway's path: its token streams are async generators, which
may be resumed and closed from other contexts. The worker attaches its decode span as the
current context for the duration of the engine's ``decode`` so the KV fetcher (called inside
it) finds its parent with ``current_span``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

__all__ = [
    "ENDPOINT_ENV",
    "Span",
    "SpanKind",
    "Tracer",
    "attach_span",
    "current_span",
    "detach",
    "end_span",
    "grpc_metadata",
    "parent_from_headers",
    "parent_from_metadata",
    "setup_tracing",
    "start_span",
]

log = logging.getLogger(__name__)

ENDPOINT_ENV = "OTEL_EXPORTER_OTLP_ENDPOINT"
INSTRUMENTATION = "switchboard"
_PROPAGATOR = TraceContextTextMapPropagator()
_FIELDS = ("traceparent", "tracestate")


def otlp_endpoint(flag: str | None) -> str | None:
    """The endpoint to export to: the flag, else ``OTEL_EXPORTER_OTLP_ENDPOINT``, else None."""
    value = flag if flag else os.environ.get(ENDPOINT_ENV, "")
    return value.strip() or None


def make_provider(service_name: str, exporter: SpanExporter) -> TracerProvider:
    """A provider naming ``service_name`` that batches spans to ``exporter``."""
    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


def setup_tracing(service_name: str, endpoint_flag: str | None = None) -> TracerProvider | None:
    """A provider exporting over OTLP gRPC when an endpoint is configured, else None (tracing
    off). The caller passes ``provider.get_tracer(...)`` on and calls ``provider.shutdown()``
    at exit (it flushes the last spans)."""
    endpoint = otlp_endpoint(endpoint_flag)
    if endpoint is None:
        return None
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    insecure = not endpoint.startswith("https://")
    log.info("tracing: exporting spans of %s over OTLP to %s", service_name, endpoint)
    return make_provider(service_name, OTLPSpanExporter(endpoint=endpoint, insecure=insecure))


def tracer_of(provider: TracerProvider | None) -> Tracer | None:
    return None if provider is None else provider.get_tracer(INSTRUMENTATION)


# --- spans ----------------------------------------------------------------------------------------


def start_span(
    tracer: Tracer | None,
    name: str,
    parent: Span | Context | None = None,
    *,
    kind: SpanKind = SpanKind.INTERNAL,
    attributes: Mapping[str, str | int | float | bool] | None = None,
) -> Span | None:
    """A started span (child of ``parent``: a span, an extracted context, or None for a new
    trace), or None when ``tracer`` is None."""
    if tracer is None:
        return None
    ctx = trace.set_span_in_context(parent) if isinstance(parent, Span) else parent
    # an empty Context (not None) stops the SDK from reading the ambient context
    return tracer.start_span(
        name, context=ctx if ctx is not None else Context(), kind=kind, attributes=attributes
    )


def end_span(span: Span | None, error: BaseException | str | None = None) -> None:
    """End ``span`` (no-op for None), marking it failed when ``error`` is given."""
    if span is None:
        return
    if error is not None:
        if isinstance(error, BaseException):
            span.record_exception(error)
        span.set_status(Status(StatusCode.ERROR, str(error)[:200]))
    span.end()


# --- propagation ----------------------------------------------------------------------------------


def parent_from_headers(headers: Iterable[tuple[bytes, bytes]]) -> Context | None:
    """The remote parent named by ASGI headers' ``traceparent`` (None when absent/invalid)."""
    carrier: dict[str, str] = {}
    for key, value in headers:
        k = key.lower()
        if k == b"traceparent" or k == b"tracestate":
            carrier[k.decode()] = value.decode("latin-1")
    return _extract(carrier)


def parent_from_metadata(metadata: Iterable[tuple[str, str | bytes]] | None) -> Context | None:
    """The remote parent named by gRPC invocation metadata (None when absent/invalid)."""
    if not metadata:
        return None
    carrier: dict[str, str] = {}
    for key, value in metadata:
        if key in _FIELDS:
            carrier[key] = value if isinstance(value, str) else value.decode("latin-1")
    return _extract(carrier)


def _extract(carrier: dict[str, str]) -> Context | None:
    if "traceparent" not in carrier:
        return None
    ctx = _PROPAGATOR.extract(carrier, context=Context())
    if not trace.get_current_span(ctx).get_span_context().is_valid:
        return None
    return ctx


def grpc_metadata(span: Span | None) -> tuple[tuple[str, str], ...] | None:
    """gRPC metadata carrying ``span`` as the remote parent (None for None)."""
    if span is None:
        return None
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier, context=trace.set_span_in_context(span))
    return tuple(carrier.items())


# --- ambient context (worker side only; see the module docstring) --------------------------------


def attach_span(span: Span | None) -> object | None:
    """Make ``span`` the current span of this task; the token for ``detach``."""
    if span is None:
        return None
    return otel_context.attach(trace.set_span_in_context(span))


def detach(token: object | None) -> None:
    if token is not None:
        otel_context.detach(token)  # type: ignore[arg-type]


def current_span() -> Span | None:
    """The current span if a real one is active, else None."""
    span = trace.get_current_span()
    return span if span.get_span_context().is_valid else None
