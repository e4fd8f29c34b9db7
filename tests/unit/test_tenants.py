"""Tenants (pure core): validation messages, API key parsing and verification, model / SLA class
resolution, rotation arithmetic."""

from __future__ import annotations

import dataclasses

import grpc
import pytest

from controlplane.adapters.etcd.tenants import decode_tenant, encode_tenant
from controlplane.adapters.grpc.errors import status_for
from controlplane.core import tenants as core
from controlplane.core.tenants import IssuedKey, KeyRecord, Quotas, Tenant
from controlplane.errors import InvalidArgument, PermissionDenied, Unauthenticated

SECRET = "s3cr3t-VALUE_abcdefghijklmnopqrstuvwxyz0123"  # token_urlsafe-shaped, with '-' and '_'


def tenant(**kw: object) -> Tenant:
    base = Tenant(name="acme", allowed_models=("*",), sla_classes=())
    return dataclasses.replace(base, **kw)  # type: ignore[arg-type]


def keyed(key_id: str = "abc123", secret: str = SECRET, **kw: object) -> tuple[Tenant, str]:
    record, api_key = core.make_key(key_id, secret, now=100.0)
    return tenant(key_hashes=(record,), **kw), api_key


# --- validation ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"name": ""}, "tenant.name is empty"),
        ({"name": "Acme"}, "tenant.name 'Acme' must be a DNS-1123 label"),
        ({"name": "a" * 64}, "is longer than 63"),
        ({"name": "-acme"}, "DNS-1123"),
        ({"allowed_models": ()}, "tenant.allowed_models is empty"),
        ({"allowed_models": ("*", "m")}, "'*' must be the only entry"),
        ({"allowed_models": ("m", "")}, "tenant.allowed_models[1]"),
        ({"allowed_models": ("m", " m2")}, "tenant.allowed_models[1]"),
        ({"allowed_models": ("m", "m")}, "tenant.allowed_models[1]: duplicate 'm'"),
        ({"sla_classes": ("ok", "bad class")}, "tenant.sla_classes[1] 'bad class'"),
        (
            {"sla_classes": ("standard", "standard")},
            "tenant.sla_classes[1]: duplicate 'standard'",
        ),
        ({"default_sla_class": ""}, "tenant.default_sla_class '' is not a valid class name"),
        (
            {"sla_classes": ("interactive",)},
            "tenant.default_sla_class 'standard' is not one of tenant.sla_classes (interactive)",
        ),
        ({"quotas": Quotas(requests_per_minute=-1)}, "tenant.quotas.requests_per_minute"),
        ({"quotas": Quotas(tokens_per_minute=-5)}, "tenant.quotas.tokens_per_minute"),
        ({"quotas": Quotas(max_concurrent=2**63)}, "tenant.quotas.max_concurrent"),
        (
            {"key_hashes": (KeyRecord("AB", "0" * 64, 0.0),)},
            "tenant.key_hashes[0].key_id 'AB'",
        ),
        ({"key_hashes": (KeyRecord("abcd", "xyz", 0.0),)}, "tenant.key_hashes[0].sha256"),
        (
            {"key_hashes": (KeyRecord("abcd", "0" * 64, 0.0), KeyRecord("abcd", "1" * 64, 0.0))},
            "tenant.key_hashes[1].key_id 'abcd' is duplicated",
        ),
    ],
)
def test_validate_tenant_names_the_field(change: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        core.validate_tenant(tenant(**change))
    assert message in str(err.value)


def test_valid_tenants_pass() -> None:
    t = tenant(
        allowed_models=("llama-3.1-8b", "tiny-llama"),
        sla_classes=("interactive", "standard"),
        quotas=Quotas(600, 100_000, 8),
    )
    assert core.validate_tenant(t) is t
    assert core.validate_tenant(tenant()) == tenant()


# --- keys --------------------------------------------------------------------------------------


def test_make_key_stores_only_the_hash() -> None:
    record, api_key = core.make_key("abc123", SECRET, now=5.0)
    assert api_key == f"sb-abc123-{SECRET}"
    assert record == KeyRecord("abc123", core.hash_secret(SECRET), created_at=5.0)
    assert SECRET not in repr(record)
    assert len(record.sha256) == 64


@pytest.mark.parametrize(
    ("api_key", "parsed"),
    [
        (f"sb-abc123-{SECRET}", ("abc123", SECRET)),
        ("sb-abc123-" + "x" * 43, ("abc123", "x" * 43)),
        ("", None),
        ("sb-", None),
        ("sb-abc123", None),
        (f"sk-abc123-{SECRET}", None),
        (f"Bearer sb-abc123-{SECRET}", None),
        (f"sb-ABC123-{SECRET}", None),  # key ids are lowercase
        ("sb-abc123-short", None),
        (f"sb-abc123-{SECRET}!", None),
        ("sb-abc123-" + "x" * 300, None),  # too long to hash
    ],
)
def test_parse_api_key(api_key: str, parsed: tuple[str, str] | None) -> None:
    assert core.parse_api_key(api_key) == parsed


def test_make_key_rejects_bad_ids_and_secrets() -> None:
    with pytest.raises(InvalidArgument, match="key_id"):
        core.make_key("a-b", SECRET, 0.0)
    with pytest.raises(InvalidArgument, match="secret"):
        core.make_key("abcd", "short", 0.0)


def test_authenticate_good_bad_and_unknown_keys() -> None:
    t, api_key = keyed()
    index = {"abc123": t}
    assert core.authenticate(index, api_key, now=200.0) is t
    wrong = api_key[:-1] + ("A" if api_key[-1] != "A" else "B")
    assert core.authenticate(index, wrong, now=200.0) is None
    assert core.authenticate(index, f"sb-fff000-{SECRET}", now=200.0) is None
    assert core.authenticate(index, "garbage", now=200.0) is None
    assert core.authenticate({}, api_key, now=200.0) is None


def test_expired_keys_are_rejected() -> None:
    record, api_key = core.make_key("abc123", SECRET, now=0.0)
    t = tenant(key_hashes=(dataclasses.replace(record, expires_at=50.0),))
    assert core.authenticate({"abc123": t}, api_key, now=49.9) is t
    assert core.authenticate({"abc123": t}, api_key, now=50.0) is None
    assert core.verify_secret(record, SECRET, now=1e12)  # no expiry


def test_rotation_without_grace_drops_old_keys() -> None:
    t, _ = keyed("old000")
    new, _ = core.make_key("new000", SECRET + "x", now=200.0)
    rotated = core.with_new_key(t, new, now=200.0)
    assert rotated.key_ids == ("new000",)


def test_rotation_with_grace_keeps_old_keys_until_expiry() -> None:
    t, old_key = keyed("old000")
    new, new_key = core.make_key("new000", SECRET + "x", now=200.0)
    rotated = core.with_new_key(t, new, now=200.0, grace_s=60.0)
    assert rotated.key_ids == ("old000", "new000")
    assert rotated.key_hashes[0].expires_at == 260.0
    index = dict.fromkeys(rotated.key_ids, rotated)
    assert core.authenticate(index, old_key, now=259.0) is rotated
    assert core.authenticate(index, old_key, now=261.0) is None
    assert core.authenticate(index, new_key, now=1e9) is rotated
    # a second rotation long after drops the expired key and never extends an expiry
    newer, _ = core.make_key("new111", SECRET + "y", now=300.0)
    again = core.with_new_key(rotated, newer, now=300.0, grace_s=1000.0)
    assert again.key_ids == ("new000", "new111")
    with pytest.raises(InvalidArgument, match="grace"):
        core.with_new_key(t, new, now=0.0, grace_s=-1)
    with pytest.raises(InvalidArgument, match="already has key id"):
        core.with_new_key(rotated, new, now=0.0)


def test_issued_key_repr_hides_the_key() -> None:
    t, api_key = keyed()
    issued = IssuedKey(t, "abc123", api_key)
    assert SECRET not in repr(issued) and SECRET not in str(issued)


# --- per-request checks ------------------------------------------------------------------------


def test_model_access() -> None:
    assert core.tenant_allows_model(tenant(), "anything")
    only = tenant(allowed_models=("tiny-llama",))
    assert core.tenant_allows_model(only, "tiny-llama")
    assert not core.tenant_allows_model(only, "llama-3.1-8b")
    core.require_model(only, "tiny-llama")
    with pytest.raises(PermissionDenied, match=r"tenant 'acme' may not use model 'llama-3\.1-8b'"):
        core.require_model(only, "llama-3.1-8b")


def test_resolve_sla_class() -> None:
    anyclass = tenant(default_sla_class="batch")
    assert core.resolve_sla_class(anyclass, None) == "batch"
    assert core.resolve_sla_class(anyclass, "") == "batch"
    assert core.resolve_sla_class(anyclass, "interactive") == "interactive"
    limited = tenant(sla_classes=("interactive", "standard"))
    assert core.resolve_sla_class(limited, None) == "standard"
    assert core.resolve_sla_class(limited, "interactive") == "interactive"
    with pytest.raises(PermissionDenied, match=r"SLA class 'batch' \(allowed: interactive, stan"):
        core.resolve_sla_class(limited, "batch")
    with pytest.raises(InvalidArgument, match="not a valid class name"):
        core.resolve_sla_class(anyclass, "no spaces")


def test_new_errors_map_to_grpc_codes() -> None:
    assert status_for(PermissionDenied("x")) is grpc.StatusCode.PERMISSION_DENIED
    assert status_for(Unauthenticated("x")) is grpc.StatusCode.UNAUTHENTICATED


# --- record codec ------------------------------------------------------------------------------


def test_record_round_trip_and_malformed_records() -> None:
    t, _ = keyed(sla_classes=("standard",), quotas=Quotas(1, 2, 3), created_at=7.0)
    assert decode_tenant(encode_tenant(t), resource_version=9) == dataclasses.replace(
        t, resource_version=9
    )
    with pytest.raises(InvalidArgument, match="malformed tenant record"):
        decode_tenant(b"{not json")
    with pytest.raises(InvalidArgument, match="malformed tenant record"):
        decode_tenant(b'{"name": "x"}')
    with pytest.raises(InvalidArgument, match=r"tenant\.name"):
        decode_tenant(encode_tenant(dataclasses.replace(t, name="Bad")))
