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
import dataclasses
import gc
import logging
import os
import random
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

import uvicorn
from switchboard.v1 import inference_pb2

from controlplane.adapters.etcd.client import EtcdClient
from controlplane.adapters.etcd.deployments import DeploymentCache, EtcdDeploymentStore
from controlplane.adapters.etcd.gateways import EtcdGatewayRegistry, GatewayPeers, GatewayRecord
from controlplane.adapters.etcd.tenants import EtcdTenantStore, TenantCache
from controlplane.adapters.grpc.server import GrpcServer
from controlplane.config import EtcdSettings
from controlplane.core.model import WorkerState
from controlplane.core.routing import SlaAwareRouter
from controlplane.core.routing.late import LatePolicy
from controlplane.errors import InvalidArgument, SwitchboardError
from controlplane.gateway.gate import AllowAll, RequestGate
from controlplane.gateway.grpc_inference import InferenceService
from controlplane.gateway.http_app import GatewayApp
from controlplane.gateway.model_routing import ModelRoutingCache
from controlplane.gateway.pipeline import Gateway
from controlplane.gateway.routing import CircuitBreakers, LeastLoadedRouter
from controlplane.gateway.routing_profiles import load_profiles
from controlplane.gateway.sla_routing import SlaGatewayRouter
from controlplane.gateway.tenant_gate import TenantGate
from controlplane.gateway.workers_view import WorkerChannels, WorkersView
from controlplane.registration import LeasedRecord
from controlplane.telemetry import tracing
from controlplane.telemetry.metrics import GatewayMetrics, serving_registry
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
    gateway_id: str = ""
    """This replica's name in etcd ("": <hostname>-<pid>). Replicas register under a lease and
    watch each other: tenants' quotas are shared between the live replicas by demand."""
    lease_ttl_s: int = 10
    """The registration's lease TTL: a replica that dies stops counting within it."""
    quota_sharing: str = "demand"
    """How replicas share a tenant's quotas: demand (each replica's part follows what its
    clients ask, controlplane/core/quota_shares.py) or even (each enforces limit / replicas,
    never more: no replica ever admits past its part, but a tenant that reaches one replica
    gets 1/N)."""
    demand_interval_s: float = 1.0
    """How often this replica rewrites its record with what its clients ask of each
    quota-limited tenant, when that changed (controlplane/core/quota_shares.py)."""
    otlp_endpoint: str = ""
    """Export traces over OTLP gRPC to this endpoint ("": ``OTEL_EXPORTER_OTLP_ENDPOINT``,
    else tracing off). ``/metrics`` is served on the HTTP port."""
    tenant_label_cap: int = 100
    """Distinct tenants named in metric labels; later ones are reported as "other"."""
    late_hold_factor: float = 4.0
    """The late lane (controlplane/core/routing/late.py): a request predicted to miss its TTFT
    target waits while requests that can still make theirs go first, at most this many times
    its class's TTFT target; 0: off (every request is sent at once, first come first
    served)."""
    worker_transport: str = "token"
    """How the request path calls workers: token (their token transport where their record
    has one, workers/token_transport.py, else gRPC) or grpc (always their gRPC service)."""
    routing_profiles: str = ""
    """YAML file of routing profiles per deployment and SLA class ("": the built-in ones,
    ``docs/routing-profiles.yaml``); read once at start, a bad file stops the start."""
    processes: int = 1
    """Gateway processes on this host, all serving ``listen`` (and ``grpc_listen``); more than
    one: a supervisor starts them (controlplane/gateway/supervisor.py), each a replica."""
    reuse_port: bool = False
    """Listen with SO_REUSEPORT (set by the supervisor for its processes)."""
    siblings_dir: str = ""
    """Set by the supervisor: each process writes its private loopback address here
    (``<gateway_id>.addr``), where its siblings ask it for ``/debug/requests`` they lack."""


GC_THRESHOLD = (50_000, 20, 20)
"""The collector's thresholds on the request path: a request allocates hundreds of short-lived
objects (parsed JSON, routing candidates, protobuf messages), almost none in cycles, so the
default first-generation threshold (700 allocations) ran a collection every few requests."""


async def publish_demand(registration: LeasedRecord[GatewayRecord], interval_s: float) -> None:
    """Rewrite this replica's record with its clients' demand every ``interval_s`` when it
    changed (``LeasedRecord.publish`` writes only a changed record); etcd errors are the
    registration's to handle, so one is logged and the next round tries again."""
    while True:
        await asyncio.sleep(interval_s)
        try:
            await registration.publish()
        except SwitchboardError as e:
            log.debug("demand not published: %s", e)


def tune_gc() -> None:
    """Once started: move everything alive (modules, settings, caches) out of the collector's
    view (``gc.freeze``) and collect young objects less often (``GC_THRESHOLD``)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLD)


@dataclass(frozen=True)
class Siblings:
    """The other processes of this gateway's supervisor (``GatewaySettings.siblings_dir``): each
    publishes ``<gateway_id>.addr`` (its private loopback host:port) there once serving."""

    directory: Path
    me: str

    def publish(self, port: int) -> None:
        tmp = self.directory / f".{self.me}.tmp"
        tmp.write_text(f"127.0.0.1:{port}")
        tmp.replace(self.directory / f"{self.me}.addr")  # readers never see half a file

    def withdraw(self) -> None:
        (self.directory / f"{self.me}.addr").unlink(missing_ok=True)

    def others(self) -> list[str]:
        out = []
        for path in sorted(self.directory.glob("*.addr")):
            if path.stem != self.me:
                with contextlib.suppress(OSError):
                    out.append(path.read_text().strip())
        return [a for a in out if a]


def _bind_grpc(server: GrpcServer, address: str) -> int:
    port = server.server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"cannot bind the gRPC Inference service to {address}")
    return int(port)


def split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host or "127.0.0.1", int(port)


async def run_gateway(
    settings: GatewaySettings, stop: asyncio.Event, *, gate: RequestGate | None = None
) -> None:
    client = EtcdClient(settings.etcd.endpoint, timeout_s=settings.etcd.timeout_s)
    channels = WorkerChannels()
    deployments = DeploymentCache(EtcdDeploymentStore(client, settings.etcd.prefix))
    view = WorkersView(client, settings.etcd.prefix, channels, deployments=deployments)
    model_routing = ModelRoutingCache(
        view.model_info, threshold_lookup=view.long_context_threshold_tokens
    )
    profiles = load_profiles(settings.routing_profiles) if settings.routing_profiles else None
    sla_router = SlaGatewayRouter(
        SlaAwareRouter(profiles=profiles),
        timing_for=model_routing.timing_for,
        facts_for=model_routing.facts_for,
        rng=random.Random(),
    )
    view.kv_sink = sla_router  # KV events from the WatchStats streams feed its prefix index
    metrics = GatewayMetrics(tenant_cap=settings.tenant_label_cap)
    tracer_provider = tracing.setup_tracing("switchboard-gateway", settings.otlp_endpoint)
    registry = EtcdGatewayRegistry(client, settings.etcd.prefix)
    peers = GatewayPeers(registry)
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
        sla_classes=deployments.sla_classes,
        tracer=tracing.tracer_of(tracer_provider),
        late_policy=LatePolicy(max_hold_factor=settings.late_hold_factor),
        token_transport=settings.worker_transport == "token",
    )
    background: list[asyncio.Task[None]] = [
        asyncio.create_task(deployments.run(), name="deployments"),
        asyncio.create_task(peers.run(), name="gateway-peers"),
    ]
    # what must have been read from etcd before this gateway answers as itself
    loaded = [view.synced, deployments.ever_synced]
    if gate is None and settings.auth == "tenants":
        tenants = TenantCache(EtcdTenantStore(client, settings.etcd.prefix))
        background.append(asyncio.create_task(tenants.run(), name="tenants"))
        loaded.append(tenants.ever_synced)  # before it, every API key would get 401

        def capacity(model: str) -> int:
            decoding = [
                r
                for r in view.records(model)
                if r.role in ("decode", "both") and r.state is WorkerState.SERVING
            ]
            return settings.slots_per_worker * len(decoding)

        tenant_gate = TenantGate(
            tenants,
            capacity,
            classes=deployments.sla_classes,
            metrics=metrics,
            replicas=peers.count,
            peer_demand=peers.demands if settings.quota_sharing == "demand" else None,
        )
        background.append(asyncio.create_task(tenant_gate.run(), name="admission"))
        gate = tenant_gate
    elif gate is None and settings.auth == "none":
        gate = AllowAll()
    elif gate is None:
        raise InvalidArgument(f"auth must be tenants or none, not {settings.auth!r}")
    if settings.quota_sharing not in ("demand", "even"):
        raise InvalidArgument(
            f"quota sharing must be demand or even, not {settings.quota_sharing!r}"
        )
    whoami = (lambda key: gate.tenant(key).name) if isinstance(gate, TenantGate) else None
    gateway_id = settings.gateway_id or f"{socket.gethostname()}-{os.getpid()}"
    siblings = Siblings(Path(settings.siblings_dir), gateway_id) if settings.siblings_dir else None
    app = GatewayApp(
        gateway,
        gate,
        max_body_bytes=settings.max_body_bytes,
        replicas=peers.count,
        whoami=whoami,
        metrics_registry=serving_registry(metrics),
        siblings=siblings.others if siblings is not None else None,
        ready=lambda: all(e.is_set() for e in loaded),
    )
    # A single gateway binds at once (port 0 resolves before its record is written) and serves
    # while it syncs (/health says "syncing"); one of several processes on a shared port
    # (``reuse_port``) listens only once synced, so the kernel sends its siblings the
    # connections meanwhile instead of to a process that would answer 401 or 503.
    host, http_port = split_address(settings.listen)
    sockets: list[socket.socket] = []
    if not settings.reuse_port:
        sockets.append(listen_socket(host, http_port))
        http_port = int(sockets[0].getsockname()[1])
    grpc_server: GrpcServer | None = None
    grpc_port = 0
    if settings.grpc_listen:
        grpc_server = GrpcServer(settings.grpc_listen, reuse_port=settings.reuse_port)
        grpc_server.add_servicer(
            InferenceService(gateway, gate), inference_pb2.DESCRIPTOR.services_by_name["Inference"]
        )
        grpc_port = split_address(settings.grpc_listen)[1]
        if not settings.reuse_port:
            try:
                grpc_port = _bind_grpc(grpc_server, settings.grpc_listen)
            except OSError:
                sockets[0].close()
                raise
    server = UvicornServer(
        uvicorn.Config(
            app,
            http="httptools",
            lifespan="off",
            access_log=False,
            proxy_headers=False,  # nothing reads the client address: one ASGI layer less
            log_level="warning",
            timeout_graceful_shutdown=int(max(1, settings.drain_timeout_s)),
        )
    )
    peers.me = gateway_id
    me = GatewayRecord(
        gateway_id, f"{host}:{http_port}", f"{host}:{grpc_port}" if grpc_port else "", time.time()
    )

    sharing = isinstance(gate, TenantGate) and gate.peer_demand is not None

    def record(_previous: GatewayRecord | None) -> GatewayRecord:
        if sharing and isinstance(gate, TenantGate):
            return dataclasses.replace(me, demand=gate.demands())
        return me

    registration = LeasedRecord(
        registry,
        record,
        clock=time.time,
        lease_ttl_s=settings.lease_ttl_s,
        report_interval_s=settings.lease_ttl_s / 2,
        name=f"gateway {gateway_id}",
    )
    tasks: list[asyncio.Task[None]] = [asyncio.create_task(view.run(), name="workers-view")]
    tasks.append(asyncio.create_task(registration.run(), name="registration"))
    if sharing:
        tasks.append(
            asyncio.create_task(
                publish_demand(registration, settings.demand_interval_s), name="demand"
            )
        )
    tasks += background

    async def open_doors() -> asyncio.Task[None]:
        if grpc_server is not None:
            if settings.reuse_port:
                _bind_grpc(grpc_server, settings.grpc_listen)
            await grpc_server.start(bind=False)
            await grpc_server.set_serving(True)
        if settings.reuse_port:
            sockets.append(listen_socket(host, http_port, reuse_port=True))
        if siblings is not None:  # this process alone, for its siblings (debug lookups)
            sockets.append(listen_socket("127.0.0.1", 0))
        task = asyncio.create_task(server.serve(sockets=sockets), name="http")
        tasks.append(task)
        return task

    try:
        if not settings.reuse_port:
            http_task = await open_doors()
        with contextlib.suppress(TimeoutError):  # serve anyway: /health says "syncing"
            await asyncio.wait_for(asyncio.gather(*(e.wait() for e in loaded)), 10.0)
        if settings.reuse_port:
            http_task = await open_doors()
        tune_gc()
        if siblings is not None:
            await asyncio.to_thread(siblings.publish, sockets[-1].getsockname()[1])
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
        if siblings is not None:
            siblings.withdraw()
        for sk in sockets:
            sk.close()
        await gateway.close()
        await channels.close()
        await client.close()
        if tracer_provider is not None:
            await asyncio.to_thread(tracer_provider.shutdown)
        log.info("gateway stopped")
