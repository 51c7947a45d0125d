"""What a campaign must pass before its start is armed, and what it is warned about.

* Its sending identity exists (`unknown_sender` otherwise) and — with a pre-flight — checks out
  in DNS: findings that are not ok are warnings; with REQUIRE_AUTHENTICATED_SENDERS=true a
  failing identity is refused as `unauthenticated_sender`, the reasons in `lastError`.
* Its `localTime` is well formed (`bad_local_time`, naming the field), on a list of targets
  (not a segment), and each instant's batch fits its spread under the budgets: a batch that
  does not is a warning naming its zones and the shortfall (nothing is ever started early).

Warnings land in `execution.warnings`, written only when they differ from the document's.
A campaign without email is not concerned by the identity checks.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol

from ..domain.authcheck import SenderReport
from ..domain.errors import InvalidCampaign
from ..domain.ids import normalise_id
from ..domain.models import Campaign, Channel
from ..domain.senders import Identity, Senders
from ..domain.zones import LocalTime, fit, parse_local_time

log = logging.getLogger(__name__)

Findings = tuple[InvalidCampaign | None, list[str]]


class Admission(Protocol):
    async def check(self, doc: dict[str, Any], campaign: Campaign) -> InvalidCampaign | None: ...


class Check(Protocol):
    async def findings(self, doc: dict[str, Any], campaign: Campaign) -> Findings: ...


class Preflight(Protocol):
    async def report(self, identity: Identity) -> SenderReport: ...


class WarningsStore(Protocol):
    async def set_warnings(self, campaign_id: Any, warnings: list[str]) -> bool: ...


class Admissions:
    """The checks in order; the first refusal wins; every check's warnings are written."""

    def __init__(self, checks: Sequence[Check], warnings: WarningsStore | None = None) -> None:
        self._checks = list(checks)
        self._warnings = warnings

    async def check(self, doc: dict[str, Any], campaign: Campaign) -> InvalidCampaign | None:
        warnings: list[str] = []
        problem: InvalidCampaign | None = None
        for check in self._checks:
            try:
                problem, found = await check.findings(doc, campaign)
            except Exception as exc:  # a check that breaks must not keep every campaign out
                log.warning(
                    "pre-arming check %s of campaign %s failed (%s: %s); not applied",
                    type(check).__name__,
                    campaign.name,
                    type(exc).__name__,
                    str(exc)[:200],
                    extra={"campaign_id": campaign.key},
                )
                continue
            warnings.extend(found)
            if problem is not None:
                break
        written = (doc.get("execution") or {}).get("warnings") or []
        if self._warnings is not None and warnings != written:
            await self._warnings.set_warnings(campaign.id, warnings)
        return problem


class SenderAdmission:
    def __init__(
        self,
        senders: Senders,
        *,
        preflight: Preflight | None = None,
        require_authenticated: bool = False,
    ) -> None:
        self._senders = senders
        self._preflight = preflight
        self._require = require_authenticated

    async def findings(self, doc: dict[str, Any], campaign: Campaign) -> Findings:
        if Channel.EMAIL not in campaign.channels:
            return None, []
        try:
            identity = self._senders.choose(doc)
        except InvalidCampaign as exc:
            return exc, []
        if identity is None or self._preflight is None:
            return None, []
        report = await self._preflight.report(identity)
        if self._require and report.failures:
            detail = "; ".join(f"{f.check}: {f.detail}" for f in report.failures)
            return InvalidCampaign(
                "unauthenticated_sender",
                f"REQUIRE_AUTHENTICATED_SENDERS: sender {identity.name} ({identity.domain}) "
                f"fails pre-flight: {detail}"[:900],
            ), report.warnings
        return None, report.warnings


BatchPlanner = Callable[
    [Sequence[str], LocalTime, dt.datetime], Awaitable[dict[dt.datetime, dict[str, int]]]
]


class LocalTimeAdmission:
    """`localTime` checked, and its batches judged against the budgets once per start."""

    def __init__(
        self,
        *,
        targets: Callable[[Any], Awaitable[list[Any]]],
        planner: BatchPlanner,
        rates: Callable[[dict[str, Any], Channel], float],
    ) -> None:
        self._targets = targets
        self._planner = planner
        self._rates = rates
        self._judged: dict[tuple[str, float, str], asyncio.Task[list[str]]] = {}
        self.inline_s = 0.5  # how long a sync waits for a judgement before moving on

    async def findings(self, doc: dict[str, Any], campaign: Campaign) -> Findings:
        try:
            local = parse_local_time(doc.get("localTime"))
        except InvalidCampaign as exc:
            return exc, []
        if local is None:
            return None, []
        if campaign.segment is not None:
            return InvalidCampaign(
                "bad_local_time", "localTime needs targetedCustomerIds (not a segment)"
            ), []
        if campaign.split is not None:
            # A local-time run sends instant by instant and has no winner phase: the rest of a
            # split's audience would never be sent. Refused until the two are combined.
            return InvalidCampaign(
                "bad_local_time", "localTime cannot be combined with variants (an A/B split)"
            ), []
        key = (campaign.key, campaign.start_at.timestamp(), repr(doc.get("localTime")))
        judging = self._judged.get(key)
        if judging is None:
            if len(self._judged) > 10_000:
                self._judged.clear()  # judged again when next armed: cheap to forget
            # Reading a large audience takes a while: judged in the background, so the sync
            # (every other campaign's too) goes on; the warning lands with the next sync of
            # this campaign (an event, or the next sweep).
            judging = asyncio.get_running_loop().create_task(self._judge(doc, campaign, local))
            self._judged[key] = judging
            await asyncio.wait({judging}, timeout=self.inline_s)
        if not judging.done():
            return None, []
        if judging.cancelled() or judging.exception() is not None:
            if not judging.cancelled():
                log.warning(
                    "could not judge the local-time batches of %s (%s)",
                    campaign.name,
                    judging.exception(),
                    extra={"campaign_id": campaign.key},
                )
            del self._judged[key]
            return None, []
        return None, judging.result()

    async def _judge(self, doc: dict[str, Any], campaign: Campaign, local: LocalTime) -> list[str]:
        targets = list(dict.fromkeys(normalise_id(t) for t in await self._targets(campaign.id)))
        batches = await self._planner(targets, local, campaign.start_at)
        warnings = []
        for channel in sorted(campaign.channels):
            for short in fit(batches, local.spread_s, self._rates(doc, channel)):
                warnings.append(f"localTime {channel}: {short}")
        if warnings:
            log.warning(
                "campaign %s: %d local-time batches cannot finish within their spread",
                campaign.name,
                len(warnings),
                extra={"campaign_id": campaign.key},
            )
        return warnings
