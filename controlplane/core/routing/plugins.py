"""The stock routing plugins and the default profiles.

Filters (each rejection says why, without the worker id; the pipeline prefixes it):

* ``ExcludedFilter``       workers that already failed this request.
* ``RoleFilter``           decode stage: decode or both; prefill stage: prefill.
* ``ModelFilter``          the worker serves the request's model.
* ``ServingFilter``        not draining, circuit not open.
* ``ContextLengthFilter``  prompt + max_tokens (prefill stage: the prompt) fits the context.
* ``LongContextFilter``    a prompt of at least the deployment's threshold goes only to the
                           long-context pool when that pool has a usable worker; shorter
                           prompts stay off the pool.
* ``ChunkedPrefillFilter`` a long prompt with no long-context pool: workers whose engine
                           prefills in chunks (not stalling their decode batch).
* ``KvHeadroomFilter``     enough free KV blocks for what the worker would hold.

Scorers (each in [0, 1], higher better; the TTFT / ITL headroom scorers fall below 0, to -1,
for a predicted miss, so an overloaded fleet still ranks its workers):

* ``TtftScorer``           predicted TTFT against the class's target.
* ``ItlScorer``            predicted ITL on the decode candidate against the class's target.
* ``PrefixOverlapScorer``  fraction of the prompt's blocks the worker holds.
* ``KvHeadroomScorer``     KV blocks left free after this request, as a fraction.
* ``LoadBalanceScorer``    fewer requests on the worker.
* ``TenantFairShareScorer`` over-share tenants kept on the workers they already load, the
                           others steered away from them.
* ``DpRankBalanceScorer``  MoE / DP attention: the emptiest rank, even ranks.
* ``BatchPackingScorer``   MoE: fill decode batches toward the efficient size while the ITL
                           target holds.

Picker: ``MaxScorePicker`` (ties: uniformly among them, from the injected rng).
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from controlplane.core.routing.framework import (
    BOTH,
    DECODE,
    PREFILL,
    Candidate,
    Filter,
    RouteContext,
    RouteRequest,
    RoutingProfile,
    Stage,
    WeightedScorer,
    WorkerState,
)

LONG_CONTEXT_POOL = "long_context"
"""The pool name of ``controlplane.core.deployments.PoolRole.LONG_CONTEXT``."""

# --- filters -----------------------------------------------------------------------------------


class ExcludedFilter:
    """Workers that already failed this request (the caller retries elsewhere)."""

    name = "Excluded"

    def filter(
        self, request: RouteRequest, workers: Sequence[WorkerState], ctx: RouteContext
    ) -> Sequence[WorkerState]:
        if not ctx.exclude:
            return workers
        return [w for w in workers if w.worker_id not in ctx.exclude]

    def reason(self, request: RouteRequest, worker: WorkerState, ctx: RouteContext) -> str:
        return "failed this request"


class RoleFilter:
    """Decode stage: decode or both (an aggregated worker decodes too); prefill: prefill."""

    name = "Role"

    def filter(
        self, request: RouteRequest, workers: Sequence[WorkerState], ctx: RouteContext
    ) -> Sequence[WorkerState]:
        roles = (DECODE, BOTH) if ctx.stage is Stage.DECODE else (PREFILL,)
        return [w for w in workers if w.role in roles]

    def reason(self, request: RouteRequest, worker: WorkerState, ctx: RouteContext) -> str:
        return f"role {worker.role} does not {ctx.stage.value}"


class ModelFilter:
    """The worker serves the request's model."""

    name = "Model"

    def filter(
        self, request: RouteRequest, workers: Sequence[WorkerState], ctx: RouteContext
    ) -> Sequence[WorkerState]:
        return [w for w in workers if w.model == request.model]

    def reason(self, request: RouteRequest, worker: WorkerState, ctx: RouteContext) -> str:
        return f"serves {worker.model!r}, not {request.model!r}"


class ServingFilter:
    """Draining workers and workers whose circuit is open take no new requests."""

    name = "Serving"

    def filter(
        self, request: RouteRequest, workers: Sequence[WorkerState], ctx: RouteContext
    ) -> Sequence[WorkerState]:
        return [w for w in workers if w.serving and w.circuit_allows]

    def reason(self, request: RouteRequest, worker: WorkerState, ctx: RouteContext) -> str:
        return "draining" if not worker.serving else "circuit open"


def _context_need(request: RouteRequest, stage: Stage) -> int:
    # A prefill worker holds the prompt and makes one token; the decode worker holds it all.
    return request.total_tokens if stage is Stage.DECODE else request.prompt_tokens + 1


class ContextLengthFilter:
    """The worker's context window holds what it would hold (0: unknown window, passes)."""

    name = "ContextLength"

    def filter(
        self, request: RouteRequest, workers: Sequence[WorkerState], ctx: RouteContext
    ) -> Sequence[WorkerState]:
        need = _context_need(request, ctx.stage)
        return [w for w in workers if not w.max_context_tokens or need <= w.max_context_tokens]

    def reason(self, request: RouteRequest, worker: WorkerState, ctx: RouteContext) -> str:
        need = _context_need(request, ctx.stage)
        return f"context {need} tokens > max {worker.max_context_tokens}"


class LongContextFilter:
    """Keeps long prompts and interactive traffic apart. The threshold is ``threshold_tokens``
    when given, else the deployment's (``request.deployment.long_context_threshold_tokens``;
    0: the filter passes everyone).

    * A prompt of at least the threshold goes to the ``pool`` workers only, when any is still
      in the running (otherwise ``ChunkedPrefillFilter`` takes over);
    * a shorter prompt stays off the ``pool`` workers while any other worker is in the
      running: the pool is kept for the long prompts it was made for.
    """

    name = "LongContext"

    def __init__(self, threshold_tokens: int | None = None, pool: str = LONG_CONTEXT_POOL) -> None:
        self.threshold_tokens = threshold_tokens
        self.pool = pool

    def threshold(self, request: RouteRequest) -> int:
        if self.threshold_tokens is not None:
            return self.threshold_tokens
        return request.deployment.long_context_threshold_tokens

    def filter(
        self, request: RouteRequest, workers: Sequence[WorkerState], ctx: RouteContext
    ) -> Sequence[WorkerState]:
        threshold = self.threshold(request)
        if threshold <= 0:
            return workers
        if request.prompt_tokens >= threshold:
            return [w for w in workers if w.pool == self.pool] or workers
        return [w for w in workers if w.pool != self.pool] or workers

    def reason(self, request: RouteRequest, worker: WorkerState, ctx: RouteContext) -> str:
        threshold = self.threshold(request)
        if request.prompt_tokens < threshold:
            return f"{self.pool} pool is kept for prompts of {threshold}+ tokens"
        return (
            f"prompt {request.prompt_tokens} tokens >= long-context threshold "
            f"{threshold}: {self.pool} pool only"
        )


class ChunkedPrefillFilter:
    """A long prompt (at least the threshold, as ``LongContextFilter``) with no ``pool``
    worker in the running goes to the workers whose engine prefills in chunks, when there is
    one: a whole-prompt prefill of 100k tokens would stall their decode batch (every
    interactive stream on it) for its whole length; chunks share steps with it. No such
    worker: everyone stays (the KV filter then keeps those with room)."""

    name = "ChunkedPrefill"

    def __init__(self, threshold_tokens: int | None = None, pool: str = LONG_CONTEXT_POOL) -> None:
        self._threshold = LongContextFilter(threshold_tokens, pool)
        self.pool = pool

    def filter(
        self, request: RouteRequest, workers: Sequence[WorkerState], ctx: RouteContext
    ) -> Sequence[WorkerState]:
        threshold = self._threshold.threshold(request)
        if threshold <= 0 or request.prompt_tokens < threshold:
            return workers
        if any(w.pool == self.pool for w in workers):
            return workers
        return [w for w in workers if w.chunked_prefill] or workers

    def reason(self, request: RouteRequest, worker: WorkerState, ctx: RouteContext) -> str:
        return (
            f"prompt {request.prompt_tokens} tokens >= long-context threshold "
            f"{self._threshold.threshold(request)} and no {self.pool} pool: needs chunked prefill"
        )


def blocks_needed(request: RouteRequest, stage: Stage, cached_blocks: int) -> int:
    """New KV blocks a worker must allocate: what it would hold, less the prefix it has."""
    tokens = request.total_tokens if stage is Stage.DECODE else request.prompt_tokens
    return max(0, -(-tokens // request.block_size) - cached_blocks)


class KvHeadroomFilter:
    """Enough free KV blocks for the request: the prompt and every output token on a decode
    worker, the prompt on a prefill worker; blocks it already caches need no room. A worker
    reporting no capacity (``kv_blocks_total == 0``) passes."""

    name = "KvHeadroom"

    def filter(
        self, request: RouteRequest, workers: Sequence[WorkerState], ctx: RouteContext
    ) -> Sequence[WorkerState]:
        return [w for w in workers if self._fits(request, w, ctx)]

    def _fits(self, request: RouteRequest, w: WorkerState, ctx: RouteContext) -> bool:
        if not w.kv_blocks_total:
            return True
        need = blocks_needed(request, ctx.stage, ctx.cached_blocks.get(w.worker_id, 0))
        return need <= w.kv_blocks_free

    def reason(self, request: RouteRequest, worker: WorkerState, ctx: RouteContext) -> str:
        need = blocks_needed(request, ctx.stage, ctx.cached_blocks.get(worker.worker_id, 0))
        return f"needs {need} KV blocks, {worker.kv_blocks_free} free"


# --- scorers -----------------------------------------------------------------------------------


def headroom(predicted_ms: Sequence[float], target_ms: float | None) -> list[float]:
    """``1 - predicted / target`` within the target: 1 at no latency, 0 at the target. Past
    it, ``target / predicted - 1``: negative, towards -1 as the miss grows, so under overload
    a worker that misses by less still scores above one that misses by more (a flat 0 there
    would leave the choice to the other scorers, whatever the queue).

    With no target (a batch class) the candidates are rated against the fastest one:
    ``fastest / predicted`` (1 for the fastest; a zero prediction is 1).
    """
    if target_ms is not None:
        return [
            min(1.0, 1.0 - p / target_ms) if p <= target_ms else target_ms / p - 1.0
            for p in predicted_ms
        ]
    fastest = min(predicted_ms, default=0.0)
    return [1.0 if p <= 0 else fastest / p for p in predicted_ms]


class TtftScorer:
    """Predicted TTFT (``Candidate.ttft_ms``: queue, uncached prefill, KV transfer on a remote
    prefill) against the request's TTFT target; see ``headroom``."""

    name = "TtftHeadroom"

    def score(
        self, request: RouteRequest, candidates: Sequence[Candidate], ctx: RouteContext
    ) -> Sequence[float]:
        return headroom([c.ttft_ms for c in candidates], request.ttft_target_ms)


class ItlScorer:
    """Predicted ITL on the decode candidate (``Candidate.itl_ms``: one step with this
    request in the batch) against the request's ITL target; see ``headroom``."""

    name = "ItlHeadroom"

    def score(
        self, request: RouteRequest, candidates: Sequence[Candidate], ctx: RouteContext
    ) -> Sequence[float]:
        return headroom([c.itl_ms for c in candidates], request.itl_target_ms)


class PrefixOverlapScorer:
    """Fraction of the prompt's full blocks the worker holds (0 for a prompt with none)."""

    name = "PrefixOverlap"

    def score(
        self, request: RouteRequest, candidates: Sequence[Candidate], ctx: RouteContext
    ) -> Sequence[float]:
        blocks = len(request.block_hashes)
        if not blocks:
            return [0.0] * len(candidates)
        return [min(1.0, c.cached_blocks / blocks) for c in candidates]


class KvHeadroomScorer:
    """Free KV blocks left after this request, as a fraction of the worker's capacity. A
    worker that reports no capacity is not penalised (1), as the filter lets it pass."""

    name = "KvHeadroom"

    def score(
        self, request: RouteRequest, candidates: Sequence[Candidate], ctx: RouteContext
    ) -> Sequence[float]:
        out: list[float] = []
        for c in candidates:
            w = c.worker
            if not w.kv_blocks_total:
                out.append(1.0)
                continue
            left = w.kv_blocks_free - blocks_needed(request, ctx.stage, c.cached_blocks)
            out.append(min(1.0, max(0.0, left / w.kv_blocks_total)))
        return out


class LoadBalanceScorer:
    """``1 / (1 + load)``, load = running + waiting + in flight from this router."""

    name = "LoadBalance"

    def score(
        self, request: RouteRequest, candidates: Sequence[Candidate], ctx: RouteContext
    ) -> Sequence[float]:
        return [1.0 / (1 + c.worker.load) for c in candidates]


class TenantFairShareScorer:
    """Keeps a tenant that takes more than its share from crowding every worker.

    Reads ``ctx.tenants`` (recent tokens per tenant, overall and per worker; no data or no
    tenant on the request: 1 for all). A tenant *over* an equal share of the recent tokens
    (``TenantShares.over_fair_share``) is drawn to the workers it already loads: the score is
    its own fraction of the worker's recent tokens (0 on a worker it has not used), so its
    load stays on a few workers. Any other tenant is drawn away from the heavy ones: 1 minus
    the fraction of the worker's recent tokens that went to over-share tenants (1 on an idle
    worker)."""

    name = "TenantFairShare"

    def score(
        self, request: RouteRequest, candidates: Sequence[Candidate], ctx: RouteContext
    ) -> Sequence[float]:
        shares = ctx.tenants
        if shares is None or not request.tenant:
            return [1.0] * len(candidates)
        heavy = shares.over_fair_share()
        if not heavy:  # no crowd anywhere: 1 - 0 / total, or 1 on an idle worker
            return [1.0] * len(candidates)
        out: list[float] = []
        for c in candidates:
            per = shares.by_worker.get(c.worker_id, {})
            total = sum(per.values())
            if request.tenant in heavy:
                out.append(per.get(request.tenant, 0.0) / total if total > 0 else 0.0)
            else:
                crowd = sum(v for t, v in per.items() if t in heavy)
                out.append(1.0 - crowd / total if total > 0 else 1.0)
        return out


def rank_batches(worker: WorkerState, dp_size: int) -> tuple[int, ...]:
    """Running sequences per DP rank, emptiest first: the worker's report when it has one per
    rank (plus what waits or is on its way, onto the emptiest ranks: the engine's DP balancer
    fills those first), else its load spread evenly."""
    if dp_size <= 1:
        return (worker.batch_size + worker.waiting + worker.inflight_here,)
    if len(worker.dp_rank_running) == dp_size:
        extra = worker.waiting + worker.inflight_here
        ranks = sorted(worker.dp_rank_running)
        for _ in range(extra):  # what is queued or on its way lands on the emptiest ranks
            ranks[0] += 1
            ranks.sort()
        return tuple(ranks)
    load = worker.batch_size + worker.waiting + worker.inflight_here
    return tuple(sorted(load // dp_size + (1 if i < load % dp_size else 0) for i in range(dp_size)))


class DpRankBalanceScorer:
    """MoE with data-parallel attention: each DP rank decodes its own batch and the slowest
    rank paces every step of the expert layers, so a request should land where the rank it
    joins (the emptiest) is emptiest, and ranks stay even: ``1 / (1 + min rank batch)`` times
    ``1 - spread / (max + 1)``. One rank (``dp_size`` 1): ``1 / (1 + load)``."""

    name = "DpRankBalance"

    def score(
        self, request: RouteRequest, candidates: Sequence[Candidate], ctx: RouteContext
    ) -> Sequence[float]:
        out: list[float] = []
        for c in candidates:
            ranks = rank_batches(c.worker, request.deployment.dp_size)
            lo, hi = min(ranks), max(ranks)
            after_hi = max(hi, lo + 1)
            out.append((1.0 / (1 + lo)) * (1.0 - (after_hi - lo - 1) / (after_hi + 1)))
        return out


class BatchPackingScorer:
    """MoE decode: fill batches toward the deployment's efficient batch size (per DP rank,
    ``DeploymentFacts.efficient_batch_size``: where the timing model's per-token cost levels
    off, since every step reads the touched experts' weights whatever the batch), as long as
    the ITL target holds. ``b`` = the joined rank's batch with this request, ``B`` = the
    efficient size: ``b / B`` up to ``B``, ``B / b`` beyond; 0 when the predicted ITL misses
    the class target. No efficient size: 1 for all (the scorer abstains)."""

    name = "BatchPacking"

    def score(
        self, request: RouteRequest, candidates: Sequence[Candidate], ctx: RouteContext
    ) -> Sequence[float]:
        target = request.deployment.efficient_batch_size
        if target <= 0:
            return [1.0] * len(candidates)
        out: list[float] = []
        for c in candidates:
            if request.itl_target_ms is not None and c.itl_ms > request.itl_target_ms:
                out.append(0.0)
                continue
            b = min(rank_batches(c.worker, request.deployment.dp_size)) + 1
            out.append(b / target if b <= target else target / b)
        return out


# --- pickers -----------------------------------------------------------------------------------


class MaxScorePicker:
    """Highest score; ties (scores within 1e-9) uniformly among them, from ``rng``."""

    name = "MaxScore"

    def pick(
        self, candidates: Sequence[Candidate], scores: Sequence[float], rng: random.Random
    ) -> int:
        top = max(scores)
        tied = [i for i, s in enumerate(scores) if s >= top - 1e-9]
        return tied[0] if len(tied) == 1 else rng.choice(tied)


# --- profiles ----------------------------------------------------------------------------------


def default_decode_profile(long_context_threshold_tokens: int | None = None) -> RoutingProfile:
    """Decode stage: ITL 3, TTFT 2 (if it prefills itself), prefix 2, KV headroom 1, load 1.

    ITL weighs most because the decode worker sets every token's latency; TTFT and prefix
    pull requests to a worker that can prefill them cheaply (and then often does, see the
    router's local-prefill rule); KV headroom and load spread the rest.
    """
    return RoutingProfile(
        name="decode",
        filters=default_filters(long_context_threshold_tokens),
        scorers=(
            WeightedScorer(ItlScorer(), 3.0),
            WeightedScorer(TtftScorer(), 2.0),
            WeightedScorer(PrefixOverlapScorer(), 2.0),
            WeightedScorer(KvHeadroomScorer(), 1.0),
            WeightedScorer(LoadBalanceScorer(), 1.0),
        ),
        picker=MaxScorePicker(),
    )


def default_prefill_profile(long_context_threshold_tokens: int | None = None) -> RoutingProfile:
    """Prefill stage: predicted TTFT 4 (already counts the prefix hit), prefix 1, load 1."""
    return RoutingProfile(
        name="prefill",
        filters=default_filters(long_context_threshold_tokens),
        scorers=(
            WeightedScorer(TtftScorer(), 4.0),
            WeightedScorer(PrefixOverlapScorer(), 1.0),
            WeightedScorer(LoadBalanceScorer(), 1.0),
        ),
        picker=MaxScorePicker(),
    )


def default_filters(long_context_threshold_tokens: int | None = None) -> tuple[Filter, ...]:
    """The filters both stages run, in order (a worker's reason is its first filter's)."""
    out: list[Filter] = [
        ExcludedFilter(),
        RoleFilter(),
        ModelFilter(),
        ServingFilter(),
        ContextLengthFilter(),
    ]
    out.append(LongContextFilter(long_context_threshold_tokens))
    out.append(ChunkedPrefillFilter(long_context_threshold_tokens))
    out.append(KvHeadroomFilter())
    return tuple(out)
