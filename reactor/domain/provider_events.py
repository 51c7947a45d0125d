"""Opens and clicks as an email provider reports them (issue 24's provider signals): SendGrid's
Event Webhook (`open`, `click`, with `sg_machine_open` on opens) and Amazon SES event
publishing through SNS (`Open`, `Click`, with `isBotEvent`). Parsing is pure and takes bodies
whose signature was already checked; an entry that is not an open or click, or lacks what ties
it to a message (the Message-ID the reactor set, which the ledger records as `providerId`), is
left out. A body that is not the provider's shape raises ValueError.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from .engagement import HitKind

SENDGRID_FLAG = "sg_machine_open"
SES_FLAG = "isBotEvent"
_SES_KINDS = {"Open": HitKind.OPEN, "Click": HitKind.CLICK}
_SENDGRID_KINDS = {"open": HitKind.OPEN, "click": HitKind.CLICK}


@dataclass(frozen=True)
class ProviderEvent:
    """One open or click a provider saw, with the provider's own bot verdict when it gave one."""

    provider: str  # "sendgrid" | "ses"
    event_id: str  # unique per event at that provider (replays carry the same one)
    kind: HitKind
    message_id: str  # the Message-ID header the reactor set
    at: dt.datetime
    ip: str | None
    agent: str
    url: str | None = None  # clicks: the URL the provider redirected to
    flag: str | None = None  # the provider's bot flag's name, when the flag was true


def _str(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _obj(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def sendgrid_engagement(doc: Any) -> list[ProviderEvent]:
    """The opens and clicks of a SendGrid Event Webhook batch (the JSON array, parsed)."""
    if not isinstance(doc, list):
        raise ValueError("not a SendGrid event list")
    out: list[ProviderEvent] = []
    for e in doc:
        e = _obj(e)
        kind = _SENDGRID_KINDS.get(_str(e.get("event")))
        event_id = _str(e.get("sg_event_id"))
        message_id = _str(e.get("smtp-id"))
        stamp = e.get("timestamp")
        if kind is None or not event_id or not message_id or not isinstance(stamp, int | float):
            continue
        try:
            at = dt.datetime.fromtimestamp(stamp, dt.UTC)
        except (OverflowError, OSError, ValueError):
            continue
        flagged = kind is HitKind.OPEN and e.get(SENDGRID_FLAG) is True
        out.append(
            ProviderEvent(
                "sendgrid",
                event_id,
                kind,
                message_id,
                at,
                _str(e.get("ip")) or None,
                _str(e.get("useragent")),
                _str(e.get("url")) or None,
                SENDGRID_FLAG if flagged else None,
            )
        )
    return out


def ses_engagement(sns_message_id: str, doc: Any) -> list[ProviderEvent]:
    """The open or click in one SES event notification (the SNS message's `Message`, parsed)."""
    if not isinstance(doc, dict):
        raise ValueError("not an SES notification")
    kind = _SES_KINDS.get(_str(doc.get("eventType")))
    if kind is None:
        return []
    detail = _obj(doc.get(kind.value))
    mail = _obj(doc.get("mail"))
    message_id = _str(_obj(mail.get("commonHeaders")).get("messageId"))
    try:
        at = dt.datetime.fromisoformat(_str(detail.get("timestamp")).replace("Z", "+00:00"))
    except ValueError:
        return []
    if not message_id or not sns_message_id or at.tzinfo is None:
        return []
    flagged = detail.get(SES_FLAG) is True or doc.get(SES_FLAG) is True
    return [
        ProviderEvent(
            "ses",
            sns_message_id,
            kind,
            message_id,
            at.astimezone(dt.UTC),
            _str(detail.get("ipAddress")) or None,
            _str(detail.get("userAgent")),
            _str(detail.get("link")) or None,
            SES_FLAG if flagged else None,
        )
    ]
