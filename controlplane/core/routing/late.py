"""The late lane: hold a request that would miss its TTFT target anyway, so that the requests
behind it that can still make theirs go first. Pure arithmetic on the router's predictions.

Why. Workers prefill first come, first served. In a burst, once the prefill queues are longer
than the TTFT target, every request that joins them is late, and each one it joins makes the
queue longer for the next: a burst of N requests that the fleet can serve M of on time (M < N)
ends with far fewer than M on time, because the late ones sit ahead of the ones that could
have made it. Goodput (requests meeting both targets, what an SLA is about) is higher when the
gateway keeps late requests out of the queues until they no longer push anyone else over:
scheduling by deadline, with requests whose deadline has passed demoted behind those whose
has not (the earliest-deadline-first rule for overload).

The rule, per request (its first attempt only; retries and migrations never wait):

* **late**: the route the router would pick now predicts a TTFT (``predict.ttft_ms`` of the
  worker that prefills: its queue, the prompt's uncached prefill, the KV transfer) above the
  request's class target. Classes without a TTFT target are never late.
* a late request waits in the gateway, oldest first per model, and is **released** when the
  best route's prediction for it would leave room for a fresh request: its predicted TTFT is
  within ``release_fraction`` of the target, or the worker that would prefill it has no queue
  at all (a prompt whose prefill alone exceeds the target is only ever late: it goes when a
  worker is free rather than never);
* it never waits longer than ``max_hold_factor`` x its class's TTFT target (then it goes
  anyway: nothing is dropped, the hold only reorders).

Light load: nothing is late, nothing waits; the rule costs one comparison per request.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Prediction:
    """The router's prediction for a request on the route it would pick now."""

    ttft_ms: float
    """Predicted TTFT on the worker that prefills (queue + prefill + KV transfer)."""
    queue_ms: float
    """Of which the prefill work queued ahead of it there (``predict.queue_ms``)."""


@dataclass(frozen=True, slots=True)
class LatePolicy:
    """When a request is late and when a held one may go; see the module docstring."""

    max_hold_factor: float = 4.0
    """A held request goes after at most this many times its class's TTFT target; 0: the
    lane is off (nothing is ever held)."""
    release_fraction: float = 0.5
    """A held request goes once its predicted TTFT is within this fraction of the target,
    leaving the rest of the target to the fresh requests that queue behind it."""

    def __post_init__(self) -> None:
        if self.max_hold_factor < 0:
            raise ValueError("max_hold_factor must be >= 0")
        if not 0 < self.release_fraction <= 1:
            raise ValueError("release_fraction must be in (0, 1]")

    @property
    def enabled(self) -> bool:
        return self.max_hold_factor > 0

    def is_late(self, p: Prediction, ttft_target_ms: float | None) -> bool:
        """The request would miss its TTFT target on the best route now."""
        return self.enabled and ttft_target_ms is not None and p.ttft_ms > ttft_target_ms

    def may_release(self, p: Prediction, ttft_target_ms: float | None) -> bool:
        """A held request may go now (see the module docstring)."""
        if ttft_target_ms is None:
            return True
        return p.ttft_ms <= self.release_fraction * ttft_target_ms or p.queue_ms <= 0.0

    def max_hold_s(self, ttft_target_ms: float | None) -> float:
        """How long a request of this class may be held at most (0: not at all)."""
        if ttft_target_ms is None:
            return 0.0
        return self.max_hold_factor * ttft_target_ms / 1000.0


NO_HOLD = LatePolicy(max_hold_factor=0.0)
"""The lane off."""
