"""The gateway's own errors (what a ``RequestGate`` raises) and their HTTP / gRPC mappings.

A gate rejects with ``Unauthenticated`` (401 / UNAUTHENTICATED) or ``PermissionDenied``
(403 / PERMISSION_DENIED), both from controlplane/errors.py, or ``RateLimited`` (429 /
RESOURCE_EXHAUSTED, with ``Retry-After``), defined here.
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


GATEWAY_ERROR_TABLE: ErrorTable = (
    (Unauthenticated, 401, "authentication_error"),
    (PermissionDenied, 403, "permission_error"),
    (RateLimited, 429, "rate_limit_error"),
    *ERROR_TABLE,
)

GATE_STATUS: tuple[tuple[type[SwitchboardError], grpc.StatusCode], ...] = (
    (Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
    (RateLimited, grpc.StatusCode.RESOURCE_EXHAUSTED),
)
