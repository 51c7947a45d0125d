"""Email over SMTP: a pool of persistent aiosmtplib connections.

Each send walks MAIL, RCPT and DATA itself so that a failure can be placed: anything before DATA
was not delivered (retry), a 5xx reply is permanent, and a connection lost or timed out during
DATA may have delivered the message — that outcome is uncertain and never retried blindly.
"""

from __future__ import annotations

import asyncio
import email.message
import email.policy
import logging
from email.utils import formatdate

import aiosmtplib

from ..config import SmtpConfig
from ..domain.errors import PermanentDeliveryError, TransientDeliveryError, UncertainDeliveryError
from ..ports import EmailMessage

log = logging.getLogger(__name__)

_DISCONNECTS = (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError, OSError,
                asyncio.TimeoutError)


def build_mime(message: EmailMessage, sender: str) -> email.message.EmailMessage:
    """A multipart/alternative message; header values with line breaks are refused by the
    stdlib's strict policy, which closes the header-injection door a second time."""
    mime = email.message.EmailMessage(policy=email.policy.SMTP)
    try:
        mime["From"] = sender
        mime["To"] = message.to
        mime["Subject"] = message.subject
        mime["Message-ID"] = message.message_id
        mime["Date"] = formatdate(usegmt=True)
    except ValueError as exc:
        raise PermanentDeliveryError(f"refused header: {exc}", code="header_injection") from exc
    if message.text:
        mime.set_content(message.text)
        if message.html:
            mime.add_alternative(message.html, subtype="html")
    elif message.html:
        mime.set_content(message.html, subtype="html")
    else:
        raise PermanentDeliveryError("message has no body", code="empty_body")
    return mime


class SmtpEmailSender:
    def __init__(self, config: SmtpConfig) -> None:
        self._config = config
        self._idle: asyncio.LifoQueue[aiosmtplib.SMTP] = asyncio.LifoQueue()
        for _ in range(config.pool_size):
            self._idle.put_nowait(self._client())
        self._closed = False

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
        )

    async def send(self, message: EmailMessage) -> str:
        mime = build_mime(message, self._config.sender)
        client = await self._idle.get()
        try:
            return await self._send_on(client, mime, message)
        finally:
            self._idle.put_nowait(client)

    async def _send_on(self, client: aiosmtplib.SMTP, mime: email.message.EmailMessage,
                       message: EmailMessage) -> str:
        if not client.is_connected:
            try:
                await client.connect()
            except aiosmtplib.SMTPAuthenticationError as exc:
                raise TransientDeliveryError(f"SMTP authentication failed ({exc.code})",
                                             code=str(exc.code)) from exc
            except (aiosmtplib.SMTPException, *_DISCONNECTS) as exc:
                client.close()
                raise TransientDeliveryError(f"SMTP connect failed: {exc}") from exc
        try:
            await client.mail(self._config.sender)
            await client.rcpt(message.to)
        except aiosmtplib.SMTPResponseException as exc:
            await _reset(client)
            raise _response_error(exc) from exc
        except (aiosmtplib.SMTPException, *_DISCONNECTS) as exc:
            client.close()
            raise TransientDeliveryError(f"SMTP connection lost before DATA: {exc}") from exc
        try:
            await client.data(mime.as_bytes())
        except aiosmtplib.SMTPResponseException as exc:
            # The server answered DATA with an error: it did not take the message.
            await _reset(client)
            raise _response_error(exc) from exc
        except (aiosmtplib.SMTPException, *_DISCONNECTS) as exc:
            client.close()
            raise UncertainDeliveryError(f"SMTP connection lost during DATA: {exc}") from exc
        return message.message_id

    async def aclose(self) -> None:
        self._closed = True
        while not self._idle.empty():
            client = self._idle.get_nowait()
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


def _response_error(exc: aiosmtplib.SMTPResponseException) -> Exception:
    text = f"SMTP {exc.code}: {exc.message}"
    if 500 <= exc.code < 600:
        return PermanentDeliveryError(text, code=str(exc.code))
    return TransientDeliveryError(text, code=str(exc.code))


async def _reset(client: aiosmtplib.SMTP) -> None:
    try:
        await client.rset()
    except (aiosmtplib.SMTPException, *_DISCONNECTS):
        client.close()
