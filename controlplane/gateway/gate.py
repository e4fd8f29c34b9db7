"""The one seam for tenants, quotas and admission: ``RequestGate``.

The gateway calls ``admit`` once per generation request, after the body is parsed and tokenized
(so the prompt size is known) and before any worker is chosen, and ``release`` exactly once when
the request ends (finished, failed or the client went away) with the tokens it served. A gate
rejects by raising ``Unauthenticated`` / ``PermissionDenied`` / ``RateLimited``
(controlplane/gateway/errors.py): 401 / 403 / 429 over HTTP, UNAUTHENTICATED /
PERMISSION_DENIED / RESOURCE_EXHAUSTED over gRPC. ``admit`` may also wait (a fair queue) and
is cancelled if the client goes away.

``AllowAll`` admits everything; the tenant cache (``TenantCache.authenticate``) and the
admission core plug in here later, in the composition root (controlplane/gateway/main.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class RequestContext:
    """What the gate knows about a request."""

    request_id: str
    model: str
    api_key: str
    """The bearer token ("" when none was sent)."""
    route: str
    """"/v1/chat/completions", "/v1/completions" or "grpc:Generate"."""
    prompt_tokens: int
    max_tokens: int
    sla_class: str = ""
    """Requested SLA class ("" = the tenant's default)."""


@dataclass(frozen=True, slots=True)
class AdmissionTicket:
    """Proof of admission, handed back to ``release``."""

    request_id: str
    tenant_id: str = ""
    sla_class: str = ""
    priority: int = 0


class RequestGate(Protocol):
    def visible_models(self, api_key: str, models: list[str]) -> list[str]:
        """The models this caller may see and use (raise Unauthenticated for a bad key)."""
        ...

    async def admit(self, ctx: RequestContext) -> AdmissionTicket:
        """Admit ``ctx`` or raise a gate error (401 / 403 / 429)."""
        ...

    def release(self, ticket: AdmissionTicket, tokens_served: int) -> None:
        """The request ended after serving ``tokens_served`` completion tokens."""
        ...


class AllowAll:
    """Admits every request; no tenants, no quotas."""

    def visible_models(self, api_key: str, models: list[str]) -> list[str]:
        return models

    async def admit(self, ctx: RequestContext) -> AdmissionTicket:
        return AdmissionTicket(request_id=ctx.request_id, sla_class=ctx.sla_class)

    def release(self, ticket: AdmissionTicket, tokens_served: int) -> None:
        return None
