"""The notification events: their types, their payloads and the key each is stored under.

A payload is the Standard Webhooks shape `{type, timestamp, data}`; `data.schemaVersion` says
which version of the type's data it is (additive changes keep the version, anything else bumps
it). Payloads carry counts, names and reasons, never a customer's address or phone: error texts
from providers are scrubbed of anything that looks like one (`scrub`).

An event's key is derived from the state change it reports (the campaign, its epoch or the
change's cluster time, the type), so every replica that reports the same change derives the same
key, and the outbox's unique `_id` keeps one. The `webhook-id` receivers deduplicate by is a hash
of the key: the same across retries, replicas and destinations.

`schema()` is the JSON Schema of every payload; `reactor/notify/schema.json` is that schema as
published (a test keeps the two equal).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

SCHEMA_VERSION = 1

CAMPAIGN_STARTED = "campaign.started"
CAMPAIGN_COMPLETED = "campaign.completed"
CAMPAIGN_COMPLETED_SHORT = "campaign.completed_short"
CAMPAIGN_MISSED = "campaign.missed"
CAMPAIGN_START_LATE = "campaign.start_late"
CAMPAIGN_FAILED = "campaign.failed"
CAMPAIGN_PAUSED = "campaign.paused"
CAMPAIGN_RESUMED = "campaign.resumed"
CAMPAIGN_AB_DECIDED = "campaign.ab_decided"
CAMPAIGN_PROGRESS = "campaign.progress"
CHANNEL_PAUSED = "channel.paused"
CHANNEL_RESUMED = "channel.resumed"
FAILURE_SPIKE = "delivery.failure_spike"

_CAMPAIGN = {
    "type": "object",
    "required": ["id", "name"],
    "properties": {"id": {"type": "string"}, "name": {"type": "string"}},
}
_COUNTS = {
    "type": "object",
    "properties": {k: {"type": "integer"} for k in ("sent", "failed", "skipped", "uncertain")},
}
_OUTCOMES = {
    "type": "object",
    "properties": {"email": _COUNTS, "sms": _COUNTS},
}
_STR, _INT, _NUM, _TIME = (
    {"type": "string"},
    {"type": "integer"},
    {"type": "number"},
    {"type": "string", "format": "date-time"},
)
_NULLABLE_STR = {"type": ["string", "null"]}
_NULLABLE_INT = {"type": ["integer", "null"]}

# type -> (required data fields, their schemas); every campaign.* event also has `campaign`.
DATA_FIELDS: dict[str, dict[str, Any]] = {
    CAMPAIGN_STARTED: {
        "startDate": _TIME,
        "startedAt": _TIME,
        "latenessMs": _INT,
        "audienceSize": _NULLABLE_INT,
        "owner": _NULLABLE_STR,
        "epoch": _INT,
    },
    CAMPAIGN_COMPLETED: {
        "startedAt": {"type": ["string", "null"], "format": "date-time"},
        "finishedAt": _TIME,
        "durationSeconds": {"type": ["number", "null"]},
        "outcomes": _OUTCOMES,
    },
    CAMPAIGN_COMPLETED_SHORT: {
        "startedAt": {"type": ["string", "null"], "format": "date-time"},
        "finishedAt": _TIME,
        "durationSeconds": {"type": ["number", "null"]},
        "outcomes": _OUTCOMES,
        "notSent": _INT,
        "reason": _STR,
    },
    CAMPAIGN_MISSED: {"startDate": _TIME, "reason": _STR},
    CAMPAIGN_START_LATE: {"startDate": _TIME, "lateBySeconds": _NUM, "reason": _STR},
    CAMPAIGN_FAILED: {"error": _STR, "failures": _INT},
    CAMPAIGN_PAUSED: {"by": {"enum": ["operator", "complaint_rate", "reactor"]}, "reason": _STR},
    CAMPAIGN_RESUMED: {"by": {"enum": ["operator"]}},
    CAMPAIGN_AB_DECIDED: {},
    CAMPAIGN_PROGRESS: {"percent": _INT, "processed": _INT, "audienceSize": _INT},
    CHANNEL_PAUSED: {"channel": _STR, "kind": _STR, "error": _STR, "instance": _STR},
    CHANNEL_RESUMED: {"channel": _STR, "instance": _STR},
    FAILURE_SPIKE: {
        "channel": _STR,
        "failed": _INT,
        "attempted": _INT,
        "share": _NUM,
        "threshold": _NUM,
        "windowSeconds": _INT,
    },
}
EVENT_TYPES = tuple(DATA_FIELDS)
# Optional fields some events carry.
OPTIONAL_FIELDS: dict[str, dict[str, Any]] = {
    CAMPAIGN_PAUSED: {"rate": _NUM},
}


def schema() -> dict[str, Any]:
    """The JSON Schema (2020-12) of every notification payload."""
    variants = []
    for event_type, fields in DATA_FIELDS.items():
        required = ["schemaVersion", *fields]
        props: dict[str, Any] = {"schemaVersion": {"const": SCHEMA_VERSION}}
        if event_type.startswith("campaign."):
            required.insert(1, "campaign")
            props["campaign"] = _CAMPAIGN
        props.update(fields)
        props.update(OPTIONAL_FIELDS.get(event_type, {}))
        variants.append(
            {
                "if": {"properties": {"type": {"const": event_type}}},
                "then": {
                    "properties": {
                        "data": {"type": "object", "required": required, "properties": props}
                    }
                },
            }
        )
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "https://campaign-reactor.dev/schemas/notification-v1.json",
        "title": "Campaign Reactor notification",
        "type": "object",
        "required": ["type", "timestamp", "data"],
        "properties": {
            "type": {"enum": list(EVENT_TYPES)},
            "timestamp": _TIME,
            "data": {"type": "object"},
        },
        "allOf": variants,
    }


@dataclass(frozen=True)
class Event:
    """One event as the outbox stores it: `key` is its unique `_id`."""

    key: str
    type: str
    campaign: str  # the campaign's id as a string, or "" for channel-wide events
    at: dt.datetime
    data: Mapping[str, Any] = field(default_factory=dict)

    @property
    def webhook_id(self) -> str:
        return webhook_id(self.key)

    def payload(self) -> dict[str, Any]:
        """The `{type, timestamp, data}` body every destination is sent."""
        return {"type": self.type, "timestamp": iso(self.at), "data": dict(self.data)}


def webhook_id(key: str) -> str:
    """The stable `webhook-id` of the event stored under `key`."""
    return "msg_" + hashlib.sha256(key.encode()).hexdigest()[:32]


def event_key(event_type: str, campaign: str, *parts: Any) -> str:
    """`type:campaign:parts…`: what makes one state change's event unique."""
    return ":".join([event_type, campaign, *(str(p) for p in parts)])


def iso(at: dt.datetime) -> str:
    """An aware time as RFC 3339 in UTC with milliseconds."""
    return at.astimezone(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def base_data(campaign_id: str, name: Any) -> dict[str, Any]:
    return {
        "schemaVersion": SCHEMA_VERSION,
        "campaign": {"id": campaign_id, "name": scrub(str(name or campaign_id))[:200]},
    }


_EMAIL = re.compile(r"[^\s<>@\"']+@[^\s<>@\"']+\.[A-Za-z]{2,}")
_PHONE = re.compile(r"\+?\d[\d\s().-]{6,}\d")


def scrub(text: str) -> str:
    """`text` with anything that looks like an email address or a phone number removed: errors
    from providers may quote the recipient, and payloads carry no customer data."""
    return _PHONE.sub("[number]", _EMAIL.sub("[address]", text))


def outcomes(performance: Mapping[str, Any]) -> dict[str, dict[str, int]]:
    """Per-channel counts from a campaign's `performance`."""

    def count(name: str) -> int:
        value = performance.get(name)
        return int(value) if isinstance(value, int | float) else 0

    return {
        "email": {
            "sent": count("emailsSent"),
            "failed": count("emailsFailed"),
            "skipped": count("emailsSkipped"),
        },
        "sms": {
            "sent": count("smsSent"),
            "failed": count("smsFailed"),
            "skipped": count("smsSkipped"),
        },
    }


def slack_text(payload: Mapping[str, Any]) -> str:
    """A readable line (with the figures) for a Slack-compatible incoming webhook."""
    data = payload.get("data") or {}
    name = (data.get("campaign") or {}).get("name", "")
    kind = str(payload.get("type"))
    what = {
        CAMPAIGN_STARTED: lambda: (
            f"▶️ Campaign *{name}* started ({data.get('audienceSize')} targeted, "
            f"{data.get('latenessMs', 0) / 1000:.1f}s after its start date)"
        ),
        CAMPAIGN_COMPLETED: lambda: f"✅ Campaign *{name}* completed: {_figures(data)}",
        CAMPAIGN_COMPLETED_SHORT: lambda: (
            f"⚠️ Campaign *{name}* completed short: {data.get('notSent')} not sent "
            f"({data.get('reason')}); {_figures(data)}"
        ),
        CAMPAIGN_MISSED: lambda: f"⏭ Campaign *{name}* was missed: {data.get('reason')}",
        CAMPAIGN_START_LATE: lambda: (
            f"⏰ Campaign *{name}* is approved and due but has not started "
            f"({data.get('lateBySeconds', 0):.0f}s after its start date)"
        ),
        CAMPAIGN_FAILED: lambda: f"✖ Campaign *{name}* failed: {data.get('error')}",
        CAMPAIGN_PAUSED: lambda: (
            f"⏸ Campaign *{name}* paused ({data.get('by')}): {data.get('reason')}"
        ),
        CAMPAIGN_RESUMED: lambda: f"▶️ Campaign *{name}* resumed by an operator",
        CHANNEL_PAUSED: lambda: (
            f"⛔ {data.get('channel')} sending paused on "
            f"{data.get('instance')}: {data.get('kind')} ({data.get('error')})"
        ),
        CHANNEL_RESUMED: lambda: f"✅ {data.get('channel')} sending resumed",
        FAILURE_SPIKE: lambda: (
            f"📉 {data.get('channel')}: {data.get('failed')} of "
            f"{data.get('attempted')} sends failed in {data.get('windowSeconds')}s "
            f"({100 * float(data.get('share', 0)):.1f}%)"
        ),
    }.get(kind)
    return what() if what is not None else f"{kind}: {name}".strip()


def _figures(data: Mapping[str, Any]) -> str:
    parts = []
    for channel, counts in (data.get("outcomes") or {}).items():
        if any(counts.values()):
            parts.append(
                f"{channel} {counts.get('sent', 0)} sent, {counts.get('failed', 0)} failed, "
                f"{counts.get('skipped', 0)} skipped"
            )
    duration = data.get("durationSeconds")
    if isinstance(duration, int | float):
        parts.append(f"in {duration:.0f}s")
    return "; ".join(parts) or "nothing to send"
