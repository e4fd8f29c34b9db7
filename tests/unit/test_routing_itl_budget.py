"""ITL budgets: the stall the requests decoding on a worker can take and still meet their ITL
target on their mean inter-token time (``predict.itl_budget_ms``), and the local / remote
prefill rules that read them (rules (d) and (g), ``controlplane/core/routing/router.py``)."""

from __future__ import annotations

import math
import random

import pytest

from controlplane.core.routing import Decision, DecodeProgress, SlaAwareRouter
from controlplane.core.routing.predict import itl_budget_ms
from tests.unit.routing_builders import request, worker


def progress(
    tokens: int, max_tokens: int, elapsed_ms: float = 0.0, expected: float = 0.0
) -> DecodeProgress:
    return DecodeProgress(
        itl_target_ms=50.0,
        tokens=tokens,
        max_tokens=max_tokens,
        elapsed_ms=elapsed_ms,
        expected_tokens=expected,
    )


@pytest.mark.parametrize(
    ("decoding", "reported", "expected"),
    [
        ((), 0, None),  # nothing tracked: unknown
        ((progress(0, 6),), 3, None),  # the report shows sequences this router does not know
        # not started, 6 tokens: 5 gaps of 50 ms minus 5 steps of 10 ms
        ((progress(0, 6),), 1, 5 * 50 - 5 * 10),
        # 4 of 6 tokens in 200 ms (on pace for 50): 2 steps left -> 250 - 200 - 20
        ((progress(4, 6, 200.0),), 1, 30.0),
        # long outputs are assumed to last as long again (at least 8 more), capped by max_tokens
        ((progress(2, 1000, 20.0),), 1, 50 * 9 - 20 - 8 * 10),
        # the smallest budget wins; one-token requests have none to miss
        ((progress(0, 6), progress(4, 6, 200.0), progress(0, 1)), 2, 30.0),
        # already past saving (400 ms for 4 tokens; 2 steps left cannot bring the mean of 5
        # gaps to 50 ms): it does not count; nothing else there, so no stall breaks anything
        ((progress(4, 6, 400.0),), 1, math.inf),
        ((progress(4, 6, 400.0), progress(4, 6, 200.0)), 2, 30.0),  # the one still on pace
        ((progress(0, 1),), 1, math.inf),  # one-token requests have no ITL to break
        # its class's requests lately produced 100 tokens: it is expected to last that long
        ((progress(2, 1000, 20.0, expected=100.0),), 1, 50 * 99 - 20 - 98 * 10),
        # ... but never past its max_tokens, and never shorter than the own-length guess
        ((progress(2, 40, 20.0, expected=100.0),), 1, 50 * 39 - 20 - 38 * 10),
        ((progress(2, 1000, 20.0, expected=5.0),), 1, 50 * 9 - 20 - 8 * 10),
    ],
)
def test_itl_budget(
    decoding: tuple[DecodeProgress, ...], reported: int, expected: float | None
) -> None:
    w = worker("d1", decoding=decoding, reported_batch=reported)
    budget = itl_budget_ms(w, 10.0)
    assert budget == (None if expected is None else pytest.approx(expected))


def decide(decode_budget: tuple[DecodeProgress, ...], prefill_queue: int = 0) -> Decision:
    d1 = worker(
        "d1", running=len(decode_budget), batch_size=len(decode_budget),
        context_tokens=1024 * len(decode_budget), decoding=decode_budget,
        reported_batch=len(decode_budget),
    )  # fmt: skip
    p1 = worker("p1", "prefill", waiting=1 if prefill_queue else 0,
                queued_prefill_tokens=prefill_queue)  # fmt: skip
    out = SlaAwareRouter().decide(request(3000), [d1, p1], random.Random(0))
    assert isinstance(out, Decision), out
    return out


def test_a_prefill_that_fits_every_budget_stays_local_past_one_steps_slack() -> None:
    # 3k tokens (~100 ms) is past one step's slack (~41 ms), but the two requests decoding on
    # d1 are fresh with long outputs: their TPOT absorbs it
    d = decide((progress(0, 100), progress(10, 100, 90.0)))
    v = d.trace.disaggregation
    assert d.prefill is None and v is not None and not v.remote
    assert "fits the ITL budget" in v.reason and v.itl_budget_ms is not None


def test_a_prefill_that_breaks_budgets_goes_remote_even_when_late() -> None:
    # two requests on d1 have 1 token left and are on the edge of their target: no budget.
    # p1's queue makes the remote prefill miss the 500 ms TTFT target, which would keep a
    # local one (rule g) were it not for those budgets: two misses against one
    nearly_done = (progress(5, 6, 240.0), progress(5, 6, 240.0))
    d = decide(nearly_done, prefill_queue=30_000)
    v = d.trace.disaggregation
    assert d.prefill is not None and d.prefill.worker_id == "p1", v
    assert v is not None and v.remote and v.breaks_itl_budget and v.itl_breaks == 2
    assert "smallest ITL budget" in v.reason and "(2 past it)" in v.reason
    # with the prefill pool idle the remote prefill is on time: remote for one budget too
    idle = decide(nearly_done[:1])
    assert idle.prefill is not None and idle.trace.disaggregation is not None
    assert idle.trace.disaggregation.itl_breaks == 1
    # one budget against a late remote first token: one miss either way, local it stays
    one = decide(nearly_done[:1], prefill_queue=30_000)
    v = one.trace.disaggregation
    assert one.prefill is None and v is not None and not v.remote and v.itl_breaks == 1, v
    assert "for one request's ITL" in v.reason
    # the same request with budget to spare stays local (rule g keeps TTFT)
    roomy = decide((progress(0, 100),), prefill_queue=30_000)
    assert roomy.prefill is None


def test_a_request_past_saving_does_not_send_prefills_remote() -> None:
    # the one request on d1 is far behind (1 s for 5 tokens, one left): it misses its ITL
    # target whatever happens, so the prefill stays local where its TTFT is met
    lost = decide((progress(5, 6, 1000.0),), prefill_queue=30_000)
    v = lost.trace.disaggregation
    assert lost.prefill is None and v is not None and not v.remote, v
    assert v.itl_budget_ms == math.inf and "has an ITL target a stall could break" in v.reason
    # beside requests still on pace the same prefill goes remote to spare them; the lost one
    # is not counted among those it would break
    on_pace = (progress(5, 6, 1000.0), progress(5, 6, 240.0), progress(5, 6, 240.0))
    both = decide(on_pace, prefill_queue=30_000)
    assert both.prefill is not None and both.trace.disaggregation is not None
    assert both.trace.disaggregation.itl_breaks == 2
