"""The worker process (`switchboard worker`): one engine behind the Worker gRPC service.

Lifecycle: start the engine and the gRPC server (with health and reflection), register
``{prefix}/workers/<model>/<role>/<id>`` under a lease, push load reports to subscribers.
On SIGTERM / SIGINT it **drains**: health turns NOT_SERVING, the record says ``Draining``, new
requests get UNAVAILABLE, in-flight requests finish (up to ``drain_timeout_s``), and only then
is the lease revoked and the server stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from switchboard.v1 import worker_pb2

from controlplane.adapters.etcd.client import EtcdClient
from controlplane.adapters.etcd.workers import EtcdWorkerRegistry
from controlplane.adapters.grpc.server import GrpcServer
from controlplane.config import EtcdSettings
from controlplane.core.model import WorkerRecord, WorkerState
from controlplane.errors import InvalidArgument
from controlplane.registration import LeasedRecord
from workers.engine import InferenceEngine, KvFetcher, Role
from workers.kv_transfer import GrpcKvFetcher
from workers.service import WorkerService

log = logging.getLogger(__name__)

ENGINES = ("sim",)


@dataclass(frozen=True)
class WorkerSettings:
    etcd: EtcdSettings = field(default_factory=EtcdSettings)
    model: str = "llama-3.1-8b"
    """Model name tenants use; also the etcd key segment."""
    engine: str = "sim"
    """Engine: sim (the cpu, vllm and trtllm engines are added by later work)."""
    role: Role = Role.BOTH
    profile: str = "llama-3.1-8b-h100"
    """sim: profile name (workers/profiles/<name>.yaml) or a path to a profile file."""
    speedup: float = 1.0
    """sim: run this many times faster than real time."""
    listen: str = "127.0.0.1:0"
    advertise_host: str = "127.0.0.1"
    worker_id: str = field(default_factory=lambda: f"w-{uuid.uuid4().hex[:10]}")
    node_id: str = ""
    lease_ttl_s: int = 10
    report_interval_s: float = 0.25
    """Load reports to WatchStats subscribers: 4 Hz by default (>= 2 Hz required)."""
    drain_timeout_s: float = 30.0
    port_file: str = ""


def build_engine(settings: WorkerSettings, address: str, kv_fetcher: KvFetcher) -> InferenceEngine:
    if settings.engine == "sim":
        from workers.engines.sim import build_sim_engine

        return build_sim_engine(
            settings.profile,
            model=settings.model,
            address=address,
            kv_fetcher=kv_fetcher,
            speedup=settings.speedup,
        )
    raise InvalidArgument(f"engine {settings.engine!r} is not available; choose from {ENGINES}")


async def run_worker(
    settings: WorkerSettings, stop: asyncio.Event, *, clock: Callable[[], float] = time.time
) -> None:
    if settings.report_interval_s > 0.5:
        raise InvalidArgument("report_interval_s must be <= 0.5 (load reports at >= 2 Hz)")
    server = GrpcServer(settings.listen)
    fetcher = GrpcKvFetcher()
    port = server.server.add_insecure_port(settings.listen)
    if port == 0:
        raise OSError(f"cannot bind worker to {settings.listen}")
    address = f"{settings.advertise_host}:{port}"
    engine = build_engine(settings, address, fetcher)
    service = WorkerService(
        engine,
        worker_id=settings.worker_id,
        role=settings.role,
        report_interval_s=settings.report_interval_s,
    )
    server.add_servicer(service, worker_pb2.DESCRIPTOR.services_by_name["Worker"])
    await server.start(bind=False)
    await server.set_serving(True)
    log.info("worker %s (%s, %s) serving on %s", settings.worker_id, settings.role,
             settings.engine, address)  # fmt: skip

    base = WorkerRecord(
        worker_id=settings.worker_id,
        model=settings.model,
        role=settings.role.value,
        engine=settings.engine,
        endpoint=address,
        node_id=settings.node_id or socket.gethostname().lower(),
        max_context_tokens=engine.max_context_tokens,
        kv_blocks_total=engine.stats().kv_blocks_total,
        started_at=clock(),
    )

    def snapshot(previous: WorkerRecord | None) -> WorkerRecord:
        state = WorkerState.DRAINING if service.draining else WorkerState.SERVING
        return dataclasses.replace(base, state=state)

    client = EtcdClient(settings.etcd.endpoint, timeout_s=settings.etcd.timeout_s)
    registration = LeasedRecord(
        EtcdWorkerRegistry(client, settings.etcd.prefix),
        snapshot,
        clock=clock,
        lease_ttl_s=settings.lease_ttl_s,
        report_interval_s=1.0,
        name=f"worker {settings.worker_id}",
    )
    if settings.port_file:
        await asyncio.to_thread(Path(settings.port_file).write_text, f"{port}\n")
    tasks = [
        asyncio.create_task(registration.run(), name="registration"),
        asyncio.create_task(service.publish_forever(), name="load-reports"),
    ]
    try:
        await stop.wait()
        log.info("draining: no new work; waiting for %d in-flight requests", service.inflight)
        await server.set_serving(False)
        service.draining = True
        with contextlib.suppress(Exception):
            await registration.publish()
        await service.drain(settings.drain_timeout_s)
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task  # registration revokes its lease on cancel
        await server.stop(grace_s=1.0)
        await fetcher.close()
        await client.close()
        close = getattr(engine, "aclose", None)
        if close is not None:
            await close()
        log.info("worker %s stopped", settings.worker_id)
