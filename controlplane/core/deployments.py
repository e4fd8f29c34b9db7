"""Model deployments: what SREs declare should run, as frozen dataclasses, and its validation.

The shape mirrors ``proto/switchboard/v1/deployments.proto`` (``ModelDeploymentSpec``); the
YAML / JSON edge lives in ``controlplane/deployspec.py`` (``spec_from_dict`` / ``spec_to_dict``),
the gRPC edge converts the proto messages to and from these classes.

A deployment serves one model with one engine and one parallelism layout, in *pools* of
identical replicas, one pool per role:

* ``prefill`` + ``decode``: disaggregated serving; a deployment has both or neither;
* ``aggregated``: prefill and decode in one worker (alone, or next to a P/D pair);
* ``long_context``: requests whose prompt has at least ``context_threshold_tokens`` tokens;
  it needs a base pool (aggregated or prefill + decode) for everything else.

A replica is one engine instance: ``tensor * pipeline`` GPUs on one node, each TP group of
``tensor`` GPUs inside one NVLink domain (placement checks that; see
``controlplane/core/placement.py``). The ``cpu`` engine runs on CPUs only: its replicas take no
GPU and it must have ``tensor == pipeline == 1``.

Replica counts: ``replicas`` is the desired count now; ``[min_replicas, max_replicas]`` is the
range the SLA planner may move it in when the pool has ``autoscaling: true`` (then the planner
owns ``replicas``; ``keep_planner_replicas`` is the ownership rule). ``validate_spec`` is the
one place these rules live; every error names the field path the user wrote, e.g.
``spec.pools[decode].min_replicas 3 > max_replicas 2``. Rules that depend on the nodes
(``tensor 3`` on nodes with 2-GPU NVLink domains) are placement results, not spec errors.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType

from controlplane.core.nodes import (
    LabelSelector,
    Requirement,
    validate_label_key,
    validate_label_value,
)
from controlplane.core.sla import DEFAULT_SLA_CLASSES, SlaClass, index_sla_classes
from controlplane.errors import InvalidArgument

MAX_NAME_LEN = 63
_DNS_LABEL_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_SLA_CLASS_RE = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")
_UINT32_MAX = 2**32 - 1
_INT32_MIN, _INT32_MAX = -(2**31), 2**31 - 1
_UINT64_MAX = 2**64 - 1


class Engine(enum.StrEnum):
    VLLM = "vllm"
    TRTLLM = "trtllm"
    CPU = "cpu"  # a real small model on CPU; replicas take no GPU
    SIM = "sim"  # calibrated simulated engine; placed like a GPU engine


class PoolRole(enum.StrEnum):
    PREFILL = "prefill"
    DECODE = "decode"
    AGGREGATED = "aggregated"  # prefill and decode in one worker
    LONG_CONTEXT = "long_context"  # prompts of at least context_threshold_tokens


def _frozen_map(m: Mapping[str, str] | None) -> Mapping[str, str]:
    return MappingProxyType(dict(sorted((m or {}).items())))


@dataclass(frozen=True, slots=True)
class Parallelism:
    """How one replica splits the model. Every size is at least 1."""

    tensor: int = 1
    """GPUs per tensor-parallel group; a TP group must sit inside one NVLink domain."""
    pipeline: int = 1
    """Pipeline stages per replica, each a TP group; all stages on the same node."""
    expert: int = 1
    """Expert-parallel size for MoE models; must divide ``tensor * data``."""
    data: int = 1
    """Data-parallel size handed to the engine (MoE DP attention). Placement does not multiply
    GPUs by it: a replica holds ``tensor * pipeline`` GPUs, and replicas are the control
    plane's own data parallelism."""

    @property
    def gpus_per_replica(self) -> int:
        return self.tensor * self.pipeline


@dataclass(frozen=True, slots=True)
class Pool:
    """One pool of identical replicas of a deployment, by role.

    ``min_replicas <= replicas <= max_replicas``. ``deployspec.spec_from_dict`` fills an omitted
    ``min_replicas`` / ``max_replicas`` with ``replicas`` (a fixed-size pool), kept within the
    other bound when that one is given. A pool may have 0 replicas (scaled to zero)."""

    role: PoolRole
    replicas: int
    min_replicas: int
    max_replicas: int
    sla_classes: tuple[str, ...] = ()
    """SLA classes this pool serves; empty: every class."""
    node_selector: LabelSelector = field(default_factory=LabelSelector)
    """Hard constraint: only nodes whose labels match (``controlplane.core.nodes`` syntax)."""
    affinity: Mapping[str, str] = field(default_factory=dict)
    """Soft preferences: label -> value; nodes matching more of them score higher."""
    context_threshold_tokens: int = 0
    """For ``long_context`` only: prompts of at least this many tokens go to this pool."""
    autoscaling: bool = False
    """True: the SLA planner owns ``replicas`` within ``[min_replicas, max_replicas]``; an apply
    of the spec keeps the stored count (see ``controlplane/planner.py``). False: the spec's
    ``replicas`` stands and the planner only recommends."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "sla_classes", tuple(self.sla_classes))
        object.__setattr__(self, "affinity", _frozen_map(self.affinity))
        object.__setattr__(self, "node_selector", normalize_selector(self.node_selector))


@dataclass(frozen=True, slots=True)
class ModelDeploymentSpec:
    """What should run for one model. Mirrors ``switchboard.v1.ModelDeploymentSpec``."""

    name: str
    """DNS-1123 label; the deployment's identity."""
    model: str
    """Name tenants use in requests ("model" in the OpenAI API)."""
    engine: Engine
    pools: tuple[Pool, ...]
    model_path: str = ""
    """Weights location on the hosts; empty lets the engine resolve ``model`` itself."""
    parallelism: Parallelism = Parallelism()
    gpu_memory_bytes_per_gpu: int = 0
    """GPU memory each replica needs free on each of its GPUs; 0: any free GPU will do."""
    priority: int = 0
    """Higher places first when the caller orders work (placement itself never preempts)."""
    engine_args: Mapping[str, str] = field(default_factory=dict)
    """Free-form engine arguments passed to the engine adapter."""
    sla_classes: tuple[SlaClass, ...] = ()
    """The SLA classes requests for this model may name, with their targets; empty: the
    defaults (``controlplane.core.sla.DEFAULT_SLA_CLASSES``). Not part of the pools' template:
    changing a class never restarts a worker."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "pools", tuple(self.pools))
        object.__setattr__(self, "engine_args", _frozen_map(self.engine_args))
        object.__setattr__(self, "sla_classes", tuple(self.sla_classes))

    @property
    def effective_sla_classes(self) -> tuple[SlaClass, ...]:
        """The classes in force: the spec's own, else the defaults."""
        return self.sla_classes or DEFAULT_SLA_CLASSES

    @property
    def gpus_per_replica(self) -> int:
        """GPUs one replica holds: ``tensor * pipeline``, or 0 for the cpu engine."""
        return 0 if self.engine is Engine.CPU else self.parallelism.gpus_per_replica

    @property
    def disaggregated(self) -> bool:
        return self.pool(PoolRole.PREFILL) is not None

    def pool(self, role: PoolRole) -> Pool | None:
        """The pool with this role, or None."""
        for p in self.pools:
            if p.role is role:
                return p
        return None


# --- selectors -----------------------------------------------------------------------------


def normalize_selector(selector: LabelSelector) -> LabelSelector:
    """Sorted and deduplicated, so equal selectors compare equal (specs are diffed)."""
    reqs = tuple(sorted(set(selector.requirements), key=lambda r: (r.key, r.op, r.value)))
    return selector if reqs == selector.requirements else LabelSelector(reqs)


def selector_from_mapping(labels: Mapping[str, str]) -> LabelSelector:
    """``{"gpu": "h100"}`` -> the selector ``gpu=h100`` (the proto's map form)."""
    for key, value in labels.items():
        validate_label_key(key)
        validate_label_value(key, value)
    return normalize_selector(
        LabelSelector(tuple(Requirement(key=k, op="=", value=v) for k, v in labels.items()))
    )


def format_selector(selector: LabelSelector) -> str:
    """The inverse of ``nodes.parse_selector``: ``gpu=h100,!spot,zone!=b``."""
    parts: list[str] = []
    for r in selector.requirements:
        if r.op == "exists":
            parts.append(r.key)
        elif r.op == "!exists":
            parts.append(f"!{r.key}")
        elif r.op == "!=":
            parts.append(f"{r.key}!={r.value}")
        else:
            parts.append(f"{r.key}={r.value}")
    return ",".join(parts)


# --- validation ----------------------------------------------------------------------------


def validate_spec(spec: ModelDeploymentSpec) -> ModelDeploymentSpec:
    """Return ``spec`` when it is well formed; raise InvalidArgument naming the field path.

    Checks what can be known without nodes; whether the replicas fit is placement's answer.
    """
    _check_name(spec.name)
    if not spec.model.strip():
        raise InvalidArgument("spec.model is empty")
    if not isinstance(spec.engine, Engine):
        raise InvalidArgument(
            f"spec.engine {spec.engine!r} is unknown (one of {', '.join(e.value for e in Engine)})"
        )
    _check_parallelism(spec)
    if not 0 <= spec.gpu_memory_bytes_per_gpu <= _UINT64_MAX:
        raise InvalidArgument(
            f"spec.gpu_memory_bytes_per_gpu {spec.gpu_memory_bytes_per_gpu} is negative"
            if spec.gpu_memory_bytes_per_gpu < 0
            else f"spec.gpu_memory_bytes_per_gpu {spec.gpu_memory_bytes_per_gpu} is too large"
        )
    if not _INT32_MIN <= spec.priority <= _INT32_MAX:
        raise InvalidArgument(f"spec.priority {spec.priority} is outside the int32 range")
    for key in spec.engine_args:
        if not key.strip():
            raise InvalidArgument("spec.engine_args has an empty key")
    _check_sla_classes(spec)
    _check_pools(spec)
    return spec


def _check_sla_classes(spec: ModelDeploymentSpec) -> None:
    """Names unique; every class a pool names is defined (when the spec defines its own)."""
    try:
        defined = index_sla_classes(spec.effective_sla_classes)
    except InvalidArgument as e:
        raise InvalidArgument(f"spec.{e}") from None
    if not spec.sla_classes:
        return  # pools may name any class; the defaults are not a closed list for them
    for pool in spec.pools:
        for name in pool.sla_classes:
            if name not in defined:
                raise InvalidArgument(
                    f"spec.pools[{pool.role.value}].sla_classes: {name!r} is not one of the "
                    f"deployment's sla_classes ({', '.join(defined)})"
                )


def _check_name(name: str) -> None:
    if not name:
        raise InvalidArgument("spec.name is empty")
    if len(name) > MAX_NAME_LEN:
        raise InvalidArgument(f"spec.name {name[:20]!r}... is longer than {MAX_NAME_LEN}")
    if not _DNS_LABEL_RE.match(name):
        raise InvalidArgument(
            f"spec.name {name!r} must be a DNS-1123 label: lowercase alphanumerics or '-', "
            "starting and ending with an alphanumeric"
        )


def _check_parallelism(spec: ModelDeploymentSpec) -> None:
    par = spec.parallelism
    for name in ("tensor", "pipeline", "expert", "data"):
        value: int = getattr(par, name)
        if value < 1:
            raise InvalidArgument(f"spec.parallelism.{name} must be >= 1, got {value}")
        if value > _UINT32_MAX:
            raise InvalidArgument(f"spec.parallelism.{name} {value} is too large")
    if (par.tensor * par.data) % par.expert:
        raise InvalidArgument(
            f"spec.parallelism.expert {par.expert} must divide tensor * data "
            f"= {par.tensor * par.data}"
        )
    if spec.engine is Engine.CPU and par.gpus_per_replica != 1:
        raise InvalidArgument(
            f"spec.parallelism: the cpu engine runs one process per replica; tensor "
            f"{par.tensor} and pipeline {par.pipeline} must both be 1"
        )


def _check_pools(spec: ModelDeploymentSpec) -> None:
    if not spec.pools:
        raise InvalidArgument("spec.pools is empty: a deployment needs at least one pool")
    seen: set[PoolRole] = set()
    for i, pool in enumerate(spec.pools):
        if not isinstance(pool.role, PoolRole):
            raise InvalidArgument(
                f"spec.pools[{i}].role {pool.role!r} is unknown "
                f"(one of {', '.join(r.value for r in PoolRole)})"
            )
        where = f"spec.pools[{pool.role.value}]"
        if pool.role in seen:
            raise InvalidArgument(f"{where}: duplicate pool role {pool.role.value!r}")
        seen.add(pool.role)
        _check_pool(where, pool)
    has_p, has_d = PoolRole.PREFILL in seen, PoolRole.DECODE in seen
    if has_p != has_d:
        have, missing = ("prefill", "decode") if has_p else ("decode", "prefill")
        raise InvalidArgument(
            f"spec.pools: a {have} pool needs a {missing} pool (disaggregated serving has both)"
        )
    if not has_p and PoolRole.AGGREGATED not in seen:
        raise InvalidArgument(
            "spec.pools: needs an aggregated pool or a prefill + decode pair "
            "(a long_context pool only takes long prompts)"
        )


def _check_pool(where: str, pool: Pool) -> None:
    for name in ("replicas", "min_replicas", "max_replicas"):
        value: int = getattr(pool, name)
        if value < 0:
            raise InvalidArgument(f"{where}.{name} {value} is negative")
        if value > _UINT32_MAX:
            raise InvalidArgument(f"{where}.{name} {value} is too large")
    if pool.min_replicas > pool.max_replicas:
        raise InvalidArgument(
            f"{where}.min_replicas {pool.min_replicas} > max_replicas {pool.max_replicas}"
        )
    if not pool.min_replicas <= pool.replicas <= pool.max_replicas:
        raise InvalidArgument(
            f"{where}.replicas {pool.replicas} is outside "
            f"[min_replicas {pool.min_replicas}, max_replicas {pool.max_replicas}]"
        )
    seen: set[str] = set()
    for name in pool.sla_classes:
        if not name or len(name) > 63 or not _SLA_CLASS_RE.match(name):
            raise InvalidArgument(
                f"{where}.sla_classes: {name!r} must be 1-63 alphanumerics, '-', '_' or '.'"
            )
        if name in seen:
            raise InvalidArgument(f"{where}.sla_classes: duplicate {name!r}")
        seen.add(name)
    for r in pool.node_selector.requirements:
        try:
            validate_label_key(r.key)
            validate_label_value(r.key, r.value)
        except InvalidArgument as e:
            raise InvalidArgument(f"{where}.node_selector: {e}") from None
    for key, label_value in pool.affinity.items():
        try:
            validate_label_key(key)
            validate_label_value(key, label_value)
        except InvalidArgument as e:
            raise InvalidArgument(f"{where}.affinity: {e}") from None
    if pool.role is PoolRole.LONG_CONTEXT:
        if pool.context_threshold_tokens <= 0:
            raise InvalidArgument(
                f"{where}.context_threshold_tokens must be > 0 for a long_context pool, "
                f"got {pool.context_threshold_tokens}"
            )
        if pool.context_threshold_tokens > _UINT32_MAX:
            raise InvalidArgument(f"{where}.context_threshold_tokens is too large")
    elif pool.context_threshold_tokens:
        raise InvalidArgument(
            f"{where}.context_threshold_tokens is only for a long_context pool, "
            f"got {pool.context_threshold_tokens}"
        )


# --- field ownership --------------------------------------------------------------------------


def keep_planner_replicas(
    new: ModelDeploymentSpec, stored: ModelDeploymentSpec | None
) -> ModelDeploymentSpec:
    """A spec edit of a deployment whose pool is autoscaled keeps the stored ``replicas`` of that
    pool (clamped into the edit's ``[min_replicas, max_replicas]``) instead of the document's:
    the planner owns that one field, the edit owns the rest. A pool that just turned autoscaling
    on takes the document's count."""
    if stored is None:
        return new
    pools = []
    for p in new.pools:
        old = stored.pool(p.role)
        if p.autoscaling and old is not None and old.autoscaling:
            kept = max(p.min_replicas, min(p.max_replicas, old.replicas))
            pools.append(replace(p, replicas=kept))
        else:
            pools.append(p)
    return replace(new, pools=tuple(pools))
