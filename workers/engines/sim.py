"""The calibrated simulated engine ("sim"): ``SimScheduler`` driven in scaled real time.

Theory of operation
-------------------
``SimEngine`` implements ``workers.engine.InferenceEngine`` over a pure ``SimScheduler``
(workers/engines/sim_core.py) and a timing ``SimProfile`` (workers/profiles/). It does no math on
tokens; it only waits as long as the profiled hardware would.

One background task, started on first use, is the step loop: while the scheduler has work it
calls ``step(now)``, sleeps until the step's simulated duration divided by ``speedup`` has passed
since the step began (the scheduler's own CPU time counts against it), then hands each request
the tokens that step produced (one ``TokenChunk`` per request per step). Steps that run back to
back are timed from the previous step's end, not from when the loop got round to the next one
(``CATCH_UP_S``), so the loop's own overhead does not stretch every step: measured inter-token
latency is within 1% of the profile's. With nothing to do it waits for the next request.
``now`` is *simulated* time: ``(clock() - start) * speedup``.
``clock`` and ``sleep`` are injected, so a test can run it on a fake clock with instant sleeps.

- ``generate``: prompt in, tokens out, in one engine (aggregated serving).
- ``prefill``: runs the prompt, returns the first token and a ``KvHandle``, and *holds* the KV in
  the scheduler (bounded by ``SimConfig.max_held_kv`` / ``max_held_kv_tokens``, a TTL, and memory
  pressure, oldest first). ``export_kv`` hands it over once: it returns a small JSON descriptor
  (token count, block hashes, prompt checksum — not the megabytes a GPU would move) and frees
  the blocks, which stay in the prefix cache. Gone KV raises ``KvUnavailable``.
- ``decode``: fetches the descriptor through the injected ``KvFetcher`` (or from itself when the
  handle names this engine's ``address`` and no fetcher is set), checks it against the prompt,
  waits the profile's ``kv_transfer_ms(handle.size_bytes)``, and then schedules the request with
  its prompt's KV imported (no prefill recompute) and the first token already generated.
- ``abort`` ends a request's stream with finish_reason "abort" and frees its KV (held KV too).

Sampled tokens depend only on (seed or request id, position), so aggregated and disaggregated
runs of one request produce the same tokens, and a rerun with the same inputs is identical.
``SimConfig.held_kv_ttl_s`` is taken as *wall-clock* seconds here (it is multiplied by
``speedup`` for the scheduler), because the callers that must fetch in time run in real time.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from pathlib import Path

from controlplane.errors import AlreadyExists, FailedPrecondition, InvalidArgument
from workers.engine import (
    EngineStats,
    KvEvent,
    KvFetcher,
    KvHandle,
    KvUnavailable,
    PrefillResult,
    SamplingParams,
    TokenChunk,
    validate_prompt,
)
from workers.engines.sim_core import (
    RequestOutput,
    SimConfig,
    SimRequest,
    SimScheduler,
    StepResult,
    hash_blocks,
    token_checksum,
)
from workers.profiles import SimProfile, load_profile

log = logging.getLogger(__name__)

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]

KV_DESCRIPTOR_FORMAT = "switchboard-sim-kv/1"
CATCH_UP_S = 0.05
"""A step that starts at most this late (wall seconds) after the previous one ended is timed
from that end: steps run back to back in simulated time, as on the real engine."""


def build_sim_engine(
    profile: str | Path | SimProfile,
    *,
    model: str | None = None,
    address: str = "sim:0",
    kv_fetcher: KvFetcher | None = None,
    speedup: float = 1.0,
    config: SimConfig | None = None,
) -> SimEngine:
    """The composition root's entry: a ``SimEngine`` from a profile name, path or object."""
    loaded = profile if isinstance(profile, SimProfile) else load_profile(profile)
    return SimEngine(
        loaded,
        config=config,
        address=address,
        kv_fetcher=kv_fetcher,
        speedup=speedup,
        model=model,
    )


class _Aborted:
    """Queue marker: the request was aborted."""


_ABORTED = _Aborted()
_Item = RequestOutput | _Aborted | BaseException


class SimEngine:
    """A vLLM-like engine simulated in time from a calibrated profile.

    Args:
        profile: timing, capacity and model shape (``workers.profiles.load_profile``).
        config: scheduler settings; ``held_kv_ttl_s`` in wall-clock seconds (see module doc).
        address: "host:port" this engine's worker serves FetchKv on; goes into ``KvHandle``.
        kv_fetcher: pulls a ``KvHandle``'s descriptor from the worker holding it (decode side).
        speedup: simulated seconds per wall-clock second (> 0); 10 runs ten times faster.
        clock: monotonic seconds (default ``time.monotonic``).
        sleep: awaitable sleep in seconds (default ``asyncio.sleep``).
        on_step: called with every ``StepResult`` (benchmarks and tests record traces with it).
        model: the model name tenants use (default: the profile's ``model``).
    """

    def __init__(
        self,
        profile: SimProfile,
        *,
        config: SimConfig | None = None,
        address: str = "sim:0",
        kv_fetcher: KvFetcher | None = None,
        speedup: float = 1.0,
        clock: Clock = time.monotonic,
        sleep: Sleep = asyncio.sleep,
        on_step: Callable[[StepResult], None] | None = None,
        model: str | None = None,
    ) -> None:
        if not speedup > 0:
            raise InvalidArgument(f"speedup must be > 0, got {speedup}")
        config = (config or SimConfig()).validate()
        self.profile = profile
        self.model = model or profile.model
        self.max_context_tokens = profile.max_context_tokens
        self.vocab_size = profile.vocab_size
        self.address = address
        self.speedup = speedup
        self.scheduler = SimScheduler(
            profile, replace(config, held_kv_ttl_s=config.held_kv_ttl_s * speedup)
        )
        self._kv_fetcher = kv_fetcher
        self._clock = clock
        self._sleep = sleep
        self._on_step = on_step
        self._epoch = clock()
        self._streams: dict[str, asyncio.Queue[_Item]] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._kv_seq = 0
        self._transfers = 0

    # -- InferenceEngine -------------------------------------------------------------------------

    async def prefill(
        self, request_id: str, prompt_token_ids: tuple[int, ...], sampling: SamplingParams
    ) -> PrefillResult:
        self._validate(prompt_token_ids, sampling)
        self._kv_seq += 1
        kv_id = f"{request_id}#{self._kv_seq}"
        queue = self._open(request_id)
        try:
            self._submit(
                SimRequest(
                    request_id,
                    prompt_token_ids,
                    max_tokens=1,
                    stop_token_ids=sampling.stop_token_ids,
                    seed=sampling.seed,
                    hold_kv_as=kv_id,
                )
            )
            item = await queue.get()
        finally:
            self._close(request_id)
        if isinstance(item, BaseException):
            raise item
        if isinstance(item, _Aborted):
            raise FailedPrecondition(f"request {request_id!r} was aborted during prefill")
        held = item.held_kv
        assert held is not None and item.new_token_ids, "a hold_kv_as request ends holding KV"
        return PrefillResult(
            request_id=request_id,
            first_token_id=item.new_token_ids[0],
            kv=KvHandle(
                kv_id=kv_id,
                source_address=self.address,
                num_tokens=held.num_tokens,
                size_bytes=held.num_tokens * self.profile.kv_bytes_per_token,
                engine_params={
                    "engine": "sim",
                    "profile": self.profile.name,
                    "block_size": str(self.scheduler.block_size),
                },
            ),
            cached_prompt_tokens=item.num_cached_tokens,
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
        queue = self._open(request_id)
        try:
            self._transfers += 1
            try:
                descriptor = await self._fetch(kv)
                self._check_descriptor(descriptor, kv, prompt_token_ids)
                await self._sleep(self.profile.kv_transfer_ms(kv.size_bytes) / 1e3 / self.speedup)
            finally:
                self._transfers -= 1
            if not queue.empty():  # aborted while the KV was on its way
                async for chunk in self._stream(queue):
                    yield chunk
                return
            if first_token_id in sampling.stop_token_ids:
                yield TokenChunk((), "stop")
                return
            if sampling.max_tokens == 1:
                yield TokenChunk((), "length")
                return
            self._submit(
                SimRequest(
                    request_id,
                    prompt_token_ids,
                    max_tokens=sampling.max_tokens,
                    stop_token_ids=sampling.stop_token_ids,
                    seed=sampling.seed,
                    initial_output_token_ids=(first_token_id,),
                    kv_imported_tokens=len(prompt_token_ids),
                )
            )
            async for chunk in self._stream(queue):
                yield chunk
        finally:
            self._close(request_id)

    async def generate(
        self, request_id: str, prompt_token_ids: tuple[int, ...], sampling: SamplingParams
    ) -> AsyncIterator[TokenChunk]:
        self._validate(prompt_token_ids, sampling)
        queue = self._open(request_id)
        try:
            self._submit(
                SimRequest(
                    request_id,
                    prompt_token_ids,
                    max_tokens=sampling.max_tokens,
                    stop_token_ids=sampling.stop_token_ids,
                    seed=sampling.seed,
                )
            )
            async for chunk in self._stream(queue):
                yield chunk
        finally:
            self._close(request_id)

    async def abort(self, request_id: str) -> bool:
        found = self.scheduler.abort(request_id)
        self._wake.set()  # freed blocks may let a blocked request in
        queue = self._streams.get(request_id)
        if queue is not None:
            queue.put_nowait(_ABORTED)
            found = True
        return found

    def export_kv(self, kv_id: str) -> bytes:
        held = self.scheduler.take_held(kv_id, self.now())
        self._wake.set()
        if held is None:
            raise KvUnavailable(f"KV {kv_id!r} is not held here (fetched, expired or evicted)")
        return json.dumps(
            {
                "format": KV_DESCRIPTOR_FORMAT,
                "model": self.model,
                "kv_id": held.kv_id,
                "num_tokens": held.num_tokens,
                "block_size": self.scheduler.block_size,
                "block_hashes": [f"{h:016x}" for h in held.block_hashes],
                "prompt_checksum": held.prompt_checksum,
            },
            separators=(",", ":"),
        ).encode()

    def stats(self) -> EngineStats:
        s = self.scheduler.stats(self.now())
        return replace(s, waiting_requests=s.waiting_requests + self._transfers)

    def drain_kv_events(self) -> list[KvEvent]:
        return self.scheduler.drain_kv_events()

    # -- lifecycle -------------------------------------------------------------------------------

    def now(self) -> float:
        """Simulated seconds since this engine was built."""
        return (self._clock() - self._epoch) * self.speedup

    async def aclose(self) -> None:
        """Stop the step loop; open streams end with "abort"."""
        for request_id in list(self._streams):
            await self.abort(request_id)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    # -- internals -------------------------------------------------------------------------------

    def _validate(self, prompt: tuple[int, ...], sampling: SamplingParams) -> None:
        validate_prompt(
            prompt,
            sampling,
            vocab_size=self.vocab_size,
            max_context_tokens=self.max_context_tokens,
        )

    def _open(self, request_id: str) -> asyncio.Queue[_Item]:
        if request_id in self._streams or self.scheduler.is_active(request_id):
            raise AlreadyExists(f"request {request_id!r} is already running")
        queue: asyncio.Queue[_Item] = asyncio.Queue()
        self._streams[request_id] = queue
        return queue

    def _close(self, request_id: str) -> None:
        """The caller is gone (finished, failed or cancelled): forget the request."""
        self._streams.pop(request_id, None)
        if self.scheduler.is_active(request_id):
            self.scheduler.abort(request_id, drop_held=False)

    def _submit(self, request: SimRequest) -> None:
        self.scheduler.add_request(request, self.now())
        self._wake.set()
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name="sim-steps")

    async def _stream(self, queue: asyncio.Queue[_Item]) -> AsyncIterator[TokenChunk]:
        while True:
            item = await queue.get()
            if isinstance(item, BaseException):
                raise item
            if isinstance(item, _Aborted):
                yield TokenChunk((), "abort")
                return
            yield TokenChunk(item.new_token_ids, item.finish_reason)
            if item.finish_reason is not None:
                return

    async def _fetch(self, kv: KvHandle) -> bytes:
        if self._kv_fetcher is not None:
            return await self._kv_fetcher.fetch(kv)
        if kv.source_address == self.address:
            return self.export_kv(kv.kv_id)
        raise KvUnavailable(f"no KvFetcher configured to reach {kv.source_address}")

    def _check_descriptor(self, data: bytes, kv: KvHandle, prompt: tuple[int, ...]) -> None:
        try:
            d = json.loads(data)
            ok = isinstance(d, dict) and d.get("format") == KV_DESCRIPTOR_FORMAT
        except ValueError:
            ok = False
        if not ok:
            raise KvUnavailable(f"KV {kv.kv_id!r}: unreadable descriptor")
        if d.get("model") != self.model:
            raise InvalidArgument(f"KV {kv.kv_id!r} is for {d.get('model')!r}, not {self.model!r}")
        if d.get("num_tokens") != len(prompt) or d.get("prompt_checksum") != token_checksum(prompt):
            raise InvalidArgument(f"KV {kv.kv_id!r} does not match the prompt")
        if d.get("block_size") == self.scheduler.block_size:
            mine = [f"{h:016x}" for h in hash_blocks(prompt, self.scheduler.block_size)]
            if d.get("block_hashes") != mine:
                raise InvalidArgument(f"KV {kv.kv_id!r}: block hashes do not match the prompt")

    async def _run(self) -> None:
        deadline: float | None = None  # when the previous step ended, while steps run back to back
        while True:
            if not self.scheduler.has_work():
                deadline = None
                self._wake.clear()
                await self._wake.wait()
                continue
            started = self._clock()
            if deadline is not None and 0.0 <= started - deadline < CATCH_UP_S:
                # back to back: this step starts where the last one ended, so the loop's own
                # overhead (delivering tokens, waking up) is not added to every step
                started = deadline
            try:
                result = self.scheduler.step((started - self._epoch) * self.speedup)
            except Exception as e:  # a bug here must fail the callers, not hang them
                log.exception("sim engine step failed")
                self._fail_all(e)
                continue
            if not result.scheduled:  # nothing fits right now: wait for an abort or a request
                deadline = None
                self._wake.clear()
                await self._wake.wait()
                continue
            if self._on_step is not None:
                self._on_step(result)
            # sleep to the step's deadline, so the scheduler's own CPU time is not added on top
            deadline = started + result.duration_s / self.speedup
            await self._sleep(max(0.0, deadline - self._clock()))
            for output in result.outputs:
                queue = self._streams.get(output.request_id)
                if queue is not None:
                    queue.put_nowait(output)

    def _fail_all(self, error: Exception) -> None:
        for request_id, queue in list(self._streams.items()):
            self.scheduler.abort(request_id, drop_held=False)
            queue.put_nowait(error)
