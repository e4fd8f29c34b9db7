"""The gateway's late lane: requests held back because they would miss their TTFT target anyway
(the rule and why: ``controlplane/core/routing/late.py``).

``LateLane.hold(model, may_go, max_hold_s)`` parks the calling request until ``may_go()`` says
it may be sent or ``max_hold_s`` has passed, oldest first per model. One task releases them:
every ``tick_s`` it asks each model's oldest request, and releases **at most one per model per
tick**: a released request's prefill counts in the workers' queues only once it is sent, so
releasing the next one in the same tick would read a queue that is about to grow. A request
past its longest hold goes at the next tick whatever the queues say. A held request whose
client leaves is cancelled and dropped from the lane; nothing else leaves it but a release.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(slots=True)
class _Held:
    may_go: Callable[[], bool]
    deadline: float
    done: asyncio.Future[None] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class LateLane:
    """See the module docstring. ``clock``: monotonic seconds (tests pass their own)."""

    def __init__(
        self, *, tick_s: float = 0.005, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.tick_s = tick_s
        self.clock = clock
        self._lanes: dict[str, deque[_Held]] = {}
        self._task: asyncio.Task[None] | None = None

    def waiting(self, model: str) -> int:
        """Requests of ``model`` held now."""
        return len(self._lanes.get(model, ()))

    async def hold(self, model: str, may_go: Callable[[], bool], max_hold_s: float) -> float:
        """Wait until ``may_go()`` or ``max_hold_s``; returns the seconds held."""
        start = self.clock()
        held = _Held(may_go, start + max_hold_s)
        self._lanes.setdefault(model, deque()).append(held)
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._release_loop())
        try:
            await held.done
        finally:
            if not held.done.done():
                held.done.cancel()  # the caller was cancelled: the loop drops it
        return self.clock() - start

    async def _release_loop(self) -> None:
        while self._lanes:
            await asyncio.sleep(self.tick_s)
            self.release_once()

    def release_once(self) -> None:
        """One tick: per model, drop cancelled requests, release the oldest if it may go,
        and every request past its longest hold."""
        now = self.clock()
        for model in list(self._lanes):
            lane = self._lanes[model]
            while lane and lane[0].done.done():
                lane.popleft()
            if lane:
                head = lane[0]
                go = head.deadline <= now
                if not go:
                    try:
                        go = head.may_go()
                    except Exception:  # a broken prediction must not strand the request
                        go = True
                if go:
                    lane.popleft()
                    head.done.set_result(None)
            expired = [h for h in lane if h.deadline <= now and not h.done.done()]
            for h in expired:
                lane.remove(h)
                h.done.set_result(None)
            if not lane:
                del self._lanes[model]

    async def close(self) -> None:
        """Release every held request (the gateway is stopping: they go to the workers)."""
        for lane in self._lanes.values():
            for h in lane:
                if not h.done.done():
                    h.done.set_result(None)
        self._lanes.clear()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
