"""`switchboard tenants create / list / rotate-key / delete`: tenants and their API keys.

These talk to etcd directly (``--etcd``, like ``switchboard worker``): there is no tenants gRPC
service yet. A key is printed once, by ``create`` and ``rotate-key``, on stdout (so that it can
be captured with ``$(...)``); the warning that it cannot be shown again goes to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

from controlplane.core.tenants import Quotas, Tenant
from controlplane.errors import SwitchboardError

if TYPE_CHECKING:
    from controlplane.adapters.etcd.tenants import EtcdTenantStore

_Verb = Callable[["EtcdTenantStore", argparse.Namespace], Coroutine[Any, Any, None]]

SHOWN_ONCE = "Save this key now: it cannot be shown again (only its hash is stored)."


def add_parser(
    sub: Any, etcd_flags: Callable[[argparse.ArgumentParser], None]
) -> argparse.ArgumentParser:
    """Register ``tenants`` and its subcommands on ``sub`` (argparse subparsers)."""
    tp: argparse.ArgumentParser = sub.add_parser(
        "tenants", help="manage tenants and their API keys (talks to etcd directly)"
    )
    verbs = tp.add_subparsers(dest="tenants_command", required=True, metavar="VERB")

    sp = verbs.add_parser("create", help="create a tenant and print its API key (once)")
    etcd_flags(sp)
    sp.add_argument("name", help="tenant name (DNS-1123 label)")
    sp.add_argument("--models", default="*", help="comma-separated model names, or * (default)")
    sp.add_argument(
        "--sla-classes", default="", help="comma-separated allowed SLA classes (default: all)"
    )
    sp.add_argument("--default-sla-class", default="standard", help="class of requests naming none")
    sp.add_argument("--rpm", type=int, default=0, help="requests per minute (0: unlimited)")
    sp.add_argument("--tpm", type=int, default=0, help="tokens per minute (0: unlimited)")
    sp.add_argument(
        "--max-concurrent", type=int, default=0, help="requests in flight (0: unlimited)"
    )
    sp.set_defaults(func=cmd_tenants)

    sp = verbs.add_parser("list", help="list tenants (names, models, classes, quotas, key ids)")
    etcd_flags(sp)
    sp.set_defaults(func=cmd_tenants)

    sp = verbs.add_parser("rotate-key", help="give a tenant a new API key and print it (once)")
    etcd_flags(sp)
    sp.add_argument("name")
    sp.add_argument(
        "--grace-period",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="keep the old key valid this long (default 0: it stops working at once)",
    )
    sp.set_defaults(func=cmd_tenants)

    sp = verbs.add_parser("delete", help="delete a tenant (its keys stop working)")
    etcd_flags(sp)
    sp.add_argument("name")
    sp.set_defaults(func=cmd_tenants)
    return tp


def _split(csv: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in csv.split(",") if part.strip())


def _quota(n: int) -> str:
    return str(n) if n else "-"


def _age(seconds: float) -> str:
    s = max(0, int(seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= size:
            return f"{s // size}{unit}"
    return f"{s}s"


def tenants_table(tenants: list[Tenant], now: float) -> str:
    """The ``tenants list`` table. Shows key ids only: secrets are never stored."""
    rows = [("NAME", "MODELS", "SLA CLASSES", "DEFAULT", "RPM", "TPM", "CONCURRENT", "KEYS", "AGE")]
    for t in tenants:
        keys = ",".join(k.key_id + (" (expiring)" if k.expires_at else "") for k in t.key_hashes)
        rows.append(
            (
                t.name,
                ",".join(t.allowed_models),
                ",".join(t.sla_classes) or "*",
                t.default_sla_class,
                _quota(t.quotas.requests_per_minute),
                _quota(t.quotas.tokens_per_minute),
                _quota(t.quotas.max_concurrent),
                keys or "-",
                _age(now - t.created_at),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "   ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows
    )


def cmd_tenants(args: argparse.Namespace) -> None:
    try:
        asyncio.run(_with_store(args, _VERBS[args.tenants_command]))
    except SwitchboardError as e:
        raise SystemExit(f"error: {e}") from None


async def _with_store(args: argparse.Namespace, fn: _Verb) -> None:
    from controlplane.adapters.etcd.client import EtcdClient
    from controlplane.adapters.etcd.tenants import EtcdTenantStore

    client = EtcdClient(args.etcd)
    try:
        await fn(EtcdTenantStore(client, args.prefix), args)
    finally:
        await client.close()


def _print_key(verb: str, name: str, key_id: str, api_key: str) -> None:
    print(f"tenant/{name} {verb} (key id {key_id}); API key:", file=sys.stderr)
    print(api_key, flush=True)
    print(SHOWN_ONCE, file=sys.stderr)


async def _create(store: EtcdTenantStore, args: argparse.Namespace) -> None:
    tenant = Tenant(
        name=args.name,
        allowed_models=_split(args.models),
        sla_classes=_split(args.sla_classes),
        default_sla_class=args.default_sla_class,
        quotas=Quotas(
            requests_per_minute=args.rpm,
            tokens_per_minute=args.tpm,
            max_concurrent=args.max_concurrent,
        ),
    )
    issued = await store.create(tenant)
    _print_key("created", issued.tenant.name, issued.key_id, issued.api_key)


async def _list(store: EtcdTenantStore, args: argparse.Namespace) -> None:
    tenants = await store.list_all()
    if not tenants:
        print("No tenants found.", file=sys.stderr)
        return
    print(tenants_table(tenants, now=time.time()))


async def _rotate(store: EtcdTenantStore, args: argparse.Namespace) -> None:
    issued = await store.rotate_key(args.name, grace_s=args.grace_period)
    _print_key("key rotated", issued.tenant.name, issued.key_id, issued.api_key)
    if args.grace_period > 0:
        print(f"The old key stays valid for {args.grace_period:g}s.", file=sys.stderr)
    else:
        print("The old key no longer works.", file=sys.stderr)


async def _delete(store: EtcdTenantStore, args: argparse.Namespace) -> None:
    await store.delete(args.name)
    print(f"tenant/{args.name} deleted")


_VERBS: dict[str, _Verb] = {
    "create": _create,
    "list": _list,
    "rotate-key": _rotate,
    "delete": _delete,
}
