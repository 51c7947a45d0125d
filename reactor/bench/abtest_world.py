"""A split campaign end to end on the embedded stand-ins: three real `reactor run` processes, one
SIGKILLed in the middle of the A/B decision.

The campaign (A control, B with its own subject; 20 % test share, human clicks, sharded) goes
to `customers` recipients. Human clicks are recorded for part of B's test group (machine opens
for A's, which must not count). Just before the decision is due, every `aggregate` blocks for
a while (a fail point), so whichever replica claims the decision is caught in the middle of its
counts; that replica is SIGKILLed, the fail point lifted, and the others must take the decision
over after its claim's lease. Counted at the SMTP sink: every customer exactly one message, of
exactly one variant (their own in the test group, the winner's otherwise), and one decision.
"""

from __future__ import annotations

import asyncio
import collections
import datetime as dt
from typing import Any

from bson import ObjectId

from ..config import DEFAULT_SPLIT_KEY
from ..domain.models import parse_campaign
from ..domain.splits import assign
from .fault_world import World, until, world

SUBJECTS = {"A": "[split] Hello {{name}}", "B": "[split] A gift for {{name}}"}
START_IN_S = 4.0
DECIDE_AFTER_MIN = 0.25  # 15 s after the start: the test group is sent long before


def _campaign(customers: int) -> dict[str, Any]:
    now = dt.datetime.now(dt.UTC)
    return {
        "_id": ObjectId(),
        "name": "split",
        "status": "approved",
        "startDate": now + dt.timedelta(seconds=START_IN_S),
        "endDate": now + dt.timedelta(seconds=START_IN_S + 600),
        "channels": ["email"],
        "email": {"subject": SUBJECTS["A"], "text": "Sale today."},
        "targetedCustomerIds": [str(c) for c in range(customers)],
        "variants": [{"key": "A"}, {"key": "B", "email": {"subject": SUBJECTS["B"]}}],
        "abTest": {
            "testShare": 0.2,
            "metric": "human_clicks",
            "decideAfterMinutes": DECIDE_AFTER_MIN,
            "minPerVariant": 50.0,
            "confidence": 0.95,
            "fallback": "control",
        },
    }


def _events(doc: dict[str, Any], assigned: dict[str, str | None]) -> list[dict[str, Any]]:
    events = []
    for i, (customer, variant) in enumerate(assigned.items()):
        kind, klass = None, None
        if variant == "B" and i % 3 == 0:
            kind, klass = "click", "human"
        elif variant == "A":
            kind, klass = "open", "machine"  # a privacy proxy: not an open
        if kind is not None:
            events.append(
                {
                    "campaign": doc["_id"],
                    "channel": "email",
                    "customer": customer,
                    "kind": kind,
                    "link": None,
                    "at": dt.datetime.now(dt.UTC),
                    "class": klass,
                    "reasons": [],
                    "agent": "",
                    "ip": "198.51.100.7",
                }
            )
    return events


async def _kill_the_decider(w: World, campaign_id: Any) -> str:
    """Block every aggregate so the decider is caught mid-count; kill it; lift the block."""
    await w.client.admin.command(
        {
            "configureFailPoint": "failCommand",
            "mode": "alwaysOn",
            "data": {"failCommands": ["aggregate"], "blockConnection": True, "blockTimeMS": 8000},
        }
    )
    claimed: dict[str, Any] = {}

    async def decision_claimed() -> bool:
        doc = await w.client.marketing.campaigns.find_one({"_id": campaign_id})
        claimed.update(((doc or {}).get("abTest") or {}).get("decision") or {})
        return bool(claimed.get("owner"))

    await until(decision_claimed, 60)
    victim = next(r for r in w.reactors if r.name == claimed["owner"])
    victim.kill()
    await w.heal()
    return victim.name


async def scenario(customers: int) -> dict[str, Any]:
    async with world(customers) as w:
        for i in range(3):
            await w.spawn(f"r{i}")
        doc = _campaign(customers)
        split = parse_campaign(doc).split
        assert split is not None
        key = str(doc["_id"])
        assigned = {c: assign(DEFAULT_SPLIT_KEY, key, c, split) for c in doc["targetedCustomerIds"]}
        await w.client.marketing.engagement.insert_many(_events(doc, assigned))
        await w.client.marketing.campaigns.insert_one(doc)
        w.campaign_ids.append(doc["_id"])
        test_size = sum(1 for v in assigned.values() if v)

        async def test_group_sent() -> bool:
            return len(w.sink.messages) >= test_size

        await until(test_group_sent, 60)
        sent_before_decision = len(w.sink.messages)
        victim = await _kill_the_decider(w, doc["_id"])

        async def all_sent() -> bool:
            return len(w.sink.messages) >= customers and await w.all_sent()

        await until(all_sent, 180)
        await asyncio.sleep(1.0)  # anything sent twice would arrive now
        final = await w.client.marketing.campaigns.find_one({"_id": doc["_id"]})
        assert final is not None
        return _account(w, final, assigned, victim, sent_before_decision)


def _account(
    w: World,
    final: dict[str, Any],
    assigned: dict[str, str | None],
    victim: str,
    sent_before_decision: int,
) -> dict[str, Any]:
    ab = final.get("abTest") or {}
    result = ab.get("result") or {}
    chosen = result.get("chosen")
    by_address: dict[str, list[str]] = collections.defaultdict(list)
    for message in w.sink.messages:
        by_address[message.to].append(message.subject)
    not_once = wrong_variant = rest_with_winner = 0
    for customer, variant in assigned.items():
        subjects = by_address.get(f"c{customer}@shop.example", [])
        if len(subjects) != 1:
            not_once += 1
            continue
        expected = SUBJECTS.get(variant or chosen or "", "")
        name = f"Customer {customer}"
        if subjects[0] != expected.replace("{{name}}", name):
            wrong_variant += 1
        elif variant is None:
            rest_with_winner += 1
    return {
        "customers": len(assigned),
        "test_group": sum(1 for v in assigned.values() if v),
        "sent_before_decision": sent_before_decision,
        "killed": victim,
        "decided_by": result.get("decidedBy"),
        "decision_attempts": (ab.get("decision") or {}).get("attempts"),
        "results_written": 1 if result else 0,
        "winner": result.get("winner"),
        "chosen": chosen,
        "messages": len(w.sink.messages),
        "customers_not_exactly_once": not_once,
        "wrong_variant": wrong_variant,
        "rest_with_winner_subject": rest_with_winner,
    }
