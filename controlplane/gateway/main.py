"""The gateway process (`switchboard gateway`): the composition root of controlplane/gateway.

Builds the etcd client, the ``WorkersView`` (its feeds start at once; requests never wait on
them), the routing policies (the SLA-aware router for models with a timing model, fed KV events
by the view; least loaded for the others), breakers, metrics and the ``RequestGate`` — by default
``TenantGate`` (API keys from the watch-fed ``TenantCache``, quotas and fair admission per
model); ``auth="none"`` admits everyone (development and tests only) — then serves the OpenAI
HTTP API under uvicorn (httptools, on the uvloop event loop the CLI starts) and the gRPC
``Inference`` service.

On ``stop`` (SIGTERM / SIGINT) it drains: ``/health`` answers 503 and new requests 503, the gRPC
health turns NOT_SERVING, uvicorn stops accepting connections and waits (up to
``drain_timeout_s``) for open ones to finish, the gRPC server stops with the same grace, and
the process exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path

import uvicorn
from switchboard.v1 import inference_pb2

from controlplane.adapters.etcd.client import EtcdClient
from controlplane.adapters.etcd.tenants import EtcdTenantStore, TenantCache
from controlplane.adapters.grpc.server import GrpcServer
from controlplane.config import EtcdSettings
from controlplane.core.model import WorkerState
from controlplane.core.routing import SlaAwareRouter
from controlplane.errors import InvalidArgument
from controlplane.gateway.gate import AllowAll, RequestGate
from controlplane.gateway.grpc_inference import InferenceService
from controlplane.gateway.http_app import GatewayApp
from controlplane.gateway.metrics import GatewayMetrics
from controlplane.gateway.model_routing import ModelRoutingCache
from controlplane.gateway.pipeline import Gateway
from controlplane.gateway.routing import CircuitBreakers, LeastLoadedRouter
from controlplane.gateway.sla_routing import SlaGatewayRouter
from controlplane.gateway.tenant_gate import TenantGate
from controlplane.gateway.workers_view import WorkerChannels, WorkersView
from workers.openai_main import UvicornServer, listen_socket

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GatewaySettings:
    etcd: EtcdSettings = field(default_factory=EtcdSettings)
    listen: str = "127.0.0.1:8000"
    """HTTP host:port (port 0: any free port; see ``port_file``)."""
    grpc_listen: str = "127.0.0.1:0"
    """gRPC Inference host:port; "" = no gRPC service."""
    port_file: str = ""
    """Once serving, write "<http port> <grpc port>" here."""
    max_body_bytes: int = 4 << 20
    """Larger request bodies get 413."""
    max_migrations: int = 2
    """Moves to another worker per request (before or after the first token)."""
    breaker_failures: int = 3
    """Consecutive failures that open a worker's circuit."""
    breaker_cooldown_s: float = 5.0
    """How long an open circuit refuses before one probe request."""
    drain_timeout_s: float = 30.0
    auth: str = "tenants"
    """tenants: API keys and quotas from etcd (``switchboard tenants``); none: admit everyone."""
    slots_per_worker: int = 32
    """Requests one decoding worker takes at once before admission queues the rest."""


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host or "127.0.0.1", int(port)


async def run_gateway(
    settings: GatewaySettings, stop: asyncio.Event, *, gate: RequestGate | None = None
) -> None:
    client = EtcdClient(settings.etcd.endpoint, timeout_s=settings.etcd.timeout_s)
    channels = WorkerChannels()
    view = WorkersView(client, settings.etcd.prefix, channels)
    model_routing = ModelRoutingCache(view.model_info)
    sla_router = SlaGatewayRouter(
        SlaAwareRouter(), timing_for=model_routing.timing_for, rng=random.Random()
    )
    view.kv_sink = sla_router  # KV events from the WatchStats streams feed its prefix index
    metrics = GatewayMetrics()
    gateway = Gateway(
        view,
        LeastLoadedRouter(),
        CircuitBreakers(
            failure_threshold=settings.breaker_failures, cooldown_s=settings.breaker_cooldown_s
        ),
        metrics,
        max_migrations=settings.max_migrations,
        sla_router=sla_router,
        model_routing=model_routing,
    )
    background: list[asyncio.Task[None]] = []
    if gate is None and settings.auth == "tenants":
        tenants = TenantCache(EtcdTenantStore(client, settings.etcd.prefix))
        background.append(asyncio.create_task(tenants.run(), name="tenants"))

        def capacity(model: str) -> int:
            decoding = [
                r
                for r in view.records(model)
                if r.role in ("decode", "both") and r.state is WorkerState.SERVING
            ]
            return settings.slots_per_worker * len(decoding)

        tenant_gate = TenantGate(tenants, capacity, metrics=metrics)
        background.append(asyncio.create_task(tenant_gate.run(), name="admission"))
        gate = tenant_gate
    elif gate is None and settings.auth == "none":
        gate = AllowAll()
    elif gate is None:
        raise InvalidArgument(f"auth must be tenants or none, not {settings.auth!r}")
    app = GatewayApp(gateway, gate, max_body_bytes=settings.max_body_bytes)
    host, port = _split(settings.listen)
    sock = listen_socket(host, port)
    http_port = int(sock.getsockname()[1])
    grpc_server: GrpcServer | None = None
    grpc_port = 0
    if settings.grpc_listen:
        grpc_server = GrpcServer(settings.grpc_listen)
        grpc_port = grpc_server.server.add_insecure_port(settings.grpc_listen)
        if grpc_port == 0:
            sock.close()
            raise OSError(f"cannot bind the gRPC Inference service to {settings.grpc_listen}")
        grpc_server.add_servicer(
            InferenceService(gateway, gate), inference_pb2.DESCRIPTOR.services_by_name["Inference"]
        )
    server = UvicornServer(
        uvicorn.Config(
            app,
            http="httptools",
            lifespan="off",
            access_log=False,
            log_level="warning",
            timeout_graceful_shutdown=int(max(1, settings.drain_timeout_s)),
        )
    )
    tasks: list[asyncio.Task[None]] = [asyncio.create_task(view.run(), name="workers-view")]
    tasks += background
    try:
        if grpc_server is not None:
            await grpc_server.start(bind=False)
            await grpc_server.set_serving(True)
        http_task = asyncio.create_task(server.serve(sockets=[sock]), name="http")
        tasks.append(http_task)
        with contextlib.suppress(TimeoutError):  # serve anyway: /health says "syncing"
            await asyncio.wait_for(view.synced.wait(), 10.0)
        if settings.port_file:
            await asyncio.to_thread(
                Path(settings.port_file).write_text, f"{http_port} {grpc_port}\n"
            )
        log.info(
            "gateway serving http://%s:%d (OpenAI API), gRPC Inference on %s:%d",
            host, http_port, host, grpc_port,
        )  # fmt: skip
        stopper = asyncio.create_task(stop.wait())
        await asyncio.wait({stopper, http_task}, return_when=asyncio.FIRST_COMPLETED)
        stopper.cancel()
        log.info("draining: no new requests")
        app.draining = True
        if grpc_server is not None:
            await grpc_server.set_serving(False)
        server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await http_task
    finally:
        if grpc_server is not None:
            await grpc_server.stop(grace_s=settings.drain_timeout_s)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        sock.close()
        await gateway.close()
        await channels.close()
        await client.close()
        log.info("gateway stopped")
