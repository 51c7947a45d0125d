"""One campaign sent by many replicas: its audience cut into shards, each claimed under its own
fenced lease by whichever replica has room. Every customer gets exactly one message, the counts
are exact, a pause stops every shard and a resume finishes with no re-send, a closing window
accounts for every customer, and an id listed in two shards is sent once."""

from __future__ import annotations

import collections
from typing import Any

import anyio
import pytest
from pymongo import AsyncMongoClient

from reactor.domain.shards import shard_ranges
from reactor.embedded.smtp_sink import SmtpSink

from .conftest import MongoTarget
from .helpers import (
    campaign,
    eventually,
    has_status,
    holds,
    ledger,
    running,
    seed_customers,
    settings,
)

Client = AsyncMongoClient[dict[str, Any]]


def test_shard_ranges_cover_the_list_once() -> None:
    assert shard_ranges(0, 10) == []
    assert shard_ranges(25, 10) == [(0, 10), (10, 10), (20, 5)]
    assert shard_ranges(10, 10) == [(0, 10)]
    covered = [i for start, n in shard_ranges(1001, 7) for i in range(start, start + n)]
    assert covered == list(range(1001))
    with pytest.raises(ValueError, match="at least 1"):
        shard_ranges(5, 0)


async def _done(client: Client, mongo: MongoTarget, campaign_id: Any) -> bool:
    doc = await client[mongo.campaigns_db].campaigns.find_one({"_id": campaign_id})
    return bool(doc and (doc.get("execution") or {}).get("sendsDone"))


async def _shards(client: Client, mongo: MongoTarget, campaign_id: Any) -> list[dict[str, Any]]:
    cursor = client[mongo.campaigns_db].campaign_shards.find({"campaign": str(campaign_id)})
    return await cursor.sort("index").to_list()


def _replicas(mongo: MongoTarget, sink: SmtpSink, n: int, **overrides: Any) -> list[Any]:
    values: dict[str, Any] = {"shard_size": 100, "email_rate_per_second": 400, **overrides}
    return [settings(mongo, sink, reactor_instance_id=f"r{i}", **values) for i in range(n)]


async def test_three_replicas_share_one_campaign_and_each_customer_gets_one_email(
    mongo: MongoTarget, client: Client
) -> None:
    ids = await seed_customers(client, mongo, 600)
    async with SmtpSink(reply_delay_s=0.01) as sink:
        coll = client[mongo.campaigns_db].campaigns
        async with running(*_replicas(mongo, sink, 3)):
            res = await coll.insert_one(campaign("big", 0.5, 120, ids, channels=["email"]))
            await eventually(lambda: _done(client, mongo, res.inserted_id), 60)
        recipients = collections.Counter(m.to for m in sink.messages)
    assert len(recipients) == 600
    assert set(recipients.values()) == {1}
    shards = await _shards(client, mongo, res.inserted_id)
    assert [(s["start"], s["count"]) for s in shards] == shard_ranges(600, 100)
    assert all(s["state"] == "done" for s in shards)
    assert {s["name"] for s in shards} == {"big"}  # for their owners' logs
    # Sent by more than one replica.
    assert len({s["owner"] for s in shards}) >= 2, [s["owner"] for s in shards]
    rows = await ledger(client, mongo, res.inserted_id)
    assert len(rows) == 600
    assert {r["state"] for r in rows} == {"sent"}
    by_shard = collections.Counter(r["shard"] for r in rows)
    assert by_shard == dict.fromkeys(range(6), 100)
    doc = await coll.find_one({"_id": res.inserted_id})
    assert doc is not None
    assert doc["performance"]["emailsSent"] == 600


async def test_an_id_listed_in_two_shards_is_sent_once(mongo: MongoTarget, client: Client) -> None:
    ids = await seed_customers(client, mongo, 250)
    # 50 ids listed again at the end: they fall in two shards, and in the same one twice.
    targets: list[Any] = ids + ids[90:140] + [int(i) for i in ids[0:10]]
    async with SmtpSink() as sink:
        coll = client[mongo.campaigns_db].campaigns
        async with running(*_replicas(mongo, sink, 2)):
            res = await coll.insert_one(campaign("dups", 0.5, 120, targets, channels=["email"]))
            await eventually(lambda: _done(client, mongo, res.inserted_id), 60)
        recipients = collections.Counter(m.to for m in sink.messages)
    assert len(recipients) == 250
    assert set(recipients.values()) == {1}
    rows = await ledger(client, mongo, res.inserted_id)
    assert len(rows) == 250
    doc = await coll.find_one({"_id": res.inserted_id})
    assert doc is not None
    assert doc["performance"]["emailsSent"] == 250


async def test_a_pause_stops_every_shard_and_a_resume_sends_the_rest_once(
    mongo: MongoTarget, client: Client
) -> None:
    ids = await seed_customers(client, mongo, 400)
    async with SmtpSink() as sink:
        coll = client[mongo.campaigns_db].campaigns
        configs = _replicas(mongo, sink, 2, email_rate_per_second=60)
        async with running(*configs):
            res = await coll.insert_one(campaign("pause", 0.3, 120, ids, channels=["email"]))
            await eventually(lambda: holds(len(sink.messages) >= 60), 20)
            await coll.update_one({"_id": res.inserted_id}, {"$set": {"status": "paused"}})
            await eventually(
                lambda: _all_shards_idle(client, mongo, res.inserted_id), 5, interval_s=0.1
            )
            at_pause = len(sink.messages)
            assert at_pause < 400
            # Stopped within a second: nothing more goes out while paused.
            await anyio.sleep(1.5)
            assert len(sink.messages) == at_pause
            held = await _shards(client, mongo, res.inserted_id)
            assert {s["state"] for s in held} <= {"held", "done"}
            await coll.update_one({"_id": res.inserted_id}, {"$set": {"status": "running"}})
            await eventually(lambda: _done(client, mongo, res.inserted_id), 60)
        recipients = collections.Counter(m.to for m in sink.messages)
    assert len(recipients) == 400
    assert set(recipients.values()) == {1}
    doc = await coll.find_one({"_id": res.inserted_id})
    assert doc is not None
    assert doc["performance"]["emailsSent"] == 400


async def _all_shards_idle(client: Client, mongo: MongoTarget, campaign_id: Any) -> bool:
    shards = await _shards(client, mongo, campaign_id)
    return bool(shards) and all(s["state"] in ("held", "done") for s in shards)


async def test_a_closing_window_accounts_for_every_customer_of_every_shard(
    mongo: MongoTarget, client: Client
) -> None:
    ids = await seed_customers(client, mongo, 500)
    async with SmtpSink() as sink:
        coll = client[mongo.campaigns_db].campaigns
        # 40/s for 3 s: about 120 sent; the rest, in claimed and unclaimed shards, skipped.
        configs = _replicas(mongo, sink, 2, email_rate_per_second=40, shard_concurrency=1)
        async with running(*configs):
            res = await coll.insert_one(campaign("window", 0.3, 3.3, ids, channels=["email"]))
            await eventually(has_status(client, mongo, res.inserted_id, "completed"), 30)
        sent = len(sink.messages)
    rows = await ledger(client, mongo, res.inserted_id)
    assert len(rows) == 500
    states = collections.Counter(r["state"] for r in rows)
    assert states["sent"] == sent
    assert 0 < sent < 500
    assert states["skipped"] == 500 - sent
    assert {r.get("reason") for r in rows if r["state"] == "skipped"} == {"window_closed"}
    assert all(s["state"] == "done" for s in await _shards(client, mongo, res.inserted_id))
    doc = await coll.find_one({"_id": res.inserted_id})
    assert doc is not None
    assert doc["performance"]["emailsSent"] == sent
    assert doc["performance"]["emailsSkipped"] == 500 - sent
