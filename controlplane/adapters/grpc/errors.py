"""The one table from Switchboard errors to gRPC status codes, and the wrappers that apply it.

Servicer methods raise domain errors; ``unary`` / ``server_stream`` turn them into a status
code with the error's message. Anything unexpected becomes INTERNAL with a short message (the
traceback goes to the log, never to the client), and the server keeps serving.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc

from controlplane.errors import (
    AlreadyExists,
    Conflict,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    NotLeader,
    PermissionDenied,
    SwitchboardError,
    Unauthenticated,
    Unavailable,
)

log = logging.getLogger(__name__)

# Order matters: the first matching class wins (subclasses before their bases).
STATUS_TABLE: tuple[tuple[type[SwitchboardError], grpc.StatusCode], ...] = (
    (InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (NotFound, grpc.StatusCode.NOT_FOUND),
    (AlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
    (Conflict, grpc.StatusCode.ABORTED),
    (FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
    (Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
    (NotLeader, grpc.StatusCode.UNAVAILABLE),
    (Unavailable, grpc.StatusCode.UNAVAILABLE),
)


def status_for(error: BaseException) -> grpc.StatusCode:
    for cls, code in STATUS_TABLE:
        if isinstance(error, cls):
            return code
    return grpc.StatusCode.INTERNAL


Req = TypeVar("Req")
Resp = TypeVar("Resp")
Self = TypeVar("Self")

UnaryMethod = Callable[[Self, Req, grpc.aio.ServicerContext[Any, Any]], Awaitable[Resp]]
StreamMethod = Callable[[Self, Req, grpc.aio.ServicerContext[Any, Any]], AsyncIterator[Resp]]


def error_status(exc: BaseException, name: str) -> tuple[grpc.StatusCode, str]:
    """The status code and message a client gets for ``exc`` raised by method ``name``
    (an unexpected error is logged with its traceback and named only by its type)."""
    code = status_for(exc)
    if code is grpc.StatusCode.INTERNAL:
        log.error("%s failed", name, exc_info=exc)
        return code, f"internal error in {name}: {type(exc).__name__}"
    return code, str(exc)


async def _abort(context: grpc.aio.ServicerContext[Any, Any], exc: Exception, name: str) -> None:
    await context.abort(*error_status(exc, name))


def unary(fn: UnaryMethod[Self, Req, Resp]) -> UnaryMethod[Self, Req, Resp]:
    @functools.wraps(fn)
    async def wrapper(
        self: Self, request: Req, context: grpc.aio.ServicerContext[Any, Any]
    ) -> Resp:
        try:
            return await fn(self, request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await _abort(context, exc, fn.__name__)
            raise  # unreachable: abort raises

    return wrapper


def server_stream(fn: StreamMethod[Self, Req, Resp]) -> StreamMethod[Self, Req, Resp]:
    @functools.wraps(fn)
    async def wrapper(
        self: Self, request: Req, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[Resp]:
        try:
            async for item in fn(self, request, context):
                yield item
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await _abort(context, exc, fn.__name__)

    return wrapper
