"""Campaigns and orders as the existing Node/Mongoose backend writes them: ids of every type on
either side, `channels: []`, Mongoose's own fields, and targets that cannot be read."""

from __future__ import annotations

import collections
import datetime as dt
from typing import Any

from bson import Int64, ObjectId
from pymongo import AsyncMongoClient

from reactor.embedded.smtp_sink import SmtpSink
from reactor.embedded.twilio_fake import TwilioFake

from .conftest import MongoTarget
from .helpers import campaign, eventually, has_status, holds, ledger, running, settings

Client = AsyncMongoClient[dict[str, Any]]


def order(customer_id: Any, n: int) -> dict[str, Any]:
    return {
        "customer_id": customer_id,
        "email": f"n{n}@example.com",
        "phone": f"+1415555{n:04d}",
        "name": f"N{n}",
    }


async def test_ids_of_every_type_match_across_the_two_databases(
    mongo: MongoTarget, client: Client, sink: SmtpSink, twilio: TwilioFake
) -> None:
    oid = ObjectId()
    big = 2**40  # beyond 32 bits: the Node driver writes it as a double
    # (how the orders collection stores it, how the campaign names it)
    pairs: list[tuple[Any, Any]] = [
        ("1", 1),
        (2, "2"),
        (Int64(3), 3.0),
        (4.0, Int64(4)),
        (float(big), big),
        (big + 1, f"{big + 1}.0"),
        (oid, str(oid)),
        (str(oid).upper(), ObjectId(str(oid).upper())),
        ("cust-9", "cust-9"),
    ]
    orders = client[mongo.segmentation_db]["newdatabase"]
    await orders.insert_many([order(stored, n) for n, (stored, _) in enumerate(pairs)])
    targets = [named for _, named in pairs]
    doc = campaign(
        "node",
        0.3,
        30,
        targets,
        channels=[],  # Mongoose's default for an array nobody set: every channel with content
        __v=0,
        createdAt=dt.datetime.now(dt.UTC),
        updatedAt=dt.datetime.now(dt.UTC),
    )
    coll = client[mongo.campaigns_db].campaigns
    async with running(settings(mongo, sink, twilio)):
        res = await coll.insert_one(doc)

        async def done() -> bool:
            found = await coll.find_one({"_id": res.inserted_id})
            return bool(found and found.get("execution", {}).get("sendsDone"))

        await eventually(done, 15)
    rows = await ledger(client, mongo, res.inserted_id)
    by_channel = collections.Counter((r["channel"], r["state"]) for r in rows)
    # The two ObjectId spellings are one customer; everyone else is one customer each.
    customers = len(pairs) - 1
    assert by_channel[("email", "sent")] == customers
    assert by_channel[("sms", "sent")] == customers
    assert sorted(collections.Counter(sink.recipients()).values()) == [1] * customers
    assert len({m.to for m in twilio.messages}) == len(twilio.messages) == customers


async def test_targets_that_cannot_be_read_are_reported_when_armed_not_started(
    mongo: MongoTarget, client: Client, sink: SmtpSink
) -> None:
    coll = client[mongo.campaigns_db].campaigns
    async with running(settings(mongo, sink)) as (reactor,):
        res = await coll.insert_one(
            campaign("broken", 1.0, 30, ["1", {"id": 2}, True, 2.5], channels=["email"])
        )

        async def reported() -> bool:
            found = await coll.find_one({"_id": res.inserted_id})
            error = (found or {}).get("execution", {}).get("lastError") or {}
            return error.get("reason") == "bad_targets"

        await eventually(reported, 10)
        await eventually(lambda: _past(res.inserted_id, coll, 1.5), 10)
        found = await coll.find_one({"_id": res.inserted_id})
        assert found is not None
        assert found["status"] == "approved"  # not started, so not 'completed' with nothing sent
        assert "3 targeted customer ids" in found["execution"]["lastError"]["detail"]
        errors = reactor.metrics.registry.get_sample_value(
            "reactor_campaign_errors_total", {"reason": "bad_targets"}
        )
        assert errors == 1
        # Fixed by the backend: the change event re-checks and the campaign starts.
        await client[mongo.segmentation_db]["newdatabase"].insert_one(order("1", 1))
        await coll.update_one(
            {"_id": res.inserted_id},
            {
                "$set": {
                    "targetedCustomerIds": ["1"],
                    "startDate": dt.datetime.now(dt.UTC) + dt.timedelta(seconds=0.5),
                }
            },
        )
        await eventually(has_status(client, mongo, res.inserted_id, "running"), 10)
        # Sent once its rate tokens are leased (the cluster's budget): wait for it, then count.
        await eventually(lambda: holds(bool(sink.messages)), 10)
    assert sink.recipients() == ["n1@example.com"]


async def _past(campaign_id: Any, coll: Any, seconds: float) -> bool:
    found = await coll.find_one({"_id": campaign_id})
    start = found["startDate"] if found else dt.datetime.now(dt.UTC)
    return bool(dt.datetime.now(dt.UTC) >= start + dt.timedelta(seconds=seconds))
