"""The YAML / JSON edge of model deployments: dict <-> ``ModelDeploymentSpec``.

``spec_from_dict`` parses what a user wrote (YAML, JSON, a stored etcd value) with pydantic v2,
strictly and with ``extra="forbid"``, so a typo is named rather than ignored; then
``validate_spec`` checks the rules. Every error is an ``InvalidArgument`` whose message names
the field path, pools by role: ``spec.pools[decode].replcas: unknown field (known: ...)``.
``spec_to_dict`` is its inverse: JSON-ready, every field present, and
``spec_from_dict(spec_to_dict(s)) == s``, so the control plane stores specs as this JSON.

The shape (the document *is* the spec; field names follow ``deployments.proto``)::

    name: llama-70b                      # DNS-1123 label, required
    model: meta-llama/Llama-3.1-70B      # name tenants use in requests, required
    model_path: /models/llama-3.1-70b    # weights on the hosts; default ""
    engine: vllm                         # vllm | trtllm | cpu | sim, required
    parallelism:                         # every size defaults to 1
      tensor: 4                          # GPUs per TP group, inside one NVLink domain
      pipeline: 1                        # a replica holds tensor * pipeline GPUs on one node
      expert: 1
      data: 1
    gpu_memory_bytes_per_gpu: 60Gi       # bytes, or a quantity: Ki Mi Gi Ti (1024^n), K M G T
    priority: 100                        # int32, default 0
    engine_args:                         # str -> str; numbers and booleans become strings
      max_model_len: 32768
    sla_classes:                         # default: {} (interactive, standard, batch)
      interactive: {priority: 0, ttft_p95_ms: 300, itl_p95_ms: 40, queue_timeout_s: 2}
      batch: {priority: 2, deadline_s: 3600, queue_timeout_s: 3600}
    pools:                               # one per role, at least one
      - role: decode                     # prefill | decode | aggregated | long_context
        replicas: 4
        min_replicas: 2                  # default: replicas (fixed size)
        max_replicas: 8                  # default: replicas
        autoscaling: true                # the SLA planner owns replicas; default false
        sla_classes: [interactive]       # default: [] (every class)
        node_selector: gpu=h100,!spot    # selector string or a mapping {gpu: h100}
        affinity: {zone: a}              # soft: nodes with these labels score higher
      - role: prefill
        replicas: 2
      - role: long_context
        replicas: 1
        context_threshold_tokens: 32768  # required (> 0) for long_context only

A ``prefill`` pool needs a ``decode`` pool and the reverse; a ``long_context`` pool needs an
``aggregated`` pool or a prefill + decode pair next to it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Annotated, Any, TypeVar

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from controlplane.core.deployments import (
    Engine,
    ModelDeploymentSpec,
    Parallelism,
    Pool,
    PoolRole,
    format_selector,
    selector_from_mapping,
    validate_spec,
)
from controlplane.core.nodes import LabelSelector, parse_selector
from controlplane.core.sla import SlaClass, sla_classes_from_dict, sla_classes_to_dict
from controlplane.errors import InvalidArgument

_E = TypeVar("_E", Engine, PoolRole)
_QUANTITY_RE = re.compile(r"^\s*(\d+)\s*([KMGT]i?)?\s*$")
_UNITS = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
_UNITS |= {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


def _scalar_to_str(value: Any) -> Any:
    """YAML turns ``max_model_len: 32768`` into an int and ``eager: true`` into a bool."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    return value


def _str_map(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _scalar_to_str(v) for k, v in value.items()}
    return value


def _quantity(value: Any) -> Any:
    if isinstance(value, str):
        m = _QUANTITY_RE.match(value)
        if not m:
            raise ValueError(f"{value!r} is not a byte count or a quantity like 80Gi")
        return int(m.group(1)) * _UNITS[m.group(2) or ""]
    return value


StrMap = Annotated[dict[str, str], BeforeValidator(_str_map)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class ParallelismDoc(_Model):
    tensor: int = 1
    pipeline: int = 1
    expert: int = 1
    data: int = 1


class PoolDoc(_Model):
    role: str
    replicas: int = 1
    min_replicas: int | None = None
    max_replicas: int | None = None
    sla_classes: list[str] = Field(default_factory=list)
    node_selector: str | StrMap = ""
    affinity: StrMap = Field(default_factory=dict)
    context_threshold_tokens: int = 0
    autoscaling: bool = False


class SpecDoc(_Model):
    name: str
    model: str
    engine: str
    pools: list[PoolDoc]
    model_path: str = ""
    parallelism: ParallelismDoc = Field(default_factory=ParallelismDoc)
    gpu_memory_bytes_per_gpu: Annotated[int, BeforeValidator(_quantity)] = 0
    priority: int = 0
    engine_args: StrMap = Field(default_factory=dict)
    sla_classes: dict[str, Any] = Field(default_factory=dict)


def spec_from_dict(data: Mapping[str, Any]) -> ModelDeploymentSpec:
    """Parse and validate a spec written as a mapping (YAML, JSON); raise InvalidArgument."""
    if not isinstance(data, Mapping):
        raise InvalidArgument(f"spec must be a mapping, got {type(data).__name__}")
    try:
        doc = SpecDoc.model_validate(dict(data))
    except ValidationError as e:
        raise InvalidArgument(_message(e, data)) from None
    return validate_spec(
        ModelDeploymentSpec(
            name=doc.name,
            model=doc.model,
            model_path=doc.model_path,
            engine=_enum(Engine, doc.engine, "spec.engine"),
            parallelism=Parallelism(
                tensor=doc.parallelism.tensor,
                pipeline=doc.parallelism.pipeline,
                expert=doc.parallelism.expert,
                data=doc.parallelism.data,
            ),
            gpu_memory_bytes_per_gpu=doc.gpu_memory_bytes_per_gpu,
            pools=tuple(_pool(i, p) for i, p in enumerate(doc.pools)),
            priority=doc.priority,
            engine_args=doc.engine_args,
            sla_classes=_sla_classes(doc.sla_classes),
        )
    )


def _sla_classes(doc: Mapping[str, Any]) -> tuple[SlaClass, ...]:
    if not doc:
        return ()
    try:
        return sla_classes_from_dict(doc)
    except InvalidArgument as e:
        raise InvalidArgument(f"spec.{e}") from None


def spec_from_yaml(text: str, source: str = "spec") -> ModelDeploymentSpec:
    """``spec_from_dict`` of a YAML document; ``source`` (a file name) prefixes YAML errors."""
    try:
        data: Any = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise InvalidArgument(f"{source}: not valid YAML: {e}") from None
    if not isinstance(data, Mapping):
        raise InvalidArgument(f"{source}: the document must be a mapping (the spec)")
    return spec_from_dict(data)


def spec_to_dict(spec: ModelDeploymentSpec) -> dict[str, Any]:
    """JSON-ready form with every field; ``spec_from_dict`` reads it back to an equal spec."""
    par = spec.parallelism
    return {
        "name": spec.name,
        "model": spec.model,
        "model_path": spec.model_path,
        "engine": spec.engine.value,
        "parallelism": {
            "tensor": par.tensor,
            "pipeline": par.pipeline,
            "expert": par.expert,
            "data": par.data,
        },
        "gpu_memory_bytes_per_gpu": spec.gpu_memory_bytes_per_gpu,
        "priority": spec.priority,
        "engine_args": dict(spec.engine_args),
        "sla_classes": sla_classes_to_dict(spec.sla_classes),
        "pools": [
            {
                "role": p.role.value,
                "replicas": p.replicas,
                "min_replicas": p.min_replicas,
                "max_replicas": p.max_replicas,
                "sla_classes": list(p.sla_classes),
                "node_selector": format_selector(p.node_selector),
                "affinity": dict(p.affinity),
                "context_threshold_tokens": p.context_threshold_tokens,
                "autoscaling": p.autoscaling,
            }
            for p in spec.pools
        ],
    }


# --- helpers -------------------------------------------------------------------------------


def _enum(cls: type[_E], value: str, where: str) -> _E:
    try:
        return cls(value)
    except ValueError:
        known = ", ".join(m.value for m in cls)
        raise InvalidArgument(f"{where} {value!r} is unknown (one of {known})") from None


def _pool(index: int, doc: PoolDoc) -> Pool:
    role = _enum(PoolRole, doc.role, f"spec.pools[{index}].role")
    where = f"spec.pools[{role.value}]"
    selector: LabelSelector
    try:
        if isinstance(doc.node_selector, str):
            selector = parse_selector(doc.node_selector)
        else:
            selector = selector_from_mapping(doc.node_selector)
    except InvalidArgument as e:
        raise InvalidArgument(f"{where}.node_selector: {e}") from None
    # An omitted bound is replicas, moved no further than the other bound: {replicas: 5,
    # max_replicas: 4} reads as [4, 4] and fails on replicas, the number the user wrote.
    low, high = doc.min_replicas, doc.max_replicas
    return Pool(
        role=role,
        replicas=doc.replicas,
        min_replicas=low
        if low is not None
        else min(doc.replicas, doc.replicas if high is None else high),
        max_replicas=high
        if high is not None
        else max(doc.replicas, doc.replicas if low is None else low),
        sla_classes=tuple(doc.sla_classes),
        node_selector=selector,
        affinity=doc.affinity,
        context_threshold_tokens=doc.context_threshold_tokens,
        autoscaling=doc.autoscaling,
    )


def _message(e: ValidationError, data: Mapping[str, Any]) -> str:
    parts: list[str] = []
    for err in e.errors():
        loc = tuple(err["loc"])
        path = _path(loc, data)
        if err["type"] == "extra_forbidden":
            known = ", ".join(_model_at(loc[:-1]).model_fields)
            msg = f"{path}: unknown field (known: {known})"
        elif err["type"] == "missing":
            msg = f"{path}: required"
        elif path.endswith(".node_selector"):
            msg = f"{path}: must be a selector string or a mapping of label -> value"
        else:
            msg = f"{path}: {err['msg']} (got {err['input']!r})"
        if msg not in parts:
            parts.append(msg)
    return "; ".join(parts)


def _model_at(parent: Sequence[int | str]) -> type[BaseModel]:
    if tuple(parent) == ("parallelism",):
        return ParallelismDoc
    if len(parent) == 2 and parent[0] == "pools":
        return PoolDoc
    return SpecDoc


def _path(loc: Sequence[int | str], data: Mapping[str, Any]) -> str:
    """``("pools", 1, "replicas")`` -> ``spec.pools[decode].replicas`` (by role when known)."""
    out = "spec"
    for i, part in enumerate(loc):
        if isinstance(part, int):
            label: str = str(part)
            if i == 1 and loc[0] == "pools":
                label = _pool_label(data, part)
            out += f"[{label}]"
        elif part in ("str", "dict[str,str]", "function-before[_str_map(), dict[str,str]]"):
            continue  # pydantic names the union member it tried; the user never wrote it
        else:
            out += f".{part}"
    return out


def _pool_label(data: Mapping[str, Any], index: int) -> str:
    pools = data.get("pools")
    if isinstance(pools, Sequence) and index < len(pools):
        pool = pools[index]
        if isinstance(pool, Mapping) and isinstance(pool.get("role"), str):
            return str(pool["role"])
    return str(index)
