"""Exactly once against real clocks and stalled owners: replicas whose wall clocks are a minute
off, an owner whose lease renewals fail, executions that keep failing. Real reactors, the real
driver, the database's clock as the only judge."""

from __future__ import annotations

import asyncio
import collections
import datetime as dt
import time
from typing import Any

import pytest
from pymongo import AsyncMongoClient

from reactor.app import Reactor
from reactor.embedded.smtp_sink import SmtpSink

from .conftest import MongoTarget
from .helpers import (
    campaign,
    eventually,
    has_status,
    holds,
    ledger,
    running,
    running_reactors,
    seed_customers,
    settings,
)

Client = AsyncMongoClient[dict[str, Any]]


class SkewedClock:
    """The system clock, `offset_s` off: what a replica with a drifting wall clock sees."""

    def __init__(self, offset_s: float) -> None:
        self.offset = dt.timedelta(seconds=offset_s)

    def now(self) -> dt.datetime:
        return dt.datetime.now(dt.UTC) + self.offset

    def monotonic(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))


async def fail_point(client: Client, **data: Any) -> None:
    await client.admin.command(
        {"configureFailPoint": "failCommand", "mode": "alwaysOn", "data": data}
    )


async def fail_point_off(client: Client) -> None:
    await client.admin.command({"configureFailPoint": "failCommand", "mode": "off"})


async def doc_of(client: Client, mongo: MongoTarget, campaign_id: Any) -> dict[str, Any]:
    doc = await client[mongo.campaigns_db].campaigns.find_one({"_id": campaign_id})
    assert doc is not None
    return doc


@pytest.mark.parametrize("offset_s", [40.0, -40.0])
async def test_a_skewed_replica_neither_starts_early_nor_judges_a_live_lease_expired(
    mongo: MongoTarget, client: Client, sink: SmtpSink, offset_s: float
) -> None:
    """Two replicas, one with its wall clock 40 s ahead (or behind). The fast one used to start
    campaigns up to 40 s early and to take over live leases (one customer got two emails); the
    slow one's leases looked expired to everyone else."""
    ids = await seed_customers(client, mongo, 60)
    coll = client[mongo.campaigns_db].campaigns
    normal = settings(mongo, sink, reactor_instance_id="normal", email_rate_per_second=30)
    skewed = settings(mongo, sink, reactor_instance_id="skewed", email_rate_per_second=30)
    reactors = [Reactor(normal), Reactor(skewed, clock=SkewedClock(offset_s))]
    async with running_reactors(reactors):
        res = await coll.insert_one(campaign("skew", 3.0, 60, ids))
        start_at = (await doc_of(client, mongo, res.inserted_id))["startDate"]
        await eventually(lambda: holds(len(sink.messages) >= 60), 20)
        await eventually(has_status(client, mongo, res.inserted_id, "running"), 5)
        doc = await doc_of(client, mongo, res.inserted_id)
    # Started at the database's startDate, not before it (by the database's own clock)...
    assert doc["execution"]["startedAt"] >= start_at
    assert doc["execution"]["startLatenessMs"] >= 0
    # ...by one owner, never taken over, and nobody got the email twice.
    assert doc["execution"]["epoch"] == 1
    counts = collections.Counter(sink.recipients())
    assert [a for a, n in counts.items() if n > 1] == []
    assert len(counts) == 60
    for reactor in reactors:
        assert reactor.metrics.lease_takeovers._value.get() == 0
    skewed_offset = reactors[1].metrics.clock_offset._value.get()
    assert abs(skewed_offset + offset_s) < 1.0, skewed_offset


async def test_an_owner_whose_renewals_fail_fences_itself_then_resumes(
    mongo: MongoTarget, client: Client, sink: SmtpSink
) -> None:
    """The owner's heartbeat writes fail: within its lease it stops handing out sends (it no
    longer knows that it still owns the run), and once a renewal succeeds it sends the rest."""
    mongo.require_emulator()
    ids = await seed_customers(client, mongo, 80)
    coll = client[mongo.campaigns_db].campaigns
    cfg = settings(mongo, sink, lease_seconds=2.0, email_rate_per_second=20)
    async with running(cfg) as (reactor,):
        res = await coll.insert_one(campaign("fence", 0.5, 60, ids))
        await eventually(lambda: holds(len(sink.messages) >= 10), 10)
        # Heartbeats are findAndModify from this replica; claims are done by now.
        await fail_point(
            client,
            failCommands=["findAndModify"],
            errorCode=2,
            appName="campaign-reactor/test-a",
        )
        failed_at = time.monotonic()
        await asyncio.sleep(4.0)
        during = [m.received_at for m in sink.messages if m.received_at > failed_at + 2.0]
        sent_while_failing = len(sink.messages)
        await fail_point_off(client)
        await eventually(lambda: holds(len(sink.messages) >= 80), 15)
        assert reactor.metrics.fenced._value.get() >= 1
        assert reactor.metrics.heartbeat_failures._value.get() >= 1
    # From the lease's length on (2 s), nothing was handed out; before the fix it sent on.
    assert during == []
    assert sent_while_failing < 80
    counts = collections.Counter(sink.recipients())
    assert sorted(counts.values()) == [1] * 80
    doc = await doc_of(client, mongo, res.inserted_id)
    assert doc["execution"]["epoch"] == 1


async def test_a_failing_execution_backs_off_keeps_its_error_and_ends_failed(
    mongo: MongoTarget, client: Client, sink: SmtpSink
) -> None:
    """Every execution fails (the orders database is unreachable). The error stays on the
    campaign, each retry waits longer, and after EXECUTION_MAX_FAILURES the campaign is
    `failed` — no loop of takeovers counted as sweep repairs."""
    import socket

    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        dead = probe.getsockname()[1]
    ids = await seed_customers(client, mongo, 5)
    coll = client[mongo.campaigns_db].campaigns
    cfg = settings(
        mongo,
        sink,
        execution_max_failures=3,
        execution_retry_base_seconds=0.2,
        reconcile_interval_seconds=0.5,
        segmentation_mongo_uri=f"mongodb://127.0.0.1:{dead}/?serverSelectionTimeoutMS=200",
    )
    async with running(cfg) as (reactor,):
        res = await coll.insert_one(campaign("doomed", 0.5, 60, ids))
        await eventually(has_status(client, mongo, res.inserted_id, "failed"), 20)
        doc = await doc_of(client, mongo, res.inserted_id)
        repairs = sum(
            s.value
            for m in reactor.metrics.reconcile_repairs.collect()
            for s in m.samples
            if s.name.endswith("_total") and s.labels.get("kind") == "takeover"
        )
    execution = doc["execution"]
    assert execution["failures"] == 3
    assert execution["epoch"] == 3
    assert execution["lastError"]["reason"] == "execution_failed"
    assert "ServerSelectionTimeoutError" in execution["lastError"]["detail"]
    assert "failed 3 times in a row" in execution["reason"]
    assert repairs == 0
    assert sink.messages == []
    assert await ledger(client, mongo, res.inserted_id) == []


async def test_claims_work_on_documents_in_odd_shapes(mongo: MongoTarget, client: Client) -> None:
    """A backend may leave `execution: null` and `performance` as a string: real MongoDB refuses
    a dotted $set under them (code 28), so claims rebuild them."""
    ids = await seed_customers(client, mongo, 3)
    coll = client[mongo.campaigns_db].campaigns
    async with running(settings(mongo)):
        res = await coll.insert_one(
            campaign("odd", 0.3, 30, ids, execution=None, performance="n/a")
        )
        await eventually(has_status(client, mongo, res.inserted_id, "running", "completed"), 10)
        await eventually(
            lambda: _sends_done(client, mongo, res.inserted_id),
            10,
        )
    doc = await doc_of(client, mongo, res.inserted_id)
    assert doc["execution"]["epoch"] == 1
    assert doc["performance"]["emailsSkipped"] == 3  # no SMTP configured: skipped, counted


async def _sends_done(client: Client, mongo: MongoTarget, campaign_id: Any) -> bool:
    doc = await client[mongo.campaigns_db].campaigns.find_one({"_id": campaign_id})
    return bool(doc and (doc.get("execution") or {}).get("sendsDone"))
