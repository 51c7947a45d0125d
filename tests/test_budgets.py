"""Cluster-wide rate budgets: the bucket's arithmetic in the database (refill by `$$NOW`, never
more than it held, a pause every replica sees), a replica's leasing (no database round trip per
message, Retry-After pauses everyone), and three reactors sharing one rate: together they never
exceed it."""

from __future__ import annotations

import asyncio
import collections
from typing import Any

import anyio
from pymongo import AsyncMongoClient

from reactor.adapters.clock import SystemClock
from reactor.adapters.mongo import MongoBudgets
from reactor.embedded.smtp_sink import SmtpSink
from reactor.limits.budgets import SharedBudget

from .conftest import MongoTarget
from .helpers import campaign, eventually, ledger, running, seed_customers, settings

Client = AsyncMongoClient[dict[str, Any]]


async def test_leases_never_take_more_than_the_bucket_held(
    client: Client, mongo: MongoTarget
) -> None:
    budgets = MongoBudgets(client[mongo.campaigns_db])
    # Twenty leases at once against a full bucket of 20: exactly 20 granted in all.
    grants = await asyncio.gather(
        *(budgets.lease("k", rate=1.0, burst=20, want=3) for _ in range(20))
    )
    assert sum(g for g, _ in grants) == 20
    assert all(paused == 0 for _, paused in grants)
    # Refilled by the database's clock at `rate`: about one more token after a second.
    await anyio.sleep(1.1)
    granted, _ = await budgets.lease("k", rate=1.0, burst=20, want=5)
    assert granted == 1


async def test_a_pause_holds_every_leaser_back(client: Client, mongo: MongoTarget) -> None:
    budgets = MongoBudgets(client[mongo.campaigns_db])
    await budgets.pause("sms", 0.6)
    granted, paused_s = await budgets.lease("sms", rate=100, burst=40, want=10)
    assert granted == 0
    assert 0.3 < paused_s <= 0.6
    await anyio.sleep(0.7)
    granted, paused_s = await budgets.lease("sms", rate=100, burst=40, want=10)
    assert granted == 10
    assert paused_s == 0


class CountingStore:
    """MongoBudgets with its round trips counted."""

    def __init__(self, inner: MongoBudgets) -> None:
        self.inner = inner
        self.leases = 0

    async def lease(self, key: str, *, rate: float, burst: float, want: int) -> tuple[int, float]:
        self.leases += 1
        return await self.inner.lease(key, rate=rate, burst=burst, want=want)

    async def pause(self, key: str, seconds: float) -> None:
        await self.inner.pause(key, seconds)


async def test_a_replica_leases_slices_not_a_round_trip_per_message(
    client: Client, mongo: MongoTarget
) -> None:
    store = CountingStore(MongoBudgets(client[mongo.campaigns_db]))
    budget = SharedBudget(store, "channel:email", 200.0, SystemClock())
    t0 = anyio.current_time()
    for _ in range(120):
        await budget.acquire()
    elapsed = anyio.current_time() - t0
    # 120 tokens at 200/s, starting from a bucket of 40: at least 0.4 s, in a few dozen leases.
    assert elapsed >= 0.35
    assert store.leases < 40
    # Retry-After: this replica stops at once and the bucket is paused for the others.
    budget.pause(0.5)
    assert budget.take(5) == 0
    await anyio.sleep(0.05)
    other = SharedBudget(store, "channel:email", 200.0, SystemClock())
    assert other.take(5) == 0
    await anyio.sleep(0.1)
    assert other.take(5) == 0  # its lease learned of the pause
    assert other.wait_s() > 0.1


async def test_three_replicas_together_never_exceed_the_shared_rate(
    mongo: MongoTarget, client: Client, sink: SmtpSink
) -> None:
    ids = await seed_customers(client, mongo, 300)
    # Small shards, one at a time per replica: each campaign is sent by several replicas, so
    # the rate the sink sees is the sum of more than one replica's sends.
    shared: dict[str, Any] = {"email_rate_per_second": 40, "shard_size": 20, "shard_concurrency": 1}
    configs = [settings(mongo, sink, reactor_instance_id=f"r{i}", **shared) for i in range(3)]
    coll = client[mongo.campaigns_db].campaigns
    async with running(*configs):
        # Three campaigns at once (claims spread them over the replicas as they come).
        results = [
            await coll.insert_one(
                campaign(f"c{i}", 0.5, 60, ids[i * 100 : (i + 1) * 100], channels=["email"])
            )
            for i in range(3)
        ]
        await eventually(lambda: _sent_at_least(sink, 120), 20)
        arrivals = sorted(m.received_at for m in sink.messages)
    # Any window of 2 s holds at most 2 s of the rate plus three slices (the bucket's one, and
    # tokens leased up to two slices' time before the window); per instance it would be 3x.
    slack = 3 * 8
    for i, start in enumerate(arrivals):
        in_window = sum(1 for t in arrivals[i:] if t < start + 2.0)
        assert in_window <= 40 * 2 + slack, (in_window, i)
    # Who sent each `sent` row: its shard's owner (the ledger row names its shard).
    db = client[mongo.campaigns_db]
    sent_from: collections.Counter[str] = collections.Counter()
    for res in results:
        key = str(res.inserted_id)
        owner_of = {
            int(s["index"]): s["owner"] async for s in db.campaign_shards.find({"campaign": key})
        }
        doc = await coll.find_one({"_id": res.inserted_id})
        assert doc is not None
        async for row in db.deliveries.find({"campaign": key, "state": "sent"}):
            shard = row.get("shard")  # none: the campaign's owner sent it unsharded
            sent_from[doc["execution"]["owner"] if shard is None else owner_of[int(shard)]] += 1
    assert sum(sent_from.values()) >= 120
    assert len(sent_from) > 1, sent_from
    rows = [r for res in results for r in await ledger(client, mongo, res.inserted_id)]
    assert len({(r["campaign"], r["customer"]) for r in rows}) == len(rows)


async def _sent_at_least(sink: SmtpSink, n: int) -> bool:
    return len(sink.messages) >= n
