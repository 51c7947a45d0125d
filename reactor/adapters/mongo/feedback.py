"""What providers' webhooks record: each event once (`webhook_events`, by provider and event id),
which campaign a bounce or receipt belongs to (the ledger row, by the Message-ID or SID it
recorded, else the last send to the address), soft-bounce counts per address
(`bounce_counts`), the per-campaign feedback counters, a complaint-rate pause, SMS delivery
statuses on their ledger rows, and when each webhook last received an event (`reactor_state`).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from typing import Any

from pymongo import ASCENDING, DESCENDING, ReturnDocument
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError

from ...domain.feedback import SMS_STATUS_RANK
from .actions import campaign_id_variants
from .feed import STATE_COLLECTION


def _document(field: str) -> dict[str, Any]:
    return {"$cond": [{"$eq": [{"$type": f"${field}"}, "object"]}, f"${field}", {}]}


class MongoFeedback:
    def __init__(self, db: AsyncDatabase[dict[str, Any]], campaigns_collection: str) -> None:
        self.events: AsyncCollection[dict[str, Any]] = db["webhook_events"]
        self.deliveries: AsyncCollection[dict[str, Any]] = db["deliveries"]
        self.bounces: AsyncCollection[dict[str, Any]] = db["bounce_counts"]
        self.campaigns: AsyncCollection[dict[str, Any]] = db[campaigns_collection]
        self.state: AsyncCollection[dict[str, Any]] = db[STATE_COLLECTION]

    async def ensure_indexes(self) -> None:
        # Replays come within days; a week of event ids is kept (TTL).
        await self.events.create_index(
            "receivedAt", name="receivedAt_ttl", expireAfterSeconds=7 * 86400
        )
        await self.deliveries.create_index(
            [("providerId", ASCENDING)], name="providerId", sparse=True
        )
        await self.deliveries.create_index(
            [("to", ASCENDING), ("updatedAt", DESCENDING)], name="to_updatedAt"
        )

    async def first_time(self, provider: str, event_id: str, now: dt.datetime) -> bool:
        """Record the event; False when it was recorded before (a replay)."""
        try:
            await self.events.insert_one({"_id": f"{provider}:{event_id}", "receivedAt": now})
        except DuplicateKeyError:
            return False
        return True

    async def attribute(
        self, channel: str, *, provider_id: str | None, address: str | None
    ) -> tuple[str, str] | None:
        """(campaign, customer) of the delivery this event is about."""
        row = None
        if provider_id:
            row = await self.deliveries.find_one(
                {"providerId": provider_id, "channel": channel}, {"campaign": 1, "customer": 1}
            )
        if row is None and address:
            row = await self.deliveries.find_one(
                {"to": address, "channel": channel, "state": "sent"},
                {"campaign": 1, "customer": 1},
                sort=[("updatedAt", DESCENDING)],
            )
        if row is None:
            return None
        return str(row["campaign"]), str(row["customer"])

    async def soft_bounce(self, address: str, now: dt.datetime) -> int:
        doc = await self.bounces.find_one_and_update(
            {"_id": address},
            {"$inc": {"soft": 1}, "$set": {"lastAt": now}},
            upsert=True,
            return_document=ReturnDocument.AFTER,
        )
        return int((doc or {}).get("soft", 1))

    async def count(self, campaign_key: str, counts: Mapping[str, int]) -> dict[str, Any] | None:
        """Add to `performance.<name>` whatever shape `performance` has; the campaign's
        performance and status after, or None when there is no such campaign."""
        added = {
            name: {"$add": [{"$ifNull": [f"$performance.{name}", 0]}, delta]}
            for name, delta in counts.items()
        }
        doc = await self.campaigns.find_one_and_update(
            {"_id": {"$in": campaign_id_variants(campaign_key)}},
            [{"$set": {"performance": {"$mergeObjects": [_document("performance"), added]}}}],
            projection={"performance": 1, "status": 1},
            return_document=ReturnDocument.AFTER,
        )
        return doc

    async def pause(self, campaign_key: str, reason: str, detail: str) -> bool:
        """A running campaign becomes `paused` with why; False when it was not running."""
        result = await self.campaigns.update_one(
            {"_id": {"$in": campaign_id_variants(campaign_key)}, "status": "running"},
            [
                {
                    "$set": {
                        "status": "paused",
                        "execution": {
                            "$mergeObjects": [
                                _document("execution"),
                                {
                                    "pausedReason": {"$literal": reason},
                                    "lastError": {"$literal": detail},
                                    "pausedAt": "$$NOW",
                                },
                            ]
                        },
                    }
                }
            ],
        )
        return result.modified_count > 0

    async def sms_status(
        self, sid: str, status: str, error_code: str | None, now: dt.datetime
    ) -> tuple[str, str] | None:
        """Record a status on the SMS row Twilio's SID names, unless a later status is there
        already; (campaign, customer) when it applied."""
        rank = SMS_STATUS_RANK.get(status, 0)
        fields: dict[str, Any] = {
            "deliveryStatus": status,
            "deliveryStatusRank": rank,
            "deliveryStatusAt": now,
        }
        if error_code:
            fields["deliveryError"] = error_code
        doc = await self.deliveries.find_one_and_update(
            {
                "providerId": sid,
                "channel": "sms",
                "$or": [
                    {"deliveryStatusRank": {"$exists": False}},
                    {"deliveryStatusRank": {"$lt": rank}},
                ],
            },
            {"$set": fields},
            projection={"campaign": 1, "customer": 1},
        )
        if doc is None:
            return None
        return str(doc["campaign"]), str(doc["customer"])

    async def received(self, provider: str, now: dt.datetime, n: int = 1) -> None:
        await self.state.update_one(
            {"_id": f"webhook:{provider}"},
            {"$set": {"lastEventAt": now}, "$inc": {"events": n}},
            upsert=True,
        )

    async def last_received(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        async for doc in self.state.find({"_id": {"$regex": "^webhook:"}}):
            out[str(doc["_id"]).split(":", 1)[1]] = doc
        return out
