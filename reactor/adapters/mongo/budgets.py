"""Cluster-wide rate budgets (`rate_budgets`): one document per channel's bucket, refilled by the
database's clock (`$$NOW`), leased from in slices by one atomic update each (see
`reactor.limits.budgets`). The bucket's state is decided inside the update, never from what a replica
read, so replicas leasing at once cannot take more than it held."""

from __future__ import annotations

import datetime as dt
from typing import Any

from pymongo import ReturnDocument
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase

from .pipeline import NOW, literal

COLLECTION = "rate_budgets"
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


class MongoBudgets:
    def __init__(self, db: AsyncDatabase[dict[str, Any]]) -> None:
        self.collection: AsyncCollection[dict[str, Any]] = db[COLLECTION]

    async def lease(self, key: str, *, rate: float, burst: float, want: int) -> tuple[int, float]:
        elapsed_s = {"$divide": [{"$subtract": [NOW, {"$ifNull": ["$refilledAt", NOW]}]}, 1000]}
        available = {
            "$min": [
                literal(burst),
                {
                    "$add": [
                        {"$ifNull": ["$tokens", literal(burst)]},
                        {"$multiply": [literal(rate), elapsed_s]},
                    ]
                },
            ]
        }
        paused = {"$gt": [{"$ifNull": ["$pausedUntil", literal(_EPOCH)]}, NOW]}
        grant = {
            "$cond": [paused, 0, {"$max": [0, {"$min": [literal(want), {"$floor": available}]}]}]
        }
        doc = await self.collection.find_one_and_update(
            {"_id": key},
            [
                {
                    "$set": {
                        "lastGrant": grant,
                        "tokens": {"$subtract": [available, grant]},
                        "refilledAt": NOW,
                        "rate": literal(rate),
                        "burst": literal(burst),
                        "pausedForMs": {
                            "$cond": [
                                paused,
                                {"$subtract": ["$pausedUntil", NOW]},
                                0,
                            ]
                        },
                    }
                }
            ],
            upsert=True,
            return_document=ReturnDocument.AFTER,
        )
        assert doc is not None
        return int(doc.get("lastGrant", 0)), max(0.0, float(doc.get("pausedForMs", 0)) / 1000)

    async def pause(self, key: str, seconds: float) -> None:
        until = {"$add": [NOW, literal(round(seconds * 1000))]}
        await self.collection.update_one(
            {"_id": key},
            [
                {
                    "$set": {
                        "pausedUntil": {
                            "$max": [{"$ifNull": ["$pausedUntil", literal(_EPOCH)]}, until]
                        }
                    }
                }
            ],
            upsert=True,
        )
