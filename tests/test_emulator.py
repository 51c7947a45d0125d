"""The embedded MongoDB server through the real driver, async and sync."""

from __future__ import annotations

import asyncio
import copy
import datetime as dt
import random
import socket
import struct
import uuid
from collections.abc import Callable
from typing import Any

import bson
import pytest
from bson import Timestamp
from pymongo import AsyncMongoClient, DeleteOne, MongoClient, ReturnDocument, UpdateOne
from pymongo.errors import (
    BulkWriteError,
    DuplicateKeyError,
    OperationFailure,
)

from reactor.embedded.mongo import MongoEmulator
from reactor.embedded.mongo.engine import Engine, clone, simple_update
from reactor.embedded.mongo.wire import OP_MSG, crc32c

Client = AsyncMongoClient[dict[str, Any]]


@pytest.fixture
async def db(emulator: MongoEmulator) -> Any:
    c: Client = AsyncMongoClient(emulator.uri, tz_aware=True)
    yield c.testdb
    await c.close()


async def test_presents_a_replica_set_primary(emulator: MongoEmulator) -> None:
    c: Client = AsyncMongoClient(emulator.uri)
    hello = await c.admin.command("hello")
    assert hello["isWritablePrimary"] is True
    assert hello["setName"] == "rs0"
    assert hello["hosts"] == [emulator.address]
    assert hello["logicalSessionTimeoutMinutes"] == 30
    assert (await c.admin.command("ping"))["ok"] == 1
    info = await c.server_info()
    assert info["versionArray"][0] >= 4
    assert "operationTime" in await c.admin.command("ping")
    await c.close()


async def test_crud_and_cursor_batching(db: Any) -> None:
    await db.items.insert_many([{"n": i, "even": i % 2 == 0} for i in range(250)])
    assert await db.items.count_documents({}) == 250
    assert await db.items.count_documents({"even": True}) == 125
    assert await db.items.estimated_document_count() == 250
    docs = (
        await db.items.find({"n": {"$gte": 10}}, {"_id": 0, "n": 1})
        .sort("n", -1)
        .skip(5)
        .limit(120)
        .batch_size(7)
        .to_list()
    )
    assert [d["n"] for d in docs[:3]] == [244, 243, 242]
    assert len(docs) == 120
    assert docs[0] == {"n": 244}
    assert sorted(await db.items.distinct("even")) == [False, True]
    res = await db.items.update_many({"even": False}, {"$inc": {"n": 1000}, "$set": {"odd": True}})
    assert (res.matched_count, res.modified_count) == (125, 125)
    assert await db.items.count_documents({"n": {"$gt": 1000}}) == 125
    up = await db.items.update_one({"n": -1}, {"$set": {"new": 1}}, upsert=True)
    assert up.upserted_id is not None
    assert (await db.items.find_one({"_id": up.upserted_id}))["n"] == -1
    rep = await db.items.replace_one({"n": 0}, {"n": 0, "replaced": True})
    assert rep.modified_count == 1
    dele = await db.items.delete_many({"odd": True})
    assert dele.deleted_count == 125
    one = await db.items.delete_one({"n": 2})
    assert one.deleted_count == 1


async def test_find_and_modify_variants(db: Any) -> None:
    await db.q.insert_many([{"k": "a", "v": 1}, {"k": "b", "v": 2}, {"k": "c", "v": 3}])
    before = await db.q.find_one_and_update(
        {"v": {"$gte": 2}}, {"$inc": {"v": 10}}, sort=[("v", -1)], projection={"_id": 0}
    )
    assert before == {"k": "c", "v": 3}
    after = await db.q.find_one_and_update(
        {"k": "a"}, {"$set": {"v": 5}}, return_document=ReturnDocument.AFTER
    )
    assert after["v"] == 5
    upserted = await db.q.find_one_and_update(
        {"k": "z"}, {"$set": {"v": 0}}, upsert=True, return_document=ReturnDocument.AFTER
    )
    assert upserted["k"] == "z"
    removed = await db.q.find_one_and_delete({"k": "b"})
    assert removed["v"] == 2
    assert await db.q.find_one({"k": "b"}) is None
    replaced = await db.q.find_one_and_replace(
        {"k": "a"}, {"k": "a2"}, return_document=ReturnDocument.AFTER
    )
    assert replaced["k"] == "a2"
    assert await db.q.find_one_and_update({"k": "none"}, {"$set": {"v": 1}}) is None


async def test_aggregation_pipeline(db: Any) -> None:
    await db.orders.insert_many(
        [
            {"customer_id": c, "total": t, "items": ["x", "y"]}
            for c, t in [(1, 10), (1, 5), (2, 7), ("3", 1)]
        ]
    )
    await db.people.insert_many([{"_id": 1, "name": "Ann"}, {"_id": 2, "name": "Bob"}])
    rows = await (
        await db.orders.aggregate(
            [
                {"$match": {"customer_id": {"$in": [1, 2]}}},
                {"$group": {"_id": "$customer_id", "sum": {"$sum": "$total"}, "n": {"$sum": 1}}},
                {"$sort": {"_id": 1}},
                {
                    "$lookup": {
                        "from": "people",
                        "localField": "_id",
                        "foreignField": "_id",
                        "as": "who",
                    }
                },
                {"$project": {"sum": 1, "n": 1, "name": {"$arrayElemAt": ["$who.name", 0]}}},
            ]
        )
    ).to_list()
    assert rows == [
        {"_id": 1, "sum": 15, "n": 2, "name": "Ann"},
        {"_id": 2, "sum": 7, "n": 1, "name": "Bob"},
    ]
    unwound = await (await db.orders.aggregate([{"$unwind": "$items"}, {"$count": "n"}])).to_list()
    assert unwound == [{"n": 8}]
    assert await db.orders.count_documents({"customer_id": "3"}) == 1
    page = await (
        await db.orders.aggregate([{"$sort": {"total": -1}}, {"$skip": 1}, {"$limit": 2}])
    ).to_list()
    assert [r["total"] for r in page] == [7, 5]


async def test_long_in_lists_match_like_short_ones(db: Any) -> None:
    """Long `$in`/`$nin` lists take a set-based path; the answers must equal the short path's."""
    docs = [
        {"_id": 1, "v": 5},
        {"_id": 2, "v": "5"},
        {"_id": 3, "v": [7, 8]},
        {"_id": 4},
        {"_id": 5, "v": None},
        {"_id": 6, "v": {"a": 1}},
        {"_id": 7, "v": "apple"},
        {"_id": 8, "v": 9.0},
    ]
    await db.inlist.insert_many(docs)
    filler = [f"x{i}" for i in range(40)]  # long enough for the set-based path

    async def ids(flt: dict[str, Any]) -> list[int]:
        return sorted(d["_id"] for d in await db.inlist.find(flt).to_list())

    for values in ([5], [8], [None], [{"a": 1}], [9], ["5", 7]):
        short = await ids({"v": {"$in": values}})
        assert await ids({"v": {"$in": [*filler, *values]}}) == short, values
        assert await ids({"v": {"$nin": [*filler, *values]}}) == await ids({"v": {"$nin": values}})
    assert await ids({"v": {"$in": [*filler, 5]}}) == [1]
    assert await ids({"v": {"$in": [*filler, None]}}) == [4, 5]
    assert await ids({"v": {"$in": [*filler, 8]}}) == [3]
    assert await ids({"v": {"$in": [*filler, 9]}}) == [8]
    assert await ids({"v": {"$in": [*filler, bson.Regex("^app")]}}) == [7]
    rows = await (
        await db.inlist.aggregate([{"$match": {"v": {"$in": [*filler, 5, "apple"]}}}])
    ).to_list()
    assert sorted(r["_id"] for r in rows) == [1, 7]


def _random_value(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randrange(9 if depth < 2 else 7)
    makers: list[Callable[[], Any]] = [
        lambda: rng.randint(-5, 5),
        lambda: rng.choice([0.5, -2.25, 1e300]),
        lambda: rng.choice(["", "a", "pending", "x\u00e9"]),
        lambda: None,
        lambda: rng.random() < 0.5,
        # Stored naive (UTC) as decoded off the wire, or aware / sub-millisecond: mongomock's path.
        lambda: (
            dt.datetime(2026, 1, 2, 3, 4, 5, rng.choice([0, 123000, 123456]), tzinfo=dt.UTC)
            if rng.random() < 0.3
            else dt.datetime(2026, 1, 2, 3, 4, 5, rng.choice([0, 123000]), tzinfo=dt.UTC).replace(
                tzinfo=None
            )
        ),
        lambda: bson.ObjectId(),
        lambda: [_random_value(rng, depth + 1) for _ in range(rng.randrange(3))],
        lambda: {f"k{i}": _random_value(rng, depth + 1) for i in range(rng.randrange(3))},
    ]
    return makers[kind]()


def _error_of(fn: Any, *args: Any, **kwargs: Any) -> str | None:
    try:
        fn(*args, **kwargs)
    except Exception as exc:  # compared by kind between the two paths
        return type(exc).__name__
    return None


def test_simple_updates_store_what_mongomock_stores() -> None:
    """`$set`/`$setOnInsert`/`$inc`/`$unset` of top-level fields skip mongomock's update path;
    over thousands of random statements and documents (updates and upserts), the stored
    documents — values, types and key order — and the errors must be the ones mongomock gives."""
    rng = random.Random(20261128)
    fields = ["a", "b", "c", "state", "epoch"]
    fast_taken = upserts_taken = 0
    for round_ in range(3000):
        reference = Engine().collection("db", "ref")
        fast = Engine().collection("db", "fast")
        existing = rng.random() < 0.6
        doc = {"_id": round_, **{f: _random_value(rng) for f in rng.sample(fields, 3)}}
        if existing:
            reference.insert_one(copy.deepcopy(doc))
            fast.insert_one(copy.deepcopy(doc))
        update: dict[str, Any] = {}
        for op in rng.sample(["$set", "$setOnInsert", "$inc", "$unset"], rng.randint(1, 3)):
            names = rng.sample(fields, rng.randint(1, 2))
            update[op] = {
                n: rng.choice([1, -3, 0.5, "x"]) if op == "$inc" else _random_value(rng)
                for n in names
            }
        query: dict[str, Any] = {"_id": round_}
        if rng.random() < 0.5:
            query["epoch"] = {"$lte": 3}
        if rng.random() < 0.2:
            query["c"] = "pending"

        if existing:
            # What the server does: find the match, then update it by _id (or upsert).
            matched = [d["_id"] for d in reference._iter_documents(query)]
            assert matched == [d["_id"] for d in fast._iter_documents(query)]
        else:
            matched = []
        if matched:
            ref_error = _error_of(reference.update_one, {"_id": round_}, update)
            took = simple_update(update) and fast.update_simple(round_, update)
            fast_error = None if took else _error_of(fast.update_one, {"_id": round_}, update)
            fast_taken += bool(took)
        else:
            ref_error = _error_of(reference.update_one, query, update, upsert=True)
            done, fast_error = False, None
            if simple_update(update):
                try:
                    done, _ = fast.upsert_simple(query, update)
                except Exception as exc:  # a fenced upsert: the row exists, out of reach
                    done, fast_error = True, type(exc).__name__
            if not done:
                fast_error = _error_of(fast.update_one, query, update, upsert=True)
            upserts_taken += bool(done)
        assert fast_error == ref_error, (update, query)
        ref_docs = list(reference.find({}))
        fast_docs = list(fast.find({}))
        assert fast_docs == ref_docs, (update, query)
        assert [list(d) for d in fast_docs] == [list(d) for d in ref_docs], (update, query)
        assert [bson.encode(d) for d in fast_docs] == [bson.encode(d) for d in ref_docs]
    # Enough statements took the direct path for the comparison to mean something.
    assert fast_taken > 300
    assert upserts_taken > 300


def test_clone_is_a_private_deep_copy() -> None:
    """The emulator's cheap deep copy: equal to `copy.deepcopy`, sharing nothing mutable."""
    rng = random.Random(7)
    for _ in range(500):
        doc = {f"f{i}": _random_value(rng) for i in range(4)}
        doc["nested"] = {"list": [_random_value(rng), {"x": [1, 2]}], "set": bson.Int64(3)}
        doc["other"] = [
            bson.Decimal128("1.5"),
            bson.Binary.from_uuid(uuid.uuid4()),
            bson.Regex("^a"),
        ]
        copied = clone(doc)
        assert copied == copy.deepcopy(doc)
        assert bson.encode(copied) == bson.encode(doc)
        copied["nested"]["list"][1]["x"].append(3)
        copied["nested"]["list"].append("more")
        assert doc["nested"]["list"][1]["x"] == [1, 2]
        assert len(doc["nested"]["list"]) == 2


async def test_ledger_style_upserts_keep_fencing_through_the_server(db: Any) -> None:
    """The shape the executor writes: an upsert fenced by `epoch`, through the wire."""
    q = {"_id": "c:email:1", "epoch": {"$lte": 2}}
    u = {"$set": {"state": "pending", "epoch": 2}, "$setOnInsert": {"customer": "1"}}
    res = await db.ledger.update_one(q, u, upsert=True)
    assert res.upserted_id == "c:email:1"
    await db.ledger.update_one(q, {"$set": {"state": "sent"}, "$inc": {"attempts": 1}})
    assert await db.ledger.find_one() == {
        "_id": "c:email:1",
        "state": "sent",
        "epoch": 2,
        "customer": "1",
        "attempts": 1,
    }
    await db.ledger.update_one({"_id": "c:email:1"}, {"$set": {"epoch": 3}})
    with pytest.raises(DuplicateKeyError):  # a later epoch owns the row: fenced
        await db.ledger.update_one(q, u, upsert=True)
    doc = await db.ledger.find_one()
    assert doc is not None
    assert (doc["state"], doc["epoch"]) == ("sent", 3)


async def test_indexes_and_duplicate_keys(db: Any) -> None:
    await db.u.create_index("email", unique=True)
    names = {i["name"] for i in await (await db.u.list_indexes()).to_list()}
    assert names == {"_id_", "email_1"}
    await db.u.insert_one({"email": "a@x"})
    with pytest.raises(DuplicateKeyError) as info:
        await db.u.insert_one({"email": "a@x"})
    assert info.value.code == 11000
    assert "E11000 duplicate key error collection: testdb.u index: email_1" in str(info.value)
    with pytest.raises(BulkWriteError) as bulk:
        await db.u.insert_many(
            [{"email": "b@x"}, {"email": "a@x"}, {"email": "c@x"}], ordered=False
        )
    details = bulk.value.details
    assert details["nInserted"] == 2
    assert [e["index"] for e in details["writeErrors"]] == [1]
    with pytest.raises(BulkWriteError) as ordered:
        await db.u.insert_many([{"email": "d@x"}, {"email": "a@x"}, {"email": "e@x"}])
    assert ordered.value.details["nInserted"] == 1
    await db.u.drop_index("email_1")
    await db.u.insert_one({"email": "a@x"})
    await db.u.insert_one({"_id": 1})
    with pytest.raises(DuplicateKeyError, match="index: _id_"):
        await db.u.insert_one({"_id": 1})


async def test_collections_and_databases(db: Any) -> None:
    await db.create_collection("made")
    with pytest.raises(OperationFailure) as exists:
        await db.command("create", "made")
    assert exists.value.code == 48
    assert "made" in await db.list_collection_names()
    assert "testdb" in await db.client.list_database_names()
    await db.drop_collection("made")
    assert "made" not in await db.list_collection_names()
    await db.other.insert_one({})
    await db.client.drop_database("testdb")
    assert "testdb" not in await db.client.list_database_names()


async def test_unsupported_commands_answer_with_mongodb_errors(db: Any) -> None:
    with pytest.raises(OperationFailure) as unknown:
        await db.command("noSuchCommand")
    assert unknown.value.code == 59
    assert (unknown.value.details or {})["codeName"] == "CommandNotFound"
    await db.c.insert_one({"a": 1})
    with pytest.raises(OperationFailure) as stage:
        await db.c.aggregate([{"$bogusStage": {}}])
    assert (stage.value.details or {})["ok"] == 0
    # The connection is still good afterwards.
    assert await db.c.count_documents({}) == 1


async def test_sync_driver_works_too(emulator: MongoEmulator) -> None:
    def work() -> tuple[int, list[str]]:
        with MongoClient[dict[str, Any]](emulator.uri) as c:
            c.s.t.insert_many([{"i": i} for i in range(5)])
            return c.s.t.count_documents({}), c.list_database_names()

    count, names = await asyncio.to_thread(work)
    assert count == 5
    assert "s" in names


async def test_retryable_write_is_applied_once(emulator: MongoEmulator) -> None:
    """A retried write (same lsid and txnNumber, as a driver sends after losing the reply) is
    answered from the server's record, not applied twice."""
    lsid = {"id": bson.Binary(uuid.uuid4().bytes, 4)}
    command = {
        "update": "c",
        "$db": "d",
        "lsid": lsid,
        "txnNumber": bson.Int64(1),
        "updates": [{"q": {"_id": "x"}, "u": {"$inc": {"n": 1}}, "upsert": True}],
    }

    def send_twice() -> list[dict[str, Any]]:
        replies = []
        with _raw_socket(emulator) as sock:
            for request_id in (1, 2):
                body = b"\x00" + bson.encode(command)
                header = struct.pack("<iiii", 16 + 4 + len(body), request_id, 0, OP_MSG)
                sock.sendall(header + struct.pack("<I", 0) + body)
                replies.append(_read_reply(sock))
        return replies

    first, second = await asyncio.to_thread(send_twice)
    assert first["ok"] == 1
    assert second["n"] == first["n"] == 1
    c: Client = AsyncMongoClient(emulator.uri)
    doc = await c.d.c.find_one({"_id": "x"})
    assert doc is not None
    assert doc["n"] == 1
    await c.close()


async def test_fail_point_error_codes_and_modes(emulator: MongoEmulator) -> None:
    c: Client = AsyncMongoClient(emulator.uri, retryReads=False, retryWrites=False)
    await c.d.c.insert_one({"a": 1})
    await c.admin.command(
        {
            "configureFailPoint": "failCommand",
            "mode": {"times": 2},
            "data": {"failCommands": ["find"], "errorCode": 2, "errorLabels": ["Custom"]},
        }
    )
    for _ in range(2):
        with pytest.raises(OperationFailure) as err:
            await c.d.c.find_one({})
        assert err.value.code == 2
        assert err.value.has_error_label("Custom")
    found = await c.d.c.find_one({})
    assert found is not None
    assert found["a"] == 1
    await c.admin.command(
        {
            "configureFailPoint": "failCommand",
            "mode": "alwaysOn",
            "data": {"failCommands": ["insert"], "errorCode": 121},
        }
    )
    with pytest.raises(OperationFailure):
        await c.d.c.insert_one({"b": 1})
    await c.admin.command({"configureFailPoint": "failCommand", "mode": "off"})
    await c.d.c.insert_one({"b": 1})
    await c.admin.command(
        {
            "configureFailPoint": "failCommand",
            "mode": {"times": 1},
            "data": {"failCommands": ["ping"], "blockConnection": True, "blockTimeMS": 200},
        }
    )
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    await c.admin.command("ping")
    assert loop.time() - t0 >= 0.19
    await c.close()


async def test_retryable_error_codes_get_the_retryable_label(emulator: MongoEmulator) -> None:
    c: Client = AsyncMongoClient(emulator.uri, retryWrites=True)
    await c.admin.command(
        {
            "configureFailPoint": "failCommand",
            "mode": {"times": 1},
            "data": {"failCommands": ["insert"], "errorCode": 91},
        }
    )
    await c.d.c.insert_one({"_id": 1})  # retried by the driver after ShutdownInProgress
    assert await c.d.c.count_documents({}) == 1
    await c.close()


# ---- change streams ---------------------------------------------------------------------------


async def _collect(stream: Any, n: int, limit_s: float = 5.0) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []

    async def run() -> None:
        while len(out) < n:
            event = await stream.try_next()
            if event is not None:
                out.append(event)

    await asyncio.wait_for(run(), limit_s)
    return out


async def test_change_stream_events_and_update_description(db: Any) -> None:
    stream = await db.c.watch(full_document="updateLookup", max_await_time_ms=200)
    await db.c.insert_one({"_id": 1, "a": 1, "sub": {"x": 1}})
    await db.c.update_one({"_id": 1}, {"$set": {"sub.x": 2, "b": 3}, "$unset": {"a": ""}})
    await db.c.replace_one({"_id": 1}, {"only": True})
    await db.c.delete_one({"_id": 1})
    events = await _collect(stream, 4)
    assert [e["operationType"] for e in events] == ["insert", "update", "replace", "delete"]
    ins, upd, rep, dele = events
    assert ins["fullDocument"] == {"_id": 1, "a": 1, "sub": {"x": 1}}
    assert ins["ns"] == {"db": "testdb", "coll": "c"}
    assert upd["updateDescription"]["updatedFields"] == {"sub.x": 2, "b": 3}
    assert upd["updateDescription"]["removedFields"] == ["a"]
    # updateLookup returns the document as it is when the event is read: by then it was deleted
    # or replaced, so the lookup is of the current state.
    assert "fullDocument" in upd
    assert rep["fullDocument"] == {"_id": 1, "only": True}
    assert dele["documentKey"] == {"_id": 1}
    assert isinstance(ins["clusterTime"], Timestamp)
    assert ins["clusterTime"] < upd["clusterTime"] < rep["clusterTime"] < dele["clusterTime"]
    await stream.close()


async def test_change_stream_user_pipeline_filters_and_reshapes(db: Any) -> None:
    pipeline = [
        {
            "$match": {
                "$or": [
                    {"operationType": "insert"},
                    {"updateDescription.updatedFields.status": {"$exists": True}},
                ]
            }
        },
        {"$addFields": {"tag": "seen"}},
        {"$project": {"fullDocument.secret": 0}},
    ]
    stream = await db.c.watch(pipeline, max_await_time_ms=200)
    await db.c.insert_one({"_id": 1, "status": "draft", "secret": "s"})
    await db.c.update_one({"_id": 1}, {"$set": {"performance.sent": 5}})  # filtered out
    await db.c.update_one({"_id": 1}, {"$set": {"status": "approved"}})
    events = await _collect(stream, 2)
    assert [e["operationType"] for e in events] == ["insert", "update"]
    assert all(e["tag"] == "seen" for e in events)
    assert "secret" not in events[0]["fullDocument"]
    assert events[1]["updateDescription"]["updatedFields"] == {"status": "approved"}
    await stream.close()


async def test_database_and_cluster_streams(db: Any) -> None:
    dbs = await db.watch(max_await_time_ms=200)
    cluster = await db.client.watch(max_await_time_ms=200)
    await db.a.insert_one({"x": 1})
    await db.client.otherdb.b.insert_one({"y": 1})
    got_db = await _collect(dbs, 1)
    got_cluster = await _collect(cluster, 2)
    assert got_db[0]["ns"]["coll"] == "a"
    assert {e["ns"]["db"] for e in got_cluster} == {"testdb", "otherdb"}
    await dbs.close()
    await cluster.close()


async def test_drop_invalidates_and_start_after(db: Any) -> None:
    await db.c.insert_one({"x": 1})
    stream = await db.c.watch(max_await_time_ms=200)
    await db.c.insert_one({"x": 2})
    await db.drop_collection("c")
    events = await _collect(stream, 3)
    assert [e["operationType"] for e in events] == ["insert", "drop", "invalidate"]
    await asyncio.sleep(0)
    assert not stream.alive
    invalidate_token = events[-1]["_id"]
    with pytest.raises(OperationFailure) as err:
        await db.c.watch(resume_after=invalidate_token)
    assert err.value.code == 260
    after = await db.c.watch(start_after=invalidate_token, max_await_time_ms=200)
    await db.c.insert_one({"x": 3})
    again = await _collect(after, 1)
    assert again[0]["fullDocument"]["x"] == 3
    await after.close()


async def test_resume_after_and_start_at_operation_time(db: Any) -> None:
    stream = await db.c.watch(max_await_time_ms=200)
    await db.c.insert_many([{"i": i} for i in range(5)])
    first = await _collect(stream, 2)
    await stream.close()
    resumed = await db.c.watch(resume_after=first[1]["_id"], max_await_time_ms=200)
    rest = await _collect(resumed, 3)
    assert [e["fullDocument"]["i"] for e in rest] == [2, 3, 4]
    await resumed.close()
    op_time = first[0]["clusterTime"]
    from_time = await db.c.watch(start_at_operation_time=op_time, max_await_time_ms=200)
    everything = await _collect(from_time, 5)
    assert [e["fullDocument"]["i"] for e in everything] == [0, 1, 2, 3, 4]
    await from_time.close()


async def test_post_batch_resume_token_advances_without_events(db: Any) -> None:
    stream = await db.c.watch(max_await_time_ms=50)
    token0 = stream.resume_token
    await db.other.insert_one({"unrelated": True})
    assert await stream.try_next() is None
    assert stream.resume_token is not None
    assert stream.resume_token != token0
    await db.c.insert_one({"x": 1})
    events = await _collect(stream, 1)
    # A stream resumed from the high-water mark sees the event.
    assert events[0]["fullDocument"]["x"] == 1
    await stream.close()


async def test_pre_images_when_enabled(db: Any) -> None:
    await db.create_collection("pi", changeStreamPreAndPostImages={"enabled": True})
    await db.plain.insert_one({"_id": 1, "v": 0})
    await db.pi.insert_one({"_id": 1, "v": 0})
    stream = await db.watch(full_document_before_change="whenAvailable", max_await_time_ms=200)
    await db.pi.update_one({"_id": 1}, {"$set": {"v": 1}})
    await db.plain.update_one({"_id": 1}, {"$set": {"v": 1}})
    events = await _collect(stream, 2)
    assert events[0]["fullDocumentBeforeChange"] == {"_id": 1, "v": 0}
    assert events[1]["fullDocumentBeforeChange"] is None
    await stream.close()
    required = await db.plain.watch(full_document_before_change="required", max_await_time_ms=200)
    await db.plain.update_one({"_id": 1}, {"$set": {"v": 2}})
    with pytest.raises(OperationFailure):
        await _collect(required, 1)


async def test_await_data_wakes_on_write_not_on_timeout(db: Any) -> None:
    stream = await db.c.watch(max_await_time_ms=5000)
    loop = asyncio.get_running_loop()

    async def write_soon() -> float:
        await asyncio.sleep(0.1)
        await db.c.insert_one({"x": 1})
        return loop.time()

    writer = asyncio.create_task(write_soon())
    event = await stream.try_next()
    while event is None:
        event = await stream.try_next()
    delay = loop.time() - await writer
    assert event["operationType"] == "insert"
    assert delay < 1.0  # far below the 5 s await: woken by the write
    await stream.close()


async def test_stream_resumes_after_closed_connection_without_loss(emulator: MongoEmulator) -> None:
    c: Client = AsyncMongoClient(emulator.uri)
    stream = await c.d.c.watch(max_await_time_ms=100)
    await c.d.c.insert_many([{"i": i} for i in range(3)])
    got = await _collect(stream, 3)
    await c.admin.command(
        {
            "configureFailPoint": "failCommand",
            "mode": {"times": 1},
            "data": {"failCommands": ["getMore"], "closeConnection": True},
        }
    )
    await c.d.c.insert_many([{"i": i} for i in range(3, 6)])
    got += await _collect(stream, 3)
    await c.admin.command(
        {
            "configureFailPoint": "failCommand",
            "mode": {"times": 1},
            "data": {"failCommands": ["getMore"], "errorCode": 10107},
        }
    )
    await c.d.c.insert_many([{"i": i} for i in range(6, 9)])
    got += await _collect(stream, 3)
    assert [e["fullDocument"]["i"] for e in got] == list(range(9))
    await stream.close()
    await c.close()


async def test_history_lost_fails_resume_with_286(emulator: MongoEmulator) -> None:
    c: Client = AsyncMongoClient(emulator.uri)
    stream = await c.d.c.watch(max_await_time_ms=100)
    await c.d.c.insert_one({"i": 1})
    (event,) = await _collect(stream, 1)
    await stream.close()
    await c.d.c.insert_one({"i": 2})
    emulator.drop_change_stream_history()
    with pytest.raises(OperationFailure) as err:
        async with await c.d.c.watch(resume_after=event["_id"]) as s:
            await s.try_next()
    assert err.value.code == 286
    with pytest.raises(OperationFailure) as err2:
        await c.d.c.watch(start_at_operation_time=event["clusterTime"])
    assert err2.value.code == 286
    fresh = await c.d.c.watch(max_await_time_ms=100)
    await c.d.c.insert_one({"i": 3})
    assert (await _collect(fresh, 1))[0]["fullDocument"]["i"] == 3
    await fresh.close()
    await c.close()


# ---- bad input ------------------------------------------------------------------------------


def _raw_socket(emulator: MongoEmulator) -> socket.socket:
    return socket.create_connection((emulator.host, emulator.port), timeout=5)


async def _still_serving(emulator: MongoEmulator) -> None:
    c: Client = AsyncMongoClient(emulator.uri, serverSelectionTimeoutMS=3000)
    assert (await c.admin.command("ping"))["ok"] == 1
    await c.close()


def _read_reply(sock: socket.socket) -> dict[str, Any]:
    header = b""
    while len(header) < 16:
        chunk = sock.recv(16 - len(header))
        if not chunk:
            raise ConnectionError("closed")
        header += chunk
    length = struct.unpack("<i", header[:4])[0]
    body = b""
    while len(body) < length - 16:
        body += sock.recv(length - 16 - len(body))
    return bson.decode(body[5:])


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(b"\x00" * 3, id="truncated-header"),
        pytest.param(struct.pack("<iiii", 64_000_000, 1, 0, OP_MSG), id="oversized"),
        pytest.param(
            struct.pack("<iiii", 30, 1, 0, OP_MSG) + b"\x00\x00\x00\x00\x00garbage!!",
            id="garbage-body",
        ),
        pytest.param(struct.pack("<iiii", 20, 1, 0, 9999) + b"abcd", id="unknown-opcode"),
        pytest.param(
            struct.pack("<iiii", 100, 1, 0, OP_MSG) + b"half", id="disconnect-mid-message"
        ),
    ],
)
async def test_bad_messages_close_only_that_connection(
    emulator: MongoEmulator, payload: bytes
) -> None:
    def send() -> bytes:
        with _raw_socket(emulator) as sock:
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
            try:
                return sock.recv(100)
            except OSError:
                return b""

    assert await asyncio.to_thread(send) == b""  # closed without a reply
    await _still_serving(emulator)


async def test_checksummed_op_msg_and_document_sequences(emulator: MongoEmulator) -> None:
    def roundtrip() -> tuple[dict[str, Any], dict[str, Any]]:
        body = bson.encode({"insert": "seq", "$db": "raw"})
        docs = b"".join(bson.encode({"n": i}) for i in range(3))
        ident = b"documents\x00"
        seq = struct.pack("<i", 4 + len(ident) + len(docs)) + ident + docs
        sections = b"\x00" + body + b"\x01" + seq
        flags = struct.pack("<I", 1)
        msg_len = 16 + 4 + len(sections) + 4
        without_crc = struct.pack("<iiii", msg_len, 7, 0, OP_MSG) + flags + sections
        message = without_crc + struct.pack("<I", crc32c(without_crc))
        with _raw_socket(emulator) as sock:
            sock.sendall(message)
            first = _read_reply(sock)
            bad = bytearray(message)
            bad[-1] ^= 0xFF
            sock.sendall(bytes(bad))
            try:
                second = _read_reply(sock)
            except (ConnectionError, OSError):
                second = {}
        return first, second

    reply, after_bad_crc = await asyncio.to_thread(roundtrip)
    assert reply["ok"] == 1
    assert reply["n"] == 3
    assert after_bad_crc == {}
    c: Client = AsyncMongoClient(emulator.uri)
    assert await c.raw.seq.count_documents({}) == 3
    await c.close()


async def _cli_emulator() -> tuple[asyncio.subprocess.Process, str]:
    """`reactor mongo-emulator` in a process of its own, and the line it printed when ready."""
    import sys

    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "reactor",
        "mongo-emulator",
        "--port",
        "0",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    return proc, (await asyncio.wait_for(proc.stdout.readline(), 15)).decode()


async def test_emulator_cli_prints_one_ready_line_and_stops_cleanly() -> None:
    import signal

    proc, line = await _cli_emulator()
    assert line.startswith("ready mongodb://127.0.0.1:")
    assert line.rstrip().endswith("replicaSet=rs0")
    uri = line.split()[1]
    c: Client = AsyncMongoClient(uri)
    await c.x.y.insert_one({"a": 1})
    stream = await c.x.y.watch(max_await_time_ms=100)
    await c.close()
    proc.send_signal(signal.SIGTERM)
    out, err = await asyncio.wait_for(proc.communicate(), 15)
    assert proc.returncode == 0
    assert out == b""
    assert b"Traceback" not in err
    del stream


async def test_dates_round_trip_as_utc(db: Any) -> None:
    when = dt.datetime(2026, 5, 1, 12, 30, tzinfo=dt.UTC)
    await db.d.insert_one({"at": when})
    found = await db.d.find_one({"at": {"$lte": when}})
    assert found["at"] == when


async def test_indexed_lookups_stay_exact_through_every_kind_of_write(
    emulator: MongoEmulator,
) -> None:
    """The emulator answers equality on an indexed field from tables it patches after each
    write (by the keys the write's change entries name): after random inserts, updates,
    replacements, unsets, array values, upserts and deletes, every lookup must equal a full
    scan's answer, in natural order."""
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(emulator.uri)
    coll = client.t.indexed
    await coll.create_index("f")
    await coll.insert_one({"_id": "seed", "f": "a"})
    rng = random.Random(11)
    values = ["a", "b", "c", 1, 2]
    for step in range(300):
        key = f"k{rng.randrange(25)}"
        op = rng.randrange(8)
        if op == 0:
            await coll.update_one({"_id": key}, {"$set": {"f": rng.choice(values)}}, upsert=True)
        elif op == 1:
            await coll.delete_one({"_id": key})
        elif op == 2:
            await coll.update_one({"_id": key}, {"$unset": {"f": ""}})
        elif op == 3:
            await coll.replace_one({"_id": key}, {"f": rng.choice(values), "n": step}, upsert=True)
        elif op == 4:
            await coll.update_many({"f": rng.choice(values)}, {"$set": {"f": rng.choice(values)}})
        elif op == 5 and step % 50 == 0:
            await coll.update_one({"_id": key}, {"$set": {"f": ["a", "b"]}}, upsert=True)
        elif op == 6:
            await coll.find_one_and_update({"_id": key}, {"$set": {"f": rng.choice(values)}})
        else:
            await coll.bulk_write(
                [
                    UpdateOne(
                        {"_id": f"k{rng.randrange(25)}"},
                        {"$set": {"f": rng.choice(values)}},
                        upsert=True,
                    ),
                    DeleteOne({"_id": f"k{rng.randrange(25)}"}),
                ],
                ordered=False,
            )
        everything = await coll.find({}).to_list()
        for v in values:
            expected = [
                d["_id"]
                for d in everything
                if d.get("f") == v or (isinstance(d.get("f"), list) and v in d["f"])
            ]
            got = [d["_id"] for d in await coll.find({"f": v}).to_list()]
            assert got == expected, (step, op, v)
            got_in = [d["_id"] for d in await coll.find({"f": {"$in": [v]}}).to_list()]
            assert got_in == expected, (step, op, v)
    await client.close()


async def test_an_index_is_built_when_it_is_created_and_kept_through_writes(
    emulator: MongoEmulator,
) -> None:
    """As mongod builds an index at createIndexes, so the emulator builds its equality table
    then (not on the field's first query, which would pay for a scan of the whole collection
    at some moment under load) and patches it through later writes: the first query uses the
    very table built at creation, and it holds the documents written since."""
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(emulator.uri)
    coll = client.t.built
    await coll.insert_many([{"_id": i, "to": f"c{i % 500}@x"} for i in range(2_000)])
    await coll.create_index("to")
    store = emulator.engine.client["t"]._store["built"]
    state = store._reactor_index
    assert state is not None
    assert state.tables["to"] is not None
    assert len(state.tables["to"]) == 500
    await coll.insert_many([{"_id": 2_000 + i, "to": "new@x"} for i in range(10)])
    await coll.update_one({"_id": 0}, {"$set": {"to": "new@x"}})
    got = [d["_id"] for d in await coll.find({"to": "new@x"}).to_list()]
    assert got == [0, *range(2_000, 2_010)]
    assert store._reactor_index is state  # patched, never rebuilt
    assert [d["_id"] for d in await coll.find({"to": "c1@x"}).to_list()] == [1, 501, 1001, 1501]
    await client.close()


async def test_a_compound_index_serves_its_pinned_prefix_by_its_narrowest_key(
    emulator: MongoEmulator,
) -> None:
    """{campaign: 1, customer: 1}: a filter pinning both is answered from whichever key's table
    holds fewer candidates (here `customer`: one campaign holds every document), one pinning
    `customer` alone by no table (mongod cannot use that index for it either), and every
    answer equals a scan's, in natural order."""
    from reactor.embedded.mongo.fastpath import _narrowest

    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(emulator.uri)
    coll = client.t.compound
    await coll.create_index([("campaign", 1), ("customer", 1), ("at", 1)])
    await coll.insert_many(
        [{"_id": i, "campaign": "c1", "customer": str(i % 50), "at": i} for i in range(1_000)]
    )
    store = emulator.engine.client["t"]._store["compound"]
    state = store._reactor_index
    indexes = store._reactor_fields
    both = {"campaign": {"$in": ["c1"]}, "customer": {"$in": ["3", "4"]}, "at": {"$gte": 500}}
    picked = _narrowest(both, indexes, state, store)
    assert picked is not None
    assert picked[0] is state.tables["customer"]
    assert _narrowest({"customer": "3"}, indexes, state, store) is None
    only_campaign = _narrowest({"campaign": "c1"}, indexes, state, store)
    assert only_campaign is not None
    assert only_campaign[0] is state.tables["campaign"]
    everything = await coll.find({}).to_list()
    for query in (both, {"customer": "3"}, {"campaign": "c1", "customer": "7"}):
        got = [d["_id"] for d in await coll.find(query).to_list()]
        expected = [
            d["_id"]
            for d in everything
            if all(
                d[k] in v["$in"]
                if isinstance(v, dict) and "$in" in v
                else d[k] >= v["$gte"]
                if isinstance(v, dict)
                else d[k] == v
                for k, v in query.items()
            )
        ]
        assert got == expected, query
    await client.close()


async def test_a_change_stream_waiting_when_the_emulator_stops_ends_without_an_error() -> None:
    """SIGTERM while a getMore awaits changes: the CLI's cancel scope cancels it, repeatedly,
    and nothing may fail on the way out (an asyncio.Condition whose lock re-acquire was
    cancelled raised 'Lock is not acquired' here, logged as an engine failure)."""
    import signal

    proc, line = await _cli_emulator()
    uri = line.split()[1]
    c: Client = AsyncMongoClient(uri, serverSelectionTimeoutMS=2000)
    await c.x.y.insert_one({"a": 1})
    streams = [await c.x.y.watch(max_await_time_ms=10_000) for _ in range(4)]
    waiting = [asyncio.ensure_future(s.try_next()) for s in streams]
    await asyncio.sleep(0.5)  # every getMore is inside its wait
    proc.send_signal(signal.SIGTERM)
    out, err = await asyncio.wait_for(proc.communicate(), 15)
    for task in waiting:
        task.cancel()
    await asyncio.gather(*waiting, return_exceptions=True)
    await c.close()
    assert proc.returncode == 0
    assert out == b""
    assert b"Traceback" not in err, err.decode()[-2000:]
    assert b"engine failed" not in err


async def test_an_index_on_a_dotted_path_answers_as_a_scan_would(emulator: MongoEmulator) -> None:
    """Equality tables hold top-level values: a dotted key (alone, or after a top-level one in
    a compound index) must never be answered from one, or every lookup on it finds nothing."""
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(emulator.uri)
    coll = client.t.dotted
    await coll.insert_many([{"_id": i, "a": {"b": i % 3}, "k": i % 2} for i in range(12)])
    await coll.create_index([("k", 1), ("a.b", 1)])
    await coll.create_index("a.b")
    assert [d["_id"] for d in await coll.find({"a.b": 1}).to_list()] == [1, 4, 7, 10]
    assert [d["_id"] for d in await coll.find({"k": 1, "a.b": 1}).to_list()] == [1, 7]
    assert [d["_id"] for d in await coll.find({"k": 0}).to_list()] == [0, 2, 4, 6, 8, 10]
    await client.close()


async def test_a_retry_waits_for_the_attempt_it_repeats(emulator: MongoEmulator) -> None:
    # mongod checks a session out for one operation at a time: a retryable write's retry that
    # arrives while its first attempt is still running (an insert yields between chunks) waits
    # for it, then is answered from its reply instead of applying the write a second time.
    from reactor.embedded.mongo.commands.base import Connection
    from reactor.embedded.mongo.wire import Request

    release = asyncio.Event()
    calls = 0

    async def handler(request: Any, conn: Any, db: str) -> dict[str, Any]:
        nonlocal calls
        calls += 1
        await release.wait()
        return {"n": 3}

    lsid = {"id": bson.Binary(uuid.uuid4().bytes, 4)}
    command = {"insert": "c", "documents": [], "lsid": lsid, "txnNumber": 7, "$db": "x"}
    conn = Connection(id=1, writer=None)  # type: ignore[arg-type]  # the handler writes nothing

    def attempt() -> asyncio.Task[dict[str, Any]]:
        request = Request(request_id=1, op_code=OP_MSG, command=dict(command))
        return asyncio.create_task(emulator._run_once(handler, request, conn, "x", "insert"))

    first = attempt()
    await asyncio.sleep(0.01)
    retry = attempt()
    await asyncio.sleep(0.01)
    assert not retry.done()  # waiting for the first attempt, not running beside it
    release.set()
    assert await first == {"n": 3}
    assert await retry == {"n": 3}
    assert calls == 1
    other = {**command, "txnNumber": 8}  # a new write of the session runs
    await emulator._run_once(
        handler, Request(request_id=2, op_code=OP_MSG, command=other), conn, "x", "insert"
    )
    assert calls == 2


async def test_indexed_lookups_match_arrays_and_other_types_as_mongod_does(db: Any) -> None:
    # A candidate from an equality table is turned down early only when its value has the
    # condition's own type (a string, a date); an array or another type goes to the matcher.
    t1, t2, t3 = (dt.datetime(2026, 1, d, tzinfo=dt.UTC) for d in (1, 2, 3))
    await db.quick.create_index([("campaign", 1), ("customer", 1)])
    await db.quick.insert_many(
        [
            {"_id": 1, "campaign": "a", "customer": "x", "kind": "click", "at": t3},
            {"_id": 2, "campaign": "a", "customer": "x", "kind": ["open", "click"], "at": t2},
            {"_id": 3, "campaign": "a", "customer": "y", "kind": "open", "at": t3},
            {"_id": 4, "campaign": "a", "customer": "y", "kind": "click", "at": [t1, t3]},
            {"_id": 5, "campaign": "a", "customer": "x", "kind": "click", "at": t1},
            {"_id": 6, "campaign": "a", "customer": ["z", "x"], "kind": "click", "at": t3},
            {"_id": 7, "campaign": "a", "customer": "x", "kind": 5, "at": "late"},
        ]
    )
    query = {
        "campaign": {"$in": ["a"]},
        "customer": {"$in": ["x", "y"]},
        "kind": "click",
        "at": {"$gte": t2},
    }
    assert sorted(d["_id"] for d in await db.quick.find(query).to_list()) == [1, 2, 4, 6]
    assert [d["_id"] for d in await db.quick.find({"campaign": "a", "kind": 5}).to_list()] == [7]
    # Each bound may be met by a different element of an array: [t1, t3] is in (t1, t3).
    between = {"campaign": "a", "at": {"$gt": t1, "$lt": t3}}
    assert [d["_id"] for d in await db.quick.find(between).to_list()] == [2, 4]


async def test_a_date_range_on_an_indexed_field_finds_what_a_scan_finds(db: Any) -> None:
    t1, t2, t3 = (dt.datetime(2026, 1, d, tzinfo=dt.UTC) for d in (1, 2, 3))
    docs = [
        {"_id": 1, "at": t1},
        {"_id": 2, "at": t2},
        {"_id": 3, "at": t3},
        {"_id": 4, "at": "2026-01-03"},  # a string is never within date bounds
        {"_id": 5},
        {"_id": 6, "at": None},
    ]
    await db.ranged.insert_many(docs)
    await db.scanned.insert_many(docs)
    await db.ranged.create_index("at", expireAfterSeconds=10**9)
    for bounds, expected in (
        ({"$gte": t2}, [2, 3]),
        ({"$gt": t1, "$lte": t2}, [2]),
        ({"$lt": t1}, []),
    ):
        got = [d["_id"] for d in await db.ranged.find({"at": bounds}).sort("_id").to_list()]
        scan = [d["_id"] for d in await db.scanned.find({"at": bounds}).sort("_id").to_list()]
        assert got == scan == expected
    await db.ranged.insert_one({"_id": 7, "at": [t1, t3]})  # an array: the table gives way
    got = [d["_id"] for d in await db.ranged.find({"at": {"$gt": t2}}).sort("_id").to_list()]
    assert got == [3, 7]


def test_the_emulators_process_freezes_what_survives_a_young_collection() -> None:
    import gc
    import subprocess
    import sys

    # In a process of its own (the policy is for `reactor mongo-emulator`, not for this one).
    code = (
        "import gc\n"
        "from reactor.embedded.mongo.gcpolicy import freeze_survivors_of_young_collections\n"
        "freeze_survivors_of_young_collections(); freeze_survivors_of_young_collections()\n"
        "before = gc.get_freeze_count()\n"
        "kept = [[i] for i in range(1000)]; gc.collect(0)\n"
        "print(gc.callbacks.count(gc.callbacks[-1]), gc.get_freeze_count() - before >= 1000)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["1", "True"]
    assert not any(getattr(cb, "__name__", "") == "_freeze_survivors" for cb in gc.callbacks)
