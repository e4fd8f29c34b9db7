"""cpu workers as separate processes: prefill -> KV over gRPC FetchKv -> decode, batching, abort.

The greedy tokens of a disaggregated request (prefill in one process, the KV pulled in checksummed
chunks by another) must equal a single-process run of the same model, for prompts shorter and
longer than one KV chunk.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import grpc
import pytest
from switchboard.v1 import inference_pb2, worker_pb2, worker_pb2_grpc

from controlplane.local.procs import EtcdServer
from tests.helpers import WorkerProc, start_worker, wait_until
from workers.engine import SamplingParams
from workers.engines.cpu import load_cpu_engine
from workers.engines.cpu_model import ModelShape
from workers.service import DEFAULT_KV_CHUNK_BYTES

MODEL = "tiny-llama"


def stub(address: str) -> Any:
    return worker_pb2_grpc.WorkerStub(grpc.insecure_channel(address))


def sampling(max_tokens: int) -> inference_pb2.SamplingParams:
    return inference_pb2.SamplingParams(max_tokens=max_tokens)


def prompt_of(n: int, salt: int = 0) -> list[int]:
    return [(i * 53 + salt * 17 + 3) % 2000 for i in range(n)]


def reference_tokens(
    model_path: Path, prompts: list[list[int]], max_tokens: int
) -> list[list[int]]:
    """Each prompt generated in this process, aggregated, one at a time."""

    async def run() -> list[list[int]]:
        engine = load_cpu_engine(model_path, model_name=MODEL)
        try:
            out = []
            for i, prompt in enumerate(prompts):
                tokens: list[int] = []
                async for chunk in engine.generate(
                    f"ref{i}", tuple(prompt), SamplingParams(max_tokens=max_tokens)
                ):
                    tokens += chunk.token_ids
                out.append(tokens)
            return out
        finally:
            await engine.aclose()

    return asyncio.run(run())


def start_pair(tmp_path: Path, etcd: EtcdServer, model: Path) -> tuple[WorkerProc, WorkerProc]:
    common: dict[str, Any] = {
        "engine": "cpu", "model": MODEL, "model_path": model, "ready_timeout_s": 60,
    }  # fmt: skip
    prefill = start_worker(tmp_path, etcd.endpoint, "cpu-p", role="prefill", **common)
    decode = start_worker(tmp_path, etcd.endpoint, "cpu-d", role="decode", **common)
    return prefill, decode


def test_disaggregated_greedy_tokens_equal_a_single_process_run(
    tmp_path: Path, etcd: EtcdServer, tiny_model: Path
) -> None:
    chunk_tokens = DEFAULT_KV_CHUNK_BYTES // ModelShape().kv_bytes_per_token
    lengths = [7, 200, chunk_tokens * 3 + 50]  # the last one spans four FetchKv chunks
    prompts = [prompt_of(n, i) for i, n in enumerate(lengths)]
    expected = reference_tokens(tiny_model, prompts, 16)
    prefill, decode = start_pair(tmp_path, etcd, tiny_model)
    try:
        p, d = stub(prefill.address), stub(decode.address)
        for i, prompt in enumerate(prompts):
            res = p.Prefill(
                worker_pb2.PrefillRequest(
                    request_id=f"r{i}", prompt_token_ids=prompt, sampling=sampling(16)
                ),
                timeout=60,
            )
            assert res.kv.source_address == prefill.address
            assert res.kv.num_tokens == len(prompt)
            assert res.kv.size_bytes > len(prompt) * ModelShape().kv_bytes_per_token
            chunks = list(
                d.Decode(
                    worker_pb2.DecodeRequest(
                        request_id=f"r{i}",
                        prompt_token_ids=prompt,
                        kv=res.kv,
                        first_token_id=res.first_token_id,
                        sampling=sampling(16),
                    ),
                    timeout=60,
                )
            )
            tokens = [res.first_token_id] + [t for c in chunks for t in c.token_ids]
            assert tokens == expected[i], f"prompt of {len(prompt)} tokens"
            assert chunks[-1].finish_reason == "length"
            assert chunks[-1].usage.completion_tokens == 16
            # handed over once: the prefill worker no longer holds it
            with pytest.raises(grpc.RpcError) as info:
                list(p.FetchKv(worker_pb2.FetchKvRequest(kv_id=res.kv.kv_id), timeout=10))
            assert info.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        prefill.process.stop()
        decode.process.stop()


def test_decode_worker_batches_concurrent_requests_and_abort_frees_kv(
    tmp_path: Path, etcd: EtcdServer, tiny_model: Path
) -> None:
    prefill, decode = start_pair(tmp_path, etcd, tiny_model)
    try:
        p, d = stub(prefill.address), stub(decode.address)
        prompts = [prompt_of(30 + 10 * i, salt=i) for i in range(8)]
        handles = [
            p.Prefill(
                worker_pb2.PrefillRequest(
                    request_id=f"b{i}", prompt_token_ids=prompt, sampling=sampling(40)
                ),
                timeout=60,
            )
            for i, prompt in enumerate(prompts)
        ]
        results: dict[int, list[int]] = {}
        errors: list[BaseException] = []

        def run(i: int) -> None:
            try:
                chunks = d.Decode(
                    worker_pb2.DecodeRequest(
                        request_id=f"b{i}",
                        prompt_token_ids=prompts[i],
                        kv=handles[i].kv,
                        first_token_id=handles[i].first_token_id,
                        sampling=sampling(40),
                    ),
                    timeout=120,
                )
                results[i] = [t for c in chunks for t in c.token_ids]
            except BaseException as e:
                errors.append(e)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not errors
        assert all(len(results[i]) == 39 for i in range(8))
        stats = d.Stats(worker_pb2.StatsRequest(), timeout=10)
        assert stats.max_batch_size_seen > 1  # the engine really decoded them together

        # abort mid-stream over gRPC: the stream ends "abort" and the KV is freed
        call = d.Decode(
            worker_pb2.DecodeRequest(
                request_id="long", prompt_token_ids=prompt_of(20), sampling=sampling(4000)
            ),
            timeout=120,
        )
        assert next(call).token_ids
        assert d.Stats(worker_pb2.StatsRequest(), timeout=10).kv_blocks_used > 0
        assert d.Abort(worker_pb2.AbortRequest(request_id="long"), timeout=10).found
        assert [c.finish_reason for c in call][-1] == "abort"
        wait_until(
            lambda: d.Stats(worker_pb2.StatsRequest(), timeout=10).kv_blocks_used == 0,
            10,
            what="KV freed",
        )
        # bad input is refused with a status and a message; the worker lives on
        for bad, code in (
            (worker_pb2.PrefillRequest(request_id="x", prompt_token_ids=[1], sampling=sampling(0)),
             grpc.StatusCode.INVALID_ARGUMENT),
            (worker_pb2.PrefillRequest(request_id="x", prompt_token_ids=[1, 10**6],
                                       sampling=sampling(4)),
             grpc.StatusCode.INVALID_ARGUMENT),
        ):  # fmt: skip
            with pytest.raises(grpc.RpcError) as info:
                p.Prefill(bad, timeout=10)
            assert info.value.code() == code
            assert info.value.details()
        with pytest.raises(grpc.RpcError) as info:
            list(p.FetchKv(worker_pb2.FetchKvRequest(kv_id="unknown#1"), timeout=10))
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        ok = p.Prefill(
            worker_pb2.PrefillRequest(request_id="ok", prompt_token_ids=[1, 2, 3],
                                      sampling=sampling(2)), timeout=30)  # fmt: skip
        assert ok.kv.num_tokens == 3
        assert prefill.process.alive()
        assert decode.process.alive()
    finally:
        prefill.process.stop()
        decode.process.stop()
