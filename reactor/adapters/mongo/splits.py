"""A/B splits in MongoDB: the decision's claim and its result on the campaign document, and the
human-only counts per variant it is made from.

The claim is a compare-and-set judged by the database's clock: the campaign is `running`, has
no `abTest.result`, `startDate + decideAfterMinutes <= $$NOW`, and no live claim
(`abTest.decision.leaseUntil` passed). The result is written only by the claim's token and only
while no result exists, so a decider that dies mid-decision is replaced after its lease and the
result is still written exactly once.

Counts: a variant's units are its test-group customers with a `sent` row (read from the ledger,
the variant on each row); successes are the distinct customers with a *human* event in
`engagement` (a human click also counts as an open: it proves the message was opened), and
unsubscribes are the link unsubscribes this campaign recorded in `suppressions`.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase

from ...domain.consent import Kind, Reason
from ...domain.deliveries import DeliveryState
from ...domain.models import Status
from ...domain.splits import VariantCounts
from .engagement import of_campaign
from .pipeline import NOW, literal, now_plus

ENGAGEMENT = "engagement"
HUMAN = "human"
BATCH = 1000


class MongoSplits:
    def __init__(self, db: AsyncDatabase[dict[str, Any]], collection: str = "campaigns") -> None:
        self.campaigns: AsyncCollection[dict[str, Any]] = db[collection]
        self.deliveries: AsyncCollection[dict[str, Any]] = db["deliveries"]
        self.engagement: AsyncCollection[dict[str, Any]] = db[ENGAGEMENT]
        self.suppressions: AsyncCollection[dict[str, Any]] = db["suppressions"]

    async def claim_decision(self, campaign_id: Any, *, owner: str, lease_s: float) -> str | None:
        """The decision's claim token if this caller won it, else None."""
        token = f"{owner}:{uuid.uuid4().hex}"
        due = {"$add": ["$startDate", {"$multiply": ["$abTest.decideAfterMinutes", 60_000]}]}
        result = await self.campaigns.update_one(
            {
                "_id": campaign_id,
                "status": Status.RUNNING,
                "abTest.result": None,
                "$expr": {
                    "$and": [
                        {"$lte": [due, NOW]},
                        {"$lte": [{"$ifNull": ["$abTest.decision.leaseUntil", None]}, NOW]},
                    ]
                },
            },
            [
                {
                    "$set": {
                        "abTest.decision": {
                            "owner": literal(owner),
                            "token": literal(token),
                            "leaseUntil": now_plus(lease_s),
                            "claimedAt": NOW,
                            "attempts": {
                                "$add": [{"$ifNull": ["$abTest.decision.attempts", 0]}, 1]
                            },
                        }
                    }
                }
            ],
        )
        return token if result.modified_count else None

    async def write_result(self, campaign_id: Any, *, token: str, result: dict[str, Any]) -> bool:
        """`abTest.result` (with `decidedAt` the database's now), once, by the claim's holder."""
        written = await self.campaigns.update_one(
            {"_id": campaign_id, "abTest.decision.token": token, "abTest.result": None},
            [{"$set": {"abTest.result": {"$mergeObjects": [literal(result), {"decidedAt": NOW}]}}}],
        )
        return written.modified_count > 0

    async def get(self, campaign_id: Any) -> dict[str, Any] | None:
        return await self.campaigns.find_one({"_id": campaign_id}, {"targetedCustomerIds": 0})

    async def sent_by_variant(
        self, campaign: str, in_test: Callable[[str, str], bool]
    ) -> dict[str, set[str]]:
        """{variant: customers sent to} of the test group (`in_test(customer, variant)` says
        whether the row's variant is the customer's own test assignment, not the winner's)."""
        out: dict[str, set[str]] = {}
        cursor = self.deliveries.find(
            {"campaign": campaign, "state": DeliveryState.SENT, "variant": {"$ne": None}},
            {"customer": 1, "variant": 1},
            batch_size=BATCH,
        )
        async for row in cursor:
            customer, variant = str(row["customer"]), str(row["variant"])
            if in_test(customer, variant):
                out.setdefault(variant, set()).add(customer)
        return out

    async def human_engaged(self, campaign_id: Any) -> dict[str, set[str]]:
        """{"open": customers, "click": customers} with a human event (a click is an open)."""
        cursor = await self.engagement.aggregate(
            [
                {"$match": {"campaign": of_campaign(campaign_id), "class": HUMAN}},
                {"$group": {"_id": {"customer": "$customer", "kind": "$kind"}}},
            ],
            batchSize=BATCH,
        )
        opens: set[str] = set()
        clicks: set[str] = set()
        async for row in cursor:
            customer, kind = str(row["_id"].get("customer")), row["_id"].get("kind")
            if kind == "click":
                clicks.add(customer)
                opens.add(customer)
            elif kind == "open":
                opens.add(customer)
        return {"open": opens, "click": clicks}

    async def unsubscribed(self, campaign: str) -> set[str]:
        cursor = self.suppressions.find(
            {"campaign": campaign, "reason": Reason.UNSUBSCRIBED, "kind": Kind.CUSTOMER},
            {"value": 1},
            batch_size=BATCH,
        )
        return {str(doc["value"]) async for doc in cursor}

    async def counts(
        self, campaign: str, campaign_id: Any, keys: tuple[str, ...], in_test: Any
    ) -> list[VariantCounts]:
        """Human-only counts per variant, in the campaign's variant order."""
        sent = await self.sent_by_variant(campaign, in_test)
        engaged = await self.human_engaged(campaign_id)
        unsubscribed = await self.unsubscribed(campaign)
        out = []
        for key in keys:
            customers = sent.get(key, set())
            out.append(
                VariantCounts(
                    key,
                    sent=len(customers),
                    opens=len(customers & engaged["open"]),
                    clicks=len(customers & engaged["click"]),
                    unsubscribes=len(customers & unsubscribed),
                )
            )
        return out
