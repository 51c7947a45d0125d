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


async def test_the_stand_in_does_not_copy_what_a_set_pipeline_leaves_alone(
    db: Any, mongo: MongoTarget, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A counter update of a campaign must not cost its target list (it did: a deep copy and a
    diff of every element, per webhook event, on the server every request waits behind)."""
    mongo.require_emulator()
    import copy

    from reactor.embedded.mongo.commands import updating

    coll = db.pipeline_copies
    await coll.insert_one({"_id": 1, "targets": TARGETS, "performance": {"emailsSent": 7}})
    copied: list[str] = []
    real_deepcopy, real_clone = copy.deepcopy, getattr(updating, "clone")  # noqa: B009

    def deepcopy(value: Any, memo: Any = None) -> Any:
        if value == TARGETS or (isinstance(value, dict) and "targets" in value):
            copied.append("deepcopy")
        return real_deepcopy(value, memo)

    def clone(value: Any) -> Any:
        if value == TARGETS or (isinstance(value, dict) and "targets" in value):
            copied.append("clone")
        return real_clone(value)

    monkeypatch.setattr(copy, "deepcopy", deepcopy)
    monkeypatch.setattr(updating, "clone", clone)
    doc = await coll.find_one_and_update(
        {"_id": 1}, COUNT, projection={"performance": 1, "status": 1}, return_document=True
    )
    await coll.update_one({"_id": 1}, COUNT)
    assert copied == []
    assert doc == {"_id": 1, "performance": {"emailsSent": 7, "bounces": 2}}
    assert (await coll.find_one({"_id": 1}))["performance"]["bounces"] == 4


async def test_find_and_modify_projections_reply_as_mongod_does(db: Any) -> None:
    coll = db.pipeline_projections
    await coll.insert_one({"_id": 1, "targets": TARGETS, "status": "running", "n": {"a": 1}})
    after = ReturnDocument.AFTER
    got = await coll.find_one_and_update(
        {"_id": 1}, COUNT, projection={"n.a": 1, "status": 1}, return_document=after
    )
    assert got == {"_id": 1, "n": {"a": 1}, "status": "running"}
    got = await coll.find_one_and_update(
        {"_id": 1}, COUNT, projection={"_id": 1}, return_document=after
    )
    assert got == {"_id": 1}
    got = await coll.find_one_and_update(
        {"_id": 1}, COUNT, projection={"_id": 0, "performance": 1}, return_document=after
    )
    assert got == {"performance": {"bounces": 6}}
    got = await coll.find_one_and_update(
        {"_id": 1}, COUNT, projection={"targets": 0, "n": 0}, return_document=after
    )
    assert got == {"_id": 1, "status": "running", "performance": {"bounces": 8}}
