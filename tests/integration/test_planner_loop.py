"""The planner loop on a real etcd: load read from a real gateway metrics registry (Prometheus
text, parsed), decisions written to the deployment with compare-and-swap, field ownership against
spec edits, advisory mode, and ``switchboard describe deployment`` / ``scale`` through a real
Deployments gRPC server and the real CLI process."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator, Mapping
from typing import Any

import pytest
from prometheus_client import generate_latest
from switchboard.v1 import deployments_pb2

from controlplane.adapters.etcd.client import EtcdClient
from controlplane.adapters.etcd.deployments import EtcdDeploymentStore
from controlplane.adapters.grpc.deployments import DeploymentsServicer
from controlplane.adapters.grpc.server import GrpcServer
from controlplane.core.deployments import PoolRole
from controlplane.core.reconcile import DeploymentStatus, PoolStatus
from controlplane.deployspec import spec_from_dict
from controlplane.local.procs import EtcdServer
from controlplane.planner import (
    ModelCounters,
    PlannerLoop,
    PlannerSettings,
    parse_gateway_metrics,
)
from controlplane.telemetry.metrics import GatewayMetrics, PlannerMetrics

MODEL = "llama-8b"


def doc(prefill: int = 1, decode: int = 1, *, hi: int = 8) -> dict[str, Any]:
    return {
        "name": "llm",
        "model": MODEL,
        "engine": "sim",
        "engine_args": {"profile": "llama-3.1-8b-h100"},
        "pools": [
            {"role": "prefill", "replicas": prefill, "min_replicas": 1, "max_replicas": hi,
             "autoscaling": True},
            {"role": "decode", "replicas": decode, "min_replicas": 1, "max_replicas": hi,
             "autoscaling": True},
        ],
    }  # fmt: skip


class GatewayLoad:
    """A real gateway metrics registry that requests are recorded into; read as the gateway's
    ``/metrics`` text. ``on_read`` runs inside ``read`` (after the pass listed deployments)."""

    def __init__(self) -> None:
        self.metrics = GatewayMetrics()
        self.on_read: Any = None

    def serve(self, n: int, *, isl: int, osl: int, ttft_s: float, itl_s: float) -> None:
        m = self.metrics
        for _ in range(n):
            m.requests.labels("acme", MODEL, "interactive", "chat", "200").inc()
            m.ttft.labels("acme", MODEL, "interactive").observe(ttft_s)
            m.itl.labels("acme", MODEL, "interactive").observe(itl_s)
            m.prompt_tokens.labels("acme", MODEL).inc(isl)
            m.generation_tokens.labels("acme", MODEL).inc(osl)

    async def read(self) -> Mapping[str, ModelCounters]:
        if self.on_read is not None:
            await self.on_read()
        return parse_gateway_metrics(generate_latest(self.metrics.registry).decode())


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def store(etcd: EtcdServer) -> AsyncIterator[EtcdDeploymentStore]:
    client = EtcdClient(etcd.endpoint)
    try:
        yield EtcdDeploymentStore(client)
    finally:
        await client.close()


async def ready_as_desired(store: EtcdDeploymentStore) -> None:
    """Stand-in for the reconciler's status: every desired replica ready."""
    spec = (await store.get("llm")).spec
    pools = tuple(PoolStatus(p.role, p.replicas, p.replicas, p.replicas) for p in spec.pools)
    await store.put_status("llm", DeploymentStatus(1, (), pools))


def replicas(spec: Any) -> tuple[int, int]:
    return spec.pool(PoolRole.PREFILL).replicas, spec.pool(PoolRole.DECODE).replicas


async def test_load_step_scales_through_the_store_and_spec_edits_keep_planner_replicas(
    store: EtcdDeploymentStore,
) -> None:
    await store.apply(spec_from_dict(doc()), now=0.0)
    await ready_as_desired(store)
    load, clock, pokes = GatewayLoad(), Clock(), []
    loop = PlannerLoop(store, load, PlannerSettings(interval_s=10), clock=clock,
                       on_change=lambda: pokes.append(1), metrics=PlannerMetrics())  # fmt: skip
    await loop.pass_once()  # first read: a baseline, no window yet
    assert replicas((await store.get("llm")).spec) == (1, 1)

    load.serve(800, isl=1100, osl=200, ttft_s=0.9, itl_s=0.06)  # 80 rps, missing both targets
    clock.now += 10
    await loop.pass_once()
    record = await store.get("llm")
    p, d = replicas(record.spec)
    assert p > 1 and d > 1
    assert pokes  # the reconciler was woken
    planner = await store.get_planner("llm")
    assert planner is not None and planner["observed_rps"] == pytest.approx(80.0)
    reasons = [x["reason"] for x in planner["decisions"]]
    assert any("→ +" in r and "prefill" in r for r in reasons), reasons
    assert all(x["applied"] for x in planner["decisions"])
    assert loop.metrics.desired.labels("llm", "decode")._value.get() == d

    # a spec edit (re-applying the original YAML, with a new max) keeps what the planner set
    edited = doc(1, 1, hi=6)
    after = await store.apply(spec_from_dict(edited), now=clock.now)
    assert replicas(after.spec) == (min(p, 6), min(d, 6))
    decode = after.spec.pool(PoolRole.DECODE)
    assert decode is not None and decode.max_replicas == 6  # the edit owns the bounds


async def test_a_concurrent_spec_edit_wins_and_the_planner_replans(
    store: EtcdDeploymentStore,
) -> None:
    await store.apply(spec_from_dict(doc()), now=0.0)
    await ready_as_desired(store)
    load, clock = GatewayLoad(), Clock()
    loop = PlannerLoop(store, load, PlannerSettings(), clock=clock, metrics=PlannerMetrics())
    await loop.pass_once()
    edits: list[Any] = []

    async def edit_during_pass() -> None:  # lands between the pass's read and its write
        if not edits:
            edits.append(await store.apply(spec_from_dict({**doc(), "priority": 5}), now=1.0))

    load.on_read = edit_during_pass
    load.serve(800, isl=1100, osl=200, ttft_s=0.9, itl_s=0.06)
    clock.now += 10
    await loop.pass_once()  # its compare-and-swap fails: nothing written
    record = await store.get("llm")
    assert record.spec.priority == 5 and replicas(record.spec) == (1, 1)
    load.serve(800, isl=1100, osl=200, ttft_s=0.9, itl_s=0.06)
    clock.now += 10
    await loop.pass_once()  # re-read, re-planned, written on top of the edit
    record = await store.get("llm")
    assert record.spec.priority == 5 and replicas(record.spec) > (1, 1)


async def test_advisory_mode_records_but_writes_no_spec_and_the_cli_shows_it(
    store: EtcdDeploymentStore,
) -> None:
    await store.apply(spec_from_dict(doc()), now=0.0)
    await ready_as_desired(store)
    generation = (await store.get("llm")).generation
    load, clock = GatewayLoad(), Clock()
    loop = PlannerLoop(store, load, PlannerSettings(advisory=True), clock=clock,
                       metrics=PlannerMetrics())  # fmt: skip
    await loop.pass_once()
    load.serve(800, isl=1100, osl=200, ttft_s=0.9, itl_s=0.06)
    clock.now += 10
    await loop.pass_once()
    record = await store.get("llm")
    assert record.generation == generation and replicas(record.spec) == (1, 1)
    load.serve(800, isl=1100, osl=200, ttft_s=0.9, itl_s=0.06)
    clock.now += 10
    await loop.pass_once()  # the same advice again: recorded once
    planner = await store.get_planner("llm")
    assert planner is not None and planner["advisory"] is True
    assert planner["decisions"] and not any(x["applied"] for x in planner["decisions"])
    per_pool = [(x["role"], x["from"], x["to"]) for x in planner["decisions"]]
    assert len(per_pool) == len(set(per_pool)), per_pool

    server = GrpcServer("127.0.0.1:0")
    server.add_servicer(
        DeploymentsServicer(store), deployments_pb2.DESCRIPTOR.services_by_name["Deployments"]
    )
    port = await server.start()
    try:
        out, rc = await cli("describe", "deployment", "llm", "--endpoint", f"127.0.0.1:{port}")
        assert rc == 0, out
        assert "Planner:            advisory (reports only)" in out
        assert "Planner decisions (newest last):" in out
        assert "[not applied]" in out and "→ +" in out
        out, rc = await cli("scale", "deployment", "llm", "--role", "decode", "--replicas", "3",
                            "--endpoint", f"127.0.0.1:{port}")  # fmt: skip
        assert rc != 0 and "autoscaled" in out, out
    finally:
        await server.stop()


async def cli(*args: str) -> tuple[str, int]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "controlplane", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    return out.decode(), proc.returncode or 0
