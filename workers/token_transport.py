"""The token transport: the request path's Prefill and Decode, gateway -> worker, as frames on
one long-lived TCP connection per (gateway, worker) instead of one gRPC call per request.

Why
---
A grpc.aio unary call from the gateway to a sim worker costs 0.61 ms at p50 on one connection
and tops out near 3.4k calls/s with 32 in flight (2-core VM, ``benchmarks/gateway_overhead.py``
notes), against 0.2 ms and 8.7k req/s for the same worker's HTTP port: the gRPC call alone
spent more than the gateway's whole latency budget. The frames below carry the same protobuf
messages (worker.proto) with the same status codes and messages; only the call machinery
goes. gRPC stays the Worker API for everything else (FetchKv, Abort, Stats, WatchStats, the
health service) and for clients that do not speak this transport: a worker record without a
``token_endpoint``, or a gateway started with ``--worker-transport grpc``, uses gRPC's
``Prefill`` / ``Decode`` as before.

Wire format
-----------
The client opens with the 4 bytes ``MAGIC``; then both sides send frames::

    u32 payload length | u8 kind | u32 stream id | payload      (big endian, 9-byte header)

Stream ids are the client's (unique among a connection's open streams; they wrap at 2^32).
Client -> worker:

- ``PREFILL``: metadata block + ``PrefillRequest``; answered by one ``PREFILL_OK``
  (``PrefillResponse``) or one ``ERROR``.
- ``DECODE``: metadata block + ``DecodeRequest``; answered by ``CHUNK`` frames
  (``DecodeChunk``), the last with a finish reason, or ended early by ``ERROR`` / ``END``
  (the engine's stream ended without a finish reason).
- ``CANCEL`` (empty): the client gave up on the stream (deadline, disconnect, stop id): the
  worker cancels it (its engine request is aborted, its KV freed) and sends nothing more.

The metadata block is a u16 length and UTF-8 ``key=value`` lines (the W3C trace context, as
gRPC metadata carries it). ``ERROR`` is a u8 gRPC status code number and a UTF-8 message.
A frame longer than ``MAX_FRAME_BYTES``, an unknown kind or a bad magic closes the connection;
every stream open on a lost connection fails UNAVAILABLE on the client, which connects again
on its next call.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import struct
from collections.abc import Iterable
from typing import Any, TypeVar, cast

import grpc
from google.protobuf.message import DecodeError, Message
from switchboard.v1 import worker_pb2

from controlplane.adapters.grpc.errors import error_status
from controlplane.errors import InvalidArgument

log = logging.getLogger(__name__)

MAGIC = b"SBT1"
HEADER = struct.Struct("!IBI")
ERROR_CODE = struct.Struct("!B")
META_LEN = struct.Struct("!H")
MAX_FRAME_BYTES = 64 << 20
"""A DecodeRequest carries the prompt's token ids: 16M tokens at 4 bytes each."""

MAX_COALESCED_FRAMES = 64
"""Frames held for one write at most; more go out at once."""

# client -> worker
PREFILL = 1
DECODE = 2
CANCEL = 3
# worker -> client
PREFILL_OK = 16
CHUNK = 17
ERROR = 18
END = 19

_CODES: dict[int, grpc.StatusCode] = {code.value[0]: code for code in grpc.StatusCode}

Metadata = tuple[tuple[str, str], ...]


class ProtocolError(Exception):
    """The peer broke the wire format; the connection is closed."""


def frame(kind: int, stream_id: int, payload: bytes = b"") -> bytes:
    return HEADER.pack(len(payload), kind, stream_id) + payload


def encode_metadata(metadata: Iterable[tuple[str, str]] | None) -> bytes:
    """The metadata block: u16 length + ``key=value`` lines."""
    if not metadata:
        return b"\x00\x00"
    for k, v in metadata:
        if "=" in k or "\n" in k or "\n" in v:
            raise ValueError(f"metadata {k!r}: no '=' in keys, no newline anywhere")
    text = "\n".join(f"{k}={v}" for k, v in metadata).encode()
    if len(text) > 0xFFFF:
        raise ValueError("metadata longer than 65535 bytes")
    return META_LEN.pack(len(text)) + text


def decode_metadata(payload: bytes) -> tuple[Metadata, int]:
    """The metadata block at the start of ``payload`` and where the message starts
    (ProtocolError when it is cut short)."""
    if len(payload) < 2:
        raise ProtocolError("request frame without a metadata block")
    (n,) = META_LEN.unpack_from(payload)
    if n == 0:
        return (), 2
    if len(payload) < 2 + n:
        raise ProtocolError("metadata block longer than its frame")
    pairs = []
    for line in payload[2 : 2 + n].decode(errors="replace").split("\n"):
        key, _, value = line.partition("=")
        pairs.append((key, value))
    return tuple(pairs), 2 + n


def encode_error(code: grpc.StatusCode, message: str) -> bytes:
    return ERROR_CODE.pack(code.value[0]) + message.encode()


def decode_error(payload: bytes) -> tuple[grpc.StatusCode, str]:
    if not payload:
        return grpc.StatusCode.UNKNOWN, "error frame without a code"
    code = _CODES.get(payload[0], grpc.StatusCode.UNKNOWN)
    return code, payload[1:].decode(errors="replace")


class FrameReader:
    """Splits a byte stream into (kind, stream id, payload) frames."""

    __slots__ = ("_buf", "max_frame_bytes")

    def __init__(self, max_frame_bytes: int = MAX_FRAME_BYTES) -> None:
        self._buf = bytearray()
        self.max_frame_bytes = max_frame_bytes

    def feed(self, data: bytes) -> list[tuple[int, int, bytes]]:
        """The frames completed by ``data`` (ProtocolError on an oversized frame)."""
        buf = self._buf
        buf += data
        out: list[tuple[int, int, bytes]] = []
        pos, size = 0, len(buf)
        while size - pos >= HEADER.size:
            length, kind, stream_id = HEADER.unpack_from(buf, pos)
            if length > self.max_frame_bytes:
                raise ProtocolError(f"frame of {length} bytes (limit {self.max_frame_bytes})")
            end = pos + HEADER.size + length
            if end > size:
                break
            out.append((kind, stream_id, bytes(buf[pos + HEADER.size : end])))
            pos = end
        if pos:
            del buf[:pos]
        return out


class _Context:
    """What the Worker service reads of a call's context: its metadata."""

    __slots__ = ("_metadata",)

    def __init__(self, metadata: Metadata) -> None:
        self._metadata = metadata

    def invocation_metadata(self) -> Metadata:
        return self._metadata


class _ServerConnection(asyncio.Protocol):
    """One gateway's connection: each request frame runs as a task on the Worker service."""

    def __init__(self, server: TokenServer) -> None:
        self.server = server
        self.reader = FrameReader(server.max_frame_bytes)
        self.transport: asyncio.Transport | None = None
        self.greeted = False
        self.pending = b""
        self.tasks: dict[int, asyncio.Task[None]] = {}
        self.writable = asyncio.Event()
        self.writable.set()
        self.out: list[bytes] = []
        """Frames written this event-loop turn, sent together (one syscall) by ``flush``."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.server.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)
        self.writable.set()
        for task in self.tasks.values():
            task.cancel()  # the service's finally blocks abort the engine requests
        self.transport = None

    def pause_writing(self) -> None:
        self.writable.clear()

    def resume_writing(self) -> None:
        self.writable.set()

    def data_received(self, data: bytes) -> None:
        if not self.greeted:
            data = self.pending + data
            if len(data) < len(MAGIC):
                self.pending = data
                return
            if data[: len(MAGIC)] != MAGIC:
                log.warning("token transport: a client sent no %r greeting; closing", MAGIC)
                self._close()
                return
            self.greeted, self.pending, data = True, b"", data[len(MAGIC) :]
        try:
            frames = self.reader.feed(data)
            for kind, stream_id, payload in frames:
                self._dispatch(kind, stream_id, payload)
        except ProtocolError as e:
            log.warning("token transport: %s; closing the connection", e)
            self._close()

    def _close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def _dispatch(self, kind: int, stream_id: int, payload: bytes) -> None:
        if kind == CANCEL:
            task = self.tasks.pop(stream_id, None)
            if task is not None:
                task.cancel()
            return
        if kind not in (PREFILL, DECODE):
            raise ProtocolError(f"unknown frame kind {kind}")
        if stream_id in self.tasks:
            raise ProtocolError(f"stream {stream_id} is already open")
        run = self._prefill if kind == PREFILL else self._decode
        task = asyncio.get_running_loop().create_task(run(stream_id, payload))
        self.tasks[stream_id] = task
        task.add_done_callback(functools.partial(self._forget, stream_id))

    def _forget(self, stream_id: int, _task: asyncio.Task[None]) -> None:
        self.tasks.pop(stream_id, None)

    def _send(self, kind: int, stream_id: int, payload: bytes) -> None:
        if self.transport is None:
            return
        if not self.out:
            asyncio.get_running_loop().call_soon(self.flush)
        self.out.append(frame(kind, stream_id, payload))
        if len(self.out) >= MAX_COALESCED_FRAMES:
            self.flush()  # an engine yielding without a pause still meets the transport's
            # high-water mark (pause_writing), so its decode loop waits for the gateway

    def flush(self) -> None:
        out, self.out = self.out, []
        if self.transport is not None and out:
            self.transport.write(b"".join(out) if len(out) > 1 else out[0])

    def _fail(self, stream_id: int, exc: Exception, name: str) -> None:
        code, message = error_status(exc, name)
        self._send(ERROR, stream_id, encode_error(code, message))

    async def _prefill(self, stream_id: int, payload: bytes) -> None:
        try:
            request, context = _parse_request(payload, worker_pb2.PrefillRequest)
            res = await self.server.service.prefill(request, context)
        except asyncio.CancelledError:
            return  # CANCEL or the connection went away: nobody is waiting for an answer
        except Exception as e:
            self._fail(stream_id, e, "Prefill")
            return
        self._send(PREFILL_OK, stream_id, res.SerializeToString())

    async def _decode(self, stream_id: int, payload: bytes) -> None:
        try:
            request, context = _parse_request(payload, worker_pb2.DecodeRequest)
            chunks = self.server.service.decode(request, context)
            async with contextlib.aclosing(chunks):
                async for chunk in chunks:
                    self._send(CHUNK, stream_id, chunk.SerializeToString())
                    if chunk.finish_reason:
                        return
                    if not self.writable.is_set():  # the gateway reads slower than we decode
                        await self.writable.wait()
            self._send(END, stream_id, b"")
        except asyncio.CancelledError:
            return
        except Exception as e:
            self._fail(stream_id, e, "Decode")


class _Malformed(InvalidArgument):
    def __init__(self, message: str) -> None:
        super().__init__(f"malformed {message}")


RequestT = TypeVar("RequestT", bound=Message)


def _parse_request(payload: bytes, message: type[RequestT]) -> tuple[RequestT, _Context]:
    """A request frame's message and metadata; a bad block or message is the request's fault
    (INVALID_ARGUMENT, answered on its stream)."""
    try:
        metadata, start = decode_metadata(payload)
    except ProtocolError as e:
        raise _Malformed(f"request frame: {e}") from None
    try:
        return message.FromString(payload[start:]), _Context(metadata)
    except DecodeError:
        raise _Malformed(message.DESCRIPTOR.name) from None


class TokenServer:
    """Serves a Worker service's ``prefill`` / ``decode`` over the token transport.

    ``service``: anything with ``prefill(request, context)`` and ``decode(request, context)``
    as ``WorkerService`` has them (domain errors raised; see workers/service.py)."""

    def __init__(self, service: Any, *, max_frame_bytes: int = MAX_FRAME_BYTES) -> None:
        self.service = service
        self.max_frame_bytes = max_frame_bytes
        self.connections: set[_ServerConnection] = set()
        self._server: asyncio.Server | None = None

    async def start(self, host: str, port: int = 0) -> int:
        """Listen on ``host:port`` (0: any free port); returns the port."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _ServerConnection(self), host, port, reuse_address=True, backlog=1024
        )
        return int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        """Stop listening and close every connection (their open streams are cancelled)."""
        if self._server is not None:
            self._server.close()
        for conn in list(self.connections):
            conn._close()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)
            self._server = None
