"""The list-then-watch loop every watch-fed cache runs (tenants, deployments).

List a prefix, hand the snapshot over, then apply the watch's events from the next revision on.
When the stream breaks (etcd restarted, compaction, a network blip), keep serving the last view,
wait with exponential backoff and list again: level-based, so nothing missed in between is lost.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import NoReturn, TypeVar

from controlplane.errors import SwitchboardError

log = logging.getLogger(__name__)

E = TypeVar("E")


async def list_and_watch(
    what: str,
    relist: Callable[[], Awaitable[int]],
    watch: Callable[[int], AsyncIterator[E]],
    apply: Callable[[E], Awaitable[None]],
    *,
    synced: asyncio.Event,
    ever_synced: asyncio.Event,
    backoff_s: tuple[float, float] = (0.1, 2.0),
) -> NoReturn:
    """Run forever (until cancelled). ``relist`` replaces the cache and returns the revision
    it read at; ``apply`` takes one watch event. ``synced`` is set while the watch is live."""
    delay = backoff_s[0]
    while True:
        try:
            revision = await relist()
            synced.set()
            ever_synced.set()
            delay = backoff_s[0]
            log.info("%s cache synced at revision %d", what, revision)
            async for ev in watch(revision + 1):
                await apply(ev)
        except asyncio.CancelledError:
            raise
        except SwitchboardError as e:
            log.warning("%s list/watch failed (%s); re-listing in %.1fs", what, e, delay)
        except Exception:
            log.exception("%s cache loop failed; re-listing in %.1fs", what, delay)
        synced.clear()
        await asyncio.sleep(delay)
        delay = min(delay * 2, backoff_s[1])
