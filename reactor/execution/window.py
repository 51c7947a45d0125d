"""The send window of one channel of one run: at most `concurrency` rows pending at any time,
recorded in few ledger writes.

Each write is one ordered bulk write carrying the outcomes of the sends that finished since the
last write, then the `pending` marks of the sends about to start; a send starts only once its
mark is acknowledged. Because outcomes are applied first, the slots they free can be refilled in
the same write and the ledger never holds more than `concurrency` pending rows: a crash leaves at
most that many outcomes unknown.

The window is refilled when the sends in flight fall to half the bound, so a write carries about
`concurrency` rows instead of one per finished send (a database round trip costs far more than a
row); the other half keeps the providers busy meanwhile. A refill marks only as many rows as the
channel's rate limit has tokens free right now, taking them: under a rate limit each write
carries the few sends now due, and no row sits `pending` waiting for its turn. Outcomes are also
written once nothing is in flight, and never later than OUTCOME_MAX_AGE_S after they are known.

Only the rows whose marks the ledger accepted are sent, and while the run is fenced (its lease
may have lapsed) no row is marked at all.
"""

from __future__ import annotations

import asyncio
import math

import anyio

from ..domain.consent import skip_reason
from ..domain.deliveries import DeliveryRecord, DeliveryState
from ..domain.models import Channel
from ..limits.ratelimit import RateLimit
from ..ports import Clock, wait_for_event
from ..suppression import SuppressionList
from .breaker import ChannelBreaker
from .deliver import Deliverer
from .ledger import DEFERRED, Item, LedgerWriter, Outcome
from .state import Run

OUTCOME_MAX_AGE_S = 1.0  # a known outcome reaches the ledger within this, even mid-batch
FENCED_POLL_S = 0.1


class SendWindow:
    def __init__(
        self,
        run: Run,
        channel: Channel,
        items: list[Item],
        *,
        concurrency: int,
        limiter: RateLimit,
        deliverer: Deliverer,
        ledger: LedgerWriter,
        clock: Clock,
        deferred: list[tuple[float, Item]] | None = None,
        tempfail_retry_s: tuple[float, ...] = (),
        uncertain: list[Item] | None = None,
        suppressions: SuppressionList | None = None,
    ) -> None:
        self.run = run
        self.suppressions = suppressions
        self.channel = channel
        self.noted_pause = False
        # Sends the provider said to try later: (due, by the monotonic clock; item), for the run
        # to send again once due.
        self.deferred = deferred if deferred is not None else []
        self.tempfail_retry_s = tempfail_retry_s
        # Sends whose outcome is unknown, for the run to look up with the provider later.
        self.uncertain = uncertain if uncertain is not None else []
        self.items = items
        self.concurrency = concurrency
        self.low_water = concurrency // 2
        self.limiter = limiter
        self.deliverer = deliverer
        self.ledger = ledger
        self.clock = clock
        self.finished: list[Outcome] = []
        self.first_finished_at = 0.0  # monotonic time the oldest unwritten outcome was known
        self.sending = 0  # marked pending and handed to a worker, outcome not yet known
        self.next_item = 0
        self.wake = asyncio.Event()
        # A fixed set of workers fed through a queue: far cheaper per message than a task per
        # send, and the queue never holds more than the pending marks just written.
        self.inbox: asyncio.Queue[Item] = asyncio.Queue()

    @property
    def breaker(self) -> ChannelBreaker:
        return self.deliverer.breakers[self.channel]

    async def _defer(self, item: Item, outcome: Outcome) -> None:
        if outcome.retry_at_m is not None:  # the channel is paused: after its pause
            self.deferred.append((outcome.retry_at_m, item))
            if not self.noted_pause:
                self.noted_pause = True
                await self.ledger.note(
                    self.run,
                    "channel_paused",
                    f"{self.breaker.channel} paused: {self.breaker.reason}",
                )
            return
        delay = self.tempfail_retry_s[min(item.deferrals, len(self.tempfail_retry_s) - 1)]
        item.deferrals += 1
        self.deferred.append((self.clock.monotonic() + delay, item))

    async def send_all(self) -> None:
        async with anyio.create_task_group() as tg:
            for _ in range(min(self.concurrency, len(self.items))):
                tg.start_soon(self._worker)
            while await self._step():
                pass
            tg.cancel_scope.cancel()  # the workers, idle now

    async def _worker(self) -> None:
        while True:
            item = await self.inbox.get()
            outcome = await self.deliverer.deliver(self.run, item)
            if outcome.state == DEFERRED:
                await self._defer(item, outcome)
            elif outcome.state == "uncertain":
                self.uncertain.append(item)
            if outcome.suppress and self.suppressions is not None:
                await self.suppressions.learn(
                    self.channel, item.to, outcome.suppress, source=f"send:{self.run.key}"
                )
            self.sending -= 1
            if not self.finished:
                self.first_finished_at = self.clock.monotonic()
            self.finished.append(outcome)
            if len(self.finished) == 1 or self.sending <= self.low_water:
                self.wake.set()  # the loop has something to decide

    async def _step(self) -> bool:
        """Write and refill if there is something to write; otherwise wait for a reason to.
        False once everything launched has been recorded."""
        more = self.run.stop_reason is None and self.next_item < len(self.items)
        fenced = not self.run.may_send(self.clock.monotonic())
        # The channel's breaker is open and no probe may go yet: nothing to mark.
        paused = self.breaker.open and (self.breaker.probing or self.breaker.wait_s() > 0)
        want = more and self.sending <= self.low_water and not fenced and not paused
        # Rate-limit tokens are taken before rows are marked, so a row is `pending` only while
        # its message is really on its way (or retrying), never while it waits for its turn: a
        # crash leaves only those uncertain.
        room = min(self.concurrency - self.sending, len(self.items) - self.next_item)
        tokens = self.limiter.take(room) if want else 0
        # While the channel's breaker is open nothing is marked; once its pause is over, one.
        tokens = self.breaker.room(tokens) if tokens else 0
        stale = bool(self.finished) and (
            self.sending == 0
            or self.clock.monotonic() - self.first_finished_at >= OUTCOME_MAX_AGE_S
        )
        if tokens or stale:
            done = self.finished[:]
            self.finished.clear()
            new = self.items[self.next_item : self.next_item + tokens]
            self.next_item += len(new)
            new, blocked = await self._unsuppressed(new)
            accepted = await self.ledger.outcomes(self.run, done, pending=new, unsent=blocked)
            if self.breaker.probing and tokens and not accepted:
                self.breaker.probing = False  # no probe went (refused or suppressed): probe again
            self.sending += len(accepted)
            for item in accepted:
                self.inbox.put_nowait(item)
            return True
        if not more and self.sending == 0 and not self.finished:
            return False
        self.wake.clear()
        timeout = (
            max(0.0, self.first_finished_at + OUTCOME_MAX_AGE_S - self.clock.monotonic())
            if self.finished
            else math.inf
        )
        if want:  # waiting for the rate limit to free a token (a Retry-After pause can be
            # long: look again every second, in case the run was stopped)
            timeout = min(timeout, self.limiter.wait_s(), 1.0)
        elif more and paused:
            timeout = min(timeout, max(self.breaker.wait_s(), FENCED_POLL_S))  # the next probe
        elif more and fenced:
            timeout = min(timeout, FENCED_POLL_S)  # a renewal lifts the fence
        await self._wait(timeout)  # a send in flight will finish, or a token is free
        return True

    async def _unsuppressed(self, items: list[Item]) -> tuple[list[Item], list[DeliveryRecord]]:
        """The last check before a row is marked: entries the suppressions stream brought since
        the batch was read (in memory), and a fresh read for a batch read before the stream's
        horizon (it restarted and may have missed some)."""
        guard = self.suppressions
        if guard is None or not items:
            return items, []
        stale = [i for i in items if i.checked_m < guard.horizon_m]
        reasons: dict[str, str] = {}
        if stale:
            checked_m = self.clock.monotonic()
            reasons = await guard.check(self.channel, [(i.customer, i.to) for i in stale])
            for i in stale:
                i.checked_m = checked_m
        keep: list[Item] = []
        blocked: list[DeliveryRecord] = []
        for item in items:
            reason = reasons.get(item.customer) or guard.recent(
                self.channel, item.customer, item.to
            )
            if reason is None:
                keep.append(item)
            else:
                blocked.append(
                    DeliveryRecord(
                        item.customer,
                        item.channel,
                        DeliveryState.SKIPPED,
                        to=item.to,
                        reason=skip_reason(reason),
                    )
                )
        return keep, blocked

    async def _wait(self, timeout_s: float) -> None:
        """Until a worker wakes the loop, or `timeout_s` of the clock's time (never the event
        loop's own: tests drive the clock, and a rate limit is measured on it)."""
        if timeout_s == math.inf:
            await self.wake.wait()
            return
        await wait_for_event(self.clock, self.wake, timeout_s)
