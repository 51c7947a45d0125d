"""Campaign documents: claims, leases, counters and the errors an operator sees on them.

Every state change is a conditional update, a compare-and-set on `status` and `execution.epoch`,
so that any number of replicas can race and exactly one wins. Every judgement of time — is the
start due, is the grace over, has the window closed, has the lease expired — is the database's:
filters compare with `$$NOW` and leases are written as `$$NOW + lease`, so a replica whose clock
is a minute off can neither start a campaign early nor see a live lease as expired.

The updates that may meet a document in an odd shape (`execution: null` or a string, as a backend
can leave it; `performance` missing or not a document) are pipeline updates that rebuild those
sub-documents with `$mergeObjects`; mongod refuses a dotted `$set` under a null parent (code 28).
Literal values inside a pipeline are wrapped in `$literal`: a string that starts with `$` (an
error message, an owner name) must never be read as a field path.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from pymongo import ASCENDING, ReturnDocument
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase

from ...domain.models import Status
from .claims import SCHEDULE_PROJECTION, StartClaims
from .pipeline import NOW, document_or_empty, literal, ms, now_plus, set_execution
from .targets import target_problem

log = logging.getLogger(__name__)


_lit = literal
_document = document_or_empty


_set_execution = set_execution
_ms = ms
_now_plus = now_plus


def _expired_lease() -> dict[str, Any]:
    # A missing or null leaseUntil sorts before every date: expired.
    return {"$lte": [{"$ifNull": ["$execution.leaseUntil", None]}, NOW]}


class MongoCampaignStore:
    """The campaigns collection."""

    def __init__(self, db: AsyncDatabase[dict[str, Any]], collection: str = "campaigns") -> None:
        self.db = db
        self.campaigns: AsyncCollection[dict[str, Any]] = db[collection]
        self._claims = StartClaims(self.campaigns)

    @property
    def name(self) -> str:
        return self.campaigns.name

    async def aclose(self) -> None:
        """Stop the claim batching (claims still waiting get an error)."""
        await self._claims.aclose()

    async def ensure_indexes(self) -> None:
        await self.campaigns.create_index(
            [("status", ASCENDING), ("startDate", ASCENDING)], name="status_startDate"
        )
        await self.campaigns.create_index(
            [("status", ASCENDING), ("endDate", ASCENDING)], name="status_endDate"
        )

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

    async def get_slice(self, campaign_id: Any, start: int, count: int) -> dict[str, Any] | None:
        """The campaign with only `targetedCustomerIds[start:start + count]` (a shard's part:
        no shard reads the whole list)."""
        return await self.campaigns.find_one(
            {"_id": campaign_id}, {"targetedCustomerIds": {"$slice": [start, count]}}
        )

    async def sending_state(self, campaign_id: Any) -> str:
        cursor = await self.campaigns.aggregate(
            [
                {"$match": {"_id": campaign_id}},
                {"$project": {"status": 1, "open": {"$gt": ["$endDate", NOW]}}},
            ]
        )
        found = await cursor.to_list()
        doc = found[0] if found else None
        if doc is None:
            return "gone"
        if doc.get("status") != Status.RUNNING:
            return "stopped"
        return "running" if doc.get("open") else "window_closed"

    async def not_due_yet(self, campaign_id: Any) -> bool:
        """Still approved, with a start the database's clock has not reached: a timer fired a
        little early (this replica's estimate of the database's clock is off by milliseconds)."""
        found = await self.campaigns.find_one(
            {
                "_id": campaign_id,
                "status": Status.APPROVED,
                "$expr": {"$gt": ["$startDate", NOW]},
            },
            {"_id": 1},
        )
        return found is not None

    async def target_problem(self, campaign_id: Any) -> str | None:
        """Why the campaign's `targetedCustomerIds` cannot be sent to (see `targets`)."""
        return await target_problem(self.campaigns, campaign_id)

    # ---- errors on documents -------------------------------------------------------------

    async def record_invalid(self, campaign_id: Any, reason: str, detail: str) -> bool:
        """Write `execution.lastError` unless the same error is already there; True if written."""
        result = await self.campaigns.update_one(
            {"_id": campaign_id, "execution.lastError.detail": {"$ne": detail}},
            [
                _set_execution(
                    {"lastError": {"reason": _lit(reason), "detail": _lit(detail), "at": NOW}}
                )
            ],
        )
        return result.modified_count > 0

    # ---- claims --------------------------------------------------------------------------

    async def claim_start(
        self, campaign_id: Any, *, owner: str, lease_s: float, grace_s: float
    ) -> dict[str, Any] | None:
        """approved → running if due, inside the grace and before the end, by the database's
        clock. Returns the claimed document (with its new epoch; `execution.startedAt` is the
        database's time of the claim) to the single winner, None to everyone else. Claims that
        fire together go out in one bulk (`claims`)."""
        return await self._claims.claim(campaign_id, owner=owner, lease_s=lease_s, grace_s=grace_s)

    async def mark_missed(self, campaign_id: Any, *, grace_s: float, reason: str) -> bool:
        """approved → missed when the start is past the grace or the window already closed."""
        result = await self.campaigns.update_one(
            {
                "_id": campaign_id,
                "status": Status.APPROVED,
                "$expr": {
                    "$or": [
                        {"$lt": ["$startDate", {"$subtract": [NOW, _ms(grace_s)]}]},
                        {"$lte": ["$endDate", NOW]},
                    ]
                },
            },
            [
                {"$set": {"status": _lit(Status.MISSED.value)}},
                _set_execution({"reason": _lit(reason), "finishedAt": NOW}),
            ],
        )
        return result.modified_count > 0

    async def claim_takeover(
        self, campaign_id: Any, *, old_epoch: int, owner: str, lease_s: float
    ) -> dict[str, Any] | None:
        """Take a running campaign whose lease expired (or was released) from `old_epoch`."""
        return await self.campaigns.find_one_and_update(
            {
                "_id": campaign_id,
                "status": Status.RUNNING,
                "execution.epoch": old_epoch,
                "$expr": _expired_lease(),
            },
            [
                {"$set": {"performance": _document("performance")}},
                _set_execution(
                    {
                        "owner": _lit(owner),
                        "epoch": old_epoch + 1,
                        "leaseUntil": _now_plus(lease_s),
                        "takenOverAt": NOW,
                    }
                ),
            ],
            projection=SCHEDULE_PROJECTION,
            return_document=ReturnDocument.AFTER,
        )

    async def heartbeat(
        self, campaign_id: Any, *, epoch: int, owner: str, lease_s: float
    ) -> dict[str, Any] | None:
        """Extend the lease to the database's now + `lease_s` while the campaign is still ours
        and running; None when it is not (paused, cancelled, taken over...)."""
        return await self.campaigns.find_one_and_update(
            {
                "_id": campaign_id,
                "status": Status.RUNNING,
                "execution.epoch": epoch,
                "execution.owner": owner,
            },
            [{"$set": {"execution.leaseUntil": _now_plus(lease_s)}}],
            projection={"_id": 1, "execution.leaseUntil": 1},
        )

    async def release(self, campaign_id: Any, *, epoch: int, retry_after_s: float = 0.0) -> bool:
        """Give up the lease (at once, or after `retry_after_s`); only the lease fields change,
        so an error recorded on the execution stays visible."""
        result = await self.campaigns.update_one(
            {"_id": campaign_id, "execution.epoch": epoch},
            [
                {
                    "$set": {
                        "execution.owner": None,
                        "execution.leaseUntil": _now_plus(retry_after_s),
                        "execution.releasedAt": NOW,
                    }
                }
            ],
        )
        return result.modified_count > 0

    async def record_failure(
        self,
        campaign_id: Any,
        *,
        epoch: int,
        detail: str,
        max_failures: int,
        retry_after_s: float,
    ) -> str | None:
        """An execution of `epoch` failed: count it, keep the error, and release the lease for
        a retry after `retry_after_s`; at `max_failures` in a row the campaign becomes `failed`
        instead. Returns the status it is left in (None if the epoch was not ours)."""
        doc = await self.campaigns.find_one_and_update(
            {"_id": campaign_id, "execution.epoch": epoch},
            [
                _set_execution(
                    {
                        "failures": {"$add": [{"$ifNull": ["$execution.failures", 0]}, 1]},
                        "failedEpoch": epoch,
                        "lastError": {
                            "reason": "execution_failed",
                            "detail": _lit(detail),
                            "at": NOW,
                        },
                        "owner": None,
                        "leaseUntil": _now_plus(retry_after_s),
                        "releasedAt": NOW,
                    }
                )
            ],
            projection={"status": 1, "execution.failures": 1},
            return_document=ReturnDocument.AFTER,
        )
        if doc is None:
            return None
        if int(doc.get("execution", {}).get("failures", 0)) < max_failures:
            return str(doc.get("status"))
        failed = await self.campaigns.update_one(
            {"_id": campaign_id, "execution.epoch": epoch, "status": Status.RUNNING},
            [
                {"$set": {"status": _lit(Status.FAILED.value)}},
                _set_execution(
                    {
                        "reason": _lit(f"failed {max_failures} times in a row; last: {detail}"),
                        "finishedAt": NOW,
                    }
                ),
            ],
        )
        return Status.FAILED.value if failed.modified_count else str(doc.get("status"))

    async def mark_sends_done(
        self, campaign_id: Any, *, epoch: int, performance: Mapping[str, int] | None = None
    ) -> bool:
        """Sending is over for this epoch; with `performance`, the authoritative counts from the
        ledger replace the live ones in the same write."""
        fields: dict[str, Any] = {"execution.sendsDone": True}
        if performance is not None:
            fields.update({f"performance.{k}": v for k, v in performance.items()})
        dates = {"execution.sendsDoneAt": True}
        if performance is not None:
            dates["performance.updatedAt"] = True
        result = await self.campaigns.update_one(
            {"_id": campaign_id, "execution.epoch": epoch},
            {"$set": fields, "$currentDate": dates},
        )
        return result.modified_count > 0

    async def complete(self, campaign_id: Any, *, epoch: int | None = None) -> bool:
        """running/paused → completed once the end has passed. With `epoch`, only as that
        execution's owner; without, only when no live owner remains."""
        expr: list[dict[str, Any]] = [{"$lte": ["$endDate", NOW]}]
        query: dict[str, Any] = {
            "_id": campaign_id,
            "status": {"$in": [Status.RUNNING, Status.PAUSED]},
        }
        if epoch is not None:
            query["execution.epoch"] = epoch
        else:
            expr.append(
                {
                    "$or": [
                        {"$eq": ["$execution.sendsDone", True]},
                        _expired_lease(),
                        {"$eq": [{"$ifNull": ["$execution.owner", None]}, None]},
                        {"$eq": ["$status", Status.PAUSED.value]},
                    ]
                }
            )
        query["$expr"] = {"$and": expr}
        result = await self.campaigns.update_one(
            query,
            [
                {"$set": {"status": _lit(Status.COMPLETED.value)}},
                _set_execution({"finishedAt": NOW, "owner": None}),
            ],
        )
        return result.modified_count > 0

    # ---- counters ------------------------------------------------------------------------

    async def add_performance(
        self, campaign_id: Any, *, epoch: int | None, counts: Mapping[str, int]
    ) -> bool:
        """Add to the live counters while `epoch` is the campaign's (its claim made
        `performance` a document); False when another epoch owns it now. With `epoch` None (a
        shard's counters), only until sending is done: the exact counts from the ledger written
        then must not be added to afterwards."""
        incs = {f"performance.{k}": v for k, v in counts.items() if v}
        if not incs:
            return True
        owner: dict[str, Any] = (
            {"execution.epoch": epoch}
            if epoch is not None
            else {"execution.sendsDone": {"$ne": True}}
        )
        result = await self.campaigns.update_one(
            {"_id": campaign_id, **owner},
            # Progress: whatever failed before, this execution sends — failures are "in a row".
            {
                "$inc": incs,
                "$set": {"execution.failures": 0},
                "$currentDate": {"performance.updatedAt": True},
            },
        )
        return result.matched_count > 0
