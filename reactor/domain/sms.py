"""What an SMS must be before it goes: opt-out wording, its segment count, and the hours it may
arrive in the recipient's local time.

Segments are counted as carriers bill them: GSM-7 (160 characters in one part, 153 per part of
a longer one; the extension characters `^{}\\[~]|€` and form feed take two) unless a character is
outside GSM-7, then UCS-2 (70 UTF-16 units in one part, 67 per part).

Quiet hours follow the number: phonenumbers knows the time zones a number may be in; where there
are several, the text goes only when it is inside the allowed hours in every one of them (the
strictest reading, as the US TCPA's 8:00-21:00 is the recipient's local time).
"""

from __future__ import annotations

import datetime as dt
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import phonenumbers
from phonenumbers import timezone as number_zones

_GSM_BASIC = frozenset(
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?¡"
    "ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà"
)
_GSM_EXTENDED = frozenset("^{}\\[~]|€\f")

OPT_OUT_WORDS = re.compile(r"\b(STOP|STOPALL|UNSUBSCRIBE|CANCEL|END|QUIT|OPT[- ]?OUT)\b", re.I)


@dataclass(frozen=True)
class Segments:
    encoding: str  # "GSM-7" | "UCS-2"
    units: int  # septets (GSM-7) or UTF-16 code units (UCS-2)
    count: int


def segments(text: str) -> Segments:
    if all(ch in _GSM_BASIC or ch in _GSM_EXTENDED for ch in text):
        units = sum(2 if ch in _GSM_EXTENDED else 1 for ch in text)
        return Segments("GSM-7", units, 1 if units <= 160 else math.ceil(units / 153))
    units = len(text.encode("utf-16-le")) // 2
    return Segments("UCS-2", units, 1 if units <= 70 else math.ceil(units / 67))


def with_opt_out(body: str, wording: str) -> str:
    """`body` with `wording` appended, unless it already tells people how to opt out."""
    if not wording or OPT_OUT_WORDS.search(body):
        return body
    return f"{body.rstrip()} {wording}"


# ---- quiet hours ------------------------------------------------------------------------------

_HOURS = re.compile(r"^\s*(\d{1,2}):(\d{2})(?::(\d{2}))?\s*-\s*(\d{1,2}):(\d{2})(?::(\d{2}))?\s*$")


@dataclass(frozen=True)
class LocalHours:
    """Hours a text may arrive, in the recipient's local time: [start, end), wrapping past
    midnight when end < start."""

    start: dt.time
    end: dt.time
    all_day: bool = False  # 00:00-24:00: no quiet hours (say, for a country without any)

    def allows(self, local: dt.time) -> bool:
        if self.all_day:
            return True
        if self.start <= self.end:
            return self.start <= local < self.end
        return local >= self.start or local < self.end

    def __str__(self) -> str:
        return "00:00-24:00" if self.all_day else f"{self.start:%H:%M:%S}-{self.end:%H:%M:%S}"


def parse_hours(text: str) -> LocalHours:
    """`HH:MM[:SS]-HH:MM[:SS]`, e.g. `08:00-21:00`; `00:00-24:00` is the whole day."""
    m = _HOURS.match(text)
    if not m:
        raise ValueError("must be HH:MM-HH:MM, e.g. 08:00-21:00")
    h1, m1, s1, h2, m2, s2 = m.groups()
    if (int(h1), int(m1), int(s1 or 0)) == (0, 0, 0) and (h2, m2, s2 or "00") == ("24", "00", "00"):
        return LocalHours(dt.time(0), dt.time(0), all_day=True)
    try:
        start = dt.time(int(h1), int(m1), int(s1 or 0))
        end = dt.time(int(h2), int(m2), int(s2 or 0))
    except ValueError:
        raise ValueError("hours must be 00:00-23:59") from None
    if start == end:
        raise ValueError("start and end must differ")
    return LocalHours(start, end)


@lru_cache(maxsize=65536)
def zones_for(number_e164: str, fallback: str) -> tuple[str, ...]:
    """The time zones a number may be in (phonenumbers), or the fallback when it knows none."""
    try:
        zones = number_zones.time_zones_for_number(phonenumbers.parse(number_e164))
    except phonenumbers.NumberParseException:
        zones = ()
    known = tuple(sorted(z for z in zones if z != number_zones.UNKNOWN_TIMEZONE))
    return known or (fallback,)


@lru_cache(maxsize=1024)
def _zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        return ZoneInfo("UTC")


def allowed_everywhere(when: dt.datetime, zones: Sequence[str], hours: LocalHours) -> bool:
    return all(hours.allows(when.astimezone(_zone(z)).time()) for z in zones)


def next_allowed(
    now: dt.datetime, zones: Sequence[str], hours: LocalHours, *, within_days: int = 3
) -> dt.datetime | None:
    """`now` if a text may arrive now in every zone; else the first instant it may (the latest
    local opening among the zones), or None if the zones' hours never meet within `within_days`."""
    if allowed_everywhere(now, zones, hours):
        return now
    candidates: list[dt.datetime] = []
    for name in zones:
        tz = _zone(name)
        local_day = now.astimezone(tz).date()
        for offset in range(within_days + 1):
            day = local_day + dt.timedelta(days=offset)
            # Wall time -> UTC through the zone's rules for that date: a DST change moves it.
            opening = dt.datetime.combine(day, hours.start, tzinfo=tz).astimezone(dt.UTC)
            if opening > now:
                candidates.append(opening)
    for candidate in sorted(candidates):
        if allowed_everywhere(candidate, zones, hours):
            return candidate
    return None
