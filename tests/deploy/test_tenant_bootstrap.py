"""The tenant bootstrap Job's script against a real etcd and a stand-in Kubernetes API.

The API server is a real HTTP server on 127.0.0.1 that records the Secret patches it gets;
the script runs as the Job runs it (its ``main``), twice: the second run must change nothing.
"""

from __future__ import annotations

import asyncio
import base64
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from controlplane.adapters.etcd.client import EtcdClient
from controlplane.adapters.etcd.tenants import EtcdTenantStore
from controlplane.core import tenants as core
from controlplane.local.procs import EtcdServer
from tests.deploy.test_k8s_manifests import load_script

TENANTS = """\
- name: alpha
  models: ["llama-3.1-8b"]
  rpm: 60
- name: beta
  max_concurrent: 4
"""


class FakeSecretsApi(ThreadingHTTPServer):
    def __init__(self) -> None:
        self.patches: list[tuple[str, str, dict[str, Any]]] = []
        super().__init__(("127.0.0.1", 0), _Handler)


class _Handler(BaseHTTPRequestHandler):
    server: FakeSecretsApi

    def do_PATCH(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.patches.append((self.path, self.headers["Content-Type"], body))
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def api() -> Iterator[FakeSecretsApi]:
    server = FakeSecretsApi()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


async def tenants_in(etcd: EtcdServer) -> dict[str, core.Tenant]:
    client = EtcdClient(etcd.endpoint)
    try:
        return {t.name: t for t in await EtcdTenantStore(client).list_all()}
    finally:
        await client.close()


def test_bootstrap_creates_then_reuses_then_rotates(
    etcd: EtcdServer, api: FakeSecretsApi, tmp_path: Path
) -> None:
    mod = load_script("tenant_bootstrap")
    tenants_file = tmp_path / "tenants.yaml"
    tenants_file.write_text(TENANTS)
    keys_dir = tmp_path / "keys"  # the mounted Secret: empty at first
    keys_dir.mkdir()
    argv = [
        f"--tenants={tenants_file}", f"--keys-dir={keys_dir}", "--secret=switchboard-tenant-keys",
        "--namespace=switchboard", f"--api-url=http://127.0.0.1:{api.server_address[1]}",
        f"--etcd={etcd.endpoint}",
    ]  # fmt: skip

    assert mod.main(argv) == 0
    ((path, ctype, body),) = api.patches
    assert path == "/api/v1/namespaces/switchboard/secrets/switchboard-tenant-keys"
    assert ctype == "application/merge-patch+json"
    keys = {n: base64.b64decode(v).decode() for n, v in body["data"].items()}
    assert set(keys) == {"alpha", "beta"}
    stored = asyncio.run(tenants_in(etcd))
    assert stored["alpha"].allowed_models == ("llama-3.1-8b",)
    assert stored["alpha"].quotas.requests_per_minute == 60
    assert stored["beta"].quotas.max_concurrent == 4
    index = {kid: t for t in stored.values() for kid in t.key_ids}
    for name, key in keys.items():
        tenant = core.authenticate(index, key, time.time())
        assert tenant is not None and tenant.name == name

    # the kubelet projects the patched Secret into the pod: a re-run changes nothing
    for name, key in keys.items():
        (keys_dir / name).write_text(key)
    assert mod.main(argv) == 0
    assert len(api.patches) == 1

    # a key lost from the Secret: that tenant (only) gets a new key; the old one stops working
    (keys_dir / "beta").unlink()
    assert mod.main(argv) == 0
    assert len(api.patches) == 2
    new = {n: base64.b64decode(v).decode() for n, v in api.patches[1][2]["data"].items()}
    assert set(new) == {"beta"} and new["beta"] != keys["beta"]
    stored = asyncio.run(tenants_in(etcd))
    index = {kid: t for t in stored.values() for kid in t.key_ids}
    assert core.authenticate(index, keys["beta"], time.time()) is None
    assert core.authenticate(index, new["beta"], time.time()) is not None


def test_bootstrap_without_an_api_touches_nothing(etcd: EtcdServer, tmp_path: Path) -> None:
    """A key made with nowhere to store it would be lost: fail before creating any tenant."""
    mod = load_script("tenant_bootstrap")
    (tmp_path / "t.yaml").write_text("- name: gamma\n")
    with pytest.raises(SystemExit, match="no Kubernetes API"):
        mod.main([f"--tenants={tmp_path / 't.yaml'}", f"--keys-dir={tmp_path}", "--api-url=",
                  f"--etcd={etcd.endpoint}"])  # fmt: skip
    assert asyncio.run(tenants_in(etcd)) == {}
