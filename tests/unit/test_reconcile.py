"""The reconciler's pure decision: hand-built nodes, placements, workers and runtime state."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from typing import Any

from controlplane.core.deployments import ModelDeploymentSpec, PoolRole
from controlplane.core.model import (
    GIB,
    Gpu,
    Node,
    NodeInventory,
    NodeSchedulingStatus,
    SchedulingState,
    WorkerRecord,
)
from controlplane.core.reconcile import (
    DeploymentRecord,
    Observed,
    PipelinePlacer,
    Plan,
    ReconcileConfig,
    ReplicaPlacement,
    RuntimeReplica,
    StartReplica,
    StopReplica,
    reconcile,
)
from controlplane.deployspec import spec_from_dict


def node(node_id: str, gpus: int = 4, state: SchedulingState = SchedulingState.SCHEDULABLE) -> Node:
    inv = NodeInventory(
        node_id=node_id,
        gpus=tuple(
            Gpu(i, "H100", 80 * GIB, 80 * GIB, nvlink_domain=f"{node_id}-nv") for i in range(gpus)
        ),
        labels={"rack": f"rack-{node_id}"},
        ray_node_id=f"ray-{node_id}",
    )
    return Node(inv, NodeSchedulingStatus(state=state))


def make_spec(name: str = "llm", prefill: int = 2, decode: int = 2, **extra: Any) -> Any:
    doc: dict[str, Any] = {
        "name": name,
        "model": "m",
        "engine": "sim",
        "parallelism": {"tensor": 2},
        "pools": [
            {"role": "prefill", "replicas": prefill, "min_replicas": 1, "max_replicas": 8},
            {"role": "decode", "replicas": decode, "min_replicas": 1, "max_replicas": 8},
        ],
    }
    doc.update(extra)
    return spec_from_dict(doc)


def record(spec: ModelDeploymentSpec, generation: int = 1) -> DeploymentRecord:
    return DeploymentRecord(spec, generation)


def observe(
    nodes: Sequence[Node],
    placements: Iterable[ReplicaPlacement] = (),
    *,
    ready: Iterable[str] = (),
    runtime_missing: Iterable[str] = (),
    dead_actors: Iterable[str] = (),
    extra_runtime: Iterable[str] = (),
) -> Observed:
    ready, missing, dead = set(ready), set(runtime_missing), set(dead_actors)
    runtime = {
        p.replica_id: RuntimeReplica(p.replica_id, "CREATED", p.replica_id not in dead)
        for p in placements
        if p.replica_id not in missing
    }
    runtime |= {rid: RuntimeReplica(rid, "CREATED", True) for rid in extra_runtime}
    workers = {
        p.replica_id: WorkerRecord(p.replica_id, "m", "x", "sim", "127.0.0.1:1", p.node_id)
        for p in placements
        if p.replica_id in ready
    }
    return Observed(
        nodes={n.node_id: n for n in nodes},
        workers=workers,
        runtime=runtime,
        ray_nodes_alive={n.inventory.ray_node_id: True for n in nodes},
    )


def run(
    desired: Sequence[DeploymentRecord],
    placements: Sequence[ReplicaPlacement],
    observed: Observed,
    **kw: Any,
) -> Plan:
    return reconcile(desired, placements, observed, PipelinePlacer(), now=100.0, **kw)


def starts(plan: Plan) -> list[ReplicaPlacement]:
    return [a.placement for a in plan.actions if isinstance(a, StartReplica) and a.new]


def stops(plan: Plan) -> list[StopReplica]:
    return [a for a in plan.actions if isinstance(a, StopReplica)]


def settle(
    desired: Sequence[DeploymentRecord], nodes: Sequence[Node], **kw: Any
) -> list[ReplicaPlacement]:
    """Placements after a first pass, as if every replica started."""
    return starts(run(desired, [], observe(nodes), **kw))


def condition(plan: Plan, name: str, type_: str) -> Any:
    status = plan.statuses[name]
    return status.condition(type_)


def test_a_new_deployment_is_placed_spread_with_each_tp_group_on_one_node() -> None:
    nodes = [node("n0"), node("n1")]
    plan = run([record(make_spec())], [], observe(nodes))
    placed = starts(plan)
    assert len(placed) == 4
    for role in (PoolRole.PREFILL, PoolRole.DECODE):
        assert sorted(p.node_id for p in placed if p.role is role) == ["n0", "n1"]
    taken = [(p.node_id, g) for p in placed for g in p.gpu_indices]
    assert len(taken) == len(set(taken)) == 8  # no GPU given twice
    assert all(len(p.gpu_indices) == 2 for p in placed)
    assert all(p.ray_node_id == f"ray-{p.node_id}" for p in placed)
    assert condition(plan, "llm", "Available").status == "False"
    assert condition(plan, "llm", "Progressing").reason == "ReplicasUpdating"


def test_converged_deployment_needs_nothing_and_is_available() -> None:
    nodes = [node("n0"), node("n1")]
    desired = [record(make_spec())]
    placements = settle(desired, nodes)
    plan = run(
        desired, placements, observe(nodes, placements, ready=[p.replica_id for p in placements])
    )
    assert plan.actions == ()
    assert condition(plan, "llm", "Available").status == "True"
    assert condition(plan, "llm", "Degraded").status == "False"
    assert condition(plan, "llm", "Progressing").reason == "NewReplicasAvailable"
    pools = {p.role: (p.ready, p.desired, p.updated) for p in plan.statuses["llm"].pools}
    assert pools == {PoolRole.PREFILL: (2, 2, 2), PoolRole.DECODE: (2, 2, 2)}


def test_a_lost_node_stops_its_replicas_and_replaces_them_where_capacity_allows() -> None:
    nodes = [node("n0"), node("n1")]
    desired = [record(make_spec())]
    placements = settle(desired, nodes)
    ready = [p.replica_id for p in placements]
    on_n1 = {p.replica_id for p in placements if p.node_id == "n1"}
    assert len(on_n1) == 2
    # n1 is gone; a fresh n2 has room
    after = [nodes[0], node("n2")]
    plan = run(desired, placements, observe(after, placements, ready=ready))
    stopped = stops(plan)
    assert {s.replica_id for s in stopped} == on_n1
    assert all(not s.drain and "left the registry" in s.reason for s in stopped)
    replacements = starts(plan)
    assert len(replacements) == len(on_n1)
    assert all(p.node_id == "n2" for p in replacements)
    assert condition(plan, "llm", "Degraded").reason == "ReplicaLost"
    # without spare capacity the pool stays short and says why
    plan = run(desired, placements, observe([nodes[0]], placements, ready=ready))
    assert not starts(plan)
    assert condition(plan, "llm", "Progressing").reason == "Unschedulable"


def test_a_dead_actor_is_lost_and_a_missing_one_is_started_again() -> None:
    nodes = [node("n0"), node("n1")]
    desired = [record(make_spec(prefill=1, decode=1))]
    placements = settle(desired, nodes)
    dead, missing = placements[0].replica_id, placements[1].replica_id
    plan = run(desired, placements, observe(nodes, placements, dead_actors=[dead],
                                            runtime_missing=[missing]))  # fmt: skip
    assert [s.replica_id for s in stops(plan)] == [dead]
    again = [a for a in plan.actions if isinstance(a, StartReplica) and not a.new]
    assert [a.placement.replica_id for a in again] == [missing]


def test_a_node_back_under_a_new_ray_node_gets_its_replicas_placed_again() -> None:
    """A Ray restart (or `switchboard up` again on its old state): the node registers again
    with a new Ray node id that the stored placements do not name. Pinned to the old id, their
    groups would wait forever; they are lost, and replaced on the node's new Ray node."""
    nodes = [node("n0"), node("n1")]
    desired = [record(make_spec(prefill=1, decode=1))]
    placements = settle(desired, nodes)
    assert {p.ray_node_id for p in placements} <= {"ray-n0", "ray-n1"}
    restarted = [
        dataclasses.replace(
            n, inventory=dataclasses.replace(n.inventory, ray_node_id=f"new-{n.node_id}")
        )
        for n in nodes
    ]
    # the new Ray cluster has never heard of the old ids; the old groups are not there
    ids = [p.replica_id for p in placements]
    plan = run(desired, placements, observe(restarted, placements, runtime_missing=ids))
    assert {s.replica_id for s in stops(plan)} == set(ids)
    assert all("ray node" in s.reason and "changed" in s.reason for s in stops(plan))
    again = starts(plan)
    assert len(again) == 2
    assert {p.ray_node_id for p in again} <= {"new-n0", "new-n1"}
    # a node whose Ray id is unchanged keeps its replicas
    plan = run(desired, placements, observe(nodes, placements, ready=ids))
    assert not stops(plan) and not starts(plan)


def test_rolling_update_surges_one_and_removes_old_only_when_new_is_ready() -> None:
    nodes = [node("n0", gpus=8), node("n1", gpus=8)]
    v1 = make_spec(prefill=1, decode=2)
    placements = settle([record(v1)], nodes)
    ready = {p.replica_id for p in placements}
    v2 = dataclasses.replace(v1, engine_args={"note": "v2"})
    plan = run([record(v2, 2)], placements, observe(nodes, placements, ready=ready))
    new = starts(plan)
    assert len(new) == 2  # one per pool: max_surge 1
    assert not stops(plan)  # max_unavailable 0: every old one is still needed
    assert {p.template for p in new}.isdisjoint({p.template for p in placements})

    # the new replicas are ready: old ones go, one per pool, drained
    placements2 = placements + new
    now_ready = ready | {p.replica_id for p in new}
    plan = run([record(v2, 2)], placements2, observe(nodes, placements2, ready=now_ready))
    stopped = stops(plan)
    assert len(stopped) == 2
    assert all(s.drain and "rolling update" in s.reason for s in stopped)
    assert {s.replica_id for s in stopped} <= {p.replica_id for p in placements}


def test_scale_down_drains_the_highest_slot_and_delete_drains_everything() -> None:
    nodes = [node("n0", gpus=8), node("n1", gpus=8)]
    spec = make_spec(prefill=1, decode=3)
    placements = settle([record(spec)], nodes)
    ready = [p.replica_id for p in placements]
    smaller = make_spec(prefill=1, decode=2)
    plan = run([record(smaller, 2)], placements, observe(nodes, placements, ready=ready))
    stopped = stops(plan)
    assert len(stopped) == 1
    assert stopped[0].placement is not None
    assert stopped[0].placement.role is PoolRole.DECODE
    assert stopped[0].placement.index == 2
    assert stopped[0].drain

    plan = run([], placements, observe(nodes, placements, ready=ready, extra_runtime=["stray"]))
    assert {s.replica_id for s in stops(plan)} == {p.replica_id for p in placements} | {"stray"}
    assert all(s.drain for s in stops(plan))
    assert plan.statuses == {}


def test_beyond_capacity_says_why_per_node_and_places_what_fits() -> None:
    nodes = [node("n0"), node("n1", gpus=2), node("n2", state=SchedulingState.CORDONED)]
    plan = run([record(make_spec(prefill=1, decode=4))], [], observe(nodes))
    placed = starts(plan)
    assert len(placed) == 3  # 4 + 2 GPUs: three tp-2 replicas
    decode = next(p for p in plan.statuses["llm"].pools if p.role is PoolRole.DECODE)
    reasons = " | ".join(decode.unschedulable)
    assert "n2: " in reasons and "cordon" in reasons.lower()
    assert "n0: " in reasons and "n1: " in reasons
    progressing = condition(plan, "llm", "Progressing")
    assert (progressing.status, progressing.reason) == ("False", "Unschedulable")
    assert "n2" in progressing.message


def test_a_draining_node_is_evacuated_after_the_replacement_is_ready() -> None:
    nodes = [node("n0", gpus=8), node("n1", gpus=8)]
    desired = [record(make_spec(prefill=1, decode=1))]
    placements = settle(desired, nodes)
    ready = {p.replica_id for p in placements}
    draining = [nodes[0], node("n1", gpus=8, state=SchedulingState.DRAINING)]
    victims = {p.replica_id for p in placements if p.node_id == "n1"}
    plan = run(desired, placements, observe(draining, placements, ready=ready))
    assert not stops(plan)  # the replacement is not ready yet
    new = starts(plan)
    assert len(new) == len(victims)
    assert all(p.node_id == "n0" for p in new)
    both = placements + new
    plan = run(desired, both, observe(draining, both, ready=ready | {p.replica_id for p in new}))
    assert {s.replica_id for s in stops(plan)} == victims
    assert all(s.reason == "node draining" for s in stops(plan))

    # nowhere to go: the drained replica leaves anyway (the SRE asked for the node back)
    lone = [node("n1", gpus=8, state=SchedulingState.DRAINING)]
    only = [p for p in placements if p.node_id == "n1"]
    plan = run(desired, only, observe(lone, only, ready={p.replica_id for p in only}))
    assert {s.replica_id for s in stops(plan)} == {p.replica_id for p in only}


def test_condition_transition_time_moves_only_when_status_changes() -> None:
    nodes = [node("n0"), node("n1")]
    desired = [record(make_spec())]
    first = run(desired, [], observe(nodes))
    placements = starts(first)
    again = reconcile(desired, placements, observe(nodes, placements), PipelinePlacer(),
                      now=200.0, previous=first.statuses)  # fmt: skip
    before = first.statuses["llm"].condition("Available")
    after = again.statuses["llm"].condition("Available")
    assert before is not None and after is not None
    assert after.last_transition_time == before.last_transition_time == 100.0
    ready = [p.replica_id for p in placements]
    done = reconcile(desired, placements, observe(nodes, placements, ready=ready),
                     PipelinePlacer(), now=300.0, previous=again.statuses)  # fmt: skip
    available = done.statuses["llm"].condition("Available")
    assert available is not None
    assert (available.status, available.last_transition_time) == ("True", 300.0)


def test_max_unavailable_lets_old_replicas_go_before_new_ones_are_ready() -> None:
    nodes = [node("n0", gpus=8), node("n1", gpus=8)]
    v1 = make_spec(prefill=1, decode=2)
    placements = settle([record(v1)], nodes)
    ready = {p.replica_id for p in placements}
    v2 = dataclasses.replace(v1, engine_args={"note": "v2"})
    plan = run([record(v2, 2)], placements, observe(nodes, placements, ready=ready),
               config=ReconcileConfig(max_surge=1, max_unavailable=1))  # fmt: skip
    stopped = stops(plan)
    # decode may drop to 1 ready: one old decode goes now; prefill (1 replica) may drop to 0
    assert sum(1 for s in stopped if s.placement and s.placement.role is PoolRole.DECODE) == 1
