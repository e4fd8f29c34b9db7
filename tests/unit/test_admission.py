"""Admission and fairness: rate limits, the queue's order, VTC, shedding, expiry, and a
fairness simulation against a FIFO baseline. Pure: hand-built requests, ``now`` passed in."""

from __future__ import annotations

import heapq
import random
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import pytest

from controlplane.core.admission import (
    AdmissionConfig,
    AdmissionController,
    AdmissionRequest,
    Admitted,
    Outcome,
    Queued,
    QuotaLike,
    Rejected,
    RejectReason,
    TenantLimits,
    TokenBucket,
    quota_share,
)
from controlplane.core.sla import SlaClass
from controlplane.core.tenants import Quotas
from controlplane.errors import InvalidArgument

UNLIMITED = TenantLimits()


def req(
    rid: str,
    tenant: str = "a",
    cls: str = "interactive",
    prompt: int = 10,
    output: int = 10,
    limits: QuotaLike = UNLIMITED,
    deadline_s: float | None = None,
) -> AdmissionRequest:
    return AdmissionRequest(rid, tenant, limits, cls, prompt, output, deadline_s)


def ids(outcomes: Sequence[Outcome]) -> list[str]:
    return [o.request_id for o in outcomes]


# --- token bucket ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ops", "level", "wait_for_1"),
    [
        ([], 60.0, 0.0),
        ([("take", 60, 0.0)], 0.0, 1.0),
        ([("take", 60, 0.0), ("at", 0, 30.0)], 30.0, 0.0),
        ([("take", 60, 0.0), ("at", 0, 600.0)], 60.0, 0.0),  # capped at capacity
        ([("take", 90, 0.0)], -30.0, 31.0),  # a usage correction can go negative
        ([("take", 10, 0.0), ("give", 50, 0.0)], 60.0, 0.0),  # capped
        ([("take", 60, 10.0), ("at", 0, 5.0)], 0.0, 1.0),  # time going back refills nothing
    ],
)
def test_token_bucket(ops: list[tuple[str, int, float]], level: float, wait_for_1: float) -> None:
    b = TokenBucket.per_minute(60, now=0.0)
    now = 0.0
    for op, amount, now in ops:
        b = b.take(amount, now) if op == "take" else b.give(amount, now) if op == "give" else b
        b = b.at(now)
    assert b.level == pytest.approx(level)
    assert b.wait_s(1, now) == pytest.approx(wait_for_1)


# --- rate limits -----------------------------------------------------------------------------

RPM2 = TenantLimits(requests_per_minute=2)
TPM1000 = TenantLimits(tokens_per_minute=1000)


@pytest.mark.parametrize(
    ("limits", "steps"),
    [
        # (now, prompt+output tokens) -> expected reason (None: admitted), retry_after_s
        (RPM2, [(0.0, 20, None, None), (0.0, 20, None, None),
                (0.0, 20, RejectReason.RATE_LIMITED_REQUESTS, 30.0),
                (10.0, 20, RejectReason.RATE_LIMITED_REQUESTS, 20.0),
                (30.0, 20, None, None)]),
        (TPM1000, [(0.0, 600, None, None),
                   (0.0, 600, RejectReason.RATE_LIMITED_TOKENS, 12.0),  # 200 missing at 1000/60
                   (0.0, 400, None, None),  # the rejection took nothing
                   (0.0, 1200, RejectReason.REQUEST_TOO_LARGE, None),
                   (6.0, 100, None, None)]),
        (TenantLimits(requests_per_minute=1, tokens_per_minute=60),
         [(0.0, 60, None, None),
          (1.0, 1, RejectReason.RATE_LIMITED_REQUESTS, 59.0)]),  # the larger wait names it
        (Quotas(requests_per_minute=1), [(0.0, 1, None, None),
                                         (0.0, 1, RejectReason.RATE_LIMITED_REQUESTS, 60.0)]),
    ],
)  # fmt: skip
def test_rate_limits_and_retry_after(
    limits: QuotaLike, steps: list[tuple[float, int, RejectReason | None, float | None]]
) -> None:
    c = AdmissionController()
    for i, (now, tokens, reason, retry) in enumerate(steps):
        out = c.submit(req(f"r{i}", prompt=tokens, output=0, limits=limits), now, can_start=True)
        if reason is None:
            assert isinstance(out, Admitted), out
        else:
            assert isinstance(out, Rejected), out
            assert (out.reason, out.status) == (reason, 429)
            assert out.retry_after_s == (None if retry is None else pytest.approx(retry))


def test_retry_after_header_rounds_up() -> None:
    c = AdmissionController()
    c.submit(req("r0", limits=TenantLimits(requests_per_minute=7)), 0.0, True)
    for i in range(1, 7):
        c.submit(req(f"r{i}", limits=TenantLimits(requests_per_minute=7)), 0.0, True)
    out = c.submit(req("r7", limits=TenantLimits(requests_per_minute=7)), 0.0, True)
    assert isinstance(out, Rejected)
    assert out.retry_after_s == pytest.approx(60 / 7)
    assert out.retry_after_header == "9"


def test_finish_charges_actual_tokens_to_the_token_bucket() -> None:
    c = AdmissionController()
    lim = TenantLimits(tokens_per_minute=1000)
    assert isinstance(c.submit(req("big", prompt=100, output=800, limits=lim), 0.0, True), Admitted)
    assert isinstance(c.submit(req("x", prompt=200, output=0, limits=lim), 0.0, True), Rejected)
    assert c.finish("big", 0.0, prompt_tokens=100, output_tokens=50)  # 750 refunded
    assert isinstance(c.submit(req("y", prompt=200, output=0, limits=lim), 0.0, True), Admitted)
    # more than estimated: the bucket goes negative and the next request waits
    assert c.finish("y", 0.0, prompt_tokens=200, output_tokens=1000)
    out = c.submit(req("z", prompt=10, output=0, limits=lim), 0.0, True)
    assert isinstance(out, Rejected) and out.reason is RejectReason.RATE_LIMITED_TOKENS
    assert not c.finish("y", 0.0)  # already finished: a no-op


# --- max concurrent --------------------------------------------------------------------------


def test_max_concurrent_queues_then_admits_on_finish() -> None:
    c = AdmissionController()
    one = TenantLimits(max_concurrent=1)
    assert isinstance(c.submit(req("a1", limits=one), 0.0, True), Admitted)
    q = c.submit(req("a2", limits=one), 0.1, True)
    assert isinstance(q, Queued) and q.why == "tenant at max_concurrent 1"
    assert c.on_capacity(0.2, free_slots=4) == []  # a blocked tenant is skipped ...
    assert isinstance(
        c.submit(req("b1", tenant="b"), 0.2, True), Admitted
    )  # ... blocks only itself
    assert c.finish("a1", 0.3)
    out = c.on_capacity(0.3, free_slots=4)
    assert len(out) == 1 and isinstance(out[0], Admitted)
    assert out[0].request_id == "a2" and out[0].queued_s == pytest.approx(0.2)
    assert c.stats().in_flight_by_tenant == {"a": 1, "b": 1}


def test_raising_max_concurrent_unblocks_queued_work() -> None:
    c = AdmissionController()
    assert isinstance(
        c.submit(req("a1", limits=TenantLimits(max_concurrent=1)), 0.0, True), Admitted
    )
    assert isinstance(c.submit(req("a2", limits=TenantLimits(max_concurrent=1)), 0.0, True), Queued)
    assert isinstance(
        c.submit(req("a3", limits=TenantLimits(max_concurrent=3)), 0.0, False), Queued
    )
    assert ids(c.on_capacity(0.0, 5)) == ["a2", "a3"]


# --- queue order -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("arrivals", "order"),
    [
        # (request id, class, arrival, own deadline_s): one tenant, all queued, then drained
        ([("b1", "batch", 0.0, None), ("s1", "standard", 0.1, None),
          ("i1", "interactive", 0.2, None)], ["i1", "s1", "b1"]),
        ([("i1", "interactive", 0.0, None), ("i2", "interactive", 0.1, None)], ["i1", "i2"]),
        ([("i1", "interactive", 0.0, None), ("i2", "interactive", 0.1, 0.2)], ["i2", "i1"]),
        ([("b1", "batch", 0.0, 3000.0), ("b2", "batch", 1.0, 60.0), ("b3", "batch", 2.0, None),
          ("s1", "standard", 3.0, None)], ["s1", "b2", "b1", "b3"]),
    ],
)  # fmt: skip
def test_class_priority_then_edf(
    arrivals: list[tuple[str, str, float, float | None]], order: list[str]
) -> None:
    c = AdmissionController()
    for rid, cls, now, deadline in arrivals:
        assert isinstance(c.submit(req(rid, cls=cls, deadline_s=deadline), now, False), Queued)
    assert ids(c.on_capacity(5.0, free_slots=10)) == order


def test_arrivals_do_not_jump_the_queue() -> None:
    c = AdmissionController()
    assert isinstance(c.submit(req("s1", cls="standard"), 0.0, can_start=False), Queued)
    q = c.submit(req("s2", tenant="b", cls="standard"), 0.1, can_start=True)
    assert isinstance(q, Queued) and q.why == "queued work ahead"
    assert isinstance(c.submit(req("i1", tenant="c", cls="interactive"), 0.1, True), Admitted)
    assert isinstance(c.submit(req("b1", tenant="c", cls="batch"), 0.1, True), Queued)
    assert ids(c.on_capacity(0.2, 3)) == ["s1", "s2", "b1"]


# --- VTC -------------------------------------------------------------------------------------


def test_vtc_serves_the_tenant_with_the_smallest_counter() -> None:
    c = AdmissionController()
    # a has been served 3 requests of 10 + 2*10 = 30 weighted tokens each
    for i in range(3):
        assert isinstance(c.submit(req(f"a-old{i}"), 0.0, True), Admitted)
        c.finish(f"a-old{i}", 0.0)
    assert c.stats().vtc_counters == {"a": 90.0}
    for i in range(4):
        c.submit(req(f"a{i}"), 1.0, False)
    for i in range(4):
        c.submit(req(f"b{i}", tenant="b"), 1.0, False)
    # b was lifted to a's counter (90) when it queued: it banks nothing from being new,
    # ties go to the tenant seen first, then they alternate
    assert c.stats().vtc_counters == {"a": 90.0, "b": 90.0}
    assert ids(c.on_capacity(1.0, 8)) == ["a0", "b0", "a1", "b1", "a2", "b2", "a3", "b3"]


def test_vtc_prefers_a_light_tenant_over_a_heavy_one() -> None:
    c = AdmissionController()
    for i in range(3):
        c.submit(req(f"h{i}", tenant="heavy", prompt=100, output=100), 0.0, False)
    for i in range(3):
        c.submit(req(f"l{i}", tenant="light", prompt=10, output=10), 0.0, False)
    assert ids(c.on_capacity(0.0, 6)) == ["h0", "l0", "l1", "l2", "h1", "h2"]


def test_vtc_idle_tenant_is_lifted_and_cannot_bank_credit() -> None:
    c = AdmissionController()
    for i in range(10):  # a works alone for a while, served directly
        c.submit(req(f"a-old{i}"), 0.0, True)
        c.finish(f"a-old{i}", 0.0)
    for i in range(3):
        c.submit(req(f"a{i}"), 1.0, False)
    c.submit(req("b0", tenant="b"), 1.0, False)  # b was idle: lifted to a's 300, not 0
    assert c.stats().vtc_counters["b"] == 300.0
    assert ids(c.on_capacity(1.0, 4)) == ["a0", "b0", "a1", "a2"]


def test_vtc_weights_and_finish_correction() -> None:
    c = AdmissionController(AdmissionConfig(prompt_token_weight=1.0, output_token_weight=2.0))
    c.submit(req("r", prompt=100, output=500), 0.0, True)
    assert c.stats().vtc_counters["a"] == 1100.0  # the estimate, charged at admission
    c.finish("r", 1.0, prompt_tokens=100, output_tokens=20)
    assert c.stats().vtc_counters["a"] == 140.0  # corrected to what was served


# --- shedding --------------------------------------------------------------------------------


def test_shedding_order_batch_then_standard_never_interactive() -> None:
    c = AdmissionController(AdmissionConfig(max_queued=4))
    c.submit(req("heavy-b1", tenant="heavy", cls="batch", output=500), 0.0, True)  # served
    c.submit(req("light-b", tenant="light", cls="batch"), 0.0, False)
    c.submit(req("heavy-b2", tenant="heavy", cls="batch"), 0.1, False)
    c.submit(req("heavy-b3", tenant="heavy", cls="batch"), 0.2, False)
    c.submit(req("s1", tenant="light", cls="standard"), 0.3, False)
    assert c.stats().queued == 4
    expected = [
        # (arrival, class) -> evicted id, or the arrival's own rejection
        ("i1", "interactive", "heavy-b3"),  # largest counter's latest deadline goes first
        ("i2", "interactive", "heavy-b2"),
        ("s2", "standard", "light-b"),
        ("i3", "interactive", "s1"),  # no batch left: standard is next
        ("i4", "interactive", "s2"),
        ("i5", "interactive", None),  # only interactive left: the newcomer is rejected
        ("b9", "batch", None),
    ]
    for rid, cls, victim in expected:
        out = c.submit(req(rid, tenant="x", cls=cls), 1.0, False)
        if victim is None:
            assert isinstance(out, Rejected), out
            assert (out.reason, out.status, out.retry_after_s) == (
                RejectReason.QUEUE_FULL,
                503,
                1.0,
            )
            continue
        assert isinstance(out, Queued) and out.evicted is not None, out
        assert out.evicted.request_id == victim
        assert (out.evicted.reason, out.evicted.status) == (RejectReason.SHED, 503)
        assert out.evicted.retry_after_s == 1.0 and out.evicted.queued_s >= 0
    assert c.stats().queued_by_class == {"interactive": 4, "standard": 0, "batch": 0}


def test_class_bound_and_tenant_bound() -> None:
    classes = [
        SlaClass("chat", 0, ttft_p95_ms=500, max_queue=2),
        SlaClass("now", 1, 100, max_queue=0),
    ]
    c = AdmissionController(AdmissionConfig(max_queued_per_tenant=1), classes)
    assert isinstance(c.submit(req("a1", cls="chat"), 0.0, False), Queued)
    t = c.submit(req("a2", cls="chat"), 0.0, False)
    assert isinstance(t, Rejected) and (t.reason, t.status) == (RejectReason.TENANT_QUEUE_FULL, 429)
    assert isinstance(c.submit(req("b1", tenant="b", cls="chat"), 0.0, False), Queued)
    full = c.submit(req("c1", tenant="c", cls="chat"), 0.0, False)
    assert isinstance(full, Rejected) and full.reason is RejectReason.QUEUE_FULL
    assert "chat queue full (2)" in full.message
    never = c.submit(req("d1", tenant="d", cls="now"), 0.0, False)
    assert isinstance(never, Rejected) and never.reason is RejectReason.QUEUE_FULL


def test_rejection_after_queueing_refunds_the_rate_limit() -> None:
    c = AdmissionController(AdmissionConfig(max_queued=1))
    one = TenantLimits(requests_per_minute=1)
    assert isinstance(c.submit(req("b", cls="batch", limits=one), 0.0, False), Queued)
    assert isinstance(c.submit(req("i", tenant="x", cls="interactive"), 0.0, False), Queued)
    assert ids(c.on_capacity(0.0, 1)) == ["i"]
    # b was shed: its request came back, so the tenant may send another at once
    assert isinstance(c.submit(req("b2", cls="batch", limits=one), 0.0, True), Admitted)


# --- expiry and cancel -----------------------------------------------------------------------


def test_queue_timeout_and_deadline() -> None:
    classes = [
        SlaClass("interactive", 0, ttft_p95_ms=500, queue_timeout_s=2.0),
        SlaClass("batch", 2, deadline_s=10.0, queue_timeout_s=3600.0),
    ]
    c = AdmissionController(classes=classes)
    c.submit(req("i1"), 0.0, False)
    c.submit(req("i2"), 1.0, False)
    c.submit(req("b1", cls="batch"), 0.0, False)
    c.submit(req("i3", deadline_s=0.5), 1.0, False)  # its own deadline is hard
    assert c.expire(1.4) == []
    out = c.expire(2.0)
    assert [(o.request_id, o.reason, o.retry_after_s) for o in out] == [
        ("i3", RejectReason.DEADLINE_EXCEEDED, None),
        ("i1", RejectReason.QUEUE_TIMEOUT, 1.0),
    ]
    assert out[1].queued_s == 2.0 and out[1].status == 503
    # on_capacity expires first: b1's deadline passed, i2 is admitted
    outs = c.on_capacity(10.0, free_slots=5)
    assert [(type(o).__name__, o.request_id) for o in outs] == [
        ("Rejected", "i2"),
        ("Rejected", "b1"),
    ]
    assert c.stats().queued == 0


def test_cancel() -> None:
    c = AdmissionController()
    one = TenantLimits(requests_per_minute=1)
    c.submit(req("q", limits=one), 0.0, False)
    out = c.cancel("q", 0.5)
    assert isinstance(out, Rejected)
    assert (out.reason, out.status, out.queued_s) == (RejectReason.CANCELLED, 499, 0.5)
    assert c.cancel("q", 0.5) is None  # already gone
    assert isinstance(c.submit(req("r", limits=one), 0.6, True), Admitted)  # refunded
    assert c.cancel("r", 0.7) is None  # admitted: finish it instead
    assert c.on_capacity(1.0, 5) == []


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (req("x", cls="gold"), "unknown SLA class 'gold'"),
        (req("dup"), "already queued or admitted"),
        (req("x", prompt=-1), "token estimates"),
        (req("x", deadline_s=0), "deadline_s"),
        (req("x", limits=TenantLimits(max_concurrent=-1)), "max_concurrent must be >= 0"),
        (req(""), "non-empty"),
    ],
)
def test_invalid_requests_raise(request_: AdmissionRequest, message: str) -> None:
    c = AdmissionController()
    c.submit(req("dup"), 0.0, True)
    with pytest.raises(InvalidArgument, match=message):
        c.submit(request_, 0.0, True)


@pytest.mark.parametrize(
    "kwargs",
    [{"max_queued": -1}, {"prompt_token_weight": -1.0}, {"overload_retry_after_s": float("nan")}],
)
def test_invalid_config(kwargs: dict[str, float]) -> None:
    with pytest.raises(InvalidArgument, match=r"admission\."):
        AdmissionConfig(**kwargs)  # type: ignore[arg-type]


# --- every request ends exactly once ---------------------------------------------------------


@pytest.mark.parametrize("seed", range(6))
def test_every_request_ends_exactly_once(seed: int) -> None:
    rng = random.Random(seed)
    classes = [
        SlaClass("interactive", 0, ttft_p95_ms=500, queue_timeout_s=1.0, max_queue=3),
        SlaClass("standard", 1, ttft_p95_ms=2000, queue_timeout_s=3.0, max_queue=4),
        SlaClass("batch", 2, deadline_s=5.0, queue_timeout_s=10.0, max_queue=5),
    ]
    c = AdmissionController(AdmissionConfig(max_queued=8, max_queued_per_tenant=5), classes)
    limits = {
        "a": TenantLimits(requests_per_minute=120, tokens_per_minute=6000, max_concurrent=2),
        "b": TenantLimits(max_concurrent=1),
        "c": TenantLimits(tokens_per_minute=3000),
    }
    slots = 3
    free = slots
    now = 0.0
    state: dict[str, str] = {}  # queued | running | done
    ends: dict[str, int] = {}

    def settle(outcomes: Sequence[Outcome]) -> None:
        nonlocal free
        for o in outcomes:
            if isinstance(o, Queued):
                assert state[o.request_id] == "new"
                state[o.request_id] = "queued"
                if o.evicted is not None:
                    settle([o.evicted])
                continue
            assert state[o.request_id] in ("new", "queued"), o
            ends[o.request_id] = ends.get(o.request_id, 0) + 1
            if isinstance(o, Admitted):
                free -= 1
                state[o.request_id] = "running"
            else:
                state[o.request_id] = "done"

    for step in range(400):
        now += rng.uniform(0.0, 0.3)
        op = rng.random()
        running = sorted(r for r, s in state.items() if s == "running")
        if op < 0.5:
            rid = f"r{step}"
            tenant = rng.choice("abc")
            cls = rng.choice(["interactive", "standard", "batch"])
            r = req(rid, tenant, cls, rng.randint(1, 400), rng.randint(1, 400), limits[tenant])
            state[rid] = "new"
            out = c.submit(r, now, can_start=free > 0)
            settle([out])
            if isinstance(out, Queued) and free > 0:
                settle(c.on_capacity(now, free))
        elif op < 0.7 and running:
            rid = rng.choice(running)
            assert c.finish(rid, now, prompt_tokens=rng.randint(0, 300), output_tokens=5)
            state[rid] = "done"
            free += 1
            settle(c.on_capacity(now, free))
        elif op < 0.85:
            settle(c.on_capacity(now, free))
        elif op < 0.95:
            settle(c.expire(now))
        else:
            rid = f"r{rng.randrange(step + 1)}"
            out2 = c.cancel(rid, now)
            if out2 is not None:
                settle([out2])
        assert 0 <= free <= slots
        stats = c.stats()
        assert stats.queued == sum(1 for s in state.values() if s == "queued")
        assert stats.queued == sum(stats.queued_by_class.values())
        assert c.queued == stats.queued
        assert dict(c.queue_depths()) == dict(stats.queued_by_class)
        if not c.queued:  # what the gateway skips: nothing to expire or admit
            assert c.on_capacity(now, free) == []
        assert all(c.is_queued(r) == (s == "queued") for r, s in state.items())
        assert stats.in_flight_by_tenant.get("b", 0) <= 1
        assert stats.in_flight_by_tenant.get("a", 0) <= 2
    # drain: everything still running finishes, the queue empties by admission or expiry
    for _ in range(100):
        for rid in sorted(r for r, s in state.items() if s == "running"):
            c.finish(rid, now)
            state[rid] = "done"
            free += 1
        now += 1.0
        settle(c.on_capacity(now, free))
    assert c.stats().queued == 0
    assert set(ends) == set(state)
    assert set(ends.values()) == {1}


# --- fairness simulation: VTC vs FIFO --------------------------------------------------------


class _Scheduler(Protocol):
    def submit(self, request: AdmissionRequest, now: float, can_start: bool) -> Outcome: ...
    def on_capacity(self, now: float, free_slots: int) -> list[Admitted | Rejected]: ...
    def finish(self, request_id: str, now: float) -> bool: ...


class FifoBaseline:
    """One queue, first come first served, no fairness: what VTC is measured against."""

    def __init__(self) -> None:
        self.queue: deque[tuple[AdmissionRequest, float]] = deque()

    def submit(self, request: AdmissionRequest, now: float, can_start: bool) -> Outcome:
        if can_start and not self.queue:
            return Admitted(request.request_id, request.tenant, request.sla_class)
        self.queue.append((request, now))
        return Queued(request.request_id, request.tenant, request.sla_class, "no capacity")

    def on_capacity(self, now: float, free_slots: int) -> list[Admitted | Rejected]:
        out: list[Admitted | Rejected] = []
        while self.queue and len(out) < free_slots:
            r, arrival = self.queue.popleft()
            out.append(Admitted(r.request_id, r.tenant, r.sla_class, queued_s=now - arrival))
        return out

    def finish(self, request_id: str, now: float) -> bool:
        return True


@dataclass(frozen=True)
class SimResult:
    delays: dict[str, list[float]]
    rejected: int


SLOTS = 8
SERVICE_S = 0.4  # capacity: 8 / 0.4 = 20 requests/s
RATES = {"heavy": 25.0, "light": 2.5}  # 27.5/s offered: overloaded; heavy sends 10x light
HORIZON_S = 60.0
CHAT = SlaClass("chat", 0, ttft_p95_ms=500, queue_timeout_s=600, max_queue=100_000)


def simulate(scheduler: _Scheduler, seed: int = 7) -> SimResult:
    """A fixed pool of SLOTS, fixed service time, Poisson arrivals on a fake clock."""
    rng = random.Random(seed)
    limits = TenantLimits(requests_per_minute=10_000, tokens_per_minute=10_000_000)  # in quota
    events: list[tuple[float, int, str, str]] = []  # (time, seq, kind, tenant or request id)
    seq = 0
    for tenant, rate in RATES.items():
        t = rng.expovariate(rate)
        while t < HORIZON_S:
            seq += 1
            events.append((t, seq, "arrive", tenant))
            t += rng.expovariate(rate)
    heapq.heapify(events)
    free = SLOTS
    delays: dict[str, list[float]] = {t: [] for t in RATES}
    rejected = 0

    def started(outcomes: Sequence[Outcome], now: float) -> None:
        nonlocal free, seq, rejected
        for o in outcomes:
            if isinstance(o, Admitted):
                free -= 1
                delays[o.tenant].append(o.queued_s)
                seq += 1
                heapq.heappush(events, (now + SERVICE_S, seq, "done", o.request_id))
            elif isinstance(o, Rejected):
                rejected += 1

    while events:
        now, n, kind, what = heapq.heappop(events)
        if kind == "arrive":
            r = AdmissionRequest(f"{what}-{n}", what, limits, "chat", 200, 100)
            out = scheduler.submit(r, now, can_start=free > 0)
            started([out], now)
            if isinstance(out, Queued) and free > 0:
                started(scheduler.on_capacity(now, free), now)
        else:
            scheduler.finish(what, now)
            free += 1
            started(scheduler.on_capacity(now, free), now)
    return SimResult(delays, rejected)


def p95(xs: list[float]) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(0.95 * len(s)))]


def test_fairness_simulation_vtc_protects_the_light_tenant() -> None:
    vtc = simulate(AdmissionController(AdmissionConfig(max_queued=100_000), [CHAT]))
    fifo = simulate(FifoBaseline())
    assert vtc.rejected == fifo.rejected == 0
    for r in (vtc, fifo):  # every request was served once
        assert len(r.delays["light"]) > 100 and len(r.delays["heavy"]) > 1000
    summary = {
        name: {t: round(p95(d), 3) for t, d in r.delays.items()}
        for name, r in (("vtc", vtc), ("fifo", fifo))
    }
    print(f"\np95 queueing delay (s): {summary}")
    target_s = CHAT.target_s
    # VTC: the light tenant stays within its TTFT target while the heavy one absorbs the overload
    assert p95(vtc.delays["light"]) < target_s
    assert max(vtc.delays["light"]) < 2 * target_s
    assert p95(vtc.delays["heavy"]) > 10 * target_s
    # FIFO: the light tenant waits behind the heavy tenant's backlog
    assert p95(fifo.delays["light"]) > 10 * target_s
    assert p95(fifo.delays["light"]) > 20 * p95(vtc.delays["light"])


# --- a deployment's classes change -----------------------------------------------------------


def test_reconfigure_swaps_classes_and_rejects_only_queued_requests_of_removed_ones() -> None:
    c = AdmissionController()
    assert isinstance(c.submit(req("run", cls="batch"), 0.0, True), Admitted)
    assert isinstance(c.submit(req("b1", cls="batch"), 0.1, False), Queued)
    assert isinstance(c.submit(req("s1", cls="standard"), 0.2, False), Queued)
    realtime = SlaClass("realtime", priority=0, ttft_p95_ms=200.0, itl_p95_ms=30.0)
    standard = SlaClass("standard", priority=1, ttft_p95_ms=1500.0)
    rejected = c.reconfigure([realtime, standard], now=1.0)
    assert ids(rejected) == ["b1"]
    assert rejected[0].reason is RejectReason.SHED and "removed" in rejected[0].message
    assert rejected[0].retry_after_header is not None
    assert set(c.classes) == {"realtime", "standard"}
    assert c.stats().queued_by_class == {"realtime": 0, "standard": 1}
    assert dict(c.queue_depths()) == {"realtime": 0, "standard": 1}  # every class, none gone
    with pytest.raises(InvalidArgument, match="unknown SLA class 'batch'"):
        c.submit(req("b2", cls="batch"), 1.1, True)
    assert isinstance(c.submit(req("r1", cls="realtime"), 1.2, False), Queued)
    assert c.finish("run", 1.3)  # a running request of a removed class still finishes
    assert ids(c.on_capacity(1.4, free_slots=5)) == ["r1", "s1"]  # the new priority order


@pytest.mark.parametrize(
    ("limits", "replicas", "share"),
    [
        (TenantLimits(60, 6000, 4), 1, TenantLimits(60, 6000, 4)),
        (TenantLimits(60, 6000, 4), 2, TenantLimits(30, 3000, 2)),
        (TenantLimits(60, 6000, 4), 3, TenantLimits(20, 2000, 2)),  # ceil: 4/3 -> 2
        (TenantLimits(1, 0, 1), 4, TenantLimits(1, 0, 1)),  # never 0 (= unlimited)
        (TenantLimits(0, 0, 0), 3, TenantLimits(0, 0, 0)),
        (TenantLimits(10, 10, 10), 0, TenantLimits(10, 10, 10)),  # no peers known yet: all
    ],
)
def test_quota_share_splits_fleet_limits_over_gateway_replicas(
    limits: TenantLimits, replicas: int, share: TenantLimits
) -> None:
    assert quota_share(limits, replicas) == share
