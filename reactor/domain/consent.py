"""Consent: who may not be sent to, and the signed links that let recipients say so.

A suppression is keyed by what it names (a customer id, an email address or a phone number) and
the channel it covers (`email`, `sms` or `all`); its id is that key, so adding the same one twice
is one entry and a send checks it with a lookup by id. Addresses are compared lower-cased (email)
or in E.164 (phone): the same forms the send path validates to.

A link token carries its scope (campaign, customer, channel, purpose) and when it was issued,
signed with HMAC-SHA256 under a key id, so a secret can be rotated while links signed with the
previous one keep working for a grace period. Nothing in a token is an address or a number, and
nothing in it is trusted before the signature checks out.

    v1.<key id>.<payload, base64url JSON>.<signature, base64url>
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import hmac
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum

from .models import Channel


class Reason(StrEnum):
    UNSUBSCRIBED = "unsubscribed"
    HARD_BOUNCE = "hard_bounce"
    COMPLAINT = "complaint"
    SMS_STOP = "sms_stop"
    MANUAL = "manual"


class Kind(StrEnum):
    CUSTOMER = "customer"
    EMAIL = "email"
    PHONE = "phone"


ALL_CHANNELS = "all"
CHANNEL_SCOPES = (Channel.EMAIL.value, Channel.SMS.value, ALL_CHANNELS)


def normalise_value(kind: Kind | str, value: str) -> str:
    value = value.strip()
    return value.lower() if Kind(kind) is Kind.EMAIL else value


def suppression_id(kind: Kind | str, value: str, channel: str) -> str:
    return f"{Kind(kind).value}:{channel}:{normalise_value(kind, value)}"


@dataclass(frozen=True)
class Suppression:
    kind: Kind
    value: str
    channel: str  # email | sms | all
    reason: Reason
    source: str  # who said so: "link:<campaign>", "cli", "import", a provider
    campaign: str | None = None
    note: str | None = None

    def __post_init__(self) -> None:
        if self.channel not in CHANNEL_SCOPES:
            raise ValueError(f"channel must be one of {', '.join(CHANNEL_SCOPES)}")
        if not self.value.strip():
            raise ValueError("a suppression needs a value")

    @property
    def id(self) -> str:
        return suppression_id(self.kind, self.value, self.channel)


def candidate_ids(channel: str, customer: str, address: str | None) -> list[str]:
    """The suppression ids that would stop a send of `channel` to this customer at `address`."""
    kinds: list[tuple[Kind, str]] = [(Kind.CUSTOMER, customer)]
    if address:
        kinds.append((Kind.EMAIL if channel == Channel.EMAIL else Kind.PHONE, address))
    return [suppression_id(k, v, scope) for k, v in kinds for scope in (channel, ALL_CHANNELS)]


def skip_reason(reason: str) -> str:
    """The ledger reason of a send skipped because of a suppression."""
    return f"suppressed:{reason}"


# ---- signed links -----------------------------------------------------------------------------


class Purpose(StrEnum):
    UNSUBSCRIBE = "unsub"


class TokenError(Exception):
    """Raised when a link token is malformed, forged, altered, expired or for another use;
    `why` is a short label for metrics, never shown to the person holding the link."""

    def __init__(self, why: str) -> None:
        super().__init__(why)
        self.why = why


@dataclass(frozen=True)
class LinkKey:
    key_id: str
    secret: bytes
    retired_at: dt.datetime | None = None  # None: the current signing key


@dataclass(frozen=True)
class LinkScope:
    campaign: str
    customer: str
    channel: str
    purpose: Purpose
    issued_at: dt.datetime


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


MAX_TOKEN_CHARS = 1024
_B64URL = re.compile(r"[A-Za-z0-9_-]+")


class LinkSigner:
    """Signs with the first key; verifies with any key still in its grace period."""

    def __init__(self, keys: Sequence[LinkKey], *, ttl_s: float, rotation_grace_s: float) -> None:
        if not keys or keys[0].retired_at is not None:
            raise ValueError("the first link key is the signing key and cannot be retired")
        self._keys = {k.key_id: k for k in keys}
        self._current = keys[0]
        self.ttl_s = ttl_s
        self.rotation_grace_s = rotation_grace_s

    def sign(
        self, *, campaign: str, customer: str, channel: str, purpose: Purpose, now: dt.datetime
    ) -> str:
        payload = {
            "c": campaign,
            "u": customer,
            "ch": channel,
            "p": purpose.value,
            "t": int(now.timestamp()),
        }
        body = _b64(json.dumps(payload, separators=(",", ":")).encode())
        head = f"v1.{self._current.key_id}.{body}"
        return f"{head}.{_b64(self._mac(self._current, head))}"

    def verify(self, token: str, *, purpose: Purpose, now: dt.datetime) -> LinkScope:
        if len(token) > MAX_TOKEN_CHARS:
            raise TokenError("malformed")
        parts = token.split(".")
        if len(parts) != 4 or parts[0] != "v1":
            raise TokenError("malformed")
        _, key_id, body, signature = parts
        if not all(_B64URL.fullmatch(p) for p in parts[1:]):
            raise TokenError("malformed")
        key = self._keys.get(key_id)
        if key is None:
            raise TokenError("unknown_key")
        try:
            given = _unb64(signature)
        except (binascii.Error, ValueError):
            raise TokenError("malformed") from None
        if not hmac.compare_digest(given, self._mac(key, f"v1.{key_id}.{body}")):
            raise TokenError("bad_signature")
        try:
            payload = json.loads(_unb64(body))
            scope = LinkScope(
                campaign=str(payload["c"]),
                customer=str(payload["u"]),
                channel=str(payload["ch"]),
                purpose=Purpose(payload["p"]),
                issued_at=dt.datetime.fromtimestamp(int(payload["t"]), dt.UTC),
            )
        except (ValueError, KeyError, TypeError):
            raise TokenError("malformed") from None
        if scope.purpose is not purpose:
            raise TokenError("wrong_purpose")
        if scope.channel not in (Channel.EMAIL, Channel.SMS):
            raise TokenError("malformed")
        age_s = (now - scope.issued_at).total_seconds()
        if age_s > self.ttl_s or age_s < -300:  # 5 minutes of clock skew between replicas
            raise TokenError("expired")
        if key.retired_at is not None:
            # A retired key vouches only for links it signed before it was retired, and only
            # for the grace period after.
            if scope.issued_at > key.retired_at:
                raise TokenError("bad_signature")
            if (now - key.retired_at).total_seconds() > self.rotation_grace_s:
                raise TokenError("key_retired")
        return scope

    @staticmethod
    def _mac(key: LinkKey, text: str) -> bytes:
        return hmac.new(key.secret, text.encode("ascii"), hashlib.sha256).digest()


def parse_old_keys(text: str) -> list[LinkKey]:
    """`LINK_OLD_KEYS`: `id=secret@retired-at[,id=secret@retired-at...]`, with `retired-at` an
    ISO 8601 UTC instant (when the key stopped signing)."""
    keys: list[LinkKey] = []
    for entry in (e.strip() for e in text.split(",")):
        if not entry:
            continue
        key_id, sep, rest = entry.partition("=")
        secret, at_sep, retired = rest.rpartition("@")
        if not sep or not at_sep or not key_id or not secret:
            # Never echo the entry: it holds a secret.
            raise ValueError("each old key is id=secret@retired-at (ISO 8601, UTC)")
        try:
            retired_at = dt.datetime.fromisoformat(retired.replace("Z", "+00:00"))
        except ValueError:
            raise ValueError(f"old key {key_id!r}: retired-at is not ISO 8601") from None
        if retired_at.tzinfo is None:
            raise ValueError(f"old key {key_id!r}: retired-at needs a time zone (use Z)")
        keys.append(LinkKey(key_id, secret.encode(), retired_at.astimezone(dt.UTC)))
    return keys


def reasons_by_customer(
    wanted: Mapping[str, Iterable[str]], found: Mapping[str, str]
) -> dict[str, str]:
    """{customer: reason} for the customers one of whose candidate ids is suppressed."""
    out: dict[str, str] = {}
    for customer, ids in wanted.items():
        for i in ids:
            if i in found:
                out[customer] = found[i]
                break
    return out


@dataclass(frozen=True)
class Links:
    """The links a message carries: where the public listener is, how tokens are signed, and
    what the footer says."""

    base_url: str  # PUBLIC_BASE_URL, no trailing slash
    signer: LinkSigner
    mailto: str | None = None  # UNSUBSCRIBE_MAILTO: an address that takes unsubscribe mail
    postal_address: str | None = None  # the sender's postal address (CAN-SPAM)

    def unsubscribe_token(
        self, campaign: str, customer: str, channel: str, now: dt.datetime
    ) -> str:
        return self.signer.sign(
            campaign=campaign,
            customer=customer,
            channel=channel,
            purpose=Purpose.UNSUBSCRIBE,
            now=now,
        )

    def unsubscribe_url(self, token: str) -> str:
        return f"{self.base_url}/u/{token}"

    @property
    def twilio_status_url(self) -> str:
        """Where Twilio posts each message's delivery status (its StatusCallback)."""
        return f"{self.base_url}/webhooks/twilio/status"

    def twilio_status_url_for(self, delivery: str) -> str:
        """The StatusCallback of one message: it names the ledger row, so a receipt is written
        by the row's key (Twilio signs the whole URL, query included, so the name is as
        trustworthy as the rest of the callback)."""
        return f"{self.twilio_status_url}?d={_b64(delivery.encode('utf-8'))}"

    def list_unsubscribe(self, token: str) -> tuple[tuple[str, str], ...]:
        """RFC 2369's List-Unsubscribe (the HTTPS link first, then a mailto) and RFC 8058's
        List-Unsubscribe-Post; the MTA's DKIM signature must cover both."""
        targets = [f"<{self.unsubscribe_url(token)}>"]
        if self.mailto:
            targets.append(f"<mailto:{self.mailto}?subject=unsubscribe%20{token}>")
        return (
            ("List-Unsubscribe", ", ".join(targets)),
            ("List-Unsubscribe-Post", "List-Unsubscribe=One-Click"),
        )


def callback_delivery(value: str | None) -> str | None:
    """The ledger row a StatusCallback's `d` names (base64url, so that no client or proxy
    re-encodes it and breaks Twilio's signature over the URL)."""
    if not value or len(value) > 1024 or not _B64URL.fullmatch(value):
        return None
    try:
        return _unb64(value).decode("utf-8")
    except (binascii.Error, ValueError):
        return None
