"""Placement: which node, and which GPUs on it, each replica of a deployment gets.

Theory of operation
-------------------
Pure and deterministic: nodes, the GPUs already allocated and the replicas to place go in;
for each replica a ``Placement`` or an ``Unschedulable`` comes out. Nothing here talks to
etcd or Ray; the reconciler records the ``Allocation`` s it acts on and passes them back next
time.

For each ``ReplicaRequest``, in the order given, the profile's pipeline runs (the Kubernetes
scheduler framework's shape, with llm-d's list-at-a-time plugins):

1. **filter**: the nodes go through the filters in profile order, each keeping those that
   pass. When reasons are wanted (no node fits, or ``explain``), each dropped node gets the
   reason of the first filter that dropped it: ``node-3: 2 free GPUs < tp 4``,
   ``node-5: cordoned``, ``node-2: no NVLink domain with 4 free GPUs (largest 2)``,
   ``node-9: does not match selector gpu=h100``;
2. **fit**: each survivor's GPUs for the replica are chosen by one rule, ``NodeState.fit``:
   every TP group inside one NVLink domain, the domain that packs best first;
3. **score**: each scorer rates every survivor in [0, 1]; a node's score is the weighted
   mean, so it is in [0, 1] too;
4. **pick**: the picker chooses (max score, ties to the lowest node id; or weighted random
   with an injected ``random.Random``).

Cost: O(nodes) per replica, with the per-node work a few dict lookups per plugin; free-GPU
state is kept per node and a node's fits are cached until it changes (2,000 nodes: about 2 ms
a replica in CPython, see ``benchmarks/placement.py``).

The chosen GPUs are allocated in the state at once, so the next replica of the same call sees
them taken and its pool's spread counts updated.

Nothing is all-or-nothing: asking for N replicas where only some fit returns a ``Placement``
for each that fits and an ``Unschedulable`` (with every node's reason) for the rest, in request
order. The caller decides what a partial result means: act on the placements, or, for a
deployment that is useless half-placed, drop them (``ClusterState.release`` undoes them in a
kept state). Placement never preempts; to favour high-priority deployments, place them first.

Entry points: ``place`` (pure: builds its own state) and ``place_in`` (against a
``ClusterState`` the caller keeps across many deployments). Requests come from
``pending_requests`` (every replica of a spec without an allocation, decode pools first so
prefill can land near them) or ``replica_requests`` (chosen replicas of one pool).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

from controlplane.core.deployments import ModelDeploymentSpec, PoolRole
from controlplane.core.model import Node
from controlplane.core.scheduling.framework import (
    Allocation,
    GpuFit,
    GpuMiss,
    PlacementProfile,
    ReplicaRequest,
)
from controlplane.core.scheduling.plugins import default_profile
from controlplane.core.scheduling.state import ClusterState, NodeState
from controlplane.errors import InvalidArgument

__all__ = [
    "Allocation",
    "ClusterState",
    "Decision",
    "NodeScore",
    "Placement",
    "PlacementProfile",
    "PlacementTrace",
    "Rejection",
    "ReplicaRequest",
    "Unschedulable",
    "default_profile",
    "pending_requests",
    "place",
    "place_in",
    "replica_requests",
]


@dataclass(frozen=True, slots=True)
class Rejection:
    """Why one node cannot take a replica; ``plugin`` is the filter that said so."""

    node_id: str
    plugin: str
    reason: str

    def __str__(self) -> str:
        return f"{self.node_id}: {self.reason}"


@dataclass(frozen=True, slots=True)
class NodeScore:
    """A node that passed every filter: its score, each scorer's value, the GPUs it offered."""

    node_id: str
    score: float
    scores: Mapping[str, float]
    gpu_indices: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class PlacementTrace:
    """Everything behind one decision (``explain=True``), for ``switchboard explain``."""

    rejections: tuple[Rejection, ...]
    candidates: tuple[NodeScore, ...]  # by node id


@dataclass(frozen=True, slots=True)
class Placement:
    """The replica goes to ``node_id`` on ``gpu_indices`` (empty for a GPU-less replica)."""

    request: ReplicaRequest
    node_id: str
    gpu_indices: tuple[int, ...]
    score: float
    scores: Mapping[str, float]
    """The chosen node's value from each scorer, by scorer name."""
    trace: PlacementTrace | None = None

    def allocation(self) -> Allocation:
        r = self.request
        return Allocation(r.deployment, r.role, r.replica, self.node_id, self.gpu_indices)


@dataclass(frozen=True, slots=True)
class Unschedulable:
    """No node can take the replica now; ``rejections`` holds each node's reason, by node id."""

    request: ReplicaRequest
    rejections: tuple[Rejection, ...]
    trace: PlacementTrace | None = None

    @property
    def reasons(self) -> tuple[str, ...]:
        """``("node-3: 2 free GPUs < tp 4", "node-5: cordoned", ...)``."""
        return tuple(str(r) for r in self.rejections)

    @property
    def message(self) -> str:
        """One line for logs and conditions, grouped by filter with an example each:
        ``0/5 nodes can take llm/decode/2: 3 GpuCapacity (node-3: 2 free GPUs < tp 4), ...``."""
        head = f"0/{len(self.rejections)} nodes can take {self.request.key}"
        if not self.rejections:
            return f"{head}: no nodes"
        counts = Counter(r.plugin for r in self.rejections)
        first: dict[str, Rejection] = {}
        for r in self.rejections:
            first.setdefault(r.plugin, r)
        parts = [f"{n} {p} ({first[p]})" for p, n in sorted(counts.items(), key=lambda x: -x[1])]
        return f"{head}: {', '.join(parts)}"


Decision = Placement | Unschedulable


def place(
    requests: Sequence[ReplicaRequest],
    nodes: Sequence[Node],
    allocations: Iterable[Allocation] = (),
    profile: PlacementProfile | None = None,
    *,
    explain: bool = False,
) -> list[Decision]:
    """Place ``requests`` in order on ``nodes``, around ``allocations``; one decision each.

    Pure: the inputs are not changed. Raises InvalidArgument for a request whose replica is
    already allocated (release it first to move it), a request listed twice, or a node listed
    twice. ``explain`` adds a ``PlacementTrace`` to every decision (slower: every node's
    reason and every scorer's value are kept).
    """
    return place_in(ClusterState(nodes, allocations), requests, profile, explain=explain)


def place_in(
    state: ClusterState,
    requests: Sequence[ReplicaRequest],
    profile: PlacementProfile | None = None,
    *,
    explain: bool = False,
) -> list[Decision]:
    """``place`` against a state the caller keeps: each placement is allocated in ``state``."""
    seen: set[tuple[str, PoolRole, int]] = set()
    for r in requests:
        key = (r.deployment, r.role, r.replica)
        held = state.allocation(*key)
        if held is not None:
            raise InvalidArgument(f"replica {r.key} is already allocated on {held.node_id}")
        if key in seen:
            raise InvalidArgument(f"replica {r.key} is requested twice")
        seen.add(key)
    pipeline = _Pipeline(profile or default_profile())
    decisions: list[Decision] = []
    for r in requests:
        decision = pipeline.run(state, r, explain)
        if isinstance(decision, Placement):
            state.allocate(decision.allocation())
        decisions.append(decision)
    return decisions


class _Pipeline:
    def __init__(self, profile: PlacementProfile) -> None:
        self.profile = profile
        total = sum(ws.weight for ws in profile.scorers)
        self.weights = tuple(ws.weight / total if total else 0.0 for ws in profile.scorers)

    def run(self, state: ClusterState, request: ReplicaRequest, explain: bool) -> Decision:
        need, tp, mem = request.gpus, request.tensor_parallel, request.gpu_memory_bytes
        # The fast pass keeps no reasons, and never shows the filters a node with fewer free
        # GPUs than the replica needs: it cannot fit, whatever the profile.
        nodes: Sequence[NodeState] = [n for n in state.nodes if n.free_count >= need]
        for filt in self.profile.filters:
            if not nodes:
                break
            nodes = filt.filter(request, nodes, state)
        fitted = [(n, f) for n in nodes if isinstance(f := n.fit(need, tp, mem), GpuFit)]
        nodes = [n for n, _ in fitted]
        fits = [f for _, f in fitted]

        totals = [0.0] * len(nodes)
        per_scorer: list[Sequence[float] | float] = []
        if nodes:
            for ws, weight in zip(self.profile.scorers, self.weights, strict=True):
                values = ws.scorer.score(request, nodes, fits, state)
                per_scorer.append(values)
                if isinstance(values, int | float):
                    totals = [t + weight * values for t in totals]
                else:
                    if len(values) != len(nodes):
                        raise ValueError(f"scorer {ws.scorer.name} returned a wrong-sized list")
                    totals = [t + weight * v for t, v in zip(totals, values, strict=True)]

        def scores_of(i: int) -> Mapping[str, float]:
            return MappingProxyType(
                {
                    ws.scorer.name: float(v if isinstance(v, int | float) else v[i])
                    for ws, v in zip(self.profile.scorers, per_scorer, strict=True)
                }
            )

        trace = None
        rejections: tuple[Rejection, ...] = ()
        if explain or not nodes:
            rejections = self._rejections(state, request)
        if explain:
            trace = PlacementTrace(
                rejections,
                tuple(
                    NodeScore(n.node_id, totals[i], scores_of(i), fits[i].gpu_indices)
                    for i, n in enumerate(nodes)
                ),
            )
        if not nodes:
            return Unschedulable(request, rejections, trace)
        i = self.profile.picker.pick([n.node_id for n in nodes], totals)
        return Placement(
            request=request,
            node_id=nodes[i].node_id,
            gpu_indices=fits[i].gpu_indices,
            score=totals[i],
            scores=scores_of(i),
            trace=trace,
        )

    def _rejections(self, state: ClusterState, request: ReplicaRequest) -> tuple[Rejection, ...]:
        """The slow pass, for reports: every node a filter drops, with that filter's reason."""
        out: list[Rejection] = []
        nodes: Sequence[NodeState] = state.nodes
        for f in self.profile.filters:
            kept = f.filter(request, nodes, state)
            kept_ids = {n.node_id for n in kept}
            out += (
                Rejection(n.node_id, f.name, f.reason(request, n, state))
                for n in nodes
                if n.node_id not in kept_ids
            )
            nodes = kept
        for n in nodes:
            miss = n.fit(request.gpus, request.tensor_parallel, request.gpu_memory_bytes)
            if isinstance(miss, GpuMiss):  # only with a profile lacking the GPU filters
                out.append(Rejection(n.node_id, "GpuFit", _miss_reason(miss)))
        return tuple(sorted(out, key=lambda r: r.node_id))


def _miss_reason(miss: GpuMiss) -> str:
    if miss.kind == "capacity":
        return f"{miss.eligible} free GPUs with enough memory, too few"
    return f"no NVLink domains to hold the TP groups (free per domain: {miss.domain_free})"


# --- requests from specs -------------------------------------------------------------------

_PLACE_ORDER = (PoolRole.DECODE, PoolRole.PREFILL, PoolRole.LONG_CONTEXT, PoolRole.AGGREGATED)


def _near_role(spec: ModelDeploymentSpec, role: PoolRole) -> PoolRole | None:
    if role is PoolRole.PREFILL:
        return PoolRole.DECODE
    if role is PoolRole.DECODE:
        return PoolRole.PREFILL
    if role is PoolRole.LONG_CONTEXT and spec.pool(PoolRole.DECODE) is not None:
        return PoolRole.DECODE
    return None


def replica_requests(
    spec: ModelDeploymentSpec, role: PoolRole, replicas: Iterable[int]
) -> list[ReplicaRequest]:
    """Requests for the given replica indices of the spec's ``role`` pool.

    A replica takes ``spec.gpus_per_replica`` GPUs (tensor x pipeline; none for the cpu
    engine) with ``gpu_memory_bytes_per_gpu`` free each, honours the pool's ``node_selector``
    and ``affinity``, and prefers to be near its peer pool (prefill <-> decode; long_context
    -> decode).
    """
    pool = spec.pool(role)
    if pool is None:
        raise InvalidArgument(f"deployment {spec.name!r} has no {role.value} pool")
    gpus = spec.gpus_per_replica
    return [
        ReplicaRequest(
            deployment=spec.name,
            role=role,
            replica=i,
            gpus=gpus,
            tensor_parallel=spec.parallelism.tensor if gpus else 1,
            gpu_memory_bytes=spec.gpu_memory_bytes_per_gpu if gpus else 0,
            node_selector=pool.node_selector,
            affinity=pool.affinity,
            near_role=_near_role(spec, role),
        )
        for i in replicas
    ]


def pending_requests(
    spec: ModelDeploymentSpec, allocations: Iterable[Allocation] = ()
) -> list[ReplicaRequest]:
    """Every replica ``0 .. pool.replicas - 1`` of every pool with no allocation yet.

    Decode pools come first, then prefill (which then lands near decode), long_context,
    aggregated. ``allocations`` may hold other deployments' too; only ``spec.name``'s count.
    """
    have = {(a.role, a.replica) for a in allocations if a.deployment == spec.name}
    out: list[ReplicaRequest] = []
    for role in _PLACE_ORDER:
        pool = spec.pool(role)
        if pool is not None:
            missing = [i for i in range(pool.replicas) if (role, i) not in have]
            out += replica_requests(spec, role, missing)
    return out
