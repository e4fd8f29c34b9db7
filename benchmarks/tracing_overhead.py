"""What tracing costs on the gateway's request path, off and on, side by side in one run.

Three measurements, each the best of ``--repeat`` timeit runs of ``--number`` iterations:

* ``hooks_off`` / ``hooks_on``: the tracing hooks one gateway request runs (the request span
  from a client traceparent, the gRPC metadata for the workers, the router span with its
  attributes, the end of both spans), through the same helpers the gateway calls
  (controlplane/telemetry/tracing.py); off = ``tracer=None``, what runs without an OTLP
  endpoint; on = the OpenTelemetry SDK with a batch processor and an exporter that drops.
* ``route_finish_off`` / ``route_finish_on``: ``Gateway._route`` (the SLA router over 8
  workers, with its metrics) plus ``Gateway.finish`` (requests / SLO accounting) for one
  request, with tracing off and on: the hooks in their real place.

Off must cost nothing measurable: no span is made (the tracer is None and every helper returns
before touching OpenTelemetry); the figure to read is ``hooks_off`` against
``route_finish_off`` (``off_share_of_route_finish``).

Run: ``.venv/bin/python -m benchmarks.tracing_overhead`` (writes
benchmarks/results/tracing_overhead.json).
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import timeit
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

from controlplane.core.model import WorkerRecord
from controlplane.core.routing import SlaAwareRouter
from controlplane.gateway.model_routing import ModelRoutingCache
from controlplane.gateway.pipeline import Gateway, Progress
from controlplane.gateway.routing import CircuitBreakers, LeastLoadedRouter
from controlplane.gateway.sla_routing import SlaGatewayRouter
from controlplane.gateway.workers_view import ModelInfo, WorkerChannels, WorkersView
from controlplane.telemetry import tracing
from controlplane.telemetry.metrics import GatewayMetrics, TokenTimer

RESULTS = Path(__file__).parent / "results" / "tracing_overhead.json"
HEADERS = [
    (b"content-type", b"application/json"),
    (b"traceparent", b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
]


class DropExporter(SpanExporter):
    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return SpanExportResult.SUCCESS


def tracer_on() -> tuple[tracing.Tracer, TracerProvider]:
    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(DropExporter(), max_queue_size=1 << 16))
    return provider.get_tracer("bench"), provider


def hooks(tracer: tracing.Tracer | None) -> None:
    """The tracing hooks of one gateway request, in the order the gateway runs them."""
    span = None
    if tracer is not None:
        span = tracing.start_span(
            tracer, "gateway.request", tracing.parent_from_headers(HEADERS),
            kind=tracing.SpanKind.SERVER, attributes={"http.route": "/v1/completions"},
        )  # fmt: skip
    metadata = tracing.grpc_metadata(span)
    router = tracing.start_span(tracer, "router.decision", span) if span is not None else None
    if router is not None:
        router.set_attributes({"switchboard.policy": "sla", "switchboard.decode_worker": "d1"})
        router.end()
    del metadata
    if span is not None:
        span.set_attributes({"switchboard.status": "200", "switchboard.tokens": 16})
        tracing.end_span(span)


class QuietView(WorkersView):
    """Records and loads put in directly: no etcd, no stats streams."""

    def __init__(self, records: list[WorkerRecord], info: ModelInfo) -> None:
        super().__init__(cast(Any, None), "/sb", WorkerChannels())
        self._by_model = {info.model: records}
        self._models = {info.model: info}

    def _start_stats(self, rec: WorkerRecord) -> None:
        return None


def build_gateway(tracer: tracing.Tracer | None) -> Gateway:
    info = ModelInfo(model="sim-model", engine="sim", engine_args={"profile": "tiny-test"})
    records = [
        WorkerRecord(
            f"d{i}",
            "sim-model",
            "decode",
            "sim",
            f"127.0.0.1:{i}",
            max_context_tokens=2048,
            kv_blocks_total=64,
        )
        for i in range(6)
    ] + [
        WorkerRecord(
            f"p{i}",
            "sim-model",
            "prefill",
            "sim",
            f"127.0.0.1:1{i}",
            max_context_tokens=2048,
            kv_blocks_total=64,
        )
        for i in range(2)
    ]
    view = QuietView(records, info)
    sla = SlaGatewayRouter(
        SlaAwareRouter(), timing_for=ModelRoutingCache(view.model_info).timing_for,
        rng=random.Random(0),
    )  # fmt: skip
    view.kv_sink = sla
    return Gateway(
        view, LeastLoadedRouter(), CircuitBreakers(), GatewayMetrics(), sla_router=sla,
        tracer=tracer,
    )  # fmt: skip


def route_finish(gw: Gateway, prompt: tuple[int, ...]) -> None:
    now = gw.clock()
    progress = Progress(arrived=now)
    if gw.tracer is not None:
        progress.span = tracing.start_span(
            gw.tracer, "gateway.request", tracing.parent_from_headers(HEADERS),
            kind=tracing.SpanKind.SERVER,
        )  # fmt: skip
    tracing.grpc_metadata(progress.span)
    gw._route("sim-model", prompt, 16, frozenset(), False, progress=progress)
    progress.timer = TokenTimer(now)
    progress.timer.tokens(1, now + 0.1)
    progress.timer.tokens(15, now + 0.5)
    progress.sla_class = "standard"
    gw.finish("/v1/completions", "200", "sim-model", progress, error=False)


def best(stmt: Any, number: int, repeat: int) -> float:
    """Best seconds per call."""
    return min(timeit.repeat(stmt, number=number, repeat=repeat)) / number


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--number", type=int, default=20000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    tracer, provider = tracer_on()
    prompt = tuple(range(200, 456))  # 256 tokens
    gw_off, gw_on = build_gateway(None), build_gateway(tracer)
    n_route = max(1, args.number // 10)
    figures = {
        "hooks_off_us": best(lambda: hooks(None), args.number, args.repeat) * 1e6,
        "hooks_on_us": best(lambda: hooks(tracer), args.number, args.repeat) * 1e6,
        "route_finish_off_us": best(lambda: route_finish(gw_off, prompt), n_route, args.repeat)
        * 1e6,
        "route_finish_on_us": best(lambda: route_finish(gw_on, prompt), n_route, args.repeat) * 1e6,
    }
    provider.shutdown()
    figures["off_share_of_route_finish"] = figures["hooks_off_us"] / figures["route_finish_off_us"]
    result = {
        "benchmark": "tracing_overhead",
        "python": sys.version.split()[0],
        "machine": platform.machine(),
        "number": args.number,
        "repeat": args.repeat,
        "figures": figures,
    }
    for k, v in figures.items():
        print(f"{k:>28}: {v:.4f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
