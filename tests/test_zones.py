"""Send-at-local-time decisions, as tables a reader can check by hand: `localTime` refused with
the field and the reason, each recipient's zone and instant (a DST gap, a fold, the next day when
the hour has passed at startDate), the window, and whether each instant's batch fits its spread
under the budget."""

from __future__ import annotations

import datetime as dt
from zoneinfo import ZoneInfo

import pytest

from reactor.domain.errors import InvalidCampaign
from reactor.domain.zones import (
    LocalTime,
    fit,
    group,
    in_window,
    instant_in,
    parse_local_time,
    recipient_instant,
    wall_to_utc,
)

UTC = dt.UTC


def utc(year: int, month: int, day: int, hour: int = 0, minute: int = 0) -> dt.datetime:
    return dt.datetime(year, month, day, hour, minute, tzinfo=UTC)


TEN = LocalTime(dt.time(10, 0), 3600, "Europe/Paris")


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        ("10:00", "must be a document"),
        ({"at": "25:00", "spreadMinutes": 60, "fallbackZone": "UTC"}, "localTime.at must be HH:MM"),
        ({"at": "9:00", "spreadMinutes": 60, "fallbackZone": "UTC"}, "localTime.at must be HH:MM"),
        ({"at": "10:60", "spreadMinutes": 60, "fallbackZone": "UTC"}, "localTime.at"),
        ({"at": 10, "spreadMinutes": 60, "fallbackZone": "UTC"}, "localTime.at"),
        ({"at": "10:00", "spreadMinutes": 0, "fallbackZone": "UTC"}, "spreadMinutes"),
        ({"at": "10:00", "spreadMinutes": -5, "fallbackZone": "UTC"}, "spreadMinutes"),
        ({"at": "10:00", "spreadMinutes": True, "fallbackZone": "UTC"}, "spreadMinutes"),
        ({"at": "10:00", "spreadMinutes": 2000, "fallbackZone": "UTC"}, "spreadMinutes"),
        ({"at": "10:00", "spreadMinutes": 60, "fallbackZone": "Mars/Olympus"}, "'Mars/Olympus'"),
        ({"at": "10:00", "spreadMinutes": 60, "fallbackZone": "../etc/passwd"}, "fallbackZone"),
        ({"at": "10:00", "spreadMinutes": 60}, "fallbackZone"),
        ({"at": "10:00", "spreadMinutes": 60, "fallbackZone": "UTC", "zone": 1}, "unknown field"),
    ],
)
def test_malformed_local_time_is_refused_with_the_field(raw: object, fragment: str) -> None:
    with pytest.raises(InvalidCampaign) as info:
        parse_local_time(raw)
    assert info.value.reason == "bad_local_time"
    assert fragment in info.value.detail


def test_a_valid_local_time() -> None:
    parsed = parse_local_time({"at": "09:30", "spreadMinutes": 45, "fallbackZone": "Asia/Tokyo"})
    assert parsed == LocalTime(dt.time(9, 30), 2700.0, "Asia/Tokyo")
    assert parse_local_time(None) is None


@pytest.mark.parametrize(
    ("zone", "day", "at", "expected"),
    [
        # New York springs forward on 2026-03-08 at 02:00: 02:30 does not exist; zoneinfo
        # (fold=0) reads it with the offset before the change, EST: 07:30Z (= 03:30 EDT).
        ("America/New_York", dt.date(2026, 3, 8), dt.time(2, 30), utc(2026, 3, 8, 7, 30)),
        ("America/New_York", dt.date(2026, 3, 8), dt.time(1, 30), utc(2026, 3, 8, 6, 30)),
        ("America/New_York", dt.date(2026, 3, 8), dt.time(3, 30), utc(2026, 3, 8, 7, 30)),
        # ...and falls back on 2026-11-01 at 02:00: 01:30 happens twice; the first (EDT) counts.
        ("America/New_York", dt.date(2026, 11, 1), dt.time(1, 30), utc(2026, 11, 1, 5, 30)),
        ("America/New_York", dt.date(2026, 11, 1), dt.time(2, 30), utc(2026, 11, 1, 7, 30)),
        # Paris: 02:30 skipped on 2026-03-29, repeated on 2026-10-25.
        ("Europe/Paris", dt.date(2026, 3, 29), dt.time(2, 30), utc(2026, 3, 29, 1, 30)),
        ("Europe/Paris", dt.date(2026, 10, 25), dt.time(2, 30), utc(2026, 10, 25, 0, 30)),
        ("Asia/Kolkata", dt.date(2026, 6, 1), dt.time(10, 0), utc(2026, 6, 1, 4, 30)),
        ("Pacific/Chatham", dt.date(2026, 6, 1), dt.time(10, 0), utc(2026, 5, 31, 21, 15)),
    ],
)
def test_wall_time_to_an_instant_through_gaps_and_folds(
    zone: str, day: dt.date, at: dt.time, expected: dt.datetime
) -> None:
    assert wall_to_utc(day, at, ZoneInfo(zone)) == expected
    # The reference: zoneinfo's own reading with fold=0.
    reference = dt.datetime.combine(day, at, tzinfo=ZoneInfo(zone)).astimezone(UTC)
    assert reference == expected


@pytest.mark.parametrize(
    ("zone", "start", "expected"),
    [
        # 10:00 Paris (CEST, +2) on the start date is 08:00Z: not yet passed at 06:00Z.
        ("Europe/Paris", utc(2026, 6, 1, 6, 0), utc(2026, 6, 1, 8, 0)),
        # Already passed at 09:00Z: the next day.
        ("Europe/Paris", utc(2026, 6, 1, 9, 0), utc(2026, 6, 2, 8, 0)),
        # Exactly at the start: now, not tomorrow.
        ("Europe/Paris", utc(2026, 6, 1, 8, 0), utc(2026, 6, 1, 8, 0)),
        # The start date is the zone's date: 23:00Z on 1 June is 2 June in Tokyo (10:00 = 01:00Z).
        ("Asia/Tokyo", utc(2026, 6, 1, 23, 0), utc(2026, 6, 2, 1, 0)),
        # Los Angeles (PDT, -7): 10:00 = 17:00Z.
        ("America/Los_Angeles", utc(2026, 6, 1, 6, 0), utc(2026, 6, 1, 17, 0)),
    ],
)
def test_the_instant_is_at_on_the_start_date_or_the_next_day(
    zone: str, start: dt.datetime, expected: dt.datetime
) -> None:
    assert instant_in(zone, TEN, start) == expected


@pytest.mark.parametrize(
    ("customer_zone", "phone", "zone"),
    [
        ("Asia/Tokyo", "+14155550100", "Asia/Tokyo"),  # the customer's own field first
        (" Asia/Tokyo ", None, "Asia/Tokyo"),
        ("Not/AZone", "+14155550100", "America/Los_Angeles"),  # else the number's zone
        (None, "+33612345678", "Europe/Paris"),
        # Several zones for an Australian mobile number (Lord Howe to Cocos): the one whose
        # next 10:00 comes last, so nobody has it before their hour.
        (None, "+61412345678", "Indian/Cocos"),
        (None, None, "Europe/Paris"),  # else the fallback
        (42, "not a number", "Europe/Paris"),
    ],
)
def test_a_recipients_zone(customer_zone: object, phone: str | None, zone: str) -> None:
    start = utc(2026, 5, 31, 12, 0)
    name, due = recipient_instant(TEN, start, customer_zone, phone)
    assert name == zone
    assert due == instant_in(zone, TEN, start)


def test_the_window_is_inclusive() -> None:
    start, end = utc(2026, 6, 1, 0, 0), utc(2026, 6, 1, 12, 0)
    assert in_window(start, start, end)
    assert in_window(end, start, end)
    assert not in_window(end + dt.timedelta(seconds=1), start, end)
    assert not in_window(start - dt.timedelta(seconds=1), start, end)


def test_a_batch_that_cannot_fit_its_spread_is_named_with_its_zone_and_shortfall() -> None:
    start = utc(2026, 6, 1, 0, 0)
    instants = [("Europe/Paris", instant_in("Europe/Paris", TEN, start))] * 3000
    instants += [("Europe/Berlin", instant_in("Europe/Berlin", TEN, start))] * 1000
    instants += [("Asia/Tokyo", instant_in("Asia/Tokyo", TEN, start))] * 100
    batches = group(instants)
    assert list(batches) == [utc(2026, 6, 1, 1, 0), utc(2026, 6, 1, 8, 0)]
    assert batches[utc(2026, 6, 1, 8, 0)] == {"Europe/Paris": 3000, "Europe/Berlin": 1000}
    # 4,000 at 1/s need 66.7 min of a 60-minute spread; Tokyo's 100 fit.
    (short,) = fit(batches, 3600, 1.0)
    assert short.zones == ("Europe/Berlin", "Europe/Paris")
    assert short.recipients == 4000
    assert short.shortfall_s == pytest.approx(400)
    assert "6.7 min more than the 60-minute spread" in str(short)
    assert fit(batches, 3600, 2.0) == []


def test_overlapping_spreads_share_the_budget() -> None:
    a, b = utc(2026, 6, 1, 8, 0), utc(2026, 6, 1, 8, 30)
    # 2,700 at 1/s run 08:00-08:45; the 08:30 batch starts at 08:45 and needs 15 + 50 min.
    batches = {a: {"Europe/Paris": 2700}, b: {"Asia/Kolkata": 3000}}
    (short,) = fit(batches, 3600, 1.0)
    assert short.due_at == b
    assert short.needs_s == pytest.approx(900 + 3000)
    assert fit({b: {"Asia/Kolkata": 3000}}, 3600, 1.0) == []  # alone, it fits
