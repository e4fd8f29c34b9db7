"""The token transport on 127.0.0.1: a real ``TokenServer`` over a real ``WorkerService`` (and
the same service's gRPC server, to compare with) over scripted engines, a real
``TokenClients``; then the gateway's request path (``Gateway.stream``) over it."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import socket
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import grpc
import pytest
from prometheus_client import CollectorRegistry
from switchboard.v1 import inference_pb2, worker_pb2, worker_pb2_grpc

from controlplane.adapters.grpc.server import GrpcServer
from controlplane.errors import Unavailable
from controlplane.gateway.pipeline import Gateway, Progress
from controlplane.gateway.routing import CircuitBreakers, LeastLoadedRouter
from controlplane.gateway.token_client import TokenClients, TokenRpcError
from controlplane.telemetry.metrics import GatewayMetrics
from tests.fakes import FakeEngine
from tests.unit.test_gateway_sla_wiring import QuietView, rec
from workers.engine import Role, SamplingParams, TokenChunk
from workers.service import WorkerService
from workers.token_transport import (
    CANCEL,
    CHUNK,
    DECODE,
    ERROR,
    HEADER,
    MAGIC,
    PREFILL,
    PREFILL_OK,
    FrameReader,
    TokenServer,
    decode_error,
    encode_metadata,
    frame,
)

MODEL = "fake-model"
GUARD_S = 10.0
"""A bound on waits that should end at once: a hang fails the test instead of stalling it."""


class PromptEngine(FakeEngine):
    """``FakeEngine`` whose aggregated tokens depend on the prompt: completion token ``i`` of
    prompt ``P`` is ``P[0] * 100 + len(P) + i``, so each request has its own tokens and a run
    continued on ``P + sent`` (a migration) equals an unbroken one. ``hold_after``: each
    request stops after that many tokens until ``release`` is set (``holding`` is set then);
    ``prefill_gate``: when set, a prefill waits for it."""

    def __init__(self, *, hold_after: int | None = None, step_s: float = 0.0) -> None:
        super().__init__(step_s=step_s)
        self.hold_after = hold_after
        self.release = asyncio.Event()
        self.holding = asyncio.Event()
        self.prefill_gate: asyncio.Event | None = None
        self.generated: list[str] = []
        self.prefills: list[str] = []
        self.active = 0
        self.peak = 0

    async def prefill(self, request_id: str, prompt: tuple[int, ...], sampling: Any) -> Any:
        self.prefills.append(request_id)
        if self.prefill_gate is not None:
            await self.prefill_gate.wait()
        return await super().prefill(request_id, prompt, sampling)

    def generate(
        self, request_id: str, prompt: tuple[int, ...], sampling: Any
    ) -> AsyncIterator[Any]:
        self.generated.append(request_id)
        start = (prompt[0] if prompt else 0) * 100 + len(prompt)
        return self._positional(request_id, start, sampling.max_tokens)

    async def _positional(self, request_id: str, start: int, n: int) -> AsyncIterator[Any]:
        self.active += 1
        self.peak = max(self.peak, self.active)
        try:
            for i in range(n):
                if self.hold_after is not None and i == self.hold_after:
                    self.holding.set()
                    await self.release.wait()
                await asyncio.sleep(self.step_s)
                if request_id in self.aborted:
                    yield TokenChunk((), "abort")
                    return
                yield TokenChunk((start + i,), "length" if i == n - 1 else None)
        finally:
            self.active -= 1


def expected(prompt: list[int], max_tokens: int) -> list[int]:
    start = prompt[0] * 100 + len(prompt)
    return list(range(start, start + max_tokens))


class Worker:
    """One WorkerService served over gRPC and over the token transport."""

    def __init__(self, engine: FakeEngine, service: WorkerService) -> None:
        self.engine = engine
        self.service = service
        self.grpc = GrpcServer("127.0.0.1:0")
        self.grpc.add_servicer(service, worker_pb2.DESCRIPTOR.services_by_name["Worker"])
        self.tokens = TokenServer(service)
        self.token_port = 0
        self.channel: grpc.aio.Channel | None = None
        self.stub: Any = None

    async def start(self) -> Worker:
        await self.grpc.start()
        self.token_port = await self.tokens.start("127.0.0.1", 0)
        self.channel = grpc.aio.insecure_channel(self.endpoint)
        self.stub = worker_pb2_grpc.WorkerStub(self.channel)
        return self

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.grpc.port}"

    @property
    def token_endpoint(self) -> str:
        return f"127.0.0.1:{self.token_port}"

    async def stop(self) -> None:
        if isinstance(self.engine, PromptEngine):
            self.engine.release.set()
            if self.engine.prefill_gate is not None:
                self.engine.prefill_gate.set()
        if self.engine.gate is not None:
            self.engine.gate.set()
        await self.tokens.close()
        if self.channel is not None:
            await self.channel.close()
        await self.grpc.stop(0)


async def start_worker(
    engine: FakeEngine | None = None, *, role: Role = Role.BOTH, worker_id: str = "w1"
) -> Worker:
    engine = engine if engine is not None else PromptEngine()
    service = WorkerService(engine, worker_id=worker_id, role=role, report_interval_s=0.05)
    return await Worker(engine, service).start()


@pytest.fixture
async def worker() -> AsyncIterator[Worker]:
    w = await start_worker()
    yield w
    await w.stop()


@pytest.fixture
async def clients() -> AsyncIterator[TokenClients]:
    c = TokenClients()
    yield c
    await c.close()


def sampling(max_tokens: int) -> inference_pb2.SamplingParams:
    return inference_pb2.SamplingParams(max_tokens=max_tokens)


def decode_request(
    request_id: str, prompt: list[int], max_tokens: int, **kw: Any
) -> worker_pb2.DecodeRequest:
    return worker_pb2.DecodeRequest(
        request_id=request_id, prompt_token_ids=prompt, sampling=sampling(max_tokens), **kw
    )


async def eventually(cond: Callable[[], bool], what: str) -> None:
    """Poll ``cond`` (bounded: about 3 s at most, no timing asserted)."""
    for _ in range(300):
        if cond():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"never happened: {what}")


def ids(chunks: list[worker_pb2.DecodeChunk]) -> list[int]:
    return [t for c in chunks for t in c.token_ids]


# --- the same answers as gRPC ----------------------------------------------------------------


@pytest.mark.parametrize("max_tokens", [1, 4])
async def test_decode_answers_what_grpc_answers(
    worker: Worker, clients: TokenClients, max_tokens: int
) -> None:
    req = decode_request("d", [3, 1, 4], max_tokens)
    async with asyncio.timeout(GUARD_S):
        over_grpc = [c async for c in worker.stub.Decode(req)]
        over_tokens = [c async for c in clients.decode(worker.token_endpoint, req)]
    assert over_tokens == over_grpc  # every chunk: tokens, finish reason, usage
    assert ids(over_tokens) == expected([3, 1, 4], max_tokens)
    assert over_tokens[-1].finish_reason == "length"
    assert over_tokens[-1].usage.completion_tokens == max_tokens
    assert over_tokens[-1].usage.prompt_tokens == 3
    conn = clients._conns[worker.token_endpoint]
    assert conn.streams == {}  # a finished stream leaves nothing behind
    await eventually(lambda: worker.service.inflight == 0, "the worker is idle")
    assert worker.engine.aborted == []


async def test_prefill_then_decode_with_kv_answer_what_grpc_answers(
    worker: Worker, clients: TokenClients
) -> None:
    prefill = worker_pb2.PrefillRequest(
        request_id="p", prompt_token_ids=[7, 8, 9], sampling=sampling(3)
    )
    async with asyncio.timeout(GUARD_S):
        over_grpc = await worker.stub.Prefill(prefill)
        over_tokens = await clients.prefill(worker.token_endpoint, prefill, deadline_s=5.0)
    assert over_tokens == over_grpc
    assert over_tokens.request_id == "p"
    assert over_tokens.first_token_id == 9
    assert over_tokens.kv.kv_id == "kv-p" and over_tokens.kv.num_tokens == 3

    req = decode_request(
        "p", [7, 8, 9], 3, kv=over_tokens.kv, first_token_id=over_tokens.first_token_id
    )
    async with asyncio.timeout(GUARD_S):
        chunks_grpc = [c async for c in worker.stub.Decode(req)]
        chunks_tokens = [c async for c in clients.decode(worker.token_endpoint, req)]
    assert chunks_tokens == chunks_grpc
    assert ids(chunks_tokens) == [10, 11]  # after the prefill's token
    assert chunks_tokens[-1].usage.completion_tokens == 3


async def call_grpc(worker: Worker, method: str, request: Any) -> Any:
    if method == "prefill":
        return await worker.stub.Prefill(request)
    return [c async for c in worker.stub.Decode(request)]


async def call_tokens(worker: Worker, clients: TokenClients, method: str, request: Any) -> Any:
    if method == "prefill":
        return await clients.prefill(worker.token_endpoint, request)
    return [c async for c in clients.decode(worker.token_endpoint, request)]


async def rpc_error_over_grpc(worker: Worker, method: str, request: Any) -> tuple[str, str]:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call_grpc(worker, method, request)
    return info.value.code().name, info.value.details() or ""


async def rpc_error_over_tokens(
    worker: Worker, clients: TokenClients, method: str, request: Any
) -> tuple[str, str]:
    with pytest.raises(TokenRpcError) as info:
        await call_tokens(worker, clients, method, request)
    return info.value.code().name, info.value.details()


GHOST_KV = worker_pb2.KvHandle(kv_id="kv-ghost", source_address="127.0.0.1:1", num_tokens=1)


@pytest.mark.parametrize(
    ("method", "request_", "code", "message"),
    [
        ("prefill", worker_pb2.PrefillRequest(prompt_token_ids=[1], sampling=sampling(2)),
         "INVALID_ARGUMENT", "request_id is required"),
        ("prefill", worker_pb2.PrefillRequest(request_id="r" * 257, prompt_token_ids=[1],
                                              sampling=sampling(2)),
         "INVALID_ARGUMENT", "longer than 256"),
        ("prefill", worker_pb2.PrefillRequest(request_id="x", prompt_token_ids=[1],
                                              sampling=sampling(0)),
         "INVALID_ARGUMENT", "max_tokens must be > 0"),
        ("prefill", worker_pb2.PrefillRequest(request_id="x", prompt_token_ids=[5000],
                                              sampling=sampling(2)),
         "INVALID_ARGUMENT", "vocabulary"),
        ("prefill", worker_pb2.PrefillRequest(request_id="x", sampling=sampling(2)),
         "INVALID_ARGUMENT", "prompt is empty"),
        ("decode", decode_request("", [1], 2), "INVALID_ARGUMENT", "request_id is required"),
        ("decode", decode_request("x", [1], 0), "INVALID_ARGUMENT", "max_tokens must be > 0"),
        ("decode", decode_request("x", [1], 2, kv=GHOST_KV, first_token_id=1),
         "NOT_FOUND", "kv-ghost"),
        ("decode", decode_request("x", [1], 2, first_token_id=1, kv=worker_pb2.KvHandle(
            kv_id="k", source_address="127.0.0.1:1", engine_params="{not json")),
         "INVALID_ARGUMENT", "engine_params is not JSON"),
    ],
    ids=["no-id", "long-id", "max-tokens-0", "vocab", "empty-prompt", "decode-no-id",
         "decode-max-tokens-0", "kv-gone", "kv-params"],
)  # fmt: skip
async def test_bad_requests_fail_with_grpc_s_code_and_message(
    worker: Worker, clients: TokenClients, method: str, request_: Any, code: str, message: str
) -> None:
    async with asyncio.timeout(GUARD_S):
        over_grpc = await rpc_error_over_grpc(worker, method, request_)
        over_tokens = await rpc_error_over_tokens(worker, clients, method, request_)
    assert over_tokens == over_grpc
    assert over_tokens[0] == code
    assert message in over_tokens[1]
    # the stream failed, the connection did not
    conn = clients._conns[worker.token_endpoint]
    assert not conn.closed and conn.streams == {}
    assert worker.service.inflight == 0


@pytest.mark.parametrize(
    ("setup", "method", "code", "message"),
    [
        ("draining", "prefill", "UNAVAILABLE", "is draining"),
        ("draining", "decode", "UNAVAILABLE", "is draining"),
        ("decode-role", "prefill", "FAILED_PRECONDITION", "is a decode worker"),
        ("prefill-role", "decode", "FAILED_PRECONDITION", "is a prefill worker"),
    ],
)
async def test_draining_and_roles_answer_as_grpc_does(
    clients: TokenClients, setup: str, method: str, code: str, message: str
) -> None:
    role = {"decode-role": Role.DECODE, "prefill-role": Role.PREFILL}.get(setup, Role.BOTH)
    w = await start_worker(role=role)
    w.service.draining = setup == "draining"
    request: Any = (
        worker_pb2.PrefillRequest(request_id="n", prompt_token_ids=[1], sampling=sampling(2))
        if method == "prefill"
        else decode_request("n", [1], 2)
    )
    try:
        async with asyncio.timeout(GUARD_S):
            over_grpc = await rpc_error_over_grpc(w, method, request)
            over_tokens = await rpc_error_over_tokens(w, clients, method, request)
    finally:
        await w.stop()
    assert over_tokens == over_grpc
    assert over_tokens[0] == code
    assert message in over_tokens[1]


async def test_metadata_reaches_the_service(clients: TokenClients) -> None:
    seen: list[Any] = []

    class Recording(WorkerService):
        async def prefill(
            self, request: worker_pb2.PrefillRequest, context: Any
        ) -> worker_pb2.PrefillResponse:
            seen.append(tuple(context.invocation_metadata()))
            return await super().prefill(request, context)

    engine = PromptEngine()
    w = await Worker(engine, Recording(engine, worker_id="w1", role=Role.BOTH)).start()
    metadata = (
        ("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
        ("tracestate", "a=1,b=2"),
    )
    try:
        async with asyncio.timeout(GUARD_S):
            req = worker_pb2.PrefillRequest(
                request_id="m", prompt_token_ids=[1], sampling=sampling(1)
            )
            await clients.prefill(w.token_endpoint, req, metadata=metadata)
            await clients.prefill(w.token_endpoint, req)
    finally:
        await w.stop()
    assert seen == [metadata, ()]


# --- one connection, many streams ----------------------------------------------------------


async def test_32_concurrent_decodes_share_one_connection(clients: TokenClients) -> None:
    engine = PromptEngine(step_s=0.001)
    w = await start_worker(engine)

    async def one(i: int) -> list[int]:
        req = decode_request(f"c{i}", [i + 1, 5], 2 + i % 5)
        return ids([c async for c in clients.decode(w.token_endpoint, req)])

    try:
        async with asyncio.timeout(GUARD_S):
            results = await asyncio.gather(*(one(i) for i in range(32)))
        assert results == [expected([i + 1, 5], 2 + i % 5) for i in range(32)]
        assert list(clients._conns) == [w.token_endpoint]
        assert len(w.tokens.connections) == 1
        assert engine.peak > 1  # they were in flight together, on the one connection
        assert clients._conns[w.token_endpoint].streams == {}
        await eventually(lambda: w.service.inflight == 0, "the worker is idle")
        assert engine.aborted == []
    finally:
        await w.stop()


# --- giving up: early close, cancellation, deadlines ---------------------------------------


@pytest.mark.parametrize("how", ["aclose", "cancel-task"])
async def test_stopping_a_decode_early_aborts_it_on_the_worker(
    clients: TokenClients, how: str
) -> None:
    engine = PromptEngine(hold_after=1)  # one token, then it waits
    w = await start_worker(engine)
    try:
        async with asyncio.timeout(GUARD_S):
            stream = clients.decode(w.token_endpoint, decode_request("early", [2], 50))
            first = await anext(stream)
            assert list(first.token_ids) == expected([2], 1)
            await engine.holding.wait()
            if how == "aclose":
                await stream.aclose()
            else:
                task = asyncio.ensure_future(anext(stream))
                conn = clients._conns[w.token_endpoint]
                await eventually(
                    lambda: any(s.waiter is not None for s in conn.streams.values()),
                    "the caller waits for the next chunk",
                )
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
            await eventually(lambda: "early" in engine.aborted, "the engine request aborted")
            await eventually(lambda: w.service.inflight == 0, "the worker is idle")
            conn = clients._conns[w.token_endpoint]
            assert conn.streams == {} and not conn.closed
            # the connection goes on serving
            engine.hold_after = None
            req = decode_request("after", [2], 3)
            got = await call_tokens(w, clients, "decode", req)
            assert ids(got) == expected([2], 3)
            assert clients._conns[w.token_endpoint] is conn
    finally:
        await w.stop()


async def test_a_decode_past_its_deadline_fails_and_is_cancelled_on_the_worker(
    clients: TokenClients,
) -> None:
    engine = PromptEngine(hold_after=2)
    w = await start_worker(engine)
    got: list[int] = []
    try:
        async with asyncio.timeout(GUARD_S):
            req = decode_request("late", [4], 5)

            async def read_all() -> None:
                async for chunk in clients.decode(w.token_endpoint, req, deadline_s=0.2):
                    got.extend(chunk.token_ids)

            with pytest.raises(TokenRpcError) as info:
                await read_all()
            assert info.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
            assert got == expected([4], 2)  # the tokens before the stall did arrive
            await eventually(lambda: "late" in engine.aborted, "the engine request aborted")
            await eventually(lambda: w.service.inflight == 0, "the worker is idle")
            assert not clients._conns[w.token_endpoint].closed
    finally:
        await w.stop()


@pytest.mark.parametrize("how", ["deadline", "cancel-task"])
async def test_a_prefill_given_up_is_cancelled_on_the_worker(
    clients: TokenClients, how: str
) -> None:
    engine = PromptEngine()
    engine.prefill_gate = asyncio.Event()
    w = await start_worker(engine)
    req = worker_pb2.PrefillRequest(request_id="pf", prompt_token_ids=[1], sampling=sampling(2))
    try:
        async with asyncio.timeout(GUARD_S):
            if how == "deadline":
                with pytest.raises(TokenRpcError) as info:
                    await clients.prefill(w.token_endpoint, req, deadline_s=0.2)
                assert info.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
            else:
                task = asyncio.ensure_future(clients.prefill(w.token_endpoint, req))
                await eventually(lambda: w.service.inflight == 1, "the prefill started")
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
            await eventually(lambda: w.service.inflight == 0, "the prefill was cancelled")
            assert engine.held == {}  # it never got to hold KV
            engine.prefill_gate = None
            res = await clients.prefill(w.token_endpoint, req)
            assert res.first_token_id == 1
    finally:
        await w.stop()


# --- lost connections -----------------------------------------------------------------------


async def test_server_close_fails_open_streams_and_the_client_reconnects(
    clients: TokenClients,
) -> None:
    engine = PromptEngine(hold_after=1)
    w = await start_worker(engine)
    port = w.token_port
    try:
        async with asyncio.timeout(GUARD_S):
            stream = clients.decode(w.token_endpoint, decode_request("open", [3], 10))
            await anext(stream)
            old = clients._conns[w.token_endpoint]
            await w.tokens.close()
            with pytest.raises(TokenRpcError) as info:
                await anext(stream)
            assert info.value.code() is grpc.StatusCode.UNAVAILABLE
            assert "lost" in info.value.details()
            assert old.closed
            await eventually(lambda: "open" in engine.aborted, "the engine request aborted")
            await eventually(lambda: w.service.inflight == 0, "the worker is idle")

            # nothing listens: a call fails UNAVAILABLE and the dead connection is not used
            req = decode_request("down", [3], 2)
            with pytest.raises(TokenRpcError) as info:
                await call_tokens(w, clients, "decode", req)
            assert info.value.code() is grpc.StatusCode.UNAVAILABLE
            assert "cannot connect" in info.value.details()

            # the worker's transport comes back on the same port: the next call reconnects
            engine.hold_after = None
            w.tokens = TokenServer(w.service)
            assert await w.tokens.start("127.0.0.1", port) == port
            assert ids(await call_tokens(w, clients, "decode", req)) == expected([3], 2)
            new = clients._conns[w.token_endpoint]
            assert new is not old and not new.closed
    finally:
        await w.stop()


async def test_an_unreachable_endpoint_fails_unavailable(clients: TokenClients) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    endpoint = f"127.0.0.1:{port}"
    req = worker_pb2.PrefillRequest(request_id="u", prompt_token_ids=[1], sampling=sampling(1))
    async with asyncio.timeout(GUARD_S):
        for _ in range(2):  # a failed connect leaves nothing half made behind
            with pytest.raises(TokenRpcError) as info:
                await clients.prefill(endpoint, req)
            assert info.value.code() is grpc.StatusCode.UNAVAILABLE
            assert "cannot connect" in info.value.details()
            assert endpoint not in clients._conns
            assert clients._connecting == {}


@pytest.fixture
def full_listener() -> Iterator[str]:
    """A 127.0.0.1 port whose accept queue is full: a connect to it hangs (Linux drops the
    SYN), as one to a worker that stopped accepting would."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    for _ in range(4):
        s = socket.socket()
        s.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            s.connect(("127.0.0.1", port))
        fillers.append(s)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        for s in fillers:
            s.close()
        listener.close()


async def test_a_connect_that_hangs_fails_unavailable_at_the_connect_timeout(
    full_listener: str,
) -> None:
    clients = TokenClients(connect_timeout_s=0.2)
    req = worker_pb2.PrefillRequest(request_id="h", prompt_token_ids=[1], sampling=sampling(1))
    try:
        async with asyncio.timeout(GUARD_S):
            with pytest.raises(TokenRpcError) as info:
                await clients.prefill(full_listener, req)
    finally:
        await clients.close()
    assert info.value.code() is grpc.StatusCode.UNAVAILABLE
    assert "cannot connect" in info.value.details()


async def test_one_caller_cancelled_while_connecting_does_not_cancel_the_others(
    full_listener: str,
) -> None:
    clients = TokenClients(connect_timeout_s=0.5)
    first = asyncio.ensure_future(clients.connection(full_listener))
    second: asyncio.Future[Any] | None = None
    try:
        async with asyncio.timeout(GUARD_S):
            await asyncio.sleep(0.01)
            second = asyncio.ensure_future(clients.connection(full_listener))
            await eventually(lambda: full_listener in clients._connecting, "connecting")
            await asyncio.sleep(0.01)
            assert not first.done() and not second.done()
            first.cancel()  # e.g. its client disconnected
            await asyncio.wait([second])
            # the second request was not cancelled: it gets the connect's own outcome
            # (here UNAVAILABLE at the connect timeout)
            assert not second.cancelled()
            assert isinstance(second.exception(), TokenRpcError)
    finally:
        for task in (first, second):
            if task is not None:
                task.cancel()
        await clients.close()


# --- the wire, byte by byte ----------------------------------------------------------------


async def read_frames(
    reader: asyncio.StreamReader, frames: FrameReader, until: Callable[[int, bytes], bool]
) -> list[tuple[int, int, bytes]]:
    """Frames from ``reader`` until one satisfies ``until(kind, payload)``."""
    out: list[tuple[int, int, bytes]] = []
    while True:
        data = await reader.read(65536)
        assert data, "the server closed the connection"
        for f in frames.feed(data):
            out.append(f)
            if until(f[0], f[2]):
                return out


def last_chunk(kind: int, payload: bytes) -> bool:
    return kind != CHUNK or bool(worker_pb2.DecodeChunk.FromString(payload).finish_reason)


async def test_raw_client_greeting_in_pieces_streams_cancel_and_malformed_requests(
    worker: Worker,
) -> None:
    async with asyncio.timeout(GUARD_S):
        reader, writer = await asyncio.open_connection("127.0.0.1", worker.token_port)
        frames = FrameReader()
        try:
            for b in MAGIC:  # the greeting, one byte at a time
                writer.write(bytes([b]))
                await writer.drain()
                await asyncio.sleep(0.01)
            meta = encode_metadata([("traceparent", "00-aa-bb-01")])
            req = decode_request("raw", [6, 6], 3).SerializeToString()
            writer.write(frame(DECODE, 1, meta + req))
            got = await read_frames(reader, frames, last_chunk)
            assert {sid for _, sid, _ in got} == {1}
            chunks = [worker_pb2.DecodeChunk.FromString(p) for _, _, p in got]
            assert ids(chunks) == expected([6, 6], 3)

            # a CANCEL for a stream that is not open changes nothing
            writer.write(frame(CANCEL, 999))
            # a garbled request fails its stream only
            writer.write(frame(DECODE, 2, encode_metadata(None) + b"\x0a\xff"))
            kind, sid, payload = (await read_frames(reader, frames, lambda k, p: True))[0]
            assert (kind, sid) == (ERROR, 2)
            assert decode_error(payload) == (
                grpc.StatusCode.INVALID_ARGUMENT,
                "malformed DecodeRequest",
            )
            # a request frame without even a metadata block: the request's fault, its stream only
            writer.write(frame(PREFILL, 3, b""))
            kind, sid, payload = (await read_frames(reader, frames, lambda k, p: True))[0]
            assert (kind, sid) == (ERROR, 3)
            code, message = decode_error(payload)
            assert code is grpc.StatusCode.INVALID_ARGUMENT
            assert "metadata block" in message
            # and the connection still serves
            prefill = worker_pb2.PrefillRequest(
                request_id="raw-p", prompt_token_ids=[2, 3], sampling=sampling(1)
            )
            writer.write(frame(PREFILL, 4, encode_metadata(None) + prefill.SerializeToString()))
            kind, sid, payload = (await read_frames(reader, frames, lambda k, p: True))[0]
            assert (kind, sid) == (PREFILL_OK, 4)
            assert worker_pb2.PrefillResponse.FromString(payload).first_token_id == 3
        finally:
            writer.close()


async def read_to_close(reader: asyncio.StreamReader) -> bytes:
    """What the server sent before it closed the connection (a reset counts as a close: it
    closed with bytes of ours still unread)."""
    try:
        return await reader.read()
    except ConnectionResetError:
        return b""


HELD = decode_request("held", [1], 5).SerializeToString()


@pytest.mark.parametrize(
    "wire",
    [
        b"XXXX" + frame(DECODE, 1, encode_metadata(None) + HELD),
        b"SBT2",
        MAGIC + frame(99, 1),
        MAGIC + frame(CHUNK, 1, b""),  # a worker -> client kind
        MAGIC + HEADER.pack(4096, DECODE, 1),  # over this server's 1 KiB frame limit
        MAGIC + frame(DECODE, 1, encode_metadata(None) + HELD)
        + frame(DECODE, 1, encode_metadata(None) + HELD),  # stream 1 is already open
    ],
    ids=["bad-greeting", "other-version", "unknown-kind", "reply-kind", "oversized",
         "stream-reopened"],
)  # fmt: skip
async def test_a_client_that_breaks_the_protocol_is_disconnected_and_others_are_served(
    clients: TokenClients, wire: bytes
) -> None:
    engine = PromptEngine(hold_after=0)  # decodes stay open
    service = WorkerService(engine, worker_id="w1", role=Role.BOTH)
    w = Worker(engine, service)
    w.tokens = TokenServer(service, max_frame_bytes=1024)
    await w.start()
    try:
        async with asyncio.timeout(GUARD_S):
            reader, writer = await asyncio.open_connection("127.0.0.1", w.token_port)
            writer.write(wire)
            await writer.drain()
            assert await read_to_close(reader) == b""  # closed, nothing answered
            writer.close()
            await eventually(lambda: w.service.inflight == 0, "its streams cancelled")
            assert not engine.generated or engine.aborted == ["held"]
            # another gateway's connection is served
            req = worker_pb2.PrefillRequest(
                request_id="ok", prompt_token_ids=[1, 2], sampling=sampling(1)
            )
            assert (await clients.prefill(w.token_endpoint, req)).first_token_id == 2
            assert len(w.tokens.connections) == 1
    finally:
        await w.stop()


# --- the gateway's request path ------------------------------------------------------------


def make_gateway(view: QuietView, token_transport: bool = True, **kw: Any) -> Gateway:
    metrics = GatewayMetrics(CollectorRegistry())
    return Gateway(
        view, LeastLoadedRouter(), CircuitBreakers(), metrics,
        token_transport=token_transport, **kw,
    )  # fmt: skip


def record(w: Worker, role: str = "decode") -> Any:
    return dataclasses.replace(
        rec(w.service.worker_id, role=role, model=MODEL),
        endpoint=w.endpoint,
        token_endpoint=w.token_endpoint,
    )


async def run_stream(
    gw: Gateway,
    request_id: str,
    prompt: tuple[int, ...],
    max_tokens: int,
    progress: Progress | None = None,
    on_chunk: Callable[[TokenChunk], Any] | None = None,
) -> tuple[list[int], str | None]:
    out: list[int] = []
    finish = None
    stream = gw.stream(request_id, MODEL, prompt, SamplingParams(max_tokens), progress)
    async with asyncio.timeout(GUARD_S):
        async for chunk in stream:
            out.extend(chunk.token_ids)
            finish = chunk.finish_reason or finish
            if on_chunk is not None:
                await on_chunk(chunk)
    return out, finish


@pytest.mark.parametrize("max_tokens", [1, 5])
async def test_gateway_aggregated_tokens_equal_over_both_transports(max_tokens: int) -> None:
    workers = [await start_worker(worker_id=f"w{i}") for i in (1, 2)]
    results = {}
    try:
        for token_transport in (True, False):
            view = QuietView()
            view.put(*(record(w) for w in workers))
            gw = make_gateway(view, token_transport)
            try:
                results[token_transport] = [
                    await run_stream(gw, f"r{token_transport}{i}", (i, 2, 3), max_tokens)
                    for i in (1, 2)
                ]
                used = set(view.channels.tokens._conns)
            finally:
                await view.channels.close()
            if token_transport:  # (which worker served which request is the router's call)
                assert used and used <= {w.token_endpoint for w in workers}
            else:
                assert used == set()
    finally:
        for w in workers:
            await w.stop()
    assert results[True] == results[False]
    assert results[True] == [(expected([i, 2, 3], max_tokens), "length") for i in (1, 2)]


async def test_gateway_disaggregated_tokens_equal_over_both_transports() -> None:
    engine = PromptEngine()  # one engine behind both: the decode worker finds the KV
    prefill_w = await Worker(
        engine, WorkerService(engine, worker_id="p1", role=Role.PREFILL)
    ).start()
    decode_w = await Worker(engine, WorkerService(engine, worker_id="d1", role=Role.DECODE)).start()
    results = {}
    try:
        for token_transport in (True, False):
            view = QuietView()
            view.put(record(prefill_w, "prefill"), record(decode_w, "decode"))
            gw = make_gateway(view, token_transport)
            try:
                results[token_transport] = await run_stream(gw, f"dis{token_transport}", (5, 6), 4)
                used = set(view.channels.tokens._conns)
            finally:
                await view.channels.close()
            expected_conns = {prefill_w.token_endpoint, decode_w.token_endpoint}
            assert used == (expected_conns if token_transport else set())
    finally:
        await prefill_w.stop()
        await decode_w.stop()
    assert results[True] == results[False] == ([6, 7, 8, 9], "length")
    assert engine.prefills == ["disTrue", "disFalse"]


async def test_gateway_prefills_again_when_the_kv_is_gone_over_the_token_transport() -> None:
    class Forgetful(PromptEngine):
        """Loses the first prefilled KV before its decode comes (evicted)."""

        def decode(self, request_id: str, prompt: tuple[int, ...], first: int, kv: Any,
                   sampling: Any) -> AsyncIterator[Any]:  # fmt: skip
            if len(self.prefills) == 1:
                self.held.clear()
            return super().decode(request_id, prompt, first, kv, sampling)

    engine = Forgetful()
    prefill_w = await Worker(
        engine, WorkerService(engine, worker_id="p1", role=Role.PREFILL)
    ).start()
    decode_w = await Worker(engine, WorkerService(engine, worker_id="d1", role=Role.DECODE)).start()
    view = QuietView()
    view.put(record(prefill_w, "prefill"), record(decode_w, "decode"))
    gw = make_gateway(view)
    try:
        assert await run_stream(gw, "lost-kv", (5, 6), 4) == ([6, 7, 8, 9], "length")
    finally:
        await view.channels.close()
        await prefill_w.stop()
        await decode_w.stop()
    assert engine.prefills == ["lost-kv", "lost-kv"]  # NOT_FOUND came through as KvUnavailable


async def test_gateway_retries_elsewhere_when_a_token_endpoint_is_down() -> None:
    w1, w2 = await start_worker(worker_id="w1"), await start_worker(worker_id="w2")
    await w1.tokens.close()  # its gRPC service is up; its token transport is not
    view = QuietView()
    view.put(record(w1), record(w2))
    gw = make_gateway(view)
    progress = Progress()
    try:
        out = await run_stream(gw, "retry", (4, 4), 3, progress)
    finally:
        await view.channels.close()
        await w1.stop()
        await w2.stop()
    assert out == (expected([4, 4], 3), "length")
    assert progress.worker_ids == ("w1", "w2")
    assert progress.migrations == 0  # before the first token: a retry
    assert isinstance(w2.engine, PromptEngine) and w2.engine.generated == ["retry.m1"]


async def test_gateway_migrates_when_a_token_transport_worker_dies_mid_stream() -> None:
    e1 = PromptEngine(hold_after=2)  # two tokens, then it stalls until its transport dies
    w1, w2 = await start_worker(e1, worker_id="w1"), await start_worker(worker_id="w2")
    view = QuietView()
    view.put(record(w1), record(w2))
    gw = make_gateway(view)
    progress = Progress()
    seen = 0

    async def kill_w1_after_two(chunk: TokenChunk) -> None:
        nonlocal seen
        seen += len(chunk.token_ids)
        if seen == 2:
            await e1.holding.wait()
            await w1.tokens.close()

    try:
        out = await run_stream(gw, "mig", (7, 1, 2), 6, progress, kill_w1_after_two)
        await eventually(lambda: "mig" in e1.aborted, "w1's engine request aborted")
        await eventually(lambda: w1.service.inflight == 0, "w1 is idle")
    finally:
        await view.channels.close()
        await w1.stop()
        await w2.stop()
    assert out == (expected([7, 1, 2], 6), "length")  # no gap, no duplicate
    assert progress.worker_ids == ("w1", "w2")
    assert progress.migrations == 1
    assert isinstance(w2.engine, PromptEngine) and w2.engine.generated == ["mig.m1"]


async def test_gateway_consumer_stopping_early_aborts_the_token_stream() -> None:
    engine = PromptEngine(hold_after=1)
    w = await start_worker(engine)
    view = QuietView()
    view.put(record(w))
    gw = make_gateway(view)
    try:
        async with asyncio.timeout(GUARD_S):
            stream = gw.stream("stop", MODEL, (1, 1), SamplingParams(10))
            first = await anext(stream)
            assert list(first.token_ids) == expected([1, 1], 1)
            await stream.aclose()
            await eventually(lambda: "stop" in engine.aborted, "the engine request aborted")
            await eventually(lambda: w.service.inflight == 0, "the worker is idle")
            assert view.channels.tokens._conns[w.token_endpoint].streams == {}
    finally:
        await view.channels.close()
        await w.stop()


async def test_gateway_deadline_over_the_token_transport_ends_as_a_timeout() -> None:
    engine = PromptEngine(hold_after=1)
    w = await start_worker(engine)
    view = QuietView()
    view.put(record(w))
    gw = make_gateway(view, max_migrations=0, decode_timeout_s=0.3)
    progress = Progress()
    try:
        with pytest.raises(Unavailable, match="DEADLINE_EXCEEDED"):
            await run_stream(gw, "slow", (1, 2, 3), 4, progress)
        await eventually(lambda: "slow" in engine.aborted, "the engine request aborted")
        await eventually(lambda: w.service.inflight == 0, "the worker is idle")
    finally:
        await view.channels.close()
        await w.stop()
    assert progress.abort_reason == "timeout"
