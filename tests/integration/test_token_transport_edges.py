"""The token transport's edges (workers/token_transport.py, controlplane/gateway/token_client.py)
on 127.0.0.1: the server's backpressure on a client that stops reading, a worker that breaks
the protocol (scripted here as a plain asyncio server), the gateway's view dropping the
connection of a worker that left, and the trace context the metadata block carries.

Helpers (``Worker``, ``PromptEngine``, ``record``, ...) come from test_token_transport.py.
(tests/integration/test_tracing.py covers tracing end to end through real worker processes,
which serve the token transport by default and a gateway that uses it by default; the tracing
tests here are in-process and compare both transports.)"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from switchboard.v1 import worker_pb2

from controlplane.gateway.pipeline import Progress
from controlplane.gateway.token_client import TokenClients, TokenRpcError
from controlplane.telemetry import tracing
from tests.fakes import FakeEngine
from tests.integration.test_token_transport import (
    GUARD_S,
    PromptEngine,
    Worker,
    decode_request,
    eventually,
    make_gateway,
    record,
    run_stream,
    sampling,
    start_worker,
)
from tests.unit.test_gateway_sla_wiring import QuietView, rec
from workers.engine import Role, TokenChunk
from workers.service import WorkerService
from workers.token_transport import (
    CANCEL,
    CHUNK,
    DECODE,
    END,
    HEADER,
    MAGIC,
    MAX_FRAME_BYTES,
    PREFILL,
    PREFILL_OK,
    FrameReader,
    decode_metadata,
    encode_metadata,
    frame,
)


@pytest.fixture
async def clients() -> AsyncIterator[TokenClients]:
    c = TokenClients()
    yield c
    await c.close()


# --- backpressure: a client that stops reading ----------------------------------------------


class FloodEngine(FakeEngine):
    """Decodes ``chunks`` chunks of ``width`` tokens each, one event-loop turn apiece (as fast
    as the worker takes them): chunk ``i`` is ``[i] + [1] * (width - 1)``. ``produced``: how
    many it has yielded so far."""

    def __init__(self, chunks: int, width: int) -> None:
        super().__init__()
        self.chunks = chunks
        self.width = width
        self.produced = 0

    def generate(
        self, request_id: str, prompt: tuple[int, ...], sampling: Any
    ) -> AsyncIterator[Any]:
        return self._flood()

    async def _flood(self) -> AsyncIterator[Any]:
        for i in range(self.chunks):
            await asyncio.sleep(0)
            self.produced += 1
            last = i == self.chunks - 1
            yield TokenChunk((i,) + (1,) * (self.width - 1), "length" if last else None)


async def test_a_client_that_stops_reading_pauses_the_decode_instead_of_buffering() -> None:
    """The worker's decode waits on ``writable`` once its transport's buffer passes the high
    water mark: while the client reads nothing the engine is not asked for more chunks and the
    buffer stays bounded; once the client reads, every chunk arrives, in order."""
    chunks, width, high = 300, 4096, 16 * 1024
    engine = FloodEngine(chunks, width)
    w = await start_worker(engine)
    loop = asyncio.get_running_loop()
    client = socket.socket()
    # small kernel buffers on both sides, so that the kernel cannot absorb the whole stream
    # (loopback autotuning would take megabytes) and the pause comes from asyncio's buffer
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    client.setblocking(False)
    try:
        async with asyncio.timeout(GUARD_S):
            await loop.sock_connect(client, ("127.0.0.1", w.token_port))
            await loop.sock_sendall(client, MAGIC)
            await eventually(lambda: len(w.tokens.connections) == 1, "the server's connection")
            (conn,) = w.tokens.connections
            assert conn.transport is not None
            conn.transport.set_write_buffer_limits(high=high)
            conn.transport.get_extra_info("socket").setsockopt(
                socket.SOL_SOCKET, socket.SO_SNDBUF, 4096
            )
            req = decode_request("flood", [1, 2], chunks).SerializeToString()
            await loop.sock_sendall(client, frame(DECODE, 1, encode_metadata(None) + req))

            # the client reads nothing: the connection pauses, the decode waits
            await eventually(lambda: not conn.writable.is_set(), "the server paused writing")
            at_pause = engine.produced
            for _ in range(20):  # let the loop run: nothing more is produced or buffered
                await asyncio.sleep(0.005)
            assert not conn.writable.is_set()
            assert engine.produced == at_pause < chunks
            assert 1 in conn.tasks and not conn.tasks[1].done()  # waiting, not failed
            assert conn.out == []  # nothing held back unsent either
            sample = worker_pb2.DecodeChunk(token_ids=[chunks] + [1] * (width - 1))
            frame_bytes = HEADER.size + len(sample.SerializeToString()) + 64  # + usage
            assert conn.transport.get_write_buffer_size() <= high + 2 * frame_bytes

            # the client reads: the rest streams, every chunk once and in order
            frames = FrameReader()
            got: list[tuple[int, int, bytes]] = []
            while not got or got[-1][0] != CHUNK or not _finished(got[-1][2]):
                data = await loop.sock_recv(client, 65536)
                assert data, "the server closed the connection"
                got.extend(frames.feed(data))
            assert {(kind, sid) for kind, sid, _ in got} == {(CHUNK, 1)}
            decoded = [worker_pb2.DecodeChunk.FromString(p) for _, _, p in got]
            assert [c.token_ids[0] for c in decoded] == list(range(chunks))
            assert all(len(c.token_ids) == width for c in decoded)
            assert decoded[-1].finish_reason == "length"
            assert decoded[-1].usage.completion_tokens == chunks * width
            assert engine.produced == chunks
            await eventually(lambda: conn.tasks == {}, "the decode task ended")
            assert conn.writable.is_set()
            assert engine.aborted == []
    finally:
        client.close()
        await w.stop()


def _finished(payload: bytes) -> bool:
    return bool(worker_pb2.DecodeChunk.FromString(payload).finish_reason)


# --- a worker that breaks the protocol --------------------------------------------------------

Answer = Callable[[int, int, int, bytes], bytes]
"""(connection index, kind, stream id, payload) -> the bytes to write back."""


class FakeWorker:
    """A plain asyncio server with just enough of a worker's side: each connection reads the
    greeting, then answers each request frame with ``answer(...)``. ``writers``: each
    connection's writer, for a test to send more on its own; ``ended``: connections the client
    closed."""

    def __init__(self, answer: Answer) -> None:
        self.answer = answer
        self.connections = 0
        self.ended = 0
        self.received: list[tuple[int, int, int]] = []
        """(connection index, kind, stream id) of every frame received."""
        self.writers: list[asyncio.StreamWriter] = []
        self._server: asyncio.Server | None = None
        self.endpoint = ""

    async def start(self) -> FakeWorker:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.endpoint = f"127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        index = self.connections
        self.connections += 1
        self.writers.append(writer)
        try:
            if await reader.readexactly(len(MAGIC)) != MAGIC:
                return
            frames = FrameReader()
            while data := await reader.read(65536):
                for kind, stream_id, payload in frames.feed(data):
                    self.received.append((index, kind, stream_id))
                    if kind in (PREFILL, DECODE):  # (a CANCEL is only recorded)
                        writer.write(self.answer(index, kind, stream_id, payload))
            self.ended += 1
        except (ConnectionError, asyncio.IncompleteReadError):
            self.ended += 1
        finally:
            writer.close()

    async def close(self) -> None:
        for writer in self.writers:
            writer.close()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


def request_id_of(kind: int, payload: bytes) -> str:
    _, start = decode_metadata(payload)
    message = worker_pb2.PrefillRequest if kind == PREFILL else worker_pb2.DecodeRequest
    return str(message.FromString(payload[start:]).request_id)


def good_answer(kind: int, stream_id: int, payload: bytes) -> bytes:
    """A well-behaved worker: PREFILL -> first token 42; DECODE -> tokens 1, 2."""
    if kind == PREFILL:
        res = worker_pb2.PrefillResponse(request_id=request_id_of(kind, payload), first_token_id=42)
        return frame(PREFILL_OK, stream_id, res.SerializeToString())
    if kind == DECODE:
        one = worker_pb2.DecodeChunk(token_ids=[1])
        two = worker_pb2.DecodeChunk(token_ids=[2], finish_reason="length")
        return frame(CHUNK, stream_id, one.SerializeToString()) + frame(
            CHUNK, stream_id, two.SerializeToString()
        )
    return b""


PREFILL_REQ = worker_pb2.PrefillRequest(request_id="p", prompt_token_ids=[1], sampling=sampling(2))


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param(HEADER.pack(MAX_FRAME_BYTES + 1, CHUNK, 1), id="oversized-header"),
        pytest.param(frame(99, 1, b"?"), id="unknown-kind"),
        pytest.param(frame(PREFILL, 1, b"\x00\x00"), id="request-kind"),  # client -> worker
    ],
)
async def test_a_worker_breaking_the_protocol_fails_unavailable_and_the_client_reconnects(
    clients: TokenClients, bad: bytes
) -> None:
    def answer(index: int, kind: int, stream_id: int, payload: bytes) -> bytes:
        if index == 0 and kind == DECODE:  # the first connection: one chunk, then it waits
            return frame(
                CHUNK, stream_id, worker_pb2.DecodeChunk(token_ids=[7]).SerializeToString()
            )
        return good_answer(kind, stream_id, payload)

    fake = await FakeWorker(answer).start()
    try:
        async with asyncio.timeout(GUARD_S):
            stream = clients.decode(fake.endpoint, decode_request("d", [1], 5))
            assert list((await anext(stream)).token_ids) == [7]
            conn = clients._conns[fake.endpoint]
            assert conn.streams.keys() == {1}
            fake.writers[0].write(bad)  # on the open stream 1
            with pytest.raises(TokenRpcError) as info:
                await anext(stream)
            assert info.value.code() is grpc.StatusCode.UNAVAILABLE
            assert "lost" in info.value.details()
            assert conn.closed and conn.streams == {}
            await eventually(lambda: fake.ended == 1, "the worker saw the connection close")

            # the next call connects again (to a worker that behaves now)
            got = [c async for c in clients.decode(fake.endpoint, decode_request("e", [1], 2))]
            assert [t for c in got for t in c.token_ids] == [1, 2]
            assert fake.connections == 2
            new = clients._conns[fake.endpoint]
            assert new is not conn and not new.closed and new.streams == {}
    finally:
        await fake.close()


@pytest.mark.parametrize(
    ("method", "reply", "message"),
    [
        ("prefill", CHUNK, f"unexpected frame {CHUNK} to Prefill"),
        ("prefill", END, f"unexpected frame {END} to Prefill"),
        ("decode", PREFILL_OK, f"unexpected frame {PREFILL_OK} to Decode"),
    ],
)
async def test_a_reply_of_the_wrong_kind_fails_the_call_internal(
    clients: TokenClients, method: str, reply: int, message: str
) -> None:
    """A frame of a known kind that does not answer the call (a CHUNK to a PREFILL, ...): the
    call fails INTERNAL; the stream is forgotten and the connection goes on serving."""

    def answer(index: int, kind: int, stream_id: int, payload: bytes) -> bytes:
        if request_id_of(kind, payload) == "crossed":
            body = worker_pb2.DecodeChunk(token_ids=[3]) if reply == CHUNK else None
            return frame(reply, stream_id, body.SerializeToString() if body else b"")
        return good_answer(kind, stream_id, payload)

    async def call_crossed() -> None:
        if method == "prefill":
            crossed = worker_pb2.PrefillRequest()
            crossed.CopyFrom(PREFILL_REQ)
            crossed.request_id = "crossed"
            await clients.prefill(fake.endpoint, crossed)
        else:
            async for _ in clients.decode(fake.endpoint, decode_request("crossed", [1], 2)):
                pass

    fake = await FakeWorker(answer).start()
    try:
        async with asyncio.timeout(GUARD_S):
            with pytest.raises(TokenRpcError) as info:
                await call_crossed()
            assert info.value.code() is grpc.StatusCode.INTERNAL
            assert info.value.details() == message
            conn = clients._conns[fake.endpoint]
            assert not conn.closed
            assert conn.streams == {}  # nothing left behind for the stream
            # the connection goes on serving
            assert (await clients.prefill(fake.endpoint, PREFILL_REQ)).first_token_id == 42
            assert clients._conns[fake.endpoint] is conn
            assert fake.connections == 1
            # a CHUNK does not end a stream: the worker was told to stop it (before the next
            # request, on the same connection); the kinds that end one need no CANCEL
            assert ((0, CANCEL, 1) in fake.received) is (reply == CHUNK)
    finally:
        await fake.close()


# --- the gateway's view drops the connections of workers that left ----------------------------


async def test_a_worker_that_leaves_takes_its_token_connection_with_it() -> None:
    """``WorkersView._replace``: the token connection of a worker whose record left is closed
    and forgotten once no record names its token endpoint; the others are kept as they are."""
    fakes = [await FakeWorker(lambda i, k, s, p: good_answer(k, s, p)).start() for _ in range(3)]
    a, b, shared = (f.endpoint for f in fakes)
    records = {
        b"w1": rec("w1", token_endpoint=a),
        b"w2": rec("w2", token_endpoint=b),
        b"w3": rec("w3", token_endpoint=shared),
        b"w4": rec("w4", token_endpoint=shared),  # two records, one token endpoint
        b"w5": rec("w5"),  # no token endpoint (gRPC only)
    }
    view = QuietView()
    tokens = view.channels.tokens
    try:
        async with asyncio.timeout(GUARD_S):
            await view._replace(dict(records))
            conns = {ep: await tokens.connection(ep) for ep in (a, b, shared)}
            assert set(tokens._conns) == {a, b, shared}

            # w1 leaves (the only one at a), w3 leaves (w4 is still at shared), w5 leaves
            await view._replace({b"w2": records[b"w2"], b"w4": records[b"w4"]})
            assert set(tokens._conns) == {b, shared}
            await eventually(lambda: conns[a].closed, "a's connection closed")
            await eventually(lambda: fakes[0].ended == 1, "the worker at a saw it close")
            for ep in (b, shared):
                assert tokens._conns[ep] is conns[ep] and not conns[ep].closed
            assert await tokens.prefill(b, PREFILL_REQ) is not None  # still serving
            assert await tokens.prefill(shared, PREFILL_REQ) is not None
            assert tokens._conns[b] is conns[b] and tokens._conns[shared] is conns[shared]

            # the last record at shared leaves: its connection goes too
            await view._replace({b"w2": records[b"w2"]})
            assert set(tokens._conns) == {b}
            await eventually(lambda: conns[shared].closed, "shared's connection closed")
            assert not conns[b].closed

            # w1 comes back at a: a new connection on first use
            await view._replace({b"w1": records[b"w1"], b"w2": records[b"w2"]})
            assert (await tokens.prefill(a, PREFILL_REQ)).first_token_id == 42
            assert tokens._conns[a] is not conns[a] and fakes[0].connections == 2
    finally:
        await view.channels.close()
        for f in fakes:
            await f.close()


async def test_a_worker_whose_token_endpoint_changes_drops_the_old_connection() -> None:
    fakes = [await FakeWorker(lambda i, k, s, p: good_answer(k, s, p)).start() for _ in range(2)]
    old, new = (f.endpoint for f in fakes)
    view = QuietView()
    tokens = view.channels.tokens
    try:
        async with asyncio.timeout(GUARD_S):
            await view._replace({b"w1": rec("w1", token_endpoint=old)})
            conn = await tokens.connection(old)
            await view._replace({b"w1": rec("w1", token_endpoint=new)})
            assert old not in tokens._conns
            await eventually(lambda: conn.closed, "the old connection closed")
    finally:
        await view.channels.close()
        for f in fakes:
            await f.close()


# --- tracing: the metadata block carries the trace context ----------------------------------


def memory_tracer() -> tuple[tracing.Tracer, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider.get_tracer("test"), exporter


async def traced_workers(
    tracer: tracing.Tracer, disaggregated: bool
) -> tuple[list[Worker], list[Any]]:
    engine = PromptEngine()  # one engine behind both: the decode worker finds the KV
    if not disaggregated:
        w = Worker(engine, WorkerService(engine, worker_id="w1", role=Role.BOTH, tracer=tracer))
        return [await w.start()], [record(w)]
    p = Worker(engine, WorkerService(engine, worker_id="p1", role=Role.PREFILL, tracer=tracer))
    d = Worker(engine, WorkerService(engine, worker_id="d1", role=Role.DECODE, tracer=tracer))
    return [await p.start(), await d.start()], [record(p, "prefill"), record(d, "decode")]


def worker_spans(exporter: InMemorySpanExporter) -> dict[str, ReadableSpan]:
    spans: dict[str, ReadableSpan] = {}
    for s in exporter.get_finished_spans():
        assert s.name not in spans, f"two {s.name} spans"
        spans[s.name] = s
    return spans


@pytest.mark.parametrize("disaggregated", [False, True], ids=["aggregated", "disaggregated"])
@pytest.mark.parametrize("token_transport", [True, False], ids=["tokens", "grpc"])
async def test_worker_spans_are_children_of_the_gateway_span(
    token_transport: bool, disaggregated: bool
) -> None:
    """The gateway's request span reaches the workers as their spans' remote parent, over the
    token transport's metadata block as over gRPC metadata."""
    gw_tracer, gw_exporter = memory_tracer()
    wk_tracer, wk_exporter = memory_tracer()  # another provider: as in another process
    workers, records = await traced_workers(wk_tracer, disaggregated)
    view = QuietView()
    view.put(*records)
    gw = make_gateway(view, token_transport, tracer=gw_tracer)
    request = tracing.start_span(gw_tracer, "gateway.request", kind=tracing.SpanKind.SERVER)
    assert request is not None
    try:
        out = await run_stream(gw, "traced", (5, 6), 3, Progress(span=request))
        used = set(view.channels.tokens._conns)
        names = {"worker.prefill", "worker.decode"} if disaggregated else {"worker.decode"}
        async with asyncio.timeout(GUARD_S):
            await eventually(
                lambda: {s.name for s in wk_exporter.get_finished_spans()} >= names,
                "the worker spans ended",
            )
    finally:
        request.end()
        await view.channels.close()
        for w in workers:
            await w.stop()
    assert len(out[0]) == 3 and out[1] == "length"
    assert used == ({w.token_endpoint for w in workers} if token_transport else set())
    spans = worker_spans(wk_exporter)
    assert set(spans) == names
    want = request.get_span_context()
    for span in spans.values():
        assert span.parent is not None, span.name
        assert span.parent.is_remote
        assert span.parent.span_id == want.span_id, span.name
        assert span.context is not None and span.context.trace_id == want.trace_id
        assert span.kind is tracing.SpanKind.SERVER
        assert span.attributes is not None
        assert span.attributes["switchboard.request_id"] == "traced"
    assert {s.name for s in gw_exporter.get_finished_spans()} == {
        "gateway.request",
        "router.decision",
    }


async def test_a_request_without_a_span_gives_the_worker_a_root_span() -> None:
    """No gateway span (tracing off at the gateway): the metadata block is empty and the
    worker's decode span starts a trace of its own."""
    wk_tracer, wk_exporter = memory_tracer()
    workers, records = await traced_workers(wk_tracer, disaggregated=False)
    view = QuietView()
    view.put(*records)
    gw = make_gateway(view)
    try:
        out = await run_stream(gw, "untraced", (5, 6), 2)
        async with asyncio.timeout(GUARD_S):
            await eventually(lambda: len(wk_exporter.get_finished_spans()) == 1, "its span")
        assert set(view.channels.tokens._conns) == {workers[0].token_endpoint}
    finally:
        await view.channels.close()
        for w in workers:
            await w.stop()
    assert out[1] == "length"
    (span,) = wk_exporter.get_finished_spans()
    assert span.name == "worker.decode" and span.parent is None
