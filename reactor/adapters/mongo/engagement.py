"""Engagement in MongoDB: the events, the firsts that make counts unique, SMS short links,
the campaign's link table and its `performance.engagement` counters.

    engagement          one document per accepted hit (TTL on `at`): campaign, channel,
                        customer, kind, link, at, class, reasons, agent, ip
    engagement_firsts   `_id` "<kind>:<campaign>:<channel>:<customer>[:<link>]": inserted once,
                        so a batch learns which human opens and clicks are a recipient's first
                        from the duplicate-key errors of one unordered insert (TTL as above)
    short_links         `_id` the SMS short code: campaign, channel, customer, link, at (TTL)

Every write of a batch is an insert or an `$inc`: batches commute, replicas need no lock.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from pymongo import ASCENDING, UpdateOne
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import BulkWriteError

from ...domain.engagement import Earlier
from .actions import campaign_id_variants
from .pipeline import NOW, literal, set_execution

log = logging.getLogger(__name__)

EVENTS = "engagement"
FIRSTS = "engagement_firsts"
SHORT_LINKS = "short_links"
DUPLICATE_KEY = 11000

MessageKey = tuple[str, str, str]  # campaign, channel, customer


def of_campaign(campaign_id: Any) -> dict[str, Any]:
    """The `campaign` condition for a campaign's engagement events. The recorder stores the
    token's key (the id as a string); documents written as the stored `_id` (an ObjectId)
    match too, and MongoDB never equates the two."""
    values = [campaign_id] if isinstance(campaign_id, str) else [campaign_id, str(campaign_id)]
    return {"$in": values}


class MongoEngagement:
    def __init__(self, db: AsyncDatabase[dict[str, Any]], campaigns_collection: str) -> None:
        self.events: AsyncCollection[dict[str, Any]] = db[EVENTS]
        self.firsts: AsyncCollection[dict[str, Any]] = db[FIRSTS]
        self.short_links: AsyncCollection[dict[str, Any]] = db[SHORT_LINKS]
        self.campaigns: AsyncCollection[dict[str, Any]] = db[campaigns_collection]
        self.deliveries: AsyncCollection[dict[str, Any]] = db["deliveries"]

    async def ensure_indexes(self, *, retention_days: float, short_link_days: float) -> None:
        keep_s = int(retention_days * 86400)
        await self.events.create_index("at", name="at_ttl", expireAfterSeconds=keep_s)
        await self.events.create_index(
            [("campaign", ASCENDING), ("customer", ASCENDING), ("at", ASCENDING)],
            name="campaign_customer_at",
        )
        await self.events.create_index(
            [("campaign", ASCENDING), ("kind", ASCENDING), ("class", ASCENDING)],
            name="campaign_kind_class",
        )
        await self.firsts.create_index("at", name="at_ttl", expireAfterSeconds=keep_s)
        await self.short_links.create_index(
            "at", name="at_ttl", expireAfterSeconds=int(short_link_days * 86400)
        )

    # ---- the link table ------------------------------------------------------------------------

    async def record_links(self, campaign_key: str, table: Sequence[str]) -> list[str] | None:
        """Append the destinations not in the campaign's table yet, keeping every recorded
        number's meaning (links already sent point at them); returns the table as stored, or
        None when the campaign is gone. A compare-and-set on the old table, retried."""
        for _ in range(5):
            doc = await self.campaigns.find_one(
                {"_id": {"$in": campaign_id_variants(campaign_key)}}, {"trackedLinks": 1}
            )
            if doc is None:
                return None
            old = doc.get("trackedLinks")
            if old is not None and not isinstance(old, list):
                await self._malformed_table(doc["_id"], old)
                return None
            old = [str(u) for u in old] if isinstance(old, list) else []
            merged = old + [u for u in table if u not in old]
            if merged == old:
                return old
            condition = {"_id": doc["_id"], "trackedLinks": old if old else {"$exists": False}}
            result = await self.campaigns.update_one(condition, {"$set": {"trackedLinks": merged}})
            if result.matched_count:
                return merged
        raise RuntimeError(f"link table of campaign {campaign_key} kept changing")

    async def _malformed_table(self, campaign_id: Any, value: Any) -> None:
        """`trackedLinks` is not a list: the numbers in links already sent mean nothing any
        more, and overwriting it would point them elsewhere. The campaign's messages go out
        untracked, and `execution.lastError` says why (written once, not per batch)."""
        detail = f"trackedLinks must be a list of URLs, not {type(value).__name__}; sent untracked"
        log.warning("campaign %s: %s", campaign_id, detail, extra={"campaign_id": str(campaign_id)})
        await self.campaigns.update_one(
            {"_id": campaign_id, "execution.lastError.detail": {"$ne": detail}},
            [
                set_execution(
                    {
                        "lastError": {
                            "reason": literal("malformed_link_table"),
                            "detail": literal(detail),
                            "at": NOW,
                        }
                    }
                )
            ],
        )

    async def link_table(self, campaign_key: str) -> list[str] | None:
        """The recorded destinations; None when there is no such campaign."""
        doc = await self.campaigns.find_one(
            {"_id": {"$in": campaign_id_variants(campaign_key)}}, {"trackedLinks": 1}
        )
        if doc is None:
            return None
        table = doc.get("trackedLinks")
        return [str(u) for u in table] if isinstance(table, list) else []

    # ---- SMS short links ----------------------------------------------------------------------

    async def save_short_links(self, rows: Sequence[Mapping[str, Any]]) -> None:
        if not rows:
            return
        ops = [UpdateOne({"_id": r["_id"]}, _short_link_update(r), upsert=True) for r in rows]
        await self.short_links.bulk_write(ops, ordered=False)

    async def short_link(self, code: str) -> dict[str, Any] | None:
        return await self.short_links.find_one({"_id": code})

    # ---- what the recorder reads --------------------------------------------------------------

    async def delivered(self, ids: Iterable[str]) -> dict[str, tuple[str, dt.datetime | None]]:
        """{delivery id: (state, when it was last written)} for the ledger rows that exist."""
        cursor = self.deliveries.find(
            {"_id": {"$in": list(dict.fromkeys(ids))}}, {"state": 1, "updatedAt": 1}
        )
        out: dict[str, tuple[str, dt.datetime | None]] = {}
        async for row in cursor:
            at = row.get("updatedAt")
            if isinstance(at, dt.datetime) and at.tzinfo is None:
                at = at.replace(tzinfo=dt.UTC)
            out[str(row["_id"])] = (
                str(row.get("state")),
                at if isinstance(at, dt.datetime) else None,
            )
        return out

    async def earlier_clicks(
        self, keys: Iterable[MessageKey], since: dt.datetime
    ) -> dict[MessageKey, list[Earlier]]:
        keys = list(keys)
        if not keys:
            return {}
        cursor = self.events.find(
            {
                "campaign": {"$in": sorted({k[0] for k in keys})},
                "customer": {"$in": sorted({k[2] for k in keys})},
                "kind": "click",
                "at": {"$gte": since},
            },
            {"campaign": 1, "channel": 1, "customer": 1, "link": 1, "at": 1},
        )
        wanted = set(keys)
        out: dict[MessageKey, list[Earlier]] = {}
        async for doc in cursor:
            key = (str(doc["campaign"]), str(doc["channel"]), str(doc["customer"]))
            if key in wanted:
                at = doc["at"]
                at = at.replace(tzinfo=dt.UTC) if at.tzinfo is None else at
                out.setdefault(key, []).append(Earlier(doc.get("link"), at))
        return out

    # ---- writes -------------------------------------------------------------------------------

    async def insert_events(self, docs: Sequence[dict[str, Any]]) -> None:
        if docs:
            await self.events.insert_many(list(docs), ordered=False)

    async def insert_firsts(self, ids: Sequence[str], at: dt.datetime) -> set[str]:
        """Insert the markers; returns those that were new (the others were there before)."""
        if not ids:
            return set()
        unique = list(dict.fromkeys(ids))
        try:
            await self.firsts.insert_many([{"_id": i, "at": at} for i in unique], ordered=False)
        except BulkWriteError as exc:
            errors = exc.details.get("writeErrors", [])
            if any(e.get("code") != DUPLICATE_KEY for e in errors):
                raise
            taken = {unique[e["index"]] for e in errors}
            return set(unique) - taken
        return set(unique)

    async def add_counters(self, increments: Mapping[str, Mapping[str, int]]) -> None:
        """`$inc` each campaign's `performance.engagement.<name>` by its counts."""
        ops = []
        for campaign_key, counts in increments.items():
            inc = {f"performance.engagement.{k}": v for k, v in counts.items() if v}
            if not inc:
                continue
            ops.append(
                UpdateOne(
                    {
                        "_id": {"$in": campaign_id_variants(campaign_key)},
                        "$or": [
                            {"performance": {"$type": "object"}},
                            {"performance": {"$exists": False}},
                        ],
                    },
                    {"$inc": inc},
                )
            )
        if ops:
            await self.campaigns.bulk_write(ops, ordered=False)


def _short_link_update(row: Mapping[str, Any]) -> dict[str, Any]:
    """A code is the same for every send of one link to one recipient: its first send inserts
    the row, and a resend moves `at` (the TTL's clock and the delivery time hits are timed
    from) to the later send, so the resent link lives its full time (`$max`: batches that land
    out of order never move it back)."""
    fixed = {k: v for k, v in row.items() if k not in ("_id", "at")}
    update: dict[str, Any] = {"$max": {"at": row["at"]}}
    if fixed:
        update["$setOnInsert"] = fixed
    return update
