"""Each email provider's webhook, read its own way into `FeedbackEvent`s: Amazon SES (through
SNS), SendGrid's Event Webhook, Postmark, and a generic JSON shape. Parsing is pure; a body
that is not what the provider sends raises ValueError (the route answers 400)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from ..domain.feedback import Feedback, FeedbackEvent


def parse_json(body: bytes | str) -> Any:
    """JSON from an untrusted body: ValueError for anything that is not JSON, including
    nesting deep enough to exhaust the parser's recursion (`[` x 200,000), which must be a 400
    before any signature is checked, not a 500."""
    try:
        return json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise ValueError("not JSON") from None


_json = parse_json


def _str(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _obj(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def ses_events(sns_message_id: str, doc: Any) -> list[FeedbackEvent]:
    """An SES notification (the SNS message's Message, parsed): one event per recipient."""
    if not isinstance(doc, dict):
        raise ValueError("not an SES notification")
    kind_text = _str(doc.get("notificationType") or doc.get("eventType"))
    mail = _obj(doc.get("mail"))
    headers = _obj(mail.get("commonHeaders"))
    message_id = _str(headers.get("messageId")) or None
    out: list[FeedbackEvent] = []
    if kind_text == "Bounce":
        bounce = _obj(doc.get("bounce"))
        hard = bounce.get("bounceType") == "Permanent"
        kind = Feedback.HARD_BOUNCE if hard else Feedback.SOFT_BOUNCE
        for i, r in enumerate(_list(bounce.get("bouncedRecipients"))):
            out.append(
                FeedbackEvent(
                    "ses",
                    f"{sns_message_id}:{i}",
                    kind,
                    _str(r.get("emailAddress")),
                    message_id,
                    _str(r.get("diagnosticCode")) or _str(bounce.get("bounceSubType")),
                )
            )
    elif kind_text == "Complaint":
        complaint = _obj(doc.get("complaint"))
        for i, r in enumerate(_list(complaint.get("complainedRecipients"))):
            out.append(
                FeedbackEvent(
                    "ses",
                    f"{sns_message_id}:{i}",
                    Feedback.COMPLAINT,
                    _str(r.get("emailAddress")),
                    message_id,
                    _str(complaint.get("complaintFeedbackType")),
                )
            )
    elif kind_text == "Delivery":
        delivery = _obj(doc.get("delivery"))
        for i, address in enumerate(delivery.get("recipients") or []):
            if isinstance(address, str):
                out.append(
                    FeedbackEvent(
                        "ses", f"{sns_message_id}:{i}", Feedback.DELIVERED, address, message_id
                    )
                )
    return [e for e in out if e.address]


def sendgrid_events(doc: Any) -> list[FeedbackEvent]:
    """SendGrid posts a JSON array of events (`doc`, parsed); `sg_event_id` is each one's id."""
    if not isinstance(doc, list):
        raise ValueError("not a SendGrid event list")
    out: list[FeedbackEvent] = []
    for e in doc:
        if not isinstance(e, dict):
            continue
        kind = _sendgrid_kind(e)
        event_id = _str(e.get("sg_event_id"))
        address = _str(e.get("email"))
        if kind is None or not event_id or not address:
            continue
        message_id = _str(e.get("smtp-id")) or None
        detail = _str(e.get("reason")) or _str(e.get("status"))
        out.append(FeedbackEvent("sendgrid", event_id, kind, address, message_id, detail))
    return out


def _sendgrid_kind(e: dict[str, Any]) -> Feedback | None:
    event = e.get("event")
    if event == "bounce":
        # `bounce` is permanent; its `type: blocked` is a temporary refusal by the receiver.
        return Feedback.SOFT_BOUNCE if e.get("type") == "blocked" else Feedback.HARD_BOUNCE
    if event == "blocked":
        return Feedback.SOFT_BOUNCE
    if event == "spamreport":
        return Feedback.COMPLAINT
    if event == "delivered":
        return Feedback.DELIVERED
    if event == "dropped":
        reason = _str(e.get("reason")).lower()
        if "bounced address" in reason or "invalid" in reason:
            return Feedback.HARD_BOUNCE
        if "spam reporting address" in reason:
            return Feedback.COMPLAINT
    return None


_POSTMARK_HARD = {"HardBounce", "BadEmailAddress", "ManuallyDeactivated", "Unknown"}
_POSTMARK_SOFT = {"SoftBounce", "Transient", "DnsError", "AutoResponder", "MailboxFull"}


def postmark_events(body: bytes) -> list[FeedbackEvent]:
    doc = _json(body)
    if not isinstance(doc, dict):
        raise ValueError("not a Postmark webhook")
    record = doc.get("RecordType")
    event_id = str(doc.get("ID") or doc.get("MessageID") or "")
    address = _str(doc.get("Email") or doc.get("Recipient"))
    kind: Feedback | None = None
    if record == "Bounce":
        bounce_type = _str(doc.get("Type"))
        if bounce_type in ("SpamComplaint", "SpamNotification"):
            kind = Feedback.COMPLAINT
        elif bounce_type in _POSTMARK_HARD:
            kind = Feedback.HARD_BOUNCE
        elif bounce_type in _POSTMARK_SOFT:
            kind = Feedback.SOFT_BOUNCE
    elif record == "SpamComplaint":
        kind = Feedback.COMPLAINT
    elif record == "Delivery":
        kind = Feedback.DELIVERED
        event_id = f"delivery:{doc.get('MessageID', '')}"
    if kind is None or not event_id or not address:
        return []
    detail = _str(doc.get("Description")) or _str(doc.get("Details"))
    return [FeedbackEvent("postmark", f"{record}:{event_id}", kind, address, None, detail)]


_GENERIC = {k.value: k for k in Feedback}


def generic_events(body: bytes) -> list[FeedbackEvent]:
    """`{"events": [{"id", "type", "email", "message_id"?, "detail"?}]}` (or one such object),
    with `type` one of hard_bounce, soft_bounce, complaint, delivered."""
    doc = _json(body)
    items = doc.get("events") if isinstance(doc, dict) and "events" in doc else [doc]
    if not isinstance(items, list):
        raise ValueError("events must be a list")
    out: list[FeedbackEvent] = []
    for e in _iter_dicts(items):
        kind = _GENERIC.get(_str(e.get("type")))
        if kind is None or not _str(e.get("id")) or not _str(e.get("email")):
            raise ValueError(
                "each event needs id, type (hard_bounce|soft_bounce|complaint|delivered) and email"
            )
        out.append(
            FeedbackEvent(
                "generic",
                _str(e.get("id")),
                kind,
                _str(e.get("email")),
                _str(e.get("message_id")) or None,
                _str(e.get("detail")),
            )
        )
    return out


def _list(value: Any) -> list[dict[str, Any]]:
    return [v for v in value if isinstance(v, dict)] if isinstance(value, list) else []


def _iter_dicts(values: list[Any]) -> Iterator[dict[str, Any]]:
    for v in values:
        if not isinstance(v, dict):
            raise ValueError("each event must be an object")
        yield v
