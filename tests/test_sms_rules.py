"""An SMS's rules, as tables and end to end: segments (GSM-7 and UCS-2), opt-out wording, quiet
hours by the number's time zones (across DST changes, the strictest of several zones), and the
provider refusals that suppress an address (Twilio 21610, SMTP 5.1.1)."""

from __future__ import annotations

import collections
import datetime as dt
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from pymongo import AsyncMongoClient

from reactor.domain.consent import suppression_id
from reactor.domain.sms import (
    LocalHours,
    next_allowed,
    parse_hours,
    segments,
    with_opt_out,
    zones_for,
)
from reactor.embedded.smtp_sink import SmtpSink
from reactor.embedded.twilio_fake import TwilioFake

from .conftest import MongoTarget
from .helpers import campaign, eventually, ledger, running, seed_customers, settings

Client = AsyncMongoClient[dict[str, Any]]
UTC = dt.UTC


@pytest.mark.parametrize(
    ("text", "encoding", "count"),
    [
        ("a" * 160, "GSM-7", 1),
        ("a" * 161, "GSM-7", 2),
        ("a" * 306, "GSM-7", 2),
        ("a" * 307, "GSM-7", 3),
        ("€" * 80, "GSM-7", 1),  # an extension character takes two septets: 160
        ("€" * 81, "GSM-7", 2),
        ("é" * 160, "GSM-7", 1),  # in the basic table
        ("ł" * 70, "UCS-2", 1),
        ("ł" * 71, "UCS-2", 2),
        ("ł" * 134, "UCS-2", 2),
        ("ł" * 135, "UCS-2", 3),
        ("😀" * 35, "UCS-2", 1),  # a surrogate pair is two units
        ("😀" * 36, "UCS-2", 2),
    ],
)
def test_segments_are_counted_as_carriers_bill_them(text: str, encoding: str, count: int) -> None:
    seg = segments(text)
    assert (seg.encoding, seg.count) == (encoding, count)


def test_opt_out_wording_is_added_only_when_missing() -> None:
    assert with_opt_out("Sale today!", "Reply STOP to opt out.") == (
        "Sale today! Reply STOP to opt out."
    )
    assert with_opt_out("Sale! Text stop to end", "Reply STOP to opt out.") == (
        "Sale! Text stop to end"
    )
    assert with_opt_out("Sale! Unsubscribe: x", "Reply STOP") == "Sale! Unsubscribe: x"
    assert with_opt_out("Sale", "") == "Sale"


def test_hours_parse_and_refuse_nonsense() -> None:
    assert parse_hours("08:00-21:00") == LocalHours(dt.time(8), dt.time(21))
    assert parse_hours("00:00-24:00").all_day
    assert parse_hours("22:00-06:00").allows(dt.time(23, 30))
    assert not parse_hours("22:00-06:00").allows(dt.time(12))
    for bad in ("8-21", "25:00-26:00", "08:00-08:00", "noon-night"):
        with pytest.raises(ValueError, match=r"HH:MM|hours|differ"):
            parse_hours(bad)


HOURS = parse_hours("08:00-21:00")
NY = ("America/New_York",)


@pytest.mark.parametrize(
    ("now", "zones", "expected"),
    [
        # Inside the hours: now.
        (
            dt.datetime(2026, 7, 1, 15, 0, tzinfo=UTC),
            NY,
            dt.datetime(2026, 7, 1, 15, 0, tzinfo=UTC),
        ),
        # 22:00 EDT: the next 08:00 EDT is 12:00 UTC.
        (dt.datetime(2026, 7, 2, 2, 0, tzinfo=UTC), NY, dt.datetime(2026, 7, 2, 12, 0, tzinfo=UTC)),
        # Spring forward (8 March 2026, 02:00 EST -> 03:00 EDT): 01:30 EST is 06:30 UTC; the
        # morning's 08:00 is already EDT, so 12:00 UTC, not 13:00.
        (
            dt.datetime(2026, 3, 8, 6, 30, tzinfo=UTC),
            NY,
            dt.datetime(2026, 3, 8, 12, 0, tzinfo=UTC),
        ),
        # Fall back (1 November 2026, 02:00 EDT -> 01:00 EST): 08:00 EST is 13:00 UTC.
        (
            dt.datetime(2026, 11, 1, 5, 30, tzinfo=UTC),
            NY,
            dt.datetime(2026, 11, 1, 13, 0, tzinfo=UTC),
        ),
        # The evening before spring forward: 21:30 EST -> the next morning's 08:00 EDT.
        (
            dt.datetime(2026, 3, 8, 2, 30, tzinfo=UTC),
            NY,
            dt.datetime(2026, 3, 8, 12, 0, tzinfo=UTC),
        ),
    ],
)
def test_next_allowed_follows_the_zone_across_dst(
    now: dt.datetime, zones: tuple[str, ...], expected: dt.datetime
) -> None:
    assert next_allowed(now, zones, HOURS) == expected


def test_several_zones_take_the_strictest_and_may_never_meet() -> None:
    zones = ("America/New_York", "America/Los_Angeles")
    # 13:00 UTC: 09:00 in New York but 06:00 in Los Angeles: wait for 08:00 PDT (15:00 UTC).
    now = dt.datetime(2026, 7, 1, 13, 0, tzinfo=UTC)
    assert next_allowed(now, zones, HOURS) == dt.datetime(2026, 7, 1, 15, 0, tzinfo=UTC)
    # 02:00 UTC: 22:00 in New York though 19:00 in Los Angeles: not until the next opening.
    now = dt.datetime(2026, 7, 2, 2, 0, tzinfo=UTC)
    assert next_allowed(now, zones, HOURS) == dt.datetime(2026, 7, 2, 15, 0, tzinfo=UTC)
    # Zones whose 13-hour windows never overlap: nothing is ever allowed.
    apart = ("Pacific/Kiritimati", "Pacific/Pago_Pago", "Asia/Kolkata")
    assert next_allowed(now, apart, parse_hours("09:00-12:00")) is None


def test_a_number_names_its_zones_and_unknown_ones_fall_back() -> None:
    assert zones_for("+14155550100", "UTC") == ("America/Los_Angeles",)
    assert len(zones_for("+79161234567", "UTC")) > 5  # Russia: many zones
    assert zones_for("+999", "Europe/Paris") == ("Europe/Paris",)


def _local_hours_from(offset_s: float, length_s: float, zone: str) -> str:
    start = dt.datetime.now(ZoneInfo(zone)) + dt.timedelta(seconds=offset_s)
    end = start + dt.timedelta(seconds=length_s)
    return f"{start:%H:%M:%S}-{end:%H:%M:%S}"


async def test_texts_wait_for_the_recipients_hours_or_are_skipped_when_the_campaign_ends_first(
    mongo: MongoTarget, client: Client, twilio: TwilioFake
) -> None:
    ids = await seed_customers(client, mongo, 4)  # +1415… numbers: Los Angeles
    coll = client[mongo.campaigns_db].campaigns
    async with running(settings(mongo, None, twilio)):
        waits = await coll.insert_one(
            campaign(
                "waits",
                0.3,
                30,
                ids,
                channels=["sms"],
                sms={
                    "body": "Sale {{name}}",
                    "sendHours": _local_hours_from(3, 3600, "America/Los_Angeles"),
                },
            )
        )
        too_late = await coll.insert_one(
            campaign(
                "too late",
                0.3,
                10,
                ids,
                channels=["sms"],
                sms={
                    "body": "Later {{name}}",
                    "sendHours": _local_hours_from(1800, 60, "America/Los_Angeles"),
                },
            )
        )

        async def done(cid: Any) -> bool:
            doc = await coll.find_one({"_id": cid})
            return bool(doc and doc.get("execution", {}).get("sendsDone"))

        await eventually(lambda: done(too_late.inserted_id), 15)
        assert twilio.messages == []  # the first campaign's texts are still waiting
        await eventually(lambda: done(waits.inserted_id), 20)
    rows = await ledger(client, mongo, too_late.inserted_id)
    assert collections.Counter(r.get("reason") for r in rows) == {"quiet_hours": 4}
    sent = await ledger(client, mongo, waits.inserted_id)
    assert collections.Counter(r["state"] for r in sent) == {"sent": 4}
    assert all(r["segments"] == 1 for r in sent)
    assert sorted(m.body for m in twilio.messages)[0].endswith("Reply STOP to opt out.")


async def test_a_text_over_the_segment_limit_is_refused_with_its_count(
    mongo: MongoTarget, client: Client, twilio: TwilioFake
) -> None:
    ids = await seed_customers(client, mongo, 2)
    coll = client[mongo.campaigns_db].campaigns
    async with running(settings(mongo, None, twilio, sms_max_segments=2)):
        res = await coll.insert_one(
            campaign("long", 0.3, 30, ids, channels=["sms"], sms={"body": "ł" * 140})
        )

        async def done() -> bool:
            doc = await coll.find_one({"_id": res.inserted_id})
            return bool(doc and doc.get("execution", {}).get("sendsDone"))

        await eventually(done, 15)
    rows = await ledger(client, mongo, res.inserted_id)
    # 140 UCS-2 units + " Reply STOP to opt out." (23): 163 units, 3 parts of 67.
    assert {r["reason"] for r in rows} == {"too_many_segments:3>2"}
    assert twilio.messages == []


async def test_provider_refusals_that_say_never_again_suppress_the_address(
    mongo: MongoTarget, client: Client, sink: SmtpSink, twilio: TwilioFake
) -> None:
    ids = await seed_customers(client, mongo, 4)
    sink.faults.unknown_mailboxes.add("c1@example.com")
    twilio.faults.stopped.add("+14155550002")
    coll = client[mongo.campaigns_db].campaigns
    async with running(settings(mongo, sink, twilio)):
        first = await coll.insert_one(campaign("first", 0.3, 30, ids))

        async def done(cid: Any) -> bool:
            doc = await coll.find_one({"_id": cid})
            return bool(doc and doc.get("execution", {}).get("sendsDone"))

        await eventually(lambda: done(first.inserted_id), 15)
        rows = {
            (r["channel"], r["customer"]): r for r in await ledger(client, mongo, first.inserted_id)
        }
        assert rows[("email", "1")]["state"] == "failed"
        assert rows[("email", "1")]["reason"] == "hard_bounce"
        assert rows[("sms", "2")]["reason"] == "sms_stop"
        ids_ = {d["_id"] for d in await client[mongo.campaigns_db].suppressions.find().to_list()}
        assert ids_ == {
            suppression_id("email", "c1@example.com", "email"),
            suppression_id("phone", "+14155550002", "sms"),
        }
        doc = await coll.find_one({"_id": first.inserted_id})
        assert doc is not None
        assert doc["performance"]["bounces"] == 1
        assert doc["performance"]["smsStops"] == 1
        # The next campaign does not try them again.
        second = await coll.insert_one(campaign("second", 0.3, 30, ids))
        await eventually(lambda: done(second.inserted_id), 15)
    rows = {
        (r["channel"], r["customer"]): r for r in await ledger(client, mongo, second.inserted_id)
    }
    assert rows[("email", "1")]["reason"] == "suppressed:hard_bounce"
    assert rows[("sms", "2")]["reason"] == "suppressed:sms_stop"
    assert rows[("email", "3")]["state"] == "sent"
