"""One campaign balanced over the replicas alive: the shard plan is a pure function of the
audience's size, the largest shard and the live replicas' shard slots (tested by tables); the
plan is written once, so a takeover with other replicas alive cannot create overlapping shards;
replicas announce their slots and are counted by the database's clock; and two replicas send
a campaign of an awkward size in equal shards, each customer once."""

from __future__ import annotations

import collections
from typing import Any

import pytest
from pymongo import AsyncMongoClient

from reactor.adapters.mongo import MongoShards
from reactor.domain.shards import shard_plan, shard_ranges
from reactor.embedded.smtp_sink import SmtpSink

from .conftest import MongoTarget
from .helpers import campaign, eventually, ledger, running, seed_customers, settings

Client = AsyncMongoClient[dict[str, Any]]


def _counts(ranges: list[tuple[int, int]]) -> list[int]:
    return [count for _, count in ranges]


@pytest.mark.parametrize(
    ("total", "size", "slots", "counts"),
    [
        # The case: 2,400 in shards of 500 on 3 replicas of 2 slots.
        (2_400, 500, 6, [400] * 6),
        (2_400, 500, 4, [300] * 8),  # 2 replicas: 5 needed, 8 for 4 slots
        (2_400, 500, 2, [400] * 6),  # 1 replica
        (1_500, 500, 6, [250] * 6),
        (1_500, 500, 4, [375] * 4),
        (10_000, 500, 6, [417] * 16 + [416] * 8),
        (600, 100, 6, [100] * 6),  # divides evenly: the fixed-size cut
        (7, 500, 3, [3, 2, 2]),
        (2, 500, 6, [1, 1]),  # never an empty shard
        (0, 500, 6, []),
        (25, 10, 0, [9, 8, 8]),  # no slots counted: as one
    ],
)
def test_the_plan_is_equal_shards_in_a_multiple_of_the_slots(
    total: int, size: int, slots: int, counts: list[int]
) -> None:
    ranges = shard_plan(total, size, slots)
    assert _counts(ranges) == counts
    # Contiguous, covering every position once.
    covered = [i for start, n in ranges for i in range(start, start + n)]
    assert covered == list(range(total))


@pytest.mark.parametrize("slots", [1, 2, 3, 4, 6, 7, 12])
@pytest.mark.parametrize("total", [501, 1_500, 2_400, 9_999, 100_000, 1_000_003])
def test_the_plan_balances_and_bounds_claims_at_any_size(total: int, slots: int) -> None:
    size = 500
    ranges = shard_plan(total, size, slots)
    counts = _counts(ranges)
    assert max(counts) <= size
    assert max(counts) - min(counts) <= 1
    assert len(ranges) % slots == 0  # every slot gets as many shards
    # The claim bound the docs state: fewer than ceil(total/size) + slots shards.
    assert len(ranges) < -(-total // size) + slots
    assert len(ranges) / total < (1 + slots) / size
    assert sum(counts) == total


def test_the_plan_refuses_a_size_below_one() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        shard_plan(10, 0, 2)


async def test_live_slots_count_unexpired_announcements(mongo: MongoTarget, client: Client) -> None:
    shards = MongoShards(client[mongo.campaigns_db])
    await shards.ensure_indexes()
    assert await shards.live_slots() == 0
    await shards.announce("r1", slots=2, lease_s=30)
    await shards.announce("r2", slots=3, lease_s=30)
    await shards.announce("gone", slots=5, lease_s=0)  # its lease ends now: not alive
    assert await shards.live_slots() == 5
    await shards.announce("r1", slots=4, lease_s=30)  # renewed with other slots: replaced
    assert await shards.live_slots() == 7
    await shards.withdraw("r2")
    assert await shards.live_slots() == 4


async def test_the_plan_is_written_once_so_a_takeover_cannot_overlap_shards(
    mongo: MongoTarget, client: Client
) -> None:
    shards = MongoShards(client[mongo.campaigns_db])
    await shards.ensure_indexes()
    first = shard_plan(2_400, 500, 2)
    assert await shards.create("c1", "cid", first, "list", "c") == first
    # A later owner that counted other slots plans otherwise: the first plan stands.
    again = shard_plan(2_400, 500, 4)
    assert again != first
    assert await shards.create("c1", "cid", again, "list", "c") == first
    rows = await client[mongo.campaigns_db].campaign_shards.find({"campaign": "c1"}).to_list()
    assert sorted((r["start"], r["count"]) for r in rows) == first


async def test_two_replicas_send_an_awkward_size_in_equal_shards_once_each(
    mongo: MongoTarget, client: Client
) -> None:
    # 240 in shards of at most 50: the fixed cut made 5 (taken 3/2 at best); for 2 replicas
    # of 2 slots the plan makes 8 of 30.
    n = 240
    ids = await seed_customers(client, mongo, n)
    async with SmtpSink(reply_delay_s=0.01) as sink:
        coll = client[mongo.campaigns_db].campaigns
        configs = [
            settings(
                mongo,
                sink,
                reactor_instance_id=f"r{i}",
                shard_size=50,
                shard_concurrency=2,
                email_rate_per_second=400,
            )
            for i in range(2)
        ]
        async with running(*configs):
            shard_store = MongoShards(client[mongo.campaigns_db])
            await eventually(lambda: _slots_are(shard_store, 4), 10)
            res = await coll.insert_one(campaign("awkward", 0.5, 120, ids, channels=["email"]))
            await eventually(lambda: _done(client, mongo, res.inserted_id), 60)
        recipients = collections.Counter(m.to for m in sink.messages)
        # Replicas that shut down withdraw their slots.
        assert await shard_store.live_slots() == 0
    assert len(recipients) == n
    assert set(recipients.values()) == {1}
    rows = (
        await client[mongo.campaigns_db]
        .campaign_shards.find({"campaign": str(res.inserted_id)})
        .to_list()
    )
    plan = shard_plan(n, 50, 4)
    assert _counts(plan) == [30] * 8
    assert plan != shard_ranges(n, 50)
    assert sorted((r["start"], r["count"]) for r in rows) == plan
    assert {r["state"] for r in rows} == {"done"}
    assert len({r["owner"] for r in rows}) == 2, [r["owner"] for r in rows]
    sent = await ledger(client, mongo, res.inserted_id)
    assert {r["state"] for r in sent} == {"sent"}
    assert collections.Counter(r["shard"] for r in sent) == dict.fromkeys(range(8), 30)


async def _slots_are(shards: MongoShards, slots: int) -> bool:
    return await shards.live_slots() == slots


async def _done(client: Client, mongo: MongoTarget, campaign_id: Any) -> bool:
    doc = await client[mongo.campaigns_db].campaigns.find_one({"_id": campaign_id})
    return bool(doc and (doc.get("execution") or {}).get("sendsDone"))


async def test_shards_made_before_plans_were_written_are_kept(
    mongo: MongoTarget, client: Client
) -> None:
    shards = MongoShards(client[mongo.campaigns_db])
    await shards.ensure_indexes()
    old = shard_ranges(2_400, 500)  # an owner before this release: 5 shards
    for index, (start, count) in enumerate(old):
        await shards.collection.insert_one(
            {
                "_id": f"c2:{index}",
                "campaign": "c2",
                "index": index,
                "start": start,
                "count": count,
                "state": "done",
                "epoch": 1,
            }
        )
    # Its taker-over counts 6 slots: it must not add a sixth, overlapping shard.
    assert await shards.create("c2", "cid", shard_plan(2_400, 500, 6)) == old
    assert await shards.collection.count_documents({"campaign": "c2"}) == 5


async def test_a_segment_is_cut_in_small_chunks_and_balanced_shards_of_them(
    mongo: MongoTarget, client: Client
) -> None:
    n = 200
    await seed_customers(client, mongo, n)
    async with SmtpSink() as sink:
        coll = client[mongo.campaigns_db].campaigns
        configs = [
            settings(mongo, sink, reactor_instance_id=f"r{i}", shard_size=60) for i in range(2)
        ]
        async with running(*configs):
            shard_store = MongoShards(client[mongo.campaigns_db])
            await eventually(lambda: _slots_are(shard_store, 4), 10)
            doc = campaign("seg", 0.5, 120, [], channels=["email"], segment={"query": {}})
            res = await coll.insert_one(doc)
            await eventually(lambda: _done(client, mongo, res.inserted_id), 60)
        recipients = collections.Counter(m.to for m in sink.messages)
    assert len(recipients) == n
    assert set(recipients.values()) == {1}
    rows = (
        await client[mongo.campaigns_db]
        .campaign_shards.find({"campaign": str(res.inserted_id)})
        .to_list()
    )
    # Chunks of 60 // 8 = 7 ids: 29 of them, in 4 shards of 8, 7, 7 and 7 chunks.
    assert sorted((r["start"], r["count"]) for r in rows) == shard_plan(29, 8, 4)
    assert {r["source"] for r in rows} == {"audience"}
    sent = await ledger(client, mongo, res.inserted_id)
    per_shard = collections.Counter(r["shard"] for r in sent)
    assert sorted(per_shard.values()) == [46, 49, 49, 56]
