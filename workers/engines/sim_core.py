"""The simulated engine's scheduler: pure, synchronous, deterministic (no asyncio, no clock).

Theory of operation
-------------------
``SimScheduler`` is a small model of vLLM v1's scheduler + KV cache manager, driven by a step
loop that lives elsewhere (``workers.engines.sim.SimEngine``, or a test, or a benchmark). Time
comes in as ``now`` (seconds on the caller's timeline); each ``step(now)`` returns how long that
iteration takes on the profiled hardware, and the caller decides what to do with that (sleep it,
add it to a virtual clock). Same profile, config and calls => same results, bit for bit.

**Requests.** A request holds ``all_tokens`` (prompt + generated so far) and ``num_computed``
(tokens whose KV exists). Every step a request is given ``num_new`` tokens to compute; when
``num_computed`` reaches ``len(all_tokens)`` a token is sampled and appended. Prefill and decode are
the same operation: a decode is ``num_new == 1``. A long prompt is cut into chunks by the token
budget (chunked prefill).

**Paged KV.** The cache is ``num_blocks`` blocks of ``block_size`` tokens; a request owns the
blocks that cover ``num_computed + num_new`` tokens. Blocks are reference-counted. Free blocks sit
in an LRU queue (oldest first); a free block may still hold a cached prefix.

**Prefix caching.** A *full* block is named by a chained hash: blake2b-64 of (parent block's hash,
the block's token ids), so a hash names the whole prefix up to the end of its block. When a
block's last token is computed its hash is registered (a ``STORED`` event) unless another block
already holds that prefix. On admission the request's leading full blocks are looked up; hits are
shared (ref count + 1, taken off the free queue) and count as computed. At most
``len(all_tokens) - 1`` tokens can hit: the last one is always computed, to sample from. Taking a
block from the free queue that still holds a hash evicts that prefix (an ``EVICTED`` event).
Finished requests free their blocks tail first, so shared heads outlive private tails.

**A step** (``step(now)``) — continuous batching, in this order:

1. running requests, oldest first: each gets ``min(remaining, token budget)`` tokens (1 for a
   decode). If the blocks it needs are not free, held KV is dropped first (LRU), then the most
   recently admitted running request is *preempted* (recompute style, as vLLM v1): its blocks
   are freed, ``num_computed`` goes back to 0 and it returns to the *front* of the waiting queue,
   keeping its generated tokens. If the request itself is the newest, it preempts itself.
2. if nobody was preempted: waiting requests, first come first served, while the token budget
   (``max_num_batched_tokens``) and ``max_num_seqs`` allow and their blocks fit (dropping held KV
   if needed). The head of the queue that does not fit blocks the rest (no overtaking).
3. the step's duration is the profile's ``step_ms``: scheduled requests that are in generation
   with ``num_new == 1`` form the decode batch (B sequences, C context tokens); all others are
   prefill chunks ``(num_new, num_computed)``.
4. tokens are "computed": newly full blocks are hashed, finished prompts sample a token
   (``sample_token``: blake2b of (seed or request id, position) mod vocab), and a request ends
   on a stop token ("stop") or at ``max_tokens`` generated tokens ("length").

**Held KV** (disaggregated prefill). A request added with ``hold_kv_as=<kv_id>`` finishes after its
first token but keeps its blocks, under ``kv_id``, until ``take_held`` (the decode side fetched
it), ``abort``, its TTL, the count/token bounds (LRU), or memory pressure drops it. Dropped
held KV goes back to the free queue with its hashes, so it still serves as prefix cache.

**Imported KV** (disaggregated decode). A request added with ``kv_imported_tokens=n`` starts with
its first ``n`` tokens computed at no cost (their KV came over the wire); its full blocks are
registered as prefix cache. After a preemption the import is gone and the request recomputes.

**Stats.** Hit rate = prefix-cache hit tokens / prompt tokens over the last ``hit_rate_window``
first admissions (re-admissions after preemption are not counted). Tokens per second = tokens
sampled in steps that ended in the last ``throughput_window_s`` of the caller's timeline, divided
by that window (or by the time since the first step, when that is shorter).
"""

from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict, deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from controlplane.errors import AlreadyExists, InvalidArgument
from workers.engine import EngineStats, KvEvent, KvEventKind
from workers.profiles import SimProfile

_MAX_PENDING_EVENTS = 100_000
"""KV events kept for ``drain_kv_events`` when nobody drains them; older ones are dropped."""

# --- stable hashing --------------------------------------------------------------------------


def hash_block(parent: int, token_ids: Sequence[int]) -> int:
    """The 64-bit chained hash of one full block (``parent`` = previous block's hash, or 0)."""
    h = hashlib.blake2b(digest_size=8)
    h.update(parent.to_bytes(8, "little"))
    h.update(struct.pack(f"<{len(token_ids)}I", *token_ids))
    return int.from_bytes(h.digest(), "little")


def hash_blocks(token_ids: Sequence[int], block_size: int) -> tuple[int, ...]:
    """Chained hashes of every full block of ``token_ids`` (a partial tail has none); the
    same values as ``hash_block`` block by block, from one packing of the whole prompt (this
    runs for every request the gateway routes)."""
    full = len(token_ids) - len(token_ids) % block_size if block_size > 0 else 0
    if full <= 0:
        return ()
    packed = struct.pack(f"<{full}I", *token_ids[:full])
    step = 4 * block_size
    hashes: list[int] = []
    parent = 0
    blake2b, from_bytes = hashlib.blake2b, int.from_bytes
    for start in range(0, 4 * full, step):
        digest = blake2b(
            parent.to_bytes(8, "little") + packed[start : start + step], digest_size=8
        ).digest()
        parent = from_bytes(digest, "little")
        hashes.append(parent)
    return tuple(hashes)


def token_checksum(token_ids: Sequence[int]) -> str:
    """A short hex digest of a token sequence (to check that a KV handle matches a prompt)."""
    return hashlib.blake2b(
        struct.pack(f"<{len(token_ids)}I", *token_ids), digest_size=16
    ).hexdigest()


def sample_token(key: str, position: int, vocab_size: int) -> int:
    """The token at ``position`` of the sequence identified by ``key``: pseudo-random, stable."""
    digest = hashlib.blake2b(f"{key}\x00{position}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % vocab_size


# --- inputs and outputs ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SimConfig:
    """Scheduler settings (vLLM's names where they exist)."""

    max_num_seqs: int = 256
    """Most requests running (holding KV and being scheduled) at once."""
    max_num_batched_tokens: int = 8192
    """Token budget of one step: decodes (1 each) plus prefill chunks."""
    block_size: int | None = None
    """Tokens per KV block; None = the profile's."""
    kv_capacity_blocks: int | None = None
    """KV blocks in all; None = the profile's ``kv_capacity_tokens // block_size``."""
    enable_prefix_caching: bool = True
    max_held_kv: int = 1024
    """Most prefilled KV caches held for a decode side to fetch; the oldest is dropped past it."""
    max_held_kv_tokens: int | None = None
    """Most tokens of held KV in all; None = bounded only by the cache itself."""
    held_kv_ttl_s: float = 60.0
    """Held KV is dropped this long after it was produced (on the scheduler's timeline)."""
    hit_rate_window: int = 1000
    """Prefix-cache hit rate covers this many most recent admissions."""
    throughput_window_s: float = 10.0
    """tokens_per_second covers steps that ended this long ago or less (or since the first)."""

    def validate(self) -> SimConfig:
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_held_kv", "hit_rate_window"):
            if getattr(self, name) < 1:
                raise InvalidArgument(f"SimConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("block_size", "kv_capacity_blocks", "max_held_kv_tokens"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise InvalidArgument(f"SimConfig.{name} must be >= 1 or None, got {value}")
        if self.held_kv_ttl_s <= 0 or self.throughput_window_s <= 0:
            raise InvalidArgument("SimConfig.held_kv_ttl_s and throughput_window_s must be > 0")
        return self


@dataclass(frozen=True, slots=True)
class SimRequest:
    request_id: str
    prompt_token_ids: tuple[int, ...]
    max_tokens: int
    """Most generated tokens, counting ``initial_output_token_ids``."""
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = None
    """Key of the token sampler; None = the request id."""
    initial_output_token_ids: tuple[int, ...] = ()
    """Tokens generated elsewhere already (decode side: the prefill worker's first token)."""
    kv_imported_tokens: int = 0
    """Leading tokens whose KV arrived from another worker: computed at no cost on admission."""
    hold_kv_as: str | None = None
    """Prefill only: finish after the first token and hold the KV under this id."""


@dataclass(frozen=True, slots=True)
class ScheduledChunk:
    request_id: str
    num_new_tokens: int
    num_computed_before: int
    is_decode: bool


@dataclass(frozen=True, slots=True)
class HeldKv:
    """A prefilled request's KV, kept for the decode side."""

    kv_id: str
    request_id: str
    num_tokens: int
    block_hashes: tuple[int, ...]
    prompt_checksum: str
    created_at: float


@dataclass(frozen=True, slots=True)
class RequestOutput:
    request_id: str
    new_token_ids: tuple[int, ...]
    finish_reason: str | None = None
    """"stop" | "length" when the request ended in this step."""
    num_cached_tokens: int = 0
    """Prompt tokens served from the prefix cache at its first admission."""
    held_kv: HeldKv | None = None
    """Set when a ``hold_kv_as`` request finished and its KV is held."""


@dataclass(frozen=True, slots=True)
class StepResult:
    now: float
    duration_s: float
    """How long the step takes on the profiled hardware (0 when nothing was scheduled)."""
    scheduled: tuple[ScheduledChunk, ...]
    outputs: tuple[RequestOutput, ...]
    preempted: tuple[str, ...]
    kv_events: tuple[KvEvent, ...]

    @property
    def decode_batch_size(self) -> int:
        return sum(1 for c in self.scheduled if c.is_decode)

    @property
    def num_prefill_tokens(self) -> int:
        return sum(c.num_new_tokens for c in self.scheduled if not c.is_decode)


# --- KV block pool -----------------------------------------------------------------------------


class _BlockPool:
    """Reference-counted KV blocks, a free LRU queue, and the prefix-cache hash index."""

    def __init__(self, num_blocks: int, caching: bool) -> None:
        self.num_blocks = num_blocks
        self.caching = caching
        self.ref = [0] * num_blocks
        self.hash: list[int | None] = [None] * num_blocks
        self.free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))
        self.cached: dict[int, int] = {}  # block hash -> block id
        self.stored: list[int] = []
        self.evicted: list[int] = []

    @property
    def num_free(self) -> int:
        return len(self.free)

    def lookup(self, hashes: Iterable[int]) -> list[int]:
        """Block ids of the longest cached prefix."""
        hits: list[int] = []
        if not self.caching:
            return hits
        for h in hashes:
            block = self.cached.get(h)
            if block is None:
                break
            hits.append(block)
        return hits

    def touch(self, blocks: Iterable[int]) -> None:
        for b in blocks:
            if self.ref[b] == 0:
                del self.free[b]
            self.ref[b] += 1

    def allocate(self, n: int) -> list[int]:
        assert n <= len(self.free), "caller checks num_free first"
        out: list[int] = []
        for _ in range(n):
            b, _ = self.free.popitem(last=False)
            h = self.hash[b]
            if h is not None:
                del self.cached[h]
                self.hash[b] = None
                self.evicted.append(h)
            self.ref[b] = 1
            out.append(b)
        return out

    def release(self, blocks: Sequence[int]) -> None:
        """Drop one reference to each block; unreferenced ones join the free queue tail first."""
        for b in reversed(blocks):
            self.ref[b] -= 1
            assert self.ref[b] >= 0
            if self.ref[b] == 0:
                self.free[b] = None

    def register(self, block: int, h: int) -> None:
        if not self.caching or h in self.cached or self.hash[block] is not None:
            return
        self.hash[block] = h
        self.cached[h] = block
        self.stored.append(h)

    def take_events(self) -> list[KvEvent]:
        events = []
        if self.evicted:
            events.append(KvEvent(KvEventKind.EVICTED, tuple(self.evicted)))
        if self.stored:
            events.append(KvEvent(KvEventKind.STORED, tuple(self.stored)))
        self.stored, self.evicted = [], []
        return events


# --- request state -----------------------------------------------------------------------------


@dataclass(slots=True)
class _Req:
    req: SimRequest
    all_tokens: list[int]
    num_output: int
    import_credit: int
    hashes: list[int] = field(default_factory=list)
    blocks: list[int] = field(default_factory=list)
    num_computed: int = 0
    num_registered: int = 0  # leading blocks whose hash registration is done
    num_cached_tokens: int = 0
    admitted: bool = False
    finish_reason: str | None = None

    @property
    def remaining(self) -> int:
        return len(self.all_tokens) - self.num_computed

    @property
    def in_generation(self) -> bool:
        return self.num_computed >= len(self.req.prompt_token_ids)


class SimScheduler:
    """vLLM-like continuous-batching scheduler over a paged, prefix-cached KV pool.

    See the module docstring for the theory of operation.
    """

    def __init__(self, profile: SimProfile, config: SimConfig | None = None) -> None:
        self.profile = profile
        self.config = (config or SimConfig()).validate()
        self.block_size = self.config.block_size or profile.block_size
        self.num_blocks = self.config.kv_capacity_blocks or (
            profile.kv_capacity_tokens // self.block_size
        )
        if self.num_blocks < 1:
            raise InvalidArgument("the KV cache has no blocks")
        self._pool = _BlockPool(self.num_blocks, self.config.enable_prefix_caching)
        self._reqs: dict[str, _Req] = {}
        self._running: list[_Req] = []
        self._waiting: deque[_Req] = deque()
        self._held: OrderedDict[str, tuple[HeldKv, list[int]]] = OrderedDict()
        self._events: list[KvEvent] = []
        self._hits: deque[tuple[int, int]] = deque(maxlen=self.config.hit_rate_window)
        self._recent_tokens: deque[tuple[float, int]] = deque()
        self._last_batch = 0
        self._max_batch = 0
        self._first_step_at: float | None = None
        self.steps = 0
        self.num_preemptions = 0
        self.num_held_dropped = 0
        self.prompt_tokens_computed = 0
        """Prompt tokens actually prefilled (neither prefix-cache hits nor imported)."""
        self.tokens_generated = 0
        self.busy_s = 0.0

    # -- requests ------------------------------------------------------------------------------

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def add_request(self, req: SimRequest, now: float) -> None:
        """Queue a request (FCFS). Raises AlreadyExists / InvalidArgument."""
        del now  # arrival order is the queue order; kept for a uniform call shape
        if req.request_id in self._reqs:
            raise AlreadyExists(f"request {req.request_id!r} is already running")
        if not req.prompt_token_ids or req.max_tokens < 1:
            raise InvalidArgument("a request needs a prompt and max_tokens >= 1")
        if len(req.initial_output_token_ids) >= req.max_tokens:
            raise InvalidArgument("initial_output_token_ids already reach max_tokens")
        if not 0 <= req.kv_imported_tokens <= len(req.prompt_token_ids):
            raise InvalidArgument("kv_imported_tokens must be within the prompt")
        longest = len(req.prompt_token_ids) + (1 if req.hold_kv_as else req.max_tokens)
        if self.blocks_for(longest) > self.num_blocks:
            raise InvalidArgument(
                f"prompt + max_tokens = {longest} tokens needs {self.blocks_for(longest)} KV "
                f"blocks; the cache has {self.num_blocks}"
            )
        all_tokens = [*req.prompt_token_ids, *req.initial_output_token_ids]
        credit = min(req.kv_imported_tokens, len(all_tokens) - 1)
        st = _Req(req, all_tokens, len(req.initial_output_token_ids), credit)
        self._reqs[req.request_id] = st
        self._waiting.append(st)

    def abort(self, request_id: str, *, drop_held: bool = True) -> bool:
        """Remove a request (running or waiting) and, unless told not to, KV held for it.

        False if there was neither.
        """
        found = False
        st = self._reqs.pop(request_id, None)
        if st is not None:
            found = True
            if st in self._running:
                self._running.remove(st)
            else:
                self._waiting.remove(st)
            self._pool.release(st.blocks)
            st.blocks = []
        held = [k for k, (h, _) in self._held.items() if h.request_id == request_id]
        for kv_id in held if drop_held else []:
            self._drop_held(kv_id)
            found = True
        self._flush_pool_events()
        return found

    def has_work(self) -> bool:
        return bool(self._running or self._waiting)

    def is_active(self, request_id: str) -> bool:
        return request_id in self._reqs

    # -- held KV -------------------------------------------------------------------------------

    def held_kv(self, kv_id: str, now: float) -> HeldKv | None:
        self.expire_held(now)
        entry = self._held.get(kv_id)
        return entry[0] if entry else None

    def take_held(self, kv_id: str, now: float) -> HeldKv | None:
        """Hand over held KV (the decode side fetched it) and free its blocks; None if gone."""
        held = self.held_kv(kv_id, now)
        if held is not None:
            self._pool.release(self._held.pop(kv_id)[1])
            self._flush_pool_events()
        return held

    def expire_held(self, now: float) -> None:
        ttl = self.config.held_kv_ttl_s
        while self._held:
            kv_id, (held, _) = next(iter(self._held.items()))
            if now - held.created_at < ttl:
                break
            self._drop_held(kv_id)
        self._flush_pool_events()

    @property
    def held_count(self) -> int:
        return len(self._held)

    def _drop_held(self, kv_id: str) -> None:
        _, blocks = self._held.pop(kv_id)
        self._pool.release(blocks)
        self.num_held_dropped += 1

    def _drop_oldest_held(self) -> bool:
        if not self._held:
            return False
        self._drop_held(next(iter(self._held)))
        return True

    def _hold(self, st: _Req, now: float) -> HeldKv:
        assert st.req.hold_kv_as is not None
        prompt = st.req.prompt_token_ids
        held = HeldKv(
            kv_id=st.req.hold_kv_as,
            request_id=st.req.request_id,
            num_tokens=len(prompt),
            block_hashes=hash_blocks(prompt, self.block_size),
            prompt_checksum=token_checksum(prompt),
            created_at=now,
        )
        if held.kv_id in self._held:
            self._drop_held(held.kv_id)
        self._held[held.kv_id] = (held, st.blocks)
        st.blocks = []
        limit_tokens = self.config.max_held_kv_tokens
        while len(self._held) > self.config.max_held_kv or (
            limit_tokens is not None
            and sum(h.num_tokens for h, _ in self._held.values()) > limit_tokens
        ):
            self._drop_oldest_held()
        return held

    # -- the step ------------------------------------------------------------------------------

    def step(self, now: float) -> StepResult:
        """Run one iteration at ``now``; see the module docstring."""
        self.expire_held(now)
        if len(self._events) > _MAX_PENDING_EVENTS:  # nobody drains: keep the newest
            del self._events[: len(self._events) - _MAX_PENDING_EVENTS]
        events_before = len(self._events)
        budget = self.config.max_num_batched_tokens
        plan: list[tuple[_Req, int]] = []
        preempted: list[str] = []

        i = 0
        while i < len(self._running) and budget > 0:
            st = self._running[i]
            n = min(st.remaining, budget)
            need = self.blocks_for(st.num_computed + n) - len(st.blocks)
            preempted_self = False
            while need > self._pool.num_free:
                if self._drop_oldest_held():
                    continue
                victim = self._running.pop()
                self._preempt(victim)
                preempted.append(victim.req.request_id)
                if victim is st:
                    preempted_self = True
                    break
            if preempted_self:
                break
            st.blocks.extend(self._pool.allocate(max(need, 0)))
            plan.append((st, n))
            budget -= n
            i += 1

        while (
            not preempted
            and self._waiting
            and budget > 0
            and len(self._running) < self.config.max_num_seqs
        ):
            admitted = self._admit(self._waiting[0], budget)
            if admitted is None:
                break
            st = self._waiting.popleft()
            self._running.append(st)
            plan.append((st, admitted))
            budget -= admitted

        scheduled = tuple(
            ScheduledChunk(
                st.req.request_id, n, st.num_computed, is_decode=n == 1 and st.in_generation
            )
            for st, n in plan
        )
        decode_b = sum(1 for c in scheduled if c.is_decode)
        decode_c = sum(c.num_computed_before + 1 for c in scheduled if c.is_decode)
        chunks = [(c.num_new_tokens, c.num_computed_before) for c in scheduled if not c.is_decode]
        duration_s = self.profile.step_ms(decode_b, decode_c, chunks) / 1e3

        outputs = [self._advance(st, n, now + duration_s) for st, n in plan]
        self._flush_pool_events()
        if plan:
            if self._first_step_at is None:
                self._first_step_at = now
            self.steps += 1
            self.busy_s += duration_s
            self._last_batch = len(plan)
            self._max_batch = max(self._max_batch, len(plan))
            sampled = sum(len(o.new_token_ids) for o in outputs)
            self.tokens_generated += sampled
            self._recent_tokens.append((now + duration_s, sampled))
        return StepResult(
            now=now,
            duration_s=duration_s,
            scheduled=scheduled,
            outputs=tuple(o for o in outputs if o.new_token_ids or o.finish_reason),
            preempted=tuple(preempted),
            kv_events=tuple(self._events[events_before:]),
        )

    def _admit(self, st: _Req, budget: int) -> int | None:
        """Give the head of the waiting queue its blocks; the tokens it gets, or None."""
        max_hit_blocks = (len(st.all_tokens) - 1) // self.block_size
        self._ensure_hashes(st)
        hits = self._pool.lookup(st.hashes[:max_hit_blocks])
        computed = max(len(hits) * self.block_size, st.import_credit)
        n = min(len(st.all_tokens) - computed, budget)
        need = self.blocks_for(computed + n) - len(hits)

        def fits() -> bool:
            hits_in_free = sum(1 for b in hits if self._pool.ref[b] == 0)
            return need <= self._pool.num_free - hits_in_free

        while not fits():
            if not self._drop_oldest_held():
                return None
            # dropping held KV may have turned a held prefix into a free cached one: look again
            hits = self._pool.lookup(st.hashes[:max_hit_blocks])
            computed = max(len(hits) * self.block_size, st.import_credit)
            n = min(len(st.all_tokens) - computed, budget)
            need = self.blocks_for(computed + n) - len(hits)
        self._pool.touch(hits)
        st.blocks = hits + self._pool.allocate(need)
        st.num_registered = len(hits)
        st.num_computed = computed
        if not st.admitted:
            st.admitted = True
            prompt_len = len(st.req.prompt_token_ids)
            st.num_cached_tokens = min(len(hits) * self.block_size, prompt_len)
            self._hits.append((prompt_len, st.num_cached_tokens))
        st.import_credit = 0
        self._register_full_blocks(st)
        return n

    def _preempt(self, st: _Req) -> None:
        self._pool.release(st.blocks)
        st.blocks = []
        st.num_computed = 0
        st.num_registered = 0
        st.import_credit = 0
        self._waiting.appendleft(st)
        self.num_preemptions += 1

    def _ensure_hashes(self, st: _Req) -> None:
        full = len(st.all_tokens) // self.block_size
        parent = st.hashes[-1] if st.hashes else 0
        for b in range(len(st.hashes), full):
            parent = hash_block(
                parent, st.all_tokens[b * self.block_size : (b + 1) * self.block_size]
            )
            st.hashes.append(parent)

    def _register_full_blocks(self, st: _Req) -> None:
        full = st.num_computed // self.block_size
        if full <= st.num_registered:
            return
        self._ensure_hashes(st)
        for b in range(st.num_registered, full):
            self._pool.register(st.blocks[b], st.hashes[b])
        st.num_registered = full

    def _advance(self, st: _Req, n: int, end: float) -> RequestOutput:
        prompt_len = len(st.req.prompt_token_ids)
        if st.num_computed < prompt_len:
            self.prompt_tokens_computed += min(st.num_computed + n, prompt_len) - st.num_computed
        st.num_computed += n
        self._register_full_blocks(st)
        if st.num_computed < len(st.all_tokens):
            return RequestOutput(st.req.request_id, ())
        key = str(st.req.seed) if st.req.seed is not None else st.req.request_id
        token = sample_token(key, len(st.all_tokens), self.profile.vocab_size)
        st.all_tokens.append(token)
        st.num_output += 1
        if token in st.req.stop_token_ids:
            st.finish_reason = "stop"
        elif st.num_output >= st.req.max_tokens or st.req.hold_kv_as is not None:
            st.finish_reason = "length"
        held = None
        if st.finish_reason is not None:
            self._running.remove(st)
            del self._reqs[st.req.request_id]
            if st.req.hold_kv_as is not None:
                held = self._hold(st, end)
            else:
                self._pool.release(st.blocks)
                st.blocks = []
        return RequestOutput(
            st.req.request_id, (token,), st.finish_reason, st.num_cached_tokens, held
        )

    # -- events and stats ----------------------------------------------------------------------

    def _flush_pool_events(self) -> None:
        self._events.extend(self._pool.take_events())

    def drain_kv_events(self) -> list[KvEvent]:
        """Blocks stored and evicted since the last call, in order."""
        self._flush_pool_events()
        events, self._events = self._events, []
        return events

    @property
    def kv_blocks_used(self) -> int:
        return self.num_blocks - self._pool.num_free

    @property
    def cached_blocks(self) -> int:
        return len(self._pool.cached)

    def stats(self, now: float) -> EngineStats:
        queried = sum(q for q, _ in self._hits)
        hit = sum(h for _, h in self._hits)
        window = self.config.throughput_window_s
        while self._recent_tokens and self._recent_tokens[0][0] <= now - window:
            self._recent_tokens.popleft()
        recent = sum(n for t, n in self._recent_tokens if t <= now)
        span = min(window, now - self._first_step_at) if self._first_step_at is not None else 0.0
        return EngineStats(
            running_requests=len(self._running),
            waiting_requests=len(self._waiting),
            kv_blocks_used=self.kv_blocks_used,
            kv_blocks_total=self.num_blocks,
            prefix_cache_hit_rate=hit / queried if queried else 0.0,
            tokens_per_second=recent / span if span > 0 else 0.0,
            last_batch_size=self._last_batch,
            max_batch_size_seen=self._max_batch,
            steps=self.steps,
            batch_context_tokens=sum(st.num_computed for st in self._running),
            queued_prefill_tokens=sum(
                max(0, len(st.req.prompt_token_ids) - st.num_computed)
                for queue in (self._running, self._waiting)
                for st in queue
            ),
        )
