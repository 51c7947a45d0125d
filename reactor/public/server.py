"""The public listener: what recipients (and, later, providers) call, on its own port.

It is held to the operator port's guards (`reactor.http`: a header deadline, line and header
caps, one log line for a malformed request, no server version), plus body caps and a body
deadline per route, and headers that keep the pages from being framed, cached, indexed, or
leaking the link's token in a Referer.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from aiohttp import web

from ..domain.consent import Links
from ..http import (
    ConnectionCap,
    guarded_application,
    one_line_accept_errors,
    raise_nofile_limit,
    start_site,
)
from ..metrics import Metrics
from ..ports import Clock
from .feedback import FeedbackConfig, FeedbackSink, FeedbackStore
from .logsample import SampledLog
from .ports import RecipientActions, SuppressionWriter
from .unsubscribe import UNDO_WINDOW_S, UnsubscribeRoutes, Unsubscribes
from .webhooks import WebhookConfig, WebhookRoutes

if TYPE_CHECKING:
    from .tracking import TrackingRoutes

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 256 * 1024  # the largest any route accepts; each route caps lower
MAX_CONNECTIONS = 1000  # PUBLIC_MAX_CONNECTIONS
NOFILE_TARGET = 65536  # PUBLIC_NOFILE_TARGET: the soft file limit asked for at start
FD_RESERVE = 256  # descriptors kept for MongoDB, SMTP and Twilio pools, files, the ops port

_HEADERS = {
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "X-Robots-Tag": "noindex, nofollow",
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; "
        "frame-ancestors 'none'; base-uri 'none'"
    ),
}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class PublicServer:
    def __init__(
        self,
        *,
        links: Links,
        suppressions: SuppressionWriter,
        actions: RecipientActions,
        clock: Clock,
        metrics: Metrics,
        host: str,
        port: int,
        webhooks: WebhookConfig | None = None,
        feedback: FeedbackStore | None = None,
        feedback_config: FeedbackConfig | None = None,
        max_connections: int = MAX_CONNECTIONS,
        nofile_target: int = NOFILE_TARGET,
        undo_window_s: float = UNDO_WINDOW_S,
        tracking: TrackingRoutes | None = None,
    ) -> None:
        self.tracking = tracking
        self.host = host
        self.port = port
        self._metrics = metrics
        self.max_connections = max_connections
        self._nofile_target = nofile_target
        self.cap: ConnectionCap | None = None
        self._accept_log = SampledLog(log)
        self._restore_handler: Callable[[], None] | None = None
        self.unsubscribes = Unsubscribes(
            suppressions, actions, clock, metrics, undo_window_s=undo_window_s
        )
        self._routes = UnsubscribeRoutes(links.signer, self.unsubscribes, actions, clock, metrics)
        self.webhooks: WebhookRoutes | None = None
        if webhooks is not None and feedback is not None:
            sink = FeedbackSink(
                feedback, suppressions, clock, metrics, feedback_config or FeedbackConfig()
            )
            self.webhooks = WebhookRoutes(webhooks, sink, metrics, clock)
        self._runner: web.AppRunner | None = None

    def application(self) -> web.Application:
        app = guarded_application(max_body_bytes=MAX_BODY_BYTES, middlewares=[self._guard])
        self._routes.add_to(app)
        if self.webhooks is not None:
            self.webhooks.add_to(app)
        if self.tracking is not None:
            self.tracking.add_to(app)
        app.router.add_get("/healthz", self._health)  # for the proxy in front
        return app

    async def _health(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def start(self) -> None:
        self.cap = ConnectionCap(
            self._connection_limit(),
            on_change=self._metrics.public_connections.set,
            on_refused=self._metrics.public_connections_refused.inc,
        )
        self._restore_handler = one_line_accept_errors(
            asyncio.get_running_loop(), self._accept_error
        )
        self._runner, self.port = await start_site(
            self.application(), self.host, self.port, logger="reactor.public", cap=self.cap
        )

    def _connection_limit(self) -> int:
        """PUBLIC_MAX_CONNECTIONS, after raising the soft file limit; lowered (with a warning)
        when the limit cannot leave FD_RESERVE descriptors for the database and the senders'
        pools, so that a flood of held connections never starves them."""
        soft, hard = raise_nofile_limit(self._nofile_target)
        limit = self.max_connections
        if soft - FD_RESERVE < limit:
            limit = max(1, soft - FD_RESERVE)
            log.warning(
                "the file limit (%d, hard %d) leaves room for %d public connections, not %d: "
                "raise `ulimit -n`",
                soft,
                hard,
                limit,
                self.max_connections,
            )
        return limit

    def _accept_error(self, name: str) -> None:
        self._metrics.accept_errors.labels(name).inc()
        self._accept_log.warning(
            f"accept:{name}", "could not accept a connection (%s): retrying in a second", name
        )

    async def stop(self) -> None:
        if self._restore_handler is not None:
            self._restore_handler()
            self._restore_handler = None
        if self.webhooks is not None:
            await self.webhooks.aclose()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @web.middleware
    async def _guard(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        route = _route(request)
        try:
            response = await handler(request)
        except web.HTTPException as exc:
            exc.headers.update(_HEADERS)
            self._metrics.public_requests.labels(route, str(exc.status)).inc()
            raise
        except Exception as exc:
            # One unit of work failed (the database, most likely): say so once, keep serving.
            self._metrics.public_requests.labels(route, "500").inc()
            text = str(exc).strip().splitlines()
            log.error(
                "public request to %s failed: %s %s",
                route,
                type(exc).__name__,
                ascii(text[0][:160]) if text else "",
            )
            return web.Response(
                text="Something went wrong; please try again.\n", status=500, headers=_HEADERS
            )
        response.headers.update(_HEADERS)
        self._metrics.public_requests.labels(route, str(response.status)).inc()
        return response


def _route(request: web.Request) -> str:
    info = request.match_info
    resource = info.route.resource if info.route is not None else None
    return resource.canonical if resource is not None else "other"
