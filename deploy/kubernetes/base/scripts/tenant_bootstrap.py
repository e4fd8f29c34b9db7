"""Bootstrap tenants on a Kubernetes install and keep their API keys in a Secret.

Run by the ``switchboard-tenant-bootstrap`` Job (tenant-bootstrap.yaml). For each tenant in
``--tenants`` (YAML: a list of ``{name, models, sla_classes, default_sla_class, rpm, tpm,
max_concurrent}``), using the same idempotent step as ``switchboard up``'s demo tenant
(``controlplane.local.demo_tenant.ensure_tenant_key``):

* no such tenant in etcd: create it; its new key goes into the Secret;
* the tenant exists and the Secret (mounted at ``--keys-dir``) holds one of its valid keys:
  nothing changes;
* the tenant exists but the Secret has no working key for it: rotate (old keys stop working)
  and store the new key.

Keys that changed are written with one merge patch of the Secret ``--secret`` through the
Kubernetes API (the Job's ServiceAccount may get and patch that one Secret, nothing else).
Existing tenants' quotas are not changed here: use ``switchboard tenants`` for that.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import ssl
import sys
import tempfile
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from controlplane.adapters.etcd.client import EtcdClient
from controlplane.adapters.etcd.tenants import EtcdTenantStore
from controlplane.core.tenants import Quotas, Tenant
from controlplane.local.demo_tenant import ensure_tenant_key

SA_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
FIELDS = {"name", "models", "sla_classes", "default_sla_class", "rpm", "tpm", "max_concurrent"}


def tenants_from_yaml(text: str) -> list[Tenant]:
    """Parse the tenants file; unknown fields and duplicate names are errors."""
    docs = yaml.safe_load(text) or []
    if not isinstance(docs, list):
        raise ValueError("tenants file: expected a list of tenants")
    out: list[Tenant] = []
    for i, d in enumerate(docs):
        if not isinstance(d, dict) or "name" not in d:
            raise ValueError(f"tenants[{i}]: expected a mapping with a name")
        unknown = set(d) - FIELDS
        if unknown:
            raise ValueError(f"tenants[{i}]: unknown fields {sorted(unknown)}")
        out.append(
            Tenant(
                name=str(d["name"]),
                allowed_models=tuple(d.get("models") or ["*"]),
                sla_classes=tuple(d.get("sla_classes") or ()),
                default_sla_class=str(d.get("default_sla_class", "standard")),
                quotas=Quotas(
                    requests_per_minute=int(d.get("rpm", 0)),
                    tokens_per_minute=int(d.get("tpm", 0)),
                    max_concurrent=int(d.get("max_concurrent", 0)),
                ),
            )
        )
    names = [t.name for t in out]
    if len(names) != len(set(names)):
        raise ValueError(f"tenants file: duplicate names in {names}")
    return out


async def ensure_all(
    store: EtcdTenantStore, tenants: list[Tenant], keys_dir: Path
) -> dict[str, tuple[str, str]]:
    """``ensure_tenant_key`` per tenant; returns name -> (api key, created|reused|rotated)."""
    results: dict[str, tuple[str, str]] = {}
    with tempfile.TemporaryDirectory() as work:
        for tenant in tenants:
            key_file = Path(work) / tenant.name
            current = keys_dir / tenant.name
            if current.is_file():
                key_file.write_text(current.read_text())
            results[tenant.name] = await ensure_tenant_key(store, tenant, key_file)
    return results


def secret_patch(results: dict[str, tuple[str, str]]) -> dict[str, Any] | None:
    """The merge patch that stores every new key, or None when no key changed."""
    changed = {n: key for n, (key, what) in sorted(results.items()) if what != "reused"}
    if not changed:
        return None
    return {"data": {n: base64.b64encode(k.encode()).decode() for n, k in changed.items()}}


def patch_secret(api_url: str, namespace: str, name: str, patch: dict[str, Any]) -> None:
    """PATCH the Secret through the Kubernetes API with the pod's ServiceAccount token."""
    headers = {"Content-Type": "application/merge-patch+json"}
    context: ssl.SSLContext | None = None
    token_file = SA_DIR / "token"
    if token_file.is_file():
        headers["Authorization"] = f"Bearer {token_file.read_text().strip()}"
        context = ssl.create_default_context(cafile=str(SA_DIR / "ca.crt"))
    req = urllib.request.Request(
        f"{api_url.rstrip('/')}/api/v1/namespaces/{namespace}/secrets/{name}",
        data=json.dumps(patch).encode(),
        headers=headers,
        method="PATCH",
    )
    with urllib.request.urlopen(req, timeout=30, context=context) as resp:
        if resp.status != 200:
            raise RuntimeError(f"patch secret {name}: HTTP {resp.status}")


def default_api_url() -> str:
    host = os.environ.get("KUBERNETES_SERVICE_HOST", "")
    port = os.environ.get("KUBERNETES_SERVICE_PORT", "443")
    return f"https://{host}:{port}" if host else ""


def default_namespace() -> str:
    ns_file = SA_DIR / "namespace"
    return ns_file.read_text().strip() if ns_file.is_file() else "default"


async def run(args: argparse.Namespace, tenants: list[Tenant]) -> int:
    if not args.api_url:  # before etcd: a key made now could not be stored anywhere
        raise SystemExit("error: no Kubernetes API (--api-url) to store the tenants' keys in")
    client = EtcdClient(args.etcd)
    try:
        results = await ensure_all(
            EtcdTenantStore(client, args.prefix), tenants, Path(args.keys_dir)
        )
    finally:
        await client.close()
    for name, (_, what) in sorted(results.items()):
        print(f"tenant/{name} {what}", flush=True)
    patch = secret_patch(results)
    if patch is not None:
        patch_secret(args.api_url, args.namespace, args.secret, patch)
        print(f"secret/{args.secret} updated: {', '.join(sorted(patch['data']))}", flush=True)
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--tenants", required=True, help="YAML list of tenants")
    p.add_argument("--keys-dir", required=True, help="the mounted Secret: one file per tenant")
    p.add_argument("--secret", default="switchboard-tenant-keys")
    p.add_argument("--namespace", default=default_namespace())
    p.add_argument("--api-url", default=default_api_url())
    p.add_argument("--etcd", default=os.environ.get("SWITCHBOARD_ETCD", "127.0.0.1:2379"))
    p.add_argument("--prefix", default=os.environ.get("SWITCHBOARD_PREFIX", "/switchboard/v1"))
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return asyncio.run(run(args, tenants_from_yaml(Path(args.tenants).read_text())))


if __name__ == "__main__":
    sys.exit(main())
