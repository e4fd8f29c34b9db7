"""A small typed facade over aetcd, with etcd's errors translated once into ours.

aetcd is untyped and maps only some gRPC codes; everything above this module sees
``KeyValue`` / ``WatchEvent`` dataclasses and Switchboard errors:

- connection refused, deadline exceeded, etcd leader lost  -> ``Unavailable``
- "requested lease not found"                              -> ``LeaseNotFound``
- anything else etcd rejects                               -> ``EtcdError``

The gRPC channel is tuned to reconnect quickly (initial backoff 100 ms, capped at 1 s) so a
restarted etcd is found again within a second instead of gRPC's default two minutes.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, ParamSpec, TypeVar

import aetcd
import aetcd.exceptions
import grpc

from controlplane.errors import NotFound, SwitchboardError, Unavailable

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 256 * 1024 * 1024

P = ParamSpec("P")
T = TypeVar("T")


class EtcdError(SwitchboardError):
    """etcd rejected a request for a reason other than availability."""


class LeaseNotFound(NotFound):
    """The lease expired or never existed (e.g. etcd lost its data): register again."""


@dataclass(frozen=True, slots=True)
class KeyValue:
    key: bytes
    value: bytes
    create_revision: int
    mod_revision: int
    lease: int


@dataclass(frozen=True, slots=True)
class WatchEvent:
    deleted: bool
    kv: KeyValue


def parse_endpoint(endpoint: str) -> tuple[str, int]:
    """``host:port`` or ``http://host:port`` -> (host, port)."""
    rest = endpoint.split("://", 1)[-1].rstrip("/")
    host, sep, port = rest.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"etcd endpoint {endpoint!r} is not host:port")
    return host, int(port)


def _translate(exc: BaseException) -> SwitchboardError:
    if isinstance(exc, SwitchboardError):
        return exc
    cause = exc.__cause__ if isinstance(exc.__cause__, grpc.aio.AioRpcError) else exc
    if isinstance(cause, grpc.aio.AioRpcError):
        code, details = cause.code(), cause.details() or ""
        if "lease not found" in details:
            return LeaseNotFound(details)
        if code in (
            grpc.StatusCode.UNAVAILABLE,
            grpc.StatusCode.DEADLINE_EXCEEDED,
            grpc.StatusCode.CANCELLED,
        ):
            return Unavailable(f"etcd unavailable: {details or code.name}")
        return EtcdError(f"etcd: {code.name}: {details}")
    if isinstance(
        exc,
        aetcd.exceptions.ConnectionFailedError
        | aetcd.exceptions.ConnectionTimeoutError
        | aetcd.exceptions.WatchTimeoutError
        | TimeoutError
        | OSError,
    ):
        return Unavailable(f"etcd unavailable: {exc}")
    if "lease not found" in str(exc):
        return LeaseNotFound(str(exc))
    if isinstance(exc, aetcd.exceptions.RevisionCompactedError):
        return EtcdError(f"etcd: {exc}")
    if isinstance(exc, aetcd.exceptions.ClientError):
        text = str(exc)
        if "leader" in text or "timed out" in text or "unavailable" in text.lower():
            return Unavailable(f"etcd unavailable: {text}")
        return EtcdError(f"etcd: {text}")
    return EtcdError(f"etcd: {type(exc).__name__}: {exc}")


_OPS = {
    "get": "get",
    "get_range": "get",
    "put": "put",
    "delete": "delete",
    "create": "txn",
    "put_if_revision": "txn",
    "delete_if_revision": "txn",
    "grant_lease": "lease",
    "keepalive_once": "lease",
    "revoke_lease": "lease",
}
"""Method -> the ``op`` label of ``switchboard_etcd_request_seconds``."""


def _translated(fn: Callable[P, Awaitable[T]]) -> Callable[P, Awaitable[T]]:
    op = _OPS.get(fn.__name__, fn.__name__)

    @functools.wraps(fn)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        observe: Callable[[str, float], None] | None = getattr(args[0], "observe", None)
        started = time.perf_counter() if observe is not None else 0.0
        try:
            return await fn(*args, **kwargs)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            raise _translate(exc) from exc
        finally:
            if observe is not None:
                observe(op, time.perf_counter() - started)

    return wrapper


def _kv(raw: Any) -> KeyValue:
    return KeyValue(
        key=bytes(raw.key),
        value=bytes(raw.value),
        create_revision=int(raw.create_revision),
        mod_revision=int(raw.mod_revision),
        lease=int(raw.lease),
    )


def prefix_range_end(prefix: bytes) -> bytes:
    """The smallest key greater than every key starting with ``prefix``."""
    end = bytearray(prefix)
    for i in range(len(end) - 1, -1, -1):
        if end[i] < 0xFF:
            end[i] += 1
            return bytes(end[: i + 1])
    return b"\0"


class EtcdClient:
    """Typed etcd operations used by Switchboard. One instance per process is enough.

    ``observe(op, seconds)``, when given, is called after every request (op: get, put,
    delete, txn, lease), e.g. ``ControlPlaneMetrics.etcd_request.labels(op).observe``."""

    def __init__(
        self,
        endpoint: str,
        *,
        timeout_s: float = 5.0,
        observe: Callable[[str, float], None] | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.observe = observe
        host, port = parse_endpoint(endpoint)
        self._client = aetcd.Client(
            host=host,
            port=port,
            timeout=timeout_s,
            options={
                "grpc.initial_reconnect_backoff_ms": 100,
                "grpc.min_reconnect_backoff_ms": 100,
                "grpc.max_reconnect_backoff_ms": 1000,
                # A full listing of 10k nodes is ~19 MB: far above gRPC's 4 MiB default.
                "grpc.max_receive_message_length": MAX_MESSAGE_BYTES,
                "grpc.keepalive_time_ms": 10_000,
                "grpc.keepalive_timeout_ms": 5_000,
            },
        )

    async def close(self) -> None:
        try:
            await self._client.close()
        except Exception as exc:  # closing must never fail the caller
            log.debug("closing etcd client: %s", exc)

    @_translated
    async def get(self, key: bytes) -> KeyValue | None:
        res = await self._client.get(key)
        return None if res is None else _kv(res)

    @_translated
    async def get_range(self, start: bytes, end: bytes) -> tuple[list[KeyValue], int]:
        """All keys in [start, end) and the revision the read saw."""
        res = await self._client.get_range(start, end)
        return [_kv(kv) for kv in res.kvs], int(res.header.revision)

    async def get_prefix(self, prefix: bytes) -> tuple[list[KeyValue], int]:
        return await self.get_range(prefix, prefix_range_end(prefix))

    @_translated
    async def put(self, key: bytes, value: bytes, *, lease: int = 0) -> int:
        """Write ``key``; returns the new revision. A dead lease raises LeaseNotFound."""
        res = await self._client.put(key, value, lease=lease or None)
        return int(res.header.revision)

    @_translated
    async def delete(self, key: bytes) -> int:
        res = await self._client.delete(key)
        return 0 if res is None else int(res.header.revision)

    @_translated
    async def create(self, key: bytes, value: bytes, *, lease: int = 0) -> tuple[bool, KeyValue]:
        """Create ``key`` only if absent. Returns (created, the key as it now is)."""
        tx = self._client.transactions
        ok, responses = await self._client.transaction(
            compare=[tx.create(key) == 0],
            success=[aetcd.transactions.Put(key, value, lease=lease or None)],
            failure=[aetcd.transactions.Get(key)],
        )
        if ok:
            current = await self._client.get(key)
            if current is None:  # deleted in between: report what we wrote
                return True, KeyValue(key, value, 0, 0, lease)
            return True, _kv(current)
        ranges = responses[0] if responses else []
        if not ranges:  # deleted between the compare and the read
            return False, KeyValue(key, b"", 0, 0, 0)
        return False, _kv(ranges[0][1])

    @_translated
    async def put_if_revision(self, key: bytes, value: bytes, mod_revision: int) -> int:
        """Write ``key`` only if its mod revision is ``mod_revision`` (0: only if absent).

        Returns the new revision, or 0 when the compare failed (someone else wrote it first).
        """
        tx = self._client.transactions
        compare = tx.create(key) == 0 if mod_revision == 0 else tx.mod(key) == mod_revision
        ok, responses = await self._client.transaction(
            compare=[compare], success=[aetcd.transactions.Put(key, value)], failure=[]
        )
        if not ok:
            return 0
        return int(responses[0].response_put.header.revision)  # the key's new mod revision

    @_translated
    async def delete_if_revision(self, key: bytes, mod_revision: int) -> bool:
        """Delete ``key`` only if its mod revision is ``mod_revision``; False if it was not."""
        tx = self._client.transactions
        ok, _ = await self._client.transaction(
            compare=[tx.mod(key) == mod_revision],
            success=[aetcd.transactions.Delete(key)],
            failure=[],
        )
        return bool(ok)

    @_translated
    async def grant_lease(self, ttl_s: int) -> int:
        return int((await self._client.lease(ttl_s)).id)

    async def put_with_new_lease(self, key: bytes, value: bytes, ttl_s: int) -> int:
        """Grant a lease and write ``key`` bound to it; returns the lease id.

        If the write fails, the lease is revoked (best effort) so that retries under load do not
        leave orphaned leases for etcd to expire through its log.
        """
        lease = await self.grant_lease(ttl_s)
        try:
            await self.put(key, value, lease=lease)
        except BaseException:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.revoke_lease(lease), 1.0)
            raise
        return lease

    @_translated
    async def keepalive_once(self, lease_id: int) -> int:
        """Refresh a lease; returns its TTL, or raises LeaseNotFound when it is gone."""
        reply = await self._client.refresh_lease(lease_id)
        ttl = int(reply.TTL) if reply is not None else 0
        if ttl <= 0:
            raise LeaseNotFound(f"lease {lease_id:x} not found (expired or etcd lost it)")
        return ttl

    @_translated
    async def revoke_lease(self, lease_id: int) -> None:
        await self._client.revoke_lease(lease_id)

    async def watch_range(
        self, start: bytes, end: bytes, *, start_revision: int
    ) -> AsyncIterator[WatchEvent]:
        """Events in [start, end) from ``start_revision`` (inclusive) until the stream breaks.

        The stream ending for any reason raises ``Unavailable`` (or ``EtcdError``): callers
        re-list and watch again (level-based), which also covers compaction and an etcd that
        came back with less history.
        """
        try:
            watch = await self._client.watch(start, range_end=end, start_revision=start_revision)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            raise _translate(exc) from exc
        try:
            async for ev in watch:
                yield WatchEvent(deleted=ev.kind == "DELETE", kv=_kv(ev.kv))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            raise _translate(exc) from exc
        finally:
            try:
                await asyncio.shield(watch.cancel())
            except Exception as exc:
                log.debug("cancelling etcd watch: %s", exc)
        raise Unavailable("etcd watch stream ended")
