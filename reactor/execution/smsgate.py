"""The last rules a text meets while its batch is prepared: a carrier's segment limit, and the
recipient's local hours. A text over the limit is `skipped` (too_many_segments); one that would
land outside the hours waits for them if the campaign is still running then, and is otherwise
`skipped` (quiet_hours). Every decision uses the clock the run decides by (the database's).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass, field

from ..domain.deliveries import DeliveryRecord, DeliveryState
from ..domain.models import Campaign, Channel
from ..domain.sms import LocalHours, next_allowed, zones_for
from ..ports import SmsMessage
from .ledger import Item


@dataclass
class Gated:
    ready: list[Item] = field(default_factory=list)
    waiting: list[tuple[float, Item]] = field(default_factory=list)  # (due, monotonic; item)
    refused: list[DeliveryRecord] = field(default_factory=list)


def gate_sms(
    items: Sequence[Item],
    campaign: Campaign,
    *,
    now: dt.datetime,
    now_m: float,
    default_hours: LocalHours,
    fallback_zone: str,
    max_segments: int,
) -> Gated:
    hours = (campaign.sms.send_hours if campaign.sms else None) or default_hours
    opens: dict[tuple[str, ...], dt.datetime | None] = {}  # one computation per set of zones
    out = Gated()
    for item in items:
        message = item.message
        assert isinstance(message, SmsMessage)
        if message.segments > max_segments:
            out.refused.append(
                _skipped(item, f"too_many_segments:{message.segments}>{max_segments}")
            )
            continue
        zones = zones_for(item.to, fallback_zone)
        if zones not in opens:
            opens[zones] = next_allowed(now, zones, hours)
        opening = opens[zones]
        if opening is None or opening >= campaign.end_at:
            out.refused.append(_skipped(item, "quiet_hours"))
        elif opening <= now:
            out.ready.append(item)
        else:
            out.waiting.append((now_m + (opening - now).total_seconds(), item))
    return out


def _skipped(item: Item, reason: str) -> DeliveryRecord:
    return DeliveryRecord(
        item.customer, Channel.SMS, DeliveryState.SKIPPED, to=item.to, reason=reason
    )
