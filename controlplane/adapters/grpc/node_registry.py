"""NodeRegistry and ControlPlane gRPC services, served from the watch-fed NodeCache."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from switchboard.v1 import control_plane_pb2, control_plane_pb2_grpc, nodes_pb2, nodes_pb2_grpc

from controlplane import __version__
from controlplane.adapters.etcd.node_cache import NodeCache
from controlplane.adapters.etcd.nodes import EtcdNodeRegistry
from controlplane.adapters.grpc.convert import (
    change_to_pb,
    inventory_from_pb,
    node_to_pb,
    timestamp,
)
from controlplane.adapters.grpc.errors import server_stream, unary
from controlplane.core.model import Gpu, Node, NodeSchedulingStatus, SchedulingState
from controlplane.core.nodes import (
    parse_selector,
    validate_inventory,
    validate_lease_ttl,
    validate_node_id,
)
from controlplane.core.nodeview import ChangeType, NodeChange
from controlplane.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable

Context = grpc.aio.ServicerContext[Any, Any]


class NodeRegistryServicer(nodes_pb2_grpc.NodeRegistryServicer):
    def __init__(
        self,
        registry: EtcdNodeRegistry,
        cache: NodeCache,
        *,
        clock: Callable[[], float],
        default_ttl_s: int = 10,
        write_visible_timeout_s: float = 5.0,
    ) -> None:
        self._registry = registry
        self._cache = cache
        self._clock = clock
        self._default_ttl_s = default_ttl_s
        self._visible_timeout_s = write_visible_timeout_s

    # --- agents without direct etcd access -----------------------------------------------
    @unary
    async def RegisterNode(
        self, request: nodes_pb2.RegisterNodeRequest, context: Context
    ) -> nodes_pb2.RegisterNodeResponse:
        if not request.HasField("node"):
            raise InvalidArgument("node is required")
        ttl = validate_lease_ttl(request.ttl_seconds or self._default_ttl_s)
        now = self._clock()
        inv = dataclasses.replace(
            validate_inventory(inventory_from_pb(request.node)),
            registered_at=now,
            last_heartbeat=now,
        )
        lease = await self._registry.register(inv, ttl)
        node = Node(inventory=inv, scheduling=self._cache_scheduling(inv.node_id), lease_id=lease)
        return nodes_pb2.RegisterNodeResponse(
            node=node_to_pb(node), lease_id=lease, ttl_seconds=ttl
        )

    @unary
    async def Heartbeat(
        self, request: nodes_pb2.HeartbeatRequest, context: Context
    ) -> nodes_pb2.HeartbeatResponse:
        node_id = validate_node_id(request.node_id)
        if request.lease_id <= 0:
            raise InvalidArgument("lease_id must be the positive id RegisterNode returned")
        current = await self._registry.get_inventory(node_id)
        if current is None:
            raise NotFound(f"node {node_id!r} is not registered (lease expired?): register again")
        if current.lease_id != request.lease_id:
            raise FailedPrecondition(
                f"node {node_id!r} is registered under another lease; register again"
            )
        ttl = await self._registry.keepalive(request.lease_id)
        by_index = {s.index: s for s in request.gpus}
        unknown = set(by_index) - {g.index for g in current.inventory.gpus}
        if unknown:
            raise InvalidArgument(f"gpus: unknown GPU index {sorted(unknown)} for {node_id!r}")
        gpus: list[Gpu] = []
        for g in current.inventory.gpus:
            s = by_index.get(g.index)
            if s is not None:
                if not 0 <= s.memory_free_bytes <= g.memory_total_bytes:
                    raise InvalidArgument(
                        f"gpus[{g.index}].memory_free_bytes {s.memory_free_bytes} is outside "
                        f"[0, {g.memory_total_bytes}]"
                    )
                g = dataclasses.replace(g, memory_free_bytes=s.memory_free_bytes, healthy=s.healthy)
            gpus.append(g)
        inv = dataclasses.replace(
            current.inventory,
            gpus=tuple(gpus),
            health_message=request.health_message,
            last_heartbeat=self._clock(),
        )
        if inv != current.inventory:
            await self._registry.update(inv, request.lease_id)
        return nodes_pb2.HeartbeatResponse(ttl_seconds=ttl)

    # --- reads, from the cache -----------------------------------------------------------
    @unary
    async def ListNodes(
        self, request: nodes_pb2.ListNodesRequest, context: Context
    ) -> nodes_pb2.ListNodesResponse:
        selector = parse_selector(request.label_selector)
        self._require_cache()
        return nodes_pb2.ListNodesResponse(
            nodes=[node_to_pb(n) for n in self._cache.list_nodes(selector)],
            revision=self._cache.revision,
        )

    @server_stream
    async def WatchNodes(
        self, request: nodes_pb2.WatchNodesRequest, context: Context
    ) -> AsyncIterator[nodes_pb2.NodeEvent]:
        selector = parse_selector(request.label_selector)
        self._require_cache()
        initial, sub = self._cache.subscribe()
        visible: set[str] = set()
        try:
            for change in initial:
                if selector.matches(change.node.inventory.labels):
                    visible.add(change.node.node_id)
                    if not request.skip_initial:
                        yield change_to_pb(change)
            if not request.skip_initial:
                yield nodes_pb2.NodeEvent(
                    type=nodes_pb2.NodeEvent.TYPE_SYNCED, revision=self._cache.revision
                )
            async for change in sub:
                out = _filtered(change, selector.matches(change.node.inventory.labels), visible)
                if out is not None:
                    yield change_to_pb(out)
        finally:
            sub.close()

    # --- SRE writes ----------------------------------------------------------------------
    @unary
    async def CordonNode(
        self, request: nodes_pb2.CordonNodeRequest, context: Context
    ) -> nodes_pb2.CordonNodeResponse:
        node = await self._set_state(request.node_id, SchedulingState.CORDONED, request.reason)
        return nodes_pb2.CordonNodeResponse(node=node_to_pb(node))

    @unary
    async def UncordonNode(
        self, request: nodes_pb2.UncordonNodeRequest, context: Context
    ) -> nodes_pb2.UncordonNodeResponse:
        node = await self._set_state(request.node_id, SchedulingState.SCHEDULABLE, "")
        return nodes_pb2.UncordonNodeResponse(node=node_to_pb(node))

    @unary
    async def DrainNode(
        self, request: nodes_pb2.DrainNodeRequest, context: Context
    ) -> nodes_pb2.DrainNodeResponse:
        node = await self._set_state(request.node_id, SchedulingState.DRAINING, request.reason)
        return nodes_pb2.DrainNodeResponse(node=node_to_pb(node))

    async def _set_state(self, node_id: str, state: SchedulingState, reason: str) -> Node:
        validate_node_id(node_id)
        self._require_cache()
        node = self._cache.get(node_id)
        if node is None:
            raise NotFound(f"node {node_id!r} not found")
        if len(reason) > 1024:
            raise InvalidArgument("reason is longer than 1024 characters")
        if node.scheduling.state is not state or node.scheduling.reason != reason:
            if state is SchedulingState.SCHEDULABLE:
                revision = await self._registry.clear_scheduling(node_id)
            else:
                status = NodeSchedulingStatus(state=state, reason=reason, since=self._clock())
                revision = await self._registry.set_scheduling(node_id, status)
            await self._cache.wait_for_revision(revision, self._visible_timeout_s)
        return self._cache.get(node_id) or node

    def _cache_scheduling(self, node_id: str) -> NodeSchedulingStatus:
        node = self._cache.get(node_id)
        return node.scheduling if node is not None else NodeSchedulingStatus()

    def _require_cache(self) -> None:
        if not self._cache.ever_synced.is_set():
            raise Unavailable("control plane has not read the node registry from etcd yet")


def _filtered(change: NodeChange, matches: bool, visible: set[str]) -> NodeChange | None:
    """Translate a change for a watcher with a selector: label edits move nodes in and out."""
    node_id = change.node.node_id
    was = node_id in visible
    if change.type is ChangeType.DELETED or not matches:
        if not was:
            return None
        visible.discard(node_id)
        return NodeChange(ChangeType.DELETED, change.node, change.revision)
    visible.add(node_id)
    if not was:
        return NodeChange(ChangeType.ADDED, change.node, change.revision)
    return change


class ControlPlaneServicer(control_plane_pb2_grpc.ControlPlaneServicer):
    def __init__(
        self,
        *,
        replica_id: str,
        cache: NodeCache,
        leader: Callable[[], tuple[bool, str]],
        started_at: float,
    ) -> None:
        self._replica_id = replica_id
        self._cache = cache
        self._leader = leader
        self._started_at = started_at

    @unary
    async def GetStatus(
        self, request: control_plane_pb2.GetStatusRequest, context: Context
    ) -> control_plane_pb2.ControlPlaneStatus:
        is_leader, leader_id = self._leader()
        return control_plane_pb2.ControlPlaneStatus(
            replica_id=self._replica_id,
            is_leader=is_leader,
            leader_id=leader_id,
            version=__version__,
            cache_revision=self._cache.revision,
            cache_synced=self._cache.synced.is_set(),
            node_count=len(self._cache),
            started_at=timestamp(self._started_at),
        )
