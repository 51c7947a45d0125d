"""Follow-ups: `segment: {notEngaged: {campaign: X, with: ...}}` reaches campaign X's recipients
who had no human open (or click), in bounded batches, suppressions excluded."""

from __future__ import annotations

import collections
from typing import Any

import pytest
from bson import ObjectId

from reactor.adapters.mongo import MongoSuppressions
from reactor.config import DEFAULT_SPLIT_KEY
from reactor.domain.consent import Kind, Reason, Suppression
from reactor.domain.errors import InvalidCampaign
from reactor.domain.segments import parse_segment
from reactor.embedded.smtp_sink import SmtpSink
from reactor.splits.report import gather, render

from .conftest import MongoTarget
from .helpers import (
    Client,
    campaign,
    eventually,
    has_status,
    now,
    running,
    seed_customers,
    settings,
)


def _event(x: ObjectId, customer: str, kind: str, klass: str) -> dict[str, Any]:
    return {
        "campaign": str(x),  # as the recorder writes it: the token's key
        "channel": "email",
        "customer": customer,
        "kind": kind,
        "link": None,
        "at": now(),
        "class": klass,
        "reasons": [],
        "agent": "",
        "ip": "198.51.100.1",
    }


@pytest.mark.parametrize(
    "raw",
    [
        {"notEngaged": {"campaign": "nope", "with": "open"}},
        {"notEngaged": {"campaign": ObjectId(), "with": "read"}},
        {"notEngaged": {"campaign": ObjectId()}},
        {"notEngaged": {"campaign": 5, "with": "open"}},
    ],
)
def test_a_bad_follow_up_is_refused(raw: dict[str, Any]) -> None:
    with pytest.raises(InvalidCampaign, match=r"segment\.notEngaged"):
        parse_segment(raw)


def test_a_follow_up_parses_a_string_id() -> None:
    x = ObjectId()
    segment = parse_segment({"notEngaged": {"campaign": str(x), "with": "click"}})
    assert segment is not None
    assert segment.not_engaged is not None
    assert segment.not_engaged.campaign == x
    assert segment.not_engaged.kinds == ("click",)
    assert segment.kind == "notEngaged"


@pytest.mark.parametrize("with_", ["open", "click"])
async def test_a_follow_up_reaches_those_without_a_human_event(
    mongo: MongoTarget, client: Client, sink: SmtpSink, with_: str
) -> None:
    await seed_customers(client, mongo, 40)
    db = client[mongo.campaigns_db]
    x = ObjectId()
    # Campaign X sent emails to 0..29 (30..39 were never sent: not its recipients), and an
    # SMS only to 35 (nobody can open an SMS).
    rows = [
        {
            "_id": f"{x}:email:{i}",
            "campaign": str(x),
            "channel": "email",
            "customer": str(i),
            "state": "sent" if i != 29 else "failed",
            "epoch": 1,
        }
        for i in range(30)
    ]
    rows.append(
        {
            "_id": f"{x}:sms:35",
            "campaign": str(x),
            "channel": "sms",
            "customer": "35",
            "state": "sent",
            "epoch": 1,
        }
    )
    await db.deliveries.insert_many(rows)
    events = [_event(x, str(i), "open", "human") for i in range(0, 10)]  # human openers
    events += [_event(x, str(i), "open", "machine") for i in range(10, 20)]  # proxy prefetch
    events += [_event(x, str(i), "click", "scanner") for i in range(10, 15)]  # link scanner
    events += [_event(x, "20", "click", "human")]  # a human click without an open
    events += [_event(ObjectId(), "21", "open", "human")]  # another campaign's open
    await db.engagement.insert_many(events)
    await MongoSuppressions(db).add(
        [Suppression(Kind.CUSTOMER, "22", "all", Reason.UNSUBSCRIBED, source="cli")], now=now()
    )
    follow = campaign(
        "follow-up",
        0.5,
        120,
        [],
        channels=["email"],
        segment={"notEngaged": {"campaign": x, "with": with_}},
    )
    async with running(settings(mongo, sink, shard_size=7, recipient_batch_size=5)):
        res = await db.campaigns.insert_one(follow)
        await eventually(has_status(client, mongo, res.inserted_id, "running"), 30)

        async def settled() -> bool:
            found = await db.campaigns.find_one({"_id": res.inserted_id})
            return bool(found and found.get("execution", {}).get("sendsDone"))

        await eventually(settled, 30)
    received = collections.Counter(m.to for m in sink.messages)
    if with_ == "open":
        expected = set(range(10, 29)) - {20, 22}
    else:
        expected = (set(range(0, 29)) | {35}) - {20, 22}
    assert set(received) == {f"c{i}@example.com" for i in expected}
    assert set(received.values()) == {1}
    skipped = await db.deliveries.find_one({"campaign": str(res.inserted_id), "customer": "22"})
    assert skipped is not None
    assert skipped["state"] == "skipped"
    assert skipped["reason"].startswith("suppressed:")
    # The report of a campaign without a split: one row for everyone.
    data = await gather(db, res.inserted_id, collection="campaigns", split_key=DEFAULT_SPLIT_KEY)
    assert data is not None
    assert data["outcomes"]["email"]["sent"] == len(expected)
    assert [(r["variant"], r["group"], r["sent"]) for r in data["variants"]] == [
        ("all", "all", len(expected))
    ]
    assert data["decision"] is None
    assert "A/B decision" not in render(data)
