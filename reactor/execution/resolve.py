"""Uncertain SMS, resolved with the provider afterwards: an SMS whose outcome was unknown (a
Twilio 5xx or a timeout after the request went out) is looked up in Twilio's own Messages list
once its queueing window has passed. Found, its row becomes `sent` with the SID
(`LedgerOp.RESOLVE`); not found, it stays `uncertain`."""

from __future__ import annotations

import datetime as dt
import logging

from ..domain.deliveries import DeliveryRecord, DeliveryState, LedgerOp
from ..metrics import Metrics
from ..ports import Clock, EmailSender, SmsSender
from .ledger import Item, LedgerWriter
from .state import Run, StopReason, unless_stopped

log = logging.getLogger(__name__)


async def resolve_uncertain_sms(
    run: Run,
    items: list[Item],
    *,
    sender: EmailSender | SmsSender | None,
    writer: LedgerWriter,
    clock: Clock,
    metrics: Metrics,
    after_s: float,
) -> None:
    """Look each uncertain SMS up in the provider's own list once its queueing window has
    passed: found, the row becomes `sent` with the provider's id; otherwise it stays uncertain,
    for a person to decide. Nothing is ever re-sent."""
    find = getattr(sender, "find_sent", None)
    if find is None:
        return
    if not await unless_stopped(run, clock.sleep, after_s):
        if run.stop_reason != StopReason.WINDOW_CLOSED:
            return
    records = []
    for item in items:
        since = (item.attempted_at or clock.now()) - dt.timedelta(seconds=5)
        provider_id = await find(item.message, since)
        if provider_id is not None:
            records.append(
                DeliveryRecord(
                    item.customer,
                    item.channel,
                    DeliveryState.SENT,
                    to=item.to,
                    provider_id=provider_id,
                    reason="resolved_with_provider",
                    op=LedgerOp.RESOLVE,
                )
            )
    refused = await writer.write(run, records) if records else set()
    resolved = len(records) - len(refused)
    metrics.sms_resolved.labels("sent").inc(resolved)
    metrics.sms_resolved.labels("still_uncertain").inc(len(items) - resolved)
    log.info(
        "📱 %d of %d uncertain SMS found in Twilio's list and recorded sent",
        resolved,
        len(items),
        extra={"campaign_id": run.key, "count": resolved},
    )
