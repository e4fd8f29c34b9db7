"""The token transport's wire format, pure: frames, the frame reader, metadata blocks, error
payloads (workers/token_transport.py), and how the request path reads its errors."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from controlplane.errors import InvalidArgument, Unavailable
from controlplane.gateway.pipeline import WorkerFailed, _translate
from controlplane.gateway.token_client import TokenRpcError
from workers.engine import KvUnavailable
from workers.token_transport import (
    CANCEL,
    CHUNK,
    DECODE,
    END,
    ERROR,
    HEADER,
    PREFILL,
    PREFILL_OK,
    FrameReader,
    ProtocolError,
    decode_error,
    decode_metadata,
    encode_error,
    encode_metadata,
    frame,
)

# (kind, stream id, payload): every kind, empty and large payloads, the largest stream id
FRAMES = [
    (PREFILL, 1, b"\x00\x00prefill-request"),
    (DECODE, 2, b"\x00\x00"),
    (CANCEL, 2, b""),
    (PREFILL_OK, 1, bytes(range(256)) * 5),
    (CHUNK, 3, b"\x09\x00\x00\x00\x09"),  # bytes that look like a header
    (ERROR, 0xFFFFFFFF, b"\x0eworker is draining"),
    (END, 0, b""),
]
WIRE = b"".join(frame(*f) for f in FRAMES)


def feed_in_pieces(reader: FrameReader, data: bytes, size: int) -> list[tuple[int, int, bytes]]:
    out: list[tuple[int, int, bytes]] = []
    for start in range(0, len(data), size):
        out.extend(reader.feed(data[start : start + size]))
    return out


def test_frame_header_is_length_kind_stream_id_big_endian() -> None:
    assert HEADER.size == 9
    assert frame(CHUNK, 5, b"ab") == b"\x00\x00\x00\x02\x11\x00\x00\x00\x05ab"
    assert frame(CANCEL, 0x01020304) == b"\x00\x00\x00\x00\x03\x01\x02\x03\x04"


@pytest.mark.parametrize("size", [1, 2, 5, 9, 10, 64, 1000, len(WIRE)])
def test_frame_reader_splits_the_same_frames_however_the_bytes_arrive(size: int) -> None:
    assert feed_in_pieces(FrameReader(), WIRE, size) == FRAMES


def test_frame_reader_keeps_a_partial_frame_until_it_completes() -> None:
    reader = FrameReader()
    one = frame(CHUNK, 7, b"payload")
    assert reader.feed(one[:4]) == []  # part of the header
    assert reader.feed(one[4:12]) == []  # the header and part of the payload
    assert reader.feed(one[12:] + one[:3]) == [(CHUNK, 7, b"payload")]  # and the next begins
    assert reader.feed(one[3:]) == [(CHUNK, 7, b"payload")]
    assert reader.feed(b"") == []


@pytest.mark.parametrize(
    ("payload_len", "data", "fails"),
    [
        (16, "whole", False),  # exactly the limit
        (17, "whole", True),
        (17, "header", True),  # refused from its header alone, before the payload comes
        (0xFFFFFFFF, "header", True),
    ],
)
def test_a_frame_over_max_frame_bytes_is_a_protocol_error(
    payload_len: int, data: str, fails: bool
) -> None:
    reader = FrameReader(max_frame_bytes=16)
    wire = HEADER.pack(payload_len, DECODE, 1)
    if data == "whole":
        wire += b"x" * payload_len
    if fails:
        with pytest.raises(ProtocolError, match=f"frame of {payload_len} bytes"):
            reader.feed(wire)
    else:
        assert reader.feed(wire) == [(DECODE, 1, b"x" * payload_len)]


TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


@pytest.mark.parametrize(
    "metadata",
    [
        (),
        (("traceparent", TRACEPARENT),),
        (("traceparent", TRACEPARENT), ("tracestate", "rojo=00f067aa0ba902b7,congo=t61rcWkgMzE")),
        (("k", "a=b=c"), ("empty", ""), ("unicode", "naïve ✓")),
    ],
    ids=["empty", "traceparent", "traceparent+tracestate", "equals-empty-unicode"],
)
def test_metadata_block_round_trip(metadata: tuple[tuple[str, str], ...]) -> None:
    block = encode_metadata(metadata)
    assert int.from_bytes(block[:2], "big") == len(block) - 2
    assert decode_metadata(block + b"MESSAGE") == (metadata, len(block))
    assert decode_metadata(block) == (metadata, len(block))  # no message after it


def test_no_metadata_is_an_empty_block() -> None:
    assert encode_metadata(None) == encode_metadata([]) == b"\x00\x00"
    assert decode_metadata(b"\x00\x00msg") == ((), 2)


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"", "without a metadata block"),
        (b"\x00", "without a metadata block"),
        (b"\x00\x05k=v", "longer than its frame"),
    ],
)
def test_a_bad_metadata_block_is_a_protocol_error(payload: bytes, message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        decode_metadata(payload)


def test_metadata_longer_than_its_length_field_is_refused() -> None:
    with pytest.raises(ValueError, match="65535"):
        encode_metadata([("k", "v" * 0xFFFF)])


@pytest.mark.parametrize("code", list(grpc.StatusCode), ids=lambda c: c.name)
@pytest.mark.parametrize("message", ["", "worker w1 is draining; send new work elsewhere", "ü ✓"])
def test_error_round_trip(code: grpc.StatusCode, message: str) -> None:
    payload = encode_error(code, message)
    assert payload[0] == code.value[0]  # the gRPC status number, one byte
    assert decode_error(payload) == (code, message)


@pytest.mark.parametrize(
    ("payload", "decoded"),
    [
        (b"\x0eno route", (grpc.StatusCode.UNAVAILABLE, "no route")),
        (b"\x04", (grpc.StatusCode.DEADLINE_EXCEEDED, "")),
        (bytes([17]) + b"boom", (grpc.StatusCode.UNKNOWN, "boom")),  # past the last code
        (bytes([200]) + b"boom", (grpc.StatusCode.UNKNOWN, "boom")),
        (b"", (grpc.StatusCode.UNKNOWN, "error frame without a code")),
        (b"\x03\xff\xfebad utf-8", (grpc.StatusCode.INVALID_ARGUMENT, "\ufffd\ufffdbad utf-8")),
    ],
    ids=["unavailable", "code-only", "unknown-17", "unknown-200", "empty", "bad-utf8"],
)
def test_decode_error_payloads(payload: bytes, decoded: tuple[grpc.StatusCode, str]) -> None:
    assert decode_error(payload) == decoded


def test_token_rpc_error_answers_like_a_grpc_error() -> None:
    e = TokenRpcError(grpc.StatusCode.NOT_FOUND, "KV kv-1 not held")
    assert e.code() is grpc.StatusCode.NOT_FOUND
    assert e.details() == "KV kv-1 not held"
    assert str(e) == "NOT_FOUND: KV kv-1 not held"


@pytest.mark.parametrize(
    ("code", "kind", "timed_out"),
    [
        (grpc.StatusCode.UNAVAILABLE, WorkerFailed, False),
        (grpc.StatusCode.CANCELLED, WorkerFailed, False),
        (grpc.StatusCode.INTERNAL, WorkerFailed, False),
        (grpc.StatusCode.DEADLINE_EXCEEDED, WorkerFailed, True),
        (grpc.StatusCode.FAILED_PRECONDITION, WorkerFailed, False),
        (grpc.StatusCode.NOT_FOUND, KvUnavailable, False),
        (grpc.StatusCode.INVALID_ARGUMENT, InvalidArgument, False),
        (grpc.StatusCode.PERMISSION_DENIED, Unavailable, False),
    ],
    ids=lambda v: v.name if isinstance(v, grpc.StatusCode) else None,
)
def test_the_request_path_reads_token_errors_as_grpc_errors(
    code: grpc.StatusCode, kind: type[Exception], timed_out: bool
) -> None:
    e = _translate(TokenRpcError(code, "the details"), "w1")
    assert type(e) is kind
    assert "the details" in str(e)
    if isinstance(e, WorkerFailed):
        assert e.worker_id == "w1"
        assert e.timed_out is timed_out


@pytest.mark.parametrize(
    "pair",
    [("k=ey", "v"), ("key\n", "v"), ("key", "line\nbreak")],
    ids=["equals-in-key", "newline-in-key", "newline-in-value"],
)
def test_metadata_that_would_not_parse_back_is_refused(pair: tuple[str, str]) -> None:
    with pytest.raises(ValueError, match="newline"):
        encode_metadata([pair])


def test_stream_ids_wrap_at_32_bits_and_skip_open_ones() -> None:
    from controlplane.gateway.token_client import MAX_STREAM_ID, TokenConnection

    class Sink:
        def __init__(self) -> None:
            self.data = b""

        def write(self, data: bytes) -> None:
            self.data += data

    async def run() -> list[int]:
        conn = TokenConnection("127.0.0.1:1")
        conn.connection_made(Sink())  # type: ignore[arg-type]
        conn._next_id = MAX_STREAM_ID
        first = conn.open(DECODE, b"", b"\x00\x00", None)
        second = conn.open(DECODE, b"", b"\x00\x00", None)  # wraps to 1
        conn._next_id = 1  # 1 is still open: the next free id is 2
        third = conn.open(DECODE, b"", b"\x00\x00", None)
        await asyncio.sleep(0)  # the coalesced frames go out
        return [first, second, third]

    assert asyncio.run(run()) == [MAX_STREAM_ID, 1, 2]
