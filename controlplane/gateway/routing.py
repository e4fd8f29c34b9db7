"""Routing policy and per-worker circuit breakers: pure, synchronous, deterministic.

The gateway's request path asks a ``Router`` for a ``Route`` with a snapshot of the model's
workers (``WorkerSnapshot``: record + last load report + this gateway's own in-flight count +
breaker state). Nothing here does I/O or reads a clock: ``now`` comes in as an argument.

``LeastLoadedRouter`` is the default policy:

- filter: the model's workers that are Serving (not Draining), whose circuit is closed (or
  half-open and due a probe) and that the caller did not exclude (a worker that just failed this
  request);
- disaggregated when the model has at least one prefill worker and one decode-capable worker
  (decode or both): the least loaded of each;
- otherwise aggregated: the least loaded decode-capable worker, which prefills itself;
- load = running + waiting (the worker's last report) + in flight from this gateway (covers the
  time between two reports); ties go to the lower worker id, so the choice is reproducible.

The SLA-aware router (KV / prefix aware, TTFT prediction) replaces this policy behind the same
``Router`` protocol.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

PREFILL = "prefill"
DECODE = "decode"
BOTH = "both"


@dataclass(frozen=True, slots=True)
class WorkerSnapshot:
    worker_id: str
    endpoint: str
    role: str
    """"prefill" | "decode" | "both"."""
    serving: bool = True
    """False while the worker drains (its record says Draining, or its report does)."""
    running: int = 0
    waiting: int = 0
    inflight_here: int = 0
    """Requests this gateway has on the worker now."""
    pending_prefill_tokens: int = 0
    """Prompt tokens this gateway sent the worker to prefill, first token not back yet."""
    pending_prefill_prompts: int = 0
    """How many prompts those are."""
    kv_blocks_used: int = 0
    kv_blocks_total: int = 0
    circuit_allows: bool = True
    max_context_tokens: int = 0
    pool: str = ""
    """The worker's pool kind from its record ("long_context", ...; "" unknown)."""
    chunked_prefill: bool = False
    batch_size: int = 0
    """Sequences in its decode batch (running requests, by the last report)."""
    batch_context_tokens: int = 0
    """Context tokens the batch holds in all (0 when the engine does not report it)."""
    queued_prefill_tokens: int | None = None
    """Prompt tokens waiting to be prefilled; None: the engine does not report it."""
    dp_rank_running: tuple[int, ...] = ()
    token_endpoint: str = ""
    """Its token transport's host:port ("": the request path uses its gRPC service)."""

    @property
    def load(self) -> int:
        return self.running + self.waiting + self.inflight_here


@dataclass(frozen=True, slots=True)
class Route:
    decode: WorkerSnapshot
    """The worker that streams the tokens."""
    prefill: WorkerSnapshot | None = None
    """The worker that prefills first; None = aggregated (``decode`` prefills itself)."""


@dataclass(frozen=True, slots=True)
class NoRoute:
    reasons: tuple[str, ...] = field(default_factory=tuple)

    def message(self, model: str) -> str:
        why = "; ".join(self.reasons) if self.reasons else "no workers registered"
        return f"no worker can serve model {model!r} now ({why})"


class Router(Protocol):
    def route(
        self,
        workers: Sequence[WorkerSnapshot],
        *,
        exclude: frozenset[str] = frozenset(),
        aggregated: bool = False,
    ) -> Route | NoRoute:
        """A route over ``workers`` (all of one model); ``aggregated`` asks for no prefill."""
        ...


def _least_loaded(workers: Iterable[WorkerSnapshot]) -> WorkerSnapshot | None:
    return min(workers, key=lambda w: (w.load, w.worker_id), default=None)


class LeastLoadedRouter:
    """See the module docstring."""

    def route(
        self,
        workers: Sequence[WorkerSnapshot],
        *,
        exclude: frozenset[str] = frozenset(),
        aggregated: bool = False,
    ) -> Route | NoRoute:
        usable: list[WorkerSnapshot] = []
        reasons: list[str] = []
        for w in workers:
            if w.worker_id in exclude:
                reasons.append(f"{w.worker_id}: failed this request")
            elif not w.serving:
                reasons.append(f"{w.worker_id}: draining")
            elif not w.circuit_allows:
                reasons.append(f"{w.worker_id}: circuit open")
            else:
                usable.append(w)
        decode = _least_loaded(w for w in usable if w.role in (DECODE, BOTH))
        if decode is None:
            return NoRoute(tuple(reasons) or ("no decode or aggregated worker",))
        prefill = None if aggregated else _least_loaded(w for w in usable if w.role == PREFILL)
        return Route(decode=decode, prefill=prefill)


# --- circuit breaker -----------------------------------------------------------------------------


class CircuitState(enum.StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass(slots=True)
class _Circuit:
    state: CircuitState = CircuitState.CLOSED
    failures: int = 0
    opened_at: float = 0.0
    probing: bool = False


class CircuitBreakers:
    """One breaker per worker.

    Theory of operation (one table, per worker):

    ========== ================================ ===========================================
    state      event                            next
    ========== ================================ ===========================================
    CLOSED     success                          CLOSED, failures = 0
    CLOSED     failure (< threshold in a row)   CLOSED, failures + 1
    CLOSED     failure (threshold in a row)     OPEN at now (``record_failure`` -> True)
    OPEN       ``allows`` before cooldown       refused
    OPEN       ``allows`` after cooldown        HALF_OPEN: allowed, one probe at a time
    HALF_OPEN  success                          CLOSED
    HALF_OPEN  failure                          OPEN at now (``record_failure`` -> True)
    ========== ================================ ===========================================

    Failures are transport failures (the worker unreachable, its stream broken), never the
    caller's bad input.
    """

    def __init__(self, *, failure_threshold: int = 3, cooldown_s: float = 5.0) -> None:
        if failure_threshold < 1 or cooldown_s <= 0:
            raise ValueError("failure_threshold must be >= 1 and cooldown_s > 0")
        self.failure_threshold = failure_threshold
        self.cooldown_s = cooldown_s
        self._circuits: dict[str, _Circuit] = {}

    def state(self, worker_id: str, now: float) -> CircuitState:
        c = self._circuits.get(worker_id)
        if c is None:
            return CircuitState.CLOSED
        if c.state is CircuitState.OPEN and now - c.opened_at >= self.cooldown_s:
            return CircuitState.HALF_OPEN
        return c.state

    def allows(self, worker_id: str, now: float) -> bool:
        """Whether a request may go to ``worker_id`` now (pure read; see ``acquire``)."""
        c = self._circuits.get(worker_id)
        if c is None or c.state is CircuitState.CLOSED:
            return True
        if c.state is CircuitState.OPEN:
            return now - c.opened_at >= self.cooldown_s
        return not c.probing

    def acquire(self, worker_id: str, now: float) -> None:
        """A request is sent to ``worker_id``: past the cooldown it becomes the probe."""
        c = self._circuits.get(worker_id)
        if c is None or c.state is CircuitState.CLOSED:
            return
        if c.state is CircuitState.OPEN and now - c.opened_at >= self.cooldown_s:
            c.state = CircuitState.HALF_OPEN
        if c.state is CircuitState.HALF_OPEN:
            c.probing = True

    def record_success(self, worker_id: str) -> None:
        c = self._circuits.get(worker_id)
        if c is not None:
            c.state, c.failures, c.probing = CircuitState.CLOSED, 0, False

    def record_failure(self, worker_id: str, now: float) -> bool:
        """Count a failure; True when this one opened the circuit."""
        c = self._circuits.setdefault(worker_id, _Circuit())
        c.failures += 1
        c.probing = False
        if c.state is CircuitState.HALF_OPEN or (
            c.state is CircuitState.CLOSED and c.failures >= self.failure_threshold
        ):
            c.state, c.opened_at = CircuitState.OPEN, now
            return True
        if c.state is CircuitState.OPEN:
            c.opened_at = now
        return False

    def forget(self, worker_id: str) -> None:
        """The worker left (its record is gone)."""
        self._circuits.pop(worker_id, None)
