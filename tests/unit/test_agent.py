"""NodeAgent's state machine against a fake lease store (no etcd)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest

from controlplane.core.model import GIB, Gpu, NodeInventory
from controlplane.errors import InvalidArgument
from controlplane.nodeagent.agent import NodeAgent
from tests.fakes import FakeClock, FakeNodeLeaseStore, ScriptedProbe


def gpus(free_gib: int, healthy: bool = True) -> tuple[Gpu, ...]:
    return (Gpu(0, "H100", 80 * GIB, free_gib * GIB, healthy=healthy),)


@contextlib.asynccontextmanager
async def running(agent: NodeAgent) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(agent.run())
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def until(predicate: object, timeout_s: float = 5.0) -> None:
    async def poll() -> None:
        while not predicate():  # type: ignore[operator]
            await asyncio.sleep(0.01)

    await asyncio.wait_for(poll(), timeout_s)


def make(store: FakeNodeLeaseStore, probe: ScriptedProbe, clock: FakeClock) -> NodeAgent:
    return NodeAgent(
        store,
        probe,
        NodeInventory(node_id="n1", labels={"zone": "a"}),
        clock=clock,
        lease_ttl_s=2,
        report_interval_s=0.0,
        backoff_initial_s=0.01,
        backoff_max_s=0.05,
    )


async def test_registers_refreshes_and_revokes_on_stop() -> None:
    store, clock = FakeNodeLeaseStore(), FakeClock()
    agent = make(store, ScriptedProbe([gpus(80)]), clock)
    async with running(agent):
        await until(lambda: store.keepalives >= 1, 5)
        assert store.calls[0] == "register"
        lease = agent.lease_id
        assert store.records["n1"][1] == lease
    assert store.calls[-1] == "deregister"
    assert "n1" not in store.records


async def test_keeps_the_same_lease_while_etcd_is_away() -> None:
    store, clock = FakeNodeLeaseStore(), FakeClock()
    agent = make(store, ScriptedProbe([gpus(80)]), clock)
    async with running(agent):
        await until(agent.registered.is_set)
        lease = agent.lease_id
        store.down = True
        failures = store.calls.count("keepalive")
        await until(lambda: store.calls.count("keepalive") >= failures + 3)
        store.down = False
        await until(lambda: store.keepalives >= 2)
        assert agent.lease_id == lease
        assert agent.registrations == 1  # never re-registered: the lease survived


async def test_registers_again_when_the_lease_is_gone() -> None:
    store, clock = FakeNodeLeaseStore(), FakeClock()
    agent = make(store, ScriptedProbe([gpus(80)]), clock)
    async with running(agent):
        await until(agent.registered.is_set)
        old = agent.lease_id
        store.forget_leases()
        await until(lambda: agent.registrations == 2 and "n1" in store.records)
        assert agent.lease_id != old


async def test_retries_registration_until_etcd_answers() -> None:
    store, clock = FakeNodeLeaseStore(down=True), FakeClock()
    agent = make(store, ScriptedProbe([gpus(80)]), clock)
    async with running(agent):
        await until(lambda: store.calls.count("register") >= 3)
        assert not agent.registered.is_set()
        store.down = False
        await until(agent.registered.is_set)
        assert "n1" in store.records


async def test_reports_changed_gpu_figures_under_the_same_lease() -> None:
    store, clock = FakeNodeLeaseStore(), FakeClock()
    probe = ScriptedProbe([gpus(80), gpus(30, healthy=False)])
    agent = make(store, probe, clock)
    async with running(agent):
        await until(agent.registered.is_set)
        probe.advance()
        clock.now += 5
        await until(lambda: "update" in store.calls)
        inv, lease = store.records["n1"]
        assert inv.gpus[0].memory_free_bytes == 30 * GIB
        assert not inv.gpus[0].healthy
        assert lease == agent.lease_id


def test_bad_declaration_fails_fast() -> None:
    probe = ScriptedProbe([(Gpu(0, "H100", -1, 0),)])
    with pytest.raises(InvalidArgument, match="memory_total_bytes"):
        make(FakeNodeLeaseStore(), probe, FakeClock())
