"""What a campaign must pass before its start is armed: a sending identity that exists, and —
with a pre-flight — an identity whose SPF, DKIM and DMARC check out.

An unknown identity is refused (`unknown_sender` in `execution.lastError`). Pre-flight findings
that are not ok are written to `execution.warnings` (only when they change); with
REQUIRE_AUTHENTICATED_SENDERS=true a failing identity is refused as `unauthenticated_sender`,
the reasons in `lastError`. A campaign without email is not concerned.
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

from ..domain.authcheck import SenderReport
from ..domain.errors import InvalidCampaign
from ..domain.models import Campaign, Channel
from ..domain.senders import Identity, Senders

log = logging.getLogger(__name__)


class Admission(Protocol):
    async def check(self, doc: dict[str, Any], campaign: Campaign) -> InvalidCampaign | None: ...


class Preflight(Protocol):
    async def report(self, identity: Identity) -> SenderReport: ...


class WarningsStore(Protocol):
    async def set_warnings(self, campaign_id: Any, warnings: list[str]) -> bool: ...


class SenderAdmission:
    def __init__(
        self,
        senders: Senders,
        *,
        preflight: Preflight | None = None,
        warnings: WarningsStore | None = None,
        require_authenticated: bool = False,
    ) -> None:
        self._senders = senders
        self._preflight = preflight
        self._warnings = warnings
        self._require = require_authenticated

    async def check(self, doc: dict[str, Any], campaign: Campaign) -> InvalidCampaign | None:
        if Channel.EMAIL not in campaign.channels:
            return None
        try:
            identity = self._senders.choose(doc)
        except InvalidCampaign as exc:
            return exc
        if identity is None or self._preflight is None:
            return None
        report = await self._preflight.report(identity)
        if self._warnings is not None:
            await self._warnings.set_warnings(campaign.id, report.warnings)
        if self._require and report.failures:
            detail = "; ".join(f"{f.check}: {f.detail}" for f in report.failures)
            return InvalidCampaign(
                "unauthenticated_sender",
                f"REQUIRE_AUTHENTICATED_SENDERS: sender {identity.name} ({identity.domain}) "
                f"fails pre-flight: {detail}"[:900],
            )
        return None
