"""A lean HTTP/1.1 server for ASGI applications: the gateway's front door.

It speaks the part of ASGI 3 (``http`` scope, spec 2.3) that the gateway's raw ASGI app uses,
over ``asyncio.Protocol`` and the httptools parser on the running (uvloop) event loop, with
nothing else per request: one task runs the app, the response head goes out with the first
body part (one write for a whole JSON answer), and a request whose body is complete is handed
to the app in one ``http.request`` message.

HTTP/1.1 as a production front door needs it:

- keep-alive (HTTP/1.1 by default, HTTP/1.0 when asked), closed after ``keep_alive_s`` idle;
  pipelined requests answered in order (reading pauses past ``MAX_PIPELINED`` queued);
- request bodies by ``Content-Length`` or chunked; ``Expect: 100-continue`` answered; a body
  past ``max_body_bytes`` is refused with 413 before it is read (its size known) or as soon as
  it passes the limit (chunked), and the connection closes;
- responses framed by the app's ``content-length`` header, else chunked (none for 1xx / 204 /
  304 or HEAD); a ``date`` header; ``connection: close`` when the connection will close;
- write back-pressure: ``send`` waits while the transport's buffer is over its high-water mark;
- bad input gets an OpenAI-style error body and the connection closes: 400 malformed request
  or an upgrade (not supported), 413, 431 request line and headers over ``max_header_bytes``;
  an app that fails before its response starts gets 500; one that fails after, a closed
  connection (the framing cannot be finished honestly);
- a client that goes away: ``receive`` returns ``http.disconnect``, and the callback the app
  set through the scope's ``DISCONNECT_EXTENSION`` runs (workers/openai_protocol.py
  ``cancel_on_disconnect``: the handler is cancelled without a watcher task per request);
  queued pipelined requests are dropped, nothing more is written;
- ``shutdown()``: stop accepting, close idle connections, let requests in flight finish (their
  connections close after them) for up to ``drain_timeout_s``, then cancel what is left.

Why not uvicorn: on the 2-core VM its per-request cost (the ASGI cycle objects, two writes per
response, flow-control bookkeeping) was ~15% of the gateway's CPU per request; see
docs/architecture.md, "Gateway" for the measurement.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections import deque
from collections.abc import Awaitable, Callable, MutableMapping
from http import HTTPStatus
from typing import Any
from urllib.parse import unquote

import httptools

from workers.openai_protocol import DISCONNECT_EXTENSION, ApiError

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
App = Callable[
    [Scope, Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]],
    Awaitable[None],
]

MAX_PIPELINED = 16
"""Queued requests on one connection past which it stops reading until they are answered."""

LINGER_S = 2.0
"""How long a refused request's connection keeps reading (and dropping) what the client sends."""

_ASGI = {"version": "3.0", "spec_version": "2.3"}
_REASONS = {s.value: s.phrase.encode() for s in HTTPStatus}
_NO_BODY_STATUS = frozenset({204, 304})
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


class _Date:
    """The ``date`` header line, formatted once a second."""

    def __init__(self) -> None:
        self.second = -1
        self.line = b""

    def get(self) -> bytes:
        now = int(time.time())
        if now != self.second:
            self.second = now
            stamp = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(now))
            self.line = b"date: " + stamp.encode() + b"\r\n"
        return self.line


class HttpServer:
    """Serves ``app`` on listening sockets until ``shutdown``; see the module docstring."""

    def __init__(
        self,
        app: App,
        *,
        max_body_bytes: int = 4 << 20,
        max_header_bytes: int = 64 << 10,
        keep_alive_s: float = 5.0,
        drain_timeout_s: float = 10.0,
        backlog: int = 2048,
    ) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.max_header_bytes = max_header_bytes
        self.keep_alive_s = keep_alive_s
        self.drain_timeout_s = drain_timeout_s
        self.backlog = backlog
        self.connections: set[_Connection] = set()
        self.closing = False
        self.date = _Date()
        self._exit = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def should_exit(self) -> bool:
        return self._exit.is_set()

    @should_exit.setter
    def should_exit(self, value: bool) -> None:
        """Setting it True is ``shutdown()`` (the drain runs in ``serve``)."""
        if value:
            self._exit.set()

    def shutdown(self) -> None:
        self._exit.set()

    async def serve(self, sockets: list[socket.socket]) -> None:
        """Accept on ``sockets`` (bound; listening or not) until ``shutdown``, then drain."""
        loop = asyncio.get_running_loop()
        servers = [
            await loop.create_server(lambda: _Connection(self), sock=s, backlog=self.backlog)
            for s in sockets
        ]
        try:
            await self._exit.wait()
        finally:
            for server in servers:
                server.close()
            await self._drain()

    async def _drain(self) -> None:
        self.closing = True
        for conn in list(self.connections):
            conn.close_when_idle()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), self.drain_timeout_s)
        for conn in list(self.connections):
            conn.abort()

    def _added(self, conn: _Connection) -> None:
        self.connections.add(conn)
        self._idle.clear()

    def _removed(self, conn: _Connection) -> None:
        self.connections.discard(conn)
        if not self.connections:
            self._idle.set()


class _Request:
    """One request's ASGI cycle: its scope and body in, its response out."""

    __slots__ = (
        "body",
        "chunked",
        "complete",
        "conn",
        "head",
        "head_only",
        "keep_alive",
        "on_disconnect",
        "received",
        "scope",
        "started",
        "waiter",
    )

    def __init__(self, conn: _Connection, scope: Scope, body: bytes, keep_alive: bool) -> None:
        self.conn = conn
        self.scope = scope
        self.body = body
        self.keep_alive = keep_alive
        self.head_only = scope["method"] == "HEAD"
        self.received = False
        self.started = False
        self.complete = False
        self.chunked = False
        self.head: bytes | None = None
        self.waiter: asyncio.Future[None] | None = None
        self.on_disconnect: Callable[[], None] | None = None
        """Called once if the client goes away before the response is complete (set by the
        app through the scope's ``DISCONNECT_EXTENSION``)."""
        scope["extensions"] = {DISCONNECT_EXTENSION: self}

    async def receive(self) -> Message:
        if not self.received:
            self.received = True
            return {"type": "http.request", "body": self.body, "more_body": False}
        if not (self.complete or self.conn.closed):
            self.waiter = asyncio.get_running_loop().create_future()
            with contextlib.suppress(asyncio.CancelledError):
                await self.waiter
        return {"type": "http.disconnect"}

    def lost(self) -> None:
        """The client went away."""
        self.wake()
        callback, self.on_disconnect = self.on_disconnect, None
        if callback is not None and not self.complete:
            callback()

    def wake(self) -> None:
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def send(self, message: Message) -> None:
        kind = message["type"]
        if kind == "http.response.body":
            if not self.started or self.complete:
                raise RuntimeError("http.response.body outside a started response")
            body: bytes = message.get("body", b"")
            more: bool = message.get("more_body", False)
            if not more:
                self.complete = True
            if not self.chunked:
                data = body
            elif more:
                data = b"%x\r\n%b\r\n" % (len(body), body) if body else b""
            else:
                data = b"%x\r\n%b\r\n0\r\n\r\n" % (len(body), body) if body else b"0\r\n\r\n"
            if self.head_only:
                data = b""
            if self.head is not None:
                data, self.head = self.head + data, None
            conn = self.conn
            if not conn.closed:
                if data:
                    conn.transport.write(data)
                if conn.write_paused and more:
                    await conn.drained()
            if not more:
                self.wake()
        elif kind == "http.response.start":
            if self.started:
                raise RuntimeError("http.response.start sent twice")
            self.started = True
            self.head = self._head(message["status"], message.get("headers", ()))
        else:
            raise RuntimeError(f"unexpected ASGI message {kind!r}")

    def _head(self, status: int, headers: Any) -> bytes:
        lines = [b"HTTP/1.1 %d %b\r\n" % (status, _REASONS.get(status, b"")), self.conn.date()]
        length = False
        for name, value in headers:
            low = name.lower()
            if low == b"content-length":
                length = True
            elif low == b"connection" and value.lower() == b"close":
                self.keep_alive = False
                continue  # written below, once
            elif low == b"transfer-encoding":
                continue  # the framing is this server's
            lines.append(b"%b: %b\r\n" % (name, value))
        if not length and status >= 200 and status not in _NO_BODY_STATUS and not self.head_only:
            self.chunked = True
            lines.append(b"transfer-encoding: chunked\r\n")
        if not self.keep_alive or self.conn.server.closing:
            self.keep_alive = False
            lines.append(b"connection: close\r\n")
        lines.append(b"\r\n")
        return b"".join(lines)


class _Connection(asyncio.Protocol):
    """One client connection: parses requests, runs them one at a time in order."""

    def __init__(self, server: HttpServer) -> None:
        self.server = server
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.parser = httptools.HttpRequestParser(self)
        self.closed = False
        self.write_paused = False
        self.reading = True
        self._drain_waiter: asyncio.Future[None] | None = None
        self._idle_timer: asyncio.TimerHandle | None = None
        self._current: _Request | None = None
        self._task: asyncio.Task[None] | None = None
        self._queue: deque[_Request] = deque()
        self._addresses: tuple[Any, Any] = (None, None)
        # the request being parsed
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._header_bytes = 0
        self._body: list[bytes] = []
        self._body_bytes = 0
        self._refused = False

    # --- transport events -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # a stream transport (TCP)
        self._addresses = (
            _address(transport.get_extra_info("sockname")),
            _address(transport.get_extra_info("peername")),
        )
        self.server._added(self)
        self._arm_idle()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._cancel_idle()
        self._queue.clear()
        if self._current is not None:
            self._current.lost()
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_result(None)
        self.server._removed(self)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return  # answered and closing: the rest of what the client sent is dropped
        self._cancel_idle()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._refuse(400, "connection upgrades are not supported", "upgrade_not_supported")
        except httptools.HttpParserCallbackError as e:
            if not isinstance(e.__context__, _Refused):  # a bug in a callback: logged
                log.exception("HTTP parser callback failed")
                self._refuse(400, "malformed HTTP request", "malformed_request")
        except httptools.HttpParserError as e:
            self._refuse(400, f"malformed HTTP request: {e}", "malformed_request")

    def eof_received(self) -> bool | None:
        return None  # close our side too (a half-closed client gets no more answers)

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_result(None)

    async def drained(self) -> None:
        if self.write_paused and not self.closed:
            self._drain_waiter = self.loop.create_future()
            await self._drain_waiter

    def date(self) -> bytes:
        return self.server.date.get()

    # --- parser callbacks ---------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._url = b""
        self._headers = []
        self._header_bytes = 0
        self._body = []
        self._body_bytes = 0

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._header_bytes += len(url)
        if self._header_bytes > self.server.max_header_bytes:
            self._refuse_too_big_head()
            raise _Refused

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_bytes += len(name) + len(value) + 4
        if self._header_bytes > self.server.max_header_bytes:
            self._refuse_too_big_head()
            raise _Refused
        self._headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        limit = self.server.max_body_bytes
        expect = False
        for name, value in self._headers:
            if name == b"content-length":
                if value.isdigit() and int(value) > limit:
                    self._refuse_too_large()
                    raise _Refused
            elif name == b"expect" and value.lower() == b"100-continue":
                expect = True
        if expect and self._current is None and not self._queue:
            self.transport.write(_CONTINUE)

    def on_body(self, body: bytes) -> None:
        self._body_bytes += len(body)
        if self._body_bytes > self.server.max_body_bytes:
            self._refuse_too_large()
            raise _Refused
        self._body.append(body)

    def on_message_complete(self) -> None:
        parser = self.parser
        raw = self._url
        if raw[:1] != b"/":  # absolute form (a proxy request) or "*"
            parsed = httptools.parse_url(raw)
            path_b, query = parsed.path or b"/", parsed.query or b""
        else:
            path_b, _, query = raw.partition(b"?")
            path_b = path_b.partition(b"#")[0]
        path = path_b.decode("latin-1")
        if "%" in path:
            path = unquote(path)
        body = self._body[0] if len(self._body) == 1 else b"".join(self._body)
        scope: Scope = {
            "type": "http",
            "asgi": _ASGI,
            "http_version": parser.get_http_version(),
            "server": self._addresses[0],
            "client": self._addresses[1],
            "scheme": "http",
            "method": parser.get_method().decode("ascii"),
            "root_path": "",
            "path": path,
            "raw_path": path_b,
            "query_string": query,
            "headers": self._headers,
        }
        request = _Request(self, scope, body, parser.should_keep_alive())
        if self._current is None:
            self._start(request)
        else:
            self._queue.append(request)
            if len(self._queue) >= MAX_PIPELINED and self.reading:
                self.reading = False
                self.transport.pause_reading()

    # --- running requests ---------------------------------------------------------------------

    def _start(self, request: _Request) -> None:
        self._current = request
        self._task = self.loop.create_task(self._run(request))

    async def _run(self, request: _Request) -> None:
        try:
            await self.server.app(request.scope, request.receive, request.send)
        except asyncio.CancelledError:
            request.keep_alive = False
            raise
        except Exception:
            log.exception("%s %s failed", request.scope["method"], request.scope["path"][:200])
            if not request.started and not self.closed:
                err = ApiError(500, "internal error", type="internal_error")
                self._write_error(err.status, err.body())
                return
            request.keep_alive = False
        finally:
            self._done(request)

    def _done(self, request: _Request) -> None:
        self._current = None
        self._task = None
        request.on_disconnect = None
        del request.scope["extensions"]  # it names the request: no cycle left for the collector
        if self.closed:
            return
        if not request.complete or not request.keep_alive:
            if not request.complete and request.started:
                log.warning(
                    "%s %s: the app left its response unfinished; closing the connection",
                    request.scope["method"],
                    request.scope["path"][:200],
                )
            self.transport.close()
            return
        if self.server.closing:
            self.transport.close()  # shutting down: queued pipelined requests are not started
        elif self._queue:
            self._start(self._queue.popleft())
            if not self.reading and len(self._queue) < MAX_PIPELINED // 2:
                self.reading = True
                self.transport.resume_reading()
        else:
            self._arm_idle()

    # --- closing ------------------------------------------------------------------------------

    def close_when_idle(self) -> None:
        """Shutdown: close now if no request is in flight, else after it (``_done``)."""
        if self._current is None and not self.closed:
            self.transport.close()

    def abort(self) -> None:
        """Shutdown's drain time is over: cancel the request in flight and close."""
        if self._task is not None:
            self._task.cancel()
        if not self.closed:
            self.transport.abort()

    def _arm_idle(self) -> None:
        self._idle_timer = self.loop.call_later(self.server.keep_alive_s, self._idle)

    def _cancel_idle(self) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None

    def _idle(self) -> None:
        self._idle_timer = None
        if self._current is None and not self.closed:
            self.transport.close()

    def _refuse_too_large(self) -> None:
        limit = self.server.max_body_bytes
        self._refuse(413, f"the request body exceeds {limit} bytes", "body_too_large")

    def _refuse_too_big_head(self) -> None:
        limit = self.server.max_header_bytes
        self._refuse(431, f"the request line and headers exceed {limit} bytes", "headers_too_large")

    def _refuse(self, status: int, message: str, code: str) -> None:
        """Answer an error without running the app, and close: the parser's state after bad
        input is not trusted. (A parser callback raises ``_Refused`` after it, to stop the
        parser.)"""
        self._refused = True
        self._queue.clear()
        if self.closed:
            return
        if self._current is None:
            self._write_error(status, ApiError(status, message, code=code).body(), linger=True)
        else:
            self.transport.close()  # mid-response: the answer in flight cannot be followed

    def _write_error(self, status: int, body: bytes, *, linger: bool = False) -> None:
        """An error answer that ends the connection. ``linger``: the client may still be
        sending (a body refused unread): end our side, then read and drop what comes for up to
        ``LINGER_S`` before closing, so the client reads the answer rather than a reset."""
        reason = _REASONS.get(status, b"")
        head = (
            b"HTTP/1.1 %d %b\r\n%bcontent-type: application/json\r\ncontent-length: %d\r\n"
            b"connection: close\r\n\r\n" % (status, reason, self.date(), len(body))
        )
        self.transport.write(head + body)
        if linger and self.transport.can_write_eof():
            self.transport.write_eof()
            self.loop.call_later(LINGER_S, self.transport.close)
        else:
            self.transport.close()


class _Refused(Exception):
    """Raised out of a parser callback once the request was refused."""


def _address(value: Any) -> tuple[str, int] | None:
    if isinstance(value, tuple) and len(value) >= 2:
        return (str(value[0]), int(value[1]))
    return None
