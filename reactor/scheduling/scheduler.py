"""The scheduler: one idempotent `sync(document)` that arms or disarms a campaign's timers, and the
handlers that run when a timer fires (claim the start, or wind down and complete at the end).

Change events and sweep rows both go through `sync`, so the stream and the sweep can never
disagree about what a document wants — only about when they saw it, which `seen_at` settles.
"""

from __future__ import annotations

import datetime as dt
import logging
from typing import TYPE_CHECKING, Any

import anyio
from anyio.abc import TaskGroup
from bson import Timestamp

from ..config import SchedulerConfig
from ..domain.errors import InvalidCampaign
from ..domain.models import Campaign, Status, parse_campaign, parse_status, utc
from ..domain.schedule import (
    ACTIVE,
    StartDecision,
    TimerKey,
    TimerKind,
    desired_timers,
    start_decision,
    wants_takeover,
)
from ..domain.variants import compile_content
from ..execution import Executor, StopReason
from ..metrics import Metrics
from ..ports import CampaignStore, Clock
from ..splits.decide import Decider
from .admission import Admission
from .timers import TimerHeap

if TYPE_CHECKING:
    from ..notify.notifier import Notifier

log = logging.getLogger(__name__)

NOT_DUE_RETRY_S = 0.05


class Scheduler:
    def __init__(
        self,
        *,
        store: CampaignStore,
        executor: Executor,
        clock: Clock,
        metrics: Metrics,
        config: SchedulerConfig,
        decider: Decider | None = None,
        admission: Admission | None = None,
    ) -> None:
        self._decider = decider  # A/B splits' decisions (reactor.splits); None: not decided here
        # Checks a campaign must pass before its start is armed (its sending identity).
        self._admission = admission
        self._store = store
        self._executor = executor
        self._clock = clock
        self._metrics = metrics
        self._config = config
        self.timers: TimerHeap[TimerKey] = TimerHeap(
            clock, max_sleep_s=config.max_sleep_s, classify=lambda key: key.kind
        )
        self._ids: dict[str, Any] = {}  # campaign key -> _id as stored
        self._names: dict[str, str] = {}
        # Cluster time of the newest change event applied per campaign: an older sweep row
        # must not undo what the stream already did.
        self._event_ts: dict[str, Timestamp] = {}
        self._tg: TaskGroup | None = None
        self._inflight: set[TimerKey] = set()
        # Starts this instance already fired and settled (claimed, lost to another replica, or
        # missed): campaign key -> (due timestamp, monotonic time handled). A sweep row read
        # before our own claim landed must not re-arm them or count a repair.
        self._handled: dict[str, tuple[float, float]] = {}
        # Campaign key -> the start instant whose targets were checked and found readable.
        self._targets_checked: dict[str, float] = {}
        # Benchmark/test hooks: on_fired(key, due_at, lateness_s) as a timer pops;
        # on_started(key, lateness_s) once a start claim has committed.
        self.on_fired: list[Any] = []
        self.on_started: list[Any] = []
        # Notifications (reactor/notify): told of the state changes this instance won.
        self.notifier: Notifier | None = None

    # ---- running ---------------------------------------------------------------------------

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        async with anyio.create_task_group() as tg:
            self._tg = tg
            await tg.start(self.timers.run, self._fire)
            task_status.started()
            await anyio.sleep_forever()

    def _update_gauges(self) -> None:
        counts = self.timers.counts
        self._metrics.timers_armed.labels("start").set(counts[TimerKind.START])
        self._metrics.timers_armed.labels("end").set(counts[TimerKind.END])

    # ---- sync ------------------------------------------------------------------------------

    async def sync(
        self,
        doc: dict[str, Any],
        *,
        event_ts: Timestamp | None = None,
        seen_at: Timestamp | None = None,
    ) -> set[str]:
        """Make the armed timers match what `doc` wants. Returns what changed ("armed",
        "disarmed", "takeover") so the sweep can count its repairs."""
        key = str(doc.get("_id"))
        if self._seen_newer(key, event_ts, seen_at):
            return set()  # the stream has already shown us a newer version
        changes: set[str] = set()
        now = self._clock.now()
        try:
            status = parse_status(doc)
            if status not in ACTIVE:
                return self._disarm_all(key)
            campaign = parse_campaign(doc)
            # Compiled (and probed) when armed, before any claim: content that cannot render
            # leaves the campaign unarmed with lastError naming the part, line and problem.
            compile_content(campaign)
        except InvalidCampaign as exc:
            changes |= self._disarm_all(key)
            await self._reject(doc, exc, now)
            return changes
        if seen_at is not None and self._stale_row(campaign):
            return set()
        if event_ts is not None and campaign.status is not Status.APPROVED:
            self._handled.pop(key, None)
        self._ids[key] = campaign.id
        self._names[key] = campaign.name
        changes |= await self._arm_wanted(doc, campaign, now, recheck=event_ts is not None)
        self._follow_run(campaign)
        if wants_takeover(campaign, now) and not self._executor.active(key):
            # After a failed execution the lease was released for a retry: not a repair.
            changes.add("retry" if campaign.execution.failed else "takeover")
            self._spawn(self._take_over, campaign)
        self._update_gauges()
        return changes

    def _seen_newer(self, key: str, event_ts: Timestamp | None, seen_at: Timestamp | None) -> bool:
        """Record an event's time; True when a sweep row is older than an event already seen."""
        if event_ts is not None:
            self._event_ts[key] = event_ts
            return False
        if seen_at is not None:
            newer = self._event_ts.get(key)
            return newer is not None and newer > seen_at
        return False

    async def _arm_wanted(
        self, doc: dict[str, Any], campaign: Campaign, now: dt.datetime, *, recheck: bool
    ) -> set[str]:
        """Arm the timers the campaign wants now and disarm the others ("armed"/"disarmed")."""
        key = campaign.key
        changes: set[str] = set()
        wanted = {t.key: t for t in desired_timers(campaign, now, self._config.horizon_s)}
        start = TimerKey(key, TimerKind.START)
        if start in wanted and not await self._targets_ok(campaign, recheck=recheck):
            del wanted[start]  # reported on the document; not started
        if start in wanted and not await self._admitted(doc, campaign):
            del wanted[start]  # reported on the document (execution.lastError); not started
        for kind in TimerKind:
            timer_key = TimerKey(key, kind)
            if timer_key not in wanted and self.timers.disarm(timer_key):
                changes.add("disarmed")
        for timer in wanted.values():
            if self.timers.arm(timer.key, timer.due_at):
                changes.add("armed")
        return changes

    def _follow_run(self, campaign: Campaign) -> None:
        """Stop this replica's run of the campaign when it is paused or owned elsewhere now."""
        run = self._executor.runs.get(campaign.key)
        if run is None:
            return
        if campaign.status is Status.PAUSED:
            self._spawn(self._executor.stop, campaign.key, StopReason.PAUSED)
        elif campaign.execution.epoch > run.epoch:
            # Only a newer epoch means another replica owns it now; an older event that
            # arrives after our own claim must not stop us.
            self._spawn(self._executor.stop, campaign.key, StopReason.LEASE_LOST)

    async def _targets_ok(self, campaign: Campaign, *, recheck: bool) -> bool:
        """A campaign whose targets cannot be read is reported when its start is armed, not
        started and completed with nothing sent. Checked once per start instant (again after
        any change event, which may have fixed them), in the database."""
        checked = self._targets_checked.get(campaign.key)
        if checked == campaign.start_at.timestamp() and not recheck:
            return True
        problem = await self._store.target_problem(campaign.id)
        if problem is None:
            self._targets_checked[campaign.key] = campaign.start_at.timestamp()
            return True
        self._targets_checked.pop(campaign.key, None)
        await self._reject_doc(campaign.id, campaign.name, InvalidCampaign("bad_targets", problem))
        return False

    async def _admitted(self, doc: dict[str, Any], campaign: Campaign) -> bool:
        if self._admission is None:
            return True
        problem = await self._admission.check(doc, campaign)
        if problem is None:
            return True
        await self._reject_doc(campaign.id, campaign.name, problem)
        return False

    def _stale_row(self, campaign: Campaign) -> bool:
        """A sweep row older than a start this instance is handling or has handled."""
        if TimerKey(campaign.key, TimerKind.START) in self._inflight:
            return True
        handled = self._handled.get(campaign.key)
        return (
            campaign.status is Status.APPROVED
            and handled is not None
            and handled[0] == campaign.start_at.timestamp()
        )

    def forget(self, key: str) -> set[str]:
        """The document is gone (deleted): drop its timers and stop any sending."""
        changes = self._disarm_all(key)
        if self._executor.active(key):
            self._spawn(self._executor.stop, key, StopReason.PAUSED)
        return changes

    def _disarm_all(self, key: str) -> set[str]:
        self._handled.pop(key, None)
        self._targets_checked.pop(key, None)
        changes = set()
        for kind in TimerKind:
            if self.timers.disarm(TimerKey(key, kind)):
                changes.add("disarmed")
        if self._executor.active(key):
            # Stopped, cancelled or rejected while sending: stop within the second.
            self._spawn(self._executor.stop, key, StopReason.PAUSED)
        self._update_gauges()
        return changes

    async def _reject(self, doc: dict[str, Any], exc: InvalidCampaign, now: dt.datetime) -> None:
        if "_id" in doc:
            await self._reject_doc(doc["_id"], doc.get("name"), exc)

    async def _reject_doc(self, campaign_id: Any, name: Any, exc: InvalidCampaign) -> None:
        written = await self._store.record_invalid(campaign_id, exc.reason, exc.detail)
        if written:
            self._metrics.campaign_errors.labels(exc.reason).inc()
            log.error(
                "campaign %s (ID: %s) is invalid and will not be scheduled: %s",
                name,
                campaign_id,
                exc.detail,
                extra={"campaign_id": str(campaign_id), "reason": exc.reason},
            )

    def known_keys(self) -> set[str]:
        return {k.campaign for k in self.timers.keys()} | set(self._executor.runs)

    def forget_if_stale(self, key: str, seen_at: Timestamp) -> set[str]:
        """A sweep did not list `key`: forget it unless the stream has shown it since."""
        newer = self._event_ts.get(key)
        if newer is not None and newer > seen_at:
            return set()
        return self.forget(key)

    def prune_event_times(self, older_than: Timestamp) -> None:
        """Event times older than a completed sweep can no longer matter; nor can starts handled
        long enough ago that every stream event about them has arrived."""
        for key in [k for k, ts in self._event_ts.items() if ts <= older_than]:
            del self._event_ts[key]
        horizon = self._clock.monotonic() - 2 * self._config.reconcile_interval_s - 60
        for key in [k for k, (_, at) in self._handled.items() if at < horizon]:
            del self._handled[key]

    # ---- firing ----------------------------------------------------------------------------

    def _spawn(self, fn: Any, *args: Any) -> None:
        assert self._tg is not None, "Scheduler.run() must be running"
        self._tg.start_soon(self._guarded, fn, *args)

    async def _guarded(self, fn: Any, *args: Any) -> None:
        try:
            await fn(*args)
        except Exception:  # one campaign's failure must not stop the scheduler
            self._metrics.campaign_errors.labels("scheduler_error").inc()
            log.exception(
                "scheduling action %s failed for %s", getattr(fn, "__name__", fn), args[:1]
            )

    def _fire(self, key: TimerKey, due_at: dt.datetime, lateness: float) -> None:
        for hook in self.on_fired:
            hook(key, due_at, lateness)
        if key in self._inflight:
            return
        self._inflight.add(key)
        self._update_gauges()
        handler = self._fire_start if key.kind is TimerKind.START else self._fire_end
        if key.kind is TimerKind.DECIDE:
            handler = self._fire_decide
        self._spawn(self._run_fire, handler, key, due_at, lateness)

    async def _run_fire(
        self, handler: Any, key: TimerKey, due_at: dt.datetime, lateness: float
    ) -> None:
        try:
            await handler(key, due_at, lateness)
            if key.kind is TimerKind.START:
                self._handled[key.campaign] = (due_at.timestamp(), self._clock.monotonic())
        finally:
            self._inflight.discard(key)

    async def _fire_start(self, key: TimerKey, due_at: dt.datetime, lateness: float) -> None:
        campaign_id = self._ids.get(key.campaign)
        if campaign_id is None:
            return
        now = self._clock.now()
        decision = start_decision(
            due_at, dt.datetime.max.replace(tzinfo=dt.UTC), now, self._config.misfire_grace_s
        )
        if decision is StartDecision.NOT_DUE:
            # The wall clock stepped back since the timer fired: wait for the instant again.
            self.timers.arm(key, due_at)
            return
        t0 = self._clock.monotonic()
        claimed = None
        if decision is StartDecision.RUN:
            claimed = await self._store.claim_start(
                campaign_id,
                owner=self._config.instance_id,
                lease_s=self._config.lease_s,
                grace_s=self._config.misfire_grace_s,
            )
        if claimed is not None:
            self._started(key, claimed, lateness + (self._clock.monotonic() - t0), t0)
            return
        if decision is StartDecision.RUN and await self._store.not_due_yet(campaign_id):
            # Our estimate of the database's clock ran a few milliseconds ahead of it: the
            # database says not yet. Look again shortly (never start early).
            # The retry keeps the instant it was due: its lateness counts from there.
            retry_at = self._clock.now() + dt.timedelta(seconds=NOT_DUE_RETRY_S)
            self.timers.arm(key, retry_at, origin=due_at)
            self._update_gauges()
            return
        # Not ours to run: either another replica won, or it is too late to send.
        reason = self._missed_reason(now)
        if await self._store.mark_missed(
            campaign_id, grace_s=self._config.misfire_grace_s, reason=reason
        ):
            self._metrics.transitions.labels("missed").inc()
            if self.notifier is not None:
                self.notifier.post(self.notifier.missed, campaign_id, reason)
            log.warning(
                "⏭ Missed campaign: %s (ID: %s): %s; it will not be sent late",
                self._names.get(key.campaign, key.campaign),
                key.campaign,
                reason,
                extra={"campaign_id": key.campaign, "reason": reason},
            )
        else:
            log.debug("start of %s claimed elsewhere or no longer approved", key.campaign)

    def _started(
        self, key: TimerKey, claimed: dict[str, Any], committed: float, claimed_at_m: float
    ) -> None:
        """This instance won the start: count it, log it, start sending, arm the end."""
        self._metrics.timer_lateness.labels("start").observe(committed)
        for hook in self.on_started:
            hook(key, committed)
        self._metrics.transitions.labels("running").inc()
        name = claimed.get("name", key.campaign)
        execution = claimed.get("execution") or {}
        # On the document (set by the claim, by the database's clock): lateness against
        # startDate, what the business sees, a late approval included. In the metric:
        # lateness the reactor caused.
        log.info(
            "▶️ Started campaign: %s (ID: %s)",
            name,
            key.campaign,
            extra={
                "campaign_id": key.campaign,
                "lateness_ms": execution.get("startLatenessMs"),
                "epoch": execution.get("epoch"),
            },
        )
        self._executor.start(claimed, claimed_at_m=claimed_at_m)
        if self.notifier is not None:
            self.notifier.post(self.notifier.started, claimed)
        end_at = utc(claimed.get("endDate"))
        if end_at is not None:
            self.timers.arm(TimerKey(key.campaign, TimerKind.END), end_at)
            self._update_gauges()

    def _missed_reason(self, now: dt.datetime) -> str:
        return (
            f"start passed by more than the misfire grace of "
            f"{self._config.misfire_grace_s:g}s, or its window closed, before it could start "
            f"(checked at {now.isoformat()})"
        )

    async def _fire_decide(self, key: TimerKey, due_at: dt.datetime, lateness: float) -> None:
        """A split's decision is due: try the claim; while a decision is still wanted and this
        replica did not make it (not due by the database's clock, or another replica holds the
        claim and may die), look again shortly."""
        campaign_id = self._ids.get(key.campaign)
        if campaign_id is None or self._decider is None:
            return
        now = self._clock.now()
        retry_at: dt.datetime | None = now + dt.timedelta(seconds=self._config.lease_s)
        try:
            retry_at = (await self._decider.fire(campaign_id)).retry_at
        except Exception:  # one decision's failure (a lost connection): retry, as any replica
            self._metrics.campaign_errors.labels("split_decision_failed").inc()
            log.exception(
                "A/B decision of %s failed; retrying after the lease",
                key.campaign,
                extra={"campaign_id": key.campaign},
            )
        if retry_at is not None and key not in self.timers.keys():
            # Not due yet by the database's clock (ours ran a little ahead): look again shortly.
            soonest = self._clock.now() + dt.timedelta(seconds=NOT_DUE_RETRY_S)
            self.timers.arm(key, max(retry_at, soonest))
            self._update_gauges()

    async def _fire_end(self, key: TimerKey, due_at: dt.datetime, lateness: float) -> None:
        campaign_id = self._ids.get(key.campaign)
        if campaign_id is None:
            return
        run = self._executor.runs.get(key.campaign)
        if run is not None:
            await self._executor.stop(key.campaign, StopReason.WINDOW_CLOSED)
            completed = await self._store.complete(campaign_id, epoch=run.epoch)
        else:
            completed = await self._complete_orphan(campaign_id)
        if completed:
            self._metrics.timer_lateness.labels("end").observe(max(0.0, lateness))
            self._metrics.transitions.labels("completed").inc()
            if self.notifier is not None:
                self.notifier.post(self.notifier.completed, campaign_id)
            log.info(
                "✓ Completed campaign: %s (ID: %s)",
                self._names.get(key.campaign, key.campaign),
                key.campaign,
                extra={"campaign_id": key.campaign},
            )
            self._names.pop(key.campaign, None)

    async def _complete_orphan(self, campaign_id: Any) -> bool:
        """End of a campaign nobody here is sending: complete it if no live owner remains; an
        owner whose lease ran out first hands the unreached customers over as window_closed."""
        now = self._clock.now()
        doc = await self._store.get(campaign_id)
        if doc is None:
            return False
        try:
            campaign = parse_campaign(doc)
        except InvalidCampaign:
            return await self._store.complete(campaign_id)
        exe = campaign.execution
        if (
            campaign.status is Status.RUNNING
            and not exe.sends_done
            and exe.owner is not None
            and not exe.lease_expired(now)
        ):
            return False  # the owner is alive and will complete it
        if campaign.status is Status.RUNNING and not exe.sends_done and exe.epoch > 0:
            t0 = self._clock.monotonic()
            claimed = await self._store.claim_takeover(
                campaign_id,
                old_epoch=exe.epoch,
                owner=self._config.instance_id,
                lease_s=self._config.lease_s,
            )
            if claimed is None:
                return False
            self._metrics.lease_takeovers.inc()
            if self._executor.start(claimed, claimed_at_m=t0):
                await self._executor.stop(str(campaign_id), StopReason.WINDOW_CLOSED)
            return await self._store.complete(campaign_id, epoch=claimed["execution"]["epoch"])
        return await self._store.complete(campaign_id)

    async def _take_over(self, campaign: Campaign) -> None:
        t0 = self._clock.monotonic()
        claimed = await self._store.claim_takeover(
            campaign.id,
            old_epoch=campaign.execution.epoch,
            owner=self._config.instance_id,
            lease_s=self._config.lease_s,
        )
        if claimed is None:
            log.debug("takeover of %s lost to another replica", campaign.key)
            return
        self._metrics.lease_takeovers.inc()
        log.warning(
            "♻️ Took over campaign: %s (ID: %s) from %s; resuming from the ledger",
            campaign.name,
            campaign.key,
            campaign.execution.owner or "a released lease",
            extra={"campaign_id": campaign.key, "epoch": claimed.get("execution", {}).get("epoch")},
        )
        self._executor.start(claimed, claimed_at_m=t0)
