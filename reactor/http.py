"""The operator endpoints: `/metrics` (Prometheus text format), `/healthz` (the process and its
event loop answer) and `/readyz` (MongoDB reachable, change stream open, first sweep done —
answered from state the service keeps, never a database round trip per request).

The listener is guarded the way an exposed port must be: a request's headers must arrive within
HEADER_TIMEOUT_S of the connection (or of the previous response), lines, headers and bodies are
capped, and a malformed request is one log line naming the peer and the error, never a
traceback carrying the client's bytes. Responses carry no server version.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp.web_response
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from .metrics import Metrics

ReadyCheck = Callable[[], Awaitable[dict[str, bool]]]

HEADER_TIMEOUT_S = 5.0  # aiohttp's keep-alive deadline, armed at connect and not extended by
# partial data: a request whose headers are not complete by then is dropped
MAX_LINE_BYTES = 4096
MAX_BODY_BYTES = 64 * 1024

# aiohttp stamps every response, its own error pages included (built outside any application,
# so no response signal reaches them), with "Python/3.x aiohttp/3.y". It reads this default when
# it builds the headers: a name without versions, for the whole process.
aiohttp.web_response.SERVER_SOFTWARE = "campaign-reactor"  # type: ignore[attr-defined]


class _OneLineErrors(logging.Filter):
    """aiohttp logs a bad request with its traceback (and the client's bytes in it): keep one
    line with the error's type and the first, shortened, line of its message."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            text = str(exc).splitlines()[0] if str(exc) else ""
            peer = record.args[0] if isinstance(record.args, tuple) and record.args else "?"
            record.msg = "bad request from %s: %s %s"
            record.args = (peer, type(exc).__name__, ascii(text[:120]))
            record.exc_info = None
            record.exc_text = None
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


def edge_logger(name: str) -> logging.Logger:
    logger = logging.getLogger(name)
    if not any(isinstance(f, _OneLineErrors) for f in logger.filters):
        logger.addFilter(_OneLineErrors())
    return logger


def guarded_application(*, max_body_bytes: int = MAX_BODY_BYTES, **kwargs: Any) -> web.Application:
    return web.Application(client_max_size=max_body_bytes, **kwargs)


async def start_site(
    app: web.Application, host: str, port: int, *, logger: str = "reactor.http"
) -> tuple[web.AppRunner, int]:
    """Serve `app` on host:port (0 picks a free port); returns the runner and the bound port."""
    runner = web.AppRunner(
        app,
        access_log=None,
        keepalive_timeout=HEADER_TIMEOUT_S,
        max_line_size=MAX_LINE_BYTES,
        max_field_size=MAX_LINE_BYTES,
        logger=edge_logger(logger),
    )
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    server = site._server
    assert server is not None
    return runner, int(server.sockets[0].getsockname()[1])  # type: ignore[attr-defined]


class OpsServer:
    def __init__(self, metrics: Metrics, ready: ReadyCheck, host: str, port: int) -> None:
        self._metrics = metrics
        self._ready = ready
        self.host = host
        self.port = port
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = guarded_application()
        app.router.add_get("/metrics", self._get_metrics)
        app.router.add_get("/healthz", self._get_health)
        app.router.add_get("/readyz", self._get_ready)
        self._runner, self.port = await start_site(app, self.host, self.port)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _get_metrics(self, request: web.Request) -> web.Response:
        body = generate_latest(self._metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _get_health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def _get_ready(self, request: web.Request) -> web.Response:
        checks = await self._ready()
        ok = all(checks.values())
        return web.json_response({"ready": ok, "checks": checks}, status=200 if ok else 503)
