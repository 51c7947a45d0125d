"""The scheduling engine against a MongoDB server through the real driver: list-then-watch,
timers, the sweep, claims, misfires, bad documents and restarts."""

from __future__ import annotations

import datetime as dt
from typing import Any

import anyio
import pytest
from pymongo import AsyncMongoClient

from reactor.domain.schedule import TimerKey, TimerKind

from .conftest import MongoTarget
from .helpers import (
    campaign,
    eventually,
    has_status,
    holds,
    now,
    running,
    seed_customers,
    settings,
    status_of,
)

Client = AsyncMongoClient[dict[str, Any]]


def sample(reactor: Any, name: str, labels: dict[str, str] | None = None) -> float:
    value = reactor.metrics.registry.get_sample_value(name, labels or {})
    return float(value or 0.0)


async def test_approved_ahead_starts_on_time_and_completes_at_end(
    mongo: MongoTarget, client: Client
) -> None:
    targets = await seed_customers(client, mongo, 5)
    async with running(settings(mongo)) as (reactor,):
        res = await client[mongo.campaigns_db].campaigns.insert_one(
            campaign("ahead", 1.0, 2.5, targets)
        )
        key = TimerKey(str(res.inserted_id), TimerKind.START)
        assert reactor.scheduler is not None
        await eventually(lambda: holds(key in reactor.scheduler.timers), 3)  # type: ignore[union-attr]
        await eventually(has_status(client, mongo, res.inserted_id, "running"), 5)
        doc = await client[mongo.campaigns_db].campaigns.find_one({"_id": res.inserted_id})
        assert doc is not None
        started = doc["execution"]["startedAt"]
        assert started >= doc["startDate"]
        assert doc["execution"]["startLatenessMs"] < 1000
        assert doc["execution"]["epoch"] == 1
        await eventually(has_status(client, mongo, res.inserted_id, "completed"), 5)
        done = await client[mongo.campaigns_db].campaigns.find_one({"_id": res.inserted_id})
        assert done is not None
        assert done["execution"]["finishedAt"] >= done["endDate"]
        assert sample(reactor, "reactor_campaign_transitions_total", {"to": "running"}) == 1
        assert sample(reactor, "reactor_campaign_transitions_total", {"to": "completed"}) == 1
        assert sample(reactor, "reactor_timer_lateness_seconds_count", {"kind": "start"}) == 1


async def test_late_approval_within_grace_starts_at_once_beyond_grace_is_missed(
    mongo: MongoTarget, client: Client
) -> None:
    coll = client[mongo.campaigns_db].campaigns
    async with running(settings(mongo, misfire_grace_seconds=60)) as (reactor,):
        within = await coll.insert_one(campaign("within", -30, 30, ["1"]))
        beyond = await coll.insert_one(campaign("beyond", -120, 30, ["1"]))
        closed = await coll.insert_one(campaign("closed", -20, -10, ["1"]))
        await eventually(has_status(client, mongo, within.inserted_id, "running"))
        await eventually(has_status(client, mongo, beyond.inserted_id, "missed"))
        await eventually(has_status(client, mongo, closed.inserted_id, "missed"))
        doc = await coll.find_one({"_id": within.inserted_id})
        assert doc is not None
        # Lateness against startDate is recorded on the document...
        assert 29_000 < doc["execution"]["startLatenessMs"] < 40_000
        # ...while the metric holds only what the reactor itself added.
        assert sample(reactor, "reactor_timer_lateness_seconds_sum", {"kind": "start"}) < 1.0
        missed = await coll.find_one({"_id": beyond.inserted_id})
        assert missed is not None
        assert "misfire grace" in missed["execution"]["reason"]
        assert sample(reactor, "reactor_campaign_transitions_total", {"to": "missed"}) == 2


async def test_moving_the_start_rearms_and_unapproving_or_deleting_disarms(
    mongo: MongoTarget, client: Client
) -> None:
    coll = client[mongo.campaigns_db].campaigns
    async with running(settings(mongo)) as (reactor,):
        sched = reactor.scheduler
        assert sched is not None
        moved_later = await coll.insert_one(campaign("later", 1.0, 30, ["1"]))
        moved_earlier = await coll.insert_one(campaign("earlier", 3600, 7200, ["1"]))
        unapproved = await coll.insert_one(campaign("unapproved", 1.5, 30, ["1"]))
        deleted = await coll.insert_one(campaign("deleted", 1.5, 30, ["1"]))
        keys = {
            name: TimerKey(str(r.inserted_id), TimerKind.START)
            for name, r in [
                ("later", moved_later),
                ("earlier", moved_earlier),
                ("unapproved", unapproved),
                ("deleted", deleted),
            ]
        }
        await eventually(lambda: holds(all(k in sched.timers for k in keys.values())))
        later_at = now() + dt.timedelta(hours=1)
        earlier_at = now() + dt.timedelta(seconds=1)
        await coll.update_one(
            {"_id": moved_later.inserted_id},
            {"$set": {"startDate": later_at, "endDate": later_at + dt.timedelta(hours=1)}},
        )
        await coll.update_one(
            {"_id": moved_earlier.inserted_id}, {"$set": {"startDate": earlier_at}}
        )
        await coll.update_one(
            {"_id": unapproved.inserted_id}, {"$set": {"status": "pending_approval"}}
        )
        await coll.delete_one({"_id": deleted.inserted_id})

        def settled() -> bool:
            later = sched.timers.due_at(keys["later"])
            return (
                later is not None
                and abs((later - later_at).total_seconds()) < 0.01
                and keys["unapproved"] not in sched.timers
                and keys["deleted"] not in sched.timers
            )

        await eventually(lambda: holds(settled()))
        await eventually(has_status(client, mongo, moved_earlier.inserted_id, "running"), 5)
        await anyio.sleep(1.0)  # past the original starts of the other three
        assert await status_of(client, mongo, moved_later.inserted_id) == "approved"
        assert await status_of(client, mongo, unapproved.inserted_id) == "pending_approval"
        assert sample(reactor, "reactor_campaign_transitions_total", {"to": "running"}) == 1


async def test_three_instances_race_each_campaign_claimed_exactly_once(
    mongo: MongoTarget, client: Client
) -> None:
    coll = client[mongo.campaigns_db].campaigns
    configs = [settings(mongo, reactor_instance_id=f"r{i}", lease_seconds=30) for i in range(3)]
    async with running(*configs) as reactors:
        docs = [campaign(f"c{i}", 1.5, 60, [], channels=["email"]) for i in range(200)]
        result = await coll.insert_many(docs)
        ids = result.inserted_ids

        async def all_running() -> bool:
            return await coll.count_documents({"status": "running"}) == 200

        await eventually(all_running, 20)
        epochs = await coll.distinct("execution.epoch")
        assert epochs == [1]  # one successful claim each, never a second

        def wins() -> float:
            return sum(
                sample(r, "reactor_campaign_transitions_total", {"to": "running"}) for r in reactors
            )

        # Claims go out in bulk: a winner counts its wins once the bulk's read returns, a
        # moment after the database shows them running.
        await eventually(lambda: holds(wins() >= 200), 5)
        assert wins() == 200
        owners = {d["execution"]["owner"] async for d in coll.find({"_id": {"$in": ids}})}
        assert owners <= {"r0", "r1", "r2"}
        executions = client[mongo.campaigns_db].campaign_executions

        async def all_recorded() -> bool:
            return await executions.count_documents({}) >= 200

        await eventually(all_recorded)
        assert await executions.count_documents({}) == 200
        repairs = sum(
            sample(r, "reactor_reconcile_repairs_total", {"kind": kind})
            for r in reactors
            for kind in ("armed", "disarmed", "takeover")
        )
        assert repairs == 0  # a burst the stream delivered in full is no repair


async def test_stream_connection_closed_by_fail_point_later_changes_still_handled(
    mongo: MongoTarget, client: Client
) -> None:
    coll = client[mongo.campaigns_db].campaigns
    async with running(settings(mongo, reconcile_interval_seconds=3600)) as (reactor,):
        for _ in range(3):
            await client.admin.command(
                {
                    "configureFailPoint": "failCommand",
                    "mode": {"times": 2},
                    "data": {"failCommands": ["getMore"], "closeConnection": True},
                }
            )
            res = await coll.insert_one(campaign("after-close", 0.5, 30, []))
            await eventually(has_status(client, mongo, res.inserted_id, "running"), 10)
        # The sweep is an hour away: these were handled by the (resumed) stream.
        assert sample(reactor, "reactor_reconcile_runs_total") == 1


async def test_history_lost_sweep_repairs_nothing_missed(
    mongo: MongoTarget, client: Client
) -> None:
    emulator = mongo.require_emulator()
    coll = client[mongo.campaigns_db].campaigns
    cfg = settings(mongo, reconcile_interval_seconds=3600)
    async with running(cfg) as (reactor,):
        assert reactor.watcher is not None
        await eventually(lambda: holds(reactor.watcher.token is not None))  # type: ignore[union-attr]
        await reactor.watcher.save_token()
    # Down: a campaign is approved meanwhile and the oplog rolls over.
    res = await coll.insert_one(campaign("while-down", 1.0, 30, []))
    emulator.drop_change_stream_history()
    async with running(cfg) as (reactor,):
        await eventually(has_status(client, mongo, res.inserted_id, "running"), 5)
        assert (
            sample(reactor, "reactor_change_stream_restarts_total", {"reason": "history_lost"}) == 1
        )
        # and the stream works again from now on
        again = await coll.insert_one(campaign("after", 0.5, 30, []))
        await eventually(has_status(client, mongo, again.inserted_id, "running"), 5)


async def test_a_replica_stopped_as_soon_as_it_is_ready_saves_its_place(
    mongo: MongoTarget, client: Client
) -> None:
    """The token is known when the stream opens, not only after its first getMore returns
    (up to a second later): a shutdown right after readiness persists it."""
    state = client[mongo.campaigns_db].reactor_state
    cfg = settings(mongo, reconcile_interval_seconds=3600, reactor_instance_id="brief")
    async with running(cfg) as (reactor,):
        assert reactor.watcher is not None
        assert reactor.watcher.token is not None
    saved = await state.find_one({"_id": "resume_token:brief"})
    assert saved is not None
    assert saved["token"]["_data"]


async def test_sweep_repairs_what_the_stream_missed(mongo: MongoTarget, client: Client) -> None:
    coll = client[mongo.campaigns_db].campaigns
    async with running(settings(mongo, reconcile_interval_seconds=0.5)) as (reactor,):
        sched = reactor.scheduler
        assert sched is not None
        res = await coll.insert_one(campaign("missed-by-stream", 3600, 7200, []))
        key = TimerKey(str(res.inserted_id), TimerKind.START)
        await eventually(lambda: holds(key in sched.timers))
        sched.timers.disarm(key)  # as if the stream had dropped the event
        await eventually(lambda: holds(key in sched.timers), 5)
        assert sample(reactor, "reactor_reconcile_repairs_total", {"kind": "armed"}) >= 1


async def test_restart_resumes_from_the_persisted_token(mongo: MongoTarget, client: Client) -> None:
    coll = client[mongo.campaigns_db].campaigns
    state = client[mongo.campaigns_db].reactor_state
    cfg = settings(mongo, reconcile_interval_seconds=3600, reactor_instance_id="stable")
    async with running(cfg) as (reactor,):
        res = await coll.insert_one(campaign("first", 3600, 7200, []))
        assert reactor.scheduler is not None
        key = TimerKey(str(res.inserted_id), TimerKind.START)
        await eventually(lambda: holds(key in reactor.scheduler.timers))  # type: ignore[union-attr]
    saved = await state.find_one({"_id": "resume_token:stable"})
    assert saved is not None
    assert saved["token"]["_data"]
    # While it is down, a change arrives; the restarted instance resumes from the token.
    await coll.update_one(
        {"_id": res.inserted_id}, {"$set": {"startDate": now() + dt.timedelta(seconds=1)}}
    )
    async with running(cfg) as (reactor,):
        await eventually(has_status(client, mongo, res.inserted_id, "running"), 5)
        assert (
            sample(reactor, "reactor_change_stream_restarts_total", {"reason": "history_lost"}) == 0
        )


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        ({"startDate": "tomorrow"}, "bad_startDate"),
        ({"endDate": None}, "bad_endDate"),
        ({"status": "approved", "channels": ["pigeon"]}, "bad_channels"),
        ({"email": {"text": "no subject"}, "channels": ["email"]}, "bad_content"),
        ({"status": "aproved"}, "bad_status"),
    ],
)
async def test_bad_documents_are_reported_once_and_others_carry_on(
    mongo: MongoTarget, client: Client, bad: dict[str, Any], reason: str
) -> None:
    coll = client[mongo.campaigns_db].campaigns
    async with running(settings(mongo, reconcile_interval_seconds=0.3)) as (reactor,):
        broken = campaign("broken", 0.5, 30, [])
        broken.update(bad)
        broken_id = (await coll.insert_one(broken)).inserted_id
        good = await coll.insert_one(campaign("good", 0.5, 30, []))
        await eventually(has_status(client, mongo, good.inserted_id, "running"))

        async def error_recorded() -> bool:
            doc = await coll.find_one({"_id": broken_id})
            return bool(doc and doc.get("execution", {}).get("lastError"))

        await eventually(error_recorded)
        await anyio.sleep(1.0)  # several sweeps see the same bad document
        doc = await coll.find_one({"_id": broken_id})
        assert doc is not None
        assert doc["execution"]["lastError"]["reason"] == reason
        assert doc.get("status") == bad.get("status", "approved")
        assert sample(reactor, "reactor_campaign_errors_total", {"reason": reason}) == 1


async def test_disabled_schedulers_fire_nothing(mongo: MongoTarget, client: Client) -> None:
    coll = client[mongo.campaigns_db].campaigns
    async with running(settings(mongo, enable_schedulers=False)) as (reactor,):
        res = await coll.insert_one(campaign("ignored", 0.2, 30, []))
        await anyio.sleep(1.0)
        assert await status_of(client, mongo, res.inserted_id) == "approved"
        sample = reactor.metrics.registry.get_sample_value
        assert sample("reactor_schedulers_enabled") == 0
        assert sample("reactor_reconcile_runs_total") == 0
        assert sample("reactor_change_stream_up") == 0
    # The campaign was startable all along: an instance with schedulers enabled starts it.
    async with running(settings(mongo, reactor_instance_id="enabled")):
        await eventually(has_status(client, mongo, res.inserted_id, "running", "completed"), 10)


async def test_readiness_endpoint_reports_components(mongo: MongoTarget) -> None:
    import aiohttp

    async with running(settings(mongo)) as (reactor,):
        assert reactor.http is not None
        async with aiohttp.ClientSession() as session:
            base = f"http://127.0.0.1:{reactor.http.port}"
            async with session.get(f"{base}/readyz") as resp:
                body = await resp.json()
                assert resp.status == 200
                assert body["checks"] == {
                    "mongodb": True,
                    "suppressions": True,
                    "change_stream": True,
                    "first_sweep": True,
                }
            async with session.get(f"{base}/healthz") as resp:
                assert resp.status == 200
            async with session.get(f"{base}/metrics") as resp:
                text = await resp.text()
                assert "reactor_change_stream_up 1.0" in text
