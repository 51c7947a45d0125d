"""An SMTP sink on aiosmtpd that keeps every message it accepts, with fault injection: refuse the
next N messages with a given reply, fail a share of them at random, or go down and come back."""

from __future__ import annotations

import asyncio
import email
import email.policy
import functools
import random
import ssl
import time
from dataclasses import dataclass, field
from typing import Any

from aiosmtpd.smtp import SMTP as SMTPProtocol
from aiosmtpd.smtp import Envelope, Session

from .served import Served
from .tls import TestPki


@dataclass
class CapturedEmail:
    """One accepted message for one recipient; parsed on first access (parsing is the costly
    part of a sink, and most runs only count messages)."""

    mail_from: str
    to: str
    raw: bytes
    received_at: float = 0.0  # time.monotonic() when accepted

    @functools.cached_property
    def _parsed(self) -> dict[str, Any]:
        msg = email.message_from_bytes(self.raw, policy=email.policy.default)
        text = html = None
        for part in msg.walk():
            ctype = part.get_content_type()
            if ctype == "text/plain" and text is None:
                text = part.get_content()
            elif ctype == "text/html" and html is None:
                html = part.get_content()
        return {
            "subject": str(msg.get("Subject", "")).strip(),
            "message_id": str(msg.get("Message-ID", "")).strip(),
            "text": text,
            "html": html,
            "headers": {k.lower(): str(v) for k, v in msg.items()},
        }

    def header(self, name: str) -> str | None:
        """A header's value as the recipient's mail client reads it (unfolded)."""
        value = self._parsed["headers"].get(name.lower())
        return None if value is None else " ".join(str(value).split())

    @property
    def subject(self) -> str:
        return str(self._parsed["subject"])

    @property
    def message_id(self) -> str:
        return str(self._parsed["message_id"])

    @property
    def text(self) -> str | None:
        return self._parsed["text"]  # type: ignore[no-any-return]

    @property
    def html(self) -> str | None:
        return self._parsed["html"]  # type: ignore[no-any-return]


@dataclass
class _Faults:
    next_replies: list[str] = field(default_factory=list)
    failure_rate: float = 0.0
    failure_reply: str = "451 4.3.0 temporary failure (injected)"
    drop_during_data: int = 0
    # Greylisting: a recipient first seen less than this long ago gets 450 at RCPT.
    greylist_s: float = 0.0
    first_seen: dict[str, float] = field(default_factory=dict)
    # Mailboxes that do not exist: RCPT answers 550 5.1.1, as a receiving MTA does.
    unknown_mailboxes: set[str] = field(default_factory=set)


_LINE_LIMIT = SMTPProtocol.line_length_limit  # 1,001 bytes, its CRLF included


class _SinkProtocol(SMTPProtocol):
    """aiosmtpd's protocol, answering each command after the sink's simulated round trip."""

    def __init__(self, sink: SmtpSink, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._sink = sink
        self._reply_started = False

    async def push(self, status: Any) -> None:
        # One round trip per reply: a multi-line reply (EHLO's "250-..." lines) travels
        # together, so only its first line waits.
        line = status.encode() if isinstance(status, str) else bytes(status)
        if self._sink.reply_delay_s and not self._reply_started:
            await asyncio.sleep(self._sink.reply_delay_s)
        self._reply_started = line[3:4] == b"-"
        await super().push(status)

    async def smtp_DATA(self, arg: str) -> None:
        """aiosmtpd's DATA, reading the message in pieces of up to a kilobyte instead of a line
        at a time. aiosmtpd spends a coroutine and a dozen Python operations per line, about
        2.5 µs a 76-character line: on the benches' two shared cores that charged the sender
        for the receiver's parsing, in proportion to the size of what it sent. The replies and
        the content handed to the handler are aiosmtpd's own (its limits and dot-unstuffing)."""
        if await self.check_helo_needed() or await self.check_auth_needed("DATA"):
            return
        assert self.envelope is not None
        if not self.envelope.rcpt_tos:
            await self.push("503 Error: need RCPT command")
            return
        if arg:
            await self.push("501 Syntax: DATA")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        data = bytearray()
        size, limit = 0, self.data_size_limit
        # The message ends at a line holding only a dot: a piece ending ".\r\n" ends it when
        # the line break before that dot is there too (a lone dot right away: empty content).
        while True:
            if limit and len(data) > limit + 8:  # too much: read on, keep only the tail
                size += len(data) - 8
                del data[:-8]
            try:
                data += await self._reader.readuntil(b".\r\n")
            except asyncio.LimitOverrunError as exc:  # a kilobyte without ".\r\n" (the limit)
                data += await self._reader.readexactly(exc.consumed)
                continue
            except asyncio.IncompleteReadError:  # the connection went away mid-message
                return
            except asyncio.CancelledError:  # reset during DATA: as aiosmtpd's own DATA does
                self._writer.close()
                raise
            if data.endswith(b"\r\n.\r\n") or data == b".\r\n":
                break
        content = bytes(data[:-3])
        if limit and size + len(content) > limit:
            await self.push("552 Error: Too much mail data")
            self._set_post_data_state()  # type: ignore[no-untyped-call]
            return
        if max(map(len, content.split(b"\r\n"))) > _LINE_LIMIT - 2:
            await self.push("500 Line too long (see RFC5321 4.5.3.1.6)")
            self._set_post_data_state()  # type: ignore[no-untyped-call]
            return
        # RFC 5321 4.5.2: a line's leading dot was doubled by the client; drop one.
        content = content.replace(b"\r\n.", b"\r\n")
        if content.startswith(b"."):
            content = content[1:]
        self.envelope.original_content = content
        self.envelope.content = content
        status = await self._call_handler_hook("DATA")
        self._set_post_data_state()  # type: ignore[no-untyped-call]
        await self.push(status)


class _Handler:
    def __init__(self, sink: SmtpSink) -> None:
        self.sink = sink

    async def handle_RCPT(
        self,
        server: SMTPProtocol,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        faults = self.sink.faults
        if address.lower() in faults.unknown_mailboxes:
            return f"550 5.1.1 <{address}>: Recipient address rejected: User unknown"
        if faults.greylist_s:
            first = faults.first_seen.setdefault(address, time.monotonic())
            if time.monotonic() - first < faults.greylist_s:
                self.sink.greylisted += 1
                return "450 4.2.0 Greylisted, please try again later"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTPProtocol, session: Session, envelope: Envelope) -> str:
        faults = self.sink.faults
        if faults.drop_during_data > 0:
            faults.drop_during_data -= 1
            # Take the message, then vanish before answering: the client cannot know.
            self.sink._store(envelope)
            if server.transport is not None:
                server.transport.close()
            return "250 OK"
        if faults.next_replies:
            return faults.next_replies.pop(0)
        if faults.failure_rate and self.sink.rng.random() < faults.failure_rate:
            return faults.failure_reply
        self.sink._store(envelope)
        return "250 2.0.0 OK: queued"


class SmtpSink(Served):
    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        seed: int | None = None,
        reply_delay_s: float = 0.0,
        smtputf8: bool = False,
        tls: TestPki | None = None,
    ) -> None:
        self.host = host
        # STARTTLS with the PKI's server certificate; until `impostor_until` (monotonic), with
        # its impostor certificate instead, which a client trusting the CA rejects.
        self.tls = tls
        self.impostor_until = 0.0
        self.smtputf8 = smtputf8  # offer SMTPUTF8 (RFC 6531) in EHLO
        self.port = port
        self.messages: list[CapturedEmail] = []
        self.greylisted = 0  # RCPTs answered 450 by greylisting
        self.faults = _Faults()
        # A simulated network round trip before every reply (a real provider is not on
        # loopback); 0 answers at once.
        self.reply_delay_s = reply_delay_s
        self.rng = random.Random(seed)
        self._server: asyncio.base_events.Server | None = None
        self._handler = _Handler(self)
        self._protocols: set[SMTPProtocol] = set()

    def _store(self, envelope: Envelope) -> None:
        raw = envelope.original_content or envelope.content or b""
        if isinstance(raw, str):
            raw = raw.encode()
        for rcpt in envelope.rcpt_tos:
            self.messages.append(
                CapturedEmail(
                    mail_from=envelope.mail_from or "",
                    to=rcpt,
                    raw=raw,
                    received_at=time.monotonic(),
                )
            )

    async def start(self) -> None:
        loop = asyncio.get_running_loop()

        def protocol() -> SMTPProtocol:
            proto = _SinkProtocol(
                self,
                self._handler,
                hostname="reactor-sink",
                ident="reactor-sink",
                data_size_limit=10 * 1024 * 1024,
                enable_SMTPUTF8=self.smtputf8,
                tls_context=self._tls_context(),
            )
            self._protocols.add(proto)
            return proto

        self._server = await loop.create_server(protocol, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for proto in list(self._protocols):
                if proto.transport is not None:
                    proto.transport.close()
                handler_task = getattr(proto, "_handler_coroutine", None)
                if handler_task is not None:
                    handler_task.cancel()
            self._protocols.clear()
            await self._server.wait_closed()
            self._server = None

    async def go_down(self) -> None:
        """Refuse connections (and drop the open ones) until `come_back()`."""
        await self.stop()

    async def come_back(self) -> None:
        await self.start()

    def _tls_context(self) -> ssl.SSLContext | None:
        if self.tls is None:
            return None
        impostor = time.monotonic() < self.impostor_until
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(
            self.tls.impostor_cert if impostor else self.tls.cert,
            self.tls.impostor_key if impostor else self.tls.key,
        )
        return context

    def present_impostor_certificate(self, seconds: float) -> None:
        """For `seconds`, every TLS handshake presents a certificate the client cannot verify."""
        self.impostor_until = time.monotonic() + seconds

    def greylist(self, seconds: float) -> None:
        """Answer 450 to each recipient's first attempts for `seconds` (greylisting)."""
        self.faults.greylist_s = seconds

    def fail_next(self, n: int, reply: str = "451 4.3.0 temporary failure (injected)") -> None:
        self.faults.next_replies.extend([reply] * n)

    def recipients(self) -> list[str]:
        return [m.to for m in self.messages]

    def settings_env(self) -> dict[str, Any]:
        env = {
            "SMTP_HOST": self.host,
            "SMTP_PORT": str(self.port),
            "SMTP_TLS": "none",
            "EMAIL_FROM": "campaigns@reactor.example",
        }
        if self.tls is not None:
            env.update({"SMTP_TLS": "starttls", "SMTP_CA_FILE": str(self.tls.ca)})
        return env
