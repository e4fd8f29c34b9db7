#!/usr/bin/env python
"""Placement at scale: the default profile against a first-fit baseline, same inputs, one run.

Inputs (seeded, so every run places the same thing):

* ``--nodes`` simulated nodes (default 2,000) of three shapes: 8x H100 80 GiB in one NVLink
  domain, 8x A100 80 GiB as two 4-GPU domains, 4x L40S 48 GiB without NVLink (a domain per
  GPU); labelled ``gpu``, ``rack`` (20 nodes a rack) and ``zone`` (25 racks a zone); about 1%
  cordoned and 1% with one unhealthy GPU.
* ``--deployments`` specs (default 200): tensor parallel 1/2/4/8, a few with 2 pipeline
  stages, 80% prefill + decode pools, 20% aggregated; per-GPU memory needs that rule L40S out
  for some; a few with ``node_selector: gpu=h100`` or a zone affinity. Sized so the cluster
  ends up nearly full, which is where placement quality shows.

Each deployment is placed after the one before it (``pending_requests`` order: decode, then
prefill), one ``place_in`` call per replica on one kept ``ClusterState``, so each decision is
timed alone. The baseline (below, ``FirstFit``) takes the first node by id that passes the
same hard constraints (schedulable, selector, free GPUs with enough memory, each TP group in
one NVLink domain), using its first domains that fit.

Reported for both: decision time per replica (p50 / p99 / max) and in total, placed and
unschedulable replicas, free GPUs at the end, and **stranded GPUs**: free GPUs that no tp-8
group (and no tp-4 group) can use because their NVLink domain has fewer free; also counted over
domains of at least 8 (resp. 4) GPUs only, where stranding is a placement choice rather than
the hardware's shape. Plus how many tp-8 / tp-4 groups still fit, and pools whose replicas
share one node (spread).

Usage (from the repository root)::

    .venv/bin/python benchmarks/placement.py            # writes benchmarks/results/placement.json
    .venv/bin/python benchmarks/placement.py --nodes 500 --deployments 50 --out /tmp/p.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))

from controlplane.core.deployments import (  # noqa: E402
    Engine,
    ModelDeploymentSpec,
    Parallelism,
    Pool,
    PoolRole,
)
from controlplane.core.model import (  # noqa: E402
    GIB,
    Gpu,
    Node,
    NodeInventory,
    NodeSchedulingStatus,
    SchedulingState,
)
from controlplane.core.nodes import LabelSelector, parse_selector  # noqa: E402
from controlplane.core.placement import (  # noqa: E402
    Allocation,
    ClusterState,
    Placement,
    ReplicaRequest,
    pending_requests,
    place_in,
)
from controlplane.core.scheduling.plugins import default_profile  # noqa: E402

DEFAULT_OUT = REPO / "benchmarks" / "results" / "placement.json"

SHAPES = (  # (label, weight, gpus, domain size (1 = no NVLink), memory GiB)
    ("h100", 0.40, 8, 8, 80),
    ("a100", 0.35, 8, 4, 80),
    ("l40s", 0.25, 4, 1, 48),
)


# --- inputs --------------------------------------------------------------------------------


def make_nodes(n: int, rng: random.Random) -> list[Node]:
    nodes: list[Node] = []
    for i in range(n):
        label, _, count, domain, mem = rng.choices(SHAPES, weights=[s[1] for s in SHAPES])[0]
        node_id = f"node-{i:05d}"
        rack = i // 20
        bad_gpu = rng.randrange(count) if rng.random() < 0.01 else -1
        gpus = tuple(
            Gpu(
                index=g,
                model=label.upper(),
                memory_total_bytes=mem * GIB,
                memory_free_bytes=mem * GIB - rng.randrange(0, 2) * GIB,
                nvlink_domain=f"{node_id}/nvl{g // domain}",
                healthy=g != bad_gpu,
            )
            for g in range(count)
        )
        state = SchedulingState.CORDONED if rng.random() < 0.01 else SchedulingState.SCHEDULABLE
        nodes.append(
            Node(
                inventory=NodeInventory(
                    node_id=node_id,
                    gpus=gpus,
                    labels={"gpu": label, "rack": f"r{rack:03d}", "zone": f"z{rack // 25}"},
                ),
                scheduling=NodeSchedulingStatus(state=state),
            )
        )
    return nodes


def make_specs(
    n: int, rng: random.Random, zones: int, scale: float = 1.0
) -> list[ModelDeploymentSpec]:
    """``n`` specs; ``scale`` multiplies every pool's size and nothing else (same draws)."""
    specs: list[ModelDeploymentSpec] = []
    for i in range(n):
        tp = rng.choices((1, 2, 4, 8), weights=(0.15, 0.25, 0.3, 0.3))[0]
        pp = 2 if tp in (2, 4) and rng.random() < 0.05 else 1
        mem_gib = rng.choice((20, 30, 40, 60, 70)) if tp <= 2 else rng.choice((40, 60, 70))
        selector = parse_selector("gpu=h100") if rng.random() < 0.1 else parse_selector("")
        affinity = {"zone": f"z{rng.randrange(zones)}"} if rng.random() < 0.2 else {}

        def pool(
            role: PoolRole,
            lo: int,
            hi: int,
            selector: LabelSelector = selector,
            affinity: dict[str, str] = affinity,
        ) -> Pool:
            r = max(1, round(rng.randint(lo, hi) * scale))
            return Pool(role, r, r, r, node_selector=selector, affinity=affinity)

        pools: tuple[Pool, ...]
        if rng.random() < 0.8:
            pools = (pool(PoolRole.PREFILL, 2, 12), pool(PoolRole.DECODE, 2, 16))
        else:
            pools = (pool(PoolRole.AGGREGATED, 2, 14),)
        specs.append(
            ModelDeploymentSpec(
                name=f"model-{i:03d}",
                model=f"org/model-{i:03d}",
                engine=Engine.SIM,
                parallelism=Parallelism(tensor=tp, pipeline=pp),
                gpu_memory_bytes_per_gpu=mem_gib * GIB,
                pools=pools,
            )
        )
    return specs


# --- the baseline ----------------------------------------------------------------------------


class FirstFit:
    """First node by id that passes the hard constraints; its first domains that fit."""

    def __init__(self, nodes: Sequence[Node]) -> None:
        self.nodes = sorted(nodes, key=lambda n: n.node_id)
        # per node: domains in GPU order, each a list of (index, free memory) still free
        self.free: list[list[list[tuple[int, int]]]] = []
        for node in self.nodes:
            domains: dict[str, list[tuple[int, int]]] = {}
            for g in node.inventory.gpus:
                if g.healthy:
                    domains.setdefault(g.nvlink_domain, []).append((g.index, g.memory_free_bytes))
            self.free.append(list(domains.values()))
        self.free_count = [sum(len(d) for d in doms) for doms in self.free]
        self.on_node: dict[tuple[str, PoolRole], dict[str, int]] = {}

    def place(self, r: ReplicaRequest) -> Allocation | None:
        for i, node in enumerate(self.nodes):
            if self.free_count[i] < r.gpus or not node.schedulable:
                continue
            if not r.node_selector.matches(node.inventory.labels):
                continue
            chosen: list[int] = []
            left = [[g for g, m in d if m >= r.gpu_memory_bytes] for d in self.free[i]]
            for _ in range(r.tp_groups):
                for d in left:
                    if len(d) >= r.tensor_parallel:
                        chosen += d[: r.tensor_parallel]
                        del d[: r.tensor_parallel]
                        break
                else:
                    break
            if len(chosen) < r.gpus:
                continue
            taken = set(chosen)
            self.free[i] = [[(g, m) for g, m in d if g not in taken] for d in self.free[i]]
            self.free_count[i] -= len(chosen)
            return Allocation(r.deployment, r.role, r.replica, node.node_id, tuple(chosen))
        return None


# --- measurements ----------------------------------------------------------------------------


def stranding(nodes: Sequence[Node], allocations: Sequence[Allocation]) -> dict[str, int]:
    used: dict[str, set[int]] = {}
    for a in allocations:
        used.setdefault(a.node_id, set()).update(a.gpu_indices)
    out = {"free_gpus": 0, "tp8_groups_left": 0, "tp4_groups_left": 0}
    for k in ("stranded_tp8", "stranded_tp4", "stranded_tp8_in_8gpu_domains"):
        out[k] = 0
    out["stranded_tp4_in_4gpu_domains"] = 0
    for node in nodes:
        if not node.schedulable:
            continue
        size: dict[str, int] = {}
        free: dict[str, int] = {}
        for g in node.inventory.gpus:
            size[g.nvlink_domain] = size.get(g.nvlink_domain, 0) + 1
            if g.healthy and g.index not in used.get(node.node_id, ()):
                free[g.nvlink_domain] = free.get(g.nvlink_domain, 0) + 1
        for d, f in free.items():
            out["free_gpus"] += f
            out["tp8_groups_left"] += f // 8
            out["tp4_groups_left"] += f // 4
            out["stranded_tp8"] += f % 8
            out["stranded_tp4"] += f % 4
            if size[d] >= 8:
                out["stranded_tp8_in_8gpu_domains"] += f % 8
            if size[d] >= 4:
                out["stranded_tp4_in_4gpu_domains"] += f % 4
    return out


def spread(allocations: Sequence[Allocation]) -> dict[str, int]:
    """Pools with >= 2 replicas, and how many of them have two replicas on one node."""
    pools: dict[tuple[str, PoolRole], list[str]] = {}
    for a in allocations:
        pools.setdefault((a.deployment, a.role), []).append(a.node_id)
    multi = [n for n in pools.values() if len(n) >= 2]
    return {
        "pools_with_2_plus_replicas": len(multi),
        "pools_sharing_a_node": sum(1 for n in multi if len(set(n)) < len(n)),
    }


def dist_ms(values: Sequence[float]) -> dict[str, float]:
    if not values:
        return {}
    ordered = sorted(values)

    def q(p: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(p * len(ordered)))] * 1e3, 4)

    return {
        "p50": q(0.50),
        "p90": q(0.90),
        "p99": q(0.99),
        "max": round(ordered[-1] * 1e3, 4),
        "mean": round(statistics.fmean(values) * 1e3, 4),
    }


@dataclass
class Run:
    times: list[float]
    cpu_times: list[float]
    allocations: list[Allocation]
    unschedulable: list[ReplicaRequest]
    total_s: float
    setup_s: float
    snapshots: list[dict[str, int]]
    first_unschedulable_at_gpus: int | None

    def report(self, nodes: Sequence[Node]) -> dict[str, Any]:
        return {
            "setup_s": round(self.setup_s, 4),
            "total_s": round(self.total_s, 3),
            "decision_ms": dist_ms(self.times),
            "decision_cpu_ms": dist_ms(self.cpu_times),
            "replicas_placed": len(self.allocations),
            "replicas_unschedulable": len(self.unschedulable),
            "unschedulable_by_tp": {
                str(tp): sum(1 for r in self.unschedulable if r.tensor_parallel == tp)
                for tp in (1, 2, 4, 8)
            },
            "first_unschedulable_at_gpus_allocated": self.first_unschedulable_at_gpus,
            "gpus_allocated": sum(len(a.gpu_indices) for a in self.allocations),
            **stranding(nodes, self.allocations),
            **spread(self.allocations),
            "snapshots": self.snapshots,
        }


def drive(
    nodes: Sequence[Node],
    specs: Sequence[ModelDeploymentSpec],
    setup: Callable[[], Callable[[ReplicaRequest], Allocation | None]],
) -> Run:
    """Place every spec's replicas in order, timing each decision; snapshot at 1/2 and 3/4."""
    t0 = time.perf_counter()
    place_one = setup()
    setup_s = time.perf_counter() - t0
    times: list[float] = []
    cpu_times: list[float] = []
    allocations: list[Allocation] = []
    unschedulable: list[ReplicaRequest] = []
    snapshots: list[dict[str, int]] = []
    snapshot_at = {len(specs) // 2, len(specs) * 3 // 4}
    first_fail: int | None = None
    gpus = 0
    t_start = time.perf_counter()
    for k, spec in enumerate(specs):
        if k in snapshot_at:
            pause = time.perf_counter()
            snapshots.append(
                {"deployments": k, "gpus_allocated": gpus, **stranding(nodes, allocations)}
            )
            t_start += time.perf_counter() - pause
        for r in pending_requests(spec):
            t, c = time.perf_counter(), time.thread_time()
            a = place_one(r)
            times.append(time.perf_counter() - t)
            cpu_times.append(time.thread_time() - c)
            if a is None:
                unschedulable.append(r)
                first_fail = gpus if first_fail is None else first_fail
            else:
                allocations.append(a)
                gpus += len(a.gpu_indices)
    total_s = time.perf_counter() - t_start + setup_s
    return Run(
        times, cpu_times, allocations, unschedulable, total_s, setup_s, snapshots, first_fail
    )


def default_placer(nodes: Sequence[Node]) -> Callable[[ReplicaRequest], Allocation | None]:
    state = ClusterState(nodes)
    profile = default_profile()

    def place_one(r: ReplicaRequest) -> Allocation | None:
        (decision,) = place_in(state, [r], profile)
        return decision.allocation() if isinstance(decision, Placement) else None

    return place_one


def run_load(
    nodes: Sequence[Node], specs: Sequence[ModelDeploymentSpec], scale: float
) -> dict[str, Any]:
    requests = [r for s in specs for r in pending_requests(s)]
    capacity = sum(1 for n in nodes if n.schedulable for g in n.inventory.gpus if g.healthy)
    default = drive(nodes, specs, lambda: default_placer(nodes))
    baseline = drive(nodes, specs, lambda: FirstFit(nodes).place)
    return {
        "pool_size_scale": scale,
        "inputs": {
            "replicas_requested": len(requests),
            "gpus_requested": sum(r.gpus for r in requests),
            "schedulable_healthy_gpus": capacity,
            "replicas_by_tp": {
                str(tp): sum(1 for r in requests if r.tensor_parallel == tp) for tp in (1, 2, 4, 8)
            },
        },
        "default_profile": default.report(nodes),
        "first_fit": baseline.report(nodes),
    }


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Placement at scale against a first-fit baseline")
    ap.add_argument("--nodes", type=int, default=2000)
    ap.add_argument("--deployments", type=int, default=200)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument(
        "--scales",
        default="0.75,1.0",
        help="pool-size multipliers, one run each (default: a load that fits, and one past it)",
    )
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args(argv)
    scales = [float(x) for x in args.scales.split(",") if x.strip()]

    nodes = make_nodes(args.nodes, random.Random(args.seed))
    zones = (max(args.nodes, 1) - 1) // 20 // 25 + 1  # racks of 20 nodes, zones of 25 racks
    started = datetime.now(UTC)
    loadavg_start = [round(x, 2) for x in os.getloadavg()]
    loads = []
    for scale in scales:
        specs = make_specs(args.deployments, random.Random(args.seed + 1), zones, scale)
        loads.append(run_load(nodes, specs, scale))
        print_summary(args.nodes, args.deployments, loads[-1])
    result: dict[str, Any] = {
        "benchmark": "placement",
        "started_at": started.isoformat(timespec="milliseconds"),
        "machine": {
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "loadavg_at_start": loadavg_start,
            "loadavg_at_end": [round(x, 2) for x in os.getloadavg()],
        },
        "parameters": {
            "nodes": args.nodes,
            "deployments": args.deployments,
            "seed": args.seed,
            "node_shapes": {s[0]: {"gpus": s[2], "nvlink_domain": s[3]} for s in SHAPES},
        },
        "loads": loads,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return 0


def _get(report: dict[str, Any], path: str) -> Any:
    value: Any = report
    for part in path.split("."):
        value = value[int(part)] if isinstance(value, list) else value.get(part)
        if value is None:
            return None
    return value


SUMMARY_ROWS = [
    ("decision p50 ms", "decision_ms.p50"),
    ("decision p99 ms", "decision_ms.p99"),
    ("decision max ms", "decision_ms.max"),
    ("decision CPU p50 ms", "decision_cpu_ms.p50"),
    ("decision CPU p99 ms", "decision_cpu_ms.p99"),
    ("total s", "total_s"),
    ("replicas placed", "replicas_placed"),
    ("replicas unschedulable", "replicas_unschedulable"),
    ("  of them tp-8", "unschedulable_by_tp.8"),
    ("first failure at GPUs", "first_unschedulable_at_gpus_allocated"),
    ("GPUs allocated", "gpus_allocated"),
    ("free GPUs", "free_gpus"),
    ("stranded for tp-8", "stranded_tp8"),
    ("  in 8-GPU domains", "stranded_tp8_in_8gpu_domains"),
    ("stranded for tp-4", "stranded_tp4"),
    ("  in 4+-GPU domains", "stranded_tp4_in_4gpu_domains"),
    ("tp-8 groups left", "tp8_groups_left"),
    ("tp-4 groups left", "tp4_groups_left"),
    ("pools sharing a node", "pools_sharing_a_node"),
]
for _i, _at in enumerate(("1/2", "3/4")):
    SUMMARY_ROWS += [
        (f"at {_at} of deployments:", ""),
        ("  GPUs allocated", f"snapshots.{_i}.gpus_allocated"),
        ("  stranded for tp-8", f"snapshots.{_i}.stranded_tp8"),
        ("    in 8-GPU domains", f"snapshots.{_i}.stranded_tp8_in_8gpu_domains"),
        ("  stranded for tp-4", f"snapshots.{_i}.stranded_tp4"),
        ("    in 4+-GPU domains", f"snapshots.{_i}.stranded_tp4_in_4gpu_domains"),
        ("  tp-8 groups left", f"snapshots.{_i}.tp8_groups_left"),
    ]


def print_summary(nodes: int, deployments: int, result: dict[str, Any]) -> None:
    inp = result["inputs"]
    print(
        f"\n{nodes} nodes, {deployments} deployments, pool sizes x{result['pool_size_scale']}: "
        f"{inp['replicas_requested']} replicas, {inp['gpus_requested']} GPUs requested of "
        f"{inp['schedulable_healthy_gpus']} schedulable"
    )
    d, f = result["default_profile"], result["first_fit"]
    print(f"{'':26}{'default':>12}{'first-fit':>12}")
    for label, path in SUMMARY_ROWS:
        if not path:
            print(label)
            continue
        print(f"{label:26}{_get(d, path)!s:>12}{_get(f, path)!s:>12}")


if __name__ == "__main__":
    raise SystemExit(main())
