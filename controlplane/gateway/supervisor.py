"""``switchboard gateway --processes N``: N gateway processes behind one address on one host.

One gateway process is one Python interpreter: it uses one core, whatever the host has. The
gateway is stateless by design (several replicas route well without sharing memory, see
docs/architecture.md), so the way to use more cores is more replicas; this module runs them on
one host behind one HTTP (and gRPC) address, so clients, load balancers and Prometheus see one
gateway.

* **Ports.** The supervisor reserves each port with a socket bound with SO_REUSEPORT that never
  listens (port 0 resolves here, once); every process listens on that port with SO_REUSEPORT,
  and the kernel spreads new connections over the listening sockets (never to the reserving
  one). The reservation lives as long as the supervisor, so a restarted process gets the same
  port back and no other program takes it meanwhile.
* **Each process is a replica**: its own gateway id (``<id>-<i>``, id = ``--gateway-id`` or
  ``<hostname>-<supervisor pid>``), etcd registration, view of the workers, router state and
  admission controller. Tenants' quotas are shared between live replicas by demand as for any
  replicas (controlplane/core/quota_shares.py): the kernel spreads *connections*, and a tenant
  that sends everything over one keep-alive connection reaches one process, which then gets
  the whole quota.
* **Metrics**: the supervisor points ``PROMETHEUS_MULTIPROC_DIR`` at a fresh directory for its
  processes; any process's ``/metrics`` answers the sum over all of them
  (``telemetry.metrics.serving_registry``). Records that share an address are one scrape target
  for the fleet's service discovery and one source for the planner.
* **``/debug/requests/{id}``**: each process keeps the decisions it made; one that lacks a
  record asks its siblings over their private loopback listeners (``main.Siblings``), so
  ``switchboard explain request`` works through the shared address.
* **Lifecycle**: processes are started with multiprocessing's ``spawn``. The port file is
  written once all of them serve. A process that exits is started again (after 1 s, doubling
  to 30 s while it keeps failing); one that exits before it ever served fails the whole start
  (bad flags or routing profiles: the error is in its log lines above). On ``stop`` every
  process gets SIGTERM and drains as a single gateway does; the supervisor waits
  ``drain_timeout_s`` + 10 s, then kills what is left. A supervisor that is killed takes its
  processes with it (``die_with_parent``).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from multiprocessing.process import BaseProcess
from pathlib import Path

from prometheus_client import multiprocess

from controlplane.errors import SwitchboardError
from controlplane.gateway.main import GatewaySettings, split_address
from controlplane.telemetry.metrics import MULTIPROC_DIR_ENV
from workers.openai_main import bound_socket

log = logging.getLogger(__name__)

RESTART_DELAY_S = (1.0, 30.0)
"""First and longest wait before a process that exited is started again."""
HEALTHY_AFTER_S = 60.0
"""A process that served this long before it exited is restarted after the first delay again."""


def die_with_parent() -> None:
    """In a gateway process: get SIGTERM (and drain) when the supervisor dies, even by SIGKILL,
    instead of serving on as an orphan (Linux ``PR_SET_PDEATHSIG``; elsewhere a no-op)."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_pdeathsig = 1
    libc.prctl(pr_set_pdeathsig, signal.SIGTERM)
    if os.getppid() == 1:  # the supervisor died before the call took effect
        os.kill(os.getpid(), signal.SIGTERM)


def reserve_port(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` with SO_REUSEPORT that never listens: it holds the port
    (port 0: picks one) for processes that listen on it with SO_REUSEPORT."""
    return bound_socket(host, port, reuse_port=True)


@dataclasses.dataclass
class _Slot:
    index: int
    settings: GatewaySettings
    process: BaseProcess | None = None
    started_at: float = 0.0
    served: bool = False
    failures: int = 0
    restart_at: float | None = None

    @property
    def port_file(self) -> Path:
        return Path(self.settings.port_file)

    @property
    def metrics_dir(self) -> str:
        return str(Path(self.settings.siblings_dir).parent / "metrics")


def process_settings(
    settings: GatewaySettings,
    index: int,
    *,
    listen: str,
    grpc_listen: str,
    run_dir: Path,
    base: str,
) -> GatewaySettings:
    """Process ``index`` 's settings: the reserved ports with SO_REUSEPORT, its own id and port
    file, the shared siblings directory."""
    return dataclasses.replace(
        settings,
        processes=1,
        listen=listen,
        grpc_listen=grpc_listen,
        port_file=str(run_dir / f"process-{index}.port"),
        gateway_id=f"{base}-{index}",
        reuse_port=True,
        siblings_dir=str(run_dir / "siblings"),
    )


async def supervise(
    settings: GatewaySettings,
    stop: asyncio.Event,
    *,
    target: Callable[[GatewaySettings], None],
) -> None:
    """Run ``settings.processes`` gateway processes (``target(settings)`` in each: it serves
    until SIGTERM) until ``stop``; see the module docstring."""
    if settings.processes < 1:
        raise SwitchboardError(f"--processes must be at least 1, not {settings.processes}")
    host, port = split_address(settings.listen)
    holds = [reserve_port(host, port)]
    http_port = int(holds[0].getsockname()[1])
    grpc_listen = ""
    if settings.grpc_listen:
        ghost, gport = split_address(settings.grpc_listen)
        try:
            holds.append(reserve_port(ghost, gport))
        except OSError:
            holds[0].close()
            raise
        grpc_listen = f"{ghost}:{holds[1].getsockname()[1]}"
    run_dir = Path(tempfile.mkdtemp(prefix="switchboard-gateway-"))
    (run_dir / "metrics").mkdir()
    (run_dir / "siblings").mkdir()
    base = settings.gateway_id or f"{socket.gethostname()}-{os.getpid()}"
    slots = [
        _Slot(
            i,
            process_settings(
                settings,
                i,
                listen=f"{host}:{http_port}",
                grpc_listen=grpc_listen,
                run_dir=run_dir,
                base=base,
            ),
        )
        for i in range(settings.processes)
    ]
    previous_env = os.environ.get(MULTIPROC_DIR_ENV)
    os.environ[MULTIPROC_DIR_ENV] = str(run_dir / "metrics")  # read by each process at start
    context = multiprocessing.get_context("spawn")

    def start(slot: _Slot) -> None:
        slot.port_file.unlink(missing_ok=True)
        slot.process = context.Process(
            target=target, args=(slot.settings,), name=f"gateway-{slot.index}", daemon=False
        )
        slot.process.start()
        slot.started_at = time.monotonic()
        slot.restart_at = None

    try:
        for slot in slots:
            start(slot)
        ready = False
        while not stop.is_set():
            now = time.monotonic()
            for slot in slots:
                _check(slot, now, start)
            if not ready and all(s.served for s in slots):
                ready = True
                if settings.port_file:
                    grpc_port = holds[1].getsockname()[1] if len(holds) > 1 else 0
                    await asyncio.to_thread(
                        Path(settings.port_file).write_text, f"{http_port} {grpc_port}\n"
                    )
                log.info(
                    "gateway: %d processes serving http://%s:%d%s",
                    len(slots),
                    host,
                    http_port,
                    f", gRPC Inference on {grpc_listen}" if grpc_listen else "",
                )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.2)
    finally:
        await asyncio.to_thread(_stop_all, slots, settings.drain_timeout_s + 10.0)
        if previous_env is None:
            os.environ.pop(MULTIPROC_DIR_ENV, None)
        else:
            os.environ[MULTIPROC_DIR_ENV] = previous_env
        shutil.rmtree(run_dir, ignore_errors=True)
        for sock in holds:
            sock.close()


def _check(slot: _Slot, now: float, start: Callable[[_Slot], None]) -> None:
    """One look at ``slot``: note that it serves, restart it when due, schedule a restart when
    it exited; a process that exits before it ever served is an error."""
    p = slot.process
    if p is None:
        return
    if not slot.served and slot.port_file.exists():
        slot.served = True
    if p.is_alive() or p.exitcode is None:
        return
    if slot.restart_at is None:
        if not slot.served:
            raise SwitchboardError(
                f"gateway process {slot.index} exited with code {p.exitcode} before serving "
                "(its log lines above say why)"
            )
        if p.pid is not None:
            multiprocess.mark_process_dead(p.pid, slot.metrics_dir)  # type: ignore[no-untyped-call]
        lived = now - slot.started_at
        slot.failures = 1 if lived >= HEALTHY_AFTER_S else slot.failures + 1
        delay = min(RESTART_DELAY_S[1], RESTART_DELAY_S[0] * 2 ** (slot.failures - 1))
        log.warning(
            "gateway process %d (pid %s) exited with code %s after %.0f s; restarting in %.0f s",
            slot.index, p.pid, p.exitcode, lived, delay,
        )  # fmt: skip
        slot.restart_at = now + delay
    elif now >= slot.restart_at:
        start(slot)


def _stop_all(slots: list[_Slot], timeout_s: float) -> None:
    """SIGTERM every process (each drains), wait up to ``timeout_s`` in all, kill the rest."""
    running = [s.process for s in slots if s.process is not None and s.process.is_alive()]
    for p in running:
        p.terminate()
    deadline = time.monotonic() + timeout_s
    for p in running:
        p.join(max(0.0, deadline - time.monotonic()))
        if p.is_alive():
            log.warning("gateway process %s did not drain in time: killed", p.pid)
            p.kill()
            p.join(5.0)
