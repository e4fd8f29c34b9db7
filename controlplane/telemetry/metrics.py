"""Every Prometheus metric Switchboard exports, defined once, one class per component.

Each class takes the ``CollectorRegistry`` it registers into (a process serves that registry
on ``/metrics``); names carry the ``switchboard_`` prefix, and prometheus_client exposes
counters with a ``_total`` suffix. Dashboards and alert rules use only names defined here:
``metric_names()`` lists them all (``exposed_names()`` adds the ``_bucket`` / ``_sum`` /
``_count`` / ``_total`` series names Prometheus stores). A component class is any subclass of
``MetricsGroup``; subclasses register themselves, so a new class is listed without more code.

**Several processes** (``switchboard gateway --processes N``): the supervisor sets
``PROMETHEUS_MULTIPROC_DIR`` for its processes, so every value lives in a file there and any
process's ``/metrics`` answers the sum over all of them (``serving_registry``); the gateway's
gauges say how (``multiprocess_mode="livesum"``: the sum over live processes).

**Label cardinality.** Every label takes values from a bounded set: model, SLA class, role,
route, status code, plugin, reason and state come from configuration or code; ``worker``,
``node`` and ``replica`` are bounded by the fleet. The one label a client controls the value
of, ``tenant``, is capped by ``TenantLabels``: the first ``tenant_cap`` distinct tenants
(default 100, ``DEFAULT_TENANT_CAP``) a gateway process sees keep their names, every later one
is reported as ``"other"``. Requests rejected before the tenant is known carry ``"unknown"``.

**Buckets** resolve the SLA targets: every TTFT target of the SLA classes (default interactive
0.5 s, standard 2 s) is a boundary of the TTFT, end-to-end and queue-wait histograms, and every
ITL target (50 ms, 100 ms) a boundary of the ITL histogram, so ``histogram_quantile`` and
``le``-based attainment queries are exact at the targets. A gateway built with other classes
adds their targets too.

**SLO accounting** (``judge_slo``): a request *meets its SLO* when it completed without error,
its TTFT (arrival at the gateway to its first token) is <= its class's TTFT target, and its
mean ITL (last token time - first token time, divided by tokens - 1; a one-token answer has no
ITL) is <= its class's ITL target. A target the class does not set is not checked; a batch
class with ``deadline_s`` checks end-to-end latency against the deadline instead. A miss has
exactly one reason, the first that applies in this order: ``shed`` (rejected by admission:
rate limit, load shed, queue timeout), ``error`` (failed or aborted after admission),
``ttft``, ``itl``, ``deadline``. Goodput counts the generated tokens of requests that met it.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, multiprocess
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.metrics import MetricWrapperBase

from controlplane.core.sla import DEFAULT_SLA_CLASSES, SlaClass

PREFIX = "switchboard_"
DEFAULT_TENANT_CAP = 100
OTHER_TENANT = "other"
"""The tenant label of every tenant past the cap."""
UNKNOWN = "unknown"
"""The tenant / class label of a request rejected before its tenant or class was known."""
MAX_CACHED_CHILDREN = 20_000
"""``GatewayMetrics.child`` caches at most this many labelled children (labels are bounded;
this only bounds the cache should a bug make them not be)."""

M = TypeVar("M", bound=MetricWrapperBase)

# --- buckets ------------------------------------------------------------------------------------

_LATENCY_BASE = (
    0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.4, 0.75, 1.0, 1.5, 3.0, 5.0, 7.5, 10.0, 20.0, 30.0, 60.0,
)  # fmt: skip
_E2E_BASE = (*_LATENCY_BASE, 120.0, 300.0, 600.0)
_QUEUE_BASE = (0.001, 0.005, *_LATENCY_BASE)
_ITL_BASE = (
    0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.03, 0.04, 0.075, 0.15, 0.2, 0.3, 0.5, 1.0, 2.0,
)  # fmt: skip
_ROUTER_BUCKETS = (
    1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1,
)  # fmt: skip
_KV_TRANSFER_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
_RECONCILE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_ETCD_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
)  # fmt: skip


def sla_buckets(base: Iterable[float], targets: Iterable[float]) -> tuple[float, ...]:
    """``base`` with every target added as a boundary, sorted, without duplicates."""
    return tuple(sorted({float(b) for b in base} | {float(t) for t in targets}))


def ttft_targets_s(classes: Iterable[SlaClass]) -> tuple[float, ...]:
    return tuple(c.ttft_p95_ms / 1000.0 for c in classes if c.ttft_p95_ms is not None)


def itl_targets_s(classes: Iterable[SlaClass]) -> tuple[float, ...]:
    return tuple(c.itl_p95_ms / 1000.0 for c in classes if c.itl_p95_ms is not None)


LATENCY_BUCKETS = sla_buckets(_LATENCY_BASE, ttft_targets_s(DEFAULT_SLA_CLASSES))
"""TTFT buckets for the default classes (0.5 s and 2 s are boundaries)."""
ITL_BUCKETS = sla_buckets(_ITL_BASE, itl_targets_s(DEFAULT_SLA_CLASSES))
"""ITL buckets for the default classes (0.05 s and 0.1 s are boundaries)."""

# --- tenant cap ---------------------------------------------------------------------------------


class TenantLabels:
    """The ``tenant`` label value for a tenant name: the name for the first ``cap`` distinct
    tenants seen, ``"other"`` for every later one; ``""`` -> ``"unknown"``. Thread safe."""

    def __init__(self, cap: int = DEFAULT_TENANT_CAP) -> None:
        if cap < 0:
            raise ValueError(f"tenant cap {cap} must be >= 0")
        self.cap = cap
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, tenant: str) -> str:
        if not tenant:
            return UNKNOWN
        if tenant in self._seen:
            return tenant
        with self._lock:
            if tenant in self._seen:
                return tenant
            if len(self._seen) < self.cap:
                self._seen.add(tenant)
                return tenant
        return OTHER_TENANT

    @property
    def seen(self) -> int:
        return len(self._seen)


# --- SLO accounting (pure) ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SloTargets:
    """What a request of one class is promised (seconds; None: not checked)."""

    ttft_s: float | None = None
    itl_s: float | None = None
    deadline_s: float | None = None

    @staticmethod
    def of(cls: SlaClass) -> SloTargets:
        return SloTargets(
            ttft_s=None if cls.ttft_p95_ms is None else cls.ttft_p95_ms / 1000.0,
            itl_s=None if cls.itl_p95_ms is None else cls.itl_p95_ms / 1000.0,
            deadline_s=cls.deadline_s,
        )


@dataclass(frozen=True, slots=True)
class RequestOutcome:
    """What one request measured (seconds; see the module docstring for the definitions)."""

    ttft_s: float | None
    """Arrival at the gateway to the first token; None when no token came."""
    mean_itl_s: float | None
    """(last token time - first token time) / (tokens - 1); None below two tokens."""
    e2e_s: float
    """Arrival to the last byte of the answer."""
    generated_tokens: int = 0
    error: bool = False
    """Failed or aborted after admission (worker errors, client disconnect, timeout)."""
    shed: bool = False
    """Rejected by admission (429)."""


SLO_MISS_REASONS = ("shed", "error", "ttft", "itl", "deadline")


def judge_slo(targets: SloTargets, outcome: RequestOutcome) -> str | None:
    """None when the request met its SLO, else the one reason it missed (``SLO_MISS_REASONS``
    order: shed, error, ttft, itl, deadline)."""
    if outcome.shed:
        return "shed"
    if outcome.error:
        return "error"
    if targets.ttft_s is not None and (outcome.ttft_s is None or outcome.ttft_s > targets.ttft_s):
        return "ttft"
    if (
        targets.itl_s is not None
        and outcome.mean_itl_s is not None
        and outcome.mean_itl_s > targets.itl_s
    ):
        return "itl"
    if targets.deadline_s is not None and outcome.e2e_s > targets.deadline_s:
        return "deadline"
    return None


class TokenTimer:
    """Per-request token timing, fed with timestamps from the caller's clock (no clock here).

    ``start(now)`` at arrival, ``tokens(n, now)`` for each chunk of ``n`` tokens; ``ttft_s``,
    ``mean_itl_s`` and ``outcome(now, ...)`` give what ``judge_slo`` reads. ``tokens`` returns
    the inter-token gap of the chunk (its gap spread over its tokens; None for the first chunk)
    for the ITL histogram.
    """

    __slots__ = ("count", "first", "last", "started")

    def __init__(self, started: float) -> None:
        self.started = started
        self.first: float | None = None
        self.last: float | None = None
        self.count = 0

    def tokens(self, n: int, now: float) -> float | None:
        if n <= 0:
            return None
        gap: float | None = None
        if self.first is None:
            self.first = now
            # a first chunk of several tokens: the ones after the first arrive with it
        elif self.last is not None:
            gap = (now - self.last) / n
        self.last = now
        self.count += n
        return gap

    @property
    def ttft_s(self) -> float | None:
        return None if self.first is None else self.first - self.started

    @property
    def mean_itl_s(self) -> float | None:
        if self.first is None or self.last is None or self.count < 2:
            return None
        return (self.last - self.first) / (self.count - 1)

    def outcome(self, now: float, *, error: bool = False) -> RequestOutcome:
        return RequestOutcome(
            ttft_s=self.ttft_s,
            mean_itl_s=self.mean_itl_s,
            e2e_s=now - self.started,
            generated_tokens=self.count,
            error=error,
        )


# --- the component classes ----------------------------------------------------------------------


class MetricsGroup:
    """Base of a component's metrics class: ``__init__(registry)`` registers every metric.
    Subclasses are collected in ``MetricsGroup.groups`` (for ``metric_names``)."""

    groups: ClassVar[list[type[MetricsGroup]]] = []

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        MetricsGroup.groups.append(cls)

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)


MULTIPROC_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"
"""Set (by ``controlplane/gateway/supervisor.py``) before prometheus_client is imported: the
process keeps its values in files there, shared with its sibling processes."""


def serving_registry(group: MetricsGroup) -> CollectorRegistry:
    """What ``/metrics`` serves: ``group``'s registry, or in one of several processes
    (``MULTIPROC_DIR_ENV`` set) a registry that sums every process's files."""
    path = os.environ.get(MULTIPROC_DIR_ENV, "")
    if not path:
        return group.registry
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=path)  # type: ignore[no-untyped-call]
    return registry


class GatewayMetrics(MetricsGroup):
    """The gateway's request-path metrics. ``sla_classes``: add their targets to the buckets;
    ``tenant_cap``: see ``TenantLabels``."""

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        *,
        sla_classes: Sequence[SlaClass] = DEFAULT_SLA_CLASSES,
        tenant_cap: int = DEFAULT_TENANT_CAP,
    ) -> None:
        super().__init__(registry)
        r = self.registry
        self.tenant_label = TenantLabels(tenant_cap)
        self._plugin_children: dict[str, Histogram] = {}
        self._children: dict[tuple[int, tuple[str, ...]], MetricWrapperBase] = {}
        ttft_buckets = sla_buckets(LATENCY_BUCKETS, ttft_targets_s(sla_classes))
        itl_buckets = sla_buckets(ITL_BUCKETS, itl_targets_s(sla_classes))
        deadlines = [c.deadline_s for c in sla_classes if c.deadline_s is not None]
        e2e_buckets = sla_buckets(sla_buckets(_E2E_BASE, ttft_targets_s(sla_classes)), deadlines)
        queue_buckets = sla_buckets(_QUEUE_BASE, ttft_targets_s(sla_classes))
        tmc = ["tenant", "model", "sla_class"]
        self.requests = Counter(
            "switchboard_requests",
            "Requests answered, by tenant, model, SLA class, route and status (HTTP code or"
            " gRPC code name).",
            ["tenant", "model", "sla_class", "route", "status"],
            registry=r,
        )
        self.ttft = Histogram(
            "switchboard_ttft_seconds",
            "Time to first token: arrival at the gateway to the first token.",
            tmc,
            buckets=ttft_buckets,
            registry=r,
        )
        self.itl = Histogram(
            "switchboard_itl_seconds",
            "Inter-token latency (TPOT): gap between tokens after the first, a chunk's gap"
            " spread over its tokens.",
            tmc,
            buckets=itl_buckets,
            registry=r,
        )
        self.tpot = Histogram(
            "switchboard_tpot_seconds",
            "Time per output token of each request (TPOT, as `vllm bench serve` defines it):"
            " (last token - first token) / (tokens - 1), one observation per request of two or"
            " more tokens. What the ITL target is judged on, and what the planner sizes by.",
            tmc,
            buckets=itl_buckets,
            registry=r,
        )
        self.e2e = Histogram(
            "switchboard_e2e_latency_seconds",
            "Arrival at the gateway to the end of the answer, requests that produced tokens.",
            tmc,
            buckets=e2e_buckets,
            registry=r,
        )
        self.queue_wait = Histogram(
            "switchboard_queue_wait_seconds",
            "Time admitted requests waited in the admission queue (0 when admitted at once).",
            tmc,
            buckets=queue_buckets,
            registry=r,
        )
        self.slo_met = Counter(
            "switchboard_slo_met",
            "Requests that met their class's SLO (TTFT <= target and mean ITL <= target).",
            tmc,
            registry=r,
        )
        self.slo_missed = Counter(
            "switchboard_slo_missed",
            "Requests that missed their class's SLO, by reason: shed, error, ttft, itl, deadline.",
            [*tmc, "reason"],
            registry=r,
        )
        self.goodput_tokens = Counter(
            "switchboard_goodput_tokens",
            "Generated tokens of requests that met their SLO.",
            tmc,
            registry=r,
        )
        self.prompt_tokens = Counter(
            "switchboard_prompt_tokens", "Prompt tokens accepted.", ["tenant", "model"], registry=r
        )
        self.generation_tokens = Counter(
            "switchboard_generation_tokens",
            "Tokens streamed to clients.",
            ["tenant", "model"],
            registry=r,
        )
        self.queue_depth = Gauge(
            "switchboard_queue_depth",
            "Requests waiting in the admission queue now.",
            ["model", "sla_class"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self.in_flight = Gauge(
            "switchboard_in_flight_requests",
            "Generation requests in flight in this gateway.",
            ["model"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self.admission_rejected = Counter(
            "switchboard_admission_rejected",
            "Requests rejected by admission, by reason (the admission core's RejectReason:"
            " rate_limited_requests, rate_limited_tokens, request_too_large, tenant_queue_full,"
            " queue_full, shed, queue_timeout, deadline_exceeded).",
            [*tmc, "reason"],
            registry=r,
        )
        self.quota_share = Gauge(
            "switchboard_quota_share",
            "This gateway's part of a tenant's quota on a model (quota: requests_per_minute,"
            " tokens_per_minute, max_concurrent), shared between the gateway replicas by"
            " demand (controlplane/core/quota_shares.py); the whole quota for a replica alone."
            " Summed over the processes of one host. Tenants past the label cap are not shown.",
            ["tenant", "model", "quota"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self.admission_queued = Counter(
            "switchboard_admission_queued",
            "Requests that had to wait in the admission queue.",
            tmc,
            registry=r,
        )
        self.router_decision = Histogram(
            "switchboard_router_decision_seconds",
            "Time to pick the workers of one routing decision.",
            ["model", "policy"],
            buckets=_ROUTER_BUCKETS,
            registry=r,
        )
        self.router_plugin = Histogram(
            "switchboard_router_plugin_seconds",
            "Time spent in one filter / scorer plugin during a routing decision (sampled: the"
            " gateway times one decision in N, default 8).",
            ["plugin"],
            buckets=_ROUTER_BUCKETS,
            registry=r,
        )
        self.routes = Counter(
            "switchboard_router_decisions",
            "Routing decisions, by model, policy (sla, least_loaded, least_loaded_fallback) and"
            " prefill (local or remote).",
            ["model", "policy", "prefill"],
            registry=r,
        )
        self.router_reasons = Counter(
            "switchboard_router_reasons",
            "The deciding plugin of each routing decision (the scorer that contributed most to"
            " the winner's lead, or the policy when no scorer ran).",
            ["model", "plugin"],
            registry=r,
        )
        self.prefix_hit_tokens = Counter(
            "switchboard_prefix_cache_hit_tokens",
            "Prompt tokens the chosen worker already holds in its prefix cache (router view).",
            ["model"],
            registry=r,
        )
        self.prefix_query_tokens = Counter(
            "switchboard_prefix_cache_query_tokens",
            "Prompt tokens looked up in the router's prefix index.",
            ["model"],
            registry=r,
        )
        self.long_context_lent = Counter(
            "switchboard_long_context_lent",
            "Long prompts prefilled on a base-pool prefill worker lent to a long_context pool"
            " that has no prefill workers of its own (the router's lendable_prefill_workers).",
            ["model"],
            registry=r,
        )
        self.late_held = Counter(
            "switchboard_late_held",
            "Requests held in the late lane: the best route predicted a TTFT over their class"
            " target, so requests that could still make theirs went first"
            " (controlplane/core/routing/late.py).",
            ["model", "sla_class"],
            registry=r,
        )
        self.late_hold = Histogram(
            "switchboard_late_hold_seconds",
            "How long a late request was held before it was sent.",
            ["model"],
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
            registry=r,
        )
        self.late_waiting = Gauge(
            "switchboard_late_lane_requests",
            "Requests held in the late lane now.",
            ["model"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self.migrations = Counter(
            "switchboard_migrations",
            "Requests moved to another worker mid-stream after their worker failed.",
            ["model"],
            registry=r,
        )
        self.retries = Counter(
            "switchboard_retries",
            "Requests sent to another worker before any token, after a worker failed.",
            ["model"],
            registry=r,
        )
        self.reprefills = Counter(
            "switchboard_kv_reprefills",
            "Decodes whose prefilled KV was gone, prefilled again.",
            ["model"],
            registry=r,
        )
        self.aborts = Counter(
            "switchboard_aborts",
            "Requests ended before their answer was complete, by reason: client_disconnect,"
            " error, timeout.",
            ["model", "reason"],
            registry=r,
        )
        self.circuit_opened = Counter(
            "switchboard_circuit_open",
            "Times a worker's circuit breaker opened.",
            ["worker"],
            registry=r,
        )

    # -- helpers for the request path -------------------------------------------------------------

    def child(self, metric: M, *values: str) -> M:
        """``metric.labels(*values)``, cached: the request path looks each labelled child up
        once per process instead of once per observation (``labels`` validates, formats and
        locks: several microseconds per call). Children are never removed from these metrics,
        so a cached child stays the exported one."""
        key = (id(metric), values)
        child = self._children.get(key)
        if child is None:
            child = metric.labels(*values)
            if len(self._children) < MAX_CACHED_CHILDREN:
                self._children[key] = child
        return child  # type: ignore[return-value]

    def plugin_histogram(self, plugin: str) -> Histogram:
        """``router_plugin``'s child for ``plugin``, cached (plugins are a fixed set)."""
        child = self._plugin_children.get(plugin)
        if child is None:
            child = self._plugin_children[plugin] = self.router_plugin.labels(plugin)
        return child

    def record_slo(
        self, tenant: str, model: str, sla_class: str, targets: SloTargets, o: RequestOutcome
    ) -> str | None:
        """Count one finished request against its SLO (``judge_slo``); the miss reason or
        None. ``tenant`` is the raw name (capped here)."""
        reason = judge_slo(targets, o)
        t = self.tenant_label(tenant)
        if reason is None:
            self.child(self.slo_met, t, model, sla_class).inc()
            if o.generated_tokens:
                self.child(self.goodput_tokens, t, model, sla_class).inc(o.generated_tokens)
        else:
            self.child(self.slo_missed, t, model, sla_class, reason).inc()
        if o.ttft_s is not None:
            self.child(self.e2e, t, model, sla_class).observe(o.e2e_s)
        if o.mean_itl_s is not None:
            self.child(self.tpot, t, model, sla_class).observe(o.mean_itl_s)
        return reason


class WorkerMetrics(MetricsGroup):
    """One worker process's metrics (served on its ``--metrics-port``)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        super().__init__(registry)
        r = self.registry
        wmr = ["worker", "model", "role"]
        self.kv_cache_usage = Gauge(
            "switchboard_worker_kv_cache_usage_ratio",
            "Fraction of the worker's KV cache in use (0..1).",
            wmr,
            registry=r,
        )
        self.running = Gauge(
            "switchboard_worker_running_requests", "Requests running in the engine.", wmr,
            registry=r,
        )  # fmt: skip
        self.waiting = Gauge(
            "switchboard_worker_waiting_requests", "Requests waiting in the engine.", wmr,
            registry=r,
        )  # fmt: skip
        self.prefix_hit_ratio = Gauge(
            "switchboard_worker_prefix_cache_hit_ratio",
            "The engine's prefix-cache hit ratio (hit tokens / queried tokens), 0..1.",
            wmr,
            registry=r,
        )
        self.kv_transfer_bytes = Counter(
            "switchboard_kv_transfer_bytes",
            "KV cache bytes moved between workers, by direction (send or receive).",
            ["model", "direction"],
            registry=r,
        )
        self.kv_transfer_seconds = Histogram(
            "switchboard_kv_transfer_seconds",
            "Time to move one request's KV cache (measured on the receiving side).",
            ["model"],
            buckets=_KV_TRANSFER_BUCKETS,
            registry=r,
        )
        self.kv_transfer_failures = Counter(
            "switchboard_kv_transfer_failures",
            "KV transfers that failed, by reason (kv_unavailable: gone, evicted or corrupt;"
            " unreachable: the prefill worker could not be reached).",
            ["model", "reason"],
            registry=r,
        )
        self.tokens = Counter(
            "switchboard_worker_tokens",
            "Tokens the worker processed, by kind (prefill or decode).",
            [*wmr, "kind"],
            registry=r,
        )


class ControlPlaneMetrics(MetricsGroup):
    """The control plane's metrics (served on its ``--metrics-port``)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        super().__init__(registry)
        r = self.registry
        self.leader = Gauge(
            "switchboard_leader", "1 when this replica is the leader, else 0.", ["replica"],
            registry=r,
        )  # fmt: skip
        self.leader_changes = Counter(
            "switchboard_leader_changes", "Times this replica gained or lost leadership.",
            registry=r,
        )  # fmt: skip
        self.nodes = Gauge(
            "switchboard_nodes", "Registered nodes by state (ready, cordoned, draining, ...).",
            ["state"], registry=r,
        )  # fmt: skip
        self.gpus = Gauge(
            "switchboard_gpus", "GPUs of registered nodes by state (free, used, unhealthy).",
            ["state"], registry=r,
        )  # fmt: skip
        self.workers = Gauge(
            "switchboard_workers",
            "Registered workers by model, role and state (from the etcd watch).",
            ["model", "role", "state"],
            registry=r,
        )
        self.placement_failures = Counter(
            "switchboard_placement_failures",
            "Replicas that could not be placed, by deployment and reason.",
            ["deployment", "reason"],
            registry=r,
        )
        self.reconcile_actions = Counter(
            "switchboard_reconcile_actions",
            "Reconciler actions carried out, by action and result (ok or error).",
            ["action", "result"],
            registry=r,
        )
        self.reconcile_duration = Histogram(
            "switchboard_reconcile_duration_seconds",
            "Time of one reconcile pass (observe, diff, act).",
            buckets=_RECONCILE_BUCKETS,
            registry=r,
        )
        self.worker_restarts = Counter(
            "switchboard_worker_restarts",
            "Replicas replaced after they died, by deployment and pool.",
            ["deployment", "pool"],
            registry=r,
        )
        self.etcd_request = Histogram(
            "switchboard_etcd_request_seconds",
            "etcd request latency by operation (get, put, txn, delete, lease, ...).",
            ["op"],
            buckets=_ETCD_BUCKETS,
            registry=r,
        )


class NodeAgentMetrics(MetricsGroup):
    """A node agent's metrics (served on its ``--metrics-port``)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        super().__init__(registry)
        r = self.registry
        self.node_gpus = Gauge(
            "switchboard_node_gpus", "This node's GPUs by state (healthy, unhealthy).",
            ["node", "state"], registry=r,
        )  # fmt: skip
        self.heartbeat_failures = Counter(
            "switchboard_node_heartbeat_failures",
            "Heartbeats (lease keep-alives / re-registrations) that failed.",
            registry=r,
        )


class PlannerMetrics(MetricsGroup):
    """The SLA planner's metrics (the leader's control plane registry; ``controlplane/planner.py``).
    ``kind``: ``ttft`` or ``itl``; ``direction``: ``up`` or ``down``."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        super().__init__(registry)
        r = self.registry
        dp = ["deployment", "pool"]
        self.desired = Gauge(
            "switchboard_planner_desired_replicas", "Replicas the planner wants per pool.", dp,
            registry=r,
        )  # fmt: skip
        self.actual = Gauge(
            "switchboard_planner_actual_replicas",
            "Replicas ready per pool, as the planner saw them.", dp, registry=r,
        )  # fmt: skip
        self.predicted = Gauge(
            "switchboard_planner_predicted_latency_seconds",
            "Predicted p95 latency at the desired replica count.", [*dp, "kind"], registry=r,
        )  # fmt: skip
        self.observed = Gauge(
            "switchboard_planner_observed_latency_seconds",
            "Measured p95 latency over the planner's last window (worst SLA class).",
            [*dp, "kind"], registry=r,
        )  # fmt: skip
        self.decisions = Counter(
            "switchboard_planner_decisions",
            "Planner decisions that changed a pool's replicas, by direction.",
            [*dp, "direction"], registry=r,
        )  # fmt: skip


@dataclass(frozen=True, slots=True)
class HttpServerSnapshot:
    """What ``WorkerHttpMetrics`` reports at a scrape: the engine's load and the server's
    request counters (kept as plain integers by the server: no lock per request)."""

    model: str
    running_requests: int = 0
    waiting_requests: int = 0
    kv_blocks_used: int = 0
    kv_blocks_total: int = 0
    prefix_cache_hit_rate: float = 0.0
    tokens_per_second: float = 0.0
    batch_size: int = 0
    requests: Mapping[tuple[str, int], int] = field(default_factory=dict)
    """(route, HTTP status) -> requests answered."""
    prompt_tokens: int = 0
    generation_tokens: int = 0
    kv_fetch_fallbacks: int = 0
    disconnects: int = 0

    @property
    def kv_cache_usage(self) -> float:
        return self.kv_blocks_used / self.kv_blocks_total if self.kv_blocks_total else 0.0


class WorkerHttpMetrics(MetricsGroup):
    """The standalone OpenAI HTTP server of one engine (``switchboard serve-openai``): engine
    gauges and request counters, computed at scrape time from ``source`` (None: the families
    with no samples, which is what ``metric_names`` reads)."""

    GAUGES: ClassVar[tuple[tuple[str, str, str], ...]] = (
        ("switchboard_engine_running_requests", "Requests the engine is running.",
         "running_requests"),
        ("switchboard_engine_waiting_requests", "Requests waiting for the engine.",
         "waiting_requests"),
        ("switchboard_engine_kv_cache_usage_ratio", "KV-cache blocks in use / all blocks.",
         "kv_cache_usage"),
        ("switchboard_engine_kv_blocks_used", "KV-cache blocks in use.", "kv_blocks_used"),
        ("switchboard_engine_kv_blocks_total", "KV-cache blocks in all.", "kv_blocks_total"),
        ("switchboard_engine_prefix_cache_hit_rate",
         "Prompt tokens served from the prefix cache / prompt tokens, recent admissions.",
         "prefix_cache_hit_rate"),
        ("switchboard_engine_tokens_per_second", "Tokens generated per second, recent window.",
         "tokens_per_second"),
        ("switchboard_engine_batch_size", "Sequences in the last engine step.", "batch_size"),
    )  # fmt: skip
    COUNTERS: ClassVar[tuple[tuple[str, str, str], ...]] = (
        ("switchboard_http_prompt_tokens", "Prompt tokens accepted.", "prompt_tokens"),
        ("switchboard_http_generation_tokens", "Tokens generated.", "generation_tokens"),
        ("switchboard_http_kv_fetch_fallbacks",
         "Decode requests whose KV was gone, prefilled locally instead.", "kv_fetch_fallbacks"),
        ("switchboard_http_client_disconnects",
         "Requests whose client went away before the answer was complete (aborted).",
         "disconnects"),
    )  # fmt: skip

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        source: Callable[[], HttpServerSnapshot] | None = None,
    ) -> None:
        super().__init__(registry)
        self.source = source
        self.registry.register(self)  # a Collector: collect() runs at every scrape

    def collect(self) -> Iterator[Metric]:
        snap = self.source() if self.source is not None else None
        for name, doc, attr in self.GAUGES:
            g = GaugeMetricFamily(name, doc, labels=["model"])
            if snap is not None:
                g.add_metric([snap.model], float(getattr(snap, attr)))
            yield g
        requests = CounterMetricFamily(
            "switchboard_http_requests",
            "Generation requests answered, by route and HTTP status.",
            labels=["model", "route", "status"],
        )
        if snap is not None:
            for (route, status), n in sorted(snap.requests.items()):
                requests.add_metric([snap.model, route, str(status)], n)
        yield requests
        for name, doc, attr in self.COUNTERS:
            c = CounterMetricFamily(name, doc, labels=["model"])
            if snap is not None:
                c.add_metric([snap.model], float(getattr(snap, attr)))
            yield c


# --- the names list -----------------------------------------------------------------------------


def _families(group: type[MetricsGroup]) -> Iterator[tuple[str, str]]:
    registry = CollectorRegistry(auto_describe=True)
    group(registry)
    for family in registry.collect():
        yield family.name, family.type


def metric_names() -> dict[str, str]:
    """Every metric defined here, as Prometheus exposes its name (counters with ``_total``),
    mapped to its type (counter, gauge, histogram). Covers every ``MetricsGroup`` subclass."""
    out: dict[str, str] = {}
    for group in MetricsGroup.groups:
        for name, kind in _families(group):
            out[f"{name}_total" if kind == "counter" else name] = kind
    return dict(sorted(out.items()))


def exposed_names() -> frozenset[str]:
    """Every series name Prometheus stores for the metrics here: counters' ``_total``,
    histograms' ``_bucket``, ``_sum`` and ``_count``, gauges as they are."""
    out: set[str] = set()
    for name, kind in metric_names().items():
        if kind == "histogram":
            out.update((f"{name}_bucket", f"{name}_sum", f"{name}_count"))
        else:
            out.add(name)
    return frozenset(out)
