"""The doctor's consent checks: are recipients' links configured (public URL, signing secret,
rotation), does the footer carry a postal address, and what the suppression list holds."""

from __future__ import annotations

import datetime as dt
from typing import Any
from urllib.parse import urlsplit

from pymongo import AsyncMongoClient
from pymongo.errors import PyMongoError

from ..adapters.mongo import MongoFeedback
from ..config import Settings
from ..domain.consent import parse_old_keys
from .report import FAIL, OK, WARN, Report, ago

LOCAL_HOSTS = {"localhost", "127.0.0.1", "::1"}


def check_links(report: Report, settings: Settings) -> None:
    if not settings.public_base_url or settings.link_secret is None:
        report.add(
            "unsubscribe links",
            WARN,
            "not configured: set PUBLIC_BASE_URL and LINK_SECRET; without them emails carry no "
            "unsubscribe link or List-Unsubscribe (Gmail and Yahoo require both of bulk senders)",
        )
        return
    url = urlsplit(settings.public_base_url)
    old = (
        parse_old_keys(settings.link_old_keys.get_secret_value()) if settings.link_old_keys else []
    )
    detail = (
        f"{settings.public_base_url}/u/… signed with key {settings.link_key_id!r}"
        f"{f' (+{len(old)} retired)' if old else ''}; links live "
        f"{settings.link_ttl_seconds / 86400:g} days; listening on "
        f"{settings.public_host}:{settings.public_port}"
    )
    if url.scheme != "https" and url.hostname not in LOCAL_HOSTS:
        report.add(
            "unsubscribe links",
            WARN,
            detail + "; PUBLIC_BASE_URL is not https (RFC 8058 one-click needs an HTTPS URI)",
        )
    else:
        report.add("unsubscribe links", OK, detail)
    if not settings.postal_address:
        report.add(
            "postal address",
            WARN,
            "POSTAL_ADDRESS not set: CAN-SPAM wants the sender's postal address in every message",
        )
    else:
        report.add("postal address", OK, "added to the footer of emails without their own link")


async def check_suppressions(
    report: Report, client: AsyncMongoClient[dict[str, Any]], settings: Settings
) -> None:
    try:
        rows = await (
            await client[settings.campaigns_db]["suppressions"].aggregate(
                [{"$group": {"_id": "$reason", "n": {"$sum": 1}}}, {"$sort": {"_id": 1}}]
            )
        ).to_list()
    except PyMongoError as exc:
        report.add("suppressions", FAIL, f"cannot read the suppression list: {type(exc).__name__}")
        return
    total = sum(int(r["n"]) for r in rows)
    by_reason = ", ".join(f"{r['_id']} {int(r['n'])}" for r in rows)
    report.add("suppressions", OK, f"{total} entries" + (f" ({by_reason})" if by_reason else ""))


_ROUTES = {
    "ses": "/webhooks/ses",
    "sendgrid": "/webhooks/sendgrid",
    "postmark": "/webhooks/postmark",
    "generic": "/webhooks/generic",
    "twilio": "/webhooks/twilio/inbound, /webhooks/twilio/status",
}


async def check_webhooks(
    report: Report,
    client: AsyncMongoClient[dict[str, Any]] | None,
    settings: Settings,
    now: dt.datetime,
) -> None:
    """Which providers' webhooks are on, and when each last received an event."""
    config = settings.webhook_config()
    if config is None:
        report.add(
            "webhooks",
            WARN,
            "none: bounces, complaints, STOP replies and SMS receipts need PUBLIC_BASE_URL",
        )
        return
    last: dict[str, dict[str, Any]] = {}
    if client is not None:
        try:
            last = await MongoFeedback(client[settings.campaigns_db], "unused").last_received()
        except PyMongoError:
            last = {}
    on = config.configured()
    for provider, enabled in on.items():
        if not enabled:
            continue
        seen = last.get(provider, {})
        at = seen.get("lastEventAt")
        if isinstance(at, dt.datetime):
            when = at if at.tzinfo else at.replace(tzinfo=dt.UTC)
            age_s = (now - when).total_seconds()
            detail = f"last event {ago(age_s)} ago ({int(seen.get('events', 0))} in all)"
        else:
            detail = "no event received yet"
        report.add(f"webhook {provider}", OK, f"{config.base_url}{_ROUTES[provider]}; {detail}")
    off = [p for p, enabled in on.items() if not enabled]
    if off:
        report.add("webhooks off", WARN, f"not configured: {', '.join(off)} (see docs/consent.md)")
