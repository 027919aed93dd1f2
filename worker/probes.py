"""`/healthz`, `/readyz` and `/metrics` on HUB_HTTP_ADDR.

A few lines of asyncio instead of a web framework: three GET routes, one
response each, connection closed after it. Bodies never carry configuration
(no URLs, no credentials), only what is wrong.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable

import structlog
from prometheus_client import CONTENT_TYPE_LATEST

log = structlog.get_logger("worker.probes")

# Name -> "ok" or what is wrong.
Checks = dict[str, str]

_REQUEST_TIMEOUT_SECONDS = 5.0
_REASONS = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 503: "Service Unavailable"}


class ProbeServer:
    def __init__(
        self,
        address: str,
        liveness: Callable[[], Checks],
        readiness: Callable[[], Awaitable[Checks]],
        metrics: Callable[[], bytes],
    ) -> None:
        host, _, port = address.rpartition(":")
        self.host = host.strip("[]")
        self.port = int(port)
        self.liveness = liveness
        self.readiness = readiness
        self.metrics = metrics
        self.server: asyncio.Server | None = None

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, self.host, self.port)
        log.info("probes.listening", action="probes.start", address=f"{self.host}:{self.port}")

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
            self.server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(
                reader.readuntil(b"\r\n\r\n"), _REQUEST_TIMEOUT_SECONDS
            )
            method, path, *_ = request.split(b"\r\n", 1)[0].decode("latin-1").split(" ")
            status, content_type, body = await self._route(method, path.split("?", 1)[0])
            head = (
                f"HTTP/1.1 {status} {_REASONS[status]}\r\n"
                f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
                "Connection: close\r\n\r\n"
            )
            writer.write(head.encode("latin-1") + body)
            await writer.drain()
        except (TimeoutError, ValueError, ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def _route(self, method: str, path: str) -> tuple[int, str, bytes]:
        if method != "GET":
            return 405, "text/plain", b"GET only\n"
        if path == "/metrics":
            return 200, CONTENT_TYPE_LATEST, self.metrics()
        if path == "/healthz":
            return _verdict("alive", self.liveness())
        if path == "/readyz":
            return _verdict("ready", await self.readiness())
        return 404, "text/plain", b"not found: try /healthz, /readyz or /metrics\n"


def _verdict(name: str, checks: Checks) -> tuple[int, str, bytes]:
    good = all(v == "ok" for v in checks.values())
    body = json.dumps({name: good, "checks": checks}).encode() + b"\n"
    return (200 if good else 503), "application/json", body
