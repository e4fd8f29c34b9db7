"""The `switchboard serve-openai` process: one engine behind the OpenAI-compatible HTTP API.

The composition root for ``workers.openai_http.OpenAIApp``: it builds the engine (as
``switchboard worker`` does), a tokenizer for it, the ASGI app under uvicorn (httptools parser,
on the uvloop event loop the CLI starts), and the Worker gRPC service on a second port of the
same process. The gRPC service exports held KV (``FetchKv``) to decode servers, which is how the
HTTP prefill/decode protocol moves KV between simulated engines (its address goes into
``kv_transfer_params``), and it lets Switchboard's own router drive the very same engines that
peer routers reach over HTTP. Nothing registers in etcd: peers are pointed at the URLs.

On ``stop`` the server drains: ``/health`` answers 503, new requests get 503, uvicorn stops
accepting connections and waits (up to ``drain_timeout_s``) for open ones; then the gRPC server
stops and the engine is closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import uvicorn
from switchboard.v1 import worker_pb2

from controlplane.adapters.grpc.server import GrpcServer
from controlplane.errors import InvalidArgument
from controlplane.telemetry import tracing
from workers.engine import InferenceEngine, Role
from workers.kv_transfer import GrpcKvFetcher
from workers.main import WorkerSettings, build_engine
from workers.openai_http import OpenAIApp
from workers.service import WorkerService
from workers.token_transport import TokenServer
from workers.tokenizer import HfTokenizer, SimTokenizer, Tokenizer

log = logging.getLogger(__name__)

ENGINES = ("sim", "cpu")
"""Engines served over HTTP: sim (``SimTokenizer``) and cpu (the model's own tokenizer)."""


@dataclass(frozen=True)
class OpenAIServerSettings:
    engine: str = "sim"
    """Engine (see ``ENGINES``)."""
    model: str = ""
    """Model name clients send as ``model``; "" = the engine's (sim: the profile's model)."""
    profile: str = "llama-3.1-8b-h100"
    """sim: profile name (workers/profiles/<name>.yaml) or a path to a profile file."""
    speedup: float = 1.0
    """sim: run this many times faster than real time."""
    model_path: str = ""
    """cpu: the model directory (its tokenizer serves the HTTP side too)."""
    engine_args: str = ""
    """Engine-specific options as a JSON object (see ``WorkerSettings.engine_args``)."""
    role: Role = Role.BOTH
    """prefill: serves the prefill half of ``kv_transfer_params`` requests; decode: the decode
    half; both: either, and plain requests (every role serves plain requests)."""
    host: str = "127.0.0.1"
    port: int = 8000
    """HTTP port; 0 = any free port (see ``port_file``)."""
    grpc_port: int = 0
    """Worker gRPC service (FetchKv, Prefill, Decode, Stats); 0 = any free port."""
    advertise_host: str = ""
    """Host that decode servers use to fetch KV from this one (default: ``host``)."""
    worker_id: str = field(default_factory=lambda: f"http-{uuid.uuid4().hex[:10]}")
    drain_timeout_s: float = 30.0
    port_file: str = ""
    """Once serving, write "<http port> <grpc port> <token port>" here."""
    token_port: int = 0
    """Prefill / Decode over the token transport (workers/token_transport.py); 0 = any free
    port, -1 = off."""
    otlp_endpoint: str = ""
    """Export traces over OTLP gRPC here ("": ``OTEL_EXPORTER_OTLP_ENDPOINT``, else off)."""


def build_tokenizer(settings: OpenAIServerSettings, engine: InferenceEngine) -> Tokenizer:
    """The tokenizer for ``engine``'s model."""
    if settings.engine == "sim":
        return SimTokenizer(engine.vocab_size)
    if settings.engine == "cpu":
        return HfTokenizer(settings.model_path)
    raise InvalidArgument(
        f"engine {settings.engine!r} has no tokenizer for the HTTP server yet; choose from "
        f"{ENGINES}"
    )


class UvicornServer(uvicorn.Server):
    """uvicorn without its own signal handling: the caller's ``stop`` event decides."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def bound_socket(host: str, port: int, *, reuse_port: bool = False) -> socket.socket:
    """A TCP socket bound to ``host:port`` (port 0: any free one), not listening yet;
    ``reuse_port``: SO_REUSEPORT, so several processes listen on the same port and the kernel
    spreads new connections between them."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


def listen_socket(host: str, port: int, *, reuse_port: bool = False) -> socket.socket:
    """A listening, non-blocking ``bound_socket``."""
    sock = bound_socket(host, port, reuse_port=reuse_port)
    sock.listen(2048)
    sock.setblocking(False)
    return sock


async def run_openai_server(settings: OpenAIServerSettings, stop: asyncio.Event) -> None:
    if settings.engine not in ENGINES:
        raise InvalidArgument(
            f"engine {settings.engine!r} is not served over HTTP yet; choose from {ENGINES}"
        )
    advertise = settings.advertise_host or settings.host
    grpc_server = GrpcServer(f"{settings.host}:{settings.grpc_port}")
    grpc_port = grpc_server.server.add_insecure_port(f"{settings.host}:{settings.grpc_port}")
    if grpc_port == 0:
        raise OSError(f"cannot bind the Worker gRPC service to port {settings.grpc_port}")
    kv_address = f"{advertise}:{grpc_port}"
    tracer_provider = tracing.setup_tracing(
        f"switchboard-worker-{settings.role.value}", settings.otlp_endpoint
    )
    tracer = tracing.tracer_of(tracer_provider)
    fetcher = GrpcKvFetcher(tracer=tracer)
    engine = build_engine(
        WorkerSettings(
            model=settings.model,
            engine=settings.engine,
            role=settings.role,
            profile=settings.profile,
            speedup=settings.speedup,
            model_path=settings.model_path,
            engine_args=settings.engine_args,
        ),
        kv_address,
        fetcher,
    )
    app = OpenAIApp(
        engine,
        build_tokenizer(settings, engine),
        model=settings.model or None,
        role=settings.role,
        kv_address=kv_address,
        tracer=tracer,
    )
    service = WorkerService(engine, worker_id=settings.worker_id, role=settings.role, tracer=tracer)
    grpc_server.add_servicer(service, worker_pb2.DESCRIPTOR.services_by_name["Worker"])
    token_server: TokenServer | None = None
    token_port = -1
    if settings.token_port >= 0:
        token_server = TokenServer(service)
        token_port = await token_server.start(settings.host, settings.token_port)
    sock = listen_socket(settings.host, settings.port)
    http_port = int(sock.getsockname()[1])
    config = uvicorn.Config(
        app,
        http="httptools",
        lifespan="off",
        access_log=False,
        log_level="warning",
        timeout_graceful_shutdown=int(max(1, settings.drain_timeout_s)),
    )
    server = UvicornServer(config)
    tasks: list[asyncio.Task[None]] = []
    try:
        await grpc_server.start(bind=False)
        await grpc_server.set_serving(True)
        tasks.append(asyncio.create_task(server.serve(sockets=[sock]), name="http"))
        tasks.append(asyncio.create_task(service.publish_forever(), name="load-reports"))
        # The socket listens already: connections wait in its backlog until uvicorn accepts.
        if settings.port_file:
            await asyncio.to_thread(
                Path(settings.port_file).write_text, f"{http_port} {grpc_port} {token_port}\n"
            )
        log.info(
            "serving %s (%s, %s) on http://%s:%d, Worker gRPC on %s",
            app.model, settings.engine, settings.role, settings.host, http_port, kv_address,
        )  # fmt: skip
        stopper = asyncio.create_task(stop.wait())
        await asyncio.wait({stopper, tasks[0]}, return_when=asyncio.FIRST_COMPLETED)
        stopper.cancel()
        log.info("draining: no new requests")
        app.draining = True
        service.draining = True
        await grpc_server.set_serving(False)
        server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await tasks[0]
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        sock.close()
        await grpc_server.stop(grace_s=1.0)
        if token_server is not None:
            await token_server.close()
        await fetcher.close()
        close = getattr(engine, "aclose", None)
        if close is not None:
            await close()
        if tracer_provider is not None:
            await asyncio.to_thread(tracer_provider.shutdown)
        log.info("stopped")
