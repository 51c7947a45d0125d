"""Tracked links and the open pixel, on the public listener.

    GET|HEAD /c/<token>   a tracked link: 302 to the destination the campaign's link table
                          holds for the token's link number (never one the request names)
    GET|HEAD /s/<code>    an SMS short link: the same, by a code looked up in `short_links`
    GET|HEAD /o/<token>   the open pixel: a 1x1 transparent GIF

All are `Cache-Control: private, no-store` (a cached redirect or pixel is a hit nobody sees).
A token that does not check out, a link number the table lacks, a campaign that is gone: a 404
page, counted by why in `reactor_engagement_rejected`, and nothing recorded. An expired token
still leads where it led (the person wants the page) but records nothing. Short-code misses
are limited per client network (MISSES_PER_MINUTE), so guessing 72-bit codes is hopeless.

The request path does no write: an accepted hit is handed to the `Recorder`, which classes and
writes it in batches. It reads one thing: whether the token's message went out (a ledger row,
remembered once `sent`, read in groups every couple of milliseconds); a genuine token for a
message that never went (a preview, a failed send) gets the 404 too.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import ipaddress
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from functools import lru_cache
from typing import Any, Protocol

from aiohttp import web

from ..domain.consent import TokenError
from ..domain.deliveries import delivery_id
from ..domain.engagement import HONEYPOT_LINK, PREVIEW_CUSTOMER_PREFIX, Hit, HitKind, client_ip
from ..domain.models import Channel
from ..engagement.recorder import NOT_DELIVERED, Accepted, Recorder
from ..engagement.tokens import TrackingSigner, TrackScope, is_short_code
from ..metrics import Metrics
from ..ports import Clock
from .logsample import SampledLog

log = logging.getLogger(__name__)

GIF = base64.b64decode("R0lGODlhAQABAIAAAAAAAP///yH5BAEAAAAALAAAAAABAAEAAAIBRAA7")
NO_STORE = "private, no-store"
TABLE_CACHE_S = 30.0
TABLE_CACHE_SIZE = 2048
MISSES_PER_MINUTE = 20
MAX_AGENT_CHARS = 512
_PATHS = ("/c/", "/s/", "/o/")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class TrackingStore(Protocol):
    async def link_table(self, campaign_key: str) -> list[str] | None: ...

    async def short_link(self, code: str) -> dict[str, Any] | None: ...


class _Tables:
    """Each campaign's link table, cached briefly (a click is a read of memory, not of the
    database; a table only ever grows, so a stale one lacks at most the newest links). One read
    per campaign at a time: the clicks that arrive while it runs wait for that read instead of
    each sending their own (a campaign's first second of clicks would queue hundreds)."""

    def __init__(self, store: TrackingStore) -> None:
        self._store = store
        self._cache: OrderedDict[str, tuple[float, list[str] | None]] = OrderedDict()
        self._reading: dict[str, asyncio.Future[list[str] | None]] = {}

    async def get(self, campaign: str) -> list[str] | None:
        now = time.monotonic()
        hit = self._cache.get(campaign)
        if hit is not None and now - hit[0] < TABLE_CACHE_S:
            return hit[1]
        reading = self._reading.get(campaign)
        if reading is None:
            reading = asyncio.ensure_future(self._read(campaign))
            self._reading[campaign] = reading
        return await asyncio.shield(reading)

    async def _read(self, campaign: str) -> list[str] | None:
        try:
            table = await self._store.link_table(campaign)
        finally:
            del self._reading[campaign]
        self._cache[campaign] = (time.monotonic(), table)
        self._cache.move_to_end(campaign)
        while len(self._cache) > TABLE_CACHE_SIZE:
            self._cache.popitem(last=False)
        return table


class _MissLimiter:
    """Short-code misses per client /24 (/48): a bucket of `per_minute` misses that refills at
    that rate, so there is no window edge at which a guesser gets twice the allowance."""

    def __init__(self, per_minute: int, monotonic: Callable[[], float]) -> None:
        self._capacity = float(per_minute)
        self._refill_per_s = per_minute / 60.0
        self._monotonic = monotonic
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # net: level, at

    @staticmethod
    @lru_cache(maxsize=4096)
    def _net(ip: str | None) -> str:
        try:
            address = ipaddress.ip_address(ip or "")
        except ValueError:
            return "?"
        prefix = 24 if address.version == 4 else 48
        return str(ipaddress.ip_network(f"{address}/{prefix}", strict=False))

    def _level(self, net: str) -> float:
        level, at = self._buckets.get(net, (self._capacity, self._monotonic()))
        now = self._monotonic()
        return min(self._capacity, level + (now - at) * self._refill_per_s)

    def take(self, ip: str | None) -> str | None:
        """Reserve one miss for the client's network before its lookup is awaited; None when
        the bucket is empty. Checking and counting in one step, with no await between, is what
        stops concurrent guesses from all passing one check together."""
        net = self._net(ip)
        level = self._level(net)
        if level < 1.0:
            return None
        self._buckets[net] = (level - 1.0, self._monotonic())
        self._buckets.move_to_end(net)
        while len(self._buckets) > 100_000:  # the least recently missing networks go first
            self._buckets.popitem(last=False)
        return net

    def refund(self, net: str) -> None:
        """The reserved miss was a valid code: a hit costs the network nothing."""
        if net in self._buckets:
            self._buckets[net] = (min(self._capacity, self._level(net) + 1.0), self._monotonic())


class TrackingRoutes:
    def __init__(
        self,
        *,
        signer: TrackingSigner,
        store: TrackingStore,
        recorder: Recorder,
        clock: Clock,
        metrics: Metrics,
        trusted_proxies: Sequence[Network] = (),
        misses_per_minute: int = MISSES_PER_MINUTE,
    ) -> None:
        self._signer = signer
        self._store = store
        self._tables = _Tables(store)
        self._recorder = recorder
        self._clock = clock
        self._metrics = metrics
        self._proxies = tuple(trusted_proxies)
        self._limiter = _MissLimiter(misses_per_minute, clock.monotonic)
        self._refusals = SampledLog(log)

    def add_to(self, app: web.Application) -> None:
        app.router.add_get("/c/{token}", self.click)  # aiohttp adds HEAD with GET
        app.router.add_get("/s/{code}", self.short)
        app.router.add_get("/o/{token}", self.open)
        # A response signal, not headers set here: the public server's guard sets its own
        # Cache-Control on every response after the handler, and this runs after the guard.
        app.on_response_prepare.append(_no_store)

    # ---- handlers -----------------------------------------------------------------------------

    async def click(self, request: web.Request) -> web.StreamResponse:
        checked = self._verify(request, HitKind.CLICK)
        if checked is None:
            return _not_found()
        return await self._follow(request, *checked)

    async def short(self, request: web.Request) -> web.StreamResponse:
        net = self._limiter.take(self._client(request))
        if net is None:
            # Valid codes are refused too while a network is over its misses: answering them
            # (302) but not the misses (429) would tell a guesser which of its guesses hit, at
            # full speed, and the limit would protect nothing.
            self._metrics.engagement_rejected.labels("rate_limited").inc()
            return web.Response(
                text="Too many requests.\n", status=429, headers={"Retry-After": "60"}
            )
        code = request.match_info["code"]
        row = await self._store.short_link(code) if is_short_code(code) else None
        if row is None:
            self._metrics.engagement_rejected.labels("unknown_short_link").inc()
            return _not_found()
        self._limiter.refund(net)
        scope = _short_scope(row)
        if scope is None:
            self._metrics.engagement_rejected.labels("malformed").inc()
            return _not_found()
        return await self._follow(request, scope, False)

    async def open(self, request: web.Request) -> web.StreamResponse:
        checked = self._verify(request, HitKind.OPEN)
        if checked is None:
            return _not_found()
        scope, expired = checked
        if await self._tables.get(scope.campaign) is None:
            return self._refused("gone_campaign")
        if not expired:
            if not await self._delivered(scope):
                return self._refused("unknown_recipient")
            self._accept(request, scope, None)
        return web.Response(body=GIF, content_type="image/gif")

    # ---- pieces -------------------------------------------------------------------------------

    async def _follow(
        self, request: web.Request, scope: TrackScope, expired: bool
    ) -> web.StreamResponse:
        table = await self._tables.get(scope.campaign)
        if table is None:
            return self._refused("gone_campaign")
        if scope.link == HONEYPOT_LINK:
            if not expired:  # an expired (or a preview's) token records nothing, as elsewhere
                if not await self._delivered(scope):
                    return self._refused("unknown_recipient")
                self._accept(request, scope, scope.link)
            return web.Response(text="\n")  # a scanner followed the hidden link
        if scope.link >= len(table):
            return self._refused("unknown_link")
        if not expired:
            if not await self._delivered(scope):
                return self._refused("unknown_recipient")
            self._accept(request, scope, scope.link)
        # Returned, not raised: an exception per redirect costs more than the rest of it.
        return web.Response(status=302, headers={"Location": table[scope.link]})

    def _verify(self, request: web.Request, kind: HitKind) -> tuple[TrackScope, bool] | None:
        """(scope, expired), or None (counted) when the token is not ours or not for this."""
        try:
            scope, expired = self._signer.check(request.match_info["token"], now=self._clock.now())
        except TokenError as exc:
            self._metrics.engagement_rejected.labels(exc.why).inc()
            # Sampled: a flood of forged tokens is one line per reason every 10 s, not one each.
            self._refusals.warning(
                exc.why, "refused a tracking token (%s) from %s", exc.why, ascii(request.remote)
            )
            return None
        if scope.kind is not kind:
            self._metrics.engagement_rejected.labels("wrong_kind").inc()
            return None
        if scope.customer.startswith(PREVIEW_CUSTOMER_PREFIX):
            # A `reactor preview --send-to` test message: it leads where it leads, as an
            # expired token does, and records nothing.
            self._metrics.engagement_rejected.labels("preview").inc()
            return scope, True
        if expired:
            self._metrics.engagement_rejected.labels("expired").inc()
        return scope, expired

    async def _delivered(self, scope: TrackScope) -> bool:
        """Did this message go out? A token for a preview, a failed send or a ledger row that is
        gone names nobody to count."""
        row = await self._recorder.deliveries.one(
            delivery_id(scope.campaign, scope.channel.value, scope.customer)
        )
        return row is not None and row[0] not in NOT_DELIVERED

    def _client(self, request: web.Request) -> str | None:
        return client_ip(request.remote, request.headers.get("X-Forwarded-For"), self._proxies)

    def _accept(self, request: web.Request, scope: TrackScope, link: int | None) -> None:
        hit = Hit(
            kind=scope.kind,
            link=link,
            at=self._clock.now(),
            ip=self._client(request),
            agent=request.headers.get("User-Agent", "")[:MAX_AGENT_CHARS],
            method=request.method,
        )
        self._recorder.accept(
            Accepted(scope.campaign, scope.channel.value, scope.customer, scope.issued_at, hit)
        )

    def _refused(self, why: str) -> web.Response:
        self._metrics.engagement_rejected.labels(why).inc()
        return _not_found()


def _short_scope(row: dict[str, Any]) -> TrackScope | None:
    try:
        at = row["at"]
        at = at.replace(tzinfo=dt.UTC) if at.tzinfo is None else at
        return TrackScope(
            campaign=str(row["campaign"]),
            channel=Channel(row.get("channel", "sms")),
            customer=str(row["customer"]),
            kind=HitKind.CLICK,
            link=int(row["link"]),
            issued_at=at,
        )
    except (KeyError, ValueError, TypeError, AttributeError):
        return None


async def _no_store(request: web.Request, response: web.StreamResponse) -> None:
    if request.path.startswith(_PATHS):
        response.headers["Cache-Control"] = NO_STORE


_NOT_FOUND = (
    "<!doctype html><html lang=en><head><meta charset=utf-8><title>Link not found</title>"
    "</head><body><h1>This link is not valid</h1><p>It may have been copied incompletely."
    "</p></body></html>"
)


def _not_found() -> web.Response:
    return web.Response(text=_NOT_FOUND, status=404, content_type="text/html", charset="utf-8")
