"""`reactor report CAMPAIGN_ID`: what a campaign sent and what came of it, per variant.

For any campaign (a split or not): deliveries by channel and outcome from the ledger, then per
variant (one row, "all", without a split) the customers sent to, human opens and clicks (distinct
customers; machine opens and scanner clicks are shown apart and never counted as engagement),
each rate with its 95 % Wilson interval, and the A/B decision as written on the campaign. A
split's rows are cut into the test group (the customer's own assignment) and the rest (who
received the chosen variant after the decision).
"""

from __future__ import annotations

import argparse
import asyncio
import json
from collections import Counter, defaultdict
from typing import Any

from bson import ObjectId
from bson.errors import InvalidId

from ..adapters.mongo.engagement import of_campaign
from ..domain.errors import InvalidCampaign
from ..domain.models import parse_campaign
from ..domain.splits import Split, assign, wilson

ALL = "all"


def campaign_id(text: str) -> Any:
    try:
        return ObjectId(text)
    except (InvalidId, TypeError):
        return text


async def gather(db: Any, cid: Any, *, collection: str, split_key: bytes) -> dict[str, Any] | None:
    """The report's data for campaign `cid` (None when there is no such campaign)."""
    doc = await db[collection].find_one({"_id": cid}, {"targetedCustomerIds": 0})
    if doc is None:
        return None
    key = str(cid)
    try:
        split = parse_campaign(doc).split
    except InvalidCampaign:
        split = None
    outcomes: dict[str, Counter[str]] = defaultdict(Counter)
    sent: dict[tuple[str, str], set[str]] = defaultdict(set)  # (variant, group) -> customers
    cursor = db["deliveries"].find(
        {"campaign": key}, {"customer": 1, "channel": 1, "state": 1, "variant": 1}
    )
    async for row in cursor:
        outcomes[str(row.get("channel"))][str(row.get("state"))] += 1
        if row.get("state") == "sent":
            customer = str(row.get("customer"))
            variant = str(row.get("variant") or ALL)
            sent[(variant, _group(split, split_key, key, customer, variant))].add(customer)
    engaged = await _engagement(db, cid)
    return {
        "campaign": key,
        "name": doc.get("name"),
        "status": doc.get("status"),
        "outcomes": {ch: dict(c) for ch, c in sorted(outcomes.items())},
        "variants": _rows(sent, engaged),
        "machineOpens": engaged["machine_opens"],
        "scannerClicks": engaged["scanner_clicks"],
        "decision": (doc.get("abTest") or {}).get("result"),
        "operatorWinner": (doc.get("abTest") or {}).get("winner"),
    }


def _group(split: Split | None, split_key: bytes, key: str, customer: str, variant: str) -> str:
    if split is None or variant == ALL:
        return ALL
    return "test" if assign(split_key, key, customer, split) == variant else "rest"


async def _engagement(db: Any, cid: Any) -> dict[str, Any]:
    cursor = await db["engagement"].aggregate(
        [
            {"$match": {"campaign": of_campaign(cid)}},
            {"$group": {"_id": {"c": "$customer", "k": "$kind", "cl": "$class"}, "n": {"$sum": 1}}},
        ]
    )
    opens: set[str] = set()
    clicks: set[str] = set()
    machine = scanner = 0
    async for row in cursor:
        customer, kind, klass = str(row["_id"].get("c")), row["_id"].get("k"), row["_id"].get("cl")
        if klass == "human":
            if kind == "click":
                clicks.add(customer)
            if kind in ("open", "click"):
                opens.add(customer)
        elif klass == "machine" and kind == "open":
            machine += int(row["n"])
        elif klass == "scanner" and kind == "click":
            scanner += int(row["n"])
    return {"opens": opens, "clicks": clicks, "machine_opens": machine, "scanner_clicks": scanner}


def _rows(sent: dict[tuple[str, str], set[str]], engaged: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for (variant, group), customers in sorted(sent.items()):
        n = len(customers)
        opens = len(customers & engaged["opens"])
        clicks = len(customers & engaged["clicks"])
        rows.append(
            {
                "variant": variant,
                "group": group,
                "sent": n,
                "humanOpens": opens,
                "openRate": opens / n if n else 0.0,
                "openCi95": list(wilson(opens, n)),
                "humanClicks": clicks,
                "clickRate": clicks / n if n else 0.0,
                "clickCi95": list(wilson(clicks, n)),
            }
        )
    return rows


def render(report: dict[str, Any]) -> str:
    lines = [f"Campaign {report['name']} ({report['campaign']}): {report['status']}", ""]
    lines.append("Deliveries")
    for channel, states in report["outcomes"].items():
        parts = ", ".join(f"{state} {n}" for state, n in sorted(states.items()))
        lines.append(f"  {channel}: {parts}")
    if not report["outcomes"]:
        lines.append("  (none)")
    lines += ["", "Engagement (human only)"]
    lines.append(
        f"  {'variant':<12} {'group':<5} {'sent':>7}  {'opens':>6} {'open rate (95% CI)':<24}"
        f" {'clicks':>6} {'click rate (95% CI)':<24}"
    )
    for row in report["variants"]:
        lines.append(
            f"  {row['variant']:<12} {row['group']:<5} {row['sent']:>7}  {row['humanOpens']:>6} "
            f"{_rate(row['openRate'], row['openCi95']):<24} {row['humanClicks']:>6} "
            f"{_rate(row['clickRate'], row['clickCi95']):<24}"
        )
    lines.append(
        f"  not counted: {report['machineOpens']} machine opens, "
        f"{report['scannerClicks']} scanner clicks"
    )
    decision = report["decision"]
    if decision is not None or report["operatorWinner"] is not None:
        lines += ["", "A/B decision"]
        if decision is not None:
            p = decision.get("pValue")
            lines.append(
                f"  winner: {decision.get('winner') or 'none'}; rest got: "
                f"{decision.get('chosen') or '(waiting)'}; "
                f"p = {'n/a' if p is None else f'{p:.4g}'}"
            )
            lines.append(f"  reason: {decision.get('reason')}")
            lines.append(f"  decided at: {decision.get('decidedAt')}")
        if report["operatorWinner"] is not None:
            lines.append(f"  operator's winner: {report['operatorWinner']} (overrides)")
    return "\n".join(lines)


def _rate(rate: float, ci: list[float]) -> str:
    return f"{100 * rate:.2f}% ({100 * ci[0]:.2f}-{100 * ci[1]:.2f})"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("campaign", help="the campaign's _id")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def run(args: argparse.Namespace, settings: Any) -> int:
    return asyncio.run(_run(args, settings))


async def _run(args: argparse.Namespace, settings: Any) -> int:
    from ..app import mongo_client

    client = mongo_client(settings.mongo_uri.get_secret_value(), "report-cli")
    try:
        report = await gather(
            client[settings.campaigns_db],
            campaign_id(args.campaign),
            collection=settings.campaigns_collection,
            split_key=settings.send_config().split_key,
        )
    finally:
        await client.close()
    if report is None:
        print(f"no campaign {args.campaign}")  # noqa: T201
        return 1
    print(json.dumps(report, default=str, indent=2) if args.json else render(report))  # noqa: T201
    return 0
