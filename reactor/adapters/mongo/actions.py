"""What the public listener reads and counts about the campaign a recipient's link came from:
its name (for the page), the address a delivery went to (so an unsubscribe also suppresses the
address), and `performance.unsubscribes`.

None of these writes is fenced by an execution's epoch: a recipient's action is a fact whichever
replica owns the run, and `unsubscribes` is a field no run writes.
"""

from __future__ import annotations

from typing import Any

from bson import ObjectId
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase

from ...domain.deliveries import delivery_id
from .pipeline import document_or_empty


def campaign_id_variants(key: str) -> list[Any]:
    """The `_id` values a campaign key (the string of its `_id`) may stand for."""
    out: list[Any] = [key]
    if len(key) == 24 and ObjectId.is_valid(key):
        out.append(ObjectId(key))
    if key.lstrip("-").isdigit() and len(key) < 19:
        out.append(int(key))
    return out


class MongoRecipientActions:
    def __init__(self, db: AsyncDatabase[dict[str, Any]], campaigns_collection: str) -> None:
        self.campaigns: AsyncCollection[dict[str, Any]] = db[campaigns_collection]
        self.deliveries: AsyncCollection[dict[str, Any]] = db["deliveries"]

    async def campaign_name(self, campaign_key: str) -> str | None:
        """The campaign's name ("" when it has none), or None when there is no such campaign."""
        doc = await self.campaigns.find_one(
            {"_id": {"$in": campaign_id_variants(campaign_key)}}, {"name": 1}
        )
        if doc is None:
            return None
        name = doc.get("name")
        return name if isinstance(name, str) else ""

    async def delivered_to(self, campaign_key: str, channel: str, customer: str) -> str | None:
        """The address or number the ledger says this campaign's delivery went to."""
        row = await self.deliveries.find_one(
            {"_id": delivery_id(campaign_key, channel, customer)}, {"to": 1}
        )
        to = row.get("to") if row else None
        return to if isinstance(to, str) and to else None

    async def add_unsubscribes(self, campaign_key: str, delta: int) -> bool:
        """Add `delta` (never below 0) to `performance.unsubscribes`, whatever shape
        `performance` has; False when no such campaign exists."""
        count = {"$ifNull": ["$performance.unsubscribes", 0]}
        result = await self.campaigns.update_one(
            {"_id": {"$in": campaign_id_variants(campaign_key)}},
            [
                {
                    "$set": {
                        "performance": {
                            "$mergeObjects": [
                                document_or_empty("performance"),
                                {"unsubscribes": {"$max": [0, {"$add": [count, delta]}]}},
                            ]
                        }
                    }
                }
            ],
        )
        return result.matched_count > 0
