"""`execution.warnings` on a campaign: what the pre-flight found about its sending identity,
written only when it changes (so the change stream's echo of it finds nothing to do)."""

from __future__ import annotations

from typing import Any

from pymongo.asynchronous.database import AsyncDatabase

from .pipeline import literal, set_execution


class MongoCampaignWarnings:
    def __init__(self, db: AsyncDatabase[dict[str, Any]], collection: str) -> None:
        self.campaigns = db[collection]

    async def set_warnings(self, campaign_id: Any, warnings: list[str]) -> bool:
        """True if written. An empty list clears earlier warnings and writes nothing where
        there were none."""
        changed: dict[str, Any] = {"$ne": warnings} if warnings else {"$exists": True, "$ne": []}
        result = await self.campaigns.update_one(
            {"_id": campaign_id, "execution.warnings": changed},
            [set_execution({"warnings": literal(warnings)})],
        )
        return result.modified_count > 0
