"""Conversions between the domain model and the v1 protobuf messages."""

from __future__ import annotations

import dataclasses

from google.protobuf.timestamp_pb2 import Timestamp
from switchboard.v1 import nodes_pb2

from controlplane.core.model import (
    Gpu,
    Node,
    NodeHealth,
    NodeInventory,
    NodeSchedulingStatus,
    SchedulingState,
)
from controlplane.core.nodeview import ChangeType, NodeChange

_HEALTH = {
    NodeHealth.HEALTHY: nodes_pb2.NODE_HEALTH_HEALTHY,
    NodeHealth.DEGRADED: nodes_pb2.NODE_HEALTH_DEGRADED,
    NodeHealth.UNHEALTHY: nodes_pb2.NODE_HEALTH_UNHEALTHY,
}
_SCHEDULING = {
    SchedulingState.SCHEDULABLE: nodes_pb2.SCHEDULING_STATE_SCHEDULABLE,
    SchedulingState.CORDONED: nodes_pb2.SCHEDULING_STATE_CORDONED,
    SchedulingState.DRAINING: nodes_pb2.SCHEDULING_STATE_DRAINING,
}
_SCHEDULING_BACK = {v: k for k, v in _SCHEDULING.items()}
_CHANGE = {
    ChangeType.ADDED: nodes_pb2.NodeEvent.TYPE_ADDED,
    ChangeType.MODIFIED: nodes_pb2.NodeEvent.TYPE_MODIFIED,
    ChangeType.DELETED: nodes_pb2.NodeEvent.TYPE_DELETED,
}


def timestamp(unix_s: float) -> Timestamp:
    ts = Timestamp()
    if unix_s > 0:
        ts.FromNanoseconds(int(unix_s * 1e9))
    return ts


def gpu_to_pb(g: Gpu) -> nodes_pb2.Gpu:
    return nodes_pb2.Gpu(
        index=g.index,
        uuid=g.uuid,
        model=g.model,
        memory_total_bytes=g.memory_total_bytes,
        memory_free_bytes=g.memory_free_bytes,
        nvlink_domain=g.nvlink_domain,
        healthy=g.healthy,
    )


def gpu_from_pb(g: nodes_pb2.Gpu) -> Gpu:
    return Gpu(
        index=g.index,
        uuid=g.uuid,
        model=g.model,
        memory_total_bytes=g.memory_total_bytes,
        memory_free_bytes=g.memory_free_bytes,
        nvlink_domain=g.nvlink_domain,
        healthy=g.healthy,
    )


def node_to_pb(node: Node) -> nodes_pb2.Node:
    inv = node.inventory
    return nodes_pb2.Node(
        node_id=inv.node_id,
        hostname=inv.hostname,
        address=inv.address,
        ray_node_id=inv.ray_node_id,
        labels=dict(inv.labels),
        gpus=[gpu_to_pb(g) for g in inv.gpus],
        health=_HEALTH[inv.health],
        health_message=inv.health_message,
        scheduling=_SCHEDULING[node.scheduling.state],
        scheduling_reason=node.scheduling.reason,
        registered_at=timestamp(inv.registered_at),
        last_heartbeat=timestamp(inv.last_heartbeat),
        agent_version=inv.agent_version,
        lease_id=node.lease_id,
    )


def inventory_from_pb(msg: nodes_pb2.Node) -> NodeInventory:
    """The inventory part of a Node message (health / scheduling / times are the server's)."""
    return NodeInventory(
        node_id=msg.node_id,
        hostname=msg.hostname,
        address=msg.address,
        ray_node_id=msg.ray_node_id,
        agent_version=msg.agent_version,
        labels=dict(msg.labels),
        health_message=msg.health_message,
        gpus=tuple(gpu_from_pb(g) for g in msg.gpus),
    )


def node_from_pb(msg: nodes_pb2.Node) -> Node:
    """Rebuild a Node from its message (the CLI uses this to render tables)."""
    inv = dataclasses.replace(
        inventory_from_pb(msg),
        registered_at=msg.registered_at.ToNanoseconds() / 1e9,
        last_heartbeat=msg.last_heartbeat.ToNanoseconds() / 1e9,
    )
    return Node(
        inventory=inv,
        scheduling=NodeSchedulingStatus(
            state=_SCHEDULING_BACK.get(msg.scheduling, SchedulingState.SCHEDULABLE),
            reason=msg.scheduling_reason,
        ),
        lease_id=msg.lease_id,
    )


def change_to_pb(change: NodeChange) -> nodes_pb2.NodeEvent:
    return nodes_pb2.NodeEvent(
        type=_CHANGE[change.type], node=node_to_pb(change.node), revision=change.revision
    )
