"""The placement framework's data and plugin contracts.

A placement run takes ``ReplicaRequest`` s one at a time. For each, the nodes go through the
profile's ``Filter`` s (each can say *why* it dropped a node), the survivors get their GPUs for
the replica (``NodeState.fit``: the one NVLink-aware assignment rule, shared by every plugin)
and are rated by every ``Scorer`` in [0, 1]; the ``Picker`` chooses. Plugins work on the whole
candidate list at once, as llm-d's do: one call per plugin per replica, not one per node.
``placement.py`` runs that pipeline; ``plugins.py`` holds the stock plugins; ``state.py`` the
mutable free-GPU state.

Plugins are small, pure and synchronous: no I/O, no clock, no global random (a random picker
gets its ``random.Random`` injected). They must not mutate the state they are shown.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Protocol

from controlplane.core.deployments import PoolRole
from controlplane.core.nodes import LabelSelector
from controlplane.errors import InvalidArgument

if TYPE_CHECKING:
    from controlplane.core.scheduling.state import ClusterState, NodeState


@dataclass(frozen=True, slots=True)
class ReplicaRequest:
    """One replica to place: what it needs and what it would like.

    The replica takes ``gpus`` GPUs on one node, as ``gpus // tensor_parallel`` groups of
    ``tensor_parallel`` GPUs, each group inside one NVLink domain, each GPU with at least
    ``gpu_memory_bytes`` free. ``gpus == 0`` (the cpu engine) needs only a schedulable node.
    """

    deployment: str
    role: PoolRole
    replica: int
    gpus: int = 1
    tensor_parallel: int = 1
    gpu_memory_bytes: int = 0
    """Free memory each of its GPUs must have; 0: any."""
    node_selector: LabelSelector = field(default_factory=LabelSelector)
    """Hard: only nodes whose labels match."""
    affinity: Mapping[str, str] = field(default_factory=dict)
    """Soft: label -> value the replica prefers its node to have."""
    near_role: PoolRole | None = None
    """Prefer nodes close (same node, then same topology domain) to this pool of the same
    deployment, e.g. a prefill replica near the decode pool its KV cache goes to."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "affinity", MappingProxyType(dict(sorted(self.affinity.items()))))
        if self.tensor_parallel < 1:
            raise InvalidArgument(f"{self.key}: tensor_parallel must be >= 1")
        if self.gpus < 0:
            raise InvalidArgument(f"{self.key}: gpus {self.gpus} is negative")
        if self.gpus % self.tensor_parallel:
            raise InvalidArgument(
                f"{self.key}: gpus {self.gpus} is not a multiple of tp {self.tensor_parallel}"
            )
        if self.gpu_memory_bytes < 0:
            raise InvalidArgument(f"{self.key}: gpu_memory_bytes is negative")

    @property
    def key(self) -> str:
        """``deployment/role/replica``, as logs and reasons name it."""
        return f"{self.deployment}/{self.role.value}/{self.replica}"

    @property
    def tp_groups(self) -> int:
        return self.gpus // self.tensor_parallel


@dataclass(frozen=True, slots=True)
class Allocation:
    """GPUs held by one replica on one node: what the reconciler records and feeds back."""

    deployment: str
    role: PoolRole
    replica: int
    node_id: str
    gpu_indices: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "gpu_indices", tuple(sorted(self.gpu_indices)))

    @property
    def key(self) -> tuple[str, PoolRole, int]:
        return (self.deployment, self.role, self.replica)


@dataclass(frozen=True, slots=True)
class GpuFit:
    """The GPUs a node would give a replica (``NodeState.fit``).

    ``domains``: for each NVLink domain it draws from, ``(free before, taken)``, counting only
    GPUs with enough free memory; ``packing`` rates the leftovers in [0, 1] (see
    ``packing_score``): 1 when the replica fills its domains exactly.
    """

    gpu_indices: tuple[int, ...]
    domains: tuple[tuple[int, int], ...]
    packing: float


@dataclass(frozen=True, slots=True)
class GpuMiss:
    """Why a node cannot give a replica its GPUs.

    ``kind`` is ``"capacity"`` (too few free GPUs with enough memory) or ``"topology"`` (enough
    GPUs, but no NVLink domain, or not enough of them, holds a whole TP group).
    """

    kind: str
    free: int
    """Free healthy GPUs on the node, memory aside."""
    eligible: int
    """Free healthy GPUs with enough free memory."""
    unhealthy: int
    domain_free: tuple[int, ...]
    """Eligible GPUs per NVLink domain, largest first."""


GROUP_SIZES = (2, 4, 8)
"""TP group sizes whose room packing protects; losing room for one costs its size."""
_GROUP_COST = sum(GROUP_SIZES)


def packing_score(free_before: int, taken: int) -> float:
    """How well taking ``taken`` of a domain's ``free_before`` GPUs packs, in [0, 1].

    Mostly (0.85): how much room for *other* TP groups of 2, 4 and 8 the placement destroys,
    beyond the groups its own GPUs make up. Taking 2 of 8 free GPUs leaves 6: room for one
    tp-8 and one tp-4 group is gone, so the score drops by (8 + 4) / 14; taking 2 of 6 leaves
    4, losing nothing a 2-GPU replica must not lose. The rest (0.15) is plain best fit,
    ``taken / free_before``, which among equals fills the fuller domain. For a tp-2 replica:
    2 free -> 1.0, 3 -> 0.95, 6 -> 0.9, 4 -> 0.68, 5 -> 0.67, 8 -> 0.16; for tp-1, a lone GPU
    1.0, a domain with 7 free 0.87, a whole 4-GPU domain 0.52, a whole 8-GPU one 0.02.
    """
    if free_before <= 0:
        return 0.0
    left = free_before - taken
    lost = 0
    for size in GROUP_SIZES:
        if free_before // size - left // size > taken // size:
            lost += size
    return 0.85 * (1.0 - lost / _GROUP_COST) + 0.15 * taken / free_before


class Filter(Protocol):
    """Removes nodes that cannot take a replica (llm-d's ``Filter``, with reasons).

    ``filter`` gets the candidates (sorted by node id) and returns those that pass, in the
    same order. It runs for every replica over up to every node: keep it a cheap pass.
    ``reason`` is asked only about nodes ``filter`` dropped, when the reasons are wanted (no
    node fits, or ``explain``): why not, without the node id ("cordoned"). Filters run in
    profile order, so a node's reason comes from the first filter that drops it.
    """

    name: str

    def filter(
        self, request: ReplicaRequest, nodes: Sequence[NodeState], cluster: ClusterState
    ) -> Sequence[NodeState]: ...

    def reason(self, request: ReplicaRequest, node: NodeState, cluster: ClusterState) -> str: ...


class Scorer(Protocol):
    """Rates the nodes that passed every filter (llm-d's ``Scorer``).

    Returns one value in [0, 1] per node, higher better, in the order given; ``fits[i]`` is
    the GPUs ``nodes[i]`` would give. A scorer that rates every node alike for this request
    (no affinity asked, no peer placed yet) may return a single number instead.
    """

    name: str

    def score(
        self,
        request: ReplicaRequest,
        nodes: Sequence[NodeState],
        fits: Sequence[GpuFit],
        cluster: ClusterState,
    ) -> Sequence[float] | float: ...


class Picker(Protocol):
    """Chooses among scored nodes. ``node_ids`` come sorted; returns an index into them."""

    name: str

    def pick(self, node_ids: Sequence[str], scores: Sequence[float]) -> int: ...


@dataclass(frozen=True, slots=True)
class WeightedScorer:
    scorer: Scorer
    weight: float


@dataclass(frozen=True, slots=True)
class PlacementProfile:
    """Which plugins run, with what weights. A node's score is the weighted mean of its
    scorers' values, so it stays in [0, 1]."""

    name: str
    filters: tuple[Filter, ...]
    scorers: tuple[WeightedScorer, ...]
    picker: Picker

    def __post_init__(self) -> None:
        if any(ws.weight < 0 for ws in self.scorers):
            raise InvalidArgument(f"profile {self.name}: a scorer weight is negative")
        names = [ws.scorer.name for ws in self.scorers]
        if len(set(names)) != len(names):
            raise InvalidArgument(f"profile {self.name}: scorer names repeat: {names}")
