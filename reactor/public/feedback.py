"""What a provider's event does, whichever provider sent it (`domain.feedback`).

Every event is applied once: its (provider, id) is recorded first and a replay changes nothing.
Suppressions go to the one list every send checks; counters go to the campaign the event is
about (its ledger row); a complaint rate over COMPLAINT_RATE_THRESHOLD, once at least
COMPLAINT_MIN_EMAILS have gone out, pauses the campaign with that reason.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass
from typing import Any, Protocol

from ..domain.consent import Kind, Reason, Suppression, suppression_id
from ..domain.feedback import SMS_FINAL, Feedback, FeedbackEvent
from ..domain.models import Channel
from ..metrics import Metrics
from ..ports import Clock
from .ports import SuppressionWriter

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FeedbackConfig:
    soft_bounce_limit: int = 3
    complaint_rate_threshold: float = 0.001
    complaint_min_emails: int = 1000


class FeedbackStore(Protocol):
    async def first_time(self, provider: str, event_id: str, now: dt.datetime) -> bool: ...
    async def attribute(
        self, channel: str, *, provider_id: str | None, address: str | None
    ) -> tuple[str, str] | None: ...
    async def soft_bounce(self, address: str, now: dt.datetime) -> int: ...
    async def count(self, campaign_key: str, counts: dict[str, int]) -> dict[str, Any] | None: ...
    async def pause(self, campaign_key: str, reason: str, detail: str) -> bool: ...
    async def sms_status(
        self, sid: str, status: str, error_code: str | None, now: dt.datetime
    ) -> tuple[str, str] | None: ...
    async def received(self, provider: str, now: dt.datetime, n: int = 1) -> None: ...


_COUNTERS = {
    Feedback.HARD_BOUNCE: "bounces",
    Feedback.SOFT_BOUNCE: "softBounces",
    Feedback.COMPLAINT: "complaints",
    Feedback.DELIVERED: "emailsDelivered",
}


class FeedbackSink:
    def __init__(
        self,
        store: FeedbackStore,
        suppressions: SuppressionWriter,
        clock: Clock,
        metrics: Metrics,
        config: FeedbackConfig,
    ) -> None:
        self._store = store
        self._suppressions = suppressions
        self._clock = clock
        self._metrics = metrics
        self._config = config

    async def received(self, provider: str, n: int) -> None:
        """When each webhook last received events (for `reactor doctor`)."""
        await self._store.received(provider, self._clock.now(), n)

    async def email(self, event: FeedbackEvent) -> bool:
        """Apply one email event; False for a replay."""
        now = self._clock.now()
        if not await self._store.first_time(event.provider, event.event_id, now):
            self._metrics.webhook_replays.labels(event.provider).inc()
            return False
        self._metrics.webhook_events.labels(event.provider, event.kind).inc()
        address = event.address.strip().lower()
        suppress: Reason | None = None
        note = event.detail[:200] or None
        if event.kind is Feedback.HARD_BOUNCE:
            suppress = Reason.HARD_BOUNCE
        elif event.kind is Feedback.COMPLAINT:
            suppress = Reason.COMPLAINT
        elif event.kind is Feedback.SOFT_BOUNCE:
            n = await self._store.soft_bounce(address, now)
            if n >= self._config.soft_bounce_limit:
                suppress, note = Reason.HARD_BOUNCE, f"{n} soft bounces"
        if suppress is not None and address:
            entry = Suppression(
                Kind.EMAIL, address, Channel.EMAIL, suppress, source=event.provider, note=note
            )
            await self._suppressions.add([entry], now=now)
        where = await self._store.attribute(
            Channel.EMAIL, provider_id=event.message_id, address=address
        )
        if where is None:
            if event.kind is not Feedback.DELIVERED:
                self._metrics.public_unknown.labels("message").inc()
            return True
        campaign, _customer = where
        doc = await self._store.count(campaign, {_COUNTERS[event.kind]: 1})
        if event.kind is Feedback.COMPLAINT and doc is not None:
            await self._check_complaints(campaign, doc)
        return True

    async def _check_complaints(self, campaign: str, doc: dict[str, Any]) -> None:
        perf = doc.get("performance") or {}
        sent = int(perf.get("emailsSent") or 0)
        complaints = int(perf.get("complaints") or 0)
        cfg = self._config
        if doc.get("status") != "running" or sent < cfg.complaint_min_emails:
            return
        rate = complaints / sent
        if rate <= cfg.complaint_rate_threshold:
            return
        detail = (
            f"complaint rate {100 * rate:.2f}% ({complaints} of {sent} emails) is over "
            f"{100 * cfg.complaint_rate_threshold:g}%"
        )
        if await self._store.pause(campaign, "complaint_rate", detail):
            self._metrics.transitions.labels("paused").inc()
            self._metrics.campaign_errors.labels("complaint_rate").inc()
            log.error(
                "⏸ Campaign paused: %s", detail, extra={"campaign_id": campaign, "rate": rate}
            )

    async def sms_reply(self, provider_id: str, phone: str, word: str, *, stop: bool) -> bool:
        """A STOP (or START) reply from `phone`; False for a replay."""
        now = self._clock.now()
        if not await self._store.first_time("twilio", f"inbound:{provider_id}", now):
            self._metrics.webhook_replays.labels("twilio").inc()
            return False
        self._metrics.webhook_events.labels("twilio", "stop" if stop else "start").inc()
        if stop:
            entry = Suppression(
                Kind.PHONE, phone, Channel.SMS, Reason.SMS_STOP, source="twilio", note=word
            )
            new = await self._suppressions.add([entry], now=now)
            where = await self._store.attribute(Channel.SMS, provider_id=None, address=phone)
            if new and where is not None:
                await self._store.count(where[0], {"smsStops": 1})
        else:
            ids = [suppression_id(Kind.PHONE, phone, ch) for ch in (Channel.SMS, "all")]
            await self._suppressions.remove(ids, reasons=[Reason.SMS_STOP])
        log.info("📵 SMS %s from a recipient: %s", "opt-out" if stop else "opt-in", word)
        return True

    async def sms_status(self, sid: str, status: str, error_code: str | None) -> bool:
        """A delivery receipt; True when it changed the ledger row."""
        now = self._clock.now()
        self._metrics.sms_status.labels(status if status in _KNOWN else "other").inc()
        where = await self._store.sms_status(sid, status, error_code, now)
        if where is None:
            return False
        if status in SMS_FINAL:
            name = "smsDelivered" if status == "delivered" else "smsUndelivered"
            await self._store.count(where[0], {name: 1})
        return True


_KNOWN = frozenset({"queued", "sending", "sent", "delivered", "undelivered", "failed", "read"})
