"""The gateway's HTTP/1.1 server (controlplane/adapters/http/server.py) on 127.0.0.1, driven
by raw sockets (to send exactly the bytes an edge case needs) and by aiohttp.

The app under test is a small ASGI callable that records what it was given; no test asserts
how long anything takes (the waits are bounded and only guard against a hang).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest

from controlplane.adapters.http.server import HttpServer
from workers.openai_main import listen_socket
from workers.openai_protocol import DISCONNECT_EXTENSION

WAIT_S = 10.0


@dataclass
class Recorder:
    """An ASGI app: ``/echo`` answers the body (content-length), ``/stream`` answers
    ``parts`` chunks without a length, ``/hold`` waits for ``release`` (or a disconnect),
    ``/fail`` raises before answering, ``/fail-late`` after the head and a first part."""

    scopes: list[dict[str, Any]] = field(default_factory=list)
    disconnects: list[str] = field(default_factory=list)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    started: asyncio.Event = field(default_factory=asyncio.Event)
    parts: int = 3
    part: bytes = b"data: x\n\n"
    sent_all: bool = False

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        self.scopes.append(dict(scope))
        message = await receive()
        body = message["body"]
        path = scope["path"]
        if path == "/echo":
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [(b"content-length", str(len(body)).encode())],
                }
            )
            await send({"type": "http.response.body", "body": body})
        elif path == "/stream":
            await send({"type": "http.response.start", "status": 200, "headers": []})
            for _ in range(self.parts):
                await send({"type": "http.response.body", "body": self.part, "more_body": True})
            self.sent_all = True
            await send({"type": "http.response.body", "body": b""})
        elif path == "/hold":
            ext = scope["extensions"][DISCONNECT_EXTENSION]
            ext.on_disconnect = lambda: self.disconnects.append("callback")
            self.started.set()
            waiter = asyncio.ensure_future(self.release.wait())
            gone = asyncio.ensure_future(receive())
            done, _ = await asyncio.wait({waiter, gone}, return_when=asyncio.FIRST_COMPLETED)
            if gone in done:
                self.disconnects.append(gone.result()["type"])
                waiter.cancel()
                return
            gone.cancel()
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"released"})
        elif path == "/fail":
            raise RuntimeError("the app failed")
        elif path == "/fail-late":
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"part", "more_body": True})
            raise RuntimeError("the app failed mid-response")
        else:
            await send({"type": "http.response.start", "status": 204, "headers": []})
            await send({"type": "http.response.body", "body": b""})


@dataclass
class Running:
    server: HttpServer
    app: Recorder
    port: int
    task: asyncio.Task[None]

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection("127.0.0.1", self.port)


@contextlib.asynccontextmanager
async def running(**settings: Any) -> AsyncIterator[Running]:
    app = Recorder()
    sock = listen_socket("127.0.0.1", 0)
    port = int(sock.getsockname()[1])
    server = HttpServer(app, **settings)
    task = asyncio.create_task(server.serve([sock]))
    try:
        yield Running(server, app, port, task)
    finally:
        server.shutdown()
        await asyncio.wait_for(task, WAIT_S)
        sock.close()


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[bytes, bytes], bytes]:
    """One response: status, headers (lower-case names), body (content-length or chunked)."""
    line = await asyncio.wait_for(reader.readline(), WAIT_S)
    if not line:
        raise ConnectionError("closed before a response")
    status = int(line.split()[1])
    headers: dict[bytes, bytes] = {}
    while True:
        line = await asyncio.wait_for(reader.readline(), WAIT_S)
        if line in (b"\r\n", b""):
            break
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    if b"content-length" in headers:
        body = await asyncio.wait_for(reader.readexactly(int(headers[b"content-length"])), WAIT_S)
    elif headers.get(b"transfer-encoding") == b"chunked":
        parts = []
        while True:
            size = int((await asyncio.wait_for(reader.readline(), WAIT_S)).strip(), 16)
            chunk = await asyncio.wait_for(reader.readexactly(size + 2), WAIT_S)
            if size == 0:
                break
            parts.append(chunk[:-2])
        body = b"".join(parts)
    else:
        body = b""
    return status, headers, body


async def closed(reader: asyncio.StreamReader) -> bool:
    """The server closed the connection (EOF, or a reset)."""
    try:
        return await asyncio.wait_for(reader.read(1), WAIT_S) == b""
    except ConnectionResetError:
        return True


def post(path: str, body: bytes, *extra: bytes) -> bytes:
    head = b"POST %b HTTP/1.1\r\nhost: t\r\ncontent-length: %d\r\n" % (path.encode(), len(body))
    return head + b"".join(h + b"\r\n" for h in extra) + b"\r\n" + body


async def test_keep_alive_serves_several_requests_on_one_connection() -> None:
    async with running() as r:
        reader, writer = await r.connect()
        for body in (b'{"a": 1}', b'{"b": 2}'):
            writer.write(post("/echo?x=1", body, b"content-type: application/json"))
            status, headers, got = await read_response(reader)
            assert (status, got) == (200, body)
            assert b"date" in headers and b"connection" not in headers
        writer.close()
        scope = r.app.scopes[0]
        assert (scope["method"], scope["path"], scope["query_string"]) == ("POST", "/echo", b"x=1")
        assert (b"content-type", b"application/json") in scope["headers"]
        assert scope["http_version"] == "1.1" and scope["client"][0] == "127.0.0.1"


async def test_pipelined_requests_are_answered_in_order() -> None:
    async with running() as r:
        reader, writer = await r.connect()
        writer.write(post("/echo", b"one") + post("/stream", b"") + post("/echo", b"three"))
        answers = [await read_response(reader) for _ in range(3)]
        assert [a[2] for a in answers] == [b"one", r.app.part * r.app.parts, b"three"]
        writer.close()


async def test_a_chunked_request_body_reaches_the_app_whole() -> None:
    async with running() as r:
        reader, writer = await r.connect()
        writer.write(
            b"POST /echo HTTP/1.1\r\nhost: t\r\ntransfer-encoding: chunked\r\n\r\n"
            b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
        )
        assert (await read_response(reader))[2] == b"hello world"
        writer.close()


async def test_expect_100_continue_is_answered_before_the_body() -> None:
    async with running() as r:
        reader, writer = await r.connect()
        writer.write(
            b"POST /echo HTTP/1.1\r\nhost: t\r\ncontent-length: 4\r\nexpect: 100-continue\r\n\r\n"
        )
        assert await asyncio.wait_for(reader.readline(), WAIT_S) == b"HTTP/1.1 100 Continue\r\n"
        assert await asyncio.wait_for(reader.readline(), WAIT_S) == b"\r\n"
        writer.write(b"body")
        assert (await read_response(reader))[:1] == (200,)
        writer.close()


async def test_a_body_over_the_limit_is_refused_with_413_and_the_client_reads_it() -> None:
    async with running(max_body_bytes=1000) as r:
        reader, writer = await r.connect()
        writer.write(post("/echo", b"x" * (4 << 20)))  # sent on: the answer is still readable
        status, headers, body = await read_response(reader)
        assert status == 413 and headers[b"connection"] == b"close"
        assert json.loads(body)["error"]["code"] == "body_too_large"
        assert await closed(reader)
        reader, writer = await r.connect()  # chunked: refused once it passes the limit
        writer.write(b"POST /echo HTTP/1.1\r\nhost: t\r\ntransfer-encoding: chunked\r\n\r\n")
        writer.write(b"400\r\n" + b"y" * 1024 + b"\r\n")
        assert (await read_response(reader))[0] == 413
        assert r.app.scopes == []  # the app never saw either


async def test_headers_over_the_limit_get_431_and_malformed_requests_400() -> None:
    async with running(max_header_bytes=512) as r:
        reader, writer = await r.connect()
        writer.write(post("/echo", b"", b"x-big: " + b"a" * 1000))
        status, _, body = await read_response(reader)
        assert status == 431 and json.loads(body)["error"]["code"] == "headers_too_large"
        assert await closed(reader)
        reader, writer = await r.connect()
        writer.write(b"NOT HTTP AT ALL\r\n\r\n")
        status, _, body = await read_response(reader)
        assert status == 400 and json.loads(body)["error"]["code"] == "malformed_request"
        assert await closed(reader)
        assert r.app.scopes == []


async def test_a_response_without_a_length_is_chunked_and_decodes() -> None:
    async with running() as r, aiohttp.ClientSession() as http:
        r.app.parts = 50
        async with http.post(f"http://127.0.0.1:{r.port}/stream", data=b"") as resp:
            assert resp.headers["transfer-encoding"] == "chunked"
            assert await resp.read() == r.app.part * 50
        async with http.post(f"http://127.0.0.1:{r.port}/echo", data=b"abc") as resp:
            assert await resp.read() == b"abc"


async def test_an_app_failure_is_500_before_the_head_and_a_closed_connection_after() -> None:
    async with running() as r:
        reader, writer = await r.connect()
        writer.write(post("/fail", b""))
        status, _, body = await read_response(reader)
        assert status == 500 and json.loads(body)["error"]["type"] == "internal_error"
        assert await closed(reader)
        reader, writer = await r.connect()
        writer.write(post("/fail-late", b""))
        line = await asyncio.wait_for(reader.readline(), WAIT_S)
        assert line.startswith(b"HTTP/1.1 200")
        await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT_S)
        rest = await asyncio.wait_for(reader.read(), WAIT_S)  # up to EOF: no final chunk
        assert b"part" in rest and not rest.endswith(b"0\r\n\r\n")


async def test_a_client_that_leaves_is_reported_to_the_app() -> None:
    async with running() as r:
        _, writer = await r.connect()
        writer.write(post("/hold", b""))
        await asyncio.wait_for(r.app.started.wait(), WAIT_S)
        writer.close()
        for _ in range(200):
            if len(r.app.disconnects) == 2:
                break
            await asyncio.sleep(0.02)
        assert r.app.disconnects == ["callback", "http.disconnect"]


@pytest.mark.parametrize(
    ("request_head", "close"),
    [
        (b"GET /x HTTP/1.0\r\n\r\n", True),
        (b"GET /x HTTP/1.0\r\nconnection: keep-alive\r\n\r\n", False),
        (b"GET /x HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n", True),
        (b"GET /x HTTP/1.1\r\nhost: t\r\n\r\n", False),
    ],
)
async def test_connection_close_is_honoured(request_head: bytes, close: bool) -> None:
    async with running() as r:
        reader, writer = await r.connect()
        writer.write(request_head)
        status, headers, _ = await read_response(reader)
        assert status == 204
        assert (headers.get(b"connection") == b"close") is close
        if close:
            assert await closed(reader)
        else:
            writer.write(request_head)
            assert (await read_response(reader))[0] == 204
        writer.close()


async def test_head_gets_headers_only() -> None:
    async with running() as r:
        reader, writer = await r.connect()
        writer.write(b"HEAD /stream HTTP/1.1\r\nhost: t\r\n\r\nGET /x HTTP/1.1\r\nhost: t\r\n\r\n")
        line = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT_S)
        assert line.startswith(b"HTTP/1.1 200") and b"transfer-encoding" not in line
        assert (await read_response(reader))[0] == 204  # the next answer follows at once
        writer.close()


async def test_an_idle_connection_is_closed_after_the_keep_alive_time() -> None:
    async with running(keep_alive_s=0.2) as r:
        reader, writer = await r.connect()
        writer.write(b"GET /x HTTP/1.1\r\nhost: t\r\n\r\n")
        assert (await read_response(reader))[0] == 204
        assert await closed(reader)


async def test_shutdown_lets_a_request_in_flight_finish_and_closes_idle_ones() -> None:
    async with running(drain_timeout_s=WAIT_S) as r:
        idle_reader, _ = await r.connect()
        reader, writer = await r.connect()
        writer.write(post("/hold", b""))
        await asyncio.wait_for(r.app.started.wait(), WAIT_S)
        r.server.shutdown()
        assert await closed(idle_reader)
        with pytest.raises(OSError):  # the listener closed before the idle connections
            await r.connect()
        r.app.release.set()
        status, headers, body = await read_response(reader)
        assert (status, body, headers[b"connection"]) == (200, b"released", b"close")
        await asyncio.wait_for(r.task, WAIT_S)


async def test_shutdown_cancels_what_outlives_the_drain_time() -> None:
    async with running(drain_timeout_s=0.2) as r:
        reader, writer = await r.connect()
        writer.write(post("/hold", b""))
        await asyncio.wait_for(r.app.started.wait(), WAIT_S)
        r.server.shutdown()
        await asyncio.wait_for(r.task, WAIT_S)  # returns although the app never answered
        assert await closed(reader)


async def test_a_large_streamed_response_waits_for_a_slow_reader() -> None:
    async with running() as r:
        r.app.part = b"z" * (256 << 10)
        r.app.parts = 256  # 64 MiB: more than the socket buffers and the transport's mark hold
        reader, writer = await r.connect()
        writer.write(post("/stream", b""))
        await asyncio.sleep(0.3)
        assert not r.app.sent_all  # send() waits while the client does not read
        status, _, body = await read_response(reader)
        assert status == 200 and len(body) == 256 * (256 << 10) and r.app.sent_all
        writer.close()
