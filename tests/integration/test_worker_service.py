"""The Worker gRPC service on 127.0.0.1 over a scripted engine: KV fetch, drain, bad input."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from switchboard.v1 import inference_pb2, worker_pb2, worker_pb2_grpc

from controlplane.adapters.grpc.server import GrpcServer
from tests.fakes import FakeEngine
from workers.engine import KvHandle, KvUnavailable, Role
from workers.kv_transfer import GrpcKvFetcher
from workers.service import WorkerService


class Served:
    def __init__(self, service: WorkerService, server: GrpcServer) -> None:
        self.service = service
        self.server = server
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
        self.stub: Any = worker_pb2_grpc.WorkerStub(self.channel)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server.port}"


async def serve(engine: FakeEngine, role: Role = Role.BOTH) -> Served:
    service = WorkerService(engine, worker_id="w1", role=role, report_interval_s=0.05)
    server = GrpcServer("127.0.0.1:0")
    server.add_servicer(service, worker_pb2.DESCRIPTOR.services_by_name["Worker"])
    await server.start()
    return Served(service, server)


@pytest.fixture
async def worker() -> AsyncIterator[tuple[FakeEngine, Served]]:
    engine = FakeEngine(kv_bytes=bytes(range(256)) * 40)  # 10 KiB
    served = await serve(engine)
    yield engine, served
    await served.channel.close()
    await served.server.stop(0)


def sampling(max_tokens: int) -> inference_pb2.SamplingParams:
    return inference_pb2.SamplingParams(max_tokens=max_tokens)


async def test_kv_is_fetched_in_checked_chunks(worker: tuple[FakeEngine, Served]) -> None:
    engine, served = worker
    res = await served.stub.Prefill(
        worker_pb2.PrefillRequest(request_id="r1", prompt_token_ids=[1, 2, 3], sampling=sampling(4))
    )
    handle = KvHandle(res.kv.kv_id, served.address, res.kv.num_tokens, res.kv.size_bytes)
    fetcher = GrpcKvFetcher(chunk_bytes=1000)  # 11 chunks
    try:
        assert await fetcher.fetch(handle) == engine.kv_bytes
        with pytest.raises(KvUnavailable, match="not held"):
            await fetcher.fetch(KvHandle("kv-nope", served.address, 1, 1))
    finally:
        await fetcher.close()


async def test_decode_streams_with_usage_and_abort_frees_kv(
    worker: tuple[FakeEngine, Served],
) -> None:
    engine, served = worker
    res = await served.stub.Prefill(
        worker_pb2.PrefillRequest(request_id="r2", prompt_token_ids=[5, 6], sampling=sampling(4))
    )
    chunks = [
        c
        async for c in served.stub.Decode(
            worker_pb2.DecodeRequest(request_id="r2", prompt_token_ids=[5, 6], kv=res.kv,
                                     first_token_id=res.first_token_id, sampling=sampling(4))
        )
    ]  # fmt: skip
    assert [t for c in chunks for t in c.token_ids] == [7, 8, 9]
    assert chunks[-1].finish_reason == "length"
    assert chunks[-1].usage.completion_tokens == 4
    assert chunks[-1].usage.prompt_tokens == 2

    # A client that walks away mid-stream: the worker aborts the request on the engine.
    engine.step_s = 0.05
    call = served.stub.Decode(
        worker_pb2.DecodeRequest(request_id="r3", prompt_token_ids=[1], sampling=sampling(50))
    )
    await call.read()
    call.cancel()
    for _ in range(100):
        if "r3" in engine.aborted:
            break
        await asyncio.sleep(0.02)
    assert "r3" in engine.aborted


async def test_drain_refuses_new_work_and_waits_for_inflight(
    worker: tuple[FakeEngine, Served],
) -> None:
    engine, served = worker
    engine.gate = asyncio.Event()
    call = served.stub.Decode(
        worker_pb2.DecodeRequest(request_id="long", prompt_token_ids=[1], sampling=sampling(3))
    )
    await call.read()
    assert served.service.inflight == 1
    drain = asyncio.create_task(served.service.drain(timeout_s=10))
    await asyncio.sleep(0.1)
    assert not drain.done()  # still waiting for the in-flight request
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await served.stub.Prefill(
            worker_pb2.PrefillRequest(request_id="new", prompt_token_ids=[1], sampling=sampling(2))
        )
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "draining" in (info.value.details() or "")
    engine.gate.set()
    last = await call.read()
    while not last.finish_reason:
        last = await call.read()
    assert last.finish_reason == "length"
    assert await drain is True
    assert served.service.inflight == 0


@pytest.mark.parametrize(
    ("request_kwargs", "code", "message"),
    [
        ({"request_id": "", "prompt_token_ids": [1]}, "INVALID_ARGUMENT", "request_id"),
        ({"request_id": "x", "prompt_token_ids": [1], "max_tokens": 0}, "INVALID_ARGUMENT",
         "max_tokens must be > 0"),
        ({"request_id": "x", "prompt_token_ids": [5000]}, "INVALID_ARGUMENT", "vocabulary"),
        ({"request_id": "x", "prompt_token_ids": []}, "INVALID_ARGUMENT", "prompt is empty"),
        ({"request_id": "x", "prompt_token_ids": [1] * 4096}, "INVALID_ARGUMENT",
         "context window"),
    ],
)  # fmt: skip
async def test_bad_prefill_requests(
    worker: tuple[FakeEngine, Served], request_kwargs: dict[str, Any], code: str, message: str
) -> None:
    _, served = worker
    max_tokens = request_kwargs.pop("max_tokens", 2)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await served.stub.Prefill(
            worker_pb2.PrefillRequest(sampling=sampling(max_tokens), **request_kwargs)
        )
    assert info.value.code().name == code
    assert message in (info.value.details() or "")


@pytest.mark.parametrize(
    "stops",
    [{"stop": ["\n"]}, {"stop_token_ids": [7]}, {"ignore_eos": True}],
)
async def test_stops_are_refused_not_ignored(
    worker: tuple[FakeEngine, Served], stops: dict[str, Any]
) -> None:
    # The Worker API stops only at max_tokens; its caller watches for stops. A stop it was
    # sent would be silently ignored, so it says so instead.
    _, served = worker
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await served.stub.Prefill(
            worker_pb2.PrefillRequest(
                request_id="x",
                prompt_token_ids=[1],
                sampling=inference_pb2.SamplingParams(max_tokens=2, **stops),
            )
        )
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "Inference.Generate" in (info.value.details() or "")


async def test_fetch_unknown_kv_is_not_found_and_roles_are_enforced() -> None:
    engine = FakeEngine()
    served = await serve(engine, role=Role.DECODE)
    try:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await served.stub.Prefill(
                worker_pb2.PrefillRequest(request_id="a", prompt_token_ids=[1],
                                          sampling=sampling(2))
            )  # fmt: skip
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        served.service.role = Role.BOTH
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for _ in served.stub.FetchKv(worker_pb2.FetchKvRequest(kv_id="ghost")):
                pass
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        assert "ghost" in (info.value.details() or "")
    finally:
        await served.channel.close()
        await served.server.stop(0)


async def test_watch_stats_pushes_reports(worker: tuple[FakeEngine, Served]) -> None:
    _, served = worker
    publisher = asyncio.create_task(served.service.publish_forever())
    try:
        call = served.stub.WatchStats(worker_pb2.StatsRequest())
        reports = [await call.read() for _ in range(4)]
        call.cancel()
        assert [r.worker_id for r in reports] == ["w1"] * 4
        assert [r.sequence for r in reports] == sorted(r.sequence for r in reports)
        assert reports[0].kv_blocks_total == 64
    finally:
        publisher.cancel()


async def test_decode_unary_answers_what_the_stream_would(
    worker: tuple[FakeEngine, Served],
) -> None:
    _, served = worker
    for max_tokens in (1, 3):
        req = worker_pb2.DecodeRequest(
            request_id=f"u{max_tokens}", prompt_token_ids=[5, 6], sampling=sampling(max_tokens)
        )
        chunks = [c async for c in served.stub.Decode(req)]
        one = await served.stub.DecodeUnary(req)
        assert list(one.token_ids) == [t for c in chunks for t in c.token_ids]
        assert one.finish_reason == chunks[-1].finish_reason == "length"
        assert one.usage == chunks[-1].usage
        assert one.usage.completion_tokens == max_tokens
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await served.stub.DecodeUnary(
            worker_pb2.DecodeRequest(request_id="", prompt_token_ids=[1], sampling=sampling(1))
        )
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
