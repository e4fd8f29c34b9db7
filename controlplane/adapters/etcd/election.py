"""Leader election on etcd: one lease-bound key, created only if absent.

Theory of operation
-------------------
Each replica loops:

1. grant a lease (TTL ``ttl_s``) and try to *create* ``{prefix}/leader/<name>`` with its
   identity, bound to that lease, in one transaction (``create_revision == 0``);
2. **won** -> it leads while it keeps the lease alive (refresh every ``ttl_s / 3``). A refresh
   that fails or finds the lease gone makes it step down *at once*: it may no longer be the
   leader etcd thinks of, and acting as two leaders is worse than a short gap;
3. **lost** -> it revokes its unused lease, records who leads, and watches the key until it is
   deleted (the leader's lease expired or it resigned), then campaigns again.

A leader that is SIGKILLed stops refreshing; its key vanishes after at most one TTL, and the
followers, watching it, campaign at once, so a new leader is in place within about one TTL
(the test allows two). A graceful stop revokes the lease: failover takes milliseconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from controlplane.adapters.etcd.client import EtcdClient, LeaseNotFound
from controlplane.errors import SwitchboardError

log = logging.getLogger(__name__)


class LeaderElector:
    def __init__(
        self,
        client: EtcdClient,
        *,
        key: str,
        identity: str,
        ttl_s: int = 10,
        retry_s: float = 0.5,
        on_change: Callable[[bool, str], None] | None = None,
    ) -> None:
        self._client = client
        self._key = key.encode()
        self.identity = identity
        self._ttl_s = ttl_s
        self._retry_s = retry_s
        self._on_change = on_change
        self._lease = 0
        self.is_leader = False
        self.leader_id = ""
        self.elected = asyncio.Event()
        self.demoted = asyncio.Event()
        self.demoted.set()

    def _set(self, leading: bool, leader_id: str) -> None:
        changed = (leading, leader_id) != (self.is_leader, self.leader_id)
        self.is_leader, self.leader_id = leading, leader_id
        if leading:
            self.elected.set()
            self.demoted.clear()
        else:
            self.elected.clear()
            self.demoted.set()
        if changed:
            log.info("leader: %s%s", leader_id or "<none>", " (this replica)" if leading else "")
            if self._on_change is not None:
                self._on_change(leading, leader_id)

    async def run(self) -> None:
        """Campaign forever; returns only by cancellation (then resigns)."""
        try:
            while True:
                try:
                    await self._campaign_once()
                    continue  # lost or vacated: campaign again at once
                except asyncio.CancelledError:
                    raise
                except SwitchboardError as e:
                    log.warning("leader election: %s", e)
                except Exception:
                    log.exception("leader election failed")
                self._set(False, "")
                await asyncio.sleep(self._retry_s)
        finally:
            await self.resign()

    async def resign(self) -> None:
        lease, self._lease = self._lease, 0
        was_leader = self.is_leader
        self._set(False, "")
        if lease and was_leader:
            try:
                await asyncio.wait_for(self._client.revoke_lease(lease), 2.0)
            except (SwitchboardError, TimeoutError) as e:
                log.info("could not revoke leader lease (it will expire): %s", e)

    async def _campaign_once(self) -> None:
        self._lease = await self._client.grant_lease(self._ttl_s)
        created, current = await self._client.create(
            self._key, self.identity.encode(), lease=self._lease
        )
        if created:
            self._set(True, self.identity)
            await self._hold()
            self._set(False, "")
            return
        lease, self._lease = self._lease, 0
        await self._client.revoke_lease(lease)
        if current.mod_revision == 0:  # vanished between compare and read: campaign again
            return
        self._set(False, current.value.decode(errors="replace"))
        await self._await_vacancy(current.mod_revision)

    async def _hold(self) -> None:
        interval = max(self._ttl_s / 3.0, 0.2)
        while True:
            await asyncio.sleep(interval)
            try:
                await asyncio.wait_for(self._client.keepalive_once(self._lease), interval)
            except (LeaseNotFound, SwitchboardError, TimeoutError) as e:
                log.warning("lost leadership: %s", e)
                self._lease = 0
                return

    async def _await_vacancy(self, seen_revision: int) -> None:
        """Return once the leader key is deleted (or re-check after a quiet TTL)."""

        async def watch() -> None:
            async for ev in self._client.watch_range(
                self._key, self._key + b"\0", start_revision=seen_revision + 1
            ):
                if ev.deleted:
                    self._set(False, "")
                    return
                self._set(False, ev.kv.value.decode(errors="replace"))

        with contextlib.suppress(TimeoutError):  # quiet: loop round and look again
            await asyncio.wait_for(watch(), timeout=self._ttl_s * 2)
