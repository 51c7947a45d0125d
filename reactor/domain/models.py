"""Campaign documents as the existing backend writes them, parsed and validated.

`parse_campaign` is the single gate: a document that passes can be scheduled and sent; one that
fails raises `InvalidCampaign` with a reason the operator sees on the document and in metrics.
"""

from __future__ import annotations

import datetime as dt
import unicodedata
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from bson import ObjectId

from .errors import InvalidCampaign
from .segments import Segment, parse_segment
from .sms import LocalHours, parse_hours

if TYPE_CHECKING:
    from .splits import Split

MAX_EMAIL_BODY_BYTES = 512 * 1024
MAX_SUBJECT_CHARS = 998  # RFC 5322 line limit
MAX_SMS_CHARS = 1600  # Twilio's limit for one message body
MAX_TARGETS = 5_000_000


class Status(StrEnum):
    DRAFT = "draft"
    PENDING_APPROVAL = "pending_approval"
    APPROVED = "approved"
    REJECTED = "rejected"
    RUNNING = "running"
    COMPLETED = "completed"
    PAUSED = "paused"
    CANCELLED = "cancelled"
    MISSED = "missed"
    FAILED = "failed"  # written by the reactor: executions kept failing (execution.reason)


class Channel(StrEnum):
    EMAIL = "email"
    SMS = "sms"


@dataclass(frozen=True)
class EmailContent:
    subject: str
    html: str | None
    text: str | None


@dataclass(frozen=True)
class SmsContent:
    body: str
    send_hours: LocalHours | None = None  # the campaign's own quiet hours (else the default)


@dataclass(frozen=True)
class Execution:
    owner: str | None = None
    epoch: int = 0
    lease_until: dt.datetime | None = None
    sends_done: bool = False
    failures: int = 0  # executions that failed in a row
    failed: bool = False  # the current epoch ended by failing (its lease released for a retry)

    def lease_expired(self, now: dt.datetime) -> bool:
        """Released leases carry `leaseUntil` = the release time (or a retry back-off)."""
        return self.lease_until is None or self.lease_until <= now


@dataclass(frozen=True)
class Campaign:
    id: Any  # the document's _id as stored (ObjectId or other)
    name: str
    status: Status
    start_at: dt.datetime
    end_at: dt.datetime
    channels: frozenset[Channel]
    email: EmailContent | None
    sms: SmsContent | None
    targets: tuple[Any, ...]
    execution: Execution = field(default_factory=Execution)
    segment: Segment | None = None  # the audience, when it is not `targets`
    split: Split | None = None  # A/B variants and their test (domain.splits)
    tracking: str | None = None  # off | clicks | opens_and_clicks: narrows TRACKING

    @property
    def key(self) -> str:
        return str(self.id)


def utc(value: Any) -> dt.datetime | None:
    """A BSON date as an aware UTC datetime (naive ones are UTC, as the driver gives them);
    None for anything that is not a date."""
    if not isinstance(value, dt.datetime):
        return None
    return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)


def as_utc(value: Any, name: str) -> dt.datetime:
    if not isinstance(value, dt.datetime):
        raise InvalidCampaign(
            f"bad_{name}", f"{name} must be a BSON date, got {type(value).__name__}"
        )
    aware = utc(value)
    assert aware is not None
    return aware


def control_characters(text: str) -> list[str]:
    """The control characters in `text` (tab allowed), as U+XXXX: a header cannot carry them, and
    some (\x0b, \x0c, \x1c-\x1e, U+2028) are line breaks to Python's email package."""
    found = {
        ch
        for ch in text
        if ch != "\t" and (unicodedata.category(ch) == "Cc" or ch in "\u2028\u2029")
    }
    return [f"U+{ord(ch):04X}" for ch in sorted(found)]


def target_problem(value: Any) -> str | None:
    """Why `value` cannot be a customer id (None when it can): ids are strings, integers,
    integral doubles or ObjectIds, as a Node backend writes them."""
    if isinstance(value, bool) or not isinstance(value, str | int | float | ObjectId):
        return f"customer ids must be strings, numbers or ObjectIds, got {value!r}"
    if isinstance(value, float) and not value.is_integer():
        return f"customer ids must be whole numbers, got {value!r}"
    return None


def _opt_str(doc: dict[str, Any], key: str, where: str) -> str | None:
    value = doc.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidCampaign("bad_content", f"{where}.{key} must be a string")
    return value


def parse_execution(raw: Any) -> Execution:
    if not isinstance(raw, dict):
        return Execution()
    lease = raw.get("leaseUntil")
    epoch = _whole(raw.get("epoch"))
    return Execution(
        owner=raw.get("owner") if isinstance(raw.get("owner"), str) else None,
        epoch=epoch,
        lease_until=as_utc(lease, "leaseUntil") if isinstance(lease, dt.datetime) else None,
        sends_done=bool(raw.get("sendsDone")),
        failures=_whole(raw.get("failures")),
        failed=epoch > 0 and _whole(raw.get("failedEpoch")) == epoch,
    )


def _whole(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def parse_status(doc: dict[str, Any]) -> Status:
    raw = doc.get("status")
    try:
        if not isinstance(raw, str):
            raise ValueError(raw)
        return Status(raw)
    except ValueError:
        raise InvalidCampaign("bad_status", f"unknown status {raw!r}") from None


def parse_campaign(doc: dict[str, Any]) -> Campaign:
    """Validate a campaign document; raises InvalidCampaign naming the first problem."""
    if "_id" not in doc:
        raise InvalidCampaign("bad_document", "document has no _id")
    status = parse_status(doc)
    name = doc.get("name")
    if not isinstance(name, str) or not name.strip():
        raise InvalidCampaign("bad_name", "name must be a non-empty string")
    start_at, end_at = _window(doc)
    email = _parse_email(doc.get("email"))
    sms = _parse_sms(doc.get("sms"))
    channels = _channels(doc.get("channels"), email, sms)
    targets = _targets(doc.get("targetedCustomerIds", []))
    segment = parse_segment(doc.get("segment"))
    if segment is not None and targets:
        raise InvalidCampaign(
            "bad_segment", "a campaign names its audience by targetedCustomerIds or by segment"
        )
    # A/B split: its variants' content is checked as the campaign's own (domain.variants).
    from .variants import parse_campaign_split

    split = parse_campaign_split(doc, channels)
    return Campaign(
        id=doc["_id"],
        name=name,
        status=status,
        start_at=start_at,
        end_at=end_at,
        channels=channels,
        email=email,
        sms=sms,
        targets=tuple(targets),
        execution=parse_execution(doc.get("execution")),
        segment=segment,
        split=split,
        tracking=doc["tracking"] if isinstance(doc.get("tracking"), str) else None,
    )


def _window(doc: dict[str, Any]) -> tuple[dt.datetime, dt.datetime]:
    if "startDate" not in doc:
        raise InvalidCampaign("bad_startDate", "startDate is missing")
    if "endDate" not in doc:
        raise InvalidCampaign("bad_endDate", "endDate is missing")
    start_at = as_utc(doc["startDate"], "startDate")
    end_at = as_utc(doc["endDate"], "endDate")
    if end_at <= start_at:
        raise InvalidCampaign("bad_window", "endDate must be after startDate")
    return start_at, end_at


def _channels(
    raw_channels: Any, email: EmailContent | None, sms: SmsContent | None
) -> frozenset[Channel]:
    if raw_channels is None or raw_channels == []:
        # Absent, or [] (how Mongoose stores an array nobody set): every channel with content.
        channels = frozenset(
            c for c, content in ((Channel.EMAIL, email), (Channel.SMS, sms)) if content
        )
    else:
        if not isinstance(raw_channels, list):
            raise InvalidCampaign("bad_channels", "channels must be a list")
        try:
            channels = frozenset(Channel(c) for c in raw_channels)
        except ValueError:
            raise InvalidCampaign("bad_channels", f"unknown channel in {raw_channels!r}") from None
    if not channels:
        raise InvalidCampaign("bad_channels", "no channel with content to send")
    if Channel.EMAIL in channels and email is None:
        raise InvalidCampaign("bad_content", "email channel selected but email content is missing")
    if Channel.SMS in channels and sms is None:
        raise InvalidCampaign("bad_content", "sms channel selected but sms content is missing")
    return channels


def _targets(targets: Any) -> list[Any]:
    if not isinstance(targets, list):
        raise InvalidCampaign("bad_targets", "targetedCustomerIds must be a list")
    if len(targets) > MAX_TARGETS:
        raise InvalidCampaign("bad_targets", f"more than {MAX_TARGETS} targeted customers")
    for value in targets:
        problem = target_problem(value)
        if problem:
            raise InvalidCampaign("bad_targets", problem)
    return targets


def _parse_email(raw: Any) -> EmailContent | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise InvalidCampaign("bad_content", "email must be a document")
    subject = _opt_str(raw, "subject", "email")
    html = _opt_str(raw, "html", "email")
    text = _opt_str(raw, "text", "email")
    if not subject or not subject.strip():
        raise InvalidCampaign("bad_content", "email.subject is missing or empty")
    if len(subject) > MAX_SUBJECT_CHARS:
        raise InvalidCampaign("bad_content", f"email.subject is longer than {MAX_SUBJECT_CHARS}")
    if "\r" in subject or "\n" in subject:
        raise InvalidCampaign("bad_content", "email.subject contains a line break")
    bad = control_characters(subject)
    if bad:
        raise InvalidCampaign(
            "bad_content", f"email.subject contains control characters ({', '.join(bad)})"
        )
    if not (html and html.strip()) and not (text and text.strip()):
        raise InvalidCampaign("bad_content", "email has neither html nor text body")
    for label, body in (("html", html), ("text", text)):
        if body and len(body.encode()) > MAX_EMAIL_BODY_BYTES:
            raise InvalidCampaign(
                "bad_content", f"email.{label} is larger than {MAX_EMAIL_BODY_BYTES} bytes"
            )
    return EmailContent(subject=subject, html=html or None, text=text or None)


def _parse_sms(raw: Any) -> SmsContent | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise InvalidCampaign("bad_content", "sms must be a document")
    body = _opt_str(raw, "body", "sms")
    if not body or not body.strip():
        raise InvalidCampaign("bad_content", "sms.body is missing or empty")
    if len(body) > MAX_SMS_CHARS:
        raise InvalidCampaign("bad_content", f"sms.body is longer than {MAX_SMS_CHARS} characters")
    hours_text = _opt_str(raw, "sendHours", "sms")
    hours = None
    if hours_text:
        try:
            hours = parse_hours(hours_text)
        except ValueError as exc:
            raise InvalidCampaign("bad_content", f"sms.sendHours {exc}") from None
    return SmsContent(body=body, send_hours=hours)
