"""The gateway's side of the token transport (wire format: workers/token_transport.py).

``TokenClients`` keeps one connection per worker token endpoint, opened on first use and
shared by every request to that worker (each request is a stream on it). A call fails with
``TokenRpcError``, which answers ``code()`` / ``details()`` as ``grpc.aio.AioRpcError`` does,
with the same codes the worker's gRPC service would give: the request path handles both alike.
Deadlines are the client's: past it the stream fails DEADLINE_EXCEEDED and the worker is told
to cancel it (``CANCEL``), as it is when the caller stops reading a decode stream early or is
cancelled. A lost connection fails its open streams UNAVAILABLE; the next call connects again.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
from collections.abc import AsyncGenerator, Iterable
from typing import cast

import grpc
from google.protobuf.message import Message
from switchboard.v1 import worker_pb2

from workers.token_transport import (
    CANCEL,
    CHUNK,
    DECODE,
    END,
    ERROR,
    MAGIC,
    PREFILL,
    PREFILL_OK,
    FrameReader,
    ProtocolError,
    decode_error,
    encode_metadata,
    frame,
)

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 5.0
_REPLY_KINDS = frozenset({PREFILL_OK, CHUNK, ERROR, END})
MAX_STREAM_ID = 0xFFFF_FFFF


class TokenRpcError(Exception):
    """A token-transport call failed: a gRPC status code and its message."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self._code = code
        self._details = details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


class _Stream:
    """One call's frames as they arrive, and its deadline."""

    __slots__ = ("failure", "frames", "timer", "waiter")

    def __init__(self) -> None:
        self.frames: collections.deque[tuple[int, bytes]] = collections.deque()
        self.waiter: asyncio.Future[None] | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.failure: TokenRpcError | None = None

    def push(self, kind: int, payload: bytes) -> None:
        self.frames.append((kind, payload))
        self._wake()

    def fail(self, error: TokenRpcError) -> None:
        if self.failure is None:
            self.failure = error
        self._wake()

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


class TokenConnection(asyncio.Protocol):
    """One connection to a worker's token endpoint; see the module docstring."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self.transport: asyncio.Transport | None = None
        self.reader = FrameReader()
        self.streams: dict[int, _Stream] = {}
        self._next_id = 1
        self.closed = False
        self._out: list[bytes] = []
        """Frames written this event-loop turn: sent together by ``_flush`` (one syscall for
        every request that went out in the same turn)."""

    # --- asyncio.Protocol ----------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.transport.write(MAGIC)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.transport = None
        self._out.clear()
        why = f"connection to worker {self.endpoint} lost" + (f": {exc}" if exc else "")
        streams, self.streams = self.streams, {}
        for stream in streams.values():
            stream.fail(TokenRpcError(grpc.StatusCode.UNAVAILABLE, why))

    def data_received(self, data: bytes) -> None:
        try:
            frames = self.reader.feed(data)
        except ProtocolError as e:
            log.warning("token transport to %s: %s; closing", self.endpoint, e)
            self.close()
            return
        streams = self.streams
        for kind, stream_id, payload in frames:
            if kind not in _REPLY_KINDS:
                log.warning(
                    "token transport to %s: unknown frame kind %d; closing", self.endpoint, kind
                )
                self.close()  # connection_lost fails every open stream UNAVAILABLE
                return
            stream = streams.get(stream_id)
            if stream is None:
                continue  # a stream we cancelled: its last frames are dropped
            if kind != CHUNK:
                del streams[stream_id]  # PREFILL_OK, ERROR and END end a stream
            stream.push(kind, payload)

    # --- calls ---------------------------------------------------------------------------------
    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def open(self, kind: int, message: bytes, metadata: bytes, timeout: float | None) -> int:
        """Send a request frame; returns its stream id."""
        if self.transport is None or self.closed:
            raise TokenRpcError(
                grpc.StatusCode.UNAVAILABLE, f"connection to worker {self.endpoint} is closed"
            )
        stream_id = self._next_id
        while stream_id > MAX_STREAM_ID or stream_id in self.streams:  # u32 ids wrap around
            stream_id = 1 if stream_id > MAX_STREAM_ID else stream_id + 1
        self._next_id = stream_id + 1
        stream = _Stream()
        if timeout is not None:
            loop = asyncio.get_running_loop()
            stream.timer = loop.call_later(timeout, self._expire, stream_id, timeout)
        self.streams[stream_id] = stream
        self._write(frame(kind, stream_id, metadata + message))
        return stream_id

    def _write(self, data: bytes) -> None:
        if not self._out:
            asyncio.get_running_loop().call_soon(self._flush)
        self._out.append(data)

    def _flush(self) -> None:
        out, self._out = self._out, []
        if self.transport is not None and out:
            self.transport.write(b"".join(out) if len(out) > 1 else out[0])

    def _expire(self, stream_id: int, timeout: float) -> None:
        stream = self.streams.get(stream_id)
        if stream is None:
            return
        self.cancel(stream_id)
        stream.fail(TokenRpcError(grpc.StatusCode.DEADLINE_EXCEEDED, f"deadline of {timeout}s"))

    def cancel(self, stream_id: int) -> None:
        """Tell the worker to stop ``stream_id`` (no-op once it ended)."""
        if self.streams.pop(stream_id, None) is not None and self.transport is not None:
            self._write(frame(CANCEL, stream_id))

    async def next(self, stream_id: int, stream: _Stream) -> tuple[int, bytes]:
        """The stream's next frame; TokenRpcError when it failed (ERROR, deadline, lost)."""
        while not stream.frames:
            if stream.failure is not None:
                raise stream.failure
            stream.waiter = asyncio.get_running_loop().create_future()
            try:
                await stream.waiter
            finally:
                stream.waiter = None
        kind, payload = stream.frames.popleft()
        if kind == ERROR:
            raise TokenRpcError(*decode_error(payload))
        return kind, payload


def _done(stream: _Stream) -> None:
    if stream.timer is not None:
        stream.timer.cancel()
        stream.timer = None


class TokenClients:
    """One ``TokenConnection`` per worker token endpoint (``host:port``), made on first use."""

    def __init__(self, *, connect_timeout_s: float = CONNECT_TIMEOUT_S) -> None:
        self.connect_timeout_s = connect_timeout_s
        self._conns: dict[str, TokenConnection] = {}
        self._connecting: dict[str, asyncio.Task[TokenConnection]] = {}

    async def connection(self, endpoint: str) -> TokenConnection:
        conn = self._conns.get(endpoint)
        if conn is not None and not conn.closed:
            return conn
        task = self._connecting.get(endpoint)
        if task is None:
            # its own task: a caller cancelled while waiting (its client left) cancels only
            # its own wait, not the connect the other callers share
            task = asyncio.get_running_loop().create_task(self._connect(endpoint))
            self._connecting[endpoint] = task
            task.add_done_callback(functools.partial(self._connected, endpoint))
        return await asyncio.shield(task)

    def _connected(self, endpoint: str, task: asyncio.Task[TokenConnection]) -> None:
        if self._connecting.get(endpoint) is task:
            del self._connecting[endpoint]
        if not task.cancelled() and task.exception() is None:
            self._conns[endpoint] = task.result()

    async def _connect(self, endpoint: str) -> TokenConnection:
        host, _, port = endpoint.rpartition(":")
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                _, conn = await loop.create_connection(
                    lambda: TokenConnection(endpoint), host.strip("[]"), int(port)
                )
        except (OSError, TimeoutError, ValueError) as e:
            raise TokenRpcError(
                grpc.StatusCode.UNAVAILABLE, f"cannot connect to worker {endpoint}: {e!r}"
            ) from None
        return conn

    async def _open(
        self,
        endpoint: str,
        kind: int,
        request: Message,
        deadline_s: float | None,
        metadata: Iterable[tuple[str, str]] | None,
    ) -> tuple[TokenConnection, int, _Stream]:
        """Send ``request`` as a new stream on ``endpoint``'s connection."""
        conn = await self.connection(endpoint)
        stream_id = conn.open(
            kind, request.SerializeToString(), encode_metadata(metadata), deadline_s
        )
        return conn, stream_id, conn.streams[stream_id]

    async def prefill(
        self,
        endpoint: str,
        request: worker_pb2.PrefillRequest,
        *,
        deadline_s: float | None = None,
        metadata: Iterable[tuple[str, str]] | None = None,
    ) -> worker_pb2.PrefillResponse:
        conn, stream_id, stream = await self._open(endpoint, PREFILL, request, deadline_s, metadata)
        try:
            kind, payload = await conn.next(stream_id, stream)
        except asyncio.CancelledError:
            conn.cancel(stream_id)
            raise
        finally:
            _done(stream)
        if kind != PREFILL_OK:
            conn.cancel(stream_id)  # a CHUNK does not end a stream: forget it, stop the worker
            raise TokenRpcError(grpc.StatusCode.INTERNAL, f"unexpected frame {kind} to Prefill")
        return worker_pb2.PrefillResponse.FromString(payload)

    async def decode(
        self,
        endpoint: str,
        request: worker_pb2.DecodeRequest,
        *,
        deadline_s: float | None = None,
        metadata: Iterable[tuple[str, str]] | None = None,
    ) -> AsyncGenerator[worker_pb2.DecodeChunk, None]:
        """The decode stream's chunks; stopping early (``aclose``, cancellation) cancels it
        on the worker. Ends after the chunk with a finish reason, or without one on END."""
        conn, stream_id, stream = await self._open(endpoint, DECODE, request, deadline_s, metadata)
        finished = False
        try:
            while True:
                kind, payload = await conn.next(stream_id, stream)
                if kind == END:
                    finished = True
                    return
                if kind != CHUNK:
                    raise TokenRpcError(
                        grpc.StatusCode.INTERNAL, f"unexpected frame {kind} to Decode"
                    )
                chunk = worker_pb2.DecodeChunk.FromString(payload)
                if chunk.finish_reason:
                    finished = True
                    conn.streams.pop(stream_id, None)  # the last chunk ends it, as END does
                    _done(stream)  # a caller that stops reading here leaves nothing pending
                yield chunk
                if finished:
                    return
        except TokenRpcError:
            finished = True  # the worker's side is over (or was cancelled by the deadline)
            raise
        finally:
            _done(stream)
            if not finished:
                conn.cancel(stream_id)

    async def drop(self, endpoint: str) -> None:
        conn = self._conns.pop(endpoint, None)
        if conn is not None:
            conn.close()

    async def close(self) -> None:
        for task in list(self._connecting.values()):
            task.cancel()
        for conn in self._conns.values():
            conn.close()
        self._conns.clear()
