"""One campaign's run on this instance: from the claimed document to `sendsDone`.

For each batch of targeted ids the run resolves recipients, reads what the ledger already says
(a resumed or taken-over run never re-sends `sent`, and treats a `pending` row left by an earlier
epoch as `uncertain`), and hands the messages still to send to a `SendWindow` per channel. Each
channel goes through the audience at its own provider's pace; the next batch is prepared while
the current one sends. When the window closes mid-run, whoever was not reached is `skipped`.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import anyio

from ..config import SendConfig
from ..domain.addresses import email_address, phone_address
from ..domain.consent import Links, skip_reason
from ..domain.deliveries import (
    TERMINAL_STATES,
    DeliveryRecord,
    DeliveryState,
    LedgerOp,
    performance,
)
from ..domain.errors import InvalidCampaign, LeaseLost
from ..domain.ids import normalise_id
from ..domain.messages import email_message, sms_message
from ..domain.models import Campaign, Channel, parse_campaign, target_problem
from ..domain.shards import Shard, shard_ranges
from ..metrics import Metrics
from ..ports import CampaignStore, Clock, EmailSender, Ledger, Recipient, Recipients, SmsSender
from ..ratelimit import RateLimit
from ..suppression import SuppressionList
from .deliver import Deliverer
from .ledger import Item, LedgerWriter
from .resolve import resolve_uncertain_sms
from .shards import AudienceStore, ShardStore, coordinate
from .smsgate import gate_sms
from .state import Run, StopReason, unless_stopped
from .window import SendWindow

log = logging.getLogger(__name__)

T = TypeVar("T")

YIELD_EVERY = 50  # recipients prepared between two turns of the event loop


@dataclass
class Prepared:
    """One batch ready to send on one channel: the rows to record without sending (skipped,
    or uncertain), and the messages."""

    found: int
    unsent: list[DeliveryRecord] = field(default_factory=list)
    items: list[Item] = field(default_factory=list)
    waiting: list[tuple[float, Item]] = field(default_factory=list)  # for the recipient's hours


class Ahead(Generic[T]):
    """A result computed in the background of a task group; `get()` waits for it (and raises
    what it raised)."""

    def __init__(
        self, tg: anyio.abc.TaskGroup, fn: Callable[..., Awaitable[T]], *args: Any
    ) -> None:
        self._done = anyio.Event()
        self._result: T | None = None
        self._error: Exception | None = None
        tg.start_soon(self._run, fn, args)

    async def _run(self, fn: Callable[..., Awaitable[T]], args: tuple[Any, ...]) -> None:
        try:
            self._result = await fn(*args)
        except Exception as exc:
            self._error = exc
        finally:
            self._done.set()

    async def get(self) -> T:
        await self._done.wait()
        if self._error is not None:
            raise self._error
        assert self._result is not None
        return self._result


class CampaignRun:
    """Sends one claimed campaign once, as `run` (its epoch) says."""

    def __init__(
        self,
        run: Run,
        *,
        store: CampaignStore,
        ledger: Ledger,
        recipients: Recipients,
        senders: dict[Channel, EmailSender | SmsSender | None],
        limits: dict[Channel, RateLimit],
        deliverer: Deliverer,
        writer: LedgerWriter,
        clock: Clock,
        metrics: Metrics,
        config: SendConfig,
        instance_id: str,
        suppressions: SuppressionList | None = None,
        links: Links | None = None,
        shards: ShardStore | None = None,
        audiences: AudienceStore | None = None,
        lease_s: float = 30.0,
    ) -> None:
        self.run = run
        self._audiences = audiences
        self._shards = shards
        self._lease_s = lease_s
        self._suppressions = suppressions
        self._links = links
        self._store = store
        self._ledger_rows = ledger
        self._recipients = recipients
        self._senders = senders
        self._limits = limits
        self._deliverer = deliverer
        self._ledger = writer
        self._clock = clock
        self._metrics = metrics
        self._config = config
        self._instance = instance_id

    async def send(self) -> None:
        run = self.run
        if run.shard is not None:
            await self._send_shard(run.shard)
            return
        doc = await self._store.get(run.campaign_id, with_targets=True)
        if doc is None:
            raise LeaseLost(f"campaign {run.key} was deleted")
        try:
            campaign = parse_campaign(doc)
        except InvalidCampaign as exc:
            self._metrics.campaign_errors.labels(exc.reason).inc()
            log.error(
                "campaign %s cannot be sent: %s",
                run.name,
                exc,
                extra={"campaign_id": run.key, "reason": exc.reason},
            )
            await self._store.record_invalid(run.campaign_id, exc.reason, exc.detail)
            await self._store.mark_sends_done(run.campaign_id, epoch=run.epoch)
            return
        await self._ledger_rows.record_execution(
            run.key,
            epoch=run.epoch,
            owner=self._instance,
            fields={"startedAt": self._clock.now(), "owner": self._instance, "state": "running"},
        )
        if run.epoch > 1:  # only a takeover can find rows an earlier owner left pending
            await self._settle_previous_pending()
        size = self._config.shard_size
        if campaign.segment is not None:
            # An audience outside the document: frozen in chunks at the start, one shard each.
            if self._audiences is None or self._shards is None or size is None:
                raise InvalidCampaign("bad_segment", "segments need the shard and audience stores")
            chunks = await self._audiences.materialize(run.key, campaign.segment, size)
            await coordinate(
                run,
                [(i, 1) for i in range(chunks)],
                size=size,
                source="audience",
                shards=self._shards,
                clock=self._clock,
                owner=self._instance,
                lease_s=self._lease_s,
                close=self._close_shard,
            )
            await self._finish(campaign, await self._audiences.total(run.key))
            return
        if self._shards is not None and size is not None and len(campaign.targets) > size:
            await coordinate(
                run,
                shard_ranges(len(campaign.targets), size),
                size=size,
                shards=self._shards,
                clock=self._clock,
                owner=self._instance,
                lease_s=self._lease_s,
                close=self._close_shard,
            )
            await self._finish(campaign, len(campaign.targets))
            return
        targets = list(dict.fromkeys(normalise_id(t) for t in campaign.targets))
        await self._send_targets(campaign, targets)
        await self._finish(campaign, len(targets))

    async def _send_shard(self, shard: Shard) -> None:
        """Send one shard's slice of the audience, then mark the shard done (or give it back
        when stopped before the end)."""
        run = self.run
        assert self._shards is not None
        if shard.source == "audience":
            assert self._audiences is not None
            doc = await self._store.get(run.campaign_id)
            ids = await self._audiences.chunk(run.key, shard.start)
        else:
            doc = await self._store.get_slice(run.campaign_id, shard.start, shard.count)
            ids = list((doc or {}).get("targetedCustomerIds") or [])
        if doc is None:
            raise LeaseLost(f"campaign {run.key} was deleted")
        campaign = parse_campaign(doc)
        if run.epoch > 1:
            await self._settle_previous_pending()
        usable = [v for v in ids if target_problem(v) is None]
        if len(usable) < len(ids):
            detail = f"{len(ids) - len(usable)} audience values are not customer ids"
            log.warning("shard %d of %s: %s", shard.index, run.name, detail)
            await self._store.record_invalid(run.campaign_id, "bad_targets", detail)
        targets = list(dict.fromkeys(normalise_id(t) for t in usable))
        await self._send_targets(campaign, targets)
        if run.epoch > 1:
            await self._settle_previous_pending()
        await self._ledger.flush_counters(run, force=True)
        if run.stop_reason in (StopReason.PAUSED, StopReason.SHUTDOWN, StopReason.LEASE_LOST):
            with anyio.CancelScope(shield=True):
                await self._shards.release(
                    shard.id, epoch=run.epoch, hold=run.stop_reason == StopReason.PAUSED
                )
            self._metrics.shard_events.labels("released").inc()
            return
        if await self._shards.finish(shard.id, epoch=run.epoch):
            self._metrics.shard_events.labels("done").inc()
            log.info(
                "🧩 Shard %d of %s done (%d targets)",
                shard.index,
                run.name,
                len(targets),
                extra={"campaign_id": run.key, "shard": shard.index, "epoch": run.epoch},
            )

    async def _close_shard(self, closing: Run) -> None:
        """Close a shard nobody else will (the window closed): its rest is recorded skipped."""
        sibling = copy.copy(self)
        sibling.run = closing
        await sibling.send()

    async def _send_targets(self, campaign: Campaign, targets: list[str]) -> None:
        run = self.run
        log.info(
            "📋 Fetching %d targeted customers by IDs",
            len(targets),
            extra={"campaign_id": run.key, "count": len(targets)},
        )
        batches = list(_chunks(targets, self._config.batch_size))
        found: dict[Channel, int] = {}
        async with anyio.create_task_group() as tg:
            for channel in sorted(campaign.channels):
                tg.start_soon(self._send_channel, campaign, channel, batches, found)
        found_total = max(found.values(), default=0)
        log.info(
            "Found %d customers in orders collection",
            found_total,
            extra={"campaign_id": run.key, "count": found_total},
        )

    async def _send_channel(
        self,
        campaign: Campaign,
        channel: Channel,
        batches: Sequence[Sequence[str]],
        found: dict[Channel, int],
    ) -> None:
        """One channel through every batch. Each channel resolves its own batches (a second
        read of the orders rows), which keeps memory bounded however far apart they drift."""
        run = self.run
        found[channel] = 0
        deferred: list[tuple[float, Item]] = []
        uncertain: list[Item] = []
        async with anyio.create_task_group() as tg:
            # The next batch is resolved and checked against the ledger while this one sends,
            # so the pipeline does not drain at every batch boundary.
            ahead = Ahead(tg, self._prepare, campaign, channel, batches[0]) if batches else None
            for i, batch in enumerate(batches):
                if run.stop_reason not in (None, StopReason.WINDOW_CLOSED):
                    break
                if run.stop_reason is None and ahead is not None:
                    prepared = await ahead.get()
                    ahead = (
                        Ahead(tg, self._prepare, campaign, channel, batches[i + 1])
                        if i + 1 < len(batches)
                        else None
                    )
                    found[channel] += prepared.found
                    deferred.extend(prepared.waiting)
                    if prepared.unsent:
                        await self._ledger.write(run, prepared.unsent)
                    if prepared.items and run.stop_reason is None:
                        window = self._window(channel, prepared.items, deferred, uncertain)
                        await window.send_all()
                if run.stop_reason == StopReason.WINDOW_CLOSED:
                    # The window closed during or before this batch: whoever was not reached is
                    # recorded as skipped, so every customer is accounted for.
                    await self._close_window(channel, batch)
            tg.cancel_scope.cancel()
        await self._send_deferred(channel, deferred, uncertain)
        if channel is Channel.SMS and uncertain:
            await resolve_uncertain_sms(
                self.run,
                uncertain,
                sender=self._senders[Channel.SMS],
                writer=self._ledger,
                clock=self._clock,
                metrics=self._metrics,
                after_s=self._config.sms_resolve_after_s,
            )

    async def _send_deferred(
        self, channel: Channel, deferred: list[tuple[float, Item]], uncertain: list[Item]
    ) -> None:
        """Send again what a provider refused for now, as each comes due, while the run goes
        on. Their pending rows were removed when deferred: a run that stops (a pause, a
        shutdown, a takeover) leaves them unmarked for whoever resumes; a closing window
        records them skipped."""
        run = self.run
        while deferred and run.stop_reason is None:
            due_m = min(d for d, _ in deferred)
            wait_s = due_m - self._clock.monotonic()
            if wait_s > 0 and not await unless_stopped(run, self._clock.sleep, wait_s):
                break
            now_m = self._clock.monotonic()
            ready = [item for d, item in deferred if d <= now_m]
            deferred[:] = [(d, item) for d, item in deferred if d > now_m]
            await self._window(channel, ready, deferred, uncertain).send_all()
        if deferred and run.stop_reason == StopReason.WINDOW_CLOSED:
            await self._close_window(channel, [item.customer for _, item in deferred])

    def _window(
        self,
        channel: Channel,
        items: list[Item],
        deferred: list[tuple[float, Item]],
        uncertain: list[Item],
    ) -> SendWindow:
        return SendWindow(
            self.run,
            channel,
            items,
            concurrency=self._config.concurrency,
            limiter=self._limits[channel],
            deliverer=self._deliverer,
            ledger=self._ledger,
            clock=self._clock,
            deferred=deferred,
            tempfail_retry_s=self._config.tempfail_retry_s,
            uncertain=uncertain,
            suppressions=self._suppressions,
        )

    async def _settle_previous_pending(self) -> None:
        """Rows an earlier epoch left `pending` may or may not have gone out: `uncertain`."""
        run = self.run
        rows = await self._ledger_rows.pending_from_other_epochs(
            run.key, run.epoch, run.shard_index
        )
        if not rows:
            return
        records = [
            DeliveryRecord(
                r["customer"],
                r["channel"],
                DeliveryState.UNCERTAIN,
                to=r.get("to"),
                reason="previous_owner_lost",
                op=LedgerOp.SETTLE,
            )
            for r in rows
        ]
        await self._ledger.write(run, records)
        log.warning(
            "%d deliveries of %s left pending by a previous owner are uncertain",
            len(records),
            run.name,
            extra={"campaign_id": run.key, "count": len(records)},
        )

    async def _prepare(
        self, campaign: Campaign, channel: Channel, batch: Sequence[str]
    ) -> Prepared:
        """Resolve one batch, read what the ledger already holds for it on this channel, and
        build the messages still to send (validated, rendered) and the rows to record without
        sending."""
        run = self.run
        recipients = await self._recipients.resolve(batch)
        states = await self._ledger_rows.states(run.key, channel, batch)
        prepared = Prepared(found=len(recipients))
        configured = self._senders[channel] is not None
        for n, customer in enumerate(batch):
            if n % YIELD_EVERY == YIELD_EVERY - 1:
                # Validating and rendering a batch is ~0.1 ms a recipient: let the heartbeats,
                # timers and webhooks this loop also serves run in between.
                await anyio.lowlevel.checkpoint()
            if customer in states:
                state, epoch, shard = states[customer]
                if shard != run.shard_index:
                    continue  # listed twice, in another shard too: that shard's row decides
                if state in TERMINAL_STATES or epoch >= run.epoch:
                    continue
                if state == DeliveryState.PENDING:
                    # An earlier owner marked it after this run settled its leftovers (it had
                    # not yet noticed the takeover): it may have gone out, so never re-send.
                    prepared.unsent.append(
                        DeliveryRecord(
                            customer,
                            channel,
                            DeliveryState.UNCERTAIN,
                            reason="previous_owner_lost",
                            op=LedgerOp.SETTLE,
                        )
                    )
                    continue
            recipient = recipients.get(customer)
            address: str | None = None
            if recipient is None:
                problem = "not_found"
            elif not configured:
                problem = "channel_not_configured"
            else:
                address, problem = self._address(channel, recipient)
            if recipient is None or address is None:
                prepared.unsent.append(
                    DeliveryRecord(customer, channel, DeliveryState.SKIPPED, reason=problem)
                )
                continue
            prepared.items.append(
                Item(
                    customer, channel, address, self._message(campaign, channel, recipient, address)
                )
            )
        if self._suppressions is not None and prepared.items:
            await self._drop_suppressed(channel, prepared)
        if channel is Channel.SMS and prepared.items:
            gated = gate_sms(
                prepared.items,
                campaign,
                now=self._clock.now(),
                now_m=self._clock.monotonic(),
                default_hours=self._config.sms_send_hours,
                fallback_zone=self._config.sms_fallback_timezone,
                max_segments=self._config.sms_max_segments,
            )
            prepared.items, prepared.waiting = gated.ready, gated.waiting
            prepared.unsent.extend(gated.refused)
        return prepared

    async def _drop_suppressed(self, channel: Channel, prepared: Prepared) -> None:
        """One lookup for the batch: whoever is suppressed is recorded skipped, not sent."""
        assert self._suppressions is not None
        checked_m = self._clock.monotonic()
        reasons = await self._suppressions.check(
            channel, [(item.customer, item.to) for item in prepared.items]
        )
        keep: list[Item] = []
        for item in prepared.items:
            item.checked_m = checked_m
            reason = reasons.get(item.customer)
            if reason is None:
                keep.append(item)
                continue
            prepared.unsent.append(
                DeliveryRecord(
                    item.customer,
                    channel,
                    DeliveryState.SKIPPED,
                    to=item.to,
                    reason=skip_reason(reason),
                )
            )
        prepared.items = keep

    def _address(self, channel: Channel, recipient: Recipient) -> tuple[str | None, str]:
        if channel is Channel.EMAIL:
            return email_address(recipient.email)
        return phone_address(recipient.phone, self._config.default_phone_region)

    def _message(
        self, campaign: Campaign, channel: Channel, recipient: Recipient, address: str
    ) -> Any:
        now = self._clock.now()
        if channel is Channel.SMS:
            return sms_message(
                campaign,
                recipient,
                address,
                links=self._links,
                now=now,
                opt_out_text=self._config.sms_opt_out_text,
            )
        return email_message(
            campaign,
            recipient,
            address,
            message_domain=self._config.message_domain,
            links=self._links,
            now=now,
        )

    async def _close_window(self, channel: Channel, batch: Sequence[str]) -> None:
        states = await self._ledger_rows.states(self.run.key, channel, batch)
        records = [
            DeliveryRecord(c, channel, DeliveryState.SKIPPED, reason="window_closed")
            for c in batch
            if c not in states
        ]
        await self._ledger.write(self.run, records)

    async def _finish(self, campaign: Campaign, targets: int) -> None:
        run = self.run
        if run.epoch > 1:
            # A stalled earlier owner may have marked rows after this run's first settle.
            await self._settle_previous_pending()
        await self._ledger.flush_counters(run, force=True)
        now = self._clock.now()
        counts = performance(await self._ledger_rows.counts(run.key))
        extra = {"campaign_id": run.key, **counts}
        if Channel.EMAIL in campaign.channels:
            log.info("✉️ Emails sent: %d/%d", counts["emailsSent"], targets, extra=extra)
        if Channel.SMS in campaign.channels:
            log.info("📱 SMS sent: %d/%d", counts["smsSent"], targets, extra=extra)
        await self._ledger_rows.record_execution(
            run.key,
            epoch=run.epoch,
            owner=self._instance,
            fields={"finishedAt": now, "state": run.stop_reason or "sent", "counts": counts},
        )
        if run.stop_reason in (StopReason.PAUSED, StopReason.SHUTDOWN, StopReason.LEASE_LOST):
            log.info(
                "⏸ Campaign %s stopped sending (%s); the ledger keeps its place",
                run.name,
                run.stop_reason,
                extra=extra,
            )
            await release(self._store, run)
            return
        await self._store.mark_sends_done(run.campaign_id, epoch=run.epoch, performance=counts)
        sent = counts["emailsSent"] + counts["smsSent"]
        if targets and not sent:
            log.warning(
                "⚠️ Campaign finished with nothing sent: %s (%d targeted); see its deliveries",
                run.name,
                targets,
                extra=extra,
            )
            return
        log.info("✅ Campaign executed successfully: %s", run.name, extra=extra)


async def release(store: CampaignStore, run: Run, retry_after_s: float = 0.0) -> None:
    """Give the lease up (another replica may continue), whatever is being cancelled."""
    with anyio.CancelScope(shield=True):
        await store.release(run.campaign_id, epoch=run.epoch, retry_after_s=retry_after_s)


def _chunks(values: Sequence[str], size: int) -> Iterator[Sequence[str]]:
    for i in range(0, len(values), size):
        yield values[i : i + size]
