"""Every component serves /metrics with the catalogue's series, and the control plane's
/sd/targets finds the ones whose ports nobody chose: real etcd, a control plane
(``--metrics-port``), a node agent and a prefill + a decode worker (``--metrics-port`` left at
its default 0: any free port, published in etcd), a gateway (``/metrics`` on its HTTP port).

After one disaggregated request through the gateway, each scrape must carry the series a
dashboard reads, and every ``switchboard_*`` series any of them exposes must be one that
``controlplane/telemetry/metrics.py`` defines (metrics defined once). Loops are bounded.
"""

from __future__ import annotations

import asyncio
import json
import re
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from controlplane.adapters.etcd.client import EtcdClient
from controlplane.adapters.etcd.workers import EtcdWorkerRegistry
from controlplane.core.model import WorkerRecord
from controlplane.local.procs import EtcdServer, ManagedProcess, free_port
from controlplane.telemetry.metrics import exposed_names
from tests.helpers import start_agent, start_controlplane, start_worker, wait_until
from tests.integration.test_gateway import get_json, start_gateway

MODEL = "llama-3.1-8b"
pytestmark = pytest.mark.timeout(300)
SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})? (\S+)$")


@dataclass
class Stack:
    gateway_url: str
    cp_metrics: str
    workers: dict[str, WorkerRecord]
    agent_node: str


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as resp:
        assert resp.status == 200
        assert resp.headers["content-type"].startswith("text/plain")
        return str(resp.read().decode())


def samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    out = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = SAMPLE.match(line)
        assert m, line
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
        out.append((m.group(1), labels, float(m.group(3))))
    return out


def value(text: str, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels``."""
    return sum(
        v
        for n, ls, v in samples(text)
        if n == name and all(ls.get(k) == x for k, x in labels.items())
    )


def list_workers(endpoint: str) -> list[WorkerRecord]:
    async def run() -> list[WorkerRecord]:
        client = EtcdClient(endpoint)
        try:
            return await EtcdWorkerRegistry(client).list_workers()
        finally:
            await client.close()

    return asyncio.run(run())


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("metrics")
    etcd = EtcdServer(tmp / "etcd-data", log_path=tmp / "etcd.log").start()
    procs: list[ManagedProcess] = []
    cp = None
    try:
        metrics_port = free_port()
        cp = start_controlplane(
            tmp, etcd.endpoint, "cp-m", extra=["--metrics-port", str(metrics_port)]
        ).wait_serving()
        procs.append(start_agent(tmp, etcd.endpoint, "node-m", gpus=2))
        fast = ["--speedup", "20"]
        procs.append(start_worker(tmp, etcd.endpoint, "m-p", role="prefill", extra=fast).process)
        procs.append(start_worker(tmp, etcd.endpoint, "m-d", role="decode", extra=fast).process)
        gateway, http_port, _ = start_gateway(tmp, etcd.endpoint, ["--auth", "none"])
        procs.append(gateway)
        url = f"http://127.0.0.1:{http_port}"

        def ready() -> bool:
            status, body = get_json(f"{url}/v1/models")
            return status == 200 and [m["id"] for m in body["data"]] == [MODEL]

        wait_until(ready, 30, what="gateway sees the model")
        workers = {w.worker_id: w for w in list_workers(etcd.endpoint)}
        yield Stack(url, f"http://127.0.0.1:{metrics_port}", workers, "node-m")
    finally:
        for p in reversed(procs):
            p.stop()
        if cp is not None:
            cp.stop()
        etcd.stop()


def one_request(stack: Stack) -> None:
    body = {"model": MODEL, "prompt": "metrics please", "max_tokens": 5, "ignore_eos": True}
    req = urllib.request.Request(
        f"{stack.gateway_url}/v1/completions",
        data=json.dumps(body).encode(),
        headers={"content-type": "application/json", "x-sla-class": "standard"},
    )
    with urllib.request.urlopen(req, timeout=60) as resp:
        assert resp.status == 200
        assert json.loads(resp.read())["usage"]["completion_tokens"] == 5


def assert_defined_once(text: str) -> None:
    known = exposed_names()
    ours = {n for n, _, _ in samples(text) if n.startswith("switchboard_")}
    stray = {n for n in ours if n not in known and not n.endswith("_created")}
    assert not stray, f"series not defined in controlplane/telemetry/metrics.py: {sorted(stray)}"


def test_workers_publish_a_metrics_endpoint_and_serve_it(stack: Stack) -> None:
    one_request(stack)
    assert set(stack.workers) == {"m-p", "m-d"}
    for worker_id, rec in stack.workers.items():
        assert re.fullmatch(r"127\.0\.0\.1:\d+", rec.metrics_endpoint), rec
        assert rec.metrics_endpoint != rec.endpoint
        text = scrape(f"http://{rec.metrics_endpoint}/metrics")
        assert_defined_once(text)
        labels = {"worker": worker_id, "model": MODEL, "role": rec.role}
        for gauge in (
            "switchboard_worker_kv_cache_usage_ratio", "switchboard_worker_running_requests",
            "switchboard_worker_waiting_requests", "switchboard_worker_prefix_cache_hit_ratio",
        ):  # fmt: skip
            assert any(n == gauge and ls == labels for n, ls, _ in samples(text)), (gauge, text)
    prefill = scrape(f"http://{stack.workers['m-p'].metrics_endpoint}/metrics")
    decode = scrape(f"http://{stack.workers['m-d'].metrics_endpoint}/metrics")
    assert value(prefill, "switchboard_worker_tokens_total", kind="prefill") >= 1
    assert value(decode, "switchboard_worker_tokens_total", kind="decode") >= 4
    sent = value(prefill, "switchboard_kv_transfer_bytes_total", direction="send")
    received = value(decode, "switchboard_kv_transfer_bytes_total", direction="receive")
    assert sent > 0 and sent == received
    assert value(decode, "switchboard_kv_transfer_seconds_count", model=MODEL) >= 1


def test_gateway_metrics_carry_the_request(stack: Stack) -> None:
    one_request(stack)
    text = scrape(f"{stack.gateway_url}/metrics")
    assert_defined_once(text)
    who = {"tenant": "unknown", "model": MODEL, "sla_class": "standard"}
    assert value(text, "switchboard_requests_total", status="200", **who) >= 1
    assert value(text, "switchboard_ttft_seconds_bucket", le="2.0", **who) >= 1
    assert value(text, "switchboard_itl_seconds_bucket", le="0.1", **who) >= 1
    assert value(text, "switchboard_e2e_latency_seconds_count", **who) >= 1
    met = value(text, "switchboard_slo_met_total", **who)
    missed = value(text, "switchboard_slo_missed_total", **who)
    assert met + missed >= 1  # each finished request is judged once
    assert value(text, "switchboard_router_decisions_total", prefill="remote") >= 1
    assert value(text, "switchboard_router_decision_seconds_count", model=MODEL) >= 1
    assert value(text, "switchboard_router_reasons_total", model=MODEL) >= 1
    assert value(text, "switchboard_generation_tokens_total", model=MODEL) >= 5
    assert value(text, "switchboard_prompt_tokens_total", model=MODEL) >= 1
    assert value(text, "switchboard_in_flight_requests", model=MODEL) == 0


def test_control_plane_metrics_and_service_discovery(stack: Stack) -> None:
    def fleet_seen() -> str | None:
        text = scrape(f"{stack.cp_metrics}/metrics")
        serving = value(text, "switchboard_workers", model=MODEL, state="serving")
        return text if serving == 2 else None

    text = wait_until(fleet_seen, 30, 0.2, "the control plane counts both workers")
    assert text is not None
    assert_defined_once(text)
    assert value(text, "switchboard_leader", replica="cp-m") == 1
    assert value(text, "switchboard_leader_changes_total") >= 1
    assert value(text, "switchboard_nodes", state="ready") == 1
    assert value(text, "switchboard_gpus", state="healthy") == 2
    assert value(text, "switchboard_etcd_request_seconds_count", op="get") >= 1

    with urllib.request.urlopen(f"{stack.cp_metrics}/sd/targets", timeout=10) as resp:
        assert resp.headers["content-type"] == "application/json"
        groups = json.loads(resp.read())
    by_component: dict[str, set[str]] = {}
    for g in groups:
        by_component.setdefault(g["labels"]["component"], set()).update(g["targets"])
    assert by_component["worker"] == {w.metrics_endpoint for w in stack.workers.values()}
    assert by_component["gateway"] == {stack.gateway_url.removeprefix("http://")}
    (agent,) = by_component["node_agent"]
    agent_text = scrape(f"http://{agent}/metrics")
    assert_defined_once(agent_text)
    assert value(agent_text, "switchboard_node_gpus", node=stack.agent_node, state="healthy") == 2
    # the SD targets are what Prometheus scrapes: each one answers /metrics
    for g in groups:
        for target in g["targets"]:
            assert "switchboard_" in scrape(f"http://{target}/metrics")


def test_metrics_server_answers_unknown_paths_and_methods_clearly(stack: Stack) -> None:
    import urllib.error

    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(f"{stack.cp_metrics}/nope", timeout=10)
    assert e.value.code == 404
    req = urllib.request.Request(f"{stack.cp_metrics}/metrics", data=b"x", method="POST")
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=10)
    assert e.value.code == 405
