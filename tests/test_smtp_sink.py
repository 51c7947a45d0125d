"""The SMTP sink reads DATA in pieces instead of aiosmtpd's line at a time: what it stores and
what it answers must be what aiosmtpd's own DATA stores and answers, for every shape of
message (dot-stuffed lines, lines ending in a dot, pieces longer than the reader's limit, long
lines, too much data, several messages on one connection)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiosmtplib
import pytest
from aiosmtpd.smtp import SMTP as SMTPProtocol
from aiosmtpd.smtp import Envelope, Session

from reactor.embedded.smtp_sink import SmtpSink

LIMIT = 10 * 1024 * 1024  # the sink's data_size_limit


class _Keep:
    def __init__(self) -> None:
        self.contents: list[bytes] = []

    async def handle_DATA(self, server: SMTPProtocol, session: Session, envelope: Envelope) -> str:
        self.contents.append(bytes(envelope.original_content or b""))
        return "250 2.0.0 OK: queued"


@pytest.fixture
async def stock() -> AsyncIterator[tuple[int, _Keep]]:
    """aiosmtpd's unmodified protocol, as the reference."""
    keep = _Keep()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: SMTPProtocol(keep, hostname="stock", data_size_limit=LIMIT), "127.0.0.1", 0
    )
    try:
        yield server.sockets[0].getsockname()[1], keep
    finally:
        server.close()
        await server.wait_closed()


def _messages() -> list[bytes]:
    head = b"From: a@example.com\r\nTo: b@example.com\r\nSubject: s\r\n\r\n"
    return [
        head + b"body\r\n",
        head + b".starts with a dot\r\n..two dots\r\n.\r\nafter a lone dot\r\n",
        head + b"ends with a dot.\r\nand another.\r\n.",
        head + b"x" * 998 + b"\r\n" + b"y" * 997 + b".\r\n",
        head + b"".join(b"line %d of many, some ending in a dot.\r\n" % i for i in range(5000)),
        # Pieces past the reader's 1,001-byte limit with no ".\r\n" in them, then lines of dots.
        head + (b"z" * 990 + b"\r\n") * 3 + b".\r\n" + b"." * 900 + b"\r\n" + b"." * 998,
        head + b"no final line break",
        head + b"q" * 1500 + b"\r\n",  # a line too long: 500
        head + (b"w" * 900 + b"\r\n") * (LIMIT // 900 + 10),  # too much data: 552
        head + b"the connection is still in a fit state\r\n",
    ]


async def _send_all(port: int, messages: list[bytes]) -> list[int]:
    """The reply code to each message's DATA, all on one connection."""
    codes: list[int] = []
    async with aiosmtplib.SMTP(hostname="127.0.0.1", port=port, timeout=30) as smtp:
        for raw in messages:
            # MAIL without SIZE (sendmail would declare it, and be refused before DATA).
            await smtp.mail("a@example.com")
            await smtp.rcpt("b@example.com")
            try:
                codes.append((await smtp.data(raw)).code)
            except aiosmtplib.SMTPDataError as exc:
                codes.append(exc.code)
    return codes


async def test_the_sink_stores_and_answers_what_aiosmtpd_does(
    stock: tuple[int, _Keep],
) -> None:
    port, keep = stock
    messages = _messages()
    async with SmtpSink() as sink:
        got = await _send_all(sink.port, messages)
        stored = [m.raw for m in sink.messages]
    expected = await _send_all(port, messages)
    assert got == expected
    assert got == [250] * 7 + [500, 552, 250]
    assert stored == keep.contents
    assert len(stored) == 8
    assert stored[1].endswith(b"\r\n.starts with a dot\r\n..two dots\r\n.\r\nafter a lone dot\r\n")
