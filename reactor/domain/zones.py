"""Send at the recipient's local time: a campaign's `localTime: {at: "HH:MM", spreadMinutes,
fallbackZone}` read and checked, each recipient's zone, and the instant their message is due.

A recipient's zone is the customer's own field (CUSTOMER_TIMEZONE_FIELD, an IANA name), else
the zone of their phone number (phonenumbers, as quiet hours do: where a number may be in
several zones, the one whose `at` comes last, so nobody gets it before their hour), else the
campaign's fallback. Their instant is `at` on the campaign's start date in that zone, or the
next day when that is already before `startDate`.

Wall time becomes an instant through zoneinfo with fold=0: a time a DST gap skips (02:30 on a
spring-forward night) lands where the offset before the change puts it — 03:30 of the new
offset — and a time a fold repeats (01:30 on a fall-back night) is its first occurrence.

Which instants a batch can fill is `fit`: at a budget of `rate` messages a second, `n`
messages take n / rate seconds; a batch that needs more than its spread is reported with its
zone and the shortfall. All pure: tested by tables.
"""

from __future__ import annotations

import datetime as dt
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from .errors import InvalidCampaign
from .sms import zones_for

_AT = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)$")
MAX_SPREAD_MINUTES = 24 * 60


@dataclass(frozen=True)
class LocalTime:
    at: dt.time
    spread_s: float
    fallback_zone: str


def parse_local_time(raw: Any) -> LocalTime | None:
    """A campaign's `localTime`, or None when it has none. Raises InvalidCampaign
    (`bad_local_time`) naming the field and the reason."""
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        raise InvalidCampaign("bad_local_time", "localTime must be a document")
    unknown = sorted(set(raw) - {"at", "spreadMinutes", "fallbackZone"})
    if unknown:
        raise InvalidCampaign("bad_local_time", f"localTime: unknown field(s) {', '.join(unknown)}")
    at = raw.get("at")
    m = _AT.match(at) if isinstance(at, str) else None
    if m is None:
        raise InvalidCampaign(
            "bad_local_time", f"localTime.at must be HH:MM (00:00-23:59), got {str(at)[:20]!r}"
        )
    spread = raw.get("spreadMinutes", 0)
    if (
        not isinstance(spread, int | float)
        or isinstance(spread, bool)
        or not math.isfinite(spread)
        or not 0 < spread <= MAX_SPREAD_MINUTES
    ):
        raise InvalidCampaign(
            "bad_local_time",
            f"localTime.spreadMinutes must be a number of minutes in (0, {MAX_SPREAD_MINUTES}]",
        )
    fallback = raw.get("fallbackZone")
    if not isinstance(fallback, str) or zone(fallback) is None:
        raise InvalidCampaign(
            "bad_local_time",
            f"localTime.fallbackZone {str(fallback)[:40]!r} is not an IANA time zone",
        )
    return LocalTime(dt.time(int(m[1]), int(m[2])), float(spread) * 60, fallback)


@lru_cache(maxsize=1024)
def zone(name: str) -> ZoneInfo | None:
    if not name or len(name) > 64 or name.startswith(("/", ".")) or ".." in name:
        return None
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        return None


def wall_to_utc(day: dt.date, at: dt.time, tz: ZoneInfo) -> dt.datetime:
    """The instant of wall time `at` on `day` in `tz` (fold=0: see the module docstring)."""
    return dt.datetime.combine(day, at, tzinfo=tz).astimezone(dt.UTC)


def instant_in(zone_name: str, local: LocalTime, start_at: dt.datetime) -> dt.datetime:
    """`at` on the start date in the zone, or the next day when that is before `start_at`."""
    tz = zone(zone_name) or zone(local.fallback_zone) or ZoneInfo("UTC")
    day = start_at.astimezone(tz).date()
    due = wall_to_utc(day, local.at, tz)
    if due < start_at:
        due = wall_to_utc(day + dt.timedelta(days=1), local.at, tz)
    return due


def recipient_zone(
    local: LocalTime, start_at: dt.datetime, customer_zone: Any, phone_e164: str | None
) -> str:
    """The zone a recipient's instant is taken in (see the module docstring)."""
    if isinstance(customer_zone, str) and zone(customer_zone.strip()) is not None:
        return customer_zone.strip()
    if phone_e164:
        candidates = [z for z in zones_for(phone_e164, local.fallback_zone) if zone(z) is not None]
        if candidates:
            return max(candidates, key=lambda z: (instant_in(z, local, start_at), z))
    return local.fallback_zone


def recipient_instant(
    local: LocalTime, start_at: dt.datetime, customer_zone: Any, phone_e164: str | None
) -> tuple[str, dt.datetime]:
    name = recipient_zone(local, start_at, customer_zone, phone_e164)
    return name, instant_in(name, local, start_at)


def in_window(due_at: dt.datetime, start_at: dt.datetime, end_at: dt.datetime) -> bool:
    """A recipient whose instant falls outside [startDate, endDate] is skipped (outside_window)."""
    return start_at <= due_at <= end_at


@dataclass(frozen=True)
class Shortfall:
    due_at: dt.datetime
    zones: tuple[str, ...]
    recipients: int
    needs_s: float
    spread_s: float

    @property
    def shortfall_s(self) -> float:
        return self.needs_s - self.spread_s

    def __str__(self) -> str:
        return (
            f"{self.recipients} recipients at {self.due_at:%Y-%m-%d %H:%M}Z "
            f"({', '.join(self.zones)}) need {self.needs_s / 60:.1f} min at the budget, "
            f"{self.shortfall_s / 60:.1f} min more than the {self.spread_s / 60:g}-minute spread"
        )


def group(instants: Iterable[tuple[str, dt.datetime]]) -> dict[dt.datetime, dict[str, int]]:
    """Recipients per instant, and per zone within it (zones sharing an offset share one)."""
    out: dict[dt.datetime, dict[str, int]] = {}
    for name, due in instants:
        zones = out.setdefault(due, {})
        zones[name] = zones.get(name, 0) + 1
    return dict(sorted(out.items()))


def fit(
    batches: Mapping[dt.datetime, Mapping[str, int]], spread_s: float, rate_per_s: float
) -> list[Shortfall]:
    """The batches that cannot be sent within their spread at `rate_per_s`. Batches whose
    spreads overlap share the budget: a batch starts when the earlier ones have had theirs."""
    out: list[Shortfall] = []
    free_at: dt.datetime | None = None  # when the budget is free of the earlier batches
    for due, zones in sorted(batches.items()):
        n = sum(zones.values())
        begins = due if free_at is None or free_at <= due else free_at
        needs_s = (begins - due).total_seconds() + n / rate_per_s
        free_at = begins + dt.timedelta(seconds=n / rate_per_s)
        if needs_s > spread_s:
            out.append(Shortfall(due, tuple(sorted(zones)), n, needs_s, spread_s))
    return out


def distinct(values: Sequence[dt.datetime]) -> list[dt.datetime]:
    return sorted(set(values))
