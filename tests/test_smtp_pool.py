"""The SMTP pool keeps every connection between transactions: a message that fails in the
middle of one (whatever the error) never leaves the next message, of any campaign, a `503 nested
MAIL`; an address that needs SMTPUTF8 goes out only to a server that offers it."""

from __future__ import annotations

import aiosmtplib
import pytest
from pydantic import SecretStr

from reactor.adapters.smtp import SmtpEmailSender
from reactor.config import SmtpConfig
from reactor.domain.errors import InvalidCampaign, UndeliverableError
from reactor.domain.messages import header_text, message_id
from reactor.domain.models import parse_campaign
from reactor.embedded.smtp_sink import SmtpSink
from reactor.ports import EmailMessage


def sender_for(sink: SmtpSink) -> SmtpEmailSender:
    return SmtpEmailSender(
        SmtpConfig(
            host=sink.host,
            port=sink.port,
            username=None,
            password=SecretStr(""),
            tls="none",
            pool_size=1,  # every message on the same connection
            timeout_s=5,
            sender="campaigns@reactor.example",
        )
    )


def message(to: str, subject: str = "Hello") -> EmailMessage:
    return EmailMessage(
        to=to, subject=subject, text="body", html=None, message_id=message_id("reactor.example")
    )


async def test_an_unexpected_error_mid_transaction_does_not_poison_the_pool(
    sink: SmtpSink, monkeypatch: pytest.MonkeyPatch
) -> None:
    email = sender_for(sink)
    await email.send(message("a@example.com"))
    original = aiosmtplib.SMTP.data
    calls = 0

    async def data_fails_once(self: aiosmtplib.SMTP, *args: object, **kwargs: object) -> object:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("a bug between RCPT and DATA")
        return await original(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(aiosmtplib.SMTP, "data", data_fails_once)
    with pytest.raises(RuntimeError):
        await email.send(message("b@example.com"))
    # The same (only) pooled connection serves the next message: a fresh transaction.
    await email.send(message("c@example.com"))
    await email.aclose()
    assert sink.recipients() == ["a@example.com", "c@example.com"]


async def test_smtputf8_addresses_need_a_server_that_offers_it() -> None:
    async with SmtpSink(smtputf8=False) as plain:
        email = sender_for(plain)
        with pytest.raises(UndeliverableError) as info:
            await email.send(message("jörg@example.com"))
        assert info.value.reason == "smtputf8_unsupported"
        await email.send(message("ok@example.com"))  # the connection is still clean
        await email.aclose()
        assert plain.recipients() == ["ok@example.com"]
    async with SmtpSink(smtputf8=True) as utf8:
        email = sender_for(utf8)
        await email.send(message("jörg@example.com"))
        await email.aclose()
        assert utf8.recipients() == ["jörg@example.com"]


@pytest.mark.parametrize("char", ["\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\x00", "\u2028"])
def test_subjects_with_control_characters_are_refused_at_validation(char: str) -> None:
    import datetime as dt

    doc = {
        "_id": 1,
        "name": "c",
        "status": "approved",
        "startDate": dt.datetime(2026, 1, 1, tzinfo=dt.UTC),
        "endDate": dt.datetime(2026, 1, 2, tzinfo=dt.UTC),
        "email": {"subject": f"Sale{char}now", "text": "t"},
    }
    with pytest.raises(InvalidCampaign) as info:
        parse_campaign(doc)
    assert "control characters" in info.value.detail


def test_names_with_control_characters_are_cleaned_for_headers() -> None:
    assert header_text("Ann\x0bBcc: x@evil\x1c\r\nEve\x00") == "Ann Bcc: x@evil Eve"
