"""The reconciler's decision: desired deployments vs what runs -> actions and status. Pure.

Theory of operation
-------------------
Level-based, like a Kubernetes controller: every pass starts from scratch with

* the desired state: every ``DeploymentRecord`` (spec + generation);
* the recorded intent: every ``ReplicaPlacement`` (which replica goes on which node's GPUs);
* what is observed: registered nodes (live leases, cordon/drain state), registered workers
  (live leases, Serving/Draining), the runtime's replicas (placement group state, actor alive)
  and which runtime nodes are alive;

and returns ``Plan(actions, statuses)``. Nothing here does I/O, reads a clock or draws a random
number; the shell (``controlplane/reconciler.py``) executes the actions idempotently and calls
``reconcile`` again.

A replica is identified by ``<deployment>-<role>-<index>-<template>``: ``template`` hashes
everything in the spec that shapes a worker (model, engine, parallelism, engine args, the pool's
selectors), so a spec change makes new replica ids (a rolling update) and a scale change does
not. ``index`` is a slot, unique within the pool across templates. Each replica is in one state:

* **lost**: its node left the registry, its runtime node died, or its actor died -> stopped at
  once (no drain possible) and its slot freed; the pool places a replacement next pass;
* **missing**: recorded but the runtime holds nothing (a leader died between recording and
  starting it) -> started again (idempotent by name: never a duplicate);
* **evacuating**: its node is being drained -> replaced like an outdated replica;
* **outdated**: an older template -> replaced under the rolling-update budget;
* otherwise **starting** until its worker registers as Serving, then **ready**.

Per pool: place new up-to-date replicas until there are ``replicas`` of them, never holding more
than ``replicas + max_surge`` at once while old ones remain; stop an old replica when doing so
keeps at least ``replicas - max_unavailable`` ready (an old replica that is not ready, or one on
a draining node whose replacement cannot be placed, goes at once); scale down by draining the
highest slots, unready first. Deleted deployments are drained; runtime replicas that no record
explains (orphans) are stopped.

Status follows Kubernetes: per-pool desired / ready / updated, and conditions ``Available``
(every pool has at least ``min_replicas`` ready), ``Progressing`` (False with reason
``Unschedulable`` when a pool cannot be placed, naming why per node) and ``Degraded`` (fewer
ready than desired, with the reason). A condition keeps its ``last_transition_time`` until its
status changes.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from controlplane.core.deployments import ModelDeploymentSpec, Pool, PoolRole, format_selector
from controlplane.core.model import Node, SchedulingState, WorkerRecord, WorkerState
from controlplane.core.placement import Placement, place, replica_requests
from controlplane.core.scheduling.framework import Allocation, PlacementProfile, ReplicaRequest

# --- records ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DeploymentRecord:
    spec: ModelDeploymentSpec
    generation: int
    created_at: float = 0.0
    resource_version: int = 0
    """etcd mod revision of the record; pass it back for compare-and-swap writes."""


@dataclass(frozen=True, slots=True)
class ReplicaPlacement:
    """Where one replica was put. Recorded before it starts, deleted after it stops."""

    replica_id: str
    deployment: str
    role: PoolRole
    index: int
    template: str
    node_id: str
    ray_node_id: str = ""
    gpu_indices: tuple[int, ...] = ()
    created_at: float = 0.0
    scores: Mapping[str, float] = field(default_factory=dict)
    """The best few nodes' scores when it was placed (for ``explain``)."""
    rejections: tuple[str, ...] = ()
    """Why other nodes were not chosen, a bounded sample (for ``explain``)."""

    def allocation(self) -> Allocation:
        return Allocation(self.deployment, self.role, self.index, self.node_id, self.gpu_indices)


@dataclass(frozen=True, slots=True)
class Condition:
    type: str  # Available | Progressing | Degraded
    status: str  # "True" | "False" | "Unknown"
    reason: str = ""
    message: str = ""
    last_transition_time: float = 0.0


@dataclass(frozen=True, slots=True)
class PoolStatus:
    role: PoolRole
    desired: int
    ready: int
    updated: int = 0
    unschedulable: tuple[str, ...] = ()
    """Per-node reasons the last placement attempt failed (empty when all placed)."""


@dataclass(frozen=True, slots=True)
class DeploymentStatus:
    observed_generation: int = 0
    conditions: tuple[Condition, ...] = ()
    pools: tuple[PoolStatus, ...] = ()

    def condition(self, type_: str) -> Condition | None:
        return next((c for c in self.conditions if c.type == type_), None)


@dataclass(frozen=True, slots=True)
class RuntimeReplica:
    """A replica as the runtime (Ray) holds it."""

    replica_id: str
    group_state: str = ""  # PENDING | CREATED | RESCHEDULING | "" (no group)
    actor_alive: bool = False


# --- placement seam --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PlaceResult:
    node_id: str | None
    gpu_indices: tuple[int, ...] = ()
    scores: Mapping[str, float] = field(default_factory=dict)
    rejections: tuple[str, ...] = ()


class Placer(Protocol):
    """Places replicas one after another, each seeing the GPUs the earlier ones took."""

    def place(
        self,
        requests: Sequence[ReplicaRequest],
        nodes: Sequence[Node],
        allocations: Sequence[Allocation],
    ) -> list[PlaceResult]: ...


class PipelinePlacer:
    """The ``Placer`` over ``controlplane.core.placement.place`` (filter -> score -> pick).

    A placed replica keeps its node's total and per-scorer scores; an unplaced one keeps up to
    ``max_reasons`` per-node reasons.
    """

    def __init__(self, profile: PlacementProfile | None = None, max_reasons: int = 32) -> None:
        self.profile = profile
        self.max_reasons = max_reasons

    def place(
        self,
        requests: Sequence[ReplicaRequest],
        nodes: Sequence[Node],
        allocations: Sequence[Allocation],
    ) -> list[PlaceResult]:
        known = {n.node_id for n in nodes}
        held = [a for a in allocations if a.node_id in known]
        out: list[PlaceResult] = []
        for decision in place(requests, nodes, held, self.profile):
            if isinstance(decision, Placement):
                scores = {"total": round(decision.score, 4)}
                scores |= {k: round(v, 4) for k, v in decision.scores.items()}
                out.append(PlaceResult(decision.node_id, decision.gpu_indices, scores))
            else:
                out.append(PlaceResult(None, rejections=decision.reasons[: self.max_reasons]))
        return out


# --- actions ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StartReplica:
    """Record the placement (if new), then start the replica. Idempotent."""

    placement: ReplicaPlacement
    spec: ModelDeploymentSpec
    new: bool = True


@dataclass(frozen=True, slots=True)
class StopReplica:
    """Stop the replica (draining it first when ``drain``), then delete its record."""

    replica_id: str
    placement: ReplicaPlacement | None
    drain: bool
    reason: str


Action = StartReplica | StopReplica


@dataclass(frozen=True, slots=True)
class ReconcileConfig:
    max_surge: int = 1
    """Extra replicas a pool may run while replacing old ones."""
    max_unavailable: int = 0
    """Ready replicas a pool may lose below ``replicas`` while replacing old ones."""


@dataclass(frozen=True, slots=True)
class Observed:
    nodes: Mapping[str, Node]
    workers: Mapping[str, WorkerRecord]
    runtime: Mapping[str, RuntimeReplica]
    ray_nodes_alive: Mapping[str, bool]


@dataclass(frozen=True, slots=True)
class Plan:
    actions: tuple[Action, ...]
    statuses: Mapping[str, DeploymentStatus]


# --- the decision ----------------------------------------------------------------------------


def template_hash(spec: ModelDeploymentSpec, pool: Pool) -> str:
    """What shapes a pool's workers, hashed: a change means new replicas (a rolling update)."""
    doc = {
        "model": spec.model,
        "model_path": spec.model_path,
        "engine": spec.engine.value,
        "parallelism": [
            spec.parallelism.tensor,
            spec.parallelism.pipeline,
            spec.parallelism.expert,
            spec.parallelism.data,
        ],
        "gpu_memory": spec.gpu_memory_bytes_per_gpu,
        "engine_args": dict(spec.engine_args),
        "role": pool.role.value,
        "selector": format_selector(pool.node_selector),
        "affinity": dict(pool.affinity),
        "context_threshold_tokens": pool.context_threshold_tokens,
    }
    raw = json.dumps(doc, sort_keys=True).encode()
    return hashlib.sha256(raw).hexdigest()[:8]


def replica_id(deployment: str, role: PoolRole, index: int, template: str) -> str:
    return f"{deployment}-{role.value}-{index}-{template}"


@dataclass
class _PoolView:
    spec: ModelDeploymentSpec
    pool: Pool
    template: str
    placements: list[ReplicaPlacement]
    lost: list[tuple[ReplicaPlacement, str]] = field(default_factory=list)
    missing: list[ReplicaPlacement] = field(default_factory=list)
    current: list[ReplicaPlacement] = field(default_factory=list)  # not lost
    ready: set[str] = field(default_factory=set)


def reconcile(
    desired: Sequence[DeploymentRecord],
    placements: Sequence[ReplicaPlacement],
    observed: Observed,
    placer: Placer,
    *,
    now: float,
    previous: Mapping[str, DeploymentStatus] | None = None,
    config: ReconcileConfig | None = None,
) -> Plan:
    """One level-based pass: see the module docstring."""
    config = config or ReconcileConfig()
    previous = previous or {}
    actions: list[Action] = []
    statuses: dict[str, DeploymentStatus] = {}
    by_name = {d.spec.name: d for d in desired}

    # replicas of deployments that are gone: drain them
    known: set[str] = set()
    for p in placements:
        known.add(p.replica_id)
        if p.deployment not in by_name:
            actions.append(StopReplica(p.replica_id, p, drain=True, reason="deployment deleted"))
    # runtime replicas no record explains (a stop that died half-way): stop them
    for rid in sorted(set(observed.runtime) - known):
        actions.append(StopReplica(rid, None, drain=True, reason="no placement record (orphan)"))

    allocations = [p.allocation() for p in placements if p.deployment in by_name]
    for record in sorted(desired, key=lambda d: (-d.spec.priority, d.spec.name)):
        spec = record.spec
        pools: list[PoolStatus] = []
        lost_reasons: list[str] = []
        for pool in spec.pools:
            view = _view(spec, pool, placements, observed)
            lost_reasons += [f"{p.replica_id}: {why}" for p, why in view.lost]
            pool_actions, unschedulable, new_allocs = _reconcile_pool(
                view, observed, placer, allocations, config, now
            )
            actions += pool_actions
            allocations = allocations + new_allocs
            updated = [p for p in view.current if p.template == view.template]
            pools.append(
                PoolStatus(
                    role=pool.role,
                    desired=pool.replicas,
                    ready=len(view.ready),
                    updated=len(updated),
                    unschedulable=unschedulable,
                )
            )
        statuses[spec.name] = _status(record, pools, lost_reasons, previous.get(spec.name), now)
    return Plan(tuple(actions), statuses)


def _view(
    spec: ModelDeploymentSpec,
    pool: Pool,
    placements: Sequence[ReplicaPlacement],
    observed: Observed,
) -> _PoolView:
    view = _PoolView(
        spec,
        pool,
        template_hash(spec, pool),
        sorted(
            (p for p in placements if p.deployment == spec.name and p.role is pool.role),
            key=lambda p: p.index,
        ),
    )
    for p in view.placements:
        why = _lost(p, observed)
        if why:
            view.lost.append((p, why))
            continue
        view.current.append(p)
        runtime = observed.runtime.get(p.replica_id)
        if runtime is None:
            view.missing.append(p)
        worker = observed.workers.get(p.replica_id)
        if worker is not None and worker.state is WorkerState.SERVING:
            view.ready.add(p.replica_id)
    return view


def _lost(p: ReplicaPlacement, observed: Observed) -> str:
    node = observed.nodes.get(p.node_id)
    if node is None:
        return f"node {p.node_id} left the registry"
    current = node.inventory.ray_node_id
    if p.ray_node_id and current and current != p.ray_node_id:
        # the node registered again under a new Ray node (its Ray was restarted, or a whole
        # new local cluster: `switchboard up` again on its old state): the old one is gone and
        # a group pinned to it would wait for it forever
        return f"the ray node of {p.node_id} changed (Ray restarted there)"
    if p.ray_node_id and observed.ray_nodes_alive.get(p.ray_node_id) is False:
        return f"ray node of {p.node_id} died"
    runtime = observed.runtime.get(p.replica_id)
    if runtime is not None and runtime.group_state == "RESCHEDULING":
        return f"its placement group lost its node ({p.node_id})"
    if runtime is not None and runtime.group_state == "CREATED" and not runtime.actor_alive:
        return "its worker actor died"
    return ""


def _reconcile_pool(
    view: _PoolView,
    observed: Observed,
    placer: Placer,
    allocations: list[Allocation],
    config: ReconcileConfig,
    now: float,
) -> tuple[list[Action], tuple[str, ...], list[Allocation]]:
    spec, pool = view.spec, view.pool
    actions: list[Action] = []
    for p, why in view.lost:
        actions.append(StopReplica(p.replica_id, p, drain=False, reason=f"lost: {why}"))
    for p in view.missing:
        actions.append(StartReplica(p, spec, new=False))

    def draining(p: ReplicaPlacement) -> bool:
        node = observed.nodes.get(p.node_id)
        return node is not None and node.scheduling.state is SchedulingState.DRAINING

    fresh = [p for p in view.current if p.template == view.template and not draining(p)]
    old = [p for p in view.current if p not in fresh]
    want = pool.replicas

    # place new replicas
    need = max(0, want - len(fresh))
    budget = need if not old else max(0, want + config.max_surge - len(view.current))
    count = min(need, budget)
    used = {p.index for p in view.placements}
    unschedulable: tuple[str, ...] = ()
    new_allocs: list[Allocation] = []
    if count:
        indices: list[int] = []
        i = 0
        while len(indices) < count:
            if i not in used:
                indices.append(i)
            i += 1
        requests = replica_requests(spec, pool.role, indices)
        nodes = sorted(observed.nodes.values(), key=lambda n: n.node_id)
        results = placer.place(requests, nodes, allocations)
        for index, result in zip(indices, results, strict=True):
            if result.node_id is None:
                unschedulable = result.rejections
                continue
            node = observed.nodes[result.node_id]
            placement = ReplicaPlacement(
                replica_id=replica_id(spec.name, pool.role, index, view.template),
                deployment=spec.name,
                role=pool.role,
                index=index,
                template=view.template,
                node_id=result.node_id,
                ray_node_id=node.inventory.ray_node_id,
                gpu_indices=result.gpu_indices,
                created_at=now,
                scores=result.scores,
                rejections=result.rejections,
            )
            actions.append(StartReplica(placement, spec))
            new_allocs.append(placement.allocation())

    # replace old replicas within the availability budget
    ready = len(view.ready)
    floor = want - config.max_unavailable
    for p in sorted(old, key=lambda p: (p.replica_id in view.ready, -p.index)):
        is_ready = p.replica_id in view.ready
        stuck = draining(p) and bool(unschedulable)
        if not is_ready or stuck or ready - 1 >= floor:
            reason = "node draining" if draining(p) else "rolling update: outdated template"
            actions.append(StopReplica(p.replica_id, p, drain=True, reason=reason))
            if is_ready:
                ready -= 1

    # scale down: drain the highest slots, unready first
    extra = len(fresh) - want
    if extra > 0:
        victims = sorted(fresh, key=lambda p: (p.replica_id in view.ready, -p.index))[:extra]
        for p in victims:
            actions.append(StopReplica(p.replica_id, p, drain=True, reason="scale down"))
    return actions, unschedulable, new_allocs


def _status(
    record: DeploymentRecord,
    pools: list[PoolStatus],
    lost: list[str],
    previous: DeploymentStatus | None,
    now: float,
) -> DeploymentStatus:
    spec_pools = {p.role: p for p in record.spec.pools}
    short = [p for p in pools if p.ready < p.desired]
    blocked = [p for p in pools if p.unschedulable]
    below_min = [p for p in pools if p.ready < max(spec_pools[p.role].min_replicas, 0)]

    def counts(ps: Sequence[PoolStatus]) -> str:
        return ", ".join(f"{p.role.value} {p.ready}/{p.desired} ready" for p in ps)

    available = (
        Condition("Available", "False", "MinimumReplicasUnavailable", counts(below_min))
        if below_min
        else Condition("Available", "True", "MinimumReplicasAvailable", counts(pools))
    )
    if blocked:
        reasons = "; ".join(f"{p.role.value}: " + ", ".join(p.unschedulable[:8]) for p in blocked)
        progressing = Condition("Progressing", "False", "Unschedulable", reasons)
    elif short or any(p.updated < p.desired for p in pools):
        progressing = Condition("Progressing", "True", "ReplicasUpdating", counts(pools))
    else:
        progressing = Condition("Progressing", "True", "NewReplicasAvailable", counts(pools))
    if lost:
        degraded = Condition("Degraded", "True", "ReplicaLost", "; ".join(lost[:8]))
    elif blocked:
        degraded = Condition("Degraded", "True", "Unschedulable", progressing.message)
    elif short:
        degraded = Condition("Degraded", "True", "ReplicasNotReady", counts(short))
    else:
        degraded = Condition("Degraded", "False", "AllReplicasReady", counts(pools))

    def stamped(c: Condition) -> Condition:
        old = previous.condition(c.type) if previous else None
        since = old.last_transition_time if old is not None and old.status == c.status else now
        return Condition(c.type, c.status, c.reason, c.message, since)

    return DeploymentStatus(
        observed_generation=record.generation,
        conditions=tuple(stamped(c) for c in (available, progressing, degraded)),
        pools=tuple(pools),
    )
