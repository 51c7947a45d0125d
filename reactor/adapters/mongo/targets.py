"""A campaign's target list checked in the database, never read out of it: a list of millions
of ids is judged by one aggregation that returns a count and the first bad value."""

from __future__ import annotations

from typing import Any

from pymongo.asynchronous.collection import AsyncCollection


async def target_problem(
    campaigns: AsyncCollection[dict[str, Any]], campaign_id: Any
) -> str | None:
    """Why the campaign's `targetedCustomerIds` cannot be sent to, without reading the list
    out of the database: not an array, or elements that are not customer ids (strings,
    numbers, ObjectIds; doubles must be whole). None when they can."""
    allowed = ["string", "int", "long", "double", "objectId"]
    # $cond, not $and: mongod's $and short-circuits, mongomock's does not.
    bad = {
        "$cond": [
            {"$in": [{"$type": "$$this"}, allowed]},
            {
                "$cond": [
                    {"$eq": [{"$type": "$$this"}, "double"]},
                    {"$ne": ["$$this", {"$floor": "$$this"}]},
                    False,
                ]
            },
            True,
        ]
    }
    targets = "$targetedCustomerIds"
    cursor = await campaigns.aggregate(
        [
            {"$match": {"_id": campaign_id}},
            {
                "$project": {
                    "kind": {"$type": targets},
                    "bad": {
                        "$cond": [
                            {"$isArray": targets},
                            {"$size": {"$filter": {"input": targets, "cond": bad}}},
                            0,
                        ]
                    },
                    "first": {
                        "$cond": [
                            {"$isArray": targets},
                            {"$arrayElemAt": [{"$filter": {"input": targets, "cond": bad}}, 0]},
                            None,
                        ]
                    },
                }
            },
        ]
    )
    row = await cursor.next() if cursor.alive else None
    await cursor.close()
    if row is None or (row["kind"] in ("missing", "array") and not row["bad"]):
        return None
    if row["kind"] != "array":
        return f"targetedCustomerIds must be a list, got {row['kind']}"
    return (
        f"{row['bad']} targeted customer ids are not strings, whole numbers or ObjectIds "
        f"(first: {row.get('first')!r})"
    )
