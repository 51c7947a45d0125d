"""The decision run: what a replica does when a split campaign's DECIDE timer fires.

Every replica arms the timer; each one tries the claim (a conditional write by the database's
clock, `MongoSplits.claim_decision`) and exactly one wins. The winner reads the human-only
counts, runs the pure `domain.splits.decide`, and writes `abTest.result` with its token. A
winner that dies mid-decision leaves a claim whose lease runs out: the others, still holding the
timer, retry after it and one of them decides. The campaign's owner, waiting with the rest of
the audience, sees the result and sends the winner.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass
from typing import Any, Protocol

from ..domain.errors import InvalidCampaign
from ..domain.models import Campaign, parse_campaign
from ..domain.schedule import decision_due
from ..domain.splits import VariantCounts, assign, decide

log = logging.getLogger(__name__)


class SplitStore(Protocol):
    async def claim_decision(
        self, campaign_id: Any, *, owner: str, lease_s: float
    ) -> str | None: ...
    async def write_result(
        self, campaign_id: Any, *, token: str, result: dict[str, Any]
    ) -> bool: ...
    async def get(self, campaign_id: Any) -> dict[str, Any] | None: ...
    async def counts(
        self, campaign: str, campaign_id: Any, keys: tuple[str, ...], in_test: Any
    ) -> list[VariantCounts]: ...


@dataclass(frozen=True)
class Outcome:
    decided: bool  # this replica wrote the result
    retry_at: dt.datetime | None  # look again then (None: nothing more to do here)
    result: dict[str, Any] | None = None


class Decider:
    def __init__(
        self,
        store: SplitStore,
        *,
        owner: str,
        lease_s: float,
        split_key: bytes,
        metrics: Any = None,
    ) -> None:
        self._store = store
        self._owner = owner
        self._lease_s = lease_s
        self._key = split_key
        self._metrics = metrics

    async def fire(self, campaign_id: Any) -> Outcome:
        """Try to decide `campaign_id`'s split; see the module."""
        token = await self._store.claim_decision(
            campaign_id, owner=self._owner, lease_s=self._lease_s
        )
        if token is None:
            return await self._not_ours(campaign_id)
        campaign = await self._campaign(campaign_id)
        if campaign is None or campaign.split is None:
            return Outcome(False, None)
        split = campaign.split
        counts = await self._store.counts(
            campaign.key, campaign.id, split.keys, self._in_test(campaign)
        )
        decision = decide(counts, split.ab)
        result = decision.document()
        result["decidedBy"] = self._owner
        if split.ab.winner is not None:
            result["operatorWinner"] = split.ab.winner
            result["reason"] += f"; the operator's abTest.winner {split.ab.winner} overrides"
        written = await self._store.write_result(campaign_id, token=token, result=result)
        if not written:
            return Outcome(False, None)
        self._observe(result)
        log.info(
            "🏁 A/B decision for %s (ID: %s): %s",
            campaign.name,
            campaign.key,
            result["reason"],
            extra={"campaign_id": campaign.key, "winner": result["winner"]},
        )
        return Outcome(True, None, result)

    def _in_test(self, campaign: Campaign) -> Any:
        split = campaign.split
        assert split is not None

        def in_test(customer: str, variant: str) -> bool:
            return assign(self._key, campaign.key, customer, split) == variant

        return in_test

    async def _campaign(self, campaign_id: Any) -> Campaign | None:
        doc = await self._store.get(campaign_id)
        if doc is None:
            return None
        try:
            return parse_campaign(doc)
        except InvalidCampaign:
            return None  # reported on the document by the scheduler's sync

    async def _not_ours(self, campaign_id: Any) -> Outcome:
        """Lost the claim: decided already, not due (by the database's clock), paused, or
        another replica is deciding: look again when the document says (the end of the other
        decider's lease), the same instant a sweep's sync would arm."""
        campaign = await self._campaign(campaign_id)
        return Outcome(False, None if campaign is None else decision_due(campaign))

    def _observe(self, result: dict[str, Any]) -> None:
        if self._metrics is None:
            return
        outcome = "winner" if result.get("winner") else "fallback"
        self._metrics.split_decisions.labels(outcome).inc()
        for row in result.get("variants", []):
            self._metrics.split_variant_rate.labels(row["key"]).set(row["rate"])
