"""The router's own pending prefills: a floor under the reported queue that is never stale."""

from __future__ import annotations

import pytest

from controlplane.core.routing import SlaAwareRouter
from controlplane.core.routing.framework import Decision
from controlplane.core.routing.predict import queue_ms, queued_interference_ms
from controlplane.gateway.workers_view import PendingPrefill
from tests.unit.routing_builders import TIMING, request, worker


@pytest.mark.parametrize(
    ("reported", "waiting", "pending", "expected_ms"),
    [
        (None, 0, 0, 0.0),  # idle by the report, nothing sent since
        (0, 0, 4096, TIMING.prefill_ms(4096, 0)),  # the report is stale: our 4k prompt waits
        (None, 0, 4096, TIMING.prefill_ms(4096, 0)),
        (8192, 1, 1024, TIMING.prefill_ms(8192, 0)),  # the report already shows more
        (None, 2, 0, 2 * TIMING.prefill_ms(512, 0)),  # unknown queue: 2 prompts like this one
        # 3 reported prompts of 10k: three passes, not one 30k one
        (30_000, 3, 0, 3 * TIMING.prefill_ms(10_000, 0)),
    ],
)
def test_queue_is_at_least_the_routers_own_pending_prefills(
    reported: int | None, waiting: int, pending: int, expected_ms: float
) -> None:
    w = worker(
        "d1", queued_prefill_tokens=reported, waiting=waiting, pending_prefill_tokens=pending
    )
    assert queue_ms(request(512), w) == pytest.approx(expected_ms)


@pytest.mark.parametrize(
    ("tokens", "prompts", "expected_ms"),
    [
        (0, 0, 0.0),
        (4096, 0, TIMING.prefill_ms(4096, 0)),  # prompts unknown: one
        (4096, 1, TIMING.prefill_ms(4096, 0)),
        (20_000, 20, 20 * TIMING.prefill_ms(1000, 0)),  # twenty 1k prompts, each its own pass
        (90_000, 3, 3 * TIMING.prefill_ms(30_000, 0)),
    ],
)
def test_pending_prompts_are_prefilled_one_by_one(
    tokens: int, prompts: int, expected_ms: float
) -> None:
    w = worker("d1", pending_prefill_tokens=tokens, pending_prefill_prompts=prompts)
    assert queue_ms(request(512), w) == pytest.approx(expected_ms)
    # the compute those prompts add to a decode batch's steps: the same, without the passes
    n = max(prompts, 1)
    compute = n * TIMING.prefill_compute_ms(tokens // n, 0)
    assert queued_interference_ms(request(512), w) == pytest.approx(compute)
    if prompts > 1:  # one prompt of all the tokens would count pairs across prompts
        assert queue_ms(request(512), w) < TIMING.prefill_ms(tokens, 0)


def test_a_burst_spreads_before_the_next_report() -> None:
    """Two decode workers that both reported idle: a 4k prompt just sent to d1 (no report yet)
    makes the next one go to d2."""
    import random

    router = SlaAwareRouter()
    busy_d1 = [worker("d1", pending_prefill_tokens=4096, inflight_here=1), worker("d2")]
    req = request(4096)
    second = router.route(req, busy_d1, rng=random.Random(0))
    assert isinstance(second, Decision), second
    assert second.decode.worker_id == "d2", second.trace.explain()
    assert "TtftHeadroom" in second.trace.explain()
    busy_d2 = [worker("d1"), worker("d2", pending_prefill_tokens=4096, inflight_here=1)]
    # a fresh router: the first one's index now has the prompt's blocks on d2
    mirrored = SlaAwareRouter().route(req, busy_d2, rng=random.Random(0))
    assert isinstance(mirrored, Decision) and mirrored.decode.worker_id == "d1"


def test_pending_prefill_marks_count_once() -> None:
    pending: dict[str, int] = {}
    prompts: dict[str, int] = {}
    a = PendingPrefill(pending, "w", 100, prompts)
    b = PendingPrefill(pending, "w", 50, prompts)
    assert pending == {"w": 150} and prompts == {"w": 2}
    a.done()
    a.done()  # idempotent
    assert pending == {"w": 50} and prompts == {"w": 1}
    b.done()
    assert pending == {} and prompts == {}
    PendingPrefill(pending, "w", 0, prompts).done()
    assert pending == {} and prompts == {}
    PendingPrefill(pending, "w", 10).done()  # tokens only
    assert pending == {}


def test_the_view_counts_pending_prompts_for_the_router() -> None:
    from tests.unit.test_gateway_sla_wiring import QuietView, rec

    view = QuietView()
    view.put(rec("d1"))
    with view.in_flight("d1", 1000) as first, view.in_flight("d1", 3000):
        (snap,) = view.snapshots("sim-model", lambda _: True)
        assert (snap.pending_prefill_tokens, snap.pending_prefill_prompts) == (4000, 2)
        first.done()  # its first token came back
        (snap,) = view.snapshots("sim-model", lambda _: True)
        assert (snap.pending_prefill_tokens, snap.pending_prefill_prompts) == (3000, 1)
    (snap,) = view.snapshots("sim-model", lambda _: True)
    assert (snap.pending_prefill_tokens, snap.pending_prefill_prompts) == (0, 0)


def test_the_views_in_flight_count_ends_with_its_block_even_on_an_error() -> None:
    from tests.unit.test_gateway_sla_wiring import QuietView, rec

    view = QuietView()
    view.put(rec("d1"))
    seen: list[object] = []

    def failing_call() -> None:
        with view.in_flight("d1", 500):
            seen.append(
                (dict(view.inflight), dict(view.pending_prefill), dict(view.pending_prompts))
            )
            raise RuntimeError("the call failed")

    with pytest.raises(RuntimeError):
        failing_call()
    assert seen == [({"d1": 1}, {"d1": 500}, {"d1": 1})]
    assert (view.inflight, view.pending_prefill, view.pending_prompts) == ({}, {}, {})
    with view.in_flight("d1") as mark:  # no prompt to prefill there: counted in flight only
        assert (view.inflight, view.pending_prefill) == ({"d1": 1}, {})
        mark.done()
    assert view.inflight == {}
