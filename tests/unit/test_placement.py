"""Placement: filter -> fit -> score -> pick, on hand-built nodes."""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence

import pytest

from controlplane.core.deployments import (
    Engine,
    ModelDeploymentSpec,
    Parallelism,
    Pool,
    PoolRole,
)
from controlplane.core.model import (
    GIB,
    Gpu,
    Node,
    NodeInventory,
    NodeSchedulingStatus,
    SchedulingState,
)
from controlplane.core.nodes import parse_selector
from controlplane.core.placement import (
    Allocation,
    ClusterState,
    Decision,
    Placement,
    ReplicaRequest,
    Unschedulable,
    default_profile,
    pending_requests,
    place,
    place_in,
    replica_requests,
)
from controlplane.core.scheduling.framework import packing_score
from controlplane.errors import InvalidArgument

D, P, A = PoolRole.DECODE, PoolRole.PREFILL, PoolRole.AGGREGATED


def node(
    node_id: str,
    gpus: int = 4,
    domain: int | None = None,
    labels: dict[str, str] | None = None,
    state: SchedulingState = SchedulingState.SCHEDULABLE,
    reason: str = "",
    free_gib: int = 80,
    unhealthy: Iterable[int] = (),
    domains: bool = True,
) -> Node:
    """``gpus`` GPUs of 80 GiB in NVLink domains of ``domain`` GPUs (default: one domain)."""
    size = domain or max(gpus, 1)
    bad = set(unhealthy)
    return Node(
        inventory=NodeInventory(
            node_id=node_id,
            gpus=tuple(
                Gpu(
                    index=i,
                    model="H100",
                    memory_total_bytes=80 * GIB,
                    memory_free_bytes=free_gib * GIB,
                    nvlink_domain=f"{node_id}/nvl{i // size}" if domains else "",
                    healthy=i not in bad,
                )
                for i in range(gpus)
            ),
            labels=labels or {},
        ),
        scheduling=NodeSchedulingStatus(state=state, reason=reason),
    )


def req(
    replica: int = 0,
    tp: int = 1,
    pp: int = 1,
    role: PoolRole = D,
    deployment: str = "llm",
    **kw: object,
) -> ReplicaRequest:
    return ReplicaRequest(
        deployment=deployment,
        role=role,
        replica=replica,
        gpus=tp * pp,
        tensor_parallel=tp,
        **kw,  # type: ignore[arg-type]
    )


def spec(
    tp: int = 1,
    pp: int = 1,
    prefill: int = 0,
    decode: int = 0,
    aggregated: int = 0,
    engine: Engine = Engine.VLLM,
) -> ModelDeploymentSpec:
    pools = [Pool(role, n, n, n) for role, n in ((P, prefill), (D, decode), (A, aggregated)) if n]
    return ModelDeploymentSpec(
        name="llm",
        model="llm",
        engine=engine,
        parallelism=Parallelism(tensor=tp, pipeline=pp),
        pools=tuple(pools),
    )


def placed(decisions: Sequence[Decision]) -> list[Placement]:
    out = []
    for d in decisions:
        assert isinstance(d, Placement), getattr(d, "message", d)
        out.append(d)
    return out


def domain_of(nodes: Sequence[Node], node_id: str, gpu: int) -> str:
    n = next(n for n in nodes if n.node_id == node_id)
    return next(g.nvlink_domain for g in n.inventory.gpus if g.index == gpu)


# --- filters and their reasons --------------------------------------------------------------


@pytest.mark.parametrize(
    ("nodes", "request_", "reasons"),
    [
        (  # tp 3 on 2-GPU nodes
            [node("n1", 2), node("n2", 2)],
            req(tp=3),
            ["n1: 2 free GPUs < tp 3", "n2: 2 free GPUs < tp 3"],
        ),
        (  # enough GPUs, but NVLink domains of 2
            [node("n1", 4, domain=2)],
            req(tp=3),
            ["n1: no NVLink domain with 3 free GPUs (largest 2)"],
        ),
        (
            [node("n1", 8, domain=4)],
            req(tp=8),
            ["n1: no NVLink domain with 8 free GPUs (largest 4)"],
        ),
        (  # pipeline stages: two TP groups of 4, but domains of 2
            [node("n1", 8, domain=2)],
            req(tp=4, pp=2),
            [
                "n1: no room for 2 TP groups of 4 GPUs in NVLink domains "
                "(free per domain: 2, 2, 2, 2)"
            ],
        ),
        ([node("n1", 4)], req(tp=4, pp=2), ["n1: 4 free GPUs < 8 (tp 4 x pp 2)"]),
        (  # GPUs without a named domain are domains of one
            [node("n1", 4, domains=False)],
            req(tp=2),
            ["n1: no NVLink domain with 2 free GPUs (largest 1)"],
        ),
        (
            [node("n1", state=SchedulingState.CORDONED, reason="disk swap")],
            req(),
            ["n1: cordoned (disk swap)"],
        ),
        ([node("n1", state=SchedulingState.DRAINING)], req(), ["n1: draining"]),
        ([node("n1", 2, unhealthy=(0, 1))], req(), ["n1: unhealthy"]),
        ([node("n1", 4, unhealthy=(0, 1))], req(tp=4), ["n1: 2 free GPUs < tp 4, 2 unhealthy"]),
        (
            [node("n1", 4, free_gib=30)],
            req(gpu_memory_bytes=40 * GIB),
            ["n1: 0 free GPUs with 40.0 GiB free memory < tp 1 (4 free in all)"],
        ),
        (
            [node("n1", labels={"gpu": "a100"}), node("n2")],
            req(node_selector=parse_selector("gpu=h100")),
            ["n1: does not match selector gpu=h100", "n2: does not match selector gpu=h100"],
        ),
        ([], req(), []),
    ],
)
def test_unschedulable_says_why_for_every_node(
    nodes: list[Node], request_: ReplicaRequest, reasons: list[str]
) -> None:
    (decision,) = place([request_], nodes)
    assert isinstance(decision, Unschedulable)
    assert list(decision.reasons) == reasons


def test_cordoned_node_gets_nothing_and_explain_says_why() -> None:
    nodes = [node("a", state=SchedulingState.CORDONED), node("b")]
    decisions = place([req(i) for i in range(3)], nodes, explain=True)
    assert {p.node_id for p in placed(decisions)} == {"b"}
    trace = decisions[0].trace
    assert trace is not None
    assert [str(r) for r in trace.rejections] == ["a: cordoned"]
    assert [c.node_id for c in trace.candidates] == ["b"]


def test_first_filter_to_reject_gives_the_reason() -> None:
    # cordoned and too small: the Schedulable filter runs first
    (d,) = place([req(tp=8)], [node("n1", 2, state=SchedulingState.CORDONED)])
    assert isinstance(d, Unschedulable) and d.reasons == ("n1: cordoned",)
    assert d.rejections[0].plugin == "Schedulable"


def test_unschedulable_message_groups_by_filter() -> None:
    nodes = [node("a", 2), node("b", 2), node("c", 8, state=SchedulingState.CORDONED)]
    (d,) = place([req(tp=4)], nodes)
    assert isinstance(d, Unschedulable)
    assert d.message == (
        "0/3 nodes can take llm/decode/0: 2 GpuCapacity (a: 2 free GPUs < tp 4), "
        "1 Schedulable (c: cordoned)"
    )


# --- the scenarios of the issue -------------------------------------------------------------


@pytest.mark.parametrize("domain", [None, 2])
def test_two_prefill_two_decode_tp2_on_two_nodes(domain: int | None) -> None:
    nodes = [node("n1", 4, domain=domain), node("n2", 4, domain=domain)]
    decisions = placed(place(pending_requests(spec(tp=2, prefill=2, decode=2)), nodes))
    assert [(p.request.role, p.request.replica) for p in decisions] == [
        (D, 0),
        (D, 1),
        (P, 0),
        (P, 1),
    ]
    used: set[tuple[str, int]] = set()
    for p in decisions:
        assert len(p.gpu_indices) == 2
        assert len({domain_of(nodes, p.node_id, g) for g in p.gpu_indices}) == 1
        for g in p.gpu_indices:
            assert (p.node_id, g) not in used
            used.add((p.node_id, g))
    by_role = {role: {p.node_id for p in decisions if p.request.role is role} for role in (P, D)}
    assert by_role == {D: {"n1", "n2"}, P: {"n1", "n2"}}  # each pool spread over both nodes


def test_scale_beyond_capacity_places_what_fits_and_says_why_for_the_rest() -> None:
    nodes = [node("n1", 4), node("n2", 4, domain=2)]
    decisions = place([req(i, tp=2) for i in range(5)], nodes)
    assert [isinstance(d, Placement) for d in decisions] == [True] * 4 + [False]
    last = decisions[4]
    assert isinstance(last, Unschedulable)
    assert last.reasons == ("n1: 0 free GPUs < tp 2", "n2: 0 free GPUs < tp 2")
    assert last.request.replica == 4


def test_prefill_lands_in_the_decode_pools_rack() -> None:
    nodes = [
        node("a1", labels={"rack": "ra", "zone": "z1"}),
        node("a2", labels={"rack": "ra", "zone": "z1"}),
        node("b1", labels={"rack": "rb", "zone": "z1"}),
        node("b2", labels={"rack": "rb", "zone": "z1"}),
    ]
    decode = Allocation("llm", D, 0, "b1", (0, 1, 2, 3))  # b1 is full
    (p,) = placed(place([req(role=P, near_role=D)], nodes, [decode]))
    assert p.node_id == "b2"
    assert p.scores["PeerProximity"] == pytest.approx(2 / 3)


def test_prefill_goes_elsewhere_when_the_decode_rack_is_full() -> None:
    nodes = [node("a1", labels={"rack": "ra"}), node("b1", labels={"rack": "rb"})]
    decode = Allocation("llm", D, 0, "b1", (0, 1, 2, 3))
    (p,) = placed(place([req(role=P, near_role=D)], nodes, [decode]))
    assert p.node_id == "a1"


def test_prefill_on_the_decode_node_scores_highest() -> None:
    nodes = [node("a1", labels={"rack": "ra"}), node("b1", labels={"rack": "rb"})]
    decode = Allocation("llm", D, 0, "b1", (0, 1))
    (p,) = placed(place([req(tp=2, role=P, near_role=D)], nodes, [decode]))
    assert (p.node_id, p.scores["PeerProximity"]) == ("b1", 1.0)


def test_packing_keeps_a_whole_8_gpu_domain_whole() -> None:
    # "a-whole" would win the node-id tie-break; packing must beat it
    nodes = [node("a-whole", 8), node("b-half", 8)]
    other = Allocation("other", A, 0, "b-half", (0, 1, 2, 3))
    (p,) = placed(place([req(tp=2)], nodes, [other]))
    assert (p.node_id, p.gpu_indices) == ("b-half", (4, 5))


@pytest.mark.parametrize(
    ("nodes", "tp", "expected"),
    [
        # a tp-4 replica takes a 4-GPU domain rather than breaking an 8-GPU one
        ([node("a-h100", 8), node("b-a100", 8, domain=4)], 4, "b-a100"),
        # a tp-1 replica takes a lone GPU (no NVLink) rather than breaking an NVLink domain
        ([node("a-h100", 8), node("b-l40s", 4, domain=1)], 1, "b-l40s"),
    ],
)
def test_packing_prefers_the_smaller_domain(nodes: list[Node], tp: int, expected: str) -> None:
    (p,) = placed(place([req(tp=tp)], nodes))
    assert p.node_id == expected


def test_best_fit_inside_a_node() -> None:
    # domains with 4 and 2 free GPUs: a tp-2 replica takes the 2, keeping the 4 for tp-4
    n = node("n1", 8, domain=4)
    held = Allocation("other", A, 0, "n1", (4, 5))
    (p,) = placed(place([req(tp=2)], [n], [held]))
    assert p.gpu_indices == (6, 7)


@pytest.mark.parametrize(
    ("free", "taken", "expected"),
    [
        (2, 2, 1.0),
        (6, 2, 0.9),
        (4, 2, 0.68),
        (8, 2, 0.16),
        (8, 8, 1.0),
        (4, 4, 1.0),
        (8, 4, 0.44),
        (1, 1, 1.0),
        (8, 1, 0.02),
        (0, 1, 0.0),
    ],
)
def test_packing_score(free: int, taken: int, expected: float) -> None:
    assert packing_score(free, taken) == pytest.approx(expected, abs=0.005)
    assert 0.0 <= packing_score(free, taken) <= 1.0


def test_pipeline_stages_may_use_different_domains() -> None:
    nodes = [node("n1", 8, domain=4)]
    (p,) = placed(place([req(tp=4, pp=2)], nodes))
    assert p.gpu_indices == tuple(range(8))


def test_existing_allocations_are_respected() -> None:
    nodes = [node("n1", 4)]
    held = Allocation("other", A, 0, "n1", (0, 2))
    (p,) = placed(place([req(tp=2)], nodes, [held]))
    assert p.gpu_indices == (1, 3)
    (d,) = place([req(tp=4)], nodes, [held])
    assert isinstance(d, Unschedulable) and d.reasons == ("n1: 2 free GPUs < tp 4",)


def test_allocations_on_gone_nodes_and_unknown_gpus_are_ignored() -> None:
    held = [Allocation("x", A, 0, "gone", (0,)), Allocation("x", A, 1, "n1", (7,))]
    (p,) = placed(place([req(tp=4)], [node("n1", 4)], held))
    assert p.gpu_indices == (0, 1, 2, 3)


def test_unhealthy_gpus_are_never_used() -> None:
    decisions = place([req(i) for i in range(3)], [node("n1", 4, unhealthy=(1,))])
    assert sorted(g for p in placed(decisions) for g in p.gpu_indices) == [0, 2, 3]


def test_memory_needs_pick_the_gpus_with_room() -> None:
    n = Node(
        inventory=NodeInventory(
            node_id="n1",
            gpus=tuple(
                Gpu(i, "H100", 80 * GIB, (10 if i < 2 else 70) * GIB, nvlink_domain="n1/nvl0")
                for i in range(4)
            ),
        )
    )
    (p,) = placed(place([req(tp=2, gpu_memory_bytes=60 * GIB)], [n]))
    assert p.gpu_indices == (2, 3)


def test_node_selector_and_affinity() -> None:
    nodes = [
        node("a", labels={"gpu": "h100", "zone": "z1"}),
        node("b", labels={"gpu": "h100", "zone": "z2"}),
        node("c", labels={"gpu": "l40s", "zone": "z2"}),
    ]
    r = req(node_selector=parse_selector("gpu=h100"), affinity={"zone": "z2"})
    (p,) = placed(place([r], nodes))
    assert p.node_id == "b"
    assert p.scores["Affinity"] == 1.0


def test_spread_goes_to_another_rack_before_another_node_in_the_same_rack() -> None:
    nodes = [
        node("a1", labels={"rack": "ra"}),
        node("a2", labels={"rack": "ra"}),
        node("b1", labels={"rack": "rb"}),
    ]
    decisions = placed(place([req(0), req(1)], nodes))
    assert [p.node_id for p in decisions] == ["a1", "b1"]


def test_cpu_engine_replicas_need_no_gpu() -> None:
    s = spec(aggregated=2, engine=Engine.CPU)
    decisions = placed(place(pending_requests(s), [node("laptop", 0), node("other", 0)]))
    assert [(p.node_id, p.gpu_indices) for p in decisions] == [("laptop", ()), ("other", ())]


# --- determinism, pickers, the API ------------------------------------------------------------


def cluster(n: int = 12) -> list[Node]:
    shapes = [(8, 8), (8, 4), (4, 1)]
    return [
        node(f"n{i:02d}", *shapes[i % 3], labels={"rack": f"r{i // 4}", "zone": f"z{i // 8}"})
        for i in range(n)
    ]


def mixed_requests() -> list[ReplicaRequest]:
    out: list[ReplicaRequest] = []
    for k, tp in enumerate((4, 2, 1, 8, 2)):
        s = dataclasses_replace_name(spec(tp=tp, prefill=2, decode=3), f"m{k}")
        out += pending_requests(s)
    return out


def dataclasses_replace_name(s: ModelDeploymentSpec, name: str) -> ModelDeploymentSpec:
    return ModelDeploymentSpec(
        name=name, model=s.model, engine=s.engine, parallelism=s.parallelism, pools=s.pools
    )


def summary(decisions: Sequence[Decision]) -> list[tuple[str, str, tuple[int, ...]]]:
    return [
        (d.request.key, d.node_id, d.gpu_indices)
        if isinstance(d, Placement)
        else (d.request.key, "-", ())
        for d in decisions
    ]


def test_same_inputs_same_decisions_whatever_the_node_order() -> None:
    nodes = cluster(18)
    first = summary(place(mixed_requests(), nodes))
    assert first == summary(place(mixed_requests(), nodes))
    shuffled = list(nodes)
    random.Random(3).shuffle(shuffled)
    assert summary(place(mixed_requests(), shuffled)) == first
    assert any(k == "-" for _, k, _ in first) is False


def test_weighted_random_picker_is_seeded() -> None:
    nodes = cluster(18)

    def run(seed: int) -> list[tuple[str, str, tuple[int, ...]]]:
        return summary(
            place(mixed_requests(), nodes, profile=default_profile(rng=random.Random(seed)))
        )

    assert run(1) == run(1)
    runs = {tuple(run(seed)) for seed in range(5)}
    assert len(runs) > 1
    for r in runs:  # still valid: no GPU handed out twice
        gpus = [(node_id, g) for _, node_id, idx in r for g in idx]
        assert len(gpus) == len(set(gpus))


def test_explain_trace_has_every_scorer_for_every_candidate() -> None:
    nodes = cluster(6)
    (p,) = placed(place([req(tp=4)], nodes, explain=True))
    assert p.trace is not None
    names = {"PoolSpread", "PeerProximity", "GpuPacking", "Affinity"}
    for c in p.trace.candidates:
        assert set(c.scores) == names
        assert all(0.0 <= v <= 1.0 for v in c.scores.values())
        assert 0.0 <= c.score <= 1.0
    best = max(p.trace.candidates, key=lambda c: c.score)
    assert (best.node_id, best.score) == (p.node_id, p.score)
    # the l40s nodes (4 lone GPUs) cannot hold tp 4
    assert [str(r) for r in p.trace.rejections] == [
        "n02: no NVLink domain with 4 free GPUs (largest 1)",
        "n05: no NVLink domain with 4 free GPUs (largest 1)",
    ]


def test_place_in_keeps_state_across_calls_and_release_undoes() -> None:
    state = ClusterState([node("n1", 4)])
    (a,) = placed(place_in(state, [req(0, tp=4)]))
    (d,) = place_in(state, [req(1, tp=4)])
    assert isinstance(d, Unschedulable)
    state.release(a.allocation())
    (b,) = placed(place_in(state, [req(1, tp=4)]))
    assert b.gpu_indices == (0, 1, 2, 3)
    assert [x.key for x in state.allocations] == [("llm", D, 1)]


def test_place_is_pure() -> None:
    nodes = cluster(6)
    held = [Allocation("x", A, 0, "n00", (0, 1))]
    first = summary(place(mixed_requests(), nodes, held))
    assert summary(place(mixed_requests(), nodes, held)) == first


@pytest.mark.parametrize(
    ("requests", "held", "message"),
    [
        ([req(0)], [Allocation("llm", D, 0, "n1", (0,))], "llm/decode/0 is already allocated"),
        ([req(0), req(0)], [], "llm/decode/0 is requested twice"),
    ],
)
def test_bad_calls(requests: list[ReplicaRequest], held: list[Allocation], message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        place(requests, [node("n1")], held)


def test_duplicate_nodes_are_an_error() -> None:
    with pytest.raises(InvalidArgument, match="node 'n1' is listed twice"):
        place([req()], [node("n1"), node("n1")])


@pytest.mark.parametrize(
    ("gpus", "tp", "memory", "message"),
    [
        (3, 2, 0, "llm/decode/0: gpus 3 is not a multiple of tp 2"),
        (-2, 1, 0, "gpus -2 is negative"),
        (1, 0, 0, "tensor_parallel must be >= 1"),
        (1, 1, -1, "gpu_memory_bytes is negative"),
    ],
)
def test_bad_requests(gpus: int, tp: int, memory: int, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        ReplicaRequest("llm", D, 0, gpus=gpus, tensor_parallel=tp, gpu_memory_bytes=memory)


def test_pending_requests_skip_allocated_replicas_and_put_decode_first() -> None:
    s = ModelDeploymentSpec(
        name="llm",
        model="llm",
        engine=Engine.VLLM,
        parallelism=Parallelism(tensor=2, pipeline=2),
        gpu_memory_bytes_per_gpu=30 * GIB,
        pools=(
            Pool(P, 2, 2, 2, affinity={"zone": "a"}),
            Pool(D, 3, 3, 3, node_selector=parse_selector("gpu=h100")),
            Pool(PoolRole.LONG_CONTEXT, 1, 1, 1, context_threshold_tokens=10_000),
        ),
    )
    held = [Allocation("llm", D, 1, "n1", (0, 1, 2, 3)), Allocation("other", P, 0, "n1", ())]
    got = pending_requests(s, held)
    assert [(r.role, r.replica, r.near_role) for r in got] == [
        (D, 0, P),
        (D, 2, P),
        (P, 0, D),
        (P, 1, D),
        (PoolRole.LONG_CONTEXT, 0, D),
    ]
    assert {(r.gpus, r.tensor_parallel, r.gpu_memory_bytes) for r in got} == {(4, 2, 30 * GIB)}
    assert got[0].node_selector == parse_selector("gpu=h100")
    assert got[2].affinity == {"zone": "a"}


def test_replica_requests_for_a_missing_pool() -> None:
    with pytest.raises(InvalidArgument, match="has no aggregated pool"):
        replica_requests(spec(prefill=1, decode=1), A, [0])
