"""The outbox in MongoDB: events under their unique key, and one delivery row per destination.

`notification_outbox` holds each event once: its `_id` is the key derived from the state change
(events.event_key), so replicas racing to report one change insert one document and the others
get a duplicate-key error. The winner then writes the event's delivery rows into
`notification_queue`, one per destination that wants it (`_id` = key|destination, so a repeat
is harmless), and marks the event fanned out. A replica that dies between the two leaves the
event unfanned; any replica's courier fans out such events a few seconds later.

A delivery row is claimed under a lease (owner, leaseUntil): a replica killed mid-delivery leaves
a lease that expires, and another replica delivers the same row, with the same webhook-id. Rows
are delivered in order per lane (destination and campaign): only the oldest undelivered row of a
lane may be claimed, so an event waits behind an earlier one that is in back-off.

Times here are the reactor's clock (the database's, as measured by DatabaseClock), passed in as
values: back-off and leases are then driven by a test's fake clock.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Sequence
from typing import Any

from pymongo import ASCENDING, ReturnDocument
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import BulkWriteError, DuplicateKeyError

from .events import Event

OUTBOX = "notification_outbox"
QUEUE = "notification_queue"
PENDING, DELIVERED, DEAD = "pending", "delivered", "dead"
# Within one lane and one millisecond, a start comes before what happens to the run, and that
# before the end.
RANK = {"campaign.started": 0, "campaign.completed": 2, "campaign.completed_short": 2}
DELIVERED_KEEP_S = 7 * 86400  # delivered rows are kept this long (the doctor's last success)
DEAD_KEEP_S = 30 * 86400


class MongoOutbox:
    def __init__(self, db: AsyncDatabase[dict[str, Any]]) -> None:
        self.events: AsyncCollection[dict[str, Any]] = db[OUTBOX]
        self.queue: AsyncCollection[dict[str, Any]] = db[QUEUE]

    async def ensure_indexes(self) -> None:
        await self.events.create_index([("fanned", ASCENDING), ("at", ASCENDING)], name="fanned_at")
        await self.events.create_index("expireAt", name="expireAt_ttl", expireAfterSeconds=0)
        await self.queue.create_index(
            [("state", ASCENDING), ("lane", ASCENDING), ("at", ASCENDING)], name="state_lane_at"
        )
        await self.queue.create_index(
            [("dest", ASCENDING), ("state", ASCENDING)], name="dest_state"
        )
        await self.queue.create_index("expireAt", name="expireAt_ttl", expireAfterSeconds=0)

    # ---- writing events ----------------------------------------------------------------------

    async def insert(self, event: Event, destinations: Iterable[tuple[str, str]]) -> bool:
        """Store `event` once (False: some replica stored it already) and fan it out to
        `destinations` ((id, kind) pairs)."""
        doc = {
            "_id": event.key,
            "type": event.type,
            "campaign": event.campaign,
            "at": event.at,
            "webhookId": event.webhook_id,
            "payload": event.payload(),
            "fanned": False,
            "expireAt": event.at + dt.timedelta(seconds=DEAD_KEEP_S),
        }
        try:
            await self.events.insert_one(doc)
        except DuplicateKeyError:
            return False
        await self.fan_out(doc, destinations)
        return True

    async def fan_out(self, event: dict[str, Any], destinations: Iterable[tuple[str, str]]) -> int:
        """Write the event's delivery rows (repeats are no-ops), then mark it fanned out."""
        rows = [
            {
                "_id": f"{event['_id']}|{dest}",
                "event": event["_id"],
                "dest": dest,
                "kind": kind,
                "type": event["type"],
                "campaign": event["campaign"],
                "lane": f"{dest}|{event['campaign']}",
                "at": event["at"],
                "rank": RANK.get(str(event["type"]), 1),
                "webhookId": event["webhookId"],
                "payload": event["payload"],
                "state": PENDING,
                "attempts": 0,
                "nextAt": event["at"],
                "leaseUntil": None,
                "owner": None,
            }
            for dest, kind in destinations
        ]
        written = 0
        if rows:
            try:
                result = await self.queue.insert_many(rows, ordered=False)
                written = len(result.inserted_ids)
            except BulkWriteError as exc:
                errors = exc.details.get("writeErrors", [])
                if any(e.get("code") != 11000 for e in errors):
                    raise
                written = len(rows) - len(errors)
        await self.events.update_one({"_id": event["_id"]}, {"$set": {"fanned": True}})
        return written

    async def unfanned(self, before: dt.datetime, limit: int = 100) -> list[dict[str, Any]]:
        """Events whose writer died before fanning them out."""
        cursor = self.events.find({"fanned": False, "at": {"$lt": before}}).limit(limit)
        return await cursor.to_list()

    async def has(self, keys: Sequence[str]) -> set[str]:
        return {d["_id"] async for d in self.events.find({"_id": {"$in": list(keys)}}, {"_id": 1})}

    # ---- delivering --------------------------------------------------------------------------

    async def heads(
        self, now: dt.datetime, limit: int, skip_dests: Sequence[str] = ()
    ) -> list[dict[str, Any]]:
        """The oldest undelivered row of each lane, if it is due and not leased."""
        match: dict[str, Any] = {"state": PENDING}
        if skip_dests:
            match["dest"] = {"$nin": list(skip_dests)}
        cursor = await self.queue.aggregate(
            [
                {"$match": match},
                {"$sort": {"lane": 1, "at": 1, "rank": 1, "_id": 1}},
                {"$group": {"_id": "$lane", "row": {"$first": "$$ROOT"}}},
                {"$replaceRoot": {"newRoot": "$row"}},
                {
                    "$match": {
                        "nextAt": {"$lte": now},
                        "$or": [{"leaseUntil": None}, {"leaseUntil": {"$lte": now}}],
                    }
                },
                {"$sort": {"at": 1}},
                {"$limit": limit},
            ]
        )
        return await cursor.to_list()

    async def claim(
        self, row_id: str, *, owner: str, now: dt.datetime, lease_s: float
    ) -> dict[str, Any] | None:
        """The row, leased to `owner`, if it is still pending, due and unleased."""
        return await self.queue.find_one_and_update(
            {
                "_id": row_id,
                "state": PENDING,
                "nextAt": {"$lte": now},
                "$or": [{"leaseUntil": None}, {"leaseUntil": {"$lte": now}}],
            },
            {
                "$set": {
                    "owner": owner,
                    "leaseUntil": now + dt.timedelta(seconds=lease_s),
                    "claimedAt": now,
                },
                "$inc": {"attempts": 1},
            },
            return_document=ReturnDocument.AFTER,
        )

    async def delivered(self, row: dict[str, Any], now: dt.datetime, status: int | None) -> bool:
        return await self._settle(
            row,
            {
                "state": DELIVERED,
                "deliveredAt": now,
                "status": status,
                "leaseUntil": None,
                "expireAt": now + dt.timedelta(seconds=DELIVERED_KEEP_S),
            },
        )

    async def retry(self, row: dict[str, Any], next_at: dt.datetime, error: str) -> bool:
        return await self._settle(
            row, {"nextAt": next_at, "lastError": error, "leaseUntil": None, "owner": None}
        )

    async def dead(self, row: dict[str, Any], now: dt.datetime, error: str) -> bool:
        return await self._settle(
            row,
            {
                "state": DEAD,
                "deadAt": now,
                "lastError": error,
                "leaseUntil": None,
                "expireAt": now + dt.timedelta(seconds=DEAD_KEEP_S),
            },
        )

    async def release(self, owner: str, row_ids: Sequence[str]) -> int:
        """Give back rows `owner` is delivering (at shutdown): another instance may claim them
        at once instead of after the lease. The attempt may still land: same webhook-id."""
        if not row_ids:
            return 0
        result = await self.queue.update_many(
            {"_id": {"$in": list(row_ids)}, "state": PENDING, "owner": owner},
            {"$set": {"leaseUntil": None, "owner": None}},
        )
        return result.modified_count

    async def _settle(self, row: dict[str, Any], fields: dict[str, Any]) -> bool:
        """Write the outcome of the attempt `row` was claimed for: only while that claim is
        the row's (same owner and attempt), so a stale deliverer never overwrites a newer one."""
        result = await self.queue.update_one(
            {
                "_id": row["_id"],
                "state": PENDING,
                "owner": row["owner"],
                "attempts": row["attempts"],
            },
            {"$set": fields},
        )
        return result.modified_count > 0

    # ---- what operators see -----------------------------------------------------------------

    async def stats(self, dests: Sequence[str]) -> dict[str, Any]:
        """Backlog (pending rows), the oldest pending `at`, and dead rows of `dests` (the
        destinations in force), cluster-wide."""
        match: dict[str, Any] = {"state": {"$in": [PENDING, DEAD]}, "dest": {"$in": list(dests)}}
        cursor = await self.queue.aggregate(
            [
                {"$match": match},
                {"$group": {"_id": "$state", "n": {"$sum": 1}, "oldest": {"$min": "$at"}}},
            ]
        )
        out: dict[str, Any] = {"backlog": 0, "oldest": None, "dead": 0}
        async for row in cursor:
            if row["_id"] == PENDING:
                out["backlog"], out["oldest"] = int(row["n"]), row["oldest"]
            else:
                out["dead"] = int(row["n"])
        return out

    async def per_destination(self) -> dict[str, dict[str, Any]]:
        """{destination: {pending, dead, delivered, lastSuccessAt, oldestPendingAt, lastError}}."""
        cursor = await self.queue.aggregate(
            [
                {
                    "$group": {
                        "_id": {"dest": "$dest", "state": "$state"},
                        "n": {"$sum": 1},
                        "last": {"$max": "$deliveredAt"},
                        "oldest": {"$min": "$at"},
                        "error": {"$last": "$lastError"},
                    }
                }
            ]
        )
        out: dict[str, dict[str, Any]] = {}
        async for row in cursor:
            entry = out.setdefault(
                str(row["_id"]["dest"]),
                {PENDING: 0, DEAD: 0, DELIVERED: 0, "lastSuccessAt": None},
            )
            state = str(row["_id"]["state"])
            entry[state] = int(row["n"])
            if state == DELIVERED:
                entry["lastSuccessAt"] = row.get("last")
            if state == PENDING:
                entry["oldestPendingAt"] = row.get("oldest")
                entry["lastError"] = row.get("error")
        return out
