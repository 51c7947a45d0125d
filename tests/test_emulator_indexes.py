"""Index specifications the embedded server refuses as mongod refuses them (PyMongo's
`test_index_filter` starts with these): a partial filter that is not a document
(TypeMismatch, 14), one with an unknown operator or a `$and` that is not an array (BadValue, 2),
one with expressions a partial index cannot hold (CannotCreateIndex, 67); and text indexes
listed with their weights, bad weights refused (67). Through the real driver, so with
REACTOR_TEST_MONGO_URI they run against a real replica set too."""

from __future__ import annotations

from typing import Any

import pytest
from pymongo import TEXT
from pymongo.errors import OperationFailure

from tests.conftest import MongoTarget


@pytest.fixture
def db(client: Any, mongo: MongoTarget) -> Any:
    return client[mongo.campaigns_db]


@pytest.mark.parametrize(
    ("partial", "code"),
    [
        (5, 14),
        ("x", 14),
        ({"x": {"$asdasd": 3}}, 2),
        ({"$and": 5}, 2),
        ({"$and": []}, 2),
        ({"$and": [5]}, 2),
        ({"$asdasd": 1}, 2),
        ({"x": {"$ne": 1}}, 67),
        ({"x": {"$exists": False}}, 67),
        ({"$nor": [{"x": 1}]}, 67),
    ],
)
async def test_a_partial_filter_mongod_refuses_is_refused(
    db: Any, partial: object, code: int
) -> None:
    with pytest.raises(OperationFailure) as refused:
        await db.ix.create_index("x", partialFilterExpression=partial)
    assert refused.value.code == code
    assert "x_1" not in await db.ix.index_information()


@pytest.mark.parametrize(
    "partial",
    [
        {"a": {"$lte": 1.5}},
        {"a": 1},
        {"a": {"b": 1}},
        {"$and": [{"a": {"$gt": 1}}, {"b": {"$exists": True}}]},
        {"$or": [{"a": 1}, {"b": {"$type": "string"}}]},
        {"a": {"$in": [1, 2]}},
    ],
)
async def test_a_partial_filter_mongod_accepts_is_kept(db: Any, partial: dict[str, Any]) -> None:
    assert await db.ok.create_index("x", partialFilterExpression=partial) == "x_1"
    info = await db.ok.index_information()
    assert info["x_1"]["partialFilterExpression"] == partial


async def test_a_text_index_lists_its_weights(db: Any) -> None:
    await db.t.create_index([("t", TEXT), ("u", TEXT)], weights={"u": 5})
    info = (await db.t.index_information())["t_text_u_text"]
    assert info["weights"] == {"t": 1, "u": 5}
    assert info["default_language"] == "english"
    assert info["language_override"] == "language"


@pytest.mark.parametrize(
    ("weights", "why"),
    [
        ({"t": "heavy"}, "numeric"),
        ({"t": 0}, "exclusive interval"),
        ({"t": 100_000}, "exclusive interval"),
        (5, "must be an object"),
    ],
)
async def test_bad_text_weights_are_refused(db: Any, weights: object, why: str) -> None:
    with pytest.raises(OperationFailure) as refused:
        await db.tw.create_index([("t", TEXT)], weights=weights)
    assert refused.value.code == 67
    assert why in str(refused.value)


async def test_text_search_is_refused_not_guessed(db: Any, mongo: MongoTarget) -> None:
    mongo.require_emulator()  # mongod answers $text with its own scoring
    await db.ts.create_index([("t", TEXT)])
    await db.ts.insert_one({"t": "spam"})
    with pytest.raises(OperationFailure) as refused:
        await db.ts.find_one({"$text": {"$search": "spam"}})
    assert refused.value.code == 115


def _stage(plan: dict[str, Any], stage: str) -> dict[str, Any]:
    """The plan's stage named `stage` (PyMongo's own walk: inputStage, inputStages, queryPlan)."""
    if plan.get("stage") == stage:
        return plan
    for child in [plan.get("inputStage"), plan.get("queryPlan"), *plan.get("inputStages", [])]:
        if isinstance(child, dict) and (found := _stage(child, stage)):
            return found
    return {}


@pytest.mark.parametrize(
    ("query", "uses_partial_index"),
    [
        ({"x": 6, "a": 1}, True),
        ({"x": {"$gt": 1}, "a": 1}, True),
        ({"x": 6, "a": {"$lte": 1}}, True),
        ({"x": 6, "a": {"$lt": 1.5}}, True),
        ({"$and": [{"x": 6}, {"a": 1.5}]}, True),
        ({"x": 6, "a": {"$lte": 1.6}}, False),  # a = 1.6 is not in the index
        ({"x": 6, "a": {"$gte": 1}}, False),
        ({"x": 6, "a": "1"}, False),  # a string is not <= 1.5
        ({"x": 6}, False),
        ({"a": 1}, False),  # nothing on the index's first field
        ({"$or": [{"x": 6}, {"a": 1}]}, False),
    ],
)
async def test_explain_uses_a_partial_index_only_when_the_query_implies_its_filter(
    db: Any, query: dict[str, Any], uses_partial_index: bool
) -> None:
    await db.pf.create_index("x", partialFilterExpression={"a": {"$lte": 1.5}})
    await db.pf.insert_many([{"x": 5, "a": 2}, {"x": 6, "a": 1}])
    plan = (await db.pf.find(query).explain())["queryPlanner"]["winningPlan"]
    scan = _stage(plan, "IXSCAN")
    if uses_partial_index:
        assert scan.get("indexName") == "x_1", plan
        assert scan.get("isPartial") is True
    else:
        assert scan == {}, plan
        assert _stage(plan, "COLLSCAN") != {}
    await db.pf.drop_index("x_1")
    plan = (await db.pf.find(query).explain())["queryPlanner"]["winningPlan"]
    assert _stage(plan, "COLLSCAN") != {}


async def test_explain_of_other_commands_is_refused_not_guessed(
    db: Any, mongo: MongoTarget
) -> None:
    mongo.require_emulator()  # mongod explains them
    await db.ex.insert_one({"x": 1})
    with pytest.raises(OperationFailure) as refused:
        await db.command({"explain": {"count": "ex", "query": {}}})
    assert refused.value.code == 115
