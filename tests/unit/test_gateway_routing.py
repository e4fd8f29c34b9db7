"""The gateway's pure routing policy and circuit breakers: table-driven, hand-built workers."""

from __future__ import annotations

import pytest

from controlplane.gateway.routing import (
    CircuitBreakers,
    CircuitState,
    LeastLoadedRouter,
    NoRoute,
    Route,
    WorkerSnapshot,
)


def w(worker_id: str, role: str, load: int = 0, **kw: object) -> WorkerSnapshot:
    return WorkerSnapshot(
        worker_id=worker_id,
        endpoint=f"127.0.0.1:{worker_id}",
        role=role,
        running=load,
        **kw,  # type: ignore[arg-type]
    )


@pytest.mark.parametrize(
    ("workers", "kwargs", "prefill", "decode"),
    [
        # P/D pair: least loaded of each
        ([w("p1", "prefill", 3), w("p2", "prefill", 1), w("d1", "decode", 2), w("d2", "decode")],
         {}, "p2", "d2"),
        # no prefill worker: aggregated on a decode-capable worker
        ([w("b1", "both", 4), w("b2", "both", 1)], {}, None, "b2"),
        # asked for aggregated: no prefill even though there is one
        ([w("p1", "prefill"), w("d1", "decode")], {"aggregated": True}, None, "d1"),
        # ties go to the lower id
        ([w("d2", "decode"), w("d1", "decode")], {}, None, "d1"),
        # in-flight from this gateway counts as load
        ([w("d1", "decode", inflight_here=5), w("d2", "decode", 2)], {}, None, "d2"),
        # waiting counts too
        ([w("d1", "decode", 1, waiting=3), w("d2", "decode", 2)], {}, None, "d2"),
        # draining, open circuit and excluded workers are skipped
        ([w("d1", "decode", serving=False), w("d2", "decode", circuit_allows=False),
          w("d3", "decode", 9), w("d4", "decode")], {"exclude": frozenset({"d4"})}, None, "d3"),
        # a prefill worker is never a decode target
        ([w("p1", "prefill"), w("b1", "both", 7)], {}, "p1", "b1"),
    ],
)  # fmt: skip
def test_least_loaded_route(
    workers: list[WorkerSnapshot], kwargs: dict[str, object], prefill: str | None, decode: str
) -> None:
    route = LeastLoadedRouter().route(workers, **kwargs)  # type: ignore[arg-type]
    assert isinstance(route, Route)
    assert route.decode.worker_id == decode
    assert (route.prefill.worker_id if route.prefill else None) == prefill


def test_no_route_says_why() -> None:
    r = LeastLoadedRouter()
    assert isinstance(r.route([]), NoRoute)
    out = r.route(
        [w("p1", "prefill"), w("d1", "decode", serving=False), w("d2", "decode")],
        exclude=frozenset({"d2"}),
    )
    assert isinstance(out, NoRoute)
    assert "d1: draining" in out.reasons
    assert "d2: failed this request" in out.reasons
    assert "tiny" in out.message("tiny")


def test_breaker_opens_after_consecutive_failures_and_probes_after_cooldown() -> None:
    b = CircuitBreakers(failure_threshold=3, cooldown_s=5.0)
    assert b.allows("w", 0.0)
    assert not b.record_failure("w", 1.0)
    b.record_success("w")  # resets the count
    assert not b.record_failure("w", 2.0)
    assert not b.record_failure("w", 2.1)
    assert b.record_failure("w", 2.2)  # third in a row: opens
    assert b.state("w", 3.0) is CircuitState.OPEN
    assert not b.allows("w", 7.1)
    assert b.allows("w", 7.2)  # cooldown over: one probe
    assert b.state("w", 7.2) is CircuitState.HALF_OPEN
    b.acquire("w", 7.2)
    assert not b.allows("w", 7.3)  # only one probe at a time
    assert b.record_failure("w", 7.4)  # the probe failed: open again from now
    assert not b.allows("w", 12.3)
    assert b.allows("w", 12.4)
    b.acquire("w", 12.4)
    b.record_success("w")
    assert b.state("w", 12.5) is CircuitState.CLOSED
    assert b.allows("w", 12.5)
    assert b.allows("other", 0.0)


def test_breaker_rejects_bad_settings() -> None:
    with pytest.raises(ValueError):
        CircuitBreakers(failure_threshold=0)
    with pytest.raises(ValueError):
        CircuitBreakers(cooldown_s=0)
