"""The ledger writer: what a run records about its deliveries, in as few writes as it can.

Outcomes and the next `pending` marks go out in one ordered write (outcomes first, so a freed
slot is reused without ever exceeding the pending bound). The live `performance` counters follow
at most every COUNTER_FLUSH_S; the ledger is the record, the counters are for people watching.

The database decides what applies (see `domain.deliveries.LedgerOp`): a mark that meets an
existing row is refused and its message is not sent; an outcome refused means another epoch has
settled this run's pending rows, so the run has lost its lease (LeaseLost).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass

from ..domain.deliveries import (
    DeliveryRecord,
    DeliveryState,
    LedgerOp,
    counter_name,
    delivery_id,
    suppressed_counter,
)
from ..domain.errors import LeaseLost
from ..domain.models import Channel
from ..metrics import Metrics
from ..ports import CampaignStore, Clock, EmailMessage, Ledger, SmsMessage
from .state import Run

COUNTER_FLUSH_S = 0.5
# A send refused because the address is gone counts toward the campaign's feedback counters,
# as the same news from a provider's webhook would.
FEEDBACK_COUNTERS = {"hard_bounce": "bounces", "sms_stop": "smsStops"}


@dataclass
class Item:
    """One message to send: its ledger row's key and what goes to the provider."""

    customer: str
    channel: Channel
    to: str
    message: EmailMessage | SmsMessage
    deferrals: int = 0  # times a provider said "try later" to this message
    attempted_at: dt.datetime | None = None  # wall time of the first attempt
    checked_m: float = float("-inf")  # monotonic time its suppressions were read from the db
    variant: str | None = None  # an A/B split's variant key, recorded on its ledger row


@dataclass
class Outcome:
    item: Item
    state: str  # sent | failed | skipped | uncertain, or abandoned / deferred (not sent: its
    # pending row is removed, so whoever sends it next can mark it again)
    provider_id: str | None = None
    error: str | None = None
    reason: str | None = None
    attempts: int = 0
    retry_at_m: float | None = None  # deferred by the channel's breaker: not before this
    suppress: str | None = None  # the refusal says: never again (hard_bounce, sms_stop)


ABANDONED = "abandoned"
DEFERRED = "deferred"  # not sent: the provider said "try later"; its pending row is removed


class LedgerWriter:
    def __init__(
        self, store: CampaignStore, ledger: Ledger, clock: Clock, metrics: Metrics
    ) -> None:
        self._store = store
        self._ledger = ledger
        self._clock = clock
        self._metrics = metrics

    async def outcomes(
        self,
        run: Run,
        outcomes: Sequence[Outcome],
        *,
        pending: Sequence[Item] = (),
        unsent: Sequence[DeliveryRecord] = (),
    ) -> list[Item]:
        """Record finished sends and rows recorded without sending, then mark the next ones
        pending, in one ordered write. Returns the items whose marks the ledger accepted: only
        those may be sent."""
        records: list[DeliveryRecord] = list(unsent)
        abandoned: list[str] = []
        for o in outcomes:
            if o.state in (ABANDONED, DEFERRED):
                abandoned.append(delivery_id(run.key, o.item.channel, o.item.customer))
                continue
            records.append(
                DeliveryRecord(
                    o.item.customer,
                    o.item.channel,
                    o.state,
                    to=o.item.to,
                    provider_id=o.provider_id,
                    error=o.error,
                    reason=o.reason,
                    attempts=o.attempts,
                    op=LedgerOp.OUTCOME,
                    segments=getattr(o.item.message, "segments", None),
                    variant=o.item.variant,
                )
            )
        if abandoned:
            await self._ledger.forget_pending(abandoned, epoch=run.epoch)
        marks = [
            DeliveryRecord(
                i.customer,
                i.channel,
                DeliveryState.PENDING,
                to=i.to,
                op=LedgerOp.MARK,
                variant=i.variant,
            )
            for i in pending
        ]
        refused = await self.write(run, records + marks)
        if not refused:
            return list(pending)
        return [i for i in pending if delivery_id(run.key, i.channel, i.customer) not in refused]

    async def note(self, run: Run, reason: str, detail: str) -> None:
        """Say on the campaign why its sending is held up (once per distinct detail)."""
        await self._store.record_invalid(run.campaign_id, reason, detail)

    async def write(self, run: Run, records: list[DeliveryRecord]) -> set[str]:
        """Apply `records` (in order); count what applied. Returns the refused delivery ids."""
        if not records:
            return set()
        refused = await self._ledger.write(
            run.key, epoch=run.epoch, records=records, now=self._clock.now(), shard=run.shard_index
        )
        lost = False
        for rec in records:
            if rec.state == DeliveryState.PENDING:
                continue
            if refused and delivery_id(run.key, rec.channel, rec.customer) in refused:
                lost = lost or rec.operation is LedgerOp.OUTCOME
                continue
            self._metrics.sends.labels(rec.channel, rec.state).inc()
            if rec.variant is not None:
                self._metrics.split_sends.labels(rec.channel, rec.variant, rec.state).inc()
            name = counter_name(rec.channel, rec.state)
            run.unflushed[name] = run.unflushed.get(name, 0) + 1
            if rec.state == DeliveryState.FAILED and rec.reason in FEEDBACK_COUNTERS:
                name = FEEDBACK_COUNTERS[rec.reason]
                run.unflushed[name] = run.unflushed.get(name, 0) + 1
            if (extra := suppressed_counter(rec.channel, rec.state, rec.reason)) is not None:
                run.unflushed[extra] = run.unflushed.get(extra, 0) + 1
                why = (rec.reason or "").partition(":")[2]
                self._metrics.suppressed_skips.labels(rec.channel, why).inc()
        if lost:
            raise LeaseLost(f"campaign {run.key}: epoch {run.epoch}'s pending rows were settled")
        await self.flush_counters(run)
        return refused

    async def flush_counters(self, run: Run, *, force: bool = False) -> None:
        """Live `performance` counters, one `$inc` at most every COUNTER_FLUSH_S."""
        now_m = self._clock.monotonic()
        if not run.unflushed or (not force and now_m - run.flushed_at < COUNTER_FLUSH_S):
            return
        counts, run.unflushed = run.unflushed, {}
        run.flushed_at = now_m
        if run.shard is not None:
            # A shard's counters: fenced by its own lease, not the campaign's epoch.
            await self._store.add_performance(run.campaign_id, epoch=None, counts=counts)
            return
        owned = await self._store.add_performance(run.campaign_id, epoch=run.epoch, counts=counts)
        if not owned:
            raise LeaseLost(f"campaign {run.key} epoch {run.epoch} was superseded")
