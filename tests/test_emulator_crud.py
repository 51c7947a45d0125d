"""CRUD semantics of the embedded server that PyMongo's CRUD and collection conformance tests
check, through the real driver: array filters, `let`, field-name expressions, `$type`, null ids,
document validation, capped collections, index options, min/max, exhaust cursors, and the
features it refuses instead of answering wrongly (collation, views; that test alone is
emulator-only). With REACTOR_TEST_MONGO_URI set the rest run against a real replica set."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from pymongo import CursorType, MongoClient
from pymongo.collation import Collation
from pymongo.errors import OperationFailure, WriteError

from tests.conftest import MongoTarget


@pytest.fixture
def db(client: Any, mongo: MongoTarget) -> Any:
    return client[mongo.campaigns_db]


async def test_array_filters_update_only_the_matching_elements(db: Any) -> None:
    await db.af.insert_one({"_id": 1, "y": [{"b": 3}, {"b": 1}, {"b": 5}]})
    await db.af.update_one(
        {"_id": 1}, {"$set": {"y.$[i].b": 0}}, array_filters=[{"i.b": {"$gt": 2}}]
    )
    assert (await db.af.find_one({"_id": 1}))["y"] == [{"b": 0}, {"b": 1}, {"b": 0}]
    await db.af.update_one({"_id": 1}, {"$inc": {"y.$[].b": 1}})
    assert (await db.af.find_one({"_id": 1}))["y"] == [{"b": 1}, {"b": 2}, {"b": 1}]
    with pytest.raises(WriteError) as unused:
        await db.af.update_one({"_id": 1}, {"$set": {"y.0.b": 9}}, array_filters=[{"j": 1}])
    assert unused.value.code == 9
    with pytest.raises(WriteError) as missing:
        await db.af.update_one({"_id": 1}, {"$set": {"y.$[k].b": 9}})
    assert missing.value.code == 2


async def test_let_variables_and_missing_fields_in_expressions(db: Any) -> None:
    await db.let.insert_many([{"_id": 1}, {"_id": 2, "name": "a"}, {"_id": 3, "name": "b"}])
    found = await db.let.find({"$expr": {"$eq": ["$name", "$$want"]}}, let={"want": "a"}).to_list()
    assert [d["_id"] for d in found] == [2]
    removed = await db.let.delete_many({"$expr": {"$eq": ["$name", "$$x"]}}, let={"x": "b"})
    assert removed.deleted_count == 1  # the document without `name` compared as missing
    with pytest.raises(OperationFailure) as bad:
        await db.let.find({}, let={"Upper": 1}).to_list()
    assert bad.value.code == 16866


async def test_field_name_expressions_and_dollar_names(db: Any) -> None:
    await db.names.insert_one({"_id": 1, "foo": {}})
    await db.names.update_one(
        {"_id": 1},
        [
            {
                "$replaceWith": {
                    "$setField": {"field": {"$literal": "$a"}, "value": 1, "input": "$$ROOT"}
                }
            }
        ],
    )
    assert await db.names.find_one({"_id": 1}) == {"_id": 1, "foo": {}, "$a": 1}
    await db.names.insert_one({"_id": 2, "a.b": 1, "$c": 2})  # allowed since 5.0
    with pytest.raises(WriteError) as in_id:
        await db.names.insert_one({"_id": {"$x": 1}})
    assert in_id.value.code == 52


async def test_type_null_and_null_ids_and_distinct_order(db: Any) -> None:
    await db.nulls.update_one({"_id": None}, {"$unset": {"a": ""}}, upsert=True)
    assert await db.nulls.count_documents({"_id": {"$type": "null"}}) == 1
    await db.nulls.insert_many([{"x": 33}, {"x": 11}, {"x": 22}])
    assert await db.nulls.distinct("x") == [11, 22, 33]


async def test_database_aggregations_start_from_their_own_source(db: Any) -> None:
    docs = await (await db.aggregate([{"$documents": [{"a": 1}, {"a": 2}]}])).to_list()
    assert [d["a"] for d in docs] == [1, 2]
    with pytest.raises(OperationFailure):  # $documents needs {aggregate: 1}
        await (await db.some.aggregate([{"$documents": [{"a": 1}]}])).to_list()
    with pytest.raises(OperationFailure):  # and {aggregate: 1} needs a source stage
        await (await db.aggregate([{"$match": {}}])).to_list()


async def test_compound_min_and_max_compare_key_tuples(db: Any) -> None:
    await db.pairs.insert_many([{"a": a, "b": b} for a in (1, 2) for b in (1, 2)])
    await db.pairs.create_index([("a", 1), ("b", 1)])
    found = (
        await db.pairs.find({}, {"_id": 0})
        .min([("a", 1), ("b", 2)])
        .max([("a", 2), ("b", 2)])
        .hint([("a", 1), ("b", 1)])
        .sort([("a", 1), ("b", 1)])
        .to_list()
    )
    assert found == [{"a": 1, "b": 2}, {"a": 2, "b": 1}]


async def test_update_statements_with_fields_mongod_7_does_not_know_are_refused(db: Any) -> None:
    await db.sorted.insert_many([{"_id": 1}, {"_id": 2}])
    with pytest.raises(OperationFailure) as raised:
        await db.sorted.update_one({}, {"$set": {"x": 1}}, sort={"_id": -1})
    assert raised.value.code == 40415
    assert await db.sorted.count_documents({"x": 1}) == 0


async def test_document_validation_rules_and_bypass(db: Any) -> None:
    await db.create_collection("valid", validator={"x": {"$type": "string"}})
    await db.valid.insert_one({"_id": 1, "x": "ok"})
    with pytest.raises(WriteError) as raised:
        await db.valid.insert_one({"_id": 2, "x": 2})
    assert raised.value.code == 121
    details = raised.value.details or {}
    assert details["errInfo"]["failingDocumentId"] == 2
    with pytest.raises(WriteError):
        await db.valid.update_one({"_id": 1}, {"$set": {"x": 3}})
    assert (await db.valid.find_one({"_id": 1}))["x"] == "ok"  # nothing changed
    await db.valid.insert_one({"_id": 3, "x": 3}, bypass_document_validation=True)
    await db.command({"collMod": "valid", "validationLevel": "moderate"})
    await db.valid.update_one({"_id": 3}, {"$set": {"x": 4}})  # was invalid: not checked
    info = (await (await db.list_collections(filter={"name": "valid"})).to_list())[0]
    assert info["options"]["validator"] == {"x": {"$type": "string"}}


async def test_capped_collections_keep_their_newest_documents(db: Any) -> None:
    await db.create_collection("capped", capped=True, size=100_000, max=3)
    await db.capped.insert_many([{"_id": i} for i in range(5)])
    assert [d["_id"] async for d in db.capped.find()] == [2, 3, 4]
    assert await db.capped.options() == {"capped": True, "size": 100_000, "max": 3}


async def test_index_options_are_listed_and_min_bounds_a_hinted_find(db: Any) -> None:
    await db.idx.insert_many([{"x": 1}, {"x": 2}, {"x": 3}])
    await db.idx.create_index("x", background=True)
    assert (await db.idx.index_information())["x_1"]["background"] is True
    found = await db.idx.find({}).min([("x", 2)]).max([("x", 3)]).hint("x_1").to_list()
    assert [d["x"] for d in found] == [2]


async def test_collation_and_views_are_refused_not_ignored(db: Any, mongo: MongoTarget) -> None:
    mongo.require_emulator()  # mongod has both
    await db.coll8.insert_one({"s": "PING"})
    with pytest.raises(OperationFailure) as collation:
        await db.coll8.delete_many({"s": "ping"}, collation=Collation("en_US", strength=2))
    assert collation.value.code == 115
    assert await db.coll8.count_documents({}) == 1
    await db.coll8.delete_many({"s": "nope"}, collation=Collation("simple"))  # binary: fine
    with pytest.raises(OperationFailure) as view:
        await db.create_collection("view8", viewOn="coll8", pipeline=[])
    assert view.value.code == 115


async def test_exhaust_cursors_stream_every_batch(mongo: MongoTarget) -> None:
    def run() -> tuple[list[int], int]:
        client: MongoClient[dict[str, Any]] = MongoClient(mongo.uri, maxPoolSize=1)
        coll = client[mongo.campaigns_db].exhaust
        coll.insert_many([{"i": i} for i in range(350)])
        seen = [d["i"] for d in coll.find(cursor_type=CursorType.EXHAUST, batch_size=50)]
        count = coll.count_documents({})  # the connection came back usable
        client.close()
        return seen, count

    seen, count = await asyncio.to_thread(run)
    assert seen == list(range(350))
    assert count == 350
