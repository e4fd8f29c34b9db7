"""The ``cpu`` engine: a real (small) Hugging Face causal LM on CPU torch, with batched decode.

Theory of operation
-------------------
All model arithmetic runs on **one compute thread** (a single-thread executor), so the event
loop stays free for gRPC; all bookkeeping runs on the event loop. One step-loop task alternates:

1. *plan* (event loop): drop finished and aborted sequences from the running batch, admit
   waiting sequences FIFO while there is a seat (``max_num_seqs``), prefill budget
   (``max_prefill_tokens_per_step``, at least one prompt per step) and KV capacity;
2. *compute* (thread): if the running batch changed, rebuild its padded KV cache; run **one
   decode step for every running sequence at once** (iteration-level batching: sequences join
   and leave between steps, never waiting for each other to finish); then prefill each admitted
   prompt (batch 1, no padding) and sample its first token;
3. *deliver* (event loop): one ``TokenChunk`` per sequence per step; finished sequences end.

The running batch is one ``DynamicCache`` of shape ``[batch, kv_heads, L, head_dim]`` per layer,
**left-padded** to the longest sequence, with a 2-D attention mask that hides the padding and
explicit ``position_ids`` per row (the keys already carry their rotary positions, so padding
does not move them). When membership changes the cache is rebuilt from the rows that stay (sliced
out of the old cache) and the newcomers' own caches; the longest sequence leaving shrinks ``L``.

Disaggregation. ``prefill`` runs the prompt, samples the first token and **holds** the prompt's
KV as bytes (safetensors: ``k.<layer>`` / ``v.<layer>`` tensors ``[kv_heads, tokens, head_dim]``,
plus metadata: format, model fingerprint, token count, prompt checksum), bounded by
``max_held_kv_bytes`` (least recently held evicted first), a TTL and the KV capacity.
``export_kv`` hands the bytes over **once** (the Worker service streams them as checksummed
``FetchKv`` chunks). ``decode`` pulls them through the injected ``KvFetcher``, checks that they
belong to this model and this prompt, rebuilds the cache and joins the running batch with the
first token as its next input. Gone KV raises ``KvUnavailable``: the caller prefills again.

Sampling is greedy at temperature 0; otherwise temperature / top-p with a generator seeded by
(seed or request id, position), so a disaggregated run samples what an aggregated one would.
KV events: the prompt's block hashes (``block_size`` tokens, chained as in the sim engine) are
reported *stored* when a sequence's KV is built or imported and *evicted* when it is freed; this
engine does not reuse prefixes, so its prefix-cache hit rate is 0.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from controlplane.errors import AlreadyExists, FailedPrecondition, InvalidArgument
from workers.engine import (
    EngineStats,
    KvEvent,
    KvEventKind,
    KvFetcher,
    KvHandle,
    KvUnavailable,
    PrefillResult,
    SamplingParams,
    TokenChunk,
    validate_prompt,
)
from workers.engines.sim_core import hash_blocks, token_checksum

if TYPE_CHECKING:
    import torch

    from workers.main import WorkerSettings

log = logging.getLogger(__name__)

KV_FORMAT = "switchboard-cpu-kv/1"
Clock = Callable[[], float]
KvTensors = list[tuple["torch.Tensor", "torch.Tensor"]]  # per layer: k, v [kv_heads, n, head_dim]


@dataclass(frozen=True)
class CpuEngineConfig:
    """Scheduler and memory settings of the cpu engine."""

    max_num_seqs: int = 32
    """Sequences decoded together in one step (the batch size cap)."""
    max_prefill_tokens_per_step: int = 8192
    """Prompt tokens prefilled in one step (at least one prompt is always admitted)."""
    kv_capacity_bytes: int = 1 << 30
    """KV memory for running sequences (reserved as prompt + max_tokens) and held KV."""
    max_held_kv_bytes: int = 512 << 20
    """Prefilled KV waiting for its decode worker; the least recently held is evicted first."""
    held_kv_ttl_s: float = 60.0
    """Held KV not fetched within this many seconds is dropped."""
    block_size: int = 16
    """Tokens per KV block, for block counts in stats and block hashes in KV events."""
    max_context_tokens: int = 0
    """0: the model's ``max_position_embeddings``."""
    threads: int = 1
    """torch intra-op threads; 0 leaves torch's default (one per core). One by default: a small
    model gains little from more, and OpenMP threads on a busy core spin-wait (measured 10-20x
    slower decode steps with 2 threads on 2 cores while another process was busy)."""

    def validate(self) -> CpuEngineConfig:
        for name in ("max_num_seqs", "max_prefill_tokens_per_step", "block_size"):
            if getattr(self, name) <= 0:
                raise InvalidArgument(f"{name} must be > 0")
        if self.kv_capacity_bytes <= 0 or self.max_held_kv_bytes < 0:
            raise InvalidArgument("kv_capacity_bytes must be > 0 and max_held_kv_bytes >= 0")
        if self.held_kv_ttl_s <= 0:
            raise InvalidArgument("held_kv_ttl_s must be > 0")
        if self.max_context_tokens < 0 or self.threads < 0:
            raise InvalidArgument("max_context_tokens and threads must be >= 0")
        return self


class _Aborted:
    pass


_ABORTED = _Aborted()
_Item = tuple[tuple[int, ...], str | None] | _Aborted | BaseException


@dataclass(eq=False)
class _Seq:
    """One request's state. Mutated on the event loop; the compute thread touches ``kv`` only."""

    request_id: str
    prompt: tuple[int, ...]
    sampling: SamplingParams
    queue: asyncio.Queue[_Item]
    hold_kv_as: str | None = None  # a prefill-only request: hold the KV under this id
    kv: KvTensors | None = None  # own cache, while not in the batch (after prefill / import)
    output: list[int] = field(default_factory=list)  # sampled tokens, the first included
    length: int = 0  # tokens in the KV cache
    finished: bool = False
    aborted: bool = False
    block_hashes: tuple[int, ...] = ()
    held_bytes: bytes | None = None  # set by compute for hold_kv_as requests

    @property
    def reserved_tokens(self) -> int:
        return len(self.prompt) + self.sampling.max_tokens


@dataclass
class _Held:
    data: bytes
    expires_at: float
    request_id: str
    block_hashes: tuple[int, ...]


class _Batch:
    """The running batch's padded cache. Only the compute thread reads or writes it."""

    def __init__(self) -> None:
        self.members: list[_Seq] = []
        self.cache: Any = None  # transformers DynamicCache
        self.mask: torch.Tensor | None = None
        self.width = 0  # L: padded length of the cache


class CpuEngine:
    """A Hugging Face causal LM served on CPU. See the module docstring for how it works.

    Args:
        model: the loaded ``PreTrainedModel`` (eval mode).
        model_name: the name tenants use.
        fingerprint: identifies the weights; KV from another model is refused.
        config: scheduler and memory settings.
        address: "host:port" this engine's worker serves FetchKv on (goes into ``KvHandle``).
        kv_fetcher: pulls held KV from a prefill worker (decode side).
        clock: monotonic seconds, for TTLs and tokens/s.
    """

    def __init__(
        self,
        model: Any,
        *,
        model_name: str,
        fingerprint: str,
        config: CpuEngineConfig | None = None,
        address: str = "cpu:0",
        kv_fetcher: KvFetcher | None = None,
        clock: Clock = time.monotonic,
    ) -> None:
        import torch

        self._torch = torch
        self.config = (config or CpuEngineConfig()).validate()
        self._model = model
        cfg = model.config
        self.model = model_name
        self.fingerprint = fingerprint
        self.vocab_size = int(cfg.vocab_size)
        positions = int(cfg.max_position_embeddings)
        self.max_context_tokens = min(self.config.max_context_tokens or positions, positions)
        self.num_layers = int(cfg.num_hidden_layers)
        self.kv_heads = int(getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads)
        self.head_dim = int(
            getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        )
        self.kv_bytes_per_token = 2 * self.num_layers * self.kv_heads * self.head_dim * 4
        self.address = address
        self._kv_fetcher = kv_fetcher
        self._clock = clock
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cpu-engine")
        self._batch = _Batch()
        self._waiting: collections.deque[_Seq] = collections.deque()
        self._running: list[_Seq] = []  # in the batch or joining it next step
        self._requests: dict[str, _Seq] = {}
        self._held: collections.OrderedDict[str, _Held] = collections.OrderedDict()
        self._held_bytes = 0
        self._kv_seq = 0
        self._events: list[KvEvent] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._transfers = 0
        self._token_times: collections.deque[tuple[float, int]] = collections.deque()
        self._last_batch = 0
        self._max_batch = 0
        self._steps = 0

    # -- InferenceEngine -------------------------------------------------------------------------

    async def prefill(
        self, request_id: str, prompt_token_ids: tuple[int, ...], sampling: SamplingParams
    ) -> PrefillResult:
        self._validate(prompt_token_ids, sampling)
        self._kv_seq += 1
        kv_id = f"{request_id}#{self._kv_seq}"
        seq = self._open(request_id, prompt_token_ids, sampling, hold_kv_as=kv_id)
        try:
            self._enqueue(seq)
            item = await seq.queue.get()
        finally:
            self._close(seq)
        if isinstance(item, BaseException):
            raise item
        if isinstance(item, _Aborted):
            raise FailedPrecondition(f"request {request_id!r} was aborted during prefill")
        held = self._held.get(kv_id)
        if held is None:  # evicted between the step and now (only under extreme pressure)
            raise KvUnavailable(f"KV {kv_id!r} was evicted right after prefill; retry")
        return PrefillResult(
            request_id=request_id,
            first_token_id=item[0][0],
            kv=KvHandle(
                kv_id=kv_id,
                source_address=self.address,
                num_tokens=len(prompt_token_ids),
                size_bytes=len(held.data),
                engine_params={"engine": "cpu", "format": KV_FORMAT, "model": self.fingerprint},
            ),
        )

    async def decode(
        self,
        request_id: str,
        prompt_token_ids: tuple[int, ...],
        first_token_id: int,
        kv: KvHandle,
        sampling: SamplingParams,
    ) -> AsyncIterator[TokenChunk]:
        self._validate(prompt_token_ids, sampling)
        if not 0 <= first_token_id < self.vocab_size:
            raise InvalidArgument(f"first_token_id {first_token_id} is outside the vocabulary")
        seq = self._open(request_id, prompt_token_ids, sampling)
        try:
            self._transfers += 1
            try:
                data = await self._fetch(kv)
                loop = asyncio.get_running_loop()
                tensors = await loop.run_in_executor(
                    self._executor, self._import_kv, data, kv, prompt_token_ids
                )
            finally:
                self._transfers -= 1
            if seq.aborted:
                yield TokenChunk((), "abort")
                return
            if first_token_id in sampling.stop_token_ids:
                yield TokenChunk((), "stop")
                return
            if sampling.max_tokens == 1:
                yield TokenChunk((), "length")
                return
            seq.kv = tensors
            seq.length = len(prompt_token_ids)
            seq.output.append(first_token_id)
            seq.block_hashes = hash_blocks(prompt_token_ids, self.config.block_size)
            self._events.append(KvEvent(KvEventKind.STORED, seq.block_hashes))
            self._enqueue(seq, running=True)
            async for chunk in self._stream(seq):
                yield chunk
        finally:
            self._close(seq)

    async def generate(
        self, request_id: str, prompt_token_ids: tuple[int, ...], sampling: SamplingParams
    ) -> AsyncIterator[TokenChunk]:
        self._validate(prompt_token_ids, sampling)
        seq = self._open(request_id, prompt_token_ids, sampling)
        try:
            self._enqueue(seq)
            async for chunk in self._stream(seq):
                yield chunk
        finally:
            self._close(seq)

    async def abort(self, request_id: str) -> bool:
        found = False
        for kv_id, held in list(self._held.items()):
            if held.request_id == request_id:
                self._drop_held(kv_id)
                found = True
        seq = self._requests.get(request_id)
        if seq is not None and not seq.finished:
            self._abort_seq(seq)
            found = True
        return found

    def export_kv(self, kv_id: str) -> bytes:
        self._expire_held()
        held = self._held.get(kv_id)
        if held is None:
            raise KvUnavailable(f"KV {kv_id!r} is not held here (fetched, expired or evicted)")
        self._drop_held(kv_id)
        return held.data

    def stats(self) -> EngineStats:
        self._expire_held()
        now = self._clock()
        while self._token_times and self._token_times[0][0] < now - 5.0:
            self._token_times.popleft()
        window = now - self._token_times[0][0] if self._token_times else 0.0
        tokens = sum(n for _, n in self._token_times)
        block_bytes = self.config.block_size * self.kv_bytes_per_token
        return EngineStats(
            running_requests=len(self._running),
            waiting_requests=len(self._waiting) + self._transfers,
            kv_blocks_used=-(-self._reserved_bytes() // block_bytes),
            kv_blocks_total=self.config.kv_capacity_bytes // block_bytes,
            prefix_cache_hit_rate=0.0,
            tokens_per_second=tokens / window if window > 0.5 else 0.0,
            last_batch_size=self._last_batch,
            max_batch_size_seen=self._max_batch,
            steps=self._steps,
            batch_context_tokens=sum(seq.length for seq in self._running),
            queued_prefill_tokens=sum(len(seq.prompt) for seq in self._waiting),
        )

    def drain_kv_events(self) -> list[KvEvent]:
        events, self._events = self._events, []
        return events

    async def aclose(self) -> None:
        """Stop the step loop; open streams end with "abort"."""
        for seq in list(self._requests.values()):
            self._abort_seq(seq)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self._executor.shutdown(wait=True)

    # -- bookkeeping (event loop) ----------------------------------------------------------------

    def _validate(self, prompt: tuple[int, ...], sampling: SamplingParams) -> None:
        validate_prompt(
            prompt, sampling, vocab_size=self.vocab_size, max_context_tokens=self.max_context_tokens
        )
        need = (len(prompt) + sampling.max_tokens) * self.kv_bytes_per_token
        if need > self.config.kv_capacity_bytes:
            raise InvalidArgument(
                f"prompt + max_tokens needs {need} bytes of KV; this worker has "
                f"{self.config.kv_capacity_bytes}"
            )

    def _open(
        self,
        request_id: str,
        prompt: tuple[int, ...],
        sampling: SamplingParams,
        hold_kv_as: str | None = None,
    ) -> _Seq:
        if request_id in self._requests:
            raise AlreadyExists(f"request {request_id!r} is already running")
        seq = _Seq(request_id, prompt, sampling, asyncio.Queue(), hold_kv_as=hold_kv_as)
        self._requests[request_id] = seq
        return seq

    def _close(self, seq: _Seq) -> None:
        """The caller is gone (finished, failed or cancelled): forget the request."""
        if self._requests.get(seq.request_id) is seq:
            del self._requests[seq.request_id]
        if not seq.finished:
            self._abort_seq(seq)

    def _abort_seq(self, seq: _Seq) -> None:
        seq.aborted = True
        seq.finished = True
        if seq in self._waiting:
            self._waiting.remove(seq)
        seq.queue.put_nowait(_ABORTED)
        self._wake.set()  # the step loop drops it from the batch and frees its KV

    def _enqueue(self, seq: _Seq, *, running: bool = False) -> None:
        if running:
            self._running.append(seq)
        else:
            self._waiting.append(seq)
        self._wake.set()
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name="cpu-steps")

    async def _stream(self, seq: _Seq) -> AsyncIterator[TokenChunk]:
        while True:
            item = await seq.queue.get()
            if isinstance(item, BaseException):
                raise item
            if isinstance(item, _Aborted):
                yield TokenChunk((), "abort")
                return
            yield TokenChunk(item[0], item[1])
            if item[1] is not None:
                return

    async def _fetch(self, kv: KvHandle) -> bytes:
        if self._kv_fetcher is not None:
            return await self._kv_fetcher.fetch(kv)
        if kv.source_address == self.address:
            return self.export_kv(kv.kv_id)
        raise KvUnavailable(f"no KvFetcher configured to reach {kv.source_address}")

    def _reserved_bytes(self) -> int:
        tokens = sum(s.reserved_tokens for s in self._running)
        return tokens * self.kv_bytes_per_token + self._held_bytes

    def _drop_held(self, kv_id: str) -> None:
        held = self._held.pop(kv_id, None)
        if held is not None:
            self._held_bytes -= len(held.data)
            self._events.append(KvEvent(KvEventKind.EVICTED, held.block_hashes))

    def _expire_held(self) -> None:
        now = self._clock()
        for kv_id, held in list(self._held.items()):
            if held.expires_at <= now:
                log.info("held KV %s expired unfetched", kv_id)
                self._drop_held(kv_id)

    def _make_room(self, need: int) -> bool:
        """Evict held KV (oldest first) until ``need`` more bytes fit; False if they cannot."""
        while self._reserved_bytes() + need > self.config.kv_capacity_bytes and self._held:
            kv_id = next(iter(self._held))
            log.info("evicting held KV %s under memory pressure", kv_id)
            self._drop_held(kv_id)
        return self._reserved_bytes() + need <= self.config.kv_capacity_bytes

    def _plan(self) -> list[_Seq]:
        """Drop finished sequences; admit waiting ones. Returns those to prefill this step."""
        for seq in [s for s in self._running if s.finished]:
            self._running.remove(seq)
            self._events.append(KvEvent(KvEventKind.EVICTED, seq.block_hashes))
        self._expire_held()
        admitted: list[_Seq] = []
        budget = self.config.max_prefill_tokens_per_step
        while self._waiting:
            seq = self._waiting[0]
            seats = len(self._running) + sum(1 for s in admitted if s.hold_kv_as is None)
            if seq.hold_kv_as is None and seats >= self.config.max_num_seqs:
                break
            if admitted and len(seq.prompt) > budget:
                break
            need = (
                len(seq.prompt) * self.kv_bytes_per_token
                if seq.hold_kv_as
                else seq.reserved_tokens * self.kv_bytes_per_token
            )
            need += sum(s.reserved_tokens for s in admitted) * self.kv_bytes_per_token
            if not self._make_room(need):
                break
            self._waiting.popleft()
            admitted.append(seq)
            budget -= len(seq.prompt)
        return admitted

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            admitted = self._plan()
            batch = [s for s in self._running if not s.finished]
            if not admitted and not batch:
                self._wake.clear()
                await self._wake.wait()
                continue
            try:
                decoded, prefilled = await loop.run_in_executor(
                    self._executor, self._compute, batch, admitted
                )
            except Exception as e:  # a bug here must fail the callers, not hang them
                log.exception("cpu engine step failed")
                for seq in [*batch, *admitted]:
                    seq.finished = True
                    seq.queue.put_nowait(e)
                self._running = [s for s in self._running if not s.finished]
                self._batch = _Batch()
                continue
            self._steps += 1
            self._last_batch = len(batch)
            self._max_batch = max(self._max_batch, len(batch))
            now = self._clock()
            produced = 0
            for seq, token in zip(batch, decoded, strict=True):
                produced += self._deliver(seq, token)
            for seq, token in zip(admitted, prefilled, strict=True):
                produced += self._admit_done(seq, token)
            if produced:
                self._token_times.append((now, produced))
            await asyncio.sleep(0)  # let callers run (abort, new requests) between steps

    def _deliver(self, seq: _Seq, token: int) -> int:
        if seq.finished:  # aborted while the step ran
            return 0
        seq.output.append(token)
        seq.length += 1
        finish: str | None = None
        if token in seq.sampling.stop_token_ids:
            finish = "stop"
        elif len(seq.output) >= seq.sampling.max_tokens:
            finish = "length"
        if finish is not None:
            seq.finished = True
        seq.queue.put_nowait(((token,), finish))
        return 1

    def _admit_done(self, seq: _Seq, token: int) -> int:
        seq.block_hashes = hash_blocks(seq.prompt, self.config.block_size)
        self._events.append(KvEvent(KvEventKind.STORED, seq.block_hashes))
        if seq.hold_kv_as is not None:
            data, seq.held_bytes = seq.held_bytes, None
            seq.finished = True
            if seq.aborted or data is None:
                self._events.append(KvEvent(KvEventKind.EVICTED, seq.block_hashes))
                return 0
            self._held[seq.hold_kv_as] = _Held(
                data, self._clock() + self.config.held_kv_ttl_s, seq.request_id, seq.block_hashes
            )
            self._held_bytes += len(data)
            while self._held_bytes > self.config.max_held_kv_bytes and self._held:
                self._drop_held(next(iter(self._held)))
            seq.queue.put_nowait(((token,), "length"))
            return 1
        if seq.aborted:
            self._events.append(KvEvent(KvEventKind.EVICTED, seq.block_hashes))
            return 0
        seq.output.append(token)
        finish: str | None = None
        if token in seq.sampling.stop_token_ids:
            finish = "stop"
        elif seq.sampling.max_tokens == 1:
            finish = "length"
        if finish is not None:
            seq.finished = True
            self._events.append(KvEvent(KvEventKind.EVICTED, seq.block_hashes))
        else:
            self._running.append(seq)
        seq.queue.put_nowait(((token,), finish))
        return 1

    # -- arithmetic (compute thread) -------------------------------------------------------------

    def _compute(self, batch: list[_Seq], admitted: list[_Seq]) -> tuple[list[int], list[int]]:
        torch = self._torch
        with torch.inference_mode():
            decoded = self._decode_step(batch) if batch else []
            prefilled = [self._prefill_one(seq) for seq in admitted]
        return decoded, prefilled

    def _prefill_one(self, seq: _Seq) -> int:
        from transformers import DynamicCache

        torch = self._torch
        cache: Any = DynamicCache()
        out = self._model(
            input_ids=torch.tensor([seq.prompt]), cache=cache, use_cache=True, logits_to_keep=1
        )
        token = self._sample(out.logits[:, -1, :], [seq], [0])[0]
        tensors: KvTensors = [(layer.keys[0], layer.values[0]) for layer in cache.layers]
        seq.length = len(seq.prompt)
        if seq.hold_kv_as is not None:
            seq.held_bytes = self._serialize(tensors, seq.prompt)
        else:
            seq.kv = tensors
        return token

    def _decode_step(self, batch: list[_Seq]) -> list[int]:
        torch = self._torch
        if self._batch.members != batch:
            self._rebuild(batch)
        state = self._batch
        assert state.mask is not None
        rows = len(batch)
        inputs = torch.tensor([[s.output[-1]] for s in batch])
        positions = torch.tensor([[s.length] for s in batch])
        state.mask = torch.cat([state.mask, torch.ones(rows, 1, dtype=torch.long)], dim=1)
        out = self._model(
            input_ids=inputs,
            attention_mask=state.mask,
            position_ids=positions,
            cache=state.cache,
            use_cache=True,
            logits_to_keep=1,
        )
        state.width += 1
        return self._sample(out.logits[:, -1, :], batch, [len(s.output) for s in batch])

    def _rebuild(self, batch: list[_Seq]) -> None:
        """A new padded cache for ``batch``: old rows sliced out, newcomers' own caches."""
        from transformers import DynamicCache

        torch = self._torch
        old = self._batch
        rows: list[KvTensors] = []
        for seq in batch:
            if seq in old.members:
                i = old.members.index(seq)
                start = old.width - seq.length
                rows.append(
                    [
                        (layer.keys[i, :, start:], layer.values[i, :, start:])
                        for layer in old.cache.layers
                    ]
                )
            else:
                assert seq.kv is not None, "a sequence joins the batch with its own cache"
                rows.append(seq.kv)
                seq.kv = None
        width = max(s.length for s in batch)
        layers = []
        for li in range(self.num_layers):
            keys = torch.zeros(len(batch), self.kv_heads, width, self.head_dim)
            values = torch.zeros_like(keys)
            for b, (seq, row) in enumerate(zip(batch, rows, strict=True)):
                keys[b, :, width - seq.length :] = row[li][0]
                values[b, :, width - seq.length :] = row[li][1]
            layers.append((keys, values))
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        for b, seq in enumerate(batch):
            mask[b, width - seq.length :] = 1
        new = _Batch()
        new.members = list(batch)
        new.cache = DynamicCache(ddp_cache_data=layers)
        new.mask = mask
        new.width = width
        self._batch = new

    def _sample(self, logits: torch.Tensor, seqs: list[_Seq], positions: list[int]) -> list[int]:
        torch = self._torch
        if all(s.sampling.temperature == 0 for s in seqs):
            return [int(t) for t in logits.argmax(dim=-1).tolist()]
        tokens: list[int] = []
        for row, seq, pos in zip(logits, seqs, positions, strict=True):
            p = seq.sampling
            if p.temperature == 0:
                tokens.append(int(row.argmax()))
                continue
            # subtract the max before dividing: a tiny temperature (1e-38) would overflow the
            # logits to inf and the softmax to NaN; this way it tends to greedy, as it should
            scaled = row.float()
            probs = torch.softmax((scaled - scaled.max()) / p.temperature, dim=-1)
            if p.top_p < 1.0:
                sorted_probs, order = probs.sort(descending=True)
                keep = sorted_probs.cumsum(0) - sorted_probs < p.top_p
                probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
            key = f"{p.seed if p.seed is not None else seq.request_id}\x00{pos}"
            seed = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")
            gen = torch.Generator().manual_seed(seed & 0x7FFF_FFFF_FFFF_FFFF)
            tokens.append(int(torch.multinomial(probs, 1, generator=gen)))
        return tokens

    def _serialize(self, tensors: KvTensors, prompt: tuple[int, ...]) -> bytes:
        from safetensors.torch import save

        named: dict[str, torch.Tensor] = {}
        for li, (k, v) in enumerate(tensors):
            named[f"k.{li}"] = k.contiguous()
            named[f"v.{li}"] = v.contiguous()
        meta = {
            "format": KV_FORMAT,
            "model": self.fingerprint,
            "num_tokens": str(len(prompt)),
            "prompt_checksum": token_checksum(prompt),
        }
        return bytes(save(named, metadata=meta))

    def _import_kv(self, data: bytes, kv: KvHandle, prompt: tuple[int, ...]) -> KvTensors:
        from safetensors import SafetensorError
        from safetensors.torch import load

        try:
            named = load(data)
            meta = _safetensors_metadata(data)
        except (SafetensorError, ValueError, KeyError) as e:
            raise KvUnavailable(f"KV {kv.kv_id!r} is unreadable: {e}") from None
        if meta.get("format") != KV_FORMAT:
            raise KvUnavailable(f"KV {kv.kv_id!r} is not in {KV_FORMAT} format")
        if meta.get("model") != self.fingerprint:
            raise InvalidArgument(f"KV {kv.kv_id!r} was made by another model's weights")
        if meta.get("num_tokens") != str(len(prompt)) or meta.get(
            "prompt_checksum"
        ) != token_checksum(prompt):
            raise InvalidArgument(f"KV {kv.kv_id!r} does not match the prompt")
        tensors: KvTensors = []
        shape = (self.kv_heads, len(prompt), self.head_dim)
        for li in range(self.num_layers):
            k, v = named.get(f"k.{li}"), named.get(f"v.{li}")
            if k is None or v is None or tuple(k.shape) != shape or tuple(v.shape) != shape:
                raise KvUnavailable(f"KV {kv.kv_id!r}: layer {li} is missing or misshapen")
            tensors.append((k, v))
        return tensors


def _safetensors_metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors buffer (its JSON header)."""
    if len(data) < 8:
        raise ValueError("too short")
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + size])
    meta = header.get("__metadata__") or {}
    return {str(k): str(v) for k, v in meta.items()}


def model_fingerprint(path: Path) -> str:
    """Identifies a model directory's weights: config + weight files' sizes and first MiB."""
    h = hashlib.sha256()
    for name in sorted(p.name for p in path.iterdir()):
        if name == "config.json" or name.endswith(".safetensors") or name.endswith(".bin"):
            f = path / name
            h.update(name.encode())
            h.update(str(f.stat().st_size).encode())
            with f.open("rb") as fh:
                h.update(fh.read(1 << 20))
    return h.hexdigest()[:16]


def load_cpu_engine(
    model_path: str | Path,
    *,
    model_name: str,
    config: CpuEngineConfig | None = None,
    address: str = "cpu:0",
    kv_fetcher: KvFetcher | None = None,
) -> CpuEngine:
    """Load a Hugging Face model directory onto CPU (float32) and wrap it in a ``CpuEngine``."""
    from workers.engines.cpu_model import quiet_hf

    quiet_hf()
    import torch
    from transformers import AutoModelForCausalLM

    path = Path(model_path)
    if not (path / "config.json").is_file():
        raise FailedPrecondition(
            f"no model at {path}: make one with `switchboard make-model {path}`"
        )
    config = (config or CpuEngineConfig()).validate()
    if config.threads:
        torch.set_num_threads(config.threads)
    model: Any = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    model.eval()
    return CpuEngine(
        model,
        model_name=model_name,
        fingerprint=model_fingerprint(path),
        config=config,
        address=address,
        kv_fetcher=kv_fetcher,
    )


def build_cpu_engine(settings: WorkerSettings, address: str, kv_fetcher: KvFetcher) -> CpuEngine:
    """The worker's entry: ``--model-path`` plus ``--engine-args`` (CpuEngineConfig fields)."""
    from workers.main import engine_args

    args = engine_args(settings)
    known = set(CpuEngineConfig.__dataclass_fields__)
    unknown = sorted(set(args) - known)
    if unknown:
        raise InvalidArgument(f"unknown cpu engine args {unknown}; known: {sorted(known)}")
    if not settings.model_path:
        raise InvalidArgument("the cpu engine needs --model-path (see `switchboard make-model`)")
    try:
        config = CpuEngineConfig(**args)
    except TypeError as e:
        raise InvalidArgument(f"bad cpu engine args: {e}") from None
    return load_cpu_engine(
        settings.model_path,
        model_name=settings.model or Path(settings.model_path).name,
        config=config,
        address=address,
        kv_fetcher=kv_fetcher,
    )
