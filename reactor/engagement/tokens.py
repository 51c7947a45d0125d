"""Tracking tokens: what a tracked link or the open pixel names, signed.

Signed with the same keys as the unsubscribe links (`LINK_SECRET`, `LINK_OLD_KEYS`: rotation
works the same way), under a key derived for this purpose alone, so a tracking token can never
pass for an unsubscribe token or the other way round. Compact and binary, because an email has
a token per link:

    <key id>.<base64url: payload | HMAC-SHA256(payload)[:12]>

    payload   1 byte   version (1) << 4 | kind (0 click, 1 open) << 1 | channel (0 email, 1 sms)
              4 bytes  when the message was made (Unix seconds): a cheap delivery time
              campaign 0x00 + 12 bytes (an ObjectId's hex) | 0x01 + length + UTF-8
              customer length + UTF-8
              2 bytes  link number (0xFFFF: the hidden honeypot link), last: a message's
                       links share the keyed hash of everything before it

96 bits of MAC: forging one is a brute force of 2^96 guesses. An SMS cannot afford that many
characters, so its links are short codes instead: 12 base64url characters (72 bits) derived by
HMAC from (campaign, customer, link), looked up in `short_links`, and their misses rate-limited
per client network (see reactor/public/tracking.py).
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import hmac
import re
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ..domain.consent import LinkKey, TokenError
from ..domain.engagement import HitKind
from ..domain.models import Channel

VERSION = 1
MAC_BYTES = 12
SHORT_CODE_CHARS = 12
# The longest payload: flags and time, a 255-byte campaign and customer with their lengths, the
# link, the MAC; in base64url without padding. (The tracker sends longer ids untracked.)
_MAX_BODY = -(-(5 + 2 + 255 + 1 + 255 + 2 + MAC_BYTES) * 4 // 3)
MAX_TOKEN_CHARS = 16 + 1 + _MAX_BODY
_TOKEN = re.compile(rf"([A-Za-z0-9_-]{{1,16}})\.([A-Za-z0-9_-]{{16,{_MAX_BODY}}})")
_CODE = re.compile(rf"[A-Za-z0-9_-]{{{SHORT_CODE_CHARS}}}")
_HEX24 = re.compile(r"[0-9a-f]{24}")


@dataclass(frozen=True)
class TrackScope:
    campaign: str
    channel: Channel
    customer: str
    kind: HitKind
    link: int  # 0 for an open
    issued_at: dt.datetime


_URLSAFE = bytes.maketrans(b"+/", b"-_")


def _b64(data: bytes) -> str:
    """base64url without padding (what `urlsafe_b64encode(...).rstrip(b"=")` gives), in two C
    calls: an email signs a token per link, so this runs ten times a message."""
    return binascii.b2a_base64(data, newline=False).translate(_URLSAFE, b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _derive(secret: bytes, purpose: bytes) -> bytes:
    return hmac.new(secret, b"reactor-" + purpose, hashlib.sha256).digest()


_BLOCK = hashlib.sha256().block_size
_IPAD = bytes(b ^ 0x36 for b in range(256))
_OPAD = bytes(b ^ 0x5C for b in range(256))
Pads = tuple[Any, Any]  # (inner, outer) hashlib SHA-256 states


def _pads(key: bytes, prefix: bytes) -> Pads:
    """HMAC-SHA256 (RFC 2104) keyed with `key`, as its two hash states: key ^ ipad with
    `prefix` absorbed, and key ^ opad. Copying them costs two C calls where a Python `hmac`
    object costs a dozen (an email signs ten tokens)."""
    if len(key) > _BLOCK:
        key = hashlib.sha256(key).digest()
    key = key.ljust(_BLOCK, b"\0")
    inner = hashlib.sha256(key.translate(_IPAD))
    inner.update(prefix)
    return inner, hashlib.sha256(key.translate(_OPAD))


def _mac(pads: Pads, message: bytes) -> bytes:
    """The (truncated) HMAC of the prefix and everything the inner state holds, then `message`."""
    inner, outer = pads
    mac = inner.copy()
    mac.update(message)
    out = outer.copy()
    out.update(mac.digest())
    digest: bytes = out.digest()
    return digest[:MAC_BYTES]


_SMALL = 1024  # link numbers whose 2-byte field is made once (a table holds at most 500)
_TAILS = [n.to_bytes(2, "big") for n in range(_SMALL)]


def is_short_code(text: str) -> bool:
    return bool(_CODE.fullmatch(text))


class TrackingSigner:
    """Signs with the first key; verifies with any key still in its grace period (as
    `LinkSigner` does for unsubscribe links)."""

    def __init__(self, keys: Sequence[LinkKey], *, ttl_s: float, rotation_grace_s: float) -> None:
        if not keys or keys[0].retired_at is not None:
            raise ValueError("the first link key is the signing key and cannot be retired")
        self._keys = {k.key_id: (k, _derive(k.secret, b"track-v1")) for k in keys}
        # Each key's HMAC with its "<key id>." prefix already absorbed: signing or checking
        # copies the states (one hash of the payload) instead of keying a new HMAC.
        self._pads = {
            key_id: _pads(derived, key_id.encode() + b".")
            for key_id, (_, derived) in self._keys.items()
        }
        self._current = keys[0]
        self._short_mac = hmac.new(_derive(keys[0].secret, b"short-v1"), digestmod=hashlib.sha256)
        self.ttl_s = ttl_s
        self.rotation_grace_s = rotation_grace_s

    def sign(
        self,
        *,
        campaign: str,
        channel: Channel,
        customer: str,
        kind: HitKind,
        link: int,
        issued_at: dt.datetime,
    ) -> str:
        return self.signer_for(
            campaign=campaign, channel=channel, customer=customer, kind=kind, issued_at=issued_at
        )(link)

    def signer_for(
        self,
        *,
        campaign: str,
        channel: Channel,
        customer: str,
        kind: HitKind,
        issued_at: dt.datetime,
    ) -> Callable[[int], str]:
        """Tokens for one message's links: everything but the link number is signed once (the
        link is the payload's last field), so each link costs one copy of a keyed hash."""
        return self.batch_signer(
            campaign=campaign, channel=channel, kind=kind, issued_at=issued_at
        )(customer)

    def batch_signer(
        self, *, campaign: str, channel: Channel, kind: HitKind, issued_at: dt.datetime
    ) -> Callable[[str], Callable[[int], str]]:
        """`signer_for` for each customer of one batch: what the batch's tokens share (kind,
        channel, time, campaign: the payload's first fields) is hashed once for all of them."""
        flags = VERSION << 4 | (kind is HitKind.OPEN) << 1 | (channel is Channel.SMS)
        shared = struct.pack(">BI", flags, int(issued_at.timestamp()) & 0xFFFFFFFF)
        if _HEX24.fullmatch(campaign):
            shared += b"\x00" + bytes.fromhex(campaign)
        else:
            raw = campaign.encode()[:255]
            shared += b"\x01" + bytes([len(raw)]) + raw
        key_id = self._current.key_id
        inner, outer = self._pads[key_id]
        keyed_shared = inner.copy()
        keyed_shared.update(shared)
        prefix = f"{key_id}."

        def for_customer(customer: str) -> Callable[[int], str]:
            who = customer.encode()[:255]
            field = bytes([len(who)]) + who
            head = shared + field
            keyed = keyed_shared.copy()
            keyed.update(field)

            def token(link: int) -> str:
                tail = _TAILS[link] if link < _SMALL else link.to_bytes(2, "big")
                mac = keyed.copy()
                mac.update(tail)
                out = outer.copy()
                out.update(mac.digest())
                return prefix + _b64(head + tail + out.digest()[:MAC_BYTES])

            return token

        return for_customer

    def verify(self, token: str, *, now: dt.datetime) -> TrackScope:
        """The scope a token names; TokenError (its `why` a metric label) when it does not
        check out."""
        scope, expired = self.check(token, now=now)
        if expired:
            raise TokenError("expired")
        return scope

    def check(self, token: str, *, now: dt.datetime) -> tuple[TrackScope, bool]:
        """(scope, expired): a genuine token past its TTL is still ours (its link may still
        lead somewhere); anything else wrong raises TokenError."""
        if len(token) > MAX_TOKEN_CHARS:
            raise TokenError("malformed")
        match = _TOKEN.fullmatch(token)
        if match is None:
            raise TokenError("malformed")
        key_id, body = match.groups()
        entry = self._keys.get(key_id)
        if entry is None:
            raise TokenError("unknown_key")
        key = entry[0]
        try:
            raw = _unb64(body)
        except (binascii.Error, ValueError):
            raise TokenError("malformed") from None
        payload, given = raw[:-MAC_BYTES], raw[-MAC_BYTES:]
        if len(payload) < 9:
            raise TokenError("bad_signature")
        if not hmac.compare_digest(given, _mac(self._pads[key_id], payload)):
            raise TokenError("bad_signature")
        scope = _parse(payload)
        if key.retired_at is not None:
            if scope.issued_at > key.retired_at:
                raise TokenError("bad_signature")
            if (now - key.retired_at).total_seconds() > self.rotation_grace_s:
                raise TokenError("key_retired")
        age_s = (now - scope.issued_at).total_seconds()
        if age_s < -300:  # 5 minutes of clock skew between replicas
            raise TokenError("from_the_future")
        return scope, age_s > self.ttl_s

    def short_code(self, campaign: str, customer: str, link: int) -> str:
        """The same code for the same link of the same message (a resend reuses its row)."""
        text = f"{campaign}\x00{customer}\x00{link}".encode()
        mac = self._short_mac.copy()
        mac.update(text)
        digest = mac.digest()
        return _b64(digest)[:SHORT_CODE_CHARS]


def _parse(payload: bytes) -> TrackScope:
    """A payload whose MAC checked out: malformed only if we wrote a bad one."""
    try:
        flags, issued = struct.unpack(">BI", payload[:5])
        if flags >> 4 != VERSION:
            raise TokenError("malformed")
        rest = payload[5:]
        if rest[0] == 0:
            campaign, rest = rest[1:13].hex(), rest[13:]
        else:
            n = rest[1]
            campaign, rest = rest[2 : 2 + n].decode(), rest[2 + n :]
        n = rest[0]
        customer = rest[1 : 1 + n].decode()
        if len(rest) != 1 + n + 2:
            raise TokenError("malformed")
        link = int.from_bytes(rest[1 + n :], "big")
    except (IndexError, UnicodeDecodeError, struct.error):
        raise TokenError("malformed") from None
    return TrackScope(
        campaign=campaign,
        channel=Channel.SMS if flags & 1 else Channel.EMAIL,
        customer=customer,
        kind=HitKind.OPEN if flags & 2 else HitKind.CLICK,
        link=link,
        issued_at=dt.datetime.fromtimestamp(issued, dt.UTC),
    )
