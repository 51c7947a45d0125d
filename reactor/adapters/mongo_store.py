"""MongoDB persistence: campaigns (claims, leases, counters), the deliveries ledger, execution
attempts and the reactor's own state (resume tokens).

Every state change the reactor makes is a conditional update — a compare-and-set on `status` and
`execution.epoch` — so that any number of replicas can race and exactly one wins.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from bson import Timestamp
from pymongo import ASCENDING, ReturnDocument, UpdateOne
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import BulkWriteError

from ..domain.deliveries import DeliveryRecord, delivery_id
from ..domain.models import Status

log = logging.getLogger(__name__)

# Fields the scheduler never needs; a targeted list can hold millions of ids.
SCHEDULE_PROJECTION = {"targetedCustomerIds": 0}


class MongoCampaignStore:
    """Campaign documents plus the `deliveries`, `campaign_executions` and `reactor_state`
    collections that live beside them."""

    def __init__(self, db: AsyncDatabase[dict[str, Any]], collection: str = "campaigns") -> None:
        self.db = db
        self.campaigns: AsyncCollection[dict[str, Any]] = db[collection]
        self.deliveries: AsyncCollection[dict[str, Any]] = db["deliveries"]
        self.executions: AsyncCollection[dict[str, Any]] = db["campaign_executions"]
        self.state: AsyncCollection[dict[str, Any]] = db["reactor_state"]

    async def ensure_indexes(self) -> None:
        await self.campaigns.create_index(
            [("status", ASCENDING), ("startDate", ASCENDING)], name="status_startDate"
        )
        await self.campaigns.create_index(
            [("status", ASCENDING), ("endDate", ASCENDING)], name="status_endDate"
        )
        await self.deliveries.create_index(
            [("campaign", ASCENDING), ("channel", ASCENDING), ("state", ASCENDING)],
            name="campaign_channel_state",
        )
        await self.executions.create_index(
            [("campaign", ASCENDING), ("epoch", ASCENDING)], name="campaign_epoch", unique=True
        )

    async def cluster_time(self) -> Timestamp:
        """The server's current operation time: the point a change stream opened after a sweep
        must start from so that nothing written during the sweep is lost."""
        client = self.db.client
        async with client.start_session() as session:
            await self.db.command("ping", session=session)
            if isinstance(session.operation_time, Timestamp):
                return session.operation_time
        hello = await client.admin.command("hello")
        ts = hello.get("lastWrite", {}).get("opTime", {}).get("ts")
        if isinstance(ts, Timestamp):
            return ts
        raise RuntimeError("the server reported no operation time; is it a replica set member?")

    # ---- reads ---------------------------------------------------------------------------

    async def list_active(self) -> list[dict[str, Any]]:
        """Every campaign the schedule may act on, without target lists."""
        cursor = self.campaigns.find(
            {"status": {"$in": [Status.APPROVED, Status.RUNNING, Status.PAUSED]}},
            SCHEDULE_PROJECTION,
        )
        return await cursor.to_list()

    async def get(self, campaign_id: Any, *, with_targets: bool = False) -> dict[str, Any] | None:
        projection = None if with_targets else SCHEDULE_PROJECTION
        return await self.campaigns.find_one({"_id": campaign_id}, projection)

    # ---- errors on documents -------------------------------------------------------------

    async def record_invalid(
        self, campaign_id: Any, reason: str, detail: str, now: dt.datetime
    ) -> bool:
        """Write `execution.lastError` unless the same error is already there; True if written."""
        result = await self.campaigns.update_one(
            {"_id": campaign_id, "execution.lastError.detail": {"$ne": detail}},
            {"$set": {"execution.lastError": {"reason": reason, "detail": detail, "at": now}}},
        )
        return result.modified_count > 0

    # ---- claims --------------------------------------------------------------------------

    async def claim_start(
        self,
        campaign_id: Any,
        *,
        owner: str,
        now: dt.datetime,
        lease_s: float,
        grace_s: float,
        lateness_ms: float = 0.0,
    ) -> dict[str, Any] | None:
        """approved → running if due, inside the grace and before the end. Returns the claimed
        document (with its new epoch) to the single winner, None to everyone else."""
        lease_until = now + dt.timedelta(seconds=lease_s)
        return await self.campaigns.find_one_and_update(
            {
                "_id": campaign_id,
                "status": Status.APPROVED,
                "startDate": {"$lte": now, "$gte": now - dt.timedelta(seconds=grace_s)},
                "endDate": {"$gt": now},
            },
            {
                "$set": {
                    "status": Status.RUNNING,
                    "execution.owner": owner,
                    "execution.leaseUntil": lease_until,
                    "execution.startedAt": now,
                    "execution.sendsDone": False,
                    "execution.reason": None,
                    "execution.startLatenessMs": lateness_ms,
                },
                "$inc": {"execution.epoch": 1},
            },
            projection=SCHEDULE_PROJECTION,
            return_document=ReturnDocument.AFTER,
        )

    async def mark_missed(
        self, campaign_id: Any, *, now: dt.datetime, grace_s: float, reason: str
    ) -> bool:
        """approved → missed when the start is past the grace or the window already closed."""
        result = await self.campaigns.update_one(
            {
                "_id": campaign_id,
                "status": Status.APPROVED,
                "$or": [
                    {"startDate": {"$lt": now - dt.timedelta(seconds=grace_s)}},
                    {"endDate": {"$lte": now}},
                ],
            },
            {
                "$set": {
                    "status": Status.MISSED,
                    "execution.reason": reason,
                    "execution.finishedAt": now,
                }
            },
        )
        return result.modified_count > 0

    async def claim_takeover(
        self, campaign_id: Any, *, old_epoch: int, owner: str, now: dt.datetime, lease_s: float
    ) -> dict[str, Any] | None:
        """Take a running campaign whose lease expired (or was released) from `old_epoch`."""
        return await self.campaigns.find_one_and_update(
            {
                "_id": campaign_id,
                "status": Status.RUNNING,
                "execution.epoch": old_epoch,
                "$or": [
                    {"execution.leaseUntil": {"$lte": now}},
                    {"execution.owner": None},
                ],
            },
            {
                "$set": {
                    "execution.owner": owner,
                    "execution.leaseUntil": now + dt.timedelta(seconds=lease_s),
                    "execution.takenOverAt": now,
                },
                "$inc": {"execution.epoch": 1},
            },
            projection=SCHEDULE_PROJECTION,
            return_document=ReturnDocument.AFTER,
        )

    async def heartbeat(
        self, campaign_id: Any, *, epoch: int, owner: str, lease_until: dt.datetime
    ) -> dict[str, Any] | None:
        """Extend the lease while the campaign is still ours and running; the returned document
        is None when it is not (paused, cancelled, taken over...)."""
        return await self.campaigns.find_one_and_update(
            {
                "_id": campaign_id,
                "status": Status.RUNNING,
                "execution.epoch": epoch,
                "execution.owner": owner,
            },
            {"$set": {"execution.leaseUntil": lease_until}},
            projection={"_id": 1},
        )

    async def release(
        self, campaign_id: Any, *, epoch: int, execution: Mapping[str, Any], now: dt.datetime
    ) -> bool:
        """Give up the lease at once. The whole `execution` sub-document is replaced (not one
        dotted field) so that the change reaches the other replicas' filtered change streams."""
        released = dict(execution)
        released.update({"owner": None, "leaseUntil": now, "releasedAt": now, "epoch": epoch})
        result = await self.campaigns.update_one(
            {"_id": campaign_id, "execution.epoch": epoch}, {"$set": {"execution": released}}
        )
        return result.modified_count > 0

    async def mark_sends_done(
        self,
        campaign_id: Any,
        *,
        epoch: int,
        now: dt.datetime,
        performance: Mapping[str, int] | None = None,
    ) -> bool:
        """Sending is over for this epoch; with `performance`, the authoritative counts from the
        ledger replace the live ones in the same write."""
        fields: dict[str, Any] = {"execution.sendsDone": True, "execution.sendsDoneAt": now}
        if performance is not None:
            fields.update({f"performance.{k}": v for k, v in performance.items()})
            fields["performance.updatedAt"] = now
        result = await self.campaigns.update_one(
            {"_id": campaign_id, "execution.epoch": epoch}, {"$set": fields}
        )
        return result.modified_count > 0

    async def complete(
        self, campaign_id: Any, *, now: dt.datetime, epoch: int | None = None
    ) -> bool:
        """running/paused → completed once the end has passed. With `epoch`, only as that
        execution's owner; without, only when no live owner remains."""
        query: dict[str, Any] = {
            "_id": campaign_id,
            "status": {"$in": [Status.RUNNING, Status.PAUSED]},
            "endDate": {"$lte": now},
        }
        if epoch is not None:
            query["execution.epoch"] = epoch
        else:
            query["$or"] = [
                {"execution.sendsDone": True},
                {"execution.leaseUntil": {"$lte": now}},
                {"execution.owner": None},
                {"execution": {"$exists": False}},
                {"status": Status.PAUSED},
            ]
        result = await self.campaigns.update_one(
            query,
            {
                "$set": {
                    "status": Status.COMPLETED,
                    "execution.finishedAt": now,
                    "execution.owner": None,
                }
            },
        )
        return result.modified_count > 0

    # ---- counters ------------------------------------------------------------------------

    async def add_performance(
        self, campaign_id: Any, *, epoch: int, counts: Mapping[str, int], now: dt.datetime
    ) -> bool:
        incs = {f"performance.{k}": v for k, v in counts.items() if v}
        if not incs:
            return True
        result = await self.campaigns.update_one(
            {"_id": campaign_id, "execution.epoch": epoch},
            {"$inc": incs, "$set": {"performance.updatedAt": now}},
        )
        return result.matched_count > 0

    # ---- ledger --------------------------------------------------------------------------

    async def ledger_states(
        self, campaign: str, channel: str, customers: Sequence[str]
    ) -> dict[str, tuple[str, int]]:
        ids = [delivery_id(campaign, channel, c) for c in customers]
        found: dict[str, tuple[str, int]] = {}
        cursor = self.deliveries.find(
            {"_id": {"$in": ids}}, {"customer": 1, "state": 1, "epoch": 1}
        )
        async for doc in cursor:
            found[doc["customer"]] = (doc["state"], int(doc.get("epoch", 0)))
        return found

    async def write_deliveries(
        self, campaign: str, *, epoch: int, records: Iterable[DeliveryRecord], now: dt.datetime
    ) -> set[str]:
        """Upsert ledger rows, fenced by epoch: a row already written by a later epoch is not
        touched. Returns the delivery ids that were not written because they were fenced off
        (empty when we still own the run).

        The bulk write is ordered: rows are applied in the order given, so a caller can put
        outcomes before new `pending` marks and know the ledger never holds both the old and
        the new pending rows at once. After a fenced row nothing more is applied (the run is
        over anyway), and every row from it on is reported as not written."""
        ops = []
        ids = []
        for rec in records:
            _id = delivery_id(campaign, rec.channel, rec.customer)
            ids.append(_id)
            fields: dict[str, Any] = {
                "state": rec.state,
                "epoch": epoch,
                "updatedAt": now,
                "attempts": rec.attempts,
            }
            for name, value in (
                ("to", rec.to),
                ("providerId", rec.provider_id),
                ("error", rec.error),
                ("reason", rec.reason),
            ):
                if value is not None:
                    fields[name] = value
            ops.append(
                UpdateOne(
                    {"_id": _id, "epoch": {"$lte": epoch}},
                    {
                        "$set": fields,
                        "$setOnInsert": {
                            "campaign": campaign,
                            "channel": rec.channel,
                            "customer": rec.customer,
                            "createdAt": now,
                        },
                    },
                    upsert=True,
                )
            )
        if not ops:
            return set()
        try:
            await self.deliveries.bulk_write(ops, ordered=True)
        except BulkWriteError as exc:
            errors = exc.details.get("writeErrors", [])
            if not errors or any(err.get("code") != 11000 for err in errors):
                raise
            return set(ids[min(err["index"] for err in errors) :])
        return set()

    async def forget_pending(self, ids: Sequence[str], *, epoch: int) -> None:
        """Remove this epoch's `pending` rows of sends it gave up before sending (a retry cut
        short by a stop): whoever resumes sends them."""
        await self.deliveries.delete_many(
            {"_id": {"$in": list(ids)}, "epoch": epoch, "state": "pending"}
        )

    async def ledger_counts(self, campaign: str) -> dict[str, dict[str, int]]:
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
        return out

    async def pending_from_other_epochs(self, campaign: str, epoch: int) -> list[dict[str, Any]]:
        cursor = self.deliveries.find(
            {"campaign": campaign, "state": "pending", "epoch": {"$lt": epoch}},
            {"customer": 1, "channel": 1, "to": 1},
        )
        return await cursor.to_list()

    # ---- execution attempts ----------------------------------------------------------------

    async def record_execution(
        self, campaign: str, *, epoch: int, owner: str, fields: Mapping[str, Any]
    ) -> None:
        # One path per operator: mongod refuses a path named by both $set and $setOnInsert
        # (code 40), so the owner goes in $set with the rest (it is the same on every write).
        await self.executions.update_one(
            {"campaign": campaign, "epoch": epoch},
            {"$set": {**fields, "owner": owner}},
            upsert=True,
        )

    # ---- reactor state ---------------------------------------------------------------------

    async def load_token(self, instance: str) -> Mapping[str, Any] | None:
        doc = await self.state.find_one({"_id": f"resume_token:{instance}"})
        token = doc.get("token") if doc else None
        return token if isinstance(token, dict) else None

    async def save_token(self, instance: str, token: Mapping[str, Any], now: dt.datetime) -> None:
        await self.state.update_one(
            {"_id": f"resume_token:{instance}"},
            {"$set": {"token": dict(token), "savedAt": now}},
            upsert=True,
        )
