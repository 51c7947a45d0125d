"""Signing off the event loop: a threaded signer signs in the DKIM worker thread, an inline one
on the loop, and what either sends through the pooled SMTP sender verifies with dkimpy against
the public key on the messages the SMTP sink captured."""

from __future__ import annotations

import base64
import threading
from typing import Any

import dkim  # type: ignore[import-untyped]
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from reactor.adapters import dkim as reactor_dkim
from reactor.adapters.dkim import DkimSigner
from reactor.adapters.smtp import SmtpEmailSender
from reactor.embedded.smtp_sink import SmtpSink
from reactor.ports import EmailMessage

from .helpers import sink_smtp

DOMAIN = "reactor.example"


@pytest.fixture(scope="module")
def key_pem() -> bytes:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


class RecordingSigner(DkimSigner):
    """A real signer that notes which thread each signature was made on."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.threads: list[str] = []

    def sign(self, message: bytes) -> bytes:
        self.threads.append(threading.current_thread().name)
        return super().sign(message)


def dnsfunc_for(signer: DkimSigner) -> Any:
    record = b"v=DKIM1; k=rsa; p=" + base64.b64encode(signer.public_key_der)
    name = b"s1._domainkey." + DOMAIN.encode() + b"."

    def dnsfunc(queried: bytes, timeout: int = 5) -> bytes:
        return record if queried.rstrip(b".") + b"." == name else b""

    return dnsfunc


def message(i: int) -> EmailMessage:
    return EmailMessage(
        to=f"c{i}@example.com",
        subject=f"Hello {i}",
        text=f"Hello {i}, 20% off.\n" * 5,
        html=f"<p>Hello <b>{i}</b></p>" * 5,
        message_id=f"<t.{i}@{DOMAIN}>",
        headers=(
            ("List-Unsubscribe", f"<https://m.{DOMAIN}/u/token{i}>"),
            ("List-Unsubscribe-Post", "List-Unsubscribe=One-Click"),
        ),
    )


def test_threads_are_used_by_default_only_where_rsa_signing_releases_the_gil(
    key_pem: bytes,
) -> None:
    fast = DkimSigner(DOMAIN, "s1", key_pem)
    assert fast.threaded is reactor_dkim.RSA_SIGN_RELEASES_GIL
    # dkimpy's own RSA is Python: a thread could never run it beside the loop.
    assert DkimSigner(DOMAIN, "s1", key_pem, fast=False).threaded is False


@pytest.mark.parametrize("threaded", [True, False])
async def test_messages_sent_with_either_signer_verify_and_sign_where_expected(
    key_pem: bytes, sink: SmtpSink, threaded: bool
) -> None:
    signer = RecordingSigner(DOMAIN, "s1", key_pem, threaded=threaded)
    config = sink_smtp(sink, sender=f"campaigns@{DOMAIN}")
    sender = SmtpEmailSender(config, signer=signer)
    try:
        for i in range(6):
            await sender.send(message(i))
    finally:
        await sender.aclose()
    assert len(sink.messages) == 6
    dnsfunc = dnsfunc_for(signer)
    for got in sink.messages:
        assert got.raw.startswith(b"DKIM-Signature:")
        assert dkim.verify(got.raw, dnsfunc=dnsfunc), got.to
    loop_thread = threading.current_thread().name
    assert len(signer.threads) == 6
    if threaded:
        assert all(name.startswith("dkim-sign") for name in signer.threads), signer.threads
    else:
        assert signer.threads == [loop_thread] * 6


async def test_a_signature_made_in_the_thread_covers_the_unsubscribe_headers(
    key_pem: bytes,
) -> None:
    signer = DkimSigner(DOMAIN, "s1", key_pem, threaded=True)
    raw = (
        b"From: a@reactor.example\r\nTo: b@example.com\r\nSubject: s\r\n"
        b"Date: Thu, 01 Jan 2026 00:00:00 +0000\r\nMessage-ID: <m@reactor.example>\r\n"
        b"List-Unsubscribe: <https://m.reactor.example/u/t>\r\n"
        b"List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n\r\nbody\r\n"
    )
    signed = await signer.sign_off_loop(raw)
    dnsfunc = dnsfunc_for(signer)
    assert dkim.verify(signed, dnsfunc=dnsfunc)
    tampered = signed.replace(b"/u/t>", b"/u/x>")
    assert tampered != signed
    assert not dkim.verify(tampered, dnsfunc=dnsfunc)
