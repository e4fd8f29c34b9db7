"""TenantGate: the ``RequestGate`` of a multi-tenant gateway — who may ask, and when.

1. **Who**: the bearer token is looked up in the watch-fed ``TenantCache`` (no etcd on the
   request path); no or a wrong key is ``Unauthenticated`` (401). A model the tenant may not use
   is answered as if it did not exist (404, "does not exist or you do not have access to it", as
   OpenAI does), so tenants cannot probe each other's models; ``/v1/models`` lists only the
   tenant's. A requested SLA class (body ``sla_class`` or ``X-SLA-Class``) that does not exist
   is ``InvalidArgument`` (400), one the tenant may not use ``PermissionDenied`` (403). The
   classes are the model's deployment's own (``sla_classes`` in its spec, watch-fed through
   ``classes``) or the defaults; a request naming none runs in its tenant's default class, or,
   when the model does not offer that one, in the least important class the tenant may use.
2. **When**: one pure ``AdmissionController`` per model (controlplane/core/admission.py) applies
   the tenant's requests/min, tokens/min and max-concurrent quotas, and queues requests while
   the model's capacity is in use — by class priority, then fair share of tokens served between
   tenants (VTC), then deadline. Capacity is ``slots_per_worker`` times the model's serving
   workers that decode (decode or both). Rejections carry the reason: ``RateLimited`` for
   the tenant's own limits (429 with ``Retry-After`` where the core gives one;
   RESOURCE_EXHAUSTED over gRPC), ``Overloaded`` for a full queue, a shed or a queue timeout
   (503; UNAVAILABLE).
   A client that leaves while queued is taken out of the queue; ``release`` charges the tokens
   actually served and hands freed slots to the queue. ``run`` expires overdue queued requests
   every ``expire_interval_s``. Quotas are fleet-wide: with other live gateway replicas
   (watch-fed from etcd, ``peer_demand``) each replica enforces its part, shared by demand
   (controlplane/core/quota_shares.py; this gate measures its clients' demand in ``demand``
   and its record publishes ``demands()``); with only a replica count (``replicas``), the even
   part (``admission.quota_share``). With
   ``metrics``: requests that had to queue and requests rejected (by reason), per tenant,
   model and class; the queue wait of every admitted request; the queue depth per model and
   class.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from typing import Protocol

from controlplane.core.admission import (
    AdmissionConfig,
    AdmissionController,
    AdmissionRequest,
    Admitted,
    Queued,
    QuotaLike,
    Rejected,
    TenantLimits,
    quota_share,
)
from controlplane.core.quota_shares import DemandMeter, TenantDemand, demand_share
from controlplane.core.sla import DEFAULT_SLA_CLASSES, SlaClass, index_sla_classes
from controlplane.core.tenants import Tenant, resolve_sla_class, tenant_allows_model
from controlplane.errors import InvalidArgument, NotFound, PermissionDenied, Unauthenticated
from controlplane.gateway.errors import Overloaded, RateLimited
from controlplane.gateway.gate import AdmissionTicket, RequestContext
from controlplane.telemetry.metrics import OTHER_TENANT, GatewayMetrics

SHARE_REFRESH_S = 0.5
"""How long this replica keeps a tenant's part of its quotas before working it out again."""


class PeerDemand(Protocol):
    def __call__(self, model: str, tenant: str) -> tuple[list[TenantDemand], int]:
        """The other live replicas' published demands for (model, tenant), and the number of
        live replicas, this one included (``GatewayPeers.demands``)."""
        ...


class TenantLookup(Protocol):
    def authenticate(self, api_key: str) -> Tenant | None: ...


def _fallback_class(tenant: Tenant, classes: Mapping[str, SlaClass]) -> str:
    """For a request naming no class whose tenant's default the model does not offer: the
    model's least important class the tenant may use (PermissionDenied when there is none)."""
    allowed = [
        c for c in classes.values() if not tenant.sla_classes or c.name in tenant.sla_classes
    ]
    if not allowed:
        raise PermissionDenied(
            f"tenant {tenant.name!r} may use none of this model's SLA classes "
            f"({', '.join(sorted(classes))})"
        )
    return max(allowed, key=lambda c: (c.priority, c.name)).name


def model_hidden(model: str) -> NotFound:
    return NotFound(f"The model {model!r} does not exist or you do not have access to it.")


class TenantGate:
    def __init__(
        self,
        tenants: TenantLookup,
        capacity: Callable[[str], int],
        *,
        classes: Callable[[str], Mapping[str, SlaClass]] | None = None,
        config: AdmissionConfig | None = None,
        clock: Callable[[], float] = time.monotonic,
        expire_interval_s: float = 0.1,
        metrics: GatewayMetrics | None = None,
        replicas: Callable[[], int] = lambda: 1,
        peer_demand: PeerDemand | None = None,
    ) -> None:
        self.tenants = tenants
        self.capacity = capacity
        defaults = index_sla_classes(DEFAULT_SLA_CLASSES)
        self.classes_for = classes or (lambda _model: defaults)
        self.config = config or AdmissionConfig()
        self.clock = clock
        self.expire_interval_s = expire_interval_s
        self.metrics = metrics
        self.replicas = replicas
        self.peer_demand = peer_demand
        self.demand = DemandMeter()
        """What this replica's clients ask of each quota-limited (model, tenant)."""
        self._shares: dict[tuple[str, str], tuple[float, object, TenantLimits]] = {}
        """(model, tenant) -> (valid until, the quotas it was made from, this replica's part)"""
        self._controllers: dict[str, AdmissionController] = {}
        self._class_tables: dict[str, Mapping[str, SlaClass]] = {}
        self._running: dict[str, int] = {}
        self._waiting: dict[str, tuple[str, asyncio.Future[Admitted]]] = {}
        self._depths: dict[str, tuple[tuple[str, int], ...]] = {}
        """model -> the queue depths its gauges were last set to (``_hand_out``)."""

    # -- who --------------------------------------------------------------------------------------

    def tenant(self, api_key: str) -> Tenant:
        tenant = self.tenants.authenticate(api_key) if api_key else None
        if tenant is None:
            raise Unauthenticated(
                "invalid or missing API key: send `Authorization: Bearer sb-...`"
                if api_key
                else "missing API key: send `Authorization: Bearer sb-...`"
            )
        return tenant

    def visible_models(self, api_key: str, models: list[str]) -> list[str]:
        tenant = self.tenant(api_key)
        return [m for m in models if tenant_allows_model(tenant, m)]

    # -- when -------------------------------------------------------------------------------------

    def _controller(self, model: str) -> AdmissionController:
        """The model's admission controller, on the model's current classes (a deployment's
        class change reconfigures it in place: see ``AdmissionController.reconfigure``)."""
        classes = self.classes_for(model)
        ctl = self._controllers.get(model)
        if ctl is None:
            ctl = AdmissionController(self.config, tuple(classes.values()))
            self._controllers[model] = ctl
            self._class_tables[model] = classes
        elif self._class_tables.get(model) is not classes:
            self._class_tables[model] = classes
            for rejected in ctl.reconfigure(tuple(classes.values()), self.clock()):
                self._reject_waiter(rejected)
        return ctl

    @staticmethod
    def _unknown_class(name: str, classes: Mapping[str, SlaClass]) -> InvalidArgument:
        known = ", ".join(sorted(classes))
        return InvalidArgument(f"unknown SLA class {name[:70]!r} (known: {known})")

    def _free(self, model: str) -> int:
        return max(0, self.capacity(model) - self._running.get(model, 0))

    async def admit(self, ctx: RequestContext) -> AdmissionTicket:
        tenant = self.tenant(ctx.api_key)
        if not tenant_allows_model(tenant, ctx.model):
            raise model_hidden(ctx.model)
        ctl = self._controller(ctx.model)
        classes = ctl.classes
        if ctx.sla_class and ctx.sla_class not in classes:  # 400 before 403
            raise self._unknown_class(ctx.sla_class, classes)
        sla = resolve_sla_class(tenant, ctx.sla_class or None)
        if sla not in classes:  # the tenant's default, which this model's deployment lacks
            sla = _fallback_class(tenant, classes)
        now = self.clock()
        request = AdmissionRequest(
            request_id=ctx.request_id,
            tenant=tenant.name,
            limits=self._limits(ctx, tenant, ctl, now),
            sla_class=sla,
            est_prompt_tokens=ctx.prompt_tokens,
            est_output_tokens=ctx.max_tokens,
        )
        outcome = ctl.submit(request, now, self._free(ctx.model) > 0)
        ticket = AdmissionTicket(
            request_id=ctx.request_id,
            tenant_id=tenant.name,
            sla_class=sla,
            priority=classes[sla].priority,
        )
        if isinstance(outcome, Admitted):
            self._running[ctx.model] = self._running.get(ctx.model, 0) + 1
            if self.metrics is not None:
                self._queue_wait(ctx.model, outcome)
            return ticket
        if isinstance(outcome, Rejected):
            raise self._rejected(ctx.model, outcome)
        assert isinstance(outcome, Queued)
        if self.metrics is not None:
            t = self.metrics.tenant_label(tenant.name)
            self.metrics.child(self.metrics.admission_queued, t, ctx.model, sla).inc()
        if outcome.evicted is not None:
            self._reject_waiter(outcome.evicted)
        future: asyncio.Future[Admitted] = asyncio.get_running_loop().create_future()
        self._waiting[ctx.request_id] = (ctx.model, future)
        self._hand_out(ctx.model)  # a slot may be free already
        try:
            admitted = await future
        except asyncio.CancelledError:  # the client went away while queued
            self._waiting.pop(ctx.request_id, None)
            if ctl.is_queued(ctx.request_id):
                ctl.cancel(ctx.request_id, self.clock())
            elif ctl.is_admitted(ctx.request_id):
                self._finish(ctx.model, ctx.request_id, 0)
            raise
        if self.metrics is not None:
            self._queue_wait(ctx.model, admitted)
        return ticket

    def _limits(
        self, ctx: RequestContext, tenant: Tenant, ctl: AdmissionController, now: float
    ) -> QuotaLike:
        """This replica's part of the tenant's quotas: all of them alone; with peers'
        demands, the demand-weighted part (controlplane/core/quota_shares.py, refreshed every
        ``SHARE_REFRESH_S``); without, the even part."""
        quotas = tenant.quotas
        if not (quotas.requests_per_minute or quotas.tokens_per_minute or quotas.max_concurrent):
            return quotas
        key = (ctx.model, tenant.name)
        self.demand.ask(key, ctx.prompt_tokens + ctx.max_tokens, now)
        if self.peer_demand is None:
            n = self.replicas()
            return quotas if n <= 1 else quota_share(quotas, n)
        hit = self._shares.get(key)
        if hit is not None and hit[0] > now and hit[1] is quotas:
            return hit[2]
        others, n = self.peer_demand(ctx.model, tenant.name)
        if n <= 1 and not others:
            limits = TenantLimits(
                quotas.requests_per_minute, quotas.tokens_per_minute, quotas.max_concurrent
            )
        else:
            rpm, tpm = self.demand.rate(key, now)
            mine = TenantDemand(rpm, tpm, float(ctl.tenant_load(tenant.name) + 1))
            limits = demand_share(quotas, mine, others, n)
        self._shares[key] = (now + SHARE_REFRESH_S, quotas, limits)
        if hit is None or hit[2] != limits:
            self._show_share(ctx.model, tenant.name, limits)
        return limits

    def _show_share(self, model: str, tenant: str, limits: TenantLimits) -> None:
        m = self.metrics
        if m is None or (label := m.tenant_label(tenant)) == OTHER_TENANT:
            return
        for quota in ("requests_per_minute", "tokens_per_minute", "max_concurrent"):
            m.child(m.quota_share, label, model, quota).set(getattr(limits, quota))

    def demands(self) -> tuple[tuple[str, str, float, float, float], ...]:
        """What this replica's clients ask of each quota-limited (model, tenant) now: (model,
        tenant, requests/min, tokens/min, requests in flight or queued), for its record."""
        rates = self.demand.rates(self.clock())
        out = []
        for key in rates.keys() | self._shares.keys():
            model, tenant = key
            ctl = self._controllers.get(model)
            load = 0 if ctl is None else ctl.tenant_load(tenant)
            rpm, tpm = rates.get(key, (0.0, 0.0))
            if key not in rates and not load:
                continue  # quiet, and nothing in flight: nothing to publish
            # two significant digits: close enough to share by, and the record (rewritten
            # only when it changes) is not rewritten every second for a steady load
            out.append((model, tenant, float(f"{rpm:.2g}"), float(f"{tpm:.2g}"), float(load)))
        return tuple(sorted(out))

    def _queue_wait(self, model: str, admitted: Admitted) -> None:
        assert self.metrics is not None
        t = self.metrics.tenant_label(admitted.tenant)
        self.metrics.child(self.metrics.queue_wait, t, model, admitted.sla_class).observe(
            admitted.queued_s
        )

    def _rejected(self, model: str, r: Rejected) -> RateLimited:
        """The error for a rejection, counted (``switchboard_admission_rejected_total``):
        ``Overloaded`` (503) where the core says overload, else ``RateLimited`` (429)."""
        if self.metrics is not None:
            t = self.metrics.tenant_label(r.tenant)
            self.metrics.child(
                self.metrics.admission_rejected, t, model, r.sla_class, r.reason.value
            ).inc()
        retry = r.retry_after_s if r.retry_after_s is not None else 0.0
        error = Overloaded if r.status == 503 else RateLimited
        return error(
            f"{r.reason.value}: {r.message}",
            retry_after_s=retry,
            tenant=r.tenant,
            sla_class=r.sla_class,
            reason=r.reason.value,
        )

    def release(self, ticket: AdmissionTicket, tokens_served: int) -> None:
        for model, ctl in self._controllers.items():
            if ctl.is_admitted(ticket.request_id):
                self._finish(model, ticket.request_id, tokens_served)
                return

    def _finish(self, model: str, request_id: str, tokens: int) -> None:
        ctl = self._controllers[model]
        if ctl.finish(request_id, self.clock(), output_tokens=tokens):
            self._running[model] = max(0, self._running.get(model, 0) - 1)
        self._hand_out(model)

    def _hand_out(self, model: str) -> None:
        ctl = self._controllers.get(model)
        if ctl is None:
            return
        # nothing queued: nothing to expire or admit (and no capacity to work out)
        free = self._free(model) if ctl.queued else 0
        for outcome in ctl.on_capacity(self.clock(), free) if free > 0 else ():
            if isinstance(outcome, Admitted):
                waiter = self._waiting.pop(outcome.request_id, None)
                if waiter is None or waiter[1].done():  # its client left: give the slot back
                    ctl.finish(outcome.request_id, self.clock(), output_tokens=0)
                    continue
                self._running[model] = self._running.get(model, 0) + 1
                waiter[1].set_result(outcome)
            else:
                self._reject_waiter(outcome)
        if self.metrics is not None:  # also refreshed by ``run`` every expire_interval_s
            depths = ctl.queue_depths()
            if self._depths.get(model) != depths:  # else every gauge has its value already
                self._depths[model] = depths
                for name, queued in depths:
                    self.metrics.child(self.metrics.queue_depth, model, name).set(queued)

    def _reject_waiter(self, rejected: Rejected) -> None:
        waiter = self._waiting.pop(rejected.request_id, None)
        if waiter is not None and not waiter[1].done():
            waiter[1].set_exception(self._rejected(waiter[0], rejected))

    async def run(self) -> None:
        """Expire overdue queued requests (and admit what fits) until cancelled."""
        while True:
            await asyncio.sleep(self.expire_interval_s)
            now = self.clock()
            for model, ctl in list(self._controllers.items()):
                for rejected in ctl.expire(now):
                    self._reject_waiter(rejected)
                self._hand_out(model)

    def stats(self) -> dict[str, object]:
        return {model: ctl.stats() for model, ctl in self._controllers.items()}
