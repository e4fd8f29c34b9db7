"""On Kubernetes the control plane is not a Ray node: it reaches the KubeRay head through Ray
Client (``SWITCHBOARD_RAY_ADDRESS=ray://<cluster>-head-svc:10001``). This runs the control
plane's real ``RayReplicaRuntime`` that way against a real Ray cluster on loopback with its Ray
Client server on, and the node agent's init-container script (``ray_node_id.py``) too: a sim
worker is started as a Ray actor, registers in a real etcd, and is drained and stopped.

The Ray Client side runs in a child process (its own ``ray.init``), as the control plane does.
Ray Client's first connection sometimes fails on a loaded machine (the head's per-client server
does not start); the reconciler retries an unavailable Ray, and so does this test.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from controlplane.local.procs import EtcdServer
from tests.helpers import start_ray_cluster

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def ray_client_address() -> Iterator[str]:
    port = free_port()
    cluster, _ = start_ray_cluster(
        {
            "node_ip_address": "127.0.0.1",
            "num_cpus": 2,
            "num_gpus": 1,
            "include_dashboard": False,
            "object_store_memory": 80 * 1024 * 1024,
            "ray_client_server_port": port,
        }
    )
    try:
        yield f"ray://127.0.0.1:{port}"
    finally:
        cluster.shutdown()


SCRIPT = r"""
import asyncio, json, sys, time
from controlplane.adapters.etcd.client import EtcdClient
from controlplane.adapters.etcd.workers import EtcdWorkerRegistry
from controlplane.adapters.ray.runtime import RayReplicaRuntime, ReplicaLaunch

address, etcd, scripts = sys.argv[1:4]
sys.path.insert(0, scripts)
import ray_node_id

async def workers():
    client = EtcdClient(etcd)
    try:
        return [w.worker_id for w in await EtcdWorkerRegistry(client).list_workers()]
    finally:
        await client.close()

async def main():
    rt = RayReplicaRuntime(address, drain_timeout_s=5)
    # The reconciler retries an Unavailable Ray; so does this: Ray Client's per-client server
    # sometimes fails its first start on a loaded machine.
    for attempt in range(4):
        try:
            nodes = await rt.ray_nodes()
            break
        except Exception as e:
            print(f"ray client attempt {attempt}: {e}", file=sys.stderr)
            await asyncio.sleep(1)
    else:
        raise SystemExit("Ray Client never connected")
    node_id = ray_node_id.pick_ray_node(ray_node_id.ray_nodes(address), "127.0.0.1")
    worker = {"etcd": {"endpoint": etcd}, "model": "tiny", "engine": "sim",
              "profile": "tiny-test", "speedup": 50.0, "listen": "127.0.0.1:0",
              "advertise_host": "127.0.0.1", "worker_id": "r-1", "node_id": "n-1",
              "lease_ttl_s": 5, "metrics_port": -1}
    await rt.start(ReplicaLaunch("r-1", node_id, 1, worker))
    deadline = time.monotonic() + 60
    while "r-1" not in await workers():
        assert time.monotonic() < deadline, "the worker did not register"
        await asyncio.sleep(0.3)
    seen = await rt.observe()
    await rt.stop("r-1", drain=True)
    after = await rt.observe()
    left = await workers()
    print(json.dumps({"nodes": nodes, "picked": node_id, "seen": {k: [v.group_state, v.actor_alive]
        for k, v in seen.items()}, "after": sorted(after), "left": left}))

asyncio.run(main())
"""


def test_control_plane_runtime_over_ray_client(
    ray_client_address: str, etcd: EtcdServer, tmp_path: Path
) -> None:
    proc = subprocess.run(
        [
            sys.executable, "-c", SCRIPT, ray_client_address, etcd.endpoint,
            str(REPO / "deploy" / "kubernetes" / "base" / "scripts"),
        ],
        capture_output=True, text=True, timeout=180, cwd=REPO,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["picked"] in out["nodes"] and out["nodes"][out["picked"]] is True
    assert out["seen"] == {"r-1": ["CREATED", True]}
    assert out["after"] == [] and out["left"] == []
