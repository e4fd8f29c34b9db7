"""Switchboard's own error types.

Adapters translate foreign errors (grpc, etcd, ray) into these once, at the boundary; the gRPC
and HTTP shells turn them into status codes from one table (see adapters/grpc/errors.py).
"""

from __future__ import annotations


class SwitchboardError(Exception):
    """Base of every error Switchboard raises on purpose."""


class InvalidArgument(SwitchboardError):
    """The caller sent something malformed; retrying the same request cannot succeed."""


class NotFound(SwitchboardError):
    """The named object does not exist (or no longer does)."""


class AlreadyExists(SwitchboardError):
    """An object with that identity exists already."""


class Conflict(SwitchboardError):
    """An optimistic-concurrency check failed: read again and retry."""


class FailedPrecondition(SwitchboardError):
    """The system is not in a state where the operation is allowed."""


class Unauthenticated(SwitchboardError):
    """The caller's credentials (e.g. an API key) are missing or invalid."""


class PermissionDenied(SwitchboardError):
    """The caller is known but not allowed to do this (a model or SLA class not granted)."""


class Unavailable(SwitchboardError):
    """A dependency (etcd, a worker) cannot be reached right now; retrying may succeed."""


class NotLeader(Unavailable):
    """This control-plane replica is not the leader; ask the leader."""
