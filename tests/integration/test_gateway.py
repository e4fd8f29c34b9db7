"""The tenant gateway end to end: real etcd, real cpu workers (1 prefill, 2 decode), a real
gateway process, the official ``openai`` client, and the gRPC Inference service.

One module-scoped cluster (the cpu workers take a while to start on 2 cores); the test that
kills a decode worker runs last and starts its own replacement worker.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import openai
import pytest
from switchboard.v1 import inference_pb2, inference_pb2_grpc, worker_pb2, worker_pb2_grpc

from controlplane.adapters.etcd.client import EtcdClient
from controlplane.adapters.etcd.deployments import EtcdDeploymentStore
from controlplane.deployspec import spec_from_dict
from controlplane.local.procs import EtcdServer, ManagedProcess
from tests.helpers import PYTHON, WorkerProc, start_worker, wait_until

MODEL = "tiny-llama"
pytestmark = pytest.mark.timeout(600)


@dataclass
class Cluster:
    tmp: Path
    etcd: EtcdServer
    model_path: Path
    prefill: WorkerProc
    decodes: list[WorkerProc]
    gateway: ManagedProcess
    http_port: int
    grpc_port: int
    keys: dict[str, str]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def client(self, tenant: str = "acme", **kw: Any) -> openai.OpenAI:
        return openai.OpenAI(
            base_url=f"{self.base_url}/v1",
            api_key=self.keys[tenant],
            max_retries=0,
            timeout=120,
            **kw,
        )

    def metadata(self, tenant: str = "acme") -> tuple[tuple[str, str]]:
        return (("authorization", f"Bearer {self.keys[tenant]}"),)


def create_tenants(etcd_endpoint: str) -> dict[str, str]:
    """acme: every model, no quotas; limited: 2 requests/min; solo: 1 at a time; other: only
    other-model. Returns each tenant's API key."""
    from controlplane.adapters.etcd.tenants import EtcdTenantStore
    from controlplane.core.tenants import Quotas, Tenant

    tenants = [
        Tenant("acme", ("*",), ()),
        Tenant("limited", ("*",), (), quotas=Quotas(requests_per_minute=2)),
        Tenant("solo", ("*",), (), quotas=Quotas(max_concurrent=1)),
        Tenant("other", ("other-model",), ()),
    ]

    async def run() -> dict[str, str]:
        client = EtcdClient(etcd_endpoint)
        try:
            store = EtcdTenantStore(client)
            return {t.name: (await store.create(t)).api_key for t in tenants}
        finally:
            await client.close()

    return asyncio.run(run())


def apply_deployment(etcd_endpoint: str, model_path: Path) -> None:
    spec = spec_from_dict(
        {
            "name": "tiny",
            "model": MODEL,
            "engine": "cpu",
            "model_path": str(model_path),
            "engine_args": {"threads": "1"},
            "pools": [
                {"role": "prefill", "replicas": 1},
                {"role": "decode", "replicas": 2},
            ],
        }
    )

    async def run() -> None:
        client = EtcdClient(etcd_endpoint)
        try:
            await EtcdDeploymentStore(client).apply(spec, now=time.time())
        finally:
            await client.close()

    asyncio.run(run())


def start_gateway(
    tmp: Path, etcd_endpoint: str, extra: list[str] | None = None
) -> tuple[ManagedProcess, int, int]:
    port_file = tmp / "gateway.port"
    argv = [
        PYTHON, "-m", "controlplane", "gateway",
        "--etcd", etcd_endpoint,
        "--listen", "127.0.0.1:0",
        "--grpc-listen", "127.0.0.1:0",
        "--port-file", str(port_file),
        "--drain-timeout", "10",
        *(extra or []),
    ]  # fmt: skip
    proc = ManagedProcess("gateway", argv, tmp / "gateway.log").start()

    def ready() -> bool:
        if not proc.alive():
            raise AssertionError(f"gateway exited:\n{proc.tail()}")
        return port_file.exists() and port_file.read_text().strip() != ""

    wait_until(ready, 60, what="gateway port file")
    http_port, grpc_port = (int(x) for x in port_file.read_text().split())
    return proc, http_port, grpc_port


def get_json(url: str, key: str = "") -> tuple[int, Any]:
    req = urllib.request.Request(url, headers={"authorization": f"Bearer {key}"} if key else {})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def post_raw(
    url: str, body: bytes, content_type: str | None = "application/json", key: str = ""
) -> tuple[int, Any]:
    headers = {"content-type": content_type} if content_type else {}
    if key:
        headers["authorization"] = f"Bearer {key}"
    req = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def worker_stats(w: WorkerProc) -> worker_pb2.WorkerStats:
    with grpc.insecure_channel(w.address) as ch:
        return worker_pb2_grpc.WorkerStub(ch).Stats(worker_pb2.StatsRequest(), timeout=10)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Iterator[Cluster]:
    tmp = tmp_path_factory.mktemp("gateway")
    etcd = EtcdServer(tmp / "etcd-data", log_path=tmp / "etcd.log").start()
    procs: list[ManagedProcess] = []
    try:
        apply_deployment(etcd.endpoint, tiny_model)
        keys = create_tenants(etcd.endpoint)
        common: dict[str, Any] = {
            "engine": "cpu", "model": MODEL, "model_path": tiny_model, "ready_timeout_s": 90,
        }  # fmt: skip
        prefill = start_worker(tmp, etcd.endpoint, "gw-p", role="prefill", **common)
        procs.append(prefill.process)
        decodes = []
        for i in range(2):
            d = start_worker(tmp, etcd.endpoint, f"gw-d{i}", role="decode", **common)
            procs.append(d.process)
            decodes.append(d)
        gateway, http_port, grpc_port = start_gateway(tmp, etcd.endpoint)
        procs.append(gateway)
        c = Cluster(tmp, etcd, tiny_model, prefill, decodes, gateway, http_port, grpc_port, keys)

        def models() -> bool:
            status, body = get_json(f"{c.base_url}/v1/models", keys["acme"])
            return status == 200 and [m["id"] for m in body["data"]] == [MODEL]

        wait_until(models, 30, what="gateway sees the model")
        yield c
    finally:
        for p in reversed(procs):
            p.stop()
        etcd.stop()


# --- the openai client ---------------------------------------------------------------------------


def test_chat_and_completions_through_prefill_and_decode(cluster: Cluster) -> None:
    client = cluster.client()
    messages: Any = [{"role": "user", "content": "Say something about KV caches."}]
    chat = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=12, temperature=0,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    assert chat.choices[0].finish_reason == "length"
    assert chat.usage is not None and chat.usage.completion_tokens == 12
    assert chat.usage.prompt_tokens > 5
    text = chat.choices[0].message.content or ""
    assert text

    stream = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=12, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
    )  # fmt: skip
    parts, usage, finish = [], None, None
    for ev in stream:
        if ev.usage is not None:
            usage = ev.usage
        for ch in ev.choices:
            parts.append(ch.delta.content or "")
            finish = ch.finish_reason or finish
    assert "".join(parts) == text  # greedy: streamed == not streamed
    assert finish == "length"
    assert usage is not None and usage.completion_tokens == 12
    assert usage.prompt_tokens == chat.usage.prompt_tokens

    comp = client.completions.create(
        model=MODEL, prompt="The capital of", max_tokens=8, temperature=0,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    assert comp.usage is not None and comp.usage.completion_tokens == 8
    pieces = [
        ev.choices[0].text
        for ev in client.completions.create(
            model=MODEL,
            prompt="The capital of",
            max_tokens=8,
            temperature=0,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        if ev.choices
    ]
    assert "".join(pieces) == comp.choices[0].text

    status, metrics = 0, ""
    with urllib.request.urlopen(f"{cluster.base_url}/metrics", timeout=10) as resp:
        status, metrics = resp.status, resp.read().decode()
    assert status == 200
    # every one of the four requests really went prefill -> decode (remote prefill)
    remote = sum(
        float(m.group(1))
        for m in re.finditer(
            r'switchboard_router_decisions_total\{[^}]*prefill="remote"[^}]*\} (\S+)', metrics
        )
    )
    assert remote >= 4, metrics
    assert re.search(
        r'switchboard_requests_total\{[^}]*model="tiny-llama",route="/v1/chat/completions"', metrics
    )
    assert 'switchboard_ttft_seconds_bucket{le="0.5",model="tiny-llama"' in metrics
    assert 'switchboard_itl_seconds_bucket{le="0.05",model="tiny-llama"' in metrics


def test_models_health_openapi(cluster: Cluster) -> None:
    assert [m.id for m in cluster.client().models.list()] == [MODEL]
    assert get_json(f"{cluster.base_url}/health") == (200, {"status": "ok", "replicas": 1})
    status, doc = get_json(f"{cluster.base_url}/openapi.json")
    assert status == 200
    assert doc["openapi"].startswith("3.")
    assert {"/v1/chat/completions", "/v1/completions", "/v1/models"} <= set(doc["paths"])
    assert "ChatCompletionRequest" in doc["components"]["schemas"]


def test_bad_input_gets_openai_errors(cluster: Cluster) -> None:
    url = f"{cluster.base_url}/v1/chat/completions"
    msg = [{"role": "user", "content": "hi"}]
    cases: list[tuple[bytes, str | None, int]] = [
        (b"{not json", "application/json", 400),
        (json.dumps({"model": MODEL}).encode(), "application/json", 400),
        (json.dumps({"model": "nope", "messages": msg}).encode(), "application/json", 404),
        (
            json.dumps({"model": MODEL, "messages": msg, "max_tokens": -1}).encode(),
            "application/json",
            400,
        ),
        (json.dumps({"model": MODEL, "messages": msg}).encode(), "text/plain", 415),
        (b"x" * (5 << 20), "application/json", 413),
    ]
    for body, ctype, expected in cases:
        status, err = post_raw(url, body, ctype, key=cluster.keys["acme"])
        assert status == expected, (body[:60], err)
        assert set(err["error"]) >= {"message", "type", "param", "code"}
        assert err["error"]["message"]
    _, models = get_json(f"{cluster.base_url}/v1/models", cluster.keys["acme"])
    window = models["data"][0]["max_model_len"]
    assert window > 0
    status, err = post_raw(
        f"{cluster.base_url}/v1/completions",
        json.dumps({"model": MODEL, "prompt": [5] * window, "max_tokens": 4}).encode(),
        key=cluster.keys["acme"],
    )
    assert status == 400
    assert "context window" in err["error"]["message"]
    # via the client: the typed exceptions
    with pytest.raises(openai.NotFoundError):
        cluster.client().chat.completions.create(model="nope", messages=msg)  # type: ignore[arg-type]


def post_with_headers(
    cluster: Cluster, body: dict[str, Any], key: str
) -> tuple[int, dict[str, str], Any]:
    req = urllib.request.Request(
        f"{cluster.base_url}/v1/completions",
        data=json.dumps(body).encode(),
        headers={"content-type": "application/json", "authorization": f"Bearer {key}"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, dict(resp.headers), json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), json.loads(e.read())


def test_api_keys_and_tenant_isolation(cluster: Cluster) -> None:
    body = {"model": MODEL, "prompt": "hello", "max_tokens": 2}
    for key in ("", "sb-000000000000-wrong", "not-a-key"):
        status, _, err = post_with_headers(cluster, body, key)
        assert status == 401, err
        assert err["error"]["type"] == "authentication_error"
    status, err = get_json(f"{cluster.base_url}/v1/models")
    assert status == 401
    # "other" may use only other-model: it neither sees nor can use tiny-llama
    status, models = get_json(f"{cluster.base_url}/v1/models", cluster.keys["other"])
    assert (status, models["data"]) == (200, [])
    status, _, err = post_with_headers(cluster, body, cluster.keys["other"])
    assert status == 404
    assert "do not have access" in err["error"]["message"]
    # an SLA class that does not exist is refused
    req = urllib.request.Request(
        f"{cluster.base_url}/v1/completions",
        data=json.dumps(body).encode(),
        headers={
            "content-type": "application/json",
            "authorization": f"Bearer {cluster.keys['acme']}",
            "x-sla-class": "platinum",
        },
        method="POST",
    )
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(req, timeout=60)
    assert info.value.code in (400, 403)


def test_requests_per_minute_quota_answers_429_with_retry_after(cluster: Cluster) -> None:
    body = {"model": MODEL, "prompt": "hello", "max_tokens": 2}
    key = cluster.keys["limited"]
    assert post_with_headers(cluster, body, key)[0] == 200
    assert post_with_headers(cluster, body, key)[0] == 200
    status, headers, err = post_with_headers(cluster, body, key)
    assert status == 429, err
    assert err["error"]["type"] == "rate_limit_error"
    assert "rate_limited_requests" in err["error"]["message"]
    retry = {k.lower(): v for k, v in headers.items()}.get("retry-after")
    assert retry is not None and int(retry) >= 1
    # another tenant is not affected
    assert post_with_headers(cluster, body, cluster.keys["acme"])[0] == 200


def test_max_concurrent_queues_the_second_request_until_the_first_ends(cluster: Cluster) -> None:
    import threading

    key = cluster.keys["solo"]
    events: list[str] = []
    results: dict[str, int] = {}

    def run(name: str, max_tokens: int) -> None:
        status, _, _ = post_with_headers(
            cluster,
            {"model": MODEL, "prompt": "tell me a story", "max_tokens": max_tokens,
             "ignore_eos": True, "temperature": 0},
            key,
        )  # fmt: skip
        results[name] = status
        events.append(f"{name} done")

    first = threading.Thread(target=run, args=("first", 120))
    first.start()
    time.sleep(0.3)  # let the first one be admitted (ordering only; nothing is timed)
    second = threading.Thread(target=run, args=("second", 2))
    second.start()
    first.join(120)
    second.join(120)
    assert results == {"first": 200, "second": 200}  # queued, then served: not rejected
    assert events == ["first done", "second done"]  # the short one waited for the long one


def test_grpc_inference_streams_the_same_tokens(cluster: Cluster) -> None:
    client = cluster.client()
    comp = client.completions.create(
        model=MODEL, prompt="Once upon a time", max_tokens=10, temperature=0,
    )  # fmt: skip
    with grpc.insecure_channel(f"127.0.0.1:{cluster.grpc_port}") as ch:
        stub = inference_pb2_grpc.InferenceStub(ch)
        models = stub.ListModels(
            inference_pb2.ListModelsRequest(), timeout=10, metadata=cluster.metadata()
        )
        assert [m.id for m in models.models] == [MODEL]
        assert models.models[0].max_context_tokens > 0
        out = list(
            stub.Generate(
                inference_pb2.GenerateRequest(
                    model=MODEL,
                    prompt="Once upon a time",
                    sampling=inference_pb2.SamplingParams(max_tokens=10, temperature=0),
                ),
                timeout=120,
                metadata=cluster.metadata(),
            )
        )
        assert "".join(m.text for m in out) == comp.choices[0].text
        assert out[-1].finish_reason == (comp.choices[0].finish_reason or "")
        assert comp.usage is not None
        assert out[-1].usage.completion_tokens == comp.usage.completion_tokens
        assert sum(len(m.token_ids) for m in out) == comp.usage.completion_tokens
        # stop_token_ids and ignore_eos as over HTTP: stop at the third token of the same text.
        ids = [t for m in out for t in m.token_ids]
        stop_at = ids[2]
        comp_stop = client.completions.create(
            model=MODEL, prompt="Once upon a time", max_tokens=10, temperature=0,
            extra_body={"stop_token_ids": [stop_at], "ignore_eos": True},
        )  # fmt: skip
        out_stop = list(
            stub.Generate(
                inference_pb2.GenerateRequest(
                    model=MODEL,
                    prompt="Once upon a time",
                    sampling=inference_pb2.SamplingParams(
                        max_tokens=10, temperature=0, stop_token_ids=[stop_at], ignore_eos=True
                    ),
                ),
                timeout=120,
                metadata=cluster.metadata(),
            )
        )
        assert out_stop[-1].finish_reason == comp_stop.choices[0].finish_reason == "stop"
        assert "".join(m.text for m in out_stop) == comp_stop.choices[0].text
        assert comp_stop.usage is not None
        assert out_stop[-1].usage.completion_tokens == comp_stop.usage.completion_tokens
        assert out_stop[-1].usage.completion_tokens <= 3
        with pytest.raises(grpc.RpcError) as info:
            list(
                stub.Generate(
                    inference_pb2.GenerateRequest(model="nope", prompt="x"),
                    timeout=10,
                    metadata=cluster.metadata(),
                )
            )
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.RpcError) as info:  # no key
            list(stub.Generate(inference_pb2.GenerateRequest(model=MODEL, prompt="x"), timeout=10))
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_client_disconnect_aborts_and_frees_kv(cluster: Cluster) -> None:
    client = cluster.client()
    stream = client.completions.create(
        model=MODEL, prompt="Tell a long story", max_tokens=1500, temperature=0, stream=True,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    for seen, _ in enumerate(stream, 1):
        if seen >= 3:
            break
    stream.close()
    workers = [cluster.prefill, *cluster.decodes]

    def idle() -> bool:
        stats = [worker_stats(w) for w in workers]
        return all(s.running_requests == 0 and s.kv_blocks_used == 0 for s in stats)

    wait_until(idle, 30, what="workers idle and KV freed after the client left")


def test_decode_worker_killed_mid_stream_migrates(cluster: Cluster) -> None:
    client = cluster.client()
    prompt = "The history of distributed systems"
    kw: Any = {"model": MODEL, "prompt": prompt, "max_tokens": 200, "temperature": 0,
               "extra_body": {"ignore_eos": True}}  # fmt: skip
    expected = client.completions.create(**kw).choices[0].text
    assert expected

    def busy_decode() -> WorkerProc | None:
        for d in cluster.decodes:
            if d.process.alive() and worker_stats(d).running_requests > 0:
                return d
        return None

    parts: list[str] = []
    finish = None
    killed: WorkerProc | None = None
    for ev in client.completions.create(**kw, stream=True):
        if ev.choices:
            parts.append(ev.choices[0].text)
            finish = ev.choices[0].finish_reason or finish
        if killed is None and len(parts) >= 10:
            busy = wait_until(busy_decode, 10, what="the decode worker serving the stream")
            assert busy is not None
            busy.process.kill()
            killed = busy
    assert killed is not None
    assert finish == "length"
    assert "".join(parts) == expected  # no gap, no duplicate
    with urllib.request.urlopen(f"{cluster.base_url}/metrics", timeout=10) as resp:
        metrics = resp.read().decode()
    assert 'switchboard_migrations_total{model="tiny-llama"} 1.0' in metrics


def test_sigterm_finishes_in_flight_streams_then_exits_0(cluster: Cluster) -> None:
    client = cluster.client()
    stream = client.completions.create(
        model=MODEL,
        prompt="A last request",
        max_tokens=60,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    events = iter(stream)
    first = next(events)
    assert first.choices
    proc = cluster.gateway.proc
    assert proc is not None
    proc.terminate()  # SIGTERM while the stream is open
    rest = list(events)
    assert rest[-1].choices[0].finish_reason == "length"
    assert proc.wait(30) == 0
