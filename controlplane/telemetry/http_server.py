"""MetricsServer: a small asyncio HTTP server for ``GET /metrics`` (and a few more GET routes).

For processes without an HTTP port of their own (workers, the control plane, node agents).
It runs on the process's event loop, so extra routes (the control plane's ``/sd/targets``) read
in-memory state without locks. HTTP/1.1, GET only, one request per connection (the response
says ``Connection: close``), 8 KiB of request head at most: enough for Prometheus and curl.
``port=0`` binds a free port; ``port`` says which after ``start``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

log = logging.getLogger(__name__)

Route = Callable[[], tuple[str, bytes]]
"""A GET route: () -> (content type, body)."""

_MAX_HEAD = 8192
_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            500: "Internal Server Error"}  # fmt: skip


class MetricsServer:
    def __init__(
        self,
        registry: CollectorRegistry,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        routes: Mapping[str, Route] | None = None,
    ) -> None:
        self.registry = registry
        self.host = host
        self.port = port
        self.routes: dict[str, Route] = {
            "/metrics": lambda: (CONTENT_TYPE_LATEST, generate_latest(self.registry)),
            "/health": lambda: ("text/plain; charset=utf-8", b"ok\n"),
            **(routes or {}),
        }
        self._server: asyncio.Server | None = None

    @property
    def endpoint(self) -> str:
        """host:port (after ``start``)."""
        return f"{self.host}:{self.port}"

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._handle, self.host, self.port)
        self.port = int(self._server.sockets[0].getsockname()[1])
        log.info("metrics on http://%s/metrics", self.endpoint)
        return self.port

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
            self._server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=10.0)
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
                return
            if len(head) > _MAX_HEAD:
                await self._respond(writer, 400, "text/plain", b"request head too large\n")
                return
            parts = head.split(b"\r\n", 1)[0].split(b" ")
            if len(parts) != 3:
                await self._respond(writer, 400, "text/plain", b"malformed request line\n")
                return
            method, target = parts[0].decode("latin-1"), parts[1].decode("latin-1")
            path = target.split("?", 1)[0]
            route = self.routes.get(path)
            if route is None:
                await self._respond(writer, 404, "text/plain", f"no route {path}\n".encode())
                return
            if method not in ("GET", "HEAD"):
                await self._respond(writer, 405, "text/plain", b"only GET\n", allow=True)
                return
            try:
                content_type, body = route()
            except Exception as e:  # a broken collector must not kill the server
                log.exception("metrics route %s failed", path)
                await self._respond(writer, 500, "text/plain", f"{e}\n".encode())
                return
            await self._respond(writer, 200, content_type, b"" if method == "HEAD" else body)
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    @staticmethod
    async def _respond(
        writer: asyncio.StreamWriter,
        status: int,
        content_type: str,
        body: bytes,
        *,
        allow: bool = False,
    ) -> None:
        lines = [
            f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}",
            f"Content-Type: {content_type}",
            f"Content-Length: {len(body)}",
            "Connection: close",
        ]
        if allow:
            lines.append("Allow: GET, HEAD")
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
        await writer.drain()


def parse_metrics_port(value: int) -> int:
    """A ``--metrics-port`` value: -1 (off), 0 (a free port) or 1..65535."""
    if not -1 <= value <= 65535:
        raise ValueError(f"--metrics-port {value} must be -1 (off), 0 (any free port) or a port")
    return value
