"""Cluster-wide rate budgets (`rate_budgets`): one document per channel's bucket, refilled by the
database's clock (`$$NOW`), leased from in slices by one atomic update each (see
`reactor.budgets`). The bucket's state is decided inside the update, never from what a replica
read, so replicas leasing at once cannot take more than it held."""

from __future__ import annotations

import datetime as dt
from typing import Any

from pymongo import ReturnDocument
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase

COLLECTION = "rate_budgets"
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


def _lit(value: Any) -> dict[str, Any]:
    return {"$literal": value}


class MongoBudgets:
    def __init__(self, db: AsyncDatabase[dict[str, Any]]) -> None:
        self.collection: AsyncCollection[dict[str, Any]] = db[COLLECTION]

    async def lease(self, key: str, *, rate: float, burst: float, want: int) -> tuple[int, float]:
        elapsed_s = {
            "$divide": [{"$subtract": ["$$NOW", {"$ifNull": ["$refilledAt", "$$NOW"]}]}, 1000]
        }
        available = {
            "$min": [
                _lit(burst),
                {
                    "$add": [
                        {"$ifNull": ["$tokens", _lit(burst)]},
                        {"$multiply": [_lit(rate), elapsed_s]},
                    ]
                },
            ]
        }
        paused = {"$gt": [{"$ifNull": ["$pausedUntil", _lit(_EPOCH)]}, "$$NOW"]}
        grant = {"$cond": [paused, 0, {"$max": [0, {"$min": [_lit(want), {"$floor": available}]}]}]}
        doc = await self.collection.find_one_and_update(
            {"_id": key},
            [
                {
                    "$set": {
                        "lastGrant": grant,
                        "tokens": {"$subtract": [available, grant]},
                        "refilledAt": "$$NOW",
                        "rate": _lit(rate),
                        "burst": _lit(burst),
                        "pausedForMs": {
                            "$cond": [
                                paused,
                                {"$subtract": ["$pausedUntil", "$$NOW"]},
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
        until = {"$add": ["$$NOW", _lit(round(seconds * 1000))]}
        await self.collection.update_one(
            {"_id": key},
            [
                {
                    "$set": {
                        "pausedUntil": {
                            "$max": [{"$ifNull": ["$pausedUntil", _lit(_EPOCH)]}, until]
                        }
                    }
                }
            ],
            upsert=True,
        )
