"""A localTime campaign's plan: its targets grouped by the instant each is due (their own hour
in their own zone, domain/zones.py), read from the recipients in bounded batches.

With a shard store (MongoDB), the plan is written once when the campaign starts, as shards of
at most SHARD_SIZE ids per instant (`persist_plan`); the run then holds one small
`InstantTimer` per distinct instant, and every replica claims an instant's shards from just
before it, under the same ledger as a start's. Without one (in-memory ports), `plan` groups the
ids in memory and the run sends each group itself. Either way a takeover finds the same plan
(a pure function of the customers' data and startDate) and the ledger skips what was sent."""

from __future__ import annotations

import datetime as dt
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..domain.zones import LocalTime, in_window, recipient_instant
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


@dataclass(frozen=True, slots=True)
class InstantTimer:
    """What a run holds per armed instant: when, and how much is due then (never the ids,
    which stay in the instant's shards in the database)."""

    campaign: str
    due_at: dt.datetime
    shards: int
    recipients: int


def timers_from_plan(campaign: str, instants: Sequence[dict[str, Any]]) -> list[InstantTimer]:
    """The armed timers of a persisted plan (`save_local_plan`'s instants), in time order."""
    timers = [
        InstantTimer(
            campaign,
            _aware(row["due"]),
            int(row["shards"]),
            int(row["recipients"]),
        )
        for row in instants
    ]
    return sorted(timers, key=lambda t: t.due_at)


def _aware(value: dt.datetime) -> dt.datetime:
    return value if value.tzinfo is not None else value.replace(tzinfo=dt.UTC)


@dataclass
class _Pending:
    """One instant's ids not yet written to a shard (at most a shard's worth)."""

    ids: list[str] = field(default_factory=list)
    parts: int = 0
    recipients: int = 0


async def persist_plan(
    recipients: Recipients,
    targets: Sequence[str],
    local: LocalTime,
    window: tuple[dt.datetime, dt.datetime],
    *,
    batch_size: int,
    shard_size: int,
    write_shard: Callable[[dt.datetime, int, list[str]], Awaitable[None]],
    outside: Callable[[list[str]], Awaitable[None]],
) -> list[dict[str, Any]]:
    """Write the plan as shards: each instant's ids in slices of at most `shard_size`
    (`write_shard(due, part, ids)`), as they are read in bounded batches; whoever is due
    outside `window` ([startDate, endDate]) goes to `outside` batch by batch. At most one
    unwritten slice per instant is held meanwhile. The instants (due, shards, recipients)."""
    start_at, end_at = window
    pending: dict[dt.datetime, _Pending] = {}
    for batch in chunks(targets, batch_size):
        found = await recipients.resolve(batch)
        skipped: list[str] = []
        for customer in batch:
            r = found.get(customer)
            _, due = recipient_instant(
                local, start_at, r.timezone if r else None, r.phone if r else None
            )
            if not in_window(due, start_at, end_at):
                skipped.append(customer)
                continue
            slot = pending.setdefault(due, _Pending())
            slot.ids.append(customer)
            slot.recipients += 1
            if len(slot.ids) >= shard_size:
                await write_shard(due, slot.parts, slot.ids)
                slot.parts, slot.ids = slot.parts + 1, []
        if skipped:
            await outside(skipped)
    instants = []
    for due, slot in sorted(pending.items()):
        if slot.ids:
            await write_shard(due, slot.parts, slot.ids)
            slot.parts += 1
        instants.append({"due": due, "shards": slot.parts, "recipients": slot.recipients})
    return instants
