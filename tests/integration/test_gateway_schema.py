"""The gateway against its own OpenAPI schema (schemathesis), fair admission through the real
gateway, and the ``sla_class`` body field.

One module-scoped cluster: real etcd, one prefill and one decode ``switchboard worker --engine
cpu``, a real gateway process started with ``--slots-per-worker 2`` (so admission queues under
modest load), the tenants of tests/integration/test_gateway.py plus ``heavy`` and ``light``
(generous quotas) and ``batchonly`` (may use only the ``batch`` class).
"""

from __future__ import annotations

import asyncio
import json
import re
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import openai
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import APIOperation, Case, GenerationMode, HookContext
from schemathesis.checks import not_a_server_error
from schemathesis.core.result import Ok

from controlplane.adapters.etcd.client import EtcdClient
from controlplane.local.procs import EtcdServer, ManagedProcess
from tests.helpers import start_worker, wait_until
from tests.integration.test_gateway import (
    MODEL,
    apply_deployment,
    create_tenants,
    get_json,
    post_raw,
    start_gateway,
)

pytestmark = pytest.mark.timeout(600)

SLOTS_PER_WORKER = 2
FUZZ_EXAMPLES = 30
"""Examples per operation and generation mode (positive for every operation, negative too for
the two with a body)."""
FUZZ_MAX_TOKENS = 4
KNOWN_CLASSES = ("interactive", "standard", "batch")
Operation = APIOperation[Any, Any, Any, Any]


@dataclass
class SchemaCluster:
    etcd: EtcdServer
    gateway: ManagedProcess
    http_port: int
    keys: dict[str, str]
    procs: list[ManagedProcess] = field(default_factory=list)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def auth(self, tenant: str = "acme") -> dict[str, str]:
        return {"authorization": f"Bearer {self.keys[tenant]}"}

    def async_client(self, tenant: str) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(
            base_url=f"{self.base_url}/v1", api_key=self.keys[tenant], max_retries=0, timeout=120
        )

    def metrics(self) -> str:
        with urllib.request.urlopen(f"{self.base_url}/metrics", timeout=10) as resp:
            text: str = resp.read().decode()
        return text


def create_more_tenants(etcd_endpoint: str) -> dict[str, str]:
    """heavy and light: every model, quotas well above what the tests send; batchonly: only the
    batch class. Returns each tenant's API key."""
    from controlplane.adapters.etcd.tenants import EtcdTenantStore
    from controlplane.core.tenants import Quotas, Tenant

    roomy = Quotas(requests_per_minute=600, tokens_per_minute=1_000_000)
    tenants = [
        Tenant("heavy", ("*",), (), quotas=roomy),
        Tenant("light", ("*",), (), quotas=roomy),
        Tenant("batchonly", ("*",), ("batch",), default_sla_class="batch"),
    ]

    async def run() -> dict[str, str]:
        client = EtcdClient(etcd_endpoint)
        try:
            store = EtcdTenantStore(client)
            return {t.name: (await store.create(t)).api_key for t in tenants}
        finally:
            await client.close()

    return asyncio.run(run())


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Iterator[SchemaCluster]:
    tmp = tmp_path_factory.mktemp("gateway-schema")
    etcd = EtcdServer(tmp / "etcd-data", log_path=tmp / "etcd.log").start()
    procs: list[ManagedProcess] = []
    try:
        apply_deployment(etcd.endpoint, tiny_model)
        keys = {**create_tenants(etcd.endpoint), **create_more_tenants(etcd.endpoint)}
        common: dict[str, Any] = {
            "engine": "cpu", "model": MODEL, "model_path": tiny_model, "ready_timeout_s": 90,
        }  # fmt: skip
        for worker_id, role in (("gs-p", "prefill"), ("gs-d", "decode")):
            procs.append(start_worker(tmp, etcd.endpoint, worker_id, role=role, **common).process)
        gateway, http_port, _ = start_gateway(
            tmp, etcd.endpoint, ["--slots-per-worker", str(SLOTS_PER_WORKER)]
        )
        procs.append(gateway)
        c = SchemaCluster(etcd, gateway, http_port, keys, procs)

        def models() -> bool:
            status, body = get_json(f"{c.base_url}/v1/models", keys["acme"])
            return status == 200 and [m["id"] for m in body["data"]] == [MODEL]

        wait_until(models, 30, what="gateway sees the model")
        yield c
    finally:
        for p in reversed(procs):
            p.stop()
        etcd.stop()


# --- schemathesis --------------------------------------------------------------------------------


def _cap(value: Any) -> Any:
    """Prompts kept small: strings to 200 characters, lists to 32 items, recursively."""
    if isinstance(value, str):
        return value[:200]
    if isinstance(value, list):
        return [_cap(v) for v in value[:32]]
    if isinstance(value, dict):
        return {k: _cap(v) for k, v in value.items()}
    return value


def small_generation(context: HookContext, body: Any) -> Any:
    """``map_body``: keep generated requests cheap and mostly on the token path.

    max_tokens at most FUZZ_MAX_TOKENS (chat would default to the rest of the context window),
    small prompts, the served model in two cases out of three (random names only reach the 404),
    and a known SLA class in two cases out of three when one is sent. Non-dict (negative) bodies
    and wrongly typed values are left as generated."""
    if not isinstance(body, dict):
        return body
    model = body.get("model")
    if model is None or (isinstance(model, str) and len(model) % 3):
        body["model"] = MODEL
    for key in ("max_tokens", "max_completion_tokens"):
        value = body.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > FUZZ_MAX_TOKENS:
            body[key] = FUZZ_MAX_TOKENS
    if body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
        body["max_tokens"] = FUZZ_MAX_TOKENS
    sla = body.get("sla_class")
    if isinstance(sla, str) and len(sla) % 3:
        body["sla_class"] = KNOWN_CLASSES[len(sla) % 3]
    for key in ("prompt", "messages"):
        if key in body:
            body[key] = _cap(body[key])
    return body


def test_schemathesis_finds_no_server_errors(cluster: SchemaCluster) -> None:
    schema = schemathesis.openapi.from_url(f"{cluster.base_url}/openapi.json", timeout=10)
    schema.hook("map_body")(small_generation)
    session = requests.Session()
    statuses: dict[tuple[str, str], dict[int, int]] = {}
    operations: list[Operation] = []
    for result in schema.get_all_operations():
        assert isinstance(result, Ok), result  # the served schema is valid
        operations.append(result.ok())
    assert {op.label for op in operations} >= {
        "POST /v1/chat/completions",
        "POST /v1/completions",
        "GET /v1/models",
        "GET /health",
        "GET /metrics",
    }

    def fuzz(op: Operation, mode: GenerationMode, seen: dict[int, int]) -> None:
        @given(case=op.as_strategy(mode))
        @settings(
            max_examples=FUZZ_EXAMPLES,
            deadline=None,
            database=None,
            derandomize=True,  # the same cases every run
            phases=[Phase.explicit, Phase.generate],  # no shrinking: report the case as found
            suppress_health_check=list(HealthCheck),
        )
        def run(case: Case[Operation]) -> None:
            response = case.call_and_validate(
                base_url=cluster.base_url,
                session=session,
                headers=cluster.auth(),
                checks=[not_a_server_error],
                timeout=60,
            )
            seen[response.status_code] = seen.get(response.status_code, 0) + 1

        run()

    for op in operations:
        fuzz(op, GenerationMode.POSITIVE, statuses.setdefault((op.label, "positive"), {}))
        if op.method.upper() == "POST":  # a GET without parameters has nothing to mutate
            fuzz(op, GenerationMode.NEGATIVE, statuses.setdefault((op.label, "negative"), {}))
    total = sum(sum(s.values()) for s in statuses.values())
    print(f"\nschemathesis: {total} cases; statuses per operation and mode: {statuses}")
    for label in ("POST /v1/chat/completions", "POST /v1/completions"):
        # the generated requests reached the token path, not only the validators
        assert statuses[(label, "positive")].get(200, 0) >= 1, statuses
    assert all(code < 500 for s in statuses.values() for code in s)


def test_out_of_range_seed_is_a_400_not_a_500(cluster: SchemaCluster) -> None:
    # found by schemathesis: a seed beyond int64 reached the Worker API's protobuf and was a 500
    for route in ("/v1/completions", "/v1/chat/completions"):
        body: dict[str, Any] = {"model": MODEL, "max_tokens": 2, "seed": 2**63}
        body.update(
            {"prompt": "hi"} if route == "/v1/completions" else {"messages": [{"role": "user"}]}
        )
        status, err = post_raw(
            f"{cluster.base_url}{route}", json.dumps(body).encode(), key=cluster.keys["acme"]
        )
        assert status == 400, err
        assert err["error"]["param"] == "seed"
    status, _ = post_raw(
        f"{cluster.base_url}/v1/completions",
        json.dumps({"model": MODEL, "prompt": "hi", "max_tokens": 2, "seed": -(2**63)}).encode(),
        key=cluster.keys["acme"],
    )
    assert status == 200


# --- fairness ------------------------------------------------------------------------------------

HEAVY_REQUESTS = 20
HEAVY_TOKENS = 40
LIGHT_REQUESTS = 2
LIGHT_TOKENS = 4


def metric_value(text: str, name: str, labels: dict[str, str]) -> float:
    """The sample of ``name`` whose labels include ``labels`` (0 when there is none)."""
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        got = dict(re.findall(r'(\w+)="([^"]*)"', line[len(name) : line.rindex("}")]))
        if all(got.get(k) == v for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def metric_sum(text: str, name: str, labels: dict[str, str]) -> float:
    """The sum of ``name``'s samples whose labels include ``labels`` (e.g. over SLA classes)."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        got = dict(re.findall(r'(\w+)="([^"]*)"', line[len(name) : line.rindex("}")]))
        if all(got.get(k) == v for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


@dataclass
class Timeline:
    """Client-side events in the order the test's event loop saw them (no clock readings)."""

    events: list[tuple[str, str]] = field(default_factory=list)

    def add(self, kind: str, name: str) -> None:
        self.events.append((kind, name))

    def index(self, kind: str, name: str) -> int:
        return self.events.index((kind, name))

    def names(self, kind: str, prefix: str, before: int | None = None) -> set[str]:
        end = len(self.events) if before is None else before
        return {n for k, n in self.events[:end] if k == kind and n.startswith(prefix)}


async def _stream(
    client: openai.AsyncOpenAI, name: str, max_tokens: int, timeline: Timeline
) -> int:
    timeline.add("sent", name)
    stream = await client.completions.create(
        model=MODEL, prompt=f"request {name} tells a story", max_tokens=max_tokens,
        temperature=0, stream=True, stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    tokens, first = 0, True
    async for event in stream:
        if first:
            timeline.add("first", name)
            first = False
        if event.usage is not None:
            tokens = event.usage.completion_tokens
    timeline.add("done", name)
    return tokens


def test_light_tenant_is_admitted_ahead_of_a_heavy_backlog(cluster: SchemaCluster) -> None:
    timeline = Timeline()
    queued_metric = "switchboard_admission_queued_total"
    depth_metric = "switchboard_queue_depth"

    async def scenario() -> tuple[list[int], list[set[str]]]:
        heavy, light = cluster.async_client("heavy"), cluster.async_client("light")
        try:
            burst = [
                asyncio.create_task(_stream(heavy, f"h{i:02d}", HEAVY_TOKENS, timeline))
                for i in range(HEAVY_REQUESTS)
            ]

            def backlog() -> bool:  # the burst is in the admission queue
                depth = metric_sum(cluster.metrics(), depth_metric, {"model": MODEL})
                return depth >= HEAVY_REQUESTS // 2

            await asyncio.to_thread(wait_until, backlog, 60, 0.02, "heavy requests queued")
            waiting_before: list[set[str]] = []
            for j in range(LIGHT_REQUESTS):  # sequential, each while heavy work is queued
                waiting_before.append(timeline.names("sent", "h") - timeline.names("first", "h"))
                await asyncio.wait_for(_stream(light, f"l{j}", LIGHT_TOKENS, timeline), 120)
            counts = await asyncio.wait_for(asyncio.gather(*burst), 300)
            return counts, waiting_before
        finally:
            await heavy.close()
            await light.close()

    counts, waiting_before = asyncio.run(scenario())
    assert counts == [HEAVY_TOKENS] * HEAVY_REQUESTS  # every heavy request served in full
    report = []
    for j, waiting in enumerate(waiting_before):
        done_at = timeline.index("done", f"l{j}")
        after = {n for n in waiting if timeline.index("done", n) > done_at}
        heavy_done_before = len(timeline.names("done", "h", before=done_at))
        report.append(
            f"l{j}: {len(waiting)} heavy waiting when sent, {len(after)} of them finished after "
            f"it; {heavy_done_before}/{HEAVY_REQUESTS} heavy done before it"
        )
        # a heavy backlog was there, and the light request overtook most of it
        assert len(waiting) >= HEAVY_REQUESTS // 4, report
        assert len(after) * 2 >= len(waiting), report
    metrics = cluster.metrics()
    heavy_queued = metric_value(metrics, queued_metric, {"model": MODEL, "tenant": "heavy"})
    light_queued = metric_value(metrics, queued_metric, {"model": MODEL, "tenant": "light"})
    print("\nfairness:", "; ".join(report), f"; queued: heavy {heavy_queued}, light {light_queued}")
    assert heavy_queued >= HEAVY_REQUESTS - 2 * SLOTS_PER_WORKER, metrics
    assert metric_sum(metrics, depth_metric, {"model": MODEL}) == 0


# --- SLA class in the body -----------------------------------------------------------------------


def post_json(
    cluster: SchemaCluster,
    route: str,
    body: dict[str, Any],
    tenant: str = "acme",
    headers: dict[str, str] | None = None,
) -> tuple[int, Any]:
    req = urllib.request.Request(
        f"{cluster.base_url}{route}",
        data=json.dumps(body).encode(),
        headers={"content-type": "application/json", **cluster.auth(tenant), **(headers or {})},
        method="POST",
    )
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


ROUTES: list[tuple[str, dict[str, Any]]] = [
    ("/v1/completions", {"model": MODEL, "prompt": "hello", "max_tokens": 2}),
    (
        "/v1/chat/completions",
        {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
    ),
]


def test_sla_class_in_the_body(cluster: SchemaCluster) -> None:
    for route, base in ROUTES:
        # known and allowed (acme may use every class)
        for sla in KNOWN_CLASSES:
            status, body = post_json(cluster, route, {**base, "sla_class": sla})
            assert status == 200, (route, sla, body)
        # unknown: 400 naming it (also when the tenant's classes are restricted: 400 before 403)
        for tenant in ("acme", "batchonly"):
            status, err = post_json(cluster, route, {**base, "sla_class": "platinum"}, tenant)
            assert status == 400, (route, tenant, err)
            assert err["error"]["type"] == "invalid_request_error"
            assert "'platinum'" in err["error"]["message"]
        # not a class name at all: 400 from the body's validation, naming the field
        status, err = post_json(cluster, route, {**base, "sla_class": "no spaces"})
        assert (status, err["error"]["param"]) == (400, "sla_class"), err
        # a class this tenant may not use: 403; its own class: 200
        status, err = post_json(cluster, route, {**base, "sla_class": "interactive"}, "batchonly")
        assert status == 403, (route, err)
        assert err["error"]["type"] == "permission_error"
        assert "interactive" in err["error"]["message"]
        assert post_json(cluster, route, {**base, "sla_class": "batch"}, "batchonly")[0] == 200
        # the body wins over the X-SLA-Class header, both ways; null falls back to the header
        header = {"x-sla-class": "interactive"}
        ok = post_json(cluster, route, {**base, "sla_class": "batch"}, "batchonly", header)
        assert ok[0] == 200, ok
        denied = post_json(cluster, route, {**base, "sla_class": "interactive"}, "batchonly",
                           {"x-sla-class": "batch"})  # fmt: skip
        assert denied[0] == 403, denied
        fallback = post_json(cluster, route, {**base, "sla_class": None}, "batchonly", header)
        assert fallback[0] == 403, fallback


def test_sla_class_is_in_the_openapi_schema(cluster: SchemaCluster) -> None:
    status, doc = get_json(f"{cluster.base_url}/openapi.json")
    assert status == 200
    for name in ("ChatCompletionRequest", "CompletionRequest"):
        props = doc["components"]["schemas"][name]["properties"]
        assert "sla_class" in props, name
        assert "X-SLA-Class" in json.dumps(props["sla_class"])


def _reapply_deployment(etcd_endpoint: str, model_path: Path, sla_classes: dict[str, Any]) -> None:
    import time

    from controlplane.adapters.etcd.deployments import EtcdDeploymentStore
    from controlplane.deployspec import spec_from_dict

    async def run() -> None:
        client = EtcdClient(etcd_endpoint)
        try:
            store = EtcdDeploymentStore(client)
            doc = spec_from_dict({**_spec_doc(await store.get("tiny")), "sla_classes": sla_classes})
            await store.apply(doc, now=time.time())
        finally:
            await client.close()

    asyncio.run(run())


def _spec_doc(record: Any) -> dict[str, Any]:
    from controlplane.deployspec import spec_to_dict

    return spec_to_dict(record.spec)


def test_sla_classes_come_from_the_deployment(cluster: SchemaCluster, tiny_model: Path) -> None:
    """The deployment's own classes replace the defaults in the running gateway (watch-fed):
    new names work, old ones are unknown (400 listing the deployment's), and a tenant whose
    default class the model lacks runs in the least important class it may use (or 403)."""
    route, base = ROUTES[0]
    custom = {
        "realtime": {"priority": 0, "ttft_p95_ms": 300, "itl_p95_ms": 40},
        "bulk": {"priority": 2, "deadline_s": 600},
    }
    _reapply_deployment(cluster.etcd.endpoint, tiny_model, custom)
    try:

        def realtime_accepted() -> bool:
            return post_json(cluster, route, {**base, "sla_class": "realtime"})[0] == 200

        wait_until(realtime_accepted, 30, what="the gateway to learn the deployment's classes")
        status, err = post_json(cluster, route, {**base, "sla_class": "interactive"})
        assert status == 400, err
        assert "known: bulk, realtime" in err["error"]["message"]
        # acme's default (standard) is not offered: it runs as bulk, the least important class
        assert post_json(cluster, route, base)[0] == 200
        # batchonly may use only batch, which this model does not offer
        status, err = post_json(cluster, route, base, "batchonly")
        assert status == 403, err
        assert "none of this model's SLA classes (bulk, realtime)" in err["error"]["message"]
    finally:
        _reapply_deployment(cluster.etcd.endpoint, tiny_model, {})

    def defaults_back() -> bool:
        return post_json(cluster, route, {**base, "sla_class": "interactive"})[0] == 200

    wait_until(defaults_back, 30, what="the default classes to come back")
