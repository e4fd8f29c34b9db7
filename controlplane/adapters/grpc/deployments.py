"""The Deployments gRPC service: declare, read, scale, delete and explain model deployments.

Writes go to etcd (``EtcdDeploymentStore``) with compare-and-swap on ``resource_version``; the
leader's reconciler does the rest and writes each deployment's status, which ``Get`` / ``List``
return. Any replica serves these calls. Specs are validated by the same code as YAML input
(``controlplane.deployspec.spec_from_dict``), so errors name the field.

Proto3 cannot tell an unset ``uint32`` from 0: a pool with ``max_replicas == 0`` is a fixed-size
pool (min = max = replicas); otherwise ``min_replicas`` and ``max_replicas`` are taken as given.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

import grpc
from switchboard.v1 import deployments_pb2, deployments_pb2_grpc

from controlplane.adapters.etcd.deployments import EtcdDeploymentStore
from controlplane.adapters.grpc.convert import timestamp
from controlplane.adapters.grpc.errors import unary
from controlplane.core.deployments import Engine, ModelDeploymentSpec, PoolRole, format_selector
from controlplane.core.reconcile import DeploymentRecord, DeploymentStatus
from controlplane.core.sla import SlaClass
from controlplane.deployspec import spec_from_dict, spec_to_dict
from controlplane.errors import Conflict, FailedPrecondition, InvalidArgument

Context = grpc.aio.ServicerContext[Any, Any]

ENGINE_TO_PB = {
    Engine.VLLM: deployments_pb2.ENGINE_VLLM,
    Engine.TRTLLM: deployments_pb2.ENGINE_TRTLLM,
    Engine.CPU: deployments_pb2.ENGINE_CPU,
    Engine.SIM: deployments_pb2.ENGINE_SIM,
}
ENGINE_FROM_PB = {v: k for k, v in ENGINE_TO_PB.items()}
ROLE_TO_PB = {
    PoolRole.PREFILL: deployments_pb2.POOL_ROLE_PREFILL,
    PoolRole.DECODE: deployments_pb2.POOL_ROLE_DECODE,
    PoolRole.AGGREGATED: deployments_pb2.POOL_ROLE_AGGREGATED,
    PoolRole.LONG_CONTEXT: deployments_pb2.POOL_ROLE_LONG_CONTEXT,
}
ROLE_FROM_PB = {v: k for k, v in ROLE_TO_PB.items()}


def spec_from_pb(msg: deployments_pb2.ModelDeploymentSpec) -> ModelDeploymentSpec:
    if msg.engine not in ENGINE_FROM_PB:
        raise InvalidArgument(f"spec.engine: unknown or unset engine {msg.engine}")
    pools: list[dict[str, Any]] = []
    for i, p in enumerate(msg.pools):
        if p.role not in ROLE_FROM_PB:
            raise InvalidArgument(f"spec.pools[{i}].role: unknown or unset role {p.role}")
        terms = [f"{k}={v}" for k, v in sorted(p.node_selector.items())]
        if p.node_selector_expression:
            terms.append(p.node_selector_expression)
        pool: dict[str, Any] = {
            "role": ROLE_FROM_PB[p.role].value,
            "replicas": p.replicas,
            "sla_classes": list(p.sla_classes),
            "node_selector": ",".join(terms),
            "affinity": dict(p.affinity),
            "context_threshold_tokens": p.context_threshold_tokens,
            "autoscaling": p.autoscaling,
        }
        if p.max_replicas:
            pool["min_replicas"] = p.min_replicas
            pool["max_replicas"] = p.max_replicas
        pools.append(pool)
    par = msg.parallelism
    doc: dict[str, Any] = {
        "name": msg.name,
        "model": msg.model,
        "model_path": msg.model_path,
        "engine": ENGINE_FROM_PB[msg.engine].value,
        "parallelism": {
            "tensor": par.tensor or 1,
            "pipeline": par.pipeline or 1,
            "expert": par.expert or 1,
            "data": par.data or 1,
        },
        "gpu_memory_bytes_per_gpu": msg.gpu_memory_bytes_per_gpu,
        "pools": pools,
        "priority": msg.priority,
        "engine_args": dict(msg.engine_args),
        "sla_classes": {c.name: _sla_class_from_pb(c) for c in msg.sla_classes},
    }
    if len(doc["sla_classes"]) != len(msg.sla_classes):
        raise InvalidArgument("spec.sla_classes: duplicate class name")
    return spec_from_dict(doc)


_SLA_OPTIONAL = ("ttft_p95_ms", "itl_p95_ms", "deadline_s", "queue_timeout_s", "max_queue")


def _sla_class_from_pb(c: deployments_pb2.SlaClassSpec) -> dict[str, Any]:
    out: dict[str, Any] = {"priority": c.priority}
    for name in _SLA_OPTIONAL:
        if c.HasField(name):  # type: ignore[arg-type]
            out[name] = getattr(c, name)
    return out


def _sla_class_to_pb(c: SlaClass) -> deployments_pb2.SlaClassSpec:
    msg = deployments_pb2.SlaClassSpec(name=c.name, priority=c.priority)
    for name in _SLA_OPTIONAL:
        value = getattr(c, name)
        if value is not None:
            setattr(msg, name, value)
    return msg


def spec_to_pb(spec: ModelDeploymentSpec) -> deployments_pb2.ModelDeploymentSpec:
    msg = deployments_pb2.ModelDeploymentSpec(
        name=spec.name,
        model=spec.model,
        model_path=spec.model_path,
        engine=ENGINE_TO_PB[spec.engine],
        parallelism=deployments_pb2.Parallelism(
            tensor=spec.parallelism.tensor,
            pipeline=spec.parallelism.pipeline,
            expert=spec.parallelism.expert,
            data=spec.parallelism.data,
        ),
        gpu_memory_bytes_per_gpu=spec.gpu_memory_bytes_per_gpu,
        priority=spec.priority,
        engine_args=dict(spec.engine_args),
        sla_classes=[_sla_class_to_pb(c) for c in spec.sla_classes],
    )
    for p in spec.pools:
        msg.pools.append(
            deployments_pb2.Pool(
                role=ROLE_TO_PB[p.role],
                replicas=p.replicas,
                min_replicas=p.min_replicas,
                max_replicas=p.max_replicas,
                sla_classes=list(p.sla_classes),
                node_selector_expression=format_selector(p.node_selector),
                affinity=dict(p.affinity),
                context_threshold_tokens=p.context_threshold_tokens,
                autoscaling=p.autoscaling,
            )
        )
    return msg


def status_to_pb(status: DeploymentStatus | None) -> deployments_pb2.ModelDeploymentStatus:
    msg = deployments_pb2.ModelDeploymentStatus()
    if status is None:
        return msg
    msg.observed_generation = status.observed_generation
    for c in status.conditions:
        msg.conditions.append(
            deployments_pb2.Condition(
                type=c.type,
                status=c.status,
                reason=c.reason,
                message=c.message,
                last_transition_time=timestamp(c.last_transition_time),
            )
        )
    for p in status.pools:
        msg.pools.append(
            deployments_pb2.PoolStatus(
                role=ROLE_TO_PB[p.role],
                desired=p.desired,
                ready=p.ready,
                updated=p.updated,
                unschedulable=list(p.unschedulable),
            )
        )
    return msg


def deployment_to_pb(
    record: DeploymentRecord,
    status: DeploymentStatus | None,
    planner: Mapping[str, Any] | None = None,
) -> deployments_pb2.ModelDeployment:
    msg = deployments_pb2.ModelDeployment(
        spec=spec_to_pb(record.spec),
        status=status_to_pb(status),
        generation=record.generation,
        resource_version=record.resource_version,
        created_at=timestamp(record.created_at),
    )
    if planner:
        msg.planner.CopyFrom(planner_to_pb(planner))
    return msg


def planner_to_pb(doc: Mapping[str, Any]) -> deployments_pb2.PlannerView:
    """The planner's record (``{prefix}/planner/<name>``, written by ``controlplane.planner``)."""

    def role(name: object) -> deployments_pb2.PoolRole.ValueType:
        try:
            return ROLE_TO_PB[PoolRole(str(name))]
        except ValueError:
            return deployments_pb2.POOL_ROLE_UNSPECIFIED

    def ms(v: object) -> float:
        return float(v) if isinstance(v, int | float) else 0.0

    view = deployments_pb2.PlannerView(
        updated_at=timestamp(ms(doc.get("updated_at"))),
        advisory=bool(doc.get("advisory", False)),
        observed_rps=ms(doc.get("observed_rps")),
        forecast_rps=ms(doc.get("forecast_rps")),
    )
    for p in doc.get("pools", ()):
        view.pools.append(
            deployments_pb2.PlannerPool(
                role=role(p.get("role")),
                current=int(p.get("current", 0)),
                desired=int(p.get("desired", 0)),
                ready=int(p.get("ready", 0)),
                kind=str(p.get("kind", "")),
                predicted_p95_ms=ms(p.get("predicted_ms")),
                observed_p95_ms=ms(p.get("observed_ms")),
                target_p95_ms=ms(p.get("target_ms")),
                reason=str(p.get("reason", "")),
                autoscaling=bool(p.get("autoscaling", False)),
            )
        )
    for d in doc.get("decisions", ()):
        view.decisions.append(
            deployments_pb2.PlannerDecision(
                time=timestamp(ms(d.get("time"))),
                role=role(d.get("role")),
                from_replicas=int(d.get("from", 0)),
                to_replicas=int(d.get("to", 0)),
                reason=str(d.get("reason", "")),
                applied=bool(d.get("applied", False)),
            )
        )
    return view


class DeploymentsServicer(deployments_pb2_grpc.DeploymentsServicer):
    def __init__(
        self,
        store: EtcdDeploymentStore,
        *,
        on_change: Callable[[], None] = lambda: None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._on_change = on_change
        self._clock = clock

    async def _with_status(self, record: DeploymentRecord) -> deployments_pb2.ModelDeployment:
        name = record.spec.name
        return deployment_to_pb(
            record, await self._store.get_status(name), await self._store.get_planner(name)
        )

    @unary
    async def Apply(
        self, request: deployments_pb2.ApplyDeploymentRequest, context: Context
    ) -> deployments_pb2.ApplyDeploymentResponse:
        if not request.HasField("spec"):
            raise InvalidArgument("spec is required")
        spec = spec_from_pb(request.spec)
        if request.dry_run:
            record = DeploymentRecord(spec, generation=0)
            return deployments_pb2.ApplyDeploymentResponse(
                deployment=deployment_to_pb(record, None)
            )
        record = await self._store.apply(
            spec, resource_version=request.resource_version, now=self._clock()
        )
        self._on_change()
        return deployments_pb2.ApplyDeploymentResponse(deployment=await self._with_status(record))

    @unary
    async def Get(
        self, request: deployments_pb2.GetDeploymentRequest, context: Context
    ) -> deployments_pb2.ModelDeployment:
        if not request.name:
            raise InvalidArgument("name is required")
        return await self._with_status(await self._store.get(request.name))

    @unary
    async def List(
        self, request: deployments_pb2.ListDeploymentsRequest, context: Context
    ) -> deployments_pb2.ListDeploymentsResponse:
        records = await self._store.list_all()
        return deployments_pb2.ListDeploymentsResponse(
            deployments=[await self._with_status(r) for r in records]
        )

    @unary
    async def Delete(
        self, request: deployments_pb2.DeleteDeploymentRequest, context: Context
    ) -> deployments_pb2.DeleteDeploymentResponse:
        if not request.name:
            raise InvalidArgument("name is required")
        await self._store.delete(request.name, resource_version=request.resource_version)
        self._on_change()
        return deployments_pb2.DeleteDeploymentResponse()

    @unary
    async def Scale(
        self, request: deployments_pb2.ScaleDeploymentRequest, context: Context
    ) -> deployments_pb2.ScaleDeploymentResponse:
        if not request.name:
            raise InvalidArgument("name is required")
        if request.role not in ROLE_FROM_PB:
            raise InvalidArgument("role is required (prefill, decode, aggregated, long_context)")
        role = ROLE_FROM_PB[request.role]
        record = await self._store.get(request.name)
        if request.resource_version and request.resource_version != record.resource_version:
            raise Conflict(f"deployment {request.name!r} changed; get it and retry")
        doc = spec_to_dict(record.spec)
        pools = [p for p in doc["pools"] if p["role"] == role.value]
        if not pools:
            raise InvalidArgument(f"deployment {request.name!r} has no {role.value} pool")
        pool = pools[0]
        if pool["autoscaling"]:
            raise FailedPrecondition(
                f"the {role.value} pool of {request.name!r} is autoscaled: the SLA planner owns "
                "its replicas; change min_replicas / max_replicas, or set autoscaling: false"
            )
        if not pool["min_replicas"] <= request.replicas <= pool["max_replicas"]:
            raise InvalidArgument(
                f"replicas {request.replicas} is outside the {role.value} pool's "
                f"[min_replicas {pool['min_replicas']}, max_replicas {pool['max_replicas']}]"
            )
        pool["replicas"] = request.replicas
        updated = await self._store.apply(
            spec_from_dict(doc), resource_version=record.resource_version, now=self._clock()
        )
        self._on_change()
        return deployments_pb2.ScaleDeploymentResponse(deployment=await self._with_status(updated))

    @unary
    async def Explain(
        self, request: deployments_pb2.ExplainDeploymentRequest, context: Context
    ) -> deployments_pb2.ExplainDeploymentResponse:
        if not request.name:
            raise InvalidArgument("name is required")
        record = await self._store.get(request.name)
        status = await self._store.get_status(request.name)
        placements = [
            p for p in await self._store.list_placements() if p.deployment == request.name
        ]
        out = deployments_pb2.ExplainDeploymentResponse()
        for p in sorted(placements, key=lambda p: (p.role.value, p.index)):
            out.placements.append(
                deployments_pb2.PlacementExplanation(
                    role=ROLE_TO_PB[p.role],
                    replica=p.index,
                    node_id=p.node_id,
                    rejections=list(p.rejections),
                    scores=dict(p.scores),
                )
            )
        for pool in status.pools if status else ():
            placed = sum(1 for p in placements if p.role is pool.role)
            spec_pool = record.spec.pool(pool.role)
            want = spec_pool.replicas if spec_pool else 0
            if pool.unschedulable:
                for missing in range(max(0, want - placed)):
                    out.placements.append(
                        deployments_pb2.PlacementExplanation(
                            role=ROLE_TO_PB[pool.role],
                            replica=placed + missing,
                            rejections=list(pool.unschedulable),
                        )
                    )
        return out
