"""DeploymentReconciler: the leader task that keeps what runs equal to what is declared.

Each pass reads the desired state and the recorded placements from etcd, the registered workers
from etcd, the nodes from the watch-fed ``NodeCache``, and the replicas from the runtime (Ray);
``controlplane.core.reconcile.reconcile`` (pure) decides; this shell executes the actions and
writes each deployment's status. A pass runs every ``interval_s`` and as soon as a deployment
changes (``poke``). A failing action is logged and retried on a later pass; a failing pass is
logged and retried with backoff: the loop never dies while this replica leads.

Starting a replica is quick (the runtime creates named, detached Ray objects and returns), so
it runs inline, placement record first. Stopping drains the worker (up to its drain timeout),
so each stop runs as its own task; a replica with a stop in flight is left alone by later passes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from controlplane.adapters.etcd.deployments import EtcdDeploymentStore
from controlplane.adapters.etcd.node_cache import NodeCache
from controlplane.adapters.etcd.workers import EtcdWorkerRegistry
from controlplane.adapters.ray.runtime import RayReplicaRuntime, ReplicaLaunch
from controlplane.config import EtcdSettings
from controlplane.core.deployments import ModelDeploymentSpec, PoolRole
from controlplane.core.model import Node
from controlplane.core.reconcile import (
    DeploymentStatus,
    Observed,
    Placer,
    Plan,
    ReconcileConfig,
    ReplicaPlacement,
    RuntimeReplica,
    StartReplica,
    StopReplica,
    reconcile,
)
from controlplane.telemetry.metrics import ControlPlaneMetrics

log = logging.getLogger(__name__)

WORKER_ROLE = {
    PoolRole.PREFILL: "prefill",
    PoolRole.DECODE: "decode",
    PoolRole.AGGREGATED: "both",
    PoolRole.LONG_CONTEXT: "both",
}
SIM_KEYS = ("profile", "speedup")


@dataclass(frozen=True)
class ReconcilerSettings:
    interval_s: float = 1.0
    worker_lease_ttl_s: int = 10
    worker_drain_timeout_s: float = 30.0
    config: ReconcileConfig = field(default_factory=ReconcileConfig)


def worker_settings(
    spec: ModelDeploymentSpec, placement: ReplicaPlacement, node: Node | None, etcd: EtcdSettings,
    settings: ReconcilerSettings,
) -> dict[str, object]:  # fmt: skip
    """The ``WorkerSettings`` fields (JSON-able) of a replica's worker."""
    host = (node.inventory.address if node is not None else "") or "127.0.0.1"
    args = dict(spec.engine_args)
    fields: dict[str, object] = {
        "etcd": {"endpoint": etcd.endpoint, "prefix": etcd.prefix, "timeout_s": etcd.timeout_s},
        "model": spec.model,
        "engine": spec.engine.value,
        "role": WORKER_ROLE[placement.role],
        "model_path": spec.model_path,
        "listen": f"{host}:0",
        "advertise_host": host,
        "worker_id": placement.replica_id,
        "node_id": placement.node_id,
        "lease_ttl_s": settings.worker_lease_ttl_s,
        "drain_timeout_s": settings.worker_drain_timeout_s,
        "deployment": spec.name,
        "pool": placement.role.value,
    }
    long_context = spec.pool(PoolRole.LONG_CONTEXT)
    if long_context is not None:
        fields["long_context_threshold_tokens"] = long_context.context_threshold_tokens
    if spec.engine.value == "sim":
        if "profile" in args:
            fields["profile"] = args["profile"]
        if "speedup" in args:
            fields["speedup"] = float(args["speedup"])
        args = {k: v for k, v in args.items() if k not in SIM_KEYS}
    if args:
        fields["engine_args"] = json.dumps({k: _json_value(v) for k, v in args.items()})
    return fields


def placement_reason(rejection: str) -> str:
    """A bounded label for a placement rejection (``"node-3: needs 4 GPUs, 2 free"`` ->
    ``"needs N GPUs, N free"``): the node name dropped, numbers as N, at most 60 characters."""
    text = rejection.split(": ", 1)[1] if ": " in rejection else rejection
    return re.sub(r"\d+(\.\d+)?", "N", text).strip()[:60] or "unknown"


def _json_value(value: str) -> object:
    """Engine args are strings in the spec; numbers, booleans and JSON objects pass through."""
    try:
        return json.loads(value)
    except ValueError:
        return value


class DeploymentReconciler:
    def __init__(
        self,
        store: EtcdDeploymentStore,
        workers: EtcdWorkerRegistry,
        nodes: NodeCache,
        runtime: RayReplicaRuntime,
        placer: Placer,
        etcd: EtcdSettings,
        settings: ReconcilerSettings | None = None,
        *,
        clock: Callable[[], float] = time.time,
        metrics: ControlPlaneMetrics | None = None,
    ) -> None:
        self.metrics = metrics
        self.store = store
        self.workers = workers
        self.nodes = nodes
        self.runtime = runtime
        self.placer = placer
        self.etcd = etcd
        self.settings = settings or ReconcilerSettings()
        self._clock = clock
        self._wake = asyncio.Event()
        self._stopping: dict[str, asyncio.Task[None]] = {}
        self._statuses: dict[str, DeploymentStatus] = {}
        self.passes = 0

    def poke(self) -> None:
        """Run a pass now (a deployment changed)."""
        self._wake.set()

    async def run(self) -> None:
        """The leader task: passes until cancelled; never dies of an error."""
        await self.nodes.ever_synced.wait()
        backoff = self.settings.interval_s
        try:
            while True:
                try:
                    await self.pass_once()
                    backoff = self.settings.interval_s
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception("reconcile pass failed; retrying in %.1fs", backoff)
                    backoff = min(backoff * 2, 30.0)
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), backoff)
        finally:
            for task in self._stopping.values():
                task.cancel()

    async def pass_once(self) -> Plan:
        if self.metrics is None:
            return await self._pass()
        started = time.perf_counter()
        try:
            return await self._pass()
        finally:
            self.metrics.reconcile_duration.observe(time.perf_counter() - started)

    async def _pass(self) -> Plan:
        desired = await self.store.list_all()
        placements = await self.store.list_placements()
        workers = {w.worker_id: w for w in await self.workers.list_workers()}
        nodes = {n.node_id: n for n in self.nodes.list_nodes()}
        runtime = {
            rid: RuntimeReplica(rid, o.group_state, o.actor_alive)
            for rid, o in (await self.runtime.observe()).items()
        }
        ray_nodes = await self.runtime.ray_nodes()
        if not self._statuses:
            for d in desired:
                status = await self.store.get_status(d.spec.name)
                if status is not None:
                    self._statuses[d.spec.name] = status
        plan = reconcile(
            desired,
            placements,
            Observed(nodes, workers, runtime, ray_nodes),
            self.placer,
            now=self._clock(),
            previous=self._statuses,
            config=self.settings.config,
        )
        for action in plan.actions:
            if action.placement is not None and action.placement.replica_id in self._stopping:
                continue
            try:
                if isinstance(action, StartReplica):
                    await self._start(action, nodes)
                    self._count("start", "ok")
                else:
                    self._stop(action)
            except Exception as e:  # one failing action must not stop the others
                log.warning("%s failed: %s", type(action).__name__, e)
                self._count("start" if isinstance(action, StartReplica) else "stop", "error")
        if self.metrics is not None:
            self._count_plan(plan)
        for name, status in plan.statuses.items():
            if self._statuses.get(name) != status:
                await self.store.put_status(name, status)
                self._statuses[name] = status
        for name in set(self._statuses) - set(plan.statuses):
            await self.store.delete_status(name)
            del self._statuses[name]
        self.passes += 1
        return plan

    async def _start(self, action: StartReplica, nodes: dict[str, Node]) -> None:
        p = action.placement
        if action.new:
            await self.store.put_placement(p)  # intent first: a successor finishes from it
            log.info("placing %s on %s gpus %s", p.replica_id, p.node_id, list(p.gpu_indices))
        fields = worker_settings(action.spec, p, nodes.get(p.node_id), self.etcd, self.settings)
        await self.runtime.start(
            ReplicaLaunch(p.replica_id, p.ray_node_id, action.spec.gpus_per_replica, fields)
        )

    # --- metrics -----------------------------------------------------------------------------

    def _count(self, action: str, result: str) -> None:
        if self.metrics is not None:
            self.metrics.reconcile_actions.labels(action, result).inc()

    def _count_plan(self, plan: Plan) -> None:
        """Placement failures (each pass a pool stays unplaceable, by its first reason) and
        replicas replaced after dying (a stop for a lost replica)."""
        assert self.metrics is not None
        for name, status in plan.statuses.items():
            for pool in status.pools:
                if pool.unschedulable:
                    reason = placement_reason(pool.unschedulable[0])
                    self.metrics.placement_failures.labels(name, reason).inc()
        for action in plan.actions:
            if (
                isinstance(action, StopReplica)
                and action.reason.startswith("lost")
                and action.placement is not None
                and action.replica_id not in self._stopping
            ):
                p = action.placement
                self.metrics.worker_restarts.labels(p.deployment, p.role.value).inc()

    def _stop(self, action: StopReplica) -> None:
        if action.replica_id in self._stopping:
            return
        log.info("stopping %s (%s)", action.replica_id, action.reason)
        task = asyncio.get_running_loop().create_task(self._stop_task(action))
        self._stopping[action.replica_id] = task

    async def _stop_task(self, action: StopReplica) -> None:
        try:
            await self.runtime.stop(action.replica_id, drain=action.drain)
            if action.placement is not None:
                await self.store.delete_placement(action.placement)
            self._count("stop", "ok")
        except Exception as e:
            log.warning("stopping %s failed (retried next pass): %s", action.replica_id, e)
            self._count("stop", "error")
        finally:
            self._stopping.pop(action.replica_id, None)
            self.poke()
