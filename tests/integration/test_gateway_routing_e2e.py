"""The SLA-aware router on the gateway's request path, end to end: real etcd, real
``switchboard worker --engine sim --profile tiny-test --speedup 10`` processes (one prefill, two
decode), a sim deployment record (``engine_args: {profile: tiny-test}``: the gateway's timing
model and KV block size), a real gateway process, requests over HTTP with
``X-Switchboard-Debug: route``.

* a prefix a decode worker holds (put there directly, so the gateway can know it only from the
  worker's KV events) draws the requests that share it; so does one the gateway routed itself;
* with the decode workers busy, a long prompt of the ``batch`` class (no ITL target, so the
  cut-over is the KV transfer: about 50 tokens with tiny-test) is prefilled on the prefill
  worker while a short one stays on its decode worker (tiny-test's prefill is so cheap that the
  ITL slack of ``interactive`` / ``standard`` absorbs any prompt that fits its 1k-token KV);
* the debug header names the workers and the plugins that decided;
* a decode worker killed mid-stream: the request moves to the other one (excluded from the
  SLA router's choice), with no gap and no duplicate.

Loops are bounded; nothing is timed.
"""

from __future__ import annotations

import asyncio
import json
import random
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from switchboard.v1 import inference_pb2, worker_pb2, worker_pb2_grpc

from controlplane.adapters.etcd.client import EtcdClient
from controlplane.adapters.etcd.deployments import EtcdDeploymentStore
from controlplane.deployspec import spec_from_dict
from controlplane.local.procs import EtcdServer, ManagedProcess
from tests.helpers import WorkerProc, start_worker, wait_until
from tests.integration.test_gateway import create_tenants, get_json, start_gateway, worker_stats
from workers.engines.sim_core import hash_blocks
from workers.profiles import load_profile

MODEL = "tiny-sim"
PROFILE = "tiny-test"
BLOCK = load_profile(PROFILE).block_size
VOCAB = load_profile(PROFILE).vocab_size
pytestmark = pytest.mark.timeout(600)


@dataclass
class Cluster:
    etcd: EtcdServer
    prefill: WorkerProc
    decodes: list[WorkerProc]
    gateway: ManagedProcess
    http_port: int
    key: str

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"


def apply_sim_deployment(etcd_endpoint: str) -> None:
    spec = spec_from_dict(
        {
            "name": "tiny-sim",
            "model": MODEL,
            "engine": "sim",
            "engine_args": {"profile": PROFILE},
            "pools": [{"role": "prefill", "replicas": 1}, {"role": "decode", "replicas": 2}],
        }
    )

    async def run() -> None:
        client = EtcdClient(etcd_endpoint)
        try:
            await EtcdDeploymentStore(client).apply(spec, now=time.time())
        finally:
            await client.close()

    asyncio.run(run())


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    tmp = tmp_path_factory.mktemp("gateway-routing")
    etcd = EtcdServer(tmp / "etcd-data", log_path=tmp / "etcd.log").start()
    procs: list[ManagedProcess] = []
    try:
        apply_sim_deployment(etcd.endpoint)
        key = create_tenants(etcd.endpoint)["acme"]
        common: dict[str, Any] = {
            "profile": PROFILE, "model": MODEL, "extra": ["--speedup", "10"],
        }  # fmt: skip
        prefill = start_worker(tmp, etcd.endpoint, "rt-p", role="prefill", **common)
        procs.append(prefill.process)
        decodes = []
        for i in range(2):
            d = start_worker(tmp, etcd.endpoint, f"rt-d{i}", role="decode", **common)
            procs.append(d.process)
            decodes.append(d)
        gateway, http_port, _ = start_gateway(tmp, etcd.endpoint)
        procs.append(gateway)
        c = Cluster(etcd, prefill, decodes, gateway, http_port, key)

        def ready() -> bool:
            status, body = get_json(f"{c.base_url}/v1/models", key)
            return status == 200 and [m["id"] for m in body["data"]] == [MODEL]

        wait_until(ready, 30, what="gateway sees the model")
        yield c
    finally:
        for p in reversed(procs):
            p.stop()
        etcd.stop()


def tokens(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(1, VOCAB) for _ in range(n)]


def complete(
    c: Cluster, prompt: list[int], max_tokens: int, *, sla_class: str = "", debug: bool = True
) -> tuple[int, dict[str, str], Any]:
    body: dict[str, Any] = {
        "model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
        "ignore_eos": True,
    }  # fmt: skip
    if sla_class:
        body["sla_class"] = sla_class
    headers = {"content-type": "application/json", "authorization": f"Bearer {c.key}"}
    if debug:
        headers["x-switchboard-debug"] = "route"
    req = urllib.request.Request(
        f"{c.base_url}/v1/completions", data=json.dumps(body).encode(), headers=headers
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            got = {k.lower(): v for k, v in resp.headers.items()}
            return resp.status, got, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, json.loads(e.read())


def route_of(headers: dict[str, str]) -> dict[str, str]:
    """``X-Switchboard-Route`` as fields (``why`` is last and may itself contain "; ")."""
    line = headers["x-switchboard-route"]
    assert len(line) <= 400
    fields: dict[str, str] = {}
    last = ""
    for part in line.split("; "):
        key, sep, value = part.partition("=")
        if sep and key.isidentifier() and key not in fields and last != "why":
            fields[key] = value
            last = key
        else:
            fields[last] += "; " + part
    return fields


def deciders(route: dict[str, str]) -> list[str]:
    return route["by"].split(",")


def test_a_prefix_a_worker_holds_draws_requests_from_its_kv_events(cluster: Cluster) -> None:
    rng = random.Random(1)
    prefix = tokens(rng, 16 * BLOCK)
    hashes = set(hash_blocks(prefix, BLOCK))
    target = cluster.decodes[1]
    # put the prefix on the target directly (not through the gateway), watching its reports
    with grpc.insecure_channel(target.address) as ch:
        stub = worker_pb2_grpc.WorkerStub(ch)
        watch = stub.WatchStats(worker_pb2.StatsRequest(), timeout=60)
        next(watch)  # subscribed before the request, so no event is missed
        chunks = list(
            stub.Decode(
                worker_pb2.DecodeRequest(
                    request_id="direct-1",
                    prompt_token_ids=prefix + tokens(rng, 8),
                    sampling=inference_pb2.SamplingParams(max_tokens=2, temperature=0),
                ),
                timeout=60,
            )
        )
        assert chunks[-1].finish_reason
        stored: set[int] = set()
        for msg in watch:  # bounded by the call's deadline
            for e in msg.kv_events:
                if e.kind == worker_pb2.KvBlockEvent.KIND_STORED:
                    stored.update(e.block_hashes)
            # the gateway's own stream carried the same reports
            if hashes <= stored and msg.running_requests == 0:
                break
        # two more reports (4 Hz): the gateway's stream got that report too, but its process
        # may apply it a moment later (a loaded CI machine routed before it once)
        for _ in range(2):
            next(watch)
        watch.cancel()

    status, headers, body = complete(cluster, prefix + tokens(rng, 8), 4)
    assert status == 200, body
    assert body["usage"]["completion_tokens"] == 4
    route = route_of(headers)
    assert route["policy"] == "sla"
    assert route["decode"] == target.worker_id
    assert route["prefill"] == "local"  # standard class: tiny-test's prefill fits the ITL slack
    assert "PrefixOverlap" in deciders(route)
    assert int(route["cached"]) == len(hashes)
    assert worker_stats(target).prefix_cache_hit_rate > 0  # the worker really hit its cache


def test_requests_sharing_a_prefix_follow_the_first_one(cluster: Cluster) -> None:
    rng = random.Random(2)
    prefix = tokens(rng, 16 * BLOCK)
    status, headers, _ = complete(cluster, prefix + tokens(rng, 5), 4)
    assert status == 200
    first = route_of(headers)
    holder = first["decode"]
    assert holder in {d.worker_id for d in cluster.decodes}
    for i in range(3):
        status, headers, _ = complete(cluster, prefix + tokens(rng, 6 + i), 4)
        assert status == 200
        route = route_of(headers)
        assert route["decode"] == holder, route
        assert "PrefixOverlap" in deciders(route)
        assert int(route["cached"]) == 16
    holder_proc = next(d for d in cluster.decodes if d.worker_id == holder)
    assert worker_stats(holder_proc).prefix_cache_hit_rate > 0


def test_long_prompt_prefills_remotely_while_a_short_one_stays_local(cluster: Cluster) -> None:
    stop = threading.Event()
    failures: list[int] = []

    def keep_decoders_busy(seed: int) -> None:
        rng = random.Random(seed)
        while not stop.is_set():  # prompts under one block: no prefix pulls them together
            status, _, _ = complete(cluster, tokens(rng, BLOCK - 4), 150, debug=False)
            if status != 200:
                failures.append(status)
                return

    background = [
        threading.Thread(target=keep_decoders_busy, args=(100 + i,), daemon=True) for i in range(3)
    ]
    for t in background:
        t.start()
    rng = random.Random(3)
    remote: dict[str, str] | None = None
    busy_short: dict[str, str] | None = None
    shorts: list[dict[str, str]] = []
    try:
        for _ in range(60):
            if remote is not None and busy_short is not None:
                break
            status, headers, _ = complete(cluster, tokens(rng, 12), 4, sla_class="batch")
            assert status == 200
            short = route_of(headers)
            shorts.append(short)
            if "KV transfer" in short.get("why", ""):  # decided beside a busy decode batch
                busy_short = short
            if remote is None:
                status, headers, body = complete(
                    cluster, tokens(rng, 20 * BLOCK), 4, sla_class="batch"
                )
                assert status == 200, body
                assert body["usage"]["completion_tokens"] == 4
                long = route_of(headers)
                if long["prefill"] != "local":
                    remote = long
            time.sleep(0.05)  # let the next load reports in
    finally:
        stop.set()
        for t in background:
            t.join(60)
    assert not failures
    assert remote is not None, "no long prompt was prefilled remotely"
    assert remote["policy"] == "sla"
    assert remote["prefill"] == cluster.prefill.worker_id
    assert remote["decode"] in {d.worker_id for d in cluster.decodes}
    assert "> KV transfer" in remote["why"]
    assert "prefill_by" in remote
    assert busy_short is not None, "no short prompt was routed beside a busy decode batch"
    assert all(s["prefill"] == "local" for s in shorts)
    with urllib.request.urlopen(f"{cluster.base_url}/metrics", timeout=10) as resp:
        metrics = resp.read().decode()
    assert 'switchboard_router_decisions_total{model="tiny-sim",policy="sla",prefill="remote"}' in (
        metrics
    )


def test_decode_worker_killed_mid_stream_migrates_excluding_it(cluster: Cluster) -> None:
    """Runs last: it kills a decode worker. Sim tokens depend on (seed, position), so with a
    seed the migrated stream equals an unbroken run."""
    prompt = tokens(random.Random(4), 40)
    body: dict[str, Any] = {
        "model": MODEL, "prompt": prompt, "max_tokens": 600, "seed": 7, "ignore_eos": True,
    }  # fmt: skip
    req = urllib.request.Request(
        f"{cluster.base_url}/v1/completions",
        data=json.dumps(body).encode(),
        headers={"content-type": "application/json", "authorization": f"Bearer {cluster.key}"},
    )
    with urllib.request.urlopen(req, timeout=60) as resp:
        whole = json.loads(resp.read())
    expected = whole["choices"][0]["text"]
    assert expected and whole["usage"]["completion_tokens"] == 600

    req = urllib.request.Request(
        f"{cluster.base_url}/v1/completions",
        data=json.dumps({**body, "stream": True}).encode(),
        headers={
            "content-type": "application/json",
            "authorization": f"Bearer {cluster.key}",
            "x-switchboard-debug": "route",
        },
    )
    parts: list[str] = []
    finish = None
    killed = ""
    with urllib.request.urlopen(req, timeout=60) as resp:
        first = route_of({k.lower(): v for k, v in resp.headers.items()})
        victim = next(d for d in cluster.decodes if d.worker_id == first["decode"])
        for raw in resp:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[len("data: ") :])
            assert "error" not in event, event
            parts.append(event["choices"][0]["text"])
            finish = event["choices"][0]["finish_reason"] or finish
            if not killed and len(parts) >= 10:
                victim.process.kill()
                killed = victim.worker_id
    assert killed
    assert finish == "length"
    assert "".join(parts) == expected  # no gap, no duplicate
    with urllib.request.urlopen(f"{cluster.base_url}/metrics", timeout=10) as resp:
        metrics = resp.read().decode()
    assert 'switchboard_migrations_total{model="tiny-sim"} 1.0' in metrics
