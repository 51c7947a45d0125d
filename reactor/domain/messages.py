"""One campaign's content rendered for one recipient: the email or SMS as a provider gets it."""

from __future__ import annotations

import unicodedata
import uuid

from ..ports import EmailMessage, Recipient, SmsMessage
from .models import Campaign
from .templates import render


def placeholder_values(recipient: Recipient) -> dict[str, str]:
    return {
        "name": recipient.name or "",
        "email": recipient.email or "",
        "phone": recipient.phone or "",
    }


def sms_message(campaign: Campaign, recipient: Recipient, to: str) -> SmsMessage:
    assert campaign.sms is not None
    return SmsMessage(to=to, body=render(campaign.sms.body, placeholder_values(recipient)))


def email_message(
    campaign: Campaign, recipient: Recipient, to: str, *, message_domain: str
) -> EmailMessage:
    assert campaign.email is not None
    values = placeholder_values(recipient)
    header_values = {k: header_text(v) for k, v in values.items()}
    content = campaign.email
    return EmailMessage(
        to=to,
        subject=render(content.subject, header_values),
        text=render(content.text, values) if content.text else None,
        html=render(content.html, values, escape_html=True) if content.html else None,
        message_id=message_id(message_domain),
    )


def header_text(value: str) -> str:
    """A customer's data made safe for a header: no line breaks or other control characters
    (whatever a name contains), runs of white space folded to one space."""
    cleaned = "".join(" " if unicodedata.category(ch) == "Cc" else ch for ch in value)
    return " ".join(cleaned.split())


def message_id(domain: str) -> str:
    """A Message-ID that reveals nothing internal (no campaign id, host or process): a random
    token at the sender's own domain."""
    return f"<{uuid.uuid4().hex}@{domain}>"
