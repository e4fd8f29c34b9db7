"""The request router's data and plugin contracts.

A routing run takes one ``RouteRequest`` and a snapshot of the model's workers
(``WorkerState``) and runs a ``RoutingProfile`` once per *stage*: first the decode stage
(where the tokens will stream from), then, when a remote prefill is worth it, the prefill
stage. In each stage the workers go through the profile's ``Filter`` s (each can say *why* it
dropped a worker), the survivors become ``Candidate`` s carrying the predictions every scorer
reads (cached prefix, predicted TTFT and ITL, from the worker's ``TimingModel``), each
``Scorer`` rates them in [0, 1] (the latency scorers go below 0, to -1, for a predicted
target miss), the weighted mean is the candidate's score, and the ``Picker``
chooses (ties broken by an injected ``random.Random``). ``router.py`` runs the pipeline;
``plugins.py`` holds the stock plugins; ``predict.py`` the timing arithmetic; ``index.py`` the
prefix index.

Plugins are small, pure and synchronous: no I/O, no clock, no global random. They must not
mutate what they are shown.
"""

from __future__ import annotations

import enum
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Protocol

from controlplane.core.sla import SlaClass
from controlplane.errors import InvalidArgument

PREFILL = "prefill"
DECODE = "decode"
BOTH = "both"
"""Worker roles, as the gateway's ``WorkerSnapshot.role`` spells them."""


_NO_TIMES: Mapping[str, float] = MappingProxyType({})


class Stage(enum.StrEnum):
    """Which half of a request a routing pass chooses a worker for."""

    DECODE = "decode"
    """The worker that streams the tokens (and prefills too, when the prefill stays local)."""
    PREFILL = "prefill"
    """A remote prefill worker, whose KV cache then moves to the decode worker."""


class TimingModel(Protocol):
    """What a worker's requests cost, in ms. ``workers.profiles.SimProfile`` is one.

    ``prefill_ms``: a prefill-only pass over ``new_tokens`` after ``cached_tokens`` of context;
    ``prefill_compute_ms``: the same without the per-pass overhead (what a prefill chunk adds to
    a decode step it rides in); ``decode_step_ms``: one step of ``batch`` sequences holding
    ``context_tokens`` in all; ``kv_transfer_ms``: moving that many bytes of KV cache between
    workers; ``kv_bytes_per_token``: KV bytes per token of the whole model.
    """

    @property
    def kv_bytes_per_token(self) -> int: ...

    def prefill_ms(self, new_tokens: int, cached_tokens: int = 0) -> float: ...

    def prefill_compute_ms(self, new_tokens: int, cached_tokens: int) -> float: ...

    def decode_step_ms(self, batch: int, context_tokens: int) -> float: ...

    def kv_transfer_ms(self, num_bytes: int) -> float: ...


@dataclass(frozen=True, slots=True)
class ScaledTiming:
    """``base`` run ``speedup`` times faster: every duration divided by it (a sim deployment's
    ``speedup`` engine arg; its workers really run that much faster or slower)."""

    base: TimingModel
    speedup: float

    @property
    def kv_bytes_per_token(self) -> int:
        return self.base.kv_bytes_per_token

    def prefill_ms(self, new_tokens: int, cached_tokens: int = 0) -> float:
        return self.base.prefill_ms(new_tokens, cached_tokens) / self.speedup

    def prefill_compute_ms(self, new_tokens: int, cached_tokens: int) -> float:
        return self.base.prefill_compute_ms(new_tokens, cached_tokens) / self.speedup

    def decode_step_ms(self, batch: int, context_tokens: int) -> float:
        return self.base.decode_step_ms(batch, context_tokens) / self.speedup

    def kv_transfer_ms(self, num_bytes: int) -> float:
        return self.base.kv_transfer_ms(num_bytes) / self.speedup


@dataclass(frozen=True, slots=True, kw_only=True)
class DeploymentFacts:
    """What the router knows about the deployment a request's model runs as (the same for
    every request of the model; the gateway builds it once per deployment version)."""

    name: str = ""
    """The deployment's name ("" unknown): which routing profile applies."""
    long_context_threshold_tokens: int = 0
    """Prompts of at least this many tokens are long-context requests; 0: none."""
    dp_size: int = 1
    """Data-parallel attention ranks per worker (MoE); each rank has its own decode batch."""
    expert_parallel: bool = False
    """An MoE deployment with experts spread over GPUs (expert parallel / DP attention)."""
    efficient_batch_size: int = 0
    """Decode batch per rank where the timing model's per-token cost levels off
    (``predict.efficient_batch_size``); 0: no packing."""

    def __post_init__(self) -> None:
        if self.dp_size < 1 or self.long_context_threshold_tokens < 0:
            raise InvalidArgument("dp_size must be >= 1 and the threshold >= 0")
        if self.efficient_batch_size < 0:
            raise InvalidArgument("efficient_batch_size must be >= 0")

    @property
    def moe(self) -> bool:
        """Routed with the MoE rules (per-rank balance, batch packing)."""
        return self.expert_parallel or self.dp_size > 1


NO_DEPLOYMENT = DeploymentFacts()


@dataclass(frozen=True, slots=True, kw_only=True)
class RouteRequest:
    """One request to route: what it asks for and what it was promised."""

    model: str
    prompt_tokens: int
    max_tokens: int
    """Most tokens it may generate (its KV grows by this much on the decode worker)."""
    block_hashes: tuple[int, ...] = ()
    """Chained hashes of the prompt's full blocks (``hash_blocks``), for prefix matching."""
    block_size: int
    """Tokens per KV block, the size ``block_hashes`` and the workers' KV counts use."""
    ttft_target_ms: float | None = None
    """The SLA class's TTFT target (p95); None: no latency target (batch)."""
    itl_target_ms: float | None = None
    """The SLA class's inter-token latency target (p95); None: none."""
    sla_class: str = ""
    tenant: str = ""
    deployment: DeploymentFacts = NO_DEPLOYMENT
    """Facts of the model's deployment (long-context threshold, MoE layout)."""

    def __post_init__(self) -> None:
        if self.prompt_tokens < 0 or self.max_tokens < 0:
            raise InvalidArgument("prompt_tokens and max_tokens must be >= 0")
        if self.block_size < 1:
            raise InvalidArgument(f"block_size must be >= 1, got {self.block_size}")
        if len(self.block_hashes) * self.block_size > self.prompt_tokens:
            raise InvalidArgument(
                f"{len(self.block_hashes)} blocks of {self.block_size} tokens "
                f"> prompt of {self.prompt_tokens} tokens"
            )

    @classmethod
    def for_class(
        cls,
        sla: SlaClass,
        *,
        model: str,
        prompt_tokens: int,
        max_tokens: int,
        block_size: int,
        block_hashes: tuple[int, ...] = (),
        tenant: str = "",
        deployment: DeploymentFacts = NO_DEPLOYMENT,
    ) -> RouteRequest:
        """A request of SLA class ``sla``: its TTFT and ITL targets come from the class."""
        return cls(
            model=model,
            prompt_tokens=prompt_tokens,
            max_tokens=max_tokens,
            block_hashes=block_hashes,
            block_size=block_size,
            ttft_target_ms=sla.ttft_p95_ms,
            itl_target_ms=sla.itl_p95_ms,
            sla_class=sla.name,
            tenant=tenant,
            deployment=deployment,
        )

    @property
    def total_tokens(self) -> int:
        """The most context the request can reach: prompt + every token it may generate."""
        return self.prompt_tokens + self.max_tokens


@dataclass(frozen=True, slots=True)
class DecodeProgress:
    """One request this router has decoding on a worker, as its ITL budget needs it."""

    itl_target_ms: float
    """Its class's ITL target, judged on its mean inter-token time (TPOT)."""
    tokens: int
    """Output tokens it has so far (0: its first token is not back yet)."""
    max_tokens: int
    """The most it may produce (the request's ``max_tokens``)."""
    elapsed_ms: float = 0.0
    """Since its first token (0 before it)."""
    expected_tokens: float = 0.0
    """How many output tokens requests like it (its model and class) have produced on
    average lately; 0: not known."""


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkerState:
    """One worker as the router sees it: its record, its last load report, this router's own
    in-flight count and circuit state, and its timing model. Built by the shell (the gateway's
    ``WorkerSnapshot`` plus the deployment's profile)."""

    worker_id: str
    model: str
    role: str
    """"prefill" | "decode" | "both"."""
    timing: TimingModel
    pool: str = ""
    """The deployment pool the worker belongs to ("long_context", "decode", ...); "" unknown."""
    serving: bool = True
    """False while the worker drains."""
    circuit_allows: bool = True
    running: int = 0
    waiting: int = 0
    inflight_here: int = 0
    """Requests this router has on the worker now (covers the time between two reports)."""
    queued_prefill_tokens: int | None = None
    """Prompt tokens waiting for prefill on the worker; None: unknown (see ``predict``)."""
    pending_prefill_tokens: int = 0
    """Prompt tokens this router sent to the worker whose first token has not come back: a
    floor for its prefill queue that is never stale (reports are up to one interval old)."""
    pending_prefill_prompts: int = 0
    """How many prompts those tokens are (each is its own prefill: attention is per prompt);
    0 with tokens pending: one."""
    batch_size: int = 0
    """Sequences in the worker's decode batch now."""
    context_tokens: int = 0
    """Context tokens those sequences hold in all."""
    kv_blocks_used: int = 0
    kv_blocks_total: int = 0
    """0: the worker reports no KV capacity (the KV filter and scorer then do not judge it)."""
    max_context_tokens: int = 0
    """0: unknown (the context-length filter passes it)."""
    chunked_prefill: bool = False
    """The engine prefills long prompts in chunks between decode steps (so a long prompt does
    not stall its decode batch for the whole prefill)."""
    dp_rank_running: tuple[int, ...] = ()
    """DP attention (MoE): running sequences per rank; empty: unknown or one rank."""
    reported_batch: int = 0
    """The decode batch by the worker's last report alone (``batch_size`` also counts this
    router's in-flight requests)."""
    decoding: tuple[DecodeProgress, ...] = ()
    """This router's requests decoding (or about to) on the worker, for their ITL budgets
    (``predict.itl_budget_ms``); empty: none, or not tracked."""

    @property
    def load(self) -> int:
        return self.running + self.waiting + self.inflight_here

    @property
    def kv_blocks_free(self) -> int:
        return max(0, self.kv_blocks_total - self.kv_blocks_used)


@dataclass(frozen=True, slots=True)
class Candidate:
    """A worker that passed every filter of a stage, with the predictions scorers read."""

    worker: WorkerState
    cached_blocks: int
    """Leading prompt blocks the prefix index says the worker holds."""
    cached_tokens: int
    """Prompt tokens the worker need not prefill (at least one token is always computed)."""
    ttft_ms: float
    """Predicted time to first token if this worker prefills (``predict.ttft_ms``)."""
    itl_ms: float
    """Predicted inter-token latency if this worker decodes (``predict.itl_ms``)."""

    @property
    def worker_id(self) -> str:
        return self.worker.worker_id


@dataclass(frozen=True, slots=True)
class RouteContext:
    """What a stage's plugins may read besides the request and the workers."""

    stage: Stage
    cached_blocks: Mapping[str, int] = field(default_factory=dict)
    """Prefix overlap per worker id (from the prefix index)."""
    exclude: frozenset[str] = frozenset()
    """Workers that already failed this request."""
    tenants: TenantShares | None = None
    """Recent tokens per tenant, overall and per worker (``TenantFairShareScorer``)."""


@dataclass(frozen=True, slots=True)
class TenantShares:
    """Recent (decayed) tokens served per tenant, overall and per worker: what the tenant
    fair-share scorer reads. Built and updated by the shell off the routing call (the gateway's
    ``TenantLedger``); plugins only read it."""

    by_tenant: Mapping[str, float]
    by_worker: Mapping[str, Mapping[str, float]]
    """worker id -> tenant -> tokens."""

    def over_fair_share(self) -> frozenset[str]:
        """Tenants above an equal share of the tokens among the tenants served recently."""
        active = {t: v for t, v in self.by_tenant.items() if v > 0}
        if len(active) < 2:
            return frozenset()
        fair = sum(active.values()) / len(active)
        return frozenset(t for t, v in active.items() if v > fair * (1 + 1e-9))


class Filter(Protocol):
    """Removes workers that cannot serve a request in a stage (with reasons).

    ``filter`` gets the workers still in the running (sorted by id) and returns those that
    pass, in the same order; it sees the whole list, so a filter may depend on the others
    (a long-context pool exists or not). ``reason`` is asked about each worker ``filter``
    dropped: why not, without the worker id ("draining", "needs 90 KV blocks, 12 free").
    """

    name: str

    def filter(
        self, request: RouteRequest, workers: Sequence[WorkerState], ctx: RouteContext
    ) -> Sequence[WorkerState]: ...

    def reason(self, request: RouteRequest, worker: WorkerState, ctx: RouteContext) -> str: ...


class Scorer(Protocol):
    """Rates the candidates of a stage: one value in [0, 1] each (below 0, down to -1, only for
    a predicted SLA miss), higher better, in order."""

    name: str

    def score(
        self, request: RouteRequest, candidates: Sequence[Candidate], ctx: RouteContext
    ) -> Sequence[float]: ...


class Picker(Protocol):
    """Chooses among scored candidates (sorted by worker id); returns an index into them.
    Any randomness (ties, weighted draws) comes from ``rng``."""

    name: str

    def pick(
        self, candidates: Sequence[Candidate], scores: Sequence[float], rng: random.Random
    ) -> int: ...


@dataclass(frozen=True, slots=True)
class WeightedScorer:
    scorer: Scorer
    weight: float


@dataclass(frozen=True, slots=True)
class RoutingProfile:
    """Which plugins run in a stage, with what weights. A candidate's score is the weighted
    mean of its scorers' values, so it stays in [-1, 1] (below 0 only with a predicted
    miss)."""

    name: str
    filters: tuple[Filter, ...]
    scorers: tuple[WeightedScorer, ...]
    picker: Picker
    weights: tuple[float, ...] = field(init=False, repr=False, compare=False)
    """Each scorer's share of the total weight (sums to 1; all 0 when no weight)."""
    scorer_names: tuple[str, ...] = field(init=False, repr=False, compare=False)
    """The scorers' names, in order."""
    weight_map: Mapping[str, float] = field(init=False, repr=False, compare=False)
    """``weights`` by scorer name (read-only: every stage trace of the profile shares it)."""

    def __post_init__(self) -> None:
        if any(ws.weight < 0 for ws in self.scorers):
            raise InvalidArgument(f"routing profile {self.name}: a scorer weight is negative")
        names = tuple(ws.scorer.name for ws in self.scorers)
        if len(set(names)) != len(names):
            raise InvalidArgument(
                f"routing profile {self.name}: scorer names repeat: {list(names)}"
            )
        total = sum(ws.weight for ws in self.scorers)
        weights = tuple(ws.weight / total if total else 0.0 for ws in self.scorers)
        # derived once: the router reads them on every routing pass
        object.__setattr__(self, "weights", weights)
        object.__setattr__(self, "scorer_names", names)
        weight_map = MappingProxyType(dict(zip(names, weights, strict=True)))
        object.__setattr__(self, "weight_map", weight_map)


# --- results and traces ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Rejection:
    """Why one worker cannot serve a stage; ``plugin`` is the filter that said so."""

    worker_id: str
    plugin: str
    reason: str

    def __str__(self) -> str:
        return f"{self.worker_id}: {self.reason}"


@dataclass(frozen=True, slots=True)
class CandidateScore:
    """A candidate's total, each scorer's value (by name) and the predictions behind them."""

    worker_id: str
    total: float
    scores: Mapping[str, float]
    cached_blocks: int
    ttft_ms: float
    itl_ms: float


@dataclass(frozen=True, slots=True)
class StageTrace:
    """Everything behind one stage's choice."""

    stage: Stage
    profile: str
    rejections: tuple[Rejection, ...]
    candidates: tuple[CandidateScore, ...]
    """By worker id."""
    weights: Mapping[str, float]
    """Each scorer's normalised weight."""
    chosen: str | None
    """The picked worker id; None when no candidate passed."""
    plugin_seconds: Mapping[str, float] = field(default_factory=lambda: _NO_TIMES)
    """Seconds spent in each filter / scorer / the picker, when the caller passed a clock to
    the router (the shell's clock: the core reads none itself); empty otherwise."""

    def candidate(self, worker_id: str) -> CandidateScore:
        for c in self.candidates:
            if c.worker_id == worker_id:
                return c
        raise KeyError(worker_id)

    def deciders(self) -> tuple[str, ...]:
        """The scorers that put the chosen worker ahead of the runner-up, largest weighted
        margin first; empty when there was no contest (one candidate, or none)."""
        chosen = self.chosen
        if chosen is None or len(self.candidates) < 2:
            return ()
        best = self.candidate(chosen)
        runner_up: CandidateScore | None = None  # the first of the highest totals
        for c in self.candidates:
            if c.worker_id != chosen and (runner_up is None or c.total > runner_up.total):
                runner_up = c
        if runner_up is None:
            raise ValueError(f"no runner-up to {chosen} among the candidates")
        won, lost = best.scores, runner_up.scores
        ahead = [
            (-margin, name)  # largest margin first, then by name
            for name, weight in self.weights.items()
            if (margin := weight * (won[name] - lost[name])) > 1e-12
        ]
        ahead.sort()
        return tuple(name for _, name in ahead)

    def lines(self) -> list[str]:
        out = [f"{self.stage.value} ({self.profile}): chose {self.chosen or 'nothing'}"]
        out += [f"  rejected {r} [{r.plugin}]" for r in self.rejections]
        for c in self.candidates:
            per = ", ".join(f"{n} {v:.2f}" for n, v in c.scores.items())
            itl = f"itl {c.itl_ms:.1f} ms, " if self.stage is Stage.DECODE else ""
            out.append(
                f"  {c.worker_id}: {c.total:.3f} ({per}; ttft {c.ttft_ms:.1f} ms, {itl}"
                f"{c.cached_blocks} cached blocks)"
            )
        if self.deciders():
            out.append(f"  decided by {', '.join(self.deciders())}")
        return out


@dataclass(frozen=True, slots=True)
class DisaggregationVerdict:
    """Whether the prefill runs on a remote prefill worker, and why (``router``'s rule)."""

    remote: bool
    reason: str
    interference_ms: float = 0.0
    """Prefill compute the local prefill would add to the decode batch's steps."""
    itl_slack_ms: float = 0.0
    """ITL target minus the decode worker's predicted step and its queued prefills' compute:
    room a local prefill may take."""
    transfer_ms: float = 0.0
    """Predicted KV transfer time of the prompt's cache from a prefill worker."""
    local_ttft_miss: bool = False
    """The decode worker's own predicted TTFT misses the request's target (rule (b))."""
    queued_ms: float = 0.0
    """Compute of the prefills already queued on the decode worker (they ride in the same
    steps as a local prefill)."""
    itl_budget_ms: float | None = None
    """The smallest stall any request decoding on the decode worker can absorb and still meet
    its ITL target (``predict.itl_budget_ms``; ``math.inf``: no request there can still be
    saved or broken by one); None: unknown."""
    itl_breaks: int = 0
    """How many of those requests the local prefill (with the queued ones) would push past
    their ITL target."""

    @property
    def breaks_itl_budget(self) -> bool:
        """A local prefill (with the queued ones) would push some decoding request past its
        ITL target."""
        budget = self.itl_budget_ms
        return budget is not None and self.interference_ms + self.queued_ms > budget


@dataclass(frozen=True, slots=True)
class Trace:
    """A routing decision's full story: the decode stage, the local-or-remote verdict, and
    the prefill stage when one ran."""

    decode: StageTrace
    disaggregation: DisaggregationVerdict | None = None
    prefill: StageTrace | None = None

    def plugins(self) -> tuple[str, ...]:
        """Every plugin that rejected a worker or decided a pick, in stage order, once each."""
        names: list[str] = []
        for st in (self.decode, self.prefill):
            if st is not None:
                names += [r.plugin for r in st.rejections]
                names += st.deciders()
        return tuple(dict.fromkeys(names))

    def explain(self) -> str:
        """Lines for an SRE: "why was this routed there"."""
        out = self.decode.lines()
        if self.disaggregation is not None:
            d = self.disaggregation
            where = "remote" if d.remote else "local"
            out.append(f"prefill {where}: {d.reason}")
        if self.prefill is not None:
            out += self.prefill.lines()
        return "\n".join(out)


@dataclass(frozen=True, slots=True)
class Decision:
    """Where the request goes: ``decode`` streams the tokens; ``prefill`` prefills first
    (None: ``decode`` prefills itself)."""

    decode: WorkerState
    prefill: WorkerState | None
    trace: Trace


@dataclass(frozen=True, slots=True)
class Unroutable:
    """No worker can serve the request now; ``reasons`` name each worker's rejection."""

    reasons: tuple[str, ...]
    trace: Trace

    def message(self, model: str) -> str:
        why = "; ".join(self.reasons) if self.reasons else "no workers registered"
        return f"no worker can serve model {model!r} now ({why})"
