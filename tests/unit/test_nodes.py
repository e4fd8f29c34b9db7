"""Pure node rules: validation, selectors, the kubectl-style table."""

from __future__ import annotations

import pytest

from controlplane.core.model import (
    GIB,
    Gpu,
    Node,
    NodeHealth,
    NodeInventory,
    NodeSchedulingStatus,
    SchedulingState,
)
from controlplane.core.nodes import (
    format_age,
    node_status,
    nodes_table,
    parse_selector,
    validate_inventory,
    validate_lease_ttl,
    validate_node_id,
)
from controlplane.errors import InvalidArgument


def gpu(index: int = 0, total: int = 80 * GIB, free: int | None = None, **kw: object) -> Gpu:
    return Gpu(
        index=index,
        model="H100",
        memory_total_bytes=total,
        memory_free_bytes=total if free is None else free,
        **kw,  # type: ignore[arg-type]
    )


@pytest.mark.parametrize("node_id", ["a", "gpu-node-1", "rack3.node7", "0abc9"])
def test_valid_node_ids(node_id: str) -> None:
    assert validate_node_id(node_id) == node_id


@pytest.mark.parametrize(
    ("node_id", "message"),
    [
        ("", "node_id is empty"),
        ("Upper", "lowercase"),
        ("-lead", "starting and ending"),
        ("trail-", "starting and ending"),
        ("has space", "lowercase"),
        ("x" * 64, "longer than 63"),
        ("a/b", "lowercase"),
    ],
)
def test_invalid_node_ids(node_id: str, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        validate_node_id(node_id)


@pytest.mark.parametrize(
    ("gpus", "message"),
    [
        ((gpu(total=-1),), r"gpus\[0\].memory_total_bytes must be > 0, got -1"),
        ((gpu(total=0),), "memory_total_bytes must be > 0"),
        ((gpu(free=-5),), r"memory_free_bytes must be >= 0, got -5"),
        ((gpu(total=GIB, free=2 * GIB),), "exceeds memory_total_bytes"),
        ((gpu(0), gpu(0)), "duplicate GPU index 0"),
        ((gpu(-1),), "index is negative"),
        ((Gpu(index=0, model="", memory_total_bytes=1, memory_free_bytes=1),), "model is empty"),
    ],
)
def test_invalid_inventories_name_the_field(gpus: tuple[Gpu, ...], message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        validate_inventory(NodeInventory(node_id="n1", gpus=gpus))


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        ({"": "x"}, "name must be"),
        ({"bad key": "x"}, "name must be"),
        ({"Example.COM/zone": "a"}, "prefix must be a DNS subdomain"),
        ({"zone": "a b"}, "value must be"),
        ({"zone": "x" * 64}, "value must be"),
    ],
)
def test_invalid_labels(labels: dict[str, str], message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        validate_inventory(NodeInventory(node_id="n1", labels=labels))


def test_valid_inventory_with_prefixed_labels() -> None:
    inv = NodeInventory(
        node_id="n1", gpus=(gpu(0), gpu(1)), labels={"topology.example.com/rack": "r1", "gpu": ""}
    )
    assert validate_inventory(inv) is inv


@pytest.mark.parametrize("ttl", [1, 0, -3, 301])
def test_lease_ttl_bounds(ttl: int) -> None:
    with pytest.raises(InvalidArgument, match="lease TTL"):
        validate_lease_ttl(ttl)


@pytest.mark.parametrize(
    ("selector", "labels", "expected"),
    [
        ("", {}, True),
        ("zone=a", {"zone": "a"}, True),
        ("zone==a", {"zone": "a"}, True),
        ("zone=a", {"zone": "b"}, False),
        ("zone=a", {}, False),
        ("zone!=a", {}, True),  # absent keys match !=, as in Kubernetes
        ("zone!=a", {"zone": "a"}, False),
        ("gpu", {"gpu": ""}, True),
        ("gpu", {}, False),
        ("!spot", {}, True),
        ("!spot", {"spot": "true"}, False),
        (" zone = a , rack!=r2 ", {"zone": "a", "rack": "r1"}, True),
        ("zone=a,rack!=r2", {"zone": "a", "rack": "r2"}, False),
    ],
)
def test_selector_matching(selector: str, labels: dict[str, str], expected: bool) -> None:
    assert parse_selector(selector).matches(labels) is expected


@pytest.mark.parametrize(
    ("selector", "message"),
    [
        ("zone=a,,rack=b", "term 2 is empty"),
        ("a=b=c", "contains '=' or '!'"),
        ("=a", "name must be"),
        ("zo ne=a", "name must be"),
        ("!", "name must be"),
        (",", "term 1 is empty"),
    ],
)
def test_selector_errors(selector: str, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        parse_selector(selector)


def node(
    node_id: str = "n1",
    gpus: tuple[Gpu, ...] = (),
    state: SchedulingState = SchedulingState.SCHEDULABLE,
    **kw: object,
) -> Node:
    return Node(
        inventory=NodeInventory(node_id=node_id, gpus=gpus, **kw),  # type: ignore[arg-type]
        scheduling=NodeSchedulingStatus(state=state),
    )


def test_health_and_status_column() -> None:
    healthy = node(gpus=(gpu(0), gpu(1)))
    degraded = node(gpus=(gpu(0), gpu(1, healthy=False)))
    dead = node(gpus=(gpu(0, healthy=False),))
    assert healthy.inventory.health is NodeHealth.HEALTHY
    assert degraded.inventory.health is NodeHealth.DEGRADED
    assert dead.inventory.health is NodeHealth.UNHEALTHY
    assert node_status(healthy) == "Ready"
    assert node_status(degraded) == "Degraded"
    assert node_status(dead) == "NotReady"
    assert not dead.schedulable
    cordoned = node(gpus=(gpu(0),), state=SchedulingState.CORDONED)
    assert node_status(cordoned) == "Ready,SchedulingDisabled"
    assert not cordoned.schedulable
    draining = node(gpus=(gpu(0),), state=SchedulingState.DRAINING)
    assert node_status(draining) == "Ready,SchedulingDisabled,Draining"


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0s"),
        (59, "59s"),
        (119, "119s"),
        (192, "3m12s"),
        (600, "10m"),
        (3 * 3600 + 240, "3h4m"),
        (20 * 3600, "20h"),
        (5 * 86400, "5d"),
        (-3, "0s"),
    ],
)
def test_format_age(seconds: float, text: str) -> None:
    assert format_age(seconds) == text


def test_nodes_table_like_kubectl() -> None:
    a = node(
        "b-node",
        gpus=(gpu(0, free=40 * GIB), gpu(1, healthy=False)),
        labels={"zone": "a", "rack": "r1"},
        registered_at=1000.0,
    )
    b = node("a-node", gpus=(), registered_at=1090.0, state=SchedulingState.CORDONED)
    lines = nodes_table([a, b], now=1100.0).splitlines()
    assert lines[0].split() == ["NAME", "STATUS", "GPUS", "FREE", "MEM", "LABELS", "AGE"]
    assert lines[1].split() == [
        "a-node",
        "Ready,SchedulingDisabled",
        "0",
        "0.0Gi/0.0Gi",
        "<none>",
        "10s",
    ]
    assert lines[2].split() == [
        "b-node",
        "Degraded",
        "1/2",
        "120Gi/160Gi",
        "rack=r1,zone=a",
        "100s",
    ]
    wide = nodes_table([a], now=1100.0, wide=True).splitlines()
    assert "GPU MODEL" in wide[0] and "H100" in wide[1]
