"""The node registry end to end: real etcd, real control-plane and node-agent processes."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from switchboard.v1 import nodes_pb2

from controlplane.core.model import GIB
from controlplane.local.procs import EtcdServer
from tests.helpers import start_agent, start_controlplane, wait_until, watch_nodes

TTL = 2


def test_node_registers_with_inventory_and_vanishes_after_sigkill(
    tmp_path: Path, etcd: EtcdServer
) -> None:
    cp = start_controlplane(tmp_path, etcd.endpoint, "cp-a")
    agent = start_agent(
        tmp_path, etcd.endpoint, "gpu-node-1", gpus=4, ttl_s=TTL, labels={"zone": "a", "rack": "r1"}
    )
    try:
        with watch_nodes(cp) as watch:
            wait_until(lambda: "gpu-node-1" in cp.node_ids(), 20, what="node registered")
            (node,) = cp.list_nodes()
            assert node.labels == {"zone": "a", "rack": "r1"}
            assert len(node.gpus) == 4
            assert all(g.memory_total_bytes == 80 * GIB for g in node.gpus)
            assert {g.nvlink_domain for g in node.gpus} == {"gpu-node-1/nvl0"}
            assert node.health == nodes_pb2.NODE_HEALTH_HEALTHY
            assert node.scheduling == nodes_pb2.SCHEDULING_STATE_SCHEDULABLE
            assert node.lease_id != 0
            assert node.registered_at.seconds > 0
            wait_until(lambda: watch.of_type(nodes_pb2.NodeEvent.TYPE_ADDED), 5, what="ADDED event")

            agent.kill()  # SIGKILL: no chance to revoke the lease
            killed_at = time.monotonic()
            wait_until(lambda: "gpu-node-1" not in cp.node_ids(), TTL + 1, what="node expiry")
            gone = wait_until(
                lambda: watch.of_type(nodes_pb2.NodeEvent.TYPE_DELETED), TTL + 1, what="DELETED"
            )
            assert gone[0][1].node.node_id == "gpu-node-1"
            assert gone[0][0] - killed_at <= TTL + 1
            assert watch.error is None
    finally:
        agent.stop()
        cp.stop()


def test_graceful_agent_stop_removes_node_at_once(tmp_path: Path, etcd: EtcdServer) -> None:
    cp = start_controlplane(tmp_path, etcd.endpoint, "cp-a")
    agent = start_agent(tmp_path, etcd.endpoint, "n1", ttl_s=30)
    try:
        wait_until(lambda: "n1" in cp.node_ids(), 20, what="node registered")
        agent.stop()  # SIGTERM: the agent revokes its lease
        wait_until(lambda: "n1" not in cp.node_ids(), 5, what="node removed on revoke")
    finally:
        agent.stop()
        cp.stop()


@pytest.mark.parametrize("keep_data", [True, False], ids=["same-data", "data-lost"])
def test_agents_survive_etcd_restart(tmp_path: Path, etcd: EtcdServer, keep_data: bool) -> None:
    cp = start_controlplane(tmp_path, etcd.endpoint, "cp-a")
    agents = [start_agent(tmp_path, etcd.endpoint, f"n{i}", ttl_s=TTL) for i in range(2)]
    try:
        wait_until(lambda: cp.node_ids() == {"n0", "n1"}, 20, what="both nodes registered")
        leases_before = {n.node_id: n.lease_id for n in cp.list_nodes()}
        etcd.kill()
        time.sleep(TTL + 1)  # longer than the lease TTL
        if not keep_data:  # etcd comes back empty: leases and keys are gone
            etcd.data_dir = tmp_path / "etcd-data-2"
        etcd.start()

        def recovered() -> bool:
            status = cp.status()
            return status.cache_synced and status.node_count == 2 and cp.node_ids() == {"n0", "n1"}

        wait_until(recovered, 15, what="both nodes listed by a re-synced cache")
        # nobody restarted the agents
        assert all(a.alive() for a in agents)
        leases_after = {n.node_id: n.lease_id for n in cp.list_nodes()}
        if not keep_data:  # they registered anew, with new leases
            assert all(leases_after[n] != leases_before[n] for n in leases_before)
        # and they really hold live leases again: a SIGKILL still expires the node
        agents[0].kill()
        wait_until(lambda: cp.node_ids() == {"n1"}, TTL + 2, what="expiry after restart")
    finally:
        for a in agents:
            a.stop()
        cp.stop()


def test_exactly_one_leader_and_failover(tmp_path: Path, etcd: EtcdServer) -> None:
    leader_ttl = 2
    cps = [
        start_controlplane(tmp_path, etcd.endpoint, f"cp-{i}", leader_ttl_s=leader_ttl)
        for i in range(2)
    ]
    try:

        def one_leader() -> str:
            statuses = [cp.status() for cp in cps]
            leaders = [s.replica_id for s in statuses if s.is_leader]
            if len(leaders) == 1 and all(s.leader_id == leaders[0] for s in statuses):
                return leaders[0]
            return ""

        first = wait_until(one_leader, 10, what="a single agreed leader")
        # Stays single over a few lease periods.
        for _ in range(10):
            time.sleep(0.2)
            assert sum(cp.status().is_leader for cp in cps) == 1
        old = next(cp for cp in cps if cp.replica_id == first)
        other = next(cp for cp in cps if cp.replica_id != first)
        old.kill()
        killed = time.monotonic()
        wait_until(lambda: other.status().is_leader, 2 * leader_ttl, what="failover")
        assert time.monotonic() - killed <= 2 * leader_ttl
        assert other.status().leader_id == other.replica_id
    finally:
        for cp in cps:
            cp.stop()


def test_cordon_survives_controlplane_restart(tmp_path: Path, etcd: EtcdServer) -> None:
    cp = start_controlplane(tmp_path, etcd.endpoint, "cp-a")
    agent = start_agent(tmp_path, etcd.endpoint, "n1", ttl_s=TTL)
    try:
        wait_until(lambda: "n1" in cp.node_ids(), 20, what="node registered")
        resp = cp.nodes.CordonNode(nodes_pb2.CordonNodeRequest(node_id="n1", reason="bad fan"))
        assert resp.node.scheduling == nodes_pb2.SCHEDULING_STATE_CORDONED
        assert resp.node.scheduling_reason == "bad fan"
        cp.stop()
        cp = start_controlplane(tmp_path, etcd.endpoint, "cp-b")
        (node,) = wait_until(cp.list_nodes, 10, what="nodes listed after restart")
        assert node.scheduling == nodes_pb2.SCHEDULING_STATE_CORDONED
        assert node.scheduling_reason == "bad fan"
        # it also survives the agent re-registering
        agent.kill()
        wait_until(lambda: not cp.node_ids(), TTL + 2, what="node expired")
        agent = start_agent(tmp_path, etcd.endpoint, "n1", ttl_s=TTL)
        (node,) = wait_until(cp.list_nodes, 20, what="node re-registered")
        assert node.scheduling == nodes_pb2.SCHEDULING_STATE_CORDONED
        drained = cp.nodes.DrainNode(nodes_pb2.DrainNodeRequest(node_id="n1"))
        assert drained.node.scheduling == nodes_pb2.SCHEDULING_STATE_DRAINING
        back = cp.nodes.UncordonNode(nodes_pb2.UncordonNodeRequest(node_id="n1"))
        assert back.node.scheduling == nodes_pb2.SCHEDULING_STATE_SCHEDULABLE
    finally:
        agent.stop()
        cp.stop()


def _code(fn: Callable[[], object]) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        fn()
    err: Any = info.value
    return err.code(), err.details() or ""


def test_bad_input_gets_clear_status_and_server_keeps_serving(
    tmp_path: Path, etcd: EtcdServer
) -> None:
    cp = start_controlplane(tmp_path, etcd.endpoint, "cp-a")
    agent = start_agent(tmp_path, etcd.endpoint, "n1", ttl_s=TTL)
    stub = cp.nodes
    try:
        wait_until(lambda: "n1" in cp.node_ids(), 20, what="node registered")
        gpu = nodes_pb2.Gpu(index=0, model="H100", memory_total_bytes=80 * GIB)

        code, msg = _code(
            lambda: stub.RegisterNode(
                nodes_pb2.RegisterNodeRequest(node=nodes_pb2.Node(node_id="", gpus=[gpu]))
            )
        )
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "node_id is empty" in msg

        bad_gpu = nodes_pb2.Gpu(index=0, model="H100", memory_total_bytes=-5)
        code, msg = _code(
            lambda: stub.RegisterNode(
                nodes_pb2.RegisterNodeRequest(node=nodes_pb2.Node(node_id="x", gpus=[bad_gpu]))
            )
        )
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert "gpus[0].memory_total_bytes must be > 0, got -5" in msg

        neg_free = nodes_pb2.Gpu(
            index=0, model="H100", memory_total_bytes=GIB, memory_free_bytes=-1
        )
        code, msg = _code(
            lambda: stub.RegisterNode(
                nodes_pb2.RegisterNodeRequest(node=nodes_pb2.Node(node_id="x", gpus=[neg_free]))
            )
        )
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "memory_free_bytes" in msg

        code, msg = _code(
            lambda: stub.RegisterNode(
                nodes_pb2.RegisterNodeRequest(node=nodes_pb2.Node(node_id="x"), ttl_seconds=1)
            )
        )
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "TTL" in msg

        code, msg = _code(lambda: stub.CordonNode(nodes_pb2.CordonNodeRequest(node_id="ghost")))
        assert code == grpc.StatusCode.NOT_FOUND and "ghost" in msg

        code, msg = _code(lambda: stub.CordonNode(nodes_pb2.CordonNodeRequest(node_id="")))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "node_id is empty" in msg

        code, msg = _code(lambda: stub.DrainNode(nodes_pb2.DrainNodeRequest(node_id="Bad_Name")))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "Bad_Name" in msg

        code, msg = _code(
            lambda: stub.ListNodes(nodes_pb2.ListNodesRequest(label_selector="a=b=c"))
        )
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "a=b=c" in msg

        # A malformed WatchNodes request fails before any event is streamed.
        code, msg = _code(
            lambda: list(
                stub.WatchNodes(
                    nodes_pb2.WatchNodesRequest(label_selector="zone=a,,rack=b"), timeout=5
                )
            )
        )
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "term 2 is empty" in msg

        code, msg = _code(
            lambda: stub.Heartbeat(nodes_pb2.HeartbeatRequest(node_id="n1", lease_id=0))
        )
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "lease_id" in msg

        code, msg = _code(
            lambda: stub.Heartbeat(nodes_pb2.HeartbeatRequest(node_id="nobody", lease_id=42))
        )
        assert code == grpc.StatusCode.NOT_FOUND

        # Raw garbage bytes where a message should be: the server answers, and lives on.
        raw = cp.channel.unary_unary(  # type: ignore[union-attr]
            "/switchboard.v1.NodeRegistry/CordonNode",
            request_serializer=lambda b: b,
            response_deserializer=lambda b: b,
        )
        code, msg = _code(lambda: raw(b"\xff\xff\xff\xff", timeout=5))
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert "malformed switchboard.v1.CordonNodeRequest" in msg

        # Still serving, and the good node is untouched.
        assert cp.node_ids() == {"n1"}
        assert cp.process.alive()
    finally:
        agent.stop()
        cp.stop()


def test_register_and_heartbeat_rpcs(tmp_path: Path, etcd: EtcdServer) -> None:
    cp = start_controlplane(tmp_path, etcd.endpoint, "cp-a")
    stub = cp.nodes
    try:
        gpus = [
            nodes_pb2.Gpu(
                index=i,
                model="H200",
                memory_total_bytes=141 * GIB,
                memory_free_bytes=141 * GIB,
                nvlink_domain="d0",
                healthy=True,
            )
            for i in range(2)
        ]
        reg = stub.RegisterNode(
            nodes_pb2.RegisterNodeRequest(
                node=nodes_pb2.Node(node_id="rpc-node", gpus=gpus, labels={"zone": "b"}),
                ttl_seconds=TTL,
            )
        )
        assert reg.lease_id > 0 and reg.ttl_seconds == TTL
        wait_until(lambda: "rpc-node" in cp.node_ids(), 5, what="RPC-registered node")

        # Heartbeats keep it alive past its TTL and carry live figures.
        for _ in range(4):
            stub.Heartbeat(
                nodes_pb2.HeartbeatRequest(
                    node_id="rpc-node",
                    lease_id=reg.lease_id,
                    gpus=[nodes_pb2.GpuStatus(index=1, memory_free_bytes=10 * GIB, healthy=False)],
                )
            )
            time.sleep(TTL / 2)
        (node,) = cp.list_nodes()
        assert node.gpus[1].memory_free_bytes == 10 * GIB
        assert node.health == nodes_pb2.NODE_HEALTH_DEGRADED

        code, msg = _code(
            lambda: stub.Heartbeat(
                nodes_pb2.HeartbeatRequest(
                    node_id="rpc-node",
                    lease_id=reg.lease_id,
                    gpus=[nodes_pb2.GpuStatus(index=7, memory_free_bytes=1)],
                )
            )
        )
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "unknown GPU index" in msg

        # Without heartbeats it expires; a late heartbeat says to register again.
        wait_until(lambda: "rpc-node" not in cp.node_ids(), TTL + 2, what="expiry")
        code, msg = _code(
            lambda: stub.Heartbeat(
                nodes_pb2.HeartbeatRequest(node_id="rpc-node", lease_id=reg.lease_id)
            )
        )
        assert code == grpc.StatusCode.NOT_FOUND and "register again" in msg
    finally:
        cp.stop()


def test_watch_with_selector_follows_label_membership(tmp_path: Path, etcd: EtcdServer) -> None:
    cp = start_controlplane(tmp_path, etcd.endpoint, "cp-a")
    a = start_agent(tmp_path, etcd.endpoint, "in-a", ttl_s=TTL, labels={"zone": "a"})
    b = start_agent(tmp_path, etcd.endpoint, "in-b", ttl_s=TTL, labels={"zone": "b"})
    try:
        wait_until(lambda: cp.node_ids() == {"in-a", "in-b"}, 20, what="both registered")
        with watch_nodes(cp, nodes_pb2.WatchNodesRequest(label_selector="zone=a")) as watch:
            synced = wait_until(
                lambda: watch.of_type(nodes_pb2.NodeEvent.TYPE_SYNCED), 5, what="SYNCED"
            )
            added = watch.of_type(nodes_pb2.NodeEvent.TYPE_ADDED)
            assert [e.node.node_id for _, e in added] == ["in-a"]
            assert added[0][0] <= synced[0][0]
            b.kill()
            a.kill()
            wait_until(
                lambda: watch.of_type(nodes_pb2.NodeEvent.TYPE_DELETED),
                TTL + 2,
                what="DELETED of in-a",
            )
            time.sleep(0.5)
            deleted = [e.node.node_id for _, e in watch.of_type(nodes_pb2.NodeEvent.TYPE_DELETED)]
            assert deleted == ["in-a"]  # in-b never matched the selector
    finally:
        a.stop()
        b.stop()
        cp.stop()


def test_health_and_reflection_are_served(tmp_path: Path, etcd: EtcdServer) -> None:
    cp = start_controlplane(tmp_path, etcd.endpoint, "cp-a")
    try:
        assert cp.channel is not None
        health: Any = health_pb2_grpc.HealthStub(cp.channel)
        for service in ("", "switchboard.v1.NodeRegistry", "switchboard.v1.ControlPlane"):

            def serving(name: str = service) -> bool:
                resp = health.Check(health_pb2.HealthCheckRequest(service=name))
                return bool(resp.status == health_pb2.HealthCheckResponse.SERVING)

            wait_until(serving, 5, what=f"health of {service!r}")
        refl: Any = reflection_pb2_grpc.ServerReflectionStub(cp.channel)
        (answer,) = list(
            refl.ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")])
            )
        )
        names = {s.name for s in answer.list_services_response.service}
        assert {
            "switchboard.v1.NodeRegistry",
            "switchboard.v1.ControlPlane",
            "grpc.health.v1.Health",
        } <= names
    finally:
        cp.stop()
