"""The control-plane process: etcd watch-fed node cache, leader election, gRPC services.

Every replica serves reads (ListNodes, WatchNodes, status) from its own cache and accepts
writes (cordon, drain), which go to etcd. Only the elected leader runs the leader tasks
(reconcilers, planner); they are started on election and cancelled on loss of leadership.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

from switchboard.v1 import control_plane_pb2, deployments_pb2, nodes_pb2

from controlplane.adapters.etcd.client import EtcdClient
from controlplane.adapters.etcd.deployments import EtcdDeploymentStore
from controlplane.adapters.etcd.election import LeaderElector
from controlplane.adapters.etcd.node_cache import NodeCache
from controlplane.adapters.etcd.nodes import EtcdNodeRegistry
from controlplane.adapters.etcd.workers import EtcdWorkerRegistry
from controlplane.adapters.grpc.deployments import DeploymentsServicer
from controlplane.adapters.grpc.node_registry import ControlPlaneServicer, NodeRegistryServicer
from controlplane.adapters.grpc.server import GrpcServer
from controlplane.adapters.ray.runtime import RayReplicaRuntime
from controlplane.config import ControlPlaneSettings
from controlplane.core.reconcile import PipelinePlacer
from controlplane.planner import PlannerLoop, build_planner
from controlplane.reconciler import DeploymentReconciler, ReconcilerSettings
from controlplane.telemetry.fleet import SD_PATH, FleetTelemetry, gateway_lister
from controlplane.telemetry.http_server import MetricsServer
from controlplane.telemetry.metrics import ControlPlaneMetrics

log = logging.getLogger(__name__)

LeaderTask = Callable[[], Coroutine[Any, Any, None]]


class ControlPlane:
    def __init__(
        self,
        settings: ControlPlaneSettings,
        *,
        leader_tasks: Sequence[LeaderTask] = (),
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self._clock = clock
        self._leader_tasks = list(leader_tasks)
        self.metrics = ControlPlaneMetrics()
        self.metrics.leader.labels(settings.replica_id).set(0)
        etcd_seconds = self.metrics.etcd_request
        self.etcd = EtcdClient(
            settings.etcd.endpoint,
            timeout_s=settings.etcd.timeout_s,
            observe=lambda op, s: etcd_seconds.labels(op).observe(s),
        )
        self.registry = EtcdNodeRegistry(self.etcd, settings.etcd.prefix)
        self.cache = NodeCache(self.registry)
        self.deployments = EtcdDeploymentStore(self.etcd, settings.etcd.prefix)
        self.reconciler: DeploymentReconciler | None = None
        if settings.ray_address:
            self.reconciler = DeploymentReconciler(
                self.deployments,
                EtcdWorkerRegistry(self.etcd, settings.etcd.prefix),
                self.cache,
                RayReplicaRuntime(settings.ray_address),
                PipelinePlacer(),
                settings.etcd,
                ReconcilerSettings(worker_lease_ttl_s=settings.worker_lease_ttl_s),
                clock=clock,
                metrics=self.metrics,
            )
            self._leader_tasks.append(self.reconciler.run)
        self.planner: PlannerLoop | None = None
        if settings.planner != "off":
            self.planner = build_planner(
                settings, self.etcd, self.deployments, self.metrics.registry,
                on_change=self._deployments_changed, clock=clock,
            )  # fmt: skip
            self._leader_tasks.append(self.planner.run)
        self.elector = LeaderElector(
            self.etcd,
            key=f"{settings.etcd.prefix.rstrip('/')}/leader/controlplane",
            identity=settings.replica_id,
            ttl_s=settings.leader_ttl_s,
        )
        self.grpc = GrpcServer(settings.listen)
        started = clock()
        self.grpc.add_servicer(
            NodeRegistryServicer(
                self.registry,
                self.cache,
                clock=clock,
                default_ttl_s=settings.default_node_ttl_s,
            ),
            nodes_pb2.DESCRIPTOR.services_by_name["NodeRegistry"],
        )
        self.grpc.add_servicer(
            ControlPlaneServicer(
                replica_id=settings.replica_id,
                cache=self.cache,
                leader=lambda: (self.elector.is_leader, self.elector.leader_id),
                started_at=started,
            ),
            control_plane_pb2.DESCRIPTOR.services_by_name["ControlPlane"],
        )
        self.grpc.add_servicer(
            DeploymentsServicer(self.deployments, on_change=self._deployments_changed, clock=clock),
            deployments_pb2.DESCRIPTOR.services_by_name["Deployments"],
        )

        self.fleet = FleetTelemetry(
            self.metrics,
            EtcdWorkerRegistry(self.etcd, settings.etcd.prefix).list_workers,
            self.cache.list_nodes,
            gateway_lister(self.etcd.get_prefix, settings.etcd.prefix),
        )
        self.metrics_server: MetricsServer | None = None
        if settings.metrics_port >= 0:
            host = settings.listen.rpartition(":")[0] or "127.0.0.1"
            self.metrics_server = MetricsServer(
                self.metrics.registry,
                host=host,
                port=settings.metrics_port,
                routes={SD_PATH: self.fleet.sd_targets},
            )

    def _deployments_changed(self) -> None:
        if self.reconciler is not None and self.elector.is_leader:
            self.reconciler.poke()

    async def run(self, stop: asyncio.Event) -> None:
        port = await self.grpc.start()
        await self.grpc.set_serving(False)
        log.info("control plane %s serving gRPC on port %d", self.settings.replica_id, port)
        if self.metrics_server is not None:
            await self.metrics_server.start()
            log.info(
                "control plane %s: metrics on http://%s/metrics, Prometheus service discovery"
                " on http://%s%s", self.settings.replica_id, self.metrics_server.endpoint,
                self.metrics_server.endpoint, SD_PATH,
            )  # fmt: skip
        if self.settings.port_file:
            await asyncio.to_thread(Path(self.settings.port_file).write_text, f"{port}\n")
        tasks = [
            asyncio.create_task(self.cache.run(), name="node-cache"),
            asyncio.create_task(self.elector.run(), name="leader-election"),
            asyncio.create_task(self._health(), name="health"),
            asyncio.create_task(self._lead(), name="leader-tasks"),
        ]
        if self.metrics_server is not None:
            tasks.append(asyncio.create_task(self._fleet(), name="fleet-telemetry"))
        try:
            await stop.wait()
        finally:
            log.info("control plane stopping")
            for t in tasks:
                t.cancel()
            for t in tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await t
            await self.grpc.stop()
            if self.metrics_server is not None:
                await self.metrics_server.close()
            await self.etcd.close()

    async def _fleet(self) -> None:
        await self.cache.ever_synced.wait()
        await self.fleet.run()

    async def _health(self) -> None:
        await self.cache.ever_synced.wait()
        await self.grpc.set_serving(True)

    async def _lead(self) -> None:
        """Run the leader tasks while this replica leads; cancel them when it stops leading."""
        leader = self.metrics.leader.labels(self.settings.replica_id)
        while True:
            await self.elector.elected.wait()
            leader.set(1)
            self.metrics.leader_changes.inc()
            running = [asyncio.create_task(task()) for task in self._leader_tasks]
            await self.elector.demoted.wait()
            leader.set(0)
            self.metrics.leader_changes.inc()
            for t in running:
                t.cancel()
            for t in running:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await t
