"""The stock placement plugins and the default profile.

Filters (each rejection says why, without the node id; the pipeline prefixes it):

* ``SchedulableFilter``   cordoned / draining / unhealthy nodes take no new replicas.
* ``NodeSelectorFilter``  the pool's ``node_selector`` must match the node's labels.
* ``GpuCapacityFilter``   enough free healthy GPUs with enough free memory.
* ``NvlinkDomainFilter``  every TP group fits inside one NVLink domain.

Scorers (each in [0, 1], higher better):

* ``PoolSpreadScorer``     spread a pool's replicas over nodes, racks, zones.
* ``PeerProximityScorer``  keep a pool near its peer pool (prefill near decode).
* ``GpuPackingScorer``     best fit on NVLink domains, so big domains stay whole.
* ``AffinityScorer``       soft label preferences.

Pickers: ``MaxScorePicker`` (ties: lowest node id) and ``WeightedRandomPicker`` (injected rng).
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from controlplane.core.deployments import format_selector
from controlplane.core.model import GIB, SchedulingState
from controlplane.core.scheduling.framework import (
    GpuFit,
    GpuMiss,
    PlacementProfile,
    ReplicaRequest,
    WeightedScorer,
)
from controlplane.core.scheduling.state import ClusterState, NodeState

DEFAULT_TOPOLOGY_KEYS = ("rack", "zone")

# --- filters -------------------------------------------------------------------------------


class SchedulableFilter:
    """Cordoned, draining and unhealthy nodes take no new replicas."""

    name = "Schedulable"

    def filter(
        self, request: ReplicaRequest, nodes: Sequence[NodeState], cluster: ClusterState
    ) -> Sequence[NodeState]:
        return [n for n in nodes if n.schedulable]

    def reason(self, request: ReplicaRequest, node: NodeState, cluster: ClusterState) -> str:
        sched = node.node.scheduling
        if sched.state is not SchedulingState.SCHEDULABLE:
            why = "cordoned" if sched.state is SchedulingState.CORDONED else "draining"
            return f"{why} ({sched.reason})" if sched.reason else why
        msg = node.node.inventory.health_message
        return f"unhealthy ({msg})" if msg else "unhealthy"


class NodeSelectorFilter:
    """The request's ``node_selector`` must match the node's labels."""

    name = "NodeSelector"

    def filter(
        self, request: ReplicaRequest, nodes: Sequence[NodeState], cluster: ClusterState
    ) -> Sequence[NodeState]:
        if request.node_selector.empty:
            return nodes
        matching = cluster.matching(request.node_selector)
        return [n for n in nodes if n.node_id in matching]

    def reason(self, request: ReplicaRequest, node: NodeState, cluster: ClusterState) -> str:
        return f"does not match selector {format_selector(request.node_selector)}"


def _gpus(n: int) -> str:
    return f"{n} free GPU" if n == 1 else f"{n} free GPUs"


def _need(request: ReplicaRequest) -> str:
    tp, groups = request.tensor_parallel, request.tp_groups
    return f"tp {tp}" if groups == 1 else f"{request.gpus} (tp {tp} x pp {groups})"


class GpuCapacityFilter:
    """Enough free healthy GPUs, each with ``gpu_memory_bytes`` free; says which ran out."""

    name = "GpuCapacity"

    def filter(
        self, request: ReplicaRequest, nodes: Sequence[NodeState], cluster: ClusterState
    ) -> Sequence[NodeState]:
        need, tp, mem = request.gpus, request.tensor_parallel, request.gpu_memory_bytes
        if need == 0:
            return nodes
        return [
            n
            for n in nodes
            if n.free_count >= need
            and (isinstance(f := n.fit(need, tp, mem), GpuFit) or f.kind != "capacity")
        ]

    def reason(self, request: ReplicaRequest, node: NodeState, cluster: ClusterState) -> str:
        miss = node.fit(request.gpus, request.tensor_parallel, request.gpu_memory_bytes)
        if isinstance(miss, GpuMiss) and miss.free >= request.gpus:
            gib = request.gpu_memory_bytes / GIB
            why = (
                f"{_gpus(miss.eligible)} with {gib:.1f} GiB free memory < {_need(request)} "
                f"({miss.free} free in all)"
            )
        else:
            why = f"{_gpus(node.free_count)} < {_need(request)}"
        return f"{why}, {node.unhealthy} unhealthy" if node.unhealthy else why


class NvlinkDomainFilter:
    """Every TP group inside one NVLink domain (pipeline stages may use different domains)."""

    name = "NvlinkDomain"

    def filter(
        self, request: ReplicaRequest, nodes: Sequence[NodeState], cluster: ClusterState
    ) -> Sequence[NodeState]:
        need, tp, mem = request.gpus, request.tensor_parallel, request.gpu_memory_bytes
        if need == 0:
            return nodes
        return [
            n
            for n in nodes
            if isinstance(f := n.fit(need, tp, mem), GpuFit) or f.kind != "topology"
        ]

    def reason(self, request: ReplicaRequest, node: NodeState, cluster: ClusterState) -> str:
        tp = request.tensor_parallel
        miss = node.fit(request.gpus, tp, request.gpu_memory_bytes)
        domain_free = miss.domain_free if isinstance(miss, GpuMiss) else ()
        if request.tp_groups == 1:
            largest = domain_free[0] if domain_free else 0
            return f"no NVLink domain with {tp} free GPUs (largest {largest})"
        per_domain = ", ".join(str(n) for n in domain_free)
        return (
            f"no room for {request.tp_groups} TP groups of {tp} GPUs in NVLink domains "
            f"(free per domain: {per_domain})"
        )


# --- scorers -------------------------------------------------------------------------------


class PoolSpreadScorer:
    """Fewer replicas of the same pool nearby scores higher.

    Each level scores ``1 / (1 + replicas of this pool there)``; the node's own level counts
    two thirds, the topology keys (racks, zones) share the last third. A node without a topology
    label counts as its own domain at that level. An empty pool: 1 everywhere.
    """

    name = "PoolSpread"

    def __init__(self, topology_keys: Sequence[str] = DEFAULT_TOPOLOGY_KEYS) -> None:
        self.topology_keys = tuple(topology_keys)

    def score(
        self,
        request: ReplicaRequest,
        nodes: Sequence[NodeState],
        fits: Sequence[GpuFit],
        cluster: ClusterState,
    ) -> Sequence[float] | float:
        if not cluster.pool_size(request.deployment, request.role):
            return 1.0
        keys = self.topology_keys
        on_node, per_key = cluster.pool_counts(request.deployment, request.role, keys)
        levels = tuple(zip(keys, per_key, strict=True))
        key_share = 1.0 / 3.0 / len(keys) if keys else 0.0
        node_share = 1.0 - key_share * len(keys)
        out: list[float] = []
        for node in nodes:
            here = on_node.get(node.node_id, 0)
            total = node_share / (1 + here)
            labels = node.labels
            for key, counts in levels:
                value = labels.get(key)
                total += key_share / (1 + (here if value is None else counts.get(value, 0)))
            out.append(total)
        return out


class PeerProximityScorer:
    """Closeness to the request's ``near_role`` pool of the same deployment.

    1 when a peer replica is on the node; else, for the first topology key (innermost first)
    whose domain holds a peer, ``1 - (i + 1) / (len(keys) + 1)``: with ("rack", "zone"), same
    rack 0.67, same zone 0.33; else 0. No peer placed yet (or no ``near_role``): 0 everywhere.
    """

    name = "PeerProximity"

    def __init__(self, topology_keys: Sequence[str] = DEFAULT_TOPOLOGY_KEYS) -> None:
        self.topology_keys = tuple(topology_keys)

    def score(
        self,
        request: ReplicaRequest,
        nodes: Sequence[NodeState],
        fits: Sequence[GpuFit],
        cluster: ClusterState,
    ) -> Sequence[float] | float:
        peer = request.near_role
        if peer is None or not cluster.pool_size(request.deployment, peer):
            return 0.0
        keys = self.topology_keys
        on_node, per_key = cluster.pool_counts(request.deployment, peer, keys)
        levels = tuple(
            (key, counts, 1.0 - (i + 1) / (len(keys) + 1))
            for i, (key, counts) in enumerate(zip(keys, per_key, strict=True))
        )
        out: list[float] = []
        for node in nodes:
            value = 0.0
            if node.node_id in on_node:
                value = 1.0
            else:
                labels = node.labels
                for key, counts, level_value in levels:
                    label = labels.get(key)
                    if label is not None and label in counts:
                        value = level_value
                        break
            out.append(value)
        return out


class GpuPackingScorer:
    """Best fit on NVLink domains: ``GpuFit.packing`` (see ``framework.packing_score``).

    Prefers the domain the replica fills, and a leftover that still holds a big TP group, so a
    tp-2 replica goes to a half-used domain rather than breaking a whole 8-GPU one. A replica
    without GPUs: 0 everywhere."""

    name = "GpuPacking"

    def score(
        self,
        request: ReplicaRequest,
        nodes: Sequence[NodeState],
        fits: Sequence[GpuFit],
        cluster: ClusterState,
    ) -> Sequence[float] | float:
        return [f.packing for f in fits] if request.gpus else 0.0


class AffinityScorer:
    """Fraction of the request's soft ``affinity`` labels the node has (0 when it has none)."""

    name = "Affinity"

    def score(
        self,
        request: ReplicaRequest,
        nodes: Sequence[NodeState],
        fits: Sequence[GpuFit],
        cluster: ClusterState,
    ) -> Sequence[float] | float:
        prefs = tuple(request.affinity.items())
        if not prefs:
            return 0.0
        share = 1.0 / len(prefs)
        return [share * sum(1 for k, v in prefs if n.labels.get(k) == v) for n in nodes]


# --- pickers -------------------------------------------------------------------------------


class MaxScorePicker:
    """Highest score; ties go to the lowest node id (scores compared to 1e-9)."""

    name = "MaxScore"

    def pick(self, node_ids: Sequence[str], scores: Sequence[float]) -> int:
        best = 0
        for i in range(1, len(scores)):
            if scores[i] > scores[best] + 1e-9:
                best = i
        return best


class WeightedRandomPicker:
    """Random in proportion to score (uniform when all are 0), from an injected rng."""

    name = "WeightedRandom"

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng

    def pick(self, node_ids: Sequence[str], scores: Sequence[float]) -> int:
        total = sum(scores)
        if total <= 0:
            return self._rng.randrange(len(scores))
        x = self._rng.random() * total
        for i, s in enumerate(scores):
            x -= s
            if x < 0:
                return i
        return len(scores) - 1


# --- profiles ------------------------------------------------------------------------------


def default_profile(
    topology_keys: Sequence[str] = DEFAULT_TOPOLOGY_KEYS, rng: random.Random | None = None
) -> PlacementProfile:
    """The stock profile: every filter; packing 3, spread 3, proximity 2, affinity 1.

    Packing and spread balance: a pool's second replica goes to another node rather than
    next to the first, unless that means breaking a whole big NVLink domain (a tp-1 replica
    on a fresh 8-GPU domain). Proximity then pulls prefill next to its decode pool among
    nodes that pack and spread alike.
    ``topology_keys`` are node label keys, innermost first (add e.g. "fabric" between them).
    With ``rng`` the picker is weighted random, else max score.
    """
    return PlacementProfile(
        name="default",
        filters=(
            SchedulableFilter(),
            NodeSelectorFilter(),
            GpuCapacityFilter(),
            NvlinkDomainFilter(),
        ),
        scorers=(
            WeightedScorer(GpuPackingScorer(), 3.0),
            WeightedScorer(PoolSpreadScorer(topology_keys), 3.0),
            WeightedScorer(PeerProximityScorer(topology_keys), 2.0),
            WeightedScorer(AffinityScorer(), 1.0),
        ),
        picker=MaxScorePicker() if rng is None else WeightedRandomPicker(rng),
    )
