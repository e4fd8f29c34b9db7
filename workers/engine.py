"""The InferenceEngine contract every engine (vllm, trtllm, cpu, sim) implements.

Theory of operation
-------------------
A request is served either **aggregated** — ``generate`` runs prefill and decode in one engine —
or **disaggregated**, across two engines in two workers:

1. the router calls ``prefill`` on a *prefill* engine. It computes the prompt's KV cache and the
   first token, keeps the KV under a ``KvHandle`` and returns both. The KV stays held until the
   decode side fetches it, the TTL passes, or memory pressure evicts it (LRU);
2. the router calls ``decode`` on a *decode* engine with that handle. The decode engine obtains
   the KV — by the engine's own transport on GPUs (vLLM KV connector / NIXL, TensorRT-LLM cache
   transceiver; ``KvHandle.engine_params`` carries what they need), or through the injected
   ``KvFetcher`` (a ``FetchKv`` stream from the prefill worker) on the cpu and sim engines — then
   streams the remaining tokens. If the KV is gone (evicted, expired, worker restarted), decode
   raises ``KvUnavailable`` and the caller prefills again; nothing is lost silently.

Tokens stream as ``TokenChunk``s: what one engine step produced for the request, never one
message per token under load. The last chunk carries ``finish_reason`` ("stop", "length",
"abort"). ``abort`` ends a running request (its stream ends with "abort") and frees its KV.

``stats()`` is cheap and synchronous (the worker publishes it at >= 2 Hz); ``drain_kv_events()``
returns the prefix-cache blocks stored and evicted since the last call, for prefix-aware routing.
Engines raise Switchboard errors: ``InvalidArgument`` for bad input (prompt longer than the
context window, max_tokens <= 0, token ids outside the vocabulary), ``NotFound`` for unknown
requests or KV ids, ``KvUnavailable`` as above.
"""

from __future__ import annotations

import enum
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from controlplane.errors import InvalidArgument, NotFound


class KvUnavailable(NotFound):
    """The prefilled KV cache is gone (evicted, expired, or its worker restarted): prefill again."""


class Role(enum.StrEnum):
    PREFILL = "prefill"
    DECODE = "decode"
    BOTH = "both"  # aggregated: prefill and decode in one worker


@dataclass(frozen=True, slots=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()

    def validate(self) -> SamplingParams:
        if self.max_tokens <= 0:
            raise InvalidArgument(f"max_tokens must be > 0, got {self.max_tokens}")
        if self.temperature < 0:
            raise InvalidArgument(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise InvalidArgument(f"top_p must be in (0, 1], got {self.top_p}")
        return self


@dataclass(frozen=True, slots=True)
class KvHandle:
    """Where a prefilled request's KV cache can be fetched from."""

    kv_id: str
    source_address: str  # "host:port" of the worker holding it
    num_tokens: int
    size_bytes: int
    engine_params: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class PrefillResult:
    request_id: str
    first_token_id: int
    kv: KvHandle
    cached_prompt_tokens: int = 0


@dataclass(frozen=True, slots=True)
class TokenChunk:
    token_ids: tuple[int, ...]
    finish_reason: str | None = None  # set on the last chunk


@dataclass(frozen=True, slots=True)
class EngineStats:
    running_requests: int = 0
    waiting_requests: int = 0
    kv_blocks_used: int = 0
    kv_blocks_total: int = 0
    prefix_cache_hit_rate: float = 0.0
    tokens_per_second: float = 0.0
    last_batch_size: int = 0  # sequences in the most recent decode step
    max_batch_size_seen: int = 0
    steps: int = 0
    batch_context_tokens: int | None = None
    """Context tokens the running sequences hold in all (what a decode step reads); None:
    the engine does not know."""
    queued_prefill_tokens: int | None = None
    """Prompt tokens still to prefill (waiting prompts + the rest of running ones being
    prefilled in chunks); None: the engine does not know."""
    dp_rank_running: tuple[int, ...] = ()
    """Data-parallel attention (MoE): running sequences per DP rank; empty: one rank."""


class KvEventKind(enum.StrEnum):
    STORED = "stored"
    EVICTED = "evicted"


@dataclass(frozen=True, slots=True)
class KvEvent:
    kind: KvEventKind
    block_hashes: tuple[int, ...]


class KvFetcher(Protocol):
    """Pulls a prefilled KV cache from the worker that holds it (cpu and sim engines)."""

    async def fetch(self, handle: KvHandle) -> bytes:
        """The KV bytes; raises KvUnavailable when the source no longer holds them."""
        ...


class InferenceEngine(Protocol):
    """One model served by one engine instance. See the module docstring for the contract."""

    model: str
    max_context_tokens: int
    vocab_size: int

    async def prefill(
        self, request_id: str, prompt_token_ids: tuple[int, ...], sampling: SamplingParams
    ) -> PrefillResult: ...

    def decode(
        self,
        request_id: str,
        prompt_token_ids: tuple[int, ...],
        first_token_id: int,
        kv: KvHandle,
        sampling: SamplingParams,
    ) -> AsyncIterator[TokenChunk]: ...

    def generate(
        self, request_id: str, prompt_token_ids: tuple[int, ...], sampling: SamplingParams
    ) -> AsyncIterator[TokenChunk]: ...

    async def abort(self, request_id: str) -> bool:
        """End a running request and free its KV; False if it was not running."""
        ...

    def export_kv(self, kv_id: str) -> bytes:
        """The held KV bytes for FetchKv; raises KvUnavailable when gone."""
        ...

    def stats(self) -> EngineStats: ...

    def drain_kv_events(self) -> list[KvEvent]: ...


def validate_prompt(
    prompt_token_ids: tuple[int, ...],
    sampling: SamplingParams,
    *,
    vocab_size: int,
    max_context_tokens: int,
) -> None:
    """Shared input checks: a clear InvalidArgument for each way a request can be malformed."""
    sampling.validate()
    if not prompt_token_ids:
        raise InvalidArgument("prompt is empty")
    bad = [t for t in prompt_token_ids if not 0 <= t < vocab_size]
    if bad:
        raise InvalidArgument(f"token ids {bad[:5]} are outside the vocabulary [0, {vocab_size})")
    total = len(prompt_token_ids) + sampling.max_tokens
    if len(prompt_token_ids) >= max_context_tokens:
        raise InvalidArgument(
            f"prompt of {len(prompt_token_ids)} tokens does not fit the context window of "
            f"{max_context_tokens}"
        )
    if total > max_context_tokens:
        raise InvalidArgument(
            f"prompt ({len(prompt_token_ids)}) + max_tokens ({sampling.max_tokens}) = {total} "
            f"exceeds the context window of {max_context_tokens}"
        )
