"""MongoDB's write rules, through the real driver. These run against the embedded server and,
with REACTOR_TEST_MONGO_URI set, unchanged against a real replica set: each row is what mongod
7.0 answers, and the embedded server must answer the same (code, and the gist of the message),
leaving the document exactly as it was."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
from bson import ObjectId
from pymongo import AsyncMongoClient, ReturnDocument, UpdateOne
from pymongo.errors import BulkWriteError, OperationFailure, WriteConcernError, WriteError
from pymongo.write_concern import WriteConcern

from tests.conftest import MongoTarget

Client = AsyncMongoClient[dict[str, Any]]

CAMPAIGN = {
    "_id": 1,
    "status": "approved",
    "name": "Spring",
    "execution": None,
    "performance": "n/a",
    "tags": "spring",
    "n": 5,
    "owner": "a",
    "list": [1, 2],
}


def _with_status_first(update: dict[str, Any]) -> dict[str, Any]:
    """`update` led by a valid change of `status`: an update that is applied partway (the
    lenient engine's way) would leave that change behind."""
    first = update.get("$set", {})
    if not isinstance(first, dict):
        return update
    return {
        "$set": {"status": "running", **first},
        **{k: v for k, v in update.items() if k != "$set"},
    }


# (update, code, a fragment of mongod's message)
REFUSED: list[tuple[dict[str, Any], int, str]] = [
    # The reactor's old execution-record write: a path set twice.
    ({"$set": {"owner": "b"}, "$setOnInsert": {"owner": "c"}}, 40, "conflict at 'owner'"),
    ({"$set": {"execution": {}}, "$inc": {"execution.epoch": 1}}, 40, "conflict at 'execution'"),
    ({"$set": {"a": 1, "a.b": 2}}, 40, "conflict at 'a'"),
    ({"$set": {"a.b": 1}, "$unset": {"a": ""}}, 40, "conflict at 'a'"),
    ({"$set": {"a": 1}, "$rename": {"b": "a"}}, 40, "conflict at 'a'"),
    # A parent that is null or a scalar.
    ({"$set": {"execution.owner": "x"}}, 28, "Cannot create field 'owner' in element"),
    ({"$inc": {"performance.emailsSent": 1}}, 28, "Cannot create field 'emailsSent'"),
    ({"$set": {"name.first": "x"}}, 28, "Cannot create field 'first'"),
    ({"$set": {"list.x": 1}}, 28, "Cannot create field 'x'"),
    # Immutable _id.
    ({"$set": {"_id": 2}}, 66, "_id"),
    ({"$unset": {"_id": ""}}, 66, "_id"),
    # Arithmetic on what is not a number.
    ({"$inc": {"name": 1}}, 14, "non-numeric"),
    ({"$mul": {"name": 2}}, 14, "non-numeric"),
    ({"$inc": {"n": "1"}}, 14, "non-numeric argument"),
    # Array modifiers on what is not an array.
    ({"$push": {"tags": "x"}}, 2, "must be an array"),
    ({"$addToSet": {"tags": "x"}}, 2, "must be an array"),
    ({"$pop": {"tags": 1}}, 14, "non-array"),
    # Unknown modifiers and malformed ones.
    ({"$frob": {"a": 1}}, 9, "Unknown modifier: $frob"),
    ({"$set": 5}, 9, "Modifiers operate on fields"),
    ({"$set": {"": 1}}, 56, "empty"),
    ({"$set": {"a..b": 1}}, 56, "empty field name"),
    ({"$set": {"a.$bad": 1}}, 52, "$bad"),
    ({"$rename": {"a": 5}}, 2, "must be a string"),
    ({"$pop": {"list": 2}}, 9, "$pop expects 1 or -1"),
]


async def _seeded(client: Client, mongo: MongoTarget) -> Any:
    coll = client[mongo.campaigns_db].rules
    await coll.delete_many({})
    await coll.insert_one(dict(CAMPAIGN))
    return coll


@pytest.mark.parametrize(("update", "code", "message"), REFUSED, ids=lambda v: str(v)[:60])
async def test_mongod_refuses_and_nothing_changes(
    client: Client, mongo: MongoTarget, update: dict[str, Any], code: int, message: str
) -> None:
    coll = await _seeded(client, mongo)
    with pytest.raises(WriteError) as info:
        await coll.update_one({"_id": 1}, _with_status_first(update))
    assert info.value.code == code, info.value.details
    assert message in str(info.value)
    assert await coll.find_one({"_id": 1}) == CAMPAIGN


@pytest.mark.parametrize(("update", "code", "message"), REFUSED[:6], ids=lambda v: str(v)[:60])
async def test_find_and_modify_refuses_as_a_command_error(
    client: Client, mongo: MongoTarget, update: dict[str, Any], code: int, message: str
) -> None:
    coll = await _seeded(client, mongo)
    with pytest.raises(OperationFailure) as info:
        await coll.find_one_and_update({"_id": 1}, update, return_document=ReturnDocument.AFTER)
    assert info.value.code == code
    assert message in str(info.value)
    assert await coll.find_one({"_id": 1}) == CAMPAIGN


async def test_a_failed_upsert_inserts_nothing(client: Client, mongo: MongoTarget) -> None:
    coll = await _seeded(client, mongo)
    with pytest.raises(WriteError) as info:
        await coll.update_one(
            {"_id": 2}, {"$set": {"owner": "b"}, "$setOnInsert": {"owner": "c"}}, upsert=True
        )
    assert info.value.code == 40
    with pytest.raises(WriteError) as info:
        await coll.update_one({"_id": 3, "a": 5}, {"$set": {"a.b": 1}}, upsert=True)
    assert info.value.code == 28
    assert await coll.count_documents({}) == 1


async def test_allowed_edge_cases_are_allowed(client: Client, mongo: MongoTarget) -> None:
    coll = await _seeded(client, mongo)
    # _id set to its own value, sibling paths, an empty $set, $setOnInsert on an update.
    await coll.update_one({"_id": 1}, {"$set": {"_id": 1, "x.a": 1, "x.b": 2}})
    await coll.update_one({"_id": 1}, {"$set": {}})
    await coll.update_one({"_id": 1}, {"$set": {"y": 1}, "$setOnInsert": {"z": 1}})
    # A missing parent is created; an array element by index is viable.
    await coll.update_one({"_id": 1}, {"$set": {"deep.er.path": 1, "list.1": 9}})
    # $unset and $pull through a scalar are no-ops, not errors.
    await coll.update_one({"_id": 1}, {"$unset": {"name.first": ""}})
    doc = await coll.find_one({"_id": 1})
    assert doc is not None
    assert doc["x"] == {"a": 1, "b": 2}
    assert doc["y"] == 1
    assert "z" not in doc
    assert doc["deep"] == {"er": {"path": 1}}
    assert doc["list"] == [1, 9]
    assert doc["name"] == "Spring"


async def test_replacement_cannot_change_id(client: Client, mongo: MongoTarget) -> None:
    coll = await _seeded(client, mongo)
    with pytest.raises(WriteError) as info:
        await coll.replace_one({"_id": 1}, {"_id": 2, "status": "x"})
    assert info.value.code == 66
    assert await coll.find_one({"_id": 1}) == CAMPAIGN


async def test_unknown_query_operator_is_bad_value(client: Client, mongo: MongoTarget) -> None:
    coll = await _seeded(client, mongo)
    with pytest.raises(OperationFailure) as info:
        await coll.find_one({"status": {"$frob": 1}})
    assert info.value.code == 2
    assert "unknown operator: $frob" in str(info.value)
    with pytest.raises(OperationFailure) as info:
        await coll.find_one({"$frob": 1})
    assert info.value.code == 2
    assert "unknown top level operator: $frob" in str(info.value)


async def test_bulk_reports_failures_per_statement(client: Client, mongo: MongoTarget) -> None:
    coll = await _seeded(client, mongo)
    bad = UpdateOne({"_id": 1}, {"$inc": {"name": 1}})
    good = UpdateOne({"_id": 1}, {"$inc": {"n": 1}})
    # Ordered: stop at the first failure; what came before it stays applied.
    with pytest.raises(BulkWriteError) as info:
        await coll.bulk_write([good, bad, good], ordered=True)
    details = info.value.details
    assert [(e["index"], e["code"]) for e in details["writeErrors"]] == [(1, 14)]
    assert details["nModified"] == 1
    # Unordered: every statement is tried.
    with pytest.raises(BulkWriteError) as info:
        await coll.bulk_write([bad, good, bad, good], ordered=False)
    details = info.value.details
    assert [(e["index"], e["code"]) for e in details["writeErrors"]] == [(0, 14), (2, 14)]
    assert details["nModified"] == 2
    doc = await coll.find_one({"_id": 1})
    assert doc is not None
    assert doc["n"] == 8


async def test_engine_errors_answer_and_keep_the_connection(
    client: Client, mongo: MongoTarget
) -> None:
    """Whatever goes wrong inside, the client gets an error reply on a connection that stays
    usable: never a dropped connection, never a runtime's own message."""
    coll = await _seeded(client, mongo)
    pool_before = await client.admin.command("serverStatus")
    for update in ({"$push": {"tags": 1}}, {"$inc": {"name": 1}}, {"$set": {"execution.x": 1}}):
        with pytest.raises(WriteError) as info:
            await coll.update_one({"_id": 1}, update)
        message = str(info.value)
        for python_words in ("object has no attribute", "can only concatenate", "Traceback"):
            assert python_words not in message
    pool_after = await client.admin.command("serverStatus")
    assert pool_after["connections"]["current"] == pool_before["connections"]["current"]


async def test_now_is_the_servers_clock(client: Client, mongo: MongoTarget) -> None:
    """$$NOW in a pipeline update and in $expr: the database's clock decides."""
    coll = await _seeded(client, mongo)
    past = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
    future = dt.datetime.now(dt.UTC) + dt.timedelta(minutes=5)
    await coll.update_one({"_id": 1}, {"$set": {"due": past, "later": future}})
    assert await coll.count_documents({"$expr": {"$lte": ["$due", "$$NOW"]}}) == 1
    assert await coll.count_documents({"$expr": {"$lte": ["$later", "$$NOW"]}}) == 0
    result = await coll.update_one(
        {"_id": 1, "$expr": {"$lte": ["$due", "$$NOW"]}},
        [{"$set": {"stampedAt": "$$NOW", "n": {"$add": ["$n", 1]}}}],
    )
    assert result.modified_count == 1
    doc = await coll.find_one({"_id": 1})
    assert doc is not None
    assert doc["n"] == 6
    assert abs((doc["stampedAt"] - dt.datetime.now(dt.UTC)).total_seconds()) < 5


async def test_object_ids_and_strings_do_not_collide(client: Client, mongo: MongoTarget) -> None:
    coll = await _seeded(client, mongo)
    oid = ObjectId()
    await coll.insert_many([{"_id": oid}, {"_id": str(oid)}])
    assert await coll.count_documents({"_id": {"$in": [oid, str(oid)]}}) == 2


async def test_a_slice_only_projection_keeps_every_other_field(
    client: Client, mongo: MongoTarget
) -> None:
    """A shard reads its part of the target list with `$slice` and still needs the rest of the
    campaign; mongod returns every other field with such a projection."""
    coll = client[mongo.campaigns_db].slices
    await coll.drop()
    await coll.insert_one({"_id": 1, "name": "Spring", "targets": list(range(10)), "n": 2})
    doc = await coll.find_one({"_id": 1}, {"targets": {"$slice": [3, 4]}})
    assert doc == {"_id": 1, "name": "Spring", "targets": [3, 4, 5, 6], "n": 2}
    assert list(doc) == ["_id", "name", "targets", "n"]
    doc = await coll.find_one({"_id": 1}, {"targets": {"$slice": [8, 5]}, "_id": 0})
    assert doc == {"name": "Spring", "targets": [8, 9], "n": 2}
    # With an inclusion next to it, only the included fields come back.
    doc = await coll.find_one({"_id": 1}, {"targets": {"$slice": 2}, "name": 1})
    assert doc == {"_id": 1, "name": "Spring", "targets": [0, 1]}


async def test_a_document_over_16_mib_fails_alone(client: Client, mongo: MongoTarget) -> None:
    """The message may carry it (48 MB); the write of that one document fails, as mongod's
    does, and an ordered bulk stops there."""
    coll = client[mongo.campaigns_db].big
    await coll.drop()
    big = "x" * (16 * 1024 * 1024)
    with pytest.raises(BulkWriteError) as info:
        await coll.insert_many([{"_id": 1}, {"_id": 2, "big": big}, {"_id": 3}])
    errors = info.value.details["writeErrors"]
    assert [(e["index"], e["code"]) for e in errors] == [(1, 10334)]  # BSONObjectTooLarge
    assert "too large" in errors[0]["errmsg"]
    assert info.value.details["nInserted"] == 1
    assert await coll.distinct("_id") == [1]
    with pytest.raises(BulkWriteError) as info:
        await coll.insert_many([{"_id": 4, "big": big}, {"_id": 5}], ordered=False)
    assert info.value.details["nInserted"] == 1
    assert sorted(await coll.distinct("_id")) == [1, 5]


async def test_an_upsert_by_a_subdocument_id_inserts_it(client: Client, mongo: MongoTarget) -> None:
    coll = client[mongo.campaigns_db].subdoc_ids
    await coll.drop()
    key = {"f": "a", "n": 2}
    result = await coll.update_one({"_id": key}, {"$set": {"a": 0}}, upsert=True)
    assert result.upserted_id == key
    assert await coll.find_one({"_id": key}) == {"_id": key, "a": 0}


async def test_an_update_may_not_leave_a_document_over_16_mib(
    client: Client, mongo: MongoTarget
) -> None:
    coll = client[mongo.campaigns_db].big_updates
    await coll.drop()
    await coll.insert_one({"_id": 1, "bar": "x"})
    big = "x" * (16 * 1024 * 1024)
    with pytest.raises(WriteError) as info:
        await coll.replace_one({"_id": 1}, {"bar": big})
    assert info.value.code == 10334
    with pytest.raises(WriteError) as info:
        await coll.replace_one({"_id": 2}, {"foo": big}, upsert=True)
    assert info.value.code == 10334
    with pytest.raises(WriteError) as info:
        await coll.update_one({"_id": 1}, {"$set": {"bar": big}})
    assert info.value.code == 10334
    assert await coll.find({}, {"_id": 1, "bar": 1}).to_list() == [{"_id": 1, "bar": "x"}]
    # Just under the limit is fine.
    await coll.replace_one({"_id": 1}, {"bar": "x" * (16 * 1024 * 1024 - 32)})
    doc = await coll.find_one({"_id": 1})
    assert doc is not None
    assert len(doc["bar"]) == 16 * 1024 * 1024 - 32


async def test_a_write_concern_no_member_count_can_meet_is_reported(
    client: Client, mongo: MongoTarget
) -> None:
    """w greater than the data-bearing members: the write applies, and the reply carries
    UnsatisfiableWriteConcern (100), as a replica set of that size answers."""
    hello = await client.admin.command("hello")
    w = len(hello.get("hosts", [])) + 1
    coll = client[mongo.campaigns_db].get_collection(
        "concerns", write_concern=WriteConcern(w=w, wtimeout=1000)
    )
    with pytest.raises(WriteConcernError) as info:
        await coll.insert_one({"_id": 1})
    assert info.value.code == 100
    assert await client[mongo.campaigns_db].concerns.find_one({"_id": 1}) == {"_id": 1}
