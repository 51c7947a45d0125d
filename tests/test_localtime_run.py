"""A localTime campaign sent on in-memory ports and a FakeClock: each recipient's message goes
at their own hour in their own zone (never a moment early), one batch per distinct instant,
whoever falls outside [startDate, endDate] is skipped `outside_window`, a pause while waiting
resumes with zero duplicates, and the arming check refuses bad input and warns of batches that
cannot fit their spread."""

from __future__ import annotations

import contextlib
import datetime as dt
from collections.abc import AsyncIterator
from typing import Any

import anyio

from reactor.config import SchedulerConfig, SendConfig
from reactor.domain.models import Channel
from reactor.execution import Executor
from reactor.execution.localtime import plan_with_zones
from reactor.execution.run import LOCAL_BATCH_HOOKS
from reactor.metrics import Metrics
from reactor.ports import Recipient
from reactor.scheduling.admission import Admissions, LocalTimeAdmission
from reactor.scheduling.scheduler import Scheduler

from .conftest import MongoTarget
from .fakes import FakeClock, MemoryCampaignStore, MemoryLedger, MemoryRecipients, RecordingSender
from .helpers import Client
from .test_units import START, World, campaign

# 12:30 local on 1 June 2026 (START is 12:00Z): UTC and the Azores (+0 in summer) 12:30Z,
# Cape Verde (-1) 13:30Z, Noronha (-2) 14:30Z; London (+1) 11:30Z and Kolkata 07:00Z have
# passed, so theirs is tomorrow: outside a window that ends at 18:00Z.
ZONES = {
    "UTC": START + dt.timedelta(minutes=30),
    "Atlantic/Azores": START + dt.timedelta(minutes=30),
    "Atlantic/Cape_Verde": START + dt.timedelta(minutes=90),
    "America/Noronha": START + dt.timedelta(minutes=150),
    "Europe/London": None,
    "Asia/Kolkata": None,
}
PER_ZONE = 4
LOCAL = {"at": "12:30", "spreadMinutes": 30, "fallbackZone": "UTC"}


def people() -> list[Recipient]:
    out = []
    for z, name in enumerate(ZONES):
        for i in range(PER_ZONE):
            n = z * PER_ZONE + i
            out.append(Recipient(str(n), f"Cust {n}", f"c{n}@example.com", None, timezone=name))
    # No zone of their own and no phone: the fallback (UTC).
    out.append(Recipient("99", "Cust 99", "c99@example.com", None))
    return out


def zone_of(address: str) -> str:
    n = int(address.removeprefix("c").split("@")[0])
    return "UTC" if n == 99 else list(ZONES)[n // PER_ZONE]


@contextlib.asynccontextmanager
async def local_world(
    admission: Any = None, email_rate: float = 1000
) -> AsyncIterator[tuple[World, list[tuple[str, dt.datetime]]]]:
    clock = FakeClock(START - dt.timedelta(minutes=1))
    store = MemoryCampaignStore(clock)
    ledger = MemoryLedger()
    sent_at: list[tuple[str, dt.datetime]] = []

    def handler(message: Any) -> str:
        sent_at.append((message.to, clock.now()))
        return f"id-{message.to}"

    email = RecordingSender(handler)
    metrics = Metrics()
    executor = Executor(
        store=store,
        ledger=ledger,
        recipients=MemoryRecipients(people()),
        email=email,
        sms=None,
        clock=clock,
        metrics=metrics,
        config=SendConfig(email_rate_per_s=email_rate, concurrency=4, batch_size=7),
        instance_id="unit",
        lease_s=30.0,
    )
    scheduler = Scheduler(
        store=store,
        executor=executor,
        clock=clock,
        metrics=metrics,
        config=SchedulerConfig(instance_id="unit", lease_s=30.0, misfire_grace_s=60),
        admission=admission,
    )
    async with anyio.create_task_group() as tg:
        await tg.start(executor.serve)
        await tg.start(scheduler.run)
        yield World(clock, store, ledger, email, executor, scheduler, metrics), sent_at
        tg.cancel_scope.cancel()


def local_campaign(**fields: Any) -> dict[str, Any]:
    doc = campaign("lt", 0, localTime=LOCAL, **fields)
    doc["targetedCustomerIds"] = [r.customer_id for r in people()]
    doc["endDate"] = START + dt.timedelta(hours=6)
    return doc


async def test_each_recipient_gets_it_at_their_own_hour_once() -> None:
    batches: list[tuple[dt.datetime, float, int]] = []
    LOCAL_BATCH_HOOKS.append(lambda key, due, late, n: batches.append((due, late, n)))
    try:
        async with local_world() as (w, sent_at):
            await w.scheduler.sync(w.store.add(local_campaign()))
            await w.until(lambda: len(sent_at) >= 9, step_s=5, limit_s=3600)
            assert w.doc("lt")["status"] == "running"
            await w.until(lambda: len(sent_at) == 17, step_s=30, limit_s=4 * 3600)
            await w.until(
                lambda: bool(w.doc("lt")["execution"].get("sendsDone")), step_s=5, limit_s=60
            )
    finally:
        LOCAL_BATCH_HOOKS.clear()
    addresses = [a for a, _ in sent_at]
    assert len(addresses) == len(set(addresses))  # once each
    for address, when in sent_at:
        due = ZONES[zone_of(address)]
        assert due is not None, address
        assert due <= when < due + dt.timedelta(seconds=5), (address, when)  # never early
    # One batch per distinct instant (UTC and the Azores share one), in time order.
    assert [(due, n) for due, _, n in batches] == [
        (START + dt.timedelta(minutes=30), 9),
        (START + dt.timedelta(minutes=90), 4),
        (START + dt.timedelta(minutes=150), 4),
    ]
    assert all(0 <= late < 1 for _, late, _ in batches)
    skipped = {r["customer"] for r in w.ledger.rows.values() if r["state"] == "skipped"}
    outside = {r.customer_id for r in people() if r.timezone in ("Europe/London", "Asia/Kolkata")}
    assert skipped == outside
    assert {r["reason"] for r in w.ledger.rows.values() if r["state"] == "skipped"} == {
        "outside_window"
    }


async def test_a_pause_while_waiting_for_the_next_instant_resumes_without_duplicates() -> None:
    async with local_world() as (w, sent_at):
        await w.scheduler.sync(w.store.add(local_campaign()))
        await w.until(lambda: len(sent_at) == 9, step_s=5, limit_s=3600)
        doc = w.doc("lt")
        doc["status"] = "paused"
        await w.scheduler.sync(w.store.add(doc))
        await w.until(lambda: not w.executor.runs, step_s=1, limit_s=60)
        await w.clock.advance(30 * 60)  # 13:00Z: still before Cape Verde's instant
        doc = w.doc("lt")
        doc["status"] = "running"
        doc["execution"]["leaseUntil"] = None
        await w.scheduler.sync(w.store.add(doc))
        await w.until(lambda: len(sent_at) == 17, step_s=30, limit_s=4 * 3600)
    addresses = [a for a, _ in sent_at]
    assert len(addresses) == len(set(addresses)) == 17
    for address, when in sent_at:
        due = ZONES[zone_of(address)]
        assert due is not None
        assert when >= due


def planner(recipients: MemoryRecipients) -> Any:
    async def batches(ids: Any, local: Any, start_at: dt.datetime) -> Any:
        return await plan_with_zones(recipients, ids, local, start_at, 7)

    return batches


class Warnings:
    def __init__(self) -> None:
        self.written: dict[Any, list[str]] = {}

    async def set_warnings(self, campaign_id: Any, warnings: list[str]) -> bool:
        self.written[campaign_id] = warnings
        return True


async def test_arming_refuses_bad_local_time_and_warns_of_batches_that_cannot_fit() -> None:
    store_ref: dict[str, MemoryCampaignStore] = {}
    warnings = Warnings()

    async def targets(campaign_id: Any) -> list[Any]:
        doc = await store_ref["store"].get(campaign_id, with_targets=True)
        return list((doc or {}).get("targetedCustomerIds") or [])

    # 9 recipients at 12:30Z at 0.004/s need 37.5 min of a 30-minute spread.
    admission = Admissions(
        [
            LocalTimeAdmission(
                targets=targets,
                planner=planner(MemoryRecipients(people())),
                rates=lambda doc, channel: 0.004 if channel is Channel.EMAIL else 1.0,
            )
        ],
        warnings,
    )
    async with local_world(admission) as (w, _):
        store_ref["store"] = w.store
        bad = local_campaign()
        bad["_id"] = "bad"
        bad["localTime"] = {"at": "10:00", "spreadMinutes": 0, "fallbackZone": "UTC"}
        await w.scheduler.sync(w.store.add(bad))
        error = w.doc("bad")["execution"]["lastError"]
        assert error["reason"] == "bad_local_time"
        assert "spreadMinutes" in error["detail"]
        assert not w.scheduler.timers.keys()  # not armed
        split = local_campaign()
        split["_id"] = "split"
        split["variants"] = [{"key": "A"}, {"key": "B", "email": {"subject": "B"}}]
        split["abTest"] = {
            "testShare": 0.5,
            "metric": "human_clicks",
            "decideAfterMinutes": 5,
            "minPerVariant": 10,
        }
        await w.scheduler.sync(w.store.add(split))
        error = w.doc("split")["execution"]["lastError"]
        assert error["reason"] == "bad_local_time"
        assert "variants" in error["detail"]
        assert not w.scheduler.timers.keys()  # a split has no winner phase at local times
        await w.scheduler.sync(w.store.add(local_campaign()))
        assert w.scheduler.timers.keys()  # armed, with a warning
    (warning,) = warnings.written["lt"]
    assert warning.startswith("localTime email: 9 recipients at 2026-06-01 12:30Z")
    assert "(Atlantic/Azores, UTC)" in warning
    assert "7.5 min more than the 30-minute spread" in warning


async def test_the_customers_zone_is_read_from_the_configured_field(
    mongo: MongoTarget, client: Client
) -> None:
    from reactor.adapters.mongo import MongoRecipients
    from reactor.config import RecipientsConfig

    orders = client[mongo.segmentation_db]["newdatabase"]
    await orders.insert_many(
        [
            {"customer_id": 1, "email": "a@example.com", "tz": None},
            {"customer_id": 1, "email": "", "tz": "Asia/Tokyo"},  # a later row carries it
            {"customer_id": 2, "email": "b@example.com"},
        ]
    )
    with_zone = MongoRecipients(orders, RecipientsConfig(timezone_field="tz"))
    found = await with_zone.resolve(["1", "2"])
    assert found["1"].timezone == "Asia/Tokyo"
    assert found["1"].email == "a@example.com"
    assert found["2"].timezone is None
    without = await MongoRecipients(orders, RecipientsConfig()).resolve(["1"])
    assert without["1"].timezone is None


async def test_a_check_that_breaks_is_logged_and_does_not_keep_the_campaign_out() -> None:
    async def unreadable(campaign_id: Any) -> list[Any]:
        raise RuntimeError("the audience cannot be read")

    admission = Admissions(
        [
            LocalTimeAdmission(
                targets=unreadable,
                planner=planner(MemoryRecipients(people())),
                rates=lambda doc, channel: 1.0,
            )
        ]
    )
    async with local_world(admission) as (w, sent_at):
        await w.scheduler.sync(w.store.add(local_campaign()))
        assert w.scheduler.timers.keys()  # armed regardless
        await w.until(lambda: len(sent_at) == 9, step_s=5, limit_s=3600)


async def test_judging_a_large_audience_does_not_hold_up_arming() -> None:
    release = anyio.Event()
    warnings = Warnings()

    async def slow_targets(campaign_id: Any) -> list[Any]:
        await release.wait()  # an audience that takes long to read
        return [r.customer_id for r in people()]

    check = LocalTimeAdmission(
        targets=slow_targets,
        planner=planner(MemoryRecipients(people())),
        rates=lambda doc, channel: 0.004,
    )
    check.inline_s = 0.01
    async with local_world(Admissions([check], warnings)) as (w, _):
        await w.scheduler.sync(w.store.add(local_campaign()))
        assert w.scheduler.timers.keys()  # armed without waiting for the judgement
        assert "lt" not in warnings.written
        release.set()
        await anyio.sleep(0.05)
        await w.scheduler.sync(w.store.add(w.doc("lt")))  # the next sync (a sweep) has it
    assert any("more than the 30-minute spread" in x for x in warnings.written["lt"])
