"""Shards of one campaign's audience: how the list is cut, and what a shard is.

A shard is a range of positions in the campaign's `targetedCustomerIds` as stored (before ids
are normalised and de-duplicated), so each owner reads only its slice (`$slice`); or, for a
segment's audience, a range of the chunks it was frozen in at the start (`source` "audience";
chunks of SHARD_SIZE / CHUNKS_PER_SHARD ids, so that its shards are cut as evenly). An id listed
twice may fall in two shards: the ledger's insert-only `pending` mark lets exactly one of them
send it, and the other sees a row of another shard and leaves it alone.

A localTime campaign's shards (`source` "local") each hold a bounded slice of the ids due at one
instant (`due`), written once when the campaign starts: the plan lives in the database, and the
replicas claim an instant's shards like a start's, from just before it.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from enum import StrEnum

CHUNKS_PER_SHARD = 8  # a segment's audience is frozen in chunks this much smaller than a shard


class ShardState(StrEnum):
    OPEN = "open"
    CLAIMED = "claimed"
    HELD = "held"
    DONE = "done"


@dataclass(frozen=True)
class Shard:
    """One claimed shard: which slice, under which fencing epoch."""

    id: str
    index: int
    start: int
    count: int
    epoch: int
    source: str = "list"  # "list": a slice of targetedCustomerIds; "audience": chunk `start`
    rest: bool = False  # a split's second pass: the audience its test did not mark
    due: dt.datetime | None = None  # source "local": the instant its recipients are due


def local_shard_id(campaign: str, due: dt.datetime, part: int) -> str:
    """A localTime campaign's shard: the `part`-th slice of the recipients due at `due`."""
    return f"{campaign}:L{int(due.timestamp() * 1000)}:{part}"


def shard_id(campaign: str, index: int) -> str:
    return f"{campaign}:{index}"


def shard_ranges(total: int, size: int) -> list[tuple[int, int]]:
    """(start, count) of each shard of a list of `total` ids, `size` at most each."""
    if size < 1:
        raise ValueError("shard size must be at least 1")
    return [(start, min(size, total - start)) for start in range(0, total, size)]


def shard_plan(total: int, size: int, slots: int) -> list[tuple[int, int]]:
    """(start, count) of each shard of a list of `total` ids to be sent by `slots` shard slots
    (the live replicas' SHARD_CONCURRENCY summed): the fewest shards of at most `size` ids
    whose number is a multiple of `slots`, all of one size give or take one id.

    Every slot then gets the same number of equal shards, so replicas that send at one pace
    finish together at any audience size (2,400 ids in shards of 500 on 3 replicas of 2 slots:
    6 shards of 400, not 5 taken 2/2/1). Shards never outnumber
    ceil(total / size) + slots - 1: one claim per shard (and one per takeover), so fewer than
    (1 + slots) / size claims per recipient of a campaign larger than `size`."""
    if size < 1:
        raise ValueError("shard size must be at least 1")
    if total <= 0:
        return []
    slots = max(1, slots)
    needed = -(-total // size)
    n = min(total, -(-needed // slots) * slots)  # never an empty shard
    base, extra = divmod(total, n)
    ranges: list[tuple[int, int]] = []
    start = 0
    for i in range(n):
        count = base + (1 if i < extra else 0)
        ranges.append((start, count))
        start += count
    return ranges


def parse_shard(doc: dict[str, object]) -> Shard:
    return Shard(
        id=str(doc["_id"]),
        index=int(doc["index"]),  # type: ignore[call-overload]
        start=int(doc["start"]),  # type: ignore[call-overload]
        count=int(doc["count"]),  # type: ignore[call-overload]
        epoch=int(doc["epoch"]),  # type: ignore[call-overload]
        source=str(doc.get("source") or "list"),
        rest=bool(doc.get("rest")),
        due=_aware(doc.get("due")),
    )


def _aware(value: object) -> dt.datetime | None:
    if not isinstance(value, dt.datetime):
        return None
    return value if value.tzinfo is not None else value.replace(tzinfo=dt.UTC)
