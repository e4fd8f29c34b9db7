"""WorkersView: the gateway's routing state, kept current off the request path.

Three feeds, each its own task, none of which a request ever waits on:

- **worker records**: list + watch of ``{prefix}/workers/`` (level-based, as NodeCache does:
  list at revision R, watch from R+1, re-list whenever the watch breaks);
- **load reports**: one ``Worker.WatchStats`` stream per worker (running / waiting / KV blocks /
  batch, its context tokens, queued prefill tokens, per-DP-rank batches), reconnected with
  backoff while the worker's record exists. A worker whose stream broke is treated as not
  serving until it reconnects (a killed worker is avoided at once, before its lease expires).
  Each report's KV events (STORED / EVICTED block hashes) go to the ``kv_sink`` (the SLA
  router's prefix index, ``SlaGatewayRouter.apply_kv_events``); the sink forgets a worker
  whose record left, whose endpoint changed (a new process, an empty cache) or whose stream
  broke (events were lost; routes and the next events teach it again);
- **deployments**: list + watch of ``{prefix}/deployments/`` (re-listed on any change; they are
  few and change rarely), for each model's engine / model_path / engine args, which the gateway
  needs to tokenize, and what the router needs: the deployment's name (its routing profile),
  its long_context pool's threshold and its MoE layout (DP ranks, expert parallel).

Worker records carry their pool kind (``long_context``, ...), the deployment's long-context
threshold and whether the engine prefills in chunks; ``snapshots`` passes them on.

It also holds the gRPC channels to workers (one per endpoint, shared by the request path) and
this gateway's own in-flight count per worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

import grpc
from switchboard.v1 import worker_pb2, worker_pb2_grpc

from controlplane.adapters.etcd.client import EtcdClient, prefix_range_end
from controlplane.adapters.etcd.deployments import DeploymentCache, EtcdDeploymentStore
from controlplane.adapters.etcd.workers import decode_worker
from controlplane.core.deployments import PoolRole
from controlplane.core.model import WorkerRecord, WorkerState
from controlplane.core.reconcile import DeploymentRecord
from controlplane.errors import SwitchboardError
from controlplane.gateway.routing import WorkerSnapshot
from controlplane.gateway.token_client import TokenClients
from workers.engine import KvEvent, KvEventKind

log = logging.getLogger(__name__)

_KV_KINDS = {
    worker_pb2.KvBlockEvent.KIND_STORED: KvEventKind.STORED,
    worker_pb2.KvBlockEvent.KIND_EVICTED: KvEventKind.EVICTED,
}


class KvEventSink(Protocol):
    """Where the workers' KV events go (``SlaGatewayRouter``: its prefix index)."""

    def apply_kv_events(self, worker_id: str, events: Iterable[KvEvent]) -> None: ...

    def forget_worker(self, worker_id: str) -> None: ...


def kv_events(msg: worker_pb2.WorkerStats) -> list[KvEvent]:
    """A report's KV events (unknown kinds skipped)."""
    return [
        KvEvent(_KV_KINDS[e.kind], tuple(e.block_hashes))
        for e in msg.kv_events
        if e.kind in _KV_KINDS and e.block_hashes
    ]


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """How to tokenize for a model: from its deployment."""

    model: str
    engine: str
    model_path: str = ""
    engine_args: Mapping[str, str] = field(default_factory=dict)
    deployment: str = ""
    """The deployment's name."""
    long_context_threshold_tokens: int = 0
    """Its long_context pool's threshold; 0: no such pool."""
    dp_size: int = 1
    """Data-parallel attention ranks per replica (``parallelism.data``)."""
    expert_parallel: bool = False
    """``parallelism.expert`` > 1."""


@dataclass(slots=True)
class LoadReport:
    running: int = 0
    waiting: int = 0
    kv_blocks_used: int = 0
    kv_blocks_total: int = 0
    last_batch_size: int = 0
    draining: bool = False
    received_at: float = 0.0
    batch_context_tokens: int = 0
    queued_prefill_tokens: int | None = None
    dp_rank_running: tuple[int, ...] = ()
    kv_reserved_here: int = 0
    """KV blocks this gateway's requests on the worker reserved when the report came
    (``WorkersView.kv_reserved``): what the report already counts of them."""


class PendingPrefill:
    """One request's prompt counted as pending prefill on a worker, until ``done``: its tokens
    in ``pending``, and one prompt in ``prompts`` when given."""

    __slots__ = ("_pending", "_prompts", "_tokens", "_worker_id")

    def __init__(
        self,
        pending: dict[str, int],
        worker_id: str,
        tokens: int,
        prompts: dict[str, int] | None = None,
    ) -> None:
        self._pending, self._worker_id, self._tokens = pending, worker_id, tokens
        self._prompts = prompts
        if tokens > 0:
            _add(pending, worker_id, tokens)
            if prompts is not None:
                _add(prompts, worker_id, 1)

    def done(self) -> None:
        if self._tokens > 0:
            _add(self._pending, self._worker_id, -self._tokens)
            if self._prompts is not None:
                _add(self._prompts, self._worker_id, -1)
            self._tokens = 0


def _add(counts: dict[str, int], key: str, n: int) -> None:
    """``counts[key] += n``, the key gone when it reaches 0."""
    left = counts.get(key, 0) + n
    if left > 0:
        counts[key] = left
    else:
        counts.pop(key, None)


class InFlight:
    """``WorkersView.in_flight``: entering counts the request (its KV blocks, and its pending
    prefill, the ``PendingPrefill`` it returns); leaving, however it leaves, uncounts them all.
    A class, not a generator-based context manager: it is entered once or twice per request."""

    __slots__ = ("_kv_blocks", "_mark", "_prefill_tokens", "_view", "_worker_id")

    def __init__(
        self, view: WorkersView, worker_id: str, prefill_tokens: int, kv_blocks: int = 0
    ) -> None:
        self._view, self._worker_id, self._prefill_tokens = view, worker_id, prefill_tokens
        self._kv_blocks = kv_blocks
        self._mark: PendingPrefill | None = None

    def __enter__(self) -> PendingPrefill:
        view, worker_id = self._view, self._worker_id
        _add(view.inflight, worker_id, 1)
        if self._kv_blocks > 0:
            _add(view.kv_reserved, worker_id, self._kv_blocks)
        self._mark = PendingPrefill(
            view.pending_prefill, worker_id, self._prefill_tokens, view.pending_prompts
        )
        return self._mark

    def __exit__(self, *exc: object) -> None:
        if self._mark is not None:
            self._mark.done()
            self._mark = None
            _add(self._view.inflight, self._worker_id, -1)
            if self._kv_blocks > 0:
                _add(self._view.kv_reserved, self._worker_id, -self._kv_blocks)


def _facts_of(records: list[WorkerRecord]) -> tuple[int, int]:
    sizes = [r.max_context_tokens for r in records if r.max_context_tokens > 0]
    thresholds = [
        r.long_context_threshold_tokens for r in records if r.long_context_threshold_tokens > 0
    ]
    return min(sizes, default=0), min(thresholds, default=0)


_NO_LOAD = LoadReport()
"""The load of a worker that has not reported yet (shared; never changed)."""


class WorkerChannels:
    """One gRPC channel (and one stub on it) per worker endpoint, created on first use, and
    the token-transport connections (``tokens``, one per token endpoint)."""

    def __init__(self) -> None:
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._stubs: dict[str, worker_pb2_grpc.WorkerAsyncStub] = {}
        self.tokens = TokenClients()

    def stub(self, endpoint: str) -> worker_pb2_grpc.WorkerAsyncStub:
        stub = self._stubs.get(endpoint)
        if stub is not None:
            return stub
        channel = self._channels.get(endpoint)
        if channel is None:
            channel = grpc.aio.insecure_channel(
                endpoint,
                options=[
                    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
                    ("grpc.initial_reconnect_backoff_ms", 100),
                    ("grpc.max_reconnect_backoff_ms", 1000),
                ],
            )
            self._channels[endpoint] = channel
        stub = self._stubs[endpoint] = worker_pb2_grpc.WorkerStub(channel)
        return stub

    async def drop(self, endpoint: str) -> None:
        self._stubs.pop(endpoint, None)
        channel = self._channels.pop(endpoint, None)
        if channel is not None:
            await channel.close()

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()
        self._stubs.clear()
        await self.tokens.close()


class WorkersView:
    def __init__(
        self,
        client: EtcdClient,
        prefix: str,
        channels: WorkerChannels,
        *,
        clock: Callable[[], float] = time.monotonic,
        backoff_initial_s: float = 0.1,
        backoff_max_s: float = 2.0,
        kv_sink: KvEventSink | None = None,
        deployments: DeploymentCache | None = None,
    ) -> None:
        self._client = client
        self.kv_sink = kv_sink
        """Gets every report's KV events; may be set after construction (before ``run``)."""
        base = prefix.rstrip("/")
        self._workers_prefix = f"{base}/workers/".encode()
        self._owns_deployments = deployments is None
        self._deployments = deployments or DeploymentCache(EtcdDeploymentStore(client, prefix))
        self._deployments.subscribe(self._on_deployments)
        self.channels = channels
        self._clock = clock
        self._backoff = (backoff_initial_s, backoff_max_s)
        self._records: dict[bytes, WorkerRecord] = {}
        self._by_model: dict[str, list[WorkerRecord]] = {}
        self._models: dict[str, ModelInfo] = {}
        self.loads: dict[str, LoadReport] = {}
        self.stats_down: set[str] = set()
        self.inflight: dict[str, int] = {}
        self.pending_prefill: dict[str, int] = {}
        """Prompt tokens sent to each worker to prefill whose first token is not back."""
        self.pending_prompts: dict[str, int] = {}
        """How many prompts those are."""
        self.kv_reserved: dict[str, int] = {}
        """KV blocks this gateway's in-flight requests may hold on each worker (prompt and
        every output token; ``in_flight(kv_blocks=...)``). A snapshot adds what changed since
        the worker's last report to the reported KV use: reports are up to an interval old,
        and a burst routed on the old figure would all go to the worker that looked emptiest
        (and none to one whose requests just ended)."""
        self._snapshot_cache: dict[
            str,
            tuple[WorkerRecord, LoadReport, tuple[int, int, int, bool, bool, int], WorkerSnapshot],
        ] = {}
        """Each worker's last snapshot and what it was built from (``snapshots``)."""
        self._facts_cache: dict[str, tuple[list[WorkerRecord], tuple[int, int]]] = {}
        """model -> its records list and ``_record_facts`` of it."""
        self._stats_tasks: dict[str, asyncio.Task[None]] = {}
        self.synced = asyncio.Event()
        self.deployments_synced = asyncio.Event()

    # --- reads (the request path) ---------------------------------------------------------------

    def records(self, model: str) -> list[WorkerRecord]:
        return self._by_model.get(model, [])

    def has_model(self, model: str) -> bool:
        return model in self._by_model or model in self._models

    def model_info(self, model: str) -> ModelInfo | None:
        return self._models.get(model)

    def served_models(self) -> list[str]:
        """Models with at least one Serving decode-capable worker."""
        return sorted(
            m
            for m, recs in self._by_model.items()
            if any(r.state is WorkerState.SERVING and r.role in ("decode", "both") for r in recs)
        )

    def max_context_tokens(self, model: str) -> int:
        """The smallest context window of the model's workers (0: none says)."""
        return self._record_facts(model)[0]

    def _record_facts(self, model: str) -> tuple[int, int]:
        """(``max_context_tokens``, ``long_context_threshold_tokens``) of the model's records,
        worked out once per records list (``_replace`` makes new lists, never changes one)."""
        records = self._by_model.get(model)
        if records is None:
            return _facts_of([])
        hit = self._facts_cache.get(model)
        if hit is not None and hit[0] is records:
            return hit[1]
        facts = _facts_of(records)
        self._facts_cache[model] = (records, facts)
        return facts

    def snapshots(self, model: str, circuit_allows: Callable[[str], bool]) -> list[WorkerSnapshot]:
        """The model's workers as the routers see them now. A worker whose record and last
        report (the objects: both are replaced, never changed in place), in-flight count,
        pending prefill, circuit and stream state are those of its previous snapshot gets
        that snapshot object again (no rebuild per request)."""
        out = []
        cache = self._snapshot_cache
        for r in self.records(model):
            wid = r.worker_id
            load = self.loads.get(wid) or _NO_LOAD
            key = (
                self.inflight.get(wid, 0),
                self.pending_prefill.get(wid, 0),
                self.pending_prompts.get(wid, 0),
                circuit_allows(wid),
                wid in self.stats_down,
                self.kv_reserved.get(wid, 0),
            )
            hit = cache.get(wid)
            if hit is not None and hit[0] is r and hit[1] is load and hit[2] == key:
                out.append(hit[3])
                continue
            inflight, pending, prompts, allows, down, reserved = key
            snap = WorkerSnapshot(
                worker_id=wid,
                endpoint=r.endpoint,
                role=r.role,
                serving=r.state is WorkerState.SERVING and not load.draining and not down,
                running=load.running,
                waiting=load.waiting,
                inflight_here=inflight,
                pending_prefill_tokens=pending,
                pending_prefill_prompts=prompts,
                # the report's figure, plus this gateway's requests started there since it
                # came, less those that ended (theirs are in the report)
                kv_blocks_used=max(0, load.kv_blocks_used + reserved - load.kv_reserved_here),
                kv_blocks_total=load.kv_blocks_total or r.kv_blocks_total,
                circuit_allows=allows,
                max_context_tokens=r.max_context_tokens,
                pool=r.pool,
                chunked_prefill=r.chunked_prefill,
                batch_size=load.running,
                batch_context_tokens=load.batch_context_tokens,
                queued_prefill_tokens=load.queued_prefill_tokens,
                dp_rank_running=load.dp_rank_running,
                token_endpoint=r.token_endpoint,
            )
            cache[wid] = (r, load, key, snap)
            out.append(snap)
        return out

    def long_context_threshold_tokens(self, model: str) -> int:
        """The threshold the model's worker records carry (the smallest > 0), else 0: for
        workers started by hand, without a deployment record."""
        return self._record_facts(model)[1]

    def in_flight(self, worker_id: str, prefill_tokens: int = 0, kv_blocks: int = 0) -> InFlight:
        """Count a request on ``worker_id`` for its duration (a context manager); with
        ``prefill_tokens``, also count its prompt as pending prefill there until
        ``mark.done()`` (its first token) or the end, whichever is first; with ``kv_blocks``,
        the KV it may hold there (``kv_reserved``) until the end."""
        return InFlight(self, worker_id, prefill_tokens, kv_blocks)

    # --- the loops ------------------------------------------------------------------------------

    async def run(self) -> None:
        """All feeds, until cancelled."""
        try:
            if self._owns_deployments:
                await asyncio.gather(self._workers_loop(), self._deployments.run())
            else:  # the composition root runs the shared cache
                await self._workers_loop()
        finally:
            for task in self._stats_tasks.values():
                task.cancel()
            for task in list(self._stats_tasks.values()):
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            self._stats_tasks.clear()

    async def _workers_loop(self) -> None:
        delay = self._backoff[0]
        end = prefix_range_end(self._workers_prefix)
        while True:
            try:
                kvs, revision = await self._client.get_prefix(self._workers_prefix)
                records: dict[bytes, WorkerRecord] = {}
                for kv in kvs:
                    with contextlib.suppress(SwitchboardError):
                        records[kv.key] = decode_worker(kv.value)
                await self._replace(records)
                self.synced.set()
                delay = self._backoff[0]
                async for ev in self._client.watch_range(
                    self._workers_prefix, end, start_revision=revision + 1
                ):
                    new = dict(self._records)
                    if ev.deleted:
                        new.pop(ev.kv.key, None)
                    else:
                        try:
                            new[ev.kv.key] = decode_worker(ev.kv.value)
                        except SwitchboardError as e:
                            log.warning("ignoring worker record %r: %s", ev.kv.key, e)
                            continue
                    await self._replace(new)
            except asyncio.CancelledError:
                raise
            except SwitchboardError as e:
                log.warning("worker list/watch failed (%s); re-listing in %.1fs", e, delay)
            except Exception:
                log.exception("worker list/watch failed; re-listing in %.1fs", delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, self._backoff[1])

    async def _replace(self, records: dict[bytes, WorkerRecord]) -> None:
        before = {r.worker_id: r for r in self._records.values()}
        after = {r.worker_id: r for r in records.values()}
        self._records = records
        by_model: dict[str, list[WorkerRecord]] = {}
        for r in sorted(records.values(), key=lambda r: r.worker_id):
            by_model.setdefault(r.model, []).append(r)
        self._by_model = by_model
        self._facts_cache.clear()  # (the identity check alone would keep left models)
        for worker_id, rec in after.items():
            old = before.get(worker_id)
            if old is None or old.endpoint != rec.endpoint:
                if old is not None and self.kv_sink is not None:
                    self.kv_sink.forget_worker(worker_id)  # a new process: an empty cache
                self._start_stats(rec)
        for worker_id, rec in before.items():
            # a token endpoint no record names any more (its worker left, or restarted on
            # another port under the same id): close its connection
            if rec.token_endpoint and all(
                r.token_endpoint != rec.token_endpoint for r in after.values()
            ):
                await self.channels.tokens.drop(rec.token_endpoint)
            if worker_id not in after:
                log.info("worker %s (%s %s) left", worker_id, rec.model, rec.role)
                if self.kv_sink is not None:
                    self.kv_sink.forget_worker(worker_id)
                task = self._stats_tasks.pop(worker_id, None)
                if task is not None:
                    task.cancel()
                self.loads.pop(worker_id, None)
                self._snapshot_cache.pop(worker_id, None)
                self.stats_down.discard(worker_id)
                if all(r.endpoint != rec.endpoint for r in after.values()):
                    await self.channels.drop(rec.endpoint)

    def _start_stats(self, rec: WorkerRecord) -> None:
        old = self._stats_tasks.pop(rec.worker_id, None)
        if old is not None:
            old.cancel()
        log.info("worker %s (%s %s) at %s", rec.worker_id, rec.model, rec.role, rec.endpoint)
        self._stats_tasks[rec.worker_id] = asyncio.create_task(
            self._stats_loop(rec), name=f"stats-{rec.worker_id}"
        )

    async def _stats_loop(self, rec: WorkerRecord) -> None:
        delay = self._backoff[0]
        while True:
            try:
                call = self.channels.stub(rec.endpoint).WatchStats(worker_pb2.StatsRequest())
                async for msg in call:
                    delay = self._backoff[0]
                    self.on_report(rec.worker_id, msg)
            except asyncio.CancelledError:
                raise
            except grpc.aio.AioRpcError as e:
                log.info("load reports from %s broke: %s", rec.worker_id, e.code().name)
            except Exception:
                log.exception("load reports from %s failed", rec.worker_id)
            self.stats_down.add(rec.worker_id)
            if self.kv_sink is not None:  # the events until it reconnects are lost
                self.kv_sink.forget_worker(rec.worker_id)
            await asyncio.sleep(delay)
            delay = min(delay * 2, self._backoff[1])

    def on_report(self, worker_id: str, msg: worker_pb2.WorkerStats) -> None:
        """One ``WatchStats`` message: the worker's load, and its KV events to the sink."""
        self.stats_down.discard(worker_id)
        self.loads[worker_id] = LoadReport(
            running=msg.running_requests,
            waiting=msg.waiting_requests,
            kv_blocks_used=msg.kv_blocks_used,
            kv_blocks_total=msg.kv_blocks_total,
            last_batch_size=msg.last_batch_size,
            draining=msg.draining,
            received_at=self._clock(),
            batch_context_tokens=msg.batch_context_tokens,
            queued_prefill_tokens=(
                msg.queued_prefill_tokens if msg.HasField("queued_prefill_tokens") else None
            ),
            dp_rank_running=tuple(msg.dp_rank_running),
            kv_reserved_here=self.kv_reserved.get(worker_id, 0),
        )
        if self.kv_sink is not None and msg.kv_events:
            self.kv_sink.apply_kv_events(worker_id, kv_events(msg))

    def _on_deployments(self, records: list[DeploymentRecord]) -> None:
        models: dict[str, ModelInfo] = {}
        for record in records:
            spec = record.spec
            long_context = spec.pool(PoolRole.LONG_CONTEXT)
            models[spec.model] = ModelInfo(
                model=spec.model,
                engine=spec.engine.value,
                model_path=spec.model_path,
                engine_args=dict(spec.engine_args),
                deployment=spec.name,
                long_context_threshold_tokens=(
                    long_context.context_threshold_tokens if long_context is not None else 0
                ),
                dp_size=spec.parallelism.data,
                expert_parallel=spec.parallelism.expert > 1,
            )
        self._models = models
        self.deployments_synced.set()
