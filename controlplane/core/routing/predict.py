"""The router's timing predictions, from a worker's ``TimingModel``. Pure arithmetic.

* ``queue_ms``: the prefill work waiting ahead on the worker. With ``queued_prefill_tokens``
  known, ``waiting`` prompts of the mean queued size, each a prefill pass of its own; unknown,
  each waiting request is assumed to be as long as this one. Either way at least the
  prompts this router sent that have not come back with a first token
  (``pending_prefill_tokens`` over ``pending_prefill_prompts``, each a pass of its own: what
  the worker's next report will show).
* ``ttft_ms``, decode stage (the worker prefills locally): queue + the uncached part of the
  prompt's prefill + one decode step of its current batch (the prefill rides in a step of that
  batch; an idle worker has none).
* ``ttft_ms``, prefill stage (remote): queue + the uncached prefill + moving the whole prompt's
  KV cache to the decode worker.
* ``itl_ms``: one decode step with this request joined: ``decode_step_ms(batch + 1, context
  + prompt)``.
* ``interference_ms``: the prefill compute a local prefill adds to the decode batch's steps
  (chunked prefill spreads it over steps; the sum is the same); ``queued_interference_ms``:
  the compute of the prefills already queued there, which rides in the same steps.
* ``itl_budget_ms``: the longest stall every request this router has decoding on a worker can
  take and still meet its ITL target (mean inter-token time); requests that miss it anyway
  do not count.

A prompt is never fully cached: engines always compute at least its last token, so
``cached_tokens`` is capped at ``prompt_tokens - 1``.
"""

from __future__ import annotations

import math

from controlplane.core.routing.framework import RouteRequest, Stage, TimingModel, WorkerState


def cached_tokens(request: RouteRequest, cached_blocks: int) -> int:
    """Prompt tokens a worker holding ``cached_blocks`` leading blocks need not prefill."""
    return max(0, min(cached_blocks * request.block_size, request.prompt_tokens - 1))


def _prompts_ms(timing: TimingModel, tokens: int, prompts: int, *, passes: bool) -> float:
    """``tokens`` of prompts, ``prompts`` of them (at least one), each of the mean size:
    attention is per prompt, so their cost is not that of one prompt of all the tokens (which
    would count the cross-prompt pairs: 1.3x too much for twenty 1k prompts, 1.8x for three
    30k ones). ``passes``: each with the per-pass overhead (``prefill_ms``), else compute only
    (``prefill_compute_ms``)."""
    if tokens <= 0:
        return 0.0
    n = max(prompts, 1)
    size = -(-tokens // n)
    each = timing.prefill_ms(size, 0) if passes else timing.prefill_compute_ms(size, 0)
    return n * each


def queue_ms(request: RouteRequest, worker: WorkerState) -> float:
    """Predicted wait for the prefills queued ahead of this request on ``worker``: from its
    last report, but never less than this router's own prefills still pending there."""
    t = worker.timing
    floor = _prompts_ms(
        t, worker.pending_prefill_tokens, worker.pending_prefill_prompts, passes=True
    )
    queued = worker.queued_prefill_tokens
    if queued is None:
        return max(floor, worker.waiting * t.prefill_ms(request.prompt_tokens, 0))
    return max(floor, _prompts_ms(t, queued, worker.waiting, passes=True))


def transfer_ms(request: RouteRequest, worker: WorkerState) -> float:
    """Moving the prompt's KV cache between two workers (``worker``'s link model)."""
    t = worker.timing
    return t.kv_transfer_ms(request.prompt_tokens * t.kv_bytes_per_token)


def own_prefill_ms(request: RouteRequest, worker: WorkerState, cached: int) -> float:
    return worker.timing.prefill_ms(request.prompt_tokens - cached, cached)


def ttft_ms(request: RouteRequest, worker: WorkerState, cached: int, stage: Stage) -> float:
    """Predicted time to first token when ``worker`` prefills (see the module docstring)."""
    base = queue_ms(request, worker) + own_prefill_ms(request, worker, cached)
    if stage is Stage.PREFILL:
        return base + transfer_ms(request, worker)
    if worker.batch_size > 0:
        base += worker.timing.decode_step_ms(worker.batch_size, worker.context_tokens)
    return base


def itl_ms(request: RouteRequest, worker: WorkerState) -> float:
    """Predicted decode step once this request joins ``worker``'s batch."""
    return worker.timing.decode_step_ms(
        worker.batch_size + 1, worker.context_tokens + request.prompt_tokens
    )


def interference_ms(request: RouteRequest, worker: WorkerState, cached: int) -> float:
    """Compute a local prefill on ``worker`` adds to its decode batch's steps."""
    return worker.timing.prefill_compute_ms(request.prompt_tokens - cached, cached)


def queued_interference_ms(request: RouteRequest, worker: WorkerState) -> float:
    """Compute of the prefills already queued on ``worker``: it rides in the same coming steps
    as a local prefill would (an engine packs queued prompts into a step up to its token
    budget), so it has used that much of the batch's ITL slack already. Tokens: the reported
    queue (unknown: ``waiting`` prompts like this one), at least this router's pending ones."""
    reported = worker.queued_prefill_tokens
    if reported is None:
        reported = worker.waiting * request.prompt_tokens
    t = worker.timing
    return max(
        _prompts_ms(t, reported, worker.waiting, passes=False),
        _prompts_ms(t, worker.pending_prefill_tokens, worker.pending_prefill_prompts, passes=False),
    )


MIN_OUTPUT_HORIZON = 8
"""Tokens a decoding request is assumed to have left at least (``itl_budget_ms``)."""


def itl_budgets_ms(worker: WorkerState, step_ms: float) -> tuple[float, ...] | None:
    """The longest stall (ms) each request this router has decoding on ``worker`` can absorb
    and still meet its ITL target, judged on its mean inter-token time (TPOT), as ``vllm
    bench serve`` 's goodput and the gateway's SLO judge it; only the requests a stall could
    still break. None when unknown: nothing tracked there, or the worker's last report shows
    more sequences than this router knows of (other gateways' requests, whose budgets it
    cannot see).

    A request with ``k`` tokens, ``elapsed`` ms since its first, and ``n`` tokens in all
    ends with TPOT = (elapsed + stall + (n - k) x step) / (n - 1); its budget is what keeps
    that within the target. ``n`` is not known (it may stop early): it is assumed to produce
    as many more tokens as it has (at least ``MIN_OUTPUT_HORIZON``), or as many as requests
    like it produced lately (``expected_tokens``) when that is more, capped by its
    ``max_tokens``. A request whose first token is not back counts from now.

    A request already behind its target by more than its remaining steps can make up (a
    negative budget) misses it whatever happens next: no stall can save it, so it is left
    out, as are one-token requests (no inter-token latency). Counting a lost request as a
    zero budget would send every prefill on its worker remote, late, for nothing."""
    if not worker.decoding or len(worker.decoding) < worker.reported_batch:
        return None
    budgets = []
    for d in worker.decoding:
        horizon = max(d.tokens + max(d.tokens, MIN_OUTPUT_HORIZON), int(d.expected_tokens))
        n = min(d.max_tokens, horizon)
        if n < 2:
            continue  # one token: no inter-token latency to miss
        left = n - max(d.tokens, 1)
        b = d.itl_target_ms * (n - 1) - d.elapsed_ms - left * step_ms
        if b >= 0.0:
            budgets.append(b)
    return tuple(budgets)


def itl_budget_ms(worker: WorkerState, step_ms: float) -> float | None:
    """The smallest of ``itl_budgets_ms``: the longest stall every request on ``worker`` that
    a stall could still break can take; ``math.inf`` when there is none, None when unknown."""
    budgets = itl_budgets_ms(worker, step_ms)
    return None if budgets is None else min(budgets, default=math.inf)


def efficient_batch_size(
    timing: TimingModel,
    *,
    context_per_seq: int = 1024,
    max_batch: int = 512,
    tolerance: float = 0.05,
) -> int:
    """The smallest decode batch whose per-token cost (``decode_step_ms(b, b * context) / b``)
    is within ``tolerance`` of the lowest over 1..``max_batch``: past it, a bigger batch saves
    little per token and only stretches every step. With an MoE profile the step reads more
    experts' weights as the batch grows until all are touched, so the cost per token falls
    steeply at first."""
    costs = [
        timing.decode_step_ms(b, b * context_per_seq) / b for b in range(1, max(1, max_batch) + 1)
    ]
    best = min(costs)
    return next(b for b, c in enumerate(costs, start=1) if c <= best * (1 + tolerance))
