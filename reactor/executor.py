"""Execution: sends one claimed campaign to its audience, exactly once per (channel, customer).

For each batch of targeted ids the executor resolves recipients, reads what the ledger already
says (a resumed or taken-over run never re-sends `sent`, and treats a `pending` row left by an
earlier epoch as `uncertain`), writes `pending` rows just before sending — never more rows than
the concurrency bound, so a crash leaves at most that many outcomes unknown — and writes outcomes
and counter increments in batches, fenced by the execution epoch. The next batch is prepared
while the current one sends; see `_send_items` for how the ledger writes are grouped.

A heartbeat extends the lease every second and notices within that second when the campaign was
paused, cancelled or taken over; sending then stops after the in-flight messages finish.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import math
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from email.utils import make_msgid
from typing import Any, Generic, TypeVar

import anyio
import phonenumbers
from email_validator import EmailNotValidError, validate_email

from .adapters.mongo_store import (
    TERMINAL_STATES,
    DeliveryRecord,
    MongoCampaignStore,
    delivery_id,
)
from .config import SendConfig
from .domain.errors import (
    InvalidCampaign,
    LeaseLost,
    PermanentDeliveryError,
    TransientDeliveryError,
    UncertainDeliveryError,
)
from .domain.ids import normalise_id
from .domain.models import Campaign, Channel, parse_campaign
from .domain.retry import RetryPolicy
from .domain.templates import render
from .metrics import Metrics
from .ports import Clock, EmailMessage, EmailSender, Recipient, Recipients, SmsMessage, SmsSender
from .ratelimit import TokenBucket

log = logging.getLogger(__name__)

T = TypeVar("T")

COUNTER_FLUSH_S = 0.5
OUTCOME_MAX_AGE_S = 1.0  # a known outcome reaches the ledger within this, even mid-batch

_COUNTER_NAMES = {
    (Channel.EMAIL, "sent"): "emailsSent",
    (Channel.EMAIL, "failed"): "emailsFailed",
    (Channel.EMAIL, "skipped"): "emailsSkipped",
    (Channel.SMS, "sent"): "smsSent",
    (Channel.SMS, "failed"): "smsFailed",
    (Channel.SMS, "skipped"): "smsSkipped",
}


class StopReason:
    WINDOW_CLOSED = "window_closed"
    PAUSED = "paused"
    SHUTDOWN = "shutdown"
    LEASE_LOST = "lease_lost"


@dataclass
class _Item:
    customer: str
    channel: Channel
    to: str
    message: EmailMessage | SmsMessage


@dataclass
class _Outcome:
    item: _Item
    state: str  # sent | failed | uncertain | abandoned
    provider_id: str | None = None
    error: str | None = None
    attempts: int = 0


@dataclass
class _Prepared:
    """One batch ready to send on one channel: the rows to record without sending (skipped,
    or uncertain), and the messages."""

    found: int
    unsent: list[DeliveryRecord] = field(default_factory=list)
    items: list[_Item] = field(default_factory=list)


class _Ahead(Generic[T]):
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


@dataclass
class Run:
    """One execution of one campaign by this instance."""

    key: str
    campaign_id: Any
    name: str
    epoch: int
    execution: dict[str, Any]
    stop_reason: str | None = None
    stopped: anyio.Event = field(default_factory=anyio.Event)
    done: anyio.Event = field(default_factory=anyio.Event)
    unflushed: dict[str, int] = field(default_factory=dict)
    flushed_at: float = 0.0

    def stop(self, reason: str) -> None:
        if self.stop_reason is None:
            self.stop_reason = reason
            self.stopped.set()


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
        self._policy = RetryPolicy(config.max_attempts, config.retry_base_s, config.retry_max_s)
        self._limits = {
            Channel.EMAIL: TokenBucket(clock, config.email_rate_per_s),
            Channel.SMS: TokenBucket(clock, config.sms_rate_per_s),
        }
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
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._heartbeat, run)
                try:
                    await self._send_campaign(run)
                finally:
                    tg.cancel_scope.cancel()
        except Exception as exc:  # one campaign's failure must not take the service down
            if _contains(exc, LeaseLost):
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
                await self._release(run)
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

    async def _send_campaign(self, run: Run) -> None:
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
            await self._store.record_invalid(
                run.campaign_id, exc.reason, exc.detail, self._clock.now()
            )
            await self._store.mark_sends_done(
                run.campaign_id, epoch=run.epoch, now=self._clock.now()
            )
            return
        started = self._clock.now()
        await self._store.record_execution(
            run.key,
            epoch=run.epoch,
            owner=self._instance,
            fields={
                "startedAt": started,
                "owner": self._instance,
                "state": "running",
            },
        )
        if run.epoch > 1:  # only a takeover can find rows an earlier owner left pending
            await self._settle_previous_pending(run)
        targets = list(dict.fromkeys(normalise_id(t) for t in campaign.targets))
        log.info(
            "📋 Fetching %d targeted customers by IDs",
            len(targets),
            extra={"campaign_id": run.key, "count": len(targets)},
        )
        batches = list(_chunks(targets, self._config.batch_size))
        found: dict[Channel, int] = {}
        # Each channel goes through the audience at its own provider's pace: emails are not
        # held back behind a slower SMS channel (or the reverse).
        async with anyio.create_task_group() as tg:
            for channel in sorted(campaign.channels):
                tg.start_soon(self._send_channel, run, campaign, channel, batches, found)
        found_total = max(found.values(), default=0)
        log.info(
            "Found %d customers in orders collection",
            found_total,
            extra={"campaign_id": run.key, "count": found_total},
        )
        await self._finish(run, campaign, started)

    async def _send_channel(
        self,
        run: Run,
        campaign: Campaign,
        channel: Channel,
        batches: Sequence[Sequence[str]],
        found: dict[Channel, int],
    ) -> None:
        """One channel through every batch. Each channel resolves its own batches (a second
        read of the orders rows), which keeps memory bounded however far apart they drift."""
        found[channel] = 0
        async with anyio.create_task_group() as tg:
            # The next batch is resolved and checked against the ledger while this one sends,
            # so the pipeline does not drain at every batch boundary.
            ahead = (
                _Ahead(tg, self._prepare, run, campaign, channel, batches[0]) if batches else None
            )
            for i, batch in enumerate(batches):
                if run.stop_reason not in (None, StopReason.WINDOW_CLOSED):
                    break
                if run.stop_reason is None and ahead is not None:
                    prepared = await ahead.get()
                    ahead = (
                        _Ahead(tg, self._prepare, run, campaign, channel, batches[i + 1])
                        if i + 1 < len(batches)
                        else None
                    )
                    found[channel] += prepared.found
                    if prepared.unsent:
                        await self._write(run, prepared.unsent)
                    if prepared.items and run.stop_reason is None:
                        await self._send_items(run, channel, prepared.items)
                if run.stop_reason == StopReason.WINDOW_CLOSED:
                    # The window closed during or before this batch: whoever was not reached is
                    # recorded as skipped, so every customer is accounted for.
                    await self._close_window(run, channel, batch)
            tg.cancel_scope.cancel()

    async def _settle_previous_pending(self, run: Run) -> None:
        """Rows an earlier epoch left `pending` may or may not have gone out: `uncertain`."""
        rows = await self._store.pending_from_other_epochs(run.key, run.epoch)
        if not rows:
            return
        records = [
            DeliveryRecord(
                r["customer"],
                r["channel"],
                "uncertain",
                to=r.get("to"),
                reason="previous_owner_lost",
            )
            for r in rows
        ]
        await self._write(run, records)
        log.warning(
            "%d deliveries of %s left pending by a previous owner are uncertain",
            len(records),
            run.name,
            extra={"campaign_id": run.key, "count": len(records)},
        )

    async def _prepare(
        self, run: Run, campaign: Campaign, channel: Channel, batch: Sequence[str]
    ) -> _Prepared:
        """Resolve one batch, read what the ledger already holds for it on this channel, and
        build the messages still to send (validated, rendered) and the rows to record without
        sending."""
        recipients = await self._recipients.resolve(batch)
        states = await self._store.ledger_states(run.key, channel, batch)
        prepared = _Prepared(found=len(recipients))
        sender = self._senders[channel]
        for customer in batch:
            if customer in states:
                state, epoch = states[customer]
                if state in TERMINAL_STATES or epoch >= run.epoch:
                    continue
                if state == "pending":
                    # An earlier owner marked it after this run settled its leftovers (it had
                    # not yet noticed the takeover): it may have gone out, so never re-send.
                    prepared.unsent.append(
                        DeliveryRecord(customer, channel, "uncertain", reason="previous_owner_lost")
                    )
                    continue
            recipient = recipients.get(customer)
            if recipient is None:
                prepared.unsent.append(
                    DeliveryRecord(customer, channel, "skipped", reason="not_found")
                )
                continue
            if sender is None:
                prepared.unsent.append(
                    DeliveryRecord(customer, channel, "skipped", reason="channel_not_configured")
                )
                continue
            address, problem = self._address(channel, recipient)
            if address is None:
                prepared.unsent.append(DeliveryRecord(customer, channel, "skipped", reason=problem))
                continue
            message = self._message(campaign, channel, recipient, address)
            prepared.items.append(_Item(customer, channel, address, message))
        return prepared

    def _address(self, channel: Channel, recipient: Recipient) -> tuple[str | None, str]:
        if channel is Channel.EMAIL:
            if not recipient.email:
                return None, "missing_email"
            try:
                info = validate_email(recipient.email, check_deliverability=False)
            except EmailNotValidError:
                return None, "invalid_email"
            return info.normalized, ""
        if not recipient.phone:
            return None, "missing_phone"
        try:
            number = phonenumbers.parse(recipient.phone, self._config.default_phone_region)
        except phonenumbers.NumberParseException:
            return None, "invalid_phone"
        if not phonenumbers.is_valid_number(number):
            return None, "invalid_phone"
        return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164), ""

    def _message(
        self, campaign: Campaign, channel: Channel, recipient: Recipient, address: str
    ) -> EmailMessage | SmsMessage:
        values = {
            "name": recipient.name or "",
            "email": recipient.email or "",
            "phone": recipient.phone or "",
        }
        if channel is Channel.SMS:
            assert campaign.sms is not None
            return SmsMessage(to=address, body=render(campaign.sms.body, values))
        assert campaign.email is not None
        # Header values must not carry line breaks, whatever a customer's name contains.
        header_values = {k: " ".join(v.split()) for k, v in values.items()}
        domain = address.rsplit("@", 1)[-1]
        return EmailMessage(
            to=address,
            subject=render(campaign.email.subject, header_values),
            text=render(campaign.email.text, values) if campaign.email.text else None,
            html=render(campaign.email.html, values, escape_html=True)
            if campaign.email.html
            else None,
            message_id=make_msgid(idstring=f"c{campaign.key}", domain=f"reactor.{domain}"),
        )

    async def _send_items(self, run: Run, channel: Channel, items: list[_Item]) -> None:
        """Send with at most `concurrency` rows pending at any time, in few ledger writes.

        Each write is one ordered bulk write carrying the outcomes of the sends that finished
        since the last write, then the `pending` marks of the sends about to start; a send
        starts only once its mark is acknowledged. Because outcomes are applied first, the
        slots they free can be refilled in the same write and the ledger never holds more than
        `concurrency` pending rows: a crash leaves at most that many outcomes unknown.

        The pipeline is refilled when the sends in flight fall to half the bound, so a write
        carries about `concurrency` rows instead of one per finished send (a database round
        trip costs far more than a row); the other half keeps the providers busy meanwhile.
        A refill marks only as many rows as the channel's rate limit has tokens free right
        now, taking them: under a rate limit each write carries the few sends now due, and no
        row sits `pending` waiting for its turn. Outcomes are also written once nothing is in
        flight, and never later than OUTCOME_MAX_AGE_S after they are known."""
        concurrency = self._config.concurrency
        low_water = concurrency // 2
        limiter = self._limits[channel]
        finished: list[_Outcome] = []
        first_finished_at = 0.0  # monotonic time the oldest unwritten outcome was known
        wake = asyncio.Event()
        inbox: asyncio.Queue[_Item] = asyncio.Queue()
        sending = 0
        next_item = 0

        async def worker() -> None:
            # A fixed set of workers, fed through a queue: far cheaper per message than a task
            # per send, and the queue never holds more than the pending marks just written.
            nonlocal sending, first_finished_at
            while True:
                item = await inbox.get()
                outcome = await self._deliver(run, item)
                sending -= 1
                if not finished:
                    first_finished_at = time.monotonic()
                finished.append(outcome)
                if len(finished) == 1 or sending <= low_water:
                    wake.set()  # the loop below has something to decide

        async with anyio.create_task_group() as tg:
            for _ in range(min(concurrency, len(items))):
                tg.start_soon(worker)
            while True:
                more = run.stop_reason is None and next_item < len(items)
                want = more and sending <= low_water
                # Rate-limit tokens are taken before rows are marked, so a row is `pending`
                # only while its message is really on its way (or retrying), never while it
                # waits for its turn: a crash leaves only those uncertain.
                tokens = (
                    limiter.take(min(concurrency - sending, len(items) - next_item)) if want else 0
                )
                stale = bool(finished) and (
                    sending == 0 or time.monotonic() - first_finished_at >= OUTCOME_MAX_AGE_S
                )
                if tokens or stale:
                    done = finished[:]
                    finished.clear()
                    new = items[next_item : next_item + tokens]
                    next_item += len(new)
                    await self._write_outcomes(run, done, pending=new)
                    sending += len(new)
                    for item in new:
                        inbox.put_nowait(item)
                    continue
                if not more and sending == 0 and not finished:
                    break  # everything launched has been recorded
                wake.clear()
                timeout = (
                    max(0.0, first_finished_at + OUTCOME_MAX_AGE_S - time.monotonic())
                    if finished
                    else math.inf
                )
                if want:  # waiting for the rate limit to free a token (a Retry-After pause
                    # can be long: look again every second, in case the run was stopped)
                    timeout = min(timeout, limiter.wait_s(), 1.0)
                with anyio.move_on_after(timeout):
                    await wake.wait()  # a send in flight will finish, or a token is free
            tg.cancel_scope.cancel()  # the workers, idle now

    async def _deliver(self, run: Run, item: _Item) -> _Outcome:
        """Send one message, retrying transient errors. The first attempt uses the rate-limit
        token taken when its row was marked pending; every retry waits for a token of its own.
        A retry the run stops before is `abandoned`: never sent after the stop."""
        sender = self._senders[item.channel]
        assert sender is not None
        limiter = self._limits[item.channel]
        channel = str(item.channel)
        attempt = 0
        while True:
            attempt += 1
            started = time.perf_counter()
            try:
                provider_id = await sender.send(item.message)  # type: ignore[arg-type]
            except TransientDeliveryError as exc:
                self._metrics.send_duration.labels(channel).observe(time.perf_counter() - started)
                if exc.retry_after_s:
                    limiter.pause(exc.retry_after_s)
                if not self._policy.should_retry(attempt):
                    return _Outcome(
                        item, "failed", error=f"transient, gave up: {exc}", attempts=attempt
                    )
                self._metrics.send_retries.labels(channel).inc()
                delay = self._policy.delay_s(attempt, exc.retry_after_s)
                # Not delivered: if the run stops during the backoff or while the channel is
                # paused by a Retry-After, leave it for whoever resumes instead of sending late.
                if not (
                    await _unless_stopped(run, self._clock.sleep, delay)
                    and await _unless_stopped(run, limiter.acquire)
                ):
                    return _Outcome(item, "abandoned", error=str(exc), attempts=attempt)
                continue
            except PermanentDeliveryError as exc:
                self._metrics.send_duration.labels(channel).observe(time.perf_counter() - started)
                return _Outcome(item, "failed", error=str(exc), attempts=attempt)
            except UncertainDeliveryError as exc:
                self._metrics.send_duration.labels(channel).observe(time.perf_counter() - started)
                return _Outcome(item, "uncertain", error=str(exc), attempts=attempt)
            except Exception as exc:  # a bug in one send must not stop the campaign
                log.exception(
                    "unexpected error sending %s to customer %s",
                    channel,
                    item.customer,
                    extra={"campaign_id": run.key, "channel": channel},
                )
                return _Outcome(
                    item, "uncertain", error=f"{type(exc).__name__}: {exc}", attempts=attempt
                )
            self._metrics.send_duration.labels(channel).observe(time.perf_counter() - started)
            return _Outcome(item, "sent", provider_id=provider_id, attempts=attempt)

    async def _write_outcomes(
        self, run: Run, outcomes: list[_Outcome], *, pending: Sequence[_Item] = ()
    ) -> None:
        """Record finished sends, then mark the next ones pending, in one ordered write."""
        marks = [DeliveryRecord(i.customer, i.channel, "pending", to=i.to) for i in pending]
        records: list[DeliveryRecord] = []
        abandoned = []
        for o in outcomes:
            if o.state == "abandoned":
                abandoned.append(o)
                continue
            records.append(
                DeliveryRecord(
                    o.item.customer,
                    o.item.channel,
                    o.state,
                    to=o.item.to,
                    provider_id=o.provider_id,
                    error=o.error,
                    attempts=o.attempts,
                )
            )
        if abandoned:
            await self._store.deliveries.delete_many(
                {
                    "_id": {
                        "$in": [
                            delivery_id(run.key, o.item.channel, o.item.customer) for o in abandoned
                        ]
                    },
                    "epoch": run.epoch,
                    "state": "pending",
                }
            )
        await self._write(run, records + marks)

    async def _write(self, run: Run, records: list[DeliveryRecord]) -> None:
        if not records:
            return
        now = self._clock.now()
        fenced = await self._store.write_deliveries(
            run.key, epoch=run.epoch, records=records, now=now
        )
        for rec in records:
            if rec.state == "pending" or (
                fenced and delivery_id(run.key, rec.channel, rec.customer) in fenced
            ):
                continue
            self._metrics.sends.labels(rec.channel, rec.state).inc()
            name = _COUNTER_NAMES.get((Channel(rec.channel), rec.state), "uncertain")
            run.unflushed[name] = run.unflushed.get(name, 0) + 1
        if fenced:
            raise LeaseLost(f"campaign {run.key} epoch {run.epoch} was superseded")
        await self._flush_counters(run)

    async def _flush_counters(self, run: Run, *, force: bool = False) -> None:
        """Live `performance` counters, one `$inc` at most every COUNTER_FLUSH_S (the ledger is
        the record; these are for people watching a run)."""
        now_m = time.monotonic()
        if not run.unflushed or (not force and now_m - run.flushed_at < COUNTER_FLUSH_S):
            return
        counts, run.unflushed = run.unflushed, {}
        run.flushed_at = now_m
        owned = await self._store.add_performance(
            run.campaign_id, epoch=run.epoch, counts=counts, now=self._clock.now()
        )
        if not owned:
            raise LeaseLost(f"campaign {run.key} epoch {run.epoch} was superseded")

    async def _close_window(self, run: Run, channel: Channel, batch: Sequence[str]) -> None:
        states = await self._store.ledger_states(run.key, channel, batch)
        records = [
            DeliveryRecord(c, channel, "skipped", reason="window_closed")
            for c in batch
            if c not in states
        ]
        await self._write(run, records)

    async def _finish(self, run: Run, campaign: Campaign, started: dt.datetime) -> None:
        await self._flush_counters(run, force=True)
        now = self._clock.now()
        counts = await self._store.ledger_counts(run.key)
        performance = {
            "emailsSent": counts.get("email", {}).get("sent", 0),
            "emailsFailed": counts.get("email", {}).get("failed", 0),
            "emailsSkipped": counts.get("email", {}).get("skipped", 0),
            "smsSent": counts.get("sms", {}).get("sent", 0),
            "smsFailed": counts.get("sms", {}).get("failed", 0),
            "smsSkipped": counts.get("sms", {}).get("skipped", 0),
            "uncertain": sum(c.get("uncertain", 0) for c in counts.values()),
        }
        targets = len({normalise_id(t) for t in campaign.targets})
        extra = {"campaign_id": run.key, **performance}
        stopped_early = run.stop_reason in (
            StopReason.PAUSED,
            StopReason.SHUTDOWN,
            StopReason.LEASE_LOST,
        )
        if Channel.EMAIL in campaign.channels:
            log.info("✉️ Emails sent: %d/%d", performance["emailsSent"], targets, extra=extra)
        if Channel.SMS in campaign.channels:
            log.info("📱 SMS sent: %d/%d", performance["smsSent"], targets, extra=extra)
        await self._store.record_execution(
            run.key,
            epoch=run.epoch,
            owner=self._instance,
            fields={
                "finishedAt": now,
                "state": run.stop_reason or "sent",
                "counts": performance,
            },
        )
        if stopped_early:
            log.info(
                "⏸ Campaign %s stopped sending (%s); the ledger keeps its place",
                run.name,
                run.stop_reason,
                extra=extra,
            )
            await self._release(run)
            return
        await self._store.mark_sends_done(
            run.campaign_id, epoch=run.epoch, now=now, performance=performance
        )
        log.info("✅ Campaign executed successfully: %s", run.name, extra=extra)

    async def _release(self, run: Run) -> None:
        with anyio.CancelScope(shield=True):
            await self._store.release(
                run.campaign_id, epoch=run.epoch, execution=run.execution, now=self._clock.now()
            )


async def _unless_stopped(run: Run, wait: Callable[..., Awaitable[None]], *args: Any) -> bool:
    """Await `wait(*args)`; False, cutting it short, if the run stops first (or had stopped)."""
    if run.stop_reason is not None:
        return False
    finished = False
    async with anyio.create_task_group() as tg:

        async def cut_short() -> None:
            await run.stopped.wait()
            tg.cancel_scope.cancel()

        tg.start_soon(cut_short)
        await wait(*args)
        finished = True
        tg.cancel_scope.cancel()
    return finished and run.stop_reason is None


def _contains(exc: BaseException, kind: type[BaseException]) -> bool:
    """True if `exc` is `kind` or an exception group holding one (task groups wrap errors)."""
    if isinstance(exc, kind):
        return True
    if isinstance(exc, BaseExceptionGroup):
        return any(_contains(e, kind) for e in exc.exceptions)
    return False


def _chunks(values: Sequence[str], size: int) -> Iterator[Sequence[str]]:
    for i in range(0, len(values), size):
        yield values[i : i + size]
