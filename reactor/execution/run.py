"""One campaign's run on this instance: from the claimed document to `sendsDone`, or one shard's.

For each batch of targeted ids the run has it prepared (`prepare`: recipients, what the ledger
already holds, suppressions, rendered messages) and hands the messages still to send to a
`SendWindow` per channel. Each
channel goes through the audience at its own provider's pace; the next batch is prepared while
the current one sends. When the window closes mid-run, whoever was not reached is `skipped`.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime as dt
import logging
from collections.abc import Callable, Sequence
from typing import Any

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
from ..domain.senders import campaign_from
from ..domain.shards import CHUNKS_PER_SHARD, Shard, shard_plan
from ..domain.variants import compile_content
from ..domain.zones import LocalTime, in_window, parse_local_time
from ..engagement.tracker import Tracker
from ..limits.ratelimit import RateLimit
from ..metrics import Metrics
from ..ports import CampaignStore, Clock, EmailSender, Ledger, Recipients, SmsSender
from ..suppression import SuppressionList
from .deliver import Deliverer
from .lanes import Lanes
from .ledger import Item, LedgerWriter
from .localtime import InstantTimer, persist_plan, plan, timers_from_plan
from .prepare import Ahead, BatchPreparer, chunks
from .resolve import resolve_uncertain_sms
from .shards import AudienceStore, ShardStore, coordinate, watch
from .state import Run, StopReason, unless_stopped
from .window import SendWindow

log = logging.getLogger(__name__)

WINNER_POLL_S = 1.0  # how often a split's owner looks for the winner while the rest waits
MAX_WAIT_S = 30.0  # a wait for a local-time instant re-reads the clock at least this often
PREPARE_AHEAD_S = 1.0  # a local-time batch's first recipients are read this long before it
LOCAL_BATCH_HOOKS: list[Any] = []  # bench/test hooks every run gets (see on_local_batch)
DEFAULT_LOCAL_SHARD = 500  # ids per local-time shard when SHARD_SIZE is unset


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
        tracker: Tracker | None = None,
        shards: ShardStore | None = None,
        audiences: AudienceStore | None = None,
        lease_s: float = 30.0,
        lanes: Lanes | None = None,
        shards_created: Callable[[], None] | None = None,
    ) -> None:
        self.run = run
        self._lanes = lanes
        self._shards_created = shards_created
        # Bench/test hook: on_local_batch(key, due_at, wake_lateness_s, size) as a batch's
        # first recipients are read (PREPARE_AHEAD_S before its instant).
        self.on_local_batch: list[Any] = list(LOCAL_BATCH_HOOKS)
        self.armed: list[InstantTimer] = []  # a localTime campaign's timers, one per instant
        self._audiences = audiences
        self._shards = shards
        self._lease_s = lease_s
        self._suppressions = suppressions
        self._links = links
        self._tracker = tracker
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
            metrics=metrics,
            tracker=tracker,
        )

    async def send(self) -> None:
        run = self.run
        if run.shard is not None:
            await self._send_shard(run.shard)
            return
        loaded = await self._load()
        if loaded is None:
            return
        campaign, local = loaded
        await self._ledger_rows.record_execution(
            run.key,
            epoch=run.epoch,
            owner=self._instance,
            fields={"startedAt": self._clock.now(), "owner": self._instance, "state": "running"},
        )
        if run.epoch > 1:  # only a takeover can find rows an earlier owner left pending
            await self._settle_previous_pending()
        if local is not None:  # each recipient at their own hour
            await self._send_local(campaign, local)
            return
        size = self._config.shard_size
        if campaign.segment is not None or (
            self._shards is not None and size is not None and len(campaign.targets) > size
        ):
            if self._shards is None or size is None:
                raise InvalidCampaign("bad_segment", "segments need the shard store")
            await self._send_sharded(campaign, size)
            return
        targets = list(dict.fromkeys(normalise_id(t) for t in campaign.targets))
        await self._send_targets(campaign, targets)
        if campaign.split is not None:
            decided = await self._await_winner(campaign)
            if decided is not None:
                await self._send_targets(decided, targets)
        await self._finish(campaign, len(targets))

    async def _load(self) -> tuple[Campaign, LocalTime | None] | None:
        """The claimed campaign as it is now, or None when it cannot be sent (recorded on it,
        and its sends marked done)."""
        run = self.run
        doc = await self._store.get(run.campaign_id, with_targets=True)
        if doc is None:
            raise LeaseLost(f"campaign {run.key} was deleted")
        try:
            campaign = parse_campaign(doc)
            compile_content(campaign)  # the content may have changed since it was armed
            self._use_lane(doc)
            return campaign, parse_local_time(doc.get("localTime"))
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
            return None

    async def _send_sharded(self, campaign: Campaign, size: int) -> None:
        """A large list or a segment: cut into shards every replica claims, then watched."""
        run = self.run
        segment = campaign.segment
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
        await self._coordinate(ranges, size, source)
        if campaign.split is not None and await self._await_winner(campaign) is not None:
            # The rest of a split: one more shard per planned range (indexes after the
            # test's), whose runs send the winner to whoever the test shards did not mark.
            await self._coordinate(ranges, size, source, rest=True)
        total = (
            await self._audiences.total(run.key)
            if segment is not None and self._audiences is not None
            else len(campaign.targets)
        )
        await self._finish(campaign, total)

    async def _send_local(self, campaign: Campaign, local: LocalTime) -> None:
        targets = list(dict.fromkeys(normalise_id(t) for t in campaign.targets))
        if self._shards is None:  # in-memory ports: the plan in memory, sent by this run
            await self._send_at_local_times(campaign, local, targets)
        else:
            await self._send_local_shards(campaign, local, targets)
        await self._finish(campaign, len(targets))

    async def _coordinate(
        self, ranges: list[tuple[int, int]], size: int, source: str, *, rest: bool = False
    ) -> None:
        assert self._shards is not None
        await coordinate(
            self.run,
            ranges,
            size=size,
            source=source,
            shards=self._shards,
            clock=self._clock,
            owner=self._instance,
            lease_s=self._lease_s,
            close=self._close_shard,
            created=self._shards_created,
            rest=rest,
        )

    async def _await_winner(self, campaign: Campaign) -> Campaign | None:
        """A split's test group is sent: wait for the winner (the decision, or an operator's
        `abTest.winner`) and return the campaign as the rest's pass sees it. A window that
        closes first returns it undecided (that pass records the rest `window_closed`); a
        pause, shutdown or lost lease returns None (whoever resumes waits again)."""
        run = self.run
        while True:
            if campaign.split is not None and campaign.split.chosen is not None:
                return campaign
            if run.stop_reason == StopReason.WINDOW_CLOSED:
                await self._ledger.note(
                    run,
                    "split_undecided",
                    "the window closed before the A/B winner was known: "
                    "the rest of the audience is skipped (window_closed)",
                )
                return campaign
            if run.stop_reason is not None:
                return None
            if not await unless_stopped(run, self._clock.sleep, WINNER_POLL_S):
                continue
            doc = await self._store.get(run.campaign_id)
            if doc is None:
                raise LeaseLost(f"campaign {run.key} was deleted")
            try:
                campaign = parse_campaign(doc)
            except InvalidCampaign:
                continue  # e.g. a mistyped abTest.winner: reported by the scheduler's sync

    async def _send_at_local_times(
        self, campaign: Campaign, local: LocalTime, targets: list[str]
    ) -> None:
        """Each instant's group when it is due; whoever is due outside [startDate, endDate]
        is skipped (`outside_window`). A closing window records the rest `window_closed`."""
        run = self.run
        groups = await plan(
            self._recipients, targets, local, campaign.start_at, self._config.batch_size
        )
        outside = [
            c
            for due, group in groups.items()
            if not in_window(due, campaign.start_at, campaign.end_at)
            for c in group
        ]
        if outside:
            await self._ledger.write(
                run,
                [
                    DeliveryRecord(c, ch, DeliveryState.SKIPPED, reason="outside_window")
                    for ch in sorted(campaign.channels)
                    for c in outside
                ],
            )
        for due, group in groups.items():
            if not in_window(due, campaign.start_at, campaign.end_at):
                continue
            # Woken a little early to read and render the first batch, which then waits for
            # the instant itself: what is left at the instant is marking and sending.
            # In slices, the clock read again after each: a corrected clock cannot misfire it.
            while (wait_s := (due - self._clock.now()).total_seconds() - PREPARE_AHEAD_S) > 0:
                if not await unless_stopped(run, self._clock.sleep, min(wait_s, MAX_WAIT_S)):
                    break
            if run.stop_reason not in (None, StopReason.WINDOW_CLOSED):
                return  # paused, shut down or taken over: whoever resumes re-plans
            # How late this wake-up was, against the planned one (PREPARE_AHEAD_S early):
            lateness_s = (self._clock.now() - due).total_seconds() + PREPARE_AHEAD_S
            for hook in self.on_local_batch:
                hook(run.key, due, lateness_s, len(group))
            log.info(
                "🕙 Local-time batch of %s due %s: %d recipients",
                run.name,
                due.isoformat(),
                len(group),
                extra={"campaign_id": run.key, "count": len(group), "lateness_s": lateness_s},
            )
            await self._send_targets(campaign, group, not_before=due)

    async def _send_local_shards(
        self, campaign: Campaign, local: LocalTime, targets: list[str]
    ) -> None:
        """The plan written once as per-instant shards (see localtime.persist_plan), one
        timer per distinct instant armed here, and the shards watched until all are done:
        every replica claims an instant's shards from PREPARE_AHEAD_S before it."""
        run = self.run
        assert self._shards is not None
        timers = await self._local_timers(campaign, local, targets)
        self.armed = timers
        log.info(
            "🕙 %s armed at %d local-time instants",
            run.name,
            len(timers),
            extra={"campaign_id": run.key, "count": len(timers)},
        )
        await self._shards.reopen(run.key)  # resumed after a pause: claimable again
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._arm_instants, timers)
            await watch(
                run,
                shards=self._shards,
                clock=self._clock,
                owner=self._instance,
                lease_s=self._lease_s,
                close=self._close_shard,
            )
            tg.cancel_scope.cancel()

    async def _local_timers(
        self, campaign: Campaign, local: LocalTime, targets: list[str]
    ) -> list[InstantTimer]:
        """The campaign's instants: from its persisted plan, or planned and written now."""
        run = self.run
        assert self._shards is not None
        instants = await self._shards.local_plan(run.key)
        if instants is None:
            index = 0
            shards = self._shards

            async def write_shard(due: dt.datetime, part: int, ids: list[str]) -> None:
                nonlocal index
                not_before = due - dt.timedelta(seconds=PREPARE_AHEAD_S)
                await shards.create_local(
                    run.key,
                    run.campaign_id,
                    index=index,
                    due=due,
                    part=part,
                    ids=ids,
                    not_before=not_before,
                    name=run.name,
                )
                index += 1

            async def outside(ids: list[str]) -> None:
                await self._ledger.write(
                    run,
                    [
                        DeliveryRecord(c, ch, DeliveryState.SKIPPED, reason="outside_window")
                        for ch in sorted(campaign.channels)
                        for c in ids
                    ],
                )

            instants = await persist_plan(
                self._recipients,
                targets,
                local,
                (campaign.start_at, campaign.end_at),
                batch_size=self._config.batch_size,
                shard_size=self._config.shard_size or DEFAULT_LOCAL_SHARD,
                write_shard=write_shard,
                outside=outside,
            )
            await self._shards.save_local_plan(run.key, instants)
            instants = await self._shards.local_plan(run.key) or []  # the first writer's
        return timers_from_plan(run.key, instants)

    async def _arm_instants(self, timers: list[InstantTimer]) -> None:
        """Wake this replica's shard claims as each instant's shards become claimable (the
        other replicas' claim loops poll more often than PREPARE_AHEAD_S), and report each
        instant's wake-up lateness to the hooks."""
        run = self.run
        for timer in timers:
            wake_at = timer.due_at - dt.timedelta(seconds=PREPARE_AHEAD_S)
            # In slices, the clock read again after each: a corrected clock cannot misfire it.
            while (wait_s := (wake_at - self._clock.now()).total_seconds()) > 0:
                await self._clock.sleep(min(wait_s, MAX_WAIT_S))
            if run.stop_reason is not None:
                return
            lateness_s = (self._clock.now() - timer.due_at).total_seconds() + PREPARE_AHEAD_S
            if lateness_s > PREPARE_AHEAD_S:
                continue  # a takeover after this instant: its shards are being sent already
            if self._shards_created is not None:
                self._shards_created()
            for hook in self.on_local_batch:
                hook(run.key, timer.due_at, lateness_s, timer.recipients)
            log.info(
                "🕙 Local-time batch of %s due %s: %d recipients in %d shards",
                run.name,
                timer.due_at.isoformat(),
                timer.recipients,
                timer.shards,
                extra={"campaign_id": run.key, "count": timer.recipients},
            )

    def _use_lane(self, doc: dict[str, Any]) -> None:
        """Send through the campaign's sending identity (its relay, key, budget, breaker).
        Raises InvalidCampaign(unknown_sender) if it names none."""
        if self._lanes is None:
            return
        lane = self._lanes.for_campaign(doc)
        self._senders, self._limits, self._deliverer = lane.senders, lane.limits, lane.deliverer
        config = dataclasses.replace(self._config, message_domain=lane.message_domain)
        self._preparer = BatchPreparer(
            recipients=self._recipients,
            ledger=self._ledger_rows,
            senders=lane.senders,
            clock=self._clock,
            config=config,
            suppressions=self._suppressions,
            links=self._links,
            metrics=self._metrics,
            tracker=self._tracker,
            sender=campaign_from(doc),
        )

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
        elif shard.source == "local":
            doc = await self._store.get(run.campaign_id)
            ids = await self._shards.local_ids(shard.id)
        else:
            doc = await self._store.get_slice(run.campaign_id, shard.start, shard.count)
            ids = list((doc or {}).get("targetedCustomerIds") or [])
        if doc is None:
            raise LeaseLost(f"campaign {run.key} was deleted")
        campaign = parse_campaign(doc)
        self._use_lane(doc)
        if run.epoch > 1:
            await self._settle_previous_pending()
        usable = [v for v in ids if target_problem(v) is None]
        if len(usable) < len(ids):
            detail = f"{len(ids) - len(usable)} audience values are not customer ids"
            log.warning("shard %d of %s: %s", shard.index, run.name, detail)
            await self._store.record_invalid(run.campaign_id, "bad_targets", detail)
        targets = list(dict.fromkeys(normalise_id(t) for t in usable))
        if shard.rest and campaign.split is not None and campaign.split.chosen is None:
            # A split's rest pass with no winner: its owner started it because the window
            # closed first, so whoever the test did not mark is recorded window_closed.
            for channel in sorted(campaign.channels):
                for batch in chunks(targets, self._config.batch_size):
                    await self._close_window(channel, batch)
        else:
            # A local-time shard is claimed a little before its instant: its first batch is
            # read and rendered, and nothing is marked or sent before the instant itself.
            await self._send_targets(campaign, targets, not_before=shard.due)
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

    async def _send_targets(
        self, campaign: Campaign, targets: list[str], *, not_before: dt.datetime | None = None
    ) -> None:
        """Send `targets` on every channel; with `not_before`, the first batch is prepared at
        once but nothing is marked or sent before that instant."""
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
                tg.start_soon(self._send_channel, campaign, channel, batches, found, not_before)
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
        not_before: dt.datetime | None = None,
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
                    if i == 0 and not_before is not None:
                        wait_s = (not_before - self._clock.now()).total_seconds()
                        if wait_s > 0:
                            await unless_stopped(run, self._clock.sleep, wait_s)
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
