"""Shards of a started campaign (`campaign_shards`): one document per slice of its audience, each
claimed with its own fenced lease, exactly as a campaign is (a compare-and-set on `state` and
`epoch`, leases written as `$$NOW + lease`, expiry judged by `$$NOW`).

States: `open` (anyone may claim it), `claimed` (an owner sends it while its lease holds; an
expired lease is claimable again, with the next epoch), `held` (the campaign is paused or its
window closed: only the campaign's owner may claim it, to close it), `done`.

A localTime campaign's shards (`source` "local") carry their slice of ids and their instant;
an open one is claimable from its `notBefore` (its `leaseUntil` starts there), and its plan doc
lists the campaign's instants once every shard is written.

Replicas that claim shards announce themselves in `shard_replicas` (their shard slots, until
`$$NOW + lease`), so a campaign's owner can cut its audience for the replicas alive now.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from pymongo import ASCENDING, ReturnDocument
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError

from ...domain.shards import ShardState, local_shard_id, shard_id
from .pipeline import NOW, literal, now_plus

COLLECTION = "campaign_shards"
REPLICAS = "shard_replicas"
PLANS = "campaign_shard_plans"


def _lease_expired() -> dict[str, Any]:
    return {"$lte": [{"$ifNull": ["$leaseUntil", None]}, NOW]}


def _claim(owner: str, lease_s: float) -> list[dict[str, Any]]:
    return [
        {
            "$set": {
                "state": literal(ShardState.CLAIMED.value),
                "owner": literal(owner),
                "epoch": {"$add": [{"$ifNull": ["$epoch", 0]}, 1]},
                "leaseUntil": now_plus(lease_s),
                "claimedAt": NOW,
            }
        }
    ]


class MongoShards:
    def __init__(self, db: AsyncDatabase[dict[str, Any]]) -> None:
        self.collection: AsyncCollection[dict[str, Any]] = db[COLLECTION]
        self.replicas: AsyncCollection[dict[str, Any]] = db[REPLICAS]
        self.plans: AsyncCollection[dict[str, Any]] = db[PLANS]

    async def ensure_indexes(self) -> None:
        await self.collection.create_index(
            [("state", ASCENDING), ("leaseUntil", ASCENDING)], name="state_leaseUntil"
        )
        await self.collection.create_index(
            [("campaign", ASCENDING), ("index", ASCENDING)], name="campaign_index"
        )
        # Announcements of replicas gone for an hour (each start may bring a new id) go.
        await self.replicas.create_index("seenUntil", name="seenUntil_ttl", expireAfterSeconds=3600)

    async def create(
        self,
        campaign: str,
        campaign_id: Any,
        ranges: list[tuple[int, int]],
        source: str = "list",
        name: str | None = None,
        rest: bool = False,
    ) -> list[tuple[int, int]]:
        """One `open` shard per (start, count) of the audience, as planned by the campaign's
        first owner: the plan is written once (`campaign_shard_plans`), so an owner that takes
        the campaign over with other replicas alive creates the same shards, never overlapping
        ones. Shards that exist are left as they are. With `rest` (a split's second pass), one
        more shard per planned range, indexed after the plan's. The ranges created."""
        legacy = await self._legacy_plan(campaign)
        if legacy is not None:
            ranges = legacy
        try:
            await self.plans.update_one(
                {"_id": campaign},
                {"$setOnInsert": {"ranges": [list(r) for r in ranges], "source": source}},
                upsert=True,
            )
        except DuplicateKeyError:  # two owners of successive epochs planning at once
            pass
        plan = await self.plans.find_one({"_id": campaign})
        assert plan is not None  # written above, and only ever deleted with the database
        ranges = [(int(start), int(count)) for start, count in plan["ranges"]]
        planned = len(ranges)
        if rest:
            ranges = ranges + ranges
        source = str(plan.get("source") or source)
        for index, (start, count) in enumerate(ranges):
            try:
                await self.collection.update_one(
                    {"_id": shard_id(campaign, index)},
                    {
                        "$setOnInsert": {
                            "campaign": campaign,
                            "campaignId": campaign_id,
                            "index": index,
                            "start": start,
                            "count": count,
                            "source": source,
                            "rest": index >= planned,
                            "name": name,  # the campaign's, for its owners' logs
                            "state": ShardState.OPEN.value,
                            "epoch": 0,
                            "owner": None,
                            "leaseUntil": None,
                        }
                    },
                    upsert=True,
                )
            except DuplicateKeyError:  # two owners of successive epochs creating at once
                pass
        return ranges

    async def _legacy_plan(self, campaign: str) -> list[tuple[int, int]] | None:
        """The ranges of shards created before plans were written (a campaign sent across an
        upgrade): kept as they are, so that no new shard overlaps them."""
        if await self.plans.find_one({"_id": campaign}, {"_id": 1}) is not None:
            return None
        rows = (
            await self.collection.find({"campaign": campaign}, {"start": 1, "count": 1})
            .sort("index", ASCENDING)
            .to_list()
        )
        return [(int(r["start"]), int(r["count"])) for r in rows] or None

    async def claim_next(self, *, owner: str, lease_s: float) -> dict[str, Any] | None:
        """Any `open` shard, or a `claimed` one whose lease expired: now this owner's, with the
        next epoch. None when there is none."""
        return await self.collection.find_one_and_update(
            {
                "state": {"$in": [ShardState.OPEN.value, ShardState.CLAIMED.value]},
                "$expr": _lease_expired(),
            },
            _claim(owner, lease_s),
            sort=[("campaign", ASCENDING), ("index", ASCENDING)],
            return_document=ReturnDocument.AFTER,
        )

    async def claim_to_close(
        self, shard: str, *, owner: str, lease_s: float
    ) -> dict[str, Any] | None:
        """A `held` shard, or any unfinished one whose lease expired, for the campaign's owner
        to close (its window closed): its rest is recorded skipped."""
        return await self.collection.find_one_and_update(
            {
                "_id": shard,
                "$or": [
                    {"state": ShardState.HELD.value},
                    {
                        "state": {"$in": [ShardState.OPEN.value, ShardState.CLAIMED.value]},
                        "$expr": _lease_expired(),
                    },
                ],
            },
            _claim(owner, lease_s),
            return_document=ReturnDocument.AFTER,
        )

    async def heartbeat(self, shard: str, *, epoch: int, owner: str, lease_s: float) -> bool:
        result = await self.collection.update_one(
            {"_id": shard, "epoch": epoch, "owner": owner, "state": ShardState.CLAIMED.value},
            [{"$set": {"leaseUntil": now_plus(lease_s)}}],
        )
        return result.matched_count > 0

    async def release(
        self, shard: str, *, epoch: int, hold: bool = False, retry_after_s: float = 0.0
    ) -> bool:
        """Give the shard up: `open` for anyone (after `retry_after_s`), or `held` while its
        campaign is paused."""
        state = ShardState.HELD if hold else ShardState.OPEN
        result = await self.collection.update_one(
            {"_id": shard, "epoch": epoch, "state": ShardState.CLAIMED.value},
            [
                {
                    "$set": {
                        "state": literal(state.value),
                        "owner": None,
                        "leaseUntil": now_plus(retry_after_s),
                        "releasedAt": NOW,
                    }
                }
            ],
        )
        return result.modified_count > 0

    async def finish(self, shard: str, *, epoch: int) -> bool:
        result = await self.collection.update_one(
            {"_id": shard, "epoch": epoch, "state": ShardState.CLAIMED.value},
            [
                {
                    "$set": {  # the owner stays: who sent it
                        "state": literal(ShardState.DONE.value),
                        "leaseUntil": None,
                        "doneAt": NOW,
                    }
                }
            ],
        )
        return result.modified_count > 0

    async def hold(self, campaign: str) -> int:
        """No new claims of the campaign's open shards (it is paused, or its window closed)."""
        result = await self.collection.update_many(
            {"campaign": campaign, "state": ShardState.OPEN.value},
            {"$set": {"state": ShardState.HELD.value}},
        )
        return result.modified_count

    async def reopen(self, campaign: str) -> int:
        """The campaign runs again: its held shards may be claimed."""
        result = await self.collection.update_many(
            {"campaign": campaign, "state": ShardState.HELD.value},
            # A local-time shard is claimable again from its instant's wake-up, not at once.
            [
                {
                    "$set": {
                        "state": literal(ShardState.OPEN.value),
                        "leaseUntil": {"$ifNull": ["$notBefore", None]},
                    }
                }
            ],
        )
        return result.modified_count

    async def create_local(
        self,
        campaign: str,
        campaign_id: Any,
        *,
        index: int,
        due: dt.datetime,
        part: int,
        ids: list[str],
        not_before: dt.datetime,
        name: str | None = None,
    ) -> None:
        """One `open` shard of the ids due at `due`, claimable from `not_before`. Idempotent
        (a takeover that plans again writes the same ids under the same key)."""
        try:
            await self.collection.update_one(
                {"_id": local_shard_id(campaign, due, part)},
                {
                    "$setOnInsert": {
                        "campaign": campaign,
                        "campaignId": campaign_id,
                        "index": index,
                        "start": 0,
                        "count": len(ids),
                        "source": "local",
                        "due": due,
                        "notBefore": not_before,
                        "ids": ids,
                        "rest": False,
                        "name": name,
                        "state": ShardState.OPEN.value,
                        "epoch": 0,
                        "owner": None,
                        "leaseUntil": not_before,
                    }
                },
                upsert=True,
            )
        except DuplicateKeyError:  # two owners of successive epochs planning at once
            pass

    async def local_ids(self, shard: str) -> list[Any]:
        doc = await self.collection.find_one({"_id": shard}, {"ids": 1})
        return list((doc or {}).get("ids") or [])

    async def save_local_plan(self, campaign: str, instants: list[dict[str, Any]]) -> None:
        """Every shard of the campaign's local-time plan is written: its instants (due, shards,
        recipients), which whoever owns the campaign arms."""
        await self.plans.update_one(
            {"_id": campaign},
            {"$setOnInsert": {"source": "local", "instants": instants}},
            upsert=True,
        )

    async def local_plan(self, campaign: str) -> list[dict[str, Any]] | None:
        doc = await self.plans.find_one({"_id": campaign, "source": "local"})
        return None if doc is None else list(doc.get("instants") or [])

    async def unfinished(self, campaign: str) -> list[dict[str, Any]]:
        """The campaign's shards that are not done, with whether each lease has expired."""
        cursor = await self.collection.aggregate(
            [
                {"$match": {"campaign": campaign, "state": {"$ne": ShardState.DONE.value}}},
                {
                    "$project": {
                        "index": 1,
                        "state": 1,
                        "owner": 1,
                        "epoch": 1,
                        "expired": _lease_expired(),
                    }
                },
                {"$sort": {"index": 1}},
            ]
        )
        return await cursor.to_list()

    async def summary(self, campaign: str) -> dict[str, int]:
        """{state: number of shards} for `reactor doctor`."""
        cursor = await self.collection.aggregate(
            [
                {"$match": {"campaign": campaign}},
                {"$group": {"_id": "$state", "n": {"$sum": 1}}},
            ]
        )
        return {str(row["_id"]): int(row["n"]) async for row in cursor}

    async def announce(self, owner: str, *, slots: int, lease_s: float) -> None:
        """This replica claims shards, `slots` at once, until the database's now + `lease_s`
        unless it announces itself again."""
        await self.replicas.update_one(
            {"_id": owner},
            [{"$set": {"slots": literal(slots), "seenUntil": now_plus(lease_s)}}],
            upsert=True,
        )

    async def withdraw(self, owner: str) -> None:
        """This replica stops claiming shards (it shuts down): no longer counted."""
        await self.replicas.delete_one({"_id": owner})

    async def live_slots(self) -> int:
        """Shard slots of the replicas whose announcement has not expired (by `$$NOW`)."""
        cursor = await self.replicas.aggregate(
            [
                {"$match": {"$expr": {"$gt": ["$seenUntil", NOW]}}},
                {"$group": {"_id": None, "slots": {"$sum": "$slots"}}},
            ]
        )
        rows = await cursor.to_list()
        return int(rows[0]["slots"]) if rows else 0
