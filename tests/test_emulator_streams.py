"""Change-stream behaviour of the embedded server that PyMongo's change-stream conformance tests
rely on, checked here through the real driver so a regression shows in the project's own suite;
with REACTOR_TEST_MONGO_URI set they run unchanged against a real replica set (started with
enableTestCommands, for the fail points)."""

from __future__ import annotations

from typing import Any

import pytest
from pymongo.errors import OperationFailure
from pymongo.read_concern import ReadConcern

from tests.conftest import MongoTarget


@pytest.fixture
def db(client: Any, mongo: MongoTarget) -> Any:
    return client[mongo.campaigns_db]


async def test_fail_getmore_after_checkout_is_labelled_resumable_and_the_stream_resumes(
    client: Any, db: Any
) -> None:
    coll = db.resume
    await coll.insert_one({"_id": 0})
    stream = await coll.watch(max_await_time_ms=100)
    await client.admin.command(
        {
            "configureFailPoint": "failGetMoreAfterCursorCheckout",
            "mode": {"times": 1},
            "data": {"errorCode": 6},  # HostUnreachable: resumable
        }
    )
    await coll.insert_one({"_id": 1})
    change = await stream.next()  # the getMore failed, was labelled, the driver resumed
    assert change["documentKey"] == {"_id": 1}
    await stream.close()


async def test_fail_command_on_getmore_carries_no_resumable_label(client: Any, db: Any) -> None:
    coll = db.noresume
    await coll.insert_one({"_id": 0})
    stream = await coll.watch(max_await_time_ms=100)
    await client.admin.command(
        {
            "configureFailPoint": "failCommand",
            "mode": {"times": 1},
            "data": {"failCommands": ["getMore"], "errorCode": 6},
        }
    )
    await coll.insert_one({"_id": 1})
    with pytest.raises(OperationFailure) as raised:
        await stream.next()
    assert raised.value.code == 6
    assert not raised.value.has_error_label("ResumableChangeStreamError")


async def test_modifying_the_resume_token_is_fatal_and_not_resumable(db: Any) -> None:
    coll = db.fatal
    stream = await coll.watch([{"$project": {"_id": 0}}], max_await_time_ms=100)
    await coll.insert_one({"_id": 1})
    with pytest.raises(OperationFailure) as raised:
        await stream.next()
    assert raised.value.code == 280
    assert raised.value.has_error_label("NonResumableChangeStreamError")


async def test_unknown_and_unpermitted_stages_and_read_concern(db: Any) -> None:
    coll = db.stages
    with pytest.raises(OperationFailure) as unknown:
        await coll.watch([{"$frobnicate": {}}])
    assert unknown.value.code == 40324
    with pytest.raises(OperationFailure) as unpermitted:
        await coll.watch([{"$group": {"_id": None}}])
    assert unpermitted.value.code == 280
    with pytest.raises(OperationFailure) as local:
        await coll.with_options(read_concern=ReadConcern("local")).watch()
    assert local.value.code == 72
    async with await coll.with_options(read_concern=ReadConcern("majority")).watch():
        pass


async def test_a_leading_match_that_filters_out_the_drop_still_sees_the_invalidate(db: Any) -> None:
    coll = db.invalidated
    await coll.insert_one({"_id": 1})
    stream = await coll.watch([{"$match": {"operationType": "invalidate"}}], max_await_time_ms=100)
    await coll.drop()
    assert (await stream.next())["operationType"] == "invalidate"


async def test_an_emptied_collection_still_exists_and_is_dropped_with_its_database(
    client: Any, mongo: MongoTarget
) -> None:
    other = client[mongo.segmentation_db]
    await other.kept.insert_one({"_id": 1})
    await other.kept.delete_one({"_id": 1})
    assert "kept" in await other.list_collection_names()
    stream = await other.watch(max_await_time_ms=100)
    await client.drop_database(other.name)
    kinds = [(await stream.next())["operationType"] for _ in range(3)]
    assert kinds == ["drop", "dropDatabase", "invalidate"]


async def test_update_descriptions_as_mongod_logs_them(db: Any) -> None:
    coll = db.describe
    await coll.insert_one({"_id": 1, "a": {"1": 1}, "list": [{"1": 1}], "arr": [1, 2, 3]})
    stream = await coll.watch(show_expanded_events=True, max_await_time_ms=100)
    await coll.update_one({"_id": 1}, {"$set": {"a.1": 2, "list.0.1": 5, "new.deep": 1}})
    first = (await stream.next())["updateDescription"]
    assert first["updatedFields"] == {"a.1": 2, "list.0.1": 5, "new": {"deep": 1}}
    assert first["disambiguatedPaths"] == {"a.1": ["a", "1"], "list.0.1": ["list", 0, "1"]}
    await coll.update_one({"_id": 1}, [{"$set": {"arr": [1, 9]}}])  # a pipeline: diffed
    second = (await stream.next())["updateDescription"]
    assert second["updatedFields"] == {"arr.1": 9}
    assert second["truncatedArrays"] == [{"field": "arr", "newSize": 2}]
    await coll.update_one({"_id": 1}, {"$set": {"arr": [1, 9]}})  # no change: no event
    await coll.update_one({"_id": 1}, {"$push": {"arr": 4}, "$unset": {"new": 1}})
    third = (await stream.next())["updateDescription"]
    assert third["updatedFields"] == {"arr": [1, 9, 4]}
    assert third["removedFields"] == ["new"]
    plain = await coll.watch(max_await_time_ms=100)
    await coll.update_one({"_id": 1}, {"$inc": {"a.1": 1}})
    assert "disambiguatedPaths" not in (await plain.next())["updateDescription"]


async def test_post_images_where_enabled(db: Any) -> None:
    await db.create_collection("on", changeStreamPreAndPostImages={"enabled": True})
    await db.create_collection("off")
    for name in ("on", "off"):
        await db[name].insert_one({"_id": 1})
    on = await db.on.watch(full_document="required", max_await_time_ms=100)
    await db.on.update_one({"_id": 1}, {"$set": {"x": 1}})
    await db.on.update_one({"_id": 1}, {"$set": {"x": 2}})
    assert (await on.next())["fullDocument"] == {"_id": 1, "x": 1}  # as of that change
    assert (await on.next())["fullDocument"] == {"_id": 1, "x": 2}
    available = await db.off.watch(full_document="whenAvailable", max_await_time_ms=100)
    required = await db.off.watch(full_document="required", max_await_time_ms=100)
    await db.off.update_one({"_id": 1}, {"$set": {"x": 1}})
    assert (await available.next())["fullDocument"] is None
    with pytest.raises(OperationFailure) as raised:
        await required.next()
    assert raised.value.code == 280


async def test_expanded_events_and_rename(db: Any) -> None:
    await db.create_collection("source")
    await db.create_collection("target")
    whole = await db.watch(show_expanded_events=True, max_await_time_ms=100)
    plain = await db.watch(max_await_time_ms=100)
    await db.source.insert_one({"_id": 1})
    await db.source.create_index("x", name="x_1")
    await db.command({"collMod": "source"})
    await db.source.drop_index("x_1")
    with pytest.raises(OperationFailure) as exists:
        await db.source.rename("target")
    assert exists.value.code == 48
    await db.source.rename("target", dropTarget=True)
    events = [await whole.next() for _ in range(6)]
    kinds = [e["operationType"] for e in events]
    assert kinds == ["insert", "createIndexes", "modify", "dropIndexes", "drop", "rename"]
    uuid_before = events[0]["collectionUUID"]
    assert events[1]["operationDescription"]["indexes"][0]["name"] == "x_1"
    rename = events[5]
    assert rename["to"] == {"db": db.name, "coll": "target"}
    assert rename["operationDescription"]["to"] == rename["to"]
    assert "dropTarget" in rename["operationDescription"]
    assert rename["collectionUUID"] == uuid_before
    plain_kinds = [(await plain.next())["operationType"] for _ in range(3)]
    assert plain_kinds == ["insert", "drop", "rename"]  # DDL events only when asked for
    assert await db.target.find_one({"_id": 1}) == {"_id": 1}
    assert "source" not in await db.list_collection_names()
    with pytest.raises(OperationFailure) as missing:
        await db.source.rename("elsewhere")
    assert missing.value.code == 26
