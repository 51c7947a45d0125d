"""Retryable writes and aggregation output on the embedded server, through the real driver:
what PyMongo's retryable-writes and CRUD conformance tests expect of mongod. With
REACTOR_TEST_MONGO_URI set they run unchanged against a real replica set."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from pymongo import InsertOne, UpdateOne
from pymongo.errors import AutoReconnect, BulkWriteError, OperationFailure, WriteConcernError

from tests.conftest import MongoTarget


@pytest.fixture
def db(client: Any, mongo: MongoTarget) -> Any:
    return client[mongo.campaigns_db]


async def _fail_point(client: Any, name: str, mode: Any, data: dict[str, Any]) -> None:
    await client.admin.command({"configureFailPoint": name, "mode": mode, "data": data})


async def test_a_write_committed_before_the_connection_dropped_is_not_applied_twice(
    client: Any, db: Any
) -> None:
    coll = db.committed
    await coll.insert_one({"_id": 1, "n": 0})
    await _fail_point(client, "onPrimaryTransactionalWrite", {"times": 1}, {})
    await coll.update_one({"_id": 1}, {"$inc": {"n": 1}})  # committed, dropped, retried
    assert (await coll.find_one({"_id": 1}))["n"] == 1


async def test_the_retry_applies_only_the_statements_that_did_not_commit(
    client: Any, db: Any
) -> None:
    coll = db.statements
    await _fail_point(client, "onPrimaryTransactionalWrite", {"times": 1}, {})
    # The first statement commits, then the connection drops; the retry sends all three again
    # and must not insert _id 1 a second time (that would be a duplicate key error).
    await coll.insert_many([{"_id": 1}, {"_id": 2}, {"_id": 3}])
    assert [d["_id"] async for d in coll.find().sort("_id")] == [1, 2, 3]


async def test_a_write_that_never_commits_fails_and_changes_nothing(client: Any, db: Any) -> None:
    coll = db.never
    await _fail_point(
        client, "onPrimaryTransactionalWrite", {"times": 2}, {"failBeforeCommitExceptionCode": 1}
    )
    with pytest.raises(AutoReconnect):
        await coll.insert_one({"_id": 1})
    assert await coll.count_documents({}) == 0


async def test_errorlabels_given_empty_means_no_label_added(client: Any, db: Any) -> None:
    coll = db.labels
    await _fail_point(
        client,
        "failCommand",
        {"times": 1},
        {"failCommands": ["insert"], "errorCode": 6, "errorLabels": []},
    )
    with pytest.raises(OperationFailure) as raised:
        await coll.insert_one({"_id": 1})
    assert raised.value.code == 6
    assert not raised.value.has_error_label("RetryableWriteError")


async def test_a_write_concern_error_from_failcommand_after_the_write(client: Any, db: Any) -> None:
    coll = db.wce
    await _fail_point(
        client,
        "failCommand",
        {"times": 1},
        {"failCommands": ["insert"], "writeConcernError": {"code": 91, "errmsg": "shutting"}},
    )
    await coll.insert_one({"_id": 1})  # labelled retryable, retried, answered from the log
    assert await coll.count_documents({}) == 1
    await _fail_point(
        client,
        "failCommand",
        {"times": 1},
        {"failCommands": ["insert"], "writeConcernError": {"code": 64, "errmsg": "timeout"}},
    )
    with pytest.raises(WriteConcernError):
        await coll.insert_one({"_id": 2})
    assert await coll.count_documents({}) == 2  # the write itself landed


async def test_out_replaces_and_merge_combines(db: Any) -> None:
    await db.src.insert_many([{"_id": i, "v": i * 10} for i in range(3)])
    await db.dst.insert_one({"_id": 99})
    await db.dst.create_index("v")
    await (await db.src.aggregate([{"$match": {"v": {"$gte": 10}}}, {"$out": "dst"}])).to_list()
    assert await db.dst.find().sort("_id").to_list() == [{"_id": 1, "v": 10}, {"_id": 2, "v": 20}]
    assert "v_1" in await db.dst.index_information()
    await db.src.bulk_write([UpdateOne({"_id": 1}, {"$set": {"w": 1}}), InsertOne({"_id": 5})])
    await (await db.src.aggregate([{"$merge": {"into": "dst"}}])).to_list()
    assert await db.dst.find().sort("_id").to_list() == [
        {"_id": 0, "v": 0},
        {"_id": 1, "v": 10, "w": 1},
        {"_id": 2, "v": 20},
        {"_id": 5},
    ]
    with pytest.raises(OperationFailure) as raised:
        await (
            await db.src.aggregate(
                [{"$merge": {"into": "dst", "whenMatched": "fail", "whenNotMatched": "insert"}}]
            )
        ).to_list()
    assert raised.value.code == 11000
    with pytest.raises(OperationFailure) as not_last:
        await (await db.src.aggregate([{"$out": "x"}, {"$match": {}}])).to_list()
    assert not_last.value.code == 40601


async def test_a_long_insert_does_not_hold_back_reads_on_other_connections(db: Any) -> None:
    # mongod serves other operations while a large insert runs; the embedded server writes an
    # insert in chunks with other connections' commands between them. A count taken meanwhile
    # sees part of the batch: it was answered before the insert finished.
    docs = [{"_id": i, "pad": "x" * 200} for i in range(5000)]
    insert = asyncio.create_task(db.long.insert_many(docs))
    seen: list[int] = []
    while not insert.done():
        seen.append(await db.long.count_documents({}))
    await insert
    assert any(0 < n < len(docs) for n in seen), seen
    assert await db.long.count_documents({}) == len(docs)


async def test_write_errors_past_the_first_chunk_keep_their_places(db: Any) -> None:
    await db.dups.insert_many([{"_id": 40}, {"_id": 70}])
    with pytest.raises(BulkWriteError) as ordered:
        await db.dups.insert_many([{"_id": i} for i in range(100)])
    assert ordered.value.details["nInserted"] == 40  # an ordered insert stops at its first error
    assert [e["index"] for e in ordered.value.details["writeErrors"]] == [40]
    await db.dups.delete_many({"_id": {"$nin": [40, 70]}})
    with pytest.raises(BulkWriteError) as unordered:
        await db.dups.insert_many([{"_id": i} for i in range(100)], ordered=False)
    assert unordered.value.details["nInserted"] == 98
    assert [e["index"] for e in unordered.value.details["writeErrors"]] == [40, 70]
    assert await db.dups.count_documents({}) == 100
