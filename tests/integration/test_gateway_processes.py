"""``switchboard gateway --processes 2``: two gateway processes behind one HTTP and one gRPC
address (SO_REUSEPORT), each a replica; ``/metrics`` answers their sum, ``/debug/requests``
finds a request whichever process routed it, a killed process is started again, SIGTERM
drains both.

Real etcd, one real sim worker (role both), the real supervisor and gateway processes.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from switchboard.v1 import inference_pb2, inference_pb2_grpc

from controlplane.adapters.etcd.client import EtcdClient
from controlplane.gateway.http_app import SIBLING_HEADER
from controlplane.local.procs import EtcdServer, ManagedProcess
from controlplane.planner import EtcdGatewaysSource
from tests.helpers import start_worker, wait_until
from tests.integration.test_gateway import create_tenants, get_json, start_gateway

pytestmark = pytest.mark.timeout(300)
MODEL = "llama-3.1-8b"


@dataclass
class Stack:
    etcd: EtcdServer
    gateway: ManagedProcess
    port: int
    grpc_port: int
    keys: dict[str, str]


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    etcd = EtcdServer(tmp_path / "etcd-data", log_path=tmp_path / "etcd.log").start()
    procs: list[ManagedProcess] = []
    try:
        keys = create_tenants(etcd.endpoint)
        worker = start_worker(tmp_path, etcd.endpoint, "proc-w", role="both", model=MODEL)
        procs.append(worker.process)
        gw, port, grpc_port = start_gateway(tmp_path, etcd.endpoint, ["--processes", "2"])
        procs.append(gw)
        yield Stack(etcd, gw, port, grpc_port, keys)
    finally:
        for p in reversed(procs):
            p.stop()
        etcd.stop()


def complete(port: int, key: str) -> str:
    """One completion on a new connection (the kernel picks the process per connection);
    returns the response id."""
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/completions",
        data=json.dumps({"model": MODEL, "prompt": "hello there", "max_tokens": 2}).encode(),
        headers={
            "content-type": "application/json",
            "authorization": f"Bearer {key}",
            "connection": "close",
        },
        method="POST",
    )
    with urllib.request.urlopen(req, timeout=60) as resp:
        assert resp.status == 200
        body = json.loads(resp.read())
    return str(body["id"])


def debug_status(port: int, request_id: str, key: str, *, sibling: bool = False) -> int:
    headers = {"authorization": f"Bearer {key}", "connection": "close"}
    if sibling:  # as one process asks another: no asking on
        headers[SIBLING_HEADER.decode()] = "1"
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/debug/requests/{request_id}", headers=headers
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            assert request_id.endswith(json.loads(resp.read())["request_id"])
            return int(resp.status)
    except urllib.error.HTTPError as e:
        return e.code


def requests_total(port: int, tenant: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith("switchboard_requests_total{") and f'tenant="{tenant}"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def gateway_processes(supervisor_pid: int) -> list[int]:
    """The supervisor's gateway processes (not multiprocessing's resource tracker)."""
    out = subprocess.run(
        ["pgrep", "-P", str(supervisor_pid)], capture_output=True, text=True, check=False
    ).stdout.split()
    pids = []
    for pid in out:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"spawn_main" in cmdline:
            pids.append(int(pid))
    return sorted(pids)


def records(endpoint: str) -> tuple[list[dict[str, object]], list[str]]:
    async def run() -> tuple[list[dict[str, object]], list[str]]:
        client = EtcdClient(endpoint)
        try:
            kvs, _ = await client.get_prefix(b"/switchboard/v1/gateways/")
            urls = await EtcdGatewaysSource(client, "/switchboard/v1").urls()
            return [json.loads(kv.value) for kv in kvs], urls
        finally:
            await client.close()

    return asyncio.run(run())


def test_two_processes_serve_one_address_as_one_gateway(stack: Stack) -> None:
    key = stack.keys["acme"]
    ids = [complete(stack.port, key) for _ in range(16)]

    # both processes registered as replicas, on one address: one source for the planner
    recs, urls = records(stack.etcd.endpoint)
    assert len(recs) == 2
    assert {r["http"] for r in recs} == {f"127.0.0.1:{stack.port}"}
    assert urls == [f"http://127.0.0.1:{stack.port}/metrics"]
    assert get_json(f"http://127.0.0.1:{stack.port}/health")[1]["replicas"] == 2

    # /metrics is the sum of both processes, whichever answers the scrape
    for _ in range(4):
        assert requests_total(stack.port, "acme") == 16

    # each process knows only the requests it routed ...
    alone = [debug_status(stack.port, i, key, sibling=True) for i in ids]
    assert set(alone) == {200, 404}, alone
    # ... and asks its sibling for the others: every request is found through the address
    assert [debug_status(stack.port, i, key) for i in ids] == [200] * len(ids)
    # another tenant's key still gets 404 (the sibling checks the key as well)
    assert debug_status(stack.port, ids[0], stack.keys["solo"]) == 404

    # the gRPC Inference service is shared the same way
    for _ in range(4):
        with grpc.insecure_channel(f"127.0.0.1:{stack.grpc_port}") as ch:
            out = list(
                inference_pb2_grpc.InferenceStub(ch).Generate(
                    inference_pb2.GenerateRequest(
                        model=MODEL,
                        prompt="hi",
                        sampling=inference_pb2.SamplingParams(max_tokens=2),
                    ),
                    timeout=60,
                    metadata=(("authorization", f"Bearer {key}"),),
                )
            )
        assert sum(len(m.token_ids) for m in out) == 2


def test_a_tenant_on_one_keep_alive_connection_gets_its_whole_quota(stack: Stack) -> None:
    """ "limited" may send 2 requests/min. Its one connection reaches one process, which gets
    the whole 2 (the other's clients ask for nothing), not half."""

    def both_replicas() -> bool:
        return all(
            get_json(f"http://127.0.0.1:{stack.port}/health")[1].get("replicas") == 2
            for _ in range(6)  # new connections: either process may answer
        )

    wait_until(both_replicas, 30, what="each process to see both replicas")
    conn = http.client.HTTPConnection("127.0.0.1", stack.port, timeout=60)
    statuses, messages = [], []
    try:
        for _ in range(3):
            conn.request(
                "POST",
                "/v1/completions",
                body=json.dumps({"model": MODEL, "prompt": "hi", "max_tokens": 2}),
                headers={
                    "content-type": "application/json",
                    "authorization": f"Bearer {stack.keys['limited']}",
                },
            )
            resp = conn.getresponse()
            statuses.append(resp.status)
            messages.append(json.loads(resp.read()).get("error", {}).get("message", ""))
    finally:
        conn.close()
    assert statuses == [200, 200, 429], messages
    assert "requests_per_minute 2" in messages[-1]


def test_a_killed_process_is_started_again_and_nothing_is_lost(stack: Stack) -> None:
    key = stack.keys["acme"]
    before = [complete(stack.port, key) for _ in range(8)]
    pids = gateway_processes(stack.gateway.pid)
    assert len(pids) == 2
    os.kill(pids[0], signal.SIGKILL)
    # gone and reaped (a dying process loses its command line before its sockets)
    wait_until(lambda: not Path(f"/proc/{pids[0]}").exists(), 10, what="the process gone")
    during = [complete(stack.port, key) for _ in range(8)]  # the other process serves
    wait_until(
        lambda: len(gateway_processes(stack.gateway.pid)) == 2, 30, what="a new gateway process"
    )
    assert stack.gateway.alive()
    (new,) = set(gateway_processes(stack.gateway.pid)) - set(pids)

    def both_serve() -> bool:
        ids = [complete(stack.port, key) for _ in range(8)]
        return set(debug_status(stack.port, i, key, sibling=True) for i in ids) == {200, 404}

    wait_until(both_serve, 30, what="the new process serving")
    # the killed process's counts stay in the sum (a counter never goes down)
    total = requests_total(stack.port, "acme")
    assert total >= len(before) + len(during) + 8
    assert new in gateway_processes(stack.gateway.pid)
    # what the killed process routed is gone with it; what the others routed is found
    assert all(debug_status(stack.port, i, key) == 200 for i in during)


def test_sigterm_drains_every_process_and_exits_0(stack: Stack) -> None:
    complete(stack.port, stack.keys["acme"])
    pids = gateway_processes(stack.gateway.pid)
    assert len(pids) == 2
    assert stack.gateway.proc is not None
    stack.gateway.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 30
    while stack.gateway.alive() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not stack.gateway.alive()
    assert stack.gateway.proc.returncode == 0
    assert not any(Path(f"/proc/{pid}").exists() for pid in pids)
    assert records(stack.etcd.endpoint)[0] == []  # both revoked their leases


def test_the_processes_go_when_the_supervisor_is_killed(stack: Stack) -> None:
    pids = gateway_processes(stack.gateway.pid)
    stack.gateway.kill()  # SIGKILL: no chance to stop them itself
    wait_until(
        lambda: not any(Path(f"/proc/{pid}").exists() for pid in pids), 30, what="orphans gone"
    )


def test_a_process_that_cannot_start_fails_the_start(tmp_path: Path) -> None:
    etcd = EtcdServer(tmp_path / "etcd-data", log_path=tmp_path / "etcd.log").start()
    try:
        argv = [
            sys.executable, "-m", "controlplane", "gateway", "--etcd", etcd.endpoint,
            "--listen", "127.0.0.1:0", "--grpc-listen", "", "--processes", "2",
            "--routing-profiles", str(tmp_path / "missing.yaml"),
        ]  # fmt: skip
        done = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
        assert done.returncode != 0
        assert "exited with code" in done.stderr and "before serving" in done.stderr
        assert "missing.yaml" in done.stderr  # the process's own error is in the log
        bad = subprocess.run(
            [*argv[:-2], "--processes", "0"], capture_output=True, text=True, timeout=60
        )
        assert bad.returncode != 0 and "--processes must be at least 1" in bad.stderr
    finally:
        etcd.stop()
