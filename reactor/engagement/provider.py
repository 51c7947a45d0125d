"""Opens and clicks reported by the email provider (issue 24's provider signals), stored as
engagement events beside the tracking listener's: same collection, same fields, same batched
recorder and classifier.

How an event is tied to a message: by the Message-ID the reactor set on it, which the ledger
records as the row's `providerId` (SendGrid echoes it as `smtp-id`, SES as
`mail.commonHeaders.messageId`). No header is added to what is sent, and nothing in the event
but that id decides which (campaign, customer) it counts for; the webhook's signature (ECDSA
for SendGrid, SNS for SES) was checked before any of this. An id the ledger does not know is
ignored and counted.

A provider's bot flag (`sg_machine_open`, `isBotEvent`) makes the event machine (open) or
scanner (click) with the reason `provider_bot_flag:<flag>`; without it the event is classed by
the listener's rules from its user agent, address and time (domain/engagement.py).

Deduplication against the listener, when it tracks the same kind:
- a provider click on one of our tracked links (`PUBLIC_BASE_URL/c/…` or `/s/…`) is the very
  click the listener recorded when the provider's redirect reached it: not stored;
- with open tracking on, a provider open is not stored when the listener recorded an open of
  the same message within DEDUPE_S of it (both pixels load in the same render; the listener's
  batch lands within a second, the provider's webhook seconds to minutes later).
Replays (a provider retrying a batch) are dropped by event id, as the feedback webhooks do.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from pymongo.asynchronous.collection import AsyncCollection

from ..domain.engagement import Hit, HitKind
from ..domain.provider_events import ProviderEvent, sendgrid_engagement, ses_engagement
from ..metrics import Metrics
from .recorder import Accepted, MessageKey, Recorder

log = logging.getLogger(__name__)

DEDUPE_S = 120.0
CHANNEL = "email"


class ProviderFeedback(Protocol):
    """What the feedback store already offers: replay protection and ledger attribution."""

    async def first_times(self, keys: Sequence[str], now: dt.datetime) -> list[bool]: ...

    async def attribute_many(
        self, channel: str, wanted: Sequence[tuple[str | None, str | None]]
    ) -> list[tuple[str, str] | None]: ...


class ListenerOpens(Protocol):
    async def opens_near(
        self, keys: Sequence[MessageKey], since: dt.datetime, until: dt.datetime
    ) -> dict[MessageKey, list[dt.datetime]]: ...


class MongoListenerOpens:
    """The opens already in the `engagement` collection, for deduplication."""

    def __init__(self, events: AsyncCollection[dict[str, Any]]) -> None:
        self._events = events

    async def opens_near(
        self, keys: Sequence[MessageKey], since: dt.datetime, until: dt.datetime
    ) -> dict[MessageKey, list[dt.datetime]]:
        if not keys:
            return {}
        cursor = self._events.find(
            {
                "campaign": {"$in": sorted({k[0] for k in keys})},
                "customer": {"$in": sorted({k[2] for k in keys})},
                "kind": "open",
                "at": {"$gte": since, "$lte": until},
            },
            {"campaign": 1, "channel": 1, "customer": 1, "at": 1},
        )
        wanted = set(keys)
        out: dict[MessageKey, list[dt.datetime]] = {}
        async for doc in cursor:
            key = (str(doc["campaign"]), str(doc["channel"]), str(doc["customer"]))
            at = doc["at"]
            if key in wanted and isinstance(at, dt.datetime):
                out.setdefault(key, []).append(at.replace(tzinfo=dt.UTC) if not at.tzinfo else at)
        return out


@dataclass(frozen=True)
class SignalsConfig:
    tracked_prefixes: tuple[str, ...] = ()  # our tracked-link URLs (PUBLIC_BASE_URL/c/, /s/)
    listener_opens: bool = False  # TRACKING=opens_and_clicks: the listener sees opens too


class ProviderSignals:
    """Receives the parsed opens and clicks of an authenticated webhook call."""

    def __init__(
        self,
        feedback: ProviderFeedback,
        listener: ListenerOpens,
        recorder: Recorder,
        metrics: Metrics,
        config: SignalsConfig = SignalsConfig(),
    ) -> None:
        self._feedback = feedback
        self._listener = listener
        self._recorder = recorder
        self._metrics = metrics
        self._config = config

    async def sendgrid(self, doc: Any) -> int:
        """A verified SendGrid batch (parsed once, by the route); how many of its opens and
        clicks were accepted."""
        try:
            events = sendgrid_engagement(doc)
        except ValueError:
            return 0  # the feedback parser already answered this body
        return await self._receive_logged("sendgrid", events)

    async def ses(self, sns_message_id: str, doc: Any) -> int:
        try:
            events = ses_engagement(sns_message_id, doc)
        except ValueError:
            return 0
        return await self._receive_logged("ses", events)

    async def _receive_logged(self, provider: str, events: Sequence[ProviderEvent]) -> int:
        """One call's events are one unit of work: a failure (the database away) is logged and
        counted, and never fails the webhook's bounces and deliveries."""
        try:
            return await self.receive(events)
        except Exception as exc:
            for e in events:
                self._count(e, "failed")
            log.warning("%s opens and clicks not recorded: %s", provider, type(exc).__name__)
            return 0

    async def receive(self, events: Sequence[ProviderEvent]) -> int:
        if not events:
            return 0
        now = max(e.at for e in events)
        fresh = await self._feedback.first_times(
            [f"{e.provider}:engagement:{e.event_id}" for e in events], now
        )
        kept: list[ProviderEvent] = []
        for e, first in zip(events, fresh, strict=True):
            if not first:
                self._count(e, "replay")
            elif e.kind is HitKind.CLICK and self._tracked(e.url):
                self._count(e, "duplicate")
            else:
                kept.append(e)
        found = await self._feedback.attribute_many(CHANNEL, [(e.message_id, None) for e in kept])
        named: list[tuple[ProviderEvent, MessageKey]] = []
        for e, who in zip(kept, found, strict=True):
            if who is None:
                self._count(e, "unknown_message")
                continue
            named.append((e, (who[0], CHANNEL, who[1])))
        accepted = 0
        for e, key in await self._not_seen_by_listener(named):
            self._recorder.accept(Accepted(key[0], key[1], key[2], e.at, self._hit(e)))
            self._count(e, "recorded")
            accepted += 1
        return accepted

    def _tracked(self, url: str | None) -> bool:
        return url is not None and any(url.startswith(p) for p in self._config.tracked_prefixes)

    async def _not_seen_by_listener(
        self, named: list[tuple[ProviderEvent, MessageKey]]
    ) -> list[tuple[ProviderEvent, MessageKey]]:
        opens = [(e, k) for e, k in named if e.kind is HitKind.OPEN]
        if not self._config.listener_opens or not opens:
            return named
        window = dt.timedelta(seconds=DEDUPE_S)
        seen = await self._listener.opens_near(
            [k for _, k in opens],
            min(e.at for e, _ in opens) - window,
            max(e.at for e, _ in opens) + window,
        )
        out = []
        for e, key in named:
            near = seen.get(key, [])
            if e.kind is HitKind.OPEN and any(abs(at - e.at) <= window for at in near):
                self._count(e, "duplicate")
                continue
            out.append((e, key))
        return out

    @staticmethod
    def _hit(e: ProviderEvent) -> Hit:
        return Hit(
            e.kind,
            None,  # a provider names the URL, not our link number
            e.at,
            e.ip,
            e.agent,
            provider_bot=e.flag is not None,
            provider_flag=e.flag,
        )

    def _count(self, e: ProviderEvent, outcome: str) -> None:
        self._metrics.provider_engagement.labels(e.provider, e.kind.value, outcome).inc()
