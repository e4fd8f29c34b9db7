"""The SLA-aware router: decode worker first, then local or remote prefill. Pure, synchronous.

Theory of operation
-------------------
``SlaAwareRouter.decide(request, workers, rng)`` runs, over a snapshot of the model's workers:

1. **prefix lookup**: the prefix index gives each worker's overlap with the prompt's leading
   blocks (``index.PrefixIndex.overlaps``), once for both stages;
2. **decode stage** (``Stage.DECODE``, the decode profile): filters, then every survivor
   (decode or both) becomes a ``Candidate`` with its predictions as if it also prefilled
   (``predict.ttft_ms``, ``predict.itl_ms``), scorers rate them, the picker chooses ``D``. No
   candidate: ``Unroutable`` with every worker's reason;
3. **conditional disaggregation**: the prefill stays on ``D`` unless a remote prefill is worth
   it (below); if it may be, the **prefill stage** (``Stage.PREFILL``, prefill workers, the
   prefill profile: predicted TTFT incl. the KV transfer, prefix overlap) picks ``P``.

The local-or-remote rule. A local prefill costs the requests ``D`` is decoding: its compute
rides in their steps (``interference_ms``, ``predict``); a remote one costs this request the KV
hand-off (``transfer_ms``). Both come from the workers' timing models, so the cut-over moves
with the model, the hardware, ``D``'s batch and the prefix ``D`` already holds; there is no
prompt-length constant. The prefill is **remote** only when every one of these holds, checked
in order (the first that fails keeps it local, and the trace says which):

a. the caller did not ask for an aggregated route, and the model has a prefill worker (for a
   decode worker of the long-context pool: the pool has one, or the base pool can lend one,
   ``lendable_prefill_workers``: an idle one, while under half of its prefill workers hold
   long prompts);
b. ``D``'s own predicted TTFT (its prefill queue, then this prompt) misses the request's TTFT
   target, or (c)-(e) all hold. A miss overrides (c)-(e), leaving (f) and (g) to decide: a
   sooner prefill worker takes the prompt instead of a queue on ``D``, so a burst spreads
   over the prefill pool too rather than waiting behind the decode workers' local prefills;
c. ``D`` is decoding something (``batch_size > 0``): otherwise a local prefill delays no one;
d. the interference does not fit in the batch's ITL slack. When this router knows every
   request decoding on ``D`` (``WorkerState.decoding``), the slack is their **ITL budgets**
   (``predict.itl_budget_ms``: the smallest stall any of them can take and still meet its
   target on its mean inter-token time; one that misses it anyway does not count), and the
   interference counts the compute of the prefills already queued on ``D`` (an engine packs
   them into the same steps). Otherwise it is one step's slack, ``itl_target - itl_ms(D)``
   less that queued compute (the request's class target; no target, no slack): a prefill that
   fits keeps even a step carrying all of it under the target. Short prompts, and long ones
   mostly cached on ``D``, stop here; a burst of them on one decode worker does not, once its
   queue has used the slack;
e. the interference exceeds the transfer: the hand-off must cost less than what it saves
   (not asked when the budgets are known: they decided (d));
f. some prefill worker passes the prefill stage's filters;
g. the remote prefill would not miss a TTFT target that the local one meets (``P``'s
   predicted TTFT, with the transfer, against ``D``'s local one); after (b) sent it here
   (the local one misses), the remote one must be sooner than the local one. Neither keeps
   it local when the local prefill would break two or more decoding requests' ITL budgets:
   one late first token costs less than several requests' ITL (the late lane may hold it).
   Breaking one is a tie (one miss either way): a local prefill that meets the TTFT target
   then stays local, sparing the prefill pool a late prompt.

With ``llama-3.1-8b-h100`` and the interactive class (ITL 50 ms) beside a batch of 16 at 1k
context, (d) keeps prompts up to about 1.3k uncached tokens local.

**Long context**: with a threshold (the deployment's, ``DeploymentFacts``), a prompt at or
above it goes only to workers of the ``long_context`` pool whenever the pool has a usable
worker; without one, to workers whose engine prefills in chunks, with KV room. Shorter prompts
stay off the pool while other workers can take them (``LongContextFilter`` then
``KvHeadroomFilter``). A pool without prefill workers prefills its long prompts on its decode
workers, one after another, unless the base pool lends an **idle** prefill worker (rule (a)):
then rules (b)-(g) decide as for any prompt, so a long prompt goes there when the pool's own
queue makes the hand-off sooner (or its prefill would break the ITL of the pool's decoding
requests). Only an idle worker is lent, so no interactive prompt waits behind the long one,
and only while fewer than half of the base pool's prefill workers hold long prompts;
interactive prompts that come later route around the lent worker on its predicted TTFT.

**Profiles**: which scorers and weights run in each stage comes from a ``ProfileTable`` per
deployment and SLA class (``profiles.py``; MoE deployments get the MoE default: batch packing
and DP-rank balance).

``decide`` is a pure read. ``route`` is ``decide`` plus the index update: the chosen workers
are assumed to hold the prompt's blocks from now on (``PrefixIndex.record_route``), so the next
request with the same prefix follows before any KV event arrives. Ties between equal scores are
broken by the injected ``rng``, so a seeded ``random.Random`` reproduces every decision.
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Callable, Sequence
from types import MappingProxyType

from controlplane.core.routing import predict
from controlplane.core.routing.framework import (
    PREFILL,
    Candidate,
    CandidateScore,
    Decision,
    DisaggregationVerdict,
    Rejection,
    RouteContext,
    RouteRequest,
    RoutingProfile,
    Stage,
    StageTrace,
    TenantShares,
    Trace,
    Unroutable,
    WorkerState,
)
from controlplane.core.routing.index import PrefixIndex
from controlplane.core.routing.plugins import (
    LONG_CONTEXT_POOL,
    default_decode_profile,
    default_prefill_profile,
)
from controlplane.core.routing.profiles import DEFAULT_TABLE, ProfileTable


class SlaAwareRouter:
    """See the module docstring. Holds the prefix index; everything else comes in per call."""

    def __init__(
        self,
        index: PrefixIndex | None = None,
        *,
        profiles: ProfileTable | None = None,
        decode_profile: RoutingProfile | None = None,
        prefill_profile: RoutingProfile | None = None,
        long_context_threshold_tokens: int | None = None,
    ) -> None:
        """``profiles``: per deployment and SLA class (default ``DEFAULT_TABLE``). Giving
        ``decode_profile`` / ``prefill_profile`` / ``long_context_threshold_tokens`` instead
        fixes one pair of profiles for every request (tests, benchmarks)."""
        self.index = index if index is not None else PrefixIndex()
        self.profiles = profiles if profiles is not None else DEFAULT_TABLE
        self._fixed: tuple[RoutingProfile, RoutingProfile] | None = None
        if decode_profile or prefill_profile or long_context_threshold_tokens is not None:
            self._fixed = (
                decode_profile or default_decode_profile(long_context_threshold_tokens),
                prefill_profile or default_prefill_profile(long_context_threshold_tokens),
            )

    def stage_profiles(self, request: RouteRequest) -> tuple[RoutingProfile, RoutingProfile]:
        """(decode, prefill) profiles for ``request``: the fixed pair, else the table's."""
        if self._fixed is not None:
            return self._fixed
        return self.profiles.resolve(request.deployment, request.model, request.sla_class)

    def route(
        self,
        request: RouteRequest,
        workers: Sequence[WorkerState],
        rng: random.Random,
        *,
        exclude: frozenset[str] = frozenset(),
        aggregated: bool = False,
        tenants: TenantShares | None = None,
        clock: Callable[[], float] | None = None,
    ) -> Decision | Unroutable:
        """``decide``, then record the chosen workers as holding the prompt's blocks."""
        decision = self.decide(
            request,
            workers,
            rng,
            exclude=exclude,
            aggregated=aggregated,
            tenants=tenants,
            clock=clock,
        )
        if isinstance(decision, Decision):
            self.commit(request, decision)
        return decision

    def commit(self, request: RouteRequest, decision: Decision) -> None:
        """Record ``decision`` 's workers as holding the prompt's blocks (what ``route`` adds
        to ``decide``; for a caller that decided first and sends the request later)."""
        if request.block_hashes:
            self.index.record_route(decision.decode.worker_id, request.block_hashes)
            if decision.prefill is not None:
                self.index.record_route(decision.prefill.worker_id, request.block_hashes)

    def decide(
        self,
        request: RouteRequest,
        workers: Sequence[WorkerState],
        rng: random.Random,
        *,
        exclude: frozenset[str] = frozenset(),
        aggregated: bool = False,
        tenants: TenantShares | None = None,
        clock: Callable[[], float] | None = None,
    ) -> Decision | Unroutable:
        """Where ``request`` should go among ``workers`` (all of its model, or filtered out);
        ``exclude``: workers that failed it; ``aggregated``: no remote prefill; ``tenants``:
        recent tokens per tenant (for the fair-share scorer); ``clock``: the caller's clock,
        to time each plugin into the trace's ``plugin_seconds`` (None: not timed)."""
        ordered = sorted(workers, key=lambda w: w.worker_id)
        cached = self.index.overlaps(request.block_hashes, (w.worker_id for w in ordered))
        decode_profile, prefill_profile = self.stage_profiles(request)
        decode_ctx = RouteContext(Stage.DECODE, cached, exclude, tenants)
        d, decode_trace = run_stage(decode_profile, request, ordered, decode_ctx, rng, clock)
        if d is None:
            reasons = tuple(str(r) for r in decode_trace.rejections)
            return Unroutable(reasons, Trace(decode_trace))

        lent: list[WorkerState] | None = None  # None: D may use any prefill worker
        borrowed: tuple[Rejection, ...] = ()
        prefill_pools = {w.pool for w in ordered if w.role == PREFILL}
        pool_prefill = LONG_CONTEXT_POOL in prefill_pools
        if d.worker.pool == LONG_CONTEXT_POOL and not pool_prefill:
            lent, borrowed = lendable_prefill_workers(request, ordered, exclude)
        verdict = local_prefill_verdict(
            request,
            d,
            aggregated=aggregated,
            has_prefill=bool(prefill_pools),
            pool_has_prefill=pool_prefill,
            lendable=None if lent is None else len(lent),
        )
        if verdict.remote is False:
            return Decision(d.worker, None, Trace(decode_trace, verdict))

        prefill_ctx = RouteContext(Stage.PREFILL, cached, exclude, tenants)
        stage_workers = ordered
        if lent is not None:  # the base pool's prefill workers that were not lent sit it out
            refused = {r.worker_id for r in borrowed}
            stage_workers = [w for w in ordered if w.worker_id not in refused]
        p, prefill_trace = run_stage(
            prefill_profile, request, stage_workers, prefill_ctx, rng, clock
        )
        if borrowed:
            prefill_trace = dataclasses.replace(
                prefill_trace,
                rejections=tuple(
                    sorted(prefill_trace.rejections + borrowed, key=lambda r: r.worker_id)
                ),
            )
        verdict = remote_prefill_verdict(request, d, p, verdict)
        trace = Trace(decode_trace, verdict, prefill_trace)
        if p is None or not verdict.remote:
            return Decision(d.worker, None, trace)
        return Decision(d.worker, p.worker, trace)


def candidate(
    request: RouteRequest, worker: WorkerState, cached_blocks: int, stage: Stage
) -> Candidate:
    """A filtered worker with its predictions for ``stage`` (see ``predict``)."""
    cached = predict.cached_tokens(request, cached_blocks)
    return Candidate(
        worker=worker,
        cached_blocks=cached_blocks,
        cached_tokens=cached,
        ttft_ms=predict.ttft_ms(request, worker, cached, stage),
        itl_ms=predict.itl_ms(request, worker),
    )


def run_stage(
    profile: RoutingProfile,
    request: RouteRequest,
    workers: Sequence[WorkerState],
    ctx: RouteContext,
    rng: random.Random,
    clock: Callable[[], float] | None = None,
) -> tuple[Candidate | None, StageTrace]:
    """One filter -> score -> pick pass over ``workers`` (sorted by id); always traced.
    ``clock``: time each plugin with it (``StageTrace.plugin_seconds``)."""
    rejections: list[Rejection] = []
    alive: Sequence[WorkerState] = workers
    seconds: dict[str, float] = {}
    for f in profile.filters:
        if not alive:
            break
        if clock is None:
            kept = f.filter(request, alive, ctx)
        else:
            t0 = clock()
            kept = f.filter(request, alive, ctx)
            seconds[f.name] = seconds.get(f.name, 0.0) + clock() - t0
        if len(kept) != len(alive):  # a filter keeps a subset, in order: equal length, all
            kept_ids = {w.worker_id for w in kept}
            rejections += (
                Rejection(w.worker_id, f.name, f.reason(request, w, ctx))
                for w in alive
                if w.worker_id not in kept_ids
            )
        alive = kept
    cached_blocks, stage = ctx.cached_blocks, ctx.stage
    candidates = [candidate(request, w, cached_blocks.get(w.worker_id, 0), stage) for w in alive]
    names = profile.scorer_names
    per_scorer: list[Sequence[float]] = []
    totals = [0.0] * len(candidates)
    if candidates:
        for ws, weight in zip(profile.scorers, profile.weights, strict=True):
            if clock is None:
                values = ws.scorer.score(request, candidates, ctx)
            else:
                t0 = clock()
                values = ws.scorer.score(request, candidates, ctx)
                seconds[ws.scorer.name] = seconds.get(ws.scorer.name, 0.0) + clock() - t0
            if len(values) != len(candidates):
                raise ValueError(f"scorer {ws.scorer.name} returned a wrong-sized list")
            per_scorer.append(values)
            totals = [t + weight * v for t, v in zip(totals, values, strict=True)]
    chosen = profile.picker.pick(candidates, totals, rng) if candidates else None
    scored = tuple(
        CandidateScore(
            worker_id=c.worker.worker_id,
            total=totals[i],
            scores=MappingProxyType(
                {n: float(v[i]) for n, v in zip(names, per_scorer, strict=True)}
            ),
            cached_blocks=c.cached_blocks,
            ttft_ms=c.ttft_ms,
            itl_ms=c.itl_ms,
        )
        for i, c in enumerate(candidates)
    )
    trace = StageTrace(
        stage=stage,
        profile=profile.name,
        rejections=tuple(sorted(rejections, key=lambda r: r.worker_id)),
        candidates=scored,
        weights=profile.weight_map,
        chosen=None if chosen is None else candidates[chosen].worker_id,
        plugin_seconds=MappingProxyType(seconds),
    )
    return (None if chosen is None else candidates[chosen]), trace


def lendable_prefill_workers(
    request: RouteRequest, workers: Sequence[WorkerState], exclude: frozenset[str] = frozenset()
) -> tuple[list[WorkerState], tuple[Rejection, ...]]:
    """The base-pool prefill workers a long-context pool without prefill workers of its own
    may borrow for ``request`` (rule (a)), and a ``LongContext`` rejection for each other one.

    A worker is lent only when it is **idle** (no prompt queued or pending there, by its
    report and by this router's own count: the long prefill then makes no interactive prompt
    wait behind it; later ones route around it on its predicted TTFT), and only while fewer
    than half of the base pool's prefill workers hold long prompts (a backlog of at least the
    deployment's long-context threshold, whoever sent it): the base pool keeps at least half
    its prefill workers for its own traffic, so a pool of one never lends it. Whether a lent
    worker is worth the KV hand-off is rules (b)-(g)'s call, as for any remote prefill."""
    threshold = request.deployment.long_context_threshold_tokens or request.prompt_tokens
    base = [
        w
        for w in workers
        if w.role == PREFILL
        and w.pool != LONG_CONTEXT_POOL
        and w.serving
        and w.circuit_allows
        and w.worker_id not in exclude
    ]

    def backlog(w: WorkerState) -> int:
        return max(w.pending_prefill_tokens, w.queued_prefill_tokens or 0)

    may_hold = len(base) // 2
    holding = sum(backlog(w) >= threshold for w in base)
    lent: list[WorkerState] = []
    rejected: list[Rejection] = []
    for w in base:
        if backlog(w) > 0 or w.waiting > 0:
            why = f"busy ({backlog(w)} prompt tokens queued, {w.waiting} waiting)"
        elif may_hold == 0:
            why = "the base pool's only prefill worker"
        elif holding >= may_hold:
            why = (
                f"{holding} of the base pool's {len(base)} prefill workers hold long prompts "
                f"(at most {may_hold} may)"
            )
        else:
            lent.append(w)
            continue
        why = f"{why}: not lent to the {LONG_CONTEXT_POOL} pool"
        rejected.append(Rejection(w.worker_id, "LongContext", why))
    return lent, tuple(rejected)


_AGGREGATED = DisaggregationVerdict(False, "aggregated route asked for")
_NO_PREFILL_WORKER = DisaggregationVerdict(False, "no prefill worker")
"""Verdicts that hold no numbers (immutable: one object each)."""


def local_prefill_verdict(
    request: RouteRequest,
    decode: Candidate,
    *,
    aggregated: bool,
    has_prefill: bool,
    pool_has_prefill: bool = False,
    lendable: int | None = None,
) -> DisaggregationVerdict:
    """Rules (a)-(e) of the module docstring: ``remote=False`` keeps the prefill on ``decode``;
    ``remote=True`` means only that a remote prefill may be worth it (rules (f), (g) follow).
    A ``decode`` worker of the long-context pool prefills its own prompts unless the pool has
    prefill workers (``pool_has_prefill``) or ``lendable`` base-pool prefill workers may be
    borrowed (``lendable_prefill_workers``; None: none asked for): a long prompt must not
    queue ahead of the base pool's interactive prompts."""
    if aggregated:
        return _AGGREGATED
    if not has_prefill:
        return _NO_PREFILL_WORKER
    w = decode.worker
    if w.pool == LONG_CONTEXT_POOL and not pool_has_prefill and not lendable:
        return DisaggregationVerdict(
            False,
            "the long-context pool prefills its own prompts"
            + ("" if lendable is None else ": no base-pool prefill worker to lend"),
        )
    interference = predict.interference_ms(request, w, decode.cached_tokens)
    transfer = predict.transfer_ms(request, w)
    target = request.itl_target_ms
    # the prefills already queued on D ride in the same steps: they used that slack first
    queued = predict.queued_interference_ms(request, w) if w.batch_size > 0 else 0.0
    slack = 0.0 if target is None else target - decode.itl_ms - queued
    budgets = predict.itl_budgets_ms(w, decode.itl_ms)
    budget = None if budgets is None else min(budgets, default=math.inf)
    breaks = 0 if budgets is None else sum(b < interference + queued for b in budgets)
    numbers = DisaggregationVerdict(
        False,
        "",
        interference,
        slack,
        transfer,
        queued_ms=queued,
        itl_budget_ms=budget,
        itl_breaks=breaks,
    )
    if w.batch_size <= 0:
        local = "decode batch empty: delays no one"
    elif budget is not None:  # rule (d) on the decoding requests' own budgets
        if numbers.breaks_itl_budget:
            return dataclasses.replace(
                numbers,
                remote=True,
                reason=f"prefill {interference:.1f} ms (+{queued:.1f} ms queued) > the "
                f"smallest ITL budget {budget:.1f} ms of the requests decoding on {w.worker_id}"
                f" ({breaks} past it)",
            )
        local = (
            f"prefill {interference:.1f} ms (+{queued:.1f} ms queued) fits the ITL budget "
            f"{budget:.1f} ms of every request decoding on {w.worker_id}"
            if math.isfinite(budget)
            else f"no request decoding on {w.worker_id} has an ITL target a stall could break"
        )
    elif interference <= slack:
        local = (
            f"prefill {interference:.1f} ms fits the ITL slack {slack:.1f} ms "
            f"({decode.cached_blocks} blocks cached on {w.worker_id})"
        )
    elif interference <= transfer:
        local = f"prefill {interference:.1f} ms <= KV transfer {transfer:.1f} ms"
    else:
        return dataclasses.replace(
            numbers,
            remote=True,
            reason=f"prefill {interference:.1f} ms > ITL slack {slack:.1f} ms and "
            f"> KV transfer {transfer:.1f} ms",
        )
    ttft_target = request.ttft_target_ms
    if ttft_target is not None and decode.ttft_ms > ttft_target:  # rule (b)
        return dataclasses.replace(
            numbers,
            remote=True,
            reason=f"{local}, but local TTFT {decode.ttft_ms:.1f} ms on {w.worker_id} misses "
            f"the {ttft_target:.0f} ms target",
            local_ttft_miss=True,
        )
    return dataclasses.replace(numbers, reason=local)


def remote_prefill_verdict(
    request: RouteRequest,
    decode: Candidate,
    prefill: Candidate | None,
    verdict: DisaggregationVerdict,
) -> DisaggregationVerdict:
    """Rules (f) and (g) on top of a ``remote=True`` verdict from ``local_prefill_verdict``."""
    if prefill is None:
        return dataclasses.replace(verdict, remote=False, reason="no prefill worker can take it")
    target = request.ttft_target_ms
    if verdict.breaks_itl_budget:
        if (
            verdict.itl_breaks <= 1
            and target is not None
            and prefill.ttft_ms > target >= decode.ttft_ms
        ):
            # one miss either way: this request's first token, or one decoding request's
            # ITL; the local prefill spares the prefill pool the late work
            return dataclasses.replace(
                verdict,
                remote=False,
                reason=f"{verdict.reason}, but remote TTFT {prefill.ttft_ms:.1f} ms on "
                f"{prefill.worker_id} would miss the {target:.0f} ms target that local "
                f"{decode.ttft_ms:.1f} ms meets, for one request's ITL",
            )
        # a local prefill would push decoding requests past their ITL target: remote, even
        # late (the gateway's late lane may then hold it until a prefill worker has room)
        return dataclasses.replace(
            verdict, reason=f"{verdict.reason}; remote TTFT {prefill.ttft_ms:.1f} ms"
        )
    if verdict.local_ttft_miss and prefill.ttft_ms >= decode.ttft_ms:
        return dataclasses.replace(
            verdict,
            remote=False,
            reason=f"{verdict.reason}, but remote TTFT {prefill.ttft_ms:.1f} ms on "
            f"{prefill.worker_id} is no sooner",
        )
    if target is not None and prefill.ttft_ms > target >= decode.ttft_ms:
        return dataclasses.replace(
            verdict,
            remote=False,
            reason=f"remote TTFT {prefill.ttft_ms:.1f} ms on {prefill.worker_id} would miss "
            f"the {target:.0f} ms target; local {decode.ttft_ms:.1f} ms meets it",
        )
    return dataclasses.replace(
        verdict, reason=f"{verdict.reason}; remote TTFT {prefill.ttft_ms:.1f} ms"
    )
