"""The deliveries ledger (`deliveries`) and the execution attempts (`campaign_executions`).

The ledger's invariants hold by the database's conditional writes, whatever a writer last read
(see `domain.deliveries.LedgerOp`):

- MARK and RECORD are upserts that only `$setOnInsert`: an existing row, in any state and of any
  epoch, refuses them. So only the epoch that inserted a `pending` row ever sends it, and a
  terminal row is never overwritten.
- OUTCOME updates the row only while it is this epoch's and `pending`; SETTLE turns an earlier
  epoch's `pending` row `uncertain`. Neither touches anything else.
- A sharded campaign's rows carry their shard, and every epoch comparison is within one shard:
  shards are claimed (and their epochs counted) separately, so a takeover of one shard never
  settles another's rows.

A write reports the ids it could not apply, so the caller sends only what it marked.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Sequence
from typing import Any

from pymongo import ASCENDING, UpdateOne
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase

from ...domain.deliveries import (
    SUPPRESSED,
    SUPPRESSED_PREFIX,
    DeliveryRecord,
    DeliveryState,
    LedgerOp,
    RowState,
    delivery_id,
)

_INSERTS = (LedgerOp.MARK, LedgerOp.RECORD)


class MongoLedger:
    def __init__(self, db: AsyncDatabase[dict[str, Any]]) -> None:
        self.deliveries: AsyncCollection[dict[str, Any]] = db["deliveries"]
        self.executions: AsyncCollection[dict[str, Any]] = db["campaign_executions"]

    async def ensure_indexes(self) -> None:
        await self.deliveries.create_index(
            [("campaign", ASCENDING), ("channel", ASCENDING), ("state", ASCENDING)],
            name="campaign_channel_state",
        )
        await self.executions.create_index(
            [("campaign", ASCENDING), ("epoch", ASCENDING)], name="campaign_epoch", unique=True
        )

    async def states(
        self, campaign: str, channel: str, customers: Sequence[str]
    ) -> dict[str, RowState]:
        """{customer: (state, epoch, shard)} for the rows that exist."""
        ids = [delivery_id(campaign, channel, c) for c in customers]
        found: dict[str, RowState] = {}
        cursor = self.deliveries.find(
            {"_id": {"$in": ids}}, {"customer": 1, "state": 1, "epoch": 1, "shard": 1}
        )
        async for doc in cursor:
            shard = doc.get("shard")
            found[doc["customer"]] = RowState(
                doc["state"], int(doc.get("epoch", 0)), None if shard is None else int(shard)
            )
        return found

    async def write(
        self,
        campaign: str,
        *,
        epoch: int,
        records: Iterable[DeliveryRecord],
        now: dt.datetime,
        shard: int | None = None,
    ) -> set[str]:
        """Apply `records` in order, in one ordered bulk write (so outcomes placed before new
        marks free their slots first). Returns the delivery ids that were refused."""
        ops: list[UpdateOne] = []
        kinds: list[tuple[str, LedgerOp, str]] = []
        for rec in records:
            _id = delivery_id(campaign, rec.channel, rec.customer)
            op = rec.operation
            kinds.append((_id, op, rec.state))
            ops.append(_operation(_id, campaign, epoch, rec, op, now, shard))
        if not ops:
            return set()
        result = await self.deliveries.bulk_write(ops, ordered=True)
        inserted = set((result.upserted_ids or {}).values())
        refused = {i for i, op, _ in kinds if op in _INSERTS and i not in inserted}
        updates = [(i, op, state) for i, op, state in kinds if op not in _INSERTS]
        inserts_matched = sum(1 for _, op, _ in kinds if op in _INSERTS) - len(inserted)
        if result.matched_count - inserts_matched < len(updates):
            refused |= await self._unapplied(updates, epoch)
        return refused

    async def _unapplied(self, updates: list[tuple[str, LedgerOp, str]], epoch: int) -> set[str]:
        """Which conditional updates did not apply (rare: only after a takeover)."""
        rows = {
            d["_id"]: d
            async for d in self.deliveries.find(
                {"_id": {"$in": [i for i, _, _ in updates]}},
                {"state": 1, "epoch": 1, "settledBy": 1},
            )
        }
        missing = set()
        for _id, op, state in updates:
            row = rows.get(_id, {})
            if op in (LedgerOp.OUTCOME, LedgerOp.RESOLVE):
                ok = row.get("state") == state and row.get("epoch") == epoch
            else:
                ok = row.get("settledBy") == epoch
            if not ok:
                missing.add(_id)
        return missing

    async def forget_pending(self, ids: Sequence[str], *, epoch: int) -> None:
        """Remove this epoch's `pending` rows of sends it gave up before sending (a retry cut
        short by a stop): whoever resumes may send them."""
        await self.deliveries.delete_many(
            {"_id": {"$in": list(ids)}, "epoch": epoch, "state": DeliveryState.PENDING}
        )

    async def counts(self, campaign: str) -> dict[str, dict[str, int]]:
        """{channel: {state: n}} straight from the ledger: the authoritative counts."""
        cursor = await self.deliveries.aggregate(
            [
                {"$match": {"campaign": campaign}},
                {"$group": {"_id": {"channel": "$channel", "state": "$state"}, "n": {"$sum": 1}}},
            ]
        )
        out: dict[str, dict[str, int]] = {}
        async for row in cursor:
            out.setdefault(row["_id"]["channel"], {})[row["_id"]["state"]] = int(row["n"])
        suppressed = await self.deliveries.aggregate(
            [
                {
                    "$match": {
                        "campaign": campaign,
                        "state": DeliveryState.SKIPPED,
                        "reason": {"$regex": f"^{SUPPRESSED_PREFIX}"},
                    }
                },
                {"$group": {"_id": "$channel", "n": {"$sum": 1}}},
            ]
        )
        async for row in suppressed:
            out.setdefault(row["_id"], {})[SUPPRESSED] = int(row["n"])
        return out

    async def pending_from_other_epochs(
        self, campaign: str, epoch: int, shard: int | None = None
    ) -> list[dict[str, Any]]:
        """Rows an earlier epoch of the same shard (or of the unsharded run) left pending; a
        shard's epochs say nothing about another shard's rows."""
        cursor = self.deliveries.find(
            {
                "campaign": campaign,
                "state": DeliveryState.PENDING,
                "epoch": {"$lt": epoch},
                "shard": shard,  # None also matches rows without the field
            },
            {"customer": 1, "channel": 1, "to": 1},
        )
        return await cursor.to_list()

    async def record_execution(
        self, campaign: str, *, epoch: int, owner: str, fields: dict[str, Any]
    ) -> None:
        # One path per operator: mongod refuses a path named by both $set and $setOnInsert
        # (code 40), so the owner goes in $set with the rest (it is the same on every write).
        await self.executions.update_one(
            {"campaign": campaign, "epoch": epoch},
            {"$set": {**fields, "owner": owner}},
            upsert=True,
        )


def _operation(
    _id: str,
    campaign: str,
    epoch: int,
    rec: DeliveryRecord,
    op: LedgerOp,
    now: dt.datetime,
    shard: int | None,
) -> UpdateOne:
    fields: dict[str, Any] = {"state": rec.state, "updatedAt": now, "attempts": rec.attempts}
    for name, value in (
        ("to", rec.to),
        ("providerId", rec.provider_id),
        ("error", rec.error),
        ("reason", rec.reason),
        ("segments", rec.segments),
        ("variant", rec.variant),
    ):
        if value is not None:
            fields[name] = value
    if op in _INSERTS:
        row = {
            "campaign": campaign,
            "channel": rec.channel,
            "customer": rec.customer,
            "epoch": epoch,
            "createdAt": now,
            **fields,
        }
        if shard is not None:
            row["shard"] = shard
        return UpdateOne({"_id": _id}, {"$setOnInsert": row}, upsert=True)
    if op is LedgerOp.OUTCOME:
        return UpdateOne(
            {"_id": _id, "epoch": epoch, "state": DeliveryState.PENDING, "shard": shard},
            {"$set": fields},
        )
    if op is LedgerOp.RESOLVE:
        fields["resolvedAt"] = now
        return UpdateOne(
            {
                "_id": _id,
                "epoch": epoch,
                "state": DeliveryState.UNCERTAIN,
                "settledBy": None,
                "shard": shard,
            },
            {"$set": fields},
        )
    # SETTLE: an earlier epoch's pending row; the row keeps the epoch that marked it.
    fields["settledBy"] = epoch
    return UpdateOne(
        {"_id": _id, "epoch": {"$lt": epoch}, "state": DeliveryState.PENDING, "shard": shard},
        {"$set": fields},
    )
