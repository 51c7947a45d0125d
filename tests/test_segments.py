"""Audiences outside the document: a segment query on the orders collection, or a targets
collection of id chunks. Validated (only query operators), frozen in chunks at the start, and
sent in shards: each matching customer gets exactly one message, nobody else any."""

from __future__ import annotations

import collections
from typing import Any

import anyio
import pytest
from pymongo import AsyncMongoClient

from reactor.domain.errors import InvalidCampaign
from reactor.domain.segments import Segment, parse_segment
from reactor.embedded.smtp_sink import SmtpSink

from .conftest import MongoTarget
from .helpers import campaign, eventually, ledger, running, settings

Client = AsyncMongoClient[dict[str, Any]]


def test_a_segment_query_may_use_query_operators_only() -> None:
    query = {
        "tier": {"$in": ["gold", "platinum"]},
        "$or": [{"spent": {"$gte": 100}}, {"vip": True}],
    }
    assert parse_segment({"query": query}) == Segment(query=query)
    assert parse_segment({"targets": "spring_sale_ids"}) == Segment(targets="spring_sale_ids")
    assert parse_segment(None) is None
    refused = [
        {"query": {"$where": "this.spent > 100"}},
        {"query": {"$expr": {"$function": {"body": "return 1", "args": [], "lang": "js"}}}},
        {"query": {"tier": {"$accumulator": {}}}},
        {"query": {"$or": [{"a": 1}, {"b": {"$where": "1"}}]}},
        {"query": "tier = gold"},
        {"query": {"": 1}},
        {"targets": "system.users"},
        {"targets": "a$b"},
        {"targets": ""},
        {"query": {}, "targets": "x"},
        {"sql": "select"},
    ]
    for raw in refused:
        with pytest.raises(InvalidCampaign) as info:
            parse_segment(raw)
        assert info.value.reason == "bad_segment", raw


async def _done(client: Client, mongo: MongoTarget, campaign_id: Any) -> bool:
    doc = await client[mongo.campaigns_db].campaigns.find_one({"_id": campaign_id})
    return bool(doc and (doc.get("execution") or {}).get("sendsDone"))


async def _orders(client: Client, mongo: MongoTarget, n: int) -> None:
    rows = []
    for i in range(n):
        tier = "gold" if i % 3 == 0 else "silver"
        rows.append({"customer_id": i, "email": f"c{i}@example.com", "name": f"C{i}", "tier": tier})
        rows.append({"customer_id": i, "email": "", "tier": tier, "total": 5})  # a second order
    await client[mongo.segmentation_db]["newdatabase"].insert_many(rows)


async def test_a_segment_query_reaches_every_match_once_and_nobody_else(
    mongo: MongoTarget, client: Client, sink: SmtpSink
) -> None:
    await _orders(client, mongo, 600)
    coll = client[mongo.campaigns_db].campaigns
    configs = [settings(mongo, sink, reactor_instance_id=f"r{i}", shard_size=60) for i in range(2)]
    async with running(*configs):
        doc = campaign(
            "gold", 0.5, 120, [], channels=["email"], segment={"query": {"tier": "gold"}}
        )
        res = await coll.insert_one(doc)
        await eventually(lambda: _done(client, mongo, res.inserted_id), 60)
    received = collections.Counter(m.to for m in sink.messages)
    assert set(received) == {f"c{i}@example.com" for i in range(0, 600, 3)}
    assert set(received.values()) == {1}
    shards = (
        await client[mongo.campaigns_db]
        .campaign_shards.find({"campaign": str(res.inserted_id)})
        .to_list()
    )
    assert len(shards) == 4  # 200 customers in chunks of 60
    assert {s["source"] for s in shards} == {"audience"}
    assert {s["state"] for s in shards} == {"done"}
    audience = client[mongo.campaigns_db].campaign_audiences
    meta = await audience.find_one({"_id": f"{res.inserted_id}:audience"})
    assert meta is not None
    assert meta["complete"] is True
    assert meta["total"] == 200
    final = await coll.find_one({"_id": res.inserted_id})
    assert final is not None
    assert final["performance"]["emailsSent"] == 200


async def test_a_targets_collection_is_read_in_chunks_and_bad_values_are_reported(
    mongo: MongoTarget, client: Client, sink: SmtpSink
) -> None:
    await _orders(client, mongo, 120)
    seg = client[mongo.segmentation_db]
    await seg.spring_ids.insert_many(
        [
            {"_id": 1, "ids": [str(i) for i in range(0, 50)]},
            {"_id": 2, "ids": [str(i) for i in range(50, 100)] + ["7", 8]},  # listed twice
            {"_id": 3, "ids": [{"not": "an id"}]},
        ]
    )
    coll = client[mongo.campaigns_db].campaigns
    async with running(settings(mongo, sink, shard_size=40)):
        doc = campaign(
            "spring", 0.5, 120, [], channels=["email"], segment={"targets": "spring_ids"}
        )
        res = await coll.insert_one(doc)
        await eventually(lambda: _done(client, mongo, res.inserted_id), 60)
    received = collections.Counter(m.to for m in sink.messages)
    assert set(received) == {f"c{i}@example.com" for i in range(100)}
    assert set(received.values()) == {1}
    rows = await ledger(client, mongo, res.inserted_id)
    assert len(rows) == 100
    final = await coll.find_one({"_id": res.inserted_id})
    assert final is not None
    assert final["performance"]["emailsSent"] == 100
    assert final["execution"]["lastError"]["reason"] == "bad_targets"
    assert "not customer ids" in final["execution"]["lastError"]["detail"]


async def test_a_segment_that_could_run_code_is_refused_and_sends_nothing(
    mongo: MongoTarget, client: Client, sink: SmtpSink
) -> None:
    await _orders(client, mongo, 30)
    coll = client[mongo.campaigns_db].campaigns
    async with running(settings(mongo, sink, shard_size=10)):
        doc = campaign(
            "evil", 0.3, 60, [], channels=["email"], segment={"query": {"$where": "sleep(1000)"}}
        )
        res = await coll.insert_one(doc)

        async def reported() -> bool:
            found = await coll.find_one({"_id": res.inserted_id})
            error = ((found or {}).get("execution") or {}).get("lastError") or {}
            return error.get("reason") == "bad_segment"

        await eventually(reported, 10)
        await anyio.sleep(1.0)  # past its start: it is not started
        final = await coll.find_one({"_id": res.inserted_id})
    assert final is not None
    assert final["status"] == "approved"
    assert "$where" in final["execution"]["lastError"]["detail"]
    assert sink.messages == []
