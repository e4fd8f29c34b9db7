"""Worker processes on a real etcd: registration, P/D hand-off over gRPC, SIGKILL, drain."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
from switchboard.v1 import inference_pb2, worker_pb2, worker_pb2_grpc

from controlplane.adapters.etcd.client import EtcdClient
from controlplane.adapters.etcd.workers import EtcdWorkerRegistry
from controlplane.core.model import WorkerRecord, WorkerState
from controlplane.local.procs import EtcdServer
from tests.helpers import start_worker, wait_until

TTL = 2


def list_workers(endpoint: str) -> dict[str, WorkerRecord]:
    async def read() -> list[WorkerRecord]:
        client = EtcdClient(endpoint)
        try:
            return await EtcdWorkerRegistry(client).list_workers()
        finally:
            await client.close()

    return {w.worker_id: w for w in asyncio.run(read())}


def stub(address: str) -> Any:
    return worker_pb2_grpc.WorkerStub(grpc.insecure_channel(address))


def sampling(max_tokens: int, seed: int = 7) -> inference_pb2.SamplingParams:
    return inference_pb2.SamplingParams(max_tokens=max_tokens, seed=seed)


def test_workers_register_hand_off_kv_and_expire(tmp_path: Path, etcd: EtcdServer) -> None:
    prefill = start_worker(tmp_path, etcd.endpoint, "p1", role="prefill", ttl_s=TTL)
    decode = start_worker(tmp_path, etcd.endpoint, "d1", role="decode", ttl_s=TTL)
    try:
        wait_until(lambda: len(list_workers(etcd.endpoint)) == 2, 10, what="both workers")
        workers = list_workers(etcd.endpoint)
        assert workers["p1"].role == "prefill"
        assert workers["d1"].role == "decode"
        assert workers["p1"].endpoint == prefill.address
        assert workers["d1"].model == "llama-3.1-8b"
        assert workers["d1"].engine == "sim"
        assert workers["d1"].kv_blocks_total > 0
        assert workers["d1"].state is WorkerState.SERVING

        prompt = list(range(100, 700))  # 600 tokens: several KV blocks
        p, d = stub(prefill.address), stub(decode.address)
        res = p.Prefill(
            worker_pb2.PrefillRequest(
                request_id="r1", prompt_token_ids=prompt, sampling=sampling(20)
            ),
            timeout=20,
        )
        assert res.kv.source_address == prefill.address
        assert res.kv.num_tokens == len(prompt)
        chunks = list(d.Decode(worker_pb2.DecodeRequest(
            request_id="r1", prompt_token_ids=prompt, kv=res.kv,
            first_token_id=res.first_token_id, sampling=sampling(20)), timeout=30))  # fmt: skip
        disaggregated = [res.first_token_id] + [t for c in chunks for t in c.token_ids]
        assert chunks[-1].finish_reason == "length"
        assert chunks[-1].usage.completion_tokens == 20
        # The same request served aggregated on one worker gives the same tokens.
        agg = list(
            d.Decode(
                worker_pb2.DecodeRequest(
                    request_id="r1-agg", prompt_token_ids=prompt, sampling=sampling(20)
                ),
                timeout=30,
            )
        )
        assert [t for c in agg for t in c.token_ids] == disaggregated
        # The KV was handed over once: a second fetch says it is gone.
        with pytest.raises(grpc.RpcError) as info:
            list(
                d.Decode(
                    worker_pb2.DecodeRequest(
                        request_id="r1b",
                        prompt_token_ids=prompt,
                        kv=res.kv,
                        first_token_id=res.first_token_id,
                        sampling=sampling(5),
                    ),
                    timeout=30,
                )
            )
        assert info.value.code() == grpc.StatusCode.NOT_FOUND

        prefill.process.kill()
        killed = time.monotonic()
        wait_until(lambda: "p1" not in list_workers(etcd.endpoint), TTL + 1, what="expiry")
        assert time.monotonic() - killed <= TTL + 1
    finally:
        prefill.process.stop()
        decode.process.stop()


def test_drain_deregisters_only_after_inflight_requests_finish(
    tmp_path: Path, etcd: EtcdServer
) -> None:
    worker = start_worker(tmp_path, etcd.endpoint, "both1", role="both", ttl_s=TTL)
    try:
        wait_until(lambda: "both1" in list_workers(etcd.endpoint), 10, what="registered")
        # ~400 decode steps of ~8 ms simulated at real time: a few seconds in flight.
        call = stub(worker.address).Decode(worker_pb2.DecodeRequest(
            request_id="long", prompt_token_ids=list(range(1, 50)), sampling=sampling(400)),
            timeout=60)  # fmt: skip
        first = next(call)
        assert first.token_ids
        worker.process.proc.terminate()  # type: ignore[union-attr]  # SIGTERM: drain
        wait_until(
            lambda: list_workers(etcd.endpoint)["both1"].state is WorkerState.DRAINING,
            5,
            what="Draining state",
        )
        # New work is refused while the old request goes on.
        with pytest.raises(grpc.RpcError) as info:
            stub(worker.address).Prefill(
                worker_pb2.PrefillRequest(
                    request_id="new", prompt_token_ids=[1, 2], sampling=sampling(2)
                ),
                timeout=5,
            )
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        # While the request is still streaming, the worker stays registered.
        tokens = len(first.token_ids)
        last = first
        checks = 0
        for chunk in call:
            tokens += len(chunk.token_ids)
            last = chunk
            if not chunk.finish_reason and tokens % 50 < len(chunk.token_ids):
                assert "both1" in list_workers(etcd.endpoint)
                checks += 1
        assert checks >= 2
        assert last.finish_reason == "length"
        assert tokens == 400
        wait_until(lambda: "both1" not in list_workers(etcd.endpoint), 5, what="deregistered")
        wait_until(lambda: not worker.process.alive(), 10, what="worker exit")
    finally:
        worker.process.stop()
