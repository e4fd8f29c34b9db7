"""Tenants in etcd (``EtcdTenantStore``) and the gateway's in-memory view of them (``TenantCache``).

Key layout: ``{prefix}/tenants/<name>`` — JSON, not leased, e.g.::

    {"v": 1, "name": "acme", "allowed_models": ["*"], "sla_classes": [],
     "default_sla_class": "standard",
     "quotas": {"requests_per_minute": 600, "tokens_per_minute": 0, "max_concurrent": 8},
     "keys": [{"key_id": "3f9a0c1d2e4b", "sha256": "<hex>", "created_at": t, "expires_at": 0}],
     "created_at": t}

Only SHA-256 hashes of key secrets are stored; the plaintext key is returned once, by
``create`` and ``rotate_key`` (``IssuedKey.api_key``), and never logged. Every write is a
compare-and-swap on the key's mod revision (``put_if_revision``), which is the tenant's
``resource_version``.

Rotation: ``rotate_key(name, grace_s=0)`` adds a new key and removes the old ones at once;
with ``grace_s > 0`` the old keys stay valid until ``now + grace_s`` (then they are dropped at
the next rotation, and rejected by ``authenticate`` meanwhile).

``TenantCache`` is the request path's view: list + watch of ``{prefix}/tenants/`` (the same
level-based loop as ``NodeCache``: re-list on any watch failure), holding ``key_id -> tenant``
so that ``authenticate(api_key)`` is a dict lookup and one SHA-256, never an etcd call.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from controlplane.adapters.etcd.client import EtcdClient, prefix_range_end
from controlplane.adapters.etcd.listwatch import list_and_watch
from controlplane.core import tenants as core
from controlplane.core.tenants import IssuedKey, KeyRecord, Quotas, Tenant
from controlplane.errors import (
    AlreadyExists,
    Conflict,
    InvalidArgument,
    NotFound,
)

log = logging.getLogger(__name__)

DEFAULT_PREFIX = "/switchboard/v1"
RECORD_VERSION = 1
_CAS_ATTEMPTS = 5


def new_key_id() -> str:
    """12 lowercase hex digits: public, printable, 48 bits (collisions are negligible)."""
    return secrets.token_hex(6)


def new_secret() -> str:
    return secrets.token_urlsafe(32)


def encode_tenant(t: Tenant) -> bytes:
    doc: dict[str, Any] = {
        "v": RECORD_VERSION,
        "name": t.name,
        "allowed_models": list(t.allowed_models),
        "sla_classes": list(t.sla_classes),
        "default_sla_class": t.default_sla_class,
        "quotas": {
            "requests_per_minute": t.quotas.requests_per_minute,
            "tokens_per_minute": t.quotas.tokens_per_minute,
            "max_concurrent": t.quotas.max_concurrent,
        },
        "keys": [
            {
                "key_id": k.key_id,
                "sha256": k.sha256,
                "created_at": k.created_at,
                "expires_at": k.expires_at,
            }
            for k in t.key_hashes
        ],
        "created_at": t.created_at,
    }
    return json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()


def decode_tenant(raw: bytes, resource_version: int = 0) -> Tenant:
    """Parse and validate a stored tenant; InvalidArgument when it is malformed."""
    try:
        d = json.loads(raw)
        q = d.get("quotas", {})
        tenant = Tenant(
            name=str(d["name"]),
            allowed_models=tuple(str(m) for m in d["allowed_models"]),
            sla_classes=tuple(str(c) for c in d.get("sla_classes", ())),
            default_sla_class=str(d.get("default_sla_class", core.DEFAULT_SLA_CLASS)),
            quotas=Quotas(
                requests_per_minute=int(q.get("requests_per_minute", 0)),
                tokens_per_minute=int(q.get("tokens_per_minute", 0)),
                max_concurrent=int(q.get("max_concurrent", 0)),
            ),
            key_hashes=tuple(
                KeyRecord(
                    key_id=str(k["key_id"]),
                    sha256=str(k["sha256"]),
                    created_at=float(k.get("created_at", 0.0)),
                    expires_at=float(k.get("expires_at", 0.0)),
                )
                for k in d.get("keys", ())
            ),
            created_at=float(d.get("created_at", 0.0)),
            resource_version=resource_version,
        )
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise InvalidArgument(f"malformed tenant record: {type(e).__name__}: {e}") from None
    return core.validate_tenant(tenant)


@dataclass(frozen=True, slots=True)
class TenantEvent:
    """One change seen by the watch: ``tenant`` is None when ``name`` was deleted (or its record
    is unreadable, which the cache treats the same: that tenant cannot authenticate)."""

    name: str
    tenant: Tenant | None
    revision: int


class EtcdTenantStore:
    """Create, read, rotate and delete tenants in etcd. Writes are CAS on ``resource_version``."""

    def __init__(
        self,
        client: EtcdClient,
        prefix: str = DEFAULT_PREFIX,
        *,
        clock: Callable[[], float] = time.time,
        make_key_id: Callable[[], str] = new_key_id,
        make_secret: Callable[[], str] = new_secret,
    ) -> None:
        self.client = client
        self.prefix = f"{prefix.rstrip('/')}/tenants/"
        self._clock = clock
        self._make_key_id = make_key_id
        self._make_secret = make_secret

    def _key(self, name: str) -> bytes:
        return (self.prefix + name).encode()

    def _new_key(self) -> tuple[KeyRecord, str]:
        return core.make_key(self._make_key_id(), self._make_secret(), self._clock())

    async def create(self, tenant: Tenant) -> IssuedKey:
        """Store a new tenant with one fresh key; AlreadyExists if the name is taken.

        ``tenant.key_hashes`` must be empty and ``created_at`` is set here. The returned
        ``IssuedKey.api_key`` is the only time the key's plaintext is available.
        """
        if tenant.key_hashes:
            raise InvalidArgument("tenant.key_hashes must be empty on create: keys are made here")
        record, api_key = self._new_key()
        stored = core.validate_tenant(
            dataclasses.replace(tenant, key_hashes=(record,), created_at=self._clock())
        )
        revision = await self.client.put_if_revision(
            self._key(stored.name), encode_tenant(stored), 0
        )
        if not revision:
            raise AlreadyExists(f"tenant {stored.name!r} already exists")
        log.info("tenant %s created (key id %s)", stored.name, record.key_id)
        return IssuedKey(
            dataclasses.replace(stored, resource_version=revision), record.key_id, api_key
        )

    async def get(self, name: str) -> Tenant:
        core.validate_tenant_name(name)
        kv = await self.client.get(self._key(name))
        if kv is None:
            raise NotFound(f"tenant {name!r} not found")
        return decode_tenant(kv.value, kv.mod_revision)

    async def list_all(self) -> list[Tenant]:
        """Every tenant, by name; unreadable records are skipped with a warning."""
        tenants, _ = await self.snapshot()
        return tenants

    async def update(self, tenant: Tenant) -> Tenant:
        """Replace a stored tenant read at ``tenant.resource_version`` (Conflict if it changed).

        Writes ``tenant`` as given, keys included: read it with ``get``, change it with
        ``dataclasses.replace``, write it back.
        """
        if not tenant.resource_version:
            raise InvalidArgument("update needs the resource_version the tenant was read at")
        core.validate_tenant(tenant)
        revision = await self.client.put_if_revision(
            self._key(tenant.name), encode_tenant(tenant), tenant.resource_version
        )
        if not revision:
            raise Conflict(
                f"tenant {tenant.name!r} changed since resource_version "
                f"{tenant.resource_version} (or was deleted); get it and retry"
            )
        return dataclasses.replace(tenant, resource_version=revision)

    async def rotate_key(self, name: str, *, grace_s: float = 0.0) -> IssuedKey:
        """Give ``name`` a new key. Old keys are removed (``grace_s == 0``, the default) or stay
        valid for ``grace_s`` seconds. Retries by itself when a concurrent write intervenes."""
        for _ in range(_CAS_ATTEMPTS):
            current = await self.get(name)
            record, api_key = self._new_key()
            rotated = core.with_new_key(current, record, now=self._clock(), grace_s=grace_s)
            try:
                stored = await self.update(rotated)
            except Conflict:
                continue
            log.info(
                "tenant %s: key rotated (new key id %s, old keys %s)",
                name,
                record.key_id,
                f"valid for {grace_s:g}s more" if grace_s > 0 else "removed",
            )
            return IssuedKey(stored, record.key_id, api_key)
        raise Conflict(f"tenant {name!r} is being changed concurrently; retry")

    async def delete(self, name: str, *, resource_version: int = 0) -> None:
        """Delete ``name`` (NotFound if absent; Conflict if ``resource_version`` is given and
        stale, or it changed while deleting)."""
        core.validate_tenant_name(name)
        kv = await self.client.get(self._key(name))
        if kv is None:
            raise NotFound(f"tenant {name!r} not found")
        if resource_version and kv.mod_revision != resource_version:
            raise Conflict(f"tenant {name!r} changed since resource_version {resource_version}")
        if not await self.client.delete_if_revision(self._key(name), kv.mod_revision):
            raise Conflict(f"tenant {name!r} changed while deleting; retry")
        log.info("tenant %s deleted", name)

    # --- for TenantCache ---------------------------------------------------------------------

    async def snapshot(self) -> tuple[list[Tenant], int]:
        """Every readable tenant and the revision the read saw."""
        kvs, revision = await self.client.get_prefix(self.prefix.encode())
        tenants: list[Tenant] = []
        for kv in kvs:
            tenant = self._decode_or_none(kv.key, kv.value, kv.mod_revision)
            if tenant is not None:
                tenants.append(tenant)
        return sorted(tenants, key=lambda t: t.name), revision

    async def watch(self, start_revision: int) -> AsyncIterator[TenantEvent]:
        """Changes from ``start_revision`` until the stream breaks (then it raises)."""
        start = self.prefix.encode()
        async for ev in self.client.watch_range(
            start, prefix_range_end(start), start_revision=start_revision
        ):
            name = ev.kv.key.decode(errors="replace")[len(self.prefix) :]
            tenant = (
                None
                if ev.deleted
                else self._decode_or_none(ev.kv.key, ev.kv.value, ev.kv.mod_revision)
            )
            yield TenantEvent(name, tenant, ev.kv.mod_revision)

    def _decode_or_none(self, key: bytes, value: bytes, revision: int) -> Tenant | None:
        name = key.decode(errors="replace")[len(self.prefix) :]
        try:
            tenant = decode_tenant(value, revision)
        except InvalidArgument as e:
            log.warning("ignoring tenant record %s: %s", name, e)
            return None
        if tenant.name != name:
            log.warning("ignoring tenant record %s: it names tenant %r", name, tenant.name)
            return None
        return tenant


class TenantCache:
    """The watch-fed, in-memory tenants: ``authenticate`` and ``get`` never touch etcd.

    Run ``run()`` as a task; until ``ever_synced`` is set the cache is empty and every key is
    rejected, so a gateway should wait for it (or answer 503) before serving. ``synced`` is set
    while the watch is live; after a watch failure the cache keeps serving its last view and
    re-lists with backoff.
    """

    def __init__(
        self,
        store: EtcdTenantStore,
        *,
        clock: Callable[[], float] = time.time,
        backoff_initial_s: float = 0.1,
        backoff_max_s: float = 2.0,
    ) -> None:
        self._store = store
        self._clock = clock
        self._backoff = (backoff_initial_s, backoff_max_s)
        self._tenants: dict[str, Tenant] = {}
        self._by_key_id: dict[str, Tenant] = {}
        self._revision = 0
        self._revision_changed = asyncio.Condition()
        self.synced = asyncio.Event()
        self.ever_synced = asyncio.Event()

    # --- reads (request path) ------------------------------------------------------------------

    def authenticate(self, api_key: str) -> Tenant | None:
        """The tenant whose key ``api_key`` is, or None (malformed, unknown, revoked, expired).

        A dict lookup plus one SHA-256 and a constant-time compare; logs nothing.
        """
        return core.authenticate(self._by_key_id, api_key, self._clock())

    def get(self, name: str) -> Tenant | None:
        return self._tenants.get(name)

    def list_tenants(self) -> list[Tenant]:
        return sorted(self._tenants.values(), key=lambda t: t.name)

    def __len__(self) -> int:
        return len(self._tenants)

    @property
    def revision(self) -> int:
        return self._revision

    async def wait_for_revision(self, revision: int, timeout_s: float = 5.0) -> bool:
        """Wait until the cache has seen ``revision`` (e.g. ``tenant.resource_version`` after a
        write); False on timeout."""
        async with self._revision_changed:
            try:
                await asyncio.wait_for(
                    self._revision_changed.wait_for(lambda: self._revision >= revision),
                    timeout_s,
                )
            except TimeoutError:
                return False
        return True

    # --- the loop ------------------------------------------------------------------------------

    async def run(self) -> None:
        """List + watch forever; never returns except by cancellation."""

        async def relist() -> int:
            tenants, revision = await self._store.snapshot()
            self._replace(tenants, revision)
            await self._notify()
            log.info("tenant cache: %d tenants", len(self))
            return revision

        async def apply(ev: TenantEvent) -> None:
            self._apply(ev)
            await self._notify()

        await list_and_watch(
            "tenant",
            relist,
            self._store.watch,
            apply,
            synced=self.synced,
            ever_synced=self.ever_synced,
            backoff_s=self._backoff,
        )

    def _replace(self, tenants: list[Tenant], revision: int) -> None:
        self._tenants = {t.name: t for t in tenants}
        index: dict[str, Tenant] = {}
        for t in tenants:
            self._index_into(index, t)
        self._by_key_id = index
        self._revision = revision

    def _apply(self, ev: TenantEvent) -> None:
        old = self._tenants.pop(ev.name, None)
        if old is not None:
            for key_id in old.key_ids:
                if (owner := self._by_key_id.get(key_id)) is not None and owner.name == ev.name:
                    del self._by_key_id[key_id]
        if ev.tenant is not None:
            self._tenants[ev.name] = ev.tenant
            self._index_into(self._by_key_id, ev.tenant)
        self._revision = max(self._revision, ev.revision)

    @staticmethod
    def _index_into(index: dict[str, Tenant], tenant: Tenant) -> None:
        for key_id in tenant.key_ids:
            owner = index.get(key_id)
            if owner is not None and owner.name != tenant.name:
                log.warning(
                    "key id %s is claimed by tenants %s and %s; keeping %s",
                    key_id,
                    owner.name,
                    tenant.name,
                    owner.name,
                )
                continue
            index[key_id] = tenant

    async def _notify(self) -> None:
        async with self._revision_changed:
            self._revision_changed.notify_all()
