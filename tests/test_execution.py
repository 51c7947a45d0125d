"""Execution end to end: recipients, the ledger, both channels with their faults, takeover,
pause/resume, the end of the window, and malformed content. Every test counts what the sinks
received against what the ledger says."""

from __future__ import annotations

import collections
import datetime as dt
import time
from typing import Any

import aiosmtplib
import anyio
from pymongo import AsyncMongoClient

from reactor.embedded.smtp_sink import SmtpSink
from reactor.embedded.twilio_fake import TwilioFake

from .conftest import MongoTarget
from .helpers import (
    campaign,
    eventually,
    has_status,
    holds,
    ledger,
    now,
    running,
    seed_customers,
    settings,
)

Client = AsyncMongoClient[dict[str, Any]]


def sends_done(client: Client, mongo: MongoTarget, campaign_id: Any) -> Any:
    async def check() -> bool:
        doc = await client[mongo.campaigns_db].campaigns.find_one({"_id": campaign_id})
        return bool(doc and doc.get("execution", {}).get("sendsDone"))

    return check


def assert_no_duplicates(sink: SmtpSink, twilio: TwilioFake) -> None:
    emails = collections.Counter(sink.recipients())
    sms = collections.Counter(m.to for m in twilio.messages)
    assert [a for a, n in emails.items() if n > 1] == []
    assert [a for a, n in sms.items() if n > 1] == []


async def test_every_customer_gets_each_channel_once_and_is_accounted_for(
    mongo: MongoTarget, client: Client, sink: SmtpSink, twilio: TwilioFake
) -> None:
    ids = await seed_customers(client, mongo, 40, numeric_ids=True, bad_every=10)
    # Ids as strings against numeric order rows, a duplicate, and two unknown customers.
    targets = [*ids, "3", "9999", "abc"]
    coll = client[mongo.campaigns_db].campaigns
    async with running(settings(mongo, sink, twilio)):
        res = await coll.insert_one(campaign("full", 0.5, 30, targets))
        await eventually(sends_done(client, mongo, res.inserted_id), 15)
    rows = await ledger(client, mongo, res.inserted_id)
    by_state = collections.Counter((r["channel"], r["state"], r.get("reason")) for r in rows)
    # 40 distinct known customers (4 with invalid contacts) + 2 unknown, per channel.
    assert by_state[("email", "sent", None)] == 36
    assert by_state[("email", "skipped", "invalid_email")] == 4
    assert by_state[("email", "skipped", "not_found")] == 2
    assert by_state[("sms", "skipped", "invalid_phone")] >= 4
    assert by_state[("sms", "skipped", "not_found")] == 2
    assert len(rows) == 2 * 42
    assert len(sink.messages) == 36
    sms_sent = by_state[("sms", "sent", None)]
    assert len(twilio.messages) == sms_sent
    assert_no_duplicates(sink, twilio)
    first = next(m for m in sink.messages if m.to == "c1@example.com")
    assert first.subject == "Hi Cust 1"
    assert first.text is not None
    assert "Hello Cust 1" in first.text
    assert first.html is not None
    assert "<b>Cust 1</b>" in first.html
    assert first.message_id.startswith("<")
    doc = await coll.find_one({"_id": res.inserted_id})
    assert doc is not None
    perf = doc["performance"]
    assert (perf["emailsSent"], perf["emailsSkipped"], perf["emailsFailed"]) == (36, 6, 0)
    assert perf["smsSent"] == sms_sent
    sent_rows = [r for r in rows if r["state"] == "sent"]
    assert all(r.get("providerId") for r in sent_rows)
    assert all(r["providerId"].startswith("SM") for r in sent_rows if r["channel"] == "sms")


async def test_smtp_down_mid_run_then_back_retries_without_duplicates(
    mongo: MongoTarget, client: Client, sink: SmtpSink
) -> None:
    ids = await seed_customers(client, mongo, 60)
    cfg = settings(
        mongo,
        sink,
        email_rate_per_second=40,
        send_max_attempts=30,
        retry_base_seconds=0.1,
        retry_max_seconds=0.3,
        send_concurrency=4,
    )
    coll = client[mongo.campaigns_db].campaigns
    async with running(cfg) as (reactor,):
        res = await coll.insert_one(campaign("smtp-outage", 0.2, 60, ids, channels=["email"]))
        await eventually(lambda: holds(len(sink.messages) >= 10))
        await sink.go_down()
        await anyio.sleep(1.5)
        await sink.come_back()
        await eventually(sends_done(client, mongo, res.inserted_id), 20)
        sample = reactor.metrics.registry.get_sample_value
        retries = sample("reactor_send_retries_total", {"channel": "email"})
        pauses = sample("reactor_channel_pauses_total", {"channel": "email", "kind": "connect"})
    rows = await ledger(client, mongo, res.inserted_id)
    states = collections.Counter(r["state"] for r in rows)
    sent = states["sent"]
    uncertain = states["uncertain"]
    assert sent + uncertain == 60
    assert uncertain <= 4  # at most the concurrency bound: messages in DATA when it went down
    assert len(set(sink.recipients())) == len(sink.recipients())
    assert len(sink.messages) >= sent
    # The first refused connections were retried; then the channel paused (its sends handed
    # back unmarked, re-marked fresh once the server answered) instead of failing anyone.
    assert retries is not None
    assert retries > 0
    assert pauses is not None
    assert pauses >= 1
    assert states["failed"] == 0


async def test_permanent_smtp_error_fails_at_once(
    mongo: MongoTarget, client: Client, sink: SmtpSink
) -> None:
    ids = await seed_customers(client, mongo, 5)
    sink.fail_next(2, "550 5.1.1 mailbox unavailable")
    coll = client[mongo.campaigns_db].campaigns
    async with running(settings(mongo, sink, send_concurrency=1)) as (reactor,):
        res = await coll.insert_one(campaign("perm", 0.2, 30, ids, channels=["email"]))
        await eventually(sends_done(client, mongo, res.inserted_id))
        failed_samples = reactor.metrics.registry.get_sample_value(
            "reactor_sends_total", {"channel": "email", "outcome": "failed"}
        )
        retries = reactor.metrics.registry.get_sample_value(
            "reactor_send_retries_total", {"channel": "email"}
        )
    rows = await ledger(client, mongo, res.inserted_id)
    failed = [r for r in rows if r["state"] == "failed"]
    assert len(failed) == 2
    assert all(r["attempts"] == 1 for r in failed)
    assert all("550" in r["error"] for r in failed)
    assert len(sink.messages) == 3
    assert failed_samples == 2
    assert retries == 0


async def test_twilio_429_slows_the_channel_and_5xx_is_uncertain_never_retried(
    mongo: MongoTarget, client: Client, twilio: TwilioFake
) -> None:
    """429 with Retry-After: the channel pauses and the message is retried. 500: Twilio may
    have accepted the message before its gateway failed, so it is `uncertain`, not retried (a
    retry could text the customer twice)."""
    ids = await seed_customers(client, mongo, 8)
    twilio.fail_next(2, 429, retry_after_s=1)
    twilio.fail_next(2, 500)
    coll = client[mongo.campaigns_db].campaigns
    async with running(settings(mongo, twilio=twilio, send_concurrency=1)) as (reactor,):
        t0 = anyio.current_time()
        res = await coll.insert_one(campaign("sms-limits", 0.2, 30, ids, channels=["sms"]))
        await eventually(sends_done(client, mongo, res.inserted_id), 20)
        elapsed = anyio.current_time() - t0
        retries = reactor.metrics.registry.get_sample_value(
            "reactor_send_retries_total", {"channel": "sms"}
        )
    rows = await ledger(client, mongo, res.inserted_id)
    states = collections.Counter(r["state"] for r in rows)
    assert states["sent"] == len(twilio.messages)
    uncertain = [r for r in rows if r["state"] == "uncertain"]
    assert len(uncertain) == 2
    assert all(r["error"].startswith("Twilio 500") for r in uncertain)
    # One message met both 429s before its 500 (attempts 3); the next one's 500 came first.
    assert sorted(r["attempts"] for r in uncertain) == [1, 3]
    assert len(twilio.messages) >= 4  # valid numbers among the 8, less the two uncertain
    assert retries == 2  # the 429s only
    assert elapsed >= 2.0  # two Retry-After: 1 pauses, honoured
    assert twilio.requests == len(twilio.messages) + 2 + 2 + _refused_by_twilio(rows)


async def test_pause_during_a_long_retry_after_stops_at_once_and_sends_nothing_late(
    mongo: MongoTarget, client: Client, twilio: TwilioFake
) -> None:
    """A 429 asking for 30 s holds the channel; pausing the campaign meanwhile must end the run
    within about a second (not after the 30 s), and the message waiting to be retried must not
    go out after the pause: its row is left for the resumed run."""
    ids = await seed_customers(client, mongo, 6)
    twilio.fail_next(1, 429, retry_after_s=30)
    coll = client[mongo.campaigns_db].campaigns
    async with running(settings(mongo, twilio=twilio, send_concurrency=2)) as (reactor,):
        res = await coll.insert_one(campaign("held", 0.2, 60, ids, channels=["sms"]))
        key = str(res.inserted_id)
        executor = reactor.executor
        assert executor is not None
        await eventually(lambda: holds(twilio.requests >= 1 and executor.active(key)))
        await anyio.sleep(0.3)  # the 429'd message is now waiting out the Retry-After
        sent_at_pause = len(twilio.messages)
        await coll.update_one({"_id": res.inserted_id}, {"$set": {"status": "paused"}})
        t0 = anyio.current_time()
        await eventually(lambda: holds(not executor.active(key)), 5)
        assert anyio.current_time() - t0 < 3.0
        await anyio.sleep(0.5)
        assert len(twilio.messages) == sent_at_pause
    rows = await ledger(client, mongo, res.inserted_id)
    assert [r for r in rows if r["state"] == "pending"] == []
    assert sum(1 for r in rows if r["state"] == "sent") == sent_at_pause


def _refused_by_twilio(rows: list[dict[str, Any]]) -> int:
    """Rows Twilio refused for good (one request each, never retried)."""
    return sum(1 for r in rows if r["state"] == "failed" and r["error"].startswith("Twilio 4"))


async def test_unconfigured_channel_is_skipped_not_dropped(
    mongo: MongoTarget, client: Client, sink: SmtpSink
) -> None:
    ids = await seed_customers(client, mongo, 5)
    coll = client[mongo.campaigns_db].campaigns
    async with running(settings(mongo, sink)):  # no Twilio settings
        res = await coll.insert_one(campaign("no-sms", 0.2, 30, ids))
        await eventually(sends_done(client, mongo, res.inserted_id))
    rows = await ledger(client, mongo, res.inserted_id)
    sms = [r for r in rows if r["channel"] == "sms"]
    assert len(sms) == 5
    assert {r["reason"] for r in sms} == {"channel_not_configured"}
    assert len(sink.messages) == 5


async def test_owner_killed_mid_run_another_takes_over_with_zero_duplicates(
    mongo: MongoTarget, client: Client, sink: SmtpSink, twilio: TwilioFake
) -> None:
    ids = await seed_customers(client, mongo, 80)
    coll = client[mongo.campaigns_db].campaigns
    slow = {
        "email_rate_per_second": 40,
        "sms_rate_per_second": 40,
        "send_concurrency": 4,
        "lease_seconds": 1.5,
    }
    cfg_a = settings(mongo, sink, twilio, reactor_instance_id="owner", **slow)
    cfg_b = settings(
        mongo, sink, twilio, reactor_instance_id="standby", reconcile_interval_seconds=0.5, **slow
    )
    from reactor.app import Reactor

    async with anyio.create_task_group() as tg:
        owner = Reactor(cfg_a)
        await tg.start(owner.run)
        await owner.ready.wait()
        res = await coll.insert_one(campaign("takeover", 0.3, 60, ids))
        await eventually(lambda: holds(len(sink.messages) >= 15))
        tg.cancel_scope.cancel()  # killed: no drain, no lease release
    # The standby comes up after the owner died: it must find the expired lease and resume.
    async with running(cfg_b) as (standby,):
        await eventually(sends_done(client, mongo, res.inserted_id), 30)
        takeovers = standby.metrics.registry.get_sample_value("reactor_lease_takeovers_total")
    rows = await ledger(client, mongo, res.inserted_id)
    assert len(rows) == 160  # every (customer, channel) accounted for
    states = collections.Counter(r["state"] for r in rows)
    assert states["pending"] == 0
    assert states["uncertain"] <= 2 * 4  # in flight on each channel when killed
    assert_no_duplicates(sink, twilio)
    assert len(sink.messages) >= states["sent"] - len(twilio.messages)
    doc = await coll.find_one({"_id": res.inserted_id})
    assert doc is not None
    assert doc["execution"]["owner"] == "standby"
    assert doc["execution"]["epoch"] >= 2
    assert takeovers is not None
    assert takeovers >= 1


async def test_a_late_pending_mark_from_the_old_owner_is_uncertain_never_resent(
    mongo: MongoTarget, client: Client, sink: SmtpSink
) -> None:
    """A fenced-off owner that has not noticed yet can still mark a row `pending` (epoch 1)
    after the new owner settled the old epoch's leftovers: that customer may have been sent to,
    so the new owner records `uncertain` instead of sending again."""
    ids = await seed_customers(client, mongo, 40)
    coll = client[mongo.campaigns_db].campaigns
    doc = campaign("zombie", -1, 60, ids, channels=["email"], status="running")
    doc["execution"] = {"epoch": 1, "owner": "ghost", "leaseUntil": now() - dt.timedelta(seconds=5)}
    res = await coll.insert_one(doc)
    key = str(res.inserted_id)
    cfg = settings(mongo, sink, email_rate_per_second=20, recipient_batch_size=5)
    async with running(cfg):
        await eventually(lambda: holds(len(sink.messages) >= 5))
        # The last batch is prepared long after this: the ghost marks customer 39 pending.
        await client[mongo.campaigns_db].deliveries.insert_one(
            {
                "_id": f"{key}:email:39",
                "campaign": key,
                "channel": "email",
                "customer": "39",
                "state": "pending",
                "epoch": 1,
                "to": "c39@example.com",
            }
        )
        await eventually(sends_done(client, mongo, res.inserted_id), 15)
    assert "c39@example.com" not in sink.recipients()
    assert sorted(sink.recipients()) == sorted(f"c{i}@example.com" for i in range(39))
    rows = {r["customer"]: r for r in await ledger(client, mongo, res.inserted_id)}
    assert len(rows) == 40
    # Marked by the old epoch, settled by the new one: the row says both.
    row = rows["39"]
    assert (row["state"], row["reason"], row["epoch"], row["settledBy"]) == (
        "uncertain",
        "previous_owner_lost",
        1,
        2,
    )
    final = await coll.find_one({"_id": res.inserted_id})
    assert final is not None
    assert final["performance"]["uncertain"] == 1


async def test_pause_stops_within_a_second_and_resume_sends_the_rest_once(
    mongo: MongoTarget, client: Client, sink: SmtpSink
) -> None:
    ids = await seed_customers(client, mongo, 100)
    coll = client[mongo.campaigns_db].campaigns
    cfg = settings(mongo, sink, email_rate_per_second=40, send_concurrency=2)
    async with running(cfg):
        res = await coll.insert_one(campaign("pausable", 0.2, 60, ids, channels=["email"]))
        await eventually(lambda: holds(len(sink.messages) >= 10))
        await coll.update_one({"_id": res.inserted_id}, {"$set": {"status": "paused"}})
        await anyio.sleep(1.0)
        at_pause = len(sink.messages)
        await anyio.sleep(1.0)
        assert len(sink.messages) == at_pause  # nothing sent while paused
        assert at_pause < 100
        await coll.update_one({"_id": res.inserted_id}, {"$set": {"status": "running"}})
        await eventually(sends_done(client, mongo, res.inserted_id), 20)
    assert sorted(sink.recipients()) == sorted(f"c{i}@example.com" for i in range(100))
    rows = await ledger(client, mongo, res.inserted_id)
    assert collections.Counter(r["state"] for r in rows) == {"sent": 100}


async def test_cancel_during_a_run_stops_sending(
    mongo: MongoTarget, client: Client, sink: SmtpSink
) -> None:
    ids = await seed_customers(client, mongo, 100)
    coll = client[mongo.campaigns_db].campaigns
    async with running(settings(mongo, sink, email_rate_per_second=40, send_concurrency=2)):
        res = await coll.insert_one(campaign("cancel", 0.2, 60, ids, channels=["email"]))
        await eventually(lambda: holds(len(sink.messages) >= 5))
        await coll.update_one({"_id": res.inserted_id}, {"$set": {"status": "cancelled"}})
        await anyio.sleep(1.0)
        stopped_at = len(sink.messages)
        await anyio.sleep(1.0)
        assert len(sink.messages) == stopped_at < 100


async def test_window_close_skips_the_rest_and_completes(
    mongo: MongoTarget, client: Client, sink: SmtpSink
) -> None:
    ids = await seed_customers(client, mongo, 200)
    coll = client[mongo.campaigns_db].campaigns
    async with running(settings(mongo, sink, email_rate_per_second=50, send_concurrency=2)):
        res = await coll.insert_one(campaign("short", 0.2, 1.5, ids, channels=["email"]))
        await eventually(has_status(client, mongo, res.inserted_id, "completed"), 15)
    rows = await ledger(client, mongo, res.inserted_id)
    states = collections.Counter((r["state"], r.get("reason")) for r in rows)
    assert len(rows) == 200
    assert states[("skipped", "window_closed")] > 50
    assert states[("sent", None)] == len(sink.messages)
    doc = await coll.find_one({"_id": res.inserted_id})
    assert doc is not None
    assert doc["performance"]["emailsSkipped"] == states[("skipped", "window_closed")]


async def test_two_instances_racing_send_each_message_once(
    mongo: MongoTarget, client: Client, sink: SmtpSink, twilio: TwilioFake
) -> None:
    ids = await seed_customers(client, mongo, 50)
    coll = client[mongo.campaigns_db].campaigns
    configs = [settings(mongo, sink, twilio, reactor_instance_id=f"i{i}") for i in range(2)]
    async with running(*configs):
        docs = [campaign(f"race{i}", 0.5, 60, ids[i * 10 : (i + 1) * 10]) for i in range(5)]
        result = await coll.insert_many(docs)
        for cid in result.inserted_ids:
            await eventually(sends_done(client, mongo, cid), 15)
    assert len(sink.messages) == 50
    assert_no_duplicates(sink, twilio)


async def test_malformed_content_is_reported_and_nothing_is_sent(
    mongo: MongoTarget, client: Client, sink: SmtpSink, twilio: TwilioFake
) -> None:
    ids = await seed_customers(client, mongo, 3)
    coll = client[mongo.campaigns_db].campaigns
    bad = [
        campaign("empty-body", 0.3, 30, ids, sms={"body": ""}, channels=["sms"]),
        campaign("no-subject", 0.3, 30, ids, email={"text": "hi"}, channels=["email"]),
        campaign(
            "huge",
            0.3,
            30,
            ids,
            email={"subject": "s", "html": "x" * 1_000_000},
            channels=["email"],
        ),
    ]
    async with running(settings(mongo, sink, twilio, reconcile_interval_seconds=0.5)):
        result = await coll.insert_many(bad)
        good = await coll.insert_one(campaign("good", 0.3, 30, ids, channels=["email"]))
        await eventually(sends_done(client, mongo, good.inserted_id))
        await anyio.sleep(1.0)
    for cid in result.inserted_ids:
        doc = await coll.find_one({"_id": cid})
        assert doc is not None
        assert doc["status"] == "approved"
        assert doc["execution"]["lastError"]["reason"] == "bad_content"
        assert await ledger(client, mongo, cid) == []
    assert len(sink.messages) == 3  # only the good campaign's
    assert twilio.messages == []


async def replay_pending(stream: Any, sent_target: int) -> tuple[int, set[Any]]:
    """Follow the ledger's change stream until `sent_target` rows are `sent`: the most rows
    that were `pending` at once, and those still pending at the end."""
    pending: set[Any] = set()
    sent: set[Any] = set()
    peak = 0
    with anyio.fail_after(30):
        while len(sent) < sent_target:
            event = await stream.next()
            key = event["documentKey"]["_id"]
            if event["operationType"] == "insert":
                state = event["fullDocument"]["state"]
            else:
                state = event["updateDescription"]["updatedFields"].get("state")
                if state is None:
                    continue
            if state == "pending":
                pending.add(key)
            else:
                pending.discard(key)
                if state == "sent":
                    sent.add(key)
            peak = max(peak, len(pending))
    return peak, pending


async def test_ledger_never_holds_more_pending_rows_than_the_bound(
    mongo: MongoTarget, client: Client
) -> None:
    """Replays the ledger's change stream: at no point are more than SEND_CONCURRENCY rows
    pending, although outcomes and new pending marks share one write."""
    ids = await seed_customers(client, mongo, 60)
    deliveries = client[mongo.campaigns_db].deliveries
    async with (
        SmtpSink(reply_delay_s=0.002) as slow_sink,
        await deliveries.watch() as stream,
        running(settings(mongo, slow_sink, send_concurrency=4)),
    ):
        res = await client[mongo.campaigns_db].campaigns.insert_one(
            campaign("bound", 0.3, 60, ids, channels=["email"])
        )
        peak, pending = await replay_pending(stream, 60)
        await eventually(sends_done(client, mongo, res.inserted_id), 10)
    assert 1 < peak <= 4
    assert not pending
    assert len(slow_sink.messages) == 60


async def test_rows_wait_for_their_rate_limit_turn_unmarked(
    mongo: MongoTarget, client: Client
) -> None:
    """Under a rate limit a row is marked `pending` only once its token is taken, so the ledger
    holds just the sends really under way — what a crash would leave uncertain — not every
    slot of the concurrency bound waiting for its turn."""
    ids = await seed_customers(client, mongo, 20)
    deliveries = client[mongo.campaigns_db].deliveries
    async with (
        SmtpSink(reply_delay_s=0.002) as slow_sink,
        await deliveries.watch() as stream,
        running(settings(mongo, slow_sink, send_concurrency=16, email_rate_per_second=10)),
    ):
        res = await client[mongo.campaigns_db].campaigns.insert_one(
            campaign("paced", 0.3, 60, ids, channels=["email"])
        )
        peak, _ = await replay_pending(stream, 20)
        await eventually(sends_done(client, mongo, res.inserted_id), 10)
    assert 1 <= peak <= 2  # one send every 100 ms, each taking a few ms
    assert len(slow_sink.messages) == 20


async def test_sink_round_trip_is_simulated_once_per_reply() -> None:
    """The benchmark's simulated network delays each SMTP reply once, not each line of a
    multi-line reply (EHLO), or it would overstate what a new connection costs."""
    async with SmtpSink(reply_delay_s=0.1) as slow_sink:
        smtp = aiosmtplib.SMTP(hostname=slow_sink.host, port=slow_sink.port, start_tls=False)
        t0 = time.perf_counter()
        await smtp.connect()  # the greeting: one round trip
        response = await smtp.ehlo()  # a multi-line reply: one more
        await smtp.quit()  # and one more
        elapsed = time.perf_counter() - t0
    assert len(response.message.splitlines()) >= 4
    assert 0.3 <= elapsed < 0.5  # one delay per line would take 0.6 s or more


async def test_each_channel_goes_at_its_own_pace(
    mongo: MongoTarget, client: Client, sink: SmtpSink, twilio: TwilioFake
) -> None:
    """A slow SMS channel does not hold the emails back: with batches of 10 and SMS at 5/s,
    every email is out while most SMS are still queued behind their rate limit."""
    ids = await seed_customers(client, mongo, 40)
    cfg = settings(mongo, sink, twilio, sms_rate_per_second=5, recipient_batch_size=10)
    coll = client[mongo.campaigns_db].campaigns
    async with running(cfg):
        res = await coll.insert_one(campaign("paces", 0.2, 60, ids))

        async def all_emails_out() -> bool:
            return len(sink.messages) == 40

        await eventually(all_emails_out, 10)
        sms_when_emails_done = len(twilio.messages)
        await eventually(sends_done(client, mongo, res.inserted_id), 30)
    assert sms_when_emails_done <= 20  # in order, three SMS batches (30) would come first
    assert len(twilio.messages) == 40
    assert_no_duplicates(sink, twilio)
    rows = await ledger(client, mongo, res.inserted_id)
    assert collections.Counter((r["channel"], r["state"]) for r in rows) == {
        ("email", "sent"): 40,
        ("sms", "sent"): 40,
    }


async def test_uncertain_sms_are_resolved_against_twilios_own_list(
    mongo: MongoTarget, client: Client, twilio: TwilioFake
) -> None:
    """Twilio takes three messages and answers 502; two more get a 500 before it takes them.
    All five are uncertain when sent; looked up in Twilio's Messages list (To, From, DateSent),
    the three it took are recorded sent with their SIDs, the two it did not stay uncertain —
    and nothing is sent again."""
    ids = await seed_customers(client, mongo, 12)
    twilio.fail_next(2, 500)  # the first two requests: refused by the gateway, never taken
    twilio.accept_then_fail_next(3, 502)  # the next three taken, then answered 502
    coll = client[mongo.campaigns_db].campaigns
    async with running(settings(mongo, twilio=twilio, send_concurrency=1)) as (reactor,):
        res = await coll.insert_one(campaign("resolve", 0.2, 30, ids, channels=["sms"]))
        await eventually(sends_done(client, mongo, res.inserted_id), 20)
        sample = reactor.metrics.registry.get_sample_value
        found = sample("reactor_sms_uncertain_resolved_total", {"result": "sent"})
        still = sample("reactor_sms_uncertain_resolved_total", {"result": "still_uncertain"})
    rows = await ledger(client, mongo, res.inserted_id)
    resolved = [r for r in rows if r.get("reason") == "resolved_with_provider"]
    assert len(resolved) == 3
    sids = {m.sid for m in twilio.messages}
    assert all(r["state"] == "sent" and r["providerId"] in sids for r in resolved)
    uncertain = [r for r in rows if r["state"] == "uncertain"]
    assert len(uncertain) == 2
    assert (found, still) == (3, 2)
    assert len({m.to for m in twilio.messages}) == len(twilio.messages)  # none sent twice
    doc = await coll.find_one({"_id": res.inserted_id})
    assert doc is not None
    assert doc["performance"]["uncertain"] == 2
