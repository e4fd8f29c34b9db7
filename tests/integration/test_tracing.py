"""One trace per request across processes: a real gateway, a real prefill worker and a real decode
worker (``switchboard worker --engine sim`` processes, real etcd) export their spans over OTLP
gRPC to a collector in this test (the OTLP TraceService, in memory). The spans of one request
must form one tree with the right parent links:

    client span (the test's traceparent)
    └── gateway.request             [switchboard-gateway]
        ├── router.decision         [switchboard-gateway]
        ├── worker.prefill          [switchboard-worker-prefill]
        └── worker.decode           [switchboard-worker-decode]
            └── kv.transfer         [switchboard-worker-decode]
                └── worker.fetch_kv [switchboard-worker-prefill]

The workers get their endpoint from ``OTEL_EXPORTER_OTLP_ENDPOINT``, the gateway from
``--otlp-endpoint``. The worker's own OpenAI HTTP server (``serve-openai``) takes a client's
traceparent too. Loops are bounded; nothing is timed.
"""

from __future__ import annotations

import json
import os
import secrets
import threading
import urllib.request
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.trace.v1 import trace_pb2

from controlplane.local.procs import EtcdServer, ManagedProcess
from tests.helpers import PYTHON, start_worker, wait_until
from tests.integration.test_gateway import get_json, start_gateway

MODEL = "llama-3.1-8b"
pytestmark = pytest.mark.timeout(300)


@dataclass(frozen=True)
class Got:
    service: str
    span: trace_pb2.Span

    @property
    def name(self) -> str:
        return self.span.name

    @property
    def span_id(self) -> str:
        return self.span.span_id.hex()

    @property
    def parent(self) -> str:
        return self.span.parent_span_id.hex()


class Collector(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP trace receiver that keeps every span it is sent."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._spans: list[Got] = []

    def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: Any
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        with self._lock:
            for rs in request.resource_spans:
                service = next(
                    (a.value.string_value for a in rs.resource.attributes
                     if a.key == "service.name"), "",
                )  # fmt: skip
                for ss in rs.scope_spans:
                    self._spans += [Got(service, s) for s in ss.spans]
        return trace_service_pb2.ExportTraceServiceResponse()

    def roots(self) -> list[Got]:
        """Gateway spans without a parent (requests that came without a traceparent)."""
        with self._lock:
            return [g for g in self._spans if g.name == "gateway.request" and not g.parent]

    def trace(self, trace_id: str) -> list[Got]:
        with self._lock:
            return [g for g in self._spans if g.span.trace_id.hex() == trace_id]


@dataclass
class Cluster:
    collector: Collector
    otlp: str
    base_url: str
    tmp: Path


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    tmp = tmp_path_factory.mktemp("tracing")
    collector = Collector()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collector, server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    otlp = f"http://127.0.0.1:{port}"
    etcd = EtcdServer(tmp / "etcd-data", log_path=tmp / "etcd.log").start()
    saved = {
        k: os.environ.get(k) for k in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_BSP_SCHEDULE_DELAY")
    }
    os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"] = otlp  # the workers' way in
    os.environ["OTEL_BSP_SCHEDULE_DELAY"] = "100"  # export batches every 100 ms
    procs: list[ManagedProcess] = []
    try:
        common: dict[str, Any] = {"extra": ["--speedup", "20"]}
        procs.append(start_worker(tmp, etcd.endpoint, "tr-p", role="prefill", **common).process)
        procs.append(start_worker(tmp, etcd.endpoint, "tr-d", role="decode", **common).process)
        os.environ.pop("OTEL_EXPORTER_OTLP_ENDPOINT")  # the gateway's: its flag
        gateway, http_port, _ = start_gateway(
            tmp, etcd.endpoint, ["--auth", "none", "--otlp-endpoint", otlp]
        )
        procs.append(gateway)
        base_url = f"http://127.0.0.1:{http_port}"

        def ready() -> bool:
            status, body = get_json(f"{base_url}/v1/models")
            return status == 200 and [m["id"] for m in body["data"]] == [MODEL]

        wait_until(ready, 30, what="gateway sees the model")
        yield Cluster(collector, otlp, base_url, tmp)
    finally:
        for p in reversed(procs):
            p.stop()
        etcd.stop()
        server.stop(grace=None)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def complete(url: str, headers: dict[str, str], prompt: str = "hello tracing") -> dict[str, Any]:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 4, "ignore_eos": True}
    req = urllib.request.Request(
        f"{url}/v1/completions",
        data=json.dumps(body).encode(),
        headers={"content-type": "application/json", **headers},
    )
    with urllib.request.urlopen(req, timeout=60) as resp:
        assert resp.status == 200
        out: dict[str, Any] = json.loads(resp.read())
        return out


EXPECTED = {
    "gateway.request", "router.decision", "worker.prefill", "worker.decode", "kv.transfer",
    "worker.fetch_kv",
}  # fmt: skip


def collect(collector: Collector, trace_id: str) -> dict[str, list[Got]]:
    def complete_tree() -> dict[str, list[Got]] | None:
        by_name: dict[str, list[Got]] = {}
        for g in collector.trace(trace_id):
            by_name.setdefault(g.name, []).append(g)
        return by_name if set(by_name) >= EXPECTED else None

    got = wait_until(complete_tree, 30, 0.1, "every span of the request exported")
    assert got is not None
    return got


def test_one_request_is_one_tree_across_gateway_prefill_and_decode(cluster: Cluster) -> None:
    trace_id, client_span = secrets.token_hex(16), secrets.token_hex(8)
    out = complete(cluster.base_url, {"traceparent": f"00-{trace_id}-{client_span}-01"})
    assert out["usage"]["completion_tokens"] == 4
    spans = collect(cluster.collector, trace_id)
    assert set(spans) == EXPECTED, sorted(spans)
    one = {name: got[0] for name, got in spans.items()}
    assert all(len(got) == 1 for got in spans.values()), {n: len(g) for n, g in spans.items()}
    gateway = one["gateway.request"]
    # the parent links, across three processes
    assert gateway.parent == client_span
    assert one["router.decision"].parent == gateway.span_id
    assert one["worker.prefill"].parent == gateway.span_id
    assert one["worker.decode"].parent == gateway.span_id
    assert one["kv.transfer"].parent == one["worker.decode"].span_id
    assert one["worker.fetch_kv"].parent == one["kv.transfer"].span_id
    # the processes that made them
    assert {n: g.service for n, g in one.items()} == {
        "gateway.request": "switchboard-gateway",
        "router.decision": "switchboard-gateway",
        "worker.prefill": "switchboard-worker-prefill",
        "worker.fetch_kv": "switchboard-worker-prefill",
        "worker.decode": "switchboard-worker-decode",
        "kv.transfer": "switchboard-worker-decode",
    }
    # one tree: every span reaches the gateway span through its parents
    ids = {g.span_id: g for g in one.values()}
    for g in one.values():
        node, hops = g, 0
        while node is not gateway:
            node, hops = ids[node.parent], hops + 1
            assert hops < 6
    # the spans nest in time, too (each child within its parent; same host clock)
    for g in one.values():
        if g is not gateway:
            p = ids[g.parent]
            assert p.span.start_time_unix_nano <= g.span.start_time_unix_nano
    router = {a.key: a.value for a in one["router.decision"].span.attributes}
    assert router["switchboard.prefill_worker"].string_value == "tr-p"
    assert router["switchboard.decode_worker"].string_value == "tr-d"


def test_a_request_without_traceparent_starts_its_own_trace(cluster: Cluster) -> None:
    before = {g.span_id for g in cluster.collector.roots()}
    complete(cluster.base_url, {}, prompt="no parent here")

    def new_root() -> list[Got]:
        return [g for g in cluster.collector.roots() if g.span_id not in before]

    (root,) = wait_until(new_root, 30, 0.1, "a new root gateway span")
    spans = collect(cluster.collector, root.span.trace_id.hex())
    assert spans["worker.decode"][0].parent == root.span_id


def test_the_worker_http_server_takes_a_traceparent(cluster: Cluster) -> None:
    port_file = cluster.tmp / "openai.port"
    argv = [
        PYTHON, "-m", "controlplane", "serve-openai",
        "--engine", "sim", "--model", MODEL, "--speedup", "20", "--port", "0",
        "--port-file", str(port_file),
        "--otlp-endpoint", cluster.otlp,
    ]  # fmt: skip
    proc = ManagedProcess("openai", argv, cluster.tmp / "openai.log").start()
    try:

        def ready() -> bool:
            if not proc.alive():
                raise AssertionError(f"serve-openai exited:\n{proc.tail()}")
            return port_file.exists() and port_file.read_text().strip() != ""

        wait_until(ready, 30, what="serve-openai port file")
        http_port = int(port_file.read_text().split()[0])
        trace_id, client_span = secrets.token_hex(16), secrets.token_hex(8)
        complete(
            f"http://127.0.0.1:{http_port}", {"traceparent": f"00-{trace_id}-{client_span}-01"}
        )

        def exported() -> list[Got]:
            return [g for g in cluster.collector.trace(trace_id) if g.name == "worker.http.request"]

        (span,) = wait_until(exported, 30, 0.1, "the worker's HTTP span")
        assert span.parent == client_span
        assert span.service == "switchboard-worker-both"
    finally:
        proc.stop()
