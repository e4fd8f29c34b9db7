"""The late lane: the pure rule (``controlplane/core/routing/late.py``), the gateway's lane
(``controlplane/gateway/late_lane.py``) and ``Gateway`` holding a late request until the
fleet's queues leave room."""

from __future__ import annotations

import asyncio

import pytest

from controlplane.core.routing.late import NO_HOLD, LatePolicy, Prediction
from controlplane.gateway.late_lane import LateLane
from controlplane.gateway.pipeline import OUTPUT_TOKENS_WEIGHT, Gateway, Progress
from controlplane.gateway.routing import Route
from controlplane.gateway.sla_routing import Held
from controlplane.gateway.workers_view import LoadReport
from controlplane.telemetry.metrics import TokenTimer
from tests.unit.test_gateway_sla_wiring import SIM, QuietView, gateway, rec
from workers.engines.sim_core import hash_blocks

# --- the rule ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ttft", "queue", "target", "late", "release"),
    [
        (400.0, 300.0, 500.0, False, False),  # on time: sent at once (never held)
        (600.0, 500.0, 500.0, True, False),  # late: held, its queue still too long to go
        (250.0, 150.0, 500.0, False, True),  # within half the target: leaves room, goes
        (3000.0, 0.0, 500.0, True, True),  # its prefill alone is too long: goes when idle
        (9000.0, 100.0, None, False, True),  # no TTFT target (batch): never late
    ],
)
def test_late_and_release(
    ttft: float, queue: float, target: float | None, late: bool, release: bool
) -> None:
    policy = LatePolicy()
    p = Prediction(ttft_ms=ttft, queue_ms=queue)
    assert policy.is_late(p, target) is late
    assert policy.may_release(p, target) is release
    assert NO_HOLD.is_late(p, target) is False  # off: nothing is late


def test_longest_hold_scales_with_the_class_target() -> None:
    assert LatePolicy(max_hold_factor=4).max_hold_s(500.0) == pytest.approx(2.0)
    assert LatePolicy().max_hold_s(None) == 0.0
    assert not NO_HOLD.enabled and LatePolicy().enabled
    with pytest.raises(ValueError, match="max_hold_factor"):
        LatePolicy(max_hold_factor=-1)
    with pytest.raises(ValueError, match="release_fraction"):
        LatePolicy(release_fraction=0)


# --- the lane ------------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_lane_releases_oldest_first_one_per_tick_and_on_the_deadline() -> None:
    clock = Clock()
    lane = LateLane(tick_s=3600, clock=clock)  # ticks driven by hand (release_once)
    room = {"open": False}
    order: list[str] = []

    async def held(name: str, max_hold_s: float, model: str = "m") -> None:
        await lane.hold(model, lambda: room["open"], max_hold_s)
        order.append(name)

    tasks = [
        asyncio.create_task(held("a", 10)),
        asyncio.create_task(held("b", 10)),
        asyncio.create_task(held("c", 1)),
        asyncio.create_task(held("x", 10, model="other")),
    ]
    await settle()
    assert lane.waiting("m") == 3 and lane.waiting("other") == 1
    lane.release_once()
    await settle()
    assert order == []  # no room, nobody past the longest hold
    clock.now += 1.0  # c's longest hold is over: it goes whatever the queues say
    lane.release_once()
    await settle()
    assert order == ["c"]
    room["open"] = True
    lane.release_once()  # one per model per tick, oldest first
    await settle()
    assert sorted(order) == ["a", "c", "x"] and order.index("a") > order.index("c")
    lane.release_once()
    await settle()
    assert order[-1] == "b" and lane.waiting("m") == 0
    await asyncio.gather(*tasks)
    await lane.close()


async def test_a_cancelled_request_leaves_the_lane_and_close_releases_the_rest() -> None:
    lane = LateLane(tick_s=3600, clock=Clock())
    gone = asyncio.create_task(lane.hold("m", lambda: False, 60))
    stays = asyncio.create_task(lane.hold("m", lambda: False, 60))
    await settle()
    gone.cancel()
    await settle()
    lane.release_once()
    assert lane.waiting("m") == 1
    await lane.close()  # stopping: the held requests go to the workers
    assert await asyncio.wait_for(stays, 1) >= 0.0


async def test_a_failing_prediction_releases_the_request() -> None:
    lane = LateLane(tick_s=0.001)

    def broken() -> bool:
        raise RuntimeError("no snapshot")

    assert await asyncio.wait_for(lane.hold("m", broken, 60), 5) < 60


# --- the gateway ---------------------------------------------------------------------------------


def late_gateway() -> tuple[Gateway, QuietView]:
    view = QuietView()
    view.put(rec("d1"), rec("p1", "prefill"), models=(SIM,))
    gw = gateway(view, late_policy=LatePolicy(max_hold_factor=4))
    gw.late_lane = LateLane(tick_s=0.001, clock=gw.clock)
    return gw, view


def backlog(view: QuietView, tokens: int | None) -> None:
    for w in ("d1", "p1"):
        view.loads[w] = LoadReport(
            waiting=1 if tokens else 0, queued_prefill_tokens=tokens, kv_blocks_total=64
        )


async def test_a_late_request_is_held_until_the_queues_leave_room() -> None:
    gw, view = late_gateway()
    prompt = tuple(range(300))
    backlog(view, 100_000)  # ~6 s of prefill queued on tiny-test: late for interactive (500 ms)
    routed = gw._route_or_hold("sim-model", prompt, 4, frozenset(), False, sla_class="interactive",
                       hold_late=True)  # fmt: skip
    assert isinstance(routed, Held) and routed.prediction.ttft_ms > 500
    assert gw.sla_router is not None  # a held decision records nothing in the prefix index
    blocks = hash_blocks(prompt, 16)
    assert gw.sla_router.core.index.overlaps(blocks, ["d1", "p1"]) == {"d1": 0, "p1": 0}
    # the batch class has no TTFT target: never held
    batch = gw._route_or_hold("sim-model", prompt, 4, frozenset(), False, sla_class="batch",
                      hold_late=True)  # fmt: skip
    assert isinstance(batch, Route)

    hold = asyncio.create_task(gw._hold_late("sim-model", prompt, 4, "interactive", ""))
    await asyncio.sleep(0.05)
    assert not hold.done() and gw.late_lane.waiting("sim-model") == 1
    assert gw.metrics.late_held.labels("sim-model", "interactive")._value.get() == 1
    backlog(view, None)  # the queues drained
    await asyncio.wait_for(hold, 5)
    assert gw.late_lane.waiting("sim-model") == 0
    routed = gw._route_or_hold("sim-model", prompt, 4, frozenset(), False, sla_class="interactive",
                       hold_late=True)  # fmt: skip
    assert isinstance(routed, Route)  # on time now: routed at once
    # the debug header says how long the late lane held a request
    progress = Progress(explain_route=True)
    gw._route_or_hold("sim-model", prompt, 4, frozenset(), False, sla_class="interactive",
                      progress=progress, held_s=0.25)  # fmt: skip
    assert "; held=250ms; " in progress.route


async def test_a_held_request_goes_after_its_longest_hold() -> None:
    gw, view = late_gateway()
    gw.late_policy = LatePolicy(max_hold_factor=0.1)  # 50 ms for interactive
    backlog(view, 100_000)
    held = await asyncio.wait_for(
        gw._hold_late("sim-model", tuple(range(300)), 4, "interactive", ""), 5
    )
    assert gw.late_lane.waiting("sim-model") == 0
    count = gw.metrics.late_hold.labels("sim-model")._sum.get()
    assert count == pytest.approx(held) and held >= 0.05


def test_the_gateway_feeds_its_decoding_requests_to_the_routers_itl_budgets() -> None:
    gw, _ = late_gateway()
    assert gw.sla_router is not None and gw.sla_router.decoding_for == gw.decoding_progress
    timer = TokenTimer(gw.clock())
    timer.tokens(1, gw.clock() - 0.2)  # first token 200 ms ago
    timer.tokens(3, gw.clock())
    gw._decoding["d1"] = {1: (timer, 16, 50.0, 12.5)}
    (p,) = gw.decoding_progress("d1")
    assert p.tokens == 4 and p.max_tokens == 16 and p.itl_target_ms == 50.0
    assert p.expected_tokens == 12.5
    assert p.elapsed_ms == pytest.approx(200, abs=50)
    assert gw.decoding_progress("p1") == ()


def test_completed_requests_set_their_class_s_expected_output_length() -> None:
    gw, _ = late_gateway()
    now = gw.clock()

    def done(tokens: int, *, cls: str = "interactive", failed: bool = False) -> None:
        progress = Progress(arrived=now)
        progress.timer = TokenTimer(now)
        progress.timer.tokens(1, now + 0.05)
        if tokens > 1:
            progress.timer.tokens(tokens - 1, now + 0.5)
        progress.sla_class = cls
        gw.finish("/v1/completions", "500" if failed else "200", "sim-model", progress,
                  error=failed)  # fmt: skip

    assert gw._output_tokens == {}
    done(100)
    assert gw._output_tokens[("sim-model", "interactive")] == 100.0  # the first sets it
    done(20)
    expected = 100.0 + OUTPUT_TOKENS_WEIGHT * (20 - 100)  # then it moves toward each new one
    assert gw._output_tokens[("sim-model", "interactive")] == pytest.approx(expected)
    done(1000, failed=True)  # a failed request says nothing about output lengths
    done(7, cls="standard")  # classes are kept apart
    assert gw._output_tokens[("sim-model", "interactive")] == pytest.approx(expected)
    assert gw._output_tokens[("sim-model", "standard")] == 7.0
