"""The gateway's adapter over the SLA-aware router core (``controlplane.core.routing``).

The request path (``pipeline.py``) calls it for every model that has a timing model
(``model_routing.py``):

* ``route_request(request, snapshots, exclude=..., aggregated=...)`` -> ``(Route | NoRoute,
  Trace)``: converts the gateway's ``WorkerSnapshot`` s to the core's ``WorkerState`` s (the
  timing model comes from a callable the composition root supplies, e.g. the deployment's sim
  profile; the pool from the worker's record), fills in the model's ``DeploymentFacts``
  (``facts_for``: threshold, MoE layout, profile key), runs ``SlaAwareRouter.route`` with this
  adapter's own ``random.Random`` and the ``TenantLedger`` 's shares, charges the ledger, and
  maps the decision back to snapshots;
* ``predict(request, snapshots, ...)`` -> the TTFT and prefill queue that route would have,
  without routing (the late lane's question, ``controlplane.core.routing.late``);
* ``route(...)``: the plain ``Router`` protocol, for callers that have no request to describe;
  without a prompt and SLA targets there is nothing to predict with, so it falls back to
  ``LeastLoadedRouter``;
* ``apply_kv_events`` / ``forget_worker``: what the ``WatchStats`` streams and the worker
  watch feed into the prefix index (``WorkersView``, off the request path);
* ``route_summary``: the one-line ``X-Switchboard-Route`` debug header of a decision.

The core is pure; the state here is the index and the rng, both touched only on the event
loop's thread (no locks needed).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Protocol, overload

from controlplane.core.routing import (
    NO_DEPLOYMENT,
    Decision,
    DecodeProgress,
    DeploymentFacts,
    RouteRequest,
    SlaAwareRouter,
    TenantShares,
    TimingModel,
    Trace,
    WorkerState,
)
from controlplane.core.routing.late import Prediction
from controlplane.core.routing.predict import queue_ms
from controlplane.gateway.routing import LeastLoadedRouter, NoRoute, Route, WorkerSnapshot

MAX_SUMMARY_CHARS = 400
"""``route_summary`` output is cut to this many characters (it goes in a response header)."""


class KvEventLike(Protocol):
    """``workers.engine.KvEvent`` as decoded from a ``WatchStats`` message."""

    @property
    def kind(self) -> str: ...

    @property
    def block_hashes(self) -> tuple[int, ...]: ...


def worker_state(
    snapshot: WorkerSnapshot,
    *,
    model: str,
    timing: TimingModel,
    pool: str | None = None,
    decoding: tuple[DecodeProgress, ...] = (),
) -> WorkerState:
    """The core's view of one gateway snapshot: its record (pool, chunked prefill, context
    window) and last report (batch, its context tokens, queued prefill tokens; an engine that
    does not report the queue leaves it unknown, see ``controlplane.core.routing.predict``).
    ``pool`` overrides the record's; ``decoding``: this gateway's requests decoding there."""
    return WorkerState(
        worker_id=snapshot.worker_id,
        model=model,
        role=snapshot.role,
        timing=timing,
        pool=snapshot.pool if pool is None else pool,
        serving=snapshot.serving,
        circuit_allows=snapshot.circuit_allows,
        running=snapshot.running,
        waiting=snapshot.waiting,
        inflight_here=snapshot.inflight_here,
        queued_prefill_tokens=snapshot.queued_prefill_tokens,
        pending_prefill_tokens=snapshot.pending_prefill_tokens,
        pending_prefill_prompts=snapshot.pending_prefill_prompts,
        # the batch is at least what this gateway has decoding there (reports lag)
        batch_size=max(snapshot.batch_size or snapshot.running, snapshot.inflight_here),
        context_tokens=snapshot.batch_context_tokens,
        kv_blocks_used=snapshot.kv_blocks_used,
        kv_blocks_total=snapshot.kv_blocks_total,
        max_context_tokens=snapshot.max_context_tokens,
        chunked_prefill=snapshot.chunked_prefill,
        dp_rank_running=snapshot.dp_rank_running,
        reported_batch=snapshot.batch_size,
        decoding=decoding,
    )


class TenantLedger:
    """Recent tokens per tenant, overall and per worker, for the fair-share scorer: each
    routed request adds its prompt + ``max_tokens`` (what it may cost the worker) to its
    tenant on its decode worker; every value halves each ``half_life_s``. The decay runs at
    most eight times per half-life, over the (few) entries, never per routing call; the core
    reads the live maps through ``shares`` (read-only by contract)."""

    def __init__(
        self, *, half_life_s: float = 30.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.half_life_s = half_life_s
        self._clock = clock
        self._by_tenant: dict[str, float] = {}
        self._by_worker: dict[str, dict[str, float]] = {}
        self._decayed_at = clock()

    def add(self, worker_id: str, tenant: str, tokens: float) -> None:
        if not tenant or tokens <= 0:
            return
        self._decay()
        self._by_tenant[tenant] = self._by_tenant.get(tenant, 0.0) + tokens
        per = self._by_worker.setdefault(worker_id, {})
        per[tenant] = per.get(tenant, 0.0) + tokens

    def _decay(self) -> None:
        now = self._clock()
        elapsed = now - self._decayed_at
        if elapsed < self.half_life_s / 8:
            return
        self._decayed_at = now
        factor = 0.5 ** (elapsed / self.half_life_s)
        self._by_tenant = {t: v * factor for t, v in self._by_tenant.items() if v * factor >= 1}
        by_worker: dict[str, dict[str, float]] = {}
        for w, per in self._by_worker.items():
            kept = {t: v * factor for t, v in per.items() if v * factor >= 1}
            if kept:
                by_worker[w] = kept
        self._by_worker = by_worker

    def shares(self) -> TenantShares | None:
        """The current view (None while nothing was served)."""
        self._decay()
        if not self._by_tenant:
            return None
        return TenantShares(self._by_tenant, self._by_worker)

    def forget_worker(self, worker_id: str) -> None:
        self._by_worker.pop(worker_id, None)


_StateKey = tuple[WorkerSnapshot, str, TimingModel, str | None, tuple[DecodeProgress, ...]]
"""What a ``WorkerState`` is built from: snapshot, model, timing, pool, decoding."""


def _same_key(a: _StateKey, b: _StateKey) -> bool:
    """Snapshot and timing by identity (both immutable), the rest by value."""
    return a[0] is b[0] and a[2] is b[2] and a[1] == b[1] and a[3] == b[3] and a[4] == b[4]


@dataclass(frozen=True, slots=True)
class Held:
    """``route_request`` 's answer when its ``hold`` said to hold the request back."""

    prediction: Prediction


def prediction(request: RouteRequest, decision: Decision) -> Prediction | None:
    """The TTFT and prefill queue ``decision`` predicts, on the worker that prefills."""
    prefiller = decision.prefill if decision.prefill is not None else decision.decode
    stage = decision.trace.prefill if decision.prefill is not None else decision.trace.decode
    if stage is None:
        return None
    return Prediction(
        ttft_ms=stage.candidate(prefiller.worker_id).ttft_ms,
        queue_ms=queue_ms(request, prefiller),
    )


class SlaGatewayRouter:
    """See the module docstring."""

    def __init__(
        self,
        core: SlaAwareRouter,
        *,
        timing_for: Callable[[str, WorkerSnapshot], TimingModel],
        pool_for: Callable[[WorkerSnapshot], str] | None = None,
        facts_for: Callable[[str], DeploymentFacts] | None = None,
        ledger: TenantLedger | None = None,
        rng: random.Random,
    ) -> None:
        """``pool_for``: a worker's pool (default: its record's); ``facts_for``: the model's
        deployment facts, for requests that come without them; ``ledger``: tokens per tenant
        (default: a fresh one)."""
        self.core = core
        self._timing_for = timing_for
        self._pool_for = pool_for
        self._facts_for = facts_for
        self.ledger = ledger if ledger is not None else TenantLedger()
        self._rng = rng
        self._fallback = LeastLoadedRouter()
        self.decoding_for: Callable[[str], tuple[DecodeProgress, ...]] | None = None
        """worker id -> the requests this gateway has decoding there (their ITL budgets);
        set by the ``Gateway`` that owns the request path. None: not tracked."""
        self._states: dict[str, tuple[_StateKey, WorkerState]] = {}
        """worker id -> its last ``WorkerState`` and what it was built from (``_prepare``)."""

    def deployment_facts(self, model: str) -> DeploymentFacts:
        """The model's deployment facts (``facts_for``; ``NO_DEPLOYMENT`` without it): what
        ``route_request`` fills in for a request that comes without them."""
        return NO_DEPLOYMENT if self._facts_for is None else self._facts_for(model)

    def route(
        self,
        workers: Sequence[WorkerSnapshot],
        *,
        exclude: frozenset[str] = frozenset(),
        aggregated: bool = False,
    ) -> Route | NoRoute:
        """The ``Router`` protocol without a request: least loaded (nothing to predict)."""
        return self._fallback.route(workers, exclude=exclude, aggregated=aggregated)

    @overload
    def route_request(
        self,
        request: RouteRequest,
        workers: Sequence[WorkerSnapshot],
        *,
        exclude: frozenset[str] = ...,
        aggregated: bool = ...,
        clock: Callable[[], float] | None = ...,
        hold: None = ...,
    ) -> tuple[Route | NoRoute, Trace]: ...

    @overload
    def route_request(
        self,
        request: RouteRequest,
        workers: Sequence[WorkerSnapshot],
        *,
        exclude: frozenset[str] = ...,
        aggregated: bool = ...,
        clock: Callable[[], float] | None = ...,
        hold: Callable[[Prediction], bool],
    ) -> tuple[Route | NoRoute | Held, Trace]: ...

    def route_request(
        self,
        request: RouteRequest,
        workers: Sequence[WorkerSnapshot],
        *,
        exclude: frozenset[str] = frozenset(),
        aggregated: bool = False,
        clock: Callable[[], float] | None = None,
        hold: Callable[[Prediction], bool] | None = None,
    ) -> tuple[Route | NoRoute | Held, Trace]:
        """Route ``request`` over ``workers`` (all of ``request.model``); ``clock``: time each
        plugin with it (the trace's ``plugin_seconds``; None: not timed). A request without
        deployment facts gets the model's (``facts_for``). The decode worker's tenant ledger
        is charged with the request's prompt + ``max_tokens``. ``hold``: asked with the
        decision's prediction (``predict``); True: the decision is not made (no index or
        ledger change) and ``Held`` comes back instead of the route."""
        request, states = self._prepare(request, workers)
        out = self.core.decide(
            request,
            states,
            self._rng,
            exclude=exclude,
            aggregated=aggregated,
            tenants=self.ledger.shares() if request.tenant else None,
            clock=clock,
        )
        if not isinstance(out, Decision):
            return NoRoute(out.reasons), out.trace
        if hold is not None:
            p = prediction(request, out)
            if p is not None and hold(p):
                return Held(p), out.trace
        self.core.commit(request, out)
        self.ledger.add(out.decode.worker_id, request.tenant, request.total_tokens)
        by_id = {w.worker_id: w for w in workers}
        prefill = by_id[out.prefill.worker_id] if out.prefill is not None else None
        return Route(decode=by_id[out.decode.worker_id], prefill=prefill), out.trace

    def predict(
        self,
        request: RouteRequest,
        workers: Sequence[WorkerSnapshot],
        *,
        exclude: frozenset[str] = frozenset(),
        aggregated: bool = False,
    ) -> Prediction | None:
        """What the route ``route_request`` would pick now predicts for ``request`` (the
        late lane's question, ``controlplane.core.routing.late``): the TTFT and prefill queue
        on the worker that would prefill. A pure read (``SlaAwareRouter.decide``: no index or
        ledger change); None when no worker would take it."""
        request, states = self._prepare(request, workers)
        out = self.core.decide(
            request,
            states,
            self._rng,
            exclude=exclude,
            aggregated=aggregated,
            tenants=self.ledger.shares() if request.tenant else None,
        )
        return prediction(request, out) if isinstance(out, Decision) else None

    def _prepare(
        self, request: RouteRequest, workers: Sequence[WorkerSnapshot]
    ) -> tuple[RouteRequest, list[WorkerState]]:
        """``request`` with the model's deployment facts, and the workers as the core sees
        them."""
        if request.deployment is NO_DEPLOYMENT and self._facts_for is not None:
            facts = self._facts_for(request.model)
            if facts is not NO_DEPLOYMENT:
                request = replace(request, deployment=facts)
        model = request.model
        cache = self._states
        states: list[WorkerState] = []
        for w in workers:
            key = (
                w,
                model,
                self._timing_for(model, w),
                None if self._pool_for is None else self._pool_for(w),
                () if self.decoding_for is None else self.decoding_for(w.worker_id),
            )
            hit = cache.get(w.worker_id)
            # the same snapshot object (``WorkersView.snapshots`` rebuilds one only when its
            # worker changed) and the same inputs: the same state, not built again
            if hit is not None and _same_key(hit[0], key):
                states.append(hit[1])
                continue
            _, _, timing, pool, decoding = key
            state = worker_state(w, model=model, timing=timing, pool=pool, decoding=decoding)
            cache[w.worker_id] = (key, state)
            states.append(state)
        return request, states

    def apply_kv_events(self, worker_id: str, events: Iterable[KvEventLike]) -> None:
        for e in events:
            self.core.index.apply_event(worker_id, e.kind, e.block_hashes)

    def forget_worker(self, worker_id: str) -> None:
        self.core.index.forget_worker(worker_id)
        self.ledger.forget_worker(worker_id)
        self._states.pop(worker_id, None)


def _clean(text: str) -> str:
    """Printable ASCII only (a header value must not carry CR / LF or non-latin-1)."""
    return "".join(c if " " <= c <= "~" else "?" for c in text)


def route_summary(
    route: Route | NoRoute,
    trace: Trace | None = None,
    *,
    policy: str = "sla",
    fallback: str = "",
    held_s: float = 0.0,
) -> str:
    """One bounded line: ``policy=sla; decode=d1; prefill=local; by=PrefixOverlap,TtftHeadroom;
    cached=16; filtered=KvHeadroom; why=<the local / remote prefill verdict>``.

    ``by``: the decode stage's deciders (the scorers that put the winner ahead of the
    runner-up; ``-`` when there was no contest), ``prefill_by`` the prefill stage's, ``cached``
    the decode worker's leading prompt blocks in the prefix index, ``filtered`` the filters that
    rejected some worker (but Role, which always does), ``fallback`` why the SLA router's
    answer was not used, ``held`` how long the late lane held the request before this route
    (``held_s``; absent when it was not held). At most
    ``MAX_SUMMARY_CHARS`` characters (``why`` comes last, so it is what a cut shortens)."""
    parts = [f"policy={policy}"]
    if isinstance(route, Route):
        parts.append(f"decode={route.decode.worker_id}")
        parts.append(f"prefill={route.prefill.worker_id if route.prefill else 'local'}")
    else:
        parts.append("decode=none")
    if fallback:
        parts.append(f"fallback={fallback}")
    if held_s > 0:
        parts.append(f"held={held_s * 1000:.0f}ms")
    if trace is not None:
        parts.append(f"by={','.join(trace.decode.deciders()) or '-'}")
        if trace.prefill is not None:
            parts.append(f"prefill_by={','.join(trace.prefill.deciders()) or '-'}")
        chosen = trace.decode.chosen
        if chosen is not None:
            parts.append(f"cached={trace.decode.candidate(chosen).cached_blocks}")
        filters = [
            r.plugin
            for st in (trace.decode, trace.prefill)
            if st is not None
            for r in st.rejections
            if r.plugin != "Role"  # every prefill worker in the decode stage, and vice versa
        ]
        if filters:
            parts.append(f"filtered={','.join(dict.fromkeys(filters))}")
        if trace.disaggregation is not None:
            parts.append(f"why={trace.disaggregation.reason}")
    elif isinstance(route, Route):
        parts.append("by=LeastLoaded")
    line = _clean("; ".join(parts))
    if len(line) > MAX_SUMMARY_CHARS:
        line = line[: MAX_SUMMARY_CHARS - 3] + "..."
    return line
