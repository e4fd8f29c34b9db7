"""The SLA planner end to end on the local stack: a real etcd, a one-node Ray cluster on loopback
with declared GPUs, a node agent, a gateway with a tenant, and a control plane whose leader runs
the reconciler and the planner (``--planner on``, reading the gateway's ``/metrics``).

A sim deployment (``tiny-test`` at ``speedup 0.1``: 30 ms decode steps, a 1k-token KV cache, so
a decode replica holds about five 200-token requests) has a fixed prefill pool and an autoscaled
decode pool in [1, 3]. A load step of 2 requests/s makes the planner raise the decode pool and
the reconciler start the replicas; light load afterwards makes it drain them again, one request
stream running throughout: every request must succeed. Loops are bounded; nothing is timed.
"""

from __future__ import annotations

import json
import random
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
from switchboard.v1 import deployments_pb2, deployments_pb2_grpc

from controlplane.adapters.grpc.deployments import ROLE_FROM_PB, spec_to_pb
from controlplane.core.deployments import PoolRole
from controlplane.deployspec import spec_from_dict
from controlplane.local.procs import EtcdServer, ManagedProcess
from tests.helpers import (
    ControlPlaneProc,
    start_agent,
    start_controlplane,
    start_ray_cluster,
    wait_until,
)
from tests.integration.test_deployments import list_workers
from tests.integration.test_gateway import create_tenants, start_gateway

pytestmark = pytest.mark.timeout(600)
MODEL = "plan-model"


@dataclass
class Stack:
    etcd: EtcdServer
    controlplane: ControlPlaneProc
    http_port: int
    key: str
    procs: list[ManagedProcess] = field(default_factory=list)

    def stub(self) -> Any:
        return deployments_pb2_grpc.DeploymentsStub(
            grpc.insecure_channel(self.controlplane.address)
        )


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("planner")
    etcd = EtcdServer(tmp / "etcd", log_path=tmp / "etcd.log").start()
    try:
        cluster, _ = start_ray_cluster(
            {
                "node_ip_address": "127.0.0.1", "num_cpus": 1, "num_gpus": 4,
                "object_store_memory": 80 * 1024 * 1024, "include_dashboard": False,
            }
        )  # fmt: skip
    except BaseException:
        etcd.stop()
        raise
    procs: list[ManagedProcess] = []
    cp: ControlPlaneProc | None = None
    try:
        keys = create_tenants(etcd.endpoint)
        gateway, http_port, _ = start_gateway(tmp, etcd.endpoint)
        procs.append(gateway)
        procs.append(
            start_agent(
                tmp,
                etcd.endpoint,
                "node-0",
                gpus=4,
                extra=["--ray-node-id", cluster.head_node.node_id],
            )
        )
        cp = start_controlplane(
            tmp, etcd.endpoint, "cp-1",
            extra=[
                "--ray-address", cluster.address, "--worker-ttl", "3",
                "--planner", "on", "--planner-interval", "2",
                "--planner-metrics-url", f"http://127.0.0.1:{http_port}/metrics",
                "--planner-scale-down-after", "6",
            ],
        )  # fmt: skip
        yield Stack(etcd, cp, http_port, keys["acme"], procs)
    finally:
        if cp is not None:
            cp.process.stop()
        for p in procs:
            p.stop()
        cluster.shutdown()
        etcd.stop()


def spec() -> deployments_pb2.ModelDeploymentSpec:
    return spec_to_pb(
        spec_from_dict(
            {
                "name": "plan",
                "model": MODEL,
                "engine": "sim",
                "engine_args": {"profile": "tiny-test", "speedup": "0.1"},
                "pools": [
                    {"role": "prefill", "replicas": 1},
                    {"role": "decode", "replicas": 1, "min_replicas": 1, "max_replicas": 3,
                     "autoscaling": True},
                ],
            }
        )
    )  # fmt: skip


class Load:
    """Open-loop requests at ``rate`` per second from a background thread (bounded pool)."""

    def __init__(self, stack: Stack) -> None:
        self.url = f"http://127.0.0.1:{stack.http_port}/v1/completions"
        self.key = stack.key
        self.rate = 0.0
        self.statuses: list[int] = []
        self.sent = 0
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._pool = ThreadPoolExecutor(max_workers=24)
        self._rng = random.Random(5)
        self._thread = threading.Thread(target=self._run, daemon=True)

    def one(self) -> None:
        body = {
            "model": MODEL, "max_tokens": 100, "ignore_eos": True, "temperature": 0,
            "prompt": [self._rng.randrange(1, 1000) for _ in range(100)],
        }  # fmt: skip
        req = urllib.request.Request(
            self.url, data=json.dumps(body).encode(),
            headers={"content-type": "application/json", "authorization": f"Bearer {self.key}"},
        )  # fmt: skip
        try:
            with urllib.request.urlopen(req, timeout=120) as resp:
                self.statuses.append(resp.status)
                resp.read()
        except urllib.error.HTTPError as e:
            self.statuses.append(e.code)
            self.errors.append(e.read().decode()[:300])
        except OSError as e:
            self.statuses.append(0)
            self.errors.append(str(e))

    def _run(self) -> None:
        sent = 0
        while not self._stop.is_set() and sent < 2000:
            if self.rate > 0:
                self._pool.submit(self.one)
                sent += 1
                self.sent = sent
            self._stop.wait(1.0 / self.rate if self.rate > 0 else 0.2)

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)
        self._pool.shutdown(wait=True)


def decode_pool(stack: Stack) -> tuple[int, int]:
    d = stack.stub().Get(deployments_pb2.GetDeploymentRequest(name="plan"), timeout=10)
    spec_pool = next(p for p in d.spec.pools if ROLE_FROM_PB[p.role] is PoolRole.DECODE)
    ready = next((p.ready for p in d.status.pools if ROLE_FROM_PB[p.role] is PoolRole.DECODE), 0)
    return spec_pool.replicas, ready


def decode_workers(stack: Stack) -> int:
    return sum(
        1 for w in list_workers(stack.etcd.endpoint).values()
        if w.model == MODEL and w.role == "decode"
    )  # fmt: skip


def test_load_step_adds_decode_replicas_and_removing_it_drains_them(stack: Stack) -> None:
    stub = stack.stub()
    stub.Apply(deployments_pb2.ApplyDeploymentRequest(spec=spec()), timeout=10)
    wait_until(lambda: decode_pool(stack) == (1, 1), 120, interval_s=0.5, what="1 decode ready")

    def gateway_serves() -> bool:
        req = urllib.request.Request(
            f"http://127.0.0.1:{stack.http_port}/v1/models",
            headers={"authorization": f"Bearer {stack.key}"},
        )
        with urllib.request.urlopen(req, timeout=5) as r:
            return MODEL in r.read().decode()

    wait_until(gateway_serves, 60, interval_s=0.5, what="gateway lists the model")
    with Load(stack) as load:
        load.rate = 2.0  # the step: about twice what one decode replica holds
        wait_until(
            lambda: (lambda s: s[0] > 1 and s[1] == s[0])(decode_pool(stack)),
            180, interval_s=1.0, what="planner raised decode and the replicas are ready",
        )  # fmt: skip
        grown = decode_pool(stack)[0]
        d = stub.Get(deployments_pb2.GetDeploymentRequest(name="plan"), timeout=10)
        ups = [
            x
            for x in d.planner.decisions
            if ROLE_FROM_PB[x.role] is PoolRole.DECODE and x.to_replicas > x.from_replicas
        ]
        assert ups and all(x.applied for x in ups)
        assert "→ +" in ups[0].reason and "decode" in ups[0].reason
        # the fixed prefill pool is only advised on
        pf = next(p for p in d.planner.pools if ROLE_FROM_PB[p.role] is PoolRole.PREFILL)
        assert not pf.autoscaling

        load.rate = 0.3  # the load goes away; a trickle keeps running through the drain
        sent_before_drain = load.sent
        wait_until(lambda: decode_pool(stack)[0] == 1, 120, interval_s=1.0,
                   what="planner lowered decode to 1")  # fmt: skip
        wait_until(lambda: decode_workers(stack) == 1, 120, interval_s=1.0,
                   what="surplus decode workers drained and gone")  # fmt: skip
        d = stub.Get(deployments_pb2.GetDeploymentRequest(name="plan"), timeout=10)
        downs = [x for x in d.planner.decisions if x.to_replicas < x.from_replicas]
        assert downs and all("(drain)" in x.reason for x in downs)
        assert load.sent > sent_before_drain  # requests were arriving while replicas drained
    assert grown > 1
    assert len(load.statuses) == load.sent >= 10
    assert set(load.statuses) == {200}, load.errors[:5]
