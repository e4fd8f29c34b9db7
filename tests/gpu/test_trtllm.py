"""TensorRT-LLM disaggregated serving on a real GPU: context-only then generation-only, two
engines in one process, must give the tokens of an aggregated run of the same prompt.

Runs only where TensorRT-LLM imports, NVML finds an NVIDIA GPU, and SWITCHBOARD_TRTLLM_MODEL
names a local Hugging Face model directory (a small one, e.g. TinyLlama-1.1B or Qwen2.5-0.5B;
both engines share one GPU). Everywhere else each test is reported skipped with the reason;
tests/unit/test_trtllm_engine.py covers the adapter against a fake.

    SWITCHBOARD_TRTLLM_MODEL=/models/TinyLlama-1.1B-Chat-v1.0 pytest tests/gpu/test_trtllm.py
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest

from controlplane.errors import FailedPrecondition
from controlplane.nodeagent.inventory import nvml_available
from workers.engine import Role, SamplingParams, TokenChunk
from workers.engines.trtllm import TrtllmEngine, build_trtllm_engine
from workers.main import WorkerSettings

MODEL_DIR = os.environ.get("SWITCHBOARD_TRTLLM_MODEL", "")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        importlib.util.find_spec("tensorrt_llm") is None, reason="needs TensorRT-LLM installed"
    ),
    pytest.mark.skipif(not nvml_available(), reason="needs an NVIDIA driver and GPU (NVML)"),
    pytest.mark.skipif(
        not MODEL_DIR or not Path(MODEL_DIR).is_dir(),
        reason="set SWITCHBOARD_TRTLLM_MODEL to a local model directory",
    ),
]

# Small and frugal: two engines share one GPU.
ENGINE_ARGS = {
    "max_seq_len": 1024,
    "max_batch_size": 8,
    "max_num_tokens": 2048,
    "kv_cache_config": {"free_gpu_memory_fraction": 0.25},
    "cache_transceiver_config": {"backend": "DEFAULT", "max_tokens_in_buffer": 2048},
}


def build(role: Role) -> TrtllmEngine:
    settings = WorkerSettings(
        model="gpu-test",
        engine="trtllm",
        role=role,
        model_path=MODEL_DIR,
        engine_args=json.dumps(ENGINE_ARGS),
    )
    return build_trtllm_engine(settings, f"127.0.0.1:{7001 if role is Role.PREFILL else 7002}")


def tokens_of(chunks: list[TokenChunk]) -> list[int]:
    return [t for c in chunks for t in c.token_ids]


async def test_context_only_then_generation_only_equals_an_aggregated_run() -> None:
    prefill = build(Role.PREFILL)
    decode = build(Role.DECODE)
    try:
        # any ids inside the vocabulary will do; greedy sampling makes the runs comparable
        prompt = tuple(range(1000, 1000 + 48))
        sampling = SamplingParams(max_tokens=24, temperature=0.0)

        res = await prefill.prefill("disagg-1", prompt, sampling)
        assert res.kv.engine_params["engine"] == "trtllm"
        assert "ctx_request_id" in res.kv.engine_params
        assert res.kv.num_tokens == len(prompt)
        decoded = [
            c async for c in decode.decode("disagg-1", prompt, res.first_token_id, res.kv, sampling)
        ]
        aggregated = [c async for c in decode.generate("agg-1", prompt, sampling)]

        assert [res.first_token_id, *tokens_of(decoded)] == tokens_of(aggregated)
        assert decoded[-1].finish_reason == aggregated[-1].finish_reason
        assert aggregated[-1].finish_reason in ("length", "stop")
        with pytest.raises(FailedPrecondition):
            prefill.export_kv(res.kv.kv_id)

        await decode.refresh_stats()
        stats = decode.stats()
        assert stats.kv_blocks_total > 0 and stats.steps > 0
    finally:
        await prefill.aclose()
        await decode.aclose()


async def test_abort_ends_a_running_generation_with_abort() -> None:
    engine = build(Role.DECODE)
    try:
        stream = engine.generate("abort-1", tuple(range(500, 520)), SamplingParams(max_tokens=512))
        first = await anext(stream)
        assert first.finish_reason is None
        assert await engine.abort("abort-1")
        rest = [c async for c in stream]
        assert rest[-1].finish_reason == "abort"
    finally:
        await engine.aclose()
