"""Free-GPU state for a placement run: per node, its free GPUs grouped by NVLink domain; per
pool, where its replicas are. Built once from nodes + allocations, then updated in place as
replicas are placed or released, so a run over many replicas costs O(nodes) per replica.

NVLink domains: GPUs sharing a non-empty ``Gpu.nvlink_domain`` form one domain. A GPU with an
empty domain is a domain of its own: the node agent always names domains (a GPU without
NVLink gets its own), so an empty one means the topology is unknown, and a TP group over
unknown links could land on PCIe and run several times slower. Such GPUs still take tp-1
replicas (and tp-1 pipeline stages).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence

from controlplane.core.deployments import PoolRole
from controlplane.core.model import Gpu, Node
from controlplane.core.nodes import LabelSelector
from controlplane.core.scheduling.framework import Allocation, GpuFit, GpuMiss, packing_score
from controlplane.errors import InvalidArgument

DomainKey = tuple[str, int]  # (nvlink_domain, -1), or ("", gpu index) for a lone GPU
PoolKey = tuple[str, PoolRole]


def _domain_key(gpu: Gpu) -> DomainKey:
    return (gpu.nvlink_domain, -1) if gpu.nvlink_domain else ("", gpu.index)


class NodeState:
    """One node's free GPUs during a run. Plugins read it; only ``ClusterState`` changes it."""

    __slots__ = (
        "_fits",
        "_gpus",
        "domains",
        "free_count",
        "health",
        "labels",
        "min_free_memory",
        "node",
        "node_id",
        "schedulable",
        "unhealthy",
    )

    def __init__(self, node: Node, allocated: Iterable[int]) -> None:
        self.node = node
        self.node_id = node.node_id
        self.labels: Mapping[str, str] = node.inventory.labels
        self.health = node.inventory.health
        self.schedulable = node.schedulable
        self._gpus = {g.index: g for g in node.inventory.gpus}
        self.unhealthy = sum(1 for g in node.inventory.gpus if not g.healthy)
        self.domains: dict[DomainKey, list[tuple[int, int]]] = {}
        """Free healthy GPUs per NVLink domain, as (index, free memory bytes), by index."""
        taken = set(allocated)
        for g in sorted(node.inventory.gpus, key=lambda g: g.index):
            if g.healthy and g.index not in taken:
                self.domains.setdefault(_domain_key(g), []).append((g.index, g.memory_free_bytes))
        self.free_count = 0
        self.min_free_memory = 0
        self._fits: dict[tuple[int, int, int], GpuFit | GpuMiss] = {}
        self._recount()

    def _recount(self) -> None:
        self.free_count = sum(len(v) for v in self.domains.values())
        self.min_free_memory = min(
            (mem for gpus in self.domains.values() for _, mem in gpus), default=0
        )
        self._fits.clear()

    @property
    def free_gpu_indices(self) -> tuple[int, ...]:
        return tuple(sorted(i for gpus in self.domains.values() for i, _ in gpus))

    def fit(self, gpus: int, tensor_parallel: int, memory_bytes: int) -> GpuFit | GpuMiss:
        """The GPUs this node would give a replica, or why it cannot. Cached until it changes.

        Rule: for each TP group in turn, the domain whose leftover packs best
        (``packing_score``; ties: fewer free GPUs, then first domain by GPU index), taking its
        lowest-indexed eligible GPUs. Every plugin sees this same choice.
        """
        key = (gpus, tensor_parallel, memory_bytes)
        cached = self._fits.get(key)
        if cached is None:
            cached = self._fits[key] = self._fit(gpus, tensor_parallel, memory_bytes)
        return cached

    def _fit(self, gpus: int, tp: int, memory_bytes: int) -> GpuFit | GpuMiss:
        if gpus == 0:
            return GpuFit((), (), 0.0)
        if memory_bytes <= self.min_free_memory:
            eligible = [[i for i, _ in v] for v in self.domains.values()]
        else:
            eligible = [[i for i, m in v if m >= memory_bytes] for v in self.domains.values()]
        eligible = [e for e in eligible if e]
        total = sum(len(e) for e in eligible)
        if total < gpus:
            return self._miss("capacity", total, eligible)
        taken = [0] * len(eligible)
        chosen: list[int] = []
        for _ in range(gpus // tp):
            best, best_key = -1, (0.0, 0)
            for d, e in enumerate(eligible):
                left = len(e) - taken[d]
                if left >= tp:
                    k = (-packing_score(left, tp), left)
                    if best < 0 or k < best_key:
                        best, best_key = d, k
            if best < 0:
                return self._miss("topology", total, eligible)
            chosen += eligible[best][taken[best] : taken[best] + tp]
            taken[best] += tp
        used = tuple((len(e), t) for e, t in zip(eligible, taken, strict=True) if t)
        packing = sum(packing_score(f, t) * t for f, t in used) / gpus
        return GpuFit(tuple(sorted(chosen)), used, packing)

    def _miss(self, kind: str, total: int, eligible: Sequence[list[int]]) -> GpuMiss:
        return GpuMiss(
            kind=kind,
            free=self.free_count,
            eligible=total,
            unhealthy=self.unhealthy,
            domain_free=tuple(sorted((len(e) for e in eligible), reverse=True)),
        )

    def _take(self, indices: Iterable[int]) -> None:
        drop = set(indices)
        for key in list(self.domains):
            left = [(i, m) for i, m in self.domains[key] if i not in drop]
            if left:
                self.domains[key] = left
            else:
                del self.domains[key]
        self._recount()

    def _give_back(self, indices: Iterable[int]) -> None:
        for i in indices:
            g = self._gpus.get(i)
            if g is None or not g.healthy:
                continue
            free = self.domains.setdefault(_domain_key(g), [])
            if all(j != i for j, _ in free):
                free.append((i, g.memory_free_bytes))
                free.sort()
        # keep domains ordered by their first GPU index, as at construction
        self.domains = dict(sorted(self.domains.items(), key=lambda kv: kv[1][0][0]))
        self._recount()


class ClusterState:
    """Every node's free GPUs and every pool's replica positions, kept in step.

    Node order is by node id, which is also every tie-break's order. Allocations naming a node
    that is not in ``nodes`` (gone) are kept but hold nothing; GPU indices a node does not have
    are ignored.
    """

    def __init__(self, nodes: Sequence[Node], allocations: Iterable[Allocation] = ()) -> None:
        by_id: dict[str, Node] = {}
        for n in nodes:
            if n.node_id in by_id:
                raise InvalidArgument(f"node {n.node_id!r} is listed twice")
            by_id[n.node_id] = n
        self._allocations: dict[tuple[str, PoolRole, int], Allocation] = {}
        used: dict[str, set[int]] = {}
        allocs = list(allocations)
        for a in allocs:
            if a.key in self._allocations:
                raise InvalidArgument(
                    f"replica {a.deployment}/{a.role}/{a.replica} is allocated twice"
                )
            self._allocations[a.key] = a
            used.setdefault(a.node_id, set()).update(a.gpu_indices)
        self.nodes: tuple[NodeState, ...] = tuple(
            NodeState(by_id[i], used.get(i, ())) for i in sorted(by_id)
        )
        self.by_id: dict[str, NodeState] = {ns.node_id: ns for ns in self.nodes}
        self._selected: dict[LabelSelector, frozenset[str]] = {}
        self._on_node: dict[PoolKey, Counter[str]] = {}
        self._in_domain: dict[PoolKey, Counter[tuple[str, str]]] = {}
        for a in allocs:
            self._count(a, +1)

    # --- reads for plugins -----------------------------------------------------------------

    def matching(self, selector: LabelSelector) -> frozenset[str]:
        """Ids of the nodes whose labels match ``selector`` (memoized: labels are fixed)."""
        ids = self._selected.get(selector)
        if ids is None:
            ids = self._selected[selector] = frozenset(
                ns.node_id for ns in self.nodes if selector.matches(ns.labels)
            )
        return ids

    def replicas_on_node(self, deployment: str, role: PoolRole, node_id: str) -> int:
        counts = self._on_node.get((deployment, role))
        return counts[node_id] if counts else 0

    def replicas_in(self, deployment: str, role: PoolRole, key: str, value: str) -> int:
        """Replicas of a pool on nodes labelled ``key=value`` (a rack, a zone)."""
        counts = self._in_domain.get((deployment, role))
        return counts[(key, value)] if counts else 0

    def pool_size(self, deployment: str, role: PoolRole) -> int:
        """Replicas of the pool placed on nodes that are still here."""
        counts = self._on_node.get((deployment, role))
        return counts.total() if counts else 0

    def pool_counts(
        self, deployment: str, role: PoolRole, keys: Sequence[str]
    ) -> tuple[Mapping[str, int], tuple[Mapping[str, int], ...]]:
        """The pool's replicas per node id, and for each of ``keys`` per label value.

        Fresh dicts holding only non-zero counts, valid until the next ``allocate`` or
        ``release``: a scorer reads them within one ``score`` call."""
        pool = (deployment, role)
        on_node = {k: n for k, n in self._on_node.get(pool, Counter()).items() if n}
        in_domain = self._in_domain.get(pool, Counter())
        per_key: dict[str, dict[str, int]] = {k: {} for k in keys}
        for (key, value), n in in_domain.items():
            if key in per_key and n:
                per_key[key][value] = n
        return on_node, tuple(per_key[k] for k in keys)

    def allocation(self, deployment: str, role: PoolRole, replica: int) -> Allocation | None:
        return self._allocations.get((deployment, role, replica))

    @property
    def allocations(self) -> tuple[Allocation, ...]:
        return tuple(self._allocations.values())

    # --- writes ----------------------------------------------------------------------------

    def allocate(self, allocation: Allocation) -> None:
        if allocation.key in self._allocations:
            raise InvalidArgument(
                f"replica {allocation.deployment}/{allocation.role}/{allocation.replica} "
                "is already allocated"
            )
        self._allocations[allocation.key] = allocation
        ns = self.by_id.get(allocation.node_id)
        if ns is not None:
            ns._take(allocation.gpu_indices)
        self._count(allocation, +1)

    def release(self, allocation: Allocation) -> None:
        """Undo ``allocate`` (or forget a recorded allocation): its GPUs are free again."""
        held = self._allocations.pop(allocation.key, None)
        if held is None:
            return
        ns = self.by_id.get(held.node_id)
        if ns is not None:
            still_used = {
                i
                for a in self._allocations.values()
                if a.node_id == held.node_id
                for i in a.gpu_indices
            }
            ns._give_back(i for i in held.gpu_indices if i not in still_used)
        self._count(held, -1)

    def _count(self, a: Allocation, delta: int) -> None:
        ns = self.by_id.get(a.node_id)
        if ns is None:
            return
        pool = (a.deployment, a.role)
        on_node = self._on_node.setdefault(pool, Counter())
        on_node[a.node_id] += delta
        in_domain = self._in_domain.setdefault(pool, Counter())
        for kv in ns.labels.items():
            in_domain[kv] += delta
