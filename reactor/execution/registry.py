"""The registry of runs on this instance: start a claimed campaign, heartbeat its lease, stop it,
stop them all at shutdown. One campaign's failure never takes the others (or the service) down.

A heartbeat extends the lease every second and notices within that second when the campaign was
paused, cancelled or taken over; sending then stops after the in-flight messages finish.

The owner fences itself by its own monotonic clock, never the wall clock: each renewal's lease is
the database's now + LEASE_SECONDS, which is no earlier than when this instance sent it, so the
lease surely holds until (send time + lease). From a margin before that, nothing new is handed to
a provider until a renewal succeeds. A stalled process (a VM pause, SIGSTOP, a long collection)
thus wakes up fenced, and learns from its next heartbeat that another replica took over.

An execution that fails is recorded on the campaign (`execution.lastError`, `failures`) and its
lease released with a back-off that doubles per failure; after EXECUTION_MAX_FAILURES in a row the
campaign becomes `failed` instead of looping through takeovers.

With a shard store, the instance also claims shards of running campaigns (any campaign's, up to
SHARD_CONCURRENCY at once) and sends them under each shard's own lease: see `shards`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import anyio

from ..config import SendConfig
from ..domain.consent import Links
from ..domain.errors import LeaseLost
from ..domain.models import Channel
from ..domain.retry import RetryPolicy
from ..domain.senders import DEFAULT, Senders
from ..domain.shards import parse_shard
from ..engagement.tracker import Tracker
from ..limits.budgets import BudgetStore, SharedBudget
from ..limits.ratelimit import RateLimit, TokenBucket
from ..metrics import Metrics
from ..ports import CampaignStore, Clock, EmailSender, Ledger, Recipients, SmsSender
from ..suppression import SuppressionList
from .deliver import Deliverer
from .lanes import Lane, Lanes
from .ledger import LedgerWriter
from .run import CampaignRun
from .shards import AudienceStore, ShardStore
from .state import Run, StopReason

if TYPE_CHECKING:
    from ..notify.notifier import Notifier

log = logging.getLogger(__name__)

SHARD_POLL_S = 0.5  # how often an instance with room looks for shards to claim


def _rate_limit(
    budgets: BudgetStore | None, key: str, rate_per_s: float, clock: Clock
) -> RateLimit:
    """With a budget store, the cluster's rate for `key`, shared by every replica; without one
    (tests on fakes), this instance's own."""
    if budgets is not None:
        return SharedBudget(budgets, key, rate_per_s, clock)
    return TokenBucket(clock, rate_per_s, monotonic=clock.monotonic)


def _channel_limits(
    budgets: BudgetStore | None, config: SendConfig, clock: Clock
) -> dict[Channel, RateLimit]:
    """The channel-wide rate limits: the default lane's email rate, and the SMS rate every
    lane shares."""
    return {
        Channel.EMAIL: _rate_limit(budgets, "channel:email", config.email_rate_per_s, clock),
        Channel.SMS: _rate_limit(budgets, "channel:sms", config.sms_rate_per_s, clock),
    }


class Executor:
    def __init__(
        self,
        *,
        store: CampaignStore,
        ledger: Ledger,
        recipients: Recipients,
        email: EmailSender | None,
        sms: SmsSender | None,
        clock: Clock,
        metrics: Metrics,
        config: SendConfig,
        instance_id: str,
        lease_s: float,
        max_failures: int = 5,
        retry_base_s: float = 10.0,
        retry_max_s: float = 600.0,
        suppressions: SuppressionList | None = None,
        links: Links | None = None,
        tracker: Tracker | None = None,
        budgets: BudgetStore | None = None,
        shards: ShardStore | None = None,
        audiences: AudienceStore | None = None,
        senders: Senders | None = None,
        identity_senders: Mapping[str, EmailSender] | None = None,
    ) -> None:
        self._shards = shards
        self._audiences = audiences
        self._suppressions = suppressions
        self._links = links
        self._tracker = tracker
        self._store = store
        self._ledger_rows = ledger
        self._recipients = recipients
        self._senders: dict[Channel, EmailSender | SmsSender | None] = {
            Channel.EMAIL: email,
            Channel.SMS: sms,
        }
        self._clock = clock
        self._metrics = metrics
        self._config = config
        self._instance = instance_id
        self._lease_s = lease_s
        self._limits = _channel_limits(budgets, config, clock)
        self._deliverer = self._channel_deliverer()
        self._lanes = self._build_lanes(budgets, senders, identity_senders or {})
        self._ledger = LedgerWriter(store, ledger, clock, metrics)
        self._runs: dict[str, Run] = {}
        self._room = anyio.Event()  # set when a shard run ends: a slot is free
        self._tg: anyio.abc.TaskGroup | None = None
        self._max_failures = max_failures
        self._retry_base_s = retry_base_s
        self._retry_max_s = retry_max_s
        self.heartbeat_s = min(1.0, lease_s / 5)
        # Stop handing out sends this long before the lease could lapse: several heartbeats'
        # worth, so one slow renewal does not fence a healthy owner.
        self.fence_margin_s = lease_s / 4
        # Notifications (reactor/notify): told of failed campaigns and channel pauses.
        self.notifier: Notifier | None = None
        self.on_channel = self._deliverer.on_channel

    def _channel_deliverer(self) -> Deliverer:
        """The channel-wide deliverer (the default lane's): this instance's senders and rate
        limits, the configured retries."""
        config = self._config
        policy = RetryPolicy(config.max_attempts, config.retry_base_s, config.retry_max_s)
        return Deliverer(
            self._senders,
            self._limits,
            policy,
            self._clock,
            self._metrics,
            config.tempfail_retry_s,
            config.channel_pause_max_s,
        )

    def _build_lanes(
        self,
        budgets: BudgetStore | None,
        senders: Senders | None,
        identity_senders: Mapping[str, EmailSender],
    ) -> Lanes:
        """One lane per sending identity (lanes.py); the default lane is the channel-wide
        sender, budget and deliverer built above."""
        config, clock = self._config, self._clock
        default_identity = senders.default if senders is not None else None
        default = Lane(
            name=DEFAULT,
            senders=self._senders,
            limits=self._limits,
            deliverer=self._deliverer,
            message_domain=config.message_domain,
            identity=default_identity,
        )
        lanes: dict[str, Lane] = {}
        policy = RetryPolicy(config.max_attempts, config.retry_base_s, config.retry_max_s)
        for identity in senders.identities.values() if senders is not None else ():
            sender = identity_senders.get(identity.name)
            if identity.name == DEFAULT or sender is None:
                continue
            rate = identity.rate_per_s or config.email_rate_per_s
            limit = _rate_limit(budgets, identity.budget_key, rate, clock)
            lane_senders = {Channel.EMAIL: sender, Channel.SMS: self._senders[Channel.SMS]}
            limits = {Channel.EMAIL: limit, Channel.SMS: self._limits[Channel.SMS]}
            deliverer = Deliverer(
                lane_senders,
                limits,
                policy,
                clock,
                self._metrics,
                config.tempfail_retry_s,
                config.channel_pause_max_s,
                identity=identity.name,
                shared_breakers={Channel.SMS: self._deliverer.breakers[Channel.SMS]},
            )
            lanes[identity.name] = Lane(
                identity.name, lane_senders, limits, deliverer, identity.domain, identity
            )
        return Lanes(senders or Senders(), lanes, default)

    # ---- lifecycle -------------------------------------------------------------------------

    async def serve(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Own the task group every execution runs in, until cancelled."""
        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                if (
                    self._shards is not None
                    and self._config.shard_size is not None
                    and self._config.shard_concurrency > 0
                ):
                    tg.start_soon(self._claim_shards, name="claim shards")
                task_status.started()
                await anyio.sleep_forever()
        finally:
            with anyio.CancelScope(shield=True):
                limits = {id(x): x for lane in self._lanes.all() for x in lane.limits.values()}
                for limit in limits.values():
                    if isinstance(limit, SharedBudget):
                        await limit.aclose()

    def active(self, key: str) -> bool:
        run = self._runs.get(key)
        return run is not None and run.shard is None

    @property
    def runs(self) -> dict[str, Run]:
        """Campaign runs by campaign key (what the scheduler acts on); shard runs are the
        shards' own business (their heartbeats stop them)."""
        return {k: r for k, r in self._runs.items() if r.shard is None}

    @property
    def shard_runs(self) -> list[Run]:
        return [r for r in self._runs.values() if r.shard is not None]

    def start(self, claimed: dict[str, Any], *, claimed_at_m: float | None = None) -> bool:
        """Start sending a campaign this instance has just claimed (its document as returned by
        the claim, with the new epoch; `claimed_at_m`, this clock's monotonic time just before
        the claim was sent). False if it is already running here."""
        key = str(claimed["_id"])
        if key in self._runs:
            return False
        execution = dict(claimed.get("execution") or {})
        run = Run(
            key=key,
            campaign_id=claimed["_id"],
            name=str(claimed.get("name", key)),
            epoch=int(execution.get("epoch", 0)),
            execution=execution,
        )
        sent_m = self._clock.monotonic() if claimed_at_m is None else claimed_at_m
        run.fence_at_m = sent_m + self._lease_s - self.fence_margin_s
        self._runs[key] = run
        self._metrics.executions_active.set(len(self._runs))
        assert self._tg is not None, "Executor.serve() must be running"
        self._tg.start_soon(self._execute, run, name=f"execute {key}")
        return True

    def start_shard(self, claimed: dict[str, Any], *, claimed_at_m: float) -> bool:
        """Start sending a shard this instance has just claimed (its document, with the new
        epoch). False if it is already running here."""
        shard = parse_shard(claimed)
        campaign_key = str(claimed["campaign"])
        run = Run(
            key=campaign_key,
            campaign_id=claimed["campaignId"],
            name=str(claimed.get("name") or campaign_key),
            epoch=shard.epoch,
            execution={},
            shard=shard,
        )
        if run.slot in self._runs:
            return False
        run.fence_at_m = claimed_at_m + self._lease_s - self.fence_margin_s
        self._runs[run.slot] = run
        self._metrics.executions_active.set(len(self._runs))
        assert self._tg is not None, "Executor.serve() must be running"
        self._tg.start_soon(self._execute, run, name=f"execute {run.slot}")
        return True

    async def _claim_shards(self) -> None:
        """While this instance has room, claim shards of running campaigns (open ones, or ones
        whose owner's lease expired); and announce its shard slots, so owners cut campaigns
        for the replicas alive (see `domain.shards.shard_plan`)."""
        assert self._shards is not None
        failing = False
        announced_m = float("-inf")
        try:
            while True:
                if self._clock.monotonic() - announced_m >= self.heartbeat_s:
                    announced_m = await self._announce(announced_m)
                while len(self.shard_runs) < self._config.shard_concurrency:
                    t0 = self._clock.monotonic()
                    try:
                        claimed = await self._shards.claim_next(
                            owner=self._instance, lease_s=self._lease_s
                        )
                    except Exception as exc:
                        if not failing:
                            log.warning(
                                "claiming shards failed (%s); will retry", type(exc).__name__
                            )
                        failing = True
                        break
                    failing = False
                    if claimed is None:
                        break
                    self._started_shard(claimed, t0)
                await self._wait_for_room()
        finally:
            with anyio.move_on_after(5, shield=True):
                try:
                    await self._shards.withdraw(self._instance)
                except Exception as exc:  # its announcement expires by itself
                    log.warning("withdrawing from shards failed (%s)", type(exc).__name__)

    async def _wait_for_room(self) -> None:
        """SHARD_POLL_S, or less when a shard run of this instance ends (its slot is free:
        the next shard is claimed at once, not a poll later)."""
        async with anyio.create_task_group() as tg:

            async def poll() -> None:
                await self._clock.sleep(SHARD_POLL_S)
                tg.cancel_scope.cancel()

            tg.start_soon(poll)
            await self._room.wait()
            tg.cancel_scope.cancel()
        self._room = anyio.Event()

    def _wake_claims(self) -> None:
        """Claim now (a slot is free, or this instance just created a campaign's shards)."""
        self._room.set()

    async def _announce(self, announced_m: float) -> float:
        """This instance's slots, renewed for a lease; the monotonic time it was sent (or the
        last one, when it failed: a missed announcement only makes shards larger)."""
        assert self._shards is not None
        sent_m = self._clock.monotonic()
        try:
            await self._shards.announce(
                self._instance, slots=self._config.shard_concurrency, lease_s=self._lease_s
            )
        except Exception as exc:
            log.warning("announcing shard slots failed (%s)", type(exc).__name__)
            return announced_m
        return sent_m

    def _started_shard(self, claimed: dict[str, Any], claimed_at_m: float) -> None:
        takeover = int(claimed.get("epoch", 1)) > 1
        self._metrics.shard_events.labels("taken_over" if takeover else "claimed").inc()
        if takeover:
            log.warning(
                "♻️ Took over shard %s from %s; resuming from the ledger",
                claimed["_id"],
                "an expired lease",
                extra={"campaign_id": claimed.get("campaign"), "epoch": claimed["epoch"]},
            )
        self.start_shard(claimed, claimed_at_m=claimed_at_m)

    async def stop(self, key: str, reason: str) -> None:
        """Stop sending (in-flight messages finish) and wait until the run has wound down."""
        run = self.runs.get(key)
        if run is None:
            return
        run.stop(reason)
        await run.done.wait()

    async def stop_all(self, reason: str, grace_s: float) -> None:
        runs = list(self._runs.values())
        for run in runs:
            run.stop(reason)
        with anyio.move_on_after(grace_s, shield=True):
            for run in runs:
                await run.done.wait()

    # ---- one execution -----------------------------------------------------------------------

    async def _execute(self, run: Run) -> None:
        campaign_run = CampaignRun(
            run,
            store=self._store,
            ledger=self._ledger_rows,
            recipients=self._recipients,
            senders=self._senders,
            limits=self._limits,
            deliverer=self._deliverer,
            writer=self._ledger,
            clock=self._clock,
            metrics=self._metrics,
            config=self._config,
            instance_id=self._instance,
            suppressions=self._suppressions,
            links=self._links,
            tracker=self._tracker,
            shards=self._shards,
            audiences=self._audiences,
            lease_s=self._lease_s,
            lanes=self._lanes,
            shards_created=self._wake_claims,
        )
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._heartbeat if run.shard is None else self._shard_heartbeat, run)
                try:
                    await campaign_run.send()
                finally:
                    tg.cancel_scope.cancel()
        except Exception as exc:  # one campaign's failure must not take the service down
            if _holds(exc, LeaseLost):
                run.stop(StopReason.LEASE_LOST)
                log.warning(
                    "lease lost for %s %s; another replica continues",
                    "campaign" if run.shard is None else "shard of",
                    run.slot,
                    extra={"campaign_id": run.key, "epoch": run.epoch},
                )
                return
            if run.shard is not None:
                await self._record_shard_failure(run, exc)
                return
            await self._record_failure(run, exc)
        finally:
            self._runs.pop(run.slot, None)
            self._metrics.executions_active.set(len(self._runs))
            if run.shard is not None:
                self._wake_claims()
            run.done.set()

    async def _record_failure(self, run: Run, exc: Exception) -> None:
        self._metrics.campaign_errors.labels("execution_failed").inc()
        log.exception("execution of campaign %s failed", run.name, extra={"campaign_id": run.key})
        failures = int(run.execution.get("failures") or 0)
        retry_after_s = min(self._retry_base_s * 2**failures, self._retry_max_s)
        cause = _leaf(exc)
        detail = f"{type(cause).__name__}: {str(cause).splitlines()[0][:300] if str(cause) else ''}"
        with anyio.move_on_after(5, shield=True):
            status = await self._store.record_failure(
                run.campaign_id,
                epoch=run.epoch,
                detail=detail,
                max_failures=self._max_failures,
                retry_after_s=retry_after_s,
            )
            if status == "failed":
                self._metrics.transitions.labels("failed").inc()
                if self.notifier is not None:
                    self.notifier.post(
                        self.notifier.failed,
                        run.campaign_id,
                        run.name,
                        run.epoch,
                        detail,
                        failures + 1,
                    )
                log.error(
                    "✖ Campaign failed: %s (ID: %s) after %d failed executions; last: %s",
                    run.name,
                    run.key,
                    failures + 1,
                    detail,
                    extra={"campaign_id": run.key, "reason": "execution_failed"},
                )
            elif status is not None:
                log.warning(
                    "campaign %s will be retried in %gs (%d failed executions)",
                    run.name,
                    retry_after_s,
                    failures + 1,
                    extra={"campaign_id": run.key},
                )

    async def _record_shard_failure(self, run: Run, exc: Exception) -> None:
        """A shard's run failed: say so on the campaign and give the shard back, to be claimed
        again after a pause (by any replica; a lasting fault keeps failing visibly)."""
        assert run.shard is not None
        assert self._shards is not None
        self._metrics.shard_events.labels("failed").inc()
        self._metrics.campaign_errors.labels("shard_failed").inc()
        log.exception("sending %s failed", run.slot, extra={"campaign_id": run.key})
        cause = _leaf(exc)
        detail = f"shard {run.shard.index}: {type(cause).__name__}: {str(cause)[:300]}"
        with anyio.move_on_after(5, shield=True):
            await self._store.record_invalid(run.campaign_id, "shard_failed", detail)
            await self._shards.release(
                run.shard.id, epoch=run.epoch, retry_after_s=self._retry_base_s
            )

    async def _shard_heartbeat(self, run: Run) -> None:
        """A shard's lease renewal, and the campaign's state: a pause (or cancel) stops the
        shard, a closed window makes it record its rest as skipped (renewals go on meanwhile)."""
        assert run.shard is not None
        assert self._shards is not None
        while True:
            await self._clock.sleep(self.heartbeat_s)
            sent_m = self._clock.monotonic()
            try:
                alive = await self._shards.heartbeat(
                    run.shard.id, epoch=run.epoch, owner=self._instance, lease_s=self._lease_s
                )
                state = await self._store.sending_state(run.campaign_id) if alive else None
            except Exception as exc:
                self._metrics.heartbeat_failures.inc()
                log.warning(
                    "shard lease heartbeat failed for %s (%s)",
                    run.slot,
                    type(exc).__name__,
                    extra={"campaign_id": run.key},
                )
                continue
            if not alive:
                run.stop(StopReason.LEASE_LOST)
                return
            run.fence_at_m = sent_m + self._lease_s - self.fence_margin_s
            if state == "window_closed":
                run.stop(StopReason.WINDOW_CLOSED)
            elif state != "running":
                run.stop(StopReason.PAUSED)
                return

    async def _heartbeat(self, run: Run) -> None:
        while True:
            await self._clock.sleep(self.heartbeat_s)
            sent_m = self._clock.monotonic()
            try:
                alive = await self._store.heartbeat(
                    run.campaign_id, epoch=run.epoch, owner=self._instance, lease_s=self._lease_s
                )
            except Exception as exc:
                self._metrics.heartbeat_failures.inc()
                fenced = not run.may_send(self._clock.monotonic())
                if fenced and not run.fenced_logged:
                    run.fenced_logged = True
                    self._metrics.fenced.inc()
                log.warning(
                    "lease heartbeat failed for %s (%s)%s",
                    run.name,
                    type(exc).__name__,
                    "; fenced: no new sends until the lease is renewed"
                    if fenced
                    else "; will retry",
                    extra={"campaign_id": run.key},
                )
                continue
            if alive is None:
                doc = await self._store.get(run.campaign_id)
                status = doc.get("status") if doc else None
                reason = (
                    StopReason.PAUSED
                    if status in ("paused", "cancelled", "rejected")
                    else StopReason.LEASE_LOST
                )
                run.stop(reason)
                return
            run.fence_at_m = sent_m + self._lease_s - self.fence_margin_s
            if run.fenced_logged:
                run.fenced_logged = False
                log.info(
                    "lease of %s renewed; sending again", run.name, extra={"campaign_id": run.key}
                )


def _leaf(exc: BaseException) -> BaseException:
    """The error itself, out of the exception groups task groups wrap it in."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


def _holds(exc: BaseException, kind: type[BaseException]) -> bool:
    """True if `exc` is `kind` or an exception group holding one (task groups wrap errors)."""
    if isinstance(exc, BaseExceptionGroup):
        return exc.subgroup(kind) is not None
    return isinstance(exc, kind)
