"""NodeCache: the control plane's watch-fed, in-memory view of nodes.

Reads (ListNodes, WatchNodes, placement) never touch etcd: they are served from a ``NodeView``
kept current by one etcd watch. The loop is level-based: list everything at revision R, watch
from R+1, and whenever the watch breaks (etcd restarted, compacted, network blip) list again
and diff against the old view, so subscribers see exactly the changes, even when etcd came
back with different data or a lower revision.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable

from controlplane.adapters.etcd.nodes import EtcdNodeRegistry, InventoryRecord
from controlplane.core.model import Node
from controlplane.core.nodes import LabelSelector
from controlplane.core.nodeview import NodeChange, NodeView, initial_changes
from controlplane.errors import SwitchboardError, Unavailable

log = logging.getLogger(__name__)


class SubscriberLagging(Unavailable):
    """A watcher did not read its events fast enough and was dropped; watch again."""


class Subscription:
    """One watcher's bounded queue of changes."""

    def __init__(self, cache: NodeCache, maxsize: int) -> None:
        self._cache = cache
        self._queue: asyncio.Queue[NodeChange | None] = asyncio.Queue(maxsize=maxsize)
        self.lagging = False

    def push(self, change: NodeChange) -> None:
        if self.lagging:
            return
        try:
            self._queue.put_nowait(change)
        except asyncio.QueueFull:
            self.lagging = True
            self._queue.get_nowait()  # make room for the end marker
            self._queue.put_nowait(None)

    def close(self) -> None:
        self._cache._subscribers.discard(self)

    async def __aiter__(self) -> AsyncIterator[NodeChange]:
        while True:
            item = await self._queue.get()
            if item is None:
                raise SubscriberLagging("watcher fell behind the node event stream; watch again")
            yield item


class NodeCache:
    def __init__(
        self,
        registry: EtcdNodeRegistry,
        *,
        subscriber_queue: int = 10_000,
        backoff_initial_s: float = 0.1,
        backoff_max_s: float = 2.0,
        on_change: Callable[[NodeChange], None] | None = None,
    ) -> None:
        self._registry = registry
        self._view = NodeView()
        self._subscribers: set[Subscription] = set()
        self._subscriber_queue = subscriber_queue
        self._backoff = (backoff_initial_s, backoff_max_s)
        self._revision_changed = asyncio.Condition()
        self._on_change = on_change
        self.synced = asyncio.Event()  # set while the watch is live
        self.ever_synced = asyncio.Event()

    # --- reads ---------------------------------------------------------------------------
    @property
    def revision(self) -> int:
        return self._view.revision

    def get(self, node_id: str) -> Node | None:
        return self._view.get(node_id)

    def list_nodes(self, selector: LabelSelector | None = None) -> list[Node]:
        return self._view.list_nodes(selector)

    def __len__(self) -> int:
        return len(self._view)

    def subscribe(self) -> tuple[list[NodeChange], Subscription]:
        """Current nodes as ADDED changes, plus a subscription to every later change.

        Taken in one step (no await), so no change falls between the snapshot and the stream.
        """
        sub = Subscription(self, self._subscriber_queue)
        self._subscribers.add(sub)
        return initial_changes(self._view.list_nodes(), self._view.revision), sub

    async def wait_for_revision(self, revision: int, timeout_s: float = 5.0) -> bool:
        """Wait until the cache has seen ``revision`` (read-your-writes after a put)."""
        async with self._revision_changed:
            try:
                await asyncio.wait_for(
                    self._revision_changed.wait_for(lambda: self._view.revision >= revision),
                    timeout_s,
                )
            except TimeoutError:
                return False
        return True

    # --- the loop ------------------------------------------------------------------------
    async def run(self) -> None:
        """List + watch forever; never returns except by cancellation."""
        delay = self._backoff[0]
        while True:
            try:
                snap = await self._registry.snapshot()
                await self._publish(
                    self._view.replace(snap.inventories, snap.scheduling, snap.revision)
                )
                self.synced.set()
                self.ever_synced.set()
                delay = self._backoff[0]
                log.info("node cache synced at revision %d (%d nodes)", snap.revision, len(self))
                async for rec in self._registry.watch(snap.revision + 1):
                    if isinstance(rec, InventoryRecord):
                        changes = self._view.apply_inventory(rec.node_id, rec.leased, rec.revision)
                    else:
                        changes = self._view.apply_scheduling(rec.node_id, rec.status, rec.revision)
                    await self._publish(changes)
            except asyncio.CancelledError:
                raise
            except SwitchboardError as e:
                log.warning("node list/watch failed (%s); re-listing in %.1fs", e, delay)
            except Exception:
                log.exception("node cache loop failed; re-listing in %.1fs", delay)
            self.synced.clear()
            await asyncio.sleep(delay)
            delay = min(delay * 2, self._backoff[1])

    async def _publish(self, changes: list[NodeChange]) -> None:
        for change in changes:
            if self._on_change is not None:
                self._on_change(change)
            for sub in list(self._subscribers):
                sub.push(change)
        async with self._revision_changed:
            self._revision_changed.notify_all()
