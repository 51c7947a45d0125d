"""A localTime campaign sent by several replicas: its plan written once as per-instant shards
(bounded slices of ids in `campaign_shard_plans` / `campaign_shards`), each instant's shards
claimed from just before it by whichever replica has room, under the one ledger. Two replicas
both send, nobody gets two messages, nothing leaves before its instant; a replica killed
mid-instant leaves its shards to the other, which finishes with no duplicate; and what a run
holds per armed instant is a small timer, never an id list."""

from __future__ import annotations

import collections
import dataclasses
import datetime as dt
import itertools
import subprocess
import tracemalloc
import zoneinfo
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from reactor.domain.zones import parse_local_time
from reactor.embedded.smtp_sink import SmtpSink
from reactor.execution.localtime import InstantTimer, persist_plan, timers_from_plan
from reactor.ports import Recipient

from .conftest import MongoTarget
from .fakes import MemoryRecipients
from .helpers import Client, eventually, holds, ledger, running, settings

PER_ZONE = 20
ZONES = 3
SPACING_S = 2
_names = itertools.count()


@pytest.fixture(autouse=True)
def _restore_tzpath() -> Iterator[None]:
    """`zones` puts its compiled zones first on zoneinfo's path: taken off again after."""
    before = zoneinfo.TZPATH
    yield
    zoneinfo.reset_tzpath(to=list(before))


def zones(
    tmp: Path, first_due_in_s: float, spacing_s: float = SPACING_S
) -> tuple[list[str], list[dt.datetime], str]:
    """ZONES synthetic zones (zic) in which `at` falls SPACING_S apart from `first_due_in_s`
    on: their names, their instants, and `at`."""
    now = dt.datetime.now(dt.UTC)
    at = (now + dt.timedelta(minutes=2)).replace(second=0, microsecond=0)
    prefix = f"Lt{next(_names)}"
    names, dues, lines = [], [], []
    for k in range(ZONES):
        target = now + dt.timedelta(seconds=first_due_in_s + k * spacing_s)
        offset_s = round((at - target).total_seconds())
        sign, value = ("-", -offset_s) if offset_s < 0 else ("", offset_s)
        hours, rest = divmod(value, 3600)
        minutes, seconds = divmod(rest, 60)
        name = f"{prefix}/Z{k}"
        lines.append(f"Zone {name} {sign}{hours}:{minutes:02d}:{seconds:02d} - L{k}\n")
        names.append(name)
        dues.append(at - dt.timedelta(seconds=offset_s))
    (tmp / "lt.zi").write_text("".join(lines))
    subprocess.run(["zic", "-d", str(tmp), str(tmp / "lt.zi")], check=True, capture_output=True)
    zoneinfo.reset_tzpath(to=[str(tmp), *zoneinfo.TZPATH])
    return names, dues, f"{at:%H:%M}"


async def seed(client: Client, mongo: MongoTarget, names: list[str]) -> list[str]:
    rows = [
        {
            "customer_id": i,
            "email": f"c{i}@example.com",
            "name": f"Cust {i}",
            "timezone": names[i % len(names)],
        }
        for i in range(PER_ZONE * len(names))
    ]
    await client[mongo.segmentation_db]["newdatabase"].insert_many(rows)
    return [str(r["customer_id"]) for r in rows]


def local_campaign(ids: list[str], at: str, dues: list[dt.datetime]) -> dict[str, Any]:
    now = dt.datetime.now(dt.UTC)
    return {
        "name": "local",
        "status": "approved",
        "channels": ["email"],
        "startDate": now + dt.timedelta(seconds=0.5),
        "endDate": max(dues) + dt.timedelta(seconds=120),
        "email": {"subject": "Hi {{name}}", "text": "Hello {{name}}"},
        "targetedCustomerIds": ids,
        "localTime": {"at": at, "spreadMinutes": 5, "fallbackZone": "UTC"},
    }


def due_of(address: str, dues: list[dt.datetime]) -> dt.datetime:
    return dues[int(address.removeprefix("c").split("@")[0]) % len(dues)]


async def _done(client: Client, mongo: MongoTarget, campaign_id: Any) -> bool:
    doc = await client[mongo.campaigns_db].campaigns.find_one({"_id": campaign_id})
    return bool(doc and (doc.get("execution") or {}).get("sendsDone"))


async def _shards(client: Client, mongo: MongoTarget, campaign_id: Any) -> list[dict[str, Any]]:
    cursor = client[mongo.campaigns_db].campaign_shards.find({"campaign": str(campaign_id)})
    return await cursor.sort("index").to_list()


async def test_instants_are_sharded_over_two_replicas_and_each_recipient_gets_one(
    mongo: MongoTarget, client: Client, tmp_path: Path
) -> None:
    names, dues, at = zones(tmp_path, 5)
    ids = await seed(client, mongo, names)
    coll = client[mongo.campaigns_db].campaigns
    async with SmtpSink(reply_delay_s=0.01) as sink:
        replicas = [
            settings(mongo, sink, reactor_instance_id=f"r{i}", shard_size=5) for i in range(2)
        ]
        async with running(*replicas):
            res = await coll.insert_one(local_campaign(ids, at, dues))
            await eventually(lambda: _done(client, mongo, res.inserted_id), 60)
        arrivals = [(m.to, m.received_at) for m in sink.messages]
    counts = collections.Counter(to for to, _ in arrivals)
    assert set(counts) == {f"c{i}@example.com" for i in ids}  # the union is the audience
    assert set(counts.values()) == {1}  # nobody twice
    shards = await _shards(client, mongo, res.inserted_id)
    assert len(shards) == ZONES * PER_ZONE // 5
    assert all(s["source"] == "local" and s["state"] == "done" for s in shards)
    assert all(len(s["ids"]) <= 5 for s in shards)
    by_due: dict[dt.datetime, set[Any]] = collections.defaultdict(set)
    for s in shards:
        due = s["due"].replace(tzinfo=dt.UTC)
        by_due[due] |= set(s["ids"])
        assert {due_of(f"c{i}@example.com", dues) for i in s["ids"]} == {due}
    assert sorted(by_due) == dues  # one instant per zone
    assert len({s["owner"] for s in shards}) == 2  # both replicas sent
    rows = await ledger(client, mongo, res.inserted_id)
    assert len(rows) == len(ids)
    assert {r["state"] for r in rows} == {"sent"}
    for row in rows:
        due = due_of(f"c{row['customer']}@example.com", dues)
        assert row["createdAt"].replace(tzinfo=dt.UTC) >= due  # never marked early
    plan = await client[mongo.campaigns_db].campaign_shard_plans.find_one(
        {"_id": str(res.inserted_id)}
    )
    assert plan is not None
    assert [(r["shards"], r["recipients"]) for r in plan["instants"]] == [(4, 20)] * ZONES


async def test_a_replica_killed_mid_instant_leaves_it_to_the_other_with_no_duplicate(
    mongo: MongoTarget, client: Client, tmp_path: Path
) -> None:
    names, dues, at = zones(tmp_path, 4)
    ids = await seed(client, mongo, names)
    coll = client[mongo.campaigns_db].campaigns
    slow: dict[str, Any] = {
        "shard_size": 10,
        "shard_concurrency": 1,
        "email_rate_per_second": 15,
        "lease_seconds": 1.5,
    }
    async with SmtpSink() as sink:
        cfg_b = settings(
            mongo, sink, reactor_instance_id="b", reconcile_interval_seconds=0.5, **slow
        )
        cfg_a = settings(mongo, sink, reactor_instance_id="a", **slow)
        from reactor.app import Reactor

        async with running(cfg_b):
            async with anyio.create_task_group() as tg:
                victim = Reactor(cfg_a)
                await tg.start(victim.run)
                await victim.ready.wait()
                res = await coll.insert_one(local_campaign(ids, at, dues))

                async def a_is_sending() -> bool:
                    shards = await _shards(client, mongo, res.inserted_id)
                    mine = [s for s in shards if s["owner"] == "a" and s["state"] == "claimed"]
                    return bool(mine) and len(sink.messages) >= 5

                await eventually(a_is_sending, 30)
                tg.cancel_scope.cancel()  # killed mid-instant: no drain, no release
            await eventually(lambda: _done(client, mongo, res.inserted_id), 90)
        counts = collections.Counter(m.to for m in sink.messages)
    assert max(counts.values()) == 1  # no duplicate
    rows = await ledger(client, mongo, res.inserted_id)
    assert len(rows) == len(ids)  # every recipient accounted for
    states = collections.Counter(r["state"] for r in rows)
    assert states["pending"] == 0
    assert set(states) <= {"sent", "uncertain"}
    sent = {f"c{r['customer']}@example.com" for r in rows if r["state"] == "sent"}
    assert sent <= set(counts)
    shards = await _shards(client, mongo, res.inserted_id)
    assert all(s["state"] == "done" for s in shards)
    assert any(s["owner"] == "b" and s["epoch"] >= 2 for s in shards)  # taken over


async def test_a_pause_between_instants_holds_their_shards_and_a_resume_sends_each_once(
    mongo: MongoTarget, client: Client, tmp_path: Path
) -> None:
    names, dues, at = zones(tmp_path, 4, spacing_s=8)
    ids = await seed(client, mongo, names)
    coll = client[mongo.campaigns_db].campaigns
    async with SmtpSink() as sink:
        async with running(settings(mongo, sink, reactor_instance_id="p", shard_size=5)):
            res = await coll.insert_one(local_campaign(ids, at, dues))
            await eventually(lambda: holds(len(sink.messages) >= PER_ZONE), 30)
            await coll.update_one({"_id": res.inserted_id}, {"$set": {"status": "paused"}})

            async def idle() -> bool:
                shards = await _shards(client, mongo, res.inserted_id)
                return all(s["state"] in ("held", "done") for s in shards)

            await eventually(idle, 5, interval_s=0.1)
            held = [
                s for s in await _shards(client, mongo, res.inserted_id) if s["state"] == "held"
            ]
            assert len(held) == 2 * PER_ZONE // 5  # the two later instants' shards
            await coll.update_one({"_id": res.inserted_id}, {"$set": {"status": "running"}})
            await eventually(lambda: _done(client, mongo, res.inserted_id), 60)
        counts = collections.Counter(m.to for m in sink.messages)
    assert set(counts) == {f"c{i}@example.com" for i in ids}
    assert set(counts.values()) == {1}
    for row in await ledger(client, mongo, res.inserted_id):
        assert row["state"] == "sent"
        due = due_of(f"c{row['customer']}@example.com", dues)
        assert row["createdAt"].replace(tzinfo=dt.UTC) >= due  # never marked early


async def test_the_plan_is_written_in_bounded_slices_and_a_timer_holds_no_ids() -> None:
    people = [
        Recipient(str(i), f"N{i}", f"c{i}@x.example", None, timezone=z)
        for i, z in enumerate(["UTC", "Asia/Tokyo", "America/New_York"] * 40)
    ]
    local = parse_local_time({"at": "23:30", "spreadMinutes": 30, "fallbackZone": "UTC"})
    assert local is not None
    start = dt.datetime(2026, 6, 1, 12, tzinfo=dt.UTC)
    written: list[tuple[dt.datetime, int, list[str]]] = []
    skipped: list[str] = []

    async def write_shard(due: dt.datetime, part: int, ids: list[str]) -> None:
        written.append((due, part, list(ids)))

    async def outside(ids: list[str]) -> None:
        skipped.extend(ids)

    instants = await persist_plan(
        MemoryRecipients(people),
        [p.customer_id for p in people],
        local,
        (start, start + dt.timedelta(hours=12)),  # New York's 23:30 (03:30Z+1) is after it
        batch_size=7,
        shard_size=15,
        write_shard=write_shard,
        outside=outside,
    )
    assert all(len(ids) <= 15 for _, _, ids in written)
    assert sorted(skipped) == sorted(p.customer_id for p in people[2::3])
    planned = [c for _, _, ids in written for c in ids]
    assert sorted(planned) == sorted(p.customer_id for p in people if p not in people[2::3])
    assert [(r["shards"], r["recipients"]) for r in instants] == [(3, 40), (3, 40)]
    timers = timers_from_plan("c1", instants)
    for timer in timers:
        for f in dataclasses.fields(timer):
            assert not isinstance(getattr(timer, f.name), list | tuple | set | dict), f.name
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    held = timers_from_plan("c1", instants * 20)
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    grown = sum(s.size_diff for s in after.compare_to(before, "filename"))
    assert len(held) == 40
    assert grown / len(held) <= 2048
    assert isinstance(held[0], InstantTimer)
