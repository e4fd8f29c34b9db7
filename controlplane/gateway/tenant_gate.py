"""TenantGate: the ``RequestGate`` of a multi-tenant gateway — who may ask, and when.

1. **Who**: the bearer token is looked up in the watch-fed ``TenantCache`` (no etcd on the
   request path); no or a wrong key is ``Unauthenticated`` (401). A model the tenant may not use
   is answered as if it did not exist (404, "does not exist or you do not have access to it", as
   OpenAI does), so tenants cannot probe each other's models; ``/v1/models`` lists only the
   tenant's. A requested SLA class (body ``sla_class`` or ``X-SLA-Class``) that does not exist
   is ``InvalidArgument`` (400), one the tenant may not use ``PermissionDenied`` (403).
2. **When**: one pure ``AdmissionController`` per model (controlplane/core/admission.py) applies
   the tenant's requests/min, tokens/min and max-concurrent quotas, and queues requests while
   the model's capacity is in use — by class priority, then fair share of tokens served between
   tenants (VTC), then deadline. Capacity is ``slots_per_worker`` times the model's serving
   workers that decode (decode or both). Rejections are ``RateLimited`` (429 with
   ``Retry-After`` where the core gives one; RESOURCE_EXHAUSTED over gRPC) with the reason.
   A client that leaves while queued is taken out of the queue; ``release`` charges the tokens
   actually served and hands freed slots to the queue. ``run`` expires overdue queued requests
   every ``expire_interval_s``. With ``metrics``: requests that had to queue, per model,
   tenant and class, and the queue depth per model.
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
    Rejected,
)
from controlplane.core.sla import DEFAULT_SLA_CLASSES, SlaClass
from controlplane.core.tenants import Tenant, resolve_sla_class, tenant_allows_model
from controlplane.errors import InvalidArgument, NotFound, Unauthenticated
from controlplane.gateway.errors import RateLimited
from controlplane.gateway.gate import AdmissionTicket, RequestContext
from controlplane.gateway.metrics import GatewayMetrics


class TenantLookup(Protocol):
    def authenticate(self, api_key: str) -> Tenant | None: ...


def model_hidden(model: str) -> NotFound:
    return NotFound(f"The model {model!r} does not exist or you do not have access to it.")


class TenantGate:
    def __init__(
        self,
        tenants: TenantLookup,
        capacity: Callable[[str], int],
        *,
        classes: Mapping[str, SlaClass] | None = None,
        config: AdmissionConfig | None = None,
        clock: Callable[[], float] = time.monotonic,
        expire_interval_s: float = 0.1,
        metrics: GatewayMetrics | None = None,
    ) -> None:
        self.tenants = tenants
        self.capacity = capacity
        self.classes = dict(classes or {c.name: c for c in DEFAULT_SLA_CLASSES})
        self.config = config or AdmissionConfig()
        self.clock = clock
        self.expire_interval_s = expire_interval_s
        self.metrics = metrics
        self._controllers: dict[str, AdmissionController] = {}
        self._running: dict[str, int] = {}
        self._waiting: dict[str, tuple[str, asyncio.Future[Admitted]]] = {}

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
        ctl = self._controllers.get(model)
        if ctl is None:
            ctl = AdmissionController(self.config, tuple(self.classes.values()))
            self._controllers[model] = ctl
        return ctl

    def _unknown_class(self, name: str) -> InvalidArgument:
        known = ", ".join(sorted(self.classes))
        return InvalidArgument(f"unknown SLA class {name[:70]!r} (known: {known})")

    def _free(self, model: str) -> int:
        return max(0, self.capacity(model) - self._running.get(model, 0))

    async def admit(self, ctx: RequestContext) -> AdmissionTicket:
        tenant = self.tenant(ctx.api_key)
        if not tenant_allows_model(tenant, ctx.model):
            raise model_hidden(ctx.model)
        if ctx.sla_class and ctx.sla_class not in self.classes:  # 400 before 403
            raise self._unknown_class(ctx.sla_class)
        sla = resolve_sla_class(tenant, ctx.sla_class or None)
        if sla not in self.classes:  # the tenant's default
            raise self._unknown_class(sla)
        ctl = self._controller(ctx.model)
        now = self.clock()
        request = AdmissionRequest(
            request_id=ctx.request_id,
            tenant=tenant.name,
            limits=tenant.quotas,
            sla_class=sla,
            est_prompt_tokens=ctx.prompt_tokens,
            est_output_tokens=ctx.max_tokens,
        )
        outcome = ctl.submit(request, now, self._free(ctx.model) > 0)
        ticket = AdmissionTicket(
            request_id=ctx.request_id,
            tenant_id=tenant.name,
            sla_class=sla,
            priority=self.classes[sla].priority,
        )
        if isinstance(outcome, Admitted):
            self._running[ctx.model] = self._running.get(ctx.model, 0) + 1
            return ticket
        if isinstance(outcome, Rejected):
            raise _rate_limited(outcome)
        assert isinstance(outcome, Queued)
        if self.metrics is not None:
            self.metrics.admission_queued.labels(ctx.model, tenant.name, sla).inc()
        if outcome.evicted is not None:
            self._reject_waiter(outcome.evicted)
        future: asyncio.Future[Admitted] = asyncio.get_running_loop().create_future()
        self._waiting[ctx.request_id] = (ctx.model, future)
        self._hand_out(ctx.model)  # a slot may be free already
        try:
            await future
        except asyncio.CancelledError:  # the client went away while queued
            self._waiting.pop(ctx.request_id, None)
            if ctl.is_queued(ctx.request_id):
                ctl.cancel(ctx.request_id, self.clock())
            elif ctl.is_admitted(ctx.request_id):
                self._finish(ctx.model, ctx.request_id, 0)
            raise
        return ticket

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
        free = self._free(model)
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
            self.metrics.admission_queue_depth.labels(model).set(ctl.stats().queued)

    def _reject_waiter(self, rejected: Rejected) -> None:
        waiter = self._waiting.pop(rejected.request_id, None)
        if waiter is not None and not waiter[1].done():
            waiter[1].set_exception(_rate_limited(rejected))

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


def _rate_limited(r: Rejected) -> RateLimited:
    retry = r.retry_after_s if r.retry_after_s is not None else 0.0
    return RateLimited(f"{r.reason.value}: {r.message}", retry_after_s=retry)
