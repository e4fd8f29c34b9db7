"""Quotas shared between gateway replicas by demand (controlplane/core/quota_shares.py), and
TenantGate using the shares with hand-written peers."""

from __future__ import annotations

import math

import pytest
from prometheus_client import CollectorRegistry

from controlplane.core.admission import TenantLimits
from controlplane.core.quota_shares import DemandMeter, TenantDemand, demand_share
from controlplane.core.tenants import Quotas, Tenant
from controlplane.gateway.errors import RateLimited
from controlplane.gateway.gate import RequestContext
from controlplane.gateway.tenant_gate import TenantGate
from controlplane.telemetry.metrics import GatewayMetrics

Q = TenantLimits(60, 6000, 8)
IDLE = TenantDemand()


def d(rpm: float, tpm: float = 0.0, conc: float = 0.0) -> TenantDemand:
    return TenantDemand(rpm, tpm, conc)


@pytest.mark.parametrize(
    ("mine", "others", "replicas", "share"),
    [
        # alone: everything
        (d(100, 10_000, 20), [], 1, Q),
        # one busy replica, one idle: the idle one's even share is lent to it
        (d(100, 10_000, 20), [IDLE], 2, Q),
        # the idle one keeps its even share (it has asked for nothing more)
        (IDLE, [d(100, 10_000, 20)], 2, TenantLimits(30, 3000, 4)),
        # both busy: even
        (d(100, 10_000, 20), [d(100, 10_000, 20)], 2, TenantLimits(30, 3000, 4)),
        # 4 replicas, two idle, two asking for more: the idle halves go to them by how much more
        (d(35, 3500, 5), [d(25, 2500, 3), IDLE, IDLE], 4, TenantLimits(35, 3500, 5)),
        (d(25, 2500, 3), [d(35, 3500, 5), IDLE, IDLE], 4, TenantLimits(25, 2500, 3)),
        # a replica using part of its even share lends only the rest
        (d(100), [d(10)], 2, TenantLimits(50, 3000, 4)),
        # one live replica that publishes no demand keeps its even share and lends nothing
        (d(100, 10_000, 20), [IDLE], 3, TenantLimits(40, 4000, 6)),
        # no demand anywhere: even
        (IDLE, [IDLE, IDLE], 3, TenantLimits(20, 2000, 3)),
    ],
)
def test_demand_share(
    mine: TenantDemand, others: list[TenantDemand], replicas: int, share: TenantLimits
) -> None:
    assert demand_share(Q, mine, others, replicas) == share


def test_what_is_lent_is_at_most_what_the_others_leave_unused() -> None:
    """Every replica keeps its even share; the parts above it add up to no more than the even
    shares others do not use (plus one per replica for rounding up)."""
    demands = [d(90, 500, 9), d(5, 9000, 1), IDLE, d(30, 30, 3)]
    n = len(demands)
    for quota, limit in (("requests_per_minute", 60), ("tokens_per_minute", 6000)):
        even = limit / n
        lent = 0.0
        for i, mine in enumerate(demands):
            share = demand_share(Q, mine, demands[:i] + demands[i + 1 :], n)
            assert getattr(share, quota) >= even
            lent += getattr(share, quota) - even
        unused = sum(max(0.0, even - getattr(x, quota)) for x in demands)
        assert unused - 1e-6 <= lent <= unused + n


def test_unlimited_stays_unlimited_and_a_part_is_never_zero() -> None:
    q = TenantLimits(0, 1, 0)
    assert demand_share(q, IDLE, [d(100, 100, 100)] * 3, 4) == TenantLimits(0, 1, 0)


def test_the_meter_reads_a_steady_rate_and_forgets_a_stopped_one() -> None:
    meter = DemandMeter(tau_s=10.0)
    key = ("m", "acme")
    now = 0.0
    for _ in range(600):  # 2 requests of 50 tokens a second for 5 minutes
        meter.ask(key, 50, now)
        now += 0.5
    rpm, tpm = meter.rate(key, now)
    assert rpm == pytest.approx(120, rel=0.05) and tpm == pytest.approx(6000, rel=0.05)
    assert meter.rates(now)[key] == pytest.approx((rpm, tpm))
    later = now + 10.0 * math.log(rpm / 0.005)  # decayed below the 0.01 rpm floor
    assert meter.rates(later) == {} and meter.rate(key, later) == (0.0, 0.0)


class Keys:
    def __init__(self, quotas: Quotas) -> None:
        self.tenant = Tenant("acme", ("*",), (), quotas=quotas)

    def authenticate(self, api_key: str) -> Tenant | None:
        return self.tenant if api_key == "key" else None


class Peers:
    """What GatewayPeers.demands answers: set by the test."""

    def __init__(self, others: list[TenantDemand], replicas: int) -> None:
        self.others, self.replicas = others, replicas

    def __call__(self, model: str, tenant: str) -> tuple[list[TenantDemand], int]:
        return self.others, self.replicas


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def ctx(i: int) -> RequestContext:
    return RequestContext(f"r{i}", "m", "key", "/v1/completions", 10, 10)


async def admitted(gate: TenantGate, n: int, start: int = 0) -> int:
    count = 0
    for i in range(start, start + n):
        try:
            ticket = await gate.admit(ctx(i))
        except RateLimited:
            continue
        gate.release(ticket, 10)
        count += 1
    return count


def shown(metrics: GatewayMetrics) -> dict[str, float]:
    return {
        s.labels["quota"]: s.value
        for family in metrics.quota_share.collect()
        for s in family.samples
        if s.labels["tenant"] == "acme"
    }


async def test_a_replica_whose_peer_is_idle_admits_the_whole_quota() -> None:
    metrics = GatewayMetrics(CollectorRegistry())
    clock = Clock()
    peers = Peers([IDLE], 2)
    gate = TenantGate(
        Keys(Quotas(requests_per_minute=10)),
        lambda _m: 100,
        clock=clock,
        metrics=metrics,
        peer_demand=peers,
    )
    assert await admitted(gate, 12) == 10  # not 5: the idle peer's half is lent
    assert shown(metrics) == {
        "requests_per_minute": 10,
        "tokens_per_minute": 0,
        "max_concurrent": 0,
    }
    # the peer's clients start asking for more than their half: this replica's part shrinks
    # to its even share once its cached part is older than SHARE_REFRESH_S
    peers.others = [d(60)]
    clock.now += 1.0
    assert await admitted(gate, 1, start=100) == 0  # the bucket keeps its (empty) level
    assert shown(metrics)["requests_per_minute"] == 5


async def test_without_peer_demands_the_split_is_even() -> None:
    gate = TenantGate(
        Keys(Quotas(requests_per_minute=10)), lambda _m: 100, clock=Clock(), replicas=lambda: 2
    )
    assert await admitted(gate, 12) == 5


async def test_the_published_demand_keeps_requests_in_flight_after_the_rate_fades() -> None:
    clock = Clock()
    gate = TenantGate(
        Keys(Quotas(max_concurrent=4)),
        lambda _m: 100,
        clock=clock,
        peer_demand=Peers([IDLE], 2),
    )
    ticket = await gate.admit(ctx(1))
    assert gate.demands() == (("m", "acme", 6.0, 120.0, 1.0),)
    clock.now += 3600.0  # the asking rate has long decayed; the request is still running
    assert gate.demands() == (("m", "acme", 0.0, 0.0, 1.0),)
    gate.release(ticket, 10)
    assert gate.demands() == ()
