"""What providers tell the reactor after a message left: bounces, complaints, deliveries, STOP
replies and SMS delivery receipts, in one shape whatever the provider.

    hard bounce   → the address is suppressed at once (email, reason hard_bounce)
    soft bounce   → counted per address; SOFT_BOUNCE_LIMIT of them suppress it
    complaint     → suppressed at once (email, reason complaint); the campaign's complaint rate
                    is checked against COMPLAINT_RATE_THRESHOLD
    delivered     → recorded only
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Feedback(StrEnum):
    HARD_BOUNCE = "hard_bounce"
    SOFT_BOUNCE = "soft_bounce"
    COMPLAINT = "complaint"
    DELIVERED = "delivered"


@dataclass(frozen=True)
class FeedbackEvent:
    provider: str  # ses | sendgrid | postmark | generic
    event_id: str  # the provider's id for this event (for one recipient): replays are no-ops
    kind: Feedback
    address: str
    message_id: str | None = None  # the Message-ID the reactor set, when the provider gives it
    detail: str = ""


# Twilio's opt-out and opt-in keywords (the whole reply, any case, surrounding spaces ignored).
STOP_WORDS = frozenset(
    {"STOP", "STOPALL", "UNSUBSCRIBE", "CANCEL", "END", "QUIT", "OPTOUT", "REVOKE"}
)
START_WORDS = frozenset({"START", "YES", "UNSTOP"})

# Twilio's message statuses, in the order they may follow each other: a late callback for an
# earlier status never overwrites a later one.
SMS_STATUS_RANK = {
    "accepted": 0,
    "queued": 1,
    "sending": 2,
    "sent": 3,
    "delivered": 4,
    "undelivered": 4,
    "failed": 4,
    "read": 5,
}
SMS_FINAL = frozenset({"delivered", "undelivered", "failed"})


def keyword(body: str) -> str:
    return " ".join(body.split()).upper()
