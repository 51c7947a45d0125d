"""Start claims in bulk: claims that fire together go out as one unordered bulk of conditional
updates (each still its own compare-and-set: `approved` and due, by `$$NOW`, → `running`, next
epoch, owner, lease) and one read of what the batch won, found by the token every claim of the
batch writes. A burst of a thousand starts costs two round trips, not a thousand."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from typing import Any

from pymongo import UpdateOne
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.errors import BulkWriteError

from ...batching import GroupCommit
from ...domain.models import Status
from .pipeline import NOW, document_or_empty, literal, ms, now_plus, set_execution

log = logging.getLogger(__name__)

# Start claims arriving within this of each other share one bulk write; under a burst the next
# batch collects while one is applied, so a lone claim waits at most this.
CLAIM_WINDOW_S = 0.002
CLAIM_MAX_BATCH = 1000
# Fields the scheduler never needs; a targeted list can hold millions of ids.
SCHEDULE_PROJECTION = {"targetedCustomerIds": 0}


class StartClaims:
    def __init__(self, campaigns: AsyncCollection[dict[str, Any]]) -> None:
        self._campaigns = campaigns
        self._batchers: dict[tuple[str, float, float], GroupCommit[Any, dict[str, Any] | None]] = {}

    async def aclose(self) -> None:
        for batcher in self._batchers.values():
            await batcher.aclose()
        self._batchers.clear()

    async def claim(
        self, campaign_id: Any, *, owner: str, lease_s: float, grace_s: float
    ) -> dict[str, Any] | None:
        """`MongoCampaignStore.claim_start`, through this batcher (see the module)."""
        key = (owner, lease_s, grace_s)
        batcher = self._batchers.get(key)
        if batcher is None:
            batcher = self._batchers[key] = GroupCommit(
                lambda ids: self._claim_starts(ids, owner=owner, lease_s=lease_s, grace_s=grace_s),
                window_s=CLAIM_WINDOW_S,
                max_batch=CLAIM_MAX_BATCH,
            )
        return await batcher.submit(campaign_id)

    async def _claim_starts(
        self, campaign_ids: Sequence[Any], *, owner: str, lease_s: float, grace_s: float
    ) -> list[dict[str, Any] | None]:
        # Every claim of this batch writes its token; the read finds what this batch won.
        token = f"{owner}:{uuid.uuid4().hex}"
        unique = list(dict.fromkeys(campaign_ids))
        ops = [_claim_start(campaign_id, owner, lease_s, grace_s, token) for campaign_id in unique]
        try:
            await self._campaigns.bulk_write(ops, ordered=False)
        except BulkWriteError as exc:
            # Each claim is its own: one document the update cannot apply to (an odd shape)
            # is not claimed, and says why; the others stand.
            for error in exc.details.get("writeErrors", [])[:5]:
                log.warning(
                    "start claim of %s refused: %s",
                    unique[error.get("index", 0)],
                    error.get("errmsg"),
                )
        won = {
            doc["_id"]: doc
            async for doc in self._campaigns.find(
                {"_id": {"$in": unique}, "execution.claimToken": token}, SCHEDULE_PROJECTION
            )
        }
        out: list[dict[str, Any] | None] = []
        for campaign_id in campaign_ids:
            out.append(won.pop(campaign_id, None))  # a repeated id wins once
        return out


def _claim_start(
    campaign_id: Any, owner: str, lease_s: float, grace_s: float, token: str
) -> UpdateOne:
    """One start's compare-and-set: `approved` and due (by `$$NOW`, within the grace, before
    its end) → `running`, the next epoch, this owner, a lease, and the batch's token."""
    return UpdateOne(
        {
            "_id": campaign_id,
            "status": Status.APPROVED,
            "$expr": {
                "$and": [
                    {"$lte": ["$startDate", NOW]},
                    {"$gte": ["$startDate", {"$subtract": [NOW, ms(grace_s)]}]},
                    {"$gt": ["$endDate", NOW]},
                ]
            },
        },
        [
            {
                "$set": {
                    "status": literal(Status.RUNNING.value),
                    "performance": document_or_empty("performance"),
                }
            },
            set_execution(
                {
                    "owner": literal(owner),
                    "epoch": {"$add": [{"$ifNull": ["$execution.epoch", 0]}, 1]},
                    "leaseUntil": now_plus(lease_s),
                    "startedAt": NOW,
                    "sendsDone": False,
                    "reason": None,
                    "startLatenessMs": {"$subtract": [NOW, "$startDate"]},
                    "claimToken": literal(token),
                }
            ),
        ],
    )
