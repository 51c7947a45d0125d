"""Email over SMTP: a pool of persistent aiosmtplib connections.

Each send walks MAIL, RCPT and DATA itself so that a failure can be placed: anything before DATA
was not delivered (retry), a 5xx reply is permanent, and a connection lost or timed out during
DATA may have delivered the message — that outcome is uncertain and never retried blindly.

A connection goes back to the pool only between transactions: the message is encoded before
MAIL FROM, a refused MAIL, RCPT or DATA is followed by RSET, and any other failure once MAIL
FROM was sent discards the connection, so one bad message can never leave the next one (of any
campaign) a `503 nested MAIL`. An address that needs SMTPUTF8 goes out only when the server
offers it, and is skipped (`smtputf8_unsupported`) when it does not.
"""

from __future__ import annotations

import asyncio
import binascii
import email.generator
import email.message
import email.policy
import logging
import re
import secrets
import ssl
from dataclasses import dataclass
from email.header import Header
from email.mime.multipart import MIMEMultipart
from email.mime.nonmultipart import MIMENonMultipart
from email.utils import formatdate
from io import BytesIO
from typing import Any

import aiosmtplib

from ..config import SmtpConfig
from ..domain.errors import (
    PermanentDeliveryError,
    TransientDeliveryError,
    UncertainDeliveryError,
    UndeliverableError,
)
from ..ports import EmailMessage
from .dkim import DkimSigner

log = logging.getLogger(__name__)

_DISCONNECTS = (
    aiosmtplib.SMTPServerDisconnected,
    aiosmtplib.SMTPTimeoutError,
    OSError,
    asyncio.TimeoutError,
)


class _Compat32(email.policy.Compat32):
    """compat32, with a short cut for the headers nearly every message has: a short ASCII value
    (no line break, fitting on its line) is written as it is, which is exactly what compat32's
    folding makes of it (a test compares the two on random values), without building and
    encoding an `email.header.Header` per header per message (most of a message's encoding)."""

    def _fold(self, name: str, value: Any, sanitize: bool) -> str:
        if (
            isinstance(value, str)
            and value.isascii()
            and "\n" not in value
            and "\r" not in value
            and len(name) + len(value) + 2 <= (self.max_line_length or 0)
        ):
            return f"{name}: {value}{self.linesep}"
        return str(super()._fold(name, value, sanitize))  # type: ignore[misc]  # not in typeshed


_POLICY = _Compat32()
_CRLF = _POLICY.clone(linesep="\r\n")


class _Generator(email.generator.BytesGenerator):
    """BytesGenerator, writing each part's body in one piece: the stock generator writes a
    body line by line, two writes and an encode per 76-character quoted-printable line (about
    a fifth of a message's encoding, and the part that grows with its length). It writes the
    same bytes (a test compares the two)."""

    def _write_lines(self, lines: str) -> None:
        if lines:  # the lines, each ending as the policy ends lines (what the stock one writes)
            self.write(email.generator.NLCRE.sub(self._NL, lines))  # type: ignore[attr-defined]


def to_bytes(mime: email.message.Message, policy: email.policy.Policy | None = None) -> bytes:
    """`mime.as_bytes(policy=policy)`, through `_Generator`."""
    out = BytesIO()
    _Generator(out, mangle_from_=False, policy=policy or _POLICY).flatten(mime, unixfrom=False)
    return out.getvalue()


def _header_value(name: str, value: str) -> str | Header:
    # Line breaks in a header value would let content inject headers (Bcc: ...): refuse them.
    if "\r" in value or "\n" in value:
        raise PermanentDeliveryError(f"refused {name} header: it contains a line break")
    return value if value.isascii() else Header(value, "utf-8")


def _text_part(body: str, subtype: str) -> MIMENonMultipart:
    """A UTF-8 quoted-printable part, encoded by binascii (C) rather than email.quoprimime
    (Python, a character at a time: twice the time of the rest of the part)."""
    part = MIMENonMultipart("text", subtype, policy=_POLICY, charset="utf-8")
    part["Content-Transfer-Encoding"] = "quoted-printable"
    part.set_payload(binascii.b2a_qp(body.encode("utf-8"), istext=True).decode("ascii"))
    return part


def _boundary() -> str:
    # Every part is quoted-printable, in which "=" only ever starts "=XX" or a soft line break:
    # "==" cannot occur in a part, so the generator need not search the parts for it (which
    # compiles a new regular expression per message).
    return "=" * 15 + secrets.token_hex(10) + "=="


def build_mime(message: EmailMessage, sender: str) -> email.message.Message:
    """multipart/alternative (text + html), or a single part when only one body exists.

    Built with the compat32 classes: the modern `EmailMessage` API re-parses every header
    through the header registry and costs more CPU than the rest of a send together."""
    if message.text and message.html:
        mime: email.message.Message = MIMEMultipart(
            "alternative", boundary=_boundary(), policy=_POLICY
        )
        mime.attach(_text_part(message.text, "plain"))
        mime.attach(_text_part(message.html, "html"))
    elif message.text or message.html:
        subtype = "plain" if message.text else "html"
        mime = _text_part(message.text or message.html or "", subtype)
    else:
        raise PermanentDeliveryError("message has no body")
    for name, value in (
        ("From", message.sender or sender),
        ("To", message.to),
        ("Subject", message.subject),
        ("Message-ID", message.message_id),
        *message.headers,
    ):
        mime[name] = _header_value(name, value)  # type: ignore[assignment]  # Header is allowed
    mime["Date"] = formatdate(usegmt=True)
    return mime


@dataclass
class _Pooled:
    """One pooled connection, and whether a transaction (MAIL FROM on) is open on it."""

    smtp: aiosmtplib.SMTP
    in_transaction: bool = False


class SmtpEmailSender:
    def __init__(self, config: SmtpConfig, *, signer: DkimSigner | None = None) -> None:
        self._config = config
        self._signer = signer  # signs every message when the identity has a DKIM key
        self._idle: asyncio.LifoQueue[_Pooled] = asyncio.LifoQueue()
        for _ in range(config.pool_size):
            self._idle.put_nowait(_Pooled(self._client()))

    def _client(self) -> aiosmtplib.SMTP:
        c = self._config
        password = c.password.get_secret_value() if c.password else None
        return aiosmtplib.SMTP(
            hostname=c.host,
            port=c.port,
            use_tls=c.tls == "tls",
            start_tls=c.tls == "starttls",
            username=c.username,
            password=password,
            timeout=c.timeout_s,
            cert_bundle=c.ca_file,
            local_hostname=c.ehlo_name,
        )

    async def send(self, message: EmailMessage) -> str:
        # Encoded before the transaction starts: an encoding failure never happens mid-way.
        mime = build_mime(message, self._config.sender)
        if self._signer is None:
            data = to_bytes(mime)
        else:
            # Encoded with CRLF as it goes on the wire, so the signature covers the exact bytes
            # sent; signed before MAIL FROM, so a failure never leaves a transaction open.
            data = await self._signer.sign_off_loop(to_bytes(mime, _CRLF))
        pooled = await self._idle.get()
        try:
            return await self._send_on(pooled, data, message)
        finally:
            # Whatever went wrong (a bug, a cancellation), never pool a connection inside a
            # transaction: the errors mapped below have already reset or closed theirs.
            if pooled.in_transaction:
                pooled.smtp.close()
                pooled.in_transaction = False
            self._idle.put_nowait(pooled)

    async def _send_on(self, pooled: _Pooled, data: bytes, message: EmailMessage) -> str:
        client = pooled.smtp
        if not client.is_connected:
            try:
                await client.connect()
            except aiosmtplib.SMTPAuthenticationError as exc:
                client.close()
                raise TransientDeliveryError(
                    f"SMTP authentication failed ({exc.code})", channel_wide="auth"
                ) from exc
            except (aiosmtplib.SMTPException, *_DISCONNECTS) as exc:
                client.close()
                raise TransientDeliveryError(
                    f"SMTP connect failed: {exc}", channel_wide=_connect_failure(exc)
                ) from exc
        utf8 = not (self._config.sender.isascii() and message.to.isascii())
        if utf8 and client.is_ehlo_or_helo_needed:
            try:
                await client.ehlo()  # the server's extensions are known only after it
            except (aiosmtplib.SMTPException, *_DISCONNECTS) as exc:
                client.close()
                raise TransientDeliveryError(f"SMTP EHLO failed: {exc}") from exc
        if utf8 and not client.supports_extension("smtputf8"):
            raise UndeliverableError(
                "the address needs SMTPUTF8, which the SMTP server does not offer",
                reason="smtputf8_unsupported",
            )
        options, encoding = (["SMTPUTF8"], "utf-8") if utf8 else ([], "ascii")
        pooled.in_transaction = True
        try:
            await client.mail(self._config.sender, options=options, encoding=encoding)
            await client.rcpt(message.to, encoding=encoding)
        except aiosmtplib.SMTPResponseException as exc:
            await _reset(pooled)
            raise _response_error(exc) from exc
        except (aiosmtplib.SMTPException, *_DISCONNECTS) as exc:
            client.close()
            raise TransientDeliveryError(f"SMTP connection lost before DATA: {exc}") from exc
        try:
            await client.data(data)
        except aiosmtplib.SMTPResponseException as exc:
            # The server answered DATA with an error: it did not take the message.
            await _reset(pooled)
            raise _response_error(exc) from exc
        except (aiosmtplib.SMTPException, *_DISCONNECTS) as exc:
            client.close()
            raise UncertainDeliveryError(f"SMTP connection lost during DATA: {exc}") from exc
        pooled.in_transaction = False
        return message.message_id

    async def aclose(self) -> None:
        """Quit the pooled connections, and stop the signer's helper process if it has one."""
        if self._signer is not None:
            await self._signer.aclose()
        while not self._idle.empty():
            client = self._idle.get_nowait().smtp
            if client.is_connected:
                try:
                    await asyncio.wait_for(client.quit(), 2)
                except (aiosmtplib.SMTPException, *_DISCONNECTS):
                    client.close()

    async def check(self) -> None:
        """Connect and say NOOP once, for `reactor doctor --probe`; raises on failure."""
        client = self._client()
        await client.connect()
        try:
            await client.noop()
        finally:
            client.close()


def _connect_failure(exc: BaseException) -> str:
    """tls when the handshake or the certificate failed, connect otherwise."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLError) or "CERTIFICATE_VERIFY_FAILED" in str(seen):
            return "tls"
        seen = seen.__cause__ or seen.__context__
    return "tls" if "tls" in str(exc).lower() or "ssl" in str(exc).lower() else "connect"


# RFC 3463's X.1.x: the address itself is bad (no such mailbox, no such domain, bad syntax,
# moved without forwarding). Only these make a refusal a hard bounce; a 5.7.x (policy) does not.
_BAD_ADDRESS = re.compile(r"(?<![\d.])5\.1\.(?:0|1|2|3|6|10)(?![\d.])")


def _response_error(exc: aiosmtplib.SMTPResponseException) -> Exception:
    text = f"SMTP {exc.code}: {exc.message}"
    if 500 <= exc.code < 600:
        hard = exc.code in (550, 551, 553) and bool(_BAD_ADDRESS.search(exc.message))
        return PermanentDeliveryError(text, suppress="hard_bounce" if hard else None)
    # 4xx: the server asked us to come back later (greylisting, a full mailbox, a rate limit).
    return TransientDeliveryError(text, deferrable=400 <= exc.code < 500)


async def _reset(pooled: _Pooled) -> None:
    """End the transaction (RSET), or the connection if that fails."""
    try:
        await pooled.smtp.rset()
    except (aiosmtplib.SMTPException, *_DISCONNECTS):
        pooled.smtp.close()
    pooled.in_transaction = False
