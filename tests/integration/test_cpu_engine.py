"""The cpu engine on a real (random-weight) Llama: prefill, KV hand-off, batched decode, limits."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from controlplane.errors import AlreadyExists, InvalidArgument
from tests.fakes import FakeClock
from workers.engine import KvEventKind, KvHandle, KvUnavailable, SamplingParams, TokenChunk
from workers.engines.cpu import CpuEngine, CpuEngineConfig, model_fingerprint
from workers.engines.cpu_model import ModelShape


@pytest.fixture(scope="module")
def hf_model(tiny_model: Path) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    model: Any = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32)
    return model.eval()


def make_engine(
    hf_model: Any, tiny_model: Path, clock: FakeClock | None = None, **config: Any
) -> CpuEngine:
    kwargs: dict[str, Any] = {"clock": clock} if clock is not None else {}
    return CpuEngine(
        hf_model,
        model_name="tiny",
        fingerprint=model_fingerprint(tiny_model),
        config=CpuEngineConfig(**config),
        address="127.0.0.1:1",
        **kwargs,
    )


def prompt_of(n: int, salt: int = 0) -> tuple[int, ...]:
    return tuple((i * 37 + salt * 101 + 11) % 2000 for i in range(n))


async def collect(stream: AsyncIterator[TokenChunk]) -> tuple[list[int], str | None]:
    tokens: list[int] = []
    finish: str | None = None
    async for chunk in stream:
        tokens += chunk.token_ids
        finish = chunk.finish_reason
    return tokens, finish


@pytest.mark.parametrize("length", [5, 130, 700])
async def test_disaggregated_tokens_equal_aggregated(
    hf_model: Any, tiny_model: Path, length: int
) -> None:
    engine = make_engine(hf_model, tiny_model)
    try:
        prompt = prompt_of(length)
        sampling = SamplingParams(max_tokens=12)
        expected, finish = await collect(engine.generate("agg", prompt, sampling))
        assert finish == "length"
        assert len(expected) == 12

        res = await engine.prefill("p", prompt, sampling)
        assert res.first_token_id == expected[0]
        assert res.kv.num_tokens == length
        assert res.kv.size_bytes >= length * ModelShape().kv_bytes_per_token
        rest, finish = await collect(
            engine.decode("d", prompt, res.first_token_id, res.kv, sampling)
        )
        assert [res.first_token_id, *rest] == expected
        assert finish == "length"
        with pytest.raises(KvUnavailable):  # handed over once
            engine.export_kv(res.kv.kv_id)
    finally:
        await engine.aclose()


async def test_seeded_sampling_is_repeatable_and_survives_the_hand_off(
    hf_model: Any, tiny_model: Path
) -> None:
    engine = make_engine(hf_model, tiny_model)
    try:
        prompt = prompt_of(40)
        sampling = SamplingParams(max_tokens=10, temperature=1.0, top_p=0.9, seed=42)
        a, _ = await collect(engine.generate("a", prompt, sampling))
        b, _ = await collect(engine.generate("b", prompt, sampling))
        greedy, _ = await collect(engine.generate("g", prompt, SamplingParams(max_tokens=10)))
        assert a == b
        assert a != greedy  # temperature 1 over a 2k vocabulary: 10 greedy picks in a row is ~0
        res = await engine.prefill("p", prompt, sampling)
        rest, _ = await collect(engine.decode("d", prompt, res.first_token_id, res.kv, sampling))
        assert [res.first_token_id, *rest] == a
        # a temperature near 0 is (nearly) greedy, not NaN probabilities (found by fuzzing:
        # logits / 1e-38 overflowed to inf and sampling failed the request)
        tiny = SamplingParams(max_tokens=10, temperature=1.1754943508222875e-38, seed=1)
        cold, _ = await collect(engine.generate("t", prompt, tiny))
        assert cold == greedy
    finally:
        await engine.aclose()


async def test_concurrent_requests_share_decode_steps(hf_model: Any, tiny_model: Path) -> None:
    engine = make_engine(hf_model, tiny_model)
    try:
        prompts = [prompt_of(20 + 15 * i, salt=i) for i in range(8)]
        sampling = SamplingParams(max_tokens=24)
        together = await asyncio.gather(
            *(collect(engine.generate(f"c{i}", p, sampling)) for i, p in enumerate(prompts))
        )
        batched = engine.stats()
        assert batched.max_batch_size_seen == 8
        # batching changes no token: each request alone gives the same output
        for i, p in enumerate(prompts):
            assert (await collect(engine.generate(f"s{i}", p, sampling))) == together[i]
        assert engine.stats().last_batch_size == 1
        # 8 x 24 tokens, batched: far fewer steps than 8 x 24
        assert batched.steps < 8 * 24 / 2
    finally:
        await engine.aclose()


async def test_batch_size_is_capped_and_the_rest_wait(hf_model: Any, tiny_model: Path) -> None:
    engine = make_engine(hf_model, tiny_model, max_num_seqs=3)
    try:
        results = await asyncio.gather(
            *(
                collect(engine.generate(f"r{i}", prompt_of(10, i), SamplingParams(max_tokens=6)))
                for i in range(7)
            )
        )
        assert all(len(tokens) == 6 for tokens, _ in results)
        assert engine.stats().max_batch_size_seen == 3
    finally:
        await engine.aclose()


async def test_abort_mid_stream_ends_with_abort_and_frees_kv(
    hf_model: Any, tiny_model: Path
) -> None:
    engine = make_engine(hf_model, tiny_model)
    try:
        stream = engine.generate("long", prompt_of(50), SamplingParams(max_tokens=2000))
        first = await anext(stream)
        assert first.token_ids
        assert engine.stats().kv_blocks_used > 0
        assert await engine.abort("long")
        tokens, finish = await collect(stream)
        assert finish == "abort"
        await asyncio.sleep(0.05)
        for _ in range(50):  # the step loop frees it on its next turn
            if engine.stats().running_requests == 0:
                break
            await asyncio.sleep(0.02)
        assert engine.stats().running_requests == 0
        assert engine.stats().kv_blocks_used == 0
        assert not await engine.abort("long")
        # the engine still serves
        tokens, finish = await collect(engine.generate("after", prompt_of(5), SamplingParams(3)))
        assert len(tokens) == 3
    finally:
        await engine.aclose()


async def test_held_kv_expires_and_is_evicted_oldest_first(hf_model: Any, tiny_model: Path) -> None:
    clock = FakeClock()
    per_request = 100 * ModelShape().kv_bytes_per_token
    engine = make_engine(
        hf_model,
        tiny_model,
        clock=clock,
        held_kv_ttl_s=30,
        max_held_kv_bytes=int(per_request * 2.5),  # room for two
    )
    try:
        sampling = SamplingParams(max_tokens=4)
        held = [await engine.prefill(f"h{i}", prompt_of(100, i), sampling) for i in range(3)]
        with pytest.raises(KvUnavailable, match="not held"):
            engine.export_kv(held[0].kv.kv_id)  # the oldest made room for the third
        assert engine.export_kv(held[1].kv.kv_id)
        clock.now += 31
        with pytest.raises(KvUnavailable):
            engine.export_kv(held[2].kv.kv_id)  # expired
        assert engine.stats().kv_blocks_used == 0
        # a decode whose KV is gone fails clearly, so the caller can prefill again
        with pytest.raises(KvUnavailable):
            await collect(
                engine.decode("d", prompt_of(100, 2), held[2].first_token_id, held[2].kv, sampling)
            )
    finally:
        await engine.aclose()


async def test_kv_events_report_stored_and_evicted_blocks(hf_model: Any, tiny_model: Path) -> None:
    engine = make_engine(hf_model, tiny_model, block_size=16)
    try:
        await collect(engine.generate("e", prompt_of(40), SamplingParams(max_tokens=2)))
        await asyncio.sleep(0.05)
        events = engine.drain_kv_events()
        stored = [e for e in events if e.kind is KvEventKind.STORED]
        evicted = [e for e in events if e.kind is KvEventKind.EVICTED]
        assert len(stored) == 1
        assert len(stored[0].block_hashes) == 2  # 40 tokens: two full blocks of 16
        assert evicted
        assert evicted[0].block_hashes == stored[0].block_hashes
        assert engine.drain_kv_events() == []
    finally:
        await engine.aclose()


async def test_bad_input_is_refused_with_a_reason(hf_model: Any, tiny_model: Path) -> None:
    engine = make_engine(hf_model, tiny_model, max_context_tokens=256)
    try:
        with pytest.raises(InvalidArgument, match="max_tokens"):
            await engine.prefill("a", prompt_of(4), SamplingParams(max_tokens=0))
        with pytest.raises(InvalidArgument, match="outside the vocabulary"):
            await engine.prefill("b", (1, 2, 99_999), SamplingParams())
        with pytest.raises(InvalidArgument, match="context window"):
            await collect(engine.generate("c", prompt_of(300), SamplingParams()))
        with pytest.raises(InvalidArgument, match="empty"):
            await collect(engine.generate("d", (), SamplingParams()))
        with pytest.raises(KvUnavailable):
            engine.export_kv("nope#1")

        res = await engine.prefill("p", prompt_of(30), SamplingParams(max_tokens=4))
        with pytest.raises(InvalidArgument, match="does not match the prompt"):
            await collect(
                engine.decode(
                    "x", prompt_of(30, salt=9), res.first_token_id, res.kv, SamplingParams()
                )
            )
        unknown = KvHandle("p#x", "127.0.0.1:1", 30, 10)  # nothing is held under that id
        with pytest.raises(KvUnavailable):
            await collect(engine.decode("y", prompt_of(30), 5, unknown, SamplingParams()))

        stream = engine.generate("dup", prompt_of(4), SamplingParams(max_tokens=50))
        await anext(stream)
        with pytest.raises(AlreadyExists):
            await collect(engine.generate("dup", prompt_of(4), SamplingParams()))
        await engine.abort("dup")
        await collect(stream)
        # still healthy after all of that
        tokens, _ = await collect(engine.generate("ok", prompt_of(4), SamplingParams(max_tokens=2)))
        assert len(tokens) == 2
    finally:
        await engine.aclose()


class StaticFetcher:
    """A KvFetcher that returns the same bytes for any handle."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    async def fetch(self, handle: KvHandle) -> bytes:
        return self.data


async def test_kv_from_other_weights_or_garbage_is_refused(hf_model: Any, tiny_model: Path) -> None:
    source = make_engine(hf_model, tiny_model)
    prompt = prompt_of(20)
    res = await source.prefill("p", prompt, SamplingParams(max_tokens=4))
    data = source.export_kv(res.kv.kv_id)
    await source.aclose()
    for fetched, error, match in (
        (data, InvalidArgument, "another model"),
        (b"\x00" * 64, KvUnavailable, "unreadable|format"),
    ):
        other = CpuEngine(
            hf_model,
            model_name="tiny",
            fingerprint="different-weights",
            kv_fetcher=StaticFetcher(fetched),
        )
        try:
            with pytest.raises(error, match=match):
                await collect(
                    other.decode("d", prompt, res.first_token_id, res.kv, SamplingParams())
                )
        finally:
            await other.aclose()
