"""A/B splits end to end on the embedded stand-ins: assignment, the decision's claim and result,
the rest sent with the winner, and the window closing first."""

from __future__ import annotations

import collections
import datetime as dt
from typing import Any

import anyio
import pytest
from bson import ObjectId

from reactor.adapters.mongo.splits import MongoSplits
from reactor.cli import main
from reactor.config import DEFAULT_SPLIT_KEY
from reactor.domain.models import parse_campaign
from reactor.domain.splits import assign
from reactor.embedded.smtp_sink import SmtpSink
from reactor.splits.report import gather, render

from .conftest import MongoTarget
from .helpers import (
    Client,
    campaign,
    eventually,
    has_status,
    ledger,
    now,
    running,
    seed_customers,
    settings,
)

SUBJECTS = {"A": "Hi {{name}}", "B": "B for {{name}}", "C": "C for {{name}}"}


def split_doc(
    targets: list[str], *, share: float, minutes: float, **ab: Any
) -> tuple[ObjectId, dict[str, Any]]:
    _id = ObjectId()
    doc = campaign(
        "split",
        0.5,
        120,
        targets,
        _id=_id,
        channels=["email"],
        variants=[
            {"key": "A"},
            {"key": "B", "email": {"subject": SUBJECTS["B"]}},
            {"key": "C", "email": {"subject": SUBJECTS["C"]}},
        ],
        abTest={
            "testShare": share,
            "metric": "human_clicks",
            "decideAfterMinutes": minutes,
            "minPerVariant": 10.0,
            **ab,
        },
    )
    return _id, doc


def groups(_id: ObjectId, doc: dict[str, Any], targets: list[str]) -> dict[str, str | None]:
    split = parse_campaign(doc).split
    assert split is not None
    return {c: assign(DEFAULT_SPLIT_KEY, str(_id), c, split) for c in targets}


def engagement(_id: ObjectId, customer: str, kind: str, klass: str) -> dict[str, Any]:
    return {
        "campaign": str(_id),  # as the recorder writes it: the token's key
        "channel": "email",
        "customer": customer,
        "kind": kind,
        "link": "https://shop.example/x" if kind == "click" else None,
        "at": now(),
        "class": klass,
        "reasons": ["test"],
        "agent": "Mozilla/5.0",
        "ip": "203.0.113.9",
    }


async def _sent_all(client: Client, mongo: MongoTarget, _id: ObjectId, n: int) -> bool:
    rows = await ledger(client, mongo, _id)
    return len([r for r in rows if r["state"] == "sent"]) == n


async def test_the_rest_gets_the_significant_winner_once_each_sharded_on_two_replicas(
    mongo: MongoTarget, client: Client, sink: SmtpSink
) -> None:
    targets = await seed_customers(client, mongo, 300)
    _id, doc = split_doc(targets, share=0.5, minutes=0.2)
    assigned = groups(_id, doc, targets)
    # Human clicks from most of B's group; machine opens and scanner clicks everywhere else,
    # which must not count (they would make A or C look best).
    events = []
    for i, (customer, variant) in enumerate(assigned.items()):
        if variant == "B" and i % 5:
            events.append(engagement(_id, customer, "click", "human"))
        elif variant in ("A", "C"):
            events.append(engagement(_id, customer, "open", "machine"))
            events.append(engagement(_id, customer, "click", "scanner"))
    await client[mongo.campaigns_db].engagement.insert_many(events)
    configs = [settings(mongo, sink, reactor_instance_id=f"r{i}", shard_size=70) for i in range(2)]
    coll = client[mongo.campaigns_db].campaigns
    async with running(*configs):
        await coll.insert_one(doc)
        await eventually(lambda: _sent_all(client, mongo, _id, 300), 60)
    final = await coll.find_one({"_id": _id})
    assert final is not None
    result = final["abTest"]["result"]
    assert result["winner"] == "B"
    assert result["chosen"] == "B"
    assert result["fallbackUsed"] is False
    assert isinstance(result["decidedAt"], dt.datetime)
    assert final["abTest"]["decision"]["attempts"] == 1
    rows = {r["key"]: r for r in result["variants"]}
    test_sizes = collections.Counter(v for v in assigned.values() if v)
    assert {k: rows[k]["sent"] for k in "ABC"} == dict(test_sizes)
    assert rows["A"]["humanClicks"] == rows["C"]["humanClicks"] == 0
    assert rows["A"]["humanOpens"] == 0  # machine opens are not opens
    low, high = rows["B"]["ci95"]
    assert low < rows["B"]["rate"] < high
    # Every customer exactly one message, of their own variant or (the rest) the winner's.
    by_address = collections.defaultdict(list)
    for message in sink.messages:
        by_address[message.to].append(message.subject)
    assert len(by_address) == 300
    for customer, variant in assigned.items():
        subjects = by_address[f"c{customer}@example.com"]
        expected = SUBJECTS[variant or "B"].replace("{{name}}", f"Cust {customer}")
        assert subjects == [expected]
    variants_on_rows = {r["customer"]: r.get("variant") for r in await ledger(client, mongo, _id)}
    assert variants_on_rows == {c: v or "B" for c, v in assigned.items()}
    # The test's shards, then as many for the rest, all done.
    shards = await client[mongo.campaigns_db].campaign_shards.find({"campaign": str(_id)}).to_list()
    plan = await client[mongo.campaigns_db].campaign_shard_plans.find_one({"_id": str(_id)})
    assert plan is not None
    assert len(plan["ranges"]) > 1  # sharded
    assert len(shards) == 2 * len(plan["ranges"])
    assert sorted(s["index"] for s in shards if s["rest"]) == list(
        range(len(plan["ranges"]), len(shards))
    )
    assert {s["state"] for s in shards} == {"done"}
    await _check_report(client, mongo, _id, assigned)


async def _check_report(
    client: Client, mongo: MongoTarget, _id: ObjectId, assigned: dict[str, str | None]
) -> None:
    data = await gather(
        client[mongo.campaigns_db], _id, collection="campaigns", split_key=DEFAULT_SPLIT_KEY
    )
    assert data is not None
    assert data["outcomes"] == {"email": {"sent": 300}}
    rows = {(r["variant"], r["group"]): r for r in data["variants"]}
    test_sizes = collections.Counter(v for v in assigned.values() if v)
    rest = sum(1 for v in assigned.values() if v is None)
    assert {k: r["sent"] for k, r in rows.items()} == {
        ("A", "test"): test_sizes["A"],
        ("B", "test"): test_sizes["B"],
        ("C", "test"): test_sizes["C"],
        ("B", "rest"): rest,
    }
    assert rows[("A", "test")]["humanOpens"] == 0
    assert rows[("B", "test")]["humanClicks"] > 0
    assert data["machineOpens"] == test_sizes["A"] + test_sizes["C"]
    text = render(data)
    assert "winner: B" in text
    assert "machine opens" in text
    low, high = rows[("B", "test")]["clickCi95"]
    assert f"{100 * low:.2f}-{100 * high:.2f}" in text


async def test_an_operator_winner_releases_a_manual_fallback(
    mongo: MongoTarget,
    client: Client,
    sink: SmtpSink,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    targets = await seed_customers(client, mongo, 80)
    _id, doc = split_doc(targets, share=0.5, minutes=0.02, fallback="manual")
    assigned = groups(_id, doc, targets)
    coll = client[mongo.campaigns_db].campaigns
    async with running(settings(mongo, sink)) as (reactor,):
        await coll.insert_one(doc)

        async def decided() -> bool:
            found = await coll.find_one({"_id": _id})
            return bool(found and (found.get("abTest") or {}).get("result"))

        await eventually(decided, 30)
        found = await coll.find_one({"_id": _id})
        assert found is not None
        result = found["abTest"]["result"]
        assert result["winner"] is None
        assert result["chosen"] is None
        assert "fallback manual" in result["reason"]
        test_group = sum(1 for v in assigned.values() if v)
        await eventually(lambda: _sent_all(client, mongo, _id, test_group), 30)
        waiting = {f"c{c}@example.com" for c, v in assigned.items() if v is None}
        assert not waiting & {m.to for m in sink.messages}  # the rest waits for the operator
        await coll.update_one({"_id": _id}, {"$set": {"abTest.winner": "C"}})
        await eventually(lambda: _sent_all(client, mongo, _id, 80), 30)
        # Metrics carry the variant key (the rest counts under the operator's winner).
        sends = reactor.metrics.split_sends
        by_variant = {k: sends.labels("email", k, "sent")._value.get() for k in "ABC"}
        test_sizes = collections.Counter(v for v in assigned.values() if v)
        rest_size = sum(1 for v in assigned.values() if v is None)
        assert by_variant == {
            "A": test_sizes["A"],
            "B": test_sizes["B"],
            "C": test_sizes["C"] + rest_size,
        }
        assert reactor.metrics.split_decisions.labels("fallback")._value.get() == 1
    rest = {f"c{c}@example.com" for c, v in assigned.items() if v is None}
    assert rest
    # The CLI, as an operator runs it.
    monkeypatch.setenv("MONGO_URI", mongo.uri)
    monkeypatch.setenv("CAMPAIGNS_DB", mongo.campaigns_db)
    monkeypatch.setenv("SEGMENTATION_DB", mongo.segmentation_db)
    code = await anyio.to_thread.run_sync(main, ["report", str(_id)])
    out = capsys.readouterr().out
    assert code == 0
    assert "operator's winner: C" in out
    assert "fallback manual" in out
    assert await anyio.to_thread.run_sync(main, ["report", str(ObjectId())]) == 1
    for message in sink.messages:
        if message.to in rest:
            assert message.subject.startswith("C for")


@pytest.mark.parametrize("shard_size", [1000, 20])
async def test_the_window_closing_before_the_decision_skips_the_rest(
    mongo: MongoTarget, client: Client, sink: SmtpSink, shard_size: int
) -> None:
    targets = await seed_customers(client, mongo, 60)
    _id, doc = split_doc(targets, share=0.5, minutes=60)
    doc["endDate"] = now() + dt.timedelta(seconds=6)
    assigned = groups(_id, doc, targets)
    coll = client[mongo.campaigns_db].campaigns
    async with running(settings(mongo, sink, shard_size=shard_size)):
        await coll.insert_one(doc)
        await eventually(has_status(client, mongo, _id, "completed"), 30)
    rows = {r["customer"]: r for r in await ledger(client, mongo, _id)}
    assert len(rows) == 60
    for customer, variant in assigned.items():
        if variant is None:
            assert rows[customer]["state"] == "skipped"
            assert rows[customer]["reason"] == "window_closed"
        else:
            assert rows[customer]["state"] == "sent"
            assert rows[customer]["variant"] == variant
    assert len(sink.messages) == sum(1 for v in assigned.values() if v)
    final = await coll.find_one({"_id": _id})
    assert final is not None
    assert "result" not in final["abTest"]
    assert final["execution"]["lastError"]["reason"] == "split_undecided"


async def test_an_invalid_split_is_not_armed_and_names_the_field(
    mongo: MongoTarget, client: Client, sink: SmtpSink
) -> None:
    targets = await seed_customers(client, mongo, 5)
    _id, doc = split_doc(targets, share=0.5, minutes=1, metric="opens")
    coll = client[mongo.campaigns_db].campaigns
    async with running(settings(mongo, sink)):
        await coll.insert_one(doc)

        async def reported() -> bool:
            found = await coll.find_one({"_id": _id})
            return bool(found and (found.get("execution") or {}).get("lastError"))

        await eventually(reported, 15)
    found = await coll.find_one({"_id": _id})
    assert found is not None
    assert found["status"] == "approved"
    assert found["execution"]["lastError"]["reason"] == "bad_abTest"
    assert found["execution"]["lastError"]["detail"].startswith("abTest.metric")
    assert sink.messages == []


async def test_a_variant_whose_template_cannot_compile_is_not_armed_and_names_it(
    mongo: MongoTarget, client: Client, sink: SmtpSink
) -> None:
    targets = await seed_customers(client, mongo, 5)
    _id, doc = split_doc(targets, share=0.5, minutes=1)
    doc["variants"][2]["email"]["subject"] = "{{ name | shout }}"  # no such filter
    coll = client[mongo.campaigns_db].campaigns
    async with running(settings(mongo, sink)):
        await coll.insert_one(doc)

        async def reported() -> bool:
            found = await coll.find_one({"_id": _id})
            return bool(found and (found.get("execution") or {}).get("lastError"))

        await eventually(reported, 15)
    found = await coll.find_one({"_id": _id})
    assert found is not None
    assert found["status"] == "approved"
    assert found["execution"]["lastError"]["reason"] == "bad_template"
    assert found["execution"]["lastError"]["detail"].startswith("variants[2] (C): subject")
    assert "shout" in found["execution"]["lastError"]["detail"]
    assert sink.messages == []


async def test_the_decision_is_claimed_once_and_taken_over_after_a_dead_deciders_lease(
    mongo: MongoTarget, client: Client
) -> None:
    coll = client[mongo.campaigns_db].campaigns
    _id, doc = split_doc(["1"], share=0.5, minutes=0.001)
    doc.update(status="running", startDate=now() - dt.timedelta(minutes=1))
    await coll.insert_one(doc)
    splits = MongoSplits(client[mongo.campaigns_db])
    first = await splits.claim_decision(_id, owner="a", lease_s=0.5)
    assert first is not None
    assert await splits.claim_decision(_id, owner="b", lease_s=0.5) is None
    # "a" dies; after its lease (by the database's clock) another replica claims it.
    second: list[str | None] = [None]

    async def claimed() -> bool:
        second[0] = await splits.claim_decision(_id, owner="b", lease_s=5)
        return second[0] is not None

    await eventually(claimed, 10)
    token = second[0]
    assert token is not None
    assert not await splits.write_result(_id, token=first, result={"winner": "A"})
    assert await splits.write_result(_id, token=token, result={"winner": "B"})
    assert not await splits.write_result(_id, token=token, result={"winner": "C"})
    assert await splits.claim_decision(_id, owner="c", lease_s=5) is None
    final = await coll.find_one({"_id": _id})
    assert final is not None
    assert final["abTest"]["result"]["winner"] == "B"
    assert final["abTest"]["decision"]["attempts"] == 2


async def test_a_paused_campaign_defers_its_decision(mongo: MongoTarget, client: Client) -> None:
    coll = client[mongo.campaigns_db].campaigns
    _id, doc = split_doc(["1"], share=0.5, minutes=0.001)
    doc.update(status="paused", startDate=now() - dt.timedelta(minutes=1))
    await coll.insert_one(doc)
    splits = MongoSplits(client[mongo.campaigns_db])
    assert await splits.claim_decision(_id, owner="a", lease_s=5) is None
    await coll.update_one({"_id": _id}, {"$set": {"status": "running"}})
    assert await splits.claim_decision(_id, owner="a", lease_s=5) is not None


async def test_counts_are_human_only_and_of_the_test_group(
    mongo: MongoTarget, client: Client
) -> None:
    db = client[mongo.campaigns_db]
    targets = [str(i) for i in range(200)]
    _id, doc = split_doc(targets, share=0.5, minutes=1)
    assigned = groups(_id, doc, targets)
    key = str(_id)
    rows = []
    for customer, variant in assigned.items():
        # The rest was sent the winner ("B"): those rows must not count for B.
        rows.append(
            {
                "_id": f"{key}:email:{customer}",
                "campaign": key,
                "channel": "email",
                "customer": customer,
                "state": "sent",
                "variant": variant or "B",
            }
        )
    rows.append(  # an SMS row of a test customer: one unit per customer, not per channel
        {
            "_id": f"{key}:sms:0",
            "campaign": key,
            "channel": "sms",
            "customer": "0",
            "state": "sent",
            "variant": assigned["0"] or "B",
        }
    )
    await db.deliveries.insert_many(rows)
    test_a = [c for c, v in assigned.items() if v == "A"]
    test_b = [c for c, v in assigned.items() if v == "B"]
    rest = [c for c, v in assigned.items() if v is None]
    events = [engagement(_id, test_a[0], "click", "human")]  # a click counts as an open too
    events += [engagement(_id, c, "open", "human") for c in test_a[1:4]]
    events += [engagement(_id, c, "open", "machine") for c in test_b]
    events += [engagement(_id, c, "click", "scanner") for c in test_b]
    events += [engagement(_id, c, "click", "human") for c in rest[:5]]
    events += [engagement(_id, test_a[0], "click", "human")]  # twice: one customer
    await db.engagement.insert_many(events)
    await db.suppressions.insert_many(
        [
            {
                "_id": f"customer:all:{c}",
                "kind": "customer",
                "value": c,
                "channel": "all",
                "reason": "unsubscribed",
                "source": f"link:{key}",
                "campaign": key,
            }
            for c in test_b[:2]
        ]
    )
    split = parse_campaign(doc).split
    assert split is not None

    def in_test(customer: str, variant: str) -> bool:
        return assign(DEFAULT_SPLIT_KEY, key, customer, split) == variant

    counts = {c.key: c for c in await MongoSplits(db).counts(key, _id, split.keys, in_test)}
    assert counts["A"].sent == len(test_a)
    assert counts["B"].sent == len(test_b)
    assert counts["A"].clicks == 1
    assert counts["A"].opens == 4
    assert counts["B"].opens == counts["B"].clicks == 0
    assert counts["B"].unsubscribes == 2


async def test_a_pause_before_the_decision_defers_it_until_the_campaign_runs_again(
    mongo: MongoTarget, client: Client, sink: SmtpSink
) -> None:
    targets = await seed_customers(client, mongo, 60)
    _id, doc = split_doc(targets, share=0.5, minutes=0.05)  # due 3 s after the start
    assigned = groups(_id, doc, targets)
    coll = client[mongo.campaigns_db].campaigns
    async with running(settings(mongo, sink)):
        await coll.insert_one(doc)
        await eventually(has_status(client, mongo, _id, "running"), 30)
        await coll.update_one({"_id": _id}, {"$set": {"status": "paused"}})
        due = doc["startDate"] + dt.timedelta(minutes=0.05)
        await anyio.sleep(max(0.0, (due - now()).total_seconds()) + 1.5)
        paused = await coll.find_one({"_id": _id})
        assert paused is not None
        assert "result" not in paused["abTest"]
        assert "decision" not in paused["abTest"]
        rest = {f"c{c}@example.com" for c, v in assigned.items() if v is None}
        assert not rest & {m.to for m in sink.messages}  # the rest still waits
        await coll.update_one({"_id": _id}, {"$set": {"status": "running"}})
        await eventually(lambda: _sent_all(client, mongo, _id, 60), 30)
    final = await coll.find_one({"_id": _id})
    assert final is not None
    assert final["abTest"]["result"]["chosen"] == "A"  # no clicks at all: the control
    assert len(sink.messages) == 60
