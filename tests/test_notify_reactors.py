"""Notifications end to end: three reactors in one process, one MongoDB, a signed webhook from
the environment to a loopback receiver. Every state change reaches the receiver once after
dropping repeats by webhook-id, none missing, in order per campaign, and each verifies with the
Standard Webhooks library."""

from __future__ import annotations

import base64
import datetime as dt
import secrets
from typing import Any

from pymongo import AsyncMongoClient
from standardwebhooks.webhooks import Webhook

from reactor.embedded.smtp_sink import SmtpSink

from .conftest import MongoTarget
from .helpers import campaign, eventually, has_status, holds, running, seed_customers, settings
from .notify_receiver import receiver

Client = AsyncMongoClient[dict[str, Any]]
SECRET = "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()


def by_campaign(received: list[Any], campaign_id: Any) -> list[str]:
    return [
        r.payload["type"]
        for r in received
        if (r.payload["data"].get("campaign") or {}).get("id") == str(campaign_id)
    ]


async def test_three_reactors_each_event_once_in_order(
    mongo: MongoTarget, client: Client, sink: SmtpSink
) -> None:
    await seed_customers(client, mongo, 5)
    coll = client[mongo.campaigns_db].campaigns
    async with receiver() as rec:
        configs = [
            settings(
                mongo,
                sink,
                reactor_instance_id=f"r{i}",
                notify_webhook_url=rec.url,
                notify_webhook_secret=SECRET,
                notify_allow_loopback=True,  # the receiver is on 127.0.0.1
                email_rate_per_second=2,  # the paused campaign is still sending when paused
            )
            for i in range(3)
        ]
        async with running(*configs):
            now = dt.datetime.now(dt.UTC)
            quick, slow, missed = (
                await coll.insert_many(
                    [
                        campaign("Quick", 0.5, 3.0, ["0", "1"], channels=["email"]),
                        campaign("Slow", 0.5, 120, ["0", "1", "2", "3", "4"], channels=["email"]),
                        campaign(
                            "Missed",
                            0,
                            60,
                            ["0"],
                            startDate=now - dt.timedelta(hours=2),
                            channels=["email"],
                        ),
                    ]
                )
            ).inserted_ids
            await eventually(has_status(client, mongo, slow, "running"), 10)
            await coll.update_one({"_id": slow}, {"$set": {"status": "paused"}})
            await eventually(lambda: holds("campaign.paused" in by_campaign(rec.unique(), slow)))
            await coll.update_one({"_id": slow}, {"$set": {"status": "running"}})
            await eventually(has_status(client, mongo, quick, "completed"), 10)

            def complete() -> bool:
                return (
                    by_campaign(rec.unique(), quick)[-1:] == ["campaign.completed"]
                    and "campaign.resumed" in by_campaign(rec.unique(), slow)
                    and "campaign.missed" in by_campaign(rec.unique(), missed)
                )

            await eventually(lambda: holds(complete()), 15)
    unique = rec.unique()
    assert by_campaign(unique, quick) == ["campaign.started", "campaign.completed"]
    assert by_campaign(unique, slow) == ["campaign.started", "campaign.paused", "campaign.resumed"]
    assert by_campaign(unique, missed) == ["campaign.missed"]
    for r in rec.received:
        Webhook(SECRET).verify(r.body, r.headers)  # raises on a bad signature
    paused = next(r.payload for r in unique if r.payload["type"] == "campaign.paused")
    assert paused["data"]["by"] == "operator"
    started = next(r.payload for r in unique if r.payload["type"] == "campaign.started")
    assert started["data"]["audienceSize"] == 2
    assert started["data"]["owner"] in {"r0", "r1", "r2"}
    completed = next(r.payload for r in unique if r.payload["type"] == "campaign.completed")
    assert completed["data"]["outcomes"]["email"]["sent"] == 2
    # No customer data anywhere: the seeded addresses are c<i>@example.com.
    assert not any(b"@example.com" in r.body for r in rec.received)


async def test_an_smtp_outage_is_one_channel_paused_and_one_resumed(
    mongo: MongoTarget, client: Client, sink: SmtpSink
) -> None:
    ids = await seed_customers(client, mongo, 30)
    coll = client[mongo.campaigns_db].campaigns
    async with receiver("/events") as rec:
        configs = [
            settings(
                mongo,
                sink,
                reactor_instance_id=f"r{i}",
                notify_json_url=rec.url,
                notify_allow_loopback=True,
                notify_events="channel.paused,channel.resumed",
                email_rate_per_second=50,
            )
            for i in range(2)
        ]
        async with running(*configs):
            await sink.go_down()
            await coll.insert_one(campaign("outage", 0.3, 60, ids, channels=["email"]))
            await eventually(lambda: holds("channel.paused" in rec.types()), 15)
            await sink.come_back()
            await eventually(lambda: holds("channel.resumed" in rec.types()), 30)
    assert rec.types() == ["channel.paused", "channel.resumed"]
    paused = rec.unique()[0].payload["data"]
    assert paused["channel"] == "email"
    assert paused["kind"] == "connect"
    assert paused["instance"] in {"r0", "r1"}
