"""Consent: who may not be sent to, and the signed links that let recipients say so.

A suppression is keyed by what it names (a customer id, an email address or a phone number) and
the channel it covers (`email`, `sms` or `all`); its id is that key, so a send checks it with a
lookup by id. Addresses are compared lower-cased (email) or in E.164 (phone): the same forms the
send path validates to.

Nothing weakens consent by accident: an entry holds one *claim* per thing that
said "do not send" (a link's unsubscribe, a complaint, a hard bounce, a STOP, an operator, an
import), each with its reason and time. Adding a claim never replaces another; the entry's
reason is its strongest claim's (`rank`: complaint > hard bounce > STOP > operator > unsubscribe,
and for one reason an operator's or an import's outranks a link's). Lifting takes away only the
claims a rule names (a link's undo: that link's own; a START: STOPs older than itself); the
entry is gone only when no claim is left.

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
from typing import Any

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


_STRENGTH = {
    Reason.UNSUBSCRIBED: 1,
    Reason.MANUAL: 2,
    Reason.SMS_STOP: 3,
    Reason.HARD_BOUNCE: 4,
    Reason.COMPLAINT: 5,
}
LINK_PREFIX = "link:"


def rank(reason: str, source: str) -> int:
    """How strong a claim is: by reason, and for one reason a link's below anyone else's."""
    try:
        strength = _STRENGTH[Reason(reason)]
    except ValueError:
        strength = _STRENGTH[Reason.MANUAL]  # a reason this version does not know: an operator's
    return 2 * strength + (0 if source.startswith(LINK_PREFIX) else 1)


def link_claim(campaign: str, channel: str) -> str:
    """The claim a link's unsubscribe makes: its campaign and its channel, so that only an undo
    through a link of the same campaign and channel lifts it."""
    return f"{LINK_PREFIX}{campaign}:{channel}"


def default_claim(reason: str, source: str) -> str:
    """The claim of an entry made by anyone but a link (and of entries written before claims:
    their one reason and source)."""
    return f"{reason}:{source}"


@dataclass(frozen=True)
class Suppression:
    kind: Kind
    value: str
    channel: str  # email | sms | all
    reason: Reason
    source: str  # who said so: "link:<campaign>", "cli", "import", a provider
    campaign: str | None = None
    note: str | None = None
    claim: str | None = None  # default: reason:source (see `default_claim`)

    def __post_init__(self) -> None:
        if self.channel not in CHANNEL_SCOPES:
            raise ValueError(f"channel must be one of {', '.join(CHANNEL_SCOPES)}")
        if not self.value.strip():
            raise ValueError("a suppression needs a value")

    @property
    def id(self) -> str:
        return suppression_id(self.kind, self.value, self.channel)

    @property
    def claim_key(self) -> str:
        return self.claim or default_claim(self.reason.value, self.source)

    @property
    def rank(self) -> int:
        return rank(self.reason.value, self.source)


def legacy_claim(doc: Mapping[str, Any]) -> dict[str, Any]:
    """The one claim of an entry written before entries had claims."""
    reason = str(doc.get("reason") or Reason.MANUAL.value)
    source = str(doc.get("source") or "legacy")
    claim: dict[str, Any] = {
        "key": default_claim(reason, source),
        "reason": reason,
        "rank": rank(reason, source),
        "source": source,
        "at": doc.get("createdAt"),
    }
    for name in ("campaign", "note"):
        if doc.get(name) is not None:
            claim[name] = doc[name]
    return claim


def claims_of(doc: Mapping[str, Any]) -> list[dict[str, Any]]:
    """An entry's claims, whichever version wrote it."""
    claims = doc.get("claims")
    if isinstance(claims, list):
        return [c for c in claims if isinstance(c, dict)]
    return [legacy_claim(doc)] if doc.get("reason") is not None else []


def strongest(claims: Sequence[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    """The claim that decides an entry's reason: the highest rank, the earliest on a tie."""
    best: Mapping[str, Any] | None = None
    for c in claims:
        if best is None or int(c.get("rank", 0)) > int(best.get("rank", 0)):
            best = c
    return best


@dataclass(frozen=True)
class Lift:
    """Which claims a lift takes away: those whose key is in `keys`, or whose reason is in
    `reasons` with a source `sources` admits (a prefix match) and a time before `before`.
    `legacy_keys` are lifted only from entries of `legacy_channel` (entries written before
    claims did not record which link's channel made them)."""

    keys: frozenset[str] = frozenset()
    reasons: frozenset[str] = frozenset()
    sources: tuple[str, ...] = ()
    before: dt.datetime | None = None
    legacy_keys: frozenset[str] = frozenset()
    legacy_channel: str | None = None
    keys_since: dt.datetime | None = None  # `keys` and `legacy_keys` made at or after this only

    def lifts(self, entry_channel: str, claim: Mapping[str, Any]) -> bool:
        key = str(claim.get("key", ""))
        by_key = key in self.keys or (
            key in self.legacy_keys and entry_channel == self.legacy_channel
        )
        if by_key:
            return self.keys_since is None or not _before(claim.get("at"), self.keys_since)
        if str(claim.get("reason")) not in self.reasons:
            return False
        if not str(claim.get("source", "")).startswith(self.sources):
            return False
        return self.before is None or _before(claim.get("at"), self.before)


def _before(at: object, instant: dt.datetime) -> bool:
    """Whether a claim's time is before `instant` (a claim without a time is not)."""
    if not isinstance(at, dt.datetime):
        return False
    if at.tzinfo is None:
        at = at.replace(tzinfo=dt.UTC)
    return at < instant


def undo_lift(campaign: str, channel: str, *, since: dt.datetime | None = None) -> Lift:
    """What an undo through a link of (campaign, channel) lifts: that link's own unsubscribes,
    and with `since` (now - LINK_UNDO_WINDOW_SECONDS) only those made since then."""
    return Lift(
        keys=frozenset({link_claim(campaign, channel)}),
        legacy_keys=frozenset({default_claim(Reason.UNSUBSCRIBED.value, LINK_PREFIX + campaign)}),
        legacy_channel=channel,
        keys_since=since,
    )


# Sources whose STOPs a recipient's START lifts: their own replies and Twilio's 21610 refusals
# (a STOP Twilio holds); never an operator's or an imported STOP.
START_LIFTS_SOURCES = ("twilio", "send:")


def start_lift(at: dt.datetime) -> Lift:
    """What an inbound START received at `at` lifts: STOPs from replies older than itself."""
    return Lift(reasons=frozenset({Reason.SMS_STOP.value}), sources=START_LIFTS_SOURCES, before=at)


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


def _unb64_strict(text: str) -> bytes:
    """base64url without padding, in its one spelling: a length that no encoding has, or
    trailing bits that are not zero (other spellings of the same bytes), is refused."""
    if len(text) % 4 == 1:
        raise ValueError("not base64url")
    data = _unb64(text)
    if _b64(data) != text:
        raise ValueError("not the canonical base64url of its bytes")
    return data


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
            given = _unb64_strict(signature)
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
        if len(secret.encode()) < MIN_SECRET_BYTES:
            raise ValueError(f"old key {key_id!r}: its secret must be at least 32 bytes")
        if any(k.key_id == key_id for k in keys):
            raise ValueError(f"old key {key_id!r} is listed twice")
        keys.append(LinkKey(key_id, secret.encode(), retired_at.astimezone(dt.UTC)))
    return keys


MIN_SECRET_BYTES = 32


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
