"""The gateway's own KV reservations: a worker's reported KV use, corrected by the requests this
gateway started or ended there since the report (reports are up to an interval old)."""

from __future__ import annotations

import dataclasses
import random

import pytest

from controlplane.core.routing import SlaAwareRouter
from controlplane.core.routing.framework import Decision
from controlplane.gateway.sla_routing import worker_state
from tests.unit.routing_builders import BLOCK, MODEL, TIMING, request
from tests.unit.test_gateway_sla_wiring import QuietView, rec, report


def kv_used(view: QuietView, worker_id: str = "d1") -> int:
    snaps = {s.worker_id: s for s in view.snapshots("sim-model", lambda _: True)}
    return snaps[worker_id].kv_blocks_used


def test_requests_started_and_ended_since_the_report_move_its_kv_figure() -> None:
    view = QuietView()
    view.put(rec("d1"))
    view.on_report("d1", report(kv_blocks_used=10))  # others' requests: 10 blocks
    assert kv_used(view) == 10
    with view.in_flight("d1", kv_blocks=6):
        assert kv_used(view) == 16  # not in the report yet
        with view.in_flight("d1", kv_blocks=20):
            assert kv_used(view) == 36
            # a report while both run counts them already: not counted twice
            view.on_report("d1", report(kv_blocks_used=30))
            assert kv_used(view) == 30
        assert kv_used(view) == 10  # one of them ended after that report
    assert kv_used(view) == 4
    view.on_report("d1", report(kv_blocks_used=0))
    with view.in_flight("d1", kv_blocks=8):
        view.on_report("d1", report(kv_blocks_used=5))  # it holds less than it may
    assert kv_used(view) == 0  # never below nothing
    assert view.kv_reserved == {}


def test_reservations_end_with_their_block_even_on_an_error() -> None:
    view = QuietView()
    view.put(rec("d1"))

    def failing_call() -> None:
        with view.in_flight("d1", 100, kv_blocks=7):
            assert view.kv_reserved == {"d1": 7}
            raise RuntimeError("the call failed")

    with pytest.raises(RuntimeError):
        failing_call()
    assert view.kv_reserved == {} and view.inflight == {}


def test_a_worker_whose_requests_ended_since_its_full_report_is_used_again() -> None:
    """d1 reported its KV full of this gateway's requests, which have all ended since; d2 is
    busy with others'. By the reports alone neither has room for the request until d1's next
    report (the router fell back, or, with d2 just short of full, sent every request to it
    while d1 sat idle: the herd that swung between two workers, each full in turn)."""
    view = QuietView()
    view.put(rec("d1"), rec("d2"))
    req = request(16 * BLOCK, max_tokens=16 * BLOCK)  # 32 blocks with its output
    mine = [view.in_flight("d1", kv_blocks=30) for _ in range(2)]
    for m in mine:
        m.__enter__()
    view.on_report("d1", report(kv_blocks_used=60, running_requests=2))
    view.on_report("d2", report(kv_blocks_used=40, running_requests=3))
    for m in mine:
        m.__exit__(None, None, None)

    snaps = view.snapshots("sim-model", lambda _: True)
    states = [worker_state(s, model=MODEL, timing=TIMING) for s in snaps]
    assert {s.worker_id: s.kv_blocks_free for s in states} == {"d1": 64, "d2": 24}
    d = SlaAwareRouter().route(req, states, rng=random.Random(0))
    assert isinstance(d, Decision), d
    assert d.decode.worker_id == "d1", d.trace.explain()
    assert "d2: needs 32 KV blocks, 24 free" in d.trace.explain()

    # by the stale report alone, d1 has no room for it either
    view.loads["d1"] = dataclasses.replace(view.loads["d1"], kv_reserved_here=0)
    snaps = view.snapshots("sim-model", lambda _: True)
    stale = [worker_state(s, model=MODEL, timing=TIMING) for s in snaps]
    assert not isinstance(SlaAwareRouter().route(req, stale, rng=random.Random(0)), Decision)
