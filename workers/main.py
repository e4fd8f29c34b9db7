"""The worker process (`switchboard worker`): one engine behind the Worker gRPC service.

Lifecycle: start the engine and the gRPC server (with health and reflection), register
``{prefix}/workers/<model>/<role>/<id>`` under a lease, push load reports to subscribers, serve
Prometheus ``/metrics`` on ``metrics_port`` (its endpoint is in the record) and, with an OTLP
endpoint, export spans.
On SIGTERM / SIGINT it **drains**: health turns NOT_SERVING, the record says ``Draining``, new
requests get UNAVAILABLE, in-flight requests finish (up to ``drain_timeout_s``), and only then
is the lease revoked and the server stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry
from switchboard.v1 import worker_pb2

from controlplane.adapters.etcd.client import EtcdClient
from controlplane.adapters.etcd.workers import EtcdWorkerRegistry
from controlplane.adapters.grpc.server import GrpcServer
from controlplane.config import EtcdSettings
from controlplane.core.model import WorkerRecord, WorkerState
from controlplane.errors import InvalidArgument
from controlplane.registration import LeasedRecord
from controlplane.telemetry import tracing
from controlplane.telemetry.http_server import MetricsServer
from controlplane.telemetry.metrics import WorkerMetrics
from workers.engine import InferenceEngine, KvFetcher, Role
from workers.kv_transfer import GrpcKvFetcher
from workers.service import WorkerService
from workers.token_transport import TokenServer

log = logging.getLogger(__name__)

ENGINES = ("cpu", "sim", "vllm", "trtllm")


@dataclass(frozen=True)
class WorkerSettings:
    etcd: EtcdSettings = field(default_factory=EtcdSettings)
    model: str = "llama-3.1-8b"
    """Model name tenants use; also the etcd key segment."""
    engine: str = "sim"
    """Engine: cpu (a real small model on CPU), sim (calibrated simulation), vllm, trtllm."""
    role: Role = Role.BOTH
    profile: str = "llama-3.1-8b-h100"
    """sim: profile name (workers/profiles/<name>.yaml) or a path to a profile file."""
    speedup: float = 1.0
    """sim: run this many times faster than real time."""
    model_path: str = ""
    """cpu, vllm, trtllm: the model directory (or hub id, where the engine can download)."""
    engine_args: str = ""
    """Engine-specific options as a JSON object (e.g. vLLM engine arguments, KV connector)."""
    listen: str = "127.0.0.1:0"
    advertise_host: str = "127.0.0.1"
    worker_id: str = field(default_factory=lambda: f"w-{uuid.uuid4().hex[:10]}")
    node_id: str = ""
    lease_ttl_s: int = 10
    report_interval_s: float = 0.25
    """Load reports to WatchStats subscribers: 4 Hz by default (>= 2 Hz required)."""
    drain_timeout_s: float = 30.0
    port_file: str = ""
    deployment: str = ""
    """The deployment that placed this worker ("" when started by hand); in its record."""
    pool: str = ""
    """Its pool kind: prefill | decode | aggregated | long_context ("" unknown); in its record,
    so routers send long prompts to the long_context pool and keep short ones off it."""
    long_context_threshold_tokens: int = 0
    """The deployment's long-context threshold (prompts of at least this many tokens go to its
    long_context pool); 0: none."""
    metrics_port: int = 0
    """Serve Prometheus ``/metrics`` on this port of the ``listen`` host: 0 = any free port
    (the chosen ``advertise_host:port`` goes into the worker's etcd record, where the control
    plane's ``/sd/targets`` finds it), -1 = off."""
    otlp_endpoint: str = ""
    """Export traces over OTLP gRPC here ("": ``OTEL_EXPORTER_OTLP_ENDPOINT``, else off)."""
    token_port: int = 0
    """Serve Prefill / Decode over the token transport (workers/token_transport.py) on this
    port of the ``listen`` host: 0 = any free port (its ``advertise_host:port`` goes into the
    worker's record, where gateways find it), -1 = off (gateways use gRPC)."""


def worker_settings_to_dict(settings: WorkerSettings) -> dict[str, Any]:
    """JSON-able fields, e.g. to hand a worker's settings to a Ray actor."""
    data = dataclasses.asdict(settings)
    data["role"] = settings.role.value
    return data


def worker_settings_from_dict(data: dict[str, Any]) -> WorkerSettings:
    """The inverse of ``worker_settings_to_dict``; unknown fields are an InvalidArgument."""
    known = {f.name for f in dataclasses.fields(WorkerSettings)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise InvalidArgument(f"unknown worker settings {unknown}")
    values = dict(data)
    if "etcd" in values:
        values["etcd"] = EtcdSettings(**values["etcd"])
    if "role" in values:
        values["role"] = Role(values["role"])
    return WorkerSettings(**values)


def engine_args(settings: WorkerSettings) -> dict[str, Any]:
    """``settings.engine_args`` parsed: a JSON object, or InvalidArgument saying what is wrong."""
    if not settings.engine_args:
        return {}
    try:
        parsed = json.loads(settings.engine_args)
    except ValueError as e:
        raise InvalidArgument(f"--engine-args is not valid JSON: {e}") from None
    if not isinstance(parsed, dict):
        raise InvalidArgument("--engine-args must be a JSON object")
    return parsed


POOLS = ("", "prefill", "decode", "aggregated", "long_context")


def check_pool(settings: WorkerSettings) -> None:
    """The pool fields make sense together (InvalidArgument saying which does not)."""
    if settings.pool not in POOLS:
        raise InvalidArgument(
            f"--pool {settings.pool!r} is not one of {', '.join(p for p in POOLS if p)}"
        )
    if settings.long_context_threshold_tokens < 0:
        raise InvalidArgument("--long-context-threshold must be >= 0")
    if settings.pool == "long_context" and settings.long_context_threshold_tokens <= 0:
        raise InvalidArgument("a long_context pool worker needs --long-context-threshold > 0")


def chunked_prefill(settings: WorkerSettings) -> bool:
    """Whether the engine prefills long prompts in chunks between decode steps: sim always,
    vLLM by default (``enable_chunked_prefill``), TensorRT-LLM when asked, cpu never."""
    if settings.engine == "sim":
        return True
    flag = engine_args(settings).get("enable_chunked_prefill")
    if settings.engine == "vllm":
        return flag is None or bool(flag)
    return settings.engine == "trtllm" and bool(flag)


def build_engine(settings: WorkerSettings, address: str, kv_fetcher: KvFetcher) -> InferenceEngine:
    """The composition root for engines; each engine module is imported only when chosen."""
    if settings.engine == "cpu":
        from workers.engines.cpu import build_cpu_engine

        return build_cpu_engine(settings, address, kv_fetcher)
    if settings.engine == "vllm":
        from workers.engines.vllm import build_vllm_engine

        return build_vllm_engine(settings, address, kv_fetcher)
    if settings.engine == "trtllm":
        from workers.engines.trtllm import build_trtllm_engine

        return build_trtllm_engine(settings, address, kv_fetcher)
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
    settings: WorkerSettings,
    stop: asyncio.Event,
    *,
    clock: Callable[[], float] = time.time,
    on_serving: Callable[[str], None] | None = None,
) -> None:
    """Serve until ``stop`` is set, then drain. ``on_serving(address)`` once it is reachable."""
    check_pool(settings)
    if settings.report_interval_s > 0.5:
        raise InvalidArgument("report_interval_s must be <= 0.5 (load reports at >= 2 Hz)")
    if settings.metrics_port < -1 or settings.metrics_port > 65535:
        raise InvalidArgument(f"--metrics-port {settings.metrics_port}: -1 (off), 0 or a port")
    if settings.token_port < -1 or settings.token_port > 65535:
        raise InvalidArgument(f"--token-port {settings.token_port}: -1 (off), 0 or a port")
    server = GrpcServer(settings.listen)
    metrics = WorkerMetrics(CollectorRegistry(auto_describe=True))
    tracer_provider = tracing.setup_tracing(
        f"switchboard-worker-{settings.role.value}", settings.otlp_endpoint
    )
    tracer = tracing.tracer_of(tracer_provider)
    fetcher = GrpcKvFetcher(model=settings.model, metrics=metrics, tracer=tracer)
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
        model=settings.model,
        metrics=metrics,
        tracer=tracer,
    )
    listen_host = settings.listen.rpartition(":")[0] or "127.0.0.1"
    metrics_server: MetricsServer | None = None
    metrics_endpoint = ""
    if settings.metrics_port >= 0:
        service.update_gauges()
        metrics_server = MetricsServer(
            metrics.registry, host=listen_host, port=settings.metrics_port
        )
        metrics_port = await metrics_server.start()
        metrics_endpoint = f"{settings.advertise_host}:{metrics_port}"
    token_server: TokenServer | None = None
    token_endpoint = ""
    if settings.token_port >= 0:
        token_server = TokenServer(service)
        token_port = await token_server.start(listen_host, settings.token_port)
        token_endpoint = f"{settings.advertise_host}:{token_port}"
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
        deployment=settings.deployment,
        pool=settings.pool,
        long_context_threshold_tokens=settings.long_context_threshold_tokens,
        chunked_prefill=chunked_prefill(settings),
        metrics_endpoint=metrics_endpoint,
        token_endpoint=token_endpoint,
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
    if on_serving is not None:
        on_serving(address)
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
        if token_server is not None:
            await token_server.close()
        if metrics_server is not None:
            await metrics_server.close()
        if tracer_provider is not None:
            await asyncio.to_thread(tracer_provider.shutdown)
        await fetcher.close()
        await client.close()
        close = getattr(engine, "aclose", None)
        if close is not None:
            await close()
        log.info("worker %s stopped", settings.worker_id)
