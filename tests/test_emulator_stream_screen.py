"""The embedded server's change-stream screen (reactor/embedded/mongo/changestream.py): before
it builds an event for a database-wide stream's `$match`, it rules out the writes whose
collection and operation type the match cannot accept. It must never rule out an event the
full filter accepts (differential, on random matches), and it must rule out the writes of the
collections the reactor's own feed does not watch (the reason it exists)."""

from __future__ import annotations

import datetime as dt
import random
import re
from typing import Any, cast

from mongomock import filtering

from reactor.adapters.mongo.feed import pipeline
from reactor.embedded.mongo.changestream import ChangeStreamCursor, _event
from reactor.embedded.mongo.engine import OplogEntry

COLLS = ["campaigns", "engagement", "reactor_state", "ledger", "x.y"]
OPS = ["insert", "update", "replace", "delete", "drop", "rename", "dropDatabase"]
NOW = dt.datetime(2026, 12, 7, tzinfo=dt.UTC)


def _entry(rng: random.Random, ts: int) -> OplogEntry:
    op = rng.choice(OPS)
    return OplogEntry(
        ts=ts,
        db="marketing",
        coll="" if op == "dropDatabase" else rng.choice(COLLS),
        op=op,
        document_key=None
        if op in ("drop", "dropDatabase", "rename")
        else {"_id": rng.randrange(3)},
        wall_time=NOW,
    )


def _value(rng: random.Random, pool: list[str]) -> Any:
    kind = rng.randrange(9)
    pick = rng.choice(pool)
    return [
        pick,
        {"$eq": pick},
        {"$in": rng.sample(pool, rng.randrange(len(pool)))},
        {"$ne": pick},
        {"$nin": rng.sample(pool, 2)},
        re.compile("^" + pick[:2]),
        {"$exists": rng.random() < 0.5},
        None,
        {"$in": [pick, re.compile("e")]},
    ][kind]


def _match(rng: random.Random, depth: int = 0) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for _ in range(rng.randrange(1, 4)):
        roll = rng.random()
        if roll < 0.25 and depth < 2:
            out["$or"] = [_match(rng, depth + 1) for _ in range(rng.randrange(1, 4))]
        elif roll < 0.35 and depth < 2:
            out["$and"] = [_match(rng, depth + 1) for _ in range(rng.randrange(1, 3))]
        elif roll < 0.65:
            out["ns.coll"] = _value(rng, COLLS)
        elif roll < 0.9:
            out["operationType"] = _value(rng, OPS)
        else:
            out["documentKey._id"] = rng.randrange(3)
    return out


def _cursor(match: dict[str, Any]) -> ChangeStreamCursor:
    return ChangeStreamCursor(
        db="marketing",
        coll=None,
        pipeline=[{"$match": match}],
        full_document="default",
        before_change="off",
        position=0,
        prefilter=match,
    )


def _accepted(cursor: ChangeStreamCursor, entry: OplogEntry) -> bool:
    event = _event(cast(Any, None), cursor, entry, lookup=False)
    return bool(filtering.filter_applies(cursor.prefilter, event))  # type: ignore[no-untyped-call]


def test_the_screen_never_rules_out_an_event_the_filter_accepts() -> None:
    rng = random.Random(7)
    ruled_out = accepted = 0
    for n in range(3000):
        cursor = _cursor(_match(rng))
        for k in range(8):
            entry = _entry(rng, n * 8 + k)
            screened = cursor.may_match(entry)
            if _accepted(cursor, entry):
                accepted += 1
                assert screened, (cursor.prefilter, entry.coll, entry.op)
            elif not screened:
                ruled_out += 1
    # The random matches both accept events and let the screen rule others out: both sides of
    # the comparison were exercised.
    assert accepted > 2000
    assert ruled_out > 2000


def test_the_feed_stream_skips_other_collections_writes_without_building_their_events() -> None:
    cursor = _cursor(pipeline("campaigns", "barrier:r1")[0]["$match"])
    for coll in ("engagement", "ledger", "engagement_firsts"):
        for op in ("insert", "update", "delete"):
            entry = OplogEntry(
                ts=1, db="marketing", coll=coll, op=op, document_key={"_id": 1}, wall_time=NOW
            )
            assert not cursor.may_match(entry)
    for coll, op in (("campaigns", "insert"), ("campaigns", "update"), ("reactor_state", "update")):
        entry = OplogEntry(
            ts=1, db="marketing", coll=coll, op=op, document_key={"_id": 1}, wall_time=NOW
        )
        assert cursor.may_match(entry)
    dropped = OplogEntry(
        ts=1, db="marketing", coll="", op="dropDatabase", document_key=None, wall_time=NOW
    )
    assert cursor.may_match(dropped)
