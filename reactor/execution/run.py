"""One campaign's run on this instance: from the claimed document to `sendsDone`, or one shard's.

For each batch of targeted ids the run has it prepared (`prepare`: recipients, what the ledger
already holds, suppressions, rendered messages) and hands the messages still to send to a
`SendWindow` per channel. Each
channel goes through the audience at its own provider's pace; the next batch is prepared while
the current one sends. When the window closes mid-run, whoever was not reached is `skipped`.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Sequence

import anyio

from ..config import SendConfig
from ..domain.consent import Links
from ..domain.deliveries import (
    DeliveryRecord,
    DeliveryState,
    LedgerOp,
    performance,
)
from ..domain.errors import InvalidCampaign, LeaseLost
from ..domain.ids import normalise_id
from ..domain.models import Campaign, Channel, parse_campaign, target_problem
from ..domain.shards import CHUNKS_PER_SHARD, Shard, shard_plan
from ..limits.ratelimit import RateLimit
from ..metrics import Metrics
from ..ports import CampaignStore, Clock, EmailSender, Ledger, Recipients, SmsSender
from ..suppression import SuppressionList
from .deliver import Deliverer
from .ledger import Item, LedgerWriter
from .prepare import Ahead, BatchPreparer, chunks
from .resolve import resolve_uncertain_sms
from .shards import AudienceStore, ShardStore, coordinate
from .state import Run, StopReason, unless_stopped
from .window import SendWindow

log = logging.getLogger(__name__)


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
        shards_created: Callable[[], None] | None = None,
    ) -> None:
        self.run = run
        self._shards_created = shards_created
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
        self._preparer = BatchPreparer(
            recipients=recipients,
            ledger=ledger,
            senders=senders,
            clock=clock,
            config=config,
            suppressions=suppressions,
            links=links,
        )

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
        segment = campaign.segment
        if segment is not None or (
            self._shards is not None and size is not None and len(campaign.targets) > size
        ):
            if self._shards is None or size is None:
                raise InvalidCampaign("bad_segment", "segments need the shard store")
            if segment is not None:
                # An audience outside the document: frozen in chunks at the start, one shard
                # per chunk.
                if self._audiences is None:
                    raise InvalidCampaign("bad_segment", "segments need the audience store")
                # In chunks an eighth of a shard, so that the shards (runs of chunks) can be
                # cut as evenly for the replicas as a list's.
                unit = max(1, size // CHUNKS_PER_SHARD)
                n_chunks = await self._audiences.materialize(run.key, segment, unit)
                ranges, source = await self._plan(n_chunks, max(1, size // unit)), "audience"
            else:
                ranges, source = await self._plan(len(campaign.targets), size), "list"
            await coordinate(
                run,
                ranges,
                size=size,
                source=source,
                shards=self._shards,
                clock=self._clock,
                owner=self._instance,
                lease_s=self._lease_s,
                close=self._close_shard,
                created=self._shards_created,
            )
            total = (
                await self._audiences.total(run.key)
                if segment is not None and self._audiences is not None
                else len(campaign.targets)
            )
            await self._finish(campaign, total)
            return
        targets = list(dict.fromkeys(normalise_id(t) for t in campaign.targets))
        await self._send_targets(campaign, targets)
        await self._finish(campaign, len(targets))

    async def _plan(self, total: int, size: int) -> list[tuple[int, int]]:
        """The campaign's shards, cut for the shard slots of the replicas alive now (at least
        this one's), so that they finish together."""
        assert self._shards is not None
        slots = max(await self._shards.live_slots(), self._config.shard_concurrency, 1)
        ranges = shard_plan(total, size, slots)
        log.info(
            "🧩 %d targets of %s cut for %d shard slots",
            total,
            self.run.name,
            slots,
            extra={"campaign_id": self.run.key, "count": len(ranges)},
        )
        return ranges

    async def _send_shard(self, shard: Shard) -> None:
        """Send one shard's slice of the audience, then mark the shard done (or give it back
        when stopped before the end)."""
        run = self.run
        assert self._shards is not None
        if shard.source == "audience":
            assert self._audiences is not None
            doc = await self._store.get(run.campaign_id)
            ids = []
            for index in range(shard.start, shard.start + shard.count):
                ids += await self._audiences.chunk(run.key, index)
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
        batches = list(chunks(targets, self._config.batch_size))
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
            ahead = (
                Ahead(tg, self._preparer.prepare, run, campaign, channel, batches[0])
                if batches
                else None
            )
            for i, batch in enumerate(batches):
                if run.stop_reason not in (None, StopReason.WINDOW_CLOSED):
                    break
                if run.stop_reason is None and ahead is not None:
                    prepared = await ahead.get()
                    ahead = (
                        Ahead(tg, self._preparer.prepare, run, campaign, channel, batches[i + 1])
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
