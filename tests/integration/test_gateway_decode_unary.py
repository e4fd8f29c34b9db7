"""One-token requests take the unary ``DecodeUnary`` RPC; a worker without it (UNIMPLEMENTED, an
older worker) gets the ``Decode`` stream instead and is remembered. Real Worker gRPC servers on
127.0.0.1 over scripted engines; the gateway's request path (``Gateway.stream``) drives them."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from prometheus_client import CollectorRegistry
from switchboard.v1 import worker_pb2

from controlplane.adapters.grpc.server import GrpcServer
from controlplane.errors import Unavailable
from controlplane.gateway.pipeline import Gateway, Progress
from controlplane.gateway.routing import CircuitBreakers, LeastLoadedRouter
from controlplane.gateway.workers_view import ModelInfo
from controlplane.telemetry.metrics import GatewayMetrics
from tests.fakes import FakeEngine
from tests.unit.test_gateway_sla_wiring import QuietView, rec
from workers.engine import Role, SamplingParams
from workers.service import WorkerService

MODEL = "fake-model"


class CountingService(WorkerService):
    """Counts which decode RPC each request came through."""

    def __init__(self, engine: FakeEngine, **kw: Any) -> None:
        super().__init__(engine, **kw)
        self.calls: list[str] = []

    async def DecodeUnary(
        self, request: worker_pb2.DecodeRequest, context: Any
    ) -> worker_pb2.DecodeChunk:
        self.calls.append("unary")
        return await super().DecodeUnary(request, context)

    async def Decode(
        self, request: worker_pb2.DecodeRequest, context: Any
    ) -> AsyncIterator[worker_pb2.DecodeChunk]:
        self.calls.append("stream")
        async for msg in super().Decode(request, context):
            yield msg


class OldWorkerService(CountingService):
    """A worker from before ``DecodeUnary``: the method answers UNIMPLEMENTED."""

    async def DecodeUnary(
        self, request: worker_pb2.DecodeRequest, context: Any
    ) -> worker_pb2.DecodeChunk:
        self.calls.append("unary")
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "Method not found!")
        raise AssertionError("unreachable")


async def serve(service: WorkerService) -> GrpcServer:
    server = GrpcServer("127.0.0.1:0")
    server.add_servicer(service, worker_pb2.DESCRIPTOR.services_by_name["Worker"])
    await server.start()
    return server


async def tokens(gw: Gateway, request_id: str, max_tokens: int) -> tuple[list[int], str | None]:
    out: list[int] = []
    finish = None
    async for chunk in gw.stream(request_id, MODEL, (1, 2, 3), SamplingParams(max_tokens)):
        out.extend(chunk.token_ids)
        finish = chunk.finish_reason or finish
    return out, finish


@pytest.mark.parametrize("service_cls", [CountingService, OldWorkerService])
async def test_one_token_requests_use_decode_unary_or_fall_back(
    service_cls: type[CountingService],
) -> None:
    engine = FakeEngine()
    service = service_cls(engine, worker_id="w1", role=Role.DECODE, report_interval_s=0.05)
    server = await serve(service)
    view = QuietView()
    endpoint = f"127.0.0.1:{server.port}"
    view.put(dataclasses.replace(rec("w1", model=MODEL), endpoint=endpoint))
    gw = Gateway(view, LeastLoadedRouter(), CircuitBreakers(), GatewayMetrics(CollectorRegistry()))
    try:
        # the same one-token request through either RPC yields the same token and finish reason
        first = await tokens(gw, "one-a", 1)
        second = await tokens(gw, "one-b", 1)
        longer = await tokens(gw, "many", 3)
    finally:
        await view.channels.close()
        await server.stop(0)
    assert first == second
    assert len(first[0]) == 1 and first[1] == "length"
    assert longer[0][:1] == first[0] and len(longer[0]) == 3
    if service_cls is OldWorkerService:
        # tried once, remembered: the second one-token request streams straight away
        assert service.calls == ["unary", "stream", "stream", "stream"]
        assert endpoint in gw._no_unary
    else:
        assert service.calls == ["unary", "unary", "stream"]
        assert not gw._no_unary
    assert not engine.aborted  # nothing was cut off on the way


async def test_a_worker_past_the_deadline_ends_the_request_as_a_timeout() -> None:
    engine = FakeEngine()
    engine.gate = asyncio.Event()  # the first token comes, then the engine stalls
    service = CountingService(engine, worker_id="w1", role=Role.DECODE, report_interval_s=0.05)
    server = await serve(service)
    view = QuietView()
    view.put(dataclasses.replace(rec("w1", model=MODEL), endpoint=f"127.0.0.1:{server.port}"))
    gw = Gateway(
        view, LeastLoadedRouter(), CircuitBreakers(), GatewayMetrics(CollectorRegistry()),
        max_migrations=0, decode_timeout_s=0.3,
    )  # fmt: skip
    progress = Progress()
    try:
        with pytest.raises(Unavailable, match="DEADLINE_EXCEEDED"):
            async for _ in gw.stream("slow", MODEL, (1, 2, 3), SamplingParams(4), progress):
                pass
    finally:
        engine.gate.set()
        await view.channels.close()
        await server.stop(0)
    assert progress.abort_reason == "timeout"


async def test_a_request_reserves_its_kv_blocks_on_its_worker_until_it_ends() -> None:
    """What the router adds to a worker's reported KV use between two reports: the request's
    prompt and output tokens in the model's blocks, for as long as it runs there."""
    engine = FakeEngine()
    engine.gate = asyncio.Event()  # the first token comes, then the engine waits
    service = CountingService(engine, worker_id="w1", role=Role.DECODE, report_interval_s=0.05)
    server = await serve(service)
    view = QuietView()
    view.put(
        dataclasses.replace(rec("w1", model=MODEL), endpoint=f"127.0.0.1:{server.port}"),
        models=(ModelInfo(MODEL, "cpu", engine_args={"block_size": "4"}),),
    )
    gw = Gateway(view, LeastLoadedRouter(), CircuitBreakers(), GatewayMetrics(CollectorRegistry()))
    stream = gw.stream("r1", MODEL, (1, 2, 3), SamplingParams(6))
    try:
        first = await anext(stream)
        assert first.token_ids
        assert view.kv_reserved == {"w1": 3}  # 3 + 6 tokens in blocks of 4
        engine.gate.set()
        async for _ in stream:
            pass
        assert view.kv_reserved == {}
    finally:
        engine.gate.set()
        await stream.aclose()
        await view.channels.close()
        await server.stop(0)
