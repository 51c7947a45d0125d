"""Unsubscribe: RFC 8058's one-click POST, and the landing page for people.

    GET  /u/<token>   the page: unsubscribe from this channel, from everything (changes nothing:
                      mail scanners and link previews fetch GETs)
    POST /u/<token>   `List-Unsubscribe=One-Click` (a mailbox provider, for its user): 200, no
                      cookies, no redirect; or `action=unsubscribe|unsubscribe_all|undo` from
                      the page

A link's token is checked before anything else is read; one that does not check out gets the
same neutral page whatever is wrong with it, changes nothing, and is counted by why. A valid
token for a campaign or customer this database does not know still unsubscribes (the person
asked; the id came from us) and is recorded in a log line and a metric.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass

from aiohttp import web

from ..domain.consent import (
    ALL_CHANNELS,
    LINK_PREFIX,
    Kind,
    LinkScope,
    LinkSigner,
    Purpose,
    Reason,
    Suppression,
    TokenError,
    candidate_ids,
    default_claim,
    link_claim,
    suppression_id,
    undo_lift,
)
from ..domain.models import Channel
from ..metrics import Metrics
from ..ports import Clock
from . import pages
from .forms import read_form
from .logsample import SampledLog
from .ports import RecipientActions, SuppressionWriter

log = logging.getLogger(__name__)

ONE_CLICK = ("List-Unsubscribe", "One-Click")
UNDO_WINDOW_S = 7 * 86400.0  # LINK_UNDO_WINDOW_SECONDS: an undo lifts unsubscribes this recent
MAX_FORM_BYTES = 4096


@dataclass(frozen=True)
class Result:
    new: bool  # a suppression was added (or, for an undo, removed)
    known_campaign: bool
    known_customer: bool
    still_suppressed: bool = False  # after an undo: something else still stops this channel


class Unsubscribes:
    """What an unsubscribe does, apart from HTTP."""

    def __init__(
        self,
        suppressions: SuppressionWriter,
        actions: RecipientActions,
        clock: Clock,
        metrics: Metrics,
        *,
        undo_window_s: float = UNDO_WINDOW_S,
    ) -> None:
        self._suppressions = suppressions
        self._actions = actions
        self._clock = clock
        self._metrics = metrics
        self._undo_window_s = undo_window_s

    async def unsubscribe(self, scope: LinkScope, *, everything: bool, via: str) -> Result:
        channel = ALL_CHANNELS if everything else scope.channel
        address = await self._actions.delivered_to(scope.campaign, scope.channel, scope.customer)
        entries = [self._entry(Kind.CUSTOMER, scope.customer, channel, scope)]
        if address is not None:
            kind = Kind.EMAIL if scope.channel == Channel.EMAIL else Kind.PHONE
            entries.append(self._entry(kind, address, channel, scope))
        # The campaign's counter counts links that hold a claim: an unsubscribe from this
        # channel and then from everything through the same link is one unsubscribe.
        claim = link_claim(scope.campaign, scope.channel)
        before = await self._held(scope, address, claim)
        new = await self._suppressions.add(entries, now=self._clock.now())
        known_campaign = True
        if new:
            self._metrics.unsubscribes.labels(scope.channel, via).inc()
            if not before:
                known_campaign = await self._actions.add_unsubscribes(scope.campaign, 1)
        result = Result(bool(new), known_campaign, address is not None)
        self._record(scope, result, "unsubscribe" + ("_all" if everything else ""), via)
        return result

    async def undo(self, scope: LinkScope) -> Result:
        """Lift what an unsubscribe through a link of this campaign and channel added: never a
        bounce, a complaint, a STOP, an operator's or an imported entry, or another link's."""
        address = await self._actions.delivered_to(scope.campaign, scope.channel, scope.customer)
        ids = _link_ids(scope, address)
        now = self._clock.now()
        since = now - dt.timedelta(seconds=self._undo_window_s) if self._undo_window_s else None
        lifted = await self._suppressions.lift(
            ids, undo_lift(scope.campaign, scope.channel, since=since), now=now
        )
        known_campaign = True
        if lifted:
            known_campaign = await self._actions.add_unsubscribes(scope.campaign, -1)
        # What still stops this channel (a complaint, a STOP, another link's, an operator's,
        # an unsubscribe older than the undo window): the page must not say "subscribed".
        held = await self._suppressions.claims(
            candidate_ids(scope.channel, scope.customer, address)
        )
        result = Result(lifted > 0, known_campaign, address is not None, bool(held))
        self._record(scope, result, "undo", "page")
        return result

    async def _held(self, scope: LinkScope, address: str | None, claim: str) -> bool:
        held = await self._suppressions.claims(_link_ids(scope, address))
        legacy = default_claim(Reason.UNSUBSCRIBED.value, LINK_PREFIX + scope.campaign)
        return any(c.get("key") in (claim, legacy) for cs in held.values() for c in cs)

    @staticmethod
    def _entry(kind: Kind, value: str, channel: str, scope: LinkScope) -> Suppression:
        return Suppression(
            kind,
            value,
            channel,
            Reason.UNSUBSCRIBED,
            source=f"{LINK_PREFIX}{scope.campaign}",
            campaign=scope.campaign,
            claim=link_claim(scope.campaign, scope.channel),
        )

    def _record(self, scope: LinkScope, result: Result, action: str, via: str) -> None:
        extra = {"campaign_id": scope.campaign, "customer_id": scope.customer, "via": via}
        if not result.known_campaign:
            self._metrics.public_unknown.labels("campaign").inc()
            log.warning(
                "%s through a valid link for unknown campaign %s (customer %s)",
                action,
                ascii(scope.campaign),
                ascii(scope.customer),
                extra=extra,
            )
        elif not result.known_customer:
            self._metrics.public_unknown.labels("recipient").inc()
            log.warning(
                "%s through a valid link for customer %s, who has no %s delivery in campaign %s",
                action,
                ascii(scope.customer),
                scope.channel,
                ascii(scope.campaign),
                extra=extra,
            )
        log.info(
            "🔕 %s: customer %s, campaign %s, %s (%s)",
            action,
            ascii(scope.customer),
            ascii(scope.campaign),
            scope.channel,
            "applied" if result.new else "already so",
            extra=extra,
        )


class UnsubscribeRoutes:
    def __init__(
        self,
        signer: LinkSigner,
        unsubscribes: Unsubscribes,
        actions: RecipientActions,
        clock: Clock,
        metrics: Metrics,
    ) -> None:
        self._signer = signer
        self._refusals = SampledLog(log)
        self._unsubscribes = unsubscribes
        self._actions = actions
        self._clock = clock
        self._metrics = metrics

    def add_to(self, app: web.Application) -> None:
        app.router.add_get("/u/{token}", self.page)
        app.router.add_post("/u/{token}", self.post)

    def _scope(self, request: web.Request) -> LinkScope | None:
        try:
            return self._signer.verify(
                request.match_info["token"], purpose=Purpose.UNSUBSCRIBE, now=self._clock.now()
            )
        except TokenError as exc:
            self._metrics.link_rejected.labels(exc.why).inc()
            self._refusals.warning(
                exc.why, "refused a link token (%s) from %s", exc.why, ascii(request.remote)
            )
            return None

    async def page(self, request: web.Request) -> web.Response:
        scope = self._scope(request)
        if scope is None:
            return _html(pages.invalid(), status=400)
        name = await self._actions.campaign_name(scope.campaign)
        return _html(pages.landing(name, scope.channel))

    async def post(self, request: web.Request) -> web.Response:
        form = await read_form(request, MAX_FORM_BYTES)
        scope = self._scope(request)
        if scope is None:
            if form.get(ONE_CLICK[0]) == ONE_CLICK[1]:
                return web.Response(text="This link is not valid.\n", status=400)
            return _html(pages.invalid(), status=400)
        if form.get(ONE_CLICK[0]) == ONE_CLICK[1]:
            await self._unsubscribes.unsubscribe(scope, everything=False, via="one_click")
            return web.Response(text="You are unsubscribed.\n")
        action = form.get("action")
        if action in ("unsubscribe", "unsubscribe_all"):
            everything = action == "unsubscribe_all"
            await self._unsubscribes.unsubscribe(scope, everything=everything, via="page")
            return _html(pages.done(scope.channel, everything))
        if action == "undo":
            result = await self._unsubscribes.undo(scope)
            if result.still_suppressed:
                return _html(pages.still_unsubscribed(scope.channel))
            return _html(pages.undone())
        raise web.HTTPBadRequest(text="Unknown action.\n")


def _link_ids(scope: LinkScope, address: str | None) -> list[str]:
    """The entries a link's unsubscribe may have made: its customer and address, in its
    channel and in every channel."""
    kind = Kind.EMAIL if scope.channel == Channel.EMAIL else Kind.PHONE
    return [
        suppression_id(k, v, ch)
        for k, v in ((Kind.CUSTOMER, scope.customer), (kind, address))
        if v
        for ch in (scope.channel, ALL_CHANNELS)
    ]


def _html(body: str, *, status: int = 200) -> web.Response:
    return web.Response(text=body, status=status, content_type="text/html", charset="utf-8")
