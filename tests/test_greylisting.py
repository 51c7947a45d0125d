"""A provider's "try later" (SMTP 4xx) is deferred on a schedule that outlasts greylisting, not
burned in seconds: greylisted recipients get their email once, after the deferral; a refusal
that outlasts the whole schedule is `failed` as temporary."""

from __future__ import annotations

import collections
from typing import Any

from pymongo import AsyncMongoClient

from reactor.embedded.smtp_sink import SmtpSink

from .conftest import MongoTarget
from .helpers import campaign, eventually, ledger, running, seed_customers, settings

Client = AsyncMongoClient[dict[str, Any]]


async def sends_done(client: Client, mongo: MongoTarget, campaign_id: Any) -> bool:
    doc = await client[mongo.campaigns_db].campaigns.find_one({"_id": campaign_id})
    return bool(doc and (doc.get("execution") or {}).get("sendsDone"))


async def test_greylisted_recipients_get_their_email_once_after_the_deferral(
    mongo: MongoTarget, client: Client, sink: SmtpSink
) -> None:
    ids = await seed_customers(client, mongo, 12)
    sink.greylist(1.0)  # every recipient's attempts in its first second get 450
    cfg = settings(mongo, sink, tempfail_retry_seconds="1.2,2.4")
    coll = client[mongo.campaigns_db].campaigns
    async with running(cfg) as (reactor,):
        res = await coll.insert_one(campaign("grey", 0.3, 60, ids, channels=["email"]))
        await eventually(lambda: sends_done(client, mongo, res.inserted_id), 20)
        deferred = reactor.metrics.registry.get_sample_value(
            "reactor_sends_deferred_total", {"channel": "email"}
        )
        retries = reactor.metrics.registry.get_sample_value(
            "reactor_send_retries_total", {"channel": "email"}
        )
    assert sink.greylisted == 12  # each recipient refused once...
    assert deferred == 12  # ...deferred once, not retried in quick succession...
    assert retries == 0
    counts = collections.Counter(sink.recipients())
    assert sorted(counts.values()) == [1] * 12  # ...and delivered exactly once
    rows = await ledger(client, mongo, res.inserted_id)
    assert {r["state"] for r in rows} == {"sent"}


async def test_a_refusal_that_outlasts_the_schedule_is_failed_as_temporary(
    mongo: MongoTarget, client: Client, sink: SmtpSink
) -> None:
    ids = await seed_customers(client, mongo, 3)
    sink.greylist(600)  # never lets anyone through
    cfg = settings(mongo, sink, tempfail_retry_seconds="0.3,0.3")
    coll = client[mongo.campaigns_db].campaigns
    async with running(cfg):
        res = await coll.insert_one(campaign("stubborn", 0.3, 60, ids, channels=["email"]))
        await eventually(lambda: sends_done(client, mongo, res.inserted_id), 20)
    rows = await ledger(client, mongo, res.inserted_id)
    assert [r["state"] for r in rows] == ["failed"] * 3
    assert all(r["reason"] == "temporary" for r in rows)
    assert all("450" in r["error"] and "2 deferrals" in r["error"] for r in rows)
    assert sink.greylisted == 9  # first try and two deferred tries each
    assert sink.messages == []


async def test_an_smtp_outage_pauses_the_channel_and_burns_no_one(
    mongo: MongoTarget, client: Client, sink: SmtpSink
) -> None:
    """The SMTP server is down for 4 s — longer than all of a message's quick retries, so each
    used to end 'failed'. The breaker pauses the channel instead; once a probe gets through,
    everyone gets the email exactly once."""
    import anyio

    ids = await seed_customers(client, mongo, 40)
    coll = client[mongo.campaigns_db].campaigns
    async with running(settings(mongo, sink, email_rate_per_second=50)) as (reactor,):
        await sink.go_down()
        res = await coll.insert_one(campaign("outage", 0.3, 60, ids, channels=["email"]))
        sample = reactor.metrics.registry.get_sample_value

        async def paused() -> bool:
            return sample("reactor_channel_paused", {"channel": "email"}) == 1

        await eventually(paused, 10)
        await anyio.sleep(3.0)
        await sink.come_back()
        await eventually(lambda: sends_done(client, mongo, res.inserted_id), 30)
        assert sample("reactor_channel_paused", {"channel": "email"}) == 0
        assert (
            sample("reactor_channel_pauses_total", {"channel": "email", "kind": "connect"}) or 0
        ) >= 1
    rows = await ledger(client, mongo, res.inserted_id)
    assert collections.Counter(r["state"] for r in rows) == {"sent": 40}
    assert sorted(collections.Counter(sink.recipients()).values()) == [1] * 40
    doc = await coll.find_one({"_id": res.inserted_id})
    assert doc is not None
    assert doc["execution"]["lastError"]["reason"] == "channel_paused"


async def test_tls_failures_pause_the_channel_until_the_handshake_verifies(
    mongo: MongoTarget, client: Client, tmp_path: Any
) -> None:
    """The SMTP server presents a certificate the reactor cannot verify (against SMTP_CA_FILE)
    for 3 s: every handshake fails, the channel pauses on 'tls' instead of failing everyone,
    and once the server presents its real certificate the probe goes through."""
    import anyio

    from reactor.embedded.tls import make_test_pki

    pki = await anyio.to_thread.run_sync(make_test_pki, tmp_path)
    ids = await seed_customers(client, mongo, 20)
    coll = client[mongo.campaigns_db].campaigns
    async with SmtpSink(tls=pki) as tls_sink:
        tls_sink.present_impostor_certificate(3.0)
        async with running(settings(mongo, tls_sink, email_rate_per_second=50)) as (reactor,):
            res = await coll.insert_one(campaign("tls", 0.3, 60, ids, channels=["email"]))
            await eventually(lambda: sends_done(client, mongo, res.inserted_id), 40)
            pauses = reactor.metrics.registry.get_sample_value(
                "reactor_channel_pauses_total", {"channel": "email", "kind": "tls"}
            )
        received = collections.Counter(tls_sink.recipients())
    assert pauses is not None
    assert pauses >= 1
    rows = await ledger(client, mongo, res.inserted_id)
    assert collections.Counter(r["state"] for r in rows) == {"sent": 20}
    assert sorted(received.values()) == [1] * 20
