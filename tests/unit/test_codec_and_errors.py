"""etcd record codec round trips; the one error table."""

from __future__ import annotations

import grpc
import pytest

from controlplane.adapters.etcd.client import LeaseNotFound, parse_endpoint, prefix_range_end
from controlplane.adapters.etcd.codec import (
    decode_inventory,
    decode_scheduling,
    encode_inventory,
    encode_scheduling,
)
from controlplane.adapters.grpc.errors import status_for
from controlplane.core.model import GIB, Gpu, NodeInventory, NodeSchedulingStatus, SchedulingState
from controlplane.errors import (
    AlreadyExists,
    Conflict,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    NotLeader,
    Unavailable,
)


def test_inventory_round_trip() -> None:
    inv = NodeInventory(
        node_id="n1",
        gpus=(Gpu(0, "H100", 80 * GIB, 70 * GIB, uuid="GPU-1", nvlink_domain="n1/nvl0"),),
        labels={"zone": "a"},
        hostname="h",
        address="10.0.0.1",
        ray_node_id="abc",
        agent_version="0.1.0",
        registered_at=12.5,
        last_heartbeat=13.5,
    )
    assert decode_inventory(encode_inventory(inv)) == inv


def test_scheduling_round_trip() -> None:
    st = NodeSchedulingStatus(state=SchedulingState.DRAINING, reason="swap PSU", since=3.0)
    assert decode_scheduling(encode_scheduling(st)) == st


@pytest.mark.parametrize("raw", [b"", b"{", b"[]", b'{"gpus": [{}]}'])
def test_malformed_records_raise_invalid_argument(raw: bytes) -> None:
    with pytest.raises(InvalidArgument, match="malformed"):
        decode_inventory(raw)


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (InvalidArgument("x"), grpc.StatusCode.INVALID_ARGUMENT),
        (NotFound("x"), grpc.StatusCode.NOT_FOUND),
        (LeaseNotFound("x"), grpc.StatusCode.NOT_FOUND),
        (AlreadyExists("x"), grpc.StatusCode.ALREADY_EXISTS),
        (Conflict("x"), grpc.StatusCode.ABORTED),
        (FailedPrecondition("x"), grpc.StatusCode.FAILED_PRECONDITION),
        (NotLeader("x"), grpc.StatusCode.UNAVAILABLE),
        (Unavailable("x"), grpc.StatusCode.UNAVAILABLE),
        (RuntimeError("x"), grpc.StatusCode.INTERNAL),
    ],
)
def test_status_table(error: Exception, code: grpc.StatusCode) -> None:
    assert status_for(error) is code


@pytest.mark.parametrize(
    ("endpoint", "parsed"),
    [("127.0.0.1:2379", ("127.0.0.1", 2379)), ("http://etcd:2379/", ("etcd", 2379))],
)
def test_parse_endpoint(endpoint: str, parsed: tuple[str, int]) -> None:
    assert parse_endpoint(endpoint) == parsed


@pytest.mark.parametrize("endpoint", ["etcd", "etcd:", ":2379", "etcd:port"])
def test_parse_endpoint_rejects(endpoint: str) -> None:
    with pytest.raises(ValueError, match="not host:port"):
        parse_endpoint(endpoint)


def test_prefix_range_end() -> None:
    assert prefix_range_end(b"/a/") == b"/a0"
    assert prefix_range_end(b"a\xff") == b"b"
    assert prefix_range_end(b"\xff") == b"\0"
