"""Recipients' addresses, validated before anything is sent: email addresses through
email-validator (normalised), phone numbers through phonenumbers (to E.164). An address that
fails gets the reason its ledger row is `skipped` with."""

from __future__ import annotations

import phonenumbers
from email_validator import EmailNotValidError, validate_email


def email_address(raw: str | None) -> tuple[str | None, str]:
    """(normalised address, "") or (None, reason)."""
    if not raw:
        return None, "missing_email"
    try:
        info = validate_email(raw, check_deliverability=False)
    except EmailNotValidError:
        return None, "invalid_email"
    return info.normalized, ""


def phone_address(raw: str | None, default_region: str) -> tuple[str | None, str]:
    """(E.164 number, "") or (None, reason); numbers without a country code are read in
    `default_region`."""
    if not raw:
        return None, "missing_phone"
    try:
        number = phonenumbers.parse(raw, default_region)
    except phonenumbers.NumberParseException:
        return None, "invalid_phone"
    if not phonenumbers.is_valid_number(number):
        return None, "invalid_phone"
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164), ""
