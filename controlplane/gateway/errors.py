"""The gateway's own errors (what a ``RequestGate`` raises) and their HTTP / gRPC mappings.

A gate rejects with ``Unauthenticated`` (401 / UNAUTHENTICATED) or ``PermissionDenied``
(403 / PERMISSION_DENIED), both from controlplane/errors.py, or, defined here, ``RateLimited``
(429 / RESOURCE_EXHAUSTED, with ``Retry-After``: over the tenant's own limits) or its subclass
``Overloaded`` (503 / UNAVAILABLE, with ``Retry-After``: the fleet cannot take the request now,
whoever sent it).
Everything else goes through the shared tables (workers/openai_protocol.py for HTTP,
controlplane/adapters/grpc/errors.py for gRPC).
"""

from __future__ import annotations

import grpc

from controlplane.errors import PermissionDenied, SwitchboardError, Unauthenticated
from workers.openai_protocol import ERROR_TABLE, ErrorTable

__all__ = [
    "GATEWAY_ERROR_TABLE",
    "GATE_STATUS",
    "Overloaded",
    "PermissionDenied",
    "RateLimited",
    "Unauthenticated",
]


class RateLimited(SwitchboardError):
    """The tenant is over its quota; retry after ``retry_after_s``. ``tenant``, ``sla_class``
    and ``reason`` (the admission core's ``RejectReason`` value) say whose request was shed,
    for the metrics ("" when unknown)."""

    def __init__(
        self,
        message: str,
        retry_after_s: float = 1.0,
        *,
        tenant: str = "",
        sla_class: str = "",
        reason: str = "",
    ) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s
        self.tenant = tenant
        self.sla_class = sla_class
        self.reason = reason


class Overloaded(RateLimited):
    """Admission turned the request away for overload, not for the tenant's limits: its class's
    queue was full, it was shed for more important work, or it waited past its queue timeout
    or deadline (``reason``: ``queue_full`` / ``shed`` / ``queue_timeout`` /
    ``deadline_exceeded``). The admission core's ``Rejected.status`` says which is which."""


# Subclasses before their bases: the first match wins.
GATEWAY_ERROR_TABLE: ErrorTable = (
    (Unauthenticated, 401, "authentication_error"),
    (PermissionDenied, 403, "permission_error"),
    (Overloaded, 503, "service_unavailable_error"),
    (RateLimited, 429, "rate_limit_error"),
    *ERROR_TABLE,
)

GATE_STATUS: tuple[tuple[type[SwitchboardError], grpc.StatusCode], ...] = (
    (Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
    (Overloaded, grpc.StatusCode.UNAVAILABLE),
    (RateLimited, grpc.StatusCode.RESOURCE_EXHAUSTED),
)
