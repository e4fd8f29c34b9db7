"""WorkerReplica: the Ray actor that runs one worker (``workers.main.run_worker``) in its loop.

It is an async actor: ``start`` launches the worker as a task on the actor's event loop and
returns once it serves (its gRPC address) or failed; ``drain`` sets the worker's stop event and
waits for the drain (in-flight requests finish, then the worker deregisters). If the node or the
actor process dies, the worker dies with it and its etcd lease expires.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import Any

log = logging.getLogger(__name__)


class WorkerReplica:
    def __init__(self) -> None:
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._address: asyncio.Future[str] | None = None
        self._error = ""

    async def start(self, settings_json: str) -> str:
        """Start the worker (idempotent); its address once serving. Raises if it failed."""
        from workers.main import worker_settings_from_dict

        if self._task is None:
            logging.basicConfig(level=logging.INFO)
            settings = worker_settings_from_dict(json.loads(settings_json))
            loop = asyncio.get_running_loop()
            self._address = loop.create_future()
            self._task = loop.create_task(self._run(settings))
        assert self._address is not None
        return await asyncio.shield(self._address)

    async def _run(self, settings: Any) -> None:
        from workers.main import run_worker

        assert self._address is not None
        address = self._address

        def serving(addr: str) -> None:
            if not address.done():
                address.set_result(addr)

        try:
            await run_worker(settings, self._stop, on_serving=serving)
        except Exception as e:
            log.exception("worker failed")
            self._error = f"{type(e).__name__}: {e}"
            if not address.done():
                address.set_exception(RuntimeError(self._error))

    async def drain(self, timeout_s: float) -> bool:
        """Stop taking work, let in-flight requests finish, deregister. True if it ended."""
        self._stop.set()
        if self._task is None:
            return True
        with contextlib.suppress(TimeoutError, asyncio.CancelledError, Exception):
            await asyncio.wait_for(asyncio.shield(self._task), timeout_s)
        return self._task.done()

    async def status(self) -> dict[str, Any]:
        done = self._address is not None and self._address.done()
        return {
            "running": self._task is not None and not self._task.done(),
            "address": self._address.result() if done and self._address and not self._error else "",
            "error": self._error,
        }
