"""The operator endpoints: `/metrics` (Prometheus text format), `/healthz` (the process and its
event loop answer) and `/readyz` (MongoDB reachable, change stream open, first sweep done —
answered from state the service keeps, never a database round trip per request).

The listener is guarded the way an exposed port must be: a request's headers must arrive within
HEADER_TIMEOUT_S of the connection (or of the previous response), lines, headers and bodies are
capped, and a malformed request is one log line naming the peer and the error, never a
traceback carrying the client's bytes. Responses carry no server version.

For the public port there is more (`ConnectionCap`, `raise_nofile_limit`,
`one_line_accept_errors`): a cap on connections open at once (one more is answered 503 and
closed before anything is read), the soft file limit raised at start, and asyncio's accept
errors (out of file descriptors) turned from a traceback per attempt into a call the owner
counts and logs as a sample. After a response, an unread body is drained for at most LINGER_S.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp.web_response
from aiohttp import web
from aiohttp.web_protocol import RequestHandler
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
    line with the error's type and the first, shortened, line of its message, and at most one
    such line per error type every BAD_REQUEST_SAMPLE_S (a flood of malformed requests is one
    line, saying how many like it were left out; `dropped` counts them)."""

    def __init__(self) -> None:
        super().__init__()
        self._last: dict[str, float] = {}
        self._skipped: dict[str, int] = {}
        self.dropped = 0

    def reset(self) -> None:
        """A listener starting: its first bad request of each kind is written."""
        self._last.clear()
        self._skipped.clear()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            kind = type(exc).__name__
            now = time.monotonic()
            if now - self._last.get(kind, float("-inf")) < BAD_REQUEST_SAMPLE_S:
                self._skipped[kind] = self._skipped.get(kind, 0) + 1
                self.dropped += 1
                return False
            self._last[kind] = now
            text = str(exc).splitlines()[0] if str(exc) else ""
            peer = record.args[0] if isinstance(record.args, tuple) and record.args else "?"
            record.msg = "bad request from %s: %s %s"
            record.args = (peer, kind, ascii(text[:120]))
            if skipped := self._skipped.pop(kind, 0):
                record.msg += " (and %d more like it since the last line)"
                record.args = (*record.args, skipped)
            record.exc_info = None
            record.exc_text = None
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


BAD_REQUEST_SAMPLE_S = 10.0


def edge_logger(name: str) -> logging.Logger:
    logger = logging.getLogger(name)
    for f in logger.filters:
        if isinstance(f, _OneLineErrors):
            f.reset()
            break
    else:
        logger.addFilter(_OneLineErrors())
    return logger


def guarded_application(*, max_body_bytes: int = MAX_BODY_BYTES, **kwargs: Any) -> web.Application:
    return web.Application(client_max_size=max_body_bytes, **kwargs)


async def start_site(
    app: web.Application,
    host: str,
    port: int,
    *,
    logger: str = "reactor.http",
    cap: ConnectionCap | None = None,
) -> tuple[web.AppRunner, int]:
    """Serve `app` on host:port (0 picks a free port); returns the runner and the bound port.
    With `cap`, connections beyond its limit are answered 503 and closed at once."""
    runner = web.AppRunner(
        app,
        access_log=None,
        keepalive_timeout=HEADER_TIMEOUT_S,
        max_line_size=MAX_LINE_BYTES,
        max_field_size=MAX_LINE_BYTES,
        # After a response, an unread body is drained for at most this long (aiohttp's
        # default is 10 s, which doubled the body deadline a slow client could hold).
        lingering_time=LINGER_S,
        logger=edge_logger(logger),
    )
    await runner.setup()
    site = (
        _CappedSite(runner, host, port, cap) if cap is not None else web.TCPSite(runner, host, port)
    )
    await site.start()
    server = site._server
    assert server is not None
    return runner, int(server.sockets[0].getsockname()[1])  # type: ignore[attr-defined]


LINGER_S = 2.0
_REFUSAL = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nRetry-After: 1\r\n"
    b"Connection: close\r\n\r\n"
)


class ConnectionCap:
    """At most `limit` connections open at once; `on_change(open)` and `on_refused()` let the
    owner count them. A connection over the limit costs a file descriptor for an instant: it
    is answered 503 and closed before anything is read."""

    def __init__(
        self,
        limit: int,
        *,
        on_change: Callable[[int], None] | None = None,
        on_refused: Callable[[], None] | None = None,
    ) -> None:
        self.limit = limit
        self.open = 0
        self.refused = 0
        self._on_change = on_change
        self._on_refused = on_refused

    def factory(self, server: web.Server) -> Callable[[], asyncio.BaseProtocol]:
        def make() -> asyncio.BaseProtocol:
            if self.open >= self.limit:
                self.refused += 1
                if self._on_refused is not None:
                    self._on_refused()
                return _Refuse()
            self.open += 1
            self._changed()
            handler = _CountedHandler(server, loop=server._loop, **server._kwargs)
            handler._on_lost = self._lost
            return handler

        return make

    def _lost(self) -> None:
        self.open -= 1
        self._changed()

    def _changed(self) -> None:
        if self._on_change is not None:
            self._on_change(self.open)


class _CountedHandler(RequestHandler):
    __slots__ = ("_on_lost",)
    _on_lost: Callable[[], None] | None

    def connection_lost(self, exc: BaseException | None) -> None:
        try:
            super().connection_lost(exc)
        finally:
            on_lost, self._on_lost = self._on_lost, None
            if on_lost is not None:
                on_lost()


class _Refuse(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.WriteTransport)
        transport.write(_REFUSAL)
        transport.close()


class _CappedSite(web.TCPSite):
    """aiohttp's TCP site with a `ConnectionCap` in front of its protocol factory."""

    def __init__(self, runner: web.AppRunner, host: str, port: int, cap: ConnectionCap) -> None:
        super().__init__(runner, host, port)
        self._cap = cap

    async def start(self) -> None:
        await web.BaseSite.start(self)
        server = self._runner.server
        assert server is not None
        self._server = await asyncio.get_running_loop().create_server(
            self._cap.factory(server),
            self._host,
            self._port,
            backlog=self._backlog,
            reuse_address=self._reuse_address,
            reuse_port=self._reuse_port,
        )


def raise_nofile_limit(target: int) -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE towards `target` (never above the hard limit, never
    lower); returns (soft, hard) after. A common default soft limit of 1,024 is what a few
    hundred held connections and the senders' pools exhaust together."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = target if hard == resource.RLIM_INFINITY else min(target, hard)
    if wanted > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            soft = wanted
        except (ValueError, OSError):
            pass
    return soft, hard


_ACCEPT_ERRNOS = {
    errno.EMFILE: "EMFILE",
    errno.ENFILE: "ENFILE",
    errno.ENOBUFS: "ENOBUFS",
    errno.ENOMEM: "ENOMEM",
}


def one_line_accept_errors(
    loop: asyncio.AbstractEventLoop, on_error: Callable[[str], None]
) -> Callable[[], None]:
    """Route asyncio's accept errors (out of file descriptors: one traceback per attempt) to
    `on_error(errno name)`, which counts and writes a sampled line; everything else goes to
    the handler that was there before. Returns what puts that handler back."""
    previous = loop.get_exception_handler()

    def handle(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        if isinstance(exc, OSError) and exc.errno in _ACCEPT_ERRNOS:
            on_error(_ACCEPT_ERRNOS[exc.errno])
            return
        if previous is not None:
            previous(loop, context)
        else:
            loop.default_exception_handler(context)

    loop.set_exception_handler(handle)

    def restore() -> None:
        if loop.get_exception_handler() is handle:
            loop.set_exception_handler(previous)

    return restore


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
