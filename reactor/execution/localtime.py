"""A localTime campaign's plan: its targets grouped by the instant each is due (their own hour
in their own zone, domain/zones.py), read from the recipients in bounded batches. The run sends
each group at its instant through the same window and ledger as any batch; a takeover computes
the same plan (a pure function of the customers' data and startDate) and the ledger skips what
was sent."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence

from ..domain.zones import LocalTime, recipient_instant
from ..ports import Recipients
from .prepare import chunks


async def plan(
    recipients: Recipients,
    targets: Sequence[str],
    local: LocalTime,
    start_at: dt.datetime,
    batch_size: int,
) -> dict[dt.datetime, list[str]]:
    """Targets by instant, in time order (a customer not found is planned at the fallback
    zone's instant; the send records them `not_found`)."""
    groups: dict[dt.datetime, list[str]] = {}
    for batch in chunks(targets, batch_size):
        found = await recipients.resolve(batch)
        for customer in batch:
            r = found.get(customer)
            _, due = recipient_instant(
                local, start_at, r.timezone if r else None, r.phone if r else None
            )
            groups.setdefault(due, []).append(customer)
    return dict(sorted(groups.items()))


async def plan_with_zones(
    recipients: Recipients,
    targets: Sequence[str],
    local: LocalTime,
    start_at: dt.datetime,
    batch_size: int,
) -> dict[dt.datetime, dict[str, int]]:
    """Recipients per instant and zone: what `zones.fit` judges at arming."""
    out: dict[dt.datetime, dict[str, int]] = {}
    for batch in chunks(targets, batch_size):
        found = await recipients.resolve(batch)
        for customer in batch:
            r = found.get(customer)
            zone, due = recipient_instant(
                local, start_at, r.timezone if r else None, r.phone if r else None
            )
            counts = out.setdefault(due, {})
            counts[zone] = counts.get(zone, 0) + 1
    return dict(sorted(out.items()))
