"""The SLA planner's arithmetic: measured load + timing profiles -> replica counts. Pure.

Theory of operation
-------------------
Every ``interval_s`` the shell (``controlplane/planner.py``) hands ``plan`` one
``DeploymentInput`` per deployment (its pools, priority, timing model, SLA targets and the last
window's ``LoadObservation``) plus the ``PlannerState`` the previous call returned, and gets back
one ``PoolDecision`` per pool and the next state. No I/O, clock or global random: ``now`` is an
argument; the same inputs give the same decisions.

1. **Predict the load.** Each deployment's arrival rate feeds a ``LoadPredictor`` (pluggable;
   ``HoltPredictor``: exponentially weighted level + trend). Scale-up sizes for the larger of the
   level and the forecast one ``lead_time_s`` ahead (a replica takes that long to start), so a
   ramp is met before it arrives; scale-down sizes for the level only (a trend never removes
   capacity). A backlog of queued prompts adds the rate that drains it in ``backlog_drain_s``.

2. **Invert the profiles into replicas** (``size_decode``, ``size_prefill``, ``size_aggregated``).
   *Decode* is ITL-bound: a decode replica at batch ``B`` runs steps of
   ``decode_step_ms(B, B * ctx)`` (``ctx = ISL + OSL/2``); by Little's law ``n`` replicas carry
   ``B = rate/n * OSL * step`` sequences each (a fixed point, solved by iteration). The batch is
   Poisson-ish, so its p95 is ``B + 1.645 sqrt(B)``; the predicted ITL p95 is the step at that
   batch, and the batch must also fit the KV cache (``B95 * (ISL + OSL) <= kv_capacity``) and
   ``max_num_seqs``. *Prefill* is TTFT-bound and queueing is explicit: the prefill pool is an
   **M/G/c** queue (Poisson arrivals from many tenants; service time set by the prompt length,
   whose spread is the measured ISL's squared coefficient of variation ``cs2``; the router's
   least-predicted-TTFT pick keeps one shared queue in effect). The wait is Erlang C's M/M/c
   wait scaled by the Allen-Cunneen factor ``(1 + cs2) / 2``, and its p95 comes from the M/M/c
   tail ``P(W > t) = C * exp(-(c*mu - lambda) t)``. Predicted TTFT p95 = wait p95 + the p95
   prompt's prefill (uncached part, after the prefix-cache hit rate) + KV transfer + one decode
   step. We chose M/G/c over sizing for utilisation alone (what Dynamo's planner does) because
   TTFT is dominated by the wait as utilisation nears 1: 4 prefill workers at 90 % have a p95
   wait of several service times, which a throughput inversion does not see. *Aggregated* pools
   carry both: replicas = ceil(decode share + prefill share) of each replica's time.
   Each pool takes the smallest count whose prediction, times a learned **correction**
   (observed / predicted latency, exponentially smoothed, clamped to [0.5, 4]), is within
   ``headroom`` of the tightest target of the classes the deployment serves (one decode batch
   steps all its sequences together, so the strictest class sets the step).

3. **Guard with measurements.** If a class's measured p95 already misses its target and the
   model does not ask for more, the pool still grows by the overshoot (at least +1): e.g.
   ``decode ITL p95 62 ms > 50 ms target at 41.0 rps -> +2 decode``.

4. **Hysteresis and cooldowns.** Up: at once (after ``up_cooldown_s``). Down: the count sized at
   ``rate * (1 + down_margin)`` must be lower, it is the *largest* recommendation of the last
   ``down_stabilization_s`` (Kubernetes HPA's stabilisation window), at most ``max_down_step``
   replicas per decision, no sooner than ``down_cooldown_s`` after the pool's last change, and
   never while the pool has replicas that are not ready yet. Scale-down only lowers ``replicas``;
   the reconciler drains the surplus (no request fails).

5. **Share the GPU budget by priority** (``allocate``). Pools that are not autoscaled keep what
   they have; every autoscaled pool keeps its ``min_replicas``; then deployments, highest
   priority first, get their wanted replicas while GPUs remain. A deployment that does not fit
   gets its prefill and decode increments above min in their wanted ratio (so a cap never leaves
   decode without prefill), and a lower-priority deployment may be cut below what it runs (its
   surplus drains) when a higher one needs the GPUs.

Every decision carries its reason in words.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Protocol

from controlplane.core.deployments import PoolRole
from controlplane.core.sla import SlaClass
from controlplane.errors import InvalidArgument

Z95 = 1.645
_MAX_REPLICAS_SEARCH = 4096


class TimingModel(Protocol):
    """What the planner reads of an engine's timing profile (ms); ``workers.profiles.SimProfile``
    is one, and so is the router's ``TimingModel``."""

    @property
    def kv_bytes_per_token(self) -> int: ...

    def prefill_ms(self, new_tokens: int, cached_tokens: int = 0) -> float: ...

    def decode_step_ms(self, batch: int, context_tokens: int) -> float: ...

    def kv_transfer_ms(self, num_bytes: int) -> float: ...


# --- load prediction --------------------------------------------------------------------------


class LoadPredictor(Protocol):
    """Predicts a deployment's arrival rate. Immutable: ``update`` returns the next predictor."""

    def update(self, now: float, rate: float) -> LoadPredictor: ...

    @property
    def level(self) -> float:
        """The smoothed current rate."""
        ...

    def forecast(self, horizon_s: float) -> float:
        """The rate expected ``horizon_s`` from the last update (>= 0)."""
        ...


@dataclass(frozen=True, slots=True)
class HoltPredictor:
    """Exponentially weighted level and trend (Holt's linear method) over irregular intervals.

    ``alpha`` weighs a new sample against the level, ``beta`` a new slope against the trend. The
    forecast extrapolates the trend at most to ``max_growth`` times the level (a noisy trend
    must not ask for the whole cluster)."""

    alpha: float = 0.5
    beta: float = 0.2
    max_growth: float = 1.5
    level_: float = 0.0
    trend: float = 0.0
    """Rate change per second."""
    last_at: float | None = None

    def update(self, now: float, rate: float) -> HoltPredictor:
        rate = max(0.0, rate)
        if self.last_at is None:
            return replace(self, level_=rate, trend=0.0, last_at=now)
        dt = max(now - self.last_at, 1e-9)
        expected = self.level_ + self.trend * dt
        level = self.alpha * rate + (1 - self.alpha) * expected
        trend = self.beta * (level - self.level_) / dt + (1 - self.beta) * self.trend
        return replace(self, level_=max(0.0, level), trend=trend, last_at=now)

    @property
    def level(self) -> float:
        return self.level_

    def forecast(self, horizon_s: float) -> float:
        ahead = self.level_ + self.trend * horizon_s
        return max(0.0, min(ahead, self.level_ * self.max_growth if self.level_ else ahead))


# --- inputs -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LengthStats:
    """A token-length distribution: mean, squared coefficient of variation, p95."""

    mean: float
    scv: float = 1.0
    """variance / mean^2; 1 for an exponential spread, 0 for a fixed length."""
    p95: float | None = None
    """None: ``mean * (1 + 1.645 * sqrt(scv))``."""

    def __post_init__(self) -> None:
        if not (self.mean >= 0 and self.scv >= 0 and math.isfinite(self.mean)):
            raise InvalidArgument(f"LengthStats: mean {self.mean} and scv {self.scv} must be >= 0")

    @property
    def p95_or_estimate(self) -> float:
        if self.p95 is not None:
            return self.p95
        return self.mean * (1 + Z95 * math.sqrt(self.scv))


@dataclass(frozen=True, slots=True)
class ClassObservation:
    """One SLA class's traffic and measured latency over the window ("" = unlabelled)."""

    sla_class: str
    arrival_rps: float
    ttft_p95_ms: float | None = None
    itl_p95_ms: float | None = None


@dataclass(frozen=True, slots=True)
class LoadObservation:
    """What a deployment saw over the last window (the shell measures it)."""

    arrival_rps: float
    input_tokens: LengthStats
    output_tokens: LengthStats
    prefix_hit_rate: float = 0.0
    """Fraction of prompt tokens served from prefix caches."""
    queued_requests: int = 0
    """Requests waiting for a prefill slot now (admission + engine queues)."""
    queue_wait_ms: float | None = None
    """Mean measured wait before prefill; informational (reasons, metrics)."""
    classes: tuple[ClassObservation, ...] = ()
    window_s: float = 0.0


@dataclass(frozen=True, slots=True)
class PoolInput:
    role: PoolRole
    replicas: int
    """The spec's current desired count."""
    ready: int
    """Replicas serving now."""
    min_replicas: int
    max_replicas: int
    autoscaling: bool
    """False: the planner only recommends; the pool keeps ``replicas``."""


@dataclass(frozen=True, slots=True)
class DeploymentInput:
    name: str
    priority: int
    gpus_per_replica: int
    pools: tuple[PoolInput, ...]
    timing: TimingModel
    sla_classes: tuple[SlaClass, ...]
    """The classes the deployment serves; the tightest target among those with traffic binds."""
    observation: LoadObservation | None
    kv_capacity_tokens: int
    max_num_seqs: int = 256

    def pool(self, role: PoolRole) -> PoolInput | None:
        return next((p for p in self.pools if p.role is role), None)


@dataclass(frozen=True, slots=True)
class PlannerConfig:
    """Knobs of the planner; defaults suit GPU engines that start in about a minute."""

    itl_headroom: float = 0.8
    """Size decode so the predicted ITL p95 is at most this fraction of the target."""
    ttft_headroom: float = 0.8
    """Size prefill so the predicted TTFT p95 is at most this fraction of the target."""
    lead_time_s: float = 60.0
    """How far ahead scale-up forecasts: about a replica's start-up time."""
    backlog_drain_s: float = 30.0
    """Queued requests add the rate that drains them in this long."""
    down_margin: float = 0.15
    """Scale down only if the count sized for ``rate * (1 + down_margin)`` is lower."""
    down_stabilization_s: float = 60.0
    """Scale down to the largest recommendation of this window (no flapping on noise)."""
    down_cooldown_s: float = 60.0
    """No scale-down sooner than this after the pool's last change."""
    up_cooldown_s: float = 0.0
    """No scale-up sooner than this after the pool's last scale-up."""
    max_down_step: int = 2
    """Most replicas one decision removes from a pool."""
    correction_alpha: float = 0.3
    """Weight of a new observed/predicted latency ratio in the correction factor."""
    correction_bounds: tuple[float, float] = (0.5, 4.0)
    gpu_budget: int | None = None
    """GPUs all deployments may hold together; None: unlimited (pool max only)."""
    min_samples_rps: float = 0.05
    """Below this arrival rate latency measurements are too sparse to learn from."""
    settle_s: float = 30.0
    """After a pool changed, measurements are transient this long: they neither teach the
    correction nor trigger the measured guard."""


# --- outputs and state ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PoolDecision:
    deployment: str
    role: PoolRole
    current: int
    desired: int
    reason: str
    kind: str = ""
    """"itl" (decode), "ttft" (prefill), "itl+ttft" (aggregated), "" (not modelled)."""
    predicted_ms: float | None = None
    """Predicted p95 of ``kind`` at ``desired`` replicas (model x correction)."""
    observed_ms: float | None = None
    """Measured p95 of ``kind`` (the tightest class) over the window."""
    target_ms: float | None = None
    applied: bool = True
    """False when the pool is not autoscaled (a recommendation only)."""

    @property
    def direction(self) -> str:
        if self.desired > self.current:
            return "up"
        if self.desired < self.current:
            return "down"
        return "hold"


@dataclass(frozen=True, slots=True)
class PoolMemory:
    last_up_at: float | None = None
    last_change_at: float | None = None
    recent: tuple[tuple[float, int], ...] = ()
    """(time, recommendation) within the stabilisation window."""
    correction: float = 1.0
    last_backlog_at: float | None = None
    """Last time requests queued beyond a second of arrivals: latency measured within
    ``settle_s`` of it still carries that backlog's waits (a lagging signal)."""
    first_seen_at: float | None = None
    """When this planner first saw the pool: no scale-down before a whole stabilisation window
    of its own observations (a new leader drains nothing on its first look)."""


@dataclass(frozen=True, slots=True)
class PlannerState:
    predictors: Mapping[str, LoadPredictor] = field(default_factory=dict)
    pools: Mapping[tuple[str, PoolRole], PoolMemory] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class PlanResult:
    decisions: tuple[PoolDecision, ...]
    state: PlannerState
    forecasts: Mapping[str, float] = field(default_factory=dict)
    """Rate each deployment was sized for (rps)."""

    def for_deployment(self, name: str) -> tuple[PoolDecision, ...]:
        return tuple(d for d in self.decisions if d.deployment == name)

    def desired(self, name: str, role: PoolRole) -> int:
        for d in self.decisions:
            if d.deployment == name and d.role is role:
                return d.desired
        raise KeyError((name, role))


# --- sizing: profiles -> replicas -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Sizing:
    replicas: int
    predicted_ms: float
    """Predicted p95 latency at ``replicas`` (before correction); inf: overloaded."""
    bound: str
    """What limited a replica: "itl", "ttft", "kv", "seqs", "min"."""


def targets(classes: Sequence[SlaClass], obs: LoadObservation | None) -> tuple[float | None, ...]:
    """(TTFT target ms, ITL target ms): the tightest of the classes with traffic (all if none
    is measured). A class with no target (batch) binds nothing."""
    seen = {c.sla_class for c in obs.classes if c.arrival_rps > 0} if obs else set()
    active = [c for c in classes if c.name in seen] or list(classes)
    ttft = [c.ttft_p95_ms for c in active if c.ttft_p95_ms is not None]
    itl = [c.itl_p95_ms for c in active if c.itl_p95_ms is not None]
    return (min(ttft) if ttft else None, min(itl) if itl else None)


def decode_itl_p95_ms(
    timing: TimingModel,
    rate: float,
    replicas: int,
    isl: float,
    osl: float,
    kv_tokens: int,
    max_num_seqs: int,
    extra_step_ms: float = 0.0,
) -> tuple[float, float]:
    """(predicted ITL p95 ms, p95 batch per replica) for ``replicas`` decode replicas at ``rate``
    rps; ``inf`` when the batch does not fit (KV, max_num_seqs) or the fixed point diverges."""
    if rate <= 0 or osl <= 0:
        return (timing.decode_step_ms(1, int(isl)) if rate > 0 else 0.0), 0.0
    if replicas <= 0:
        return math.inf, math.inf
    ctx = isl + osl / 2
    per = rate / replicas
    batch = 1.0
    for _ in range(200):
        step = timing.decode_step_ms(max(1, round(batch)), int(batch * ctx)) + extra_step_ms
        nxt = per * osl * step / 1e3
        if nxt > max_num_seqs * 4:
            return math.inf, math.inf
        if abs(nxt - batch) < 1e-3:
            batch = nxt
            break
        batch = nxt
    b95 = batch + Z95 * math.sqrt(max(batch, 0.0))
    if b95 > max_num_seqs or b95 * (isl + osl) > kv_tokens:
        return math.inf, b95
    b = max(1, math.ceil(b95))
    return timing.decode_step_ms(b, int(b * ctx)) + extra_step_ms, b95


def erlang_c(servers: int, load: float) -> float:
    """Probability an arrival waits in an M/M/c queue (``load`` = lambda / mu, < servers)."""
    if load <= 0:
        return 0.0
    if load >= servers:
        return 1.0
    term, total = 1.0, 1.0
    for k in range(1, servers):
        term *= load / k
        total += term
    last = term * load / servers
    tail = last / (1 - load / servers)
    return tail / (total + tail)


def prefill_wait_p95_ms(rate: float, service_ms: float, servers: int, cs2: float) -> float:
    """p95 wait in an M/G/c queue: M/M/c tail, Allen-Cunneen ``(1 + cs2) / 2``; inf at rho >= 1."""
    if rate <= 0 or service_ms <= 0:
        return 0.0
    lam = rate / 1e3  # per ms
    mu = 1 / service_ms
    load = lam / mu
    if load >= servers:
        return math.inf
    c = erlang_c(servers, load)
    if c <= 0.05:
        return 0.0
    return math.log(c / 0.05) / (servers * mu - lam) * (1 + cs2) / 2


def prefill_service_ms(timing: TimingModel, isl: float, hit_rate: float) -> float:
    cached = int(isl * min(max(hit_rate, 0.0), 1.0))
    new = max(1, int(isl) - cached)
    return timing.prefill_ms(new, cached)


def size_decode(
    timing: TimingModel,
    rate: float,
    obs: LoadObservation,
    itl_target_ms: float,
    kv_tokens: int,
    max_num_seqs: int,
    correction: float = 1.0,
    extra_step_ms: float = 0.0,
    limit: int = _MAX_REPLICAS_SEARCH,
) -> Sizing:
    """Fewest decode replicas whose ITL p95 x ``correction`` <= ``itl_target_ms``."""
    isl, osl = obs.input_tokens.mean, obs.output_tokens.mean
    if rate <= 0:
        return Sizing(0, 0.0, "min")
    last = math.inf
    for n in range(1, limit + 1):
        itl, _b95 = decode_itl_p95_ms(
            timing, rate, n, isl, osl, kv_tokens, max_num_seqs, extra_step_ms
        )
        last = itl
        if itl * correction <= itl_target_ms:
            bound = "itl"
            if n > 1:
                prev, pb = decode_itl_p95_ms(
                    timing, rate, n - 1, isl, osl, kv_tokens, max_num_seqs, extra_step_ms
                )
                if math.isinf(prev) and not math.isinf(pb):
                    bound = "seqs" if pb > max_num_seqs else "kv"
            return Sizing(n, itl, bound)
    return Sizing(limit, last, "itl")


def prefill_ttft_p95_ms(
    timing: TimingModel, rate: float, servers: int, obs: LoadObservation, extra_ms: float
) -> float:
    isl = obs.input_tokens
    service = prefill_service_ms(timing, isl.mean, obs.prefix_hit_rate)
    own = prefill_service_ms(timing, isl.p95_or_estimate, obs.prefix_hit_rate)
    wait = prefill_wait_p95_ms(rate, service, servers, isl.scv)
    return wait + own + extra_ms


def size_prefill(
    timing: TimingModel,
    rate: float,
    obs: LoadObservation,
    ttft_target_ms: float,
    extra_ms: float,
    correction: float = 1.0,
    limit: int = _MAX_REPLICAS_SEARCH,
) -> Sizing:
    """Fewest prefill replicas whose TTFT p95 x ``correction`` <= ``ttft_target_ms`` (M/G/c)."""
    if rate <= 0:
        return Sizing(0, 0.0, "min")
    last = math.inf
    for n in range(1, limit + 1):
        ttft = prefill_ttft_p95_ms(timing, rate, n, obs, extra_ms)
        last = ttft
        if ttft * correction <= ttft_target_ms:
            return Sizing(n, ttft, "ttft")
    return Sizing(limit, last, "ttft")


def ttft_extra_ms(timing: TimingModel, obs: LoadObservation, *, remote: bool) -> float:
    """What a TTFT adds to the prefill itself: the KV hand-off (remote) and one decode step."""
    isl = obs.input_tokens.p95_or_estimate
    extra = timing.decode_step_ms(1, int(isl))
    if remote:
        extra += timing.kv_transfer_ms(int(isl * timing.kv_bytes_per_token))
    return extra


# --- the plan ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Want:
    """One pool's wish before the budget: count, the numbers behind it, and why."""

    pool: PoolInput
    desired: int
    reason: str
    kind: str = ""
    predicted_ms: float | None = None
    observed_ms: float | None = None
    target_ms: float | None = None
    memory: PoolMemory = PoolMemory()


def plan(
    deployments: Sequence[DeploymentInput],
    state: PlannerState,
    now: float,
    config: PlannerConfig | None = None,
    *,
    predictor_factory: type[HoltPredictor] | None = None,
) -> PlanResult:
    """One planning round over every deployment; see the module docstring."""
    cfg = config or PlannerConfig()
    make = predictor_factory or HoltPredictor
    predictors: dict[str, LoadPredictor] = dict(state.predictors)
    memories: dict[tuple[str, PoolRole], PoolMemory] = dict(state.pools)
    wants: dict[str, list[_Want]] = {}
    forecasts: dict[str, float] = {}
    for dep in deployments:
        obs = dep.observation
        if obs is not None:
            predictors[dep.name] = predictors.get(dep.name, make()).update(now, obs.arrival_rps)
        pred = predictors.get(dep.name)
        ws = _plan_deployment(dep, pred, memories, now, cfg)
        wants[dep.name] = ws
        if pred is not None:
            forecasts[dep.name] = _up_rate(pred, obs, cfg)
    for name in [n for n in predictors if n not in wants]:
        del predictors[name]
    granted = allocate(deployments, wants, cfg.gpu_budget)
    decisions: list[PoolDecision] = []
    for dep in deployments:
        for w in wants[dep.name]:
            key = (dep.name, w.pool.role)
            final, why = granted[key]
            reason = w.reason if not why else f"{w.reason}; {why}"
            if not w.pool.autoscaling:
                final_applied = w.pool.replicas
                reason = f"advisory (autoscaling off): would set {final}; {reason}"
                decisions.append(_decision(dep.name, w, final_applied, reason, applied=False))
                memories[key] = w.memory
                continue
            mem = w.memory
            if final > w.pool.replicas:
                mem = replace(mem, last_up_at=now, last_change_at=now)
            elif final < w.pool.replicas:
                mem = replace(mem, last_change_at=now)
            memories[key] = mem
            decisions.append(_decision(dep.name, w, final, reason, applied=True))
    live = {(d.name, p.role) for d in deployments for p in d.pools}
    for key in [k for k in memories if k not in live]:
        del memories[key]
    return PlanResult(
        tuple(decisions),
        PlannerState(MappingProxyType(predictors), MappingProxyType(memories)),
        MappingProxyType(forecasts),
    )


def _decision(name: str, w: _Want, desired: int, reason: str, *, applied: bool) -> PoolDecision:
    return PoolDecision(
        deployment=name,
        role=w.pool.role,
        current=w.pool.replicas,
        desired=desired,
        reason=reason,
        kind=w.kind,
        predicted_ms=w.predicted_ms,
        observed_ms=w.observed_ms,
        target_ms=w.target_ms,
        applied=applied,
    )


def _backlog_rps(pred: LoadPredictor, obs: LoadObservation | None, cfg: PlannerConfig) -> float:
    """The extra rate that drains the queue in ``backlog_drain_s``, at most the level itself
    (a backlog is transient: it must not buy a fleet twice the load's size)."""
    if obs is None:
        return 0.0
    return min(obs.queued_requests / cfg.backlog_drain_s, pred.level)


def _up_rate(pred: LoadPredictor, obs: LoadObservation | None, cfg: PlannerConfig) -> float:
    return max(pred.level, pred.forecast(cfg.lead_time_s)) + _backlog_rps(pred, obs, cfg)


def _observed(obs: LoadObservation | None, kind: str) -> tuple[float | None, float]:
    """Worst measured p95 of ``kind`` ("ttft" | "itl") over classes with traffic, and its rps."""
    if obs is None:
        return None, 0.0
    worst: float | None = None
    for c in obs.classes:
        v = c.ttft_p95_ms if kind == "ttft" else c.itl_p95_ms
        if v is not None and c.arrival_rps > 0 and (worst is None or v > worst):
            worst = v
    return worst, obs.arrival_rps


def _class_worst_ratio(
    obs: LoadObservation | None, classes: Sequence[SlaClass], kind: str
) -> tuple[float, float | None, float | None]:
    """Largest measured/target ratio over classes with traffic: (ratio, observed, target).
    Unlabelled measurements ("" class) are held against the tightest target."""
    if obs is None:
        return 0.0, None, None
    by_name = {c.name: c for c in classes}
    tight_ttft, tight_itl = targets(classes, obs)
    best: tuple[float, float | None, float | None] = (0.0, None, None)
    for c in obs.classes:
        if c.arrival_rps <= 0:
            continue
        cls = by_name.get(c.sla_class)
        if kind == "ttft":
            v, t = c.ttft_p95_ms, (cls.ttft_p95_ms if cls else tight_ttft)
        else:
            v, t = c.itl_p95_ms, (cls.itl_p95_ms if cls else tight_itl)
        if v is None or t is None:
            continue
        if v / t > best[0]:
            best = (v / t, v, t)
    return best


def _seen(mem: PoolMemory | None, now: float) -> PoolMemory:
    """The pool's memory, marked as first seen ``now`` when this is the first look."""
    mem = mem or PoolMemory()
    return mem if mem.first_seen_at is not None else replace(mem, first_seen_at=now)


def _clamp(n: int, pool: PoolInput) -> int:
    return max(pool.min_replicas, min(pool.max_replicas, n))


def _plan_deployment(
    dep: DeploymentInput,
    pred: LoadPredictor | None,
    memories: dict[tuple[str, PoolRole], PoolMemory],
    now: float,
    cfg: PlannerConfig,
) -> list[_Want]:
    obs = dep.observation
    out: list[_Want] = []
    prefill, decode = dep.pool(PoolRole.PREFILL), dep.pool(PoolRole.DECODE)
    agg = dep.pool(PoolRole.AGGREGATED)
    modelled = {p.role for p in (prefill, decode, agg) if p is not None}
    for p in dep.pools:
        if p.role not in modelled:
            out.append(
                _Want(p, p.replicas, f"{p.role.value} pool is not modelled: keeps {p.replicas}")
            )
    if obs is None or pred is None:
        for p in dep.pools:
            if p.role in modelled:
                out.append(
                    _Want(
                        p,
                        _clamp(p.replicas, p),
                        "no load measured yet: hold",
                        memory=_seen(memories.get((dep.name, p.role)), now),
                    )
                )
        return out
    ttft_t, itl_t = targets(dep.sla_classes, obs)
    up_rate = _up_rate(pred, obs, cfg)
    down_rate = pred.level * (1 + cfg.down_margin) + _backlog_rps(pred, obs, cfg)
    trend = f" (trend {pred.forecast(60.0) - pred.level:+.1f} rps/min)" if pred.level else ""

    def sized(role: PoolRole, rate: float, corr: float, servers: int | None = None) -> Sizing:
        if role is PoolRole.DECODE:
            if itl_t is None:
                return Sizing(1 if rate > 0 else 0, 0.0, "min")
            return size_decode(
                dep.timing,
                rate,
                obs,
                itl_t * cfg.itl_headroom,
                dep.kv_capacity_tokens,
                dep.max_num_seqs,
                corr,
            )
        if role is PoolRole.PREFILL:
            if ttft_t is None:
                return Sizing(1 if rate > 0 else 0, 0.0, "min")
            extra = ttft_extra_ms(dep.timing, obs, remote=True)
            return size_prefill(dep.timing, rate, obs, ttft_t * cfg.ttft_headroom, extra, corr)
        return size_aggregated(dep, rate, obs, ttft_t, itl_t, cfg, corr)

    candidates: list[tuple[PoolInput | None, str, float | None]] = [
        (prefill, "ttft", ttft_t),
        (decode, "itl", itl_t),
        (agg, "itl+ttft", itl_t if itl_t is not None else ttft_t),
    ]
    for maybe, kind, target in candidates:
        if maybe is None:
            continue
        p = maybe
        key = (dep.name, p.role)
        mem = _seen(memories.get(key), now)
        # learn observed / predicted at what runs now
        ratio, obs_v, obs_t = _class_worst_ratio(
            obs, dep.sla_classes, "ttft" if p.role is PoolRole.PREFILL else "itl"
        )
        pred_now = _predict_at(dep, p, obs, max(p.ready, 1), ttft_t, itl_t, cfg)
        if obs.queued_requests > max(1.0, obs.arrival_rps):
            mem = replace(mem, last_backlog_at=now)
        changed = mem.last_change_at is not None and now - mem.last_change_at < cfg.settle_s
        backlog = mem.last_backlog_at is not None and now - mem.last_backlog_at < cfg.settle_s
        steady = p.ready >= p.replicas and not changed and not backlog
        if (
            steady
            and obs_v is not None
            and pred_now
            and math.isfinite(pred_now)
            and (obs.arrival_rps >= cfg.min_samples_rps)
        ):
            lo, hi = cfg.correction_bounds
            r = min(hi, max(lo, obs_v / pred_now))
            mem = replace(
                mem,
                correction=(1 - cfg.correction_alpha) * mem.correction + cfg.correction_alpha * r,
            )
        up = sized(p.role, up_rate, mem.correction)
        down = sized(p.role, down_rate, mem.correction)
        current = p.replicas
        pred_ms = up.predicted_ms * mem.correction if math.isfinite(up.predicted_ms) else None
        want_up = _clamp(up.replicas, p)
        # measured guard: a miss now grows the pool even if the model disagrees
        guard = 0
        if ratio > 1.0 and obs_t is not None and obs_v is not None and steady:
            guard = max(1, math.ceil(max(p.ready, 1) * (ratio - 1)))
            guard = min(guard, max(1, current))  # at most double per decision
        if guard and want_up < current + guard and p.ready >= current:
            want_up = _clamp(current + guard, p)
        label = {PoolRole.PREFILL: "prefill", PoolRole.DECODE: "decode"}.get(p.role, p.role.value)
        metric = {"ttft": "TTFT", "itl": "ITL", "itl+ttft": "ITL"}[kind]
        rec_down = _clamp(down.replicas, p)
        recent = tuple((t, n) for t, n in mem.recent if now - t < cfg.down_stabilization_s)
        recent = (*recent, (now, max(rec_down, want_up)))
        mem = replace(mem, recent=recent)
        stable_down = max(n for _, n in recent)
        model_txt = (
            f"{metric} p95 {pred_ms:.0f} ms (model) vs {target:.0f} ms target"
            if pred_ms is not None and target is not None
            else "overloaded at any count"
            if target is not None
            else "no latency target"
        )
        if want_up > current:
            since_up = None if mem.last_up_at is None else now - mem.last_up_at
            if since_up is not None and since_up < cfg.up_cooldown_s:
                out.append(
                    _Want(
                        p,
                        current,
                        f"{label} wants {want_up}, up-cooldown "
                        f"{cfg.up_cooldown_s - since_up:.0f}s left: hold",
                        kind,
                        pred_ms,
                        obs_v,
                        target,
                        mem,
                    )
                )
                continue
            delta = want_up - current
            if guard and obs_v is not None and obs_t is not None and up.replicas <= current:
                why = (
                    f"{label} {metric} p95 {obs_v:.0f} ms > {obs_t:.0f} ms target at "
                    f"{obs.arrival_rps:.1f} rps → +{delta} {label}"
                )
            elif obs_v is not None and obs_t is not None and obs_v > obs_t:
                why = (
                    f"{label} {metric} p95 {obs_v:.0f} ms > {obs_t:.0f} ms target at "
                    f"{obs.arrival_rps:.1f} rps; sized for {up_rate:.1f} rps{trend}: "
                    f"{want_up} give {model_txt} → +{delta} {label}"
                )
            else:
                why = (
                    f"load {obs.arrival_rps:.1f} rps, sized for {up_rate:.1f} rps{trend}: "
                    f"{want_up} {label} give {model_txt} [{up.bound}-bound] → +{delta} "
                    f"{label}"
                )
            out.append(_Want(p, want_up, why, kind, pred_ms, obs_v, target, mem))
            continue
        want_down = min(stable_down, current)
        if want_down < current:
            hold = None
            since = None if mem.last_change_at is None else now - mem.last_change_at
            seen = now - (mem.first_seen_at if mem.first_seen_at is not None else now)
            if p.ready < current:
                hold = f"{p.ready}/{current} ready: no scale-down while replicas start"
            elif seen < cfg.down_stabilization_s:
                hold = f"observed for {seen:.0f}s < {cfg.down_stabilization_s:.0f}s window"
            elif since is not None and since < cfg.down_cooldown_s:
                hold = f"down-cooldown {cfg.down_cooldown_s - since:.0f}s left"
            elif ratio > 0.9:
                hold = f"measured {metric} at {ratio:.0%} of target"
            if hold:
                out.append(
                    _Want(
                        p,
                        current,
                        f"{label} could drop to {want_down} at "
                        f"{obs.arrival_rps:.1f} rps; {hold}: hold",
                        kind,
                        pred_ms,
                        obs_v,
                        target,
                        mem,
                    )
                )
                continue
            new = max(want_down, current - cfg.max_down_step)
            why = (
                f"load {obs.arrival_rps:.1f} rps (+{cfg.down_margin:.0%} margin) for "
                f"{cfg.down_stabilization_s:.0f}s: {stable_down} {label} give {model_txt} "
                f"→ -{current - new} {label} (drain)"
            )
            out.append(_Want(p, new, why, kind, pred_ms, obs_v, target, mem))
            continue
        out.append(
            _Want(
                p,
                _clamp(current, p),
                f"{label} {current} fit {obs.arrival_rps:.1f} rps: {model_txt}: hold",
                kind,
                pred_ms,
                obs_v,
                target,
                mem,
            )
        )
    return out


def _predict_at(
    dep: DeploymentInput,
    p: PoolInput,
    obs: LoadObservation,
    n: int,
    ttft_t: float | None,
    itl_t: float | None,
    cfg: PlannerConfig,
) -> float | None:
    """The model's p95 (ms) at ``n`` replicas, at the measured rate (for the correction)."""
    rate = obs.arrival_rps
    if rate < cfg.min_samples_rps:
        return None
    isl, osl = obs.input_tokens.mean, obs.output_tokens.mean
    if p.role is PoolRole.PREFILL:
        return prefill_ttft_p95_ms(
            dep.timing, rate, n, obs, ttft_extra_ms(dep.timing, obs, remote=True)
        )
    if p.role is PoolRole.DECODE:
        return decode_itl_p95_ms(
            dep.timing, rate, n, isl, osl, dep.kv_capacity_tokens, dep.max_num_seqs
        )[0]
    return decode_itl_p95_ms(
        dep.timing,
        rate,
        n,
        isl,
        osl,
        dep.kv_capacity_tokens,
        dep.max_num_seqs,
        _interference_ms(dep, rate / n, obs),
    )[0]


def _interference_ms(dep: DeploymentInput, per_replica_rps: float, obs: LoadObservation) -> float:
    """Prefill compute an aggregated replica's decode steps absorb on average, per step."""
    service = prefill_service_ms(dep.timing, obs.input_tokens.mean, obs.prefix_hit_rate)
    busy = min(0.9, per_replica_rps * service / 1e3)  # fraction of time spent prefilling
    return (
        busy / (1 - busy) * dep.timing.decode_step_ms(1, int(obs.input_tokens.mean))
        if busy
        else 0.0
    )


def size_aggregated(
    dep: DeploymentInput,
    rate: float,
    obs: LoadObservation,
    ttft_t: float | None,
    itl_t: float | None,
    cfg: PlannerConfig,
    correction: float = 1.0,
) -> Sizing:
    """Aggregated replicas: prefill compute rides in the decode steps (interference), and the
    TTFT is an M/G/c wait over the replicas' prefill share."""
    if rate <= 0:
        return Sizing(0, 0.0, "min")
    extra = ttft_extra_ms(dep.timing, obs, remote=False)
    last = math.inf
    for n in range(1, _MAX_REPLICAS_SEARCH + 1):
        inter = _interference_ms(dep, rate / n, obs)
        itl = 0.0
        if itl_t is not None:
            itl, _ = decode_itl_p95_ms(
                dep.timing,
                rate,
                n,
                obs.input_tokens.mean,
                obs.output_tokens.mean,
                dep.kv_capacity_tokens,
                dep.max_num_seqs,
                inter,
            )
        ttft = prefill_ttft_p95_ms(dep.timing, rate, n, obs, extra) if ttft_t else 0.0
        last = itl if itl_t is not None else ttft
        ok_itl = itl_t is None or itl * correction <= itl_t * cfg.itl_headroom
        ok_ttft = ttft_t is None or ttft * correction <= ttft_t * cfg.ttft_headroom
        if ok_itl and ok_ttft:
            return Sizing(n, last, "itl" if itl_t is not None else "ttft")
    return Sizing(_MAX_REPLICAS_SEARCH, last, "itl")


# --- the GPU budget ---------------------------------------------------------------------------


def allocate(
    deployments: Sequence[DeploymentInput],
    wants: Mapping[str, Sequence[_Want]],
    budget: int | None,
) -> dict[tuple[str, PoolRole], tuple[int, str]]:
    """Final count per pool and why it differs from the wish ("" when it does not)."""
    out: dict[tuple[str, PoolRole], tuple[int, str]] = {}
    if budget is None:
        for dep in deployments:
            for w in wants[dep.name]:
                out[(dep.name, w.pool.role)] = (w.desired, "")
        return out
    gpus = {d.name: max(d.gpus_per_replica, 0) for d in deployments}
    left = budget
    # fixed pools and every autoscaled pool's minimum come first
    for dep in deployments:
        for w in wants[dep.name]:
            base = w.pool.min_replicas if w.pool.autoscaling else w.pool.replicas
            left -= base * gpus[dep.name]
    order = sorted(deployments, key=lambda d: (-d.priority, d.name))
    holders: list[str] = []
    for dep in order:
        g = gpus[dep.name]
        scaled = [w for w in wants[dep.name] if w.pool.autoscaling]
        for w in wants[dep.name]:
            if not w.pool.autoscaling:
                out[(dep.name, w.pool.role)] = (w.desired, "")
        extra = {w.pool.role: max(0, w.desired - w.pool.min_replicas) for w in scaled}
        need = sum(extra.values()) * g
        if g == 0 or need <= left:
            left -= need
            for w in scaled:
                out[(dep.name, w.pool.role)] = (w.desired, "")
            if need:
                holders.append(f"{dep.name} (priority {dep.priority}) {need}")
            continue
        # proportional share of the increments above min, in the wanted ratio
        slots = max(0, left // g)
        total = sum(extra.values())
        share = {r: (e * slots) // total if total else 0 for r, e in extra.items()}
        rem = slots - sum(share.values())
        for r in sorted(
            extra, key=lambda r: -(extra[r] * slots / total - share[r]) if total else 0
        ):
            if rem <= 0:
                break
            if share[r] < extra[r]:
                share[r] += 1
                rem -= 1
        left -= sum(share.values()) * g
        by = "; ".join(holders) if holders else "fixed pools and minimums"
        for w in scaled:
            got = w.pool.min_replicas + share[w.pool.role]
            why = (
                f"capped by the GPU budget {budget}: wanted {w.desired}, got {got} "
                f"(GPUs held first by {by})"
            )
            out[(dep.name, w.pool.role)] = (got, why if got != w.desired else "")
        holders.append(f"{dep.name} (priority {dep.priority}) {sum(share.values()) * g}")
    return out


def sizing_for_rate(
    dep: DeploymentInput, rate: float, config: PlannerConfig | None = None
) -> dict[PoolRole, int]:
    """Replicas per modelled pool for a steady ``rate`` (no hysteresis, no clamping): what a
    static fleet sized for that load would run. Needs ``dep.observation`` for the lengths."""
    cfg = config or PlannerConfig()
    obs = dep.observation
    if obs is None:
        raise InvalidArgument(f"deployment {dep.name}: sizing needs an observation")
    ttft_t, itl_t = targets(dep.sla_classes, obs)
    out: dict[PoolRole, int] = {}
    if dep.pool(PoolRole.DECODE) is not None and itl_t is not None:
        out[PoolRole.DECODE] = size_decode(
            dep.timing,
            rate,
            obs,
            itl_t * cfg.itl_headroom,
            dep.kv_capacity_tokens,
            dep.max_num_seqs,
        ).replicas
    if dep.pool(PoolRole.PREFILL) is not None and ttft_t is not None:
        out[PoolRole.PREFILL] = size_prefill(
            dep.timing,
            rate,
            obs,
            ttft_t * cfg.ttft_headroom,
            ttft_extra_ms(dep.timing, obs, remote=True),
        ).replicas
    if dep.pool(PoolRole.AGGREGATED) is not None:
        out[PoolRole.AGGREGATED] = size_aggregated(dep, rate, obs, ttft_t, itl_t, cfg).replicas
    return out
