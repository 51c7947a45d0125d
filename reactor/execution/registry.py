"""The registry of runs on this instance: start a claimed campaign, heartbeat its lease, stop it,
stop them all at shutdown. One campaign's failure never takes the others (or the service) down.

A heartbeat extends the lease every second and notices within that second when the campaign was
paused, cancelled or taken over; sending then stops after the in-flight messages finish.
"""

from __future__ import annotations

import datetime as dt
import logging
from typing import Any

import anyio

from ..adapters.mongo_store import MongoCampaignStore
from ..config import SendConfig
from ..domain.errors import LeaseLost
from ..domain.models import Channel
from ..domain.retry import RetryPolicy
from ..metrics import Metrics
from ..ports import Clock, EmailSender, Recipients, SmsSender
from ..ratelimit import TokenBucket
from .deliver import Deliverer
from .ledger import LedgerWriter
from .run import CampaignRun, release
from .state import Run, StopReason

log = logging.getLogger(__name__)


class Executor:
    def __init__(
        self,
        *,
        store: MongoCampaignStore,
        recipients: Recipients,
        email: EmailSender | None,
        sms: SmsSender | None,
        clock: Clock,
        metrics: Metrics,
        config: SendConfig,
        instance_id: str,
        lease_s: float,
    ) -> None:
        self._store = store
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
        self._limits = {
            Channel.EMAIL: TokenBucket(clock, config.email_rate_per_s, monotonic=clock.monotonic),
            Channel.SMS: TokenBucket(clock, config.sms_rate_per_s, monotonic=clock.monotonic),
        }
        policy = RetryPolicy(config.max_attempts, config.retry_base_s, config.retry_max_s)
        self._deliverer = Deliverer(self._senders, self._limits, policy, clock, metrics)
        self._ledger = LedgerWriter(store, clock, metrics)
        self._runs: dict[str, Run] = {}
        self._tg: anyio.abc.TaskGroup | None = None
        self.heartbeat_s = min(1.0, lease_s / 3)

    # ---- lifecycle -------------------------------------------------------------------------

    async def serve(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Own the task group every execution runs in, until cancelled."""
        async with anyio.create_task_group() as tg:
            self._tg = tg
            task_status.started()
            await anyio.sleep_forever()

    def active(self, key: str) -> bool:
        return key in self._runs

    @property
    def runs(self) -> dict[str, Run]:
        return self._runs

    def start(self, claimed: dict[str, Any]) -> bool:
        """Start sending a campaign this instance has just claimed (its document as returned by
        the claim, with the new epoch). False if it is already running here."""
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
        self._runs[key] = run
        self._metrics.executions_active.set(len(self._runs))
        assert self._tg is not None, "Executor.serve() must be running"
        self._tg.start_soon(self._execute, run, name=f"execute {key}")
        return True

    async def stop(self, key: str, reason: str) -> None:
        """Stop sending (in-flight messages finish) and wait until the run has wound down."""
        run = self._runs.get(key)
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
            recipients=self._recipients,
            senders=self._senders,
            limits=self._limits,
            deliverer=self._deliverer,
            ledger=self._ledger,
            clock=self._clock,
            metrics=self._metrics,
            config=self._config,
            instance_id=self._instance,
        )
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._heartbeat, run)
                try:
                    await campaign_run.send()
                finally:
                    tg.cancel_scope.cancel()
        except Exception as exc:  # one campaign's failure must not take the service down
            if _holds(exc, LeaseLost):
                run.stop(StopReason.LEASE_LOST)
                log.warning(
                    "lease lost for campaign %s; another replica continues",
                    run.name,
                    extra={"campaign_id": run.key, "epoch": run.epoch},
                )
                return
            self._metrics.campaign_errors.labels("execution_failed").inc()
            log.exception(
                "execution of campaign %s failed", run.name, extra={"campaign_id": run.key}
            )
            with anyio.move_on_after(5, shield=True):
                await self._store.record_invalid(
                    run.campaign_id,
                    "execution_failed",
                    f"{type(exc).__name__}: {exc}",
                    self._clock.now(),
                )
                await release(self._store, run, self._clock.now())
        finally:
            self._runs.pop(run.key, None)
            self._metrics.executions_active.set(len(self._runs))
            run.done.set()

    async def _heartbeat(self, run: Run) -> None:
        while True:
            await self._clock.sleep(self.heartbeat_s)
            lease_until = self._clock.now() + dt.timedelta(seconds=self._lease_s)
            try:
                alive = await self._store.heartbeat(
                    run.campaign_id, epoch=run.epoch, owner=self._instance, lease_until=lease_until
                )
            except Exception:
                log.warning(
                    "lease heartbeat failed for %s; will retry",
                    run.name,
                    exc_info=True,
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


def _holds(exc: BaseException, kind: type[BaseException]) -> bool:
    """True if `exc` is `kind` or an exception group holding one (task groups wrap errors)."""
    if isinstance(exc, BaseExceptionGroup):
        return exc.subgroup(kind) is not None
    return isinstance(exc, kind)
