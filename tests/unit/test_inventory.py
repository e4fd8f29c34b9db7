"""Declared inventories and NVLink domain grouping (NVML itself needs a GPU: see tests/gpu)."""

from __future__ import annotations

from pathlib import Path

import pytest

from controlplane.core.model import GIB
from controlplane.errors import InvalidArgument
from controlplane.nodeagent.inventory import (
    DeclaredGpus,
    declared_from_mapping,
    declared_gpus,
    load_declared,
    nvlink_domains,
)


def test_declared_gpus_split_into_nvlink_domains() -> None:
    gpus = declared_gpus(
        DeclaredGpus(count=8, model="H200", memory_gib=141, used_gib=1, nvlink_domain_size=4), "n1"
    )
    assert [g.index for g in gpus] == list(range(8))
    assert {g.nvlink_domain for g in gpus[:4]} == {"n1/nvl0"}
    assert {g.nvlink_domain for g in gpus[4:]} == {"n1/nvl1"}
    assert gpus[0].memory_total_bytes == 141 * GIB
    assert gpus[0].memory_free_bytes == 140 * GIB
    assert len({g.uuid for g in gpus}) == 8


def test_declared_used_more_than_total_is_rejected() -> None:
    with pytest.raises(InvalidArgument, match="used_gib"):
        declared_gpus(DeclaredGpus(count=1, memory_gib=10, used_gib=11), "n1")


def test_inventory_file(tmp_path: Path) -> None:
    path = tmp_path / "node.yaml"
    path.write_text(
        "node_id: gpu-7\nlabels: {zone: a, rack: r3}\n"
        "gpus: {count: 2, model: NVIDIA A100-SXM4-80GB, memory_gib: 80}\n"
    )
    decl = load_declared(path)
    assert decl.node_id == "gpu-7" and decl.labels == {"zone": "a", "rack": "r3"}
    assert decl.gpus.count == 2


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({"gpus": {"count": -1}}, "gpus.count"),
        ({"gpus": {"memory_gib": 0}}, "gpus.memory_gib"),
        ({"gpus": {"cuont": 2}}, "gpus.cuont"),
        ({"nodeid": "x"}, "nodeid"),
    ],
)
def test_inventory_errors_name_the_field(doc: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        declared_from_mapping(doc)


def test_unreadable_inventory_file(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="inventory file"):
        load_declared(tmp_path / "missing.yaml")


@pytest.mark.parametrize(
    ("n", "links", "expected"),
    [
        (4, {}, ["h/nvl0", "h/nvl1", "h/nvl2", "h/nvl3"]),  # no NVLink: each GPU alone
        (4, {0: {1}, 2: {3}}, ["h/nvl0", "h/nvl0", "h/nvl1", "h/nvl1"]),  # two pairs
        (4, {0: {1}, 1: {2}, 2: {3}}, ["h/nvl0"] * 4),  # a chain is one domain
        (8, {i: set(range(8)) - {i} for i in range(8)}, ["h/nvl0"] * 8),  # NVSwitch fabric
        (2, {0: {5}}, ["h/nvl0", "h/nvl1"]),  # links to unknown devices are ignored
    ],
)
def test_nvlink_domains(n: int, links: dict[int, set[int]], expected: list[str]) -> None:
    assert nvlink_domains(n, links, "h") == expected
