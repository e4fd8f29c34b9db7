"""Tenants and their API keys: frozen dataclasses, validation and the per-request checks.

A *tenant* is who sends requests to the gateway. It may use some models (``allowed_models``,
``"*"``: all), some SLA classes (``sla_classes``, empty: all) and has quotas (0: unlimited).

API keys
--------
A key looks like ``sb-<key_id>-<secret>``:

* ``key_id`` is a short public identifier (lowercase hex, no ``-``), safe to print and log; it
  is how a key is found (``key_id -> tenant``) without scanning every tenant;
* ``secret`` is ``secrets.token_urlsafe(32)`` (it may itself contain ``-`` and ``_``).

Only ``sha256(secret)`` (hex) is stored, in a ``KeyRecord``; the plaintext is shown once, when
the key is made, and never stored or logged. Verification hashes the presented secret and
compares with ``hmac.compare_digest``. A key may carry ``expires_at`` (a rotated-out key kept
valid for a grace period); 0 means it never expires.

This module is pure: no randomness and no clock. Key ids, secrets and ``now`` come in as
arguments (the etcd adapter and the CLI make them with ``secrets``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from controlplane.errors import InvalidArgument, PermissionDenied

KEY_PREFIX = "sb"
ALL_MODELS = "*"
DEFAULT_SLA_CLASS = "standard"
MAX_NAME_LEN = 63
MAX_API_KEY_LEN = 256
"""Longer presented keys are rejected before hashing."""

_DNS_LABEL_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_SLA_CLASS_RE = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")
_KEY_ID_RE = re.compile(r"^[a-z0-9]{4,32}$")
_SECRET_RE = re.compile(r"^[A-Za-z0-9_-]{16,200}$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_INT64_MAX = 2**63 - 1


@dataclass(frozen=True, slots=True)
class Quotas:
    """Per-tenant limits the gateway's admission enforces. 0 means unlimited."""

    requests_per_minute: int = 0
    tokens_per_minute: int = 0
    """Prompt plus generated tokens."""
    max_concurrent: int = 0
    """Requests in flight at once."""


@dataclass(frozen=True, slots=True)
class KeyRecord:
    """One API key of a tenant, as stored: never the secret, only its SHA-256."""

    key_id: str
    """Public part of the key (``sb-<key_id>-...``); printable."""
    sha256: str
    """Lowercase hex SHA-256 of the secret part."""
    created_at: float
    expires_at: float = 0.0
    """Unix time after which the key stops working; 0: never (a rotated-out key gets one)."""

    def valid_at(self, now: float) -> bool:
        return self.expires_at == 0.0 or now < self.expires_at


@dataclass(frozen=True, slots=True)
class Tenant:
    name: str
    """DNS-1123 label, unique in the install."""
    allowed_models: tuple[str, ...]
    """Model names (as tenants send them) this tenant may use; ``("*",)``: every model."""
    sla_classes: tuple[str, ...]
    """SLA classes this tenant may ask for; empty: every class."""
    default_sla_class: str = DEFAULT_SLA_CLASS
    """The class of requests that name none; must be one of ``sla_classes`` when those are set."""
    quotas: Quotas = field(default_factory=Quotas)
    key_hashes: tuple[KeyRecord, ...] = ()
    """Keys that authenticate as this tenant (usually one; two during a rotation's grace)."""
    created_at: float = 0.0
    resource_version: int = 0
    """etcd mod revision the tenant was read at (0: not stored); not part of the record."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "allowed_models", tuple(self.allowed_models))
        object.__setattr__(self, "sla_classes", tuple(self.sla_classes))
        object.__setattr__(self, "key_hashes", tuple(self.key_hashes))

    @property
    def key_ids(self) -> tuple[str, ...]:
        return tuple(k.key_id for k in self.key_hashes)


@dataclass(frozen=True, slots=True)
class IssuedKey:
    """A tenant as stored right after a key was made, and that key's plaintext (shown once).

    ``api_key`` is left out of ``repr`` so that logging this object cannot leak it.
    """

    tenant: Tenant
    key_id: str
    api_key: str = field(repr=False)


# --- keys ----------------------------------------------------------------------------------


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def format_api_key(key_id: str, secret: str) -> str:
    return f"{KEY_PREFIX}-{key_id}-{secret}"


def parse_api_key(api_key: str) -> tuple[str, str] | None:
    """``sb-<key_id>-<secret>`` -> (key_id, secret), or None when it is not of that shape."""
    if len(api_key) > MAX_API_KEY_LEN:
        return None
    prefix, sep, rest = api_key.partition("-")
    if prefix != KEY_PREFIX or not sep:
        return None
    key_id, sep, secret = rest.partition("-")
    if not sep or not _KEY_ID_RE.match(key_id) or not _SECRET_RE.match(secret):
        return None
    return key_id, secret


def make_key(key_id: str, secret: str, now: float) -> tuple[KeyRecord, str]:
    """A stored record and the plaintext key for a (key_id, secret) made by the caller."""
    if not _KEY_ID_RE.match(key_id):
        raise InvalidArgument(f"key_id {key_id!r} must be 4-32 lowercase alphanumerics")
    if not _SECRET_RE.match(secret):
        raise InvalidArgument("key secret must be 16-200 URL-safe base64 characters")
    return KeyRecord(key_id, hash_secret(secret), created_at=now), format_api_key(key_id, secret)


def verify_secret(record: KeyRecord, secret: str, now: float) -> bool:
    """True when ``secret`` hashes to ``record.sha256`` and the key has not expired."""
    ok = hmac.compare_digest(hash_secret(secret), record.sha256)
    return ok and record.valid_at(now)


def authenticate(
    tenants_by_key_id: Mapping[str, Tenant], api_key: str, now: float
) -> Tenant | None:
    """The tenant ``api_key`` belongs to, or None (malformed, unknown, wrong or expired key).

    ``tenants_by_key_id`` maps every key id to its tenant (``TenantCache`` keeps one).
    """
    parsed = parse_api_key(api_key)
    if parsed is None:
        return None
    key_id, secret = parsed
    tenant = tenants_by_key_id.get(key_id)
    if tenant is None:
        return None
    for record in tenant.key_hashes:
        if record.key_id == key_id:
            return tenant if verify_secret(record, secret, now) else None
    return None


def with_new_key(tenant: Tenant, record: KeyRecord, *, now: float, grace_s: float = 0.0) -> Tenant:
    """``tenant`` after a rotation to ``record``.

    ``grace_s == 0``: every old key is removed (stops working at once). ``grace_s > 0``: old
    keys stay valid until ``now + grace_s`` (or their own earlier expiry). Keys already expired
    are dropped either way.
    """
    if grace_s < 0:
        raise InvalidArgument(f"grace period {grace_s} must be >= 0 seconds")
    if record.key_id in tenant.key_ids:
        raise InvalidArgument(f"tenant {tenant.name!r} already has key id {record.key_id!r}")
    kept: list[KeyRecord] = []
    if grace_s > 0:
        until = now + grace_s
        for old in tenant.key_hashes:
            if old.valid_at(now):
                expiry = until if old.expires_at == 0.0 else min(old.expires_at, until)
                kept.append(dataclasses.replace(old, expires_at=expiry))
    return dataclasses.replace(tenant, key_hashes=(*kept, record))


# --- per-request checks ---------------------------------------------------------------------


def tenant_allows_model(tenant: Tenant, model: str) -> bool:
    return ALL_MODELS in tenant.allowed_models or model in tenant.allowed_models


def require_model(tenant: Tenant, model: str) -> None:
    """Raise PermissionDenied when ``tenant`` may not use ``model``."""
    if not tenant_allows_model(tenant, model):
        raise PermissionDenied(f"tenant {tenant.name!r} may not use model {model!r}")


def resolve_sla_class(tenant: Tenant, requested: str | None) -> str:
    """The SLA class a request runs in: ``requested``, or the tenant's default when None / "".

    Raises PermissionDenied when the tenant may not use ``requested``, InvalidArgument when it
    is not a well-formed class name. Whether the class exists at all is the caller's check.
    """
    if not requested:
        return tenant.default_sla_class
    if len(requested) > 63 or not _SLA_CLASS_RE.match(requested):
        raise InvalidArgument(f"SLA class {requested[:70]!r} is not a valid class name")
    if tenant.sla_classes and requested not in tenant.sla_classes:
        raise PermissionDenied(
            f"tenant {tenant.name!r} may not use SLA class {requested!r} "
            f"(allowed: {', '.join(tenant.sla_classes)})"
        )
    return requested


# --- validation -----------------------------------------------------------------------------


def validate_tenant_name(name: str) -> str:
    if not name:
        raise InvalidArgument("tenant.name is empty")
    if len(name) > MAX_NAME_LEN:
        raise InvalidArgument(f"tenant.name {name[:20]!r}... is longer than {MAX_NAME_LEN}")
    if not _DNS_LABEL_RE.match(name):
        raise InvalidArgument(
            f"tenant.name {name!r} must be a DNS-1123 label: lowercase alphanumerics or '-', "
            "starting and ending with an alphanumeric"
        )
    return name


def validate_tenant(tenant: Tenant) -> Tenant:
    """Return ``tenant`` when well formed; raise InvalidArgument naming the field."""
    validate_tenant_name(tenant.name)
    _check_models(tenant.allowed_models)
    _check_classes(tenant)
    for name in ("requests_per_minute", "tokens_per_minute", "max_concurrent"):
        value = getattr(tenant.quotas, name)
        if isinstance(value, bool) or not isinstance(value, int):
            raise InvalidArgument(f"tenant.quotas.{name} must be an integer, got {value!r}")
        if not 0 <= value <= _INT64_MAX:
            raise InvalidArgument(f"tenant.quotas.{name} must be >= 0 (0: unlimited), got {value}")
    seen: set[str] = set()
    for i, key in enumerate(tenant.key_hashes):
        where = f"tenant.key_hashes[{i}]"
        if not _KEY_ID_RE.match(key.key_id):
            raise InvalidArgument(f"{where}.key_id {key.key_id!r} must be 4-32 lowercase [a-z0-9]")
        if key.key_id in seen:
            raise InvalidArgument(f"{where}.key_id {key.key_id!r} is duplicated")
        seen.add(key.key_id)
        if not _SHA256_RE.match(key.sha256):
            raise InvalidArgument(f"{where}.sha256 is not 64 lowercase hex digits")
        if key.expires_at < 0:
            raise InvalidArgument(f"{where}.expires_at {key.expires_at} is negative")
    if tenant.created_at < 0:
        raise InvalidArgument(f"tenant.created_at {tenant.created_at} is negative")
    return tenant


def _check_models(models: tuple[str, ...]) -> None:
    if not models:
        raise InvalidArgument(f"tenant.allowed_models is empty (use {ALL_MODELS!r} for all)")
    if ALL_MODELS in models and len(models) > 1:
        raise InvalidArgument(f"tenant.allowed_models: {ALL_MODELS!r} must be the only entry")
    seen: set[str] = set()
    for i, model in enumerate(models):
        if not model or model != model.strip() or "," in model or len(model) > 256:
            raise InvalidArgument(
                f"tenant.allowed_models[{i}] {model[:40]!r} must be a non-empty model name "
                "without surrounding spaces or commas"
            )
        if model in seen:
            raise InvalidArgument(f"tenant.allowed_models[{i}]: duplicate {model!r}")
        seen.add(model)


def _check_classes(tenant: Tenant) -> None:
    seen: set[str] = set()
    for i, name in enumerate(tenant.sla_classes):
        if not name or len(name) > 63 or not _SLA_CLASS_RE.match(name):
            raise InvalidArgument(
                f"tenant.sla_classes[{i}] {name[:40]!r} must be 1-63 alphanumerics, '-', '_' or '.'"
            )
        if name in seen:
            raise InvalidArgument(f"tenant.sla_classes[{i}]: duplicate {name!r}")
        seen.add(name)
    default = tenant.default_sla_class
    if not default or len(default) > 63 or not _SLA_CLASS_RE.match(default):
        raise InvalidArgument(
            f"tenant.default_sla_class {default[:40]!r} is not a valid class name"
        )
    if tenant.sla_classes and default not in tenant.sla_classes:
        raise InvalidArgument(
            f"tenant.default_sla_class {default!r} is not one of tenant.sla_classes "
            f"({', '.join(tenant.sla_classes)})"
        )
