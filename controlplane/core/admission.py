"""Admission and fairness: may this request start now, wait, or be turned away? Pure.

Theory of operation
-------------------
One ``AdmissionController`` guards one pool of capacity (a model deployment's slots, as the
gateway counts them). It is a synchronous state machine: the gateway feeds it events with the
time as an argument (``now``, seconds, any monotonic clock) and acts on what comes back. Nothing
here awaits, reads a clock or draws a random number, so the same code runs in the gateway, the
simulator and the tests.

Every submitted request ends in exactly one terminal outcome, ``Admitted`` or ``Rejected``;
``Queued`` is the only intermediate one::

    submit ──► Admitted                       (a slot, and the tenant is under its limits)
           ──► Rejected 429                   (rate limit: Retry-After from the bucket)
           ──► Rejected 503                   (queue full and nothing less important to shed)
           ──► Queued ──► Admitted            (on_capacity: its turn came)
                      ──► Rejected 503        (shed by a more important arrival; expired:
                                               queue timeout or deadline)
                      ──► Rejected 499        (cancel: the client went away)

An ``Admitted`` request holds one of its tenant's concurrency units until ``finish``.

**Rate limits** (per tenant, checked at submit, before queueing): token buckets for requests and
for tokens per minute, each holding at most one minute's worth and refilling continuously. A
request takes 1 request and ``est_prompt_tokens + est_output_tokens`` tokens; ``finish`` charges
the difference between the estimate and what was actually served (the bucket may go negative:
the next request waits longer). A request that fails a bucket takes nothing and is rejected 429
with ``retry_after_s``: the exact time until both buckets hold enough. One that can never fit
(more tokens than a minute's limit) is rejected 429 ``request_too_large`` with no Retry-After.
A request that leaves the queue without being served gets its charge back.

**Queue order** — how class priority, fairness and deadlines combine:

1. *strict class priority*: a queued request of a more important class (lower ``priority``)
   always goes before any of a less important one. Lower classes can starve under sustained
   overload of higher ones; their queue timeout / deadline bounds the wait and rejects them with
   the reason (the SLA planner's job is to add capacity);
2. *VTC across tenants within a class* (Sheng et al., "Fairness in Serving Large Language
   Models", OSDI '24): each tenant has one virtual token counter (across classes) of weighted
   tokens served, ``prompt_token_weight * prompt + output_token_weight * output``, charged with
   the estimate when a request is admitted and corrected to the actual count at ``finish``. The
   next request comes from the tenant with the smallest counter among those with queued work in
   that class that are under their ``max_concurrent`` (ties: the tenant seen first). A tenant
   whose queue was empty is lifted, when it queues again, to the smallest counter of tenants
   with queued work (or, when none have any, to the counter of the last tenant whose queue
   emptied), so idling banks no credit;
3. *EDF within a tenant and class*: earliest deadline first, where the deadline is
   ``arrival + class.target_s`` (TTFT target or batch deadline) or the request's own
   ``deadline_s``.

A tenant at ``max_concurrent`` is skipped (it blocks only itself), and a new request is admitted
directly only when no queued request that could run now is ahead of it (same or more important
class): arrivals do not jump the queue.

**Shedding**: each class queues at most ``max_queue`` (a full class rejects the newcomer, 503
``queue_full``), a tenant at most ``AdmissionConfig.max_queued_per_tenant`` (429
``tenant_queue_full``), and all classes together at most ``AdmissionConfig.max_queued``. When the
global bound is hit, the newcomer evicts one queued request of the least important class less
important than its own — batch before standard before interactive — taking the latest-deadline
request of the tenant with the largest counter there; the victim is rejected 503 ``shed`` and
returned in ``Queued.evicted``. With nothing less important queued, the newcomer is rejected.

**Expiry**: a queued request is rejected at ``arrival + queue_timeout_s`` (503 ``queue_timeout``)
or, for a class with ``deadline_s`` or a request with its own deadline, at that deadline if
sooner (503 ``deadline_exceeded``). ``expire`` finds them; ``on_capacity`` expires first, so it
never admits a request that is past its time.

Cost: every operation is O(log n) in queued requests and tenants (amortised: heaps with lazy
deletion, compacted when half stale), times the number of SLA classes (a handful); ``stats``
is O(tenants + classes).

The gateway's calls
-------------------
* ``submit(request, now, can_start)`` per request, ``can_start`` = a slot is free for it now.
  ``Admitted``: start it. ``Rejected``: answer ``status`` (with ``Retry-After:
  retry_after_header`` when set). ``Queued``: park the request (resolve ``evicted``, if any,
  as rejected); if a slot was free, call ``on_capacity`` now.
* ``on_capacity(now, free_slots)`` whenever slots are free and something may be queued: after
  every ``finish``, after a ``Queued`` with a free slot, when workers are added. Returns the
  queued requests that were admitted (up to ``free_slots``) or expired, in that order.
* ``finish(request_id, now, prompt_tokens=, output_tokens=)`` when an admitted request ends for
  any reason (pass what was actually served; left out, the estimate stands).
* ``cancel(request_id, now)`` when the client of a *queued* request goes away.
* ``expire(now)`` on a timer (say every 100 ms) so queued requests time out without traffic.
* ``stats()`` for metrics.

Malformed input (an unknown class, a request id already in use, negative token counts or
limits) raises ``InvalidArgument``.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from types import MappingProxyType
from typing import Protocol

from controlplane.core.sla import DEFAULT_SLA_CLASSES, SlaClass, index_sla_classes
from controlplane.errors import InvalidArgument

__all__ = [
    "AdmissionConfig",
    "AdmissionController",
    "AdmissionRequest",
    "AdmissionStats",
    "Admitted",
    "Outcome",
    "Queued",
    "QuotaLike",
    "RejectReason",
    "Rejected",
    "TenantLimits",
    "TokenBucket",
]

# --- inputs ----------------------------------------------------------------------------------


class QuotaLike(Protocol):
    """A tenant's limits; ``TenantLimits`` here and ``tenants.Quotas`` both fit. 0: unlimited."""

    @property
    def requests_per_minute(self) -> int: ...
    @property
    def tokens_per_minute(self) -> int: ...
    @property
    def max_concurrent(self) -> int: ...


@dataclass(frozen=True, slots=True)
class TenantLimits:
    """Per-tenant limits admission enforces. 0 means unlimited."""

    requests_per_minute: int = 0
    tokens_per_minute: int = 0
    """Prompt plus generated tokens."""
    max_concurrent: int = 0
    """Admitted requests not yet finished."""


def quota_share(quotas: QuotaLike, replicas: int) -> TenantLimits:
    """One gateway replica's share of a tenant's fleet-wide quotas: each limit divided by the
    number of live replicas, rounded up (0 stays unlimited, a limit never drops to 0).

    With requests spread evenly over the replicas (a Service or load balancer in front), the
    fleet admits the tenant's limit: exactly when it is a multiple of ``replicas``, at most
    ``replicas - 1`` more otherwise. No replica waits on another to admit a request."""
    n = max(1, replicas)

    def part(limit: int) -> int:
        return 0 if limit <= 0 else -(-limit // n)

    return TenantLimits(
        requests_per_minute=part(quotas.requests_per_minute),
        tokens_per_minute=part(quotas.tokens_per_minute),
        max_concurrent=part(quotas.max_concurrent),
    )


@dataclass(frozen=True, slots=True)
class AdmissionRequest:
    request_id: str
    """Unique among the controller's queued and admitted requests."""
    tenant: str
    limits: QuotaLike
    """The tenant's current limits; a change takes effect from this request on."""
    sla_class: str
    est_prompt_tokens: int
    est_output_tokens: int
    """The request's ``max_tokens``, or the gateway's estimate when it has none."""
    deadline_s: float | None = None
    """Own deadline, seconds after arrival, instead of the class's; a hard limit when queued."""


@dataclass(frozen=True, slots=True)
class AdmissionConfig:
    max_queued: int = 10_000
    """Queued requests of all classes together; above it less important ones are shed."""
    max_queued_per_tenant: int = 0
    """Queued requests of one tenant; 0: no bound but the class and global ones."""
    prompt_token_weight: float = 1.0
    """VTC weight of a prompt token."""
    output_token_weight: float = 2.0
    """VTC weight of a generated token (the VTC paper's ratio: decoding costs more)."""
    overload_retry_after_s: float = 1.0
    """Retry-After for rejections caused by overload (full queue, shed, queue timeout)."""

    def __post_init__(self) -> None:
        for name in ("max_queued", "max_queued_per_tenant"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise InvalidArgument(f"admission.{name}: {value!r} must be an integer >= 0")
        for name in ("prompt_token_weight", "output_token_weight", "overload_retry_after_s"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not value >= 0 or math.isinf(value):
                raise InvalidArgument(f"admission.{name}: {value!r} must be a number >= 0")


# --- outcomes --------------------------------------------------------------------------------


class RejectReason(StrEnum):
    RATE_LIMITED_REQUESTS = "rate_limited_requests"
    RATE_LIMITED_TOKENS = "rate_limited_tokens"
    REQUEST_TOO_LARGE = "request_too_large"
    TENANT_QUEUE_FULL = "tenant_queue_full"
    QUEUE_FULL = "queue_full"
    SHED = "shed"
    QUEUE_TIMEOUT = "queue_timeout"
    DEADLINE_EXCEEDED = "deadline_exceeded"
    CANCELLED = "cancelled"


_STATUS: Mapping[RejectReason, int] = MappingProxyType(
    {
        RejectReason.RATE_LIMITED_REQUESTS: 429,
        RejectReason.RATE_LIMITED_TOKENS: 429,
        RejectReason.REQUEST_TOO_LARGE: 429,  # OpenAI's answer; no Retry-After: it never fits
        RejectReason.TENANT_QUEUE_FULL: 429,
        RejectReason.QUEUE_FULL: 503,
        RejectReason.SHED: 503,
        RejectReason.QUEUE_TIMEOUT: 503,
        RejectReason.DEADLINE_EXCEEDED: 503,
        RejectReason.CANCELLED: 499,  # client closed request (nginx); nobody reads it
    }
)


@dataclass(frozen=True, slots=True)
class Admitted:
    """Start the request now; call ``finish`` when it ends."""

    request_id: str
    tenant: str
    sla_class: str
    queued_s: float = 0.0
    """Time spent in the admission queue (0 when admitted on submit)."""


@dataclass(frozen=True, slots=True)
class Rejected:
    request_id: str
    tenant: str
    sla_class: str
    reason: RejectReason
    message: str
    retry_after_s: float | None = None
    queued_s: float = 0.0

    @property
    def status(self) -> int:
        """HTTP status: 429 (the tenant's limits), 503 (overload), 499 (cancelled)."""
        return _STATUS[self.reason]

    @property
    def retry_after_header(self) -> str | None:
        """``Retry-After`` value: whole seconds, rounded up, at least 1; None: don't send."""
        if self.retry_after_s is None:
            return None
        return str(max(1, math.ceil(self.retry_after_s)))


@dataclass(frozen=True, slots=True)
class Queued:
    """Waiting for ``on_capacity`` (or ``expire`` / ``cancel``)."""

    request_id: str
    tenant: str
    sla_class: str
    why: str
    """``no capacity`` | ``tenant at max_concurrent N`` | ``queued work ahead``."""
    evicted: Rejected | None = None
    """A less important queued request shed to make room for this one; reject it."""


Outcome = Admitted | Queued | Rejected


@dataclass(frozen=True, slots=True)
class AdmissionStats:
    queued: int
    queued_by_class: Mapping[str, int]
    queued_by_tenant: Mapping[str, int]
    """Only tenants with queued requests."""
    in_flight_by_tenant: Mapping[str, int]
    """Only tenants with admitted, unfinished requests."""
    vtc_counters: Mapping[str, float]
    """Every tenant seen: weighted tokens served (VTC)."""


# --- token bucket ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TokenBucket:
    """Holds up to ``capacity``, refills at ``rate_per_s`` continuously. Immutable: every
    operation returns the bucket as of ``now`` (a ``now`` before ``updated_at`` refills nothing).
    ``level`` may go below 0 after a ``take`` of more than it holds (a usage correction)."""

    capacity: float
    rate_per_s: float
    level: float
    updated_at: float

    @classmethod
    def per_minute(cls, limit: int, now: float) -> TokenBucket:
        """A full bucket allowing ``limit`` per minute, with a burst of one minute's worth."""
        return cls(float(limit), limit / 60.0, float(limit), now)

    def at(self, now: float) -> TokenBucket:
        if now <= self.updated_at:
            return self
        level = min(self.capacity, self.level + (now - self.updated_at) * self.rate_per_s)
        return TokenBucket(self.capacity, self.rate_per_s, level, now)

    def wait_s(self, amount: float, now: float) -> float:
        """Seconds until ``amount`` can be taken (0: now)."""
        missing = amount - self.at(now).level
        return 0.0 if missing <= 0 else missing / self.rate_per_s

    def take(self, amount: float, now: float) -> TokenBucket:
        b = self.at(now)
        return TokenBucket(b.capacity, b.rate_per_s, b.level - amount, b.updated_at)

    def give(self, amount: float, now: float) -> TokenBucket:
        b = self.at(now)
        return TokenBucket(
            b.capacity, b.rate_per_s, min(b.capacity, b.level + amount), b.updated_at
        )

    def resized(self, limit: int, now: float) -> TokenBucket:
        """The bucket under a new per-minute limit, keeping what it holds (up to the new cap)."""
        b = self.at(now)
        return TokenBucket(float(limit), limit / 60.0, min(b.level, float(limit)), b.updated_at)


# --- internals -------------------------------------------------------------------------------

_Key = tuple[float, float]


class _KeyedHeap:
    """String items ordered by a key; set / discard / peek / pop in O(log n) amortised.

    Lazy deletion: an entry is live while the item's current key equals the entry's key; the
    heap is rebuilt when more than half of it is stale.
    """

    __slots__ = ("_heap", "_keys")

    def __init__(self) -> None:
        self._heap: list[tuple[_Key, str]] = []
        self._keys: dict[str, _Key] = {}

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, item: str) -> bool:
        return item in self._keys

    def set(self, item: str, key: _Key) -> None:
        if self._keys.get(item) == key:
            return
        self._keys[item] = key
        heapq.heappush(self._heap, (key, item))
        self._compact()

    def discard(self, item: str) -> None:
        if self._keys.pop(item, None) is not None:
            self._compact()

    def peek(self) -> str | None:
        heap = self._heap
        while heap:
            key, item = heap[0]
            if self._keys.get(item) == key:
                return item
            heapq.heappop(heap)
        return None

    def peek_key(self) -> _Key | None:
        item = self.peek()
        return None if item is None else self._keys[item]

    def pop(self) -> str | None:
        item = self.peek()
        if item is not None:
            heapq.heappop(self._heap)
            del self._keys[item]
        return item

    def _compact(self) -> None:
        if len(self._heap) > 2 * len(self._keys) + 32:
            self._heap = [(k, i) for i, k in self._keys.items()]
            heapq.heapify(self._heap)


@dataclass(slots=True)
class _Entry:
    """A queued request."""

    request: AdmissionRequest
    cls: SlaClass
    arrival: float
    deadline: float
    """EDF key."""
    expires_at: float
    expiry_reason: RejectReason
    seq: int


@dataclass(slots=True)
class _Running:
    request: AdmissionRequest
    charged: float
    """VTC charge so far (the estimate; corrected at finish)."""


@dataclass(slots=True)
class _TenantQueue:
    """One tenant's queued requests of one class."""

    edf: _KeyedHeap = field(default_factory=_KeyedHeap)
    """(deadline, seq): the next to admit."""
    latest: _KeyedHeap = field(default_factory=_KeyedHeap)
    """(-deadline, -seq): the first to shed."""


@dataclass(slots=True)
class _Tenant:
    name: str
    seq: int
    rpm_limit: int = 0
    tpm_limit: int = 0
    max_concurrent: int = 0
    rpm: TokenBucket | None = None
    tpm: TokenBucket | None = None
    in_flight: int = 0
    counter: float = 0.0
    queued: int = 0
    queues: dict[str, _TenantQueue] = field(default_factory=dict)
    """By class name; only classes with queued requests."""

    @property
    def blocked(self) -> bool:
        return self.max_concurrent > 0 and self.in_flight >= self.max_concurrent


class AdmissionController:
    """Admission, fairness and shedding for one pool of capacity; see the module docstring."""

    def __init__(
        self,
        config: AdmissionConfig | None = None,
        classes: Sequence[SlaClass] = DEFAULT_SLA_CLASSES,
    ) -> None:
        self.config = config or AdmissionConfig()
        self.classes = index_sla_classes(classes)
        self._order = sorted(self.classes.values(), key=lambda c: (c.priority, c.name))
        self._tenants: dict[str, _Tenant] = {}
        self._queued: dict[str, _Entry] = {}
        self._running: dict[str, _Running] = {}
        self._class_len = dict.fromkeys(self.classes, 0)
        self._expiry = _KeyedHeap()
        """Queued request ids by (expires_at, seq)."""
        self._ready = {c: _KeyedHeap() for c in self.classes}
        """Per class: tenants with queued work there and under max_concurrent, by counter."""
        self._heaviest = {c: _KeyedHeap() for c in self.classes}
        """Per class: tenants with queued work there, largest counter first (shed victims)."""
        self._active = _KeyedHeap()
        """Tenants with any queued work, by counter (the VTC lift floor)."""
        self._last_left = 0.0
        """Counter of the last tenant whose queue emptied (the floor when none is queued)."""
        self._seq = 0

    # --- the gateway's calls -----------------------------------------------------------------

    def submit(self, request: AdmissionRequest, now: float, can_start: bool) -> Outcome:
        """Decide a new request: admit it, queue it, or reject it. See the module docstring."""
        cls = self._validate(request)
        t = self._tenant(request, now)
        rejected = self._rate_limit(t, request, now)
        if rejected is not None:
            return rejected
        self._charge_buckets(t, request, now)
        if t.blocked:
            why = f"tenant at max_concurrent {t.max_concurrent}"
        elif not can_start:
            why = "no capacity"
        elif self._work_ahead(cls):
            why = "queued work ahead"
        else:
            return self._admit(t, request, cls, now, arrival=now)
        return self._enqueue(t, request, cls, now, why)

    def on_capacity(self, now: float, free_slots: int) -> list[Admitted | Rejected]:
        """Expire what is past its time, then admit up to ``free_slots`` queued requests in
        queue order (class priority, VTC, EDF). Returns the expired, then the admitted."""
        out: list[Admitted | Rejected] = list(self.expire(now))
        for _ in range(max(0, free_slots)):
            cls = next((c for c in self._order if len(self._ready[c.name])), None)
            if cls is None:
                break
            name = self._ready[cls.name].peek()
            assert name is not None
            t = self._tenants[name]
            rid = t.queues[cls.name].edf.peek()
            assert rid is not None
            entry = self._queued[rid]
            self._unqueue(entry)
            out.append(self._admit(t, entry.request, cls, now, arrival=entry.arrival))
            if t.queued == 0:
                self._last_left = t.counter
        return out

    def finish(
        self,
        request_id: str,
        now: float,
        *,
        prompt_tokens: int | None = None,
        output_tokens: int | None = None,
    ) -> bool:
        """An admitted request ended: release its concurrency unit and charge what was actually
        served (None: the estimate) to its tenant's VTC counter and tokens-per-minute bucket.
        False (and nothing changes) for an id that is not admitted-and-unfinished."""
        run = self._running.pop(request_id, None)
        if run is None:
            return False
        r = run.request
        prompt = r.est_prompt_tokens if prompt_tokens is None else prompt_tokens
        output = r.est_output_tokens if output_tokens is None else output_tokens
        if prompt < 0 or output < 0:
            raise InvalidArgument(f"finish {request_id}: token counts must be >= 0")
        t = self._tenants[r.tenant]
        was_blocked = t.blocked
        t.in_flight -= 1
        t.counter += self._weigh(prompt, output) - run.charged
        extra = (prompt + output) - (r.est_prompt_tokens + r.est_output_tokens)
        if t.tpm is not None and extra > 0:
            t.tpm = t.tpm.take(extra, now)
        elif t.tpm is not None and extra < 0:
            t.tpm = t.tpm.give(-extra, now)
        self._reindex(t, readiness_changed=was_blocked != t.blocked)
        return True

    def cancel(self, request_id: str, now: float) -> Rejected | None:
        """The client of a queued request went away: reject it (499) and refund its rate-limit
        charge. None when it is not queued (if it was admitted, call ``finish``)."""
        entry = self._queued.get(request_id)
        if entry is None:
            return None
        return self._drop(entry, now, RejectReason.CANCELLED, "cancelled by the client", None)

    def reconfigure(self, classes: Sequence[SlaClass], now: float) -> list[Rejected]:
        """Replace the class table (the deployment's classes changed); returns the rejected.

        New requests see the new classes at once. A queued request keeps the deadline and
        timeout it was queued under; one whose class is gone is rejected (``SHED``, with
        Retry-After: the client may retry with a class that exists). Running requests are
        unaffected."""
        table = index_sla_classes(classes)
        out = [
            self._drop(
                e,
                now,
                RejectReason.SHED,
                f"SLA class {e.cls.name!r} was removed from the deployment while queued",
                self.config.overload_retry_after_s,
            )
            for e in [e for e in self._queued.values() if e.cls.name not in table]
        ]
        self.classes = table
        self._order = sorted(table.values(), key=lambda c: (c.priority, c.name))
        for per_class in (self._class_len, self._ready, self._heaviest):
            for name in [n for n in per_class if n not in table]:
                del per_class[name]
        for name in table:
            self._class_len.setdefault(name, 0)
            self._ready.setdefault(name, _KeyedHeap())
            self._heaviest.setdefault(name, _KeyedHeap())
        return out

    def expire(self, now: float) -> list[Rejected]:
        """Reject every queued request past its queue timeout or deadline, earliest first."""
        out: list[Rejected] = []
        while True:
            key = self._expiry.peek_key()
            if key is None or key[0] > now:
                return out
            rid = self._expiry.peek()
            assert rid is not None
            e = self._queued[rid]
            if e.expiry_reason is RejectReason.QUEUE_TIMEOUT:
                msg = f"queued longer than {e.cls.name}'s queue timeout {e.cls.queue_timeout_s:g}s"
                retry: float | None = self.config.overload_retry_after_s
            else:
                msg = f"deadline {e.expires_at - e.arrival:g}s after arrival passed while queued"
                retry = None
            out.append(self._drop(e, now, e.expiry_reason, msg, retry))

    def stats(self) -> AdmissionStats:
        ts = sorted(self._tenants.values(), key=lambda t: t.seq)
        return AdmissionStats(
            queued=len(self._queued),
            queued_by_class=MappingProxyType(dict(self._class_len)),
            queued_by_tenant=MappingProxyType({t.name: t.queued for t in ts if t.queued}),
            in_flight_by_tenant=MappingProxyType({t.name: t.in_flight for t in ts if t.in_flight}),
            vtc_counters=MappingProxyType({t.name: t.counter for t in ts}),
        )

    @property
    def queued(self) -> int:
        """Requests queued now (``stats().queued``)."""
        return len(self._queued)

    def queue_depths(self) -> tuple[tuple[str, int], ...]:
        """(class, requests queued in it) for every class of the table (what
        ``stats().queued_by_class`` says; cheaper, for a caller that asks after every
        request)."""
        return tuple(self._class_len.items())

    def is_queued(self, request_id: str) -> bool:
        return request_id in self._queued

    def tenant_load(self, tenant: str) -> int:
        """The tenant's requests admitted and not finished, plus those queued."""
        t = self._tenants.get(tenant)
        return 0 if t is None else t.in_flight + t.queued

    def is_admitted(self, request_id: str) -> bool:
        return request_id in self._running

    # --- steps -------------------------------------------------------------------------------

    def _validate(self, r: AdmissionRequest) -> SlaClass:
        cls = self.classes.get(r.sla_class)
        if cls is None:
            known = ", ".join(self.classes)
            raise InvalidArgument(f"unknown SLA class {r.sla_class!r} (known: {known})")
        if not r.request_id or not r.tenant:
            raise InvalidArgument("request_id and tenant must be non-empty")
        if r.request_id in self._queued or r.request_id in self._running:
            raise InvalidArgument(f"request id {r.request_id!r} is already queued or admitted")
        if r.est_prompt_tokens < 0 or r.est_output_tokens < 0:
            raise InvalidArgument(f"request {r.request_id}: token estimates must be >= 0")
        if r.deadline_s is not None and not r.deadline_s > 0:
            raise InvalidArgument(f"request {r.request_id}: deadline_s must be > 0")
        lim = r.limits
        for name in ("requests_per_minute", "tokens_per_minute", "max_concurrent"):
            if getattr(lim, name) < 0:
                raise InvalidArgument(f"tenant {r.tenant}: {name} must be >= 0 (0: unlimited)")
        return cls

    def _tenant(self, r: AdmissionRequest, now: float) -> _Tenant:
        t = self._tenants.get(r.tenant)
        if t is None:
            t = self._tenants[r.tenant] = _Tenant(r.tenant, len(self._tenants))
        lim = r.limits
        if lim.requests_per_minute != t.rpm_limit:
            t.rpm = _rebucket(t.rpm, lim.requests_per_minute, now)
            t.rpm_limit = lim.requests_per_minute
        if lim.tokens_per_minute != t.tpm_limit:
            t.tpm = _rebucket(t.tpm, lim.tokens_per_minute, now)
            t.tpm_limit = lim.tokens_per_minute
        if lim.max_concurrent != t.max_concurrent:
            was_blocked = t.blocked
            t.max_concurrent = lim.max_concurrent
            self._reindex(t, readiness_changed=was_blocked != t.blocked)
        return t

    def _rate_limit(self, t: _Tenant, r: AdmissionRequest, now: float) -> Rejected | None:
        tokens = r.est_prompt_tokens + r.est_output_tokens
        if t.tpm is not None and tokens > t.tpm.capacity:
            msg = f"request needs {tokens} tokens > tokens_per_minute {t.tpm_limit}"
            return _rejected(r, RejectReason.REQUEST_TOO_LARGE, msg, None)
        wait_requests = 0.0 if t.rpm is None else t.rpm.wait_s(1, now)
        wait_tokens = 0.0 if t.tpm is None else t.tpm.wait_s(tokens, now)
        if wait_requests == 0 and wait_tokens == 0:
            return None
        wait = max(wait_requests, wait_tokens)
        if wait_requests >= wait_tokens:
            reason = RejectReason.RATE_LIMITED_REQUESTS
            msg = f"requests_per_minute {t.rpm_limit} exceeded"
        else:
            reason = RejectReason.RATE_LIMITED_TOKENS
            msg = f"tokens_per_minute {t.tpm_limit} exceeded"
        return _rejected(r, reason, f"{msg}; retry in {wait:.3f}s", wait)

    def _charge_buckets(self, t: _Tenant, r: AdmissionRequest, now: float) -> None:
        if t.rpm is not None:
            t.rpm = t.rpm.take(1, now)
        if t.tpm is not None:
            t.tpm = t.tpm.take(r.est_prompt_tokens + r.est_output_tokens, now)

    def _refund_buckets(self, t: _Tenant, r: AdmissionRequest, now: float) -> None:
        if t.rpm is not None:
            t.rpm = t.rpm.give(1, now)
        if t.tpm is not None:
            t.tpm = t.tpm.give(r.est_prompt_tokens + r.est_output_tokens, now)

    def _work_ahead(self, cls: SlaClass) -> bool:
        """Is a queued request that could run now as or more important than ``cls``?"""
        for c in self._order:
            if c.priority > cls.priority:
                return False
            if len(self._ready[c.name]):
                return True
        return False

    def _weigh(self, prompt: int, output: int) -> float:
        cfg = self.config
        return cfg.prompt_token_weight * prompt + cfg.output_token_weight * output

    def _admit(
        self, t: _Tenant, r: AdmissionRequest, cls: SlaClass, now: float, arrival: float
    ) -> Admitted:
        charge = self._weigh(r.est_prompt_tokens, r.est_output_tokens)
        was_blocked = t.blocked
        t.in_flight += 1
        t.counter += charge
        self._running[r.request_id] = _Running(r, charge)
        self._reindex(t, readiness_changed=was_blocked != t.blocked)
        return Admitted(r.request_id, r.tenant, cls.name, queued_s=max(0.0, now - arrival))

    def _enqueue(
        self, t: _Tenant, r: AdmissionRequest, cls: SlaClass, now: float, why: str
    ) -> Queued | Rejected:
        cap = self.config.max_queued_per_tenant
        if cap and t.queued >= cap:
            self._refund_buckets(t, r, now)
            msg = f"tenant {t.name} has {t.queued} queued requests (max_queued_per_tenant {cap})"
            return _rejected(r, RejectReason.TENANT_QUEUE_FULL, msg, self._retry)
        if self._class_len[cls.name] >= cls.max_queue:
            self._refund_buckets(t, r, now)
            msg = f"{cls.name} queue full ({cls.max_queue}) and {why}"
            return _rejected(r, RejectReason.QUEUE_FULL, msg, self._retry)
        evicted: Rejected | None = None
        if len(self._queued) >= self.config.max_queued:
            victim = self._shed_victim(cls)
            if victim is None:
                self._refund_buckets(t, r, now)
                msg = f"admission queue full ({self.config.max_queued}), nothing less important"
                return _rejected(r, RejectReason.QUEUE_FULL, msg, self._retry)
            msg = f"shed from the full admission queue for a {cls.name} request"
            evicted = self._drop(victim, now, RejectReason.SHED, msg, self._retry)

        if t.queued == 0:  # VTC: a returning tenant starts from the active minimum
            floor_name = self._active.peek()
            floor = self._last_left if floor_name is None else self._tenants[floor_name].counter
            t.counter = max(t.counter, floor)
        self._seq += 1
        target = r.deadline_s if r.deadline_s is not None else cls.target_s
        expires_at, reason = now + cls.queue_timeout_s, RejectReason.QUEUE_TIMEOUT
        hard = r.deadline_s if r.deadline_s is not None else cls.deadline_s
        if hard is not None and hard <= cls.queue_timeout_s:
            expires_at, reason = now + hard, RejectReason.DEADLINE_EXCEEDED
        e = _Entry(r, cls, now, now + target, expires_at, reason, self._seq)
        self._queued[r.request_id] = e
        self._class_len[cls.name] += 1
        t.queued += 1
        q = t.queues.get(cls.name)
        if q is None:
            q = t.queues[cls.name] = _TenantQueue()
        q.edf.set(r.request_id, (e.deadline, e.seq))
        q.latest.set(r.request_id, (-e.deadline, -e.seq))
        self._expiry.set(r.request_id, (e.expires_at, e.seq))
        self._reindex(t, readiness_changed=True)
        return Queued(r.request_id, r.tenant, cls.name, why, evicted)

    def _shed_victim(self, cls: SlaClass) -> _Entry | None:
        """The request to shed for a ``cls`` arrival: least important class first."""
        for c in reversed(self._order):
            if c.priority <= cls.priority:
                return None
            name = self._heaviest[c.name].peek()
            if name is not None:
                rid = self._tenants[name].queues[c.name].latest.peek()
                assert rid is not None
                return self._queued[rid]
        return None

    def _drop(
        self,
        e: _Entry,
        now: float,
        reason: RejectReason,
        message: str,
        retry_after_s: float | None,
    ) -> Rejected:
        """Take a queued request out unserved: refund it and say why."""
        self._unqueue(e)
        t = self._tenants[e.request.tenant]
        self._refund_buckets(t, e.request, now)
        return _rejected(e.request, reason, message, retry_after_s, max(0.0, now - e.arrival))

    def _unqueue(self, e: _Entry) -> None:
        rid = e.request.request_id
        del self._queued[rid]
        self._class_len[e.cls.name] -= 1
        self._expiry.discard(rid)
        t = self._tenants[e.request.tenant]
        t.queued -= 1
        q = t.queues[e.cls.name]
        q.edf.discard(rid)
        q.latest.discard(rid)
        if not len(q.edf):
            del t.queues[e.cls.name]
            self._ready[e.cls.name].discard(t.name)
            self._heaviest[e.cls.name].discard(t.name)
        if t.queued == 0:
            self._active.discard(t.name)
            self._last_left = t.counter

    def _reindex(self, t: _Tenant, readiness_changed: bool) -> None:
        """Re-key the tenant wherever it is queued, after its counter or readiness changed."""
        if not t.queued:
            return
        key = (t.counter, float(t.seq))
        self._active.set(t.name, key)
        for c in t.queues:
            self._heaviest[c].set(t.name, (-t.counter, float(t.seq)))
            if t.blocked:
                if readiness_changed:
                    self._ready[c].discard(t.name)
            else:
                self._ready[c].set(t.name, key)

    @property
    def _retry(self) -> float:
        return self.config.overload_retry_after_s


def _rebucket(bucket: TokenBucket | None, limit: int, now: float) -> TokenBucket | None:
    if limit == 0:
        return None
    if bucket is None:
        return TokenBucket.per_minute(limit, now)
    return bucket.resized(limit, now)


def _rejected(
    r: AdmissionRequest,
    reason: RejectReason,
    message: str,
    retry_after_s: float | None,
    queued_s: float = 0.0,
) -> Rejected:
    return Rejected(r.request_id, r.tenant, r.sla_class, reason, message, retry_after_s, queued_s)
