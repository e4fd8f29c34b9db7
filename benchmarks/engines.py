#!/usr/bin/env python
"""Engine benchmarks: the cpu engine's speed and KV hand-off, and the sim engine's fidelity.

Everything runs on this machine, on 127.0.0.1, and is stopped at the end.

**cpu engine, in process** (the default random-weight Llama, ``switchboard make-model``):
prefill tokens/s at 512 and 2,048 prompt tokens (``generate`` with max_tokens=1, median of
``--repeats``); decode tokens/s with 1, 8 and 32 sequences decoding together (tokens after each
sequence's first, over the time from the last first token to the last token).

**cpu engine, worker processes** (a real etcd, and ``switchboard worker --engine cpu`` processes
for prefill, decode and aggregated serving, one torch thread each):

* KV hand-off for 512 / 2k / 8k-token prompts: the bytes pulled over ``FetchKv`` by a
  ``GrpcKvFetcher`` in this process (ms and MB/s), and what the decode worker pays end to end:
  the time from sending ``Decode`` with the handle to its first chunk (fetch + checks + rebuild
  the cache + one decode step).
* P/D vs aggregated at 2k tokens. Aggregated: ``Decode`` without a handle on the "both" worker;
  TTFT = its first chunk, and the second token after it. P/D: ``Prefill`` on the prefill worker
  returns the first token (TTFT as a router that streams it at once sees it); the second token
  arrives after the hand-off. The figure of merit is the time to the *second* token, P/D over
  aggregated: what the hand-off adds (the goal is <= 1.10).

**sim engine fidelity**: each shipped profile, in process at ``--sim-speedup``; a fixed workload
(single requests of 512 / 2k / 8k prompt tokens, then 8 concurrent 512-token requests) measured
in simulated time (wall x speedup) against the profile's own formulas: TTFT vs
``prefill_ms(n)``, mean inter-token latency vs ``decode_step_ms(batch, context)``.

Usage::

    .venv/bin/python benchmarks/engines.py                 # ~3 minutes on 2 cores
    .venv/bin/python benchmarks/engines.py --quick         # fewer repeats, no 8k prompt

Writes ``--out`` (default benchmarks/results/engines.json) and prints a summary.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
from switchboard.v1 import inference_pb2, worker_pb2, worker_pb2_grpc

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from controlplane.local.procs import EtcdServer, ManagedProcess  # noqa: E402
from workers.engine import SamplingParams  # noqa: E402
from workers.engines.cpu import CpuEngine, CpuEngineConfig, load_cpu_engine  # noqa: E402
from workers.engines.cpu_model import default_model_dir, ensure_model  # noqa: E402
from workers.kv_transfer import GrpcKvFetcher  # noqa: E402

MODEL = "tiny-llama"


def prompt_of(n: int, salt: int) -> tuple[int, ...]:
    return tuple((i * 131 + salt * 7919 + 5) % 2000 for i in range(n))


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


# --- cpu engine in process ----------------------------------------------------------------


async def cpu_in_process(model_path: Path, repeats: int, threads: int) -> dict[str, Any]:
    engine = load_cpu_engine(
        model_path, model_name=MODEL, config=CpuEngineConfig(threads=threads, max_num_seqs=64)
    )
    out: dict[str, Any] = {"threads": threads, "prefill": {}, "decode": {}}
    try:
        await _first_token(engine, prompt_of(64, 0), "warm")
        for n in (512, 2048):
            times = [
                await _first_token(engine, prompt_of(n, 100 + r), f"p{n}-{r}")
                for r in range(repeats)
            ]
            ms = median(times) * 1e3
            out["prefill"][str(n)] = {"ms": round(ms, 2), "tokens_per_s": round(n / ms * 1e3)}
        for batch in (1, 8, 32):
            tps = [
                await _decode_rate(engine, batch, 64, salt=r) for r in range(max(1, repeats // 2))
            ]
            steps = engine.stats()
            out["decode"][str(batch)] = {
                "tokens_per_s": round(median(tps)),
                "max_batch_size_seen": steps.max_batch_size_seen,
            }
    finally:
        await engine.aclose()
    return out


async def _first_token(engine: CpuEngine, prompt: tuple[int, ...], rid: str) -> float:
    started = time.perf_counter()
    async for _ in engine.generate(rid, prompt, SamplingParams(max_tokens=1)):
        pass
    return time.perf_counter() - started


async def _decode_rate(engine: CpuEngine, batch: int, max_tokens: int, salt: int) -> float:
    firsts: list[float] = []
    ends: list[float] = []

    async def one(i: int) -> int:
        n = 0
        async for chunk in engine.generate(
            f"d{batch}-{salt}-{i}", prompt_of(128, salt * 100 + i), SamplingParams(max_tokens)
        ):
            if n == 0:
                firsts.append(time.perf_counter())
            n += len(chunk.token_ids)
        ends.append(time.perf_counter())
        return n

    counts = await asyncio.gather(*(one(i) for i in range(batch)))
    decoded = sum(c - 1 for c in counts)
    return decoded / (max(ends) - max(firsts))


# --- cpu worker processes -----------------------------------------------------------------


class Workers:
    def __init__(self, tmp: Path, model_path: Path) -> None:
        self.tmp = tmp
        self.model_path = model_path
        self.etcd = EtcdServer(tmp / "etcd", log_path=tmp / "etcd.log")
        self.procs: dict[str, ManagedProcess] = {}
        self.addresses: dict[str, str] = {}

    def start(self) -> Workers:
        self.etcd.start()
        for role in ("prefill", "decode", "both"):
            port_file = self.tmp / f"{role}.port"
            argv = [
                sys.executable, "-m", "controlplane", "worker",
                "--etcd", self.etcd.endpoint,
                "--engine", "cpu",
                "--model", MODEL,
                "--model-path", str(self.model_path),
                "--engine-args", json.dumps({"threads": 1}),
                "--role", role,
                "--worker-id", f"bench-{role}",
                "--port-file", str(port_file),
            ]  # fmt: skip
            self.procs[role] = ManagedProcess(role, argv, self.tmp / f"{role}.log").start()
            deadline = time.monotonic() + 90
            while not (port_file.exists() and port_file.read_text().strip()):
                if not self.procs[role].alive() or time.monotonic() > deadline:
                    raise RuntimeError(f"{role} worker did not start:\n{self.procs[role].tail()}")
                time.sleep(0.1)
            self.addresses[role] = f"127.0.0.1:{int(port_file.read_text())}"
        return self

    def stop(self) -> None:
        for proc in self.procs.values():
            proc.stop()
        self.etcd.stop()

    def stub(self, role: str) -> Any:
        channel = grpc.aio.insecure_channel(
            self.addresses[role], options=[("grpc.max_receive_message_length", 64 << 20)]
        )
        return worker_pb2_grpc.WorkerStub(channel)


async def _prefill(
    stub: Any, rid: str, prompt: tuple[int, ...], max_tokens: int
) -> tuple[Any, float]:
    started = time.perf_counter()
    res = await stub.Prefill(
        worker_pb2.PrefillRequest(
            request_id=rid,
            prompt_token_ids=list(prompt),
            sampling=inference_pb2.SamplingParams(max_tokens=max_tokens),
        ),
        timeout=120,
    )
    return res, time.perf_counter() - started


async def _decode_times(stub: Any, request: Any) -> tuple[float, float, list[int]]:
    """Seconds to the first and the second chunk of a Decode stream, and all its tokens."""
    started = time.perf_counter()
    marks: list[float] = []
    tokens: list[int] = []
    async for chunk in stub.Decode(request, timeout=120):
        marks.append(time.perf_counter() - started)
        tokens += chunk.token_ids
    return marks[0], marks[1] if len(marks) > 1 else marks[0], tokens


def cpu_workers(model_path: Path, lengths: list[int], repeats: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="sb-bench-engines-") as tmp:
        workers = Workers(Path(tmp), model_path).start()
        try:
            return asyncio.run(_measure_workers(workers, lengths, repeats))
        finally:
            workers.stop()


async def _measure_workers(w: Workers, lengths: list[int], repeats: int) -> dict[str, Any]:
    from workers.service import kv_from_pb

    prefill, decode, both = w.stub("prefill"), w.stub("decode"), w.stub("both")
    fetcher = GrpcKvFetcher()
    out: dict[str, Any] = {"handoff": {}, "pd_vs_aggregated_2k": {}}
    res, _ = await _prefill(prefill, "warm", prompt_of(32, 0), 2)  # open the channels
    await fetcher.fetch(kv_from_pb(res.kv))
    handoff = out["handoff"]
    for n in lengths:
        fetch_s, decode_first_s, sizes = [], [], []
        for r in range(repeats):
            res, _ = await _prefill(prefill, f"f{n}-{r}", prompt_of(n, r), 4)
            started = time.perf_counter()
            data = await fetcher.fetch(kv_from_pb(res.kv))
            fetch_s.append(time.perf_counter() - started)
            sizes.append(len(data))
            res, _ = await _prefill(prefill, f"h{n}-{r}", prompt_of(n, r), 2)
            first, _, _ = await _decode_times(
                decode,
                worker_pb2.DecodeRequest(
                    request_id=f"h{n}-{r}",
                    prompt_token_ids=list(prompt_of(n, r)),
                    kv=res.kv,
                    first_token_id=res.first_token_id,
                    sampling=inference_pb2.SamplingParams(max_tokens=2),
                ),
            )
            decode_first_s.append(first)
        mb = sizes[0] / 1e6
        handoff[str(n)] = {
            "kv_mb": round(mb, 2),
            "fetch_ms": round(median(fetch_s) * 1e3, 1),
            "fetch_mb_per_s": round(mb / median(fetch_s)),
            "decode_first_chunk_ms": round(median(decode_first_s) * 1e3, 1),
        }

    n = 2048
    agg_ttft, agg_second, pd_ttft, pd_second = [], [], [], []
    for r in range(repeats):
        prompt = prompt_of(n, 500 + r)
        params = inference_pb2.SamplingParams(max_tokens=2)
        first, second, agg_tokens = await _decode_times(
            both,
            worker_pb2.DecodeRequest(
                request_id=f"a{r}", prompt_token_ids=list(prompt), sampling=params
            ),
        )
        agg_ttft.append(first)
        agg_second.append(second)
        res, ttft = await _prefill(prefill, f"pd{r}", prompt, 2)
        first, _, pd_tokens = await _decode_times(
            decode,
            worker_pb2.DecodeRequest(
                request_id=f"pd{r}",
                prompt_token_ids=list(prompt),
                kv=res.kv,
                first_token_id=res.first_token_id,
                sampling=params,
            ),
        )
        if [res.first_token_id, *pd_tokens] != agg_tokens:
            raise AssertionError("P/D and aggregated tokens differ")
        pd_ttft.append(ttft)
        pd_second.append(ttft + first)
    out["pd_vs_aggregated_2k"] = {
        "aggregated_ttft_ms": round(median(agg_ttft) * 1e3, 1),
        "aggregated_second_token_ms": round(median(agg_second) * 1e3, 1),
        "pd_ttft_ms": round(median(pd_ttft) * 1e3, 1),
        "pd_second_token_ms": round(median(pd_second) * 1e3, 1),
        "second_token_ratio_pd_over_aggregated": round(median(pd_second) / median(agg_second), 3),
        "ttft_ratio_pd_over_aggregated": round(median(pd_ttft) / median(agg_ttft), 3),
    }
    await fetcher.close()
    return out


# --- sim fidelity ------------------------------------------------------------------------


async def sim_fidelity(profile_name: str, speedup: float, lengths: list[int]) -> dict[str, Any]:
    from workers.engines.sim import build_sim_engine

    engine = build_sim_engine(profile_name, speedup=speedup)
    profile = engine.profile
    out: dict[str, Any] = {"speedup": speedup, "single": {}, "batch8_512": {}}
    max_tokens = 32
    try:
        for i, n in enumerate(lengths):  # distinct prompts: no prefix-cache hits between them
            prompt = prompt_of(n, 1 + i)
            ttft, itl = await _sim_request(engine, f"s{n}", prompt, max_tokens, speedup)
            ctx = n + max_tokens // 2
            out["single"][str(n)] = _vs(ttft, profile.prefill_ms(n), itl,
                                        profile.decode_step_ms(1, ctx))  # fmt: skip
        results = await asyncio.gather(
            *(
                _sim_request(engine, f"b{i}", prompt_of(512, 10 + i), max_tokens, speedup)
                for i in range(8)
            )
        )
        itl = statistics.mean(r[1] for r in results)
        predicted = profile.decode_step_ms(8, 8 * (512 + max_tokens // 2))
        out["batch8_512"] = {
            "itl_ms": round(itl, 3),
            "predicted_itl_ms": round(predicted, 3),
            "itl_ratio": round(itl / predicted, 3),
        }
    finally:
        await engine.aclose()
    return out


def _vs(ttft: float, p_ttft: float, itl: float, p_itl: float) -> dict[str, float]:
    return {
        "ttft_ms": round(ttft, 3),
        "predicted_ttft_ms": round(p_ttft, 3),
        "ttft_ratio": round(ttft / p_ttft, 3),
        "itl_ms": round(itl, 3),
        "predicted_itl_ms": round(p_itl, 3),
        "itl_ratio": round(itl / p_itl, 3),
    }


async def _sim_request(
    engine: Any, rid: str, prompt: tuple[int, ...], max_tokens: int, speedup: float
) -> tuple[float, float]:
    """Simulated TTFT and mean inter-token latency (ms) of one request."""
    started = time.perf_counter()
    marks: list[tuple[float, int]] = []
    async for chunk in engine.generate(rid, prompt, SamplingParams(max_tokens=max_tokens)):
        marks.append((time.perf_counter(), len(chunk.token_ids)))
    ttft = (marks[0][0] - started) * 1e3 * speedup
    tokens_after = sum(n for _, n in marks[1:])
    itl = (marks[-1][0] - marks[0][0]) * 1e3 * speedup / max(1, tokens_after)
    return ttft, itl


# --- main --------------------------------------------------------------------------------


def summarize(results: dict[str, Any]) -> str:
    lines = ["", f"cpu engine (in process, {results['cpu']['threads']} thread):"]
    for n, r in results["cpu"]["prefill"].items():
        lines.append(f"  prefill {n:>5} tokens   {r['ms']:8.1f} ms   {r['tokens_per_s']:>7} tok/s")
    for b, r in results["cpu"]["decode"].items():
        lines.append(f"  decode batch {b:>3}      {r['tokens_per_s']:>7} tok/s")
    lines.append("KV hand-off between worker processes (gRPC FetchKv):")
    for n, r in results["workers"]["handoff"].items():
        lines.append(
            f"  {n:>5} tokens  {r['kv_mb']:7.2f} MB  fetch {r['fetch_ms']:7.1f} ms "
            f"({r['fetch_mb_per_s']} MB/s)  decode's first chunk {r['decode_first_chunk_ms']} ms"
        )
    pd = results["workers"]["pd_vs_aggregated_2k"]
    lines.append(
        f"P/D vs aggregated, 2k prompt: TTFT {pd['pd_ttft_ms']} vs {pd['aggregated_ttft_ms']} ms "
        f"(x{pd['ttft_ratio_pd_over_aggregated']}); second token {pd['pd_second_token_ms']} vs "
        f"{pd['aggregated_second_token_ms']} ms (x{pd['second_token_ratio_pd_over_aggregated']})"
    )
    lines.append("sim fidelity (measured / profile prediction):")
    for name, r in results["sim"].items():
        singles = ", ".join(
            f"{n}: ttft x{v['ttft_ratio']} itl x{v['itl_ratio']}" for n, v in r["single"].items()
        )
        lines.append(f"  {name}: {singles}; batch 8 itl x{r['batch8_512']['itl_ratio']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer repeats, no 8k-token prompt")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the in-process engine")
    ap.add_argument("--sim-speedup", type=float, default=1.0)
    ap.add_argument(
        "--profiles", default="llama-3.1-8b-h100,llama-3.1-70b-tp4-h100,mixtral-8x7b-tp2-h100"
    )
    ap.add_argument("--model-path", default="", help="default: the cached tiny-llama")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/engines.json"))
    args = ap.parse_args(argv)
    repeats = 2 if args.quick else args.repeats
    lengths = [512, 2048] if args.quick else [512, 2048, 8192]
    model_path = Path(args.model_path) if args.model_path else ensure_model(default_model_dir())

    started = time.time()
    results: dict[str, Any] = {
        "benchmark": "engines",
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "machine": {"platform": platform.platform(), "python": platform.python_version()},
        "model": str(model_path),
        "repeats": repeats,
    }
    results["cpu"] = asyncio.run(cpu_in_process(model_path, repeats, args.threads))
    results["workers"] = cpu_workers(model_path, lengths, repeats)
    results["sim"] = {
        name: asyncio.run(sim_fidelity(name, args.sim_speedup, lengths))
        for name in args.profiles.split(",")
    }
    results["elapsed_s"] = round(time.time() - started, 1)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(summarize(results))
    print(f"\nwrote {out} ({results['elapsed_s']} s)")


if __name__ == "__main__":
    main()
