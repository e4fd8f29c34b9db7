"""The ``demo`` tenant that ``switchboard up`` makes, and its key file.

``up`` calls ``ensure_demo_tenant`` once the control plane is up:

* no ``demo`` tenant in etcd: create it and write its key to ``<state-dir>/demo-api-key``;
* the tenant exists and the key file holds one of its valid keys: reuse both, change nothing;
* the tenant exists but the key file is missing or holds a key that no longer works: rotate
  (the old keys stop working) and write the new key.

The key file is written with mode 0600, atomically (temporary file, then rename).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from pathlib import Path

from controlplane.adapters.etcd.client import EtcdClient
from controlplane.adapters.etcd.tenants import EtcdTenantStore
from controlplane.core import tenants as core
from controlplane.core.tenants import Quotas, Tenant
from controlplane.errors import NotFound

DEMO_TENANT = Tenant(
    name="demo",
    allowed_models=(core.ALL_MODELS,),
    sla_classes=(),
    default_sla_class=core.DEFAULT_SLA_CLASS,
    quotas=Quotas(requests_per_minute=100_000, tokens_per_minute=100_000_000, max_concurrent=1024),
)
KEY_FILE_NAME = "demo-api-key"


def write_key_file(path: Path, api_key: str) -> None:
    """Write ``api_key`` to ``path`` with mode 0600, replacing it atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.fchmod(fd, 0o600)  # whatever the umask
        os.write(fd, (api_key + "\n").encode())
    finally:
        os.close(fd)
    os.replace(tmp, path)


def read_key_file(path: Path) -> str:
    with contextlib.suppress(OSError, UnicodeDecodeError):
        return path.read_text().strip()
    return ""


async def ensure_tenant_key(
    store: EtcdTenantStore,
    tenant: Tenant,
    key_file: Path,
    *,
    clock: Callable[[], float] = time.time,
) -> tuple[str, str]:
    """Make sure ``tenant`` exists and ``key_file`` holds a working key of it.

    Returns (api key, what happened: ``"created"``, ``"reused"`` or ``"rotated"``).
    """
    try:
        current = await store.get(tenant.name)
    except NotFound:
        issued = await store.create(tenant)
        write_key_file(key_file, issued.api_key)
        return issued.api_key, "created"
    saved = read_key_file(key_file)
    index = dict.fromkeys(current.key_ids, current)
    if saved and core.authenticate(index, saved, clock()) is not None:
        return saved, "reused"
    issued = await store.rotate_key(tenant.name)
    write_key_file(key_file, issued.api_key)
    return issued.api_key, "rotated"


async def ensure_demo_tenant(
    etcd_endpoint: str, state_dir: Path, prefix: str = ""
) -> tuple[str, str]:
    """``ensure_tenant_key`` for the ``demo`` tenant and ``<state_dir>/demo-api-key``."""
    client = EtcdClient(etcd_endpoint)
    try:
        store = EtcdTenantStore(client, prefix) if prefix else EtcdTenantStore(client)
        return await ensure_tenant_key(store, DEMO_TENANT, state_dir / KEY_FILE_NAME)
    finally:
        await client.close()
