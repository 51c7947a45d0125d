"""What a provider's event does, whichever provider sent it (`domain.feedback`).

Every event is applied once: its (provider, id) is recorded first and a replay changes nothing.
Suppressions go to the one list every send checks; counters go to the campaign the event is
about (its ledger row); a complaint rate over COMPLAINT_RATE_THRESHOLD, once at least
COMPLAINT_MIN_EMAILS have gone out, pauses the campaign with that reason.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from ..domain.consent import ALL_CHANNELS, Kind, Reason, Suppression, start_lift, suppression_id
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
    async def first_times(self, keys: Sequence[str], now: dt.datetime) -> list[bool]: ...
    async def attribute_many(
        self, channel: str, wanted: Sequence[tuple[str | None, str | None]]
    ) -> list[tuple[str, str] | None]: ...
    async def soft_bounces(self, addresses: Sequence[str], now: dt.datetime) -> dict[str, int]: ...
    async def sms_statuses(
        self, updates: Sequence[Receipt], now: dt.datetime
    ) -> list[tuple[str, str] | None]: ...
    async def count(self, campaign_key: str, counts: dict[str, int]) -> dict[str, Any] | None: ...
    async def pause(
        self, campaign_key: str, reason: str, detail: str, *, rate: float | None = None
    ) -> bool: ...
    async def received(self, provider: str, now: dt.datetime, n: int = 1) -> None: ...


# (Twilio's SID, status, error code, the ledger row its StatusCallback URL names)
Receipt = tuple[str, str, str | None, str | None]

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
        self._unrecorded: dict[str, int] = {}
        self._recorded_at: dict[str, float] = {}

    async def received(self, provider: str, n: int) -> None:
        """When each webhook last received events (for `reactor doctor`): written at most once
        a second per provider, however many events arrive."""
        self._unrecorded[provider] = self._unrecorded.get(provider, 0) + n
        now_m = self._clock.monotonic()
        if now_m - self._recorded_at.get(provider, float("-inf")) < RECEIVED_EVERY_S:
            return
        self._recorded_at[provider] = now_m
        count, self._unrecorded[provider] = self._unrecorded[provider], 0
        await self._store.received(provider, self._clock.now(), count)

    async def emails(self, events: Sequence[FeedbackEvent]) -> list[bool]:
        """Apply email events (a batch from any requests) in a few round trips; for each,
        False when it was a replay."""
        if not events:
            return []
        now = self._clock.now()
        # Deduplicating and attributing are independent (attribution only reads): one round
        # trip's wait, not two. A replay's attribution is read and dropped.
        fresh, attributed = await asyncio.gather(
            self._store.first_times([f"{e.provider}:{e.event_id}" for e in events], now),
            self._store.attribute_many(
                Channel.EMAIL, [(e.message_id, e.address.strip().lower()) for e in events]
            ),
        )
        new = [e for e, f in zip(events, fresh, strict=True) if f]
        where = [w for w, f in zip(attributed, fresh, strict=True) if f]
        for e, f in zip(events, fresh, strict=True):
            if f:
                self._metrics.webhook_events.labels(e.provider, e.kind).inc()
            else:
                self._metrics.webhook_replays.labels(e.provider).inc()
        if not new:
            return fresh
        counts: dict[str, dict[str, int]] = {}
        for e, w in zip(new, where, strict=True):
            if w is None:
                if e.kind is not Feedback.DELIVERED:
                    self._metrics.public_unknown.labels("message").inc()
                continue
            by_name = counts.setdefault(w[0], {})
            by_name[_COUNTERS[e.kind]] = by_name.get(_COUNTERS[e.kind], 0) + 1
        # Suppressing and counting are independent too.
        await asyncio.gather(
            self._suppress(new, now),
            *(self._count(campaign, deltas) for campaign, deltas in counts.items()),
        )
        return fresh

    async def _count(self, campaign: str, deltas: dict[str, int]) -> None:
        doc = await self._store.count(campaign, deltas)
        if "complaints" in deltas and doc is not None:
            await self._check_complaints(campaign, doc)

    async def _suppress(self, events: Sequence[FeedbackEvent], now: dt.datetime) -> None:
        soft = [e.address.strip().lower() for e in events if e.kind is Feedback.SOFT_BOUNCE]
        soft_counts = await self._store.soft_bounces(soft, now) if soft else {}
        entries: list[Suppression] = []
        for e in events:
            address = e.address.strip().lower()
            reason, note = _suppression(e, soft_counts.get(address, 0), self._config)
            if reason is not None and address:
                entries.append(
                    Suppression(Kind.EMAIL, address, Channel.EMAIL, reason, e.provider, note=note)
                )
        if entries:
            await self._suppressions.add(entries, now=now)

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
        if await self._store.pause(campaign, "complaint_rate", detail, rate=rate):
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
            # A START lifts only STOPs received before it (a STOP that came later stands, even
            # if a START sent earlier arrives after it) and never an operator's or an import's.
            ids = [suppression_id(Kind.PHONE, phone, ch) for ch in (Channel.SMS, ALL_CHANNELS)]
            await self._suppressions.lift(ids, start_lift(now), now=now)
        log.info("📵 SMS %s from a recipient: %s", "opt-out" if stop else "opt-in", word)
        return True

    async def sms_statuses(self, receipts: Sequence[Receipt]) -> list[bool]:
        """Delivery receipts (a batch): True for each that changed its ledger row."""
        now = self._clock.now()
        for _, status, _, _ in receipts:
            self._metrics.sms_status.labels(status if status in _KNOWN else "other").inc()
        where = await self._store.sms_statuses(receipts, now)
        counts: dict[str, dict[str, int]] = {}
        for (_, status, _, _), w in zip(receipts, where, strict=True):
            if w is not None and status in SMS_FINAL:
                name = "smsDelivered" if status == "delivered" else "smsUndelivered"
                by_name = counts.setdefault(w[0], {})
                by_name[name] = by_name.get(name, 0) + 1
        for campaign, deltas in counts.items():
            await self._store.count(campaign, deltas)
        return [w is not None for w in where]


def _suppression(
    e: FeedbackEvent, soft_count: int, config: FeedbackConfig
) -> tuple[Reason | None, str | None]:
    note = e.detail[:200] or None
    if e.kind is Feedback.HARD_BOUNCE:
        return Reason.HARD_BOUNCE, note
    if e.kind is Feedback.COMPLAINT:
        return Reason.COMPLAINT, note
    if e.kind is Feedback.SOFT_BOUNCE and soft_count >= config.soft_bounce_limit:
        return Reason.HARD_BOUNCE, f"{soft_count} soft bounces"
    return None, None


RECEIVED_EVERY_S = 1.0
_KNOWN = frozenset({"queued", "sending", "sent", "delivered", "undelivered", "failed", "read"})
