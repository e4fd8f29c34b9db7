#!/usr/bin/env python
"""Worker transport: one-token decode calls from a gateway-like client to one worker, over the
Worker gRPC service (unary ``DecodeUnary`` and streaming ``Decode``) and over the token
transport (workers/token_transport.py), side by side in one run.

**Worker.** One ``switchboard serve-openai --engine sim --profile tiny-test --speedup 1000000``
process (near-zero engine time), serving gRPC and the token transport from the same engine.

**Client.** This process, on uvloop: ``--concurrency`` tasks, each sending one-token decode
requests (a 20-token prompt) back to back for ``--duration`` seconds after a 1 s warm-up on the
same client; a grpc.aio channel (one per client, as the gateway has one per worker) or one
``TokenClients`` connection. Clients run one after another, in rounds (``--rounds``), so
drift on the shared machine hits all of them alike.

Metrics per transport and concurrency: calls/s (completed / measured seconds) and latency p50
/ p99 (ms), the median over rounds; the token transport's ratio to each gRPC form.

Usage::

    .venv/bin/python benchmarks/worker_transport.py      # ~1 minute

Writes ``--out`` (default benchmarks/results/worker_transport.json) and prints a table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import uvloop
from switchboard.v1 import inference_pb2, worker_pb2, worker_pb2_grpc

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.gateway_overhead import read_ports, wait_for  # noqa: E402
from controlplane.gateway.token_client import TokenClients  # noqa: E402
from controlplane.local.procs import ManagedProcess  # noqa: E402

TRANSPORTS = ("grpc_unary", "grpc_stream", "token")


def request(i: int) -> worker_pb2.DecodeRequest:
    return worker_pb2.DecodeRequest(
        request_id=f"r{i}",
        prompt_token_ids=list(range(1, 21)),
        sampling=inference_pb2.SamplingParams(max_tokens=1, temperature=0.0),
    )


async def measure(
    call: Callable[[worker_pb2.DecodeRequest], Awaitable[None]], conc: int, seconds: float
) -> dict[str, float]:
    latencies: list[float] = []
    counter = 0

    async def loop(until: float, record: bool) -> None:
        nonlocal counter
        while time.monotonic() < until:
            counter += 1
            req = request(counter)
            t0 = time.perf_counter()
            await call(req)
            if record:
                latencies.append(time.perf_counter() - t0)

    await asyncio.gather(*(loop(time.monotonic() + 1.0, False) for _ in range(conc)))
    started = time.monotonic()
    await asyncio.gather(*(loop(started + seconds, True) for _ in range(conc)))
    elapsed = time.monotonic() - started
    latencies.sort()
    return {
        "calls_per_s": round(len(latencies) / elapsed, 1),
        "p50_ms": round(latencies[len(latencies) // 2] * 1e3, 3),
        "p99_ms": round(latencies[int(len(latencies) * 0.99)] * 1e3, 3),
        "calls": len(latencies),
    }


async def run_point(
    transport: str, grpc_port: int, token_port: int, conc: int, secs: float
) -> dict[str, float]:
    if transport == "token":
        clients = TokenClients()
        endpoint = f"127.0.0.1:{token_port}"

        async def token_call(req: worker_pb2.DecodeRequest) -> None:
            async for chunk in clients.decode(endpoint, req, deadline_s=10.0):
                assert chunk.token_ids

        try:
            return await measure(token_call, conc, secs)
        finally:
            await clients.close()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}")
    stub = worker_pb2_grpc.WorkerStub(channel)

    async def unary(req: worker_pb2.DecodeRequest) -> None:
        msg = await stub.DecodeUnary(req, timeout=10.0)
        assert msg.token_ids

    async def stream(req: worker_pb2.DecodeRequest) -> None:
        async for msg in stub.Decode(req, timeout=10.0):
            assert msg.token_ids

    try:
        return await measure(unary if transport == "grpc_unary" else stream, conc, secs)
    finally:
        await channel.close()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--duration", type=float, default=3.0, help="measured seconds per point")
    p.add_argument("--concurrency", default="1,32")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/worker_transport.json"))
    a = p.parse_args()
    concs = [int(c) for c in a.concurrency.split(",")]
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="sb-transport-") as tmp:
        port_file = Path(tmp) / "worker.port"
        argv = [
            sys.executable, "-m", "controlplane", "serve-openai", "--engine", "sim",
            "--profile", "tiny-test", "--speedup", "1000000", "--model", "tiny-sim",
            "--host", "127.0.0.1", "--port", "0", "--grpc-port", "0", "--token-port", "0",
            "--port-file", str(port_file), "--drain-timeout", "2",
        ]  # fmt: skip
        proc = ManagedProcess("worker", argv, Path(tmp) / "worker.log").start()
        try:
            wait_for(lambda: read_ports(port_file) is not None, 60, "worker port file")
            ports = read_ports(port_file)
            assert ports is not None and len(ports) == 3
            _, grpc_port, token_port = ports
            rounds: dict[str, dict[int, list[dict[str, float]]]] = {
                t: {c: [] for c in concs} for t in TRANSPORTS
            }
            for r in range(a.rounds):
                for conc in concs:
                    for t in TRANSPORTS:
                        point = uvloop.run(run_point(t, grpc_port, token_port, conc, a.duration))
                        rounds[t][conc].append(point)
                        print(
                            f"  round {r + 1} {t:12s} c{conc:<3d} {point['calls_per_s']:8.0f}/s"
                            f"  p50 {point['p50_ms']:.3f} ms  p99 {point['p99_ms']:.3f} ms",
                            flush=True,
                        )
        finally:
            proc.stop()
    results: dict[str, dict[str, dict[str, float]]] = {}
    for t in TRANSPORTS:
        results[t] = {}
        for conc in concs:
            pts = rounds[t][conc]
            results[t][str(conc)] = {
                k: round(statistics.median(pt[k] for pt in pts), 3)
                for k in ("calls_per_s", "p50_ms", "p99_ms")
            }
    ratios = {
        str(c): {
            f"token_vs_{g}": {
                "calls_per_s": round(
                    results["token"][str(c)]["calls_per_s"] / results[g][str(c)]["calls_per_s"], 2
                ),
                "p50": round(results["token"][str(c)]["p50_ms"] / results[g][str(c)]["p50_ms"], 2),
            }
            for g in ("grpc_unary", "grpc_stream")
        }
        for c in concs
    }
    print("\nmedian of rounds (calls/s, p50 / p99 ms)")
    for c in concs:
        row = "  ".join(
            f"{t} {results[t][str(c)]['calls_per_s']:.0f}/s {results[t][str(c)]['p50_ms']:.3f}/"
            f"{results[t][str(c)]['p99_ms']:.3f}"
            for t in TRANSPORTS
        )
        print(f"c{c}: {row}")
        print(f"     token vs gRPC: {ratios[str(c)]}")
    doc: dict[str, Any] = {
        "benchmark": "worker_transport",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "wall_s": round(time.time() - started, 1),
        "machine": {
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "grpcio": grpc.__version__,
        },
        "method": {
            "worker": "serve-openai --engine sim --profile tiny-test --speedup 1000000",
            "request": "one-token decode, 20-token prompt, greedy",
            "duration_s": a.duration,
            "rounds": a.rounds,
            "client": "uvloop; grpc.aio channel or one TokenClients connection",
        },
        "results": results,
        "ratios": ratios,
    }
    Path(a.out).write_text(json.dumps(doc, indent=2) + "\n")
    print(f"\nwrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
