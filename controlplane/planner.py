"""PlannerLoop: the leader task that turns measured load into desired replica counts.

Every ``interval_s`` a pass

1. reads every deployment (``EtcdDeploymentStore``) and its status (ready replicas per pool);
2. reads cumulative load counters from a ``MetricsSource`` (``GatewayMetricsSource``: the
   gateways' ``/metrics``, summed; any other source can be plugged in) and turns the difference
   with the previous read into a ``LoadObservation`` per model (``observe``: pure);
3. calls ``controlplane.core.planner.plan`` (pure) with the deployments that have a timing
   profile (``engine_args.profile``; a sim deployment's ``speedup`` scales it);
4. writes the new ``replicas`` of autoscaled pools with a compare-and-swap on the record's
   ``resource_version`` (a concurrent spec edit wins; the next pass re-reads and re-plans), and
   pokes the reconciler, which starts replicas or drains the surplus;
5. writes the deployment's planner record (``{prefix}/planner/<name>``: per-pool desired,
   predicted vs observed p95, the reason, the last decisions) that ``switchboard describe
   deployment`` shows, and sets the planner metrics.

**Field ownership.** The planner owns ``replicas`` of pools with ``autoscaling: true``, within
the spec's ``[min_replicas, max_replicas]``; spec edits own everything else, min/max included.
An ``Apply`` of a spec keeps the stored ``replicas`` of such a pool (clamped into the new
bounds) instead of the document's, so re-applying a YAML never resets what the planner set, and
``Scale`` refuses an autoscaled pool. Pools without ``autoscaling`` are never written; the
planner records what it would set. ``advisory=True`` writes no spec at all (records only).

The pass never dies: a failing read or write is logged and retried on the next pass.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from controlplane.adapters.etcd.client import EtcdClient
from controlplane.adapters.etcd.deployments import EtcdDeploymentStore
from controlplane.config import ControlPlaneSettings
from controlplane.core.deployments import ModelDeploymentSpec, Pool, PoolRole
from controlplane.core.planner import (
    ClassObservation,
    DeploymentInput,
    LengthStats,
    LoadObservation,
    PlannerConfig,
    PlannerState,
    PlanResult,
    PoolDecision,
    PoolInput,
    TimingModel,
    plan,
)
from controlplane.core.reconcile import DeploymentRecord, DeploymentStatus
from controlplane.core.routing.framework import ScaledTiming
from controlplane.core.sla import DEFAULT_SLA_CLASSES, SlaClass
from controlplane.errors import Conflict, SwitchboardError
from controlplane.telemetry.metrics import PlannerMetrics

log = logging.getLogger(__name__)

HISTORY = 20
"""Decisions kept per deployment in its planner record."""


# --- load counters ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Histogram:
    """Cumulative bucket counts ``(le, count)`` ascending, plus sum and count."""

    buckets: tuple[tuple[float, float], ...] = ()
    total: float = 0.0
    count: float = 0.0

    def minus(self, older: Histogram) -> Histogram:
        old = dict(older.buckets)
        return Histogram(
            tuple((le, max(0.0, c - old.get(le, 0.0))) for le, c in self.buckets),
            max(0.0, self.total - older.total),
            max(0.0, self.count - older.count),
        )

    def quantile(self, q: float) -> float | None:
        """Linear interpolation inside the bucket, as PromQL's ``histogram_quantile``."""
        if not self.buckets or self.count <= 0:
            return None
        want = q * self.buckets[-1][1]
        prev_le, prev_c = 0.0, 0.0
        for le, c in self.buckets:
            if c >= want:
                if math.isinf(le):
                    return prev_le
                span = c - prev_c
                return prev_le + (le - prev_le) * ((want - prev_c) / span if span else 1.0)
            prev_le, prev_c = le, c
        return prev_le


@dataclass(frozen=True, slots=True)
class ClassCounters:
    requests: float = 0.0
    ttft: Histogram = Histogram()
    itl: Histogram = Histogram()
    """Per gap (``switchboard_itl_seconds``)."""
    tpot: Histogram = Histogram()
    """Per request (``switchboard_tpot_seconds``): preferred for the ITL p95 when present."""


@dataclass(frozen=True, slots=True)
class ModelCounters:
    """Cumulative counters for one model, summed over every gateway."""

    requests: float = 0.0
    prompt_tokens: float = 0.0
    generation_tokens: float = 0.0
    prefix_hit_tokens: float = 0.0
    prefix_query_tokens: float = 0.0
    queued: float = 0.0
    """A gauge: requests waiting in admission queues now."""
    classes: Mapping[str, ClassCounters] = field(default_factory=dict)


class MetricsSource(Protocol):
    """Where the planner reads load: cumulative counters per model, read at ``now``."""

    async def read(self) -> Mapping[str, ModelCounters]: ...


def observe(older: ModelCounters, newer: ModelCounters, window_s: float) -> LoadObservation | None:
    """The window between two reads of one model's counters as a ``LoadObservation``.

    Arrival rate = answered requests / window; mean ISL / OSL = token counters / requests (their
    spread is not exported: an exponential-like ``scv`` of 1 is assumed); p95 TTFT and ITL per SLA
    class from the histograms' window delta; prefix-hit rate from the router's hit/query tokens.
    A counter that went down (a gateway restarted) yields None: skip the window."""
    if window_s <= 0:
        return None
    n = newer.requests - older.requests
    if n < 0 or newer.prompt_tokens < older.prompt_tokens:
        return None
    isl = (newer.prompt_tokens - older.prompt_tokens) / n if n else 0.0
    osl = (newer.generation_tokens - older.generation_tokens) / n if n else 0.0
    hits = newer.prefix_hit_tokens - older.prefix_hit_tokens
    queries = newer.prefix_query_tokens - older.prefix_query_tokens
    classes = []
    for name, c in sorted(newer.classes.items()):
        o = older.classes.get(name, ClassCounters())
        ttft = c.ttft.minus(o.ttft).quantile(0.95)
        # per-request TPOT where the gateway exports it: the router lets local prefills use a
        # batch's ITL slack, so the per-gap p95 sits near the target by design
        tpot = c.tpot.minus(o.tpot)
        itl = (tpot if tpot.count > 0 else c.itl.minus(o.itl)).quantile(0.95)
        rate = max(0.0, c.requests - o.requests) / window_s
        classes.append(
            ClassObservation(
                name,
                rate,
                ttft_p95_ms=ttft * 1e3 if ttft is not None else None,
                itl_p95_ms=itl * 1e3 if itl is not None else None,
            )
        )
    return LoadObservation(
        arrival_rps=n / window_s,
        input_tokens=LengthStats(max(isl, 1.0), 1.0),
        output_tokens=LengthStats(max(osl, 1.0), 1.0),
        prefix_hit_rate=hits / queries if queries > 0 else 0.0,
        queued_requests=int(newer.queued),
        classes=tuple(classes),
        window_s=window_s,
    )


_NOT_LOAD = frozenset(
    ("400", "401", "403", "404", "405", "413", "415", "422", "INVALID_ARGUMENT",
     "UNAUTHENTICATED", "PERMISSION_DENIED", "NOT_FOUND", "OUT_OF_RANGE")
)  # fmt: skip
"""Request statuses that are not load: rejected before any capacity was asked for. Shed (429)
and failed (5xx) requests still count: they are demand the fleet did not serve."""


def parse_gateway_metrics(text: str) -> dict[str, ModelCounters]:
    """Prometheus text of one gateway -> counters per model (new and legacy metric names).

    Reads ``switchboard_requests_total``, ``switchboard_prompt_tokens_total``,
    ``switchboard_generation_tokens_total``, ``switchboard_ttft_seconds``,
    ``switchboard_itl_seconds`` and ``switchboard_tpot_seconds`` (by ``sla_class`` when
    labelled), ``switchboard_queue_depth`` and the prefix-cache token counters; or the older
    ``switchboard_gateway_*`` names (no class)."""
    acc: dict[str, dict[str, Any]] = {}

    def model_of(labels: Mapping[str, str]) -> dict[str, Any]:
        return acc.setdefault(labels.get("model", ""), {"classes": {}})

    def cls_of(labels: Mapping[str, str]) -> dict[str, Any]:
        m = model_of(labels)
        return m["classes"].setdefault(  # type: ignore[no-any-return]
            labels.get("sla_class", ""), {"requests": 0.0, "ttft": {}, "itl": {}, "tpot": {}}
        )

    def add(d: dict[str, Any], key: str, v: float) -> None:
        d[key] = d.get(key, 0.0) + v

    scalar = {
        "switchboard_requests": "requests",
        "switchboard_gateway_requests": "requests",
        "switchboard_prompt_tokens": "prompt_tokens",
        "switchboard_gateway_prompt_tokens": "prompt_tokens",
        "switchboard_generation_tokens": "generation_tokens",
        "switchboard_gateway_generation_tokens": "generation_tokens",
        "switchboard_prefix_cache_hit_tokens": "prefix_hit_tokens",
        "switchboard_prefix_cache_query_tokens": "prefix_query_tokens",
        "switchboard_queue_depth": "queued",
        "switchboard_gateway_admission_queue_depth": "queued",
    }
    hist = {
        "switchboard_ttft_seconds": "ttft",
        "switchboard_gateway_time_to_first_token_seconds": "ttft",
        "switchboard_itl_seconds": "itl",
        "switchboard_gateway_inter_token_latency_seconds": "itl",
        "switchboard_tpot_seconds": "tpot",
    }
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = dict(s.labels)
            if family.name in scalar and s.name in (family.name, f"{family.name}_total"):
                if scalar[family.name] == "requests":
                    if labels.get("status", "") in _NOT_LOAD:
                        continue  # a malformed or unauthorised request asks for no capacity
                    add(cls_of(labels), "requests", float(s.value))
                add(model_of(labels), scalar[family.name], float(s.value))
            elif family.name in hist:
                h = cls_of(labels)[hist[family.name]]
                if s.name.endswith("_bucket"):
                    le = float(labels["le"])
                    h.setdefault("buckets", {})
                    h["buckets"][le] = h["buckets"].get(le, 0.0) + float(s.value)
                elif s.name.endswith("_sum"):
                    add(h, "sum", float(s.value))
                elif s.name.endswith("_count"):
                    add(h, "count", float(s.value))
    return {model: _counters(d) for model, d in acc.items() if model}


def _hist(d: Mapping[str, Any]) -> Histogram:
    buckets = tuple(sorted(d.get("buckets", {}).items()))
    return Histogram(buckets, float(d.get("sum", 0.0)), float(d.get("count", 0.0)))


def _counters(d: Mapping[str, Any]) -> ModelCounters:
    return ModelCounters(
        requests=float(d.get("requests", 0.0)),
        prompt_tokens=float(d.get("prompt_tokens", 0.0)),
        generation_tokens=float(d.get("generation_tokens", 0.0)),
        prefix_hit_tokens=float(d.get("prefix_hit_tokens", 0.0)),
        prefix_query_tokens=float(d.get("prefix_query_tokens", 0.0)),
        queued=float(d.get("queued", 0.0)),
        classes={
            name: ClassCounters(
                float(c["requests"]), _hist(c["ttft"]), _hist(c["itl"]), _hist(c["tpot"])
            )
            for name, c in d["classes"].items()
        },
    )


def merge(parts: Sequence[Mapping[str, ModelCounters]]) -> dict[str, ModelCounters]:
    """Sum counters of several gateways (stateless gateways each see part of the traffic)."""
    out: dict[str, ModelCounters] = {}
    for part in parts:
        for model, c in part.items():
            o = out.get(model)
            if o is None:
                out[model] = c
                continue
            classes = dict(o.classes)
            for name, cc in c.classes.items():
                prev = classes.get(name)
                classes[name] = (
                    cc
                    if prev is None
                    else ClassCounters(
                        prev.requests + cc.requests,
                        _add(prev.ttft, cc.ttft),
                        _add(prev.itl, cc.itl),
                        _add(prev.tpot, cc.tpot),
                    )
                )
            out[model] = ModelCounters(
                o.requests + c.requests,
                o.prompt_tokens + c.prompt_tokens,
                o.generation_tokens + c.generation_tokens,
                o.prefix_hit_tokens + c.prefix_hit_tokens,
                o.prefix_query_tokens + c.prefix_query_tokens,
                o.queued + c.queued,
                classes,
            )
    return out


def _add(a: Histogram, b: Histogram) -> Histogram:
    both = dict(a.buckets)
    for le, c in b.buckets:
        both[le] = both.get(le, 0.0) + c
    return Histogram(tuple(sorted(both.items())), a.total + b.total, a.count + b.count)


class GatewayMetricsSource:
    """Scrapes the gateways' ``/metrics`` (URLs on the cluster network) and sums them."""

    def __init__(self, urls: Sequence[str], *, timeout_s: float = 3.0) -> None:
        self.urls = list(urls)
        self.timeout_s = timeout_s

    def _get(self, url: str) -> str:
        with urllib.request.urlopen(url, timeout=self.timeout_s) as resp:
            body: bytes = resp.read()
        return body.decode()

    async def read(self) -> Mapping[str, ModelCounters]:
        texts = await asyncio.gather(*(asyncio.to_thread(self._get, u) for u in self.urls))
        return merge([parse_gateway_metrics(t) for t in texts])


class EtcdGatewaysSource:
    """Reads every gateway registered in etcd (``{prefix}/gateways/``: their ``http`` address
    serves ``/metrics``) and sums them: the planner needs no list of gateways. Records that
    share an address are the processes of one ``gateway --processes N``, whose ``/metrics``
    answers their sum: read once."""

    def __init__(self, client: EtcdClient, prefix: str, *, timeout_s: float = 3.0) -> None:
        self.client = client
        self.prefix = f"{prefix.rstrip('/')}/gateways/"
        self.timeout_s = timeout_s

    async def urls(self) -> list[str]:
        kvs, _ = await self.client.get_prefix(self.prefix.encode())
        out = []
        for kv in kvs:
            try:
                http = json.loads(kv.value).get("http", "")
            except ValueError:
                continue
            if http:
                out.append(f"http://{http}/metrics")
        return sorted(set(out))

    async def read(self) -> Mapping[str, ModelCounters]:
        return await GatewayMetricsSource(await self.urls(), timeout_s=self.timeout_s).read()


# --- timing models --------------------------------------------------------------------------------


def timing_of(spec: ModelDeploymentSpec) -> tuple[TimingModel, int, int] | None:
    """(timing, KV capacity tokens, max_num_seqs) from ``engine_args.profile``; None: none."""
    name = spec.engine_args.get("profile")
    if not name:
        return None
    from workers.profiles import load_profile

    profile = load_profile(name)
    timing: TimingModel = profile
    speedup = float(spec.engine_args.get("speedup", "1") or 1)
    if spec.engine.value == "sim" and speedup != 1.0:
        timing = ScaledTiming(profile, speedup)
    seqs = int(spec.engine_args.get("max_num_seqs", "256") or 256)
    return timing, profile.kv_capacity_tokens, seqs


# --- the loop -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PlannerSettings:
    interval_s: float = 10.0
    """Seconds between passes (and the measurement window)."""
    advisory: bool = False
    """Only record and report decisions; never write a spec."""
    config: PlannerConfig = field(default_factory=PlannerConfig)
    sla_classes: tuple[SlaClass, ...] = DEFAULT_SLA_CLASSES


def deployment_input(
    record: DeploymentRecord,
    status: DeploymentStatus | None,
    obs: LoadObservation | None,
    classes: Sequence[SlaClass],
) -> DeploymentInput | None:
    """The planner's view of one deployment; None when it has no timing profile. Its SLA classes
    are the spec's own (else ``classes``), narrowed to those its pools name."""
    spec = record.spec
    timing = timing_of(spec)
    if timing is None:
        return None
    ready = {p.role: p.ready for p in status.pools} if status else {}
    named = {n for p in spec.pools for n in p.sla_classes}
    defined = spec.sla_classes or tuple(classes)
    serves = tuple(c for c in defined if not named or c.name in named)
    return DeploymentInput(
        name=spec.name,
        priority=spec.priority,
        gpus_per_replica=spec.gpus_per_replica,
        pools=tuple(
            PoolInput(
                p.role,
                p.replicas,
                ready.get(p.role, 0),
                p.min_replicas,
                p.max_replicas,
                p.autoscaling,
            )
            for p in spec.pools
        ),
        timing=timing[0],
        sla_classes=serves,
        observation=obs,
        kv_capacity_tokens=timing[1],
        max_num_seqs=timing[2],
    )


def with_replicas(spec: ModelDeploymentSpec, counts: Mapping[PoolRole, int]) -> ModelDeploymentSpec:
    pools: list[Pool] = [
        replace(p, replicas=counts[p.role]) if p.role in counts else p for p in spec.pools
    ]
    return replace(spec, pools=tuple(pools))


class PlannerLoop:
    def __init__(
        self,
        store: EtcdDeploymentStore,
        source: MetricsSource,
        settings: PlannerSettings | None = None,
        *,
        on_change: Callable[[], None] = lambda: None,
        metrics: PlannerMetrics | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.source = source
        self.settings = settings or PlannerSettings()
        self.on_change = on_change
        self.metrics = metrics if metrics is not None else PlannerMetrics()
        self._clock = clock
        self.state = PlannerState()
        self._prev: tuple[float, Mapping[str, ModelCounters]] | None = None
        self._history: dict[str, list[dict[str, Any]]] = {}
        self.passes = 0
        self.last: PlanResult | None = None

    async def run(self) -> None:
        """The leader task: passes until cancelled; never dies of an error."""
        while True:
            try:
                await self.pass_once()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("planner pass failed; retrying next interval")
            await asyncio.sleep(self.settings.interval_s)

    async def _observations(self, now: float) -> dict[str, LoadObservation]:
        try:
            counters = await self.source.read()
        except Exception as e:  # a gateway down: plan without load this pass
            log.warning("planner: reading load failed: %s", e)
            return {}
        prev, self._prev = self._prev, (now, counters)
        if prev is None:
            return {}
        out: dict[str, LoadObservation] = {}
        for model, c in counters.items():
            o = observe(prev[1].get(model, ModelCounters()), c, now - prev[0])
            if o is not None:
                out[model] = o
        return out

    async def pass_once(self) -> PlanResult:
        now = self._clock()
        records = await self.store.list_all()
        observations = await self._observations(now)
        inputs: list[DeploymentInput] = []
        by_name: dict[str, DeploymentRecord] = {}
        for record in records:
            status = await self.store.get_status(record.spec.name)
            try:
                di = deployment_input(
                    record, status, observations.get(record.spec.model), self.settings.sla_classes
                )
            except SwitchboardError as e:
                log.warning("planner: %s skipped: %s", record.spec.name, e)
                continue
            if di is not None:
                inputs.append(di)
                by_name[di.name] = record
        result = plan(inputs, self.state, now, self.settings.config)
        self.state = result.state
        self.last = result
        for di in inputs:
            decisions = result.for_deployment(di.name)
            applied = await self._apply(by_name[di.name], decisions, now)
            await self._record(di, decisions, result, applied, now)
        for name in set(self._history) - set(by_name):
            del self._history[name]
        self.passes += 1
        return result

    async def _apply(
        self, record: DeploymentRecord, decisions: Sequence[PoolDecision], now: float
    ) -> bool:
        changes = {d.role: d.desired for d in decisions if d.applied and d.direction != "hold"}
        if not changes or self.settings.advisory:
            return False
        spec = with_replicas(record.spec, changes)
        try:
            await self.store.apply(
                spec, resource_version=record.resource_version, now=now, owner="planner"
            )
        except Conflict as e:
            log.info("planner: %s changed under us (%s); re-planning next pass", spec.name, e)
            return False
        for d in decisions:
            if d.role in changes:
                self.metrics.decisions.labels(d.deployment, d.role.value, d.direction).inc()
        log.info(
            "planner: %s %s", spec.name, "; ".join(d.reason for d in decisions if d.role in changes)
        )
        self.on_change()
        return True

    async def _record(
        self,
        di: DeploymentInput,
        decisions: Sequence[PoolDecision],
        result: PlanResult,
        applied: bool,
        now: float,
    ) -> None:
        history = self._history.setdefault(di.name, [])
        if not history:
            old = await self.store.get_planner(di.name)
            history.extend(old.get("decisions", []) if old else [])
        ready = {p.role: p.ready for p in di.pools}
        for d in decisions:
            if d.direction == "hold":
                continue
            done = applied and d.applied
            same = [h for h in history if h.get("role") == d.role.value]
            if not done and same and (same[-1]["from"], same[-1]["to"]) == (d.current, d.desired):
                continue  # advisory: the same unapplied change again, already on record
            history.append(
                {
                    "time": now,
                    "role": d.role.value,
                    "from": d.current,
                    "to": d.desired,
                    "reason": d.reason,
                    "applied": done,
                }
            )
        del history[:-HISTORY]
        obs = di.observation
        doc = {
            "updated_at": now,
            "advisory": self.settings.advisory,
            "observed_rps": obs.arrival_rps if obs else 0.0,
            "forecast_rps": result.forecasts.get(di.name, 0.0),
            "pools": [
                {
                    "role": d.role.value,
                    "current": d.current,
                    "desired": d.desired,
                    "ready": ready.get(d.role, 0),
                    "kind": d.kind,
                    "predicted_ms": _finite(d.predicted_ms),
                    "observed_ms": _finite(d.observed_ms),
                    "target_ms": _finite(d.target_ms),
                    "reason": d.reason,
                    "autoscaling": d.applied,
                }
                for d in decisions
            ],
            "decisions": history,
        }
        await self.store.put_planner(di.name, doc)
        m = self.metrics
        for d in decisions:
            pool = d.role.value
            m.desired.labels(di.name, pool).set(d.desired)
            m.actual.labels(di.name, pool).set(ready.get(d.role, 0))
            for kind in ("ttft", "itl"):
                if kind not in d.kind:
                    continue
                if d.predicted_ms is not None and math.isfinite(d.predicted_ms):
                    m.predicted.labels(di.name, pool, kind).set(d.predicted_ms / 1e3)
                if d.observed_ms is not None:
                    m.observed.labels(di.name, pool, kind).set(d.observed_ms / 1e3)


def _finite(v: float | None) -> float | None:
    return v if v is not None and math.isfinite(v) else None


async def run_forever(loop: PlannerLoop, stop: asyncio.Event) -> None:
    """Run ``loop`` until ``stop`` is set (tests and tools that are not a control plane)."""
    task = asyncio.create_task(loop.run())
    await stop.wait()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def build_planner(
    settings: ControlPlaneSettings,
    client: EtcdClient,
    store: EtcdDeploymentStore,
    registry: CollectorRegistry,
    *,
    on_change: Callable[[], None],
    clock: Callable[[], float] = time.time,
) -> PlannerLoop:
    """The control plane's planner: load from the configured gateway URLs (else every gateway
    registered in etcd), decisions into ``store``, metrics into the control plane's registry."""
    source: MetricsSource
    if settings.planner_metrics_urls:
        source = GatewayMetricsSource(settings.planner_metrics_urls)
    else:
        source = EtcdGatewaysSource(client, settings.etcd.prefix)
    budget = settings.planner_gpu_budget or None
    down = settings.planner_scale_down_after_s
    return PlannerLoop(
        store,
        source,
        PlannerSettings(
            interval_s=settings.planner_interval_s,
            advisory=settings.planner == "advisory",
            config=PlannerConfig(
                gpu_budget=budget,
                down_stabilization_s=down,
                down_cooldown_s=down,
                settle_s=min(30.0, down),
            ),
        ),
        on_change=on_change,
        metrics=PlannerMetrics(registry),
        clock=clock,
    )
