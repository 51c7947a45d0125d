"""The public listener: what recipients (and, later, providers) call, on its own port.

It is held to the operator port's guards (`reactor.http`: a header deadline, line and header
caps, one log line for a malformed request, no server version), plus body caps and a body
deadline per route, and headers that keep the pages from being framed, cached, indexed, or
leaking the link's token in a Referer.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from aiohttp import web

from ..domain.consent import Links
from ..http import guarded_application, start_site
from ..metrics import Metrics
from ..ports import Clock
from .feedback import FeedbackConfig, FeedbackSink, FeedbackStore
from .ports import RecipientActions, SuppressionWriter
from .unsubscribe import UnsubscribeRoutes, Unsubscribes
from .webhooks import WebhookConfig, WebhookRoutes

if TYPE_CHECKING:
    from .tracking import TrackingRoutes

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 256 * 1024  # the largest any route accepts; each route caps lower

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
        tracking: TrackingRoutes | None = None,
    ) -> None:
        self.tracking = tracking
        self.host = host
        self.port = port
        self._metrics = metrics
        self.unsubscribes = Unsubscribes(suppressions, actions, clock, metrics)
        self._routes = UnsubscribeRoutes(links.signer, self.unsubscribes, actions, clock, metrics)
        self.webhooks: WebhookRoutes | None = None
        if webhooks is not None and feedback is not None:
            sink = FeedbackSink(
                feedback, suppressions, clock, metrics, feedback_config or FeedbackConfig()
            )
            self.webhooks = WebhookRoutes(webhooks, sink, metrics)
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
        self._runner, self.port = await start_site(
            self.application(), self.host, self.port, logger="reactor.public"
        )

    async def stop(self) -> None:
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
