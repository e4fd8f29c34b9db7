"""The dashboards and rules against a real Prometheus that scraped a real stack.

Started here, all on 127.0.0.1: etcd; a control plane (``--metrics-port``, which also serves
Prometheus HTTP service discovery at ``/sd/targets``); a node agent; sim workers of
``tiny-sim`` (one prefill, two decode, ``--speedup 10``) and of ``slow-sim`` (one aggregated
worker at ``--speedup 0.003``: a first token takes ~0.7 s, past the interactive class's 500 ms
TTFT target, so every interactive request to it misses its SLO: the *forced miss*; its
deployment record says so, so the gateway holds those requests in its late lane); the
gateway with tenants ``alpha`` and ``beta`` (and ``capped``, 2 requests a minute, for 429s,
and ``solo``, one request at a time, for the admission queue);
and Prometheus (``controlplane/local/monitoring.py``) scraping every second with
``deploy/prometheus/rules/`` evaluated every second. Workers are found through the control
plane's service discovery, the rest is static, as in ``make up MONITORING=1``.

A bounded load (interactive, standard and batch requests of both tenants, the forced miss,
429s, a client that hangs up mid-stream, direct prefill -> decode KV hand-offs and a few
decodes of KV that no longer exists) runs for ~10 s, and ends with a decode worker killed
mid-stream (the gateway migrates the stream). Then every dashboard panel query, every
template variable, every recording rule and every alert rule (and the data each alert reads)
is evaluated through Prometheus' HTTP API: each must parse and return data.

**Windows.** The production rules are used as they are, no test-mode copies: a rate over a
window longer than the data (1h, 6h, 30d against ~30 s of history) is the rate over all the
data there is, so the 1h/5m fast-burn pair sees the forced misses as a 100 % error ratio.
What the rules' ``for:`` durations do is covered by ``promtool test rules``
(``deploy/prometheus/tests/``); here the alert *expressions* are evaluated.

**What may legitimately return no data** (``NOT_EXERCISED``, 6 counters): events this stack
does not produce — a worker failing before a request's first token (retries), prefilled KV
vanishing before a routed decode (re-prefills), repeated worker failures (circuit breakers),
and the reconciler's work (placements, restarts, actions), which needs Ray. A query reading one
of them may be empty, but the metric must be declared by a component Prometheus scraped (its
``# TYPE`` line, seen through ``/api/v1/targets/metadata``), so a real event would show; and
each must really be empty (else the list is stale). Alert expressions return nothing for a
healthy part of the stack (no leader, nodes lost, crash-looping); the ones this load makes true
(burn rates of the forced miss, KV transfer failures) must return those series.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import math
import re
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from switchboard.v1 import inference_pb2, worker_pb2, worker_pb2_grpc

from controlplane.adapters.etcd.client import EtcdClient
from controlplane.adapters.etcd.deployments import EtcdDeploymentStore
from controlplane.adapters.etcd.tenants import EtcdTenantStore
from controlplane.core.tenants import Quotas, Tenant
from controlplane.deployspec import spec_from_dict
from controlplane.local.monitoring import (
    PrometheusServer,
    PrometheusSettings,
    ScrapeTargets,
    prometheus_config,
)
from controlplane.local.procs import EtcdServer, ManagedProcess, free_port
from dashboards.definitions import all_dashboards
from dashboards.promql import metric_names
from dashboards.rules import alert_rules, recording_rules
from dashboards.slo import OBJECTIVES
from tests.helpers import WorkerProc, start_agent, start_controlplane, start_worker, wait_until
from tests.integration.test_gateway import start_gateway

MODEL = "tiny-sim"
SLOW_MODEL = "slow-sim"
SLOW_SPEEDUP = "0.003"
PROFILE = "tiny-test"
pytestmark = pytest.mark.timeout(240)

NOT_EXERCISED = {
    "switchboard_retries_total": "needs a worker to fail before the first token",
    "switchboard_kv_reprefills_total": "needs prefilled KV to vanish before a routed decode",
    "switchboard_circuit_open_total": "needs a worker to fail repeatedly (one dies here)",
    "switchboard_placement_failures_total": "needs the reconciler (Ray)",
    "switchboard_worker_restarts_total": "needs the reconciler (Ray)",
    "switchboard_reconcile_actions_total": "needs the reconciler (Ray)",
}
FIRING: dict[str, set[Any]] = {
    # alert -> label sets its expression must return (a subset of what it returns)
    "SwitchboardSLOFastBurn": {("beta", SLOW_MODEL, "interactive")},
    "SwitchboardSLOSlowBurn": {("beta", SLOW_MODEL, "interactive")},
    "SwitchboardKvTransferFailures": {MODEL},
}
QUIET = {"SwitchboardNoLeader", "SwitchboardNodesLost", "SwitchboardWorkersCrashLooping"}


# --- Prometheus' HTTP API -------------------------------------------------------------------


class PromQLError(AssertionError):
    pass


def api(base: str, path: str, params: dict[str, str]) -> Any:
    url = f"{base}{path}?{urllib.parse.urlencode(params)}"
    try:
        with urllib.request.urlopen(url, timeout=30) as resp:
            doc = json.loads(resp.read())
    except urllib.error.HTTPError as e:
        doc = json.loads(e.read() or b"{}")
        raise PromQLError(f"{path} {params}: {doc.get('errorType')}: {doc.get('error')}") from e
    assert doc["status"] == "success", doc
    return doc["data"]


def query(base: str, expr: str) -> list[dict[str, Any]]:
    data = api(base, "/api/v1/query", {"query": expr, "time": f"{time.time():.3f}"})
    assert data["resultType"] in ("vector", "scalar"), data
    return list(data["result"]) if data["resultType"] == "vector" else [data]


def query_range(base: str, expr: str, start: float, end: float) -> list[dict[str, Any]]:
    params = {"query": expr, "start": f"{start:.3f}", "end": f"{end:.3f}", "step": "1"}
    return [s for s in api(base, "/api/v1/query_range", params)["result"] if s["values"]]


def grafana(
    expr: str, tenant: str = ".*", model: str = ".*", cls: str = ".*", rate_interval: str = "10s"
) -> str:
    """``expr`` as Grafana sends it with these variable values ("All" is ``.*``)."""
    return (
        expr.replace("$__rate_interval", rate_interval)
        .replace("$tenant", tenant)
        .replace("$model", model)
        .replace("$class", cls)
    )


# --- the stack ------------------------------------------------------------------------------


@dataclass
class Stack:
    prom: PrometheusServer
    load_started: float
    load_ended: float
    killed_worker: str
    """The decode worker killed mid-stream at the end of the load."""
    exported: set[str] = field(default_factory=set)
    """Metric names (as stored) whose ``# TYPE`` Prometheus saw on some target."""

    @property
    def url(self) -> str:
        return self.prom.url


def _etcd(endpoint: str, fn: Callable[[EtcdClient], Any]) -> Any:
    async def run() -> Any:
        client = EtcdClient(endpoint)
        try:
            return await fn(client)
        finally:
            await client.close()

    return asyncio.run(run())


def setup_etcd(endpoint: str) -> dict[str, str]:
    spec = spec_from_dict(
        {
            "name": MODEL,
            "model": MODEL,
            "engine": "sim",
            "engine_args": {"profile": PROFILE},
            "pools": [{"role": "prefill", "replicas": 1}, {"role": "decode", "replicas": 1}],
        }
    )
    # the slow worker's deployment says how slow it is: the gateway predicts its interactive
    # requests late and holds each until the worker has no prefill queue (the late lane)
    slow = spec_from_dict(
        {
            "name": SLOW_MODEL,
            "model": SLOW_MODEL,
            "engine": "sim",
            "engine_args": {"profile": PROFILE, "speedup": SLOW_SPEEDUP},
            "pools": [{"role": "aggregated", "replicas": 1}],
        }
    )
    tenants = [
        Tenant("alpha", ("*",), ()),
        Tenant("beta", ("*",), ()),
        Tenant("capped", ("*",), (), quotas=Quotas(requests_per_minute=2)),
        Tenant("solo", ("*",), (), quotas=Quotas(max_concurrent=1)),
    ]

    async def run(client: EtcdClient) -> dict[str, str]:
        await EtcdDeploymentStore(client).apply(spec, now=time.time())
        await EtcdDeploymentStore(client).apply(slow, now=time.time())
        store = EtcdTenantStore(client)
        return {t.name: (await store.create(t)).api_key for t in tenants}

    keys: dict[str, str] = _etcd(endpoint, run)
    return keys


def complete(
    port: int, key: str, model: str, sla_class: str, max_tokens: int, seed: int = 0
) -> int:
    """One completion of a 64-token prompt; prompts of the same ``seed`` share every block."""
    prompt = [(seed * 7919 + i) % 997 + 1 for i in range(64)]
    body = {
        "model": model, "prompt": prompt, "max_tokens": max_tokens,
        "temperature": 0, "ignore_eos": True, "sla_class": sla_class,
    }  # fmt: skip
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/completions",
        data=json.dumps(body).encode(),
        headers={"content-type": "application/json", "authorization": f"Bearer {key}"},
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            resp.read()
            return int(resp.status)
    except urllib.error.HTTPError as e:
        e.read()
        return int(e.code)


def kill_decoder_mid_stream(port: int, key: str, decoders: dict[str, WorkerProc]) -> str:
    """A streamed request whose decode worker is killed after a few chunks: the gateway moves
    it to the other decode worker (a migration). Returns the killed worker's id."""
    body = {
        "model": MODEL, "prompt": list(range(500, 540)), "max_tokens": 300, "seed": 7,
        "ignore_eos": True, "stream": True, "sla_class": "standard",
    }  # fmt: skip
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/completions",
        data=json.dumps(body).encode(),
        headers={
            "content-type": "application/json",
            "authorization": f"Bearer {key}",
            "x-switchboard-debug": "route",
        },
    )
    killed = ""
    chunks = 0
    finish = None
    with urllib.request.urlopen(req, timeout=60) as resp:
        route = re.search(r"(?:^|; )decode=([^;]+)", resp.headers["x-switchboard-route"])
        assert route, resp.headers["x-switchboard-route"]
        victim = decoders[route.group(1)]
        for raw in resp:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[len("data: ") :])
            assert "error" not in event, event
            chunks += 1
            finish = event["choices"][0]["finish_reason"] or finish
            if not killed and chunks >= 5:
                victim.process.kill()
                killed = victim.worker_id
    assert killed and finish == "length", (killed, finish)
    return killed


def hang_up_mid_stream(port: int, key: str) -> None:
    """A streamed request whose client goes away after the first bytes of the answer."""
    body = json.dumps(
        {"model": MODEL, "prompt": list(range(1, 33)), "max_tokens": 400, "ignore_eos": True,
         "stream": True, "sla_class": "standard"}
    )  # fmt: skip
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request(
            "POST",
            "/v1/completions",
            body=body,
            headers={"content-type": "application/json", "authorization": f"Bearer {key}"},
        )
        resp = conn.getresponse()
        assert resp.status == 200
        resp.read(64)
    finally:
        conn.close()


def kv_hand_offs(prefill: WorkerProc, decode: WorkerProc, rounds: int) -> None:
    """Direct prefill -> decode hand-offs (KV transfer bytes and latency on both workers),
    and decodes of KV the prefill worker never held (KV transfer failures)."""
    params = inference_pb2.SamplingParams(max_tokens=2, temperature=0)
    with (
        grpc.insecure_channel(prefill.address) as pc,
        grpc.insecure_channel(decode.address) as dc,
    ):
        p, d = worker_pb2_grpc.WorkerStub(pc), worker_pb2_grpc.WorkerStub(dc)
        for i in range(rounds):
            prompt = list(range(100 + i, 164 + i))
            res = p.Prefill(
                worker_pb2.PrefillRequest(
                    request_id=f"kv-{i}", prompt_token_ids=prompt, sampling=params
                ),
                timeout=30,
            )
            chunks = list(
                d.Decode(
                    worker_pb2.DecodeRequest(
                        request_id=f"kv-{i}", prompt_token_ids=prompt, kv=res.kv,
                        first_token_id=res.first_token_id, sampling=params,
                    ),
                    timeout=30,
                )
            )  # fmt: skip
            assert chunks[-1].finish_reason
            gone = worker_pb2.KvHandle()
            gone.CopyFrom(res.kv)
            gone.kv_id = f"gone-{i}"
            with pytest.raises(grpc.RpcError):
                list(
                    d.Decode(
                        worker_pb2.DecodeRequest(
                            request_id=f"gone-{i}", prompt_token_ids=prompt, kv=gone,
                            first_token_id=res.first_token_id, sampling=params,
                        ),
                        timeout=30,
                    )
                )  # fmt: skip
            time.sleep(1.2)  # across scrapes: a counter's first value is no increase


def run_load(
    http_port: int, keys: dict[str, str], prefill: WorkerProc, decoders: list[WorkerProc]
) -> str:
    """Runs the load; returns the id of the decode worker killed at its end."""
    decode = decoders[0]
    errors: list[BaseException] = []
    statuses: dict[str, list[int]] = {}
    lock = threading.Lock()

    def worker(name: str, fn: Callable[[], None]) -> None:
        try:
            fn()
        except BaseException as e:
            errors.append(AssertionError(f"{name}: {e!r}"))

    def requests(
        tenant: str, model: str, cls: str, n: int, pause_s: float, tokens: int, unique: bool
    ) -> None:
        for i in range(n):
            status = complete(http_port, keys[tenant], model, cls, tokens, i + 1 if unique else 0)
            with lock:
                statuses.setdefault(f"{tenant}/{model}/{cls}", []).append(status)
            time.sleep(pause_s)

    def capped() -> None:
        for _ in range(4):
            status = complete(http_port, keys["capped"], MODEL, "standard", 4)
            with lock:
                statuses.setdefault("capped", []).append(status)
            time.sleep(1.0)

    def solo() -> None:
        """Three requests at once from a tenant allowed one at a time: two wait in the
        admission queue (queue wait, queue depth, queued)."""
        for _ in range(3):
            burst = [
                threading.Thread(
                    target=lambda: complete(http_port, keys["solo"], MODEL, "standard", 32),
                    daemon=True,
                )
                for _ in range(3)
            ]
            for t in burst:
                t.start()
            for t in burst:
                t.join(30)
            time.sleep(1.0)

    def hang_ups() -> None:
        for _ in range(3):
            hang_up_mid_stream(http_port, keys["alpha"])
            time.sleep(1.0)

    jobs: list[tuple[str, Callable[[], None]]] = [
        ("alpha interactive", lambda: requests("alpha", MODEL, "interactive", 20, 0.4, 8, False)),
        ("alpha standard", lambda: requests("alpha", MODEL, "standard", 15, 0.5, 16, True)),
        ("alpha batch", lambda: requests("alpha", MODEL, "batch", 8, 1.0, 8, False)),
        ("beta standard", lambda: requests("beta", MODEL, "standard", 15, 0.5, 8, False)),
        (
            "beta interactive (forced miss)",
            lambda: requests("beta", SLOW_MODEL, "interactive", 5, 0.3, 2, True),
        ),
        ("capped", capped),
        ("solo", solo),
        ("hang-ups", hang_ups),
        ("kv", lambda: kv_hand_offs(prefill, decode, 4)),
    ]
    threads = [threading.Thread(target=worker, args=job, daemon=True) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    assert not any(t.is_alive() for t in threads), "load did not finish in 90 s"
    assert not errors, errors
    ok = {k: v.count(200) for k, v in statuses.items()}
    assert all(ok[k] == len(v) for k, v in statuses.items() if k != "capped"), statuses
    assert statuses["capped"].count(429) >= 2, statuses
    return kill_decoder_mid_stream(http_port, keys["alpha"], {d.worker_id: d for d in decoders})


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("monitoring")
    etcd = EtcdServer(tmp / "etcd-data", log_path=tmp / "etcd.log").start()
    procs: list[ManagedProcess] = []
    prom: PrometheusServer | None = None
    try:
        keys = setup_etcd(etcd.endpoint)
        cp_metrics, agent_metrics = free_port(), free_port()
        cp = start_controlplane(
            tmp, etcd.endpoint, "mon-cp", extra=["--metrics-port", str(cp_metrics)]
        )
        procs.append(cp.process)
        procs.append(
            start_agent(
                tmp, etcd.endpoint, "mon-node", extra=["--metrics-port", str(agent_metrics)]
            )
        )
        common: dict[str, Any] = {"profile": PROFILE, "model": MODEL}
        fast = ["--speedup", "10", "--metrics-port", "0"]
        prefill = start_worker(tmp, etcd.endpoint, "mon-p", role="prefill", extra=fast, **common)
        procs.append(prefill.process)
        decoders = [
            start_worker(tmp, etcd.endpoint, f"mon-d{i}", role="decode", extra=fast, **common)
            for i in range(2)
        ]
        procs += [d.process for d in decoders]
        slow = start_worker(
            tmp, etcd.endpoint, "mon-slow", role="both", profile=PROFILE, model=SLOW_MODEL,
            extra=["--speedup", SLOW_SPEEDUP, "--metrics-port", "0"],
        )  # fmt: skip
        procs.append(slow.process)
        gateway, http_port, _ = start_gateway(tmp, etcd.endpoint)
        procs.append(gateway)

        prom = PrometheusServer(
            tmp / "prometheus",
            prometheus_config(
                ScrapeTargets(
                    gateways=[f"127.0.0.1:{http_port}"],
                    controlplanes=[f"127.0.0.1:{cp_metrics}"],
                    node_agents=[f"127.0.0.1:{agent_metrics}"],
                    sd_urls=[f"http://127.0.0.1:{cp_metrics}/sd/targets"],
                ),
                PrometheusSettings(
                    scrape_interval="1s", evaluation_interval="1s", sd_refresh_interval="1s"
                ),
            ),
            log_path=tmp / "prometheus.log",
        ).start()
        base = prom.url

        def all_up() -> bool:
            targets = api(base, "/api/v1/targets", {"state": "active"})["activeTargets"]
            jobs = {t["labels"]["job"] for t in targets if t["health"] == "up"}
            discovered = [t for t in targets if t["scrapePool"] == "switchboard-discovered"]
            return (
                len(discovered) >= 4
                and all(t["health"] == "up" for t in targets)
                and jobs >= {"switchboard-gateway", "switchboard-controlplane"}
            )

        wait_until(all_up, 30, interval_s=0.5, what="every target discovered and up")
        wait_until(
            lambda: complete(http_port, keys["alpha"], MODEL, "standard", 2) == 200,
            30,
            interval_s=0.5,
            what="the gateway serves",
        )
        started = time.time()
        killed = run_load(http_port, keys, prefill, decoders)
        ended = time.time()
        # two more scrapes and rule evaluations after the last request
        wait_until(
            lambda: query(base, 'switchboard:slo_error_ratio:rate5m{tenant="beta"}'),
            20,
            interval_s=0.5,
            what="the recording rules see the load",
        )
        time.sleep(3)
        metadata = api(base, "/api/v1/targets/metadata", {})
        exported = {m["metric"] for m in metadata}
        yield Stack(prom, started, ended, killed, exported)
    finally:
        if prom is not None:
            prom.stop()
        for p in reversed(procs):
            p.stop()
        etcd.stop()


def exposed_by(stack: Stack, name: str) -> bool:
    """Whether a scraped component declared the family of stored series ``name``."""
    base = name
    for suffix in ("_total", "_bucket", "_sum", "_count"):
        if name.endswith(suffix):
            base = name[: -len(suffix)]
    return base in stack.exported or name in stack.exported


def has_data(stack: Stack, expr: str) -> bool:
    return bool(query_range(stack.url, expr, stack.load_started - 2, time.time()))


def check_returns_data(stack: Stack, where: str, expr: str, problems: list[str]) -> None:
    try:
        if has_data(stack, expr):
            return
    except PromQLError as e:
        problems.append(f"{where}: does not parse: {e}")
        return
    names = metric_names(expr)
    unexercised = sorted(n for n in names if n in NOT_EXERCISED)
    if not unexercised:
        problems.append(f"{where}: no data for {expr!r}")
        return
    print(f"empty, as allowed ({', '.join(unexercised)}): {where}")
    for n in unexercised:
        if not exposed_by(stack, n):
            problems.append(f"{where}: {n} is not exported by any scraped component")


# --- the checks -----------------------------------------------------------------------------


def test_every_component_is_scraped(stack: Stack) -> None:
    targets = api(stack.url, "/api/v1/targets", {"state": "active"})["activeTargets"]
    jobs: dict[str, int] = {}
    for t in targets:
        worker = t["discoveredLabels"].get("__meta_switchboard_worker_id", "")
        if worker == stack.killed_worker:
            continue  # down, until its lease expires and the discovery drops it
        assert t["health"] == "up", t
        jobs[t["labels"]["job"]] = jobs.get(t["labels"]["job"], 0) + 1
    assert jobs == {
        "switchboard-gateway": 1,
        "switchboard-controlplane": 1,
        "switchboard-node-agent": 1,
        "switchboard-worker": 3,
    }
    # the workers (on ports they chose) were found through the control plane's /sd/targets
    discovered = [t for t in targets if t["scrapePool"] == "switchboard-discovered"]
    assert {t["labels"]["component"] for t in discovered} == {"worker"}
    rules = api(stack.url, "/api/v1/rules", {})["groups"]
    loaded = {r["name"] for g in rules for r in g["rules"]}
    assert {r.record for r in recording_rules()} <= loaded
    assert {a.alert for a in alert_rules()} <= loaded
    assert all(r["health"] == "ok" for g in rules for r in g["rules"]), rules


def test_every_dashboard_panel_query_returns_data(stack: Stack) -> None:
    problems: list[str] = []
    count = 0
    for d in all_dashboards():
        for p in d.panels():
            for t in p.targets:
                count += 1
                check_returns_data(stack, f"{d.title} / {p.title}", grafana(t.expr), problems)
    assert count >= 50
    assert problems == [], "\n".join(problems)


def test_every_template_variable_lists_values(stack: Stack) -> None:
    for d in all_dashboards():
        for v in d.variables:
            (metric,) = metric_names(v.query)
            label = v.query.rstrip(") ").rsplit(",", 1)[1].strip()
            values = api(stack.url, f"/api/v1/label/{label}/values", {"match[]": metric})
            assert values, f"{d.uid} ${v.name}: no values"
            if v.name == "tenant":
                assert {"alpha", "beta"} <= set(values)
            if v.name == "class":
                assert {"interactive", "standard", "batch"} <= set(values)


def test_every_recording_rule_returns_data(stack: Stack) -> None:
    problems: list[str] = []
    for r in recording_rules():
        check_returns_data(stack, f"record {r.record}", r.expr, problems)
        if not query(stack.url, r.record):
            problems.append(f"record {r.record}: nothing recorded")
    assert problems == [], "\n".join(problems)


def test_alert_expressions_parse_and_fire_exactly_where_the_load_made_them_true(
    stack: Stack,
) -> None:
    problems: list[str] = []
    returned: dict[str, set[Any]] = {}
    for a in alert_rules():
        for signal in a.signals:
            check_returns_data(stack, f"alert {a.alert} signal", signal, problems)
        series = query(stack.url, a.expr)  # raises if it does not parse
        for one in series:
            labels = one["metric"]
            key: Any = (
                (labels.get("tenant"), labels.get("model"), labels.get("sla_class"))
                if "sla_class" in labels
                else labels.get("model")
            )
            returned.setdefault(a.alert, set()).add(key)
    assert problems == [], "\n".join(problems)
    for alert, expected in FIRING.items():
        assert expected <= returned.get(alert, set()), (alert, returned.get(alert))
    for alert in QUIET:
        assert alert not in returned, (alert, returned[alert])


def test_the_forced_miss_shows_in_the_attainment_panel_and_burns_fast(stack: Stack) -> None:
    sla = next(d for d in all_dashboards() if d.uid == "switchboard-sla")
    panel = next(p for p in sla.panels() if p.title.startswith("SLO attainment vs objective"))
    attainment = panel.targets[0].expr
    beta = query(stack.url, grafana(attainment, tenant="beta", cls="interactive"))
    assert len(beta) == 1, beta
    value = float(beta[0]["value"][1])
    assert beta[0]["metric"] == {"tenant": "beta", "sla_class": "interactive"}
    assert value < 0.5 < OBJECTIVES["interactive"], value
    # ... while the same tenant's standard requests to the fast model met it
    std = query(stack.url, grafana(attainment, tenant="beta", cls="standard"))
    assert len(std) == 1 and float(std[0]["value"][1]) > value
    # the objective line is drawn beside it
    objective = query(stack.url, grafana(panel.targets[1].expr, cls="interactive"))
    assert float(objective[0]["value"][1]) == OBJECTIVES["interactive"]
    # misses by reason: the slow model's first tokens came too late
    reasons = query(
        stack.url,
        f'sum by (reason) (switchboard_slo_missed_total{{tenant="beta", model="{SLOW_MODEL}"}})',
    )
    assert {s["metric"]["reason"] for s in reasons} == {"ttft"}
    # the fast-burn alert's expression returns that SLO: error ratio 1 on both windows
    fast = next(
        a
        for a in alert_rules()
        if a.alert == "SwitchboardSLOFastBurn" and dict(a.labels)["sla_class"] == "interactive"
    )
    series = query(stack.url, fast.expr)
    burning = {(s["metric"]["tenant"], s["metric"]["model"]) for s in series}
    assert ("beta", SLOW_MODEL) in burning
    ratio = float(next(s for s in series if s["metric"]["tenant"] == "beta")["value"][1])
    assert not math.isnan(ratio) and ratio > 14.4 * (1 - OBJECTIVES["interactive"])


def test_the_not_exercised_list_is_exact(stack: Stack) -> None:
    """Each metric allowed to be empty is empty (else the list is stale: shorten it), and is
    declared by a scraped component (so an event would show)."""
    for name in NOT_EXERCISED:
        assert query(stack.url, f"count({name})") == [], f"{name} has data: drop it"
        assert exposed_by(stack, name), f"{name}: no scraped component declares it"


def test_report(stack: Stack) -> None:
    """Not a check: what the run measured, for the log."""
    took = stack.load_ended - stack.load_started
    print(f"\nload ran {took:.1f}s; metric families declared by scraped targets: "
          f"{len(stack.exported)}")  # fmt: skip
    assert Path(stack.prom.config_path).is_file()
