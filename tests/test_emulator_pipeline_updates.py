"""Update pipelines of `$set` stages on documents with long arrays, through the real driver: the
result, the change event and a unique-index refusal are mongod's (the embedded server applies
such pipelines without copying the untouched fields; these tests hold it to the same answers).
With REACTOR_TEST_MONGO_URI set they run unchanged against a real replica set."""

from __future__ import annotations

from typing import Any

import pytest
from pymongo import ReturnDocument
from pymongo.errors import DuplicateKeyError

from tests.conftest import MongoTarget

TARGETS = [str(i) for i in range(5_000)]
COUNT = [
    {
        "$set": {
            "performance": {
                "$mergeObjects": [
                    {"$ifNull": ["$performance", {}]},
                    {"bounces": {"$add": [{"$ifNull": ["$performance.bounces", 0]}, 2]}},
                ]
            }
        }
    }
]


@pytest.fixture
def db(client: Any, mongo: MongoTarget) -> Any:
    return client[mongo.campaigns_db]


async def test_a_set_pipeline_changes_only_what_it_names(db: Any) -> None:
    coll = db.pipeline_counts
    await coll.insert_one({"_id": 1, "targets": TARGETS, "performance": {"emailsSent": 7}})
    doc = await coll.find_one_and_update({"_id": 1}, COUNT, return_document=ReturnDocument.AFTER)
    assert doc["performance"] == {"emailsSent": 7, "bounces": 2}
    assert doc["targets"] == TARGETS
    await coll.update_one({"_id": 1}, [*COUNT, {"$set": {"note": "$$REMOVE", "x": "$_id"}}])
    stored = await coll.find_one({"_id": 1})
    assert list(stored) == ["_id", "targets", "performance", "x"]
    assert stored["performance"]["bounces"] == 4
    assert stored["x"] == 1


async def test_the_change_event_describes_the_pipeline_s_change(db: Any) -> None:
    coll = db.pipeline_events
    await coll.insert_one({"_id": 1, "targets": TARGETS, "performance": {"emailsSent": 7}})
    async with await coll.watch() as stream:
        await coll.update_one({"_id": 1}, COUNT)
        event = await stream.next()
    described = event["updateDescription"]
    assert event["operationType"] == "update"
    changed = {**described["updatedFields"]}
    # mongod may name the whole sub-document or only the new field; either way, only it.
    assert changed in ({"performance": {"emailsSent": 7, "bounces": 2}}, {"performance.bounces": 2})
    assert described["removedFields"] == []


async def test_a_pipeline_that_breaks_a_unique_index_changes_nothing(db: Any) -> None:
    coll = db.pipeline_unique
    await coll.create_index("code", unique=True)
    await coll.insert_many(
        [{"_id": 1, "code": "a", "targets": TARGETS}, {"_id": 2, "code": "b", "n": 1}]
    )
    with pytest.raises(DuplicateKeyError):
        await coll.update_one({"_id": 2}, [{"$set": {"code": "a", "n": {"$add": ["$n", 1]}}}])
    assert await coll.find_one({"_id": 2}) == {"_id": 2, "code": "b", "n": 1}
    assert (await coll.find_one({"_id": 1}))["targets"] == TARGETS
