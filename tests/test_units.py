"""The scheduler and the executor alone, on in-memory ports and a FakeClock: no database, no
network, no real sleeping — time moves only when a test advances it."""

from __future__ import annotations

import collections
import contextlib
import datetime as dt
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.lowlevel
import pytest

from reactor.config import SchedulerConfig, SendConfig
from reactor.domain.errors import TransientDeliveryError, UncertainDeliveryError
from reactor.execution import Executor
from reactor.metrics import Metrics
from reactor.ports import Recipient
from reactor.scheduling.scheduler import NOT_DUE_RETRY_S, Scheduler

from .fakes import FakeClock, MemoryCampaignStore, MemoryLedger, MemoryRecipients, RecordingSender

START = dt.datetime(2026, 6, 1, 12, 0, tzinfo=dt.UTC)


class LaggingClock:
    """`base` as seen `lag_s` behind: a database whose clock is a little behind ours."""

    def __init__(self, base: FakeClock, lag_s: float) -> None:
        self.base = base
        self.lag = dt.timedelta(seconds=lag_s)

    def now(self) -> dt.datetime:
        return self.base.now() - self.lag


@dataclass
class World:
    clock: FakeClock
    store: MemoryCampaignStore
    ledger: MemoryLedger
    email: RecordingSender
    executor: Executor
    scheduler: Scheduler
    metrics: Metrics

    async def until(
        self, check: Callable[[], bool], *, step_s: float = 0.05, limit_s: float = 120
    ) -> None:
        """Advance the fake clock in steps until `check()` holds (or fail after `limit_s` of
        fake time)."""
        waited = 0.0
        while not check():
            assert waited < limit_s, "condition never held"
            await self.clock.advance(step_s)
            waited += step_s

    def doc(self, key: Any) -> dict[str, Any]:
        return self.store.docs[key]


def recipients(n: int) -> MemoryRecipients:
    return MemoryRecipients(
        Recipient(str(i), f"Cust {i}", f"c{i}@example.com", None) for i in range(n)
    )


@contextlib.asynccontextmanager
async def world(
    n: int = 20,
    *,
    email_rate: float = 1000,
    lease_s: float = 8.0,
    handler: Callable[[Any], str] | None = None,
    store_clock_lag_s: float = 0.0,
) -> AsyncIterator[World]:
    clock = FakeClock(START - dt.timedelta(minutes=1))
    store = MemoryCampaignStore(clock)
    if store_clock_lag_s:
        store.clock = LaggingClock(clock, store_clock_lag_s)  # type: ignore[assignment]
    ledger = MemoryLedger()
    email = RecordingSender(handler)
    metrics = Metrics()
    executor = Executor(
        store=store,
        ledger=ledger,
        recipients=recipients(n),
        email=email,
        sms=None,
        clock=clock,
        metrics=metrics,
        config=SendConfig(email_rate_per_s=email_rate, concurrency=4, batch_size=7),
        instance_id="unit",
        lease_s=lease_s,
        retry_base_s=1.0,
    )
    scheduler = Scheduler(
        store=store,
        executor=executor,
        clock=clock,
        metrics=metrics,
        config=SchedulerConfig(instance_id="unit", lease_s=lease_s, misfire_grace_s=60),
    )
    async with anyio.create_task_group() as tg:
        await tg.start(executor.serve)
        await tg.start(scheduler.run)
        yield World(clock, store, ledger, email, executor, scheduler, metrics)
        tg.cancel_scope.cancel()


def campaign(key: str, n: int, *, start: dt.datetime = START, **fields: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "_id": key,
        "name": key,
        "status": "approved",
        "startDate": start,
        "endDate": start + dt.timedelta(hours=1),
        "channels": ["email"],
        "email": {"subject": "Hi {{name}}", "text": "Hello"},
        "targetedCustomerIds": [str(i) for i in range(n)],
    }
    doc.update(fields)
    return doc


def sends_done(w: World, key: str) -> Callable[[], bool]:
    return lambda: bool(w.doc(key).get("execution", {}).get("sendsDone"))


async def test_a_start_is_claimed_at_its_instant_and_everyone_gets_it_once() -> None:
    async with world(20) as w:
        await w.scheduler.sync(w.store.add(campaign("c", 20)))
        await w.clock.advance(59.9)
        assert "claim_start" not in w.store.calls  # not a moment early
        await w.clock.advance(0.2)
        assert w.doc("c")["status"] == "running"
        await w.until(sends_done(w, "c"))
    assert sorted(m.to for m in w.email.sent) == sorted(f"c{i}@example.com" for i in range(20))
    assert {r["state"] for r in w.ledger.rows.values()} == {"sent"}
    assert w.doc("c")["performance"]["emailsSent"] == 20
    assert w.doc("c")["execution"]["startedAt"] == START  # exactly at its instant


async def test_a_start_past_the_grace_is_missed_not_sent() -> None:
    async with world(5) as w:
        late = w.clock.now() - dt.timedelta(minutes=5)
        await w.scheduler.sync(w.store.add(campaign("late", 5, start=late)))
        await w.clock.advance(0.1)
    assert w.doc("late")["status"] == "missed"
    assert w.email.sent == []


async def test_a_timer_that_fires_before_the_databases_clock_is_re_armed() -> None:
    """The database's clock is 30 ms behind ours: the first claim is refused as not yet due,
    the timer is re-armed, and the campaign starts — never early by the database's clock."""
    async with world(3, store_clock_lag_s=0.03) as w:
        await w.scheduler.sync(w.store.add(campaign("c", 3)))
        await w.clock.advance(60.0)
        assert w.store.calls.count("claim_start") == 1
        assert w.doc("c")["status"] == "approved"
        await w.clock.advance(0.1)
        assert w.store.calls.count("claim_start") == 2
        assert w.doc("c")["status"] == "running"
        assert w.doc("c")["execution"]["startedAt"] >= START


async def test_a_re_armed_start_is_late_from_its_first_instant() -> None:
    """The database said "not due yet" at the start instant: the retry's lateness counts from
    the campaign's start, not from the instant the retry was armed for."""
    async with world(3, store_clock_lag_s=0.03) as w:
        started: list[tuple[Any, float]] = []
        w.scheduler.on_started.append(lambda key, late: started.append((key, late)))
        await w.scheduler.sync(w.store.add(campaign("c", 3)))
        await w.clock.advance(60.0)
        await w.clock.advance(0.2)
        assert w.doc("c")["status"] == "running"
        ((key, late),) = started
        assert key.campaign == "c"
        # Started on the second try, at least NOT_DUE_RETRY_S after the start instant.
        assert late >= NOT_DUE_RETRY_S - 0.001  # (float timestamps)


async def test_pausing_stops_sending_and_leaves_nothing_pending() -> None:
    async with world(40, email_rate=10) as w:
        await w.scheduler.sync(w.store.add(campaign("c", 40)))
        await w.clock.advance(60.0)
        await w.until(lambda: len(w.email.sent) >= 8)
        paused = dict(w.doc("c"), status="paused")
        w.store.docs["c"] = paused
        await w.scheduler.sync(dict(paused), event_ts=None)
        await w.until(lambda: not w.executor.active("c"))
        sent_at_pause = len(w.email.sent)
        await w.clock.advance(10.0)
        assert len(w.email.sent) == sent_at_pause < 40
    states = collections.Counter(r["state"] for r in w.ledger.rows.values())
    assert states["pending"] == 0
    assert states["sent"] == sent_at_pause


async def test_an_owner_that_cannot_renew_its_lease_stops_sending_until_it_can() -> None:
    async with world(60, email_rate=5, lease_s=8.0) as w:
        await w.scheduler.sync(w.store.add(campaign("c", 60)))
        await w.clock.advance(60.0)
        await w.until(lambda: len(w.email.sent) >= 5)
        w.store.fail_heartbeats = True
        await w.clock.advance(8.0)  # the lease's length: fenced after 3/4 of it
        during = list(w.email.sent[5:])
        sent_when_fenced = len(w.email.sent)
        await w.clock.advance(4.0)
        assert len(w.email.sent) == sent_when_fenced  # nothing handed out while fenced
        assert len(during) <= 0.75 * 8 * 5 + 4  # at most what the rate allowed before the fence
        assert w.metrics.registry.get_sample_value("reactor_lease_fenced_total") == 1
        w.store.fail_heartbeats = False
        await w.until(sends_done(w, "c"))
    assert sorted(collections.Counter(m.to for m in w.email.sent).values()) == [1] * 60
    assert w.doc("c")["execution"]["epoch"] == 1


async def test_a_takeover_never_resends_and_settles_what_was_in_flight() -> None:
    async with world(10) as w:
        doc = w.store.add(
            campaign(
                "c",
                10,
                status="running",
                execution={
                    "owner": "gone",
                    "epoch": 1,
                    "leaseUntil": w.clock.now() - dt.timedelta(seconds=1),
                },
            )
        )
        w.ledger.rows["c:email:0"] = {
            "campaign": "c",
            "channel": "email",
            "customer": "0",
            "state": "sent",
            "epoch": 1,
        }
        w.ledger.rows["c:email:1"] = {
            "campaign": "c",
            "channel": "email",
            "customer": "1",
            "state": "pending",
            "epoch": 1,
        }
        await w.scheduler.sync(dict(doc))
        await w.until(sends_done(w, "c"))
    assert w.doc("c")["execution"]["epoch"] == 2
    sent_to = sorted(m.to for m in w.email.sent)
    assert sent_to == sorted(f"c{i}@example.com" for i in range(2, 10))
    assert w.ledger.rows["c:email:1"]["state"] == "uncertain"
    assert w.ledger.rows["c:email:1"]["settledBy"] == 2


async def test_an_uncertain_send_is_recorded_once_and_never_retried() -> None:
    def flaky(message: Any) -> str:
        if message.to == "c3@example.com":
            raise UncertainDeliveryError("provider answered 502 after accepting")
        return "ok"

    async with world(6, handler=flaky) as w:
        await w.scheduler.sync(w.store.add(campaign("c", 6)))
        await w.clock.advance(60.0)
        await w.until(sends_done(w, "c"))
    assert w.email.attempts == 6  # c3 tried once, never again
    assert w.ledger.rows["c:email:3"]["state"] == "uncertain"
    assert w.doc("c")["performance"]["uncertain"] == 1


@pytest.mark.parametrize("bad", [[{"id": 1}], "not-a-list", [True], [2.5]])
async def test_unreadable_targets_are_reported_when_armed_and_never_started(bad: Any) -> None:
    async with world(3) as w:
        await w.scheduler.sync(w.store.add(campaign("c", 3, targetedCustomerIds=bad)))
        await w.clock.advance(120.0)
    assert w.doc("c")["status"] == "approved"
    assert w.doc("c")["execution"]["lastError"]["reason"] == "bad_targets"
    assert "claim_start" not in w.store.calls


async def test_a_channel_wide_outage_pauses_the_channel_instead_of_failing_everyone() -> None:
    """The provider refuses every connection for a minute: after a few failures in a row the
    channel pauses (nothing is marked failed), probes with one send at a time, and once the
    provider is back everyone gets the email exactly once."""
    outage_until: list[dt.datetime] = []

    async with world(30) as w:

        def provider(message: Any) -> str:
            if w.clock.now() < outage_until[0]:
                raise TransientDeliveryError("SMTP connect failed: refused", channel_wide="connect")
            return "ok"

        w.email.handler = provider
        outage_until.append(START + dt.timedelta(seconds=60))
        await w.scheduler.sync(w.store.add(campaign("c", 30)))
        await w.clock.advance(60.0)  # starts at START, the provider down for a minute
        await w.until(
            lambda: (
                w.metrics.registry.get_sample_value("reactor_channel_paused", {"channel": "email"})
                == 1
            )
        )
        assert w.doc("c")["execution"]["lastError"]["reason"] == "channel_paused"
        attempts_when_paused = w.email.attempts
        await w.clock.advance(30.0)
        # While paused: only the occasional probe (5 s, then 10 s, then 20 s apart).
        assert w.email.attempts - attempts_when_paused <= 3
        await w.until(sends_done(w, "c"), step_s=0.5, limit_s=600)
    states = collections.Counter(r["state"] for r in w.ledger.rows.values())
    assert states == {"sent": 30}  # nobody burned as failed by the outage
    assert sorted(collections.Counter(m.to for m in w.email.sent).values()) == [1] * 30
    assert w.metrics.registry.get_sample_value("reactor_channel_paused", {"channel": "email"}) == 0
    pauses = w.metrics.registry.get_sample_value(
        "reactor_channel_pauses_total", {"channel": "email", "kind": "connect"}
    )
    assert pauses is not None
    assert pauses >= 1


async def test_wait_for_event_ends_at_the_event_or_the_clocks_timeout() -> None:
    import asyncio
    import gc

    from reactor.ports import wait_for_event

    clock = FakeClock()
    event = asyncio.Event()
    waiting = asyncio.ensure_future(wait_for_event(clock, event, 5))
    await clock.advance(0)  # (lets it start waiting)
    await clock.advance(4.9)
    assert not waiting.done()
    await clock.advance(0.2)  # the clock's time, not the event loop's
    assert waiting.done()
    waiting = asyncio.ensure_future(wait_for_event(clock, event, 5))
    await anyio.lowlevel.checkpoint()
    event.set()
    await asyncio.wait_for(waiting, 1)
    assert not clock._sleepers or all(f.done() for _, _, f in clock._sleepers)  # nothing left
    # A hundred waits a second in a send window: none may leave cyclic garbage behind.
    gc.collect()
    gc.disable()
    try:
        for n in range(200):
            other = asyncio.Event()
            w = asyncio.ensure_future(wait_for_event(clock, other, 1))
            await clock.advance(0)
            if n % 2:
                other.set()
            else:
                await clock.advance(1)
            await w
        assert gc.collect() < 20
    finally:
        gc.enable()
