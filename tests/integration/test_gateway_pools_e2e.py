"""Worker pools and decision traces end to end: real etcd, a sim deployment record
(llama-3.1-8b-h100 timing, real time: prefill + decode pools and a long_context pool from
8,192 tokens), four real ``switchboard worker --engine sim`` processes that carry their pool
in their etcd record (``--pool``, ``--long-context-threshold``, ``--deployment``), a real
gateway with tenants, requests over HTTP.

* the gateway runs a ``--routing-profiles`` file with a profile for the deployment's
  interactive class;
* a 40k-token prompt goes to the long-context worker, which prefills it itself; while it does,
  that worker's load reports carry the queued prefill tokens, and short interactive requests go
  to the decode workers and all finish while the long prefill is still running (they do
  not wait behind it);
* two long prompts at once: the long-context worker prefills the first, and the base pool
  lends it an idle prefill worker for the second (decoded on the long-context worker);
* the decision trace (``GET /debug/requests/{id}``) names the plugins that decided; another
  tenant's key gets 404, no key 401;
* ``switchboard explain request cmpl-<id>`` prints the explanation.

Loops are bounded; no absolute time is asserted, only orderings within one run.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from controlplane.adapters.etcd.client import EtcdClient
from controlplane.adapters.etcd.deployments import EtcdDeploymentStore
from controlplane.deployspec import spec_from_dict
from controlplane.local.procs import EtcdServer, ManagedProcess
from tests.helpers import PYTHON, WorkerProc, start_worker, wait_until
from tests.integration.test_gateway import create_tenants, get_json, start_gateway, worker_stats

MODEL = "lc-sim"
PROFILE = "llama-3.1-8b-h100"
THRESHOLD = 8192
pytestmark = pytest.mark.timeout(600)


@dataclass
class Cluster:
    etcd: EtcdServer
    prefills: list[WorkerProc]
    decodes: list[WorkerProc]
    long_context: WorkerProc
    gateway: ManagedProcess
    http_port: int
    keys: dict[str, str]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"


def apply_deployment(etcd_endpoint: str) -> None:
    spec = spec_from_dict(
        {
            "name": "lc-sim", "model": MODEL, "engine": "sim",
            "engine_args": {"profile": PROFILE},
            "pools": [
                {"role": "prefill", "replicas": 2},
                {"role": "decode", "replicas": 2},
                {"role": "long_context", "replicas": 1, "context_threshold_tokens": THRESHOLD},
            ],
        }
    )  # fmt: skip

    async def run() -> None:
        client = EtcdClient(etcd_endpoint)
        try:
            await EtcdDeploymentStore(client).apply(spec, now=time.time())
        finally:
            await client.close()

    asyncio.run(run())


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    tmp = tmp_path_factory.mktemp("gateway-pools")
    etcd = EtcdServer(tmp / "etcd-data", log_path=tmp / "etcd.log").start()
    procs: list[ManagedProcess] = []
    try:
        apply_deployment(etcd.endpoint)
        keys = create_tenants(etcd.endpoint)
        pool = ["--deployment", "lc-sim", "--long-context-threshold", str(THRESHOLD)]

        def start(worker_id: str, role: str, pool_name: str) -> WorkerProc:
            w = start_worker(tmp, etcd.endpoint, worker_id, role=role, profile=PROFILE,
                             model=MODEL, extra=[*pool, "--pool", pool_name])  # fmt: skip
            procs.append(w.process)
            return w

        prefills = [start(f"p-{i}", "prefill", "prefill") for i in range(2)]
        decodes = [start(f"d-{i}", "decode", "decode") for i in range(2)]
        lc = start("lc-0", "both", "long_context")
        profiles = tmp / "routing-profiles.yaml"
        profiles.write_text(
            "deployments:\n"
            "  lc-sim:\n"
            "    classes:\n"
            "      interactive:\n"
            "        decode: {scorers: {TtftHeadroom: 3, ItlHeadroom: 2, LoadBalance: 1}}\n"
        )
        gateway, http_port, _ = start_gateway(
            tmp, etcd.endpoint, ["--routing-profiles", str(profiles)]
        )
        procs.append(gateway)
        c = Cluster(etcd, prefills, decodes, lc, gateway, http_port, keys)

        def ready() -> bool:
            status, body = get_json(f"{c.base_url}/v1/models", keys["acme"])
            return status == 200 and [m["id"] for m in body["data"]] == [MODEL]

        wait_until(ready, 30, what="gateway sees the model")
        yield c
    finally:
        for p in reversed(procs):
            p.stop()
        etcd.stop()


@dataclass
class Result:
    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    body: Any = None
    seconds: float = 0.0


def complete(
    c: Cluster, prompt: list[int], max_tokens: int, *, request_id: str, sla_class: str
) -> Result:
    body = {
        "model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
        "ignore_eos": True, "sla_class": sla_class,
    }  # fmt: skip
    headers = {
        "content-type": "application/json",
        "authorization": f"Bearer {c.keys['acme']}",
        "x-switchboard-debug": "route",
        "x-request-id": request_id,
    }
    req = urllib.request.Request(
        f"{c.base_url}/v1/completions", data=json.dumps(body).encode(), headers=headers
    )
    started = time.monotonic()
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            got = {k.lower(): v for k, v in resp.headers.items()}
            return Result(resp.status, got, json.loads(resp.read()), time.monotonic() - started)
    except urllib.error.HTTPError as e:
        got = {k.lower(): v for k, v in e.headers.items()}
        return Result(e.code, got, json.loads(e.read()), time.monotonic() - started)


def route_field(r: Result, name: str) -> str:
    fields = dict(p.partition("=")[::2] for p in r.headers["x-switchboard-route"].split("; "))
    return fields[name]


def decode_of(r: Result) -> str:
    return route_field(r, "decode")


def start_long(
    c: Cluster, prompt: list[int], *, request_id: str, sla_class: str
) -> tuple[threading.Thread, list[Result], int]:
    """Send ``prompt`` (4 tokens) on a thread and wait until lc-0's reports show it being
    prefilled; returns the thread, the list its Result lands in, and the largest queued
    prefill lc-0 reported."""
    done: list[Result] = []

    def send() -> None:
        done.append(complete(c, prompt, 4, request_id=request_id, sla_class=sla_class))

    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    seen = 0

    def prefilling() -> bool:
        nonlocal seen
        s = worker_stats(c.long_context)
        if s.HasField("queued_prefill_tokens"):
            seen = max(seen, s.queued_prefill_tokens)
        return seen > 0 or not thread.is_alive()

    wait_until(prefilling, 30, what=f"{request_id} being prefilled on lc-0")
    assert thread.is_alive(), f"{request_id} ended before the test went on: {done}"
    return thread, done, seen


def test_a_long_prompt_goes_to_the_pool_and_short_ones_do_not_wait_behind_it(
    cluster: Cluster,
) -> None:
    c = cluster
    long_prompt = [(i * 7919) % 120_000 + 1 for i in range(40_000)]
    thread, done, seen_queue = start_long(c, long_prompt, request_id="long-1", sla_class="batch")
    # the long-context worker's reports said how much was left to prefill
    assert THRESHOLD <= seen_queue <= len(long_prompt)

    shorts = [
        complete(c, [i + 1] * 64, 4, request_id=f"short-{i}", sla_class="interactive")
        for i in range(6)
    ]
    still_prefilling = thread.is_alive()
    thread.join(120)
    (long,) = done
    assert long.status == 200, long.body
    assert decode_of(long) == "lc-0"
    assert "prefill=local" in long.headers["x-switchboard-route"]
    assert long.body["id"] == "cmpl-long-1"
    for r in shorts:
        assert r.status == 200, r.body
        assert decode_of(r) in ("d-0", "d-1")
    # none of them waited behind the 40k-token prefill: all were done before it
    assert still_prefilling
    assert max(r.seconds for r in shorts) < long.seconds / 3


def test_the_decision_trace_names_the_plugins_and_is_the_tenants_own(cluster: Cluster) -> None:
    c = cluster
    status, body = get_json(f"{c.base_url}/debug/requests/cmpl-long-1", c.keys["acme"])
    assert status == 200, body
    route = body["routes"][0]
    assert (route["decode"], route["prefill"], route["policy"]) == ("lc-0", None, "sla")
    assert "LongContext" in route["plugins"]  # it kept the decode workers out
    decode_stage = route["stages"][0]
    assert decode_stage["profile"] == "default:decode"  # the file names no batch profile
    assert {r["worker"]: r["plugin"] for r in decode_stage["rejections"]} == {
        "d-0": "LongContext", "d-1": "LongContext", "p-0": "Role", "p-1": "Role",
    }  # fmt: skip
    # lc-0 was idle and the batch class has no TTFT target: no reason to borrow a worker
    assert route["prefill_verdict"]["reason"] == "decode batch empty: delays no one"
    status, body = get_json(f"{c.base_url}/debug/requests/short-0", c.keys["acme"])
    assert status == 200
    short = body["routes"][0]
    assert short["stages"][0]["profile"] == "lc-sim/interactive:decode"  # the file's
    assert set(short["stages"][0]["weights"]) == {"TtftHeadroom", "ItlHeadroom", "LoadBalance"}
    assert {r["worker"]: r["plugin"] for r in short["stages"][0]["rejections"]} == {
        "lc-0": "LongContext", "p-0": "Role", "p-1": "Role",
    }  # fmt: skip
    assert {"Role", "LongContext"} <= set(short["plugins"])
    # two idle decode workers tie (the rng picks): no scorer decided, or one that was weighed
    assert set(short["deciders"]["decode"]) <= set(short["stages"][0]["weights"])

    status, body = get_json(f"{c.base_url}/debug/requests/cmpl-long-1", c.keys["limited"])
    assert status == 404 and body["error"]["code"] == "not_found"
    status, _ = get_json(f"{c.base_url}/debug/requests/cmpl-long-1")
    assert status == 401
    status, _ = get_json(f"{c.base_url}/debug/requests/no-such-request", c.keys["acme"])
    assert status == 404


def test_switchboard_explain_request(cluster: Cluster) -> None:
    c = cluster

    def explain(key: str, *extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [PYTHON, "-m", "controlplane", "explain", "request", "cmpl-long-1",
             "--gateway", c.base_url, "--api-key", key, *extra],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip

    out = explain(c.keys["acme"])
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "request long-1: model lc-sim, tenant acme, class batch" in text
    assert "decode lc-0, prefill local" in text
    assert "plugins that decided: " in text and "LongContext" in text
    assert "rejected d-0: prompt 40000 tokens >= long-context threshold 8192" in text
    as_json = explain(c.keys["acme"], "-o", "json")
    assert json.loads(as_json.stdout)["routes"][0]["decode"] == "lc-0"
    denied = explain(c.keys["limited"])
    assert denied.returncode != 0 and "404" in denied.stderr


def test_a_busy_pool_borrows_an_idle_base_prefill_worker(cluster: Cluster) -> None:
    """Two long prompts (standard class: 2 s TTFT) at once: lc-0 prefills the first itself;
    the second would queue behind it there, so an idle base prefill worker prefills it and
    hands the KV to lc-0, which decodes both."""
    c = cluster
    first_prompt = [(i * 7919) % 120_000 + 3 for i in range(30_000)]
    second_prompt = [(i * 7907) % 120_000 + 5 for i in range(30_000)]
    thread, done, _ = start_long(c, first_prompt, request_id="long-a", sla_class="standard")
    second = complete(c, second_prompt, 4, request_id="long-b", sla_class="standard")
    thread.join(120)
    (first,) = done
    assert (first.status, second.status) == (200, 200), (first.body, second.body)
    assert (decode_of(first), route_field(first, "prefill")) == ("lc-0", "local")
    assert decode_of(second) == "lc-0"
    assert route_field(second, "prefill") in ("p-0", "p-1"), second.headers
    assert second.body["usage"]["completion_tokens"] == 4
    status, body = get_json(f"{c.base_url}/debug/requests/cmpl-long-b", c.keys["acme"])
    assert status == 200, body
    route = body["routes"][0]
    assert (route["decode"], route["prefill"]) == ("lc-0", route_field(second, "prefill"))
    assert "on lc-0" in route["prefill_verdict"]["reason"]
