"""What providers' webhooks record: each event once (`webhook_events`, by provider and event id),
which campaign a bounce or receipt belongs to (the ledger row, by the Message-ID or SID it
recorded, else the last send to the address), soft-bounce counts per address
(`bounce_counts`), the per-campaign feedback counters, a complaint-rate pause, SMS delivery
statuses on their ledger rows, and when each webhook last received an event (`reactor_state`).
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from pymongo import ASCENDING, DESCENDING, ReturnDocument, UpdateOne
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import BulkWriteError, DuplicateKeyError

from ...domain.feedback import SMS_STATUS_RANK
from .actions import campaign_id_variants
from .feed import STATE_COLLECTION
from .pipeline import NOW, document_or_empty, literal

DEDUPE_S = 180 * 86400  # the default LINK_TTL_SECONDS
DEDUPE_INDEX = "receivedAt_ttl"


def _later(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    at, bt = a.get("updatedAt"), b.get("updatedAt")
    return isinstance(at, dt.datetime) and (not isinstance(bt, dt.datetime) or at > bt)


class MongoFeedback:
    def __init__(
        self,
        db: AsyncDatabase[dict[str, Any]],
        campaigns_collection: str,
        *,
        dedupe_s: float = DEDUPE_S,
    ) -> None:
        self.dedupe_s = int(dedupe_s)
        self.events: AsyncCollection[dict[str, Any]] = db["webhook_events"]
        self.deliveries: AsyncCollection[dict[str, Any]] = db["deliveries"]
        self.bounces: AsyncCollection[dict[str, Any]] = db["bounce_counts"]
        self.campaigns: AsyncCollection[dict[str, Any]] = db[campaigns_collection]
        self.state: AsyncCollection[dict[str, Any]] = db[STATE_COLLECTION]

    async def ensure_indexes(self) -> None:
        await self._dedupe_index()
        await self.deliveries.create_index(
            [("providerId", ASCENDING)], name="providerId", sparse=True
        )
        await self.deliveries.create_index(
            [("to", ASCENDING), ("updatedAt", DESCENDING)], name="to_updatedAt"
        )

    async def _dedupe_index(self) -> None:
        """Event ids are kept as long as links live (LINK_TTL_SECONDS): a captured call replayed
        any time a link could still be used changes nothing. An index made with another expiry
        (an earlier version kept a week) is changed in place."""
        existing = {i["name"]: i async for i in await self.events.list_indexes()}
        held = existing.get(DEDUPE_INDEX, {}).get("expireAfterSeconds")
        if held is None:
            await self.events.create_index(
                "receivedAt", name=DEDUPE_INDEX, expireAfterSeconds=self.dedupe_s
            )
        elif int(held) != self.dedupe_s:
            await self.events.database.command(
                "collMod",
                self.events.name,
                index={"name": DEDUPE_INDEX, "expireAfterSeconds": self.dedupe_s},
            )

    async def first_time(self, provider: str, event_id: str, now: dt.datetime) -> bool:
        """Record a recipient's reply (STOP, START) for good; False when it was recorded
        before (a replay). Replies are few, and Twilio's signature carries no time: a captured
        START replayed at any later date must change nothing, so these are stored without
        `receivedAt`, the field the expiry index reads (a document without it never expires)."""
        try:
            await self.events.insert_one({"_id": f"{provider}:{event_id}", "firstSeenAt": now})
        except DuplicateKeyError:
            return False
        return True

    async def first_times(self, keys: Sequence[str], now: dt.datetime) -> list[bool]:
        """`first_time` for many events in one write: False for each one seen before."""
        if not keys:
            return []
        try:
            await self.events.insert_many(
                [{"_id": k, "receivedAt": now} for k in keys], ordered=False
            )
        except BulkWriteError as exc:
            seen = {
                e["index"] for e in exc.details.get("writeErrors", []) if e.get("code") == 11000
            }
            others = [e for e in exc.details.get("writeErrors", []) if e.get("code") != 11000]
            if others:
                raise
            return [i not in seen for i in range(len(keys))]
        return [True] * len(keys)

    async def attribute_many(
        self, channel: str, wanted: Sequence[tuple[str | None, str | None]]
    ) -> list[tuple[str, str] | None]:
        """`attribute` for many (provider id, address) pairs in at most two reads."""
        by_id: dict[str, tuple[str, str]] = {}
        ids = [p for p, _ in wanted if p]
        if ids:
            async for row in self.deliveries.find(
                {"providerId": {"$in": ids}, "channel": channel},
                {"campaign": 1, "customer": 1, "providerId": 1},
            ):
                by_id[str(row["providerId"])] = (str(row["campaign"]), str(row["customer"]))
        addresses = [a for p, a in wanted if a and not (p and p in by_id)]
        by_address: dict[str, tuple[str, str]] = {}
        if addresses:
            # The latest sent row per address (the `to_updatedAt` index serves the $in).
            latest: dict[str, Any] = {}
            async for row in self.deliveries.find(
                {"to": {"$in": addresses}, "channel": channel, "state": "sent"},
                {"to": 1, "campaign": 1, "customer": 1, "updatedAt": 1},
            ):
                to = str(row["to"])
                if to not in latest or _later(row, latest[to]):
                    latest[to] = row
            by_address = {to: (str(r["campaign"]), str(r["customer"])) for to, r in latest.items()}
        return [
            (by_id.get(p) if p else None) or (by_address.get(a) if a else None) for p, a in wanted
        ]

    async def soft_bounces(self, addresses: Sequence[str], now: dt.datetime) -> dict[str, int]:
        """Count one soft bounce per listed address (repeats count each); the counts after, in
        one round trip's wait (one findAndModify per address, concurrently)."""
        if not addresses:
            return {}
        repeats = Counter(addresses)
        docs = await asyncio.gather(
            *(
                self.bounces.find_one_and_update(
                    {"_id": address},
                    {"$inc": {"soft": n}, "$set": {"lastAt": now}},
                    projection={"soft": 1},
                    upsert=True,
                    return_document=ReturnDocument.AFTER,
                )
                for address, n in repeats.items()
            )
        )
        return {
            address: int((doc or {}).get("soft", 0))
            for address, doc in zip(repeats, docs, strict=True)
        }

    async def sms_statuses(
        self, updates: Sequence[tuple[str, str, str | None, str | None]], now: dt.datetime
    ) -> list[tuple[str, str] | None]:
        """`sms_status` for many receipts in one conditional bulk write by `_id` (the row each
        StatusCallback names; a receipt without one is looked up by SID first), and, only when
        another writer raced this batch, one exact write per receipt."""
        if not updates:
            return []
        rows: dict[str, tuple[Any, str, str]] = {}  # sid -> (_id, campaign, customer)
        for sid, _, _, delivery in updates:
            if delivery and delivery.count(":") >= 2:
                campaign, _, rest = delivery.partition(":")
                rows[sid] = (delivery, campaign, rest.partition(":")[2])
        unnamed = [sid for sid, _, _, _ in updates if sid not in rows]
        if unnamed:
            async for r in self.deliveries.find(
                {"providerId": {"$in": unnamed}, "channel": "sms"},
                {"campaign": 1, "customer": 1, "providerId": 1},
            ):
                rows[str(r["providerId"])] = (r["_id"], str(r["campaign"]), str(r["customer"]))
        # What the rows hold now (by `_id`: cheap everywhere), so that only receipts above it
        # are written; the write's own condition still decides.
        held = {
            r["_id"]: int(r.get("deliveryStatusRank", -1))
            async for r in self.deliveries.find(
                {"_id": {"$in": list({v[0] for v in rows.values()})}},
                {"deliveryStatusRank": 1, "providerId": 1},
            )
            if r.get("providerId") in rows
        }
        # Per SID, the highest status of the batch that is above what its row holds.
        best: dict[str, int] = {}
        for i, (sid, status, _, _) in enumerate(updates):
            if sid not in rows or rows[sid][0] not in held:
                continue
            rank = SMS_STATUS_RANK.get(status, 0)
            if rank <= held[rows[sid][0]]:
                continue
            if sid not in best or rank > SMS_STATUS_RANK.get(updates[best[sid]][1], 0):
                best[sid] = i
        if not best:
            return [None] * len(updates)
        ops = [
            UpdateOne(*self._status_write(rows[updates[i][0]][0], *updates[i][:3], now))
            for i in best.values()
        ]
        result = await self.deliveries.bulk_write(ops, ordered=False)
        applied = set(best.values())
        if result.modified_count < len(ops):
            # Some did not apply: a later status was there already, or another writer raced.
            applied = {
                i
                for i in best.values()
                if await self._status_exact(rows[updates[i][0]][0], *updates[i][:3], now)
            }
        out: list[tuple[str, str] | None] = [None] * len(updates)
        for i in applied:
            _, campaign, customer = rows[updates[i][0]]
            out[i] = (campaign, customer)
        return out

    async def _status_exact(
        self, row_id: Any, sid: str, status: str, error_code: str | None, now: dt.datetime
    ) -> bool:
        query, update = self._status_write(row_id, sid, status, error_code, now)
        doc = await self.deliveries.find_one_and_update(query, update, projection={"_id": 1})
        return doc is not None

    @staticmethod
    def _status_write(
        row_id: Any, sid: str, status: str, error_code: str | None, now: dt.datetime
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        rank = SMS_STATUS_RANK.get(status, 0)
        fields: dict[str, Any] = {
            "deliveryStatus": status,
            "deliveryStatusRank": rank,
            "deliveryStatusAt": now,
        }
        if error_code:
            fields["deliveryError"] = error_code
        query = {
            "_id": row_id,
            "providerId": sid,
            "$or": [
                {"deliveryStatusRank": {"$exists": False}},
                {"deliveryStatusRank": {"$lt": rank}},
            ],
        }
        return query, {"$set": fields}

    async def attribute(
        self, channel: str, *, provider_id: str | None, address: str | None
    ) -> tuple[str, str] | None:
        """(campaign, customer) of the delivery this event is about."""
        row = None
        if provider_id:
            row = await self.deliveries.find_one(
                {"providerId": provider_id, "channel": channel}, {"campaign": 1, "customer": 1}
            )
        if row is None and address:
            row = await self.deliveries.find_one(
                {"to": address, "channel": channel, "state": "sent"},
                {"campaign": 1, "customer": 1},
                sort=[("updatedAt", DESCENDING)],
            )
        if row is None:
            return None
        return str(row["campaign"]), str(row["customer"])

    async def count(self, campaign_key: str, counts: Mapping[str, int]) -> dict[str, Any] | None:
        """Add to `performance.<name>` whatever shape `performance` has; the campaign's
        performance and status after, or None when there is no such campaign."""
        added = {
            name: {"$add": [{"$ifNull": [f"$performance.{name}", 0]}, delta]}
            for name, delta in counts.items()
        }
        doc = await self.campaigns.find_one_and_update(
            {"_id": {"$in": campaign_id_variants(campaign_key)}},
            [
                {
                    "$set": {
                        "performance": {"$mergeObjects": [document_or_empty("performance"), added]}
                    }
                }
            ],
            projection={"performance": 1, "status": 1},
            return_document=ReturnDocument.AFTER,
        )
        return doc

    async def pause(
        self, campaign_key: str, reason: str, detail: str, *, rate: float | None = None
    ) -> bool:
        """A running campaign becomes `paused` with why (and the rate that paused it, for the
        `campaign.paused` notification); False when it was not running."""
        result = await self.campaigns.update_one(
            {"_id": {"$in": campaign_id_variants(campaign_key)}, "status": "running"},
            [
                {
                    "$set": {
                        "status": "paused",
                        "execution": {
                            "$mergeObjects": [
                                document_or_empty("execution"),
                                {
                                    "pausedReason": literal(reason),
                                    # The shape every other writer and reader of lastError uses.
                                    "lastError": {
                                        "reason": literal(reason),
                                        "detail": literal(detail),
                                        "at": NOW,
                                    },
                                    "pausedAt": NOW,
                                    "pausedRate": literal(rate),
                                },
                            ]
                        },
                    }
                }
            ],
        )
        return result.modified_count > 0

    async def received(self, provider: str, now: dt.datetime, n: int = 1) -> None:
        await self.state.update_one(
            {"_id": f"webhook:{provider}"},
            {"$set": {"lastEventAt": now}, "$inc": {"events": n}},
            upsert=True,
        )

    async def last_received(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        async for doc in self.state.find({"_id": {"$regex": "^webhook:"}}):
            out[str(doc["_id"]).split(":", 1)[1]] = doc
        return out
